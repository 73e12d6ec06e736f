"""Vector environments: batching, auto-reset, crash recovery, clean shutdown."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import dm_env
import numpy as np
import pytest
import state_checks

from mbxfer.envs import base, registry, toy, vector


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


# Linux keeps POSIX shared memory (the block workers write observations into) in /dev/shm.
needs_dev_shm = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")


class _Annotated(base.Wrapper):
    """Adds an observation key its spec does not declare, and can break its image's shape."""

    def __init__(self, env, crop=False):
        super().__init__(env)
        self._crop, self._count = crop, 0

    def reset(self):
        return self._annotate(self._env.reset())

    def step(self, action):
        return self._annotate(self._env.step(action))

    def _annotate(self, timestep):
        self._count += 1
        observation = dict(timestep.observation, log_note=f"call {self._count}")
        if self._crop:
            observation["image"] = observation["image"][1:]
        return timestep._replace(observation=observation)


def _annotated_grid(seed, crop=False):  # Module level: spawned workers import it by name.
    return _Annotated(registry.make("grid", length=4, seed=seed), crop)


def _crop_grid(seed):
    return _annotated_grid(seed, crop=True)


class _RaisesOnSecondStep(base.Wrapper):
    def __init__(self, env):
        super().__init__(env)
        self._steps = 0

    def step(self, action):
        self._steps += 1
        if self._steps == 2:
            raise RuntimeError("broken on purpose")
        return self._env.step(action)


def _second_grid_raises(seed):
    env = registry.make("grid", length=50, seed=seed)
    return _RaisesOnSecondStep(env) if seed == 1 else env


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
        np.testing.assert_array_equal(a.discount, b.discount)
        assert a.observation.keys() == b.observation.keys()
        for key in a.observation:
            assert a.observation[key].dtype == b.observation[key].dtype, key
            np.testing.assert_array_equal(a.observation[key], b.observation[key])


def test_seed_after_a_last_step_restarts_the_same_way_in_both_modes():
    # A worker resets ahead after LAST; seeding must discard that episode like inline does.
    recipe = registry.factory("grid", length=3)
    batches = {}
    for mode in ("inline", "process"):
        with vector.VectorEnv(recipe, 2, mode=mode, seed=5) as envs:
            rollout = _rollout(envs, 3)
            assert rollout[-1].step_type.tolist() == [2, 2]
            envs.seed(11)
            batches[mode] = rollout + _rollout(envs, 4, seed=1)
    for a, b in zip(batches["inline"], batches["process"]):
        np.testing.assert_array_equal(a.step_type, b.step_type)
        np.testing.assert_array_equal(a.observation["log_position"], b.observation["log_position"])
    with vector.VectorEnv(recipe, 2, mode="inline", seed=11) as fresh:
        np.testing.assert_array_equal(
            fresh.reset().observation["image"], batches["process"][4].observation["image"]
        )


@pytest.mark.parametrize(
    "saved_in, restored_in", [("process", "process"), ("process", "inline"), ("inline", "process")]
)
def test_a_batch_state_restores_every_episode_in_either_mode(saved_in, restored_in):
    """Taken right after a LAST step too, when a worker has already reset its environment."""
    recipe = registry.factory("grid", length=3)
    actions = np.random.default_rng(0).integers(5, size=(12, 2))
    with vector.VectorEnv(recipe, 2, mode=saved_in, seed=5) as original:
        last = _rollout(original, 3)[-1]
        assert last.step_type.tolist() == [2, 2]
        with vector.VectorEnv(recipe, 2, mode=restored_in, seed=77) as restored:
            assert state_checks.assert_same_future(original, restored, actions) >= 4


class Stateless(toy.GridWorld):
    """A grid that cannot save its state (module level: workers unpickle it by name)."""

    def get_state(self):
        return base.Environment.get_state(self)


