"""Every registered agent meets the contract of agents/base.py, as the runner uses it.

Parametrized over `agents.names()`, so a new agent gets these tests by registering (as every
environment gets tests/test_conformance.py). Agents run at tiny sizes (`TINY`; an agent without
an entry runs its default config) on the 5x5 vector grid, on a replay batch of random play.
"""

import dataclasses
import types

import jax
import numpy as np
import pytest
import tiny_configs
from dm_env import specs

from mbxfer import agents
from mbxfer.agents import base
from mbxfer.agents.replay import Replay
from mbxfer.benchmarks import checkpoint, loop, protocols
from mbxfer.benchmarks import config as config_lib
from mbxfer.envs import base as env_base
from mbxfer.envs import registry, vector

NUM_ENVS = 2
TINY = {
    **tiny_configs.AGENT,
    "muzero_nomodel": [
        "agent.model.deter=32",
        "agent.model.hidden=32",
        "agent.value_bins=31",
        "agent.hidden=32",
        "agent.n_step=3",
    ],
    "dreamer_nomodel": tiny_configs.AGENT["dreamer"],
    "ppo": ["agent.hidden=32", "agent.rollout_length=4", "agent.epochs=1", "agent.minibatches=2"],
}
"""`--set` overrides of each agent's tiny config."""


def _config(name: str, *extra: str):
    items = [f"agent={name}", *TINY.get(name, []), *extra]
    return config_lib.build(config_lib.parse_overrides(items)).agent_config


def _env(seed: int = 0):
    return registry.make(
        "grid", size=5, observation="vector", task="reach_bottom_right", length=6, seed=seed
    )


def _play(agent_name: str, env_spec, steps: int = 16):
    """A replay batch of random play as the runner stores it, in the shape `update` is fed:
    `replay.latest(T + 1)` for on-policy agents, `replay.sample(B)` `[2, 8]` otherwise."""
    envs = vector.VectorEnv(_env, NUM_ENVS, mode="inline", seed=0)
    replay = Replay(1000, NUM_ENVS, 8, envs.observation_spec(), envs.action_spec(), seed=0)
    rng = np.random.default_rng(0)
    timestep = envs.reset()
    for _ in range(steps):
        action = rng.integers(env_spec.actions.num_values, size=NUM_ENVS).astype(np.int32)
        replay.add(loop.replay_step(timestep, action))
        timestep = envs.step(action)
    envs.close()
    if agent_name != "random":
        rollout = agents.make(agent_name, env_spec, _config(agent_name)).rollout_length
        if rollout:
            return replay.latest(rollout + 1)
    return replay.sample(2)


def _leaves_equal(a, b) -> bool:
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    return tree_a == tree_b and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b)
    )


def _signature(tree):
    return jax.tree.map(lambda x: (np.shape(x), np.asarray(x).dtype), tree)


@pytest.fixture(scope="module", params=agents.names())
def run(request):
    """One agent's state, acting and update outputs, computed once per module (jit compiles
    are the cost; every test below reads this)."""
    name = request.param
    env = _env()
    spec = env_base.environment_spec(env)
    agent = agents.make(name, spec, _config(name))
    act = jax.jit(agent.act, static_argnums=4)
    update = jax.jit(agent.update)
    state = agent.init(jax.random.PRNGKey(0))
    observation = env_base.agent_observation(env.reset().observation)
    step = base.ActInput(
        {k: np.repeat(v[None], NUM_ENVS, 0) for k, v in observation.items()},
        np.ones(NUM_ENVS, bool),
    )
    carry = agent.initial_carry(NUM_ENVS)
    acted = {mode: act(state, carry, step, jax.random.PRNGKey(1), mode) for mode in base.MODES}
    batch = _play(name, spec)
    updated, metrics = update(state, batch, jax.random.PRNGKey(2))
    return types.SimpleNamespace(**locals())


def test_init_is_a_pure_function_of_the_key(run):
    again = run.agent.init(jax.random.PRNGKey(0))
    assert _leaves_equal(run.state, again)
    for leaf in jax.tree.leaves(run.state):
        assert np.asarray(leaf).dtype != np.float64, "float64 leaf: jit would silently demote it"
    if run.agent.learns:
        other = run.agent.init(jax.random.PRNGKey(7))
        assert not _leaves_equal(run.state, other), "init ignores its key"


def test_act_returns_valid_actions_and_a_carry_of_the_same_shape(run):
    action_spec = run.spec.actions
    for mode, (action, carry) in run.acted.items():
        action = np.asarray(action)
        assert action.shape == (NUM_ENVS,) + action_spec.shape, mode
        assert isinstance(action_spec, specs.DiscreteArray)
        assert np.issubdtype(action.dtype, np.integer), (mode, action.dtype)
        assert ((action >= 0) & (action < action_spec.num_values)).all(), (mode, action)
        # The runner feeds the carry back every step: same structure, shapes and dtypes.
        assert _signature(carry) == _signature(run.carry), mode


