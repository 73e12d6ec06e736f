"""RoboDesk: every task's reward in one environment, equal to the raw `robodesk.RoboDesk`."""

import numpy as np
import pytest
import state_checks
from gymnasium.utils.env_checker import check_env

from mbxfer.envs import base, registry, robodesk, scoring, wrappers

raw_robodesk = pytest.importorskip("robodesk", reason="pip install 'mbxfer[robodesk]'")
STEPS = 25


def _actions(seed=0, steps=STEPS):
    return np.random.default_rng(seed).uniform(-1, 1, (steps, 5)).astype(np.float32)


def _raw_rewards(task, reward, seed, actions):
    """The raw library: one environment per task and reward type, rendering skipped."""
    raw = raw_robodesk.RoboDesk(task=task, reward=reward)
    raw.render = lambda *args, **kwargs: np.zeros((64, 64, 3), np.uint8)  # Not under test.
    np.random.seed(seed)
    raw.reset()
    return [raw.step(action)[1] for action in actions]


@pytest.mark.parametrize("reward", robodesk.REWARDS)
def test_every_task_reward_equals_the_raw_environment(reward):
    actions = _actions()
    env = registry.make("robodesk", observation="state", reward=reward, seed=5)
    env.reset()
    ours = np.stack([env.step(action).observation[base.TASK_REWARDS_KEY] for action in actions])
    tasks = robodesk.TASKS if reward == "dense" else robodesk.TASKS[:3]
    for task in tasks:
        expected = _raw_rewards(task, reward, 5, actions)
        np.testing.assert_allclose(
            ours[:, robodesk.TASKS.index(task)], expected, rtol=1e-5, atol=1e-6, err_msg=task
        )
    if reward == "dense":
        assert len(np.unique(ours[-1])) > 3  # Nine different reward functions.


def test_success_reward_is_given_once_and_sparse_every_step():
    env = registry.make("robodesk", observation="state", reward="success")
    env.reset()
    desk = env.unwrapped.raw
    # Open the slide by hand: its success condition then holds on every following step.
    desk.physics.named.data.qpos["slide_joint"] = 0.6
    rewards = [env.step(np.zeros(5, np.float32)) for _ in range(3)]
    index = robodesk.TASKS.index("open_slide")
    assert [t.observation[base.TASK_REWARDS_KEY][index] for t in rewards] == [1.0, 0.0, 0.0]
    assert all(t.observation[base.TASK_SUCCESS_KEY][index] == 1.0 for t in rewards)
    assert base.SUCCESS_KEY not in rewards[0].observation  # Reward-free: no task to score.


def test_success_is_the_selected_tasks_flag():
    """`log_success` is the selected task's flag, not the mean of all nine (#14 point 5)."""
    env = registry.make("robodesk", task="open_slide", observation="state", reward="success")
    assert env.observation_spec()[base.SUCCESS_KEY].shape == ()
    env.reset()
    env.unwrapped.raw.physics.named.data.qpos["slide_joint"] = 0.6
    timestep = env.step(np.zeros(5, np.float32))
    assert timestep.observation[base.SUCCESS_KEY] == 1.0
    assert timestep.observation[base.TASK_SUCCESS_KEY].sum() >= 1.0
    other = registry.make("robodesk", task="lift_ball", observation="state", reward="success")
    other.reset()
    other.unwrapped.raw.physics.named.data.qpos["slide_joint"] = 0.6
    assert other.step(np.zeros(5, np.float32)).observation[base.SUCCESS_KEY] == 0.0


def test_seeding_reproduces_resets_without_touching_global_random_state():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = registry.make("robodesk", observation="state", seed=4).reset().observation["vector"]
    again = registry.make("robodesk", observation="state", seed=4).reset().observation["vector"]
    other = registry.make("robodesk", observation="state", seed=9).reset().observation["vector"]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_episodes_are_500_steps_and_truncate():
    env = registry.make("robodesk", observation="state", episode_length=20)
    timestep, steps = env.reset(), 0
    while not timestep.last():
        timestep = env.step(np.zeros(5, np.float32))
        steps += 1
    assert steps == 20 and timestep.discount == 1.0
    assert registry.make("robodesk", observation="state").unwrapped.raw.episode_length == 500


def test_observations_and_errors():
    env = registry.make("robodesk", observation="both")
    spec = env.observation_spec()
    assert spec["image"].shape == (64, 64, 3) and spec["vector"].shape == (robodesk.STATE_SIZE,)
    assert spec[base.TASK_SUCCESS_KEY].shape == (len(robodesk.TASKS),)  # reward-free: no task
    with pytest.raises(base.ConfigurationError, match="reward="):
        registry.make("robodesk", reward="shaped")
    with pytest.raises(wrappers.UnknownTaskError, match="open_drawer"):
        registry.make("robodesk", task="open_drawr")


def test_gymnasium_checker():
    env = registry.make("robodesk", observation="state", task="open_drawer")
    check_env(wrappers.ToGymnasium(env), skip_render_check=True)


@pytest.mark.slow
@pytest.mark.parametrize("task", robodesk.TASKS)
def test_each_task_selects_its_reward(task):
    env = registry.make("robodesk", observation="state", task=task)
    env.reset()
    for action in _actions(1, 40):
        timestep = env.step(action)
        assert (
            timestep.reward
            == timestep.observation[base.TASK_REWARDS_KEY][robodesk.TASKS.index(task)]
        )


