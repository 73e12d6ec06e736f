"""Environment overhead: raw `crafter.Env` vs `envs.make("crafter")` vs the vector environment.

    python -m benchmarks.perf.env_overhead --steps 3000 --rounds 3

All variants run side by side in one process, interleaved round by round (the machine is
shared and noisy), with the same random actions. Reported: median steps/s per variant and the
ratios the targets are stated in (wrapped / raw >= 0.97, 2 workers / 1 worker >= 1.7).
Episode resets are included, as in training.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np


def _raw(steps: int, seed: int) -> float:
    import crafter

    env = crafter.Env(seed=seed)
    env.reset()
    actions = np.random.default_rng(seed).integers(17, size=steps)
    start = time.perf_counter()
    for action in actions:
        _, _, done, _ = env.step(int(action))
        if done:
            env.reset()
    return steps / (time.perf_counter() - start)


def _wrapped(steps: int, seed: int) -> float:
    from envs import registry

    env = registry.make("crafter", task="reward", seed=seed)
    env.reset()
    actions = np.random.default_rng(seed).integers(17, size=steps)
    start = time.perf_counter()
    for action in actions:
        env.step(action)  # Auto-resets after LAST, like the raw loop above.
    return steps / (time.perf_counter() - start)


def _vector(steps: int, seed: int, workers: int) -> float:
    from envs import registry, vector

    with vector.VectorEnv(registry.factory("crafter", task="reward"), workers, seed=seed) as envs:
        envs.reset()
        rng = np.random.default_rng(seed)
        batches = max(1, steps // workers)
        for _ in range(20):  # Warm up the pipes and the workers' first resets.
            envs.step(rng.integers(17, size=workers))
        start = time.perf_counter()
        for _ in range(batches):
            envs.step(rng.integers(17, size=workers))
        return batches * workers / (time.perf_counter() - start)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    _raw(200, 99), _wrapped(200, 99)  # Compile opensimplex (numba) before timing.
    variants = {
        "raw crafter.Env": lambda s: _raw(args.steps, s),
        "envs.make('crafter')": lambda s: _wrapped(args.steps, s),
        "VectorEnv 1 worker": lambda s: _vector(args.steps, s, 1),
        "VectorEnv 2 workers": lambda s: _vector(args.steps, s, 2),
    }
    measured = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, run in variants.items():
            measured[name].append(run(round_index))
    median = {name: statistics.median(values) for name, values in measured.items()}
    ratios = {
        "wrapped / raw": median["envs.make('crafter')"] / median["raw crafter.Env"],
        "2 workers / 1 worker": median["VectorEnv 2 workers"] / median["VectorEnv 1 worker"],
        "1 worker / raw": median["VectorEnv 1 worker"] / median["raw crafter.Env"],
    }
    machine = (
        f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}"
    )
    print(f"machine: {machine}; {args.rounds} rounds x {args.steps} steps, median steps/s")
    for name, value in median.items():
        runs = ", ".join(f"{v:.0f}" for v in measured[name])
        print(f"  {name:24s} {value:8.0f}   (rounds: {runs})")
    for name, value in ratios.items():
        print(f"  {name:24s} {value:8.3f}x")
    result = {"machine": machine, "steps_per_second": median, "ratios": ratios, "runs": measured}
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
    return result


if __name__ == "__main__":
    main()
