"""Sweeps: a YAML grid of trials, run in a local process pool or on Ray, resumable.

    agents: [random, {name: dreamer, model: {deter: 512}}]   # names (`mbxfer agents`), or
                                                   # a name with that agent's config values
    envs: [grid, {name: crafter, task: reward, kwargs: {size: 64}}]
    tasks: [collect_items, null]                   # for envs that do not name their own task
    protocols: [scratch, pretrain_finetune]        # -> protocol.name
    seeds: [0, 1, 2]
    base: {train: {steps: 20000}}                  # nested TrialConfig updates, every trial
    grid: {agent.model.latent: [rssm, deterministic]}   # dotted key -> values (product)
    resources: {num_cpus: 1, num_gpus: 0}          # per trial

`expand(spec)` builds every combination with `config.build` and reports all the problems of
all trials at once (`SpecError`) before anything runs. Each trial lives in `<out>/<trial_id>`
(a hash of its resolved config); `<out>/trials.jsonl` says which is which. `run(...)` skips
finished trials (`done.json`), resumes interrupted ones from their checkpoints (the runner
does that), and retries failed ones; each failure's traceback is appended to the trial's
`error.txt` and `failed.json` marks the trial as failed until an attempt starts again.

Trials report progress through the runner's `on_step` into `<trial>/progress.json`, which the
driver polls for one overall line: done / running / failed, env steps/s and ETA. The local
executor is a spawn process pool whose workers each own a share of the cores (affinity and
thread counts) and die with the driver; the Ray executor runs one `ray.remote` task per trial
(`max_retries` resubmits trials whose worker or node died). With Ray on several machines,
`--out` must be storage that every node sees.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import difflib
import itertools
import json
import math
import multiprocessing
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, TextIO

import yaml

from benchmarks import config as config_lib
from benchmarks.checkpoint import write_atomic

AXES = ("agents", "envs", "tasks", "protocols", "seeds")
SPEC_KEYS = (*AXES, "base", "grid", "resources", "name", "description", "scales", "parts")
INDEX = "trials.jsonl"
STATUSES = ("done", "partial", "failed", "new", "running")
_PROGRESS_INTERVAL = 0.5  # seconds between progress.json writes of one trial


class SpecError(config_lib.ConfigError):
    """A sweep spec that cannot run; the message names every problem."""


class MissingRayError(config_lib.ConfigError):
    pass


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one trial asks of a Ray cluster (and, locally, how many cores a worker gets)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclasses.dataclass(frozen=True)
class Trial:
    """One resolved trial and the spec values that made it (for the index and reports)."""

    config: config_lib.TrialConfig
    labels: Mapping[str, Any]

    @property
    def trial_id(self) -> str:
        return self.config.trial_id()


@dataclasses.dataclass(frozen=True)
class Sweep:
    trials: tuple[Trial, ...]
    resources: Resources = Resources()
    name: str = "sweep"


@dataclasses.dataclass(frozen=True)
class Job:
    """What a worker needs to run one trial."""

    config: config_lib.TrialConfig
    folder: str
    threads: Optional[int] = None
    """Set thread counts for this many cores (Ray tasks); None leaves them (local workers)."""
    start_from: Optional[str] = None
    """Another trial's phase-boundary checkpoint that ends this trial's first phases."""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The end state of every trial of a `run`: trial id -> done / failed / running."""

    statuses: Mapping[str, str]
    errors: Mapping[str, str]

    @property
    def ok(self) -> bool:
        return all(status == "done" for status in self.statuses.values())


# ---------------------------------------------------------------------------------------------
# Spec -> trials


