"""`agent.init` jitted vs run op by op: wall time, and whether the parameters are identical.

    python -m mbxfer.benchmarks.perf.init --spec quickstart --spec crafter_1h

Every agent jits its own `init` (`agents/base.py`). For each distinct agent of each spec
(`trials.agent_setups`: one per agent config and environment, including the intrinsic module a
pretraining protocol adds), this builds the agent, runs the jitted `init` (first call: trace,
compile and run, with no persistent compilation cache) and the same function op by op
(`init.__wrapped__`, how `init` ran before it was jitted), and compares the two states leaf by
leaf: `identical` when every leaf is bitwise equal, else the largest absolute difference and
how many leaves differ. Both first calls start from empty in-process caches
(`jax.clear_caches()`), so each pays its own compiles: the op-by-op call compiles every op on
first use, the jitted one the whole function. (`mbxfer run` and `sweep` keep compiled functions
in a persistent cache, so a later trial with the same shapes skips the jitted compile; the
op-by-op compiles are each too short to be kept.)
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Optional, Sequence

import numpy as np


def compare(jitted: Any, eager: Any) -> dict[str, Any]:
    """`{identical, leaves, differing_leaves, max_abs_diff}` of two states of one structure."""
    import jax

    jitted_leaves, jitted_tree = jax.tree.flatten(jitted)
    eager_leaves, eager_tree = jax.tree.flatten(eager)
    if jitted_tree != eager_tree:
        raise ValueError(f"the two states differ in structure:\n{jitted_tree}\n{eager_tree}")
    differing, largest = 0, 0.0
    for a, b in zip(jitted_leaves, eager_leaves):
        a, b = np.asarray(jax.device_get(a)), np.asarray(jax.device_get(b))
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"leaf {a.shape} {a.dtype} vs {b.shape} {b.dtype}")
        if a.dtype.kind == "V" or not np.array_equal(a, b):  # "V": typed PRNG keys' raw bits
            differing += 1
            if a.dtype.kind in "fc":
                largest = max(largest, float(np.max(np.abs(a.astype(np.float64) - b))))
    return {
        "identical": differing == 0,
        "leaves": len(jitted_leaves),
        "differing_leaves": differing,
        "max_abs_diff": largest,
    }


def measure(setup, seed: int = 0) -> dict[str, Any]:
    """Jitted and op-by-op `init` of one `trials.AgentSetup`: seconds and `compare`."""
    import jax

    from mbxfer import agents

    agent = agents.make(setup.agent, setup.env_spec, setup.agent_config)
    key = jax.random.PRNGKey(seed)
    jax.clear_caches()
    start = time.perf_counter()
    jitted = jax.block_until_ready(agent.init(key))
    jitted_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(agent.init(key))
    jitted_again_s = time.perf_counter() - start
    eager_init = getattr(agent.init, "__wrapped__", None)
    if eager_init is None:
        raise TypeError(f"{setup.agent}'s init is not jitted (no __wrapped__)")
    jax.clear_caches()
    start = time.perf_counter()
    eager = jax.block_until_ready(eager_init(key))
    eager_s = time.perf_counter() - start
    parameters = int(sum(np.size(leaf) for leaf in jax.tree.leaves(jitted)))
    return {
        "label": setup.label,
        "state_size": parameters,
        "jitted_first_s": jitted_s,
        "jitted_again_s": jitted_again_s,
        "eager_s": eager_s,
        **compare(jitted, eager),
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'spec':11s} {'agent':32s} {'state size':>11s} {'op by op s':>10s} "
        f"{'jit 1st s':>9s} {'jit again':>9s}  parameters"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        same = (
            "bitwise identical"
            if row["identical"]
            else f"{row['differing_leaves']}/{row['leaves']} leaves differ, "
            f"max |diff| {row['max_abs_diff']:.3g}"
        )
        lines.append(
            f"{row['spec']:11s} {row['label']:32s} {row['state_size']:>11,d} "
            f"{row['eager_s']:>10.2f} {row['jitted_first_s']:>9.2f} "
            f"{row['jitted_again_s']:>9.4f}  {same}"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    from mbxfer.benchmarks.perf import trials

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--spec",
        action="append",
        help="a sweep spec (path, or a name in benchmarks/configs); repeatable "
        "(default: quickstart)",
    )
    parser.add_argument("--agents", default=None, help="comma-separated agent names (default all)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = args.agents.split(",") if args.agents else None
    rows = []
    for spec in args.spec or ["quickstart"]:
        for setup in trials.agent_setups(spec, agents=names):
            row = {"spec": trials.spec_path(spec).stem, **measure(setup, args.seed)}
            print(format_table([row]).splitlines()[-1], flush=True)
            rows.append(row)
    print()
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=2)
    return rows


if __name__ == "__main__":
    main()
