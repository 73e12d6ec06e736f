"""`mbxfer eval`: a real tiny trial's checkpoints, evaluated again, score its own eval lines."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import tiny_configs
from PIL import Image, ImageSequence

from mbxfer.benchmarks import cli, runner
from mbxfer.benchmarks import config as config_lib

# Two phases (pretrain on one task, finetune on another), each evaluated on both tasks every
# 40 steps, with a step checkpoint every 40: PPO learns from its first rollout, so each
# checkpoint holds other parameters.
TRANSFER = tiny_configs.overrides(
    "ppo",
    "agent.rollout_length=8",
    "agent.hidden=32",
    "agent.minibatches=1",
    "agent.epochs=1",
    "train.steps=80",
    "train.eval_episodes=4",
    "protocol.name=task_transfer",
    "protocol.pretrain_task=reach_top_left",
    "protocol.pretrain_steps=80",
)
COMPARED = ("episodes", "return_mean", "length_mean", "start_digest")


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trial")
    config = config_lib.build(config_lib.parse_overrides(TRANSFER))
    runner.run(config, folder, progress=False)
    return folder


def _eval_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]


def _runner_line(folder, total_env_steps, eval_set, mode):
    (line,) = [
        r
        for r in _eval_lines(folder)
        if (r["total_env_steps"], r["eval_set"], r["mode"]) == (total_env_steps, eval_set, mode)
        and (r["env_steps"] > 0 or r["phase_index"] == 0)  # Not the next phase's jumpstart.
    ]
    return {key: line[key] for key in COMPARED}


def _eval(capsys, *argv):
    code = cli.main(["eval", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] != "evals"
    }


def test_checkpoints_score_the_trials_own_evaluations(trial, capsys):
    before = _snapshot(trial)
    code, out, _ = _eval(capsys, trial)
    assert code == 0
    result = json.loads((trial / "evals" / "phase1.json").read_text())
    assert (result["checkpoint"], result["phase"], result["total_env_steps"]) == (
        "phase1.ckpt",
        "finetune",
        160,
    )
    assert set(result["sets"]) == {"source", "eval"}
    for eval_set, entry in result["sets"].items():
        for mode in ("sampled", "greedy"):
            summary = {key: entry["modes"][mode][key] for key in COMPARED}
            assert summary == _runner_line(trial, 160, eval_set, mode), (eval_set, mode)
    assert "checkpoint phase1.ckpt: phase finetune" in out and "return_mean" in out

    # The pretraining phase's end, and a checkpoint inside the finetuning phase.
    assert _eval(capsys, trial, "--phase", "pretrain")[0] == 0
    pretrain = json.loads((trial / "evals" / "phase0.json").read_text())
    assert pretrain["total_env_steps"] == 80
    summary = pretrain["sets"]["source"]["modes"]["sampled"]
    assert {key: summary[key] for key in COMPARED} == _runner_line(trial, 80, "source", "sampled")
    assert _eval(capsys, trial, "--checkpoint", 120, "--modes", "greedy")[0] == 0
    middle = json.loads((trial / "evals" / "step-000000000120-phase1_greedy.json").read_text())
    assert list(middle["sets"]["eval"]["modes"]) == ["greedy"]
    summary = middle["sets"]["eval"]["modes"]["greedy"]
    assert {key: summary[key] for key in COMPARED} == _runner_line(trial, 120, "eval", "greedy")
    assert _snapshot(trial) == before  # Only evals/ was written.


def test_another_task_and_other_episodes(trial, capsys):
    # The finetuned agent on its pretraining task: the trial's own `source` evaluation.
    assert _eval(capsys, trial, "--task", "reach_top_left")[0] == 0
    result = json.loads((trial / "evals" / "phase1_task-reach_top_left.json").read_text())
    assert list(result["sets"]) == ["source"]
    summary = result["sets"]["source"]["modes"]["sampled"]
    assert {key: summary[key] for key in COMPARED} == _runner_line(trial, 160, "source", "sampled")
    # A task no evaluation set scored, with more episodes and another seed.
    argv = (trial, "--task", "reach_bottom_right", "--episodes", 6, "--seed", 3, "--name", "x")
    assert _eval(capsys, *argv)[0] == 0
    result = json.loads((trial / "evals" / "x.json").read_text())
    (entry,) = result["sets"].values()
    assert (entry["task"], entry["seed"], entry["episodes"]) == ("reach_bottom_right", 3, 6)
    assert [m["episodes"] for m in entry["modes"].values()] == [6, 6]


def test_bad_input_is_named_with_what_there_is(trial, tmp_path, capsys):
    code, _, err = _eval(capsys, tmp_path)
    assert code == 2 and "not a trial folder (no config.yaml)" in err
    shutil.copy(trial / "config.yaml", tmp_path / "config.yaml")
    code, _, err = _eval(capsys, tmp_path)
    assert code == 2 and "has no checkpoint yet" in err

    code, _, err = _eval(capsys, trial, "--phase", "warmup")
    assert (
        code == 2
        and "unknown phase 'warmup'; this trial's phases: pretrain (0), finetune (1)" in err
    )
    code, _, err = _eval(capsys, trial, "--checkpoint", 100)
    assert code == 2 and "no checkpoint at 100 env steps" in err
    assert "phase0.ckpt (phase pretrain, 80 env steps, phase end)" in err
    assert "phase1.ckpt (phase finetune, 160 env steps, phase end)" in err
    code, _, err = _eval(capsys, trial, "--checkpoint", "phase7.ckpt")
    assert code == 2 and "neither env steps nor a checkpoint folder" in err
    code, _, err = _eval(capsys, trial, "--checkpoint", "phase0.ckpt", "--phase", "finetune")
    assert code == 2 and "belongs to phase 'pretrain', not --phase finetune" in err
    code, _, err = _eval(capsys, trial, "--task", "reach_middle")
    assert code == 2 and "unknown task 'reach_middle'; this environment's tasks: " in err
    assert "collect_items" in err
    code, _, err = _eval(capsys, trial, "--video")
    assert code == 2 and "--video records the image observation" in err


def test_video_of_an_image_environment(tmp_path, capsys):
    overrides = tiny_configs.overrides(
        "random", "train.steps=40", "env.kwargs={observation: image, size: 5, image_size: 16}"
    )
    runner.run(config_lib.build(config_lib.parse_overrides(overrides)), tmp_path, progress=False)
    assert _eval(capsys, tmp_path, "--video", "--modes", "sampled")[0] == 0
    result = json.loads((tmp_path / "evals" / "phase0_sampled.json").read_text())
    assert result["videos"] == {"eval/sampled": "phase0_sampled-eval-sampled.gif"}
    gif = Image.open(tmp_path / "evals" / "phase0_sampled-eval-sampled.gif")
    durations = [frame.info["duration"] for frame in ImageSequence.Iterator(gif)]
    # Environment 0's first episode: 50 steps on the grid, 100 ms each (repeated frames are
    # merged into longer ones), scaled 8x.
    assert sum(durations) == 50 * 100 and len(durations) > 1 and gif.size == (128, 128)
    # Recording does not change the evaluation.
    assert _eval(capsys, tmp_path, "--modes", "sampled", "--name", "plain")[0] == 0
    plain = json.loads((tmp_path / "evals" / "plain.json").read_text())
    assert plain["sets"] == result["sets"]


class _AlwaysRight:
    """An agent that always moves right (action 4), whatever it sees."""

    def initial_carry(self, num_envs):
        return None

    @staticmethod
    def act(state, carry, step, key, mode):
        return np.full(len(step.is_first), 4), carry


def test_grid_policy_plays_out_every_start_cell(trial, capsys):
    """`validation.grid_policy` on the trial's own agent prints its maps; with an agent that
    always moves right on the bottom-right task it finds the returns that policy must score:
    from the bottom row it reaches the corner and stays (the noop step that observes the start
    cell leaves 49 of the 50 steps), from any other row it ends at the right wall with 0."""
    from mbxfer.benchmarks import evaluate_trial, phase
    from mbxfer.benchmarks.validation import grid_policy

    assert grid_policy.main([str(trial), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "greedy return per start cell" in out and "sampled return per start cell" in out

    restored = evaluate_trial.restore(trial, evaluate_trial.Request())
    always_right = _AlwaysRight()
    restored = restored._replace(
        agent=always_right,
        act=always_right.act,
        recipe=phase.env_recipe(restored.config, "reach_bottom_right"),
    )
    found = grid_policy.start_cell_returns(restored, samples=3)
    expected = np.zeros((5, 5))
    expected[4] = [46, 47, 48, 49, 49]
    np.testing.assert_array_equal(found["greedy_return"], expected)
    np.testing.assert_array_equal(found["sampled_return"], expected)
    assert (found["first_action"] == 4).all()
    assert [tuple(c) for c in found["greedy_last_cell"][:, 0]] == [(r, 4) for r in range(5)]
    assert "(0, 0) -> (0, 4)" not in grid_policy.render(found)  # Greedy equals sampled here.


def _oracle_model(size, imagine_moves: bool):
    """A stand-in world model whose latent is the one-hot of the agent's cell: its decoder
    reads the cell back, and its dynamics either move it as the grid does or keep it."""
    from types import SimpleNamespace

    import jax.numpy as jnp

    from mbxfer.envs import toy

    moves = jnp.asarray(toy._MOVES)

    def imagine(params, state, action, key):
        if not imagine_moves:
            return state
        cell = jnp.argmax(state, -1)
        row, column = cell // size + moves[action, 0], cell % size + moves[action, 1]
        cell = jnp.clip(row, 0, size - 1) * size + jnp.clip(column, 0, size - 1)
        return jax.nn.one_hot(cell, size * size)

    return SimpleNamespace(
        decode=lambda params, features: {"vector": features},
        features=lambda state: state,
        imagine=imagine,
    )


def test_grid_imagination_counts_latents_that_decode_the_true_cell():
    """`validation.grid_imagination.knows_the_cell` on a known path (right, right, down, down,
    noop from (0, 0), (2, 2) rewarded): a model whose latents are the true cells and whose
    dynamics are the grid's scores 1 at every horizon; one whose dynamics never move scores
    the share of k-step windows that end where they started, off the rewarded cells."""
    from mbxfer.benchmarks.validation import grid_imagination

    size = 5
    path = [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 2)]
    actions = [4, 4, 2, 2, 0, 0]  # the last one is never imagined from
    cells = np.array([[r * size + c] for r, c in path])  # [T, 1]
    rewarded = cells == 2 * size + 2
    played = {
        "cell": cells,
        "rewarded": rewarded,
        "action": np.array(actions)[:, None],
        "posterior": jax.nn.one_hot(cells, size * size),
        "params": None,
        "size": size,
    }
    moving = grid_imagination.knows_the_cell(
        {**played, "model": _oracle_model(size, True)}, horizons=(1, 2, 3)
    )
    assert moving == {0: (1.0, 4), 1: (1.0, 3), 2: (1.0, 2), 3: (1.0, 1)}
    frozen = grid_imagination.knows_the_cell(
        {**played, "model": _oracle_model(size, False)}, horizons=(1, 2)
    )
    # Off the rewarded cells no step stays put, so a model that never moves never knows.
    assert frozen == {0: (1.0, 4), 1: (0.0, 3), 2: (0.0, 2)}


def test_grid_imagination_refuses_an_agent_without_a_decoder(trial):
    from mbxfer.benchmarks.validation import grid_imagination

    with pytest.raises(SystemExit, match="ppo"):
        grid_imagination.main([str(trial), "--episodes", "2"])


def test_grid_imagination_plays_a_dreamer_trial_beside_its_model(tmp_path, capsys):
    """On a tiny Dreamer trial: the agent plays whole 50-step episodes while the model filters
    them, and every step is counted once, on or off the rewarded cells."""
    from mbxfer.benchmarks import evaluate_trial
    from mbxfer.benchmarks.validation import grid_imagination

    overrides = tiny_configs.overrides(
        "dreamer", "env.task=reach_bottom_right", "agent.model.latent=deterministic",
        "train.steps=60",
    )  # fmt: skip
    runner.run(config_lib.build(config_lib.parse_overrides(overrides)), tmp_path, progress=False)
    assert grid_imagination.main([str(tmp_path), "--episodes", "2"]) == 0
    assert "imagined 5 steps ahead" in capsys.readouterr().out

    played = grid_imagination.play(evaluate_trial.restore(tmp_path, evaluate_trial.Request()), 2)
    assert played["cell"].shape == played["rewarded"].shape == (50, 2)
    found = grid_imagination.knows_the_cell(played, horizons=(1,))
    assert found[0][1] == 100 - played["rewarded"].sum()
    assert found[1][1] == 98 - played["rewarded"][1:].sum()
    assert all(0.0 <= share <= 1.0 for share, _ in found.values())
