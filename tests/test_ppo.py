"""PPO: GAE at episode boundaries, the clipped Gaussian, acting, the one loop, learning."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from mbxfer import agents
from mbxfer.agents import base, ppo
from mbxfer.agents.replay import Replay
from mbxfer.benchmarks import config as config_lib
from mbxfer.benchmarks import loop, protocols, runner
from mbxfer.envs import base as env_base
from mbxfer.envs import registry, vector

GAMMA, LAMBDA = 0.9, 0.8


def _episode_rows():
    """Ten replay rows: a truncated episode, a terminated one, and one cut by a reseed.

    rows 0-3: episode A, row 3 is LAST with discount 1 (truncation);
    rows 4-6: episode B, row 6 is LAST with discount 0 (termination);
    rows 7-8: episode C, cut after row 8 (row 9 is FIRST although row 8 is not LAST).
    """
    is_first = np.zeros(10, bool)
    is_first[[0, 4, 7, 9]] = True
    is_last = np.zeros(10, bool)
    is_last[[3, 6]] = True
    discount = np.ones(10, np.float32)
    discount[6] = 0.0
    reward = np.arange(10, dtype=np.float32) * 0.5 + 1.0
    reward[is_first] = 0.0  # what the runner stores on FIRST rows
    value = np.linspace(-1.0, 2.0, 10).astype(np.float32) ** 2
    return value, reward, discount, is_first, is_last


def test_gae_matches_rlax_within_each_episode():
    value, reward, discount, is_first, is_last = _episode_rows()
    advantage, valid = ppo.rollout_advantages(
        *map(jnp.asarray, (value, reward, discount, is_first, is_last)), GAMMA, LAMBDA
    )
    # A row is a transition unless the next row starts an episode.
    expected_valid = np.ones(9, bool)
    expected_valid[[3, 6, 8]] = False
    np.testing.assert_array_equal(valid, expected_valid)

    def rlax_gae(first, last):  # rows first..last of one episode; `last` only bootstraps
        return rlax.truncated_generalized_advantage_estimation(
            jnp.asarray(reward[first + 1 : last + 1]),
            jnp.asarray(GAMMA * discount[first + 1 : last + 1]),
            LAMBDA,
            jnp.asarray(value[first : last + 1]),
        )

    expected = np.zeros(9, np.float32)
    expected[0:3] = rlax_gae(0, 3)  # truncation: bootstraps from the value of row 3
    expected[4:6] = rlax_gae(4, 6)  # termination: discount 0 at row 6
    expected[7:8] = rlax_gae(7, 8)  # cut: row 8's outcome is unknown, it only bootstraps
    np.testing.assert_allclose(np.asarray(advantage)[valid], expected[valid], rtol=1e-6)
    # Hand-checked values: the last step of each episode is a one-step TD error.
    np.testing.assert_allclose(advantage[2], reward[3] + GAMMA * value[3] - value[2], rtol=1e-6)
    np.testing.assert_allclose(advantage[5], reward[6] - value[5], rtol=1e-6)


def test_gae_without_boundaries_is_rlax():
    rng = np.random.default_rng(0)
    value, reward = rng.normal(size=(2, 7)).astype(np.float32)
    discount = np.ones(7, np.float32)
    no = np.zeros(7, bool)
    advantage, valid = ppo.rollout_advantages(
        jnp.asarray(value), jnp.asarray(reward), jnp.asarray(discount), no, no, GAMMA, LAMBDA
    )
    expected = rlax.truncated_generalized_advantage_estimation(
        reward[1:], GAMMA * discount[1:], LAMBDA, value
    )
    assert valid.all()
    np.testing.assert_allclose(advantage, expected, rtol=1e-6)


def test_clipped_gaussian_is_a_distribution_over_executed_actions():
    mean, std = jnp.array([0.7]), jnp.array([0.6])
    inside = jnp.linspace(-1.0, 1.0, 20001)[1:-1, None]
    density = jnp.exp(jax.vmap(lambda a: ppo.clipped_gaussian_log_prob(mean, std, a))(inside))
    mass_inside = float(jnp.sum(density) * (inside[1, 0] - inside[0, 0]))
    at_edges = [
        float(jnp.exp(ppo.clipped_gaussian_log_prob(mean, std, jnp.array([a]))))
        for a in (-1.0, 1.0)
    ]
    np.testing.assert_allclose(mass_inside + sum(at_edges), 1.0, atol=1e-3)
    # The tail mass is what clipping samples puts on each bound.
    samples = np.clip(np.random.default_rng(0).normal(0.7, 0.6, 200_000), -1.0, 1.0)
    np.testing.assert_allclose(np.mean(samples == 1.0), at_edges[1], atol=5e-3)
    np.testing.assert_allclose(np.mean(samples == -1.0), at_edges[0], atol=5e-3)


def _tiny(*overrides):
    return config_lib.build(
        config_lib.parse_overrides(
            ["agent=ppo", "agent.hidden=16", "agent.encoder_depth=4", *overrides]
        )
    ).agent_config


@pytest.mark.parametrize("name", ["grid", "point_mass"])
def test_explore_samples_and_eval_is_greedy(name):
    env = registry.make(name, observation="both")
    agent = agents.make("ppo", env_base.environment_spec(env), _tiny("agent.init_log_std=0.5"))
    state = agent.init(jax.random.PRNGKey(0))
    # Perturb the zero-initialised policy head, so that the greedy action is not a tie.
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    noise = [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    state = state._replace(params=jax.tree.unflatten(tree, [x + n for x, n in zip(leaves, noise)]))
    act = jax.jit(agent.act, static_argnums=4)
    observation = env_base.agent_observation(env.reset().observation)
    batch = {k: np.repeat(v[None], 64, 0) for k, v in observation.items()}
    step = base.ActInput(batch, np.ones(64, bool))
    carry = agent.initial_carry(64)
    explored, _ = act(state, carry, step, jax.random.PRNGKey(1), "explore")
    greedy_a, _ = act(state, carry, step, jax.random.PRNGKey(1), "eval")
    greedy_b, _ = act(state, carry, step, jax.random.PRNGKey(2), "eval")
    explored = np.asarray(explored)
    assert len(np.unique(explored, axis=0)) > 1
    np.testing.assert_array_equal(greedy_a, greedy_b)
    assert len(np.unique(np.asarray(greedy_a), axis=0)) == 1
    if name == "point_mass":
        assert explored.min() >= -1.0 and explored.max() <= 1.0
        assert np.any(np.abs(explored) == 1.0)  # clipped, as the replay stores them
    with pytest.raises(ValueError, match="mode="):
        agent.act(state, carry, step, jax.random.PRNGKey(1), "greedy")


def _rollout_batch(env, length, seed):
    """`replay.latest(length + 1)` after random play, one environment, as the runner stores it."""
    rng = np.random.default_rng(seed)
    replay = Replay(1000, 1, 1, env.observation_spec(), env.action_spec())
    timestep = vector.stack([env.reset()])
    for _ in range(length + 1):
        action = rng.integers(5, size=1).astype(np.int32)
        replay.add(loop.replay_step(timestep, action))
        timestep = vector.stack([env.step(action[0])])
    return replay.latest(length + 1)


def test_update_ignores_rows_that_are_not_transitions():
    """The action on a LAST row is never executed (auto-reset): it must not change the update."""
    env = registry.make("grid", task="reach_top_left", observation="vector", size=5, length=6)
    agent = agents.make("ppo", env_base.environment_spec(env), _tiny("agent.minibatches=2"))
    state = agent.init(jax.random.PRNGKey(0))
    batch = _rollout_batch(env, 16, seed=0)
    last_rows = np.flatnonzero(batch["is_last"][0])
    assert len(last_rows) >= 2
    other = {**batch, "action": batch["action"].copy()}
    other["action"][0, last_rows] = (other["action"][0, last_rows] + 1) % 5
    update = jax.jit(agent.update)
    new_a, metrics = update(state, batch, jax.random.PRNGKey(3))
    new_b, _ = update(state, other, jax.random.PRNGKey(3))
    jax.tree.map(np.testing.assert_allclose, new_a.params, new_b.params)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    changed = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_a.params, state.params)
    assert max(jax.tree.leaves(changed)) > 0


def test_disagreement_is_refused_with_the_alternative():
    with pytest.raises(config_lib.ConfigError, match="module='rnd'"):
        config_lib.build(
            config_lib.parse_overrides(["agent=ppo", "agent.exploration.module=disagreement"])
        )


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rnd_reward_is_mixed_into_the_returns():
    """Reward-free (extrinsic 0): the rewards PPO learns from are the RND novelty alone."""
    env = registry.make("grid", task="reach_top_left", observation="vector", size=5)
    batch = _rollout_batch(env, 16, seed=1)  # no episode boundary in 17 rows of 50-step episodes
    assert not batch["is_first"][:, 1:].any()
    for extrinsic, intrinsic in [(0.0, 1.0), (1.0, 0.0)]:
        config = _tiny(
            "agent.exploration.module=rnd",
            f"agent.exploration.extrinsic_scale={extrinsic}",
            f"agent.exploration.intrinsic_scale={intrinsic}",
        )
        agent = agents.make("ppo", env_base.environment_spec(env), config)
        _, metrics = jax.jit(agent.update)(
            agent.init(jax.random.PRNGKey(0)), batch, jax.random.PRNGKey(1)
        )
        expected = metrics["intrinsic/rnd_mean"] if intrinsic else batch["reward"][:, 1:].mean()
        assert metrics["intrinsic/rnd_mean"] > 0
        np.testing.assert_allclose(metrics["reward/mean"], expected, rtol=1e-5)


def test_runs_through_the_loop_with_rnd_on_images_and_vectors(tmp_path):
    overrides = [
        "agent=ppo",
        "agent.hidden=16",
        "agent.encoder_depth=4",
        "agent.rollout_length=16",
        "agent.exploration.module=rnd",
        "agent.exploration.hidden=16",
        "env.name=grid",
        "env.task=collect_items",
        "env.num_envs=2",
        "env.kwargs={observation: both, size: 5}",
        "train.steps=160",
        "train.log_every=64",
        "train.eval_every=160",
        "train.eval_episodes=2",
        "train.checkpoint_every=1000",
    ]
    summary = runner.run(
        config_lib.build(config_lib.parse_overrides(overrides)), tmp_path, progress=False
    )
    # One update per 16 steps of each env, from the second rollout on (needs T + 1 rows).
    assert summary["env_steps"] == 160 and summary["updates"] == 160 // 32 - 1
    metrics = [m for m in _lines(tmp_path / "metrics.jsonl") if "train/loss/policy" in m]
    assert metrics
    for record in metrics:
        train = {k: v for k, v in record.items() if k.startswith("train/")}
        assert all(np.isfinite(v) for v in train.values()), train
        assert record["train/intrinsic/rnd_loss"] > 0


def test_resumed_trial_equals_uninterrupted(tmp_path):
    """Checkpoints every 32 steps also cut episodes (reseeding): resume must replay exactly."""
    overrides = [
        "agent=ppo",
        "agent.hidden=16",
        "agent.rollout_length=8",
        "agent.minibatches=2",
        "env.name=grid",
        "env.task=reach_top_left",
        "env.num_envs=2",
        "env.kwargs={observation: vector, size: 5}",
        "train.steps=96",
        "train.log_every=16",
        "train.eval_every=96",
        "train.eval_episodes=2",
        "train.checkpoint_every=32",
    ]
    config = config_lib.build(config_lib.parse_overrides(overrides))
    runner.run(config, tmp_path / "whole", progress=False)
    runner.run(config, tmp_path / "resumed", progress=False, stop_after=48)
    runner.run(config, tmp_path / "resumed", progress=False)

    def lines(folder):
        drop = "env_steps_per_second"
        return [{k: v for k, v in r.items() if k != drop} for r in _lines(folder / "metrics.jsonl")]

    whole = lines(tmp_path / "whole")
    assert any("train/loss/policy" in r for r in whole)
    assert lines(tmp_path / "resumed") == whole


def test_parts_name_every_leaf():
    env = registry.make("point_mass")
    config = _tiny("agent.exploration.module=rnd")
    agent = agents.make("ppo", env_base.environment_spec(env), config)
    leaves = jax.tree_util.tree_flatten_with_path(agent.init(jax.random.PRNGKey(0)))[0]
    parts = {
        jax.tree_util.keystr(path): agent.part_of(jax.tree_util.keystr(path)) for path, _ in leaves
    }
    expected = {
        "policy_head": "policy", "policy_encoder": "policy", "log_std": "policy",
        "value_head": "value", "value_encoder": "value", "value_stats": "value",
        "feature_encoder": "exploration", "exploration": "exploration",
        "opt_state[1].count": "policy", ".updates": "counter",
    }  # fmt: skip
    for path, part in parts.items():
        matches = [p for name, p in expected.items() if name in path]
        assert matches and matches[0] == part, (path, part)


def test_pretrains_reward_free_with_rnd_then_finetunes(tmp_path):
    overrides = [
        "agent=ppo",
        "agent.hidden=16",
        "agent.rollout_length=8",
        "agent.exploration.hidden=16",
        "protocol.name=pretrain_finetune",
        "protocol.intrinsic=rnd",
        "protocol.carry=world_model+policy",
        "protocol.pretrain_steps=64",
        "env.name=grid",
        "env.task=collect_items",
        "env.num_envs=2",
        "env.kwargs={observation: vector, size: 5}",
        "train.steps=64",
        "train.log_every=32",
        "train.eval_every=64",
        "train.eval_episodes=2",
        "train.checkpoint_every=64",
    ]
    runner.run(config_lib.build(config_lib.parse_overrides(overrides)), tmp_path, progress=False)
    metrics = [m for m in _lines(tmp_path / "metrics.jsonl") if "train/loss/policy" in m]
    pretrain = [m for m in metrics if m["phase"] == "pretrain"]
    finetune = [m for m in metrics if m["phase"] == "finetune"]
    assert pretrain and finetune
    # Reward-free: the rewards learned from are the intrinsic ones.
    for m in pretrain:
        assert m["train/reward/mean"] == pytest.approx(m["train/intrinsic/rnd_mean"], rel=1e-4)
    # protocol.intrinsic=auto picks RND for PPO; asking for disagreement fails before running.
    auto = [o for o in overrides if not o.startswith("protocol.intrinsic")]
    config = config_lib.build(config_lib.parse_overrides(auto))
    assert (
        protocols.with_module(
            config.agent_config, protocols.phases(config), config.protocol
        ).exploration.module
        == "rnd"
    )
    with pytest.raises(ValueError, match="module='rnd'"):
        bad = [*auto, "protocol.intrinsic=disagreement"]
        runner.run(
            config_lib.build(config_lib.parse_overrides(bad)), tmp_path / "bad", progress=False
        )
    assert not (tmp_path / "bad").exists()  # Refused before anything was written.


def _learn(overrides, folder):
    config = config_lib.build(config_lib.parse_overrides(overrides))
    summary = runner.run(config, folder, progress=False)
    return summary["final_eval"]["return_mean"]


LEARN = [
    "agent=ppo",
    "train.eval_episodes=8",
    "train.checkpoint_every=1000000",
    "train.log_every=4000",
]


@pytest.mark.slow
def test_learns_discrete_grid_corner_task(tmp_path):
    """Uniform random policy: 2.1 mean return on this task (optimal is about 45)."""
    overrides = [
        *LEARN,
        "env.name=grid",
        "env.task=reach_bottom_right",
        "env.kwargs={observation: vector, size: 5}",
        "env.num_envs=8",
        "agent.rollout_length=32",
        "train.steps=12000",
        "train.eval_every=12000",
    ]
    assert _learn(overrides, tmp_path) >= 20.0


@pytest.mark.slow
def test_learns_continuous_point_mass_task(tmp_path):
    """Uniform random policy: 18.8 mean return on this task (optimal is about 85)."""
    overrides = [
        *LEARN,
        "env.name=point_mass",
        "env.task=reach_top_left",
        "env.num_envs=8",
        "agent.rollout_length=64",
        "train.steps=12000",
        "train.eval_every=12000",
    ]
    assert _learn(overrides, tmp_path) >= 50.0


@pytest.mark.slow
def test_learns_cartpole(tmp_path):
    """Uniform random policy: about 22 mean return; the maximum is 500."""
    pytest.importorskip("gymnasium")
    overrides = [
        *LEARN,
        "env.name=cartpole",
        "env.task=reward",
        "env.num_envs=4",
        "agent.anneal_steps=40000",
        "train.steps=40000",
        "train.eval_every=40000",
    ]
    assert _learn(overrides, tmp_path) >= 400.0
