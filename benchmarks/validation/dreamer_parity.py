"""Parity: our Dreamer vs the official DreamerV3 (PyPI `dreamerv3==1.5.0`) on our environments.

    python -m mbxfer.benchmarks.validation.dreamer_parity --envs grid,cartpole,point_mass --seeds 5 \
        --steps grid=3000,cartpole=10000,point_mass=10000 [--workers 1] [--out DIR]

For each environment and seed, two trials at matched settings:

* `ours`: `benchmarks.runner.run` (agent `dreamer`), in `--out/ours/<env>/seed-<i>`;
* `reference`: `dreamerv3_train_reference.py` in the reference venv (built by
  `benchmarks.perf.learner.ensure_reference_venv`, plus dm-env, dm-acme and gymnasium so that
  it imports our `envs`), DreamerV3's own agent, replay and loop, in
  `--out/reference/<env>/seed-<i>` (`stdout.jsonl`: one line per training episode, then a
  summary; `stderr.log`).

A finished trial (`result.json` in its folder) is not run again, so the command resumes (our
trials also resume mid-way from their checkpoints; a reference trial cut short starts over).
`parity.md` and `curves.png` cover the envs and agents of the invocation that wrote them;
`--report-only` (same `--out`) tabulates every finished trial of the given envs and agents
without running anything. `--agents ours,reference,reference-<name>` with
`--reference-overrides '{"run.train_ratio": 87.5}'` adds a reference ablation, tabulated
under its own name (the overrides are read back from each trial's `command.json`).

Score: the mean return of `--eval-episodes` episodes acting with actions SAMPLED from the
policy after the last step (ours: the final `sampled` evaluation of `eval.jsonl`; reference:
its summary). Per environment and agent: IQM over seeds with a 95% stratified bootstrap CI
(rliable), in `--out/parity.md`; learning curves (training-episode returns against
environment steps, mean over seeds of a per-seed binned mean) in `--out/curves.png`.

Matched settings (`SHARED` below; both sides read them):

* model: GRU state 64, 8 categorical latents x 8 classes, every MLP 64 wide with 2 hidden
  layers (vector encoder/decoder, reward/continuation heads, actor, critic; their RSSM
  `units` 64), 255 two-hot bins for reward and critic, imagination horizon 15;
* data: 4 environments, batch 16 sequences x 16 steps, train ratio 64 (replayed steps per
  environment step), updates from 500 environment steps on (reference: `run.train_fill`);
* optimization: the quickstart's learning rates (world model 1e-3, actor 3e-4, critic 3e-4),
  gradient clip 100 on every optimizer, discount 0.997 (DreamerV3's `horizon: 333`),
  lambda 0.95, entropy 3e-4, slow critic 0.02 every update;
* continuous actions (point_mass): ours `actor_gradient=dynamics`, because DreamerV3 1.5.0
  backpropagates through the model for continuous actions (`actor_grad_cont: backprop`);
* precision float32 on CPU on both sides; jax optimizations on;
* ours without what 1.5.0 lacks, pinned whatever our defaults become: RSSM latent, no replay
  critic (`replay_critic=0`; DreamerV3's `repval_loss` is later than 1.5.0), no open-loop,
  contrastive or self-predictive losses, no exploration module.

What cannot be matched (see the report): DreamerV3's driver counts the observation of every
reset as a step (its ratio and budget count 51 steps per 50-step episode; the reference stops
on real steps, its train ratio is its own); the layer norms, initializers and Adam epsilons
are each side's own. Ours runs on DreamerV3's update clock (`train.ratio_clock=
learning_starts`: one update when training starts, then the ratio), not on the runner's
default, which owes updates from step 0 and runs them as a burst at `learning_starts`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from mbxfer.benchmarks.validation.ppo_cartpole import iqm_with_ci

REPO = Path(__file__).resolve().parents[2]
REFERENCE_TRAIN_SCRIPT = Path(__file__).with_name("dreamerv3_train_reference.py")
DEFAULT_OUT = Path("results/validation/dreamer_parity")
AGENTS = ("ours", "reference")
# What the reference venv needs to import `envs` (the versions of this repo's constraints).
REFERENCE_EXTRA_REQUIREMENTS = ("dm-env==1.6", "dm-acme==0.2.4", "gymnasium==1.4.0", "numpy<1.26")
_EXTRAS_COMPLETE = ".mbxfer-parity-extras"

ENVS = {
    "grid": {"task": "reach_bottom_right", "kwargs": {"size": 5, "observation": "vector"},
             "continuous": False, "steps": 2000},
    "cartpole": {"task": "reward", "kwargs": {}, "continuous": False, "steps": 4000},
    "point_mass": {"task": "reach_top_left", "kwargs": {}, "continuous": True, "steps": 4000},
}  # fmt: skip

SHARED = {
    "deter": 64, "stoch_groups": 8, "stoch_classes": 8, "units": 64, "layers": 2, "bins": 255,
    "horizon": 15, "num_envs": 4, "batch_size": 16, "sequence_length": 16, "train_ratio": 64,
    "learning_starts": 500, "model_lr": 1e-3, "actor_lr": 3e-4, "critic_lr": 3e-4,
    "grad_clip": 100.0, "discount": 0.997, "lambda_": 0.95, "entropy": 3e-4,
    "slow_critic_fraction": 0.02,
}  # fmt: skip


def ours_overrides(env: str, seed: int, steps: int, eval_episodes: int) -> list[str]:
    """`mbxfer run --set` overrides of our trial (also what `runner.run` is given)."""
    s, spec = SHARED, ENVS[env]
    items = [
        "agent=dreamer",
        f"env.name={env}",
        f"env.task={spec['task']}",
        f"env.kwargs={json.dumps(spec['kwargs'])}",
        f"env.num_envs={s['num_envs']}",
        f"seed={seed}",
        f"train.steps={steps}",
        f"train.batch_size={s['batch_size']}",
        f"train.sequence_length={s['sequence_length']}",
        f"train.train_ratio={s['train_ratio']}",
        f"train.learning_starts={s['learning_starts']}",
        # DreamerV3's `when.Ratio`: one update at the prefill's end, then the ratio (no burst),
        # so both sides run the same number of updates.
        "train.ratio_clock=learning_starts",
        f"train.eval_every={steps}",
        f"train.eval_episodes={eval_episodes}",
        "train.eval_modes=[sampled]",
        f"train.checkpoint_every={steps}",
        "train.log_every=500",
        "train.video=false",
        f"agent.model.deter={s['deter']}",
        f"agent.model.stoch_groups={s['stoch_groups']}",
        f"agent.model.stoch_classes={s['stoch_classes']}",
        f"agent.model.hidden={s['units']}",
        f"agent.model.mlp_layers={s['layers']}",
        f"agent.model.reward_bins={s['bins']}",
        f"agent.actor_critic.hidden={s['units']}",
        f"agent.actor_critic.layers={s['layers']}",
        f"agent.actor_critic.critic_bins={s['bins']}",
        f"agent.actor_critic.horizon={s['horizon']}",
        f"agent.actor_critic.discount={s['discount']}",
        f"agent.actor_critic.lambda_={s['lambda_']}",
        f"agent.actor_critic.entropy={s['entropy']}",
        f"agent.actor_critic.slow_critic_fraction={s['slow_critic_fraction']}",
        f"agent.model_lr={s['model_lr']}",
        f"agent.actor_lr={s['actor_lr']}",
        f"agent.critic_lr={s['critic_lr']}",
        f"agent.grad_clip={s['grad_clip']}",
        # What DreamerV3 1.5.0 does not have, pinned off whatever our defaults become: its
        # RSSM latent, no replay critic (its `repval_loss` came later), no extra model losses.
        "agent.model.latent=rssm",
        "agent.actor_critic.replay_critic=0.0",
        "agent.actor_critic.source=imagination",
        "agent.model.losses.open_loop_heads=0.0",
        "agent.model.losses.contrastive=0.0",
        "agent.model.losses.self_predictive=0.0",
        "agent.exploration.module=none",
    ]
    if spec["continuous"]:
        items.append("agent.actor_critic.actor_gradient=dynamics")
    return items


def reference_overrides() -> dict:
    """DreamerV3 config overrides (its dotted and regex keys) at the shared settings."""
    s = SHARED
    return {
        # CPU, float32, jax optimizations on; in-process environments, one data loader thread.
        "jax.platform": "cpu", "jax.precision": "float32", "jax.debug": False,
        "jax.jit": True, "jax.prealloc": False, "envs.parallel": "none",
        "envs.restart": False, "data_loaders": 1,
        "encoder.mlp_keys": "vector", "encoder.cnn_keys": "$^",
        "decoder.mlp_keys": "vector", "decoder.cnn_keys": "$^",
        "rssm.deter": s["deter"], "rssm.units": s["units"], "rssm.stoch": s["stoch_groups"],
        "rssm.classes": s["stoch_classes"],
        r".*\.units": s["units"], r".*\.layers": s["layers"], r".*\.bins": s["bins"],
        "encoder.mlp_units": s["units"], "encoder.mlp_layers": s["layers"],
        "decoder.mlp_units": s["units"], "decoder.mlp_layers": s["layers"],
        "imag_horizon": s["horizon"], "batch_size": s["batch_size"],
        "batch_length": s["sequence_length"], "run.train_ratio": s["train_ratio"],
        "run.train_fill": s["learning_starts"],
        "model_opt.lr": s["model_lr"], "actor_opt.lr": s["actor_lr"],
        "critic_opt.lr": s["critic_lr"], r".*_opt\.clip": s["grad_clip"],
        "horizon": round(1 / (1 - s["discount"])), "return_lambda": s["lambda_"],
        "actent": s["entropy"], "slow_critic_fraction": s["slow_critic_fraction"],
        "wrapper.length": 0,
    }  # fmt: skip


def ensure_reference_python(venv: Path) -> Path:
    """The reference venv's python, with what importing our `envs` needs."""
    from mbxfer.benchmarks.perf.learner import ensure_reference_venv

    python = ensure_reference_venv(venv)
    if not (venv / _EXTRAS_COMPLETE).exists():
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             *REFERENCE_EXTRA_REQUIREMENTS],
            check=True,
        )  # fmt: skip
        (venv / _EXTRAS_COMPLETE).write_text(" ".join(REFERENCE_EXTRA_REQUIREMENTS) + "\n")
    return python


