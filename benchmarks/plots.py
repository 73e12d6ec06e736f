"""Report plots: object-oriented matplotlib on the Agg canvas (no pyplot state).

Each `plot_*` function turns report statistics into a matplotlib Figure and draws nothing
else; `save` writes a figure once per requested format (`FORMATS`) under one basename.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from mbxfer.benchmarks.results import SCRATCH
from mbxfer.benchmarks.stats import TRANSFER_BARS, Row, seeded

FORMATS = ("png", "pdf", "svg")
"""Figure formats `save` writes: PNG for report.md, PDF and SVG (vector) for papers."""
DEFAULT_FORMATS = ("png", "pdf")
PNG_DPI = 150
MAX_PROFILE_GROUPS = 5
"""More curves than this make a performance profile unreadable; `profile_parts` splits them."""
INTERVAL_METRICS = (
    ("median", "Median"),
    ("iqm", "IQM"),
    ("mean", "Mean"),
    ("optimality_gap", "Optimality gap"),
)
"""(Row attribute, title) of the panels of `plot_intervals`, in Agarwal et al.'s order."""


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def save(figure, base: Path, formats: Sequence[str] = DEFAULT_FORMATS) -> list[Path]:
    """Write `figure` to `base`.<format> for each of `formats`; returns the paths.

    PNG at `PNG_DPI`; PDF with TrueType fonts (Type 42, which paper templates accept where
    they reject Type 3); PDF and SVG without a date, so an unchanged report rewrites
    identical files.
    """
    import matplotlib

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown figure formats {unknown}; choose from {', '.join(FORMATS)}")
    paths = []
    for fmt in formats:
        path = base.parent / f"{base.name}.{fmt}"
        options: dict = {"dpi": PNG_DPI} if fmt == "png" else {}
        if fmt in ("pdf", "svg"):
            options["metadata"] = {"CreationDate" if fmt == "pdf" else "Date": None}
        with matplotlib.rc_context({"pdf.fonttype": 42, "svg.hashsalt": "mbxfer"}):
            figure.savefig(path, format=fmt, **options)
        paths.append(path)
    return paths


def group_colors(names: Sequence[str]) -> dict[str, str]:
    """One colour per group name (sorted), so a group keeps its colour in every figure of a
    panel, split profiles included."""
    return {name: f"C{i % 10}" for i, name in enumerate(sorted(set(names)))}


def plot_curves(panel_key: tuple, panel: dict):
    """Learning curves of one panel: IQM with its CI per group, one subplot per phase."""
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
    return figure


def profile_parts(rows: list[Row], most: int = MAX_PROFILE_GROUPS) -> list[tuple[str, list[Row]]]:
    """A panel's rows as (part name, rows) of at most `most` groups each, one performance
    profile per part. A panel that fits is one part named "". Otherwise each agent family
    (an agent under every protocol and variant, so pretrained runs sit beside their scratch
    baseline) is a part; a family larger than `most` is cut into numbered parts that each
    repeat its scratch rows, and whole families small enough share a part."""
    if len(rows) <= most:
        return [("", list(rows))]
    families: dict[str, list[Row]] = {}
    for row in rows:
        families.setdefault(row.trials[0].agent, []).append(row)
    chunks: list[tuple[str, list[Row], bool]] = []  # (name, rows, a whole family)
    for family, members in families.items():
        if len(members) <= most:
            chunks.append((family, members, True))
            continue
        baseline = [r for r in members if r.protocol == SCRATCH]
        if len(baseline) >= most:  # Scratch variants alone fill a figure: no repetition.
            baseline = []
        others = [r for r in members if r not in baseline]
        size = most - len(baseline)
        for number, start in enumerate(range(0, len(others), size), 1):
            chunks.append((f"{family}-{number}", others[start : start + size] + baseline, False))
    parts: list[tuple[str, list[Row], bool]] = []
    for name, members, whole in chunks:
        if parts and whole and parts[-1][2] and len(parts[-1][1]) + len(members) <= most:
            parts[-1] = (f"{parts[-1][0]}+{name}", parts[-1][1] + members, True)
        else:
            parts.append((name, members, whole))
    return [(name, members) for name, members, _ in parts]


