"""Learner throughput: mbxfer's Dreamer update vs the official DreamerV3, side by side.

    python -m mbxfer.benchmarks.perf.learner --sizes debug,mid --steps 2 --rounds 5 --json learner.json

(~25 min on 2 cores, most of it DreamerV3; `--skip-reference` times ours only, `--breakdown`
adds a per-part timing of our update.)

Measured: update steps/s of one full learner step, world model (encoder, RSSM filtering over
the batch, decoder/reward/continuation heads, KL terms, Adam) plus actor-critic (15 imagined
steps from every posterior, lambda-returns, actor and critic Adam updates, slow critic), on one
random batch of 16 sequences x 64 steps of 64x64x3 uint8 images with Crafter's 17 discrete
actions, reused every step (no host-to-device copy is timed). The same batch shapes and model
sizes run on both sides:

* ours: `jax.jit(agents.make("dreamer", spec, config).update)`, as `benchmarks/phase.py` jits it;
* reference: PyPI `dreamerv3==1.5.0` (`Agent.train`, its own jit), driven by
  `dreamerv3_reference.py` in a separate venv at float32 with jax's optimizations on
  (its `debug` block turns them off on CPU; we turn them back on, which is only fairer to it).

Sizes (`SIZES`): `debug` is DreamerV3's `debug` block; `mid` is a size between it and `small`
(`small`, 18M parameters, takes ~65 s per update on 2 cores). Both sides read the same
`ModelSize`, mapped onto our `DreamerConfig` and onto DreamerV3 config overrides.

The two sides alternate round by round, ABBA (ours then theirs, theirs then ours, ...; the
reference stays alive between rounds, waiting on a pipe), because the machine is shared. The
table gives the median steps/s over rounds, the headline ratio (median over rounds of ours /
theirs measured back to back), the ratio of the medians, and process CPU seconds per update
(less sensitive to other jobs than wall time). "compile" is the wall time of the first two
updates (DreamerV3 traces `train` twice: the carried state's types differ from the
initial state's). Parameters are the trained ones: world model + actor + critic (no slow
critic, no optimizer state); DreamerV3's are its optimizers' counts.

The reference venv (`--reference-venv`, default `~/.cache/mbxfer/dreamerv3-1.5.0-venv`) is built
on first use with `python3.11 -m venv` and pip, by package name: `dreamerv3==1.5.0` with
`--no-deps` (it pins `gym==0.19.0`, which no longer builds, and tensorflow, used only by its
logger) and then `REFERENCE_REQUIREMENTS`. `--skip-reference` times ours only. No test uses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BATCH_SIZE = 16
SEQUENCE_LENGTH = 64
IMAGE_SIZE = 64
NUM_ACTIONS = 17  # Crafter's action set.
IMAGINATION_HORIZON = 15
BINS = 255

REFERENCE_VERSION = "1.5.0"
REFERENCE_REQUIREMENTS = (
    "jax==0.4.13",
    "jaxlib==0.4.13",
    "numpy<1.26",
    "optax==0.1.7",
    "chex==0.1.82",
    "tensorflow-probability==0.20.1",
    "scipy==1.11.4",
    "ml_dtypes==0.2.0",
    "ruamel.yaml<0.18",
    "cloudpickle",
    "rich",
    "crafter",
    "numba",
)
DEFAULT_REFERENCE_VENV = Path.home() / ".cache" / "mbxfer" / f"dreamerv3-{REFERENCE_VERSION}-venv"
REFERENCE_SCRIPT = Path(__file__).with_name("dreamerv3_reference.py")
_VENV_COMPLETE = ".mbxfer-complete"


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """One model size, read by both sides (`dreamer_config` and `reference_overrides`)."""

    deter: int
    """GRU state size: our `WorldModelConfig.deter`, their `rssm.deter`."""
    stoch_groups: int
    """Categorical latents: our `stoch_groups`, their `rssm.stoch`."""
    stoch_classes: int
    """Classes per latent: our `stoch_classes`, their `rssm.classes`."""
    units: int
    """Every MLP width: our `hidden` and `actor_critic.hidden`, their `rssm.units` and
    `.*\\.units` (reward, continuation, actor, critic)."""
    layers: int
    """Hidden layers of every head, actor and critic: our `mlp_layers` and
    `actor_critic.layers`, their `.*\\.layers`."""
    cnn_depth: int
    """Channels of the first conv layer (doubling per stride-2 layer down to 4x4): our
    `encoder_depth`, their `encoder.cnn_depth` and `decoder.cnn_depth`."""
    reference_block: str | None = None
    """A `configs.yaml` block applied before the overrides (it must agree with them)."""

    def dreamer_config(self):
        """Our `DreamerConfig` at this size."""
        from mbxfer.agents.dreamer import ActorCriticConfig, DreamerConfig
        from mbxfer.agents.world_model import WorldModelConfig

        model = WorldModelConfig(
            deter=self.deter,
            stoch_groups=self.stoch_groups,
            stoch_classes=self.stoch_classes,
            hidden=self.units,
            mlp_layers=self.layers,
            encoder_depth=self.cnn_depth,
            min_resolution=4,
            reward_bins=BINS,
        )
        actor_critic = ActorCriticConfig(
            horizon=IMAGINATION_HORIZON, hidden=self.units, layers=self.layers, critic_bins=BINS
        )
        return DreamerConfig(model=model, actor_critic=actor_critic)

    def reference_overrides(self) -> dict[str, Any]:
        """DreamerV3 config overrides (dotted keys and its regex keys) at this size."""
        return {
            "rssm.deter": self.deter,
            "rssm.stoch": self.stoch_groups,
            "rssm.classes": self.stoch_classes,
            "rssm.units": self.units,
            r".*\.units": self.units,
            r".*\.layers": self.layers,
            r".*\.cnn_depth": self.cnn_depth,
            r".*\.bins": BINS,
            "imag_horizon": IMAGINATION_HORIZON,
            "batch_size": BATCH_SIZE,
            "batch_length": SEQUENCE_LENGTH,
            # CPU, float32 like ours (its float16 default is emulated on CPU), and jax's
            # optimizations on (the `debug` block sets jax.debug, which disables most of them).
            "jax.platform": "cpu",
            "jax.precision": "float32",
            "jax.debug": False,
            "jax.jit": True,
            "jax.prealloc": False,
        }


SIZES = {
    "debug": ModelSize(
        deter=32, stoch_groups=4, stoch_classes=4, units=16, layers=2, cnn_depth=8,
        reference_block="debug",
    ),
    "mid": ModelSize(deter=256, stoch_groups=16, stoch_classes=16, units=256, layers=2, cnn_depth=16),
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# Ours.


def environment_spec():
    """Crafter's spec as the runner builds it: 64x64x3 uint8 image, 17 discrete actions."""
    from acme import specs as acme_specs
    from dm_env import specs

    from mbxfer.envs import base as env_base

    return acme_specs.EnvironmentSpec(
        observations={"image": env_base.image_spec(IMAGE_SIZE, IMAGE_SIZE)},
        actions=specs.DiscreteArray(NUM_ACTIONS, name="action"),
        rewards=env_base.Environment.reward_spec(None),
        discounts=env_base.Environment.discount_spec(None),
    )


