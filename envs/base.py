"""The environment contract every mbxfer environment meets.

Read this file first: it is the whole interface between `envs` and the rest of mbxfer.

* Every environment is a `dm_env.Environment`.
* Observations are a dict. Agents read `image` (uint8 `[H, W, 3]`) and/or `vector`
  (float32 `[D]`). Keys starting with `log_` carry data that only evaluators read
  (achievements, success flags, level ids) and agents ignore.
* Every environment computes the reward of *each* of its tasks at every step and reports
  them as `log_task_rewards` (float32 `[len(tasks)]`, in the order of `tasks`). The reward
  of the timestep is chosen by `SelectTask` (applied by `envs.registry.make`): one task's
  reward, or 0 when the task is `None` (reward-free), with all task rewards still logged.
  This is what lets a reward-free pretraining run later fit a task's reward head on its own
  data (zero-shot transfer).
* Success flags travel as `log_success`. An environment with one flag per task reports them
  as float32 `[len(tasks)]` (in the order of `tasks`, like `log_task_rewards`); `SelectTask`
  then makes `log_success` the selected task's flag (a scalar) and keeps the vector as
  `log_task_success`, so an evaluator scores the task being trained, never the mean of all.
  Reward-free (`task=None`) keeps only `log_task_success`.
* Actions are one `specs.DiscreteArray` or one float32 `specs.BoundedArray` in [-1, 1].
* Termination and truncation are told apart by the discount of the LAST step:
  0 when the episode terminated, 1 when it was cut by a time limit.
* Optionally, `get_state()` / `set_state(state)`: a picklable value holding everything that
  decides the environment's future given the actions (the episode so far, RNGs, physics),
  and its restoration, such that after `set_state(get_state())` on a fresh copy built with
  the same keywords every following `step` and `reset` returns what the original would
  have. Checkpoints save it, so a training run resumes mid-episode instead of resetting
  every environment. An environment without it raises `StateNotSupported`; checkpoints then
  reseed and reset the environments (exact too, but they cut the running episodes), and the
  trial's `done.json` says so. A wrapper with state of its own (a step counter) adds it.
"""

from __future__ import annotations

import abc
from typing import Any, Mapping

import dm_env
import numpy as np
from acme import specs as acme_specs
from dm_env import specs

LOG_PREFIX = "log_"
TASK_REWARDS_KEY = "log_task_rewards"
SUCCESS_KEY = "log_success"
TASK_SUCCESS_KEY = "log_task_success"
AGENT_KEYS = ("image", "vector")


class ConfigurationError(Exception):
    """Bad user input (unknown name, keyword or value); the message names the fix."""


class StateNotSupported(Exception):
    """This environment cannot save and restore its state (`Environment.get_state`)."""


class Environment(dm_env.Environment, abc.ABC):
    """A dm_env.Environment that knows its tasks and can be reseeded."""

    @property
    @abc.abstractmethod
    def tasks(self) -> tuple[str, ...]:
        """Names of the reward functions over this environment's dynamics."""

    @abc.abstractmethod
    def seed(self, seed: int) -> None:
        """Reseed: the following `reset` starts the episode sequence of this seed."""

    def get_state(self) -> Any:
        """Everything that decides this environment's future given the actions, picklable;
        see the module docstring. Raises `StateNotSupported` unless the family has it."""
        raise StateNotSupported(f"{type(self).__name__} cannot save its state")

    def set_state(self, state: Any) -> None:
        """Restore a state `get_state` gave (of a copy built with the same keywords)."""
        raise StateNotSupported(f"{type(self).__name__} cannot restore a state")

    def reward_spec(self) -> specs.Array:
        return specs.Array((), np.float32, name="reward")

    def discount_spec(self) -> specs.BoundedArray:
        return specs.BoundedArray((), np.float32, 0.0, 1.0, name="discount")


class Wrapper(Environment):
    """Forwards everything to the wrapped environment; subclasses override what they change."""

    def __init__(self, env: dm_env.Environment):
        self._env = env

    @property
    def unwrapped(self) -> dm_env.Environment:
        return getattr(self._env, "unwrapped", self._env)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._env.tasks

    def seed(self, seed: int) -> None:
        self._env.seed(seed)

    def reset(self) -> dm_env.TimeStep:
        return self._env.reset()

    def step(self, action) -> dm_env.TimeStep:
        return self._env.step(action)

    def get_state(self) -> Any:
        return self._env.get_state()

    def set_state(self, state: Any) -> None:
        self._env.set_state(state)

    def observation_spec(self):
        return self._env.observation_spec()

    def action_spec(self):
        return self._env.action_spec()

    def reward_spec(self):
        return self._env.reward_spec()

    def discount_spec(self):
        return self._env.discount_spec()

    def close(self) -> None:
        self._env.close()

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this wrapper lacks (e.g. a family's own helpers).
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._env, name)


def image_spec(height: int, width: int) -> specs.BoundedArray:
    return specs.BoundedArray((height, width, 3), np.uint8, 0, 255, name="image")


def vector_spec(size: int) -> specs.Array:
    return specs.Array((size,), np.float32, name="vector")


def task_rewards_spec(num_tasks: int) -> specs.Array:
    return specs.Array((num_tasks,), np.float32, name=TASK_REWARDS_KEY)


def continuous_action_spec(size: int) -> specs.BoundedArray:
    return specs.BoundedArray((size,), np.float32, -1.0, 1.0, name="action")


def agent_observation(observation: Mapping[str, Any]) -> dict[str, Any]:
    """The part of an observation an agent may read (drops `log_*` keys)."""
    return {k: v for k, v in observation.items() if not k.startswith(LOG_PREFIX)}


def environment_spec(env: dm_env.Environment) -> acme_specs.EnvironmentSpec:
    """The spec agents are built from: observations without the `log_*` keys."""
    spec = acme_specs.make_environment_spec(env)
    return spec._replace(observations=agent_observation(spec.observations))
