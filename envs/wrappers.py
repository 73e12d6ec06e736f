"""Wrappers over `envs.base.Environment`, and adapters to and from gymnasium.

`SelectTask`, `ActionRepeat`, `TimeLimit`, `ResizeImage` keep the contract of `envs.base`:
`log_task_rewards` always holds every task's reward, the timestep reward is the selected
task's, and truncation keeps discount 1.

`from_gymnasium(gym_id)` turns any gymnasium environment into an mbxfer environment (register
one in a line: `register("cartpole", "mbxfer.envs.wrappers:from_gymnasium", gym_id="CartPole-v1")`;
Dict and Discrete observations, more tasks and `info` entries: see `FromGymnasium`);
`ToGymnasium(env)` turns an mbxfer environment into a `gymnasium.Env`.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, Mapping, Optional, Sequence

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

    def get_state(self) -> tuple:
        return self._env.get_state(), self._steps, self._truncated

    def set_state(self, state: tuple) -> None:
        inner, self._steps, self._truncated = state
        self._env.set_state(inner)


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


RewardFunction = Callable[[Any, Any, float, Mapping[str, Any]], float]
"""One task's reward, `(observation, action, reward, info) -> float`: gymnasium's observation
and info after the step, the action as gymnasium received it, and the environment's reward."""

_SPACES = "Box, Discrete, MultiBinary, MultiDiscrete, and Dict or Tuple spaces of them"


class UnsupportedSpaceError(base.ConfigurationError, ValueError):
    pass