def test_act_and_update_are_deterministic_under_a_fixed_key(run):
    for mode, (action, carry) in run.acted.items():
        again = run.act(run.state, run.carry, run.step, jax.random.PRNGKey(1), mode)
        assert _leaves_equal((action, carry), again), mode
    updated, metrics = run.update(run.state, run.batch, jax.random.PRNGKey(2))
    assert _leaves_equal(run.updated, updated)
    assert _leaves_equal(run.metrics, metrics)


def test_update_keeps_the_state_structure_and_reports_finite_scalars(run):
    assert _signature(run.updated) == _signature(run.state)
    for key, value in run.metrics.items():
        assert np.shape(value) == (), key
        assert np.isfinite(np.asarray(value)), key
    if run.agent.learns:
        assert run.metrics, "a learning agent reports no metrics"
        assert not _leaves_equal(run.state, run.updated), "update changed nothing"


def test_checkpoint_round_trip_restores_the_state_exactly(run, tmp_path):
    folder = checkpoint.save(tmp_path, 1, run.updated, {"env_steps": 1})
    fresh = run.agent.init(jax.random.PRNGKey(5))
    loaded, runner_state = checkpoint.load(folder, fresh)
    loaded = jax.tree.map(np.asarray, loaded)  # as the runner does (then jnp.asarray)
    assert runner_state["env_steps"] == 1
    assert _leaves_equal(loaded, run.updated)
    # The loaded state acts exactly as the state it was saved from.
    key = jax.random.PRNGKey(3)
    before = run.act(run.updated, run.carry, run.step, key, "explore")
    after = run.act(jax.tree.map(jax.numpy.asarray, loaded), run.carry, run.step, key, "explore")
    assert _leaves_equal(before, after)


def _with_exploration(name: str):
    """The agent with an intrinsic module, if its config has one (RND: every agent takes it)."""
    config = _config(name)
    if not hasattr(config, "exploration"):
        return None
    exploration = dataclasses.replace(config.exploration, module="rnd", intrinsic_scale=1.0)
    return agents.make(name, _spec(), dataclasses.replace(config, exploration=exploration))


def _spec():
    return env_base.environment_spec(_env())


def test_part_of_names_every_leaf_and_carry_over_follows_it(run):
    agent = run.agent
    if agent.part_of is None:
        assert not agent.learns, "a learning agent must name its parts for carry-over"
        with pytest.raises(protocols.ProtocolError, match="part_of"):
            protocols.carry_over("world_model", run.updated, run.state, None)
        return
    explorer = _with_exploration(run.name)
    state = explorer.init(jax.random.PRNGKey(0)) if explorer else run.state
    parts = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(state):
        path = jax.tree_util.keystr(path)
        parts[path] = agent.part_of(path)
        assert parts[path] in base.PARTS, (path, parts[path])
        if path.startswith(".exploration"):
            assert parts[path] == "exploration", path
    assert {"policy", "value"} <= set(parts.values()), set(parts.values())
    if agent.adapt is not None:  # Zero-shot fits the world model's reward head.
        assert any("reward_head" in p and parts[p] == "world_model" for p in parts)
    # Each rule carries exactly the leaves of its parts from the trained state.
    for rule, carried in protocols._CARRIED_PARTS.items():
        mixed = protocols.carry_over(rule, run.updated, run.state, agent.part_of)
        for (path, new), old, fresh in zip(
            jax.tree_util.tree_leaves_with_path(mixed),
            jax.tree.leaves(run.updated),
            jax.tree.leaves(run.state),
        ):
            expected = old if agent.part_of(jax.tree_util.keystr(path)) in carried else fresh
            assert np.array_equal(np.asarray(new), np.asarray(expected)), (rule, path)


@pytest.mark.slow  # A third compile of each model-based agent's update.
def test_adapt_trains_only_the_reward_head_of_the_world_model(run):
    # Every model-based agent (with this test's reward head) can adapt; the others cannot.
    assert (run.agent.adapt is not None) == bool(agents.model_based(run.name)), run.name
    if run.agent.adapt is None:
        return  # No world model, so no reward head to fit.
    adapted, _ = jax.jit(run.agent.adapt)(run.state, run.batch, jax.random.PRNGKey(2))
    changed = set()
    for (path, new), old in zip(
        jax.tree_util.tree_leaves_with_path(adapted), jax.tree.leaves(run.state)
    ):
        path = jax.tree_util.keystr(path)
        # Optimizer moments and the target network (an EMA of the parameters) follow along.
        derived = "opt" in path or path.startswith(".target_params")
        if run.agent.part_of(path) == "world_model" and not derived:
            if not np.array_equal(np.asarray(new), np.asarray(old)):
                changed.add(path)
    assert changed and all("reward_head" in p for p in changed), sorted(changed)