def trial_folder(out: Path, agent: str, env: str, seed: int) -> Path:
    return Path(out) / agent / env / f"seed-{seed}"


def _episodes_ours(folder: Path) -> list[tuple[int, float]]:
    points = []
    for line in (folder / "episodes.jsonl").read_text().splitlines():
        record = json.loads(line)
        points.append((int(record["total_env_steps"]), float(record["return"])))
    return points


def run_ours(env: str, seed: int, steps: int, eval_episodes: int, folder: Path) -> dict:
    from mbxfer.benchmarks import config as config_lib
    from mbxfer.benchmarks import runner

    config = config_lib.build(
        config_lib.parse_overrides(ours_overrides(env, seed, steps, eval_episodes))
    )
    summary = runner.run(config, folder, progress=False)
    evals = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]
    final = [e for e in evals if e.get("mode") == "sampled" and e["env_steps"] == steps]
    if not final:
        raise RuntimeError(f"no final sampled evaluation in {folder / 'eval.jsonl'}")
    phase = summary["phases"][-1] if "phases" in summary else {}
    return {
        "final_return": float(final[-1]["return_mean"]),
        "episodes": _episodes_ours(folder),
        "updates": phase.get("updates"),
    }


def run_reference(
    env: str,
    seed: int,
    steps: int,
    eval_episodes: int,
    folder: Path,
    python: Path,
    extra_overrides: dict | None = None,
) -> dict:
    spec = ENVS[env]
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        str(python), str(REFERENCE_TRAIN_SCRIPT), "--repo", str(REPO), "--env", env,
        "--task", spec["task"], "--env-kwargs", json.dumps(spec["kwargs"]),
        "--seed", str(seed), "--steps", str(steps),
        "--num-envs", str(SHARED["num_envs"]), "--eval-episodes", str(eval_episodes),
        "--overrides", json.dumps({**reference_overrides(), **(extra_overrides or {})}),
    ]  # fmt: skip
    environ = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    environ.pop("PYTHONPATH", None)
    (folder / "command.json").write_text(json.dumps(command) + "\n")
    with open(folder / "stdout.jsonl", "w") as stdout, open(folder / "stderr.log", "w") as err:
        code = subprocess.run(
            command, stdout=stdout, stderr=err, env=environ, cwd=folder
        ).returncode
    lines = [json.loads(line) for line in (folder / "stdout.jsonl").read_text().splitlines()]
    summaries = [line for line in lines if line["event"] == "summary"]
    if code or not summaries:
        tail = "\n".join((folder / "stderr.log").read_text().splitlines()[-20:])
        raise RuntimeError(f"the reference exited with {code} in {folder}:\n{tail}")
    config = next(line for line in lines if line["event"] == "config")
    return {
        "final_return": float(summaries[-1]["eval_return_mean"]),
        "episodes": [(e["env_steps"], e["return"]) for e in lines if e["event"] == "episode"],
        "updates": summaries[-1]["updates"],
        "params": config["params"],
    }


