"""One phase of a trial: build, carry over, adapt, evaluate the start, run THE loop, end.

    Phase(config, phases, index, folder, ...).run(carried, resume) -> (state, replay, phase)

A phase builds its environments and agent, starts from the previous phase's state as its
`carry` says (or from a checkpoint), fits the reward head offline when the protocol asks,
evaluates its starting point (the jumpstart of transfer metrics), runs the loop
(benchmarks/loop.py) with itself as the hooks that write the trial folder
(`trial_folder.PhaseLog`), and ends with its summary and a phase checkpoint.
`benchmarks/runner.py` runs a trial's phases one after the other.
"""

from __future__ import annotations

import concurrent.futures
import sys
from typing import Callable, ContextManager, NamedTuple, Optional

import jax
import jax.numpy as jnp

from mbxfer import agents
from mbxfer.agents.replay import Replay
from mbxfer.benchmarks import (
    checkpoint,
    episodes,
    loggers,
    loop,
    protocols,
    provenance,
    schedule,
    timing,
    video,
)
from mbxfer.benchmarks import config as config_lib
from mbxfer.benchmarks.trial_folder import (
    PhaseLog,
    Resume,
    TrialFolder,
    load_agent_state,
    load_running,
)
from mbxfer.envs import registry, scoring, vector


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


class EvalEnvs:
    """A trial's evaluation environments: each batch (recipe and size) is built at its first
    evaluation and reseeded for the later ones, so worker processes and simulators are made
    once per trial, not once per evaluation. Reseeding starts the same episodes as building
    anew with that seed (`envs.base.Environment.seed`; tests/test_vector.py checks every family).
    `prepare` starts building (and warming) a batch of worker processes in a background thread,
    so that the workers start while the agent is built and compiled instead of at the first
    evaluation."""

    def __init__(self, config: config_lib.TrialConfig):
        self._config = config
        self._batches: dict = {}  # A batch, or the Future of one that `prepare` builds.
        self._builder: Optional[concurrent.futures.ThreadPoolExecutor] = None

    @staticmethod
    def _key(recipe: registry.EnvFactory, num_envs: int) -> tuple:
        return (recipe.entry.name, repr(sorted(recipe.overrides.items())), num_envs)

    def prepare(self, recipe: registry.EnvFactory, num_envs: int) -> None:
        """Start building the batch `get(recipe, num_envs, ...)` will return, when its
        environments run in worker processes (inline ones are built where they are used)."""
        key = self._key(recipe, num_envs)
        if key in self._batches or not self._config.env.workers:
            return
        if self._builder is None:
            self._builder = concurrent.futures.ThreadPoolExecutor(1, "eval-envs")
        self._batches[key] = self._builder.submit(self._build_warm, recipe, num_envs)

    def _build_warm(self, recipe: registry.EnvFactory, num_envs: int):
        """A batch whose workers have reset once: a process's first reset loads the
        environment's code (Crafter: ~2 s, numba loading its compiled world generator), which
        would otherwise land in the first evaluation. Any seed: `get` reseeds the batch."""
        envs = make_envs(self._config, num_envs, 0, recipe)
        try:
            envs.reset()
        except BaseException:
            envs.close()
            raise
        return envs

    def get(self, recipe: registry.EnvFactory, num_envs: int, seed: int):
        """A batch of `num_envs` environments of `recipe`, seeded with `seed`."""
        key = self._key(recipe, num_envs)
        envs = self._batches.get(key)
        if envs is None:
            envs = self._batches[key] = make_envs(self._config, num_envs, seed, recipe)
            return envs
        if isinstance(envs, concurrent.futures.Future):
            try:
                envs = self._batches[key] = envs.result()  # Its build error, if any.
            except BaseException:
                del self._batches[key]
                raise
        envs.seed(seed)
        return envs

    def close(self) -> None:
        for envs in self._batches.values():
            if isinstance(envs, concurrent.futures.Future):
                if envs.exception() is not None:
                    continue
                envs = envs.result()
            envs.close()
        self._batches.clear()
        if self._builder is not None:
            self._builder.shutdown()
            self._builder = None


def eval_batch_size(config: config_lib.TrialConfig, recipe, count=None) -> tuple[int, int]:
    """`(episodes, environments)` of an evaluation of `recipe`: `count` episodes, else
    `train.eval_episodes`, else the environment's default, on up to `env.num_envs` copies."""
    count = count or config.train.eval_episodes or recipe.entry.eval_episodes
    return count, min(count, config.env.num_envs)


