"""Wrappers over `envs.base.Environment`, and adapters to and from gymnasium.

`SelectTask`, `ActionRepeat`, `TimeLimit`, `ResizeImage` keep the contract of `envs.base`:
`log_task_rewards` always holds every task's reward, the timestep reward is the selected
task's, and truncation keeps discount 1.

`from_gymnasium(gym_id)` turns any gymnasium environment into an mbxfer environment (register
one in a line: `register("cartpole", "mbxfer.envs.wrappers:from_gymnasium", gym_id="CartPole-v1")`);
`ToGymnasium(env)` turns an mbxfer environment into a `gymnasium.Env`.
"""

from __future__ import annotations

from typing import Any, Optional

import dm_env
import gymnasium
import numpy as np
from dm_env import specs
from mbxfer.envs import base

_FLOAT32 = np.float32


def _with_reward(timestep: dm_env.TimeStep, reward) -> dm_env.TimeStep:
    discount = timestep.discount
    return timestep._replace(
        reward=_FLOAT32(reward) if not timestep.first() else None,
        discount=_FLOAT32(discount) if discount is not None else None,
    )


class UnknownTaskError(base.ConfigurationError, ValueError):
    pass


class SelectTask(base.Wrapper):
    """Sets the timestep reward to one task's reward, or 0 for `task=None` (reward-free)."""

    def __init__(self, env: dm_env.Environment, task: Optional[str]):
        super().__init__(env)
        tasks = env.tasks
        if task is not None and task not in tasks:
            import difflib

            close = difflib.get_close_matches(str(task), tasks, n=3, cutoff=0.4)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise UnknownTaskError(
                f"unknown task {task!r}.{hint} This environment's tasks: {', '.join(tasks)} "
                "(or task=None for reward-free)."
            )
        self._task = task
        self._index = None if task is None else tasks.index(task)

        success = env.observation_spec().get(base.SUCCESS_KEY)
        # One success flag per task (RoboDesk): score the selected task's (`envs.base`).
        self._per_task_success = success is not None and tuple(success.shape) == (len(tasks),)

    @property
    def task(self) -> Optional[str]:
        return self._task

    def observation_spec(self):
        spec = self._env.observation_spec()
        if not self._per_task_success:
            return spec
        spec = dict(spec)
        per_task = spec.pop(base.SUCCESS_KEY)
        spec[base.TASK_SUCCESS_KEY] = specs.Array(
            per_task.shape, per_task.dtype, name=base.TASK_SUCCESS_KEY
        )
        if self._index is not None:
            spec[base.SUCCESS_KEY] = specs.Array((), per_task.dtype, name=base.SUCCESS_KEY)
        return spec

    def reset(self) -> dm_env.TimeStep:
        return self._select(self._env.reset())

    def step(self, action) -> dm_env.TimeStep:
        return self._select(self._env.step(action))

    def _select(self, timestep: dm_env.TimeStep) -> dm_env.TimeStep:
        if self._per_task_success:
            observation = dict(timestep.observation)
            flags = observation.pop(base.SUCCESS_KEY)
            observation[base.TASK_SUCCESS_KEY] = flags
            if self._index is not None:
                observation[base.SUCCESS_KEY] = flags[self._index]
            timestep = timestep._replace(observation=observation)
        if self._index is None:
            return _with_reward(timestep, 0.0)
        return _with_reward(timestep, timestep.observation[base.TASK_REWARDS_KEY][self._index])


class ActionRepeat(base.Wrapper):
    """Repeats each action `repeat` times, summing rewards and multiplying discounts."""

    def __init__(self, env: dm_env.Environment, repeat: int):
        super().__init__(env)
        if repeat < 1:
            raise ValueError(f"action_repeat={repeat} must be >= 1")
        self._repeat = repeat

    def step(self, action) -> dm_env.TimeStep:
        reward, discount = 0.0, 1.0
        task_rewards = None
        for _ in range(self._repeat):
            timestep = self._env.step(action)
            if timestep.first():  # The wrapped environment needed a reset.
                return timestep
            reward += discount * (timestep.reward or 0.0)
            rewards = timestep.observation.get(base.TASK_REWARDS_KEY)
            if rewards is not None:
                task_rewards = rewards if task_rewards is None else task_rewards + rewards
            discount *= timestep.discount
            if timestep.last():
                break
        observation = timestep.observation
        if task_rewards is not None:
            observation = {**observation, base.TASK_REWARDS_KEY: task_rewards.astype(_FLOAT32)}
        return timestep._replace(
            reward=_FLOAT32(reward), discount=_FLOAT32(discount), observation=observation
        )