def run_trial(agent, env, seed, steps, eval_episodes, out, python, extra=None) -> dict:
    """Run (or reload) one (agent, env, seed); its result, also saved as `result.json`.

    Agents: `ours`, `reference`, or `reference-<name>`: the reference with the extra
    DreamerV3 overrides `extra` (an ablation such as its own default learning rates)."""
    folder = trial_folder(out, agent, env, seed)
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    started = time.time()
    if agent == "ours":
        result = run_ours(env, seed, steps, eval_episodes, folder)
    else:
        result = run_reference(
            env,
            seed,
            steps,
            eval_episodes,
            folder,
            Path(python),
            extra if agent != "reference" else None,
        )
    result.update(agent=agent, env=env, seed=seed, steps=steps, wall_s=time.time() - started)
    result_path.write_text(json.dumps(result) + "\n")
    print(
        f"{agent:9s} {env:10s} seed {seed}: final sampled return {result['final_return']:.2f}, "
        f"{result['updates']} updates, {result['wall_s']:.0f} s",
        flush=True,
    )
    return result


def extra_overrides(out: Path, result: dict) -> dict:
    """The DreamerV3 overrides a `reference-<name>` trial ran with beyond `reference_overrides`
    (read back from its `command.json`)."""
    command = json.loads(
        (
            trial_folder(out, result["agent"], result["env"], result["seed"]) / "command.json"
        ).read_text()
    )
    used = json.loads(command[command.index("--overrides") + 1])
    shared = reference_overrides()
    return {k: v for k, v in used.items() if k not in shared or shared[k] != v}


