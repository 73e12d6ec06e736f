"""Procgen (Cobbe et al. 2020) on envpool: 16 games, level splits, normalized returns.

    env = registry.make("procgen", game="coinrun", task="reward", **level_split("train"))
    test = registry.make("procgen", game="coinrun", task="reward", **level_split("test"))
    envs = vector.make(registry.factory("procgen", game="coinrun", task="reward"), 64)

The original `procgen` package has no build for Python 3.11 with numpy 2; envpool ships the
same C++ games (procgen 0.10.7 sources) and is itself a batched environment, so
`vector.make` uses one envpool of `num_envs` games directly (`ProcgenBatch`) instead of one
subprocess per game. `registry.make("procgen", ...)` is an envpool batch of one.

Keywords: `game` (one of `GAMES`), `distribution_mode` (`easy`, `hard`; some games also have
`extreme`, `memory`, `exploration`), `num_levels` and `start_level` (the levels played are the
seeds `start_level .. start_level + num_levels - 1`; `num_levels=0` is the unbounded level
distribution, Procgen's default) and `seed`.

Tasks: `reward` (the game's reward) and `level_complete` (1 on the step that completes the
level). Observations: `image` (uint8 `[64, 64, 3]`, converted from envpool's channels-first
layout by envpool itself), `log_task_rewards`, `log_level_id` (int32: the level seed being
played; on a LAST step the level that just ended) and `log_success` (float32: 1 on the LAST
step of a completed level). Procgen ends an episode when the agent dies or completes the level
(both terminate, discount 0) or at the game's timeout (1000 steps for most games; envpool's
`max_episode_steps`), which we report as a truncation (discount 1).

Generalization protocol: train on `level_split("train", num_levels=200)` (easy; 500 for hard)
and test with `level_split("test", ...)`, a block of levels starting right after the training
block, so the splits are disjoint by construction (the original protocol tests on the
unbounded distribution, which repeats a training level with probability
`num_levels / 2**31` per episode). `log_level_id` lets an evaluator check it.
`normalized_return` uses the per-game constants of Cobbe et al. 2020 (appendix).

State: envpool can neither save nor restore a game mid-level, so Procgen has no `get_state`
(`StateNotSupported`): a checkpoint reseeds and resets the games (resume stays exact, the
episodes running at the checkpoint are cut), and a trial's `done.json` records it.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import dm_env
import numpy as np
from dm_env import specs

from mbxfer import domains
from mbxfer.envs import base

GAMES = (
    "bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
    "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot",
)  # fmt: skip
TASKS = ("reward", "level_complete")
DISTRIBUTION_MODES = ("easy", "hard", "extreme", "memory", "exploration")
IMAGE_SIZE = 64
NUM_ACTIONS = 15
# Size of the default test block of `level_split`: large enough to be "unseen levels".
TEST_LEVELS = 100_000
_MAX_SEED = 2**31 - 1

# (R_min, R_max) per game and mode, Cobbe et al. 2020, arXiv 1912.01588, appendix. Checked
# against two independent code excerpts quoting that table (one listing both modes); the
# paper's table itself was not read here.
NORMALIZATION = {
    "easy": {
        "coinrun": (5.0, 10.0), "starpilot": (2.5, 64.0), "caveflyer": (3.5, 12.0),
        "dodgeball": (1.5, 19.0), "fruitbot": (-1.5, 32.4), "chaser": (0.5, 13.0),
        "miner": (1.5, 13.0), "jumper": (3.0, 10.0), "leaper": (3.0, 10.0), "maze": (5.0, 10.0),
        "bigfish": (1.0, 40.0), "heist": (3.5, 10.0), "climber": (2.0, 12.6),
        "plunder": (4.5, 30.0), "ninja": (3.5, 10.0), "bossfight": (0.5, 13.0),
    },
    "hard": {
        "coinrun": (5.0, 10.0), "starpilot": (1.5, 35.0), "caveflyer": (2.0, 13.4),
        "dodgeball": (1.5, 19.0), "fruitbot": (-0.5, 27.2), "chaser": (0.5, 14.2),
        "miner": (1.5, 20.0), "jumper": (1.0, 10.0), "leaper": (1.5, 10.0), "maze": (4.0, 10.0),
        "bigfish": (0.0, 40.0), "heist": (2.0, 10.0), "climber": (1.0, 12.6),
        "plunder": (3.0, 30.0), "ninja": (2.0, 10.0), "bossfight": (0.5, 13.0),
    },
}  # fmt: skip


def normalized_return(game: str, distribution_mode: str, episode_return):
    """(R - R_min) / (R_max - R_min) with the published constants (easy and hard only)."""
    if distribution_mode not in NORMALIZATION or game not in NORMALIZATION[distribution_mode]:
        raise base.ConfigurationError(
            f"no published normalization constants for game={game!r}, "
            f"distribution_mode={distribution_mode!r} (games: {', '.join(GAMES)}; modes: easy, hard)"
        )
    low, high = NORMALIZATION[distribution_mode][game]
    return (np.asarray(episode_return, np.float64) - low) / (high - low)


def summarize(records: Sequence[Mapping], keywords: Mapping) -> dict:
    """Procgen's episode summary (`envs.scoring`): the mean normalized return of the game and
    distribution mode the environment was built with (nothing when no constants exist)."""
    game = keywords.get("game", "coinrun")
    mode = keywords.get("distribution_mode", "easy")
    if mode not in NORMALIZATION or game not in NORMALIZATION[mode]:
        return {}
    returns = [r["return"] for r in records]
    return {"normalized_return": float(np.mean(normalized_return(game, mode, returns)))}


def level_split(
    split: str, num_levels: int = 200, start_level: int = 0, test_levels: int = TEST_LEVELS
) -> dict:
    """Keywords of the `train` or `test` level split; the two never share a level.

    `train` plays seeds `[start_level, start_level + num_levels)`; `test` plays the next
    `test_levels` seeds. Use 200 training levels for `easy`, 500 for `hard` (Cobbe et al.).
    """
    if num_levels < 1 or test_levels < 1 or start_level < 0:
        raise base.ConfigurationError(
            "level_split needs num_levels >= 1, test_levels >= 1 and start_level >= 0 "
            f"(got {num_levels}, {test_levels}, {start_level})"
        )
    if split == "train":
        return {"start_level": start_level, "num_levels": num_levels}
    if split == "test":
        first = start_level + num_levels
        if first + test_levels > _MAX_SEED:
            raise base.ConfigurationError("level seeds must stay below 2**31")
        return {"start_level": first, "num_levels": test_levels}
    raise base.ConfigurationError(f"split={split!r} must be 'train' or 'test'")


def _task_id(game: str, distribution_mode: str) -> str:
    if game not in GAMES:
        import difflib

        close = difflib.get_close_matches(str(game), GAMES, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise base.ConfigurationError(
            f"unknown Procgen game {game!r}.{hint} Games: {', '.join(GAMES)}."
        )
    if distribution_mode not in DISTRIBUTION_MODES:
        raise base.ConfigurationError(
            f"distribution_mode={distribution_mode!r} must be one of {', '.join(DISTRIBUTION_MODES)}"
        )
    return f"{game.capitalize()}{distribution_mode.capitalize()}-v0"


def _make_pool(game, distribution_mode, num_levels, start_level, num_envs, seed):
    from mbxfer.envs import optional

    task_id = _task_id(game, distribution_mode)
    if not 0 <= start_level <= _MAX_SEED or not 0 <= num_levels <= _MAX_SEED:
        raise base.ConfigurationError("start_level and num_levels must be in [0, 2**31)")
    envpool = optional.require(
        "envpool", "procgen", "procgen", "Procgen needs Debian's libqt5gui5 (make system-deps)."
    )
    if task_id not in envpool.list_all_envs():
        raise base.ConfigurationError(
            f"Procgen game {game!r} has no distribution_mode={distribution_mode!r}"
        )
    return envpool.make(
        task_id,
        env_type="dm",
        num_envs=num_envs,
        seed=seed,
        num_levels=num_levels,
        start_level=start_level,
        channel_first=False,
    )


_NO_STATE = "envpool's Procgen games cannot save their state; checkpoints reseed and reset them"


class ProcgenBatch:
    """`num_envs` Procgen games in one envpool, with the interface of `envs.vector.VectorEnv`.

    Same semantics, one difference: a batch is reproducible for a given `seed` and `num_envs`,
    but envpool derives each game's seed itself, so game `i` does not replay a single game
    seeded `seed + i` (the games of a batch do play different level sequences). Timesteps
    have a leading `[num_envs]` axis (`step_type` int8, FIRST steps have reward 0 and discount 1); after a LAST step the
    next `step` starts a new episode in that game and ignores its action. `task` picks the
    timestep reward (`None`: reward-free), all task rewards stay in `log_task_rewards`.
    """

    mode = "native"

    def __init__(
        self,
        num_envs: int,
        game: str = "coinrun",
        distribution_mode: str = "easy",
        num_levels: int = 0,
        start_level: int = 0,
        seed: int = 0,
        task: Optional[str] = None,
    ):
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs} must be >= 1")
        if task is not None and task not in TASKS:
            from mbxfer.envs.wrappers import UnknownTaskError

            raise UnknownTaskError(
                f"unknown task {task!r}. This environment's tasks: {', '.join(TASKS)} "
                "(or task=None for reward-free)."
            )
        self.num_envs = num_envs
        self._task_index = None if task is None else TASKS.index(task)
        self._options = (game, distribution_mode, num_levels, start_level)
        self._pool = None
        self._closed = False
        self.seed(seed)

    # -- specs ------------------------------------------------------------------------------
    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS

    def observation_spec(self) -> dict:
        return {
            "image": base.image_spec(IMAGE_SIZE, IMAGE_SIZE),
            base.TASK_REWARDS_KEY: base.task_rewards_spec(len(TASKS)),
            "log_level_id": specs.Array((), np.int32, "log_level_id"),
            "log_success": specs.Array((), np.float32, "log_success"),
        }

    def action_spec(self) -> specs.DiscreteArray:
        return specs.DiscreteArray(NUM_ACTIONS, name="action")

    # -- stepping ---------------------------------------------------------------------------
    def seed(self, seed: int) -> None:
        """Reseed the batch; the next `step` or `reset` starts anew."""
        self._check_open()
        if self._pool is not None:
            self._pool.close()
        self._pool = _make_pool(*self._options, self.num_envs, seed)
        self._timeout = int(self._pool.spec.config.max_episode_steps)
        self._elapsed = np.zeros(self.num_envs, np.int64)
        self._needs_reset = True

    def reset(self) -> dm_env.TimeStep:
        self._check_open()
        self._needs_reset = False
        return self._convert(self._pool.reset())

    def get_state(self) -> Any:
        """envpool cannot save or restore its games: checkpoints reseed and reset them."""
        raise base.StateNotSupported(_NO_STATE)

    def set_state(self, state: Any) -> None:
        raise base.StateNotSupported(_NO_STATE)

    def step(self, actions) -> dm_env.TimeStep:
        self._check_open()
        actions = np.asarray(actions, np.int32).reshape(-1)
        if len(actions) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} actions, got {len(actions)}")
        if self._needs_reset:
            return self.reset()
        return self._convert(self._pool.step(actions))

    def _convert(self, timestep) -> dm_env.TimeStep:
        state = timestep.observation
        step_type = np.asarray(timestep.step_type, np.int8)
        first = step_type == dm_env.StepType.FIRST
        last = step_type == dm_env.StepType.LAST
        reward = np.where(first, 0.0, np.asarray(timestep.reward, np.float32))
        complete = last & (np.asarray(state.prev_level_complete) != 0)
        self._elapsed = np.where(first, 0, self._elapsed + 1)
        # envpool reports Procgen's timeout as a termination; it is a truncation.
        timed_out = last & ~complete & (self._elapsed >= self._timeout)
        discount = np.where(last & ~timed_out, 0.0, 1.0).astype(np.float32)
        task_rewards = np.stack([reward, complete], axis=-1).astype(np.float32)
        selected = (
            np.zeros(self.num_envs, np.float32)
            if self._task_index is None
            else task_rewards[:, self._task_index]
        )
        observation = {
            "image": np.asarray(state.obs, np.uint8),
            base.TASK_REWARDS_KEY: task_rewards,
            "log_level_id": np.asarray(state.level_seed, np.int32),
            "log_success": complete.astype(np.float32),
        }
        return dm_env.TimeStep(step_type, selected.astype(np.float32), discount, observation)

    # -- shutdown ---------------------------------------------------------------------------
    def worker_pids(self) -> list[int]:
        return []  # envpool runs its games on threads of this process.

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ProcgenBatch is closed")

    def close(self) -> None:
        if not self._closed and self._pool is not None:
            self._pool.close()
        self._closed = True

    def __enter__(self) -> "ProcgenBatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Procgen(base.Environment):
    """One Procgen game (an envpool batch of one) as an mbxfer environment."""

    TASKS = TASKS
    CHOICES = {"game": GAMES, "distribution_mode": DISTRIBUTION_MODES}
    DOMAINS = {
        "num_levels": domains.in_range(0, 2**31 - 1),
        "start_level": domains.in_range(0, 2**31 - 1),
        "seed": domains.non_negative,
    }
    """What `envs.registry.factory` checks before anything is built (level seeds are int32)."""
    MEMBER_KEYWORD = "game"
    MEMBER_SETS = {"procgen16": GAMES}
    """Mixtures (`envs.mixture`): `members="procgen16"` (all 16 games) or a list of games,
    each game on its own envpool (one pool plays one game)."""

    def __init__(
        self,
        game: str = "coinrun",
        distribution_mode: str = "easy",
        num_levels: int = 0,
        start_level: int = 0,
        seed: int = 0,
    ):
        self._batch = ProcgenBatch(
            1, game, distribution_mode, num_levels, start_level, seed=seed, task="reward"
        )
        self.game, self.distribution_mode = game, distribution_mode

    @classmethod
    def make_batch(
        cls, num_envs: int, seed: int, keywords: Mapping[str, Any]
    ) -> Optional[ProcgenBatch]:
        """The native batch for `vector.make`, or None if `keywords` need per-game wrappers."""
        keywords = dict(keywords)
        keywords.pop("seed", None)
        task = keywords.pop("task", None)
        generic = {k: keywords.pop(k, None) for k in ("action_repeat", "time_limit", "image_size")}
        if generic["action_repeat"] not in (None, 1) or generic["time_limit"]:
            return None
        if generic["image_size"] not in (None, IMAGE_SIZE, (IMAGE_SIZE, IMAGE_SIZE)):
            return None
        return ProcgenBatch(num_envs, seed=seed, task=task, **keywords)

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS

    def seed(self, seed: int) -> None:
        self._batch.seed(seed)

    def reset(self) -> dm_env.TimeStep:
        return self._single(self._batch.reset())

    def step(self, action) -> dm_env.TimeStep:
        return self._single(self._batch.step(np.asarray([action], np.int32)))

    def _single(self, batch: dm_env.TimeStep) -> dm_env.TimeStep:
        observation = {key: np.asarray(value[0]) for key, value in batch.observation.items()}
        step_type = dm_env.StepType(int(batch.step_type[0]))
        if step_type == dm_env.StepType.FIRST:
            return dm_env.restart(observation)
        return dm_env.TimeStep(
            step_type, np.float32(0.0), np.float32(batch.discount[0]), observation
        )

    def observation_spec(self) -> dict:
        return self._batch.observation_spec()

    def action_spec(self) -> specs.DiscreteArray:
        return self._batch.action_spec()

    def close(self) -> None:
        self._batch.close()
