"""Mixtures of environments in one batch (`envs.mixture`): members, weights, specs, state, scores."""

import numpy as np
import pytest
import state_checks

from mbxfer.envs import base, mixture, registry, scoring, vector

GRID_MEMBERS = [{"num_items": 1, "name": "one"}, {"num_items": 3, "name": "three"}]


def _scripted_success(env, episodes: int) -> dict:
    """Meta-World's scripted policy of each episode's member, through a `Mixture`:
    successes and episodes per member."""
    from metaworld.policies import ENV_POLICY_MAP

    from mbxfer.envs import metaworld

    policies = {name: ENV_POLICY_MAP[metaworld.scene_id(name)]() for name in env.names}
    played: dict = {}
    for _ in range(episodes):
        timestep = env.reset()
        name = env.names[int(timestep.observation[mixture.MEMBER_KEY])]
        policy, success = policies[name], 0
        while not timestep.last():
            timestep = env.step(policy.get_action(timestep.observation["vector"]))
            if timestep.observation["log_success"] > 0:
                success = 1
                break
        wins, count = played.get(name, (0, 0))
        played[name] = (wins + success, count + 1)
    return played


def _grid(**more):
    return registry.factory("grid", members=GRID_MEMBERS, task="collect_items", length=10, **more)


def test_copies_cycle_through_members_from_their_seed():
    with vector.make(_grid(), 4, mode="inline", seed=0) as envs:
        assert envs.observation_spec()[mixture.MEMBER_KEY].dtype == np.int32
        members = [envs.reset().observation[mixture.MEMBER_KEY].tolist()]
        for _ in range(11):  # Episodes of 10 steps: the 11th step starts the next episode.
            timestep = envs.step(np.zeros(4, np.int64))
        members.append(timestep.observation[mixture.MEMBER_KEY].tolist())
    assert members == [[0, 1, 0, 1], [0, 1, 0, 1]]  # Stride 4 over 2 members.


def test_a_batch_plays_the_members_in_order_round_after_round():
    members = [{"num_items": n} for n in range(5)]
    recipe = registry.factory("grid", members=members, length=3)
    with vector.make(recipe, 3, mode="inline", seed=7) as envs:
        played = envs.reset().observation[mixture.MEMBER_KEY].tolist()
        for _ in range(8):
            timestep = envs.step(np.zeros(3, np.int64))
            if (timestep.step_type == 0).all():
                played += timestep.observation[mixture.MEMBER_KEY].tolist()
    assert played == [(7 + j) % 5 for j in range(9)]


def test_members_differ_in_their_keywords():
    env = registry.make("grid", members=GRID_MEMBERS, task="collect_items", seed=0)
    items = [env.member_env(i).unwrapped._num_items for i in range(2)]
    assert env.names == ("one", "three") and items == [1, 3]
    env.close()


def test_weights_pick_members_by_weight():
    env = registry.make("grid", members=GRID_MEMBERS, member_weights={"three": 1.0}, seed=3)
    assert {int(env.reset().observation[mixture.MEMBER_KEY]) for _ in range(5)} == {1}
    env = registry.make("grid", members=GRID_MEMBERS, member_weights=[3, 1], seed=3)
    drawn = [int(env.reset().observation[mixture.MEMBER_KEY]) for _ in range(400)]
    assert 0.65 < drawn.count(0) / 400 < 0.85


@pytest.mark.parametrize(
    "members, weights, message",
    [
        (GRID_MEMBERS, [1.0], "list of 2 weights"),
        (GRID_MEMBERS, {"tree": 1.0}, "did you mean 'three'"),
        (GRID_MEMBERS, [0, 0], "not all 0"),
        ([{"num_items": 1}, {"num_items": 1}], None, "more than once"),
        ("ML10/train", None, "declares no member set|has no member set"),
        (["a", "b"], None, "declares no member keyword"),
        ([], None, "non-empty list"),
    ],
)
def test_bad_members_or_weights_are_refused_with_the_fix(members, weights, message):
    with pytest.raises(base.ConfigurationError, match=message):
        registry.factory("grid", members=members, member_weights=weights)


