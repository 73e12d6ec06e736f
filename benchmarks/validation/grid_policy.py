"""Where a grid trial's agent scores, start cell by start cell, greedy and sampled.

    python -m mbxfer.benchmarks.validation.grid_policy results/quickstart/<trial> [--samples 16]

The checkpoint is the one `mbxfer eval` picks by default (the latest of the last phase), restored
as the runner built it (`evaluate_trial.restore`). For each cell the grid is put there through
its state (`get_state`/`set_state`) and one noop step observes it; from that observation, as
an episode's first, the agent plays out the episode once in its greedy mode and `--samples`
times in its sampled mode, through its own `act`, so any agent can be read. Printed: the
greedy first action per cell, the greedy and the mean sampled return per start cell, and the
start cells whose greedy episode scores under half the sampled one, with the cell it ended in:
a policy that samples its way to the goal can still point its greedy action into a wall on the
way, and stay there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from mbxfer.agents.base import ActInput
from mbxfer.benchmarks import evaluate_trial
from mbxfer.envs import base as env_base
from mbxfer.envs import toy

ARROWS = "·^v<>"  # The grid's actions: noop, up, down, left, right (`envs.toy._MOVES`).


def cell_observation(env, cell: tuple[int, int]) -> dict:
    """The agent's observation (through the trial's wrappers, e.g. the task's reward) with the
    grid's agent at `cell`, after a noop step there."""
    env.reset()
    grid = env.unwrapped
    state = grid.get_state()
    state["_position"] = np.array(cell, state["_position"].dtype)
    grid.set_state(state)
    return env_base.agent_observation(env.step(0).observation)


def grid_envs(restored: evaluate_trial.Restored, seeds, command: str) -> list:
    """The trial's environment built once per seed in `seeds`; `command` names the caller in
    the error for a trial that is not on the grid."""
    envs = [restored.recipe(seed=seed) for seed in seeds]
    if not isinstance(getattr(envs[0], "unwrapped", None), toy.GridWorld):
        raise SystemExit(f"{command} reads grid trials; this one is {restored.config.env.name}")
    return envs


def stacked(observations) -> dict:
    """Agent observations (dicts, `log_*` keys dropped) stacked key by key into a batch."""
    observations = [env_base.agent_observation(o) for o in observations]
    return {name: np.stack([o[name] for o in observations]) for name in observations[0]}


def start_cell_returns(restored: evaluate_trial.Restored, samples: int, seed: int = 0) -> dict:
    """For every start cell: the greedy episode's first action, return and last cell, and the
    mean return of `samples` sampled episodes (all from that cell, the agent's own `act`)."""
    envs = grid_envs(restored, [seed] * max(samples, 1), "grid_policy")
    size = envs[0].unwrapped.size
    found = {
        "first_action": np.zeros((size, size), np.int64),
        "greedy_return": np.zeros((size, size)),
        "greedy_last_cell": np.zeros((size, size, 2), np.int64),
        "sampled_return": np.zeros((size, size)),
    }
    key = jax.random.PRNGKey(seed)
    for cell in np.ndindex(size, size):
        for mode, count in (("eval", 1), ("explore", samples)):
            batch = [cell_observation(env, cell) for env in envs[:count]]
            observation = stacked(batch)
            carry, first = restored.agent.initial_carry(count), np.ones(count, bool)
            returns, done = np.zeros(count), np.zeros(count, bool)
            while not done.all():
                key, act_key = jax.random.split(key)
                step = ActInput(observation, first)
                action, carry = restored.act(restored.state, carry, step, act_key, mode)
                action = np.asarray(action)
                if mode == "eval" and first[0]:
                    found["first_action"][cell] = int(action[0])
                timesteps = [env.step(int(a)) for env, a in zip(envs[:count], action)]
                returns += np.where(done, 0.0, [t.reward or 0.0 for t in timesteps])
                done |= np.array([t.last() for t in timesteps])
                observation = stacked([t.observation for t in timesteps])
                first = np.zeros(count, bool)
            if mode == "eval":
                found["greedy_return"][cell] = returns[0]
                found["greedy_last_cell"][cell] = envs[0].unwrapped.visited_cell()
            else:
                found["sampled_return"][cell] = returns.mean()
    return found


def render(found: dict) -> str:
    """The maps (row 0 at the top): greedy first action, greedy return, sampled mean return,
    and the start cells whose greedy episode ends away from where it scores."""
    lines = ["greedy first action per start cell (· is noop):"]
    lines += ["  " + " ".join(ARROWS[a] for a in row) for row in found["first_action"]]
    for name in ("greedy_return", "sampled_return"):
        lines.append(f"{name.replace('_', ' ')} per start cell (mean {found[name].mean():.1f}):")
        lines += ["  " + " ".join(f"{v:5.1f}" for v in row) for row in found[name]]
    stuck = [
        f"{cell} -> {tuple(int(x) for x in found['greedy_last_cell'][cell])}"
        for cell in np.ndindex(found["greedy_return"].shape)
        if found["greedy_return"][cell] < 0.5 * found["sampled_return"][cell]
    ]
    lines.append(
        "greedy below half of sampled (start -> last cell): " + (", ".join(stuck) or "none")
    )
    return "\n".join(lines)


def restore_from_arguments(argv, doc: str, count: tuple[str, int, str]):
    """`(restored, args)` of a grid-reading command: the trial folder, one count option
    `(flag, default, help)` and `--seed` parsed from `argv`, the trial restored at the
    checkpoint `mbxfer eval` picks by default, and a header line printed."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("trial", type=Path, help="a grid trial's folder")
    flag, default, help_text = count
    parser.add_argument(flag, type=int, default=default, help=help_text)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    restored = evaluate_trial.restore(args.trial, evaluate_trial.Request())
    print(f"{restored.config.agent} trial {restored.trial_id}, checkpoint {restored.chosen.label}")
    return restored, args


def main(argv=None) -> int:
    count = ("--samples", 16, "sampled episodes per cell")
    restored, args = restore_from_arguments(argv, __doc__, count)
    print(render(start_cell_returns(restored, args.samples, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