def _leaves(space: gymnasium.spaces.Space, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """`(path, space)` of every non-composite part of `space`, Dict and Tuple unfolded."""
    if isinstance(space, gymnasium.spaces.Dict):
        return [leaf for key, sub in space.spaces.items() for leaf in _leaves(sub, (*path, key))]
    if isinstance(space, gymnasium.spaces.Tuple):
        return [leaf for i, sub in enumerate(space.spaces) for leaf in _leaves(sub, (*path, i))]
    return [(path, space)]


def _name(path: tuple) -> str:
    return "/".join(map(str, path))


def _is_image(space) -> bool:
    return (
        isinstance(space, gymnasium.spaces.Box)
        and space.dtype == np.uint8
        and len(space.shape) == 3
        and space.shape[-1] == 3
    )


def _vector_size(path: tuple, space) -> int:
    """How many entries of `vector` the part takes (Discrete ones one-hot)."""
    if isinstance(space, (gymnasium.spaces.Box, gymnasium.spaces.MultiBinary)):
        return int(np.prod(space.shape))
    if isinstance(space, gymnasium.spaces.Discrete):
        return int(space.n)
    if isinstance(space, gymnasium.spaces.MultiDiscrete):
        return int(np.sum(space.nvec))
    where = f"observation part {_name(path)!r}" if path else "the observation space"
    raise UnsupportedSpaceError(f"{where} is {space}; supported are {_SPACES}")


def _encode(space, value) -> np.ndarray:
    """One part of an observation as float32 `[size]` (Discrete values one-hot)."""
    if isinstance(space, gymnasium.spaces.Discrete):
        one_hot = np.zeros(int(space.n), _FLOAT32)
        one_hot[int(value) - int(space.start)] = 1.0
        return one_hot
    if isinstance(space, gymnasium.spaces.MultiDiscrete):
        nvec = np.asarray(space.nvec).reshape(-1)
        offsets = np.concatenate([[0], np.cumsum(nvec)[:-1]])
        indices = (np.asarray(value) - np.asarray(space.start)).reshape(-1)
        one_hot = np.zeros(int(nvec.sum()), _FLOAT32)
        one_hot[offsets + indices] = 1.0
        return one_hot
    return np.asarray(value, _FLOAT32).reshape(-1)


def _part(observation, path: tuple):
    for key in path:
        observation = observation[key]
    return observation


def _reward_function(task: str, function) -> RewardFunction:
    """A callable, or a `'module:function'` string (what a YAML config can hold)."""
    if callable(function):
        return function
    if isinstance(function, str) and function.count(":") == 1:
        import importlib

        module, attribute = function.split(":")
        return getattr(importlib.import_module(module), attribute)
    raise base.ConfigurationError(
        f"task_rewards[{task!r}] must be a function (observation, action, reward, info) -> float "
        f"or a 'module:function' string naming one, got {function!r}"
    )


def _info_shapes(info_keys) -> dict[str, Optional[tuple]]:
    """`info_keys` as name -> shape, None where the shape is to be read at reset."""
    if isinstance(info_keys, str):
        raise base.ConfigurationError(
            f"info_keys={info_keys!r} must be a list of info names or a mapping name -> shape"
        )
    if not isinstance(info_keys, Mapping):
        return {str(key): None for key in info_keys}
    # A shape is `()` (a scalar), a length or a list of lengths (YAML has no tuples).
    return {
        str(key): None if shape is None else tuple(int(n) for n in np.atleast_1d(shape))
        for key, shape in info_keys.items()
    }


class FromGymnasium(base.Environment):
    """A gymnasium environment as an mbxfer environment.

    Observations (see `envs.base`): a uint8 `[H, W, 3]` Box becomes `image`; every other part
    becomes a float32 slice of `vector`, in the space's order (Dict keys sorted as gymnasium
    sorts them, nested Dict and Tuple parts unfolded): Box parts flattened, Discrete and
    MultiDiscrete parts one-hot, MultiBinary parts as 0/1. `vector_layout` says which slice is
    which part. A Dict with several images needs `image_key` (the part name, `"key"` or
    `"outer/inner"`) to pick the agent's; the others are logged as `log_<name>`.

    Tasks: `reward` (the environment's) and one per `task_rewards` entry, name -> function
    `(observation, action, reward, info) -> float` (or a `'module:function'` string naming
    one), all reported in `log_task_rewards`.

    Info: each name of `info_keys` is reported as float32 `log_<name>`. Its shape is declared
    up front (`info_keys={"is_success": ()}`) or, for a name listed without a shape, read from
    the info of one `reset()` when the environment is built (the first real reset reseeds, so
    episodes are unchanged). A step whose info lacks the entry reports zeros.

    Discrete actions stay discrete; Box actions are rescaled from [-1, 1] to the environment's
    bounds. `terminated` ends with discount 0, `truncated` with 1.
    """

    def __init__(
        self,
        env: gymnasium.Env,
        seed: int = 0,
        task_rewards: Optional[Mapping[str, RewardFunction | str]] = None,
        info_keys: Sequence[str] | Mapping[str, Any] = (),
        image_key: Optional[str] = None,
    ):
        self._env = env
        self._next_seed: Optional[int] = seed
        self._needs_reset = True
        self._layout_observation(env.observation_space, image_key)
        self._action_spec = self._layout_action(env.action_space)
        task_rewards = dict(task_rewards or {})
        if "reward" in task_rewards:
            raise base.ConfigurationError(
                "task_rewards cannot name a task 'reward': that is the environment's own reward"
            )
        self._tasks = ("reward", *map(str, task_rewards))
        self._reward_functions = tuple(_reward_function(t, f) for t, f in task_rewards.items())
        self._info_shapes = self._discover_info(_info_shapes(info_keys))

    # -- layout -------------------------------------------------------------------------------
    def _layout_observation(self, space: gymnasium.spaces.Space, image_key: Optional[str]):
        leaves = _leaves(space)
        images = [(path, sub) for path, sub in leaves if _is_image(sub)]
        names = [_name(path) for path, _ in images]
        if image_key is not None and image_key not in names:
            raise base.ConfigurationError(
                f"image_key={image_key!r} is not an image part of the observation space; "
                f"its image parts: {', '.join(map(repr, names)) or 'none'}"
            )
        if image_key is None and len(images) > 1:
            raise base.ConfigurationError(
                f"the observation space has several images ({', '.join(map(repr, names))}); "
                "pick the agent's with image_key=NAME (the others are logged as log_NAME)"
            )
        if image_key is not None:
            self._image = images[names.index(image_key)]
        else:
            self._image = images[0] if images else None
        self._logged_images = {
            base.LOG_PREFIX + _name(path).replace("/", "_"): (path, sub)
            for path, sub in images
            if path != self._image[0]
        }
        self._vector_parts, layout, offset = [], {}, 0
        for path, sub in leaves:
            if _is_image(sub):
                continue
            size = _vector_size(path, sub)
            self._vector_parts.append((path, sub))
            layout[_name(path)] = slice(offset, offset + size)
            offset += size
        self.vector_layout: dict[str, slice] = layout
        """Which slice of `vector` holds which part of gymnasium's observation (by name)."""
        self._vector_size = offset

    def _layout_action(self, action_space: gymnasium.spaces.Space) -> specs.Array:
        if isinstance(action_space, gymnasium.spaces.Discrete):
            self._action_offset = int(action_space.start)
            return specs.DiscreteArray(int(action_space.n), name="action")
        if isinstance(action_space, gymnasium.spaces.Box):
            if not (
                np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))
            ):
                raise ValueError("Box action spaces need finite bounds to map onto [-1, 1]")
            self._low = action_space.low.astype(_FLOAT32)
            self._high = action_space.high.astype(_FLOAT32)
            return base.continuous_action_spec(int(np.prod(action_space.shape)))
        raise ValueError(f"only Discrete and Box action spaces are supported, got {action_space}")

    def _discover_info(self, shapes: dict[str, Optional[tuple]]) -> dict[str, tuple]:
        for name in shapes:
            key = base.LOG_PREFIX + name
            if key == base.TASK_REWARDS_KEY or key in self._logged_images:
                raise base.ConfigurationError(
                    f"info_keys entry {name!r} would overwrite the observation key {key!r}"
                )
        undeclared = [name for name, shape in shapes.items() if shape is None]
        if not undeclared:
            return shapes
        _, info = self._env.reset(seed=self._next_seed)
        for name in undeclared:
            if name not in info:
                raise base.ConfigurationError(
                    f"info entry {name!r} is not in the info of reset() (its keys: "
                    f"{', '.join(map(repr, info)) or 'none'}); declare its shape, e.g. "
                    f"info_keys={{{name!r}: ()}} for a scalar"
                )
        return {n: np.shape(info[n]) if s is None else s for n, s in shapes.items()}

    # -- environment --------------------------------------------------------------------------
    @property
    def tasks(self) -> tuple[str, ...]:
        return self._tasks

    def seed(self, seed: int) -> None:
        self._next_seed = seed

    def get_state(self) -> bytes:
        """The gymnasium environment pickled whole (classic control, toy text and most
        pure-Python environments pickle); `StateNotSupported` when it does not."""
        try:
            return pickle.dumps((self._env, self._next_seed, self._needs_reset))
        except (pickle.PicklingError, TypeError, AttributeError, ValueError) as error:
            name = getattr(self._env.spec, "id", None) or type(self._env.unwrapped).__name__
            message = f"gymnasium environment {name} does not pickle: {error}"
            raise base.StateNotSupported(message) from None

    def set_state(self, state: bytes) -> None:
        env, self._next_seed, self._needs_reset = pickle.loads(state)
        self._env.close()
        self._env = env

    def reset(self) -> dm_env.TimeStep:
        observation, info = self._env.reset(seed=self._next_seed)
        self._next_seed = None
        self._needs_reset = False
        rewards = np.zeros(len(self._tasks), _FLOAT32)
        return dm_env.restart(self._observe(observation, rewards, info))

    def step(self, action) -> dm_env.TimeStep:
        if self._needs_reset:
            return self.reset()
        if isinstance(self._action_spec, specs.DiscreteArray):
            native = int(action) + self._action_offset
        else:
            unit = np.clip(np.asarray(action, _FLOAT32), -1.0, 1.0)
            native = self._low + (unit + 1.0) * 0.5 * (self._high - self._low)
            native = native.reshape(self._env.action_space.shape)
        observation, reward, terminated, truncated, info = self._env.step(native)
        rewards = np.array(
            [reward]
            + [f(observation, native, float(reward), info) for f in self._reward_functions],
            _FLOAT32,
        )
        observation = self._observe(observation, rewards, info)
        if terminated:
            self._needs_reset = True
            return dm_env.termination(_FLOAT32(0.0), observation)
        if truncated:
            self._needs_reset = True
            return dm_env.truncation(_FLOAT32(0.0), observation)
        return dm_env.transition(_FLOAT32(0.0), observation)

    def _observe(self, observation, task_rewards: np.ndarray, info: Mapping[str, Any]) -> dict:
        result = {}
        if self._image is not None:
            result["image"] = np.asarray(_part(observation, self._image[0]), np.uint8)
        if self._vector_parts:
            parts = [_encode(sub, _part(observation, path)) for path, sub in self._vector_parts]
            result["vector"] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        for key, (path, _) in self._logged_images.items():
            result[key] = np.asarray(_part(observation, path), np.uint8)
        for name, shape in self._info_shapes.items():
            result[base.LOG_PREFIX + name] = _info_value(name, info, shape)
        result[base.TASK_REWARDS_KEY] = task_rewards
        return result

    def observation_spec(self) -> dict:
        spec = {}
        if self._image is not None:
            spec["image"] = base.image_spec(*self._image[1].shape[:2])
        if self._vector_parts:
            spec["vector"] = base.vector_spec(self._vector_size)
        for key, (_, sub) in self._logged_images.items():
            spec[key] = specs.BoundedArray(sub.shape, np.uint8, 0, 255, name=key)
        for name, shape in self._info_shapes.items():
            key = base.LOG_PREFIX + name
            spec[key] = specs.Array(shape, _FLOAT32, name=key)
        spec[base.TASK_REWARDS_KEY] = base.task_rewards_spec(len(self._tasks))
        return spec

    def action_spec(self):
        return self._action_spec

    def close(self) -> None:
        self._env.close()


