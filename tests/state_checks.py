"""Checks of an environment's saved state (`get_state` / `set_state`) and of whole-run
determinism, shared by the family test files."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WALL_CLOCK = ("env_steps_per_second",)  # What differs between two identical runs.


def record(env, actions) -> list:
    """Every timestep `env` returns for `actions`, as plain copies (resets included)."""
    timesteps = []
    for action in actions:
        timestep = env.step(action)
        observation = {key: np.array(value) for key, value in timestep.observation.items()}
        timesteps.append((int(timestep.step_type), timestep.reward, timestep.discount, observation))
    return timesteps


def assert_identical(expected: list, actual: list) -> None:
    """Bit-identical timesteps: step types, rewards, discounts, every observation key."""
    assert len(actual) == len(expected)
    for index, (want, got) in enumerate(zip(expected, actual)):
        assert got[:3] == want[:3], f"step {index}: {got[:3]} != {want[:3]}"
        assert got[3].keys() == want[3].keys(), index
        for key in want[3]:
            assert got[3][key].dtype == want[3][key].dtype, (index, key)
            np.testing.assert_array_equal(got[3][key], want[3][key], err_msg=f"step {index} {key}")


def continue_from_state(make, actions, saved_after: int, other_seed: int = 7):
    """Step `make(seed=0)` through `actions[:saved_after]`, save its state, and return
    (the rest of its timesteps, the state after a pickle round trip, those of a fresh
    `make(seed=other_seed)` restored to that state and given the same actions)."""
    original = make(seed=0)
    record(original, actions[:saved_after])
    state = pickle.loads(pickle.dumps(original.get_state()))
    expected = record(original, actions[saved_after:])
    restored = make(seed=other_seed)
    restored.set_state(state)
    actual = record(restored, actions[saved_after:])
    original.close()
    restored.close()
    return expected, state, actual


_CONTINUE = """
import pickle, sys
from mbxfer.envs import registry
sys.path.insert(0, {tests!r})
import state_checks
name, kwargs, state, actions = pickle.load(sys.stdin.buffer)
env = registry.make(name, seed=11, **kwargs)
env.set_state(state)
sys.stdout.buffer.write(pickle.dumps(state_checks.record(env, actions)))
"""


def continue_in_another_process(name: str, kwargs: dict, state, actions) -> list:
    """The timesteps of `registry.make(name, **kwargs)` restored to `state` in a new Python."""
    result = subprocess.run(
        [sys.executable, "-c", _CONTINUE.format(tests=str(ROOT / "tests"))],
        input=pickle.dumps((name, kwargs, state, actions)),
        capture_output=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return pickle.loads(result.stdout)


def run_trial(folder: Path, *arguments: str) -> None:
    """`python -m mbxfer run --out folder ARGUMENTS` in a new process."""
    result = subprocess.run(
        [sys.executable, "-m", "mbxfer", "run", "--out", str(folder), "--no-progress"]
        + list(arguments),
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def logs(folder: Path) -> dict:
    """A trial's logs without wall-clock fields: {file name: [records]}."""
    found = {}
    for name in ("metrics.jsonl", "eval.jsonl", "episodes.jsonl"):
        lines = (Path(folder) / name).read_text().splitlines()
        records = [json.loads(line) for line in lines]
        found[name] = [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in records]
    return found


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


def assert_two_runs_identical(tmp_path: Path, *arguments: str) -> None:
    """Two `mbxfer run ARGUMENTS` into two folders write the same logs (none of them empty)."""
    for name in ("first", "second"):
        run_trial(tmp_path / name, *arguments)
    first, second = logs(tmp_path / "first"), logs(tmp_path / "second")
    assert first["episodes.jsonl"] and first["eval.jsonl"] and first["metrics.jsonl"]
    assert first == second
