"""Wrappers and the gymnasium adapters, on real environments."""

import dm_env
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from mbxfer.envs import base, registry, toy, wrappers


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
