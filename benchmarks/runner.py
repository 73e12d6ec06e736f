"""One trial, phase after phase: build, carry over, adapt, run the loop, summarize.

    run(config, out)    train (or resume) the trial in folder `out`; its final summary

Each phase (benchmarks/protocols.py) builds its environments and agent, starts from the
previous phase's state as the phase's `carry` says (or from a checkpoint), fits the reward
head offline when the protocol asks, evaluates its starting point, runs THE loop
(benchmarks/loop.py) with this module's hooks writing the trial folder
(benchmarks/trial_folder.py), and ends with a phase checkpoint. The trial ends with
`done.json`: the phases' summaries, the generalization gap, transfer against the matching
scratch trial and the world-model video.

Resume is exact: a killed trial resumed from a checkpoint ends with the same parameters and
metrics as an uninterrupted run (tests/test_runner.py kills one for real). The price is that
every checkpoint also restarts the training environments from seeds derived from the step
count, in both runs, because simulators such as Crafter or MuJoCo cannot be saved mid-episode.
Episodes cut this way are not reported as episodes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

import agents
from agents.replay import Replay
from benchmarks import config as config_lib
from benchmarks import episodes, loop, protocols, schedule, transfer, video
from benchmarks.trial_folder import (
    IncompatibleTrialError,
    PhaseLog,
    Resume,
    TrialFolder,
    load_agent_state,
)
from envs import registry, scoring, vector

__all__ = ["IncompatibleTrialError", "run", "evaluate", "make_envs"]


def enable_compilation_cache() -> None:
    """Share compiled XLA programs between trials through an on-disk cache.

    A sweep compiles the same agent for every seed (and every phase); with the cache only the
    first compile is paid. The directory is `JAX_COMPILATION_CACHE_DIR` when set, else
    `~/.cache/mbxfer/jax`. A cache left by another jax version is ignored by jax itself.
    """
    if jax.config.jax_compilation_cache_dir:
        return
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "mbxfer", "jax"
    )
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def env_recipe(config: config_lib.TrialConfig, task, *kwargs) -> registry.EnvFactory:
    """The trial's environment with `task`, its keywords updated by each of `kwargs`."""
    merged = dict(config.env.kwargs)
    for more in kwargs:
        merged.update(more)
    return registry.factory(config.env.name, task=task, **merged)


def make_envs(config: config_lib.TrialConfig, num_envs: int, seed: int, recipe=None):
    """A batch of the trial's environments (of `recipe`, by default the trial's env and task)."""
    if recipe is None:
        recipe = env_recipe(config, config.env.task)
    mode = "process" if config.env.workers else "inline"
    return vector.make(recipe, num_envs, mode=mode, seed=seed)


def evaluate(agent, act, state, config, seed: int, recipe=None, mode: str = "sampled") -> dict:
    """Evaluation episodes (`train.eval_episodes`, else the environment's default) on fresh
    environments seeded with `seed`, the agent acting in evaluation `mode` (`sampled` or
    `greedy`, `config_lib.EVAL_MODES`); see `episodes.evaluate`."""
    recipe = recipe if recipe is not None else env_recipe(config, config.env.task)
    count = config.train.eval_episodes or recipe.entry.eval_episodes
    policy = episodes.AgentPolicy(agent, act, state, config_lib.EVAL_MODES[mode], seed)
    with make_envs(config, min(count, config.env.num_envs), seed, recipe) as envs:
        return episodes.evaluate(envs, recipe, policy, count)


def run(
    config: config_lib.TrialConfig,
    out: Path,
    progress: bool = True,
    stop_after: Optional[int] = None,
    on_step: Optional[Callable[[int], None]] = None,
    start_from: Optional[Path] = None,
) -> dict:
    """Train (or resume) one trial in `out`, phase after phase; returns the final summary.

    `stop_after` ends the call early after that many environment steps in all (without
    writing `done.json`), as a kill would; `on_step` is called with the total step count each
    iteration. `start_from` is a phase-boundary checkpoint (`<trial>/phase0.ckpt`) of a trial
    whose earlier phases are this trial's: the trial starts at the next phase from it instead
    of re-running them.
    """
    phases = protocols.phases(config)  # Protocol errors before anything is written.
    enable_compilation_cache()
    folder = TrialFolder.open(Path(out), config)
    done = folder.done()
    if done is not None:
        return done
    resume = folder.resume_point(start_from, config, phases)
    watch = _Watch(progress, stop_after, on_step)
    with contextlib.ExitStack() as stack:
        folder.open_logs(resume)
        stack.callback(folder.close)
        return _Trial(config, phases, folder, watch, stack).run(resume)


