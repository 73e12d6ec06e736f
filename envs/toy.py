"""Tiny, fast environments for testing learning logic in seconds.

`GridWorld`: a square grid with a few items. Discrete moves. Tasks share the dynamics:
reach each corner (reward 1 on every step spent in that corner, so the task is Markov and
its optimal return is the episode length minus the steps needed to get there) and collect
items (reward 1 per item picked up; items disappear). `start="center"` starts every episode
in the centre, so that the cells covered measure the policy, not the resets. Episodes end by truncation after `length`
steps, or terminate when `terminate_on_collect_all` and every item is collected.

`PointMass`: a 2-D point with velocity in [-1, 1]^2 driven by a continuous force.
Tasks: reach each corner goal (dense reward that is 1 at the goal and falls with distance).

Both render an `image` observation and/or a `vector` observation and step thousands of
times per second.
"""

from __future__ import annotations

import copy

import dm_env
import numpy as np
from dm_env import specs

from mbxfer.domains import at_least, non_negative, positive
from mbxfer.envs import base

_MOVES = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]])  # noop, up, down, left, right
_CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
_OBSERVATION_MODES = ("image", "vector", "both")


def _check_mode(observation: str) -> None:
    if observation not in _OBSERVATION_MODES:
        raise ValueError(f"observation={observation!r} is not one of {_OBSERVATION_MODES}")


class _ToyEnvironment(base.Environment):
    """What both toy environments share: observation modes, tasks, seeding, specs."""

    def __init__(self, observation: str, image_size: int, tasks: tuple[str, ...], seed: int):
        _check_mode(observation)
        self._observation = observation
        self._image_size = image_size
        self._tasks = tasks
        self.seed(seed)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._tasks

    def seed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._needs_reset = True

    _STATE: tuple[str, ...] = ("_needs_reset", "_steps", "_position")
    """The attributes that change as the environment runs (besides `_rng`)."""

    def get_state(self) -> dict:
        state = {"rng": self._rng.bit_generator.state}
        state.update({name: copy.deepcopy(getattr(self, name)) for name in self._STATE
                      if hasattr(self, name)})  # fmt: skip
        return state

    def set_state(self, state: dict) -> None:
        state = dict(state)
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state.pop("rng")
        for name, value in state.items():
            setattr(self, name, copy.deepcopy(value))

    def _observe(self, task_rewards: np.ndarray) -> dict:
        observation = {}
        if self._observation in ("image", "both"):
            observation["image"] = self._render()
        if self._observation in ("vector", "both"):
            observation["vector"] = self._vector()
        observation[base.TASK_REWARDS_KEY] = task_rewards
        observation["log_position"] = np.array(self._position, self._position_dtype)
        return observation

    def observation_spec(self) -> dict:
        spec = {}
        if self._observation in ("image", "both"):
            spec["image"] = base.image_spec(self._image_size, self._image_size)
        if self._observation in ("vector", "both"):
            spec["vector"] = base.vector_spec(self._vector_size)
        spec[base.TASK_REWARDS_KEY] = base.task_rewards_spec(len(self._tasks))
        spec["log_position"] = specs.Array((2,), self._position_dtype, name="log_position")
        return spec


