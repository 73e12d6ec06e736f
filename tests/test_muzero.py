"""The MuZero agent: targets, the search over the world model, the loop, resume, learning."""

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs

from mbxfer import agents
from mbxfer.agents import base, muzero, muzero_search, sequences
from mbxfer.agents import muzero_targets as targets
from mbxfer.benchmarks import checkpoint, phase, runner
from mbxfer.benchmarks import config as config_lib
from mbxfer.envs import base as env_base
from mbxfer.envs import registry, vector

ROOT = Path(__file__).resolve().parent.parent
# The shared tiny MuZero (tests/tiny_configs.py) without the exploration module's width.
SMALL_AGENT = [o for o in tiny_configs.AGENT["muzero"] if not o.startswith("agent.exploration")]
TINY = tiny_configs.overrides(
    "muzero",
    "train.steps=240",
    "train.eval_every=120",
    "train.checkpoint_every=80",
    "agent.search.policy=muzero",
    "agent.reanalyse_fraction=0.5",
)


def _config(*overrides):
    return config_lib.build(config_lib.parse_overrides([*TINY, *overrides]))


def _agent_config(*overrides) -> muzero.MuZeroConfig:
    return config_lib.build(
        config_lib.parse_overrides(["agent=muzero", *SMALL_AGENT, *overrides])
    ).agent_config


def _lines(path, drop=("env_steps_per_second",)):
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def _final_leaves(folder):
    found = checkpoint.latest(Path(folder) / "checkpoints")
    with np.load(found / "state.npz") as archive:
        return [archive[f"arr_{i}"] for i in range(len(archive.files))]


# ---------------------------------------------------------------------------------------
# Targets.


def test_n_step_returns_stop_at_terminal_and_bootstrap_at_truncation():
    rewards = jnp.array([[0.0, 1, 2, 3, 4, 5]] * 2)
    values = jnp.array([[10.0, 20, 30, 40, 50, 60]] * 2)
    is_last = jnp.array([[False, False, False, True, False, False]] * 2)
    # Row 0: observation 3 is terminal (discount 0); row 1: it is truncated (discount 1).
    discounts = jnp.array([[1.0, 1, 1, 0, 1, 1], [1.0, 1, 1, 1, 1, 1]])
    returns, valid = targets.value_targets(rewards, discounts, is_last, values, n=2, discount=0.5)
    np.testing.assert_array_equal(valid, [[True, True, True, False, True, False]] * 2)
    # G0 = r1 + g r2 + g^2 v2; G1 = r2 + g r3 (+ g^2 v3 if truncated); G4 bootstraps past the end.
    np.testing.assert_allclose(returns[0, [0, 1, 2, 4]], [9.5, 3.5, 3.0, 35.0])
    np.testing.assert_allclose(returns[1, [0, 1, 2, 4]], [9.5, 13.5, 23.0, 35.0])


def test_a_cut_episode_ends_its_returns_like_a_truncation():
    # The runner reseeded the environments after step 2: step 3 starts an episode without
    # step 2 being last. Its returns bootstrap from step 2 and nothing leaks across.
    is_first = jnp.array([[True, False, False, True, False, False]])
    is_last = jnp.zeros((1, 6), bool)
    ends = sequences.episode_ends(is_first, is_last)
    np.testing.assert_array_equal(ends, [[False, False, True, False, False, False]])
    rewards = jnp.array([[0.0, 1, 2, 100, 4, 5]])
    values = jnp.array([[10.0, 20, 30, 40, 50, 60]])
    returns, valid = targets.value_targets(rewards, jnp.ones((1, 6)), ends, values, 2, 0.5)
    np.testing.assert_array_equal(valid, [[True, True, False, True, True, False]])
    np.testing.assert_allclose(returns[0, :2], [1 + 0.5 * 2 + 0.25 * 30, 2 + 0.5 * 30])