class _Watch(NamedTuple):
    """What the caller watches the trial with: a progress bar, a stop, a step callback."""

    progress: bool
    stop_after: Optional[int]
    on_step: Optional[Callable[[int], None]]


class _Trial:
    """The phases of one trial and what they share: the folder and the phase summaries."""

    def __init__(self, config, phases, folder: TrialFolder, watch: _Watch, stack):
        self.config, self.phases, self.folder, self.watch = config, phases, folder, watch
        self.stack = stack
        self.agent_config = protocols.with_module(config.agent_config, phases, config.protocol)
        self.history: dict = {"phases": []}

    def run(self, resume: Optional[Resume]) -> dict:
        start = 0
        if resume is not None:
            self.history = {"phases": resume.state.history.get("phases", [])}
            source = str(resume.folder) if resume.other_trial else resume.state.history.get("from")
            if source is not None:
                self.history["from"] = source
            start = resume.state.next_phase
        carried = None
        for index in range(start, len(self.phases)):
            phase = _Phase(self, index)
            carried = phase.run(carried, resume if index == start else None)
            if carried is None:
                return {"stopped_at": phase.stopped_at}
        return self._finish(*carried)

    def steps_before(self, index: int) -> int:
        return sum(p["env_steps"] for p in self.history["phases"][:index])

    def _finish(self, state, replay, phase: "_Phase") -> dict:
        config = self.config
        summaries = self.history["phases"]
        summary = {
            "env_steps": sum(p["env_steps"] for p in summaries),
            "updates": sum(p["updates"] for p in summaries),
            "episodes": sum(p["episodes"] for p in summaries),
            "trial_id": config.trial_id(),
            "protocol": config.protocol.name,
            "phases": summaries,
        }
        if "from" in self.history:
            summary["from"] = self.history["from"]
        last = summaries[-1]["final_eval"] if summaries else {}
        if last:
            summary["final_eval"] = last.get("eval", next(iter(last.values())))
        score_key = scoring.score_key(config.env.name)
        gap = transfer.generalization_gap(last, score_key)
        if gap is not None:
            summary["generalization_gap"] = gap
        if config.protocol.name != "scratch":
            last_phase = len(self.phases) - 1
            summary["transfer"] = transfer.against_scratch(
                self.folder.out, config, self.phases[last_phase].name, last_phase,
                self.folder.read("eval"), score_key,
            )  # fmt: skip
        video = phase.video(state, replay)
        if video is not None:
            summary["video"] = video
        self.folder.write_done(summary)
        return summary


