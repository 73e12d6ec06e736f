"""Every registered environment meets the contract of envs/base.py.

Modelled on dm_env.test_utils.EnvironmentTestMixin, which also runs on each environment.
An environment whose optional dependency is missing is skipped with the reason.
"""

import unittest

import dm_env
import numpy as np
import pytest
from dm_env import specs, test_utils

from mbxfer.envs import base, registry

STEPS = 120


def _make(name, **overrides):
    try:
        return registry.make(name, **overrides)
    except registry.MissingDependencyError as error:
        # `make test` installs every family's dependency: a missing one is a broken install,
        # not a reason to pass without testing the wrapper.
        pytest.fail(f"{error} (`make install` installs it)")


def _random_action(spec, rng):
    if isinstance(spec, specs.DiscreteArray):
        return np.int32(rng.integers(spec.num_values))
    return rng.uniform(-1, 1, spec.shape).astype(np.float32)


def _check_observation(env, observation):
    spec = env.observation_spec()
    assert set(observation) == set(spec), "observation keys differ from the spec"
    for key, value in observation.items():
        spec[key].validate(value)
    agent_keys = set(base.agent_observation(observation))
    assert agent_keys and agent_keys <= set(base.AGENT_KEYS), agent_keys
    if "image" in spec:
        assert spec["image"].dtype == np.uint8 and spec["image"].shape[-1] == 3
    if "vector" in spec:
        assert spec["vector"].dtype == np.float32 and len(spec["vector"].shape) == 1
    assert spec[base.TASK_REWARDS_KEY].shape == (len(env.tasks),)


@pytest.mark.parametrize("name", registry.names())
def test_contract(name):
    env = _make(name, task=None)
    assert env.tasks and all(isinstance(t, str) for t in env.tasks)
    action_spec = env.action_spec()
    if not isinstance(action_spec, specs.DiscreteArray):
        assert isinstance(action_spec, specs.BoundedArray) and action_spec.dtype == np.float32
        assert np.all(action_spec.minimum == -1.0) and np.all(action_spec.maximum == 1.0)
    rng = np.random.default_rng(0)
    timestep = env.reset()
    assert timestep.first() and timestep.reward is None and timestep.discount is None
    _check_observation(env, timestep.observation)
    for _ in range(STEPS):
        previous = timestep
        timestep = env.step(_random_action(action_spec, rng))
        _check_observation(env, timestep.observation)
        if previous.last():
            assert timestep.first(), "the step after LAST must start a new episode"
            continue
        assert timestep.mid() or timestep.last()
        env.reward_spec().validate(timestep.reward)
        env.discount_spec().validate(timestep.discount)
        assert timestep.reward == 0.0, "task=None must be reward-free"
        if timestep.mid():
            assert timestep.discount == 1.0
        else:
            assert timestep.discount in (0.0, 1.0), "LAST: 0 terminates, 1 truncates"
    env.close()


@pytest.mark.parametrize("name", registry.names())
def test_each_task_selects_its_logged_reward(name):
    for index, task in enumerate(_make(name).tasks[:3]):
        env = _make(name, task=task)
        rng = np.random.default_rng(1)
        timestep = env.reset()
        for _ in range(40):
            timestep = env.step(_random_action(env.action_spec(), rng))
            if not timestep.first():
                assert timestep.reward == timestep.observation[base.TASK_REWARDS_KEY][index]


@pytest.mark.parametrize("name", registry.names())
def test_seed_reproduces_episodes(name):
    def rollout(seed):
        env = _make(name)
        env.seed(seed)
        rng = np.random.default_rng(0)
        timestep, frames = env.reset(), []
        for _ in range(20):
            frames.append(base.agent_observation(timestep.observation))
            timestep = env.step(_random_action(env.action_spec(), rng))
        return frames

    first, again = rollout(3), rollout(3)
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def _mixin_case(name):
    class Conformance(test_utils.EnvironmentTestMixin, unittest.TestCase):
        def make_object_under_test(self):
            return _make(name, task=name and None)

        def make_action_sequence(self):
            rng = np.random.default_rng(0)
            for _ in range(50):
                yield _random_action(self.environment.action_spec(), rng)

    Conformance.__name__ = Conformance.__qualname__ = f"TestDmEnvMixin_{name}"
    return Conformance


for _name in registry.names():
    globals()[f"TestDmEnvMixin_{_name}"] = _mixin_case(_name)


def test_environment_spec_hides_log_keys():
    spec = base.environment_spec(registry.make("crafter"))
    assert set(spec.observations) == {"image"}
    assert isinstance(spec.actions, specs.DiscreteArray) and spec.actions.num_values == 17
    assert isinstance(registry.make("grid"), dm_env.Environment)
