"""Reports from trial folders alone: rliable statistics, tables, CSV files and plots.

    mbxfer report results/quickstart            -> results/quickstart/report.md, *.csv, plots/

Every `config.yaml` below the results folder is a trial (so folders copied from several
machines merge; a trial found twice, by its config hash, is counted once). Trials are grouped
by (environment, task, protocol, agent) over seeds; when trials of one group differ in other
config values (a grid over `agent.model.latent`, say), each variant is its own group.

A trial's score is its last evaluation in its last phase, per evaluation set: `crafter_score`
for Crafter, `success_rate` for Meta-World and RoboDesk, `normalized_return` for Procgen and
`return_mean` otherwise. Crafter trials also get the eval set `training episodes`: the Crafter
score of all the training episodes of the last phase (how the Crafter paper scores). Only
finished trials (`done.json`) enter the final-score statistics; learning curves use every
evaluation written so far. Aggregates are the interquartile mean
(IQM) and the mean over seeds with stratified bootstrap 95% confidence intervals, performance
profiles and probabilities of improvement, all computed by rliable (Agarwal et al. 2021).
Each bootstrap starts from numpy's global RNG seeded with `seed` (rliable resamples with it;
the caller's RNG state is restored afterwards), so a report is reproducible.
"""

from __future__ import annotations

import contextlib
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
from typing import Any, Callable, Iterable, Optional

import numpy as np
import yaml

from benchmarks import config as config_lib
from envs import scoring

FALLBACK_SCORE = scoring.DEFAULT_KEY
MODEL_BASED = ("dreamer", "muzero")
MODEL_FREE = ("ppo", "muzero_nomodel", "dreamer_nomodel")
SCRATCH = "scratch"
TRAINING_EPISODES = "training episodes"
TRANSFER_BARS = ("jumpstart", "auc_ratio", "final_gain")
TRANSFER_KEYS = (*TRANSFER_BARS, "steps_to_threshold", "scratch_steps_to_threshold")


class ReportError(config_lib.ConfigError):
    """Nothing to report (no trial folders); bad input, as a bad config is."""


@dataclasses.dataclass
class TrialRecord:
    """One trial folder as the report sees it."""

    folder: Path
    trial_id: str
    config: dict
    evals: list[dict]
    """Evaluations with `phase`, `phase_index`, `eval_set` and `total_env_steps` filled in."""
    done: Optional[dict]
    variant: str = ""

    @property
    def agent(self) -> str:
        return str(self.config.get("agent"))

    @property
    def env(self) -> str:
        return str((self.config.get("env") or {}).get("name"))

    @property
    def task(self) -> str:
        return str((self.config.get("env") or {}).get("task"))

    @property
    def protocol(self) -> str:
        return str((self.config.get("protocol") or {}).get("name") or SCRATCH)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def label(self) -> str:
        """The agent as shown in tables: its name, and its variant when there are several."""
        return f"{self.agent} [{self.variant}]" if self.variant else self.agent

    @property
    def group(self) -> tuple[str, str, str, str]:
        return (self.env, self.task, self.protocol, self.label)

    @property
    def score_key(self) -> str:
        return scoring.score_key(self.env)

    def final_evals(self) -> dict[str, dict]:
        """Eval set -> the last evaluation of the last phase; for Crafter also the last
        phase's training episodes (see `training_episodes`)."""
        out: dict[str, dict] = {}
        if self.evals:
            last_phase = max(e["phase_index"] for e in self.evals)
            for record in self.evals:
                if record["phase_index"] == last_phase:
                    out[record["eval_set"]] = record  # Written in order: the last one wins.
        training = self.training_episodes()
        if training is not None:
            out[TRAINING_EPISODES] = training
        return out

    def training_episodes(self) -> Optional[dict]:
        """The Crafter score of every training episode of the last phase, as a pseudo
        evaluation set.

        The Crafter paper (Hafner 2021) scores an agent by the success rates over all the
        episodes it played during training, not by separate evaluation episodes; reports show
        that score next to the evaluation's, so numbers can be set beside the published ones.
        Finished Crafter trials only (the runner writes the summary into `done.json`)."""
        if self.score_key != "crafter_score" or not self.done or not self.done.get("phases"):
            return None
        phase = self.done["phases"][-1]
        summary = (phase.get("training_episodes") if isinstance(phase, dict) else None) or {}
        if self.score_key not in summary:
            return None
        total = int(self.done.get("env_steps", phase.get("env_steps", 0)))
        return {
            **summary,
            "phase": phase.get("name", ""),
            "phase_index": phase.get("index", len(self.done["phases"]) - 1),
            "eval_set": TRAINING_EPISODES,
            "env_steps": int(phase.get("env_steps", 0)),
            "total_env_steps": total,
        }