def test_weights_without_members_are_refused():
    with pytest.raises(base.ConfigurationError, match="set members too"):
        registry.factory("grid", member_weights=[1, 2])


def test_a_member_keyword_value_is_checked_before_building():
    with pytest.raises(base.ConfigurationError, match="member 'bad'.*size"):
        registry.factory("grid", members=[{"size": 5}, {"size": 1, "name": "bad"}])


@pytest.mark.parametrize(
    "members, differs",
    [
        ([{"size": 3}, {"size": 5}], r"'size=3' and 'size=5'.*observation 'vector'"),
        ([{"name": "grid"}, {"env": "point_mass", "name": "point"}], r"'grid' and 'point'.*action"),
    ],
)
def test_members_with_different_specs_are_refused_naming_them(members, differs):
    with pytest.raises(mixture.MixtureError, match=differs):
        registry.make("grid", members=members)


def test_state_continues_mid_episode_and_across_member_changes():
    actions = state_checks.random_actions(registry.make("grid").action_spec(), 60)
    make = lambda seed: registry.make(  # noqa: E731
        "grid", members=GRID_MEMBERS, member_weights=[1, 2], task="collect_items", length=7,
        seed=seed,
    )  # fmt: skip
    for saved_after in (3, 7, 25):
        expected, state, actual = state_checks.continue_from_state(make, actions, saved_after)
        state_checks.assert_identical(expected, actual)
    assert state["current"] is not None


def test_state_of_a_batch_restores_in_the_other_mode():
    actions = [np.arange(3) % 5] * 30
    with vector.make(_grid(), 3, mode="inline", seed=1) as original:
        for action in actions[:13]:
            original.step(action)
        with vector.make(_grid(), 3, mode="process", seed=9) as restored:
            state_checks.assert_same_future(original, restored, actions)


def test_scores_are_grouped_by_member_and_averaged_over_members():
    recipe = registry.factory("metaworld", members=["reach", "push"], task="reward")
    records = [
        {"return": 1.0, "length": 5, "log_success": 1.0, "log_member": 0},
        {"return": 3.0, "length": 5, "log_success": 0.0, "log_member": 1},
        {"return": 5.0, "length": 5, "log_success": 0.0, "log_member": 1},
        {"return": 7.0, "length": 5, "log_success": 1.0, "log_member": 1},
    ]
    summary = scoring.summarize(records, recipe)
    assert summary["members"]["reach"]["success_rate"] == 1.0
    assert summary["members"]["push"]["episodes"] == 3
    assert summary["success_rate"] == pytest.approx((1.0 + 1 / 3) / 2)  # Each member once.
    assert summary["return_mean"] == 4.0  # Pooled.


def test_metaworld_sets_resolve_to_scenes():
    from mbxfer.envs import metaworld

    members = mixture.resolve("metaworld", "ML10/test")
    assert [m.name for m in members] == list(metaworld.TASK_SETS["ML10"]["test"])
    assert len(mixture.resolve("metaworld", "ML45/train")) == 45
    assert [m.overrides for m in mixture.resolve("metaworld", "metaworld:reach,push-v3")] == [
        {"scene": "reach"},
        {"scene": "push-v3"},
    ]
    with pytest.raises(mixture.MixtureError, match="Did you mean: ML10/train"):
        registry.factory("metaworld", members="ML10/trian")


@pytest.mark.parametrize(
    "num_envs, weights, counts",
    [(4, None, [2, 2]), (5, None, [3, 2]), (8, [3, 1], [6, 2]), (3, [1, 0], [3, 0])],
)
def test_slots_of_natively_batched_members(num_envs, weights, counts):
    normalized = None if weights is None else np.asarray(weights) / np.sum(weights)
    assert mixture.slot_counts(num_envs, normalized, 2) == counts


def test_too_few_slots_for_natively_batched_members_is_refused():
    with pytest.raises(mixture.MixtureError, match="num_envs >= 3"):
        mixture.slot_counts(2, None, 3)


