"""A trial's folder: everything one trial writes, and where it resumes from.

    config.yaml       the resolved TrialConfig (a resume with a different config is refused)
    metrics.jsonl     training metrics every `train.log_every` environment steps
    eval.jsonl        one line per evaluation set and mode
    episodes.jsonl    one line per finished training episode (return, length, log_* data)
    checkpoints/      atomic checkpoints (benchmarks/checkpoint.py), each with `runner.json`:
                      the `RunnerState` and the byte offsets the logs had then
    checkpointed.json written with the first checkpoint: from then on the trial resumes
                      from a checkpoint or not at all
    phaseN.ckpt       the checkpoint at the end of phase N (what `--from` starts after)
    video.gif         open-loop world-model rollout (model-based agents on images)
    done.json         written last: the final summary
    .lock             held (flock) by the process running the trial
    progress.json     environment steps so far, for `mbxfer sweep`'s progress line
    failed.json       the last failure's one-line error (error.txt: every traceback)

A resumed trial cuts its logs back to the checkpoint's offsets, so it writes the same lines
as an uninterrupted run. `--from <trial>/phaseN.ckpt` starts a trial after phase N of another
trial whose earlier phases are this one's, copying those phases' log lines.

A folder is never misread: opening it removes what killed writes left (`.*.tmp`), and a
resume refuses, in one to three lines naming the file and the fix (exit code 2 of `mbxfer
run`), a damaged checkpoint (`checkpoint.CorruptCheckpointError`, which names the intact
checkpoint before it: write that name into `checkpoints/latest` to resume from there), a
`latest` that names anything but a folder beside it, logs shorter than the checkpoint's
offsets or with lines that are not JSON records, `checkpoints/` or `latest` deleted from a
trial that had checkpoints, an unreadable `config.yaml`, and a `done.json` that is not a
summary (`IncompatibleTrialError`). The only way to start such a trial over is to delete it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import socket
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional, TextIO

import dm_env
import numpy as np
import yaml

from mbxfer.benchmarks import checkpoint, protocols
from mbxfer.benchmarks import config as config_lib

LOGS = ("metrics", "eval", "episodes")
MARKER = "checkpointed.json"
RUNNING = "running.pkl"
"""Written with a trial's first checkpoint: without `checkpoints/`, such a trial is refused."""
SUMMARY_KEYS = {"env_steps": int, "updates": int, "episodes": int, "trial_id": str}
"""What every `done.json` the runner ever wrote holds (with these types)."""
PROGRESS_INTERVAL = 0.5  # seconds between progress.json writes of one trial


class IncompatibleTrialError(config_lib.ConfigError):
    pass


@dataclasses.dataclass
class RunnerState:
    """What a checkpoint records besides the agent's state and the replay (`runner.json`)."""

    phase: str
    phase_index: int
    phase_done: bool
    """True at a phase's end: the next phase starts from this checkpoint."""
    env_steps: int
    updates: int
    episodes: int
    rng: list
    """The loop's key (`LoopState.rng`)."""
    offsets: dict
    """Byte offsets of each log (`LOGS`) when the checkpoint was taken."""
    coverage: dict
    history: dict
    """`phases`: the summaries of the phases finished so far; `from`: the `--from` folder."""

    @classmethod
    def read(cls, folder: Path) -> "RunnerState":
        """The state in checkpoint `folder`; `CorruptCheckpointError` if runner.json lacks it."""
        raw = checkpoint.read_runner_json(folder)
        names = [field.name for field in dataclasses.fields(cls)]
        missing = [name for name in names if name not in raw]
        if missing:
            raise checkpoint.corrupt(folder, f"runner.json lacks {', '.join(missing)}")
        if not all(isinstance(raw[key], dict) for key in ("offsets", "coverage", "history")):
            raise checkpoint.corrupt(folder, "runner.json: offsets, coverage or history garbled")
        return cls(**{name: raw[name] for name in names})

    @property
    def next_phase(self) -> int:
        """The phase a run resumed from here continues (or starts)."""
        return self.phase_index + bool(self.phase_done)


class Resume(NamedTuple):
    """Where a run starts: a checkpoint `folder`, its `state`, and whether the folder is
    another trial's (`--from`)."""

    folder: Path
    state: RunnerState
    other_trial: bool


