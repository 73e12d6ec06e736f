"""Report plots: object-oriented matplotlib on the Agg canvas (no pyplot state)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mbxfer.benchmarks.stats import TRANSFER_BARS, Row, seeded


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


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
    with seeded(seed):
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
