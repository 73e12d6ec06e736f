"""Trial folders that refuse to be misread: damaged checkpoints, pointers, logs, configs and
summaries give one clear error (exit code 2), never a traceback or a silent restart; the
checkpoint before a damaged one resumes; one trial gives the same bits on any worker count."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_configs
import yaml

from mbxfer.benchmarks import (
    checkpoint,
    cli,
    executors,
    provenance,
    results,
    runner,
    sweep,
    trial_folder,
)
from mbxfer.benchmarks import config as config_lib

ROOT = Path(__file__).resolve().parent.parent
# The tiny random-agent trial: checkpoints every 40 steps, the last two kept.
TINY = tiny_configs.overrides("random", "train.steps=160")
LATEST = "step-000000000160-phase0"  # The end of the phase.
PREVIOUS = "step-000000000120-phase0"


def _config():
    return config_lib.build(config_lib.parse_overrides(TINY))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny trial; tests change copies of it."""
    folder = tmp_path_factory.mktemp("finished") / "trial"
    runner.run(_config(), folder, progress=False)
    assert checkpoint.names(folder / "checkpoints") == [PREVIOUS, LATEST]
    return folder


@pytest.fixture
def trial(finished, tmp_path):
    folder = tmp_path / "trial"
    shutil.copytree(finished, folder)
    return folder


def _cli_run(folder, capsys):
    """`mbxfer run` on the tiny trial in `folder`: (exit code, stderr)."""
    argv = ["run", "--out", str(folder), "--no-progress"]
    code = cli.main(argv + [a for item in TINY for a in ("--set", item)])
    return code, capsys.readouterr().err


def _ckpt(folder, name=LATEST):
    return folder / "checkpoints" / name


