"""`mbxfer eval`: score a trial's checkpoint again, as the runner scored it or on another task.

    checkpoints(trial)            every checkpoint a trial folder keeps, in the order written
    choose(found, phases, ...)    the one to evaluate (default: the latest of the last phase)
    evaluate(trial, request)      its evaluation, written to TRIAL/evals/<name>.json
    summary_lines(result)         what the command prints

It is the runner's machinery, so the two cannot drift apart: the checkpoint's phase builds its
agent as `benchmarks.phase.Phase` does (`protocols.agent_config_for`), the state is read by
`trial_folder.load_agent_state`, and every evaluation set of the phase plays
`episodes.evaluate` on environments seeded by `episodes.evaluation_seed` at the checkpoint's
step count, in every mode. So with the defaults the final checkpoint plays the very episodes of
the trial's own final `eval.jsonl` lines and scores the same returns (tests/test_eval_command.py
checks this). Nothing but `TRIAL/evals/` is written; the trial's logs and checkpoints are
only read.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from mbxfer import agents
from mbxfer.benchmarks import checkpoint, episodes, protocols, video
from mbxfer.benchmarks import config as config_lib
from mbxfer.benchmarks import phase as phase_lib
from mbxfer.benchmarks.trial_folder import Resume, RunnerState, load_agent_state
from mbxfer.envs import registry, scoring, vector

EVALS = "evals"
VIDEO_FRAMES = 1000  # At most this many frames per video (one episode of environment 0).


class EvalError(config_lib.ConfigError):
    """A trial folder, checkpoint, phase or task `mbxfer eval` cannot use; names the fix."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder of a trial, as `mbxfer eval` lists and picks them."""

    folder: Path
    label: str
    """How it is named to the user: `phase0.ckpt`, `step-000000000240-phase0` or a path."""
    state: RunnerState
    total_env_steps: int
    """Environment steps of the whole trial when it was taken (the `step-<N>` of its name)."""

    def describe(self, phases: list) -> str:
        index = self.state.phase_index
        name = phases[index].name if index < len(phases) else self.state.phase
        end = ", phase end" if self.state.phase_done else ""
        return f"{self.label} (phase {name}, {self.total_env_steps:,} env steps{end})"


@dataclasses.dataclass(frozen=True)
class Request:
    """What `mbxfer eval` was asked; None means the runner's own choice."""

    checkpoint: Optional[str] = None
    """Trial environment steps (the N of `step-<N>`), a checkpoint name or a path."""
    phase: Optional[str] = None
    """A phase name or index: its latest checkpoint, or the one `checkpoint` names in it."""
    task: Optional[str] = None
    """Score this task instead of each evaluation set's own (same environment)."""
    episodes: Optional[int] = None
    modes: Optional[tuple] = None
    seed: Optional[int] = None
    """The episodes' seed; default `episodes.evaluation_seed` at the checkpoint, as the runner."""
    video: bool = False
    name: Optional[str] = None
    """The result's file name under TRIAL/evals/ (without .json)."""


def load_config(trial: Path) -> tuple[config_lib.TrialConfig, str]:
    """The trial's config and its id as written (a folder of either agent spelling)."""
    path = Path(trial) / "config.yaml"
    if not path.is_file():
        raise EvalError(
            f"{trial} is not a trial folder (no config.yaml): give a folder `mbxfer run --out` "
            "or `mbxfer sweep` wrote"
        )
    raw = yaml.safe_load(path.read_text()) or {}
    return config_lib.build(raw), config_lib.trial_id_of(raw)


def _read(folder: Path, label: str) -> Checkpoint:
    state = RunnerState.read(folder)
    step = json.loads((folder / "runner.json").read_text())["step"]
    return Checkpoint(folder, label, state, int(step))