def test_unroll_masks_and_actions_follow_the_replay_alignment():
    is_first = np.zeros((1, 6), bool)
    is_first[0, 4] = True
    valid = np.asarray(targets.unroll_valid(is_first, unroll_steps=2))
    assert valid[0, 1].tolist() == [True, True, True]
    assert valid[0, 2].tolist() == [True, True, False]  # Step 4 starts another episode.
    assert valid[0, 3].tolist() == [True, False, False]
    assert valid[0, 4].tolist() == [True, True, False]  # Past the window's end.
    actions = jnp.arange(12).reshape(2, 6)
    unrolled = np.asarray(targets.unroll_actions(actions, 2))  # [K, B*T]
    assert unrolled.shape == (2, 12)
    assert unrolled[:, 1].tolist() == [1, 2] and unrolled[:, 6 + 5].tolist() == [11, 11]
    # Gradients are scaled, values are not.
    value, grad = jax.value_and_grad(lambda x: targets.scale_gradient(x, 0.5) * 3.0)(2.0)
    assert (value, grad) == (6.0, 1.5)


# ---------------------------------------------------------------------------------------
# The search over the world model.


def _search_setup(env_name, policy="muzero"):
    env = registry.make(env_name, task="reach_top_left", observation="vector")
    spec = env_base.environment_spec(env)
    agent = agents.make("muzero", spec, _agent_config(f"agent.search.policy={policy}"))
    state = agent.init(jax.random.PRNGKey(0))
    config = dataclasses.replace(
        agent.config,
        discount=0.9,
        exploration=dataclasses.replace(agent.config.exploration, extrinsic_scale=2.0),
    )
    nets = muzero.make_networks(spec, config)
    model, prediction, search = nets.model, nets.prediction, nets.search
    observation = env_base.agent_observation(env.reset().observation)
    embed = model.encode(
        state.params.model, {k: v[None].repeat(3, 0) for k, v in observation.items()}
    )
    latent, _ = model.observe(
        state.params.model, model.initial_state(3), jnp.zeros((3, model.action_size)), embed,
        jnp.ones(3, bool), jax.random.PRNGKey(0),
    )  # fmt: skip
    # Perturb the parameters so that rewards, continuations and values are not all zero.
    params = jax.tree.map(
        lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), state.params
    )
    return model, prediction, search, params, latent


def test_recurrent_fn_is_the_world_model_and_prediction_heads():
    model, prediction, search, params, latent = _search_setup("grid")
    root = search.root(params, latent, jax.random.PRNGKey(1))
    action = jnp.array([0, 3, 4])
    output, embedding = search.recurrent_fn(params, jax.random.PRNGKey(2), action, root.embedding)
    expected = model.imagine(params.model, latent, action, jax.random.PRNGKey(0))
    features = model.features(expected)
    np.testing.assert_allclose(embedding.latent.deter, expected.deter, rtol=1e-5)
    np.testing.assert_allclose(output.reward, 2.0 * model.reward(params.model, features), rtol=1e-5)
    np.testing.assert_allclose(
        output.discount, 0.9 * model.continuation(params.model, features), rtol=1e-5
    )
    predicted = prediction.apply(params.prediction, features)
    np.testing.assert_allclose(output.prior_logits, predicted.policy, rtol=1e-5)
    assert search.num_branches == 5 and embedding.candidates.shape == (3, 0)
    assert bool(jnp.any(output.reward != 0)) and bool(jnp.any(output.value != 0))


