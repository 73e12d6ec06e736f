"""The one loop: metrics, checkpoints, exact resume after a real kill, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiny_configs
import yaml

from mbxfer.benchmarks import checkpoint, cli, runner
from mbxfer.benchmarks import config as config_lib

ROOT = Path(__file__).resolve().parent.parent
# The shared tiny Dreamer trial (tests/tiny_configs.py), with this file's schedule.
TINY = tiny_configs.overrides(
    "dreamer", "train.steps=240", "train.eval_every=120", "train.checkpoint_every=80"
)


def _config(*extra):
    return config_lib.build(config_lib.parse_overrides([*TINY, *extra]))


def _lines(path, drop=("env_steps_per_second",)):
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def _final_leaves(folder):
    found = checkpoint.latest(Path(folder) / "checkpoints")
    with np.load(found / "state.npz") as archive:
        return [archive[f"arr_{i}"] for i in range(len(archive.files))]


@pytest.fixture(scope="module")
def finished_trial(tmp_path_factory):
    """One uninterrupted tiny trial, shared by the tests that compare against it."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    return folder, runner.run(_config(), folder, progress=False)


def test_trial_writes_metrics_evals_checkpoints(finished_trial):
    tmp_path, summary = finished_trial
    assert summary["env_steps"] == 240 and summary["updates"] > 0
    metrics = _lines(tmp_path / "metrics.jsonl")
    assert [m["env_steps"] for m in metrics] == [40, 80, 120, 160, 200, 240]
    assert all(np.isfinite(m["train/loss/total"]) for m in metrics if "train/loss/total" in m)
    # The phase's starting point is evaluated too (the jumpstart of transfer metrics).
    evals = _lines(tmp_path / "eval.jsonl")
    assert [(e["env_steps"], e["mode"]) for e in evals] == [
        (steps, mode) for steps in (0, 120, 240) for mode in ("sampled", "greedy")
    ]
    # Both modes of one evaluation play the same episodes.
    assert evals[0]["start_digest"] == evals[1]["start_digest"]
    headline = summary["final_eval"]
    assert headline["mode"] == "sampled" and set(headline["modes"]) == {"sampled", "greedy"}
    assert headline["return_mean"] == headline["modes"]["sampled"]["return_mean"]
    assert (tmp_path / "done.json").exists() and (tmp_path / "config.yaml").exists()
    assert checkpoint.latest(tmp_path / "checkpoints").name == "step-000000000240-phase0"
    assert (tmp_path / "phase0.ckpt" / "state.npz").exists()
    assert [p["name"] for p in summary["phases"]] == ["train"]
    # A finished trial is not run again.
    assert runner.run(_config(), tmp_path, progress=False) == summary


def test_killed_trial_resumes_to_the_same_result(tmp_path, finished_trial):
    """Kill a real `mbxfer run` process after a checkpoint, resume, compare with no kill."""
    uninterrupted = finished_trial[0]

    killed = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "benchmarks.cli",
        "run",
        "--out",
        str(killed),
        "--no-progress",
    ] + [a for item in TINY for a in ("--set", item)]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    pointer = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if pointer.exists() and pointer.read_text().strip() >= "step-000000000080":
            break
        time.sleep(0.02)
    assert process.poll() is None, (
        f"the run ended before it could be killed: {process.stderr.read()}"
    )
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "done.json").exists()
    killed_at = checkpoint.latest(killed / "checkpoints").name
    assert killed_at < "step-000000000240"

    runner.run(_config(), killed, progress=False)
    for a, b in zip(_final_leaves(uninterrupted), _final_leaves(killed)):
        np.testing.assert_array_equal(a, b)
    assert _lines(killed / "metrics.jsonl") == _lines(uninterrupted / "metrics.jsonl")
    assert _lines(killed / "eval.jsonl") == _lines(uninterrupted / "eval.jsonl")
    assert _lines(killed / "episodes.jsonl") == _lines(uninterrupted / "episodes.jsonl")


def test_stopped_trial_resumes_in_process(tmp_path, finished_trial):
    stopped = runner.run(_config(), tmp_path, progress=False, stop_after=160)
    assert stopped == {"stopped_at": 160}
    runner.run(_config(), tmp_path, progress=False)
    for a, b in zip(_final_leaves(finished_trial[0]), _final_leaves(tmp_path)):
        np.testing.assert_array_equal(a, b)


