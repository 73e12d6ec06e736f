"""When the loop does things, as small objects instead of inline arithmetic.

    Every(n)            logging, evaluation, checkpoints: every n environment steps
    ReplayRatio(...)    off-policy updates: `train_ratio` replayed steps per environment step
    OnPolicy(...)       on-policy updates: one per `rollout` steps of every environment

Steps count environment steps summed over the batch, and the loop advances them by the batch
size (`stride`) at a time, so "every n" means "the first step count at or after each multiple
of n".
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union


class Every(NamedTuple):
    """Due at the first step count at or after each multiple of `interval` (never when it
    is 0), and at the end of the phase when `at_end`."""

    interval: int
    at_end: bool = False

    def due(self, env_steps: int, stride: int, ended: bool = False) -> bool:
        if self.at_end and ended:
            return True
        return self.interval > 0 and env_steps % self.interval < stride


RATIO_CLOCKS = ("zero", "learning_starts")
"""Where `ReplayRatio` starts counting owed updates (`train.ratio_clock`)."""


class ReplayRatio(NamedTuple):
    """Off-policy updates: after `learning_starts` environment steps, as many updates as keep
    `updates * replayed_per_update <= counted_steps * train_ratio` (DreamerV3's `train_ratio`).

    `clock` says which steps count. `zero`: every step since the phase began, so the first
    step past `learning_starts` runs a burst of `learning_starts * train_ratio /
    replayed_per_update` updates on the prefill. `learning_starts`: one update when training
    starts, then only the steps after it (DreamerV3's `when.Ratio`, which starts its clock at
    its first call, after the prefill).
    """

    train_ratio: float
    replayed_per_update: int
    learning_starts: int
    clock: str = "zero"

    def owed(self, env_steps: int, updates: int) -> int:
        if env_steps < self.learning_starts:
            return 0
        rate = self.train_ratio / self.replayed_per_update
        if self.clock == "zero":
            due = int(env_steps * rate)
        else:
            due = 1 + int((env_steps - self.learning_starts) * rate)
        return max(due - updates, 0)


class OnPolicy(NamedTuple):
    """On-policy updates: one on the newest `rollout + 1` rows of every environment (the
    rollout and its bootstrap row) every `rollout` steps of each of the `num_envs`."""

    rollout: int
    num_envs: int

    def due(self, env_steps: int) -> bool:
        return env_steps > 0 and (env_steps // self.num_envs) % self.rollout == 0


Updates = Optional[Union[ReplayRatio, OnPolicy]]


def updates_for(agent, train, num_envs: int) -> Updates:
    """The update schedule of `agent`: none for an agent that does not learn, `OnPolicy` for
    one with a `rollout_length`, else `ReplayRatio` at the trial's `train` settings."""
    if not agent.learns:
        return None
    if agent.rollout_length:
        return OnPolicy(agent.rollout_length, num_envs)
    replayed = train.batch_size * train.sequence_length
    return ReplayRatio(train.train_ratio, replayed, train.learning_starts, train.ratio_clock)