@pytest.mark.parametrize("policy", ["muzero", "gumbel"])
def test_sampled_search_acts_with_the_real_continuous_actions(policy):
    model, prediction, search, params, latent = _search_setup("point_mass", policy)
    K = search.num_branches
    root = search.root(params, latent, jax.random.PRNGKey(1))
    # The Sampled MuZero prior correction with beta = pi: uniform over the K samples.
    np.testing.assert_array_equal(root.prior_logits, np.zeros((3, K)))
    candidates = np.asarray(root.embedding.candidates)
    assert candidates.shape == (3, K, 2) and np.all(np.abs(candidates) <= 1.0)
    index = jnp.array([0, K - 1, 1])
    _, embedding = search.recurrent_fn(params, jax.random.PRNGKey(2), index, root.embedding)
    chosen = candidates[np.arange(3), np.asarray(index)]
    expected = model.imagine(params.model, latent, chosen, jax.random.PRNGKey(0))
    np.testing.assert_allclose(embedding.latent.deter, expected.deter, rtol=1e-5)
    assert embedding.candidates.shape == (3, K, 2)  # Fresh samples at the child.

    run = jax.jit(search.run, static_argnums=3)
    output = run(params, latent, jax.random.PRNGKey(3), "explore")
    np.testing.assert_allclose(output.weights.sum(-1), 1.0, rtol=1e-5)
    branches = np.asarray(output.branches)
    action = np.asarray(output.action)[:, None]
    assert np.all(np.any(np.all(np.abs(branches - action) < 1e-6, axis=-1), axis=-1))
    # Evaluation puts the policy mean among the candidates and takes a candidate.
    greedy = search.root(params, latent, jax.random.PRNGKey(1), greedy=True)
    policy = prediction.apply(params.prediction, model.features(latent)).policy
    mean = muzero_search.policy_distribution(policy, discrete=False).mode()
    np.testing.assert_allclose(greedy.embedding.candidates[:, 0], mean, rtol=1e-5)


def test_model_free_control_acts_from_the_policy_head_and_trains_without_search():
    env = registry.make("grid", task="collect_items", observation="vector", size=5)
    spec = env_base.environment_spec(env)
    agent = agents.make("muzero", spec, _agent_config("agent.planning=false"))
    state = agent.init(jax.random.PRNGKey(0))
    observation = env_base.agent_observation(env.reset().observation)
    step = base.ActInput(
        {k: v[None].repeat(4, 0) for k, v in observation.items()}, np.ones(4, bool)
    )
    act = jax.jit(agent.act, static_argnums=4)
    greedy, _ = act(state, agent.initial_carry(4), step, jax.random.PRNGKey(1), "eval")
    # The untrained head is uniform: its mode is the first action, whatever the key.
    np.testing.assert_array_equal(greedy, np.zeros(4))
    batch = {
        "observation": {k: np.repeat(v[:, None], 6, 1) for k, v in step.observation.items()},
        "action": np.tile(np.arange(6) % 5, (4, 1)),
        "reward": np.tile(np.array([0.0, 1, 0, 0, 1, 0], np.float32), (4, 1)),
        "discount": np.ones((4, 6), np.float32),
        "is_first": np.zeros((4, 6), bool),
        "is_last": np.zeros((4, 6), bool),
        "is_terminal": np.zeros((4, 6), bool),
    }
    new_state, metrics = jax.jit(agent.update)(state, batch, jax.random.PRNGKey(2))
    assert np.isfinite(metrics["loss/policy"]) and np.isfinite(metrics["loss/total"])
    assert not any(key.startswith("muzero/search") for key in metrics)
    assert int(new_state.step) == 1


# ---------------------------------------------------------------------------------------
# Configuration.


def test_config_is_documented_and_validated():
    for cls in (muzero.MuZeroConfig, muzero_search.SearchConfig):
        docs = config_lib.field_docs(cls)
        assert set(docs) == {f.name for f in dataclasses.fields(cls)}, cls
    default = muzero.MuZeroConfig()
    assert default.model.latent == "deterministic" and not default.model.decoder
    assert default.model.losses.reconstruction == 0.0
    assert agents.config_class("muzero") is muzero.MuZeroConfig
    with pytest.raises(ValueError, match="reanalyse_fraction > 0"):
        muzero.MuZeroConfig(reanalyse_fraction=0.0)
    muzero.MuZeroConfig(reanalyse_fraction=0.0, planning=False)
    with pytest.raises(config_lib.ConfigError, match="must be one of"):
        _config("agent.search.policy=alphazero")


# ---------------------------------------------------------------------------------------
# The one loop: metrics, checkpoints, exact resume with reanalyse.


@pytest.fixture(scope="module")
def finished_trial(tmp_path_factory):
    folder = tmp_path_factory.mktemp("muzero")
    return folder, runner.run(_config(), folder, progress=False)