def load_spec(path: Path, scale: Optional[str] = None) -> dict:
    """The spec in `path`; with `scale`, its `scales: {NAME: {...}}` entry merged over it (a
    preset's CPU-sized default and, e.g., its `paper` scale for clusters in one file)."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SpecError(f"cannot read sweep spec {path}: {error}") from None
    if not isinstance(spec, Mapping):
        raise SpecError(f"sweep spec {path} must be a YAML mapping (agents:, envs:, seeds:, ...)")
    spec = dict(spec)
    scales = spec.pop("scales", None) or {}
    if scale is not None:
        if scale not in scales:
            raise SpecError(
                f"sweep spec {path} has no scale {scale!r}{_close(scale, list(scales) or ['-'])}"
            )
        spec = _merge(spec, scales[scale])
    return spec


def _close(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"{hint}; valid: {', '.join(valid)}"


def _merge(into: dict, more: Mapping) -> dict:
    for key, value in more.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value
    return into


def _nest(dotted: str, value: Any) -> dict:
    keys = dotted.split(".")
    if keys == ["agent"]:
        keys = ["agent", "name"]  # As in `config.parse_overrides`.
    nested: dict = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        nested = {key: nested}
    return nested


def _axis(spec: Mapping, key: str, problems: list[str]) -> list:
    if key not in spec:
        return [None]  # Not swept: the base (or the default) decides.
    values = spec[key]
    if not isinstance(values, list) or not values:
        problems.append(f"{key}: must be a non-empty list (got {values!r})")
        return [None]  # Go on validating the rest of the spec without this axis.
    return values


def _named_axis(spec: Mapping, key: str, valid: list[str], problems: list[str]) -> list:
    """`agents` or `envs`: names, or mappings with a `name`; unknown names are problems."""
    kind = {"agents": "agent", "envs": "environment"}[key]
    entries = []
    for index, value in enumerate(_axis(spec, key, problems)):
        entry = {"name": value} if isinstance(value, str) else value
        if value is None:
            entries.append(None)
        elif not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)):
            problems.append(f"{key}[{index}]: must be a name or a mapping with a name")
        elif entry["name"] not in valid:
            name = entry["name"]
            problems.append(f"{key}[{index}]: unknown {kind} {name!r}{_close(name, valid)}")
        else:
            entries.append(dict(entry))
    return entries


def _grid(spec: Mapping, problems: list[str]) -> dict[str, list]:
    grid = spec.get("grid") or {}
    if not isinstance(grid, Mapping):
        problems.append(f"grid: must map dotted keys to lists of values (got {grid!r})")
        return {}
    axes = {"agent": "agents", "agent.name": "agents", "seed": "seeds", "env.name": "envs",
            "env.task": "tasks", "protocol.name": "protocols"}  # fmt: skip
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            problems.append(
                f"grid.{key}: must be a non-empty list of values (got {values!r}); "
                "a single value belongs in base"
            )
        if axes.get(key) in spec:
            problems.append(f"grid.{key}: duplicates the {axes[key]} axis; use one of them")
    return {str(k): v for k, v in grid.items() if isinstance(v, list) and v}


def _updates(base: Mapping, axes: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """Nested config updates of one trial: the base, then its axis values, then the grid's."""
    updates = _merge({}, base)
    if axes["agent"] is not None:
        _merge(updates, {"agent": axes["agent"]})
    if axes["env"] is not None:
        _merge(updates, {"env": axes["env"]})
    if axes["task"] is not None:
        _merge(updates, {"env": {"task": axes["task"][0]}})
    if axes["protocol"] is not None:
        _merge(updates, {"protocol": {"name": axes["protocol"]}})
    if axes["seed"] is not None:
        updates["seed"] = axes["seed"]
    for key, value in overrides.items():
        _merge(updates, _nest(key, value))
    return updates


