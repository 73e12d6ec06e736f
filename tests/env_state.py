"""The check every `get_state`/`set_state` test makes: a restored copy has the same future."""

import pickle

import numpy as np


def random_actions(spec, count: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    if hasattr(spec, "num_values"):
        return [int(a) for a in rng.integers(spec.num_values, size=count)]
    return list(rng.uniform(-1.0, 1.0, (count, *spec.shape)).astype(spec.dtype))


def assert_same_timestep(a, b, where) -> None:
    assert np.array_equal(a.step_type, b.step_type), where
    assert np.array_equal(a.reward, b.reward) and np.array_equal(a.discount, b.discount), where
    assert a.observation.keys() == b.observation.keys(), where
    for key in a.observation:
        assert np.array_equal(a.observation[key], b.observation[key]), (where, key)


def assert_same_future(original, restored, actions) -> int:
    """Step both with `actions`: identical timesteps. `restored` is set (through pickle) to
    `original`'s state first. Returns how many episodes ended on the way."""
    restored.set_state(pickle.loads(pickle.dumps(original.get_state())))
    ended = 0
    for i, action in enumerate(actions):
        a, b = original.step(action), restored.step(action)
        assert_same_timestep(a, b, f"step {i}")
        ended += int(np.sum(np.asarray(a.step_type) == 2))
    return ended


class StatelessGrid:
    """A grid world that cannot save its state (as envpool's Procgen): built by name in
    workers and plugins, so it lives at module level."""

    def __new__(cls, **kwargs):
        from mbxfer.envs import base, toy

        class _Stateless(toy.GridWorld):
            def get_state(self):
                return base.Environment.get_state(self)

        return _Stateless(**kwargs)