def _cut(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _garble_first_line(path):
    """The first line replaced by as many bytes of garbage: the size is unchanged."""
    lines = path.read_bytes().split(b"\n")
    lines[0] = b"x" * len(lines[0])
    path.write_bytes(b"\n".join(lines))


# What each damage does to the folder, and what the error must say ({trial}: its path).
DAMAGED_CHECKPOINT = {
    "truncated state": (
        lambda t: _cut(_ckpt(t) / "state.npz", 100),
        f"checkpoint {LATEST} is corrupt (state.npz: size 100 != ",
    ),
    "empty state": (lambda t: _cut(_ckpt(t) / "state.npz", 0), "(state.npz: size 0 != "),
    "garbage replay": (lambda t: _flip_a_byte(_ckpt(t) / "replay.npz"), "(replay.npz: CRC-32 "),
    "empty replay": (lambda t: _cut(_ckpt(t) / "replay.npz", 0), "(replay.npz: size 0 != "),
    "deleted replay": (lambda t: (_ckpt(t) / "replay.npz").unlink(), "(replay.npz is missing)"),
    "garbage runner.json": (
        lambda t: (_ckpt(t) / "runner.json").write_text("{garbage"),
        "(runner.json: size 8 != ",
    ),
    "deleted manifest": (
        lambda t: (_ckpt(t) / "manifest.json").unlink(),
        "(manifest.json is missing)",
    ),
    "garbage manifest": (
        lambda t: (_ckpt(t) / "manifest.json").write_text("[1]"),
        "(manifest.json is unreadable)",
    ),
}
FIX = f"to resume from {PREVIOUS}, the checkpoint before it, write that name into "


@pytest.mark.parametrize("damage", DAMAGED_CHECKPOINT)
def test_a_damaged_latest_checkpoint_is_refused_naming_the_previous_one(trial, capsys, damage):
    change, expected = DAMAGED_CHECKPOINT[damage]
    (trial / "done.json").unlink()
    change(trial)
    logs = {log: (trial / f"{log}.jsonl").read_bytes() for log in trial_folder.LOGS}
    code, err = _cli_run(trial, capsys)
    assert code == 2 and "Traceback" not in err
    assert expected in err
    assert FIX + str(trial / "checkpoints" / "latest") in err
    # Nothing was changed: the logs are not cut, no done.json appears.
    assert {log: (trial / f"{log}.jsonl").read_bytes() for log in logs} == logs
    assert not (trial / "done.json").exists()


def test_the_previous_checkpoint_resumes_and_finishes_as_if_nothing_happened(
    finished, trial, capsys
):
    (trial / "done.json").unlink()
    _flip_a_byte(_ckpt(trial) / "replay.npz")
    with pytest.raises(checkpoint.CorruptCheckpointError, match="replay.npz: CRC-32"):
        runner.run(_config(), trial, progress=False)
    # The documented way back: name the previous checkpoint in `latest`, run again.
    (trial / "checkpoints" / "latest").write_text(PREVIOUS + "\n")
    code, err = _cli_run(trial, capsys)
    assert code == 0, err
    assert json.loads((trial / "done.json").read_text()) == json.loads(
        (finished / "done.json").read_text()
    )
    for log in trial_folder.LOGS:
        assert _lines(trial, log) == _lines(finished, log)
    assert checkpoint.names(trial / "checkpoints") == [PREVIOUS, LATEST]
    assert checkpoint.problem(_ckpt(trial)) is None  # The damaged one was written again.


def test_old_checkpoints_without_a_manifest_still_resume(finished, trial):
    """Format 1 (before manifests): read with the checks of that time."""
    (trial / "done.json").unlink()
    for folder in (_ckpt(trial), _ckpt(trial, PREVIOUS)):
        (folder / "manifest.json").unlink()
        state = json.loads((folder / "runner.json").read_text())
        (folder / "runner.json").write_text(json.dumps({**state, "format": 1}))
        assert checkpoint.problem(folder) is None
    assert runner.run(_config(), trial, progress=False) == json.loads(
        (finished / "done.json").read_text()
    )


@pytest.mark.parametrize("damaged", ["state.npz", "replay.npz"])
def test_an_unreadable_file_of_an_old_checkpoint_is_named(trial, damaged):
    (trial / "done.json").unlink()
    folder = _ckpt(trial)
    (folder / "manifest.json").unlink()
    state = json.loads((folder / "runner.json").read_text())
    (folder / "runner.json").write_text(json.dumps({**state, "format": 1}))
    (folder / damaged).write_bytes(b"not a zip file")
    with pytest.raises(checkpoint.CorruptCheckpointError) as raised:
        runner.run(_config(), trial, progress=False)
    assert f"({damaged} is unreadable: " in str(raised.value)
    assert FIX in str(raised.value)


def test_a_checkpoint_holding_nan_is_refused_naming_the_one_before(tmp_path):
    """checkpoint.load refuses a non-finite state (written before updates were checked)."""
    like = {"w": np.ones(3, np.float32)}
    directory = tmp_path / "checkpoints"
    for step in (1, 2):
        checkpoint.save(directory, step, like, {})
    with open(directory / "step-000000000002" / "state.npz", "wb") as file:
        np.savez(file, np.full(3, np.nan, np.float32))
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match="NaN or inf") as raised:
        checkpoint.load(directory / "step-000000000002", like)
    assert "to resume from step-000000000001, the checkpoint before it" in str(raised.value)


# Damage outside the checkpoint's own files.
DAMAGED_FOLDER = {
    "latest names a missing checkpoint": (
        lambda t: (t / "checkpoints" / "latest").write_text("step-000000000999-phase0"),
        ["names step-000000000999-phase0, which does not exist", f"write {LATEST}"],
    ),
    "latest is an absolute path": (
        lambda t: (t / "checkpoints" / "latest").write_text(str(_ckpt(t))),
        ["which is not a checkpoint folder of", f"write {LATEST}"],
    ),
    "latest leaves the folder": (
        lambda t: (t / "checkpoints" / "latest").write_text(f"../../elsewhere/{LATEST}"),
        ["'../../elsewhere/", "which is not a checkpoint folder of"],
    ),
    "latest deleted": (
        lambda t: (t / "checkpoints" / "latest").unlink(),
        ["checkpoints/latest is missing", f"(the newest intact: {LATEST})", "delete {trial}"],
    ),
    "checkpoints deleted": (
        lambda t: shutil.rmtree(t / "checkpoints"),
        ["had checkpoints (checkpointed.json, phase0.ckpt say so)", "delete {trial} to start"],
    ),
    "metrics deleted": (
        lambda t: (t / "metrics.jsonl").unlink(),
        ["metrics.jsonl is missing, but checkpoint", "delete {trial} to start the trial over"],
    ),
    "eval cut": (lambda t: _cut(t / "eval.jsonl", 10), ["eval.jsonl has 10 bytes, but checkpoint"]),
    "garbage metrics line": (
        lambda t: _garble_first_line(t / "metrics.jsonl"),
        ["metrics.jsonl, line 1, is not a JSON record ('xxxx"],
    ),
    "metrics shifted": (
        lambda t: (t / "metrics.jsonl").write_bytes(b"{}" + (t / "metrics.jsonl").read_bytes()),
        ["bytes, which end inside line"],
    ),
    "garbage config": (
        lambda t: (t / "config.yaml").write_text("agent: [unclosed\n"),
        ["config.yaml is unreadable (", "delete {trial} to start the trial over"],
    ),
    "config not a mapping": (
        lambda t: (t / "config.yaml").write_text("- 1\n"),
        ["config.yaml holds a list, not a trial config"],
    ),
}


