"""Procgen on envpool: native batching, level splits, timeouts, normalized returns."""

import dm_env
import numpy as np
import pytest
import state_checks
from gymnasium.utils.env_checker import check_env

from mbxfer.envs import base, optional, procgen, registry, vector, wrappers

pytest.importorskip("envpool", reason="pip install 'mbxfer[procgen]'")


def _run(envs, steps, seed=0):
    rng = np.random.default_rng(seed)
    timesteps = [envs.reset()]
    for _ in range(steps):
        timesteps.append(envs.step(rng.integers(procgen.NUM_ACTIONS, size=envs.num_envs)))
    return timesteps


def test_vector_make_batches_natively_and_reproducibly():
    recipe = registry.factory("procgen", game="coinrun", num_levels=50)
    with vector.make(recipe, 3, seed=7) as native:
        assert isinstance(native, procgen.ProcgenBatch) and native.worker_pids() == []
        assert native.tasks == procgen.TASKS
        assert native.observation_spec()["image"].shape == (64, 64, 3)
        expected = _run(native, 30)
        native.seed(7)  # Reseeding replays the batch.
        got = _run(native, 30)
    with vector.make(recipe, 3, seed=8) as other:
        assert not all(
            np.array_equal(a.observation["image"], b.observation["image"])
            for a, b in zip(expected, _run(other, 30))
        )
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a.step_type, b.step_type)
        np.testing.assert_array_equal(a.reward, b.reward)
        np.testing.assert_array_equal(a.discount, b.discount)
        for key in a.observation:
            np.testing.assert_array_equal(a.observation[key], b.observation[key], err_msg=key)


def test_keywords_that_need_wrappers_fall_back_to_copies():
    recipe = registry.factory("procgen", game="coinrun", time_limit=5)
    with vector.make(recipe, 2, mode="inline") as envs:
        assert isinstance(envs, vector.VectorEnv)
        types = [envs.step(np.zeros(2, int)).step_type.tolist() for _ in range(7)]
        assert types[0] == [0, 0] and types[5] == [2, 2] and types[6] == [0, 0]


def test_train_and_test_splits_have_disjoint_level_ids():
    train_kwargs = procgen.level_split("train", num_levels=20, start_level=5)
    test_kwargs = procgen.level_split("test", num_levels=20, start_level=5)
    seen = {}
    for split, kwargs in (("train", train_kwargs), ("test", test_kwargs)):
        recipe = registry.factory("procgen", game="maze", task="reward", **kwargs)
        with vector.make(recipe, 8, seed=1) as envs:
            ids = np.concatenate([t.observation["log_level_id"] for t in _run(envs, 600)])
        seen[split] = set(ids.tolist())
    assert seen["train"] <= set(range(5, 25)) and len(seen["train"]) > 5
    assert min(seen["test"]) >= 25 and len(seen["test"]) > 5
    assert not seen["train"] & seen["test"]


def test_levels_complete_terminate_and_timeouts_truncate():
    with procgen.ProcgenBatch(8, game="maze", num_levels=10, seed=0, task="reward") as envs:
        timesteps = _run(envs, 520)
    last = np.stack([t.step_type for t in timesteps]) == dm_env.StepType.LAST
    discount = np.stack([t.discount for t in timesteps])
    success = np.stack([t.observation["log_success"] for t in timesteps])
    reward = np.stack([t.reward for t in timesteps])
    rewards = np.stack([t.observation[base.TASK_REWARDS_KEY] for t in timesteps])
    assert last.any()
    np.testing.assert_array_equal(discount[last], np.where(success[last] > 0, 0.0, 1.0))
    assert (success[last] > 0).any(), "a random agent solves some easy mazes in 500 steps"
    assert (reward[last & (success > 0)] == 10.0).all()
    np.testing.assert_array_equal(rewards[..., 0], reward)
    np.testing.assert_array_equal(rewards[..., 1], success)
    # Episodes that did not complete their level ran into the 500-step timeout.
    assert (discount[~last] == 1.0).all()


