"""Episodes: tracking them in a batch, what they covered, and playing them to a count.

    EpisodeTracker     running return/length per environment -> finished episode records
    Coverage           distinct positions and achievements seen (the exploration metrics)
    play(...)          act in a batch of environments until N episodes have ended
    evaluate(...)      `play` with an agent, scored by `envs.scoring`
    evaluation_seed    the seed of an evaluation: equal for twins at equal step counts

A finished episode's record is `{"return", "length", <each log_* key at its last step>}`;
`envs.scoring.summarize` turns a list of them into a summary. `mbxfer rollout` is `play`
with a uniform random policy.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Callable, Optional, Protocol

import jax
import numpy as np
from dm_env import specs

from mbxfer.agents.base import ActInput
from mbxfer.benchmarks import timing
from mbxfer.envs import base as env_base
from mbxfer.envs import scoring
from mbxfer.envs.mixture import MEMBER_KEY

_EVAL_SEED_OFFSET = 1_000_003


class EpisodeTracker:
    """Running return/length per environment; finished episodes as records."""

    def __init__(self, num_envs: int):
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, np.int64)

    def reset(self) -> None:
        self.returns[:] = 0
        self.lengths[:] = 0

    def observe(self, timestep) -> list[dict]:
        first = timestep.step_type == 0
        self.returns = np.where(first, 0.0, self.returns + timestep.reward)
        self.lengths = np.where(first, 0, self.lengths + 1)
        finished = []
        for i in np.flatnonzero(timestep.step_type == 2):
            record = {"return": float(self.returns[i]), "length": int(self.lengths[i])}
            for key, value in timestep.observation.items():
                if key.startswith(env_base.LOG_PREFIX) and key != env_base.TASK_REWARDS_KEY:
                    record[key] = np.asarray(value[i]).tolist()
            finished.append(record)
        return finished


class Coverage:
    """How much of the environment the agent has seen: the exploration metrics.

    Distinct `log_position` values (toy grid cells; continuous positions are binned to a
    20x20 grid over [-1, 1]^2) and distinct Crafter achievements unlocked, over all training
    steps so far. The sets are part of the checkpoint, so resumed runs continue the count.
    """

    def __init__(self, positions=(), achievements=()):
        self.positions = {tuple(p) for p in positions}
        self.achievements = set(achievements)

    def observe(self, observation) -> None:
        if "log_position" in observation:
            position = np.asarray(observation["log_position"])
            if np.issubdtype(position.dtype, np.floating):
                position = np.floor((position + 1.0) * 10.0).astype(np.int64)
            self.positions.update(map(tuple, position.tolist()))
        if "log_achievements" in observation:
            unlocked = np.asarray(observation["log_achievements"]).max(axis=0) > 0
            self.achievements.update(np.flatnonzero(unlocked).tolist())

    def metrics(self) -> dict:
        out = {}
        if self.positions:
            out["coverage/distinct_positions"] = len(self.positions)
        if self.achievements:
            out["coverage/achievements_unlocked"] = len(self.achievements)
        return out

    def state(self) -> dict:
        return {"positions": sorted(self.positions), "achievements": sorted(self.achievements)}


class Policy(Protocol):
    """What `play` acts with: a carry per batch, and one batch of actions per timestep."""

    def initial_carry(self, num_envs: int) -> Any: ...

    def __call__(self, timestep, carry) -> tuple[Any, Any]: ...


class AgentPolicy:
    """An agent's `act` (jitted) with fixed parameters, in act mode `mode`, keys split from
    `seed` one per step."""

    def __init__(self, agent, act, state, mode: str, seed: int):
        self.agent, self.act, self.state, self.mode = agent, act, state, mode
        self.rng = jax.random.PRNGKey(seed)

    def initial_carry(self, num_envs: int):
        return self.agent.initial_carry(num_envs)

    def __call__(self, timestep, carry):
        self.rng, key = jax.random.split(self.rng)
        step = ActInput(env_base.agent_observation(timestep.observation), timestep.step_type == 0)
        return self.act(self.state, carry, step, key, self.mode)


class RandomPolicy:
    """Uniform random actions (discrete, or continuous in [-1, 1]) from a numpy generator;
    `steps` counts the actions taken."""

    def __init__(self, action_spec, seed: int):
        self.spec, self.rng = action_spec, np.random.default_rng(seed)
        self.steps = 0

    def initial_carry(self, num_envs: int):
        return num_envs

    def __call__(self, timestep, num_envs):
        self.steps += num_envs
        if isinstance(self.spec, specs.DiscreteArray):
            return self.rng.integers(self.spec.num_values, size=num_envs), num_envs
        shape = (num_envs,) + self.spec.shape
        return self.rng.uniform(-1, 1, shape).astype(np.float32), num_envs


def start_digest(observation, index: int) -> int:
    """A fingerprint of environment `index`'s observation (its agent keys and `log_*` keys)."""
    digest = 0
    for key in sorted(observation):
        if key != env_base.TASK_REWARDS_KEY:
            digest = zlib.crc32(np.ascontiguousarray(observation[key][index]).tobytes(), digest)
    return digest