# -- the environment contract (envs/base.py) through a mixture ----------------------------------------
MIXED = {
    "grid": {"members": GRID_MEMBERS, "length": 9},
    "point_mass": {"members": [{"length": 5}, {"length": 9}], "member_weights": [1, 3]},
}


@pytest.mark.parametrize("name", sorted(MIXED))
def test_a_mixture_meets_the_environment_contract(name):
    from test_conformance import _check_observation, _random_action

    env = registry.make(name, task=None, **MIXED[name])
    rng = np.random.default_rng(0)
    timestep, previous = env.reset(), None
    _check_observation(env, timestep.observation)
    for _ in range(60):
        previous, timestep = timestep, env.step(_random_action(env.action_spec(), rng))
        _check_observation(env, timestep.observation)
        assert timestep.first() if previous.last() else (timestep.mid() or timestep.last())
        if not timestep.first():
            assert timestep.reward == 0.0 and timestep.discount in (0.0, 1.0)


def _mixin_case(name):
    import unittest

    from dm_env import test_utils
    from test_conformance import _random_action

    class Conformance(test_utils.EnvironmentTestMixin, unittest.TestCase):
        def make_object_under_test(self):
            return registry.make(name, **MIXED[name])

        def make_action_sequence(self):
            rng = np.random.default_rng(0)
            for _ in range(50):
                yield _random_action(self.environment.action_spec(), rng)

    Conformance.__name__ = Conformance.__qualname__ = f"TestDmEnvMixinMixture_{name}"
    return Conformance


for _name in MIXED:
    globals()[f"TestDmEnvMixinMixture_{_name}"] = _mixin_case(_name)


# -- Meta-World: the scripted policies through the mixture --------------------------------------
def test_scripted_policies_succeed_through_the_mixture_on_ml10_train():
    pytest.importorskip("metaworld", reason="pip install 'mbxfer[metaworld]'")
    env = registry.make("metaworld", members="ML10/train", task="success", seed=0)
    played = _scripted_success(env, 50)  # Cycled: 5 episodes per scene.
    env.close()
    assert sorted(played) == sorted(env.names) and all(n == 5 for _, n in played.values())
    assert sum(wins for wins, _ in played.values()) / 50 >= 0.9, played


@pytest.mark.slow
def test_scripted_policies_succeed_through_the_mixture_on_ml45_train():
    pytest.importorskip("metaworld", reason="pip install 'mbxfer[metaworld]'")
    env = registry.make("metaworld", members="ML45/train", task="success", seed=0)
    played = _scripted_success(env, 45 * 4)
    env.close()
    assert sum(wins for wins, _ in played.values()) / (45 * 4) >= 0.9, played


# -- Procgen: one envpool per game ----------------------------------------------------------------
def test_procgen_games_share_a_batch_on_one_pool_each():
    pytest.importorskip("envpool", reason="pip install 'mbxfer[procgen]'")
    recipe = registry.factory(
        "procgen", members="procgen:coinrun,starpilot", task="reward", num_levels=10
    )
    with vector.make(recipe, 4, seed=0) as envs:
        assert isinstance(envs, mixture.MixtureBatch)
        timestep = envs.reset()
        assert timestep.observation[mixture.MEMBER_KEY].tolist() == [0, 0, 1, 1]
        assert timestep.observation["image"].shape == (4, 64, 64, 3)
        timestep = envs.step(np.zeros(4, np.int32))
        assert timestep.step_type.shape == (4,)
        with pytest.raises(base.StateNotSupported):
            envs.get_state()
    records = [
        {"return": 10.0, "length": 9, "log_success": 1.0, "log_member": 0, "log_level_id": 1},
        {"return": 64.0, "length": 9, "log_success": 0.0, "log_member": 1, "log_level_id": 2},
    ]
    summary = scoring.summarize(records, recipe)
    assert summary["members"]["coinrun"]["normalized_return"] == pytest.approx(1.0)
    assert summary["members"]["starpilot"]["normalized_return"] == pytest.approx(1.0)
    assert summary["normalized_return"] == pytest.approx(1.0)