def evaluate(
    agent,
    act,
    state,
    config,
    seed: int,
    recipe=None,
    mode: str = "sampled",
    count=None,
    wrap=None,
    eval_envs: Optional[EvalEnvs] = None,
    timer=timing.NO_TIMER,
) -> dict:
    """Evaluation episodes (`count`, else `train.eval_episodes`, else the environment's
    default) on environments seeded with `seed` (from `eval_envs`, else built for this
    evaluation), the agent acting in evaluation `mode` (`sampled` or `greedy`,
    `config_lib.EVAL_MODES`); see `episodes.evaluate`. `wrap` may wrap the policy
    (`mbxfer eval --video` records frames through it) without changing its actions."""
    recipe = recipe if recipe is not None else env_recipe(config, config.env.task)
    count, num_envs = eval_batch_size(config, recipe, count)
    policy = episodes.AgentPolicy(agent, act, state, config_lib.EVAL_MODES[mode], seed)
    if wrap is not None:
        policy = wrap(policy)
    if eval_envs is not None:
        envs = eval_envs.get(recipe, num_envs, seed)
        return episodes.evaluate(envs, recipe, policy, count, timer)
    with make_envs(config, num_envs, seed, recipe) as envs:
        return episodes.evaluate(envs, recipe, policy, count, timer)


class Watch(NamedTuple):
    """What the caller watches the trial with: a progress bar, a stop, a step callback, the
    mirrors of its logs (TensorBoard, W&B), synced after each log and evaluation, and a timer
    of its parts (`benchmarks.timing`)."""

    progress: bool
    stop_after: Optional[int]
    on_step: Optional[Callable[[int], None]]
    mirrors: loggers.Mirrors
    timer: Callable[[str], ContextManager] = timing.NO_TIMER