@pytest.mark.parametrize("damage", DAMAGED_FOLDER)
def test_a_damaged_trial_folder_is_refused_with_the_fix(trial, capsys, damage):
    change, expected = DAMAGED_FOLDER[damage]
    (trial / "done.json").unlink()
    change(trial)
    code, err = _cli_run(trial, capsys)
    assert code == 2 and "Traceback" not in err, err
    for text in expected:
        assert text.format(trial=trial) in err
    assert not (trial / "done.json").exists()
    assert len(err.strip().splitlines()) <= 4  # The `trial ...` line, then the error.


def test_errors_keep_their_types_for_library_callers(trial):
    (trial / "done.json").unlink()
    (trial / "metrics.jsonl").unlink()
    with pytest.raises(runner.IncompatibleTrialError, match="metrics.jsonl is missing"):
        runner.run(_config(), trial, progress=False)
    (trial / "checkpoints" / "latest").write_text("/etc")
    with pytest.raises(checkpoint.CorruptCheckpointError, match="not a checkpoint folder"):
        runner.run(_config(), trial, progress=False)


def test_a_trial_killed_before_latest_named_its_first_checkpoint_resumes_from_it(finished, trial):
    """Killed between renaming its first checkpoint into place and writing `latest` (and the
    marker after it): that checkpoint is complete, so the trial resumes from it."""
    (trial / "done.json").unlink()
    (trial / "checkpoints" / "latest").unlink()
    (trial / trial_folder.MARKER).unlink()
    shutil.rmtree(_ckpt(trial, PREVIOUS))
    shutil.rmtree(trial / "phase0.ckpt")
    summary = runner.run(_config(), trial, progress=False)
    assert summary == json.loads((finished / "done.json").read_text())


def test_staging_leftovers_of_killed_writes_are_removed_on_open(trial):
    leftovers = [
        trial / "checkpoints" / f".{LATEST}.k2j3h4.tmp",
        trial / ".phase0.ckpt.a8sd7f.tmp",
    ]
    for folder in leftovers:
        folder.mkdir()
        (folder / "state.npz").write_bytes(b"half")
        (folder / ".replay-x1.tmp").write_bytes(b"half")
    files = [trial / ".done.json.q9w8e7.tmp", trial / "checkpoints" / ".latest.z1x2.tmp"]
    for file in files:
        file.write_bytes(b"half")
    (trial / ".notes").write_text("a user's")
    runner.run(_config(), trial, progress=False)  # Finished: it only opens the folder.
    assert not any(path.exists() for path in leftovers + files)
    assert (trial / ".notes").read_text() == "a user's"
    assert checkpoint.names(trial / "checkpoints") == [PREVIOUS, LATEST]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("[1]", "a list, not a mapping"),
        ('{"env_steps": 160', "unreadable: "),
        ("", "unreadable: "),
        ('{"env_steps": 160}', "no updates, episodes, trial_id"),
        ('{"env_steps": "160", "updates": 0, "episodes": 0, "trial_id": "x"}', "env_steps of"),
    ],
)
def test_a_garbled_done_json_is_an_error_not_a_finished_trial(trial, capsys, text, problem):
    (trial / "done.json").write_text(text)
    code, err = _cli_run(trial, capsys)
    assert code == 2 and "Traceback" not in err
    assert f"done.json is not a finished trial's summary ({problem}" in err
    assert "delete it to finish the trial again from its last checkpoint" in err
    assert trial_folder.status(trial) == "failed"
    assert not trial_folder.finished(trial)
    # A sweep does not count it as done either: the attempt fails with the same message.
    outcome = sweep.run_trial(executors.Job(_config(), str(trial)))
    assert outcome["status"] == "failed" and "is not a finished trial's summary" in outcome["error"]
    # Deleting done.json, as the message says, finishes the trial from its last checkpoint.
    (trial / "done.json").unlink()
    assert _cli_run(trial, capsys)[0] == 0 and trial_folder.finished(trial)