def test_trial_with_reanalyse_writes_metrics_and_checkpoints(finished_trial):
    folder, summary = finished_trial
    assert summary["env_steps"] == 240 and summary["updates"] > 0
    metrics = _lines(folder / "metrics.jsonl")
    last = metrics[-1]
    for key in ("loss/total", "loss/value", "loss/policy", "loss/unroll_reward",
                "loss/world_model", "muzero/search_value", "muzero/search_policy_entropy"):  # fmt: skip
        assert np.isfinite(last[f"train/{key}"]), key
    evals = _lines(folder / "eval.jsonl")
    assert [e["env_steps"] for e in evals if e["mode"] == "sampled"] == [0, 120, 240]
    assert checkpoint.latest(folder / "checkpoints").name == "step-000000000240-phase0"


def test_killed_trial_with_reanalyse_resumes_to_the_same_result(tmp_path, finished_trial):
    """Kill a real `mbxfer run --agent muzero` after a checkpoint, resume, compare."""
    killed = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "mbxfer.benchmarks.cli",
        "run",
        "--out",
        str(killed),
        "--no-progress",
    ]
    command += [a for item in TINY for a in ("--set", item)]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    pointer = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if pointer.exists() and pointer.read_text().strip() >= "step-000000000080":
            break
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before it was killed: {process.stderr.read()}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.latest(killed / "checkpoints").name < "step-000000000240"

    runner.run(_config(), killed, progress=False)
    uninterrupted = finished_trial[0]
    for a, b in zip(_final_leaves(uninterrupted), _final_leaves(killed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _lines(killed / "metrics.jsonl") == _lines(uninterrupted / "metrics.jsonl")
    assert _lines(killed / "eval.jsonl") == _lines(uninterrupted / "eval.jsonl")


@pytest.mark.slow  # ~40 s; tests/test_runner.py's Crafter smoke run covers the image path by default.
def test_crafter_smoke_run_writes_metrics_and_a_checkpoint(tmp_path):
    config = config_lib.build(
        config_lib.parse_overrides(
            [
                "agent=muzero",
                "env.name=crafter",
                "env.task=reward",
                "env.num_envs=2",
                "train.steps=300",
                "train.batch_size=2",
                "train.sequence_length=8",
                "train.train_ratio=2",
                "train.learning_starts=100",
                "train.log_every=100",
                "train.eval_every=0",
                "train.checkpoint_every=300",
                "agent.model.encoder_depth=4",
                *SMALL_AGENT,
            ]
        )
    )
    summary = runner.run(config, tmp_path, progress=False)
    assert summary["updates"] > 0
    assert checkpoint.latest(tmp_path / "checkpoints").name == "step-000000000300-phase0"
    last = _lines(tmp_path / "metrics.jsonl")[-1]
    assert np.isfinite(last["train/loss/total"]) and np.isfinite(last["train/loss/policy"])


# ---------------------------------------------------------------------------------------
# Learning (slow): returns against a uniform random policy measured with the same evaluation.

LEARN = [
    "agent=muzero",
    "agent.model.deter=64",
    "agent.model.hidden=64",
    "agent.model.reward_bins=31",
    "agent.value_bins=31",
    "agent.hidden=64",
    "agent.search.policy=gumbel",
    "agent.search.num_simulations=8",
    "train.batch_size=16",
    "train.sequence_length=16",
    "train.learning_starts=500",
    "train.eval_episodes=8",
    "train.checkpoint_every=100000",
    "env.num_envs=4",
]
GRID5 = [
    "env.name=grid",
    "env.task=reach_bottom_right",
    "env.kwargs={observation: vector, size: 5}",
]


def _learn(folder, *overrides):
    """Train; return the final state, the config and the final greedy evaluation's return."""
    config = config_lib.build(config_lib.parse_overrides([*LEARN, *overrides]))
    summary = runner.run(config, folder, progress=False)
    spec = vector.environment_spec(phase.make_envs(config, 1, 0))
    agent = agents.make("muzero", spec, config.agent_config)
    state, _ = checkpoint.load(
        checkpoint.latest(folder / "checkpoints"), agent.init(jax.random.PRNGKey(0))
    )
    return jax.tree.map(jnp.asarray, state), config, spec, summary["final_eval"]["return_mean"]


def _evaluate(config, spec, state, planning: bool, episodes: int = 16) -> float:
    """Greedy return of the search (planning) or of the policy head alone, same parameters."""
    agent = agents.make("muzero", spec, dataclasses.replace(config.agent_config, planning=planning))
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, eval_episodes=episodes)
    )
    act = jax.jit(agent.act, static_argnums=4)
    return phase.evaluate(agent, act, state, config, 99, mode="greedy")["return_mean"]


