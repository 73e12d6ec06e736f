"""The Dreamer agent: contract, acme adapter, modes, and learning on the toy tasks."""

import acme
import jax
import numpy as np
import pytest
import tiny_configs
from acme.utils import loggers

from mbxfer import agents
from mbxfer.agents import acme_adapter, base
from mbxfer.benchmarks import config as config_lib
from mbxfer.benchmarks import runner, stats
from mbxfer.envs import base as env_base
from mbxfer.envs import registry

TINY = config_lib.build(
    config_lib.parse_overrides(
        [
            "agent=dreamer",
            "agent.model.deter=32",
            "agent.model.hidden=32",
            "agent.model.stoch_groups=4",
            "agent.model.stoch_classes=4",
            "agent.actor_critic.hidden=32",
            "agent.actor_critic.horizon=4",
        ]
    )
).agent_config


def _agent(name="grid", **kwargs):
    env = registry.make(name, **kwargs)
    return env, agents.make("dreamer", env_base.environment_spec(env), TINY)


@pytest.mark.parametrize("name", ["grid", "point_mass"])
def test_runs_inside_acme_environment_loop(name):
    env, agent = _agent(name, task="reach_top_left")
    actor = acme_adapter.ActorAdapter(agent, agent.init(jax.random.PRNGKey(0)), mode="explore")
    loop = acme.EnvironmentLoop(env, actor, logger=loggers.NoOpLogger())
    result = loop.run_episode()
    assert result["episode_length"] == 50 if name == "grid" else 100
    loop.run(num_episodes=1)


def test_explore_samples_and_eval_takes_the_mode():
    env = registry.make("grid")
    deterministic = config_lib.build(
        config_lib.parse_overrides(["agent.model.latent=deterministic", "agent.model.deter=32"])
    ).agent_config
    agent = agents.make("dreamer", env_base.environment_spec(env), deterministic)
    state = agent.init(jax.random.PRNGKey(0))
    act = jax.jit(agent.act, static_argnums=4)
    observation = env_base.agent_observation(env.reset().observation)
    batch = {k: np.repeat(v[None], 64, 0) for k, v in observation.items()}
    step = base.ActInput(batch, np.ones(64, bool))
    carry = agent.initial_carry(64)
    explored, _ = act(state, carry, step, jax.random.PRNGKey(1), "explore")
    greedy_a, _ = act(state, carry, step, jax.random.PRNGKey(1), "eval")
    greedy_b, _ = act(state, carry, step, jax.random.PRNGKey(2), "eval")
    assert len(np.unique(np.asarray(explored))) > 1  # Same input, sampled actions differ.
    # With a deterministic latent, the same input gives the actor's argmax whatever the key.
    np.testing.assert_array_equal(greedy_a, greedy_b)
    assert len(np.unique(np.asarray(greedy_a))) == 1
    with pytest.raises(ValueError, match="mode="):
        agent.act(state, carry, step, jax.random.PRNGKey(1), "greedy")


def test_deterministic_latent_trains():
    """`agent.model.latent=deterministic` (zero-width stochastic state) updates (#14 point 2)."""
    env = registry.make("grid", size=5, observation="vector", task="reach_bottom_right")
    config = config_lib.build(
        config_lib.parse_overrides(
            [
                "agent.model.latent=deterministic",
                "agent.model.deter=32",
                "agent.model.hidden=32",
                "agent.actor_critic.hidden=32",
                "agent.actor_critic.horizon=4",
            ]
        )
    ).agent_config
    agent = agents.make("dreamer", env_base.environment_spec(env), config)
    state = agent.init(jax.random.PRNGKey(0))
    B, T = 4, 8
    spec = env.observation_spec()
    rng = np.random.default_rng(0)
    batch = {
        "observation": {"vector": rng.random((B, T) + spec["vector"].shape, np.float32)},
        "action": rng.integers(0, 5, (B, T)),
        "reward": (rng.random((B, T)) < 0.2).astype(np.float32),
        "discount": np.ones((B, T), np.float32),
        "is_first": np.eye(T, dtype=bool)[None, 0].repeat(B, 0),
        "is_last": np.zeros((B, T), bool),
        "is_terminal": np.zeros((B, T), bool),
    }
    new_state, metrics = jax.jit(agent.update)(state, batch, jax.random.PRNGKey(1))
    assert int(new_state.step) == 1
    assert all(np.isfinite(float(v)) for v in metrics.values())


def _learn(overrides, folder):
    config = config_lib.build(config_lib.parse_overrides(overrides))
    summary = runner.run(config, folder, progress=False)
    return summary["final_eval"]["return_mean"]


LEARN = [
    "agent=dreamer",
    "agent.model.deter=64",
    "agent.model.hidden=64",
    "agent.actor_critic.hidden=64",
    "agent.model_lr=1e-3",
    "agent.actor_lr=3e-4",
    "agent.critic_lr=3e-4",
    "train.batch_size=16",
    "train.sequence_length=16",
    "train.train_ratio=64",
    "train.learning_starts=500",
    "train.eval_episodes=8",
    "train.checkpoint_every=100000",
    "env.num_envs=4",
]


