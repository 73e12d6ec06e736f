"""The command's smaller contracts: plain help, `mbxfer demo` is `make demo`, failed trials are
recorded and left out of reports, and results get the modes the umask gives."""

import argparse
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import tiny_configs
import yaml

from mbxfer.benchmarks import checkpoint, cli, report, results, runner, trial_folder
from mbxfer.benchmarks import config as config_lib
from mbxfer.benchmarks import phase as phase_lib

ROOT = Path(__file__).resolve().parent.parent
TINY_RANDOM = tiny_configs.overrides("random", "train.steps=80")
SWEEP_BASE = {
    "agent": "random",
    "env": {"name": "grid", "task": "collect_items", "num_envs": 2},
    "train": {
        "steps": 40,
        "eval_every": 40,
        "eval_episodes": 2,
        "checkpoint_every": 40,
        "log_every": 40,
        "video": False,
    },
}


def _tiny_run(folder: Path, *extra: str, **kwargs) -> dict:
    config = config_lib.build(config_lib.parse_overrides([*TINY_RANDOM, *extra]))
    return runner.run(config, folder, progress=False, **kwargs)


def _spec(path: Path, **base_updates) -> Path:
    base = {**SWEEP_BASE, **base_updates}
    path.write_text(yaml.safe_dump({"base": base, "seeds": [0]}))
    return path


# -- help -------------------------------------------------------------------------------------
def test_plain_drops_backticks_only():
    assert cli.plain("the `mbxfer` command, ``code`` and a lone ` tick") == (
        "the mbxfer command, code and a lone ` tick"
    )


def test_help_shows_no_backticks(capsys):
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    texts = [parser.format_help()] + [sub.format_help() for sub in commands.choices.values()]
    assert len(texts) == 9 and not [text for text in texts if "`" in text or "%%" in text]
    rollout = commands.choices["rollout"].format_help()
    assert "1.6%): mbxfer rollout --env crafter --task reward" in " ".join(rollout.split())
    assert "The mbxfer command." in texts[0] and "make demo runs)" in texts[0]
    # The config keys' documentation (docstrings, which keep their backticks).
    raw = config_lib.describe(config_lib.build({"agent": "dreamer"}))
    assert any("`" in line for line in raw)
    assert cli.main(["run", "--agent", "dreamer", "--keys"]) == 0
    keys = capsys.readouterr().out
    assert "agents.names()" in keys and "`" not in keys