class GridWorld(_ToyEnvironment):
    """A `size` x `size` grid, `num_items` items, 5 discrete actions."""

    TASKS = tuple(f"reach_{c}" for c in _CORNERS) + ("collect_items",)
    _STATE = _ToyEnvironment._STATE + ("_items", "_item_present")
    CHOICES = {"observation": _OBSERVATION_MODES, "start": ("random", "center")}
    DOMAINS = {
        "size": at_least(3),
        "num_items": non_negative,
        "length": positive,
        "image_size": positive,
        "seed": non_negative,
    }
    """What `envs.registry.factory` checks before anything is built (with `check_keywords`)."""

    @staticmethod
    def check_keywords(keywords) -> list[str]:
        """Problems of keyword values that depend on each other (`registry.factory`)."""
        size, items = keywords["size"], keywords["num_items"]
        if items > size * size - 1:
            return [f"num_items={items} must be at most size * size - 1 = {size * size - 1}"]
        return []

    def __init__(
        self,
        size: int = 7,
        num_items: int = 3,
        length: int = 50,
        observation: str = "both",
        image_size: int = 16,
        terminate_on_collect_all: bool = False,
        start: str = "random",
        seed: int = 0,
    ):
        if size < 3:
            raise ValueError(f"size={size} must be at least 3")
        if not 0 <= num_items <= size * size - 1:
            raise ValueError(f"num_items={num_items} must be in [0, {size * size - 1}]")
        self._size = size
        self._num_items = num_items
        if start not in ("random", "center"):
            raise ValueError(f"start={start!r} must be 'random' or 'center'")
        self._length = length
        self._start = start
        self._terminate_on_collect_all = terminate_on_collect_all
        s = size - 1
        self._corners = np.array([[0, 0], [0, s], [s, 0], [s, s]])
        self._vector_size = 2 * size * size
        self._position_dtype = np.int32
        super().__init__(observation, image_size, self.TASKS, seed)

    def reset(self) -> dm_env.TimeStep:
        cells = self._rng.permutation(self._size * self._size)[: self._num_items + 1]
        self._position = np.array(divmod(int(cells[0]), self._size))
        if self._start == "center":  # Exploration tests: coverage must come from the policy.
            self._position = np.array([self._size // 2, self._size // 2])
        self._items = np.array([divmod(int(c), self._size) for c in cells[1:]], np.int64).reshape(
            -1, 2
        )
        self._item_present = np.ones(self._num_items, bool)
        self._steps = 0
        self._needs_reset = False
        return dm_env.restart(self._observe(np.zeros(len(self._tasks), np.float32)))

    def step(self, action) -> dm_env.TimeStep:
        if self._needs_reset:
            return self.reset()
        self._position = np.clip(self._position + _MOVES[int(action)], 0, self._size - 1)
        self._steps += 1
        task_rewards = np.zeros(len(self._tasks), np.float32)
        task_rewards[:4] = np.all(self._corners == self._position, axis=1)
        on_item = self._item_present & np.all(self._items == self._position, axis=1)
        task_rewards[4] = on_item.sum()
        self._item_present &= ~on_item
        observation = self._observe(task_rewards)
        if self._terminate_on_collect_all and self._num_items and not self._item_present.any():
            self._needs_reset = True
            return dm_env.termination(0.0, observation)
        if self._steps >= self._length:
            self._needs_reset = True
            return dm_env.truncation(0.0, observation)
        return dm_env.transition(0.0, observation)

    def _vector(self) -> np.ndarray:
        # One-hot agent position and a map of the remaining items: fully observable.
        cells = np.zeros((2, self._size, self._size), np.float32)
        cells[0, self._position[0], self._position[1]] = 1.0
        present = self._items[self._item_present]
        cells[1, present[:, 0], present[:, 1]] = 1.0
        return cells.reshape(-1)

    def _render(self) -> np.ndarray:
        grid = np.zeros((self._size, self._size, 3), np.uint8)
        grid[tuple(self._corners.T)] = (60, 60, 60)
        present = self._items[self._item_present]
        grid[present[:, 0], present[:, 1]] = (40, 200, 40)
        grid[self._position[0], self._position[1]] = (230, 50, 50)
        # Nearest-neighbour upscaling by index lookup: exact and cheap.
        index = (np.arange(self._image_size) * self._size) // self._image_size
        return grid[index][:, index]

    def action_spec(self) -> specs.DiscreteArray:
        return specs.DiscreteArray(len(_MOVES), name="action")

    @property
    def size(self) -> int:
        """Cells per side."""
        return self._size

    def visited_cell(self) -> tuple[int, int]:
        return int(self._position[0]), int(self._position[1])


class PointMass(_ToyEnvironment):
    """A point in [-1, 1]^2 with velocity; the action is a force in [-1, 1]^2."""

    TASKS = tuple(f"reach_{c}" for c in _CORNERS)
    _STATE = _ToyEnvironment._STATE + ("_velocity",)
    CHOICES = {"observation": _OBSERVATION_MODES}
    DOMAINS = {
        "length": positive,
        "image_size": positive,
        "goal_radius": positive,
        "dt": positive,
        "seed": non_negative,
    }
    """What `envs.registry.factory` checks before anything is built."""

    def __init__(
        self,
        length: int = 100,
        observation: str = "vector",
        image_size: int = 16,
        goal_radius: float = 0.15,
        dt: float = 0.1,
        seed: int = 0,
    ):
        self._length = length
        self._goal_radius = goal_radius
        self._dt = dt
        self._goals = np.array([[-0.8, -0.8], [-0.8, 0.8], [0.8, -0.8], [0.8, 0.8]], np.float32)
        self._vector_size = 4
        self._position_dtype = np.float32
        super().__init__(observation, image_size, self.TASKS, seed)

    def reset(self) -> dm_env.TimeStep:
        self._position = self._rng.uniform(-0.3, 0.3, 2).astype(np.float32)
        self._velocity = np.zeros(2, np.float32)
        self._steps = 0
        self._needs_reset = False
        return dm_env.restart(self._observe(np.zeros(len(self._tasks), np.float32)))

    def step(self, action) -> dm_env.TimeStep:
        if self._needs_reset:
            return self.reset()
        force = np.clip(np.asarray(action, np.float32), -1.0, 1.0)
        self._velocity = np.clip(0.8 * self._velocity + force * self._dt * 5.0, -1.0, 1.0)
        self._position = np.clip(self._position + self._velocity * self._dt, -1.0, 1.0)
        self._steps += 1
        distance = np.linalg.norm(self._goals - self._position, axis=1)
        # 1 inside the goal radius, then a smooth fall-off so random exploration sees a gradient.
        task_rewards = np.where(
            distance < self._goal_radius, 1.0, np.exp(-2.0 * (distance - self._goal_radius))
        ).astype(np.float32)
        observation = self._observe(task_rewards)
        if self._steps >= self._length:
            self._needs_reset = True
            return dm_env.truncation(0.0, observation)
        return dm_env.transition(0.0, observation)

    def _vector(self) -> np.ndarray:
        return np.concatenate([self._position, self._velocity])

    def _render(self) -> np.ndarray:
        n = self._image_size
        image = np.zeros((n, n, 3), np.uint8)
        for goal in self._goals:
            r, c = ((goal + 1.0) / 2.0 * (n - 1)).round().astype(int)
            image[r, c] = (60, 60, 60)
        r, c = ((self._position + 1.0) / 2.0 * (n - 1)).round().astype(int)
        image[max(r - 1, 0) : r + 1, max(c - 1, 0) : c + 1] = (230, 50, 50)
        return image

    def action_spec(self) -> specs.BoundedArray:
        return base.continuous_action_spec(2)