# The quickstart's Dreamer settings on the grid (LEARN's, with the grid's default 32
# evaluation episodes in both modes) and its budget.
QUICKSTART_GRID = [
    *(item for item in LEARN if not item.startswith(("agent=", "train.eval_episodes"))),
    "env.name=grid",
    "env.task=reach_bottom_right",
    "env.kwargs={observation: vector, size: 5}",
    "train.steps=1500",
    "train.eval_every=500",
    "train.log_every=500",
    "train.video=false",
]


def _iqm(values):
    values = np.sort(np.asarray(values, float))
    cut = len(values) // 4
    return float(values[cut : len(values) - cut].mean())


def _twin_finals(dreamer_overrides, twin_overrides, folder):
    """Final evaluation returns {agent: {mode: [5 seeds]}} of Dreamer and `dreamer_nomodel`
    (same encoder, data and ratio, learning on replay) at the quickstart's grid budget, scored
    on the same 32 evaluation episodes per seed in both modes."""
    finals: dict = {}
    for agent, extra in (("dreamer", dreamer_overrides), ("dreamer_nomodel", twin_overrides)):
        for seed in range(5):
            overrides = [f"agent={agent}", f"seed={seed}", *QUICKSTART_GRID, *extra]
            config = config_lib.build(config_lib.parse_overrides(overrides))
            summary = runner.run(config, folder / f"{agent}_{seed}", progress=False)
            assert summary["final_eval"]["mode"] == "sampled"
            for mode, record in summary["final_eval"]["modes"].items():
                finals.setdefault(agent, {}).setdefault(mode, []).append(record["return_mean"])
    print({a: {m: [round(v, 1) for v in vs] for m, vs in by.items()} for a, by in finals.items()})
    return finals


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="measured: these are dreamer_grid_ablation.yaml's trials (5 seeds, sampled final "
    "return IQM): Dreamer with its RSSM 1.66 vs dreamer_nomodel 37.6; its posterior does not "
    "encode the agent's position in 375 updates (README, Measured). The quickstart's Dreamer "
    "(deterministic latent, open-loop heads, train ratio 256) is checked by the test below",
)
def test_learns_the_grid_corner_task_as_well_as_its_model_free_twin(tmp_path):
    """DreamerV3's defaults (RSSM) against the twin, 5 seeds at the quickstart's ratio 64: the
    IQM of Dreamer's final sampled return must reach 0.8x the twin's (a fixed low bar let a
    Dreamer that learned nothing pass; random scores 2.1, optimal about 45)."""
    finals = _twin_finals([], [], tmp_path)
    assert _iqm(finals["dreamer"]["sampled"]) >= 0.8 * _iqm(finals["dreamer_nomodel"]["sampled"])


# The quickstart's grid Dreamer and its twin (benchmarks/configs/quickstart.yaml), as trials
# with the quickstart's own trial ids: its scratch Dreamer shares a part with the pretrained
# one, so its config carries pretrain_steps (unused from scratch).
QUICKSTART_TWIN = ["agent.model.latent=deterministic", "train.train_ratio=256"]
QUICKSTART_DREAMER = [
    *QUICKSTART_TWIN,
    "agent.model.losses.open_loop_heads=1.0",
    "protocol.pretrain_steps=1000",
]


def test_the_quickstart_twin_test_runs_the_quickstarts_own_trials():
    """The slow test below decides #14's claim on the quickstart's trials: if the quickstart's
    grid Dreamer or twin changes, this fails until the test follows it."""
    quickstart = {t.trial_id for t in tiny_configs.preset_trials("quickstart")}
    for agent, extra in (("dreamer", QUICKSTART_DREAMER), ("dreamer_nomodel", QUICKSTART_TWIN)):
        for seed in range(5):
            overrides = [f"agent={agent}", f"seed={seed}", *QUICKSTART_GRID, *extra]
            config = config_lib.build(config_lib.parse_overrides(overrides))
            assert config.trial_id() in quickstart, (agent, seed)


@pytest.mark.slow
def test_quickstart_dreamer_learns_the_grid_corner_task_as_well_as_its_model_free_twin(tmp_path):
    """#14's bar, on the quickstart's own Dreamer and twin (both at train ratio 256), 5 seeds:
    Dreamer's sampled final-return IQM reaches 0.8x the twin's, and its greedy IQM is at or
    above the low end of the twin's greedy 95% bootstrap CI. These are the quickstart's trials
    (same ids; README: 44.6 / 38.4 against 30.2 / 28.7 [8.89, 41.9]). About 45 min on 2 cores."""
    finals = _twin_finals(QUICKSTART_DREAMER, QUICKSTART_TWIN, tmp_path)
    dreamer, twin = finals["dreamer"], finals["dreamer_nomodel"]
    assert _iqm(dreamer["sampled"]) >= 0.8 * _iqm(twin["sampled"])
    scores = np.asarray(twin["greedy"], float)[:, None]
    _, low, _ = stats.interval(scores, lambda x: _iqm(x[:, 0]), reps=2000, seed=0)
    assert _iqm(dreamer["greedy"]) >= low


@pytest.mark.slow
def test_learns_continuous_point_mass_task(tmp_path):
    """Uniform random policy: 18.8 mean return on this task (optimal is about 85)."""
    overrides = [
        *LEARN,
        "env.name=point_mass",
        "env.task=reach_top_left",
        "train.steps=4000",
        "train.eval_every=4000",
    ]
    assert _learn(overrides, tmp_path) >= 50.0