def _info_value(name: str, info: Mapping[str, Any], shape: tuple) -> np.ndarray:
    """Info entry `name` as float32 of its declared `shape` (zeros when the info lacks it)."""
    if name not in info:
        return np.zeros(shape, _FLOAT32)
    try:
        value = np.asarray(info[name], _FLOAT32)
    except (TypeError, ValueError):
        raise ValueError(f"info entry {name!r} is not numeric: {info[name]!r}") from None
    if value.shape != shape:
        raise ValueError(
            f"info entry {name!r} has shape {value.shape}, not the {shape} of its spec; "
            f"declare its shape: info_keys={{{name!r}: {value.shape}}}"
        )
    return value


def from_gymnasium(
    gym_id: str,
    seed: int = 0,
    task_rewards: Optional[Mapping[str, RewardFunction | str]] = None,
    info_keys: Sequence[str] | Mapping[str, Any] = (),
    image_key: Optional[str] = None,
    **gym_kwargs: Any,
) -> FromGymnasium:
    """Registry entry point: `gymnasium.make(gym_id, **gym_kwargs)` as an mbxfer environment
    (the other keywords: `FromGymnasium`)."""
    return FromGymnasium(
        gymnasium.make(gym_id, **gym_kwargs),
        seed=seed,
        task_rewards=task_rewards,
        info_keys=info_keys,
        image_key=image_key,
    )


