"""Crafter (Hafner 2021) as an mbxfer environment, and the Crafter score.

Tasks: `reward` (the game's own reward: +1 for each achievement unlocked for the first time
in the episode, +-0.1 per health point gained or lost) and one task per achievement (reward 1
on the step that achievement is first unlocked in the episode). `task=None` is reward-free.

Observations: `image` (uint8 `[size, size, 3]`), `log_task_rewards`, and `log_achievements`
(int32 `[22]`, how often each achievement was done so far in the episode, in the order of
`ACHIEVEMENTS`). Death terminates (discount 0); the 10000-step limit truncates (discount 1).

World generation is pure-Python opensimplex noise unless `numba` is installed, in which case
opensimplex compiles itself and a reset takes ~0.08 s instead of ~1.1 s; the generated worlds
are the same (tests/test_crafter.py checks it).

Reproducibility: crafter keeps each chunk's creatures in a Python `set`, whose order follows
memory addresses, and picks the creature to despawn by index into it, so the same seed and
actions gave different episodes in different processes. `_ordered_chunks` gives every world
insertion-ordered chunks (the same creatures, a fixed order), which makes an episode a
function of the seed and the actions (tests/test_crafter.py runs it in two processes).

State (`get_state`): the world (material and object maps, creatures, chunks, daylight, its
RNG), the player and crafter's episode counters, pickled in one go so that the creatures and
the world keep sharing one RNG; textures and renderers are not saved (rebuilt from the
keywords). About 40 kB.
"""

from __future__ import annotations

import collections
import io
import pickle
from typing import Mapping, Sequence

import dm_env
import numpy as np
from dm_env import specs

from mbxfer.domains import at_least, non_negative, positive
from mbxfer.envs import base

# The order of crafter.constants.achievements (checked when an environment is built).
ACHIEVEMENTS = (
    "collect_coal", "collect_diamond", "collect_drink", "collect_iron", "collect_sapling",
    "collect_stone", "collect_wood", "defeat_skeleton", "defeat_zombie", "eat_cow",
    "eat_plant", "make_iron_pickaxe", "make_iron_sword", "make_stone_pickaxe",
    "make_stone_sword", "make_wood_pickaxe", "make_wood_sword", "place_furnace",
    "place_plant", "place_stone", "place_table", "wake_up",
)  # fmt: skip
TASKS = ("reward",) + ACHIEVEMENTS


class _OrderedSet(dict):
    """The part of `set` crafter's chunks use (add, remove, len, iteration), in insertion
    order."""

    def add(self, item) -> None:
        self[item] = None

    def remove(self, item) -> None:
        del self[item]


def _ordered_chunks(world) -> None:
    """Make `world.reset` (which crafter's `Env.reset` calls before generating the world)
    keep chunks as `_OrderedSet`s."""
    reset = world.reset

    def ordered_reset(*args, **kwargs):
        reset(*args, **kwargs)
        world._chunks = collections.defaultdict(_OrderedSet)

    world.reset = ordered_reset
    world._chunks = collections.defaultdict(_OrderedSet)


