"""Sweeps: spec validation, local and Ray executors, a real kill and resume, retries."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mbxfer.benchmarks import cli, executors, report, results, sweep, sweep_spec, trial_folder
from mbxfer.benchmarks import config as config_lib

ROOT = Path(__file__).resolve().parent.parent
TINY_BASE = {
    "agent": "random",
    "env": {"name": "grid", "task": "collect_items", "num_envs": 2},
    "train": {
        "steps": 200,
        "eval_every": 100,
        "eval_episodes": 2,
        "checkpoint_every": 100,
        "log_every": 100,
        "video": False,
    },
}


def _spec(tmp_path, name="spec.yaml", **spec):
    spec.setdefault("base", TINY_BASE)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def _snapshot(folder: Path) -> dict:
    """Every file below `folder`: bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _eval_steps(folder: Path) -> list[int]:
    records = [json.loads(line) for line in open(folder / "eval.jsonl")]
    return [r.get("total_env_steps", r["env_steps"]) for r in records]


def test_spec_expands_to_validated_trials():
    spec = {
        "agents": ["random"],
        "envs": ["grid", {"name": "point_mass", "task": "reach_top_left"}],
        "tasks": ["collect_items", "reach_top_right"],
        "seeds": [0, 1],
        "base": {"train": {"steps": 100}},
        "grid": {"env.num_envs": [1, 2]},
    }
    trials = sweep_spec.expand(spec).trials
    # grid: 2 tasks x 2 seeds x 2 num_envs; point_mass names its own task: 2 seeds x 2.
    assert len(trials) == 12
    assert len({t.trial_id for t in trials}) == 12
    point_mass = [t for t in trials if t.config.env.name == "point_mass"]
    assert {t.config.env.task for t in point_mass} == {"reach_top_left"}
    assert all(t.config.train.steps == 100 for t in trials)
    assert {t.labels["overrides"]["env.num_envs"] for t in trials} == {1, 2}


def test_agents_nested_overrides_stay_their_own_over_a_nested_base():
    """Each agent entry deep-merges into a copy of the base: one entry's nested override must
    not leak into the base, and so into the entries after it (it once did)."""
    spec = {
        "agents": [
            {"name": "dreamer", "model": {"losses": {"open_loop_heads": 1.0}}},
            {"name": "dreamer"},
            {"name": "dreamer", "model": {"deter": 32}},
        ],
        "envs": [{"name": "grid", "task": "reach_top_left"}],
        "seeds": [0],
        "base": {
            "train": {"steps": 100},
            "agent": {"model": {"deter": 16, "losses": {"reward": 2.0}}},
        },
    }
    models = [t.config.agent_config.model for t in sweep_spec.expand(spec).trials]
    assert [m.losses.open_loop_heads for m in models] == [1.0, 0.0, 0.0]
    assert [m.deter for m in models] == [16, 16, 32]
    assert all(m.losses.reward == 2.0 for m in models)
    assert spec["base"]["agent"] == {"model": {"deter": 16, "losses": {"reward": 2.0}}}


