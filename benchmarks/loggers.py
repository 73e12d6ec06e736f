"""Mirrors of a trial's JSONL logs: TensorBoard event files (default) and W&B (optional).

    with loggers.open_mirrors(config, folder) as mirrors:   # as `config.log` says
        mirrors.sync()                      # after lines were appended to the logs
        mirrors.video(phase, step, path)    # the world-model GIF

The JSONL logs stay the record. A mirror shows exactly their lines: it reads what
`metrics.jsonl` and `eval.jsonl` hold (`LogTail`), turns each line into scalars (`point`) and
hands them to its sinks. Tags name the phase: `finetune/train/loss/total` for a training metric,
`finetune/eval/sampled/return_mean` for an evaluation (`eval_<set>` for the named sets `source`,
`train`, `test`). The step is the trial's total environment steps (`total_env_steps`), one
increasing clock across phases, as W&B requires; a phase's own count is that minus its start.

Resume: a resumed trial cuts its logs back to the checkpoint, then writes the same lines again.
A mirror starts from the first line of the logs as cut, so the TensorBoard event files are
written anew (the old ones removed; the wall times of earlier lines become the resume's) and
hold one value per step; a resumed W&B run skips the steps it already holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

from mbxfer.benchmarks import config as config_lib

MIRRORED_LOGS = ("metrics", "eval")
"""The logs mirrored; `episodes.jsonl` is summarized in the metrics lines (`episode/...`)."""
BOOKKEEPING = frozenset(
    {"phase", "phase_index", "env_steps", "total_env_steps", "eval_set", "mode", "start_digest"}
)
"""Keys of a log line that place it rather than measure something (`start_digest` is the
fingerprint of the evaluation episodes' start states)."""
TENSORBOARD_FOLDER = "tensorboard"


class MissingLoggerError(config_lib.ConfigError):
    """A mirror is switched on but its package is missing; names the extra and the switch."""


class Point(NamedTuple):
    """One log line as scalars at one step."""

    step: int
    """The trial's total environment steps at the line."""
    scalars: dict[str, float]
    """Tag -> value."""


def point(log: str, record: dict) -> Point:
    """The scalars of one line of `log` (`metrics` or `eval`): its numbers (nested mappings
    flattened with `/`) tagged `<phase>/<key>` for metrics and `<phase>/<eval set>/<mode>/<key>`
    for evaluations, where the set is `eval` for the default set, `eval_<name>` otherwise."""
    prefix = record["phase"]
    if log == "eval":
        name = record["eval_set"]
        eval_set = "eval" if name == "eval" else f"eval_{name}"
        prefix = f"{prefix}/{eval_set}/{record['mode']}"
    measured = {k: v for k, v in record.items() if k not in BOOKKEEPING}
    return Point(int(record["total_env_steps"]), _numbers(measured, f"{prefix}/"))


def _numbers(values: dict, prefix: str) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class LogTail:
    """The complete lines appended to a JSONL file since the last `read` (all of it at first);
    a line still being written is left for the next read."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            data = file.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines()]


def require(module: str, switch: str, install: str) -> ModuleType:
    """Import `module` for the mirror that `switch` turns on, or raise `MissingLoggerError`
    naming `pip install <install>` and how to switch the mirror off."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        missing = (error.name or module).split(".")[0]
        raise MissingLoggerError(
            f"{switch}=true needs the package {missing!r}, which is not installed. "
            f"Install it with: pip install {install} (or set {switch}=false)"
        ) from error


class TensorBoard:
    """Event files in `directory`, written anew (see the module docstring)."""

    def __init__(self, directory: Path):
        tensorboardx = require("tensorboardX", "log.tensorboard", "tensorboardX")
        self.Summary = tensorboardx.summary.Summary
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("events.out.tfevents.*"):
            old.unlink()
        self.writer = tensorboardx.FileWriter(str(directory), flush_secs=10)

    def write(self, point: Point) -> None:
        Value = self.Summary.Value
        values = [Value(tag=tag, simple_value=value) for tag, value in point.scalars.items()]
        self.writer.add_summary(self.Summary(value=values), point.step)

    def video(self, tag: str, step: int, gif: Path) -> None:
        """The GIF as an image summary (TensorBoard's image dashboard plays it)."""
        from PIL import Image

        data = Path(gif).read_bytes()
        with Image.open(gif) as image:
            width, height = image.size
        picture = self.Summary.Image(
            height=height, width=width, colorspace=3, encoded_image_string=data
        )
        self.writer.add_summary(
            self.Summary(value=[self.Summary.Value(tag=tag, image=picture)]), step
        )

    def close(self, failed: bool) -> None:
        self.writer.close()  # Flushes what is queued.


class WandB:
    """A W&B run per trial folder, resumed when the trial resumes (same run id)."""

    def __init__(self, config: config_lib.TrialConfig, out: Path):
        self.wandb = require("wandb", "log.wandb", "'mbxfer[wandb]'")
        log, out = config.log, Path(out).resolve()
        folder_key = hashlib.sha256(str(out).encode()).hexdigest()[:8]
        self.run = self.wandb.init(
            project=log.wandb_project,
            entity=log.wandb_entity,
            mode=log.wandb_mode,
            dir=str(out),
            id=f"{config.trial_id()}-{folder_key}",
            name=out.name,
            resume="allow",
            config={"trial_id": config.trial_id(), **config.to_dict()},
            settings=self.wandb.Settings(console="off"),
        )
        self.first_step = self.run.step  # A resumed run holds the steps before this.

    def write(self, point: Point) -> None:
        if point.step >= self.first_step:
            self.run.log(point.scalars, step=point.step)

    def video(self, tag: str, step: int, gif: Path) -> None:
        if step >= self.first_step:
            self.run.log({tag: self.wandb.Video(str(gif), format="gif")}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
        # `finish` leaves the run's file to W&B's service process; `teardown` waits for it to
        # be written, which an exit hook does not reliably do in sweep worker processes.
        self.wandb.teardown()


class Mirrors:
    """The trial's mirrors: the sinks fed with the log lines of `folder` (`out`); a context
    manager that closes every sink however the trial ends (a W&B run is marked failed when
    the trial raised)."""

    def __init__(self, out: Path, sinks: list):
        self.sinks = sinks
        self.tails = {log: LogTail(Path(out) / f"{log}.jsonl") for log in MIRRORED_LOGS}

    def sync(self) -> None:
        """Hand the lines appended since the last sync to every sink, in step order."""
        if not self.sinks:
            return
        points = [point(log, line) for log, tail in self.tails.items() for line in tail.read()]
        for each in sorted(points, key=lambda p: p.step):  # Stable: metrics before eval.
            for sink in self.sinks:
                sink.write(each)

    def video(self, phase: str, step: int, gif: Path) -> None:
        """The world-model video `gif`, tagged `<phase>/video/open_loop`, at `step`."""
        for sink in self.sinks:
            sink.video(f"{phase}/video/open_loop", step, gif)

    def close(self, failed: bool = False) -> None:
        """Sync the last lines, then close every sink (all of them, even if one fails)."""
        try:
            if not failed:
                self.sync()
        finally:
            _close_all(self.sinks, failed)
            self.sinks = []

    def __enter__(self) -> "Mirrors":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=kind is not None)


def _close_all(sinks: list, failed: bool) -> None:
    """Close every sink; one that raises does not keep the others open."""
    with contextlib.ExitStack() as stack:
        for sink in sinks:
            stack.callback(sink.close, failed)


def open_mirrors(config: config_lib.TrialConfig, out: Path) -> Mirrors:
    """The mirrors `config.log` switches on for the trial folder `out` (none: a no-op)."""
    log, out = config.log, Path(out)
    sinks: list = []
    try:
        if log.tensorboard:
            sinks.append(TensorBoard(out / TENSORBOARD_FOLDER))
        if log.wandb:
            sinks.append(WandB(config, out))
    except BaseException:
        _close_all(sinks, failed=True)
        raise
    mirrors = Mirrors(out, sinks)
    mirrors.sync()  # The lines the logs already hold (a resumed trial's).
    return mirrors


__all__ = ["MissingLoggerError", "Mirrors", "Point", "open_mirrors", "point"]
