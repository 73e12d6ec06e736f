"""Environment overhead: raw `crafter.Env` vs `envs.make("crafter")` vs the vector environment.

    python -m mbxfer.benchmarks.perf.env_overhead --steps 3000 --rounds 3
    python -m mbxfer.benchmarks.perf.env_overhead --families procgen,metaworld,robodesk --rounds 0

`--families` adds rows per environment family (one run each, after the Crafter rounds): the
raw library vs our environment, state and pixel observations, `fast` and `faithful` MuJoCo
rendering, and Procgen's native batch; ratios are printed from the same run. Families whose
optional dependency is missing are skipped.

All variants run side by side, interleaved round by round (the machine is shared and noisy),
with the same random actions. Reported: median steps/s per variant and the ratios the targets
are stated in (wrapped / raw >= 0.97, 2 workers / 1 worker >= 1.7). Episode resets are
included, as in training.

Two ceilings put the worker ratio in context. `2 raw processes` runs two raw environments
free (no batching) in two processes at once: what the cores give right now. `lockstep bound`
is what any batch of 2 that waits for both environments at every step can reach with zero
overhead: it pairs the per-step times of two raw runs, sum(a + b) / sum(max(a, b)). A Crafter
reset (world generation, ~60 ms, every ~170 random steps) stalls the other environment.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import platform
import statistics
import time

import numpy as np


def _raw(steps: int, seed: int, durations: list | None = None, barrier=None) -> float:
    """Steps/s of `crafter.Env`; appends each step's seconds (with its reset) to `durations`."""
    with contextlib.redirect_stderr(io.StringIO()):  # The legacy gym's notice, as envs.crafter.
        import crafter

    env = crafter.Env(seed=seed)
    env.reset()
    actions = np.random.default_rng(seed).integers(17, size=steps)
    times = np.empty(steps)
    if barrier is not None:
        barrier.wait()
    start = previous = time.perf_counter()
    for index, action in enumerate(actions):
        _, _, done, _ = env.step(int(action))
        if done:
            env.reset()
        now = time.perf_counter()
        times[index], previous = now - previous, now
    if durations is not None:
        durations.append(times)
    return steps / (previous - start)


def _raw_process(steps: int, seed: int, barrier, results) -> None:
    results.put(_raw(steps, seed, barrier=barrier))


