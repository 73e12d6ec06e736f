"""Tests for agents/replay.py: windows, episode starts, ring overwrite, save/load."""

import os

import numpy as np
import pytest
from dm_env import specs

from mbxfer.agents.replay import Replay
from mbxfer.envs import base, toy

OBSERVATION_SPEC = {
    "vector": base.vector_spec(2),
    "log_task_rewards": base.task_rewards_spec(3),
    "log_position": specs.Array((2,), np.int32, name="log_position"),
}
ACTION_SPEC = specs.DiscreteArray(4)


def numbered_step(t, num_envs, episode_length=None):
    """Step t of every env: vector = (env id, t), reward = t, episodes of `episode_length`."""
    env_ids = np.arange(num_envs, dtype=np.float32)
    first = episode_length is not None and t % episode_length == 0
    last = episode_length is not None and t % episode_length == episode_length - 1
    return {
        "observation": {
            "vector": np.stack([env_ids, np.full(num_envs, t, np.float32)], axis=-1),
            "log_task_rewards": np.full((num_envs, 3), t, np.float32),
            "log_position": np.zeros((num_envs, 2), np.int32),
        },
        "action": np.full(num_envs, t % 4),
        "reward": np.full(num_envs, t, np.float32),
        "discount": np.ones(num_envs, np.float32),
        "is_first": np.full(num_envs, first or t == 0),
        "is_last": np.full(num_envs, last),
        "is_terminal": np.zeros(num_envs, bool),
    }


def filled(steps, capacity=60, num_envs=3, length=5, seed=0, episode_length=None):
    replay = Replay(capacity, num_envs, length, OBSERVATION_SPEC, ACTION_SPEC, seed=seed)
    for t in range(steps):
        replay.add(numbered_step(t, num_envs, episode_length))
    return replay


def test_windows_stay_in_one_stream_and_behind_the_write_head():
    replay = filled(steps=50)  # 20 steps per stream: steps 30..49 are stored
    batch = replay.sample(2000)
    vector = batch["observation"]["vector"]
    assert vector.shape == (2000, 5, 2) and batch["action"].shape == (2000, 5)
    env, time = vector[..., 0], vector[..., 1]
    assert np.all(env == env[:, :1]), "a window mixed env streams"
    assert np.all(np.diff(time, axis=1) == 1), "a window is not contiguous (crossed the head)"
    assert time.min() == 30 and time.max() == 49
    np.testing.assert_array_equal(batch["reward"], time)
    # Uniform over all 3 streams x 16 windows: every window is drawn.
    assert {(int(e), int(s)) for e, s in zip(env[:, 0], time[:, 0], strict=True)} == {
        (e, s) for e in range(3) for s in range(30, 46)
    }
    assert replay.num_windows == 48 and len(replay) == 60


def test_ring_overwrites_oldest_steps():
    replay = filled(steps=23, capacity=60)
    assert len(replay) == 60
    times = replay.sample(500)["observation"]["vector"][..., 1]
    assert times.min() == 3 and times.max() == 22  # steps 0..2 were overwritten
    replay.add(numbered_step(23, 3))
    assert replay.sample(500)["observation"]["vector"][..., 1].min() == 4


def test_only_agent_keys_and_task_rewards_are_stored():
    batch = filled(steps=10).sample(4)
    assert set(batch["observation"]) == {"vector", "log_task_rewards"}
    assert batch["observation"]["log_task_rewards"].shape == (4, 5, 3)
    assert set(batch) == {
        "observation", "action", "reward", "discount", "is_first", "is_last", "is_terminal",
    }  # fmt: skip
    assert batch["is_first"].dtype == bool and batch["action"].dtype == ACTION_SPEC.dtype


def test_is_first_marks_episode_starts_inside_windows():
    replay = filled(steps=40, episode_length=7)
    batch = replay.sample(500)
    time = batch["observation"]["vector"][..., 1]
    np.testing.assert_array_equal(batch["is_first"], time % 7 == 0)
    np.testing.assert_array_equal(batch["is_first"][:, 1:], batch["is_last"][:, :-1])
    assert batch["is_first"][:, 1:].any(), "some windows should span an episode boundary"


