"""Mirrors of the JSONL logs: TensorBoard (and W&B offline) hold the lines the logs hold,
once per step, through a resume; the `log` section is a run option outside the trial id."""

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_configs
import yaml

from mbxfer.benchmarks import cli, loggers, runner, trial_folder
from mbxfer.benchmarks import config as config_lib

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="the TensorBoard reader (pip install 'mbxfer[test]') reads the event files back",
)

# Two phases (the random agent: a trial takes about a second), so tags, steps and a resume
# across the phase boundary are all exercised: lines of both phases sit at step 80.
TWO_PHASES = [
    "train.steps=80",
    "protocol.name=task_transfer",
    "protocol.pretrain_steps=80",
    "protocol.pretrain_task=reach_top_left",
    "train.checkpoint_every=80",  # Phase 1 has none but its end: its lines run past one.
]


def _config(agent="random", *extra):
    return config_lib.build(config_lib.parse_overrides(tiny_configs.overrides(agent, *extra)))


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _board(folder) -> dict:
    """`{tag: [(step, value), ...]}` as TensorBoard's own reader loads the trial's events."""
    reader = event_accumulator.EventAccumulator(
        str(Path(folder) / "tensorboard"),
        size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0},
    )
    reader.Reload()
    return {
        tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]
    }


def _expected(folder, precision=np.float32) -> dict:
    """What the JSONL logs hold, as `{tag: [(total step, value), ...]}` (TensorBoard keeps
    float32 values)."""
    out: dict = {}
    for log in ("metrics", "eval"):
        for line in _lines(Path(folder) / f"{log}.jsonl"):
            step, scalars = loggers.point(log, line)
            for tag, value in scalars.items():
                out.setdefault(tag, []).append((step, float(precision(value))))
    return out


@pytest.mark.slow  # Compiling Dreamer's update takes 20 s or more.
def test_tensorboard_holds_every_metric_and_evaluation_line(tmp_path):
    """A tiny Dreamer trial: each training metric and evaluation summary of the JSONL logs is
    a scalar of the event files, tagged by phase, at the trial's total environment steps."""
    runner.run(_config("dreamer", "train.steps=80"), tmp_path, progress=False)
    board = _board(tmp_path)
    metrics = _lines(tmp_path / "metrics.jsonl")
    loss = [(m["total_env_steps"], float(np.float32(m["train/loss/total"]))) for m in metrics]
    assert board["train/train/loss/total"] == loss and len(loss) == 2
    headline = [e for e in _lines(tmp_path / "eval.jsonl") if e["mode"] == "sampled"]
    assert board["train/eval/sampled/return_mean"] == [
        (e["total_env_steps"], float(np.float32(e["return_mean"]))) for e in headline
    ]
    assert board == _expected(tmp_path)
    assert not any("start_digest" in tag or tag.endswith("/env_steps") for tag in board)


def test_a_resumed_trial_has_one_value_per_step(tmp_path):
    """Stopped in the second phase, past its start and its first log, resumed once with
    TensorBoard off (the same trial) and once with it on: the event files hold the final
    JSONL lines, one value per tag and step, also the resumed phase's jumpstart at step 80."""
    config = _config("random", *TWO_PHASES)
    assert runner.run(config, tmp_path, progress=False, stop_after=120) == {"stopped_at": 120}
    first = _board(tmp_path)
    assert first == _expected(tmp_path)
    assert [step for step, _ in first["finetune/eval/sampled/return_mean"]] == [80, 120]
    # The resume cuts the logs back to the phase boundary (step 80).
    quiet = _config("random", *TWO_PHASES, "log.tensorboard=false")
    assert quiet.trial_id() == config.trial_id()
    assert runner.run(quiet, tmp_path, progress=False, stop_after=120) == {"stopped_at": 120}
    assert _board(tmp_path) == first  # Left as it was.
    runner.run(config, tmp_path, progress=False)
    board = _board(tmp_path)
    assert board == _expected(tmp_path)
    for tag, points in board.items():
        steps = [step for step, _ in points]
        assert steps == sorted(set(steps)), tag
    assert [s for s, _ in board["pretrain/eval_source/greedy/return_mean"]] == [0, 40, 80]
    assert [s for s, _ in board["finetune/eval/sampled/return_mean"]] == [80, 120, 160]
    assert [s for s, _ in board["finetune/env_steps_per_second"]] == [120, 160]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_a_crash_closes_the_writers(tmp_path):
    """A trial that raises still leaves event files with every line logged before it (closing
    the writer flushes them) beside its intact JSONL logs."""

    def crash(total_steps):
        if total_steps >= 120:
            raise RuntimeError("simulated crash")

    config = _config("random", "train.steps=200")
    with pytest.raises(RuntimeError, match="simulated crash"):
        runner.run(config, tmp_path, progress=False, on_step=crash)
    assert [m["total_env_steps"] for m in _lines(tmp_path / "metrics.jsonl")] == [40, 80, 120]
    assert _board(tmp_path) == _expected(tmp_path)


