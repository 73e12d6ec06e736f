"""Meta-World through our wrapper: scripted policies, rewards and success flags unchanged."""

import numpy as np
import pytest
import state_checks
from gymnasium.utils.env_checker import check_env

from mbxfer.envs import base, metaworld, registry, wrappers

mw = pytest.importorskip("metaworld", reason="pip install 'mbxfer[metaworld]'")

# Five scenes of MT10 whose scripted policies are reliable and quick.
SCRIPTED_SCENES = ("reach", "push", "drawer-open", "button-press-topdown", "window-open")
EPISODES = 10


def _policy(scene):
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[metaworld.scene_id(scene)]()


def success_rate(scene: str, episodes: int = EPISODES) -> float:
    """Meta-World's scripted policy acting through `registry.make`: fraction of successes."""
    env = registry.make("metaworld", scene=scene, task="success")
    policy = _policy(scene)
    successes = 0
    for episode in range(episodes):
        env.seed(episode)
        timestep = env.reset()
        while not timestep.last():
            timestep = env.step(policy.get_action(timestep.observation["vector"]))
            if timestep.reward > 0:  # task="success": the success flag is the reward.
                assert timestep.observation["log_success"] == 1.0
                successes += 1
                break
    env.close()
    return successes / episodes


@pytest.mark.parametrize("scene", SCRIPTED_SCENES)
def test_scripted_policy_succeeds_through_the_wrapper(scene):
    assert success_rate(scene) >= 0.9


def test_rewards_observations_and_success_equal_the_raw_environment():
    env = registry.make("metaworld", scene="push", task="reward", seed=3)
    raw = mw.env_dict.ALL_V3_ENVIRONMENTS["push-v3"]()
    raw._set_task_called, raw._freeze_rand_vec, raw.seeded_rand_vec = True, False, True
    raw._partially_observable = False
    raw.__dict__.pop("sawyer_observation_space", None)  # Cached with the goal hidden.
    raw.seed(3)
    policy = _policy("push")
    timestep = env.reset()
    state, _ = raw.reset()
    np.testing.assert_allclose(timestep.observation["vector"], state, rtol=1e-6)
    for _ in range(120):
        action = np.clip(policy.get_action(state), -1, 1).astype(np.float32)
        timestep = env.step(action)
        state, reward, _, _, info = raw.step(action)
        np.testing.assert_allclose(timestep.observation["vector"], state, rtol=1e-6, atol=1e-6)
        assert timestep.reward == np.float32(reward)
        rewards = timestep.observation[base.TASK_REWARDS_KEY]
        assert rewards.tolist() == [np.float32(reward), float(info["success"])]


def test_episodes_are_500_steps_and_truncate():
    env = registry.make("metaworld", scene="reach", task="reward")
    timestep, steps = env.reset(), 0
    while not timestep.last():
        timestep = env.step(np.zeros(4, np.float32))
        steps += 1
    assert steps == metaworld.EPISODE_LENGTH and timestep.discount == 1.0
    assert env.step(np.zeros(4, np.float32)).first()


def test_seeded_goals_are_reproducible_and_differ_across_seeds():
    def goals(seed, **kwargs):
        env = registry.make("metaworld", scene="reach", seed=seed, **kwargs)
        return [env.reset().observation["vector"][-3:].copy() for _ in range(4)]

    np.testing.assert_array_equal(goals(1), goals(1))
    assert not np.array_equal(goals(1)[0], goals(2)[0])
    assert len({tuple(goal) for goal in goals(1)}) == 4  # A new goal each episode.


def test_ml1_train_and_test_goal_sets():
    train = registry.make("metaworld", scene="reach", goals="train", seed=0)
    test = registry.make("metaworld", scene="reach", goals="test", seed=0)
    train_goals = {tuple(train.reset().observation["vector"][-3:]) for _ in range(8)}
    test_goals = {tuple(test.reset().observation["vector"][-3:]) for _ in range(8)}
    assert len(train_goals) > 1 and not train_goals & test_goals
    hidden = registry.make("metaworld", scene="reach", goals="train", goal_observable=False)
    assert not hidden.reset().observation["vector"][-3:].any()  # ML: the goal is hidden.


def test_task_sets_match_metaworld():
    from metaworld import env_dict

    def names(classes):
        return tuple(name[: -len("-v3")] for name in classes)

    assert metaworld.SCENES == names(env_dict.ALL_V3_ENVIRONMENTS)
    sets = metaworld.TASK_SETS
    assert sets["ML10"]["train"] == names(env_dict.ML10_V3["train"])
    assert sets["ML10"]["test"] == names(env_dict.ML10_V3["test"])
    assert set(sets["ML45"]["train"]) == set(names(env_dict.ML45_V3["train"]))
    assert sets["ML45"]["test"] == names(env_dict.ML45_V3["test"])
    assert sets["MT10"]["train"] == names(env_dict.MT10_V3)
    assert set(sets["MT50"]["train"]) == set(names(env_dict.MT50_V3))


