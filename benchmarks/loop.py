"""THE loop, written once for every agent: act, step, add to the replay, run the updates the
schedule says are due, track episodes.

    state = loop.run(envs, replay, learner, state, plan, hooks)

It knows no files and no trial configuration. What it carries from step to step is the
explicit `LoopState`; what happens at a due log, evaluation or checkpoint is the caller's,
through `Hooks` (benchmarks/phase.py writes the trial folder there). Resume is exact because
everything random is in `LoopState.rng` and a checkpoint holds the episodes running at it
(`Running`: the environments' own state, the batch's timestep, the agent's acting carry and the
running returns), so a resumed run continues them as the uninterrupted run does. Environments
that cannot save their state (`envs.base.StateNotSupported`, e.g. envpool's Procgen) are instead
restarted at every checkpoint from seeds derived from the step count (`restart`), in the
resumed run and the uninterrupted one alike (`Cut`): exact as well, but the running episodes
end unrecorded.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from mbxfer.agents.base import ActInput
from mbxfer.benchmarks import episodes as episodes_lib
from mbxfer.benchmarks import schedule, timing
from mbxfer.envs import base as env_base

_RESEED_OFFSET = 7_919


class LoopState(NamedTuple):
    """Everything the loop carries across steps, and what a checkpoint saves of it."""

    agent: Any
    """The agent's state (parameters, optimizer states, counters)."""
    rng: jax.Array
    coverage: episodes_lib.Coverage
    env_steps: int = 0
    """Environment steps of this phase, summed over the batch."""
    updates: int = 0
    episodes: int = 0


class NonFiniteError(RuntimeError):
    """An update produced a non-finite loss, gradient norm or parameter; the trial stops
    before anything of that update is checkpointed (`mbxfer run` exits with code 3)."""


def finite_checked(update_fn: Callable) -> Callable:
    """`update_fn` (`(state, batch, key) -> (state, metrics)`, an agent's `update` or
    `adapt`) also returning one boolean: every metric and every floating-point leaf of the new
    state is finite. Computed inside the same jitted call (a reduction per leaf), so checking
    costs one scalar transfer per update, not a pass over the parameters on the host."""

    def checked(state, batch, key):
        new_state, metrics = update_fn(state, batch, key)
        leaves = [
            leaf
            for leaf in jax.tree_util.tree_leaves((new_state, metrics))
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
        ]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))
        return new_state, metrics, finite

    return checked


def _refuse_nonfinite(metrics: dict, updates: int, env_steps: int) -> None:
    values = jax.device_get(metrics)
    bad = sorted(key for key, value in values.items() if not np.all(np.isfinite(value)))
    where = f"in the metrics {', '.join(bad)}" if bad else "in the parameters or optimizer state"
    raise NonFiniteError(
        f"non-finite training: update {updates + 1} (at environment step {env_steps} of the "
        f"phase) produced NaN or inf {where}; the trial stops and its checkpoints hold only "
        "finite states. Lower the learning rates (agent.*_lr) or check the reward scale."
    )


class Learner(NamedTuple):
    """The agent as the loop drives it (`act` jitted; `update` jitted through
    `finite_checked`, so it returns `(state, metrics, finite)`)."""

    act: Callable
    update: Callable
    initial_carry: Callable[[int], Any]
    sample: Callable[[], dict]
    """A training batch from the replay (relabelled as the phase asks)."""


class Running(NamedTuple):
    """The episodes running at a checkpoint, which a resumed run continues."""

    envs: Any
    """The batch's `get_state()`."""
    timestep: Any
    """The batch's current timestep (the one acted on next), numpy."""
    carry: Any
    """The agent's acting carry (`initial_carry`'s structure), numpy."""
    returns: np.ndarray
    lengths: np.ndarray
    """The episode tracker's running sums."""


class Cut(NamedTuple):
    """A checkpoint of environments that cannot save their state: they restart after it."""

    reason: str