def _safe_trial(*job) -> dict | None:
    try:
        return run_trial(*job)
    except Exception as error:  # One failed trial must not lose the others.
        print(f"FAILED {job[:3]}: {error}", file=sys.stderr, flush=True)
        return None


def report(results: list[dict], envs: Sequence[str], agents: Sequence[str] = AGENTS) -> str:
    lines = [
        "Dreamer parity: final return, actions sampled from the policy, IQM over seeds with "
        "95% stratified bootstrap CI (rliable).",
        "",
        "| env | steps | agent | seeds | IQM | 95% CI | per seed | updates | wall s / trial |",
        "|---|---:|---|---:|---:|---|---|---:|---:|",
    ]
    for env in envs:
        for agent in agents:
            rows = sorted(
                (r for r in results if r["env"] == env and r["agent"] == agent),
                key=lambda r: r["seed"],
            )
            if not rows:
                continue
            scores = [r["final_return"] for r in rows]
            iqm, low, high = iqm_with_ci(scores) if len(rows) > 1 else (scores[0],) * 3
            per_seed = ", ".join(f"{r['seed']}: {r['final_return']:.1f}" for r in rows)
            updates = "/".join(sorted({str(r["updates"]) for r in rows}))
            wall = np.mean([r["wall_s"] for r in rows])
            lines.append(
                f"| {env} | {rows[0]['steps']} | {agent} | {len(rows)} | {iqm:.2f} | "
                f"[{low:.2f}, {high:.2f}] | {per_seed} | {updates} | {wall:.0f} |"
            )
    return "\n".join(lines)