# -- protocols over sets --------------------------------------------------------------------------
def test_task_generalization_over_a_named_set_evaluates_and_finetunes_on_its_held_out_side():
    from mbxfer.benchmarks import config as config_lib
    from mbxfer.benchmarks import protocols

    config = config_lib.TrialConfig(
        agent="random",
        env=config_lib.EnvConfig(name="metaworld", task="reward"),
        protocol=protocols.ProtocolConfig(
            name="task_generalization", train_kwargs={"members": "ML10/train"}
        ),
    )
    train, finetune = protocols.phases(config)
    assert train.env_kwargs == {"members": "ML10/train"}
    assert train.eval_sets["test"].kwargs == {"members": "ML10/test"}
    assert finetune.env_kwargs == {"members": "ML10/test"}


def test_generalization_gap_reports_members_on_both_sides():
    from mbxfer.benchmarks import transfer

    def split(score, members):
        return {"normalized_return": score, "members": members}

    same = transfer.generalization_gap(
        {
            "train": split(0.5, {"coinrun": {"normalized_return": 0.6}}),
            "test": split(0.2, {"coinrun": {"normalized_return": 0.1}}),
        },
        "normalized_return",
    )
    assert same["gap"] == pytest.approx(0.3)
    assert same["members"]["coinrun"]["gap"] == pytest.approx(0.5)
    different = transfer.generalization_gap(
        {
            "train": split(1.0, {"reach": {"normalized_return": 1.0}}),
            "test": split(0.0, {"lever-pull": {"normalized_return": 0.0}}),
        },
        "normalized_return",
    )
    assert different["train_members"] == {"reach": 1.0}
    assert different["test_members"] == {"lever-pull": 0.0}
    assert "members" not in different


def test_evaluation_counts_each_environment_its_share_so_short_members_do_not_crowd_out():
    from mbxfer.benchmarks import episodes

    recipe = registry.factory("grid", members=[{"length": 3}, {"length": 20}])
    with vector.make(recipe, 2, mode="inline", seed=0) as envs:
        policy = episodes.RandomPolicy(envs.action_spec(), seed=0)
        records = episodes.play(envs, policy, 6)
    assert sorted(r[mixture.MEMBER_KEY] for r in records) == [0, 0, 0, 1, 1, 1]


# -- the report: sets, members, heatmap -----------------------------------------------------------
def _procgen_trial(root, seed, train_scores, test_scores):
    """A finished procedural_generalization trial folder over two games, as the runner writes."""
    import json

    import yaml

    from mbxfer.benchmarks import config as config_lib
    from mbxfer.benchmarks import transfer

    folder = root / f"trial{seed}"
    folder.mkdir()
    config = {
        "agent": {"name": "random"},
        "seed": seed,
        "env": {"name": "procgen", "task": "reward", "num_envs": 4, "workers": False,
                "kwargs": {"members": "coinrun,starpilot"}},
        "train": {"steps": 200, "eval_modes": ["sampled"]},
        "protocol": {"name": "procedural_generalization",
                     "train_kwargs": {"num_levels": 200},
                     "test_kwargs": {"start_level": 200, "num_levels": 1000}},
    }  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    finals = {}
    for eval_set, scores in (("train", train_scores), ("test", test_scores)):
        members = {game: {"episodes": 2, "normalized_return": v} for game, v in scores.items()}
        finals[eval_set] = {
            "phase": "train", "phase_index": 0, "eval_set": eval_set, "mode": "sampled",
            "env_steps": 200, "total_env_steps": 200, "episodes": 4, "return_mean": 1.0,
            "normalized_return": float(np.mean(list(scores.values()))), "members": members,
        }  # fmt: skip
    lines = [json.dumps(record) for record in finals.values()]
    (folder / "eval.jsonl").write_text("\n".join(lines) + "\n")
    done = {
        "env_steps": 200,
        "updates": 0,
        "episodes": 4,
        "trial_id": config_lib.trial_id_of(config),
        "phases": [{"name": "train", "index": 0, "env_steps": 200, "final_eval": finals}],
        "generalization_gap": transfer.generalization_gap(finals, "normalized_return"),
    }
    (folder / "done.json").write_text(json.dumps(done))