def test_real_environment_episode_starts():
    envs = [
        toy.GridWorld(size=4, num_items=1, length=6, observation="both", seed=s) for s in (0, 1)
    ]
    spec = envs[0].observation_spec()
    replay = Replay(200, 2, 8, spec, envs[0].action_spec(), seed=0)
    timesteps = [env.reset() for env in envs]
    for t in range(40):
        observations = [timestep.observation for timestep in timesteps]
        replay.add(
            {
                "observation": {k: np.stack([o[k] for o in observations]) for k in spec},
                "action": np.full(2, t % 5),
                "reward": np.zeros(2, np.float32),
                "discount": np.ones(2, np.float32),
                "is_first": np.array([timestep.first() for timestep in timesteps]),
                "is_last": np.array([timestep.last() for timestep in timesteps]),
                "is_terminal": np.zeros(2, bool),
            }
        )
        timesteps = [env.step(t % 5) for env in envs]
    batch = replay.sample(64)
    assert batch["observation"]["image"].dtype == np.uint8
    assert batch["observation"]["image"].shape == (64, 8, 16, 16, 3)
    # Episodes are 7 steps (reset + 6): a new one starts right after each last step.
    np.testing.assert_array_equal(batch["is_first"][:, 1:], batch["is_last"][:, :-1])
    assert batch["is_first"].any()


def test_save_load_resumes_identical_sampling(tmp_path):
    replay = filled(steps=45, seed=3)
    replay.sample(7)
    path = tmp_path / "replay.npz"
    replay.save(path)
    assert os.listdir(tmp_path) == ["replay.npz"], "the temporary file was left behind"
    uninterrupted = [replay.sample(16) for _ in range(3)]
    replay.add(numbered_step(45, 3))
    uninterrupted.append(replay.sample(16))

    resumed = Replay(60, 3, 5, OBSERVATION_SPEC, ACTION_SPEC, seed=99)
    resumed.load(path)
    assert len(resumed) == len(replay)
    samples = [resumed.sample(16) for _ in range(3)]
    resumed.add(numbered_step(45, 3))
    samples.append(resumed.sample(16))
    for expected, actual in zip(uninterrupted, samples, strict=True):
        np.testing.assert_array_equal(expected["reward"], actual["reward"])
        np.testing.assert_array_equal(
            expected["observation"]["vector"], actual["observation"]["vector"]
        )
        np.testing.assert_array_equal(expected["is_first"], actual["is_first"])


def test_a_partly_filled_replay_saves_only_its_steps(tmp_path):
    # A checkpoint early in a long run must not be the size of the whole capacity (a
    # 100k-step image replay is 1.2 GB of zeros at its first checkpoint otherwise).
    sizes = {}
    for steps in (10, 100, 1000):  # 1000 steps fill the 3 streams of 1000.
        filled(steps=steps, capacity=3000).save(tmp_path / f"{steps}.npz")
        sizes[steps] = os.path.getsize(tmp_path / f"{steps}.npz")
    assert sizes[10] < sizes[100] < sizes[1000] / 5 < sizes[10] * 50
    replay = filled(steps=10, capacity=3000, seed=4)
    replay.save(tmp_path / "10.npz")
    replay.add(numbered_step(10, 3))
    expected = replay.sample(8)
    resumed = filled(steps=30, capacity=3000, seed=4)
    resumed.load(tmp_path / "10.npz")
    assert len(resumed) == 30
    resumed.add(numbered_step(10, 3))
    actual = resumed.sample(8)
    for key in ("reward", "is_first"):
        np.testing.assert_array_equal(expected[key], actual[key])
    np.testing.assert_array_equal(resumed.latest(11)["reward"], replay.latest(11)["reward"])


def test_load_rejects_a_different_layout(tmp_path):
    path = tmp_path / "replay.npz"
    filled(steps=10).save(path)
    with pytest.raises(ValueError, match="sequence_length"):
        Replay(60, 3, 4, OBSERVATION_SPEC, ACTION_SPEC).load(path)


def test_sampling_too_early_raises_a_clear_error():
    replay = filled(steps=3)
    with pytest.raises(ValueError, match="add at least 2 more steps"):
        replay.sample(1)
    replay.add(numbered_step(3, 3))
    replay.add(numbered_step(4, 3))
    assert replay.sample(1)["reward"].shape == (1, 5)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="sequence_length"):
        Replay(8, 2, 5, OBSERVATION_SPEC, ACTION_SPEC)
    replay = filled(steps=0)
    step = numbered_step(0, 3)
    step["reward"] = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="reward"):
        replay.add(step)
    step = numbered_step(0, 3)
    del step["observation"]["vector"]
    with pytest.raises(KeyError, match="vector"):
        replay.add(step)


def test_latest_returns_the_newest_steps_of_every_stream_in_order():
    replay = filled(steps=27)  # wrapped: steps 7..26 stored, write head mid-ring
    batch = replay.latest(6)
    vector = batch["observation"]["vector"]
    assert vector.shape == (3, 6, 2) and batch["action"].shape == (3, 6)
    np.testing.assert_array_equal(vector[..., 0], np.repeat(np.arange(3.0)[:, None], 6, 1))
    np.testing.assert_array_equal(vector[..., 1], np.tile(np.arange(21.0, 27.0), (3, 1)))
    with pytest.raises(ValueError, match="holds 20 steps"):
        replay.latest(21)
