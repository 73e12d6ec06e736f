"""Sequence replay over numpy storage: one ring buffer per environment stream.

`add(step)` appends one step of every environment (`num_envs` streams, written in lockstep);
each stream keeps its last `capacity // num_envs` steps. `sample(batch_size)` draws windows
of `sequence_length` consecutive steps uniformly over every window that lies inside one
stream's stored data, so a window never mixes streams nor crosses the write head (the seam
between the newest and the oldest step). A window may span an episode boundary: the new
episode's first step has `is_first=True`, which resets the world model's state there.

Step format for `add` (one row per environment, `N = num_envs`):
  observation: dict of `[N, ...]`; `image`, `vector` and `log_task_rewards` are stored
    (whichever the observation spec has), other `log_*` keys are dropped.
  action `[N]` int or `[N, A]` float: the action taken AT this observation (anything, e.g.
    zeros, on an `is_last` step); reward `[N]`: received on arriving at this observation;
  discount `[N]`; is_first, is_last, is_terminal `[N]` bool.
`sample` returns the same keys with `[B, T, ...]` arrays: the world model's batch format.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping

import numpy as np
from dm_env import specs

STORED_OBSERVATION_KEYS = ("image", "vector", "log_task_rewards")
_STEP_FIELDS = ("reward", "discount", "is_first", "is_last", "is_terminal")


class Replay:
    """Uniform sequence replay; see the module docstring for the step and batch formats."""

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        sequence_length: int,
        observation_spec: Mapping[str, specs.Array],
        action_spec: specs.Array,
        seed: int = 0,
    ):
        if num_envs < 1 or sequence_length < 1:
            raise ValueError(f"num_envs={num_envs}, sequence_length={sequence_length} must be >= 1")
        self._stream_capacity = capacity // num_envs
        if self._stream_capacity < sequence_length:
            raise ValueError(
                f"capacity={capacity} gives {self._stream_capacity} steps per env stream "
                f"({num_envs} envs), fewer than sequence_length={sequence_length}"
            )
        self._num_envs = num_envs
        self._sequence_length = sequence_length
        self._observation_keys = tuple(k for k in STORED_OBSERVATION_KEYS if k in observation_spec)
        if not set(self._observation_keys) & {"image", "vector"}:
            raise ValueError(f"observation spec {sorted(observation_spec)} has no image or vector")
        shape = (num_envs, self._stream_capacity)
        self._storage: dict[str, np.ndarray] = {
            f"observation/{key}": np.zeros(
                shape + tuple(observation_spec[key].shape), observation_spec[key].dtype
            )
            for key in self._observation_keys
        }
        self._storage["action"] = np.zeros(shape + tuple(action_spec.shape), action_spec.dtype)
        self._storage["reward"] = np.zeros(shape, np.float32)
        self._storage["discount"] = np.zeros(shape, np.float32)
        for field in ("is_first", "is_last", "is_terminal"):
            self._storage[field] = np.zeros(shape, bool)
        self._cursor = 0  # next write index in every stream
        self._count = 0  # steps stored per stream, at most `stream_capacity`
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        """Number of steps stored over all streams."""
        return self._count * self._num_envs

    @property
    def num_windows(self) -> int:
        """Number of distinct windows `sample` draws from."""
        return self._num_envs * max(0, self._count - self._sequence_length + 1)

    def add(self, step: Mapping[str, Any]) -> None:
        """Appends one step of every environment (format in the module docstring)."""
        observation = step["observation"]
        missing = [k for k in self._observation_keys if k not in observation]
        if missing:
            raise KeyError(f"step observation lacks {missing}; it has {sorted(observation)}")
        rows = {f"observation/{k}": observation[k] for k in self._observation_keys}
        rows["action"] = step["action"]
        rows.update({field: step[field] for field in _STEP_FIELDS})
        rows = {name: np.asarray(value) for name, value in rows.items()}
        for name, value in rows.items():  # check everything before writing anything
            expected = self._storage[name].shape[:1] + self._storage[name].shape[2:]
            if value.shape != expected:
                raise ValueError(f"step[{name!r}] has shape {value.shape}, expected {expected}")
        for name, value in rows.items():
            self._storage[name][:, self._cursor] = value
        self._cursor = (self._cursor + 1) % self._stream_capacity
        self._count = min(self._count + 1, self._stream_capacity)

    def sample(self, batch_size: int) -> dict[str, Any]:
        """`batch_size` windows `[B, T, ...]` drawn uniformly with replacement."""
        if self.num_windows == 0:
            raise ValueError(
                f"cannot sample sequences of length {self._sequence_length}: each env stream "
                f"holds {self._count} steps; add at least "
                f"{self._sequence_length - self._count} more steps"
            )
        windows_per_stream = self._count - self._sequence_length + 1
        flat = self._rng.integers(0, self.num_windows, size=batch_size)
        env, offset = np.divmod(flat, windows_per_stream)
        oldest = (self._cursor - self._count) % self._stream_capacity
        time = (oldest + offset[:, None] + np.arange(self._sequence_length)) % self._stream_capacity
        env = env[:, None]
        batch: dict[str, Any] = {"observation": {}}
        for name, array in self._storage.items():
            if name.startswith("observation/"):
                batch["observation"][name.split("/", 1)[1]] = array[env, time]
            else:
                batch[name] = array[env, time]
        return batch

    def set_newest_action(self, action) -> None:
        """Overwrites the action of the newest step of every stream (on-policy loops add a
        step before acting on it)."""
        if not self._count:
            raise ValueError("set_newest_action: the replay is empty")
        action = np.asarray(action)
        newest = (self._cursor - 1) % self._stream_capacity
        expected = self._storage["action"].shape[:1] + self._storage["action"].shape[2:]
        if action.shape != expected:
            raise ValueError(f"action has shape {action.shape}, expected {expected}")
        self._storage["action"][:, newest] = action

    def latest(self, length: int) -> dict[str, Any]:
        """The newest `length` steps of every stream, `[num_envs, length, ...]`, oldest first.

        On-policy agents train on this (see `Agent.rollout_length`): the rows are the steps
        just collected, in order, one sequence per environment.
        """
        if not 1 <= length <= self._count:
            raise ValueError(f"latest({length}): each env stream holds {self._count} steps")
        time = (self._cursor - length + np.arange(length)) % self._stream_capacity
        batch: dict[str, Any] = {"observation": {}}
        for name, array in self._storage.items():
            if name.startswith("observation/"):
                batch["observation"][name.split("/", 1)[1]] = array[:, time]
            else:
                batch[name] = array[:, time]
        return batch

    def save(self, path: str | os.PathLike) -> None:
        """Writes storage, write position and sampler RNG state atomically to `path` (npz)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        metadata = {
            "stream_capacity": self._stream_capacity,
            "num_envs": self._num_envs,
            "sequence_length": self._sequence_length,
            "cursor": self._cursor,
            "count": self._count,
            "rng": self._rng.bit_generator.state,
        }
        # Until the streams wrap around, steps sit in slots [0, count): only those are
        # written, so a checkpoint early in a long run is not the size of the whole capacity.
        arrays = {
            f"storage/{name}": array[:, : self._count] for name, array in self._storage.items()
        }
        arrays["metadata"] = np.array(json.dumps(metadata))
        handle, temp_path = tempfile.mkstemp(dir=directory, prefix=".replay-", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, **arrays)
            os.replace(temp_path, path)
        except BaseException:
            if os.path.exists(temp_path):
                os.remove(temp_path)
            raise

    def load(self, path: str | os.PathLike) -> None:
        """Restores what `save` wrote; the replay must have been built with the same specs."""
        with np.load(os.fspath(path), allow_pickle=False) as data:
            metadata = json.loads(str(data["metadata"]))
            for key in ("stream_capacity", "num_envs", "sequence_length"):
                if metadata[key] != getattr(self, f"_{key}"):
                    raise ValueError(
                        f"saved replay has {key}={metadata[key]}, "
                        f"this one {getattr(self, f'_{key}')}"
                    )
            stored = {name[len("storage/") :] for name in data.files if name != "metadata"}
            if stored != set(self._storage):
                raise ValueError(
                    f"saved replay stores {sorted(stored)}, not {sorted(self._storage)}"
                )
            count = int(metadata["count"])
            for name, array in self._storage.items():
                saved = data[f"storage/{name}"]
                # `count` filled slots (older files: the whole capacity).
                if (
                    saved.shape[1:2] not in ((count,), (self._stream_capacity,))
                    or saved.shape[:1] + saved.shape[2:] != array.shape[:1] + array.shape[2:]
                    or saved.dtype != array.dtype
                ):
                    raise ValueError(
                        f"saved {name} is {saved.dtype}{saved.shape}, expected "
                        f"{array.dtype}{array.shape[:1] + (count,) + array.shape[2:]}"
                    )
                array[:, : saved.shape[1]] = saved
                array[:, saved.shape[1] :] = 0  # As in a replay that never held more.
        self._cursor = int(metadata["cursor"])
        self._count = count
        self._rng.bit_generator.state = metadata["rng"]
