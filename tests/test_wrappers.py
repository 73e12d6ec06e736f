"""Wrappers and the gymnasium adapters, on real environments."""

import dm_env
import gymnasium
import numpy as np
import pytest
import state_checks
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env

from mbxfer.envs import base, registry, toy, wrappers
from mbxfer.envs.base import ConfigurationError


@pytest.mark.parametrize("name", ["grid", "point_mass_image", "crafter", "cartpole"])
def test_gymnasium_adapter_passes_check_env(name):
    check_env(wrappers.ToGymnasium(registry.make(name)), skip_render_check=True)


def test_gymnasium_termination_and_truncation_become_discounts():
    env = registry.make("cartpole")
    timestep = env.reset()
    while not timestep.last():
        timestep = env.step(0)  # Always pushing left: the pole falls.
    assert timestep.discount == 0.0 and timestep.reward == 1.0
    env = registry.make("pendulum")
    timestep, steps = env.reset(), 0
    while not timestep.last():
        timestep = env.step(np.zeros(1, np.float32))
        steps += 1
    assert steps == 200 and timestep.discount == 1.0  # Pendulum-v1 truncates at 200.


def test_gymnasium_continuous_actions_are_rescaled():
    env = registry.make("pendulum")
    assert env.action_spec().minimum == -1.0 and env.action_spec().maximum == 1.0
    inner = env.unwrapped
    assert np.allclose(inner._low, -2.0) and np.allclose(inner._high, 2.0)


def test_reward_free_still_logs_task_rewards():
    env = registry.make("grid", task=None, size=3, num_items=0)
    env.reset()
    logged = []
    for action in [1, 1, 3, 3, 2, 2, 4, 4]:  # Visit corners.
        timestep = env.step(action)
        assert timestep.reward == 0.0
        logged.append(timestep.observation[base.TASK_REWARDS_KEY][:4].sum())
    assert sum(logged) >= 2


def test_action_repeat_sums_rewards_and_task_rewards():
    single = registry.make("point_mass", task="reach_top_left")
    repeated = registry.make("point_mass", task="reach_top_left", action_repeat=3)
    single.reset(), repeated.reset()
    action = np.array([-1.0, -1.0], np.float32)
    total = sum(single.step(action).reward for _ in range(3))
    timestep = repeated.step(action)
    assert np.isclose(timestep.reward, total)
    assert np.isclose(timestep.observation[base.TASK_REWARDS_KEY][0], total)


def test_action_repeat_stops_at_episode_end():
    env = registry.make("grid", time_limit=5, action_repeat=2)
    timestep, steps = env.reset(), 0
    while not timestep.last():
        timestep = env.step(0)
        steps += 1
    assert steps == 3  # 2 + 2 + 1 inner steps.
    assert env.step(0).first()


def test_time_limit_truncates_and_then_resets():
    env = wrappers.TimeLimit(toy.GridWorld(length=100), 4)
    timestep = env.reset()
    for _ in range(4):
        timestep = env.step(0)
    assert timestep.last() and timestep.discount == 1.0
    assert env.step(0).first()


def test_resize_image():
    env = registry.make("crafter", image_size=32)
    assert env.observation_spec()["image"].shape == (32, 32, 3)
    timestep = env.step(0)
    assert timestep.first() and timestep.observation["image"].shape == (32, 32, 3)
    with pytest.raises(ValueError, match="no image"):
        registry.make("cartpole", image_size=32)


def test_unknown_task_lists_tasks():
    with pytest.raises(wrappers.UnknownTaskError, match="collect_wood"):
        registry.make("crafter", task="collect_woood")


def test_wrapped_env_is_a_dm_env():
    env = registry.make("crafter")
    assert isinstance(env, dm_env.Environment) and env.unwrapped.__class__.__name__ == "Crafter"


