"""Sweep overhead: N trivial trials through `sweep.run` vs the same trials in one loop.

    python -m mbxfer.benchmarks.perf.sweep_overhead --trials 20 --workers 1

Both sides run the same 20 trials (random agent on the toy grid, a few hundred steps each)
in the same invocation, into separate temporary folders: first a plain loop calling
`runner.run` in this process, then `sweep.run` with the local executor (spawned worker
processes, progress files, the index, locks). The ratio sweep / loop is the price of the
sweep machinery on trials so short that nothing else hides it; on real trials (minutes to
hours) the fixed per-worker start-up and the per-trial bookkeeping vanish.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def _spec(trials: int, steps: int) -> dict:
    return {
        "agents": ["random"],
        "envs": [{"name": "grid", "task": "collect_items"}],
        "seeds": list(range(trials)),
        "base": {
            "env": {"num_envs": 2},
            "train": {
                "steps": steps,
                "eval_every": steps,
                "eval_episodes": 2,
                "checkpoint_every": steps,
                "log_every": steps,
                "video": False,
            },
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials on each side")
    parser.add_argument("--steps", type=int, default=200, help="environment steps per trial")
    parser.add_argument("--workers", type=int, default=1, help="sweep worker processes")
    args = parser.parse_args(argv)

    from mbxfer.benchmarks import runner, sweep, sweep_spec

    plan = sweep_spec.expand(_spec(args.trials, args.steps))
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        for trial in plan.trials:
            runner.run(trial.config, Path(root) / "loop" / trial.trial_id, progress=False)
        loop = time.perf_counter() - start

        start = time.perf_counter()
        outcome = sweep.run(plan, Path(root) / "sweep", workers=args.workers, stream=None)
        swept = time.perf_counter() - start
        assert outcome.ok, outcome.errors
    result = {
        "trials": args.trials,
        "steps_per_trial": args.steps,
        "workers": args.workers,
        "loop_seconds": round(loop, 2),
        "sweep_seconds": round(swept, 2),
        "ratio_sweep_over_loop": round(swept / loop, 3),
        "overhead_per_trial_seconds": round((swept - loop) / args.trials, 3),
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
