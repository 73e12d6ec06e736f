"""Do the decoders learn alike? A table over the trial folders of a decoder sweep.

    python -m mbxfer sweep benchmarks/configs/decoder_upsample.yaml --workers 1
    python -m mbxfer.benchmarks.perf.decoders results/decoder_upsample

For every agent x environment, one row per `agent.model.decoder_upsample`: the seeds found,
the final evaluation's mean return (sampled and greedy; mean and standard deviation over
seeds), the reconstruction loss logged last (`train/loss/reconstruction`, image MSE summed
over pixels), the world-model video's open-loop error (mean squared error per pixel in [0, 1]
units, averaged over the imagined steps: `video.open_loop_mse` in done.json), and env steps
per second of the whole trial. A line per other decoder gives the mean over seeds of its paired
differences from transpose (same seed). Only finished trials (done.json) count.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

COLUMNS = ("sampled", "greedy", "recon", "video_mse", "steps_per_s")


def _last_metric(path: Path, key: str) -> Optional[float]:
    value = None
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            value = row.get(key, value)
    return value


def trial_row(folder: Path) -> Optional[dict[str, Any]]:
    """The figures of one finished trial folder, or None when it has no done.json."""
    done_path = folder / "done.json"
    if not done_path.exists():
        return None
    done = json.loads(done_path.read_text())
    config = yaml.safe_load((folder / "config.yaml").read_text())
    agent = config["agent"]
    modes = done["phases"][-1]["final_eval"]["eval"].get("modes", {})
    video = done.get("video") or {}
    metrics = folder / "metrics.jsonl"
    return {
        "agent": agent["name"],
        "env": config["env"]["name"],
        "decoder": agent.get("model", {}).get("decoder_upsample", "transpose"),
        "seed": config["seed"],
        "sampled": modes.get("sampled", {}).get("return_mean"),
        "greedy": modes.get("greedy", {}).get("return_mean"),
        "recon": _last_metric(metrics, "train/loss/reconstruction"),
        "video_mse": statistics.mean(video["open_loop_mse"])
        if video.get("open_loop_mse")
        else None,
        "steps_per_s": _last_metric(metrics, "env_steps_per_second"),
    }


def _mean_sd(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def summarize(rows: Sequence[dict[str, Any]]) -> str:
    """The table: per agent/env, a row per decoder (in `networks.UPSAMPLES` order) and, for
    each other decoder, the paired differences from `transpose` over the seeds both ran."""
    from mbxfer.agents.networks import UPSAMPLES

    lines = [
        f"{'agent/env':20s} {'decoder':28s} {'seeds':>5s} "
        + " ".join(f"{name:>17s}" for name in COLUMNS)
    ]
    lines.append("-" * len(lines[0]))

    def order(decoder: str) -> int:
        return UPSAMPLES.index(decoder) if decoder in UPSAMPLES else len(UPSAMPLES)

    for agent, env in sorted({(row["agent"], row["env"]) for row in rows}):
        mine = [row for row in rows if (row["agent"], row["env"]) == (agent, env)]
        by_decoder = {}
        for decoder in sorted({row["decoder"] for row in mine}, key=order):
            chosen = sorted((r for r in mine if r["decoder"] == decoder), key=lambda r: r["seed"])
            by_decoder[decoder] = {row["seed"]: row for row in chosen}
            lines.append(
                f"{agent + '/' + env:20s} {decoder:28s} {len(chosen):5d} "
                + " ".join(f"{_mean_sd([r[c] for r in chosen]):>17s}" for c in COLUMNS)
            )
        baseline = by_decoder.get("transpose")
        for decoder, runs in by_decoder.items():
            if decoder == "transpose" or baseline is None:
                continue
            seeds = sorted(set(baseline) & set(runs))
            cells = [
                _mean_sd(
                    [
                        runs[s][column] - baseline[s][column]
                        for s in seeds
                        if runs[s][column] is not None and baseline[s][column] is not None
                    ]
                )
                for column in COLUMNS
            ]
            lines.append(
                f"{'':20s} {decoder + ' - transpose':28s} {len(seeds):5d} "
                + " ".join(f"{cell:>17s}" for cell in cells)
            )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path, help="a sweep's results folder")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder (run the sweep first)")
    rows = [
        row
        for sub in sorted(args.folder.iterdir())
        if sub.is_dir()
        for row in [trial_row(sub)]
        if row
    ]
    if not rows:
        parser.error(f"no finished trial in {args.folder}")
    print(summarize(rows))
    return rows


if __name__ == "__main__":
    main()
