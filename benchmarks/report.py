"""Reports from trial folders alone: tables, CSV files and plots of rliable statistics.

    mbxfer report results/quickstart            -> results/quickstart/report.md, *.csv, plots/
    mbxfer report results/quickstart --formats png,pdf,svg    (figure formats; default png,pdf)

`benchmarks/results.py` reads the trial folders (which trial, which group, which score),
`benchmarks/stats.py` computes the statistics and `benchmarks/plots.py` draws them; this module
decides which comparisons to make and writes `report.md` and the CSV files.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from mbxfer import agents
from mbxfer.benchmarks import config as config_lib
from mbxfer.benchmarks import plots, stats, transfer
from mbxfer.benchmarks.results import (
    FALLBACK_SCORE,
    SCRATCH,
    TRAINING_EPISODES,
    TrialRecord,
    load_trials,
)
from mbxfer.benchmarks.stats import TRANSFER_KEYS, Row
from mbxfer.envs import registry


class ReportError(config_lib.ConfigError):
    """Nothing to report (no trial folders); bad input, as a bad config is."""


@dataclasses.dataclass
class Findings:
    """Everything a report shows, computed from the trials before anything is written."""

    trials: list[TrialRecord]
    rows: list[Row]
    """Final scores of finished groups (`stats.final_rows`)."""
    pairs: list[tuple[Row, Row, tuple[float, float, float]]]
    """(X, Y, P(X > Y) with its CI) for each pair of `improvement_pairs`."""
    curves: dict
    """Learning curves (`stats.curves`)."""
    transfer: list[dict]
    """Transfer against scratch twins (`stats.transfer_table`)."""
    achievements: dict[str, dict[str, float]]
    """Crafter success rates per group (`stats.achievement_table`)."""
    notes: list[str]
    members: dict = dataclasses.field(default_factory=dict)
    """Mixtures: (env, task) -> row (group, eval set and its members) -> member -> score
    (`member_table`)."""
    gaps: list = dataclasses.field(default_factory=list)
    """Generalization gaps over seeds with CIs, overall and per member (`gap_table`)."""


def _model_based(agent: str) -> Optional[bool]:
    """The agent registry's word, or None for an agent not registered here."""
    try:
        return agents.model_based(agent)
    except KeyError:
        return None


def improvement_pairs(rows: list[Row]) -> list[tuple[Row, Row]]:
    """(X, Y) pairs on one env/task/eval set: model-based vs model-free agents under one
    protocol, and each pretraining protocol vs scratch for one agent: the scratch group that
    holds X's scratch twins (`transfer.twin_key`; the groups' labels differ when the pretrained
    trials vary a protocol setting such as `carry`)."""
    pairs = []
    for x in rows:
        for y in rows:
            if (x.env, x.task, x.eval_set) != (y.env, y.task, y.eval_set) or x is y:
                continue
            x_based, y_based = (_model_based(r.trials[0].agent) for r in (x, y))
            if x.protocol == y.protocol and x_based is True and y_based is False:
                pairs.append((x, y))
            elif y.protocol == SCRATCH and x.protocol != SCRATCH and _twins(x, y):
                pairs.append((x, y))
    return pairs


def _twins(pretrained: Row, scratch: Row) -> bool:
    """Every trial of `pretrained` has its scratch twin in `scratch`."""
    keys = {transfer.twin_key(t.config) for t in scratch.trials}
    return all(transfer.twin_key(t.config) in keys for t in pretrained.trials)