def test_a_batch_of_environments_without_state_says_so():
    with vector.VectorEnv(Stateless, 2, mode="process") as envs:
        envs.reset()
        with pytest.raises(base.StateNotSupported, match="Stateless cannot save"):
            envs.get_state()
        assert envs.step([0, 0]).step_type.tolist() == [1, 1]  # The pipes are still in step.


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("grid", {"time_limit": 6}),
        ("point_mass_image", {}),
        ("cartpole", {}),
        ("crafter", {"size": 32}),
        ("metaworld", {"scene": "reach"}),
        ("robodesk", {"observation": "state"}),
        ("grid", {"members": [{"num_items": n} for n in (1, 2, 3)], "length": 5}),
        ("grid", {"members": [{"num_items": 1}, {"num_items": 2}], "member_weights": [1, 3]}),
    ],
)
def test_reseeding_a_used_batch_plays_what_a_new_batch_of_that_seed_plays(name, kwargs):
    """What lets a trial keep its evaluation environments alive (`phase.EvalEnvs`)."""
    recipe = registry.factory(name, **kwargs)
    spec = recipe(seed=0).action_spec()
    actions = np.stack([state_checks.random_actions(spec, 40, seed=i) for i in range(2)], axis=1)
    with vector.VectorEnv(recipe, 2, mode="inline", seed=3) as used:
        used.reset()
        for action in actions[::-1]:
            used.step(action)
        used.seed(11)
        with vector.VectorEnv(recipe, 2, mode="inline", seed=11) as new:
            state_checks.assert_same_timestep(used.reset(), new.reset(), "reset")
            for i, action in enumerate(actions):
                state_checks.assert_same_timestep(used.step(action), new.step(action), f"step {i}")


def test_batches_are_copies_that_later_steps_do_not_overwrite():
    with vector.VectorEnv(registry.factory("grid", length=50), 2, mode="process") as envs:
        first = envs.reset()
        image = first.observation["image"].copy()
        for _ in range(3):
            envs.step(np.full(2, 2))  # Moves the agent, so the image changes.
        assert not np.array_equal(envs.step(np.full(2, 2)).observation["image"], image)
        np.testing.assert_array_equal(first.observation["image"], image)


def test_keys_outside_the_spec_go_through_the_pipe():
    with vector.VectorEnv(_annotated_grid, 2, mode="inline") as inline:
        expected = _rollout(inline, 6)
    with vector.VectorEnv(_annotated_grid, 2, mode="process") as processes:
        got = _rollout(processes, 6)
    assert got[-1].observation["log_note"].tolist() == ["call 7", "call 7"]
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a.step_type, b.step_type)
        for key in a.observation:
            np.testing.assert_array_equal(a.observation[key], b.observation[key])


def test_an_observation_that_does_not_fit_its_spec_is_an_error():
    with vector.VectorEnv(_crop_grid, 1, mode="process") as envs:
        with pytest.raises(vector.WorkerError, match=r"'image' has shape \(15, 16, 3\)"):
            envs.reset()


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
        with pytest.warns(
            vector.WorkerCrashedWarning, match="worker 0 .* killed by signal SIGKILL"
        ):
            timestep = envs.step(np.zeros(2, int))
        assert timestep.step_type.tolist() == [2, 1]
        assert timestep.discount[0] == 1.0 and timestep.reward[0] == 0.0
        assert envs.step(np.zeros(2, int)).step_type.tolist() == [0, 1]
        assert envs.worker_pids()[0] != victim
        assert envs.step(np.zeros(2, int)).step_type.tolist() == [1, 1]


def test_an_environment_error_is_raised_and_its_worker_restarted():
    with vector.VectorEnv(_second_grid_raises, 2, mode="process") as envs:
        envs.reset()
        envs.step(np.zeros(2, int))
        with pytest.raises(vector.WorkerError, match="broken on purpose"):
            envs.step(np.zeros(2, int))
        # The healthy worker's reply was read, so its pipe is still in step.
        with pytest.warns(vector.WorkerCrashedWarning, match="worker 1 .* exited with code 0"):
            timestep = envs.step(np.zeros(2, int))
        assert timestep.step_type.tolist() == [1, 2]
        assert envs.step(np.zeros(2, int)).step_type.tolist() == [1, 0]