# -- FromGymnasium: Dict and Discrete observations, tasks, info ---------------------------------
class _Robot(gymnasium.Env):
    """Dict observations (camera images, joint angles, a mode, a nested gripper flag) and an
    info with a distance on every step and a success flag on the last one."""

    def __init__(self, wrist_camera=False):
        parts = {
            "camera": spaces.Box(0, 255, (8, 8, 3), np.uint8),
            "joints": spaces.Box(-1.0, 1.0, (2, 3), np.float64),
            "mode": spaces.Discrete(3, start=1),
            "gripper": spaces.Dict({"closed": spaces.MultiBinary(1)}),
        }
        if wrist_camera:
            parts["wrist"] = spaces.Box(0, 255, (4, 4, 3), np.uint8)
        self.observation_space = spaces.Dict(parts)
        self.action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return self._observation(), {"distance": 1.0}

    def step(self, action):
        self._t += 1
        info = {"distance": 1.0 / (1 + self._t)}
        if self._t == 3:
            info["is_success"] = True
        return self._observation(), float(action), self._t == 3, False, info

    def _observation(self):
        observation = {
            "camera": np.full((8, 8, 3), self._t, np.uint8),
            "joints": np.full((2, 3), 0.1 * self._t),
            "mode": 1 + self._t % 3,
            "gripper": {"closed": np.array([self._t % 2], np.int8)},
        }
        if "wrist" in self.observation_space.spaces:
            observation["wrist"] = np.full((4, 4, 3), 100 + self._t, np.uint8)
        return observation


def _gripper_closed(observation, action, reward, info):  # Module level: named by a string too.
    return float(observation["gripper"]["closed"][0])


def _check_against_spec(env, timestep):
    spec = env.observation_spec()
    assert set(timestep.observation) == set(spec)
    for key, value in timestep.observation.items():
        spec[key].validate(value)


def test_dict_observations_follow_the_contract():
    env = wrappers.FromGymnasium(
        _Robot(),
        task_rewards={"gripper_closed": _gripper_closed},
        info_keys={"distance": None, "is_success": ()},  # Read at reset; declared.
    )
    assert env.tasks == ("reward", "gripper_closed")
    spec = env.observation_spec()
    assert spec["image"].shape == (8, 8, 3) and spec["vector"].shape == (1 + 6 + 3,)
    assert spec["log_distance"].shape == () and spec["log_is_success"].shape == ()
    # gymnasium sorts Dict keys; the nested Dict's part is named by its path.
    assert env.vector_layout == {
        "gripper/closed": slice(0, 1), "joints": slice(1, 7), "mode": slice(7, 10)
    }  # fmt: skip
    timestep = env.reset()
    _check_against_spec(env, timestep)
    np.testing.assert_array_equal(timestep.observation["vector"][7:], [1, 0, 0])  # mode 1
    assert timestep.observation["log_distance"] == 1.0
    for t in (1, 2, 3):
        timestep = env.step(1)
        _check_against_spec(env, timestep)
        vector = timestep.observation["vector"]
        assert vector[0] == t % 2 and np.allclose(vector[1:7], 0.1 * t)
        assert vector[7 + t % 3] == 1.0 and vector[7:].sum() == 1.0  # one-hot of 1 + t % 3
        assert (timestep.observation["image"] == t).all()
        np.testing.assert_allclose(timestep.observation["log_task_rewards"], [1.0, t % 2])
        assert np.isclose(timestep.observation["log_distance"], 1 / (1 + t))
        assert timestep.observation["log_is_success"] == (t == 3)  # Zeros until the info has it.
    assert timestep.last() and timestep.discount == 0.0


def test_a_task_reward_selected_by_name_and_given_as_a_string():
    env = wrappers.SelectTask(
        wrappers.FromGymnasium(_Robot(), task_rewards={"closed": f"{__name__}:_gripper_closed"}),
        "closed",
    )
    env.reset()
    assert [env.step(0).reward for _ in range(3)] == [1.0, 0.0, 1.0]
    with pytest.raises(ConfigurationError, match="own reward"):
        wrappers.FromGymnasium(_Robot(), task_rewards={"reward": _gripper_closed})


