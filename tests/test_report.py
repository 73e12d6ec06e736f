"""Reports: rliable statistics on synthetic trial folders with known values, plots, merging."""

import csv
import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image
from rliable import library, metrics

from mbxfer.benchmarks import cli, plots, report, stats
from mbxfer.benchmarks import config as config_lib
from mbxfer.benchmarks.results import load_trials
from mbxfer.envs import registry

REPS = 300
DREAMER = [1.0, 2.0, 3.0, 4.0, 10.0]
PPO = [0.0, 1.0, 1.0, 2.0, 3.0]
FINETUNED = [3.0, 4.0, 6.0]
CRAFTER = [2.0, 3.5, 5.0]
CRAFTER_TRAINING = [1.0, 1.5, 4.0]  # Scores of the training episodes (the Crafter paper's).


def _trial(root, name, agent, env, task, seed, finals, protocol="scratch", **extra):
    """A trial folder as the runner writes it; `finals` are the last scores per phase."""
    folder = root / name
    folder.mkdir(parents=True)
    config = {
        "agent": agent,
        "seed": seed,
        "env": {"name": env, "task": task, "num_envs": 2, "workers": False, "kwargs": {}},
        "train": {"steps": 200},
        "protocol": {"name": protocol},
        "agent_config": {},
    }
    config_lib.merge(config, extra.get("config", {}))
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    score_key = registry.score_key(env)
    phases = extra.get("phases", ["train"])
    lines = []
    for index, (phase, final) in enumerate(zip(phases, finals)):
        for steps, value in ((100, final / 2), (200, final)):
            record = {
                "env_steps": steps,
                "total_env_steps": 200 * index + steps,
                "phase": phase,
                "phase_index": index,
                "eval_set": "eval",
                "episodes": 2,
                "return_mean": value,
                "length_mean": 50.0,
                score_key: value,
            }
            if "success_rates" in extra:
                record["success_rates"] = extra["success_rates"]
            if extra.get("legacy"):  # Written before phases existed.
                for key in ("phase", "phase_index", "eval_set", "total_env_steps"):
                    record.pop(key)
            lines.append(json.dumps(record))
    (folder / "eval.jsonl").write_text("\n".join(lines) + "\n")
    if extra.get("done", True):
        done = {
            "env_steps": 200 * len(phases),
            "updates": 0,
            "episodes": 0,
            "trial_id": config_lib.trial_id_of(config),
            "phases": [
                {"name": name, "index": i, "env_steps": 200} for i, name in enumerate(phases)
            ],
        }
        if "training_score" in extra:  # The runner's summary of the last phase's episodes.
            summary = {"episodes": 7, "crafter_score": extra["training_score"]}
            done["phases"] = [
                {"name": name, "index": i, "env_steps": 200, "training_episodes": summary}
                for i, name in enumerate(phases)
            ]
        (folder / "done.json").write_text(json.dumps(done))
    if extra.get("video"):
        Image.new("RGB", (8, 8)).save(folder / "video.gif")
    return folder


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    for seed, score in enumerate(DREAMER):
        _trial(root, f"d{seed}", "dreamer", "grid", "collect_items", seed, [score])
    for seed, score in enumerate(PPO):  # Legacy eval lines: no phase or eval set keys.
        _trial(root, f"p{seed}", "ppo", "grid", "collect_items", seed, [score], legacy=True)
    for seed, score in enumerate(FINETUNED):
        _trial(
            root,
            f"f{seed}",
            "dreamer",
            "grid",
            "collect_items",
            seed,
            [0.5, score],
            protocol="pretrain_finetune",
            phases=["pretrain", "finetune"],
        )
    rates = {"collect_wood": 90.0, "place_table": 40.0, "eat_cow": 10.0}  # percent, as Crafter
    for seed, score in enumerate(CRAFTER):
        _trial(
            root,
            f"machine_a/c{seed}",
            "dreamer",
            "crafter",
            "reward",
            seed,
            [score],
            success_rates=rates,
            video=seed == 0,
            training_score=CRAFTER_TRAINING[seed],
        )
    _trial(root, "unfinished", "muzero", "grid", "collect_items", 0, [1.0], done=False)
    return root