@pytest.mark.parametrize(
    "spec, expected",
    [
        ({"agents": ["dreamr"]}, ["agents[0]: unknown agent 'dreamr' (did you mean dreamer"]),
        ({"envs": ["gird"]}, ["envs[0]: unknown environment 'gird' (did you mean grid"]),
        (
            {"base": {"train": {"stepz": 5}}},
            ["unknown key 'train.stepz' (did you mean train.steps?)"],
        ),
        ({"seeds": [0, "one"]}, ["seed='one' must be an integer"]),
        ({"grid": {"train.steps": []}}, ["grid.train.steps: must be a non-empty list"]),
        ({"seeds": []}, ["seeds: must be a non-empty list"]),
        (
            {"envs": [{"name": "grid", "kwargs": {"sise": 3}}]},
            ["unknown keyword(s) 'sise' (did you mean size"],
        ),
        (
            {
                "agents": ["random", "muzeroo"],
                "envs": ["grid", "crafterr"],
                "grid": {"train.batch_size": ["big"], "train.eval_every": []},
                "resourcs": {"num_cpus": 1},
            },
            [
                "5 problems",
                "unknown agent 'muzeroo' (did you mean muzero",
                "unknown environment 'crafterr' (did you mean crafter",
                "train.batch_size='big' must be an integer",
                "grid.train.eval_every: must be a non-empty list",
                "unknown spec key 'resourcs' (did you mean resources?)",
            ],
        ),
    ],
)
def test_malformed_specs_fail_before_any_trial_starts(tmp_path, capsys, spec, expected):
    path = _spec(tmp_path, **spec)
    out = tmp_path / "out"
    assert cli.main(["sweep", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err
    assert "nothing was run" in err and "Traceback" not in err
    assert not out.exists()


def test_local_sweep_runs_then_skips_finished_trials(tmp_path):
    spec = sweep_spec.load_spec(_spec(tmp_path, seeds=[0, 1]))
    out = tmp_path / "out"
    outcome = sweep.run(sweep_spec.expand(spec), out, workers=2, stream=None, poll=0.2)
    assert outcome.ok and len(outcome.statuses) == 2
    index = [json.loads(line) for line in (out / sweep.INDEX).read_text().splitlines()]
    assert sorted(e["seed"] for e in index) == [0, 1]
    for entry in index:
        folder = out / entry["folder"]
        assert (folder / "done.json").exists()
        assert _eval_steps(folder)[-1] == 200
        assert json.loads((folder / "progress.json").read_text())["env_steps"] == 200
    before = _snapshot(out)
    log = tmp_path / "log.txt"
    with open(log, "w") as stream:
        again = sweep.run(sweep_spec.expand(spec), out, workers=2, stream=stream)
    assert again.ok
    assert "2 done (skipped), 0 partial (resuming), 0 failed (retrying), 0 new" in log.read_text()
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if k != sweep.INDEX} == {
        k: v for k, v in before.items() if k != sweep.INDEX
    }
    # The report reads the same folders, and names each trial by the sweep's trial id.
    assert {t.trial_id for t in results.load_trials(out)} == {e["trial_id"] for e in index}
    written = report.write(out, tmp_path / "report", command="test", reps=200, curve_reps=50)
    assert "| scratch | random [seed" not in written.read_text()  # Seeds are not variants.
    assert "| scratch | random | 2 | 200 |" in written.read_text()


def test_trials_that_share_their_pretraining_run_it_once(tmp_path, capsys):
    base = {
        **TINY_BASE,
        "protocol": {"pretrain_task": "reach_top_left", "pretrain_steps": 100},
    }
    path = _spec(
        tmp_path, base=base, protocols=["task_transfer"], grid={"protocol.carry": ["all", "none"]}
    )
    plan = sweep_spec.expand(sweep_spec.load_spec(path))
    leader, follower = (t.trial_id for t in plan.trials)
    assert sweep.shared_starts(plan.trials) == {follower: (leader, 0)}
    out = tmp_path / "out"
    assert cli.main(["sweep", str(path), "--out", str(out), "--dry-run"]) == 0
    assert f"(starts from {leader}/phase0.ckpt)" in capsys.readouterr().out
    outcome = sweep.run(plan, out, workers=2, stream=None, poll=0.2)
    assert outcome.ok
    done = json.loads((out / follower / "done.json").read_text())
    assert done["from"] == str(out / leader / "phase0.ckpt")  # It waited for the leader.
    assert not (out / follower / "phase0.ckpt").exists()  # Pretraining did not run again...

    def pretraining(trial_id):
        lines = [json.loads(x) for x in open(out / trial_id / "eval.jsonl")]
        return [
            {k: v for k, v in r.items() if k != "env_steps_per_second"}
            for r in lines
            if r["phase"] == "pretrain"
        ]

    assert pretraining(follower) == pretraining(leader) != []  # ...but its logs are there.
    assert [p["name"] for p in done["phases"]] == ["pretrain", "finetune"]


def test_failed_trial_is_retried_and_reported(tmp_path, capsys):
    # Pendulum's gravity `g` is passed through to gymnasium, which declares nothing of it:
    # a string passes every check and fails at the first step of the trial.
    base = {**TINY_BASE, "env": {"name": "pendulum", "num_envs": 2, "kwargs": {"g": "heavy"}}}
    path = _spec(tmp_path, base=base)
    out = tmp_path / "out"
    assert cli.main(["sweep", str(path), "--out", str(out), "--retries", "1"]) == 1
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    errors = (folder / "error.txt").read_text()
    assert errors.count("=== attempt failed") == 2  # The first try and one retry.
    assert errors.count("TypeError: unsupported operand type(s)") == 2
    captured = capsys.readouterr()
    assert f"trial {folder.name} not finished: TypeError: unsupported operand" in captured.err
    assert trial_folder.status(folder) == "failed"
    assert cli.main(["sweep", str(path), "--out", str(out), "--dry-run"]) == 0
    assert f"{folder.name}  failed" in capsys.readouterr().out.replace("  failed  ", "  failed")


def test_dry_run_lists_every_status(tmp_path, capsys):
    from mbxfer.benchmarks import runner

    path = _spec(tmp_path, seeds=[0, 1, 2, 3])
    out = tmp_path / "out"
    trials = sweep_spec.expand(sweep_spec.load_spec(path)).trials
    runner.run(trials[0].config, out / trials[0].trial_id, progress=False)
    runner.run(trials[1].config, out / trials[1].trial_id, progress=False, stop_after=100)
    (out / trials[2].trial_id).mkdir()
    trial_folder.record_failure(out / trials[2].trial_id, "Traceback ...\nRuntimeError: boom")
    assert cli.main(["sweep", str(path), "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = {
        trials[0].trial_id: ["done", "200/200"],
        trials[1].trial_id: ["partial", "100/200"],
        trials[2].trial_id: ["failed", "0/200"],
        trials[3].trial_id: ["new", "0/200"],
    }
    rows = {line.split()[0]: line.split()[1:3] for line in lines[2:-1]}
    assert rows == expected
    assert lines[-1] == "1 done, 1 partial, 1 failed, 1 new"
    assert not (out / sweep.INDEX).exists()  # A dry run writes nothing.


def test_killed_sweep_reruns_only_the_missing_trials(tmp_path):
    """SIGKILL a real `mbxfer sweep` mid-trial; the re-run leaves finished trials alone."""
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "steps": 400}}
    path = _spec(tmp_path, base=base, seeds=[0, 1, 2])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mbxfer.benchmarks.cli", "sweep", str(path), "--out", str(out)]
    command += ["--workers", "1", "--no-progress"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    trials = sweep_spec.expand(sweep_spec.load_spec(path)).trials
    folders = [out / t.trial_id for t in trials]
    deadline = time.time() + 300
    interrupted = None
    while time.time() < deadline and process.poll() is None:
        done = [f for f in folders if (f / "done.json").exists()]
        started = [
            f
            for f in folders
            if (f / "checkpoints" / "latest").exists() and not (f / "done.json").exists()
        ]
        if done and started:
            interrupted = started[0]
            break
        time.sleep(0.02)
    assert process.poll() is None, process.communicate()[1].decode()[-3000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    # The pool worker dies with the driver (it held the trial's lock while it lived).
    while time.time() < deadline and trial_folder.status(interrupted) == "running":
        time.sleep(0.05)
    assert trial_folder.status(interrupted) == "partial"
    finished = {f: _snapshot(f) for f in folders if (f / "done.json").exists()}
    assert 1 <= len(finished) <= 2

    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (
        f"{len(finished)} done (skipped), 1 partial (resuming), 0 failed (retrying), "
        f"{2 - len(finished)} new"
    ) in rerun.stderr
    for folder, snapshot in finished.items():
        assert _snapshot(folder) == snapshot  # Untouched, byte for byte.
    # The resumed trial evaluated on the same schedule as the uninterrupted ones: no gap, no
    # duplicate line.
    schedules = [_eval_steps(folder) for folder in folders]
    assert schedules[0][-1] == 400 and schedules.count(schedules[0]) == 3


def test_ray_executor_without_ray_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # As if Ray were not installed.
    path = _spec(tmp_path)
    code = cli.main(["sweep", str(path), "--out", str(tmp_path / "out"), "--executor", "ray"])
    assert code == 2
    assert "pip install 'mbxfer[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # Ray starts its processes.
def test_ray_sweep_runs_each_trial_as_a_ray_task(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install 'mbxfer[ray]'")
    spec = sweep_spec.load_spec(_spec(tmp_path, seeds=[0, 1]))
    out = tmp_path / "out"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcome = sweep.run(sweep_spec.expand(spec), out, executor="ray", stream=None, poll=0.2)
        assert ray.is_initialized()  # A cluster the caller started stays up.
    finally:
        ray.shutdown()
    assert outcome.ok and len(outcome.statuses) == 2
    for trial_id in outcome.statuses:
        assert (out / trial_id / "done.json").exists()


def test_core_shares_split_the_cores():
    cores = sorted(os.sched_getaffinity(0))
    shares = executors.core_shares(len(cores))
    assert sorted(c for share in shares for c in share) == cores
    assert all(len(share) == 1 for share in executors.core_shares(len(cores) + 3))
    assert executors.core_shares(1) == [cores]


def test_parts_and_scales_make_one_spec_of_several_grids(tmp_path):
    path = _spec(
        tmp_path,
        seeds=[0],
        parts=[{"agents": ["random"]}, {"agents": ["random"], "seeds": [1, 2]}],
        scales={"paper": {"base": {"train": {"steps": 400}}}},
    )
    plan = sweep_spec.expand(sweep_spec.load_spec(path))
    assert sorted(t.config.seed for t in plan.trials) == [0, 1, 2]
    assert {t.config.train.steps for t in plan.trials} == {200}
    paper = sweep_spec.expand(sweep_spec.load_spec(path, "paper"))
    assert {t.config.train.steps for t in paper.trials} == {400}
    with pytest.raises(sweep_spec.SpecError, match="no scale 'papr'.*did you mean paper"):
        sweep_spec.load_spec(path, "papr")
    bad = _spec(tmp_path, "bad.yaml", parts=[{"agents": ["dremer"]}, {"agents": ["random"]}])
    with pytest.raises(sweep_spec.SpecError, match=r"parts\[0\].*dremer"):
        sweep_spec.expand(sweep_spec.load_spec(bad))


PRESETS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_shipped_preset_expands_to_distinct_validated_trials(preset):
    """What `mbxfer sweep PRESET --dry-run` checks, for every preset the README names: the
    spec is valid and no two of its variants collapse into one trial."""
    import copy

    spec = sweep_spec.load_spec(preset)
    assert sweep_spec.expand(spec).trials
    shared = {key: value for key, value in spec.items() if key != "parts"}
    for part in spec.get("parts") or [{}]:
        one = config_lib.merge(copy.deepcopy(shared), part)
        # Within a part every combination of its axes is its own trial.
        assert len(sweep_spec.expand(one).trials) == sweep_spec.count_trials(one)