def expand(spec: Mapping) -> Sweep:
    """Every trial of `spec`, validated; raises `SpecError` naming all problems at once.

    `parts: [{...}, ...]` makes one spec of several grids: each part is merged over the rest
    of the spec (e.g. a toy study and a short real-environment leg with other budgets).
    """
    if spec.get("parts") is not None:
        parts = spec["parts"]
        if not isinstance(parts, list) or not parts:
            raise SpecError("parts: must be a non-empty list of spec mappings")
        shared = {k: v for k, v in spec.items() if k != "parts"}
        trials: dict[str, Trial] = {}
        problems: list[str] = []
        sweep = None
        for index, part in enumerate(parts):
            if not isinstance(part, Mapping) or "parts" in part:
                problems.append(f"parts[{index}]: must be a spec mapping without parts")
                continue
            try:
                sweep = expand(_merge(json.loads(json.dumps(shared)), part))
            except SpecError as error:
                problems += [f"parts[{index}]: {line}" for line in _problem_lines(error)[1:]]
                continue
            for trial in sweep.trials:
                trials.setdefault(trial.trial_id, trial)
        if problems:
            raise SpecError(
                f"invalid sweep spec ({len(problems)} problems; nothing was run):\n  "
                + "\n  ".join(problems)
            )
        return Sweep(tuple(trials.values()), sweep.resources, str(spec.get("name") or "sweep"))
    import agents
    from envs import base as env_base
    from envs import registry

    problems: list[str] = []
    for key in spec:
        if key not in SPEC_KEYS:
            problems.append(f"unknown spec key {key!r}{_close(key, list(SPEC_KEYS))}")
    base = spec.get("base") or {}
    if not isinstance(base, Mapping):
        problems.append(f"base: must be a mapping of config values (got {base!r})")
        base = {}
    base = dict(base)
    if isinstance(base.get("agent"), str):
        base["agent"] = {"name": base["agent"]}
    grid = _grid(spec, problems)
    resources = _resources(spec.get("resources") or {}, problems)
    agent_axis = _named_axis(spec, "agents", agents.names(), problems)
    env_axis = _named_axis(spec, "envs", registry.names(), problems)
    # Tasks are boxed so that a swept `null` (reward-free) differs from "not swept".
    task_values = _axis(spec, "tasks", problems)
    swept = isinstance(spec.get("tasks"), list) and spec["tasks"]
    tasks = [(task,) for task in task_values] if swept else [None]
    protocols = _axis(spec, "protocols", problems)
    seeds = _axis(spec, "seeds", problems)
    # With no valid agent the rest is still checked with the default agent, except the
    # agent's own keys, which only the intended agent can check.
    agents_unknown = not agent_axis

    trials: dict[str, Trial] = {}
    checked_envs: set[str] = set()
    for agent, env, protocol, seed in itertools.product(
        agent_axis or [None], env_axis or [None], protocols, seeds
    ):
        env_tasks = [None] if env is not None and "task" in env else tasks  # Its own task.
        for task, values in itertools.product(env_tasks, itertools.product(*grid.values())):
            overrides = dict(zip(grid, values))
            axes = {"agent": agent, "env": env, "task": task, "protocol": protocol, "seed": seed}
            try:
                config = config_lib.build(_updates(base, axes, overrides))
                trial_budget(config)  # Protocol errors (a missing target task, ...) too.
            except (config_lib.ConfigError, ValueError) as error:
                lines = _problem_lines(error)
                problems += [p for p in lines if not (agents_unknown and "'agent." in p)]
                continue
            recipe = [config.env.name, config.env.task, config.env.kwargs]
            if json.dumps(recipe, default=str) not in checked_envs:
                checked_envs.add(json.dumps(recipe, default=str))
                try:  # Checks environment keywords and optional dependencies; builds nothing.
                    registry.factory(recipe[0], task=recipe[1], **dict(recipe[2]))
                except env_base.ConfigurationError as error:
                    problems.append(str(error))
            labels = {
                "agent": config.agent,
                "env": config.env.name,
                "task": config.env.task,
                "protocol": _protocol_name(config),
                "seed": config.seed,
                "overrides": overrides,
            }
            trials.setdefault(config.trial_id(), Trial(config, labels))
    if not problems and not trials:
        problems.append("the spec expands to no trials")
    if problems:
        unique = list(dict.fromkeys(problems))
        raise SpecError(
            f"invalid sweep spec ({len(unique)} problem{'s' * (len(unique) > 1)}; "
            "nothing was run):\n  " + "\n  ".join(unique)
        )
    return Sweep(tuple(trials.values()), resources, str(spec.get("name") or "sweep"))


def _problem_lines(error: Exception) -> list[str]:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return [line for line in lines if line != "invalid configuration:"]


def _resources(value: Any, problems: list[str]) -> Resources:
    if not isinstance(value, Mapping):
        problems.append("resources: must be a mapping like {num_cpus: 1, num_gpus: 0}")
        return Resources()
    fields = [f.name for f in dataclasses.fields(Resources)]
    out = {}
    for key, number in value.items():
        if key not in fields:
            problems.append(f"unknown key 'resources.{key}'{_close(key, fields)}")
        elif isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
            problems.append(f"resources.{key}={number!r} must be a number >= 0")
        else:
            out[key] = float(number)
    return Resources(**out)


def trial_budget(config: config_lib.TrialConfig) -> int:
    """Environment steps over all the trial's phases; raises ValueError for a bad protocol."""
    if not hasattr(config, "protocol"):  # Before protocols: one phase of train.steps.
        return config.train.steps
    from benchmarks import protocols

    return sum(phase.steps for phase in protocols.phases(config))


def _protocol_name(config: config_lib.TrialConfig) -> str:
    protocol = getattr(config, "protocol", None)
    return getattr(protocol, "name", None) or "scratch"