def test_scene_names_and_errors():
    assert metaworld.scene_id("reach") == metaworld.scene_id("reach-v3") == "reach-v3"
    with pytest.raises(base.ConfigurationError, match="Did you mean: pick-place"):
        registry.make("metaworld", scene="pick-plce")
    with pytest.raises(base.ConfigurationError, match="observation="):
        registry.make("metaworld", observation="rgb")
    with pytest.raises(wrappers.UnknownTaskError, match="reward, success"):
        registry.make("metaworld", task="reach")


def test_gymnasium_checker():
    check_env(
        wrappers.ToGymnasium(registry.make("metaworld", scene="reach")), skip_render_check=True
    )


@pytest.mark.slow
@pytest.mark.parametrize("scene", metaworld.SCENES)
def test_every_scene_meets_the_contract(scene):
    env = registry.make("metaworld", scene=scene, task="reward")
    rng = np.random.default_rng(0)
    timestep = env.reset()
    for _ in range(60):
        timestep = env.step(rng.uniform(-1, 1, 4).astype(np.float32))
        for key, spec in env.observation_spec().items():
            spec.validate(timestep.observation[key])
        assert 0.0 <= timestep.reward <= 10.0


@pytest.mark.slow
@pytest.mark.parametrize("scene", metaworld.TASK_SETS["MT10"]["train"])
def test_scripted_policies_on_mt10(scene):
    assert success_rate(scene) >= 0.8


# --- Saved state (`get_state` / `set_state`): a restored copy continues bit for bit. ---


def _actions(steps, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (steps, 4)).astype(np.float32)


@pytest.mark.parametrize(
    "kwargs, saved_after, then",
    [
        ({"scene": "pick-place"}, 60, 40),  # Mid-episode (contacts, frame stack, goal).
        ({"scene": "lever-pull"}, 500, 30),  # Right after the LAST step: a reset is next.
        ({"scene": "button-press"}, 480, 40),  # Across a reset (moved bodies, new goal).
        ({"scene": "reach", "goals": "train"}, 490, 20),  # ML1 goal set, hidden-goal flag.
        ({"scene": "reach", "goal_observable": False}, 30, 10),
        ({"scene": "push"}, 0, 30),  # Built and seeded, never reset.
        ({"scene": "basketball"}, 40, 20),  # Its goal is a view of a site's position.
    ],
    ids=[
        "mid-episode",
        "after-last",
        "across-reset",
        "goal-set",
        "goal-hidden",
        "before-reset",
        "attribute-views",
    ],
)
def test_restored_state_continues_bit_for_bit(kwargs, saved_after, then):
    def make(seed):
        return registry.make("metaworld", task="reward", seed=seed, **kwargs)

    actions = _actions(saved_after + then)
    expected, state, actual = state_checks.continue_from_state(make, actions, saved_after)
    state_checks.assert_identical(expected, actual)
    if saved_after in (500, 480):
        assert any(timestep[0] == 0 for timestep in expected)  # A reset was compared too.


def test_restored_state_continues_bit_for_bit_with_pixels():
    def make(seed):
        return registry.make("metaworld", scene="door-open", observation="both", seed=seed)

    expected, _, actual = state_checks.continue_from_state(make, _actions(30), 20)
    state_checks.assert_identical(expected, actual)


def test_state_is_small_and_continues_in_another_process():
    import pickle

    kwargs = {"scene": "pick-place", "task": "reward"}
    actions = _actions(50)
    expected, state, _ = state_checks.continue_from_state(
        lambda seed: registry.make("metaworld", seed=seed, **kwargs), actions, 30
    )
    assert len(pickle.dumps(state)) < 20_000  # No model, no images.
    actual = state_checks.continue_in_another_process("metaworld", kwargs, state, actions[30:])
    state_checks.assert_identical(expected, actual)


def test_a_state_restores_into_the_same_keywords_only():
    state = registry.make("metaworld", scene="reach").get_state()
    with pytest.raises(base.ConfigurationError, match="scene='reach-v3'"):
        registry.make("metaworld", scene="push").set_state(state)
    with pytest.raises(base.ConfigurationError, match="goal_observable=True"):
        registry.make("metaworld", scene="reach", goal_observable=False).set_state(state)
    with pytest.raises(base.ConfigurationError, match="not a saved Meta-World state"):
        registry.make("metaworld", scene="reach").set_state([1, 2])


@pytest.mark.slow  # ~30 s
@pytest.mark.parametrize("scene", metaworld.SCENES)
def test_every_scene_restores_bit_for_bit(scene):
    """Each scene keeps its own attributes and moves its own bodies: across a reset."""

    def make(seed):
        return registry.make("metaworld", scene=scene, task="reward", seed=seed)

    expected, _, actual = state_checks.continue_from_state(make, _actions(520), 490)
    state_checks.assert_identical(expected, actual)


@pytest.mark.slow  # ~10 s: two training processes.
def test_two_runs_give_identical_logs(tmp_path):
    arguments = (
        "--agent", "random", "--env", "metaworld", "--task", "reward", "--steps", "240",
        "--num-envs", "2", "--seed", "3",
        "--set", "env.kwargs={scene: pick-place, time_limit: 50}",
        "--set", "train.log_every=40", "--set", "train.eval_every=120",
        "--set", "train.eval_episodes=2", "--set", "train.checkpoint_every=120",
        "--set", "train.video=false",
    )  # fmt: skip
    state_checks.assert_two_runs_identical(tmp_path, *arguments)