def headline_mode(config: dict) -> str:
    """The evaluation mode a trial is scored by: the first of its `train.eval_modes`
    (`greedy` for trials from before evaluation modes, which evaluated greedily)."""
    modes = (config.get("train") or {}).get("eval_modes") or ["greedy"]
    return str(modes[0])


def _read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    records = []
    if not path.exists():
        return records
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # A line cut by a kill; the runner rewrites it on resume.
            notes.append(f"{path}:{number}: unreadable line skipped")
    return records


def _normalize_eval(record: dict, headline: str = "sampled") -> dict:
    """An `eval.jsonl` line as the report groups it: evaluations in a mode other than the
    trial's headline mode form their own evaluation set, `<set> (<mode>)`."""
    record = dict(record)
    mode = record.get("mode")
    if mode is not None and mode != headline:
        record["eval_set"] = f"{record.get('eval_set', 'eval')} ({mode})"
    record.setdefault("phase", "train")
    record.setdefault("phase_index", 0)
    record.setdefault("eval_set", "eval")
    record.setdefault("total_env_steps", record.get("env_steps", 0))
    return record


def load_trials(results: Path, notes: Optional[list[str]] = None) -> list[TrialRecord]:
    """Every trial folder below `results`, once each, with variants labelled."""
    notes = notes if notes is not None else []
    found: dict[str, TrialRecord] = {}
    for path in sorted(Path(results).rglob("config.yaml")):
        if "checkpoints" in path.relative_to(results).parts:
            continue
        folder = path.parent
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            notes.append(f"{path}: unreadable ({error}); skipped")
            continue
        if not isinstance(config, dict) or "agent" not in config or "env" not in config:
            notes.append(f"{path}: not a trial config; skipped")
            continue
        headline = headline_mode(config)
        evals = [_normalize_eval(r, headline) for r in _read_jsonl(folder / "eval.jsonl", notes)]
        done = None
        if (folder / "done.json").exists():
            try:
                done = json.loads((folder / "done.json").read_text())
            except json.JSONDecodeError:
                notes.append(f"{folder / 'done.json'}: unreadable; trial counted as unfinished")
        record = TrialRecord(folder, config_lib.trial_id_of(config), config, evals, done)
        previous = found.get(record.trial_id)
        if previous is not None:
            keep = max(previous, record, key=lambda r: (r.done is not None, len(r.evals)))
            notes.append(
                f"trial {record.trial_id} found twice ({previous.folder}, {folder}); "
                f"using {keep.folder}"
            )
            record = keep
        found[record.trial_id] = record
    trials = list(found.values())
    _label_variants(trials)
    return trials


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(value, sort_keys=True)}


def _label_variants(trials: list[TrialRecord]) -> None:
    """Trials of one (env, task, protocol, agent) that differ beyond the seed get a label."""
    by_group: dict[tuple, list[TrialRecord]] = {}
    for trial in trials:
        by_group.setdefault((trial.env, trial.task, trial.protocol, trial.agent), []).append(trial)
    for members in by_group.values():
        flat = [_flatten(t.config) for t in members]
        keys = sorted(set().union(*flat))
        varying = [k for k in keys if k != "seed" and len({f.get(k, "<unset>") for f in flat}) > 1]
        for trial, values in zip(members, flat):
            parts = []
            for key in varying:
                shown = (
                    "agent." + key[len("agent_config.") :]
                    if key.startswith("agent_config.")
                    else key
                )
                parts.append(f"{shown}={json.loads(values[key]) if key in values else '<unset>'}")
            trial.variant = ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Statistics (all through rliable)