class TimeLimit(base.Wrapper):
    """Ends episodes after `max_steps` steps as a truncation (discount stays 1)."""

    def __init__(self, env: dm_env.Environment, max_steps: int):
        super().__init__(env)
        if max_steps < 1:
            raise ValueError(f"time_limit={max_steps} must be >= 1")
        self._max_steps = max_steps
        self._steps = 0
        self._truncated = False

    def reset(self) -> dm_env.TimeStep:
        self._steps = 0
        self._truncated = False
        return self._env.reset()

    def step(self, action) -> dm_env.TimeStep:
        if self._truncated:  # We ended the episode; the wrapped one is still running.
            return self.reset()
        timestep = self._env.step(action)
        if timestep.first():
            self._steps = 0
            return timestep
        self._steps += 1
        if timestep.last():
            self._steps = 0
        elif self._steps >= self._max_steps:
            self._truncated = True
            return timestep._replace(step_type=dm_env.StepType.LAST)
        return timestep


class ResizeImage(base.Wrapper):
    """Resizes the `image` observation to `size` x `size` (bilinear, uint8 out)."""

    def __init__(self, env: dm_env.Environment, size: int):
        super().__init__(env)
        self._size = (size, size) if isinstance(size, int) else tuple(size)
        if "image" not in env.observation_spec():
            raise ValueError("image_size was given but this environment has no image observation")

    def reset(self) -> dm_env.TimeStep:
        return self._resize(self._env.reset())

    def step(self, action) -> dm_env.TimeStep:
        return self._resize(self._env.step(action))

    def _resize(self, timestep: dm_env.TimeStep) -> dm_env.TimeStep:
        from PIL import Image

        image = timestep.observation["image"]
        if image.shape[:2] != self._size:
            image = np.asarray(
                Image.fromarray(image).resize(self._size[::-1], Image.BILINEAR), np.uint8
            )
        return timestep._replace(observation={**timestep.observation, "image": image})

    def observation_spec(self):
        spec = dict(self._env.observation_spec())
        spec["image"] = base.image_spec(*self._size)
        return spec