def test_trial_killed_between_its_last_checkpoint_and_done_json_finishes_on_resume(
    tmp_path, finished_trial
):
    """The last phase's end checkpoint is written, done.json is not (a kill in between):
    running again writes the same done.json from that checkpoint, training nothing."""
    import shutil

    folder = tmp_path / "trial"
    shutil.copytree(finished_trial[0], folder)
    done = json.loads((folder / "done.json").read_text())
    (folder / "done.json").unlink()
    metrics = (folder / "metrics.jsonl").read_text()
    assert runner.run(_config(), folder, progress=False) == done
    assert json.loads((folder / "done.json").read_text()) == done
    assert (folder / "metrics.jsonl").read_text() == metrics


RANDOM = tiny_configs.overrides(
    "random", "train.steps=300", "train.eval_every=150", "env.kwargs={size: 5, length: 35}"
)


def _random_trial(folder, *extra):
    config = config_lib.build(config_lib.parse_overrides([*RANDOM, *extra]))
    return runner.run(config, folder, progress=False)


def test_checkpoints_cut_no_episode(tmp_path):
    """Checkpoints every 40 steps inside 35-step episodes on 2 environments: the trial is
    the same as one without checkpoints, every episode counted; stopped and resumed too."""
    plain = _random_trial(tmp_path / "plain", "train.checkpoint_every=100000")
    checkpointed = _random_trial(tmp_path / "checkpointed")
    assert checkpointed["phases"][0]["checkpoints"] == "continued episodes"
    assert "checkpoints" not in plain["phases"][0]
    episodes = _lines(tmp_path / "checkpointed" / "episodes.jsonl")
    assert len(episodes) == 2 * (150 // 35) and {e["length"] for e in episodes} == {35}
    for log in ("episodes.jsonl", "eval.jsonl"):
        assert _lines(tmp_path / "checkpointed" / log) == _lines(tmp_path / "plain" / log)
    resumed = tmp_path / "resumed"
    config = config_lib.build(config_lib.parse_overrides(RANDOM))
    assert runner.run(config, resumed, progress=False, stop_after=120) == {"stopped_at": 120}
    assert runner.run(config, resumed, progress=False) == checkpointed
    for log in ("episodes.jsonl", "eval.jsonl", "metrics.jsonl"):
        assert _lines(resumed / log) == _lines(tmp_path / "checkpointed" / log)


def test_environments_without_state_are_reset_at_checkpoints_and_done_json_says_so(
    tmp_path, monkeypatch
):
    from mbxfer.envs import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register("stateless_grid", "state_checks:StatelessGrid")
    extra = ("env.name=stateless_grid",)
    summary = _random_trial(tmp_path / "cut", *extra)
    assert summary["phases"][0]["checkpoints"].startswith("reset environments (")
    assert "cannot save its state" in summary["phases"][0]["checkpoints"]
    episodes = _lines(tmp_path / "cut" / "episodes.jsonl")
    assert len(episodes) < 2 * (150 // 35)  # Episodes running at a checkpoint are lost.
    config = config_lib.build(config_lib.parse_overrides([*RANDOM, *extra]))
    assert runner.run(config, tmp_path / "resumed", progress=False, stop_after=120) == {
        "stopped_at": 120
    }
    runner.run(config, tmp_path / "resumed", progress=False)
    for log in ("episodes.jsonl", "eval.jsonl"):
        assert _lines(tmp_path / "resumed" / log) == _lines(tmp_path / "cut" / log)


def _cli(capsys, *argv):
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def test_unknown_key_and_wrong_type_are_reported_together(capsys):
    code, err = _cli(
        capsys,
        "run",
        "--set",
        "agent.model.latnt=deterministic",
        "--set",
        "train.batch_size=big",
        "--print-config",
    )
    assert code == 2
    assert "unknown key 'agent.model.latnt' (did you mean agent.model.latent?)" in err
    assert "train.batch_size='big' must be an integer" in err
    assert "Traceback" not in err
    code, err = _cli(capsys, "run", "--set", "agent.model.latent=stochastic", "--print-config")
    assert code == 2 and "must be one of ('rssm', 'deterministic')" in err


def test_resume_with_a_different_config_is_refused(tmp_path, capsys):
    runner.run(_config(), tmp_path, progress=False, stop_after=80)
    with pytest.raises(runner.IncompatibleTrialError, match="agent.model.deter: 32 -> 16"):
        runner.run(_config("agent.model.deter=16"), tmp_path, progress=False)
    code, err = _cli(
        capsys,
        "run",
        "--out",
        str(tmp_path),
        "--no-progress",
        *[a for item in TINY for a in ("--set", item)],
        "--set",
        "seed=3",
    )
    assert code == 2 and "seed: 0 -> 3" in err and "Traceback" not in err


def test_checkpoint_of_another_structure_is_refused(tmp_path):
    runner.run(_config(), tmp_path / "a", progress=False, stop_after=80)
    # Same config file, but a checkpoint written by a model of another size.
    runner.run(_config("agent.model.deter=16"), tmp_path / "b", progress=False, stop_after=80)
    (tmp_path / "a" / "checkpoints").rename(tmp_path / "a" / "old")
    os.rename(tmp_path / "b" / "checkpoints", tmp_path / "a" / "checkpoints")
    for log in ("metrics", "eval", "episodes"):  # Logs as long as the checkpoint says.
        os.replace(tmp_path / "b" / f"{log}.jsonl", tmp_path / "a" / f"{log}.jsonl")
    with pytest.raises(runner.IncompatibleTrialError, match="different structure"):
        runner.run(_config(), tmp_path / "a", progress=False)


def test_crafter_smoke_run_writes_metrics_checkpoint_and_video(tmp_path):
    config = config_lib.build(
        config_lib.parse_overrides(
            [
                "agent=dreamer",
                "env.name=crafter",
                "env.task=reward",
                "env.num_envs=2",
                "train.steps=300",
                "train.batch_size=2",
                "train.sequence_length=12",
                "train.train_ratio=2",
                "train.learning_starts=100",
                "train.log_every=100",
                "train.eval_every=0",
                "train.checkpoint_every=300",
                "agent.model.deter=32",
                "agent.model.hidden=32",
                "agent.model.stoch_groups=4",
                "agent.model.stoch_classes=4",
                "agent.model.encoder_depth=4",
                "agent.actor_critic.hidden=32",
                "agent.actor_critic.horizon=3",
            ]
        )
    )
    summary = runner.run(config, tmp_path, progress=False)
    assert summary["updates"] > 0
    assert (tmp_path / "video.gif").stat().st_size > 1000
    assert len(summary["video"]["open_loop_mse"]) == 12 - 5
    assert checkpoint.latest(tmp_path / "checkpoints") is not None
    assert "train/loss/reconstruction" in _lines(tmp_path / "metrics.jsonl")[-1]


def test_agent_flag_and_agent_overrides_combine(capsys):
    code = cli.main(["run", "--agent", "muzero", "--set", "agent.hidden=16", "--print-config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert code == 0 and printed["agent"]["name"] == "muzero" and printed["agent"]["hidden"] == 16


def test_the_agent_is_spelled_one_way_and_old_trial_folders_still_open(tmp_path):
    """config.yaml writes the agent as users do (`agent: {name, ...}`); folders written with
    the old `agent` + `agent_config` spelling still build the same config and resume."""

    from mbxfer.benchmarks import trial_folder

    config = _config()
    plain = config.to_dict()
    assert plain["agent"]["name"] == "dreamer" and "agent_config" not in plain
    assert plain["agent"]["model"]["deter"] == 32
    assert config_lib.build(plain) == config
    legacy = {k: v for k, v in plain.items() if k != "agent"}
    legacy["agent"] = "dreamer"
    legacy["agent_config"] = {k: v for k, v in plain["agent"].items() if k != "name"}
    assert config_lib.build(legacy) == config
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(legacy))
    trial_folder.TrialFolder.open(tmp_path, config)  # Same trial: no error.
    other = _config("agent.model.deter=64")
    with pytest.raises(runner.IncompatibleTrialError, match=r"agent\.model\.deter: 32 -> 64"):
        trial_folder.TrialFolder.open(tmp_path, other)


@pytest.mark.parametrize("clock", ["zero", "learning_starts"])
def test_replay_ratio_counts_from_its_clock(clock):
    """`zero` owes updates for the prefill at the first training step (a burst);
    `learning_starts` (DreamerV3's `when.Ratio`) runs one update there, then keeps the ratio
    over the steps after it. Both hold `train_ratio` replayed steps per env step from then on."""
    from mbxfer.benchmarks import schedule

    ratio = schedule.ReplayRatio(64.0, 256, learning_starts=500, clock=clock)
    updates, per_step = 0, []
    for env_steps in range(4, 2001, 4):
        owed = ratio.owed(env_steps, updates)
        updates += owed
        per_step.append(owed)
    first = per_step[500 // 4 - 1]
    assert sum(per_step[: 500 // 4 - 1]) == 0  # nothing before learning_starts
    assert first == (125 if clock == "zero" else 1)
    assert updates == (500 if clock == "zero" else 1 + 375)
    assert max(per_step[500 // 4 :]) == 1  # then one update per 4 steps (64 * 4 / 256)


def test_nonfinite_training_stops_with_exit_3_and_keeps_the_last_finite_checkpoint(
    tmp_path, capsys
):
    """A learning rate of 1e30 turns the first updates to NaN: the trial stops at that update
    (exit code 3, named metrics), writes no done.json and no non-finite checkpoint, and the
    checkpoint written before updates began is intact and finite."""
    from mbxfer.benchmarks import cli

    out = tmp_path / "nan"
    overrides = _config("agent.model_lr=1e30", "train.learning_starts=120").to_dict()
    (tmp_path / "config.yaml").write_text(config_lib.yaml.safe_dump(overrides))
    argv = ["run", "--config", str(tmp_path / "config.yaml"), "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 3
    error = capsys.readouterr().err
    assert "non-finite training: update" in error and "loss/total" in error
    assert not (out / "done.json").exists() and (out / "failed.json").exists()
    saved = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert saved == ["step-000000000080-phase0"]  # before learning_starts; none after the NaN
    assert all(np.all(np.isfinite(leaf)) for leaf in _final_leaves(out) if leaf.dtype.kind == "f")


def test_gifs_show_each_frame_for_its_milliseconds(tmp_path):
    """The world-model video and `mbxfer eval --video` share one writer; frame times are
    milliseconds (imageio's duration=0.2 gave 0 ms frames)."""
    from PIL import Image

    from mbxfer.benchmarks import video

    frames = [np.full((8, 8, 3), i * 40, np.uint8) for i in range(4)]
    video.write_gif(frames, tmp_path / "v.gif", frame_ms=200)
    with Image.open(tmp_path / "v.gif") as gif:
        assert gif.n_frames == 4 and gif.info["duration"] == 200


def test_gif_frames_keep_their_colours(tmp_path):
    """Frames of at most 256 colours come back exactly from the quantized GIF."""
    from PIL import Image

    from mbxfer.benchmarks import video

    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (3, 40, 3), dtype=np.uint8)
    frames = [colours[i][rng.integers(0, 40, (64, 32))] for i in range(3)]
    video.write_gif(frames, tmp_path / "v.gif")
    with Image.open(tmp_path / "v.gif") as gif:
        for index, frame in enumerate(frames):
            gif.seek(index)
            shown = np.asarray(gif.convert("RGB"))  # Scaled 2x up to ~128 pixels.
            np.testing.assert_array_equal(shown[::2, ::2], frame)


def test_gif_frames_of_many_colours_stay_close(tmp_path):
    """Frames of more than 256 colours (a decoder's images) are quantized, not garbled."""
    from PIL import Image

    from mbxfer.benchmarks import video

    ramp = np.linspace(0, 255, 128).astype(np.uint8)
    frame = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 255 - ramp[:, None]), -1)
    video.write_gif([frame, frame[::-1]], tmp_path / "v.gif")
    with Image.open(tmp_path / "v.gif") as gif:
        shown = np.asarray(gif.convert("RGB")).astype(int)
    assert np.abs(shown - frame).mean() < 6.0  # 4.0 of 255 measured (16,384 colours)


def test_a_timed_trial_records_its_parts_and_writes_what_an_untimed_one_writes(tmp_path):
    from mbxfer.benchmarks import timing
    from mbxfer.benchmarks.perf import trial_time

    config = config_lib.build(config_lib.parse_overrides(RANDOM))
    timer = timing.Timeline()
    start = time.perf_counter()
    timed = runner.run(config, tmp_path / "timed", progress=False, timer=timer)
    wall = time.perf_counter() - start
    seconds = timer.seconds()
    top = ("build", "init", "act", "env", "evaluate", "log", "checkpoint", "video")
    assert set(top) | {"eval_act", "eval_env"} == set(seconds)
    assert sum(seconds[part] for part in top) <= wall
    assert seconds["eval_act"] + seconds["eval_env"] <= seconds["evaluate"]  # Nested in it.
    assert timer.first("evaluate").start < timer.first("act").start  # The jumpstart first.
    assert runner.run(config, tmp_path / "untimed", progress=False) == timed
    for log in ("metrics.jsonl", "eval.jsonl", "episodes.jsonl"):
        assert _lines(tmp_path / "timed" / log) == _lines(tmp_path / "untimed" / log)
    # The benchmark's table from one such run.
    result = {"wall_seconds": wall, "outside_core": 0.5, "steps_per_second": 3.0,
              "hours_per_million": 92.6, "fixed": 0.1, "split_seconds": {**dict.fromkeys(trial_time.PARTS, 0.0),
              **seconds, "other": 0.0}}  # fmt: skip
    table = trial_time.report({"dreamer": [result]})
    assert table.splitlines()[2].startswith("| dreamer |") and "92.6" in table


def test_first_call_excess_is_the_first_interval_beyond_the_median_of_the_rest():
    from mbxfer.benchmarks import timing
    from mbxfer.benchmarks.perf import trial_time

    timer = timing.Timeline()
    for start, seconds in enumerate([5.0, 1.0, 3.0, 2.0]):
        timer.intervals.append(timing.Interval("update", float(start), seconds))
    timer.intervals.append(timing.Interval("act", 9.0, 0.5))
    assert trial_time.first_call_excess(timer, "update") == 3.0
    assert trial_time.first_call_excess(timer, "act") == 0.0  # One call: nothing to compare.


def test_the_trial_time_benchmark_builds_the_presets_trials():
    from mbxfer.benchmarks.perf import trial_time

    name, agent, extra = trial_time.parse_variant("small=dreamer,agent.model.deter=64")
    config = trial_time.trial_config(agent, 1400, extra)
    assert (name, config.agent, config.train.steps) == ("small", "dreamer", 1400)
    assert config.agent_config.model.deter == 64 and config.env.name == "crafter"
    assert config.train.batch_size == 8 and config.train.sequence_length == 32


@pytest.mark.parametrize(
    "env", [[], ["env.name=crafter", "env.task=reward", "env.kwargs={size: 18, length: 35}"]]
)
def test_prepared_evaluation_batches_play_what_a_batch_built_at_evaluation_plays(env):
    """`EvalEnvs.prepare` builds a batch of workers in the background while the agent is
    built, and resets it once (Crafter's first reset loads its world generator); `get`
    reseeds it, so it plays the episodes of a batch built with that seed."""
    import state_checks

    from mbxfer.benchmarks import phase
    from mbxfer.envs import vector

    config = config_lib.build(config_lib.parse_overrides(RANDOM + ["env.workers=true"] + env))
    recipe = phase.env_recipe(config, None)
    spec = recipe(seed=0).action_spec()
    actions = np.stack([state_checks.random_actions(spec, 30, seed=i) for i in range(2)], axis=1)
    eval_envs = phase.EvalEnvs(config)
    try:
        eval_envs.prepare(recipe, 2)
        eval_envs.prepare(recipe, 2)  # Once per batch.
        prepared = eval_envs.get(recipe, 2, seed=11)
        assert eval_envs.get(recipe, 2, seed=11) is prepared and prepared.mode == "process"
        with vector.VectorEnv(recipe, 2, mode="process", seed=11) as new:
            state_checks.assert_same_timestep(prepared.reset(), new.reset(), "reset")
            for i, action in enumerate(actions):
                state_checks.assert_same_timestep(prepared.step(action), new.step(action), i)
        pids = prepared.worker_pids()
    finally:
        eval_envs.close()
    deadline = time.time() + 10
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)