def _raw_processes(steps: int, seed: int) -> float:
    """Total steps/s of two raw environments running free in two processes at once."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [
        context.Process(target=_raw_process, args=(steps // 2, seed + i, barrier, results))
        for i in range(2)
    ]
    for process in processes:
        process.start()
    total = results.get() + results.get()
    for process in processes:
        process.join()
    return total


def lockstep_bound(a: np.ndarray, b: np.ndarray) -> float:
    """Speed-up of stepping environments with per-step times `a` and `b` as one batch of 2."""
    return float((a.sum() + b.sum()) / np.maximum(a, b).sum())


def _wrapped(steps: int, seed: int) -> float:
    from mbxfer.envs import registry

    env = registry.make("crafter", task="reward", seed=seed)
    env.reset()
    actions = np.random.default_rng(seed).integers(17, size=steps)
    start = time.perf_counter()
    for action in actions:
        env.step(action)  # Auto-resets after LAST, like the raw loop above.
    return steps / (time.perf_counter() - start)


def _vector(steps: int, seed: int, workers: int) -> float:
    from mbxfer.envs import registry, vector

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


def _rate(step, reset, steps: int) -> float:
    """Steps/s of `step()` over `steps` calls (`step` returns True when a reset is due)."""
    reset()
    step()  # First render creates the GL context; not part of the rate.
    start = time.perf_counter()
    for _ in range(steps):
        if step():
            reset()
    return steps / (time.perf_counter() - start)


def _ours(name: str, steps: int, **keywords) -> float:
    from mbxfer.envs import registry

    env = registry.make(name, **keywords)
    rng = np.random.default_rng(0)
    spec = env.action_spec()
    discrete = hasattr(spec, "num_values")

    def step():
        action = rng.integers(spec.num_values) if discrete else rng.uniform(-1, 1, spec.shape)
        env.step(np.asarray(action, spec.dtype))  # Auto-resets after LAST.
        return False

    rate = _rate(step, env.reset, steps)
    env.close()
    return rate


def _procgen_rows(steps: int) -> tuple[dict, dict]:
    import envpool

    from mbxfer.envs import registry, vector

    rows = {}
    for num_envs in (1, 8):
        pool = envpool.make("CoinrunEasy-v0", env_type="dm", num_envs=num_envs, seed=0)
        actions = np.zeros(num_envs, np.int32)
        batches = max(1, steps // num_envs)
        rows[f"procgen raw envpool x{num_envs}"] = (
            _rate(lambda p=pool, a=actions: p.step(a) and False, pool.reset, batches) * num_envs
        )
        pool.close()
        with vector.make(registry.factory("procgen", game="coinrun"), num_envs) as envs:
            rows[f"procgen vector.make x{num_envs}"] = (
                _rate(lambda e=envs, a=actions: e.step(a) and False, envs.reset, batches) * num_envs
            )
    rows["procgen registry.make"] = _ours("procgen", steps, game="coinrun")
    ratios = {
        f"procgen ours / raw x{n}": rows[f"procgen vector.make x{n}"]
        / rows[f"procgen raw envpool x{n}"]
        for n in (1, 8)
    }
    return rows, ratios


def _metaworld_rows(steps: int) -> tuple[dict, dict]:
    from mbxfer.envs import mujoco_render

    mujoco_render.configure_headless()
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    rows = {}
    for pixels in (False, True):
        raw = ALL_V3_ENVIRONMENTS["pick-place-v3"](
            render_mode="rgb_array" if pixels else None, camera_name="corner2", width=64, height=64
        )
        raw._set_task_called, raw._freeze_rand_vec, raw.seeded_rand_vec = True, False, True
        raw.seed(0)
        rng = np.random.default_rng(0)

        def step(raw=raw, rng=rng, pixels=pixels):
            *_, truncated, _ = raw.step(rng.uniform(-1, 1, 4))
            if pixels:
                raw.render()
            return truncated

        label = "pixels (library render)" if pixels else "state"
        rows[f"metaworld raw {label}"] = _rate(step, raw.reset, steps // 10 if pixels else steps)
        raw.close()
    rows["metaworld ours state"] = _ours("metaworld", steps, scene="pick-place")
    for render in ("fast", "faithful"):
        rows[f"metaworld ours pixels {render}"] = _ours(
            "metaworld", steps // 10, scene="pick-place", observation="pixels", render=render
        )
    ratios = {
        "metaworld ours / raw state": rows["metaworld ours state"] / rows["metaworld raw state"],
        "metaworld pixels fast / faithful": rows["metaworld ours pixels fast"]
        / rows["metaworld ours pixels faithful"],
    }
    return rows, ratios


def _robodesk_rows(steps: int) -> tuple[dict, dict]:
    from mbxfer.envs import robodesk as ours  # Applies the Pillow alias RoboDesk 1.0.0 needs.

    ours._desk_class()
    import robodesk

    rows = {}
    for pixels in (False, True):
        raw = robodesk.RoboDesk()
        if not pixels:
            raw.render = lambda *args, **kwargs: np.zeros((64, 64, 3), np.uint8)
        rng = np.random.default_rng(0)
        np.random.seed(0)
        label = "pixels (library render)" if pixels else "state"
        rows[f"robodesk raw {label}"] = _rate(
            lambda raw=raw, rng=rng: raw.step(rng.uniform(-1, 1, 5))[2],
            raw.reset,
            5 if pixels else steps,
        )
        raw.physics.free()  # Its render contexts, now rather than at interpreter exit.
    rows["robodesk ours state"] = _ours("robodesk", steps, observation="state")
    rows["robodesk ours pixels fast"] = _ours("robodesk", steps // 5, render="fast")
    rows["robodesk ours pixels faithful"] = _ours("robodesk", 5, render="faithful")
    ratios = {
        "robodesk ours / raw state": rows["robodesk ours state"] / rows["robodesk raw state"],
        "robodesk ours pixels fast / raw pixels": rows["robodesk ours pixels fast"]
        / rows["robodesk raw pixels (library render)"],
    }
    return rows, ratios


FAMILIES = {"procgen": _procgen_rows, "metaworld": _metaworld_rows, "robodesk": _robodesk_rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--families", default="", help="comma-separated: procgen, metaworld, robodesk"
    )
    parser.add_argument("--family-steps", type=int, default=1000, help="state steps per row")
    args = parser.parse_args(argv)
    machine = (
        f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}"
    )
    families = [f for f in args.families.split(",") if f]
    if args.rounds < 1:
        return _report_families(families, args.family_steps, machine, args.json)

    _raw(200, 99), _wrapped(200, 99)  # Compile opensimplex (numba) before timing.
    durations = []
    variants = {
        "raw crafter.Env": lambda s: _raw(args.steps, s, durations),
        "envs.make('crafter')": lambda s: _wrapped(args.steps, s),
        "VectorEnv 1 worker": lambda s: _vector(args.steps, s, 1),
        "VectorEnv 2 workers": lambda s: _vector(args.steps, s, 2),
        "2 raw processes": lambda s: _raw_processes(args.steps, s),
    }
    measured = {name: [] for name in variants}
    for round_index in range(args.rounds):
        for name, run in variants.items():
            measured[name].append(run(round_index))
    median = {name: statistics.median(values) for name, values in measured.items()}
    per_round = {
        "wrapped / raw": _divide(measured["envs.make('crafter')"], measured["raw crafter.Env"]),
        "2 workers / 1 worker": _divide(
            measured["VectorEnv 2 workers"], measured["VectorEnv 1 worker"]
        ),
        "1 worker / raw": _divide(measured["VectorEnv 1 worker"], measured["raw crafter.Env"]),
        "2 raw processes / raw": _divide(measured["2 raw processes"], measured["raw crafter.Env"]),
        # Consecutive rounds ran different seeds: their step times pair as two environments.
        "lockstep bound": [lockstep_bound(a, b) for a, b in zip(durations, durations[1:])],
    }
    ratios = {name: statistics.median(values) for name, values in per_round.items() if values}
    print(f"machine: {machine}; {args.rounds} rounds x {args.steps} steps, median steps/s")
    for name, value in median.items():
        runs = ", ".join(f"{v:.0f}" for v in measured[name])
        print(f"  {name:24s} {value:8.0f}   (rounds: {runs})")
    print("ratios, median of the per-round ratios")
    for name, value in ratios.items():
        runs = ", ".join(f"{v:.3f}" for v in per_round[name])
        print(f"  {name:24s} {value:8.3f}x  (rounds: {runs})")
    result = {
        "machine": machine,
        "steps_per_second": median,
        "ratios": ratios,
        "runs": measured,
        "ratio_runs": per_round,
    }
    if families:
        family_result = _report_families(families, args.family_steps, machine, None)
        result["steps_per_second"].update(family_result["steps_per_second"])
        result["ratios"].update(family_result["ratios"])
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)
    return result


def _divide(numerators: list, denominators: list) -> list:
    return [n / d for n, d in zip(numerators, denominators)]


def _report_families(families, steps: int, machine: str, json_path) -> dict:
    from mbxfer.envs import registry

    rates, ratios = {}, {}
    print(f"machine: {machine}; environment families, one run each, steps/s")
    for family in families:
        if family not in FAMILIES:
            raise SystemExit(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
        try:
            family_rates, family_ratios = FAMILIES[family](steps)
        except (ImportError, registry.MissingDependencyError) as error:
            print(f"  {family}: skipped ({error})")
            continue
        rates.update(family_rates)
        ratios.update(family_ratios)
        for name, value in family_rates.items():
            print(f"  {name:40s} {value:9.1f}")
        for name, value in family_ratios.items():
            print(f"  {name:40s} {value:9.3f}x")
    result = {"machine": machine, "steps_per_second": rates, "ratios": ratios}
    if json_path:
        with open(json_path, "w") as file:
            json.dump(result, file, indent=2)
    return result


if __name__ == "__main__":
    main()
