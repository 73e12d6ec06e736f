"""Sweeps: run the trials of a sweep spec in a local process pool or on Ray, resumable.

`benchmarks/sweep_spec.py` turns a spec into trials and `benchmarks/executors.py` runs them;
this module is the driver. Each trial lives in `<out>/<trial_id>` (a hash of its resolved
config); `<out>/trials.jsonl` says which is which. `run(...)` skips finished trials
(`done.json`), resumes interrupted ones from their checkpoints (the runner does that), and
retries failed ones; each failure's traceback is appended to the trial's `error.txt` and
`failed.json` marks the trial as failed until an attempt starts again.

Trials report progress through the runner's `on_step` into `<trial>/progress.json`, which the
driver polls for one overall line: done / running / failed, env steps/s and ETA. With Ray on
several machines, `--out` must be storage that every node sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, TextIO

from mbxfer.benchmarks import trial_folder
from mbxfer.benchmarks.checkpoint import write_atomic
from mbxfer.benchmarks.executors import (
    Job,
    WorkerLost,
    check_executor,
    default_workers,
    make_executor,
    pin_threads,
)
from mbxfer.benchmarks.sweep_spec import Sweep, Trial, trial_budget

INDEX = "trials.jsonl"
STATUSES = ("done", "partial", "failed", "new", "running")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The end state of every trial of a `run`: trial id -> done / failed / running."""

    statuses: Mapping[str, str]
    errors: Mapping[str, str]

    @property
    def ok(self) -> bool:
        return all(status == "done" for status in self.statuses.values())


# ---------------------------------------------------------------------------------------------
# Trial folders: status, index, progress


def plan(sweep: Sweep, out: Path) -> list[tuple[Trial, str, int]]:
    """(trial, status, steps done) for every trial, without running anything."""
    out = Path(out)
    rows = []
    for trial in sweep.trials:
        folder = out / trial.trial_id
        status = trial_folder.status(folder)
        steps = trial_budget(trial.config) if status == "done" else trial_folder.steps_done(folder)
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
    from mbxfer.benchmarks import protocols

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


def run_trial(job: Job) -> dict:
    """Run (or resume) one trial in its folder; never raises for a failing trial.

    Returns `{"status": "done" | "failed" | "running", "error": ...}`; `running` means another
    process holds the trial's lock.
    """
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    if job.threads is not None:  # A Ray task: its cores, a block picked by the process id.
        pin_threads(job.threads, os.getpid())
    lock = trial_folder.TrialLock(folder)
    for _ in range(20):  # A dry run elsewhere may hold the lock for an instant.
        if lock.acquire():
            break
        time.sleep(0.1)
    else:
        return {"status": "running"}
    try:
        if trial_folder.finished(folder):  # A garbled done.json: the runner says why.
            return {"status": "done"}
        (folder / "failed.json").unlink(missing_ok=True)
        progress = trial_folder.ProgressWriter(folder, trial_budget(job.config))
        progress(trial_folder.steps_done(folder), force=True)
        try:
            from mbxfer.benchmarks import runner

            start_from = Path(job.start_from) if job.start_from else None
            runner.run(job.config, folder, progress=False, on_step=progress, start_from=start_from)
        except Exception:
            return {
                "status": "failed",
                "error": trial_folder.record_failure(folder, traceback.format_exc()),
            }
        progress(progress.total, force=True)
        return {"status": "done"}
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------
# The driver