@contextlib.contextmanager
def _seeded(seed: int):
    """rliable 1.2 resamples with numpy's global RNG (its `random_state` argument does not
    reach the resampling), so seed that RNG for the call and give the caller's state back."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


def interval(
    scores: np.ndarray, aggregate: Callable[[np.ndarray], float], reps: int, seed: int
) -> tuple[float, float, float]:
    """(point, low, high): `aggregate` of a runs x tasks matrix with a stratified bootstrap CI."""
    from rliable import library

    with _seeded(seed):
        points, intervals = library.get_interval_estimates(
            {"x": scores}, lambda x: np.array([aggregate(x)]), reps=reps
        )
    return float(points["x"][0]), float(intervals["x"][0, 0]), float(intervals["x"][1, 0])


def improvement(x: np.ndarray, y: np.ndarray, reps: int, seed: int) -> tuple[float, float, float]:
    """P(X > Y) with its 95% CI (independent stratified bootstrap of both sides)."""
    from rliable import library, metrics

    with _seeded(seed):
        points, intervals = library.get_interval_estimates(
            {"x,y": [x, y]},
            lambda a, b: np.array([metrics.probability_of_improvement(a, b)]),
            reps=reps,
        )
    return float(points["x,y"][0]), float(intervals["x,y"][0, 0]), float(intervals["x,y"][1, 0])


def _iqm(scores: np.ndarray) -> float:
    from rliable import metrics

    return metrics.aggregate_iqm(scores)


def _mean(scores: np.ndarray) -> float:
    from rliable import metrics

    return metrics.aggregate_mean(scores)


@dataclasses.dataclass
class Row:
    """One group's final scores on one evaluation set."""

    env: str
    task: str
    eval_set: str
    protocol: str
    agent: str
    score_key: str
    scores: np.ndarray
    """`[runs, 1]`: one column, the group's environment and task."""
    seeds: list[int]
    budget: str
    trials: list[TrialRecord]
    iqm: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    mean: tuple[float, float, float] = (math.nan, math.nan, math.nan)

    @property
    def name(self) -> str:
        return f"{self.protocol} / {self.agent}" if self.protocol != SCRATCH else self.agent


def _budget(trials: list[TrialRecord]) -> str:
    """Environment steps per phase, e.g. `pretrain 100,000 + finetune 50,000`."""
    phases: dict[int, tuple[str, int]] = {}
    for trial in trials:
        for record in trial.evals:
            index, name = record["phase_index"], record["phase"]
            steps = max(phases.get(index, (name, 0))[1], int(record.get("env_steps", 0)))
            phases[index] = (name, steps)
    if not phases:
        steps = max(int((t.done or {}).get("env_steps", 0)) for t in trials)
        return f"{steps:,}"
    if len(phases) == 1:
        return f"{next(iter(phases.values()))[1]:,}"
    return " + ".join(f"{name} {steps:,}" for _, (name, steps) in sorted(phases.items()))


def final_rows(trials: list[TrialRecord], reps: int, seed: int, notes: list[str]) -> list[Row]:
    """Final-score rows of finished trials, with IQM and mean and their CIs."""
    groups: dict[tuple, list[TrialRecord]] = {}
    for trial in trials:
        if trial.done is not None:
            groups.setdefault(trial.group, []).append(trial)
    rows = []
    for (env, task, protocol, agent), members in sorted(groups.items()):
        members.sort(key=lambda t: t.seed)
        finals = [t.final_evals() for t in members]
        for eval_set in sorted(set().union(*finals)):
            having = [(t, f[eval_set]) for t, f in zip(members, finals) if eval_set in f]
            key = members[0].score_key
            if not all(key in record for _, record in having):
                notes.append(
                    f"{env}/{task} {protocol}/{agent} ({eval_set}): {key} missing from some "
                    f"final evaluations; scored by {FALLBACK_SCORE}"
                )
                key = FALLBACK_SCORE
            having = [(t, r) for t, r in having if key in r]
            if not having:
                continue
            scores = np.array([[float(r[key])] for _, r in having])
            row = Row(
                env,
                task,
                eval_set,
                protocol,
                agent,
                key,
                scores,
                [t.seed for t, _ in having],
                _budget([t for t, _ in having]),
                [t for t, _ in having],
            )
            row.iqm = interval(scores, _iqm, reps, seed)
            row.mean = interval(scores, _mean, reps, seed)
            rows.append(row)
    return rows