class Phase:
    """One phase of a trial (`index` of the protocol's `phases`); also the loop's hooks,
    which write the trial folder. `history` is the trial's (`phases`: the summaries so far),
    which this phase extends and checkpoints; `agent_config` the trial's, before the phase's
    own reward mix (`protocols.agent_config_for`)."""

    def __init__(self, config, phases, index: int, folder: TrialFolder, agent_config,
                 history: dict, watch: Watch, stack, eval_envs: EvalEnvs):  # fmt: skip
        self.config, self.folder, self.index, self.phase = config, folder, index, phases[index]
        self.eval_envs = eval_envs
        self.history, self.watch = history, watch
        steps_before = sum(p["env_steps"] for p in history["phases"][:index])
        self.log_to = PhaseLog(folder, self.phase.name, index, steps_before)
        self.seed = config.seed + 100_003 * index
        num_envs = self.config.env.num_envs
        self.recipe = env_recipe(self.config, self.phase.task, self.phase.env_kwargs)
        with watch.timer("build"):
            self.envs = make_envs(self.config, num_envs, self.seed, self.recipe)
            stack.callback(self.envs.close)  # Also closed at the end of the phase.
            for eval_set in self.phase.eval_sets.values():
                recipe = self._eval_recipe(eval_set)
                eval_envs.prepare(recipe, eval_batch_size(config, recipe)[1])
            agent_config = protocols.agent_config_for(agent_config, self.phase, config.protocol)
            spec = vector.environment_spec(self.envs)
            self.agent = agents.make(self.config.agent, spec, agent_config)
        self.act = jax.jit(self.agent.act, static_argnums=4)
        self.task_index = None
        if self.phase.keep_replay and self.phase.task is not None:
            self.task_index = list(self.envs.tasks).index(self.phase.task)
        self.final_evals: dict = {}
        self.bar = None
        self.stopped_at: Optional[int] = None
        self.checkpoints: Optional[str] = None
        self.resumed: Optional[loop.Running] = None

    # -- the phase ----------------------------------------------------------------------
    def run(self, carried, resume: Optional[Resume]):
        """Run the phase from `carried` (the previous phase's state and replay) or `resume`;
        `(state, replay, self)` at its end, None when stopped early."""
        timer = self.watch.timer
        with timer("init"):
            state = self._start(carried, resume)
        if self.phase.offline_updates and state.env_steps == 0:
            with timer("update"):
                state = self._adapt(state)
        train = self.config.train
        if (
            state.env_steps == 0
            and self.phase.eval_sets
            and (train.eval_every or not self.phase.steps)
        ):
            with timer("evaluate"):
                self.evaluate(state)  # The phase's starting point (jumpstart).
        learner = loop.Learner(
            self.act,
            jax.jit(loop.finite_checked(self.agent.update)),
            self.agent.initial_carry,
            self._sample,
        )
        self._open_bar(state.env_steps)
        plan = self._plan()
        state, finished = loop.run(
            self.envs, self.replay, learner, state, plan, self, self.resumed, timer
        )
        if self.bar is not None:
            self.bar.close()
        if not finished:
            return None
        with timer("checkpoint"):
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

    def ended(self, resume: Resume):
        """`(state, replay, self)` as this phase's end checkpoint `resume` saved them, for a
        run killed after that checkpoint and before `done.json`."""
        fresh = self.agent.init(self._keys()[0])
        agent_state = jax.tree_util.tree_map(jnp.asarray, load_agent_state(resume, fresh))
        self.replay = self._new_replay()
        checkpoint.load_replay(resume.folder, self.replay)
        self.image_env = "image" in self.envs.observation_spec()
        self.envs.close()
        return agent_state, self.replay, self

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
        self.resumed = None
        if resume is None:
            return state
        agent_state = jax.tree_util.tree_map(jnp.asarray, load_agent_state(resume, fresh))
        checkpoint.load_replay(resume.folder, self.replay)
        saved = resume.state
        if saved.phase_done:
            # A phase boundary: this phase starts from the previous phase's final state.
            agent_state = protocols.carry_over(
                self.phase.carry, agent_state, fresh, self.agent.part_of
            )
            if not self.phase.keep_replay:
                self.replay = self._new_replay()
            return state._replace(agent=agent_state)
        running = load_running(resume.folder)
        if running is not None:
            self.resumed = loop.Running(**running)
            self.checkpoints = "continued episodes"
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
        adapt = jax.jit(loop.finite_checked(self.agent.adapt))
        state, metrics = loop.offline(adapt, self._sample, state, phase.offline_updates)
        record = {"offline_updates": phase.offline_updates, **loop.mean_metrics(metrics)}
        self.log_to.metrics(0, record)
        self.watch.mirrors.sync()
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
            "code": provenance.code_version(),  # A resumed trial may span code versions.
            **state.coverage.metrics(),
            "final_eval": self.final_evals,
            # What the checkpoints inside the phase did to the running episodes, if any.
            **({"checkpoints": self.checkpoints} if self.checkpoints else {}),
            # Reward-free phases: how much the exploration achieved (e.g. the Crafter score).
            "training_episodes": scoring.summarize(records, self.recipe, self.envs.tasks),
        }
        history = self.history
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
        self.watch.mirrors.sync()

    def _eval_recipe(self, eval_set) -> registry.EnvFactory:
        return env_recipe(self.config, eval_set.task, self.phase.env_kwargs, eval_set.kwargs)

    def evaluate(self, state: loop.LoopState) -> None:
        """Every evaluation set in every mode; a set's result is its headline mode's summary
        (the first of `train.eval_modes`) with every mode's under `modes`."""
        config, train = self.config, self.config.train
        results = {}
        for set_name, eval_set in self.phase.eval_sets.items():
            recipe = self._eval_recipe(eval_set)
            seed = episodes.evaluation_seed(config.seed, set_name, eval_set.task, state.env_steps)
            by_mode = {}
            for mode in train.eval_modes:
                summary = evaluate(self.agent, self.act, state.agent, config, seed, recipe, mode,
                                   eval_envs=self.eval_envs, timer=self.watch.timer)  # fmt: skip
                self.log_to.evaluation(state.env_steps, set_name, mode, summary)
                by_mode[mode] = summary
            headline = train.eval_modes[0]
            results[set_name] = {**by_mode[headline], "mode": headline, "modes": by_mode}
        self.final_evals = results
        self.watch.mirrors.sync()
        first = next(iter(results.values()), {})
        if self.bar is not None and "return_mean" in first:
            self.bar.set_postfix(eval_return=f"{first['return_mean']:.2f}")

    def checkpoint(self, state: loop.LoopState, running) -> None:
        if isinstance(running, loop.Cut):
            self.checkpoints = f"reset environments ({running.reason})"
            running = None
        else:
            self.checkpoints = "continued episodes"
        self.log_to.save(state, self.replay, self.history, phase_done=False, running=running)

    def step(self, state: loop.LoopState, ended: bool) -> bool:
        watch = self.watch
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
        if not (self.watch.progress and self.phase.steps):
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