def test_runner_scores_the_selected_task():
    """The runner's episode summary scores the trained task's success, not the mean of all
    nine flags (it reported 1/9 for an episode that solved its task), and keeps every task's."""
    from mbxfer.benchmarks import episodes

    for task, expected in (("open_slide", 1.0), ("lift_ball", 0.0)):
        env = registry.make(
            "robodesk", task=task, observation="state", reward="success", time_limit=3
        )
        tracker, records = episodes.EpisodeTracker(1), []
        batched = lambda t: t._replace(  # noqa: E731
            step_type=np.array([t.step_type]),
            reward=np.array([t.reward or 0.0]),
            observation={k: np.asarray(v)[None] for k, v in t.observation.items()},
        )
        tracker.observe(batched(env.reset()))
        env.unwrapped.raw.physics.named.data.qpos["slide_joint"] = 0.6
        while not records:
            records = tracker.observe(batched(env.step(np.zeros(5, np.float32))))
        summary = scoring.summarize(records, registry.factory("robodesk", task=task), env.tasks)
        assert summary["success_rate"] == expected, task
        assert summary["task_success_rates"]["open_slide"] == 1.0


# --- Saved state (`get_state` / `set_state`): a restored copy continues bit for bit. ---


@pytest.mark.parametrize(
    "kwargs, saved_after, then",
    [
        ({"observation": "state"}, 20, 20),  # Mid-episode (IK copy, warm start, views).
        ({"observation": "state", "episode_length": 15}, 15, 20),  # After LAST: reset next.
        ({"observation": "state", "episode_length": 15}, 8, 25),  # Across two resets.
        ({"observation": "state", "reward": "success", "episode_length": 15}, 12, 10),
        ({"observation": "state", "reward": "sparse"}, 0, 15),  # Never reset.
    ],
    ids=["mid-episode", "after-last", "across-resets", "success-reward", "before-reset"],
)
def test_restored_state_continues_bit_for_bit(kwargs, saved_after, then):
    def make(seed):
        return registry.make("robodesk", seed=seed, **kwargs)

    actions = _actions(steps=saved_after + then)
    expected, _, actual = state_checks.continue_from_state(make, actions, saved_after)
    state_checks.assert_identical(expected, actual)
    if "episode_length" in kwargs:
        assert any(timestep[0] == 0 for timestep in expected)  # A reset was compared too.


def test_restored_state_continues_bit_for_bit_with_pixels():
    def make(seed):
        return registry.make("robodesk", observation="both", episode_length=12, seed=seed)

    expected, _, actual = state_checks.continue_from_state(make, _actions(steps=20), 8)
    state_checks.assert_identical(expected, actual)


def test_success_flags_and_reset_randomness_are_part_of_the_state():
    """The once-only success reward is not paid again after a restore, and the restored
    copy's resets draw from the saved random state, not its own seed's."""
    env = registry.make("robodesk", observation="state", reward="success", episode_length=4)
    env.reset()
    env.unwrapped.raw.physics.named.data.qpos["slide_joint"] = 0.6
    index = robodesk.TASKS.index("open_slide")
    assert env.step(np.zeros(5, np.float32)).observation[base.TASK_REWARDS_KEY][index] == 1.0
    copy = registry.make("robodesk", observation="state", reward="success", episode_length=4)
    copy.set_state(env.get_state())
    rewards = [copy.step(np.zeros(5, np.float32)) for _ in range(4)]
    assert [t.observation[base.TASK_REWARDS_KEY][index] for t in rewards[:3]] == [0.0] * 3
    assert rewards[-1].first()
    np.testing.assert_array_equal(
        rewards[-1].observation["vector"],
        [env.step(np.zeros(5, np.float32)) for _ in range(4)][-1].observation["vector"],
    )


def test_state_is_small_and_continues_in_another_process():
    import pickle

    kwargs = {"observation": "state", "episode_length": 20}
    actions = _actions(steps=30)
    expected, state, _ = state_checks.continue_from_state(
        lambda seed: registry.make("robodesk", seed=seed, **kwargs), actions, 12
    )
    assert len(pickle.dumps(state)) < 20_000  # No model, no images.
    actual = state_checks.continue_in_another_process("robodesk", kwargs, state, actions[12:])
    state_checks.assert_identical(expected, actual)


def test_a_state_restores_into_the_same_keywords_only():
    state = registry.make("robodesk", observation="state").get_state()
    with pytest.raises(base.ConfigurationError, match="episode_length=500"):
        registry.make("robodesk", observation="state", episode_length=20).set_state(state)
    with pytest.raises(base.ConfigurationError, match="not a saved RoboDesk state"):
        registry.make("robodesk", observation="state").set_state(None)


@pytest.mark.slow  # ~15 s: RoboDesk's own 120x120 render, crop and resize each step.
def test_restored_state_continues_bit_for_bit_with_faithful_pixels():
    def make(seed):
        return registry.make(
            "robodesk", observation="image", render="faithful", episode_length=6, seed=seed
        )

    expected, _, actual = state_checks.continue_from_state(make, _actions(steps=10), 4)
    state_checks.assert_identical(expected, actual)


@pytest.mark.slow  # ~10 s: two training processes.
def test_two_runs_give_identical_logs(tmp_path):
    arguments = (
        "--agent", "random", "--env", "robodesk", "--task", "open_drawer", "--steps", "160",
        "--num-envs", "2", "--seed", "3",
        "--set", "env.kwargs={observation: state, episode_length: 30}",
        "--set", "train.log_every=40", "--set", "train.eval_every=80",
        "--set", "train.eval_episodes=2", "--set", "train.checkpoint_every=80",
        "--set", "train.video=false",
    )  # fmt: skip
    state_checks.assert_two_runs_identical(tmp_path, *arguments)