class JsonlLog:
    """An append-only JSON-lines file that can be cut back to a checkpoint's offset."""

    def __init__(self, path: Path, offset: Optional[int]):
        self.path = path
        if offset is not None and path.exists():
            with open(path, "r+b") as file:
                file.truncate(offset)
        elif offset is None and path.exists():
            path.unlink()
        self._file = open(path, "ab")

    def write(self, record: dict) -> None:
        self._file.write((json.dumps(record) + "\n").encode())
        self._file.flush()

    def offset(self) -> int:
        self._file.flush()
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


class TrialFolder:
    """One trial's folder (see the module docstring); `open` checks its config first."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.logs: dict[str, JsonlLog] = {}

    @classmethod
    def open(cls, out: Path, config: config_lib.TrialConfig) -> "TrialFolder":
        """The folder of `config`'s trial, made if new; refused if it holds another config."""
        folder = cls(out)
        folder.out.mkdir(parents=True, exist_ok=True)
        for directory in (folder.out, folder.out / "checkpoints"):
            if directory.is_dir():
                checkpoint.clean_staging(directory)
        config_path = folder.out / "config.yaml"
        if config_path.exists():
            changed = _config_differences(config_path, config)
            if changed:
                raise IncompatibleTrialError(
                    f"{folder.out} holds a trial with a different configuration:\n  "
                    + "\n  ".join(changed)
                    + "\nUse another --out folder, or delete this one to start over."
                )
        else:
            checkpoint.write_atomic(config_path, config_lib.to_yaml(config).encode())
        return folder

    def done(self) -> Optional[dict]:
        """The final summary if the trial has finished; `IncompatibleTrialError` when
        done.json is not one."""
        return read_done(self.out)

    def write_done(self, summary: dict) -> None:
        text = json.dumps(summary, indent=2) + "\n"
        checkpoint.write_atomic(self.out / "done.json", text.encode())

    # -- resume -----------------------------------------------------------------------------
    def resume_point(self, start_from: Optional[Path], config, phases) -> Optional[Resume]:
        """The latest checkpoint of this trial, else the `start_from` phase checkpoint of
        another trial (checked to share this trial's earlier phases), else None.

        The checkpoint is verified (`checkpoint.verify`) before anything is read from it."""
        directory = self.out / "checkpoints"
        found = checkpoint.latest(directory)
        if found is None:
            found = self._without_pointer(directory)
        if found is not None:
            checkpoint.verify(found)
            return Resume(found, RunnerState.read(found), False)
        if start_from is None:
            return None
        start_from = Path(start_from)
        if not (start_from / "runner.json").exists():
            raise IncompatibleTrialError(
                f"--from {start_from}: not a checkpoint folder (expected <trial>/phaseN.ckpt)"
            )
        checkpoint.verify(start_from)
        state = RunnerState.read(start_from)
        if not state.phase_done or state.next_phase >= len(phases):
            raise IncompatibleTrialError(
                f"--from {start_from}: it ends phase {state.phase_index}, so this trial would "
                f"start at phase {state.phase_index + 1}, but its protocol has {len(phases)} "
                "phases"
            )
        source_config = start_from.parent / "config.yaml"
        if source_config.exists():
            source = config_lib.build(yaml.safe_load(source_config.read_text()))
            count = state.next_phase
            if protocols.prefix_key(source, count) != protocols.prefix_key(config, count):
                raise IncompatibleTrialError(
                    f"--from {start_from}: that trial's phases 0..{state.phase_index}, agent, "
                    "agent config, seed, environment or training settings differ from this "
                    f"trial's (compare {source_config} with this trial's config.yaml)"
                )
        return Resume(start_from, state, True)

    def _without_pointer(self, directory: Path) -> Optional[Path]:
        """Where to resume when `checkpoints/latest` is missing: nowhere if the trial never
        wrote a checkpoint (a fresh start); its only checkpoint if it was killed between
        writing that one and `latest`; else `IncompatibleTrialError` (deleted by hand)."""
        existing = checkpoint.names(directory)
        had_checkpoints = (self.out / MARKER).exists()
        phase_checkpoints = sorted(p.name for p in self.out.glob("phase*.ckpt"))
        if not existing and not (had_checkpoints or phase_checkpoints):
            return None
        if not existing:
            evidence = ", ".join([MARKER] * had_checkpoints + phase_checkpoints)
            raise IncompatibleTrialError(
                f"{self.out} had checkpoints ({evidence} say so), but {directory} holds none "
                f"(deleted?), so the trial cannot resume; delete {self.out} to start it over"
            )
        if len(existing) == 1 and not had_checkpoints:
            return directory / existing[0]
        newest = checkpoint.newest_intact(directory)
        pick = f" (the newest intact: {newest})" if newest else ""
        raise IncompatibleTrialError(
            f"{directory / checkpoint.POINTER} is missing (deleted?), but the trial has "
            f"checkpoints {', '.join(existing)}; write the name of the one to resume from "
            f"into it{pick}, or delete {self.out} to start the trial over"
        )

    # -- logs -------------------------------------------------------------------------------
    def open_logs(self, resume: Optional[Resume]) -> None:
        """Open the logs, cut back to `resume`'s offsets (copied from the other trial's logs
        for `--from`, so this folder tells the whole story); fresh logs without `resume`."""
        offsets = {name: None for name in LOGS}
        if resume is not None and resume.other_trial:
            offsets = self._copy_logs(resume.folder, resume.state.offsets)
        elif resume is not None:
            offsets = {name: resume.state.offsets.get(name) for name in LOGS}
            for name in LOGS:  # All checked before any is cut.
                check_log(self.out / f"{name}.jsonl", offsets[name], resume.folder)
        self.logs = {name: JsonlLog(self.out / f"{name}.jsonl", offsets[name]) for name in LOGS}

    def _copy_logs(self, source: Path, offsets: dict) -> dict:
        """Copy the first `offsets[name]` bytes of each log of the trial of checkpoint
        `source` into this folder; the offsets to continue from."""
        copied = {}
        for name in LOGS:
            path, offset = source.parent / f"{name}.jsonl", offsets.get(name)
            check_log(path, offset, source)
            if offset is None or not path.exists():
                copied[name] = None
                continue
            with open(path, "rb") as file:
                data = file.read(offset)
            (self.out / f"{name}.jsonl").write_bytes(data)
            copied[name] = len(data)
        return copied

    def write(self, log: str, record: dict) -> None:
        self.logs[log].write(record)

    def offsets(self) -> dict:
        return {name: log.offset() for name, log in self.logs.items()}

    def read(self, log: str) -> list[dict]:
        """Every line of `log` so far."""
        if log in self.logs:
            self.logs[log].offset()  # flush
        path = self.out / f"{log}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def close(self) -> None:
        for log in self.logs.values():
            log.close()

    # -- checkpoints ------------------------------------------------------------------------
    def save(
        self, state: RunnerState, total_steps: int, agent_state: Any, replay, files=None
    ) -> Path:
        """An atomic checkpoint of the agent, the replay and `state` at `total_steps`, with
        `files` (name -> bytes) beside them."""
        saved = checkpoint.save(
            self.out / "checkpoints",
            total_steps,
            agent_state,
            dataclasses.asdict(state),
            replay.save,
            name=f"step-{total_steps:012d}-phase{state.phase_index}",
            files=files,
        )
        if not (self.out / MARKER).exists():
            record = {"first": saved.name, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
            checkpoint.write_atomic(self.out / MARKER, json.dumps(record).encode())
        return saved

    def mark_phase(self, folder: Path, index: int) -> None:
        """Keep the checkpoint `folder` that ends phase `index` as `phase<index>.ckpt`."""
        checkpoint.link_copy(folder, self.out / f"phase{index}.ckpt")


class PhaseLog:
    """What one phase writes into its trial's folder: log lines tagged with the phase and
    both step counts (the phase's and the trial's), and checkpoints of the loop's state."""

    def __init__(self, folder: TrialFolder, phase: str, index: int, steps_before: int):
        self.folder, self.index, self.steps_before = folder, index, steps_before
        self.tag = {"phase": phase, "phase_index": index}

    def episode(self, env_steps: int, record: dict) -> None:
        total = self.steps_before + env_steps
        self.folder.write("episodes", {**self.tag, "total_env_steps": total, **record})

    def metrics(self, env_steps: int, metrics: dict) -> None:
        total = self.steps_before + env_steps
        record = {**self.tag, "env_steps": env_steps, "total_env_steps": total, **metrics}
        self.folder.write("metrics", record)

    def evaluation(self, env_steps: int, eval_set: str, mode: str, summary: dict) -> None:
        total = self.steps_before + env_steps
        self.folder.write("eval", {**self.tag, "eval_set": eval_set, "mode": mode,
                                   "env_steps": env_steps, "total_env_steps": total,
                                   **summary})  # fmt: skip

    def episodes(self) -> list[dict]:
        """This phase's training episodes so far (a resumed phase's include those before)."""
        return [r for r in self.folder.read("episodes") if r["phase_index"] == self.index]

    def save(self, state, replay, history: dict, phase_done: bool, running=None) -> Path:
        """Checkpoint the loop's `state` (a `benchmarks.loop.LoopState`) and `replay`, and
        the episodes `running` at a checkpoint inside the phase (a `benchmarks.loop.Running`),
        when the environments could save them."""
        runner_state = RunnerState(
            **self.tag,
            phase_done=phase_done,
            env_steps=state.env_steps,
            updates=state.updates,
            episodes=state.episodes,
            rng=np.asarray(state.rng).tolist(),
            offsets=self.folder.offsets(),
            coverage=state.coverage.state(),
            history=history,
        )
        files = None if running is None else {RUNNING: dump_running(running)}
        return self.folder.save(
            runner_state, self.steps_before + state.env_steps, state.agent, replay, files
        )


def dump_running(running) -> bytes:
    """`running.pkl`'s contents: the fields of a `loop.Running` as plain values (no class of
    ours is pickled, so renaming one never makes a checkpoint unreadable)."""
    fields = running._asdict()
    fields["timestep"] = fields["timestep"]._asdict()
    return pickle.dumps(fields, pickle.HIGHEST_PROTOCOL)


def load_running(folder: Path) -> Optional[dict]:
    """The fields `dump_running` saved in checkpoint `folder` (`timestep` a
    `dm_env.TimeStep`), or None when it has none (environments without state, a checkpoint
    at a phase's end, or one written before mbxfer saved running episodes)."""
    path = Path(folder) / RUNNING
    if not path.exists():
        return None
    try:
        fields = pickle.loads(path.read_bytes())
        fields["timestep"] = dm_env.TimeStep(**fields["timestep"])
    except (OSError, pickle.UnpicklingError, EOFError, TypeError, KeyError, ValueError) as error:
        raise checkpoint.corrupt(Path(folder), f"{RUNNING} is unreadable: {error}") from None
    return fields


def load_agent_state(resume: Resume, fresh: Any) -> Any:
    """The agent state saved at `resume`, shaped like `fresh`."""
    try:
        state, _ = checkpoint.load(resume.folder, fresh)
    except checkpoint.CorruptCheckpointError:
        raise
    except checkpoint.IncompatibleCheckpointError as error:
        raise IncompatibleTrialError(str(error)) from None
    return state


def _config_differences(path: Path, config: config_lib.TrialConfig) -> list[str]:
    """The keys where the trial config saved at `path` differs from `config`; an
    `IncompatibleTrialError` naming the file when it holds no readable trial config."""
    fix = f"restore it, or delete {path.parent} to start the trial over"
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise IncompatibleTrialError(f"{path} is unreadable ({first}); {fix}") from None
    if not isinstance(saved, dict):
        kind = type(saved).__name__
        raise IncompatibleTrialError(f"{path} holds a {kind}, not a trial config; {fix}")
    try:
        return config_lib.differences(config_lib.with_agent_mapping(saved), config.to_dict())
    except (config_lib.ConfigError, TypeError) as error:
        raise IncompatibleTrialError(f"{path} is not a trial config ({error}); {fix}") from None


def check_log(path: Path, offset: Optional[int], source: Path) -> None:
    """Refuse (`IncompatibleTrialError`) a log that checkpoint `source` cannot continue: one
    shorter than the `offset` bytes it recorded (deleted, cut, replaced), or whose lines up
    to there are not all JSON records. `offset` None: the checkpoint predates the log."""
    if offset is None:
        return
    if not isinstance(offset, int) or offset < 0:
        raise checkpoint.corrupt(source, f"runner.json: offset {offset!r} of {path.name}")
    trial = source.parent.parent if source.parent.name == "checkpoints" else source.parent
    fix = f"restore it, or delete {trial} to start the trial over"
    size = path.stat().st_size if path.exists() else None
    if size is None and offset:
        raise IncompatibleTrialError(
            f"{path} is missing, but checkpoint {source.name} recorded {offset} bytes of it; {fix}"
        )
    if size is not None and size < offset:
        raise IncompatibleTrialError(
            f"{path} has {size} bytes, but checkpoint {source.name} recorded {offset} "
            f"(cut or replaced?); {fix}"
        )
    if not offset:
        return
    with open(path, "rb") as file:
        data = file.read(offset)
    *lines, rest = data.split(b"\n")
    if rest:
        raise IncompatibleTrialError(
            f"{path}: checkpoint {source.name} recorded {offset} bytes, which end inside line "
            f"{len(lines) + 1} (changed since?); {fix}"
        )
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            text = line[:60].decode("utf-8", "replace")
            raise IncompatibleTrialError(
                f"{path}, line {number}, is not a JSON record ({text!r}); {fix}"
            )


def load_done(folder: Path) -> tuple[Optional[dict], Optional[str]]:
    """(the summary in `folder/done.json`, None), (None, None) when there is no done.json,
    or (None, what is wrong with it): not a JSON mapping with `SUMMARY_KEYS` of their types
    and, when present, `phases` as a list of mappings."""
    path = Path(folder) / "done.json"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as error:
        return None, f"unreadable: {str(error).splitlines()[0]}"
    if not isinstance(summary, dict):
        return None, f"a {type(summary).__name__}, not a mapping"
    missing = [key for key in SUMMARY_KEYS if key not in summary]
    if missing:
        return None, f"no {', '.join(missing)}"
    wrong = [
        key
        for key, kind in SUMMARY_KEYS.items()
        if not isinstance(summary[key], kind) or isinstance(summary[key], bool)
    ]
    if wrong:
        return None, f"{', '.join(wrong)} of the wrong type"
    phases = summary.get("phases", [])
    if not isinstance(phases, list) or not all(isinstance(p, dict) for p in phases):
        return None, "phases is not a list of mappings"
    return summary, None


def read_done(folder: Path) -> Optional[dict]:
    """The summary of a finished trial, None for an unfinished one; `IncompatibleTrialError`
    naming the file and the fix when done.json is not a summary (`load_done`)."""
    summary, found = load_done(folder)
    if found is not None:
        raise IncompatibleTrialError(
            f"{Path(folder) / 'done.json'} is not a finished trial's summary ({found}); "
            "delete it to finish the trial again from its last checkpoint, or delete "
            f"{folder} to start the trial over"
        )
    return summary


def finished(folder: Path) -> bool:
    """Whether the trial in `folder` has a valid done.json."""
    return load_done(folder)[0] is not None


# -- a trial's state as a sweep sees it -------------------------------------------------------
def status(folder: Path) -> str:
    """done / running (locked by a live process) / failed / partial (started) / new."""
    folder = Path(folder)
    if (folder / "done.json").exists():
        return "done" if finished(folder) else "failed"  # A garbled one: resuming says why.
    if folder.exists() and locked_elsewhere(folder):
        return "running"
    if (folder / "failed.json").exists():
        return "failed"
    if (folder / "config.yaml").exists():
        return "partial"
    return "new"


def steps_done(folder: Path) -> int:
    """Environment steps a trial has safely behind it (its latest checkpoint; 0 when that is
    unknown: resuming says why)."""
    try:
        found = checkpoint.latest(Path(folder) / "checkpoints")
    except checkpoint.CorruptCheckpointError:
        return 0
    # Named `step-<total steps>` (with `-phase<i>` after it when the trial has phases).
    return checkpoint.order(found.name)[0] if found is not None else 0


class TrialLock:
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


def locked_elsewhere(folder: Path) -> bool:
    if not (Path(folder) / ".lock").exists():
        return False
    lock = TrialLock(folder)
    free = lock.acquire()
    lock.release()
    return not free


class ProgressWriter:
    """The runner's `on_step`: writes `<trial>/progress.json` at most every half second."""

    def __init__(self, folder: Path, total: int):
        self.path = Path(folder) / "progress.json"
        self.total = total
        self.last = 0.0

    def __call__(self, env_steps: int, force: bool = False) -> None:
        now = time.time()
        if force or now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            record = {"env_steps": int(env_steps), "total": self.total, "time": now}
            checkpoint.write_atomic(self.path, json.dumps(record).encode())


def record_failure(folder: Path, text: str) -> str:
    """Append a traceback to `error.txt` and mark the trial failed; returns its last line."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    header = f"=== attempt failed at {stamp} on {socket.gethostname()} (pid {os.getpid()}) ===\n"
    with open(folder / "error.txt", "a") as file:
        file.write(header + text.rstrip() + "\n\n")
    summary = text.strip().splitlines()[-1] if text.strip() else "failed"
    checkpoint.write_atomic(
        folder / "failed.json", json.dumps({"error": summary, "time": stamp}).encode()
    )
    return summary