# -- demo -------------------------------------------------------------------------------------
def test_demo_is_the_quickstart_sweep_then_its_report(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    # What the Makefile's demo target ran before it called `mbxfer demo`, word for word.
    assert cli.demo_commands(None, "results/quickstart") == [
        ["sweep", "benchmarks/configs/quickstart.yaml", "--out", "results/quickstart"],
        ["report", "results/quickstart"],
    ]
    assert cli.build_parser().parse_args(["demo"]).out == "results/quickstart"
    makefile = (ROOT / "Makefile").read_text().split("\ndemo:")[1].split("\n\n")[0]
    assert [line.strip() for line in makefile.splitlines()[1:]] == ["$(VENV)/bin/mbxfer demo"]
    monkeypatch.chdir(tmp_path)  # Elsewhere: the spec shipped with the package.
    spec = Path(cli.demo_commands(None, "out")[0][1])
    assert spec.is_absolute() and spec.name == "quickstart.yaml" and spec.is_file()


def test_demo_runs_the_sweep_and_reports_it(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--spec", str(_spec(tmp_path / "s.yaml")), "--out", str(out)]) == 0
    (folder,) = [p for p in out.iterdir() if (p / "config.yaml").exists()]
    assert (folder / "done.json").exists()
    assert f"Produced by `mbxfer report {out}`" in (out / "report.md").read_text()
    err = capsys.readouterr().err
    assert f"mbxfer sweep {tmp_path / 's.yaml'} --out {out}" in err
    assert f"mbxfer report {out}" in err


def test_demo_stops_before_the_report_when_a_trial_fails(tmp_path, capsys):
    # Pendulum's `g` goes to gymnasium unchecked: a string fails at the trial's first step.
    env = {"name": "pendulum", "num_envs": 2, "kwargs": {"g": "heavy"}}
    spec = _spec(tmp_path / "s.yaml", env=env)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--spec", str(spec), "--out", str(out)]) == 1
    assert not (out / "report.md").exists()


# -- failed trials ------------------------------------------------------------------------------
def test_failed_run_is_recorded_and_left_out_of_the_report(tmp_path, capsys, monkeypatch):
    root = tmp_path / "results"
    _tiny_run(root / "finished")
    _tiny_run(root / "stopped", "seed=1", stop_after=40)
    alone = results.load_trials(root)

    failed = root / "failed"
    argv = ["run", "--out", str(failed), "--no-progress"]
    argv += [a for item in [*TINY_RANDOM, "seed=2"] for a in ("--set", item)]
    log = phase_lib.Phase.log

    def fail_at_80(self, state, window):  # After the checkpoint at 40 steps.
        if state.env_steps >= 80:
            raise RuntimeError("disk full")
        return log(self, state, window)

    monkeypatch.setattr(phase_lib.Phase, "log", fail_at_80)
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main(argv)
    monkeypatch.undo()
    assert "failed: RuntimeError: disk full" in capsys.readouterr().err
    assert trial_folder.status(failed) == "failed"
    assert "RuntimeError: disk full" in (failed / "error.txt").read_text()

    notes: list[str] = []
    trials = results.load_trials(root, notes)
    # Finished and unfinished trials are read as before; the failed one is left out, noted.
    assert [(t.folder, t.trial_id, t.evals, t.done) for t in trials] == [
        (t.folder, t.trial_id, t.evals, t.done) for t in alone
    ]
    assert notes == [
        "skipped 1 failed trial folder (no done.json; the traceback is in each one's "
        f"error.txt): {failed} (RuntimeError: disk full)"
    ]
    text = report.write(root, tmp_path / "report", reps=50, curve_reps=20).read_text()
    assert "Read 2 trial folders" in text and "(1 finished, 1 unfinished)" in text
    assert f"- {notes[0]}" in text
    assert "| random | 1 | incomplete |" in text  # The stopped trial, still listed.

    # A folder holding only the failed trial: the error says which trial was left out.
    only = tmp_path / "only_failed"
    only.mkdir()
    shutil.copytree(failed, only / "failed")
    assert cli.main(["report", str(only)]) == 2
    assert "skipped 1 failed trial folder" in capsys.readouterr().err

    # The same command again resumes the trial; finished, it is no longer marked failed.
    assert cli.main(argv) == 0
    assert trial_folder.status(failed) == "done" and not (failed / "failed.json").exists()
    assert len(results.load_trials(root)) == 3


# -- file modes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_results_get_the_modes_the_umask_gives(tmp_path, capsys, mask):
    previous = os.umask(mask)
    try:
        folder = tmp_path / "trial"
        _tiny_run(folder)
        assert cli.main(["eval", str(folder), "--modes", "sampled"]) == 0
        checkpoint.write_atomic(tmp_path / "loose" / "file.json", b"{}")
    finally:
        os.umask(previous)
    paths = [folder, *folder.rglob("*"), tmp_path / "loose" / "file.json"]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
    expected = {name: (0o777 if (tmp_path / name).is_dir() else 0o666) & ~mask for name in modes}
    assert modes == expected
    # Every kind of file the runner writes is there.
    for name in ("config.yaml", "done.json", "phase0.ckpt", "checkpoints/latest", "evals"):
        assert f"trial/{name}" in modes
    assert any(name.endswith("replay.npz") for name in modes)
    assert any(name.endswith("state.npz") for name in modes)
    assert json.loads((folder / "evals" / "phase0_sampled.json").read_text())["phase"] == "train"