def profiles(rows: list[Row], reps: int, seed: int) -> tuple[np.ndarray, dict, dict]:
    """(taus, profile, CI) of every row of one panel, on one τ grid spanning all its runs so
    the figures of a split panel share their x axis."""
    from rliable import library

    scores = {row.name: row.scores for row in rows}
    everything = np.concatenate([s.ravel() for s in scores.values()])
    low, high = float(everything.min()), float(everything.max())
    margin = 0.05 * (high - low) if high > low else 1.0
    taus = np.linspace(low - margin, high + margin, 81)
    with seeded(seed):
        curves, cis = library.create_performance_profile(scores, taus, reps=reps)
    return taus, curves, cis


def plot_profile(
    rows: list[Row], taus: np.ndarray, curves: dict, cis: dict, colors: dict, part: str = ""
):
    """The performance profile of `rows` (the score distribution: fraction of runs above τ,
    with CI bands) from `profiles`' output; `part` names a split panel's part in the title."""
    from rliable import plot_utils

    names = [row.name for row in rows]
    figure = _figure(6.0, 3.4 + 0.2 * len(names))
    figure.set_layout_engine("constrained")
    ax = figure.subplots()
    plot_utils.plot_performance_profiles(
        {name: curves[name] for name in names},
        taus,
        performance_profile_cis={name: cis[name] for name in names},
        colors=colors,
        ax=ax,
        xlabel=f"{rows[0].score_key} (τ)",
        ylabel="fraction of runs with score > τ",
        labelsize="medium",
        ticklabelsize="small",
    )
    ax.set_xlim(taus[0], taus[-1])
    title = f"{rows[0].env} / {rows[0].task} ({rows[0].eval_set})"
    ax.set_title(f"{title}: {part}" if part else title, fontsize="medium")
    # Below the axes: inside, the legend would hide the curves it names.
    figure.legend(loc="outside lower center", fontsize="small", frameon=False)
    return figure


def plot_intervals(rows: list[Row], colors: dict):
    """Median, IQM, mean and optimality gap of each row with their 95% CIs (Agarwal et al.
    2021, Fig. 1, as rliable's `plot_interval_estimates` draws it): a bar per group spans the
    CI and a black tick marks the point estimate. Groups run top to bottom in `rows` order."""
    from matplotlib.ticker import MaxNLocator

    names = [row.name for row in rows]
    positions = np.arange(len(rows))
    height = 0.6
    figure = _figure(
        2.0 * len(INTERVAL_METRICS) + 0.065 * max(map(len, names)), 0.35 * len(rows) + 1.3
    )
    figure.set_layout_engine("constrained")
    axes = figure.subplots(1, len(INTERVAL_METRICS), sharey=True, squeeze=False)[0]
    for ax, (metric, title) in zip(axes, INTERVAL_METRICS):
        point, low, high = (np.array(v, float) for v in zip(*(getattr(r, metric) for r in rows)))
        ax.barh(
            positions,
            high - low,
            height=height,
            left=low,
            color=[colors[name] for name in names],
            alpha=0.75,
            label="95% CI",
        )
        ax.vlines(
            point,
            positions - height / 2,
            positions + height / 2,
            color="black",
            linewidth=1.5,
            label="point estimate",
        )
        if metric == "optimality_gap":
            title = f"{title} (γ = {rows[0].gamma:.3g})"
        ax.set_title(title, fontsize="medium")
        ax.use_sticky_edges = False  # A margin around the bars, as around any other data.
        ax.margins(x=0.05)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.tick_params(labelsize="small", length=0)
        ax.grid(axis="x", alpha=0.25)
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
    axes[0].set_yticks(positions, names)
    axes[0].set_ylim(len(rows) - 0.5, -0.5)  # First row on top.
    figure.suptitle(
        f"{rows[0].env} / {rows[0].task} ({rows[0].eval_set}): final {rows[0].score_key}",
        fontsize="medium",
    )
    figure.supxlabel("bars: 95% stratified bootstrap CI; tick: point estimate", fontsize="small")
    return figure