def improvement_pairs(rows: list[Row]) -> list[tuple[Row, Row]]:
    """(X, Y) pairs on one env/task/eval set: model-based vs model-free agents under one
    protocol, and each pretraining protocol vs scratch for one agent."""
    pairs = []
    for x in rows:
        for y in rows:
            if (x.env, x.task, x.eval_set) != (y.env, y.task, y.eval_set) or x is y:
                continue
            x_agent, y_agent = x.trials[0].agent, y.trials[0].agent
            if x.protocol == y.protocol and x_agent in MODEL_BASED and y_agent in MODEL_FREE:
                pairs.append((x, y))
            elif x.agent == y.agent and y.protocol == SCRATCH and x.protocol != SCRATCH:
                pairs.append((x, y))
    return pairs


def curves(
    trials: list[TrialRecord], reps: int, seed: int
) -> dict[tuple[str, str, str], dict[str, dict[tuple[int, str], list[tuple]]]]:
    """(env, task, eval set) -> group name -> (phase index, phase) -> [(steps, iqm, lo, hi, n)]."""
    points: dict[tuple, dict[str, dict[tuple, dict[int, list[float]]]]] = {}
    for trial in trials:
        name = f"{trial.protocol} / {trial.label}" if trial.protocol != SCRATCH else trial.label
        for record in trial.evals:
            key = trial.score_key if trial.score_key in record else FALLBACK_SCORE
            if key not in record:
                continue
            panel = points.setdefault((trial.env, trial.task, record["eval_set"]), {})
            phase = (record["phase_index"], record["phase"])
            by_step = panel.setdefault(name, {}).setdefault(phase, {})
            by_step.setdefault(int(record["env_steps"]), []).append(float(record[key]))
    out: dict = {}
    for panel_key, panel in points.items():
        for name, phases in panel.items():
            for phase, by_step in phases.items():
                series = []
                for steps in sorted(by_step):
                    values = np.array(by_step[steps])[:, None]
                    series.append((steps, *interval(values, _iqm, reps, seed), len(values)))
                out.setdefault(panel_key, {}).setdefault(name, {})[phase] = series
    return out


# ---------------------------------------------------------------------------------------------
# Plots (object-oriented matplotlib on the Agg canvas; no pyplot state)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(str(p) for p in parts)).strip("-")


