"""Validation: PPO on CartPole-v1 through the one loop, several seeds, IQM with a bootstrap CI.

    python -m mbxfer.benchmarks.validation.ppo_cartpole [--seeds 5] [--steps 100000] [--workers 2]

Each seed is an ordinary trial of `benchmarks.runner.run` (agent `ppo`, environment `cartpole`,
CleanRL's PPO settings: 4 environments, 128-step rollouts, learning rate annealed over the
budget) in `--out/seed-<i>`; a finished seed is not run again. Two scores per seed:

* `eval`: mean return of `--eval-episodes` greedy episodes at the end (eval.jsonl);
* `train`: mean return of the training episodes (sampled actions) that ended in the last
  `--window` environment steps (metrics.jsonl).

For each, the interquartile mean over seeds and its 95% stratified bootstrap confidence interval
(rliable). CartPole-v1 truncates episodes at 500 steps, so 500 is the maximum return; CleanRL's
PPO reaches about 475 within 100k steps. Checkpoints are written only at the end so that no
training episode is cut by the runner's reseeding.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mbxfer.benchmarks import config as config_lib

DEFAULT_OUT = Path("results/validation/ppo_cartpole")


def trial_config(seed: int, steps: int, eval_episodes: int) -> config_lib.TrialConfig:
    """The CartPole trial of one seed."""
    overrides = [
        "agent=ppo",
        "env.name=cartpole",
        "env.task=reward",
        "env.num_envs=4",
        f"seed={seed}",
        f"agent.anneal_steps={steps}",
        f"train.steps={steps}",
        f"train.eval_every={max(steps // 10, 1)}",
        f"train.eval_episodes={eval_episodes}",
        f"train.checkpoint_every={steps}",
        "train.log_every=2000",
    ]
    return config_lib.build(config_lib.parse_overrides(overrides))


def training_return(metrics_path: Path, steps: int, window: int) -> float:
    """Mean return of the training episodes that ended in the last `window` steps."""
    total, episodes = 0.0, 0
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        count = record.get("episode/episodes", 0)
        if record["env_steps"] > steps - window and count:
            total += record["episode/return_mean"] * count
            episodes += count
    return total / episodes if episodes else float("nan")


def run_seed(seed: int, steps: int, eval_episodes: int, window: int, out: Path) -> dict:
    """Train (or reload) one seed; its scores and wall time."""
    from mbxfer.benchmarks import runner

    folder = Path(out) / f"seed-{seed}"
    finished_before = (folder / "done.json").exists()
    started = time.time()
    summary = runner.run(trial_config(seed, steps, eval_episodes), folder, progress=False)
    return {
        "seed": seed,
        "eval": summary["final_eval"]
        .get("modes", {})
        .get("greedy", summary["final_eval"])["return_mean"],
        "train": training_return(folder / "metrics.jsonl", steps, window),
        "seconds": None if finished_before else time.time() - started,
    }


def iqm_with_ci(scores: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """Interquartile mean of `scores` (one per run) and its 95% stratified bootstrap CI: the
    report's `stats.interval` (seeded resampling), so validation tables and reports agree."""
    from rliable import metrics

    from mbxfer.benchmarks import stats

    score_matrix = np.asarray(scores, np.float64)[:, None]  # [runs, tasks=1]
    return stats.interval(score_matrix, metrics.aggregate_iqm, reps=20000, seed=seed)


def report(results: list[dict], steps: int) -> str:
    """A markdown table of the seeds and the IQM with its CI for both scores."""
    lines = [
        f"PPO on CartPole-v1, {steps} environment steps",
        "",
        "| seed | final eval return | training return (last window) | wall time (s) |",
        "|---:|---:|---:|---:|",
    ]
    for r in sorted(results, key=lambda r: r["seed"]):
        seconds = "(earlier run)" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['seed']} | {r['eval']:.1f} | {r['train']:.1f} | {seconds} |")
    lines.append("")
    for key, name in (("eval", "final eval return"), ("train", "training return")):
        iqm, low, high = iqm_with_ci([r[key] for r in results])
        solved = sum(r[key] >= 475 for r in results)
        lines.append(
            f"{name}: IQM {iqm:.1f}, 95% CI [{low:.1f}, {high:.1f}]; "
            f"{solved}/{len(results)} seeds >= 475"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--window", type=int, default=10_000, help="training-return window")
    parser.add_argument("--workers", type=int, default=1, help="seeds trained at once")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    jobs = [(s, args.steps, args.eval_episodes, args.window, args.out) for s in range(args.seeds)]
    started = time.time()
    if args.workers > 1:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            results = pool.starmap(run_seed, jobs)
    else:
        results = [run_seed(*job) for job in jobs]
    text = report(results, args.steps) + f"\ntotal wall time: {time.time() - started:.0f} s"
    print(text)
    return text


if __name__ == "__main__":
    main()