def random_batch(seed: int) -> dict[str, Any]:
    """A `[B, T, ...]` batch in the replay format (`agents/replay.py`), random content."""
    rng = np.random.default_rng(seed)
    shape = (BATCH_SIZE, SEQUENCE_LENGTH)
    is_first = np.zeros(shape, bool)
    is_first[:, 0] = True
    is_terminal = rng.random(shape) < 0.002
    return {
        "observation": {
            "image": rng.integers(0, 256, shape + (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        },
        "action": rng.integers(0, NUM_ACTIONS, shape).astype(np.int32),
        "reward": (rng.random(shape) < 0.05).astype(np.float32),
        "discount": (1.0 - is_terminal).astype(np.float32),
        "is_first": is_first,
        "is_last": is_terminal | (rng.random(shape) < 0.002),
        "is_terminal": is_terminal,
    }


def _count(tree) -> int:
    import jax

    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


class OursRunner:
    """Our jitted update at one size, compiled once; `run(steps)` times chained updates."""

    def __init__(self, size: ModelSize, seed: int = 0):
        import jax

        from mbxfer import agents

        self._jax = jax
        self.agent = agents.make("dreamer", environment_spec(), size.dreamer_config())
        self.update = jax.jit(self.agent.update)
        self.batch = jax.device_put(random_batch(seed))
        self.state = self.agent.init(jax.random.key(seed))
        self._rng = jax.random.key(seed + 1)
        self.params = {
            "model": _count(self.state.model_params),
            "actor": _count(self.state.actor_params),
            "critic": _count(self.state.critic_params),
        }
        start = time.perf_counter()
        self.run(1)
        self.first_update_s = time.perf_counter() - start
        self.run(1)
        self.compile_s = time.perf_counter() - start

    def run(self, steps: int) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of `steps` chained updates."""
        keys = self._jax.random.split(self._rng, steps + 1)
        self._rng = keys[0]
        self._jax.block_until_ready(keys)
        start, start_cpu = time.perf_counter(), time.process_time()
        for key in keys[1:]:
            self.state, metrics = self.update(self.state, self.batch, key)
        self._jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start, time.process_time() - start_cpu


def breakdown(size: ModelSize, steps: int, seed: int = 0) -> dict[str, float]:
    """Seconds per call (fastest of `steps`) of jitted parts of our update, forward + backward.

    `encoder`, `RSSM filtering` and `decoder` differentiate `sum(output**2)` w.r.t. the model
    parameters on the batch's images, embeddings and features; `world model` is
    `value_and_grad(model.loss)` (all of them plus the heads and KL terms); imagination plus
    actor-critic has no entry point of its own and is reported as `update - world model`.
    """
    import jax
    import jax.numpy as jnp

    from mbxfer.agents.world_model import make_world_model

    config = size.dreamer_config()
    spec = environment_spec()
    model = make_world_model(config.model, spec.observations, spec.actions)
    runner = OursRunner(size, seed)
    params, batch = runner.state.model_params, runner.batch
    key = jax.random.key(seed)
    initial = model.initial_state(BATCH_SIZE)
    embeds = model.encode(params, batch["observation"])
    features = jnp.zeros((BATCH_SIZE, SEQUENCE_LENGTH, config.model.feature_size), jnp.float32)

    def squared_norm_grad(fn):
        """`grad(sum(fn(params, data) ** 2))` w.r.t. params; data is an argument, not a
        closed-over constant (XLA would constant-fold it)."""

        def objective(p, data):
            return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(fn(p, data)))

        return jax.jit(jax.grad(objective))

    def filtering(p, embeds):
        posteriors, priors = model.observe_sequence(
            p, initial, batch["action"], embeds, batch["is_first"], key
        )
        return model.features(posteriors), priors.logits

    parts = {
        "encoder": (squared_norm_grad(model.encode), (params, batch["observation"])),
        "RSSM filtering (scan over T)": (squared_norm_grad(filtering), (params, embeds)),
        "decoder": (
            squared_norm_grad(lambda p, f: model.heads(p, f).observation),
            (params, features),
        ),
        "world model (loss + grad)": (
            jax.jit(jax.value_and_grad(model.loss, has_aux=True)),
            (params, batch, initial, key),
        ),
        "full update": (runner.update, (runner.state, batch, key)),
    }
    seconds = {}
    for name, (function, arguments) in parts.items():
        jax.block_until_ready(function(*arguments))
        calls = []
        for _ in range(steps):
            start = time.perf_counter()
            jax.block_until_ready(function(*arguments))
            calls.append(time.perf_counter() - start)
        seconds[name] = min(calls)  # The least disturbed call: the machine is shared.
    seconds["imagination + actor-critic (update - world model)"] = (
        seconds["full update"] - seconds["world model (loss + grad)"]
    )
    return seconds


# ---------------------------------------------------------------------------------------
# Reference.


def ensure_reference_venv(venv: Path) -> Path:
    """The reference venv's python, building the venv first if it is missing or incomplete."""
    python = venv / "bin" / "python"
    if (venv / _VENV_COMPLETE).exists():
        return python
    base = shutil.which("python3.11")
    if base is None:
        raise RuntimeError("building the DreamerV3 reference venv needs python3.11 on PATH")
    print(f"building the DreamerV3 reference venv in {venv} (a few minutes, once)", flush=True)
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for command in (
        [base, "-m", "venv", str(venv)],
        pip + ["--no-deps", f"dreamerv3=={REFERENCE_VERSION}"],
        pip + list(REFERENCE_REQUIREMENTS),
    ):
        subprocess.run(command, check=True)
    (venv / _VENV_COMPLETE).write_text(" ".join(REFERENCE_REQUIREMENTS) + "\n")
    return python


class ReferenceRunner:
    """DreamerV3 in its venv, compiled once and kept alive; `run(steps)` times updates."""

    def __init__(self, python: Path, size: ModelSize, seed: int = 0):
        blocks = ["crafter"] + ([size.reference_block] if size.reference_block else [])
        self.log_path = Path(tempfile.mkstemp(prefix="dreamerv3-reference-", suffix=".log")[1])
        self._log = open(self.log_path, "w")
        env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
        env.pop("PYTHONPATH", None)
        self._process = subprocess.Popen(
            [
                str(python),
                str(REFERENCE_SCRIPT),
                "--blocks",
                ",".join(blocks),
                "--overrides",
                json.dumps(size.reference_overrides()),
                "--seed",
                str(seed),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=tempfile.gettempdir(),
            env=env,
        )
        self.ready = self._receive("ready")

    def _receive(self, event: str) -> dict[str, Any]:
        line = self._process.stdout.readline()
        if not line:
            self._process.wait()
            self._log.flush()
            tail = self.log_path.read_text().splitlines()[-25:]
            raise RuntimeError(
                f"the DreamerV3 reference exited ({self._process.returncode}); log "
                f"{self.log_path}:\n" + "\n".join(tail)
            )
        message = json.loads(line)
        if message.get("event") != event:
            raise RuntimeError(f"expected a {event!r} message from the reference, got {line!r}")
        return message

    def run(self, steps: int) -> tuple[float, float]:
        """(wall seconds, the reference process's CPU seconds) of `steps` updates."""
        self._process.stdin.write(f"run {steps}\n")
        self._process.stdin.flush()
        timed = self._receive("timed")
        return float(timed["seconds"]), float(timed["cpu_seconds"])

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.write("quit\n")
            self._process.stdin.close()
            self._process.wait(timeout=60)
        self._log.close()


# ---------------------------------------------------------------------------------------
# Driver.


def machine_info() -> dict[str, Any]:
    import jax

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def measure_size(
    name: str, steps: int, rounds: int, reference_python: Path | None, seed: int
) -> dict[str, Any]:
    """Both sides at one size, alternating ABBA (ours first in even rounds, theirs in odd)."""
    size = SIZES[name]
    print(f"[{name}] compiling ours ...", flush=True)
    sides: dict[str, Any] = {"ours": OursRunner(size, seed)}
    ours = sides["ours"]
    result: dict[str, Any] = {
        "size": dataclasses.asdict(size),
        "ours": {
            "params": sum(ours.params.values()),
            "params_by_part": ours.params,
            "compile_s": ours.compile_s,
            "first_update_s": ours.first_update_s,
        },
    }
    if reference_python is not None:
        print(f"[{name}] compiling the DreamerV3 reference ...", flush=True)
        sides["reference"] = ReferenceRunner(reference_python, size, seed)
        ready = sides["reference"].ready
        result["reference"] = {
            "params": ready["params"],
            "params_by_part": ready["params_by_optimizer"],
            "compile_s": ready["compile_s"],
            "first_update_s": ready["first_update_s"],
            "jax": ready["jax"],
        }
    for side in sides:
        result[side].update(seconds=[], cpu_seconds=[])
    try:
        for round_index in range(rounds):
            order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
            for side in order:
                seconds, cpu_seconds = sides[side].run(steps)
                result[side]["seconds"].append(seconds)
                result[side]["cpu_seconds"].append(cpu_seconds)
            print(
                f"[{name}] round {round_index + 1}/{rounds}, {steps} updates: "
                + ", ".join(
                    f"{side} {result[side]['seconds'][-1]:.1f} s "
                    f"(CPU {result[side]['cpu_seconds'][-1]:.1f} s)"
                    for side in sides
                ),
                flush=True,
            )
    finally:
        if "reference" in sides:
            sides["reference"].close()
    for side in sides:
        rates = [steps / seconds for seconds in result[side]["seconds"]]
        result[side]["steps_per_s_by_round"] = rates
        result[side]["steps_per_s"] = statistics.median(rates)
        result[side]["cpu_s_per_step"] = statistics.median(
            seconds / steps for seconds in result[side]["cpu_seconds"]
        )
    if "reference" in sides:
        ours_rates = result["ours"]["steps_per_s_by_round"]
        reference_rates = result["reference"]["steps_per_s_by_round"]
        result["ratio_by_round"] = [a / b for a, b in zip(ours_rates, reference_rates)]
        # Each round's two measurements share the machine's load: the median of the per-round
        # ratios is the headline; the ratio of medians and of CPU time are printed beside it.
        result["ratio"] = statistics.median(result["ratio_by_round"])
        result["ratio_of_medians"] = result["ours"]["steps_per_s"] / statistics.median(
            reference_rates
        )
        result["cpu_ratio"] = (
            result["reference"]["cpu_s_per_step"] / result["ours"]["cpu_s_per_step"]
        )
    return result


def format_table(results: dict[str, dict[str, Any]]) -> str:
    columns = (
        "size",
        "params ours/theirs",
        "compile s",
        "steps/s",
        "ratio",
        "ratio of",
        "CPU s/step",
        "CPU",
    )
    under = ("", "", "ours/theirs", "ours/theirs", "per round", "medians", "ours/theirs", "ratio")
    widths = (6, 22, 13, 15, 10, 9, 13, 6)
    lines = [" ".join(f"{c:>{w}s}" for c, w in zip(row, widths)) for row in (columns, under)]
    lines.append("-" * len(lines[0]))
    for name, r in results.items():
        ours, theirs = r["ours"], r.get("reference")
        if theirs is None:
            cells = (
                name,
                f"{ours['params']:,} / -",
                f"{ours['compile_s']:.0f} / -",
                f"{ours['steps_per_s']:.3f} / -",
                "-",
                "-",
                f"{ours['cpu_s_per_step']:.1f} / -",
                "-",
            )
        else:
            cells = (
                name,
                f"{ours['params']:,} / {theirs['params']:,}",
                f"{ours['compile_s']:.0f} / {theirs['compile_s']:.0f}",
                f"{ours['steps_per_s']:.3f} / {theirs['steps_per_s']:.3f}",
                f"{r['ratio']:.2f}x",
                f"{r['ratio_of_medians']:.2f}x",
                f"{ours['cpu_s_per_step']:.1f} / {theirs['cpu_s_per_step']:.1f}",
                f"{r['cpu_ratio']:.2f}x",
            )
        lines.append(" ".join(f"{c:>{w}s}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="debug,mid", help=f"comma-separated, of {list(SIZES)}")
    parser.add_argument("--steps", type=int, default=2, help="timed updates per side per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per size")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument(
        "--skip-reference", action="store_true", help="time ours only (no DreamerV3 venv)"
    )
    parser.add_argument(
        "--reference-venv",
        type=Path,
        default=DEFAULT_REFERENCE_VENV,
        help="the DreamerV3 venv (built here on first use)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time parts of our update (encoder, decoder, world model, actor-critic)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = [name for name in args.sizes.split(",") if name]
    unknown = [name for name in names if name not in SIZES]
    if unknown or not names:
        parser.error(f"unknown sizes {unknown}; known: {list(SIZES)}")
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1")

    reference_python = None if args.skip_reference else ensure_reference_venv(args.reference_venv)
    machine = machine_info()
    results = {
        name: measure_size(name, args.steps, args.rounds, reference_python, args.seed)
        for name in names
    }
    machine["load_average_after"] = os.getloadavg()
    print()
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, load average "
        f"{machine['load_average'][0]:.2f} -> {machine['load_average_after'][0]:.2f}; "
        f"ours jax {machine['jax']}"
        + (
            f", DreamerV3 {REFERENCE_VERSION} jax {next(iter(results.values()))['reference']['jax']}"
            if reference_python is not None
            else ""
        )
    )
    print(
        f"batch {BATCH_SIZE} x {SEQUENCE_LENGTH}, {IMAGE_SIZE}x{IMAGE_SIZE}x3 images, "
        f"{NUM_ACTIONS} actions, horizon {IMAGINATION_HORIZON}; {args.rounds} rounds x "
        f"{args.steps} updates per side, medians; compile = first two updates; "
        f"ratio = ours/theirs steps/s (CPU ratio: theirs/ours CPU s per update)"
    )
    for name in names:
        print(f"  {name}: {SIZES[name]}")
    print(format_table(results))
    output: dict[str, Any] = {"machine": machine, "results": results}
    if args.breakdown:
        output["breakdown"] = {}
        for name in names:
            parts = breakdown(SIZES[name], args.steps, args.seed)
            output["breakdown"][name] = parts
            print(f"\nours at {name}, seconds per call:")
            for part, seconds in parts.items():
                print(f"  {part:50s} {seconds:8.3f}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(output, file, indent=2)
    return output


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