def plot_improvement(pairs: list[tuple[Row, Row, tuple[float, float, float]]]):
    """P(X > Y) with its 95% CI per (X, Y) pair of one panel, as rliable draws it (X on the
    left, Y on the right, a bar per CI and a tick at the estimate); 0.5 means no difference."""
    from rliable import plot_utils

    first = pairs[0][0]
    separator = "\t"  # Group names may hold commas (variants), never tabs.
    estimates = {f"{x.name}{separator}{y.name}": value[0] for x, y, value in pairs}
    intervals = {f"{x.name}{separator}{y.name}": value[1:] for x, y, value in pairs}
    longest = max(len(row.name) for pair in pairs for row in pair[:2])
    figure = _figure(3.5 + 0.14 * longest, 0.45 * len(pairs) + 1.4)
    ax = figure.subplots()
    plot_utils.plot_probability_of_improvement(
        estimates,
        intervals,
        pair_separator=separator,
        ax=ax,
        colors=[f"C{i % 10}" for i in range(len(pairs))],
        xticks=[0.0, 0.25, 0.5, 0.75, 1.0],
        left_ylabel="X",
        right_ylabel="Y",
        labelsize="medium",
        ticklabelsize="small",
    )
    ax.set_xlim(0.0, 1.0)
    ax.axvline(0.5, color="gray", linewidth=0.8, linestyle="--")
    for side in figure.axes:  # Both sides, X's and Y's (a twin), first pair on top.
        side.set_ylim(len(pairs) - 0.5, -0.5)
    ax.set_title(
        f"{first.env} / {first.task} ({first.eval_set}): P(X > Y), 95% CI", fontsize="medium"
    )
    figure.tight_layout()
    return figure


def plot_transfer(table: list[dict]):
    """Jumpstart, AUC ratio and final gain of each pretrained group against its scratch
    twins (mean over seeds, 95% CI)."""
    names = [f"{r['env']}/{r['task']} {r['protocol']} / {r['agent']} ({r['phase']})" for r in table]
    figure = _figure(
        2.8 * len(TRANSFER_BARS) + 0.065 * max(map(len, names)), 0.45 * len(table) + 1.4
    )
    figure.set_layout_engine("constrained")
    axes = figure.subplots(1, len(TRANSFER_BARS), sharey=True, squeeze=False)[0]
    for ax, metric in zip(axes, TRANSFER_BARS):
        point = np.array([r[f"{metric}"] for r in table], float)
        low = np.array([r[f"{metric}_low"] for r in table], float)
        high = np.array([r[f"{metric}_high"] for r in table], float)
        positions = np.arange(len(table))
        ax.barh(positions, point, xerr=[point - low, high - point], capsize=3, color="tab:blue")
        ax.axvline(1.0 if metric == "auc_ratio" else 0.0, color="black", linewidth=0.8)
        ax.set_title(f"{metric} (mean, 95% CI)", fontsize="medium")
        ax.tick_params(labelsize="small")
    axes[0].set_yticks(np.arange(len(table)), names)
    axes[0].set_ylim(len(table) - 0.5, -0.5)  # First row on top, as in the table.
    return figure


def plot_achievements(table: dict[str, dict[str, float]]):
    """Bars of each group's per-achievement success rates, which `table` holds in percent
    (as `envs.crafter.success_rates` gives them and the CSV stores them)."""
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
    return figure


def plot_member_heatmap(title: str, table: dict[str, dict[str, float]], score_key: str):
    """A heatmap of `table` (row -> member -> score): one row per group and evaluation set, one
    column per member, each cell annotated; members a row did not play are grey."""
    import matplotlib

    rows = list(table)
    members = list(dict.fromkeys(m for scores in table.values() for m in scores))
    values = np.full((len(rows), len(members)), np.nan)
    for i, row in enumerate(rows):
        for j, member in enumerate(members):
            values[i, j] = table[row].get(member, np.nan)
    figure = _figure(min(18.0, 3.5 + 0.7 * len(members)), min(12.0, 1.8 + 0.5 * len(rows)))
    ax = figure.subplots()
    colormap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    limits = {"vmin": 0.0, "vmax": 1.0} if score_key == "success_rate" else {}
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=colormap, **limits)
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    middle = 0.5 if limits else middle
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            color = "black" if value > middle else "white"
            ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize="x-small", color=color)
    ax.set_xticks(np.arange(len(members)), members, rotation=60, ha="right", fontsize="small")
    ax.set_yticks(np.arange(len(rows)), rows, fontsize="small")
    figure.colorbar(image, ax=ax, label=score_key)
    ax.set_title(f"{title}: {score_key} per member", fontsize="medium")
    figure.tight_layout()
    return figure