def checkpoints(trial: Path) -> list[Checkpoint]:
    """The phase checkpoints (`phaseN.ckpt`) and the latest step checkpoints of `trial`, each
    saved point once (a phase's end is both: it is named by its `phaseN.ckpt`), in the order
    the runner wrote them."""
    trial = Path(trial)
    found: dict[tuple, Checkpoint] = {}
    folders = [(p, p.name) for p in sorted(trial.glob("phase*.ckpt"))]
    folders += [(p, p.name) for p in sorted((trial / "checkpoints").glob("step-*"))]
    for folder, label in folders:
        if not (folder / "runner.json").is_file():
            continue  # A folder being written, or a staging leftover.
        point = _read(folder, label)
        state = point.state
        found.setdefault((state.phase_index, point.total_env_steps, state.phase_done), point)
    return sorted(found.values(), key=_written_order)


def _written_order(point: Checkpoint) -> tuple:
    return (point.state.phase_index, point.total_env_steps, point.state.phase_done)


def _phase_index(phases: list, phase: str) -> int:
    names = [p.name for p in phases]
    if phase in names:
        return names.index(phase)
    if phase.isdigit() and int(phase) < len(phases):
        return int(phase)
    listing = ", ".join(f"{name} ({i})" for i, name in enumerate(names))
    raise EvalError(f"unknown phase {phase!r}; this trial's phases: {listing}")


def _listing(found: list[Checkpoint], phases: list) -> str:
    if not found:
        return "the trial has no checkpoint yet"
    return "available checkpoints:\n  " + "\n  ".join(c.describe(phases) for c in found)


def _by_path(trial: Path, text: str) -> Optional[Checkpoint]:
    """The checkpoint `text` names as a path or a folder name of the trial, if any."""
    for folder in (Path(text), trial / text, trial / f"{text}.ckpt", trial / "checkpoints" / text):
        if (folder / "runner.json").is_file():
            label = folder.name if folder.parent in (trial, trial / "checkpoints") else text
            return _read(folder, label)
    return None


