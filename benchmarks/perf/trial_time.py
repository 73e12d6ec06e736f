"""Where a short Crafter trial's wall time goes, per agent, and the hours 1M steps would take.

    python -m mbxfer.benchmarks.perf.trial_time                     # dreamer, muzero
    python -m mbxfer.benchmarks.perf.trial_time --steps 1400 --json trial_time.json \
        --variant dreamer --variant "dreamer transpose=dreamer,agent.model.decoder_upsample=transpose"

Each variant is the `scratch` trial of `benchmarks/configs/crafter_1h.yaml` for its agent
(2 Crafter environments in worker processes, batch 8 x 32, train ratio 8, learning from step
1,000, the preset's networks), cut to `--steps` environment steps, plus the variant's
overrides (`NAME=AGENT,key=value,...`). It runs twice: once to fill JAX's persistent
compilation cache (the run a user makes first), then timed, so compile time is excluded as
on every later trial. The timed run records every part through `benchmarks.timing`.

Printed per variant: env steps/s once learning (from the first update to the end of the
loop), the split of the trial's whole wall time into update, act, env step, evaluation
episodes (their acting and stepping), the rest of evaluation (reseeding, scoring), checkpoint,
build (environments and agent), init (parameters), video, log and other; the share outside
update + act + env, and outside those and the evaluation episodes (the fixed costs); the
seconds the first calls of the jitted update and act functions took beyond their later
calls ("first calls": tracing, lowering and loading from the compilation cache, inside the
update and act parts, so not in the fixed costs; init and video include theirs); and the
projected hours to 1M environment steps at the learning rate of steps. Variants alternate
per round (`--rounds`), so a ratio between them is measured side by side on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

PRESET = Path(__file__).resolve().parents[1] / "configs" / "crafter_1h.yaml"
CORE = ("update", "act", "env")
JITTED = ("update", "act", "eval_act")  # Parts whose first call traces (`first_call_excess`).
PARTS = ("update", "act", "env", "eval episodes", "eval other", "checkpoint", "build", "init",
         "video", "log")  # fmt: skip


def trial_config(agent: str, steps: int, overrides: list[str]):
    """The crafter_1h scratch trial of `agent`, cut to `steps`, with `key=value` overrides."""
    from mbxfer.benchmarks import config as config_lib
    from mbxfer.benchmarks import sweep_spec

    sweep = sweep_spec.expand(sweep_spec.load_spec(PRESET))
    found = [
        t.config
        for t in sweep.trials
        if t.config.agent == agent and t.config.protocol.name == "scratch"
    ]
    if not found:
        raise SystemExit(f"crafter_1h.yaml has no scratch trial of agent {agent!r}")
    plain = found[0].to_dict()
    plain["train"]["steps"] = steps
    config_lib.merge(plain, config_lib.parse_overrides(overrides))
    return config_lib.build(plain)


def first_call_excess(timer, part: str) -> float:
    """How much longer the first interval of `part` took than its median later one: for a
    jitted call, tracing, lowering and loading the compiled program from the persistent
    cache (or compiling it), which every process pays once per function."""
    times = [i.seconds for i in timer.intervals if i.part == part]
    if len(times) < 2:
        return 0.0
    return max(times[0] - statistics.median(times[1:]), 0.0)


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    """`NAME=AGENT,key=value,...` or `AGENT,key=value,...` -> (name, agent, overrides)."""
    head, _, tail = text.partition(",")
    name, agent = head.split("=", 1) if "=" in head else (text, head)
    return name.strip(), agent.strip(), [item for item in tail.split(",") if item]


def timed_trial(config, folder: Path) -> dict:
    """Run the trial into `folder` with a timeline; its split and rates."""
    from mbxfer.benchmarks import runner, timing

    timer = timing.Timeline()
    start = time.perf_counter()
    summary = runner.run(config, folder, progress=False, timer=timer)
    wall = time.perf_counter() - start
    seconds = timer.seconds()
    first_update = timer.first("update")
    learning = {}
    if first_update is not None:
        loop_end = max(i.start + i.seconds for i in timer.intervals if i.part in CORE)
        steps = config.train.steps - config.train.learning_starts
        duration = loop_end - first_update.start
        learning = {
            "steps_per_second": steps / duration,
            "hours_per_million": 1e6 / (steps / duration) / 3600,
        }
    split = {part: seconds.get(part, 0.0) for part in PARTS}
    # Evaluation: its episodes (acting and stepping) and the rest (reseeding, scoring).
    split["eval episodes"] = seconds.get("eval_act", 0.0) + seconds.get("eval_env", 0.0)
    split["eval other"] = seconds.get("evaluate", 0.0) - split["eval episodes"]
    split["other"] = max(wall - sum(split.values()), 0.0)
    core = sum(split[p] for p in CORE)
    return {
        "wall_seconds": wall,
        "split_seconds": split,
        "first_calls": sum(first_call_excess(timer, part) for part in JITTED),
        "outside_core": 1.0 - core / wall,
        "fixed": 1.0 - (core + split["eval episodes"]) / wall,
        "updates": summary["updates"],
        **learning,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument(
        "--variant",
        action="append",
        help="NAME=AGENT,key=value,... (repeatable; default: dreamer and muzero)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="timed runs per variant")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in (args.variant or ["dreamer", "muzero"])]
    configs = {name: trial_config(agent, args.steps, extra) for name, agent, extra in variants}
    results: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory(prefix="mbxfer-trial-time-") as scratch:
        root = Path(scratch)
        for name, config in configs.items():  # Fill the compilation cache.
            timed_trial(config, root / f"warm-{name}".replace(" ", "_"))
        for round_index in range(args.rounds):
            for name, config in configs.items():
                folder = root / f"{round_index}-{name}".replace(" ", "_")
                results[name].append(timed_trial(config, folder))
    table = report(results)
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; steps {args.steps}")
    print(table)
    if args.json is not None:
        args.json.write_text(json.dumps({"steps": args.steps, "results": results}, indent=1))
    return 0


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs if key in r) if any(key in r for r in runs) else 0


def report(results: dict[str, list[dict]]) -> str:
    """A Markdown table: one row per variant, medians over its rounds."""
    header = ["variant", "wall s", "steps/s learning", "h per 1M", "outside update+act+env",
              "outside those and eval episodes", "first calls s"]  # fmt: skip
    header += [f"{p} %" for p in (*PARTS, "other")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, runs in results.items():
        wall = _median(runs, "wall_seconds")
        shares = [
            100 * statistics.median(r["split_seconds"][p] / r["wall_seconds"] for r in runs)
            for p in (*PARTS, "other")
        ]
        row = [
            name,
            f"{wall:.0f}",
            f"{_median(runs, 'steps_per_second'):.2f}",
            f"{_median(runs, 'hours_per_million'):.1f}",
            f"{100 * _median(runs, 'outside_core'):.1f}%",
            f"{100 * _median(runs, 'fixed'):.1f}%",
            f"{_median(runs, 'first_calls'):.1f}",
            *[f"{share:.1f}" for share in shares],
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