class _Progress:
    """One overall line: trials done / running / failed, env steps/s over all trials, ETA."""

    def __init__(self, sweep: Sweep, out: Path, stream: Optional[TextIO]):
        self.out, self.stream = out, stream
        self.totals = {t.trial_id: trial_budget(t.config) for t in sweep.trials}
        self.baseline = {i: trial_folder.steps_done(out / i) for i in self.totals}
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
    if not todo:
        return Outcome(statuses, {})
    # Trials that will start from another trial's phase checkpoint wait for it (unless they
    # have checkpoints of their own to resume from).
    starts = {
        trial_id: start
        for trial_id, start in shared_starts(sweep.trials).items()
        if statuses[trial_id] != "partial"
    }
    pool = make_executor(executor, workers, address, sweep.resources, retries, run_trial)
    display = _Progress(sweep, out, stream if progress else None)
    dispatch = _Dispatch(pool, out, statuses, starts, retries)
    try:
        for trial in todo:
            dispatch.submit(trial)
        while dispatch.pending or dispatch.waiting:
            dispatch.release_waiting()
            for handle in pool.wait(list(dispatch.pending), timeout=poll):
                dispatch.settle(handle)
            if dispatch.pending:
                display.show(statuses, dispatch.running())
        display.show(statuses, {}, final=True)
    except BaseException:
        pool.close(abort=True)
        raise
    pool.close()
    return Outcome(statuses, dispatch.errors)


class _Dispatch:
    """The trials of one `run` in flight: submits them, holds back those that start from a
    leader's phase checkpoint until it exists, and settles results (a failed trial is tried
    again up to `retries` times; one lost with its worker before it started is resubmitted
    free). Writes each trial's status into the shared `statuses`."""

    def __init__(
        self,
        pool,
        out: Path,
        statuses: dict[str, str],
        starts: Mapping[str, tuple[str, int]],
        retries: int,
    ):
        self.pool, self.out, self.statuses, self.starts = pool, out, statuses, starts
        self.retries = retries
        self.attempts: dict[str, int] = {}
        self.submitted: dict[str, float] = {}
        self.pending: dict[Any, Trial] = {}
        self.waiting: dict[str, Trial] = {}
        self.errors: dict[str, str] = {}

    def submit(self, trial: Trial, charge: bool = True) -> None:
        start_from = None
        if trial.trial_id in self.starts:
            leader, index = self.starts[trial.trial_id]
            checkpoint = self.out / leader / f"phase{index}.ckpt"
            if (checkpoint / "runner.json").exists():
                start_from = str(checkpoint)
            elif self.statuses.get(leader) in ("queued", "waiting"):
                self.statuses[trial.trial_id] = "waiting"  # Until the leader ends that phase.
                self.waiting[trial.trial_id] = trial
                return
        self.attempts[trial.trial_id] = self.attempts.get(trial.trial_id, 0) + charge
        self.submitted[trial.trial_id] = time.time()
        self.statuses[trial.trial_id] = "queued"
        job = Job(trial.config, str(self.out / trial.trial_id), start_from=start_from)
        self.pending[self.pool.submit(job)] = trial

    def release_waiting(self) -> None:
        for trial_id in list(self.waiting):
            self.submit(self.waiting.pop(trial_id))  # Waits again while the leader's phase runs.

    def settle(self, handle) -> None:
        """Record a finished handle's result, or submit its trial again."""
        trial = self.pending.pop(handle)
        folder = self.out / trial.trial_id
        try:
            result = self.pool.result(handle)
        except WorkerLost as error:
            if not _started_since(folder, self.submitted[trial.trial_id]):
                self.submit(trial, charge=False)  # Queued behind a crash; never ran.
                return
            result = {"status": "failed", "error": trial_folder.record_failure(folder, str(error))}
        if result["status"] == "failed" and self.attempts[trial.trial_id] <= self.retries:
            self.submit(trial)
            return
        self.statuses[trial.trial_id] = result["status"]
        if result["status"] == "failed":
            self.errors[trial.trial_id] = result["error"]

    def running(self) -> dict[str, float]:
        """Trial id -> when its current attempt was submitted, for every pending trial."""
        return {t.trial_id: self.submitted[t.trial_id] for t in self.pending.values()}


def _started_since(folder: Path, since: float) -> bool:
    try:
        return (folder / "progress.json").stat().st_mtime >= since - 1.0
    except OSError:
        return False


def iter_failed(outcome: Outcome) -> Iterator[tuple[str, str]]:
    for trial_id, status in outcome.statuses.items():
        if status != "done":
            yield trial_id, outcome.errors.get(trial_id, status)