def plot_curves(
    results: list[dict], envs: Sequence[str], path: Path, agents=AGENTS, bins: int = 10
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.6), squeeze=False)
    for axis, env in zip(axes[0], envs):
        for agent in agents:
            rows = [r for r in results if r["env"] == env and r["agent"] == agent]
            if not rows:
                continue
            steps = rows[0]["steps"]
            edges = np.linspace(0, steps, bins + 1)
            curves = []
            for r in rows:
                points = np.asarray(r["episodes"], np.float64).reshape(-1, 2)
                index = np.clip(np.searchsorted(edges, points[:, 0], side="left") - 1, 0, bins - 1)
                curve = np.full(bins, np.nan)
                for b in range(bins):
                    if (index == b).any():
                        curve[b] = points[index == b, 1].mean()
                curves.append(curve)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(curves, axis=0)
            finite = np.isfinite(mean)  # Bins in which no episode of any seed ended.
            axis.plot(
                edges[1:][finite], mean[finite], marker=".", label=f"{agent} ({len(rows)} seeds)"
            )
        axis.set_title(env)
        axis.set_xlabel("environment steps")
        axis.set_ylabel("training episode return")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_steps(text: str | None, envs: Sequence[str]) -> dict[str, int]:
    """`3000` (every env) or `grid=3000,cartpole=10000`; unnamed envs keep their default."""
    steps = {env: ENVS[env]["steps"] for env in envs}
    if text:
        if "=" not in text:
            return {env: int(float(text)) for env in envs}
        for item in text.split(","):
            name, value = item.split("=")
            steps[name.strip()] = int(float(value))
    return steps


def main(argv: Sequence[str] | None = None) -> str:
    from mbxfer.benchmarks.perf.learner import DEFAULT_REFERENCE_VENV

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", default="grid,cartpole,point_mass")
    parser.add_argument("--agents", default=",".join(AGENTS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", default=None, help="N, or env=N,env=N (defaults per env)")
    parser.add_argument("--eval-episodes", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="trials run at once")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--reference-venv", type=Path, default=DEFAULT_REFERENCE_VENV)
    parser.add_argument("--report-only", action="store_true", help="tabulate finished trials")
    parser.add_argument(
        "--reference-overrides",
        default="{}",
        help="JSON DreamerV3 overrides of the `reference-<name>` agents (ablations)",
    )
    args = parser.parse_args(argv)
    envs = [e for e in args.envs.split(",") if e]
    unknown = sorted(set(envs) - set(ENVS))
    if unknown:
        parser.error(f"unknown envs {unknown}; choose from {sorted(ENVS)}")
    agents = [a for a in args.agents.split(",") if a]
    steps = parse_steps(args.steps, envs)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    jobs = [
        (agent, env, seed, steps[env], args.eval_episodes, args.out)
        for seed in seeds
        for env in envs
        for agent in agents
    ]
    if args.report_only:
        results = [
            json.loads(p.read_text())
            for agent, env, seed, *_ in jobs
            if (p := trial_folder(args.out, agent, env, seed) / "result.json").exists()
        ]
    else:
        needs_reference = any(a.startswith("reference") for a in agents)
        python = ensure_reference_python(args.reference_venv) if needs_reference else None
        extra = json.loads(args.reference_overrides)
        jobs = [job + (str(python), extra) for job in jobs]
        if args.workers > 1:
            with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
                results = pool.starmap(_safe_trial, jobs)
        else:
            results = [_safe_trial(*job) for job in jobs]
        results = [r for r in results if r is not None]
    text = report(results, envs, agents)
    text += "\n\nMatched settings: " + json.dumps(SHARED)
    text += f"\nsteps: {json.dumps(steps)}; eval episodes: {args.eval_episodes}"
    for agent in agents:
        if agent.startswith("reference-"):
            extras = {
                json.dumps(extra_overrides(args.out, r)) for r in results if r["agent"] == agent
            }
            text += f"\n{agent}: the reference with {' or '.join(sorted(extras)) or '(no trial)'}"
    if not args.report_only:
        text += f"\ntotal wall time of this invocation: {time.time() - started:.0f} s"
    (args.out / "parity.md").write_text(text + "\n")
    if results:
        plot_curves(results, envs, args.out / "curves.png", agents)
    print(text)
    return text


if __name__ == "__main__":
    main()
