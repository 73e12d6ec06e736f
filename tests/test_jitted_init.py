"""Every agent's `init` is jitted where the agent is built, and gives the parameters the same
function gives run op by op (bitwise at these sizes; `benchmarks/perf/init.py` checks the
quickstart and crafter_1h sizes)."""

import jax
import pytest

from mbxfer import agents
from mbxfer.benchmarks import config as config_lib
from mbxfer.benchmarks.perf import init as init_benchmark
from mbxfer.envs import base as env_base
from mbxfer.envs import registry

SMALL_MODEL = {"deter": 16, "hidden": 16, "reward_bins": 7, "encoder_depth": 4}
AGENTS = {
    "dreamer": {
        "model": {**SMALL_MODEL, "stoch_groups": 2, "stoch_classes": 2},
        "actor_critic": {"hidden": 16, "critic_bins": 7},
        "exploration": {"module": "disagreement", "hidden": 16},
    },
    "muzero": {
        "model": {**SMALL_MODEL, "decoder": True, "losses": {"reconstruction": 1.0}},
        "hidden": 16,
        "value_bins": 7,
    },
    "ppo": {"exploration": {"module": "rnd", "hidden": 16}},
    "random": {},
    "dreamer_nomodel": {"model": SMALL_MODEL, "actor_critic": {"hidden": 16, "critic_bins": 7}},
    "muzero_nomodel": {"model": SMALL_MODEL, "hidden": 16, "value_bins": 7},
}


def _spec(name: str, **kwargs):
    return env_base.environment_spec(registry.make(name, task="reach_bottom_right", **kwargs))


def _agent(name: str, spec, **updates):
    config = config_lib.build({"agent": {"name": name, **AGENTS[name], **updates}})
    return agents.make(name, spec, config.agent_config)


def test_every_agent_jits_its_init():
    assert sorted(AGENTS) == agents.names()
    spec = _spec("grid_image", size=5)
    for name in AGENTS:
        init = _agent(name, spec).init
        assert hasattr(init, "lower") and hasattr(init, "__wrapped__"), name


def test_jitted_init_equals_op_by_op_init():
    # The smallest learning agent (fewest ops run one by one): the fast check.
    agent = _agent("ppo", _spec("grid", size=5), exploration={"module": "none"}, encoder_layers=1)
    key = jax.random.PRNGKey(3)
    result = init_benchmark.compare(agent.init(key), agent.init.__wrapped__(key))
    assert result["identical"] and result["leaves"] > 10, result
    other = init_benchmark.compare(agent.init(jax.random.PRNGKey(4)), agent.init(key))
    assert not other["identical"] and other["max_abs_diff"] > 0  # another key, other params


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(AGENTS))
def test_every_agent_jitted_init_equals_op_by_op_init_on_images(name):
    agent = _agent(name, _spec("grid_image", size=5))
    key = jax.random.PRNGKey(3)
    result = init_benchmark.compare(agent.init(key), agent.init.__wrapped__(key))
    assert result["identical"], result