def _two_seeds(root):
    _procgen_trial(root, 0, {"coinrun": 0.6, "starpilot": 0.2}, {"coinrun": 0.2, "starpilot": 0.1})
    _procgen_trial(root, 1, {"coinrun": 0.8, "starpilot": 0.4}, {"coinrun": 0.4, "starpilot": 0.1})


def test_member_table_groups_by_set_and_member_and_draws_a_heatmap(tmp_path):
    from mbxfer.benchmarks import plots, report
    from mbxfer.benchmarks.results import load_trials

    _two_seeds(tmp_path)
    trials = load_trials(tmp_path)
    rows = report.member_table(trials)[("procgen", "reward")]
    train = "procedural_generalization / random · train (coinrun,starpilot)"
    assert rows[train] == pytest.approx({"coinrun": 0.7, "starpilot": 0.3})
    figure = plots.plot_member_heatmap("procgen / reward", rows, "normalized_return")
    image = figure.axes[0].images[0].get_array()
    assert image.shape == (2, 2) and image[0, 0] == pytest.approx(0.7)


@pytest.mark.slow
def test_report_shows_sets_members_gaps_and_the_heatmap(tmp_path):
    import csv

    from mbxfer.benchmarks import report
    from mbxfer.benchmarks.results import load_trials

    _two_seeds(tmp_path)
    gaps = {r["member"]: r for r in report.gap_table(load_trials(tmp_path), reps=200, seed=0)}
    assert gaps["coinrun"]["gap"] == pytest.approx(0.4) and gaps["all"]["seeds"] == 2
    assert gaps["all"]["gap"] == pytest.approx(np.mean([0.25, 0.35]))
    assert gaps["all"]["gap_low"] <= gaps["all"]["gap"] <= gaps["all"]["gap_high"]
    text = report.write(tmp_path, reps=200, curve_reps=50, formats="png").read_text()
    assert "## Sets and members" in text and "plots/members_procgen_reward.png" in text
    assert (tmp_path / "plots" / "members_procgen_reward.png").stat().st_size > 1000
    with open(tmp_path / "generalization.csv") as file:
        assert {r["member"] for r in csv.DictReader(file)} == {"all", "coinrun", "starpilot"}
    with open(tmp_path / "members.csv") as file:
        assert len(list(csv.DictReader(file))) == 4


# -- presets --------------------------------------------------------------------------------------
PRESETS = ("anand2022_metaworld", "anand2022_procgen", "walker2023_robodesk")


def _dry_run(preset, tmp_path, *scale):
    from mbxfer.benchmarks import cli

    path = state_checks.ROOT / "benchmarks" / "configs" / f"{preset}.yaml"
    arguments = ["sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run", *scale]
    assert cli.main(arguments) == 0


@pytest.mark.parametrize("preset", PRESETS)
def test_generalization_presets_dry_run(preset, tmp_path):
    _dry_run(preset, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_generalization_presets_dry_run_at_paper_scale(preset, tmp_path):
    _dry_run(preset, tmp_path, "--scale", "paper")


def test_robodesk_preset_finetunes_every_task_from_one_pretraining_per_agent():
    from mbxfer.benchmarks import sweep, sweep_spec

    path = state_checks.ROOT / "benchmarks" / "configs" / "walker2023_robodesk.yaml"
    plan = sweep_spec.expand(sweep_spec.load_spec(path))
    finetuned = [t for t in plan.trials if t.config.protocol.name == "custom"]
    starts = sweep.shared_starts(plan.trials)
    leaders = {starts.get(t.trial_id, (t.trial_id, 0))[0] for t in finetuned}
    assert len(finetuned) == 4 * 9 and len(leaders) == 4  # One pretraining per agent (1 seed).
    assert {t.config.env.task for t in finetuned} == set(registry.describe("robodesk").tasks)