def test_several_images_need_image_key_and_the_others_are_logged():
    with pytest.raises(
        ConfigurationError, match=r"several images \('camera', 'wrist'\).*image_key=NAME"
    ):
        wrappers.FromGymnasium(_Robot(wrist_camera=True))
    env = wrappers.FromGymnasium(_Robot(wrist_camera=True), image_key="wrist")
    timestep = env.reset()
    _check_against_spec(env, timestep)
    assert timestep.observation["image"].shape == (4, 4, 3)
    assert (timestep.observation["image"] == 100).all()
    assert timestep.observation["log_camera"].shape == (8, 8, 3)
    with pytest.raises(ConfigurationError, match="image parts: 'camera', 'wrist'"):
        wrappers.FromGymnasium(_Robot(wrist_camera=True), image_key="joints")


def test_discrete_observations_are_one_hot_and_info_is_read_at_reset():
    env = wrappers.from_gymnasium("FrozenLake-v1", info_keys=["prob"])
    assert env.observation_spec()["vector"].shape == (16,)
    timestep = env.reset()
    _check_against_spec(env, timestep)
    np.testing.assert_array_equal(timestep.observation["vector"], np.eye(16)[0])
    assert timestep.observation["log_prob"] == 1.0
    timestep = env.step(2)  # Right, on the slippery lake: one of three cells.
    assert timestep.observation["vector"].sum() == 1.0
    with pytest.raises(ConfigurationError, match="not in the info of reset"):
        wrappers.from_gymnasium("FrozenLake-v1", info_keys=["is_success"])


def test_cartpole_registration_is_unchanged():
    env = registry.make("cartpole")
    assert env.tasks == ("reward",)
    assert set(env.observation_spec()) == {"vector", "log_task_rewards"}
    assert env.observation_spec()["vector"].shape == (4,)


def test_unsupported_observation_spaces_are_named():
    class _Texts(_Robot):
        def __init__(self):
            super().__init__()
            self.observation_space = spaces.Dict({"note": spaces.Text(5)})

    with pytest.raises(wrappers.UnsupportedSpaceError, match="'note' is Text"):
        wrappers.FromGymnasium(_Texts())


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("grid", {"time_limit": 7}),  # The wrapper's own step count is part of the state.
        ("point_mass_image", {"action_repeat": 2}),
        ("cartpole", {}),
        ("pendulum", {}),
    ],
)
def test_a_restored_copy_continues_the_episode_exactly(name, kwargs):
    original = registry.make(name, seed=1, **kwargs)
    actions = state_checks.random_actions(original.action_spec(), 400)
    original.reset()
    for action in actions[:23]:  # Mid-episode.
        original.step(action)
    copy = registry.make(name, seed=99, **kwargs)  # Another seed: the state must override it.
    assert state_checks.assert_same_future(original, copy, actions) >= 2


def test_a_state_taken_right_after_the_last_step_restores_the_reset():
    original = registry.make("grid", seed=1, time_limit=5)
    original.reset()
    for _ in range(5):
        timestep = original.step(0)
    assert timestep.last()
    copy = registry.make("grid", seed=2, time_limit=5)
    state_checks.assert_same_future(original, copy, [1, 2, 3])


def test_a_gymnasium_environment_that_does_not_pickle_says_so():
    import threading

    class Locked(gymnasium.Env):
        observation_space = gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32)
        action_space = gymnasium.spaces.Discrete(2)

        def __init__(self):
            self.lock = threading.Lock()

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return np.zeros(2, np.float32), {}

        def step(self, action):
            return np.zeros(2, np.float32), 0.0, False, False, {}

    env = wrappers.FromGymnasium(Locked())
    with pytest.raises(base.StateNotSupported, match="does not pickle"):
        env.get_state()