@pytest.mark.slow
def test_learns_discrete_grid_corner_task(tmp_path):
    """Uniform random policy: 2.06 mean return (200 episodes); optimal is about 45."""
    steps = ["train.steps=4000", "train.eval_every=4000", "train.train_ratio=64"]
    state, config, spec, final = _learn(tmp_path, *GRID5, *steps, "agent.learning_rate=1e-3")
    head = _evaluate(config, spec, state, planning=False)
    print(f"grid: search {final:.2f}, policy head {head:.2f}, random 2.06")
    assert final >= 15.0


@pytest.mark.slow
def test_learns_continuous_point_mass_task_with_sampled_search(tmp_path):
    """Uniform random policy: 18.4 mean return (200 episodes); optimal is about 85."""
    overrides = ["env.name=point_mass", "env.task=reach_top_left", "train.steps=6000"]
    overrides += ["train.eval_every=6000", "train.train_ratio=16", "agent.search.sampled_actions=8"]
    state, config, spec, final = _learn(tmp_path, *overrides)
    head = _evaluate(config, spec, state, planning=False)
    print(f"point_mass: search {final:.2f}, policy head {head:.2f}, random 18.4")
    assert final >= 50.0


def _grid_states(size: int = 5):
    """Vector observations of every cell (3 item maps) and each cell's optimal actions for
    `reach_bottom_right`: moves towards the corner; anything that stays in it, once there."""
    observations, optimal = [], []
    for seed in range(3):
        items = registry.make("grid", observation="vector", size=size, seed=seed)
        items = items.reset().observation["vector"][size * size :]
        for row in range(size):
            for column in range(size):
                position = np.zeros(size * size, np.float32)
                position[row * size + column] = 1.0
                observations.append(np.concatenate([position, items]))
                corner = row == column == size - 1
                # noop, up, down, left, right
                optimal.append([corner, False, row < size - 1 or corner, False, column < size - 1 or corner])  # fmt: skip
    return np.stack(observations), np.array(optimal)


@pytest.mark.slow
def test_search_over_the_trained_model_picks_better_actions_than_the_policy_head(tmp_path):
    """Planning's own contribution, measured: with the policy loss off, the policy head stays
    the untrained uniform prior while the model, reward and value heads learn from the
    search's behaviour; the search over that model must choose optimal actions where the
    head does not, and return far more."""
    steps = ["train.steps=3000", "train.eval_every=3000", "train.train_ratio=64"]
    state, config, spec, _ = _learn(
        tmp_path, *GRID5, *steps, "agent.learning_rate=1e-3", "agent.policy_scale=0"
    )
    observations, optimal = _grid_states()
    chosen = {}
    for planning in (True, False):
        agent = agents.make(
            "muzero", spec, dataclasses.replace(config.agent_config, planning=planning)
        )
        step = base.ActInput({"vector": observations}, np.ones(len(observations), bool))
        action, _ = jax.jit(agent.act, static_argnums=4)(
            state, agent.initial_carry(len(observations)), step, jax.random.PRNGKey(0), "eval"
        )
        chosen[planning] = optimal[np.arange(len(optimal)), np.asarray(action)].mean()
    search_return, head_return = (
        _evaluate(config, spec, state, True),
        _evaluate(config, spec, state, False),
    )
    print(f"optimal actions: search {chosen[True]:.2f}, head {chosen[False]:.2f}; "
          f"returns: search {search_return:.2f}, head {head_return:.2f}")  # fmt: skip
    assert chosen[True] >= chosen[False] + 0.3
    assert search_return >= head_return + 10.0