def plot_curves(panel_key: tuple, panel: dict, path: Path) -> None:
    from matplotlib.lines import Line2D

    env, task, eval_set = panel_key
    phases = sorted({phase for groups in panel.values() for phase in groups})
    figure = _figure(5.0 * len(phases), 4.0 + 0.2 * ((len(panel) - 1) // 4))
    axes = figure.subplots(1, len(phases), squeeze=False)[0]
    names = sorted(panel)
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}  # Same colour in each phase.
    for ax, phase in zip(axes, phases):
        for name in names:
            series = panel[name].get(phase)
            if not series:
                continue
            steps, point, low, high, _ = (np.array(c) for c in zip(*series))
            ax.plot(steps, point, marker="o", markersize=3, color=colors[name], label=name)
            ax.fill_between(steps, low, high, color=colors[name], alpha=0.2)
        ax.set_title(f"{env} / {task} — {phase[1]} ({eval_set})")
        ax.set_xlabel("env steps in phase")
        ax.set_ylabel("score (IQM, 95% CI)")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[name], marker="o", label=name) for name in names]
    figure.legend(handles=handles, loc="lower center", ncols=min(4, len(names)), fontsize="small")
    figure.tight_layout(rect=(0, 0.06 + 0.05 * ((len(names) - 1) // 4), 1, 1))
    figure.savefig(path)


def plot_profile(rows: list[Row], path: Path, reps: int, seed: int) -> None:
    from rliable import library, plot_utils

    scores = {row.name: row.scores for row in rows}
    everything = np.concatenate([s.ravel() for s in scores.values()])
    low, high = float(everything.min()), float(everything.max())
    margin = 0.05 * (high - low) if high > low else 1.0
    taus = np.linspace(low - margin, high + margin, 81)
    with _seeded(seed):
        profiles, cis = library.create_performance_profile(scores, taus, reps=reps)
    figure = _figure(6.0, 3.8)
    ax = figure.subplots()
    plot_utils.plot_performance_profiles(
        profiles,
        taus,
        performance_profile_cis=cis,
        ax=ax,
        xlabel=f"{rows[0].score_key} (τ)",
        ylabel="fraction of runs with score > τ",
        labelsize="medium",
        ticklabelsize="small",
    )
    ax.set_title(f"{rows[0].env} / {rows[0].task} ({rows[0].eval_set})")
    ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)


def plot_transfer(table: list[dict], path: Path) -> None:
    figure = _figure(4.2 * len(TRANSFER_BARS), 0.5 * len(table) + 1.8)
    axes = figure.subplots(1, len(TRANSFER_BARS), squeeze=False)[0]
    names = [f"{r['env']}/{r['task']} {r['protocol']} / {r['agent']} ({r['phase']})" for r in table]
    for ax, metric in zip(axes, TRANSFER_BARS):
        point = np.array([r[f"{metric}"] for r in table], float)
        low = np.array([r[f"{metric}_low"] for r in table], float)
        high = np.array([r[f"{metric}_high"] for r in table], float)
        positions = np.arange(len(table))
        ax.barh(positions, point, xerr=[point - low, high - point], capsize=3, color="tab:blue")
        ax.axvline(1.0 if metric == "auc_ratio" else 0.0, color="black", linewidth=0.8)
        ax.set_yticks(positions)
        ax.set_yticklabels(names if ax is axes[0] else [], fontsize="small")
        ax.set_title(f"{metric} (mean, 95% CI)")
    figure.tight_layout()
    figure.savefig(path)


def plot_achievements(table: dict[str, dict[str, float]], path: Path):
    """Bars of each group's per-achievement success rates, which `table` holds in percent
    (as `envs.crafter.success_rates` gives them and the CSV stores them); returns the figure."""
    achievements = sorted({a for rates in table.values() for a in rates})
    figure = _figure(min(14.0, max(8.0, 0.45 * len(achievements))), 4.2)
    ax = figure.subplots()
    width = 0.8 / max(1, len(table))
    positions = np.arange(len(achievements))
    for offset, (name, rates) in enumerate(sorted(table.items())):
        values = [rates.get(a, 0.0) for a in achievements]
        ax.bar(positions + offset * width, values, width, label=name)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylabel("success rate (%)")
    ax.set_xticks(positions + 0.4 - width / 2)
    ax.set_xticklabels(achievements, rotation=60, ha="right", fontsize="small")
    ax.legend(fontsize="small")
    ax.set_ylim(0.0, 100.0)
    ax.set_title("Crafter achievements (final evaluation, mean over seeds)")
    figure.tight_layout()
    figure.savefig(path)
    return figure


# ---------------------------------------------------------------------------------------------
# The report


def transfer_metrics(trials: list[TrialRecord]) -> dict[str, dict]:
    """`{trial_id: metrics}`: each finished pretrained trial's last phase against its scratch
    twin found among `trials` (`benchmarks/transfer.py`), recomputed from the folders, so it
    does not matter which of the two finished first."""
    from benchmarks import transfer

    scratch = {}
    for trial in trials:
        if trial.protocol == SCRATCH and trial.done is not None:
            key = json.dumps(transfer._comparable(trial.config), sort_keys=True, default=str)
            scratch.setdefault(key, trial)
    out = {}
    for trial in trials:
        if trial.protocol == SCRATCH or trial.done is None:
            continue
        key = json.dumps(transfer._comparable(trial.config), sort_keys=True, default=str)
        twin = scratch.get(key)
        if twin is None:
            continue
        score = trial.score_key
        last = max((e.get("phase_index", 0) for e in trial.evals), default=0)
        mode = headline_mode(trial.config)
        threshold = (trial.config.get("protocol") or {}).get("threshold")
        phase = next((e["phase"] for e in trial.evals if e.get("phase_index", 0) == last), "")
        for key, metrics in transfer.against_twin(
            trial.evals, last, twin.evals, score, mode, threshold
        ).items():
            label = phase if key == score else f"{phase} ({key})"
            out.setdefault(trial.trial_id, {})[label] = metrics
    return out


def _transfer_table(trials: list[TrialRecord], reps: int, seed: int) -> list[dict]:
    values: dict[tuple, dict[str, list[float]]] = {}
    matched: dict[tuple, list] = {}
    computed = transfer_metrics(trials)
    for trial in trials:
        for phase, numbers in computed.get(trial.trial_id, {}).items():
            key = (trial.env, trial.task, trial.protocol, trial.label, phase)
            for metric in TRANSFER_KEYS:
                number = (numbers or {}).get(metric)
                if isinstance(number, (int, float)) and not isinstance(number, bool):
                    values.setdefault(key, {}).setdefault(metric, []).append(float(number))
            matched.setdefault(key, []).append((numbers or {}).get("matched_episodes"))
    table = []
    for (env, task, protocol, agent, phase), metrics in sorted(values.items()):
        flags = matched.get((env, task, protocol, agent, phase), [])
        row: dict[str, Any] = {
            "env": env,
            "task": task,
            "protocol": protocol,
            "agent": agent,
            "phase": phase,
            "seeds": max(len(v) for v in metrics.values()),
            # Seeds whose curve and scratch twin's were scored on the same episodes.
            "matched_episodes": f"{sum(f is True for f in flags)}/{len(flags)}",
        }
        for metric in TRANSFER_KEYS:
            numbers = np.array(metrics.get(metric, []))[:, None]
            if len(numbers):
                row[metric], row[f"{metric}_low"], row[f"{metric}_high"] = interval(
                    numbers, _mean, reps, seed
                )
            else:
                row[metric] = row[f"{metric}_low"] = row[f"{metric}_high"] = math.nan
        table.append(row)
    return table


def _achievement_table(rows: list[Row]) -> dict[str, dict[str, float]]:
    table = {}
    for row in rows:
        rates = [
            t.final_evals()[row.eval_set].get("success_rates")
            for t in row.trials
            if row.env == "crafter"
        ]
        rates = [r for r in rates if isinstance(r, dict)]
        if rates:
            names = sorted(set().union(*rates))
            table[f"{row.name} ({row.eval_set})"] = {
                a: float(np.mean([r.get(a, 0.0) for r in rates])) for a in names
            }
    return table


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


def write(
    results: Path,
    out: Optional[Path] = None,
    command: Optional[str] = None,
    reps: int = 5000,
    curve_reps: int = 1000,
    seed: int = 0,
) -> Path:
    """Read every trial below `results`; write `report.md`, CSV files and plots to `out`."""
    results = Path(results)
    out = Path(out) if out is not None else results
    if not results.is_dir():
        raise ReportError(f"results folder {results} does not exist")
    notes: list[str] = []
    trials = load_trials(results, notes)
    if not trials:
        raise ReportError(f"no trial folders (*/config.yaml) below {results}")
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    rows = final_rows(trials, reps, seed, notes)
    pairs = [
        (x, y, improvement(x.scores, y.scores, reps, seed)) for x, y in improvement_pairs(rows)
    ]
    curve_data = curves(trials, curve_reps, seed)
    transfer = _transfer_table(trials, reps, seed)
    achievements = _achievement_table(rows)
    finished = sum(t.done is not None for t in trials)

    md = [
        "# mbxfer report",
        "",
        f"Produced by `{command or ' '.join(sys.argv)}` on {time.strftime('%Y-%m-%d %H:%M')}.",
        f"Read {len(trials)} trial folders below `{results}` ({finished} finished, "
        f"{len(trials) - finished} unfinished). Libraries: {_versions()}.",
        "",
        "Score: the last evaluation of the last phase (`crafter_score` for Crafter, "
        "`success_rate` for Meta-World and RoboDesk, `normalized_return` for Procgen, "
        "`return_mean` otherwise), finished trials only. For Crafter the eval set "
        f"`{TRAINING_EPISODES}` is the Crafter paper's protocol: the score of every training "
        "episode of the last phase. IQM = interquartile mean over seeds; "
        f"brackets are stratified bootstrap 95% CIs (rliable, {reps} resamples, seed {seed}). "
        "Budgets are environment steps per phase.",
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
    score_csv = []
    panels: dict[tuple, list[Row]] = {}
    for row in rows:
        panels.setdefault((row.env, row.task, row.eval_set), []).append(row)
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
            score_csv.append(
                {
                    "env": env,
                    "task": task,
                    "eval_set": eval_set,
                    "protocol": row.protocol,
                    "agent": row.agent,
                    "score_key": row.score_key,
                    "seeds": len(row.seeds),
                    "budget": row.budget,
                    "iqm": row.iqm[0],
                    "iqm_low": row.iqm[1],
                    "iqm_high": row.iqm[2],
                    "mean": row.mean[0],
                    "mean_low": row.mean[1],
                    "mean_high": row.mean[2],
                }
            )
        profile = plots / f"profile_{_slug(env, task, eval_set)}.png"
        plot_profile(panel_rows, profile, curve_reps, seed)
        md += ["", f"![performance profile]({_link(profile, out)})"]
        if panel_key in curve_data:
            path = plots / f"curves_{_slug(env, task, eval_set)}.png"
            plot_curves(panel_key, curve_data[panel_key], path)
            md += [f"![learning curves]({_link(path, out)})"]
    for panel_key, panel in curve_data.items():
        if panel_key not in panels:  # Unfinished groups: curves only.
            path = plots / f"curves_{_slug(*panel_key)}.png"
            plot_curves(panel_key, panel, path)
            md += ["", f"Learning curves (no finished trial yet): ![curves]({_link(path, out)})"]

    if pairs:
        md += [
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
    if transfer:
        path = plots / "transfer.png"
        plot_transfer(transfer, path)
        md += [
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
        md += ["", f"![transfer]({_link(path, out)})"]
    if achievements:
        path = plots / "crafter_achievements.png"
        plot_achievements(achievements, path)
        md += ["", "## Crafter achievements", "", f"![achievements]({_link(path, out)})"]
        _write_csv(
            out / "crafter_achievements.csv",
            (
                {"group": g, "achievement": a, "success_rate": v}
                for g, rates in achievements.items()
                for a, v in rates.items()
            ),
        )

    unfinished = [t for t in trials if t.done is None]
    if unfinished:
        md += [
            "",
            "## Unfinished trials",
            "",
            "| trial | env / task | protocol | agent | seed | status | evaluations "
            "| last env steps |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for t in unfinished:
            last = t.evals[-1]["total_env_steps"] if t.evals else 0
            md.append(
                f"| [{t.trial_id}]({_link(t.folder, out)}) | {t.env} / {t.task} | {t.protocol} "
                f"| {t.label} | {t.seed} | {_unfinished_status(t, out)} | {len(t.evals)} "
                f"| {last:,} |"
            )
    videos = [t for t in trials if (t.folder / "video.gif").exists()]
    if videos:
        md += ["", "## Videos", ""]
        for t in videos:
            md.append(
                f"- {t.env} / {t.task}, {t.protocol}, {t.label}, seed {t.seed}: "
                f"[video.gif]({_link(t.folder / 'video.gif', out)})"
            )
    if notes:
        md += ["", "## Notes", ""] + [f"- {note}" for note in notes]

    _write_csv(out / "scores.csv", score_csv)
    _write_csv(
        out / "trials.csv",
        (
            {
                "trial_id": t.trial_id,
                "folder": _link(t.folder, out),
                "env": t.env,
                "task": t.task,
                "protocol": t.protocol,
                "agent": t.label,
                "seed": t.seed,
                "finished": t.done is not None,
                "eval_set": s,
                "phase": r["phase"],
                "env_steps": r["env_steps"],
                "total_env_steps": r["total_env_steps"],
                "score_key": t.score_key,
                "score": r.get(t.score_key, r.get(FALLBACK_SCORE)),
            }
            for t in trials
            for s, r in t.final_evals().items()
        ),
    )
    _write_csv(
        out / "curves.csv",
        (
            {
                "env": k[0],
                "task": k[1],
                "eval_set": k[2],
                "group": name,
                "phase": phase[1],
                "env_steps": p[0],
                "iqm": p[1],
                "iqm_low": p[2],
                "iqm_high": p[3],
                "runs": p[4],
            }
            for k, panel in curve_data.items()
            for name, phases in panel.items()
            for phase, series in phases.items()
            for p in series
        ),
    )
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
            for x, y, v in pairs
        ),
    )
    _write_csv(out / "transfer.csv", transfer)
    report = out / "report.md"
    report.write_text("\n".join(md) + "\n")
    return report