def test_the_log_section_is_not_part_of_the_trial(tmp_path):
    """`log.*` is a run option: it changes neither the trial id nor config.yaml, nor what
    counts as the same trial; `--keys` documents it; bad values are refused."""
    plain = _config()
    loud = _config("random", "log.tensorboard=false", "log.wandb=true", "log.wandb_mode=online")
    assert loud.log.wandb and not loud.log.tensorboard
    assert loud.trial_id() == plain.trial_id() and loud.to_dict() == plain.to_dict()
    assert "log" not in plain.to_dict()
    with_log = {**plain.to_dict(), "log": {"tensorboard": False}}
    assert config_lib.trial_id_of(with_log) == plain.trial_id()
    assert config_lib.build(with_log).log.tensorboard is False
    trial_folder.TrialFolder.open(tmp_path, plain)
    trial_folder.TrialFolder.open(tmp_path, loud)  # The same trial: no error.
    assert "log" not in yaml.safe_load((tmp_path / "config.yaml").read_text())
    keys = config_lib.describe(plain)
    assert any(line.startswith("log.tensorboard (bool, default True): Write") for line in keys)
    assert any(
        line.startswith("log.wandb_mode (str, one of offline, online, default 'offline'):")
        for line in keys
    )
    with pytest.raises(config_lib.ConfigError, match=r"log.wandb_mode='cloud' must be one of"):
        _config("random", "log.wandb_mode=cloud")


def test_tensorboard_off_writes_no_event_files(tmp_path):
    runner.run(
        _config("random", "train.steps=40", "log.tensorboard=false"), tmp_path, progress=False
    )
    assert (tmp_path / "done.json").exists() and not (tmp_path / "tensorboard").exists()


def test_the_video_is_an_animated_image_summary(tmp_path):
    import imageio.v2 as imageio

    frames = [np.full((12, 20, 3), 40 * i, np.uint8) for i in range(4)]
    gif = tmp_path / "video.gif"
    imageio.mimsave(gif, frames, duration=0.2, loop=0)
    with loggers.Mirrors(tmp_path, [loggers.TensorBoard(tmp_path / "tensorboard")]) as mirrors:
        mirrors.video("finetune", 160, gif)
    reader = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    reader.Reload()
    (image,) = reader.Images("finetune/video/open_loop")
    assert image.step == 160 and (image.width, image.height) == (20, 12)
    assert image.encoded_image_string == gif.read_bytes()


def test_a_missing_wandb_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # As if not installed.
    config = _config("random", "train.steps=40", "log.wandb=true")
    with pytest.raises(loggers.MissingLoggerError, match=r"pip install 'mbxfer\[wandb\]'"):
        runner.run(config, tmp_path / "a", progress=False)
    overrides = tiny_configs.overrides("random", "train.steps=40", "log.wandb=true")
    argv = ["run", "--out", str(tmp_path / "b"), "--no-progress"]
    code = cli.main(argv + [a for item in overrides for a in ("--set", item)])
    err = capsys.readouterr().err
    assert code == 2 and "log.wandb=true needs the package 'wandb'" in err
    assert "or set log.wandb=false" in err and "Traceback" not in err


def _wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run file (LevelDB-style log records of protobufs)."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending, rows = run_file.read_bytes(), 32768, 7, b"", []
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # A block's tail too short for a record header is padding.
            position += room
            continue
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record.
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
    return rows


def test_wandb_offline_run_holds_the_jsonl_values(tmp_path):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    config = _config("random", "train.steps=80", "log.wandb=true", "log.tensorboard=false")
    runner.run(config, tmp_path, progress=False)
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_file.name == f"run-{config.trial_id()}-{run_file.name.split('-')[-1]}"
    logged: dict = {}
    for row in _wandb_history(run_file):
        for tag, value in row.items():
            if not tag.startswith("_"):
                logged.setdefault(tag, []).append((row["_step"], value))
    assert logged == _expected(tmp_path, precision=float)
    assert not (tmp_path / "tensorboard").exists()
