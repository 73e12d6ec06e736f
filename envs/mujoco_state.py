"""Saving and restoring the state of a MuJoCo family (Meta-World, RoboDesk): the pieces.

A MuJoCo environment's future, given the actions, is decided by three things, each saved here
as plain numpy values (picklable, a few kilobytes, no model and no images):

* The physics: MuJoCo's full integration state (`mjSTATE_INTEGRATION`: time, qpos, qvel, act,
  the solver's warm start, ctrl, applied forces, equality activations, mocap poses, user data),
  which MuJoCo documents as sufficient for a bit-exact continuation. Restoring it runs
  `mj_forward`, so that positions and contacts read before the next step (observations,
  rewards, renders) are recomputed from it.
* Model fields an environment edits between episodes (Meta-World moves bodies and goal sites
  in its resets); the caller names them.
* The environment object's own Python attributes that are state: numbers, strings, numpy
  arrays, numpy random generators, and lists, tuples and dicts of them (episode counters,
  goals, initial positions, frame-stacking buffers, the goal sampler). Saved wholesale rather
  than by a list of names, because each of Meta-World's 50 scenes keeps different ones.
  Anything else (the model, renderers, spaces, functions) is built by the constructor and is
  not saved. An array that is a view of MuJoCo's own memory (`data.site("goal").xpos` kept as
  an attribute, so it follows the simulation) is saved as the place it looks at and restored
  as a view of the same place, so it keeps following.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np

from mbxfer.envs import base

_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes, np.generic)


class GeneratorState(NamedTuple):
    """A numpy random generator, as its bit generator's name and state."""

    bit_generator: str
    state: dict


def get_physics(model, data) -> np.ndarray:
    """MuJoCo's full integration state of `data` (float64 `[mj_stateSize]`)."""
    import mujoco

    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    state = np.empty(mujoco.mj_stateSize(model, spec), np.float64)
    mujoco.mj_getState(model, data, state, spec)
    return state


def set_physics(model, data, state: np.ndarray) -> None:
    """Restore `get_physics`'s state into `data` and recompute every derived quantity."""
    import mujoco

    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    size = mujoco.mj_stateSize(model, spec)
    state = np.asarray(state, np.float64)
    if state.shape != (size,):
        raise ValueError(f"physics state of shape {state.shape} for a model of size {size}")
    mujoco.mj_setState(model, data, state, spec)
    mujoco.mj_forward(model, data)
    # MuJoCo before 3.3.6 updates the solver's warm start in `mj_forward` too (3.3.6 made it
    # idempotent): put the saved one back, or the next step starts from another and drifts.
    mujoco.mj_setState(model, data, state, spec)