def running(envs, timestep, carry, tracker: episodes_lib.EpisodeTracker) -> Running | Cut:
    """What a checkpoint saves of the running episodes; `Cut` when the environments cannot."""
    try:
        env_state = envs.get_state()
    except env_base.StateNotSupported as error:
        return Cut(str(error))
    return Running(
        env_state,
        jax.tree_util.tree_map(np.array, timestep),
        jax.device_get(carry),
        tracker.returns.copy(),
        tracker.lengths.copy(),
    )


class Plan(NamedTuple):
    """How long the loop runs and when it does what."""

    steps: int
    seed: int
    """Environments that cannot save their state are reseeded at checkpoints with
    `seed + 7919 * env_steps` (see `restart`)."""
    updates: schedule.Updates
    log: schedule.Every
    evaluate: schedule.Every
    checkpoint: schedule.Every


class Window(NamedTuple):
    """What happened since the last log (finished episodes, update metrics), and the step
    count and time the loop started at (steps per second are over the whole call)."""

    episodes: list
    updates: list
    start_steps: int
    start_time: float


class Hooks(Protocol):
    def episode(self, state: LoopState, record: dict) -> None: ...

    def log(self, state: LoopState, window: Window) -> None: ...

    def evaluate(self, state: LoopState) -> None: ...

    def checkpoint(self, state: LoopState, episodes: Running | Cut) -> None: ...

    def step(self, state: LoopState, ended: bool) -> bool:
        """Called after every batch step; True stops the loop now (as a kill would)."""


def replay_step(timestep, action) -> dict:
    """The replay row of `timestep` and the action taken from it."""
    return {
        "observation": timestep.observation,
        "action": np.asarray(action),
        "reward": timestep.reward,
        "discount": timestep.discount,
        "is_first": timestep.step_type == 0,
        "is_last": timestep.step_type == 2,
        "is_terminal": (timestep.step_type == 2) & (timestep.discount == 0.0),
    }


def restart(envs, seed: int, env_steps: int):
    """Reseed the environments for step count `env_steps` (unless 0: they were built with
    `seed`) and reset them."""
    if env_steps:
        envs.seed(seed + _RESEED_OFFSET * env_steps)
    return envs.reset()


def update(learner: Learner, state: LoopState, batch, metrics: list) -> LoopState:
    """One update; raises `NonFiniteError` (before the state is kept) when it is not finite."""
    rng, key = jax.random.split(state.rng)
    agent_state, result, finite = learner.update(state.agent, batch, key)
    if not bool(finite):
        _refuse_nonfinite(result, state.updates, state.env_steps)
    metrics.append(result)
    return state._replace(agent=agent_state, rng=rng, updates=state.updates + 1)


def offline(update_fn, sample, state: LoopState, count: int) -> tuple[LoopState, list]:
    """`count` updates by `update_fn` (wrapped by `finite_checked`) on batches from `sample`,
    no environment step (offline adaptation); they are not counted as the phase's updates.
    The state and their metrics."""
    rng, agent_state, metrics = state.rng, state.agent, []
    for done in range(count):
        rng, key = jax.random.split(rng)
        agent_state, result, finite = update_fn(agent_state, sample(), key)
        if not bool(finite):
            _refuse_nonfinite(result, done, state.env_steps)
        metrics.append(result)
    return state._replace(agent=agent_state, rng=rng), metrics


def mean_metrics(metrics: list) -> dict:
    """`train/<key>`: the mean of each update metric over `metrics` (one dict per update)."""
    if not metrics:
        return {}
    stacked = jax.device_get(metrics)
    return {f"train/{key}": float(np.mean([m[key] for m in stacked])) for key in stacked[0]}


def window_metrics(state: LoopState, window: Window, summarize) -> dict:
    """The training metrics of `window`: counts, coverage, `episode/` summaries (by
    `summarize`), `train/` means of the update metrics, and steps per second."""
    record = {"updates": state.updates, "episodes": state.episodes, **state.coverage.metrics()}
    summary = summarize(window.episodes)
    record.update({f"episode/{k}": v for k, v in summary.items() if not isinstance(v, dict)})
    record.update(mean_metrics(window.updates))
    elapsed = max(time.time() - window.start_time, 1e-9)
    record["env_steps_per_second"] = (state.env_steps - window.start_steps) / elapsed
    return record