@pytest.fixture(scope="module")
def written(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    path = report.write(results, out, command="mbxfer report results", reps=REPS, curve_reps=50)
    return out, path.read_text()


def _rows(path):
    with open(path) as file:
        return list(csv.DictReader(file))


def _rliable(scores, aggregate):
    np.random.seed(0)  # rliable resamples with numpy's global RNG.
    points, intervals = library.get_interval_estimates(
        {"x": np.array(scores)[:, None]}, lambda x: np.array([aggregate(x)]), reps=REPS
    )
    return [points["x"][0], intervals["x"][0, 0], intervals["x"][1, 0]]


@pytest.mark.parametrize(
    "protocol, agent, scores",
    [
        ("scratch", "dreamer", DREAMER),
        ("scratch", "ppo", PPO),
        ("pretrain_finetune", "dreamer", FINETUNED),
    ],
)
def test_iqm_and_mean_with_cis_are_rliables(written, protocol, agent, scores):
    out, _ = written
    (row,) = [
        r
        for r in _rows(out / "scores.csv")
        if (r["env"], r["protocol"], r["agent"]) == ("grid", protocol, agent)
    ]
    assert int(row["seeds"]) == len(scores)
    iqm = [float(row[k]) for k in ("iqm", "iqm_low", "iqm_high")]
    mean = [float(row[k]) for k in ("mean", "mean_low", "mean_high")]
    np.testing.assert_allclose(iqm, _rliable(scores, metrics.aggregate_iqm))
    np.testing.assert_allclose(mean, _rliable(scores, metrics.aggregate_mean))
    assert iqm[1] <= iqm[0] <= iqm[2]


def test_crafter_is_also_scored_by_its_training_episodes(written):
    out, text = written
    rows = {r["eval_set"]: r for r in _rows(out / "scores.csv") if r["env"] == "crafter"}
    assert set(rows) == {"eval", "training episodes"}
    for eval_set, scores in (("eval", CRAFTER), ("training episodes", CRAFTER_TRAINING)):
        iqm = [float(rows[eval_set][k]) for k in ("iqm", "iqm_low", "iqm_high")]
        np.testing.assert_allclose(iqm, _rliable(scores, metrics.aggregate_iqm))
    assert "eval set `training episodes`" in text
    # Only Crafter: the other environments are scored by their evaluation episodes alone.
    assert {r["eval_set"] for r in _rows(out / "scores.csv") if r["env"] == "grid"} == {"eval"}


def test_probability_of_improvement_pairs(written):
    out, text = written
    rows = {(r["x"], r["y"]): r for r in _rows(out / "improvement.csv")}
    assert set(rows) == {("dreamer", "ppo"), ("pretrain_finetune / dreamer", "dreamer")}
    expected = metrics.probability_of_improvement(
        np.array(DREAMER)[:, None], np.array(PPO)[:, None]
    )
    assert float(rows[("dreamer", "ppo")]["probability"]) == pytest.approx(expected)
    assert "## Probability of improvement" in text


def test_report_tables_budgets_and_provenance(written):
    out, text = written
    assert "Produced by `mbxfer report results`" in text
    assert "rliable 1.2.0" in text and "numpy" in text
    assert "| scratch | dreamer | 5 | 200 |" in text
    assert "| pretrain_finetune | dreamer | 3 | pretrain 200 + finetune 200 |" in text
    assert "score `crafter_score`" in text  # Crafter is scored by its score, not its return.
    assert "## Unfinished trials" in text and "| muzero | 0 | incomplete |" in text
    assert "[video.gif](" in text
    video_link = text.split("[video.gif](")[1].split(")")[0]
    assert (out / video_link).resolve().exists()
    transfer = _rows(out / "transfer.csv")
    # Recomputed against each seed's scratch twin (curves F/2, F vs D/2, D at steps 100, 200).
    assert len(transfer) == 1 and transfer[0]["phase"] == "finetune"
    finetuned, scratch = np.array(FINETUNED), np.array(DREAMER[:3])
    assert float(transfer[0]["jumpstart"]) == pytest.approx(np.mean((finetuned - scratch) / 2))
    assert float(transfer[0]["final_gain"]) == pytest.approx(np.mean(finetuned - scratch))
    assert float(transfer[0]["auc_ratio"]) == pytest.approx(np.mean(finetuned / scratch))
    achievements = {
        r["achievement"]: float(r["success_rate"]) for r in _rows(out / "crafter_achievements.csv")
    }
    assert achievements == pytest.approx(
        {"collect_wood": 90.0, "place_table": 40.0, "eat_cow": 10.0}
    )


def test_achievement_plot_draws_the_csvs_percentages(written, tmp_path):
    """The bars are the CSV's numbers (percent), not 100x them (#14 point 6)."""
    out, _ = written
    table = {}
    for row in _rows(out / "crafter_achievements.csv"):
        table.setdefault(row["group"], {})[row["achievement"]] = float(row["success_rate"])
    figure = plots.plot_achievements(table)
    (ax,) = figure.axes
    heights = sorted(round(bar.get_height(), 6) for bar in ax.patches)
    expected = sorted(round(v, 6) for rates in table.values() for v in rates.values())
    assert heights == expected and max(heights) <= 100.0
    assert ax.get_ylim()[1] == 100.0
    with Image.open(out / "plots" / "crafter_achievements.png") as image:
        assert image.size[0] <= 1400  # Readable, not one 40-inch strip.


def test_plots_are_written_and_not_empty(written):
    out, text = written
    names = {p.name for p in (out / "plots").glob("*.png")}
    assert {
        "curves_grid_collect_items_eval.png",
        "curves_crafter_reward_eval.png",
        "profile_grid_collect_items_eval.png",
        "profile_crafter_reward_eval.png",
        "transfer.png",
        "crafter_achievements.png",
    } <= names
    for name in names:
        with Image.open(out / "plots" / name) as image:
            assert image.size[0] > 100 and image.size[1] > 100
            # Not a blank canvas: more than one colour drawn.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or [0, 0]) > 1
        assert f"plots/{name}" in text


def test_folders_from_two_machines_merge_once(results, tmp_path):
    merged = tmp_path / "merged"
    shutil.copytree(results, merged / "laptop")
    shutil.copytree(results / "machine_a", merged / "cluster" / "machine_a")  # Same trials.
    shutil.copytree(results / "d0", merged / "cluster" / "extra" / "d0")
    notes = []
    trials = load_trials(merged, notes)
    assert len(trials) == 17  # 5 + 5 + 3 + 3 + 1, each counted once.
    assert sum("found twice" in note for note in notes) == 4


def test_grid_variants_are_separate_groups(tmp_path):
    for seed in range(2):
        for deter in (16, 32):
            folder = _trial(tmp_path, f"t{deter}_{seed}", "dreamer", "grid", "a", seed, [1.0])
            config = yaml.safe_load((folder / "config.yaml").read_text())
            config["agent_config"] = {"model": {"deter": deter}}
            (folder / "config.yaml").write_text(yaml.safe_dump(config))
    labels = sorted({t.label for t in load_trials(tmp_path)})
    assert labels == ["dreamer [agent.model.deter=16]", "dreamer [agent.model.deter=32]"]


def test_report_of_an_empty_folder_is_bad_input(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no trial folders" in capsys.readouterr().err


def test_success_rate_families_are_also_compared_by_return(tmp_path):
    """Meta-World/RoboDesk transfer is scored by success rate, which is 0 for every agent at
    CPU budgets; the report adds the same metrics on the evaluation return."""
    for seed in range(2):
        _trial(tmp_path, f"s{seed}", "dreamer", "robodesk", "open_slide", seed, [2.0])
        _trial(
            tmp_path,
            f"f{seed}",
            "dreamer",
            "robodesk",
            "open_slide",
            seed,
            [0.5, 4.0],
            protocol="pretrain_finetune",
            phases=["pretrain", "finetune"],
        )
    out = tmp_path / "report"
    report.write(tmp_path, out, command="mbxfer report", reps=50, curve_reps=10)
    rows = {r["phase"]: r for r in _rows(out / "transfer.csv")}
    assert set(rows) == {"finetune", "finetune (return_mean)"}
    assert float(rows["finetune (return_mean)"]["final_gain"]) == pytest.approx(2.0)


# Figures (#18 item 5): rliable's interval estimates and probability of improvement, every
# figure in each requested format, performance profiles split when a panel has many groups.


def _stems(folder, fmt):
    return {p.name[: -len(fmt) - 1] for p in (folder / "plots").glob(f"*.{fmt}")}


def test_every_figure_is_written_as_png_and_pdf_and_shown_in_the_report(written):
    out, text = written
    pngs = _stems(out, "png")
    assert pngs and pngs == _stems(out, "pdf")
    for stem in pngs:
        assert (out / "plots" / f"{stem}.pdf").read_bytes().startswith(b"%PDF")
    assert {
        "intervals_grid_collect_items_eval",
        "intervals_crafter_reward_eval",
        "intervals_crafter_reward_training-episodes",
        "improvement_grid_collect_items_eval",
    } <= pngs
    with Image.open(out / "plots" / "intervals_grid_collect_items_eval.png") as image:
        assert image.info["dpi"] == pytest.approx((plots.PNG_DPI, plots.PNG_DPI), abs=1)
    lines = text.splitlines()
    for stem in pngs:  # An image link to the PNG, then one line saying what it shows.
        (index,) = [i for i, line in enumerate(lines) if f"(plots/{stem}.png)" in line]
        assert lines[index].startswith("![") and lines[index + 2].startswith("*")
    assert "*Interval estimates: median, IQM, mean and optimality gap" in text
    assert "*Probability of improvement on grid / collect_items (eval)" in text


def test_interval_plot_draws_the_csvs_numbers(written, results):
    """Each panel's ticks are the point estimates of scores.csv and its bars the CIs; median
    and optimality gap (gamma: the best run of the panel, 10) have their known values."""
    from matplotlib.collections import LineCollection

    out, _ = written
    csv_rows = [
        r for r in _rows(out / "scores.csv") if (r["env"], r["eval_set"]) == ("grid", "eval")
    ]
    rows = [r for r in stats.final_rows(load_trials(results), REPS, 0, []) if r.env == "grid"]
    assert [r.name for r in rows] == [
        f"{r['protocol']} / {r['agent']}" if r["protocol"] != "scratch" else r["agent"]
        for r in csv_rows
    ]
    figure = plots.plot_intervals(rows, plots.group_colors([r.name for r in rows]))
    axes = {ax.get_title().split(" (")[0]: ax for ax in figure.axes}
    assert set(axes) == {"Median", "IQM", "Mean", "Optimality gap"}
    assert [t.get_text() for t in axes["Median"].get_yticklabels()] == [r.name for r in rows]
    for title, key in (
        ("Median", "median"),
        ("IQM", "iqm"),
        ("Mean", "mean"),
        ("Optimality gap", "optimality_gap"),
    ):
        ax = axes[title]
        (ticks,) = [c for c in ax.collections if isinstance(c, LineCollection)]
        drawn = [segment[0][0] for segment in ticks.get_segments()]
        np.testing.assert_allclose(drawn, [float(r[key]) for r in csv_rows])
        bars = sorted(ax.patches, key=lambda bar: bar.get_y())
        np.testing.assert_allclose(
            [b.get_x() for b in bars], [float(r[f"{key}_low"]) for r in csv_rows]
        )
        np.testing.assert_allclose(
            [b.get_x() + b.get_width() for b in bars], [float(r[f"{key}_high"]) for r in csv_rows]
        )
    by_name = {r["agent"]: r for r in csv_rows if r["protocol"] == "scratch"}
    assert float(by_name["ppo"]["median"]) == pytest.approx(np.median(PPO))
    assert float(by_name["ppo"]["optimality_gap"]) == pytest.approx(10.0 - np.mean(PPO))
    assert float(by_name["dreamer"]["optimality_gamma"]) == 10.0
    assert axes["Optimality gap"].get_title() == "Optimality gap (γ = 10)"


def test_improvement_figure_pairs_each_x_with_its_y(written, results):
    """The left labels are the X groups, the right labels their Y on the same bar, the ticks
    improvement.csv's probabilities."""
    out, _ = written
    expected = [r for r in _rows(out / "improvement.csv") if r["env"] == "grid"]
    findings_rows = stats.final_rows(load_trials(results), REPS, 0, [])
    pairs = [
        (x, y, stats.improvement(x.scores, y.scores, REPS, 0))
        for x, y in report.improvement_pairs(findings_rows)
        if x.env == "grid"
    ]
    figure = plots.plot_improvement(pairs)
    left, right = figure.axes
    for ax in (left, right):
        assert ax.get_ylim()[0] > ax.get_ylim()[1]  # Both sides top to bottom.
    assert [t.get_text() for t in left.get_yticklabels()] == [r["x"] for r in expected]
    assert [t.get_text() for t in right.get_yticklabels()] == [r["y"] for r in expected]
    ticks = [segment for lines in left.collections for segment in lines.get_segments()]
    np.testing.assert_allclose(
        [s[0][0] for s in ticks], [float(r["probability"]) for r in expected]
    )


def test_cli_writes_the_requested_formats(results, tmp_path):
    out = tmp_path / "svg"
    argv = ["report", str(results), "--out", str(out), "--reps", "30", "--curve-reps", "10"]
    assert cli.main(argv + ["--formats", "svg, PNG"]) == 0
    assert _stems(out, "svg") == _stems(out, "png") and _stems(out, "svg")
    assert not list((out / "plots").glob("*.pdf"))
    assert "--formats svg, PNG" in (out / "report.md").read_text()


def test_unknown_figure_format_is_bad_input(results, tmp_path, capsys):
    out = tmp_path / "bad"
    argv = ["report", str(results), "--out", str(out), "--formats", "png,jpg"]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert "unknown figure format(s) jpg" in error and "png, pdf, svg" in error
    assert not out.exists()  # Rejected before anything is computed or written.
    with pytest.raises(report.ReportError, match="none given"):
        report.figure_formats(" , ")


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """Nine groups on one panel: dreamer from scratch and under six carry variants of
    pretrain_finetune, muzero and ppo from scratch."""
    root = tmp_path_factory.mktemp("crowded")
    carries = ["all", "none", "world_model", "encoder", "heads", "policy"]
    for seed in range(2):
        _trial(root, f"d{seed}", "dreamer", "grid", "a", seed, [1.0 + seed])
        _trial(root, f"m{seed}", "muzero", "grid", "a", seed, [2.0 + seed])
        _trial(root, f"p{seed}", "ppo", "grid", "a", seed, [seed])
        for index, carry in enumerate(carries):
            folder = _trial(
                root,
                f"f{carry}{seed}",
                "dreamer",
                "grid",
                "a",
                seed,
                [0.5, index + seed],
                protocol="pretrain_finetune",
                phases=["pretrain", "finetune"],
            )
            config = yaml.safe_load((folder / "config.yaml").read_text())
            config["protocol"]["carry"] = carry
            (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def test_crowded_performance_profiles_are_split_by_agent_family(crowded):
    rows = stats.final_rows(load_trials(crowded), 20, 0, [])
    assert len(rows) == 9
    parts = plots.profile_parts(rows)
    assert [name for name, _ in parts] == ["dreamer-1", "dreamer-2", "muzero+ppo"]
    assert all(len(members) <= plots.MAX_PROFILE_GROUPS for _, members in parts)
    shown = [row.name for _, members in parts for row in members]
    assert set(shown) == {row.name for row in rows}
    for _, members in parts[:2]:  # Dreamer's scratch baseline in each of its figures.
        assert "dreamer" in [row.name for row in members]
        assert {row.trials[0].agent for row in members} == {"dreamer"}
    taus, curves, cis = plots.profiles(rows, 20, 0)
    colors = plots.group_colors([row.name for row in rows])
    for name, members in parts:
        figure = plots.plot_profile(members, taus, curves, cis, colors, name)
        (legend,) = figure.legends
        assert [t.get_text() for t in legend.get_texts()] == [row.name for row in members]
        assert figure.axes[0].get_xlim() == (taus[0], taus[-1])  # One τ axis for all parts.
    # A panel that fits stays one figure under its old name.
    assert plots.profile_parts(rows[:5]) == [("", rows[:5])]


def test_report_of_a_crowded_panel_shows_each_profile_part(crowded, tmp_path):
    text = report.write(crowded, tmp_path, reps=20, curve_reps=10, formats="png").read_text()
    for part in ("dreamer-1", "dreamer-2", "muzero-ppo"):
        assert f"![Performance profile ({part.replace('-ppo', '+ppo')}; one of 3" in text
        assert (tmp_path / "plots" / f"profile_grid_a_eval_{part}.png").exists()
    assert not (tmp_path / "plots" / "profile_grid_a_eval.png").exists()
    assert "split into one figure per agent family" in text


def test_saved_figures_are_reproducible_and_pdfs_embed_truetype(tmp_path):
    """Paper templates reject Type 3 fonts; an unchanged figure rewrites identical files."""
    figure = plots.plot_achievements({"dreamer (eval)": {"collect_wood": 90.0}})
    first = plots.save(figure, tmp_path / "a", plots.FORMATS)
    second = plots.save(figure, tmp_path / "b", plots.FORMATS)
    assert [p.name for p in first] == ["a.png", "a.pdf", "a.svg"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    pdf = first[1].read_bytes()
    assert b"/FontFile2" in pdf and b"/Type3" not in pdf
    with pytest.raises(ValueError, match="choose from png, pdf, svg"):
        plots.save(figure, tmp_path / "c", ["eps"])


def test_pretrained_groups_are_paired_with_their_own_scratch_twins(tmp_path):
    """Pretrained groups labelled by a protocol setting (carry) are compared with the scratch
    group that holds their twins (same agent config), not with every scratch dreamer and not
    with none (their labels differ from the scratch group's)."""
    for seed in range(3):
        for latent in ("rssm", "deterministic"):
            model = {"agent_config": {"model": {"latent": latent}}}
            _trial(tmp_path, f"s-{latent}-{seed}", "dreamer", "grid", "collect_items", seed,
                   [seed + 1.0], config=model)  # fmt: skip
        for carry in ("all", "none"):
            _trial(tmp_path, f"f-{carry}-{seed}", "dreamer", "grid", "collect_items", seed,
                   [0.0, seed + 2.0], protocol="pretrain_finetune", phases=["pretrain", "finetune"],
                   config={"protocol": {"carry": carry},
                           "agent_config": {"model": {"latent": "deterministic"}}})  # fmt: skip
    rows = stats.final_rows(load_trials(tmp_path), 50, 0, [])
    pairs = {(x.name, y.name) for x, y in report.improvement_pairs(rows)}
    assert pairs == {
        ("pretrain_finetune / dreamer [protocol.carry=all]",
         "dreamer [agent.model.latent=deterministic]"),
        ("pretrain_finetune / dreamer [protocol.carry=none]",
         "dreamer [agent.model.latent=deterministic]"),
    }  # fmt: skip


def test_the_validation_scripts_iqm_ci_is_the_reports_seeded_interval():
    """`validation.ppo_cartpole.iqm_with_ci` (also the parity table's) is the report's
    `stats.interval`: the same scores and seed give the same CI, whatever numpy's global state."""
    from mbxfer.benchmarks.validation.ppo_cartpole import iqm_with_ci

    scores = [1.0, 2.0, 3.5, 4.0, 10.0, 0.5]
    first = iqm_with_ci(scores, seed=3)
    np.random.seed(99)  # Whatever the global state, the CI is the seed's.
    assert iqm_with_ci(scores, seed=3) == first
    expected = stats.interval(np.asarray(scores)[:, None], metrics.aggregate_iqm, 20000, 3)
    assert first == pytest.approx(expected)
    assert first[1] <= first[0] <= first[2]
