"""The model-free counterparts: registry entries, shared parameters, no model in training,
replay returns, the loop and protocols, and (slow) learning on the toy grid."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs

from mbxfer import agents
from mbxfer.agents import dreamer, muzero, nomodel
from mbxfer.agents.replay import Replay
from mbxfer.benchmarks import config as config_lib
from mbxfer.benchmarks import loop, protocols, runner
from mbxfer.envs import base as env_base
from mbxfer.envs import registry, vector

TWIN = {"muzero_nomodel": "muzero", "dreamer_nomodel": "dreamer"}
REMOVED = {
    "muzero_nomodel": ("reward_head", "continuation_head"),
    "dreamer_nomodel": ("reward_head", "continuation_head", "decoder"),
}
# The twins' tiny settings; the counterparts have no unroll.
TINY = {
    name: [o for o in tiny_configs.AGENT[twin] if not o.startswith("agent.unroll_steps")]
    for name, twin in TWIN.items()
}
TINY.update(tiny_configs.AGENT)


def _agent_config(name, *overrides):
    items = [f"agent={name}", *TINY[name], *overrides]
    return config_lib.build(config_lib.parse_overrides(items)).agent_config


def _spec():
    env = registry.make("grid", size=5, observation="vector", task="reach_bottom_right")
    return env_base.environment_spec(env)


def _agent(name, *overrides):
    return agents.make(name, _spec(), _agent_config(name, *overrides))


@pytest.fixture(scope="module")
def batches():
    factory = registry.factory("grid", size=5, observation="vector", task="reach_bottom_right")
    envs = vector.make(factory, 2, mode="inline")
    replay = Replay(1000, 2, 8, envs.observation_spec(), envs.action_spec())
    rng = np.random.default_rng(0)
    timestep = envs.reset()
    for _ in range(40):
        action = rng.integers(5, size=2)
        replay.add(loop.replay_step(timestep, action))
        timestep = envs.step(action)
    return [replay.sample(4) for _ in range(2)]


def _paths(state):
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): np.shape(leaf) for path, leaf in leaves}


# ---------------------------------------------------------------------------------------
# Registry and configuration.


def test_registered_as_agents_with_their_own_config_defaults():
    assert {"muzero_nomodel", "dreamer_nomodel"} <= set(agents.names())
    mz = agents.config_class("muzero_nomodel")()
    assert isinstance(mz, muzero.MuZeroConfig) and not mz.planning and mz.unroll_steps == 0
    dr = agents.config_class("dreamer_nomodel")()
    assert isinstance(dr, dreamer.DreamerConfig) and dr.actor_critic.source == "replay"
    for config in (mz, dr):
        assert not config.model.decoder
        assert not any(config.model.losses.scales().values())
    # The twins keep their model-based defaults.
    assert muzero.MuZeroConfig().unroll_steps == 5
    assert dreamer.DreamerConfig().actor_critic.source == "imagination"


@pytest.mark.parametrize(
    "name,override,message",
    [
        ("muzero_nomodel", "agent.model.losses.kl_dynamics=0.5", "kl_dynamics=0"),
        ("muzero_nomodel", "agent.planning=true", "planning=false"),
        ("muzero_nomodel", "agent.model.losses.self_predictive=1.0", "self_predictive=0"),
        ("dreamer_nomodel", "agent.actor_critic.source=imagination", "source=replay"),
        ("dreamer_nomodel", "agent.model.losses.kl_representation=0.1", "kl_representation"),
        ("dreamer_nomodel", "agent.model.decoder=true", "decoder"),
    ],
)
def test_a_dynamics_loss_or_planning_is_refused_with_the_fix(name, override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        _agent_config(name, override)


def test_the_model_based_agents_refuse_what_needs_their_model():
    with pytest.raises(ValueError, match="unroll_steps >= 1"):
        muzero.MuZeroConfig(unroll_steps=0)
    with pytest.raises(ValueError, match="source='imagination'"):
        dreamer.ActorCriticConfig(source="replay", actor_gradient="dynamics")


# ---------------------------------------------------------------------------------------
# The same networks, minus the removed parts.


@pytest.mark.parametrize("name", sorted(TWIN))
def test_state_is_the_twins_without_the_removed_heads(name):
    twin = TWIN[name]
    counterpart, model_based = _agent(name), _agent(twin)
    mine = _paths(counterpart.init(jax.random.PRNGKey(0)))
    theirs = _paths(model_based.init(jax.random.PRNGKey(0)))

    def module(path):
        return next((head for head in REMOVED[name] if f"['{head}/" in path), None)

    removed = {path for path in theirs if module(path)}
    assert {module(path) for path in removed} == set(REMOVED[name])
    # Every leaf (parameters, optimizer moments, target network, counters) is the twin's,
    # with the same shape, except the removed heads'.
    assert mine == {path: shape for path, shape in theirs.items() if path not in removed}
    for path in mine:
        assert counterpart.part_of(path) == model_based.part_of(path), path
    assert counterpart.name == name and counterpart.adapt is None
    assert counterpart.open_loop is None and model_based.adapt is not None


@pytest.mark.parametrize("name", sorted(TWIN))
def test_an_auxiliary_head_loss_builds_the_heads_again(name):
    agent = _agent(name, "agent.model.losses.reward=1.0")
    paths = _paths(agent.init(jax.random.PRNGKey(0)))
    assert any("['reward_head/" in path for path in paths)
    assert agent.adapt is None  # Still no model to plan or imagine with.


# ---------------------------------------------------------------------------------------
# Training: no model losses, the representation learns from the value and policy losses.


@pytest.mark.parametrize("name", sorted(TWIN))
def test_update_trains_the_representation_without_model_losses(name, batches):
    agent = _agent(name)
    state = agent.init(jax.random.PRNGKey(0))
    update = jax.jit(agent.update)
    # Two updates: the zero-initialized output layers pass no gradient back on the first.
    new_state, _ = update(state, batches[0], jax.random.PRNGKey(1))
    new_state, metrics = update(new_state, batches[1], jax.random.PRNGKey(2))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    model_metrics = [k for k in metrics if k.startswith(("loss/kl", "loss/reward", "imagined/"))]
    assert not model_metrics and "loss/unroll_reward" not in metrics
    assert "loss/world_model" not in metrics

    def representation(state):
        model = state.model_params if name == "dreamer_nomodel" else state.params.model
        return {k: v for k, v in model.items() if k.startswith(("encoder/", "rssm/", "determ"))}

    before, after = representation(state), representation(new_state)
    assert before.keys() == after.keys() and before
    for key in before:  # The encoder and every module of the filter get a gradient.
        changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before[key], after[key])
        if "prior_head" in key:  # Runs in the filter step, but only the KL trained it.
            assert not any(jax.tree.leaves(changed)), key
        else:
            assert any(jax.tree.leaves(changed)), key


def test_dreamer_counterpart_does_not_imagine(batches):
    """The imagination horizon no longer matters: the update is the same for any horizon."""
    results = []
    for horizon in (2, 7):
        agent = _agent("dreamer_nomodel", f"agent.actor_critic.horizon={horizon}")
        state = agent.init(jax.random.PRNGKey(0))
        results.append(jax.jit(agent.update)(state, batches[0], jax.random.PRNGKey(1))[0])
    for a, b in zip(*map(jax.tree.leaves, results), strict=True):
        np.testing.assert_array_equal(a, b)


def test_replay_lambda_returns_stop_at_episode_boundaries():
    # Steps 0..6: an episode ends at step 2 (terminal), a new one starts at 3, the runner
    # reseeds at 5 (step 5 starts an episode without step 4 being last).
    reward = jnp.array([0.0, 1, 2, 0, 3, 0, 4])
    discount = 0.5 * jnp.array([1.0, 1, 0, 1, 1, 1, 1])
    is_first = jnp.array([True, False, False, True, False, True, False])
    is_last = jnp.array([False, False, True, False, False, False, False])
    value = jnp.array([10.0, 20, 30, 40, 50, 60, 70])
    returns, valid = nomodel.replay_lambda_returns(reward, discount, is_first, is_last, value, 0.5)
    np.testing.assert_array_equal(valid, [True, True, False, True, False, True])
    # G1 = r2 + 0 = 2; G0 = r1 + 0.5 (0.5 v1 + 0.5 G1) = 1 + 0.5 (10 + 1) = 6.5
    # G3 = r4 + 0.5 v4 (the transition from 4 is cut: bootstrap) = 3 + 25 = 28
    # G5 = r6 + 0.5 v6 (the window's end) = 4 + 35 = 39
    np.testing.assert_allclose(np.asarray(returns)[np.asarray(valid)], [6.5, 2.0, 28.0, 39.0])


# ---------------------------------------------------------------------------------------
# The one loop and the protocols.


def _trial_config(name, *extra):
    items = tiny_configs.overrides(name, *TINY[name], *extra)
    return config_lib.build(config_lib.parse_overrides(items))


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize(
    "name",
    [  # dreamer_nomodel's compile makes it ~45 s: slow; muzero_nomodel covers the path.
        pytest.param(n, marks=pytest.mark.slow) if n == "dreamer_nomodel" else n
        for n in sorted(TWIN)
    ],
)
def test_pretrain_finetune_with_rnd_through_the_runner(tmp_path, name):
    config = _trial_config(
        name,
        "protocol.name=pretrain_finetune",
        "protocol.intrinsic=rnd",
        "protocol.carry=world_model",
        "protocol.pretrain_steps=80",
        "train.steps=80",
    )
    summary = runner.run(config, tmp_path, progress=False)
    assert [p["name"] for p in summary["phases"]] == ["pretrain", "finetune"]
    assert all(p["updates"] > 0 for p in summary["phases"])
    metrics = [m for m in _lines(tmp_path / "metrics.jsonl") if "train/loss/total" in m or
               "train/critic/loss" in m]  # fmt: skip
    pretrain = [m for m in metrics if m["phase"] == "pretrain"]
    assert pretrain and any(m["train/intrinsic/rnd_mean"] > 0 for m in pretrain)
    assert any(m["phase"] == "finetune" for m in metrics)
    assert np.isfinite(summary["final_eval"]["return_mean"])


def test_disagreement_applies_over_the_filter_features(batches):
    config = _trial_config("muzero_nomodel", "protocol.name=pretrain_finetune")
    module = protocols.with_module(config.agent_config, protocols.phases(config), config.protocol)
    assert module.exploration.module == "disagreement"  # auto: as for the model-based twin
    agent = _agent(
        "dreamer_nomodel",
        "agent.exploration.module=disagreement",
        "agent.exploration.intrinsic_scale=1.0",
    )
    _, metrics = jax.jit(agent.update)(
        agent.init(jax.random.PRNGKey(0)), batches[0], jax.random.PRNGKey(1)
    )
    assert np.isfinite(float(metrics["intrinsic/disagreement_mean"]))


def test_zero_shot_is_refused_for_agents_without_a_world_model(tmp_path):
    config = _trial_config(
        "muzero_nomodel",
        "protocol.name=zero_shot",
        "protocol.intrinsic=rnd",
        "protocol.zero_shot_updates=2",
        "protocol.pretrain_steps=40",
    )
    with pytest.raises(protocols.ProtocolError, match="'muzero_nomodel' has no world model"):
        runner.run(config, tmp_path, progress=False)


# ---------------------------------------------------------------------------------------
# Learning (slow): returns against a uniform random policy (2.1 on this task, about 45 optimal).

LEARN = [
    "env.name=grid",
    "env.task=reach_bottom_right",
    "env.kwargs={observation: vector, size: 5}",
    "env.num_envs=4",
    "agent.model.deter=64",
    "agent.model.hidden=64",
    "train.batch_size=16",
    "train.sequence_length=16",
    "train.train_ratio=64",
    "train.learning_starts=500",
    "train.eval_episodes=8",
    "train.checkpoint_every=100000",
]


def _learn(folder, *overrides):
    config = config_lib.build(config_lib.parse_overrides([*LEARN, *overrides]))
    return runner.run(config, folder, progress=False)["final_eval"]["return_mean"]


@pytest.mark.slow
def test_muzero_counterpart_learns_the_grid_corner_task(tmp_path):
    """The MuZero learning test's settings and budget, without the model and the search."""
    final = _learn(
        tmp_path,
        "agent=muzero_nomodel",
        "agent.value_bins=31",
        "agent.hidden=64",
        "agent.learning_rate=1e-3",
        "train.steps=4000",
        "train.eval_every=4000",
    )
    print(f"muzero_nomodel on grid: {final:.2f} (random 2.1)")
    assert final >= 8.0


@pytest.mark.slow
def test_dreamer_counterpart_learns_the_grid_corner_task(tmp_path):
    """The Dreamer learning test's settings and budget, learning on replay, not imagination."""
    final = _learn(
        tmp_path,
        "agent=dreamer_nomodel",
        "agent.actor_critic.hidden=64",
        "agent.model_lr=1e-3",
        "agent.actor_lr=3e-4",
        "agent.critic_lr=3e-4",
        "train.steps=5000",
        "train.eval_every=5000",
    )
    print(f"dreamer_nomodel on grid: {final:.2f} (random 2.1)")
    assert final >= 15.0