# ---------------------------------------------------------------------------------------------
# Trial folders: status, index, progress


def trial_status(folder: Path) -> str:
    """done / running (locked by a live process) / failed / partial (started) / new."""
    folder = Path(folder)
    if (folder / "done.json").exists():
        return "done"
    if folder.exists() and _locked_elsewhere(folder):
        return "running"
    if (folder / "failed.json").exists():
        return "failed"
    if (folder / "config.yaml").exists():
        return "partial"
    return "new"


def steps_done(folder: Path) -> int:
    """Environment steps a trial has safely behind it (its latest checkpoint)."""
    from benchmarks import checkpoint

    found = checkpoint.latest(Path(folder) / "checkpoints")
    # Named `step-<total steps>` (with `-phase<i>` after it when the trial has phases).
    return int(found.name.split("-")[1]) if found is not None else 0


def plan(sweep: Sweep, out: Path) -> list[tuple[Trial, str, int]]:
    """(trial, status, steps done) for every trial, without running anything."""
    out = Path(out)
    rows = []
    for trial in sweep.trials:
        folder = out / trial.trial_id
        status = trial_status(folder)
        steps = trial_budget(trial.config) if status == "done" else steps_done(folder)
        rows.append((trial, status, steps))
    return rows


def shared_starts(trials: Sequence[Trial]) -> dict[str, tuple[str, int]]:
    """Trial id -> (leader trial id, phase index) for the trials whose first phases an
    earlier trial of the sweep runs exactly as they would: they start from the leader's
    `phase<index>.ckpt` instead of running those phases again (a grid over finetuning
    settings pretrains once per seed). "Exactly" is `protocols.prefix_key`: same agent and
    agent config, seed, environment, training settings and phases up to there; the result is
    bit-identical to running them (tests/test_protocols.py checks `--from` equals a
    continuous run). The longest shared prefix wins; the leader is the first trial in sweep
    order that has it."""
    from benchmarks import protocols

    # keys[trial id][k] fingerprints the trial's first k + 1 phases.
    keys = {
        t.trial_id: [
            protocols.prefix_key(t.config, count)
            for count in range(1, len(protocols.phases(t.config)) + 1)
        ]
        for t in trials
    }
    first: dict[tuple[int, str], str] = {}
    for trial_id, prefixes in keys.items():
        for index, key in enumerate(prefixes):
            first.setdefault((index, key), trial_id)
    starts = {}
    for trial_id, prefixes in keys.items():
        for index in range(len(prefixes) - 2, -1, -1):  # Never the whole protocol.
            leader = first[(index, prefixes[index])]
            if leader != trial_id:
                starts[trial_id] = (leader, index)
                break
    return starts


def write_index(sweep: Sweep, out: Path, spec_path: Optional[str] = None) -> None:
    """`<out>/trials.jsonl`: one line per trial ever run into `out`, newest spec wins."""
    path = Path(out) / INDEX
    entries: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                entries[record["trial_id"]] = record
    for trial in sweep.trials:
        entries[trial.trial_id] = {
            "trial_id": trial.trial_id,
            "folder": trial.trial_id,
            **trial.labels,
            "steps": trial_budget(trial.config),
            "spec": spec_path,
        }
    text = "".join(json.dumps(e, default=str) + "\n" for e in entries.values())
    write_atomic(path, text.encode())


class _TrialLock:
    """An exclusive `flock` on `<trial>/.lock`: one process runs a trial at a time."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self.file: Optional[TextIO] = None

    def acquire(self) -> bool:
        import fcntl

        self.file = open(self.path, "a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            self.file.close()
            self.file = None
            return False

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # Closing drops the flock; a killed process drops it too.
            self.file = None


def _locked_elsewhere(folder: Path) -> bool:
    if not (Path(folder) / ".lock").exists():
        return False
    lock = _TrialLock(folder)
    free = lock.acquire()
    lock.release()
    return not free


class _ProgressWriter:
    """The runner's `on_step`: writes `<trial>/progress.json` at most every half second."""

    def __init__(self, folder: Path, total: int):
        self.path = Path(folder) / "progress.json"
        self.total = total
        self.last = 0.0

    def __call__(self, env_steps: int, force: bool = False) -> None:
        now = time.time()
        if force or now - self.last >= _PROGRESS_INTERVAL:
            self.last = now
            record = {"env_steps": int(env_steps), "total": self.total, "time": now}
            write_atomic(self.path, json.dumps(record).encode())


