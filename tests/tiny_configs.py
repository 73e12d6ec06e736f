"""Tiny trial settings shared by the tests (seconds per trial on the toy grid), and the trials
of a preset sweep spec."""

from pathlib import Path

AGENT = {
    "dreamer": [
        "agent.model.deter=32",
        "agent.model.hidden=32",
        "agent.model.stoch_groups=4",
        "agent.model.stoch_classes=4",
        "agent.model.reward_bins=31",
        "agent.actor_critic.hidden=32",
        "agent.actor_critic.horizon=4",
        "agent.actor_critic.critic_bins=31",
        "agent.exploration.hidden=32",
    ],
    "muzero": [
        "agent.model.deter=32",
        "agent.model.hidden=32",
        "agent.model.reward_bins=31",
        "agent.value_bins=31",
        "agent.hidden=32",
        "agent.unroll_steps=3",
        "agent.n_step=3",
        "agent.search.num_simulations=4",
        "agent.search.sampled_actions=4",
        "agent.exploration.hidden=32",
    ],
    "random": [],
}

GRID = [
    "env.name=grid",
    "env.task=collect_items",
    "env.num_envs=2",
    "env.kwargs={observation: vector, size: 5}",
]

TRAIN = [
    "train.batch_size=4",
    "train.sequence_length=8",
    "train.train_ratio=4",
    "train.learning_starts=40",
    "train.log_every=40",
    "train.eval_every=40",
    "train.eval_episodes=2",
    "train.checkpoint_every=40",
    "train.video=false",
]


def overrides(agent: str, *extra: str) -> list[str]:
    """`--set` items of a tiny trial of `agent` on the 5x5 grid, then `extra`."""
    return [f"agent={agent}", *GRID, *TRAIN, *AGENT.get(agent, []), *extra]


def preset_trials(name: str) -> list:
    """The trials of the preset sweep spec `benchmarks/configs/<name>.yaml` (one source of
    settings)."""
    from mbxfer.benchmarks import sweep_spec

    spec = Path(__file__).resolve().parent.parent / "benchmarks" / "configs" / f"{name}.yaml"
    return sweep_spec.expand(sweep_spec.load_spec(spec)).trials