class FromGymnasium(base.Environment):
    """A gymnasium environment as an mbxfer environment with the single task `reward`.

    Box observations of uint8 `[H, W, 3]` become `image`, other Box observations are
    flattened into `vector`. Discrete actions stay discrete; Box actions are rescaled from
    [-1, 1] to the environment's bounds. `terminated` ends with discount 0, `truncated` with 1.
    """

    def __init__(self, env: gymnasium.Env, seed: int = 0):
        self._env = env
        space = env.observation_space
        if not isinstance(space, gymnasium.spaces.Box):
            raise ValueError(f"only Box observation spaces are supported, got {space}")
        self._is_image = space.dtype == np.uint8 and len(space.shape) == 3 and space.shape[-1] == 3
        self._observation_size = int(np.prod(space.shape))
        action_space = env.action_space
        if isinstance(action_space, gymnasium.spaces.Discrete):
            self._action_spec = specs.DiscreteArray(int(action_space.n), name="action")
            self._action_offset = int(action_space.start)
        elif isinstance(action_space, gymnasium.spaces.Box):
            if not (
                np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))
            ):
                raise ValueError("Box action spaces need finite bounds to map onto [-1, 1]")
            self._low = action_space.low.astype(_FLOAT32)
            self._high = action_space.high.astype(_FLOAT32)
            self._action_spec = base.continuous_action_spec(int(np.prod(action_space.shape)))
        else:
            raise ValueError(
                f"only Discrete and Box action spaces are supported, got {action_space}"
            )
        self._next_seed: Optional[int] = seed
        self._needs_reset = True

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("reward",)

    def seed(self, seed: int) -> None:
        self._next_seed = seed

    def reset(self) -> dm_env.TimeStep:
        observation, _ = self._env.reset(seed=self._next_seed)
        self._next_seed = None
        self._needs_reset = False
        return dm_env.restart(self._observe(observation, 0.0))

    def step(self, action) -> dm_env.TimeStep:
        if self._needs_reset:
            return self.reset()
        if isinstance(self._action_spec, specs.DiscreteArray):
            native = int(action) + self._action_offset
        else:
            unit = np.clip(np.asarray(action, _FLOAT32), -1.0, 1.0)
            native = self._low + (unit + 1.0) * 0.5 * (self._high - self._low)
            native = native.reshape(self._env.action_space.shape)
        observation, reward, terminated, truncated, _ = self._env.step(native)
        observation = self._observe(observation, reward)
        if terminated:
            self._needs_reset = True
            return dm_env.termination(_FLOAT32(0.0), observation)
        if truncated:
            self._needs_reset = True
            return dm_env.truncation(_FLOAT32(0.0), observation)
        return dm_env.transition(_FLOAT32(0.0), observation)

    def _observe(self, observation, reward) -> dict:
        key = "image" if self._is_image else "vector"
        value = (
            np.asarray(observation, np.uint8)
            if self._is_image
            else np.asarray(observation, _FLOAT32).reshape(-1)
        )
        return {key: value, base.TASK_REWARDS_KEY: np.array([reward], _FLOAT32)}

    def observation_spec(self) -> dict:
        if self._is_image:
            key_spec = {"image": base.image_spec(*self._env.observation_space.shape[:2])}
        else:
            key_spec = {"vector": base.vector_spec(self._observation_size)}
        return {**key_spec, base.TASK_REWARDS_KEY: base.task_rewards_spec(1)}

    def action_spec(self):
        return self._action_spec

    def close(self) -> None:
        self._env.close()


def from_gymnasium(gym_id: str, seed: int = 0, **gym_kwargs: Any) -> FromGymnasium:
    """Registry entry point: `gymnasium.make(gym_id, **gym_kwargs)` as an mbxfer environment."""
    return FromGymnasium(gymnasium.make(gym_id, **gym_kwargs), seed=seed)


def _space(spec: specs.Array) -> gymnasium.spaces.Space:
    if isinstance(spec, specs.DiscreteArray):
        return gymnasium.spaces.Discrete(spec.num_values)
    if isinstance(spec, specs.BoundedArray):
        low = np.broadcast_to(spec.minimum, spec.shape).astype(spec.dtype)
        high = np.broadcast_to(spec.maximum, spec.shape).astype(spec.dtype)
        return gymnasium.spaces.Box(low, high, spec.shape, spec.dtype)
    if np.issubdtype(spec.dtype, np.integer):
        info = np.iinfo(spec.dtype)
        return gymnasium.spaces.Box(info.min, info.max, spec.shape, spec.dtype)
    return gymnasium.spaces.Box(-np.inf, np.inf, spec.shape, spec.dtype)


class ToGymnasium(gymnasium.Env):
    """An mbxfer environment as a `gymnasium.Env` (Dict observation space, all keys)."""

    metadata = {"render_modes": []}

    def __init__(self, env: dm_env.Environment):
        self._env = env
        self.observation_space = gymnasium.spaces.Dict(
            {key: _space(spec) for key, spec in env.observation_spec().items()}
        )
        self.action_space = _space(env.action_spec())

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(seed)
        timestep = self._env.reset()
        return dict(timestep.observation), {}

    def step(self, action):
        timestep = self._env.step(action)
        terminated = bool(timestep.last() and timestep.discount == 0.0)
        truncated = bool(timestep.last() and not terminated)
        return dict(timestep.observation), float(timestep.reward), terminated, truncated, {}

    def close(self) -> None:
        self._env.close()