def _record_failure(folder: Path, text: str) -> str:
    """Append a traceback to `error.txt` and mark the trial failed; returns its last line."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    header = f"=== attempt failed at {stamp} on {socket.gethostname()} (pid {os.getpid()}) ===\n"
    with open(folder / "error.txt", "a") as file:
        file.write(header + text.rstrip() + "\n\n")
    summary = text.strip().splitlines()[-1] if text.strip() else "failed"
    write_atomic(folder / "failed.json", json.dumps({"error": summary, "time": stamp}).encode())
    return summary


def run_trial(job: Job) -> dict:
    """Run (or resume) one trial in its folder; never raises for a failing trial.

    Returns `{"status": "done" | "failed" | "running", "error": ...}`; `running` means another
    process holds the trial's lock.
    """
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    if job.threads is not None:
        limit_threads(job.threads)
    lock = _TrialLock(folder)
    for _ in range(20):  # A dry run elsewhere may hold the lock for an instant.
        if lock.acquire():
            break
        time.sleep(0.1)
    else:
        return {"status": "running"}
    try:
        if (folder / "done.json").exists():
            return {"status": "done"}
        (folder / "failed.json").unlink(missing_ok=True)
        progress = _ProgressWriter(folder, trial_budget(job.config))
        progress(steps_done(folder), force=True)
        try:
            from benchmarks import runner

            start_from = Path(job.start_from) if job.start_from else None
            runner.run(job.config, folder, progress=False, on_step=progress, start_from=start_from)
        except Exception:
            return {"status": "failed", "error": _record_failure(folder, traceback.format_exc())}
        progress(progress.total, force=True)
        return {"status": "done"}
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------
# Executors: submit(job) -> handle; wait(handles, timeout) -> finished; result(handle) -> dict


class WorkerLost(RuntimeError):
    """The process (or node) running a trial died; the trial may not have started."""


def limit_threads(cores: int) -> None:
    """Thread counts for a process that owns `cores` cores; set before JAX makes its backend."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(max(1, cores))
    if cores <= 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()


def core_shares(workers: int) -> list[list[int]]:
    """Split this process's cores into `workers` contiguous shares (shared when too few)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cores:
        cores = list(range(os.cpu_count() or 1))
    if workers >= len(cores):
        return [[cores[i % len(cores)]] for i in range(workers)]
    bounds = [round(i * len(cores) / workers) for i in range(workers + 1)]
    return [cores[bounds[i] : bounds[i + 1]] for i in range(workers)]


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the driver dies, so no orphan trains on."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _init_local_worker(slots, shares: list[list[int]], parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:
        os._exit(1)
    cores = shares[slots.get()]
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    limit_threads(len(cores))


class LocalExecutor:
    """A spawn process pool; a crashed worker (segfault, OOM kill) restarts the pool."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool: Optional[concurrent.futures.ProcessPoolExecutor] = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        slots = context.Queue()
        for slot in range(self.workers):
            slots.put(slot)
        self.pool = concurrent.futures.ProcessPoolExecutor(
            self.workers,
            mp_context=context,
            initializer=_init_local_worker,
            initargs=(slots, core_shares(self.workers), os.getpid()),
        )

    def submit(self, job: Job):
        if self.pool is None:
            self._start()
        try:
            return self.pool.submit(run_trial, job)
        except concurrent.futures.process.BrokenProcessPool:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self._start()
            return self.pool.submit(run_trial, job)

    def wait(self, handles: list, timeout: float) -> list:
        finished, _ = concurrent.futures.wait(
            handles, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )
        return list(finished)

    def result(self, handle) -> dict:
        try:
            return handle.result()
        except concurrent.futures.process.BrokenProcessPool as error:
            raise WorkerLost(f"a worker process died abruptly ({error})") from None

    def close(self, abort: bool = False) -> None:
        """Wait for the workers to exit; with `abort` (Ctrl-C), end running trials now (they
        resume from their checkpoints next time)."""
        if self.pool is None:
            return
        if abort:
            # The executor has no public way to stop running calls; its processes are known.
            for process in list(getattr(self.pool, "_processes", {}).values()):
                process.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """One `ray.remote` task per trial; Ray resubmits tasks whose worker or node died."""

    def __init__(self, address: Optional[str], resources: Resources, retries: int):
        try:
            import ray
        except ImportError:
            raise MissingRayError(
                "--executor ray needs Ray, which is not installed: pip install 'mbxfer[ray]'"
            ) from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self.remote = ray.remote(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_retries=retries
        )(run_trial)
        self.threads = max(1, math.ceil(resources.num_cpus))
        self.pending: set = set()

    def submit(self, job: Job):
        handle = self.remote.remote(dataclasses.replace(job, threads=self.threads))
        self.pending.add(handle)
        return handle

    def wait(self, handles: list, timeout: float) -> list:
        finished, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        self.pending.difference_update(finished)
        return finished

    def result(self, handle) -> dict:
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayError as error:
            raise WorkerLost(f"{type(error).__name__}: {error}") from None

    def close(self, abort: bool = False) -> None:
        if abort and not self.started:
            for handle in self.pending:
                self.ray.cancel(handle, force=True)
        if self.started:
            self.ray.shutdown()  # Ends this sweep's tasks with the cluster it started.