def play(
    envs,
    policy: Policy,
    episodes: int,
    on_episode: Optional[Callable[[dict], None]] = None,
    timer=timing.NO_TIMER,
) -> list[dict]:
    """Act with `policy` in `envs` (from a reset) until `episodes` episodes have ended; their
    records, in the order they ended, each with `start`: the digest of its first observation.
    `on_episode` is called with each record as it ends; `timer` times `eval_act` and
    `eval_env` (`benchmarks.timing`)."""
    num_envs = envs.num_envs
    tracker = EpisodeTracker(num_envs)
    carry = policy.initial_carry(num_envs)
    with timer("eval_env"):  # Resetting builds the first episodes (Crafter: their worlds).
        timestep = envs.reset()
    starts = [start_digest(timestep.observation, i) for i in range(num_envs)]
    records: list[dict] = []
    # A mixture (envs/mixture.py) counts at most its share of episodes per environment, so
    # members with short episodes do not crowd out the others.
    quota = -(-episodes // num_envs) if MEMBER_KEY in timestep.observation else episodes
    counted = np.zeros(num_envs, np.int64)
    while len(records) < episodes:
        with timer("eval_act"):
            action, carry = policy(timestep, carry)
            action = np.asarray(action)
        with timer("eval_env"):
            timestep = envs.step(action)
        for record, i in zip(tracker.observe(timestep), np.flatnonzero(timestep.step_type == 2)):
            if counted[i] >= quota:
                continue
            counted[i] += 1
            record["start"] = starts[i]
            if len(records) < episodes and on_episode is not None:
                on_episode(record)
            records.append(record)
        for i in np.flatnonzero(timestep.step_type == 0):
            starts[i] = start_digest(timestep.observation, i)
    return records[:episodes]


def evaluate(envs, recipe, policy: Policy, episodes: int, timer=timing.NO_TIMER) -> dict:
    """`episodes` evaluation episodes of `policy` in `envs` (freshly made, environment
    `recipe`), summarized by `envs.scoring`; `start_digest` fingerprints the episodes' first
    observations: equal digests mean the same start states."""
    records = play(envs, policy, episodes, timer=timer)
    summary = scoring.summarize(records, recipe, envs.tasks)
    summary["start_digest"] = zlib.crc32(json.dumps([r["start"] for r in records]).encode())
    return summary


def evaluation_seed(trial_seed: int, eval_set: str, task: Optional[str], env_steps: int) -> int:
    """The seed of one evaluation's episodes: a function of the trial's seed, the evaluation
    set (its name and task) and the environment steps into the phase, never of how many
    evaluations ran before. So a finetuning phase and its scratch twin (same seed and task)
    are scored on the same start states at the same step count, whatever phases came
    before, and every mode of one evaluation plays the same episodes."""
    text = json.dumps([int(trial_seed), str(eval_set), task, int(env_steps)])
    return (zlib.crc32(text.encode()) + _EVAL_SEED_OFFSET) % 2**31