def run(
    envs,
    replay,
    learner: Learner,
    state: LoopState,
    plan: Plan,
    hooks: Hooks,
    resumed: Running | None = None,
    timer=timing.NO_TIMER,
):
    """Run from `state` until `plan.steps` environment steps; `(state, finished)`, where
    `finished` is False when `hooks.step` stopped the loop early. `resumed`: the episodes a
    checkpoint saved, continued instead of restarting the environments. `timer(part)` wraps
    each part of an iteration (`benchmarks.timing`)."""
    num_envs = envs.num_envs
    on_policy = isinstance(plan.updates, schedule.OnPolicy)
    off_policy = isinstance(plan.updates, schedule.ReplayRatio)
    spec = envs.action_spec()
    placeholder_action = np.zeros((num_envs,) + spec.shape, spec.dtype)
    tracker = episodes_lib.EpisodeTracker(num_envs)
    if resumed is None:
        with timer("env"):  # The first reset builds the worlds (Crafter: ~2 s).
            timestep = restart(envs, plan.seed, state.env_steps)
        carry = learner.initial_carry(num_envs)
    else:
        envs.set_state(resumed.envs)
        timestep = resumed.timestep
        carry = jax.tree_util.tree_map(jnp.asarray, resumed.carry)
        tracker.returns, tracker.lengths = resumed.returns.copy(), resumed.lengths.copy()
    window = Window([], [], state.env_steps, time.time())
    while state.env_steps < plan.steps:
        rng, act_key = jax.random.split(state.rng)
        state = state._replace(rng=rng)
        step = ActInput(env_base.agent_observation(timestep.observation), timestep.step_type == 0)
        if on_policy:
            # The step joins the replay before acting, so that every `rollout` steps the
            # update sees the rollout just collected, all of it acted with the current
            # parameters, with this step as the bootstrap row.
            replay.add(replay_step(timestep, placeholder_action))
            if plan.updates.due(state.env_steps):
                with timer("update"):
                    batch = replay.latest(plan.updates.rollout + 1)
                    state = update(learner, state, batch, window.updates)
            with timer("act"):
                action, carry = learner.act(state.agent, carry, step, act_key, "explore")
                action = np.asarray(action)
            replay.set_newest_action(action)
        else:
            with timer("act"):
                action, carry = learner.act(state.agent, carry, step, act_key, "explore")
                action = np.asarray(action)
            replay.add(replay_step(timestep, action))
        with timer("env"):
            timestep = envs.step(action)
        finished = tracker.observe(timestep)
        state = state._replace(
            env_steps=state.env_steps + num_envs, episodes=state.episodes + len(finished)
        )
        for record in finished:
            hooks.episode(state, record)
        state.coverage.observe(timestep.observation)
        window.episodes.extend(finished)
        if off_policy and replay.num_windows:
            for _ in range(plan.updates.owed(state.env_steps, state.updates)):
                with timer("update"):
                    state = update(learner, state, learner.sample(), window.updates)

        ended = state.env_steps >= plan.steps
        checkpoint_due = plan.checkpoint.due(state.env_steps, num_envs) and not ended
        # Metrics are also flushed at checkpoints, so a resumed run writes the same lines.
        if plan.log.due(state.env_steps, num_envs, ended) or checkpoint_due:
            with timer("log"):
                hooks.log(state, window)
            window = window._replace(episodes=[], updates=[])
        if plan.evaluate.due(state.env_steps, num_envs, ended):
            with timer("evaluate"):
                hooks.evaluate(state)
        if checkpoint_due:
            with timer("checkpoint"):
                episodes = running(envs, timestep, carry, tracker)
                hooks.checkpoint(state, episodes)
            if isinstance(episodes, Cut):
                with timer("env"):
                    timestep = restart(envs, plan.seed, state.env_steps)
                tracker.reset()
        if hooks.step(state, ended):
            return state, False
    return state, True
