"""Report statistics, all through rliable (Agarwal et al. 2021): final-score rows with the
interquartile mean (IQM), mean, median and optimality gap over seeds and their stratified
bootstrap 95% confidence intervals, probabilities of improvement, learning curves, and transfer
against scratch twins.

Only finished trials (`done.json`) enter the final-score statistics; learning curves use every
evaluation written so far. Each bootstrap starts from numpy's global RNG seeded with `seed`
(rliable resamples with it; the caller's RNG state is restored afterwards), so a report is
reproducible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable

import numpy as np

from mbxfer.benchmarks.results import FALLBACK_SCORE, SCRATCH, TrialRecord, headline_mode

TRANSFER_BARS = ("jumpstart", "auc_ratio", "final_gain")
TRANSFER_KEYS = (*TRANSFER_BARS, "steps_to_threshold", "scratch_steps_to_threshold")
NORMALIZED_SCORES = {"success_rate": 1.0, "normalized_return": 1.0}
"""Score keys with a known best score: the optimality gap's threshold gamma (rliable's 1 for
normalized scores). Other scores are raw returns; their gamma is the best run of the panel."""


@contextlib.contextmanager
def seeded(seed: int):
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

    with seeded(seed):
        points, intervals = library.get_interval_estimates(
            {"x": scores}, lambda x: np.array([aggregate(x)]), reps=reps
        )
    return float(points["x"][0]), float(intervals["x"][0, 0]), float(intervals["x"][1, 0])


def improvement(x: np.ndarray, y: np.ndarray, reps: int, seed: int) -> tuple[float, float, float]:
    """P(X > Y) with its 95% CI (independent stratified bootstrap of both sides)."""
    from rliable import library, metrics

    with seeded(seed):
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


def _median(scores: np.ndarray) -> float:
    """The median over every run. rliable's `aggregate_median` is the median of per-task means,
    which equals the mean when a panel holds one task, as each of ours does."""
    return float(np.median(scores))


def optimality_threshold(score_key: str, scores: list[np.ndarray]) -> float:
    """gamma of the optimality gap of a panel whose groups scored `scores`: the known best score
    of a normalized score key, else the best run of the panel (the gap is then the shortfall
    from the best run anyone reached, comparable within the panel only)."""
    if score_key in NORMALIZED_SCORES:
        return NORMALIZED_SCORES[score_key]
    return float(max(np.max(s) for s in scores))


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
    median: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    optimality_gap: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    """gamma - mean(min(score, gamma)): how far runs fall short of `gamma` (lower is better)."""
    gamma: float = math.nan
    """The optimality gap's threshold (`optimality_threshold`), shared by a panel's rows."""

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
    """Final-score rows of finished trials, with IQM, mean, median and optimality gap and
    their CIs."""
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
            row.median = interval(scores, _median, reps, seed)
            rows.append(row)
    panels: dict[tuple, list[Row]] = {}
    for row in rows:
        panels.setdefault((row.env, row.task, row.eval_set), []).append(row)
    for panel in panels.values():
        gamma = optimality_threshold(panel[0].score_key, [row.scores for row in panel])
        for row in panel:
            row.gamma = gamma
            gap = functools.partial(_optimality_gap, gamma=gamma)
            row.optimality_gap = interval(row.scores, gap, reps, seed)
    return rows


def _optimality_gap(scores: np.ndarray, gamma: float) -> float:
    from rliable import metrics

    return float(metrics.aggregate_optimality_gap(scores, gamma))


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


def transfer_metrics(trials: list[TrialRecord]) -> dict[str, dict]:
    """`{trial_id: metrics}`: each finished pretrained trial's last phase against its scratch
    twin found among `trials` (`benchmarks/transfer.py`), recomputed from the folders, so it
    does not matter which of the two finished first."""
    from mbxfer.benchmarks import transfer

    scratch = {}
    for trial in trials:
        if trial.protocol == SCRATCH and trial.done is not None:
            key = transfer.twin_key(trial.config)
            scratch.setdefault(key, trial)
    out = {}
    for trial in trials:
        if trial.protocol == SCRATCH or trial.done is None:
            continue
        key = transfer.twin_key(trial.config)
        twin = scratch.get(key)
        if twin is None:
            continue
        score = trial.score_key
        last = max((e.get("phase_index", 0) for e in trial.evals), default=0)
        mode = headline_mode(trial.config)
        threshold = (trial.config.get("protocol") or {}).get("threshold")
        phase = next((e["phase"] for e in trial.evals if e.get("phase_index", 0) == last), "")
        eval_set = ((trial.done or {}).get("transfer") or {}).get("eval_set", "eval")
        for key, metrics in transfer.against_twin(
            trial.evals, last, twin.evals, score, mode, threshold, eval_set
        ).items():
            label = phase if key == score else f"{phase} ({key})"
            out.setdefault(trial.trial_id, {})[label] = metrics
    return out


def transfer_table(trials: list[TrialRecord], reps: int, seed: int) -> list[dict]:
    values: dict[tuple, dict[str, list[float]]] = {}
    matched: dict[tuple, list] = {}
    computed = transfer_metrics(trials)
    # In seed order, as final_rows: the bootstrap must not depend on folder names.
    for trial in sorted(trials, key=lambda t: (t.seed, t.trial_id)):
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


def achievement_table(rows: list[Row]) -> dict[str, dict[str, float]]:
    table = {}
    for row in rows:
        # Per-achievement success rates, where a family's summaries have them (Crafter).
        rates = [t.final_evals()[row.eval_set].get("success_rates") for t in row.trials]
        rates = [r for r in rates if isinstance(r, dict)]
        if rates:
            names = sorted(set().union(*rates))
            table[f"{row.name} ({row.eval_set})"] = {
                a: float(np.mean([r.get(a, 0.0) for r in rates])) for a in names
            }
    return table