def test_single_environment_is_a_batch_of_one_and_passes_gymnasium_checker():
    env = registry.make("procgen", game="starpilot", distribution_mode="hard", num_levels=3)
    timestep = env.reset()
    assert timestep.first() and timestep.observation["image"].dtype == np.uint8
    assert timestep.observation["log_level_id"] in (0, 1, 2)
    check_env(wrappers.ToGymnasium(env), skip_render_check=True)


def test_bad_keywords_name_the_fix():
    with pytest.raises(base.ConfigurationError, match="Did you mean: coinrun"):
        registry.make("procgen", game="coinrunn")
    with pytest.raises(base.ConfigurationError, match="no distribution_mode='memory'"):
        registry.make("procgen", game="bigfish", distribution_mode="memory")
    with pytest.raises(base.ConfigurationError, match="'train' or 'test'"):
        procgen.level_split("validation")
    with pytest.raises(wrappers.UnknownTaskError):
        vector.make(registry.factory("procgen", task="score"), 2)


def test_normalized_return_constants():
    for mode in ("easy", "hard"):
        assert set(procgen.NORMALIZATION[mode]) == set(procgen.GAMES)
        for game, (low, high) in procgen.NORMALIZATION[mode].items():
            assert low < high
            assert procgen.normalized_return(game, mode, [low, high]).tolist() == [0.0, 1.0]
    assert procgen.NORMALIZATION["hard"]["starpilot"] == (1.5, 35.0)
    assert procgen.normalized_return("coinrun", "easy", 7.5) == pytest.approx(0.5)
    with pytest.raises(base.ConfigurationError):
        procgen.normalized_return("coinrun", "memory", 1.0)


def test_missing_dependency_names_the_extra():
    with pytest.raises(registry.MissingDependencyError, match=r"pip install 'mbxfer\[procgen\]'"):
        optional.require("envpool_not_installed_here", "procgen", "procgen")


@pytest.mark.slow
@pytest.mark.parametrize("game", procgen.GAMES)
@pytest.mark.parametrize("mode", ["easy", "hard"])
def test_every_game_runs(game, mode):
    env = registry.make("procgen", game=game, distribution_mode=mode, task="reward")
    rng = np.random.default_rng(0)
    timestep = env.reset()
    for _ in range(200):
        timestep = env.step(rng.integers(procgen.NUM_ACTIONS))
        for key, spec in env.observation_spec().items():
            spec.validate(timestep.observation[key])
    env.close()


def test_a_procgen_trial_is_reproducible_and_its_checkpoints_reseed_exactly(tmp_path):
    """envpool cannot save its games: checkpoints reseed them (done.json says so), and a trial
    stopped after a checkpoint and resumed writes the logs of two uninterrupted ones."""
    from mbxfer.benchmarks import config as config_lib
    from mbxfer.benchmarks import runner

    overrides = [
        "agent=random", "env.name=procgen", "env.task=reward", "env.num_envs=4",
        "env.kwargs={game: coinrun, num_levels: 20}", "train.steps=400",
        "train.eval_every=0", "train.checkpoint_every=100",
    ]  # fmt: skip
    config = config_lib.build(config_lib.parse_overrides(overrides))

    first = runner.run(config, tmp_path / "first", progress=False)
    assert runner.run(config, tmp_path / "second", progress=False) == first
    assert runner.run(config, tmp_path / "resumed", progress=False, stop_after=200) == {
        "stopped_at": 200
    }
    assert runner.run(config, tmp_path / "resumed", progress=False) == first
    assert first["phases"][0]["checkpoints"].startswith("reset environments (envpool")
    assert state_checks.logs(tmp_path / "second") == state_checks.logs(tmp_path / "first")
    assert state_checks.logs(tmp_path / "resumed") == state_checks.logs(tmp_path / "first")