def choose(trial: Path, found: list[Checkpoint], phases: list, request: Request) -> Checkpoint:
    """The checkpoint `request` names (see `Request`); errors list what there is."""
    if not found and request.checkpoint is None:
        raise EvalError(
            f"{trial} has no checkpoint yet (no phaseN.ckpt, nothing in checkpoints/): let the "
            f"trial run past its first checkpoint (train.checkpoint_every) or to its end"
        )
    index = None if request.phase is None else _phase_index(phases, request.phase)
    candidates = [c for c in found if index is None or c.state.phase_index == index]
    if request.checkpoint is None:
        if not candidates:
            where = f"phase {phases[index].name!r} has no checkpoint"
            raise EvalError(f"{where}; {_listing(found, phases)}")
        return candidates[-1]
    text = str(request.checkpoint)
    if text.isdigit():
        matches = [c for c in candidates if c.total_env_steps == int(text)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            names = ", ".join(c.describe(phases) for c in matches)
            raise EvalError(f"--checkpoint {text} matches {names}; add --phase NAME")
        where = f" in phase {phases[index].name!r}" if index is not None else ""
        raise EvalError(
            f"no checkpoint at {int(text):,} env steps{where}; {_listing(found, phases)}"
        )
    chosen = _by_path(Path(trial), text)
    if chosen is None:
        raise EvalError(
            f"--checkpoint {text}: neither env steps nor a checkpoint folder; "
            + _listing(found, phases)
        )
    if chosen.state.phase_index >= len(phases):
        raise EvalError(
            f"{chosen.folder} ends phase {chosen.state.phase_index}, but this trial's protocol "
            f"has {len(phases)} phases"
        )
    if index is not None and chosen.state.phase_index != index:
        raise EvalError(
            f"--checkpoint {text} belongs to phase {phases[chosen.state.phase_index].name!r}, "
            f"not --phase {request.phase}"
        )
    return chosen


def eval_sets(phase: protocols.Phase, task: Optional[str], tasks) -> dict:
    """The evaluation sets of `phase` (its task's `eval` set when it has none). With `task`,
    each scores `task` instead, keeping its environment keywords; sets that then coincide are
    played once, under the name of the one that already scored `task` (so its episodes are the
    trial's own), else `eval`, else the first."""
    sets = dict(phase.eval_sets) or {"eval": protocols.EvalSet(phase.task)}
    if task is None:
        return sets
    if task not in tasks:
        raise EvalError(f"unknown task {task!r}; this environment's tasks: {', '.join(tasks)}")
    groups: dict[str, list[str]] = {}
    for name, eval_set in sets.items():
        key = json.dumps(dict(eval_set.kwargs), sort_keys=True, default=repr)
        groups.setdefault(key, []).append(name)
    chosen = [
        min(names, key=lambda n: (sets[n].task != task, n != "eval", names.index(n)))
        for names in groups.values()
    ]
    return {name: protocols.EvalSet(task, sets[name].kwargs) for name in chosen}


def _modes(config, requested) -> tuple:
    modes = tuple(requested or config.train.eval_modes)
    unknown = [m for m in modes if m not in config_lib.EVAL_MODES]
    if unknown or not modes:
        raise EvalError(
            f"--modes {','.join(modes)}: each must be one of {', '.join(config_lib.EVAL_MODES)}"
        )
    return modes


class FrameRecorder:
    """A policy that passes through to `policy` and keeps the image observations environment
    0 of the batch sees until its first episode ends (at most `limit` frames)."""

    def __init__(self, policy, limit: int = VIDEO_FRAMES):
        self.policy, self.limit = policy, limit
        self.frames: list[np.ndarray] = []
        self.recording = True

    def initial_carry(self, num_envs: int) -> Any:
        return self.policy.initial_carry(num_envs)

    def __call__(self, timestep, carry):
        if self.recording:
            self.frames.append(np.asarray(timestep.observation["image"][0]))
            self.recording = timestep.step_type[0] != 2 and len(self.frames) < self.limit
        return self.policy(timestep, carry)


def _play(agent, act, state, config, recipe, mode: str, seed: int, count: int, video: bool):
    """One evaluation, the runner's own (`phase.evaluate`), with `count` episodes; the frames
    of environment 0 when `video`."""
    recorders = []

    def record(policy):
        recorders.append(FrameRecorder(policy))
        return recorders[-1]

    summary = phase_lib.evaluate(
        agent, act, state, config, seed, recipe, mode, count, record if video else None
    )
    return summary, (recorders[0].frames if recorders else None)


def default_name(chosen: Checkpoint, request: Request) -> str:
    """`phase1`, `step-000000000240-phase0`, ... plus what changes the episodes or the policy:
    `phase1_task-reach_top_left_episodes-8_seed-3_greedy`."""
    parts = [re.sub(r"\.ckpt$", "", chosen.folder.name)]
    if request.task is not None:
        parts.append(f"task-{request.task}")
    if request.episodes is not None:
        parts.append(f"episodes-{request.episodes}")
    if request.seed is not None:
        parts.append(f"seed-{request.seed}")
    if request.modes:
        parts.append("+".join(request.modes))
    return "_".join(parts)


class Restored(NamedTuple):
    """A trial's agent at one of its checkpoints, built as the runner built it."""

    config: config_lib.TrialConfig
    trial_id: str
    chosen: Checkpoint
    phase: protocols.Phase
    recipe: Any
    """The phase's environment (`phase.env_recipe`)."""
    tasks: tuple
    has_image: bool
    agent: Any
    state: Any
    act: Any
    """`jax.jit(agent.act, static_argnums=4)`."""


def restore(trial: Path, request: Request) -> Restored:
    """The agent of `trial` at the checkpoint `request` picks (default: the latest of the last
    phase), its phase's config and environment; the trial folder is only read."""
    trial = Path(trial)
    config, trial_id = load_config(trial)
    phases = protocols.phases(config)
    chosen = choose(trial, checkpoints(trial), phases, request)
    phase = phases[chosen.state.phase_index]
    agent_config = protocols.agent_config_for(
        protocols.with_module(config.agent_config, phases, config.protocol), phase, config.protocol
    )
    recipe = phase_lib.env_recipe(config, phase.task, phase.env_kwargs)
    with vector.make(recipe, 1, mode="inline", seed=config.seed) as envs:
        spec, tasks = vector.environment_spec(envs), tuple(envs.tasks)
        has_image = "image" in envs.observation_spec()
    agent = agents.make(config.agent, spec, agent_config)
    fresh = agent.init(jax.random.PRNGKey(0))  # Only its structure: the checkpoint fills it.
    resume = Resume(chosen.folder, chosen.state, False)
    state = jax.tree_util.tree_map(jnp.asarray, load_agent_state(resume, fresh))
    act = jax.jit(agent.act, static_argnums=4)
    return Restored(config, trial_id, chosen, phase, recipe, tasks, has_image, agent, state, act)


def evaluate(trial: Path, request: Request, command: Optional[str] = None) -> dict:
    """Evaluate the checkpoint of `trial` that `request` picks; the result, also written to
    `TRIAL/evals/<name>.json` (its path under `path`)."""
    trial = Path(trial)
    modes = _modes(load_config(trial)[0], request.modes)  # Before the agent is built.
    restored = restore(trial, request)
    config, trial_id, chosen, phase = (
        restored.config, restored.trial_id, restored.chosen, restored.phase
    )  # fmt: skip
    agent, state, act = restored.agent, restored.state, restored.act
    index = chosen.state.phase_index
    name = request.name or default_name(chosen, request)
    if not name or "/" in name or name.startswith("."):
        raise EvalError(f"--name {name!r}: give a plain file name (no '/', not hidden)")
    if request.video and not restored.has_image:
        raise EvalError(
            f"--video records the image observation, and {config.env.name} with this trial's "
            "keywords has none (e.g. the toy grids need env.kwargs observation: image or both)"
        )
    sets = eval_sets(phase, request.task, restored.tasks)

    out = trial / EVALS
    results, videos = {}, {}
    for set_name, eval_set in sets.items():
        set_recipe = phase_lib.env_recipe(config, eval_set.task, phase.env_kwargs, eval_set.kwargs)
        count = phase_lib.eval_batch_size(config, set_recipe, request.episodes)[0]
        seed = request.seed
        if seed is None:
            seed = episodes.evaluation_seed(
                config.seed, set_name, eval_set.task, chosen.state.env_steps
            )
        by_mode = {}
        for mode in modes:
            summary, frames = _play(
                agent, act, state, config, set_recipe, mode, seed, count, request.video
            )
            by_mode[mode] = summary
            if frames:
                path = out / f"{name}-{set_name}-{mode}.gif"
                video.write_gif(frames, path)
                videos[f"{set_name}/{mode}"] = path.name
        results[set_name] = {
            "task": eval_set.task,
            "kwargs": dict(eval_set.kwargs),
            "seed": seed,
            "episodes": count,
            "modes": by_mode,
        }
    result = {
        "command": command,
        "trial": str(trial),
        "trial_id": trial_id,
        "agent": config.agent,
        "env": config.env.name,
        "checkpoint": chosen.label,
        "phase": phase.name,
        "phase_index": index,
        "phase_done": chosen.state.phase_done,
        "env_steps": chosen.state.env_steps,
        "total_env_steps": chosen.total_env_steps,
        "score_key": registry.score_key(config.env.name),
        "sets": results,
    }
    if videos:
        result["videos"] = videos
    path = out / f"{name}.json"
    checkpoint.write_atomic(path, (json.dumps(result, indent=2) + "\n").encode())
    return {**result, "path": str(path)}


def summary_lines(result: dict) -> list[str]:
    """A few lines: the checkpoint, then per evaluation set and mode the mean return and the
    environment's score (`envs.scoring`) where it is not the return."""
    key = result["score_key"]
    lines = [
        f"trial {result['trial_id']} ({result['agent']} on {result['env']}), checkpoint "
        f"{result['checkpoint']}: phase {result['phase']}, {result['env_steps']:,} env steps "
        f"into it ({result['total_env_steps']:,} in all)"
    ]
    for set_name, entry in result["sets"].items():
        lines.append(
            f"  eval set {set_name}: task {entry['task']}, {entry['episodes']} episodes, "
            f"seed {entry['seed']}"
        )
        for mode, summary in entry["modes"].items():
            text = f"    {mode:8s} return_mean {summary.get('return_mean', float('nan')):.3f}"
            if key != scoring.DEFAULT_KEY and key in summary:
                text += f"  {key} {summary[key]:.3f}"
            lines.append(text)
    for gif in result.get("videos", {}).values():
        lines.append(f"  video: {Path(result['path']).parent / gif}")
    lines.append(f"wrote {result['path']}")
    return lines