def _twin(folder: Path, destination: Path, seed: int, done: dict | None = None) -> Path:
    """A copy of a finished trial folder under another seed (another trial id)."""
    shutil.copytree(folder, destination)
    config = yaml.safe_load((destination / "config.yaml").read_text())
    (destination / "config.yaml").write_text(yaml.safe_dump({**config, "seed": seed}))
    if done is not None:
        (destination / "done.json").write_text(json.dumps(done))
    return destination


def test_the_report_skips_a_trial_with_a_garbled_done_json_with_a_note(finished, tmp_path):
    root = tmp_path / "results"
    summary = json.loads((finished / "done.json").read_text())
    _twin(finished, root / "good", 0)
    _twin(finished, root / "garbled", 1)
    (root / "garbled" / "done.json").write_text("[1]")
    notes: list[str] = []
    trials = results.load_trials(root, notes)
    assert [t.folder.name for t in trials] == ["good"] and trials[0].done == summary
    assert any("garbled/done.json: not a finished trial's summary" in n for n in notes)


def test_the_report_notes_a_group_with_mixed_thread_settings(finished, tmp_path):
    root = tmp_path / "results"
    summary = json.loads((finished / "done.json").read_text())
    one = {"cores": 1, "xla_cpu_multi_thread_eigen": False}
    _twin(finished, root / "a", 0, {**summary, "threads": one})
    _twin(finished, root / "b", 1, {**summary, "threads": one})
    notes: list[str] = []
    results.load_trials(root, notes)
    assert not any("thread settings" in note for note in notes)
    _twin(finished, root / "c", 2, {**summary, "threads": {**one, "cores": 2}})
    _twin(finished, root / "d", 3, {k: v for k, v in summary.items() if k != "threads"})
    results.load_trials(root, notes)
    mixed = [note for note in notes if "thread settings" in note]
    assert len(mixed) == 1 and "1 cores, single-threaded" in mixed[0] and "2 cores" in mixed[0]


def test_done_json_records_the_code_the_trial_ran(finished):
    summary = json.loads((finished / "done.json").read_text())
    assert summary["code"] == provenance.code_version()
    assert all(phase["code"] == summary["code"] for phase in summary["phases"])


def test_the_report_notes_trials_that_ran_on_different_code(finished, tmp_path):
    root = tmp_path / "results"
    summary = json.loads((finished / "done.json").read_text())
    code = {"mbxfer": "0.1.0", "commit": "a" * 40, "code": "c0de00000000", "changes": None}
    phases = [{**p, "code": code} for p in summary["phases"]]
    _twin(finished, root / "a", 0, {**summary, "code": code, "phases": phases})
    # Another commit with the same code (a docs or test commit) is the same code version.
    docs = {**code, "commit": "b" * 40}
    _twin(finished, root / "b", 1, {**summary, "code": docs, "phases": phases})
    notes: list[str] = []
    results.load_trials(root, notes)
    assert not any("code versions" in note for note in notes)
    # A trial resumed on edited code: its trial-level record and a phase's differ.
    edited = {**code, "code": "0f1e2d3c4b5a", "changes": "0f1e2d3c4b5a"}
    _twin(finished, root / "c", 2, {**summary, "code": edited, "phases": phases})
    results.load_trials(root, notes)
    mixed = [note for note in notes if "code versions" in note]
    assert len(mixed) == 1 and "2 code versions" in mixed[0]
    assert "code c0de00000000 (3 trials" in mixed[0] and "code 0f1e2d3c4b5a (1 trial" in mixed[0]