class _Phase:
    """One phase of a trial; also the loop's hooks, which write the trial folder."""

    def __init__(self, trial: _Trial, index: int):
        self.trial, self.index, self.phase = trial, index, trial.phases[index]
        self.config, self.folder = trial.config, trial.folder
        self.log_to = PhaseLog(trial.folder, self.phase.name, index, trial.steps_before(index))
        self.seed = trial.config.seed + 100_003 * index
        num_envs = self.config.env.num_envs
        self.recipe = env_recipe(self.config, self.phase.task, self.phase.env_kwargs)
        self.envs = make_envs(self.config, num_envs, self.seed, self.recipe)
        trial.stack.callback(self.envs.close)  # Also closed at the end of the phase.
        agent_config = protocols.agent_config_for(
            trial.agent_config, self.phase, self.config.protocol
        )
        spec = vector.environment_spec(self.envs)
        self.agent = agents.make(self.config.agent, spec, agent_config)
        self.act = jax.jit(self.agent.act, static_argnums=4)
        self.task_index = None
        if self.phase.keep_replay and self.phase.task is not None:
            self.task_index = list(self.envs.tasks).index(self.phase.task)
        self.final_evals: dict = {}
        self.bar = None
        self.stopped_at: Optional[int] = None

    # -- the phase ----------------------------------------------------------------------
    def run(self, carried, resume: Optional[Resume]):
        """Run the phase from `carried` (the previous phase's state and replay) or `resume`;
        `(state, replay, self)` at its end, None when stopped early."""
        state = self._start(carried, resume)
        if self.phase.offline_updates and state.env_steps == 0:
            state = self._adapt(state)
        train = self.config.train
        if (
            state.env_steps == 0
            and self.phase.eval_sets
            and (train.eval_every or not self.phase.steps)
        ):
            self.evaluate(state)  # The phase's starting point (jumpstart).
        learner = loop.Learner(
            self.act, jax.jit(self.agent.update), self.agent.initial_carry, self._sample
        )
        self._open_bar(state.env_steps)
        state, finished = loop.run(self.envs, self.replay, learner, state, self._plan(), self)
        if self.bar is not None:
            self.bar.close()
        if not finished:
            return None
        self._end(state)
        return state.agent, self.replay, self

    def _plan(self) -> loop.Plan:
        train, phase = self.config.train, self.phase
        evaluate = schedule.Every(0)
        if train.eval_every and phase.eval_sets:
            evaluate = schedule.Every(train.eval_every, at_end=True)
        return loop.Plan(
            steps=phase.steps,
            seed=self.seed,
            updates=schedule.updates_for(self.agent, train, self.config.env.num_envs),
            log=schedule.Every(train.log_every, at_end=True),
            evaluate=evaluate,
            checkpoint=schedule.Every(train.checkpoint_every),
        )

    def _new_replay(self) -> Replay:
        train, num_envs = self.config.train, self.config.env.num_envs
        capacity = train.replay_capacity
        if self.agent.learns and self.agent.rollout_length:
            # On-policy agents only read the newest rollout: hold just that.
            capacity = max(self.agent.rollout_length + 1, train.sequence_length) * num_envs
        return Replay(
            capacity,
            num_envs,
            train.sequence_length,
            self.envs.observation_spec(),
            self.envs.action_spec(),
            seed=self.seed,
        )

    def _start(self, carried, resume: Optional[Resume]) -> loop.LoopState:
        """The phase's starting loop state (and `self.replay`): a fresh agent, the carried
        parts of the previous phase's, or a checkpoint's."""
        init_key, loop_key = self._keys()
        fresh = self.agent.init(init_key)
        agent_state, replay = fresh, None
        if carried is not None:
            previous_state, previous_replay, _ = carried
            agent_state = protocols.carry_over(
                self.phase.carry, previous_state, fresh, self.agent.part_of
            )
            if self.phase.keep_replay:
                replay = previous_replay
        self.replay = replay if replay is not None else self._new_replay()
        state = loop.LoopState(agent_state, loop_key, episodes.Coverage())
        if resume is None:
            return state
        agent_state = jax.tree_util.tree_map(jnp.asarray, load_agent_state(resume, fresh))
        if (resume.folder / "replay.npz").exists():
            self.replay.load(resume.folder / "replay.npz")
        saved = resume.state
        if saved.phase_done:
            # A phase boundary: this phase starts from the previous phase's final state.
            agent_state = protocols.carry_over(
                self.phase.carry, agent_state, fresh, self.agent.part_of
            )
            if not self.phase.keep_replay:
                self.replay = self._new_replay()
            return state._replace(agent=agent_state)
        return loop.LoopState(
            agent_state,
            jnp.asarray(saved.rng, jnp.uint32),
            episodes.Coverage(**saved.coverage),
            saved.env_steps,
            saved.updates,
            saved.episodes,
        )

    def _keys(self):
        root = jax.random.PRNGKey(self.config.seed)
        return jax.random.split(root if self.index == 0 else jax.random.fold_in(root, self.index))

    def _summarize(self, records: list) -> dict:
        return scoring.summarize(records, self.recipe)

    def _sample(self) -> dict:
        batch = self.replay.sample(self.config.train.batch_size)
        return protocols.relabel(batch, self.task_index) if self.phase.keep_replay else batch

    def _adapt(self, state: loop.LoopState) -> loop.LoopState:
        """Offline adaptation (zero-shot): the reward head learns the new task from the kept
        replay, and the policy from it, before any environment step of this phase."""
        phase = self.phase
        if self.agent.adapt is None:
            raise protocols.ProtocolError(
                f"phase {phase.name!r} adapts offline, but agent {self.config.agent!r} has no "
                "world model whose reward head could be fitted"
            )
        if not self.replay.num_windows:
            raise protocols.ProtocolError(
                f"phase {phase.name!r} adapts offline but the replay holds no sequences "
                "(set keep_replay and run a phase before it)"
            )
        adapt = jax.jit(self.agent.adapt)
        state, metrics = loop.offline(adapt, self._sample, state, phase.offline_updates)
        stacked = jax.device_get(metrics)
        record = {"offline_updates": phase.offline_updates}
        for key in stacked[-1]:
            record[f"train/{key}"] = float(np.mean([m[key] for m in stacked]))
        self.log_to.metrics(0, record)
        return state

    def _end(self, state: loop.LoopState) -> None:
        """The phase's summary into the trial's history, and its checkpoint."""
        records = self.log_to.episodes()
        summary = {
            "name": self.phase.name,
            "index": self.index,
            "env_steps": state.env_steps,
            "updates": state.updates,
            "episodes": state.episodes,
            **state.coverage.metrics(),
            "final_eval": self.final_evals,
            # Reward-free phases: how much the exploration achieved (e.g. the Crafter score).
            "training_episodes": scoring.summarize(records, self.recipe, self.envs.tasks),
        }
        history = self.trial.history
        history["phases"] = history["phases"][: self.index] + [summary]
        saved = self.log_to.save(state, self.replay, history, phase_done=True)
        self.folder.mark_phase(saved, self.index)
        self.image_env = "image" in self.envs.observation_spec()
        self.envs.close()

    def video(self, agent_state, replay) -> Optional[dict]:
        """The open-loop world-model video of the trial's end, when there is one to make."""
        train = self.config.train
        if not (train.video and self.image_env and self.agent.open_loop is not None):
            return None
        if not replay.num_windows or train.sequence_length <= 6:
            return None
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 999)
        written = video.write_open_loop(self.agent, agent_state, replay, self.folder.out, key)
        return {"path": "video.gif", **written}

    # -- the loop's hooks ---------------------------------------------------------------
    def episode(self, state: loop.LoopState, record: dict) -> None:
        self.log_to.episode(state.env_steps, record)

    def log(self, state: loop.LoopState, window: loop.Window) -> None:
        self.log_to.metrics(state.env_steps, loop.window_metrics(state, window, self._summarize))

    def evaluate(self, state: loop.LoopState) -> None:
        """Every evaluation set in every mode; a set's result is its headline mode's summary
        (the first of `train.eval_modes`) with every mode's under `modes`."""
        config, train = self.config, self.config.train
        results = {}
        for set_name, eval_set in self.phase.eval_sets.items():
            recipe = env_recipe(config, eval_set.task, self.phase.env_kwargs, eval_set.kwargs)
            seed = episodes.evaluation_seed(config.seed, set_name, eval_set.task, state.env_steps)
            by_mode = {}
            for mode in train.eval_modes:
                summary = evaluate(self.agent, self.act, state.agent, config, seed, recipe, mode)
                self.log_to.evaluation(state.env_steps, set_name, mode, summary)
                by_mode[mode] = summary
            headline = train.eval_modes[0]
            results[set_name] = {**by_mode[headline], "mode": headline, "modes": by_mode}
        self.final_evals = results
        first = next(iter(results.values()), {})
        if self.bar is not None and "return_mean" in first:
            self.bar.set_postfix(eval_return=f"{first['return_mean']:.2f}")

    def checkpoint(self, state: loop.LoopState) -> None:
        self.log_to.save(state, self.replay, self.trial.history, phase_done=False)

    def step(self, state: loop.LoopState, ended: bool) -> bool:
        watch = self.trial.watch
        if self.bar is not None:
            self.bar.update(self.config.env.num_envs)
        total = self.log_to.steps_before + state.env_steps
        if watch.on_step is not None:
            watch.on_step(total)
        if watch.stop_after is not None and total >= watch.stop_after and not ended:
            self.stopped_at = total
            return True
        return False

    def _open_bar(self, env_steps: int) -> None:
        if not (self.trial.watch.progress and self.phase.steps):
            return
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.phase.steps,
            initial=env_steps,
            unit="step",
            file=sys.stderr,
            desc=f"{self.config.agent} on {self.config.env.name}: {self.phase.name}",
            dynamic_ncols=True,
        )