def test_a_crashed_worker_repeats_its_last_observation():
    with vector.VectorEnv(registry.factory("grid", length=50), 2, mode="process") as envs:
        envs.reset()
        before = envs.step(np.full(2, 2))
        victim = envs.worker_pids()[1]
        os.kill(victim, signal.SIGKILL)
        assert not _wait_dead([victim])
        with pytest.warns(vector.WorkerCrashedWarning, match="worker 1"):
            after = envs.step(np.full(2, 2))
        assert after.step_type.tolist() == [1, 2]
        for key, value in after.observation.items():
            np.testing.assert_array_equal(value[1], before.observation[key][1])


@needs_dev_shm
def test_shared_memory_outlives_a_crash_and_is_released_on_close():
    envs = vector.VectorEnv(registry.factory("grid", length=50), 2, mode="process")
    path = os.path.join("/dev/shm", envs._shared.name)
    envs.reset()
    victim = envs.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    assert not _wait_dead([victim])
    with pytest.warns(vector.WorkerCrashedWarning):
        envs.step(np.zeros(2, int))
    assert os.path.exists(path)
    # The restarted worker writes into the same block: its first episode is seed 0's again.
    restarted = envs.step(np.zeros(2, int))
    fresh = registry.make("grid", length=50, seed=0).reset()
    assert restarted.step_type[0] == dm_env.StepType.FIRST
    np.testing.assert_array_equal(restarted.observation["image"][0], fresh.observation["image"])
    envs.close()
    assert not os.path.exists(path)


@needs_dev_shm
def test_shared_memory_is_released_when_a_crashed_batch_is_collected():
    envs = vector.VectorEnv(registry.factory("grid"), 2, mode="process")
    path = os.path.join("/dev/shm", envs._shared.name)
    envs.reset()
    pids = envs.worker_pids()
    os.kill(pids[1], signal.SIGKILL)  # Not noticed before the finalizer runs.
    del envs
    gc.collect()
    assert not os.path.exists(path)
    assert not _wait_dead(pids, timeout=5)


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
        from mbxfer.envs import registry, vector
        envs = vector.VectorEnv(registry.factory("grid"), 2, mode="process")
        envs.reset()
        print(" ".join(map(str, envs.worker_pids())), flush=True)
        print(envs._shared.name, flush=True)
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
    shared = os.path.join("/dev/shm", parent.stdout.readline().strip())
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    parent.kill()
    parent.wait()
    assert not _wait_dead(pids, timeout=10), "orphan environment workers"
    # multiprocessing's resource tracker unlinks the block once the workers are gone.
    deadline = time.time() + 10
    while time.time() < deadline and os.path.exists(shared):
        time.sleep(0.05)
    assert not os.path.exists(shared), "leaked shared memory"


def test_construction_error_is_reported():
    # `registry.factory` refuses size=1 up front; a recipe made without it reaches the worker.
    with pytest.raises(registry.BadKeywordValueError, match="size=1 must be >= 3"):
        registry.factory("grid", size=1)
    recipe = registry.EnvFactory(registry.entry("grid"), {"size": 1})
    with pytest.raises(vector.WorkerError, match="size=1 must be at least 3"):
        vector.VectorEnv(recipe, 1, mode="process")


def test_a_construction_error_is_a_short_message_naming_the_environment(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register(
        "test_no_such_gym_id", "mbxfer.envs.wrappers:from_gymnasium", gym_id="MbxferNoSuch-v0"
    )
    with pytest.raises(base.ConfigurationError, match="MbxferNoSuch"):
        registry.factory("test_no_such_gym_id")  # Refused up front; the worker's report:
    recipe = registry.EnvFactory(registry.entry("test_no_such_gym_id"), {})
    with pytest.raises(vector.EnvironmentBuildError) as raised:
        vector.VectorEnv(recipe, 2, mode="process")
    message = str(raised.value)
    assert len(message.splitlines()) <= 3 and "Traceback" not in message
    assert "'test_no_such_gym_id'" in message and "NameNotFound" in message
    assert "mode='inline'" in message  # How to see the whole traceback.
    assert "Traceback" in raised.value.worker_traceback
    assert isinstance(raised.value, base.ConfigurationError)  # The CLI prints it in one line.