def test_save_keeps_the_newest_two_and_drops_checkpoints_of_an_abandoned_run(tmp_path):
    like = {"w": np.ones(2, np.float32)}
    directory = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        checkpoint.save(directory, step, like, {}, keep=3)
    assert checkpoint.names(directory) == [f"step-{s:012d}" for s in (1, 2, 3)]
    # Resumed from step 1 (`latest` set back by hand): step 3 belongs to the abandoned run.
    checkpoint.save(directory, 2, like, {}, keep=3)
    assert checkpoint.names(directory) == [f"step-{s:012d}" for s in (1, 2)]
    checkpoint.save(directory, 4, like, {})
    assert checkpoint.names(directory) == [f"step-{s:012d}" for s in (2, 4)]
    assert (directory / "latest").read_text() == "step-000000000004"
    with pytest.raises(ValueError, match="must be 'step-'"):
        checkpoint.save(directory, 5, like, {}, name="step-../x")


def test_done_json_records_the_thread_setting(finished):
    threads = json.loads((finished / "done.json").read_text())["threads"]
    assert threads == executors.thread_setting()
    assert set(threads) == {"cores", "xla_cpu_multi_thread_eigen"}


def _setting_of_worker(job) -> dict:
    """What a sweep worker computes with (run in the worker, in place of run_trial)."""
    return executors.thread_setting()


@pytest.mark.parametrize("workers", [1, 2])
def test_every_local_worker_count_gives_a_trial_the_same_threads(workers):
    pool = executors.LocalExecutor(workers, _setting_of_worker, threads=1)
    try:
        handles = [pool.submit(executors.Job(_config(), "unused")) for _ in range(workers)]
        settings = [pool.result(handle) for handle in handles]
    finally:
        pool.close()
    assert settings == [{"cores": 1, "xla_cpu_multi_thread_eigen": False}] * workers


def test_a_ray_task_pins_its_process_like_a_local_worker():
    """`pin_threads` as sweep.run_trial calls it for Ray (block picked by the process id)."""
    code = (
        "import json, os\n"
        "from mbxfer.benchmarks import executors\n"
        "cores = executors.pin_threads(1, os.getpid())\n"
        "print(json.dumps([cores, executors.thread_setting(), sorted(os.sched_getaffinity(0))]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    cores, setting, affinity = json.loads(output)
    assert len(cores) == 1 and affinity == cores
    assert setting == {"cores": 1, "xla_cpu_multi_thread_eigen": False}


SPEC = {
    "agents": ["dreamer"],
    "seeds": [0],
    # The tiny Dreamer trial's settings, without its `agent=dreamer`: `agents` names it.
    "base": config_lib.parse_overrides(tiny_configs.overrides("dreamer", "train.steps=160")[1:]),
}


def _leaves(folder: Path) -> list:
    found = checkpoint.latest(folder / "checkpoints")
    with np.load(found / "state.npz") as archive:
        return [archive[f"arr_{i}"] for i in range(len(archive.files))]


def _lines(folder: Path, log: str) -> list[dict]:
    records = [json.loads(line) for line in (folder / f"{log}.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if "per_second" not in k} for r in records]


@pytest.mark.slow
def test_a_trial_gives_the_same_bits_with_one_or_two_sweep_workers(tmp_path):
    """The 1e-5 gap between `mbxfer sweep --workers 1` (then two XLA threads per trial) and
    `--workers 2` (one each) is gone: every trial computes on resources.num_cpus cores."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    folders = []
    for workers in (1, 2):
        out = tmp_path / f"workers{workers}"
        argv = ["sweep", str(spec), "--out", str(out), "--workers", str(workers)]
        assert cli.main(argv) == 0
        (folder,) = [p for p in out.iterdir() if p.is_dir()]
        folders.append(folder)
    one, two = folders
    for log in trial_folder.LOGS:
        assert _lines(one, log) == _lines(two, log)
    for a, b in zip(_leaves(one), _leaves(two)):
        np.testing.assert_array_equal(a, b)
    for folder in folders:
        threads = json.loads((folder / "done.json").read_text())["threads"]
        assert threads == {"cores": 1, "xla_cpu_multi_thread_eigen": False}