def figure_formats(formats: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """`"png,pdf"` (or a sequence of names) as a tuple of known figure formats, in order and
    without repeats; an unknown or empty one is bad input."""
    names = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [name.strip().lower().lstrip(".") for name in names if name.strip()]
    unknown = [name for name in names if name not in plots.FORMATS]
    if unknown or not names:
        raise ReportError(
            f"unknown figure format(s) {', '.join(unknown) or '(none given)'} in --formats; "
            f"give a comma-separated list of {', '.join(plots.FORMATS)} (default png,pdf)"
        )
    return tuple(dict.fromkeys(names))


@dataclasses.dataclass(frozen=True)
class _Figures:
    """Where and how the report writes its figures."""

    out: Path
    formats: tuple[str, ...]

    def add(self, figure, name: str, caption: str) -> list[str]:
        """Write `figure` as plots/`name`.<format> for each format; the markdown lines that
        show it (an image of the PNG, else the SVG, else a link to the PDF) and the caption."""
        paths = {
            p.suffix[1:]: p for p in plots.save(figure, self.out / "plots" / name, self.formats)
        }
        shown = next((paths[f] for f in ("png", "svg") if f in paths), None)
        if shown is not None:
            line = f"![{caption.split(':')[0]}]({_link(shown, self.out)})"
        else:
            line = f"[{name}.pdf]({_link(paths['pdf'], self.out)})"
        return ["", line, "", f"*{caption}*"]


def write(
    results: Path,
    out: Optional[Path] = None,
    command: Optional[str] = None,
    reps: int = 5000,
    curve_reps: int = 1000,
    seed: int = 0,
    formats: Union[str, Sequence[str]] = plots.DEFAULT_FORMATS,
) -> Path:
    """Read every trial below `results`; write `report.md`, CSV files and plots to `out`, each
    figure once per format of `formats` (`figure_formats`)."""
    formats = figure_formats(formats)
    results = Path(results)
    out = Path(out) if out is not None else results
    if not results.is_dir():
        raise ReportError(f"results folder {results} does not exist")
    notes: list[str] = []
    trials = load_trials(results, notes)
    if not trials:
        left = "; ".join(" ".join(note.split()) for note in notes)  # One line.
        left_out = f" ({left})" if left else ""
        raise ReportError(f"no trial folders to report (*/config.yaml) below {results}{left_out}")
    (out / "plots").mkdir(parents=True, exist_ok=True)
    findings = analyse(trials, reps, curve_reps, seed, notes)
    figures = _Figures(out, formats)
    md = _header(findings, results, command, reps, seed, formats)
    md += _final_scores_section(findings, figures, curve_reps, seed)
    md += _improvement_section(findings.pairs, figures)
    md += _transfer_section(findings.transfer, figures)
    md += _achievements_section(findings.achievements, figures)
    md += _members_section(findings.members, findings.gaps, figures)
    md += _unfinished_section(trials, out)
    md += _videos_section(trials, out)
    if notes:
        md += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    _write_tables(findings, out)
    report = out / "report.md"
    report.write_text("\n".join(md) + "\n")
    return report


def analyse(
    trials: list[TrialRecord], reps: int, curve_reps: int, seed: int, notes: list[str]
) -> Findings:
    """Every statistic of the report; `notes` gets what the reader should know about them."""
    rows = stats.final_rows(trials, reps, seed, notes)
    pairs = [
        (x, y, stats.improvement(x.scores, y.scores, reps, seed))
        for x, y in improvement_pairs(rows)
    ]
    return Findings(
        trials,
        rows,
        pairs,
        stats.curves(trials, curve_reps, seed),
        stats.transfer_table(trials, reps, seed),
        stats.achievement_table(rows),
        notes,
        member_table(trials),
        gap_table(trials, reps, seed),
    )


def _header(
    findings: Findings,
    results: Path,
    command: Optional[str],
    reps: int,
    seed: int,
    formats: Sequence[str],
) -> list[str]:
    trials = findings.trials
    finished = sum(t.done is not None for t in trials)
    return [
        "# mbxfer report",
        "",
        f"Produced by `{command or ' '.join(sys.argv)}` on {time.strftime('%Y-%m-%d %H:%M')}.",
        f"Read {len(trials)} trial folders below `{results}` ({finished} finished, "
        f"{len(trials) - finished} unfinished). Libraries: {_versions()}.",
        "",
        "Score: the last evaluation of the last phase, by each environment's score key "
        f"({_score_keys(trials)}; `envs/scoring.py`), finished trials only. Where shown, the "
        f"eval set `{TRAINING_EPISODES}` is the family's published protocol (Crafter's): the "
        "score of every training episode of the last phase. IQM = interquartile mean over seeds; "
        f"brackets are stratified bootstrap 95% CIs (rliable, {reps} resamples, seed {seed}). "
        "Budgets are environment steps per phase.",
        "",
        "Figures (in `plots/`, each as "
        + ", ".join(f.upper() for f in formats)
        + "): per panel, rliable's interval estimates (median, IQM, mean and optimality gap "
        "with 95% CIs, as Agarwal et al. 2021 Fig. 1), the performance profile and learning "
        "curves; probability of improvement per compared pair. A performance profile of more "
        f"than {plots.MAX_PROFILE_GROUPS} groups is split into one figure per agent family "
        "(that agent under every protocol and variant, its scratch baseline in each of its "
        "figures; small families share one), all on the panel's τ axis and colours. The "
        "median is over runs (with one task per panel, rliable's median of task means would "
        "be the mean); the optimality gap is the shortfall from γ, 1 for normalized scores "
        "and otherwise the panel's best run. `scores.csv` holds every plotted number.",
        "",
        "Evaluation modes: every evaluation plays the same episodes (start states seeded by "
        "the trial's seed, the evaluation set and the step count, so twins see the same ones) "
        "with the policy `sampled` and `greedy`. The eval set `eval` is the headline mode, "
        "`sampled` unless a trial's `train.eval_modes` says otherwise; `eval (greedy)` is the "
        "other. Sampled is the headline because it is the policy the agent trained with, as "
        "Crafter and DreamerV3 score agents, while an argmax policy that stalls on a "
        "deterministic task scores 0 for the whole episode.",
        "",
        "## Final scores",
    ]


def _panels(rows: list[Row]) -> dict[tuple[str, str, str], list[Row]]:
    """(env, task, eval set) -> its rows, in the order of `rows`."""
    panels: dict[tuple, list[Row]] = {}
    for row in rows:
        panels.setdefault((row.env, row.task, row.eval_set), []).append(row)
    return panels


def _final_scores_section(
    findings: Findings, figures: _Figures, curve_reps: int, seed: int
) -> list[str]:
    """A table, interval estimates, performance profiles and learning curves per panel;
    curves alone for panels with no finished trial yet."""
    md: list[str] = []
    panels = _panels(findings.rows)
    for panel_key, panel_rows in panels.items():
        env, task, eval_set = panel_key
        md += [
            "",
            f"### {env} / {task} — eval set `{eval_set}`, score `{panel_rows[0].score_key}`",
            "",
            "| protocol | agent | seeds | budget (env steps) | IQM [95% CI] | mean [95% CI] |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in panel_rows:
            md.append(
                f"| {row.protocol} | {row.agent} | {len(row.seeds)} | {row.budget} | "
                f"{_ci(row.iqm)} | {_ci(row.mean)} |"
            )
        slug = _slug(env, task, eval_set)
        colors = plots.group_colors([row.name for row in panel_rows])
        md += figures.add(
            plots.plot_intervals(panel_rows, colors),
            f"intervals_{slug}",
            "Interval estimates: median, IQM, mean and optimality gap (lower is better; "
            f"γ = {panel_rows[0].gamma:.3g}) of the final scores per group; bars are 95% "
            "stratified bootstrap CIs, ticks the point estimates.",
        )
        taus, curves, cis = plots.profiles(panel_rows, curve_reps, seed)
        parts = plots.profile_parts(panel_rows)
        for part, part_rows in parts:
            figure = plots.plot_profile(part_rows, taus, curves, cis, colors, part)
            which = f" ({part}; one of {len(parts)} figures on one τ axis)" if part else ""
            md += figures.add(
                figure,
                f"profile_{slug}_{_slug(part)}" if part else f"profile_{slug}",
                f"Performance profile{which}: the fraction of runs scoring above each "
                "threshold τ, with 95% CI bands; a curve lying above another everywhere "
                "dominates it.",
            )
        if panel_key in findings.curves:
            md += figures.add(
                plots.plot_curves(panel_key, findings.curves[panel_key]),
                f"curves_{slug}",
                _curves_caption(""),
            )
    for panel_key, panel in findings.curves.items():
        if panel_key not in panels:  # Unfinished groups: curves only.
            md += ["", f"### {' / '.join(panel_key[:2])} — eval set `{panel_key[2]}`"]
            md += figures.add(
                plots.plot_curves(panel_key, panel),
                f"curves_{_slug(*panel_key)}",
                _curves_caption(" (no finished trial yet)"),
            )
    return md


def _curves_caption(note: str) -> str:
    return (
        f"Learning curves{note}: IQM of the evaluation score over env steps of each phase, 95% "
        "CI bands, every evaluation written so far (unfinished trials included)."
    )


def _improvement_section(pairs: list[tuple[Row, Row, tuple]], figures: _Figures) -> list[str]:
    if not pairs:
        return []
    md = [
        "",
        "## Probability of improvement",
        "",
        "P(X > Y): the probability that a run of X scores higher than a run of Y "
        "(model-based vs model-free agents; pretrained vs scratch).",
        "",
        "| env / task | eval set | X | Y | P(X > Y) [95% CI] |",
        "| --- | --- | --- | --- | --- |",
    ]
    for x, y, value in pairs:
        md.append(f"| {x.env} / {x.task} | {x.eval_set} | {x.name} | {y.name} | {_ci(value)} |")
    by_panel: dict[tuple, list] = {}
    for pair in pairs:
        by_panel.setdefault((pair[0].env, pair[0].task, pair[0].eval_set), []).append(pair)
    for panel_key, panel_pairs in by_panel.items():
        md += figures.add(
            plots.plot_improvement(panel_pairs),
            f"improvement_{_slug(*panel_key)}",
            f"Probability of improvement on {' / '.join(panel_key[:2])} ({panel_key[2]}): "
            "P(X > Y) per pair with its 95% CI; right of the dashed 0.5 line favours X.",
        )
    return md


def _transfer_section(transfer: list[dict], figures: _Figures) -> list[str]:
    if not transfer:
        return []
    md = [
        "",
        "## Transfer (against the scratch twin; mean over seeds, 95% CI)",
        "",
        "Headline evaluation mode of each trial (`train.eval_modes[0]`); `matched` counts "
        "the seeds whose finetuning curve and scratch twin were scored on the same "
        "evaluation episodes (equal start states at every common step).",
        "",
        "| env / task | protocol | agent | phase | seeds | matched | jumpstart | AUC ratio | "
        "final gain | steps to threshold | scratch steps to threshold |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in transfer:
        cells = [_ci((r[k], r[f"{k}_low"], r[f"{k}_high"])) for k in TRANSFER_KEYS]
        md.append(
            f"| {r['env']} / {r['task']} | {r['protocol']} | {r['agent']} | {r['phase']} | "
            f"{r['seeds']} | {r['matched_episodes']} | " + " | ".join(cells) + " |"
        )
    return md + figures.add(
        plots.plot_transfer(transfer),
        "transfer",
        "Transfer: jumpstart, AUC ratio and final gain of each pretrained group against its "
        "scratch twins (mean over seeds, 95% CI); right of the black line favours pretraining.",
    )


def _score_keys(trials: list[TrialRecord]) -> str:
    envs = sorted({t.env for t in trials})
    return ", ".join(f"{env}: `{registry.score_key(env)}`" for env in envs)


def _achievements_section(
    achievements: dict[str, dict[str, float]], figures: _Figures
) -> list[str]:
    if not achievements:
        return []
    return ["", "## Crafter achievements"] + figures.add(
        plots.plot_achievements(achievements),
        "crafter_achievements",
        "Crafter achievements: success rate (%, symlog scale) of each achievement in the final "
        "evaluation per group, mean over seeds.",
    )


# -- sets and members (mixtures, envs/mixture.py) ---------------------------------------------------
def _group_name(trial: TrialRecord) -> str:
    return trial.label if trial.protocol == SCRATCH else f"{trial.protocol} / {trial.label}"


def eval_set_members(config: dict, eval_set: str) -> str:
    """Which members a trial's evaluation set played, as written in its config: the
    protocol's train or test keywords, else the environment's (`""` when not a mixture)."""
    from mbxfer.benchmarks import protocols

    protocol = config.get("protocol") or {}
    own = ((config.get("env") or {}).get("kwargs") or {}).get("members")
    train_kwargs = protocol.get("train_kwargs") or {}
    train = train_kwargs.get("members", own)
    found = own
    if eval_set == "train":
        found = train
    elif eval_set == "test":
        test_kwargs = protocol.get("test_kwargs") or protocols.held_out(train_kwargs)
        found = test_kwargs.get("members", train)
    if found is None:
        return ""
    return found if isinstance(found, str) else f"{len(found)} members"


def member_table(trials: list[TrialRecord]) -> dict:
    """(env, task) -> row -> member -> the member's score in the final evaluation, mean over
    the seeds of a group; a row is a group and an evaluation set with the set it played
    (`group · test (ML10/test)`). Finished trials of mixtures only."""
    values: dict = {}
    for trial in sorted(trials, key=lambda t: (t.seed, t.trial_id)):
        if trial.done is None:
            continue
        for eval_set, record in trial.final_evals().items():
            scores = transfer.member_scores(record, trial.score_key)
            if not scores:
                continue
            played = eval_set_members(trial.config, eval_set.split(" (")[0])
            row = f"{_group_name(trial)} · {eval_set}" + (f" ({played})" if played else "")
            by_member = values.setdefault((trial.env, trial.task), {}).setdefault(row, {})
            for member, score in scores.items():
                by_member.setdefault(member, []).append(score)
    return {
        panel: {
            row: {member: float(np.mean(v)) for member, v in members.items()}
            for row, members in rows.items()
        }
        for panel, rows in values.items()
    }


def gap_table(trials: list[TrialRecord], reps: int, seed: int) -> list[dict]:
    """The generalization gap (train minus test score of the last phase, `done.json`) of each
    group, overall (`member` "all": the score averaged over members) and per member where
    both sides played the same members, as the mean over seeds with a bootstrap 95% CI."""
    groups: dict = {}
    for trial in sorted(trials, key=lambda t: (t.seed, t.trial_id)):
        gap = (trial.done or {}).get("generalization_gap")
        if not isinstance(gap, dict) or "gap" not in gap:
            continue
        key = (trial.env, trial.task, trial.protocol, trial.label, gap.get("score", ""))
        by_member = groups.setdefault(key, {})
        by_member.setdefault("all", []).append((gap["train"], gap["test"], gap["gap"]))
        for member, numbers in (gap.get("members") or {}).items():
            by_member.setdefault(member, []).append(
                (numbers["train"], numbers["test"], numbers["gap"])
            )
    table = []
    for (env, task, protocol, agent, score), by_member in groups.items():
        for member, values in by_member.items():
            array = np.asarray(values, float)
            point, low, high = stats.interval(array[:, 2:], _mean_of, reps, seed)
            table.append(
                {
                    "env": env,
                    "task": task,
                    "protocol": protocol,
                    "agent": agent,
                    "score_key": score,
                    "member": member,
                    "seeds": len(values),
                    "train": float(array[:, 0].mean()),
                    "test": float(array[:, 1].mean()),
                    "gap": point,
                    "gap_low": low,
                    "gap_high": high,
                }
            )
    return table


def _mean_of(scores: np.ndarray) -> float:
    return float(np.mean(scores))


def _members_section(members: dict, gaps: list[dict], figures: _Figures) -> list[str]:
    if not members and not gaps:
        return []
    md = ["", "## Sets and members", ""]
    if gaps:
        md += [
            "Generalization gap: train minus test score of the last phase (mean over seeds, "
            "95% bootstrap CI); `all` is the score averaged over a set's members, the other "
            "rows are members that both sides played (same game, unseen levels).",
            "",
            "| env / task | protocol | agent | member | seeds | train | test | gap [95% CI] |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in gaps:
            md.append(
                f"| {r['env']} / {r['task']} | {r['protocol']} | {r['agent']} | {r['member']} "
                f"| {r['seeds']} | {r['train']:.3g} | {r['test']:.3g} | "
                f"{_ci((r['gap'], r['gap_low'], r['gap_high']))} |"
            )
    for (env, task), rows in members.items():
        score = registry.score_key(env)
        names = list(dict.fromkeys(m for scores in rows.values() for m in scores))
        md += [
            "",
            f"### {env} / {task} — `{score}` per member (final evaluation, mean over seeds)",
            "",
            "| group · eval set | " + " | ".join(names) + " |",
            "| --- | " + " | ".join("---" for _ in names) + " |",
        ]
        for row, scores in rows.items():
            cells = [f"{scores[n]:.3g}" if n in scores else "" for n in names]
            md.append(f"| {row} | " + " | ".join(cells) + " |")
        md += figures.add(
            plots.plot_member_heatmap(f"{env} / {task}", rows, score),
            f"members_{_slug(env, task)}",
            f"Per-member {score} of each group and evaluation set (final evaluation, mean over "
            "seeds); grey: a member the set did not play.",
        )
    return md


def _unfinished_section(trials: list[TrialRecord], out: Path) -> list[str]:
    unfinished = [t for t in trials if t.done is None]
    if not unfinished:
        return []
    md = [
        "",
        "## Unfinished trials",
        "",
        "| trial | env / task | protocol | agent | seed | status | evaluations | last env steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in unfinished:
        last = t.evals[-1]["total_env_steps"] if t.evals else 0
        md.append(
            f"| [{t.trial_id}]({_link(t.folder, out)}) | {t.env} / {t.task} | {t.protocol} "
            f"| {t.label} | {t.seed} | {_unfinished_status(t, out)} | {len(t.evals)} "
            f"| {last:,} |"
        )
    return md


def _videos_section(trials: list[TrialRecord], out: Path) -> list[str]:
    videos = [t for t in trials if (t.folder / "video.gif").exists()]
    if not videos:
        return []
    md = ["", "## Videos", ""]
    for t in videos:
        md.append(
            f"- {t.env} / {t.task}, {t.protocol}, {t.label}, seed {t.seed}: "
            f"[video.gif]({_link(t.folder / 'video.gif', out)})"
        )
    return md


def _write_tables(findings: Findings, out: Path) -> None:
    """The CSV files: one row per number the report shows (and per trial)."""
    _write_csv(
        out / "crafter_achievements.csv",
        (
            {"group": g, "achievement": a, "success_rate": v}
            for g, rates in findings.achievements.items()
            for a, v in rates.items()
        ),
    )
    _write_csv(out / "scores.csv", _score_rows(findings.rows))
    _write_csv(out / "trials.csv", _trial_rows(findings.trials, out))
    _write_csv(out / "curves.csv", _curve_rows(findings.curves))
    _write_csv(
        out / "improvement.csv",
        (
            {
                "env": x.env,
                "task": x.task,
                "eval_set": x.eval_set,
                "x": x.name,
                "y": y.name,
                "probability": v[0],
                "low": v[1],
                "high": v[2],
            }
            for x, y, v in findings.pairs
        ),
    )
    _write_csv(out / "transfer.csv", findings.transfer)
    _write_csv(
        out / "members.csv",
        (
            {"env": env, "task": task, "row": row, "member": member, "score": score}
            for (env, task), rows in findings.members.items()
            for row, scores in rows.items()
            for member, score in scores.items()
        ),
    )
    _write_csv(out / "generalization.csv", findings.gaps)


def _score_rows(rows: list[Row]) -> Iterable[dict]:
    for (env, task, eval_set), panel_rows in _panels(rows).items():
        for row in panel_rows:
            yield {
                "env": env,
                "task": task,
                "eval_set": eval_set,
                "protocol": row.protocol,
                "agent": row.agent,
                "score_key": row.score_key,
                "seeds": len(row.seeds),
                "budget": row.budget,
                **{
                    f"{name}{suffix}": value
                    for name in ("iqm", "mean", "median", "optimality_gap")
                    for suffix, value in zip(("", "_low", "_high"), getattr(row, name))
                },
                "optimality_gamma": row.gamma,
            }


def _trial_rows(trials: list[TrialRecord], out: Path) -> Iterable[dict]:
    for t in trials:
        for eval_set, record in t.final_evals().items():
            yield {
                "trial_id": t.trial_id,
                "folder": _link(t.folder, out),
                "env": t.env,
                "task": t.task,
                "protocol": t.protocol,
                "agent": t.label,
                "seed": t.seed,
                "finished": t.done is not None,
                "eval_set": eval_set,
                "phase": record["phase"],
                "env_steps": record["env_steps"],
                "total_env_steps": record["total_env_steps"],
                "score_key": t.score_key,
                "score": record.get(t.score_key, record.get(FALLBACK_SCORE)),
            }


def _curve_rows(curves: dict) -> Iterable[dict]:
    for (env, task, eval_set), panel in curves.items():
        for name, phases in panel.items():
            for phase, series in phases.items():
                for steps, iqm, low, high, runs in series:
                    yield {
                        "env": env,
                        "task": task,
                        "eval_set": eval_set,
                        "group": name,
                        "phase": phase[1],
                        "env_steps": steps,
                        "iqm": iqm,
                        "iqm_low": low,
                        "iqm_high": high,
                        "runs": runs,
                    }


def _unfinished_status(trial: TrialRecord, out: Path) -> str:
    """`failed: <last error line>` (written by the sweep) or `incomplete` (running or killed)."""
    try:
        error = json.loads((trial.folder / "failed.json").read_text())["error"]
    except (OSError, ValueError, KeyError):
        return "incomplete"
    error = error.replace("|", "/")
    return f"failed: {error[:120]} ([error.txt]({_link(trial.folder / 'error.txt', out)}))"


def _versions() -> str:
    names = ("mbxfer", "rliable", "numpy", "scipy", "arch", "matplotlib", "jax")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(found) + f", Python {sys.version.split()[0]}"


def _ci(values: tuple[float, float, float], digits: int = 3) -> str:
    point, low, high = values
    if math.isnan(point):
        return "—"
    return f"{point:.{digits}g} [{low:.{digits}g}, {high:.{digits}g}]"


def _write_csv(path: Path, rows: Iterable[dict]) -> None:
    rows = list(rows)
    if not rows:
        return
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _link(target: Path, out: Path) -> str:
    return os.path.relpath(target, out).replace(os.sep, "/")


def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(str(p) for p in parts)).strip("-")