def get_model_fields(model, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Copies of the named `MjModel` array fields."""
    return {name: np.array(getattr(model, name)) for name in names}


def set_model_fields(model, fields: Mapping[str, np.ndarray]) -> None:
    for name, value in fields.items():
        field = getattr(model, name)
        if np.shape(value) != field.shape:
            raise ValueError(f"model field {name} of shape {np.shape(value)}, not {field.shape}")
        field[...] = value


def check_keywords(family: str, state: Any, keywords: Mapping[str, Any]) -> None:
    """Refuse a state that is not a saved state of an environment built with `keywords`."""
    if not isinstance(state, Mapping) or "keywords" not in state:
        raise base.ConfigurationError(
            f"not a saved {family} state (a {type(state).__name__}); pass what get_state returned"
        )
    saved = dict(state["keywords"])
    if saved != dict(keywords):
        differ = sorted(k for k in set(keywords) | set(saved) if saved.get(k) != keywords.get(k))
        shown = ", ".join(f"{key}={saved.get(key)!r}" for key in differ)
        raise base.ConfigurationError(
            f"this {family} state was saved by an environment built with {shown}; "
            f"build one with the same keywords to restore it"
        )


def is_external_view(value: np.ndarray) -> bool:
    """Whether `value` looks at memory numpy does not own (MuJoCo's model or data)."""
    base = value
    while isinstance(base, np.ndarray):
        base = base.base
    return base is not None


class MujocoView(NamedTuple):
    """An attribute that is a view of a MuJoCo array, saved as where it looks (`offset` bytes
    into field `field` of the owner named `owner`), and restored as the same view."""

    owner: str
    field: str
    offset: int
    shape: tuple
    strides: tuple
    dtype: str


class _NotState(Exception):
    """A value that is not saved: a model, a renderer, a space, a function."""


def _array_fields(owner) -> list[tuple[str, np.ndarray]]:
    fields = []
    for name in dir(owner):
        if name.startswith("_"):
            continue
        try:
            value = getattr(owner, name)
        except Exception:  # A property that does not apply to this model.
            continue
        if isinstance(value, np.ndarray) and value.size:
            fields.append((name, value))
    return fields


class _Saver:
    """Snapshots attribute values; views are located among the owners' array fields."""

    def __init__(self, owners: Mapping[str, Any]):
        self._owners = owners
        self._fields = None
        self._copies: dict[int, np.ndarray] = {}  # One array under two names stays one.

    def view(self, value: np.ndarray) -> MujocoView:
        from numpy.lib.array_utils import byte_bounds

        if self._fields is None:
            self._fields = [
                (owner_name, name, array)
                for owner_name, owner in self._owners.items()
                for name, array in _array_fields(owner)
            ]
        low, high = byte_bounds(value)
        for owner_name, name, array in self._fields:
            array_low, array_high = byte_bounds(array)
            if array_low <= low and high <= array_high:
                offset = value.__array_interface__["data"][0] - array.__array_interface__["data"][0]
                return MujocoView(
                    owner_name, name, offset, value.shape, value.strides, value.dtype.str
                )
        raise base.StateNotSupported(
            "an attribute views memory outside MuJoCo's model and data; it cannot be saved"
        )

    def snapshot(self, value: Any) -> Any:
        if isinstance(value, np.random.Generator):
            bit_generator = value.bit_generator
            return GeneratorState(type(bit_generator).__name__, copy.deepcopy(bit_generator.state))
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise _NotState
            if is_external_view(value):
                return self.view(value)
            return self._copies.setdefault(id(value), value.copy())
        if isinstance(value, _PLAIN_SCALARS):
            return value
        if type(value) in (list, tuple):
            return type(value)(self.snapshot(item) for item in value)
        if type(value) is dict:
            if not all(isinstance(key, _PLAIN_SCALARS) for key in value):
                raise _NotState
            return {key: self.snapshot(item) for key, item in value.items()}
        raise _NotState


def _restored(saved: Any, current: Any, owners: Mapping[str, Any], copies: dict) -> Any:
    if isinstance(saved, GeneratorState):
        if (
            isinstance(current, np.random.Generator)
            and type(current.bit_generator).__name__ == saved.bit_generator
        ):
            generator = current  # Keep its identity: others may hold it.
        else:
            generator = np.random.Generator(getattr(np.random, saved.bit_generator)())
        generator.bit_generator.state = copy.deepcopy(saved.state)
        return generator
    if isinstance(saved, MujocoView):
        array = getattr(owners[saved.owner], saved.field)
        return np.ndarray(
            saved.shape, np.dtype(saved.dtype), array, saved.offset, tuple(saved.strides)
        )
    if isinstance(saved, np.ndarray):
        return copies.setdefault(id(saved), saved.copy())
    if type(saved) in (list, tuple):
        return type(saved)(_restored(item, None, owners, copies) for item in saved)
    if type(saved) is dict:
        return {key: _restored(item, None, owners, copies) for key, item in saved.items()}
    return saved


def get_attributes(obj: Any, owners: Mapping[str, Any], skip: Iterable[str] = ()) -> dict:
    """A copy of every attribute of `obj` that is state (see the module docstring); views of
    the arrays of `owners` (`{"data": MjData, "model": MjModel}`) are saved as views."""
    saver, skip, attributes = _Saver(owners), set(skip), {}
    for name, value in vars(obj).items():
        if name in skip:
            continue
        try:
            attributes[name] = saver.snapshot(value)
        except _NotState:
            pass
    return attributes


def set_attributes(obj: Any, attributes: Mapping[str, Any], owners: Mapping[str, Any]) -> None:
    """Set the attributes `get_attributes` saved (as copies: a state can be restored twice);
    views look at the same places of `owners`, the same names as when they were saved."""
    copies: dict[int, np.ndarray] = {}
    for name, saved in attributes.items():
        setattr(obj, name, _restored(saved, vars(obj).get(name), owners, copies))