# ---------------------------------------------------------------------------------------------
# The driver


class _Progress:
    """One overall line: trials done / running / failed, env steps/s over all trials, ETA."""

    def __init__(self, sweep: Sweep, out: Path, stream: Optional[TextIO]):
        self.out, self.stream = out, stream
        self.totals = {t.trial_id: trial_budget(t.config) for t in sweep.trials}
        self.baseline = {i: steps_done(out / i) for i in self.totals}
        self.current = dict(self.baseline)
        self.started = time.time()
        self.tty = bool(stream is not None and stream.isatty())
        self.last_line, self.last_print = "", 0.0

    def _read(self, trial_id: str) -> tuple[int, float]:
        try:
            record = json.loads((self.out / trial_id / "progress.json").read_text())
            return int(record["env_steps"]), float(record["time"])
        except (OSError, ValueError, KeyError):
            return self.current[trial_id], 0.0

    def line(self, statuses: dict[str, str], pending: Mapping[str, float]) -> str:
        """`pending`: trial id -> when its current attempt was submitted."""
        running = 0
        for trial_id in pending:
            steps, stamp = self._read(trial_id)
            self.current[trial_id] = max(steps, self.baseline[trial_id])
            running += stamp >= pending[trial_id] - 1.0  # This attempt has started.
        for trial_id, status in statuses.items():
            if status == "done":
                self.current[trial_id] = self.totals[trial_id]
        done = sum(s == "done" for s in statuses.values())
        failed = sum(s == "failed" for s in statuses.values())
        elapsed = max(time.time() - self.started, 1e-9)
        rate = sum(self.current[i] - self.baseline[i] for i in self.totals) / elapsed
        remaining = sum(self.totals[i] - self.current[i] for i in pending)
        eta = _duration(remaining / rate) if rate > 0 and pending else "-"
        return (
            f"sweep: {done}/{len(self.totals)} done, {running} running, {failed} failed | "
            f"{rate:,.0f} env steps/s | ETA {eta}"
        )

    def show(
        self, statuses: dict[str, str], pending: Mapping[str, float], final: bool = False
    ) -> None:
        if self.stream is None:
            return
        line = self.line(statuses, pending)
        now = time.time()
        if self.tty:
            self.stream.write("\r" + line.ljust(len(self.last_line)) + ("\n" if final else ""))
            self.stream.flush()
        elif (
            final
            or line.split("|")[0] != self.last_line.split("|")[0]
            or now - self.last_print > 30
        ):
            print(line, file=self.stream, flush=True)
            self.last_print = now
        self.last_line = line


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def check_executor(executor: str, address: Optional[str]) -> None:
    """Fail before anything runs or is written: unknown executor, stray address, no Ray."""
    import importlib.util

    if executor not in ("local", "ray"):
        raise SpecError(f"unknown executor {executor!r}; valid: local, ray")
    if executor == "local" and address:
        raise SpecError("--address is for --executor ray")
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        raise MissingRayError(
            "--executor ray needs Ray, which is not installed: pip install 'mbxfer[ray]'"
        )


def make_executor(
    executor: str, workers: int, address: Optional[str], resources: Resources, retries: int
):
    check_executor(executor, address)
    if executor == "local":
        return LocalExecutor(workers)
    return RayExecutor(address, resources, retries)


