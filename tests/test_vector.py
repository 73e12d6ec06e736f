"""Vector environments: batching, auto-reset, crash recovery, clean shutdown."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from envs import registry, vector


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited for our purposes.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def _wait_dead(pids, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _rollout(envs, steps, seed=0):
    rng = np.random.default_rng(seed)
    out = [envs.reset()]
    for _ in range(steps):
        out.append(envs.step(rng.integers(5, size=envs.num_envs)))
    return out


def test_process_and_inline_give_identical_batches():
    recipe = registry.factory("grid", length=7)
    with vector.VectorEnv(recipe, 3, mode="inline", seed=5) as inline:
        expected = _rollout(inline, 20)
    with vector.VectorEnv(recipe, 3, mode="process", seed=5) as processes:
        got = _rollout(processes, 20)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a.step_type, b.step_type)
        np.testing.assert_array_equal(a.reward, b.reward)
        for key in a.observation:
            np.testing.assert_array_equal(a.observation[key], b.observation[key])


def test_batched_shapes_and_auto_reset():
    with vector.VectorEnv(registry.factory("grid", length=3), 2, mode="inline") as envs:
        timestep = envs.reset()
        assert timestep.observation["image"].shape == (2, 16, 16, 3)
        assert timestep.step_type.tolist() == [0, 0]
        types = [envs.step(np.zeros(2, int)).step_type.tolist() for _ in range(5)]
        assert types == [[1, 1], [1, 1], [2, 2], [0, 0], [1, 1]]
        with pytest.raises(ValueError, match="expected 2 actions"):
            envs.step(np.zeros(3, int))


def test_killed_worker_is_restarted_and_episode_truncated():
    with vector.VectorEnv(registry.factory("grid", length=50), 2, mode="process") as envs:
        envs.reset()
        envs.step(np.zeros(2, int))
        victim = envs.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        assert not _wait_dead([victim])
        with pytest.warns(vector.WorkerCrashedWarning, match="worker 0"):
            timestep = envs.step(np.zeros(2, int))
        assert timestep.step_type.tolist() == [2, 1]
        assert timestep.discount[0] == 1.0 and timestep.reward[0] == 0.0
        assert envs.step(np.zeros(2, int)).step_type.tolist() == [0, 1]
        assert envs.worker_pids()[0] != victim
        assert envs.step(np.zeros(2, int)).step_type.tolist() == [1, 1]


def test_close_leaves_no_processes():
    envs = vector.VectorEnv(registry.factory("grid"), 2, mode="process")
    pids = envs.worker_pids()
    envs.close()
    envs.close()  # Idempotent.
    assert not _wait_dead(pids, timeout=5)
    with pytest.raises(RuntimeError, match="closed"):
        envs.reset()


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    script = textwrap.dedent(
        """
        import sys, time
        from envs import registry, vector
        envs = vector.VectorEnv(registry.factory("grid"), 2, mode="process")
        envs.reset()
        print(" ".join(map(str, envs.worker_pids())), flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    parent.kill()
    parent.wait()
    assert not _wait_dead(pids, timeout=10), "orphan environment workers"


def test_construction_error_is_reported():
    with pytest.raises(vector.WorkerError, match="size=1 must be at least 3"):
        vector.VectorEnv(registry.factory("grid", size=1), 1, mode="process")