def _declared_tasks(keywords: Mapping[str, Any]) -> tuple[str, ...]:
    """The tasks of `from_gymnasium(**keywords)`, for `registry.describe`."""
    return ("reward", *map(str, keywords.get("task_rewards") or {}))


_FROM_GYMNASIUM_KEYWORDS = ("gym_id", "seed", "task_rewards", "info_keys", "image_key")


def _check_gymnasium_keywords(keywords: Mapping[str, Any]) -> list[str]:
    """Problems `registry.factory` reports before `from_gymnasium` builds anything: `gym_id`
    must be registered with gymnasium, and the other keywords (passed to `gymnasium.make`)
    must be ones that `gymnasium.make` or the environment's constructor takes."""
    import inspect

    from mbxfer.envs.registry import GENERIC_KEYWORDS

    gym_id = keywords.get("gym_id")
    try:
        spec = gymnasium.spec(gym_id)
    except gymnasium.error.Error as error:
        return [f"gym_id={gym_id!r}: {error}"]
    passed = [k for k in keywords if k not in _FROM_GYMNASIUM_KEYWORDS + GENERIC_KEYWORDS]
    if not passed:
        return []
    try:
        creator = gymnasium.envs.registration.load_env_creator(spec.entry_point)
        parameters = inspect.signature(creator).parameters
    except Exception:  # An entry point that does not load here: gymnasium.make will say.
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return []
    accepted = set(parameters) | set(inspect.signature(gymnasium.make).parameters) - {"id"}
    unknown = [k for k in passed if k not in accepted]
    if unknown:
        return [
            f"{gym_id} takes no keyword(s) {', '.join(map(repr, unknown))}; it takes "
            f"{', '.join(sorted(accepted - {'kwargs'}))}"
        ]
    return []


from_gymnasium.TASKS = _declared_tasks
from_gymnasium.check_keywords = _check_gymnasium_keywords


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