class Crafter(base.Environment):
    """Crafter with image observations, 17 discrete actions and 23 tasks."""

    TASKS = TASKS
    DOMAINS = {
        "size": positive,
        "area": positive,
        "view": at_least(4),
        "length": positive,
        "seed": non_negative,
    }
    """What `envs.registry.factory` checks before anything is built (with `check_keywords`):
    crafter itself fails on a view below 4 or an empty area, at its first reset."""

    @staticmethod
    def check_keywords(keywords) -> list[str]:
        """crafter draws each of the `view` cells of a row with `size // view` pixels, and
        fails on fewer than 2."""
        size, view = keywords["size"], keywords["view"]
        if size // view < 2:
            return [f"size={size} must be at least 2 * view = {2 * view} (view={view})"]
        return []

    def __init__(
        self,
        size: int = 64,
        area: int = 64,
        view: int = 9,
        length: int = 10000,
        seed: int = 0,
    ):
        from mbxfer.envs import optional

        # crafter imports the legacy `gym` when it is installed (RoboDesk pulls it in), which
        # prints an "unmaintained" notice; crafter uses nothing of it here.
        with optional.without_gym_notice():
            import crafter

        if tuple(crafter.constants.achievements) != ACHIEVEMENTS:
            raise RuntimeError(
                "the installed crafter has different achievements than mbxfer expects; "
                "install the pinned version: pip install -c constraints.txt crafter"
            )
        self._make = lambda s: crafter.Env(
            area=(area, area), view=(view, view), size=(size, size), length=length, seed=s
        )
        self._size = size
        self._num_actions = len(crafter.constants.actions)
        self.seed(seed)

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS

    def seed(self, seed: int) -> None:
        self._env = self._make(seed)
        _ordered_chunks(self._env._world)
        self._needs_reset = True

    _ENV_STATE = ("_step", "_episode", "_player", "_last_health", "_unlocked", "_seed")
    """crafter.Env's attributes that change as it runs (the rest is built from keywords)."""

    def get_state(self) -> bytes:
        world = self._env._world
        # The world's own attributes, without `reset` (the instance attribute set by
        # `_ordered_chunks`, rebuilt by `seed`); the world object itself is referenced by
        # every creature and restored in place (`_WorldPickler`).
        world_state = {k: v for k, v in vars(world).items() if k != "reset"}
        env_state = {name: getattr(self._env, name) for name in self._ENV_STATE}
        mine = {"needs_reset": self._needs_reset, "counts": getattr(self, "_counts", None)}
        buffer = io.BytesIO()
        _WorldPickler(buffer, world).dump((world_state, env_state, mine))
        return buffer.getvalue()

    def set_state(self, state: bytes) -> None:
        world = self._env._world
        world_state, env_state, mine = _WorldUnpickler(io.BytesIO(state), world).load()
        vars(world).update(world_state)
        for name, value in env_state.items():
            setattr(self._env, name, value)
        self._needs_reset = mine["needs_reset"]
        if mine["counts"] is not None:
            self._counts = mine["counts"]

    def reset(self) -> dm_env.TimeStep:
        image = self._env.reset()
        self._needs_reset = False
        self._counts = np.zeros(len(ACHIEVEMENTS), np.int32)
        return dm_env.restart(self._observe(image, np.zeros(len(TASKS), np.float32)))

    def step(self, action) -> dm_env.TimeStep:
        if self._needs_reset:
            return self.reset()
        image, reward, done, info = self._env.step(int(action))
        counts = np.fromiter(info["achievements"].values(), np.int32, len(ACHIEVEMENTS))
        task_rewards = np.empty(len(TASKS), np.float32)
        task_rewards[0] = reward
        task_rewards[1:] = (counts > 0) & (self._counts == 0)
        self._counts = counts
        observation = self._observe(image, task_rewards)
        if not done:
            return dm_env.transition(np.float32(0.0), observation)
        self._needs_reset = True
        if info["discount"] == 0.0:
            return dm_env.termination(np.float32(0.0), observation)
        return dm_env.truncation(np.float32(0.0), observation)

    def _observe(self, image: np.ndarray, task_rewards: np.ndarray) -> dict:
        return {
            "image": image,
            base.TASK_REWARDS_KEY: task_rewards,
            "log_achievements": self._counts.copy(),
        }

    def observation_spec(self) -> dict:
        return {
            "image": base.image_spec(self._size, self._size),
            base.TASK_REWARDS_KEY: base.task_rewards_spec(len(TASKS)),
            "log_achievements": specs.Array((len(ACHIEVEMENTS),), np.int32, "log_achievements"),
        }

    def action_spec(self) -> specs.DiscreteArray:
        return specs.DiscreteArray(self._num_actions, name="action")

    def world_fingerprint(self) -> bytes:
        """The current world's material map, for checking that generation is reproducible."""
        return self._env._world._mat_map.tobytes()


class _WorldPickler(pickle.Pickler):
    """Pickles references to the live `world` as a token instead of the world itself."""

    def __init__(self, file, world):
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self._world = world

    def persistent_id(self, obj):
        return "world" if obj is self._world else None


class _WorldUnpickler(pickle.Unpickler):
    """Resolves `_WorldPickler`'s token to the world being restored into."""

    def __init__(self, file, world):
        super().__init__(file)
        self._world = world

    def persistent_load(self, pid):
        if pid != "world":
            raise pickle.UnpicklingError(f"unknown reference {pid!r} in a Crafter state")
        return self._world


def success_rates(achievement_counts: Sequence[Sequence[int]]) -> np.ndarray:
    """Percent of episodes in which each achievement was unlocked at least once.

    `achievement_counts` is `[episodes, 22]`: each episode's final `log_achievements`.
    """
    counts = np.asarray(achievement_counts)
    if counts.ndim != 2 or counts.shape[1] != len(ACHIEVEMENTS) or len(counts) == 0:
        raise ValueError(
            f"expected achievement counts of shape [episodes, {len(ACHIEVEMENTS)}], "
            f"got {counts.shape}"
        )
    return 100.0 * (counts > 0).mean(axis=0)


def score(rates_percent: Sequence[float]) -> float:
    """The Crafter score (Hafner 2021): S = exp(mean_i ln(1 + s_i)) - 1, s_i in percent."""
    rates = np.asarray(rates_percent, np.float64)
    if rates.shape != (len(ACHIEVEMENTS),):
        raise ValueError(f"expected {len(ACHIEVEMENTS)} success rates, got shape {rates.shape}")
    if np.any((rates < 0) | (rates > 100)):
        raise ValueError("success rates must be percentages in [0, 100]")
    return float(np.exp(np.mean(np.log1p(rates))) - 1.0)


def summarize(records: Sequence[Mapping], keywords: Mapping) -> dict:
    """Crafter's episode summary (`envs.scoring`): the score and each achievement's success
    rate in percent, from each episode's final `log_achievements`."""
    if "log_achievements" not in records[0]:
        return {}
    rates = success_rates([r["log_achievements"] for r in records])
    return {
        "crafter_score": score(rates),
        "success_rates": dict(zip(ACHIEVEMENTS, rates.round(3).tolist())),
    }