def default_workers(resources: Resources) -> int:
    cores = len(core_shares(1)[0])
    return max(1, int(cores // max(resources.num_cpus, 1.0)))


def run(
    sweep: Sweep,
    out: Path,
    executor: str = "local",
    workers: Optional[int] = None,
    address: Optional[str] = None,
    retries: int = 1,
    stream: Optional[TextIO] = sys.stderr,
    progress: bool = True,
    spec_path: Optional[str] = None,
    poll: float = 1.0,
) -> Outcome:
    """Run every unfinished trial of `sweep` under `out`; failed ones get `retries` more tries.

    `stream` gets what is found at the start and, with `progress`, the overall progress line.
    """
    check_executor(executor, address)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or default_workers(sweep.resources)
    rows = plan(sweep, out)
    counts = {s: sum(r[1] == s for r in rows) for s in STATUSES}
    if stream is not None:
        print(
            f"sweep: {len(rows)} trials in {out}: {counts['done']} done (skipped), "
            f"{counts['partial']} partial (resuming), {counts['failed']} failed (retrying), "
            f"{counts['new']} new, {counts['running']} running elsewhere (skipped)",
            file=stream,
            flush=True,
        )
    write_index(sweep, out, spec_path)
    statuses = {trial.trial_id: status for trial, status, _ in rows}
    todo = [trial for trial, status, _ in rows if status in ("partial", "failed", "new")]
    errors: dict[str, str] = {}
    if not todo:
        return Outcome(statuses, errors)
    # Trials that will start from another trial's phase checkpoint wait for it (unless they
    # have checkpoints of their own to resume from).
    starts = {
        trial_id: start
        for trial_id, start in shared_starts(sweep.trials).items()
        if statuses[trial_id] != "partial"
    }
    pool = make_executor(executor, workers, address, sweep.resources, retries)
    display = _Progress(sweep, out, stream if progress else None)
    attempts: dict[str, int] = {}
    submitted: dict[str, float] = {}
    pending: dict[Any, Trial] = {}
    waiting: dict[str, Trial] = {}

    def submit(trial: Trial, charge: bool = True) -> None:
        start_from = None
        if trial.trial_id in starts:
            leader, index = starts[trial.trial_id]
            checkpoint = out / leader / f"phase{index}.ckpt"
            if (checkpoint / "runner.json").exists():
                start_from = str(checkpoint)
            elif statuses.get(leader) in ("queued", "waiting"):
                statuses[trial.trial_id] = "waiting"  # Until the leader ends that phase.
                waiting[trial.trial_id] = trial
                return
        attempts[trial.trial_id] = attempts.get(trial.trial_id, 0) + charge
        submitted[trial.trial_id] = time.time()
        statuses[trial.trial_id] = "queued"
        job = Job(trial.config, str(out / trial.trial_id), start_from=start_from)
        pending[pool.submit(job)] = trial

    def release_waiting() -> None:
        for trial_id in list(waiting):
            submit(waiting.pop(trial_id))  # Waits again while the leader's phase runs.

    try:
        for trial in todo:
            submit(trial)
        while pending or waiting:
            release_waiting()
            for handle in pool.wait(list(pending), timeout=poll):
                trial = pending.pop(handle)
                folder = out / trial.trial_id
                try:
                    result = pool.result(handle)
                except WorkerLost as error:
                    if not _started_since(folder, submitted[trial.trial_id]):
                        submit(trial, charge=False)  # Queued behind a crash; never ran.
                        continue
                    result = {"status": "failed", "error": _record_failure(folder, str(error))}
                if result["status"] == "failed" and attempts[trial.trial_id] <= retries:
                    submit(trial)
                    continue
                statuses[trial.trial_id] = result["status"]
                if result["status"] == "failed":
                    errors[trial.trial_id] = result["error"]
            if pending:
                display.show(
                    statuses, {t.trial_id: submitted[t.trial_id] for t in pending.values()}
                )
        display.show(statuses, {}, final=True)
    except BaseException:
        pool.close(abort=True)
        raise
    pool.close()
    return Outcome(statuses, errors)


def _started_since(folder: Path, since: float) -> bool:
    try:
        return (folder / "progress.json").stat().st_mtime >= since - 1.0
    except OSError:
        return False


def iter_failed(outcome: Outcome) -> Iterator[tuple[str, str]]:
    for trial_id, status in outcome.statuses.items():
        if status != "done":
            yield trial_id, outcome.errors.get(trial_id, status)
