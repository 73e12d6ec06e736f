"""THE training loop, written once for every agent.

    vector environment -> batched jitted `act` -> replay -> `update` at the train ratio
    -> periodic evaluation episodes -> metrics.jsonl / eval.jsonl -> atomic checkpoints

`run(config, out)` trains one trial in folder `out` and resumes it from its latest checkpoint
when one exists. A trial folder holds:

    config.yaml       the resolved TrialConfig (a resume with a different config is refused)
    metrics.jsonl     training metrics every `train.log_every` environment steps
    eval.jsonl        one line per evaluation
    checkpoints/      see benchmarks/checkpoint.py
    video.gif         open-loop world-model rollout (model-based agents on images)
    done.json         written last: the final summary

Resume is exact: a killed trial resumed from a checkpoint ends with the same parameters and
metrics as an uninterrupted run (tests/test_runner.py kills one for real). The price is that
every checkpoint also restarts the training environments from seeds derived from the step
count, in both runs, because simulators such as Crafter or MuJoCo cannot be saved mid-episode.
Episodes cut this way are not reported as episodes.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from acme import specs as acme_specs

import agents
from agents.base import ActInput
from agents.replay import Replay
from benchmarks import checkpoint
from benchmarks import config as config_lib
from envs import base as env_base
from envs import registry, vector

_EVAL_SEED_OFFSET = 1_000_003
_RESEED_OFFSET = 7_919


class IncompatibleTrialError(config_lib.ConfigError):
    pass


def environment_spec(envs: vector.VectorEnv) -> acme_specs.EnvironmentSpec:
    """The spec agents are built from (agent keys only) for a batch of environments."""
    observations = env_base.agent_observation(envs.observation_spec())
    return acme_specs.EnvironmentSpec(
        observations=observations,
        actions=envs.action_spec(),
        rewards=env_base.Environment.reward_spec(None),
        discounts=env_base.Environment.discount_spec(None),
    )


def make_envs(config: config_lib.TrialConfig, num_envs: int, seed: int) -> vector.VectorEnv:
    recipe = registry.factory(config.env.name, task=config.env.task, **dict(config.env.kwargs))
    mode = "process" if config.env.workers else "inline"
    return vector.make(recipe, num_envs, mode=mode, seed=seed)


class _JsonlLog:
    """An append-only JSON-lines file that can be cut back to a checkpoint's offset."""

    def __init__(self, path: Path, offset: Optional[int]):
        self.path = path
        if offset is not None and path.exists():
            with open(path, "r+b") as file:
                file.truncate(offset)
        elif offset is None and path.exists():
            path.unlink()
        self._file = open(path, "ab")

    def write(self, record: dict) -> None:
        self._file.write((json.dumps(record) + "\n").encode())
        self._file.flush()

    def offset(self) -> int:
        self._file.flush()
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


def _summarize_episodes(records: list[dict]) -> dict:
    """Aggregate finished episodes: mean return/length, and the Crafter score when logged."""
    from envs import crafter as crafter_env

    out: dict[str, Any] = {"episodes": len(records)}
    if not records:
        return out
    out["return_mean"] = float(np.mean([r["return"] for r in records]))
    out["length_mean"] = float(np.mean([r["length"] for r in records]))
    if "log_achievements" in records[0]:
        rates = crafter_env.success_rates([r["log_achievements"] for r in records])
        out["crafter_score"] = crafter_env.score(rates)
        out["success_rates"] = dict(zip(crafter_env.ACHIEVEMENTS, rates.round(3).tolist()))
    if "log_success" in records[0]:
        out["success_rate"] = float(np.mean([r["log_success"] for r in records]))
    return out


class Coverage:
    """How much of the environment the agent has seen: the exploration metrics.

    Distinct `log_position` values (toy grid cells; continuous positions are binned to a
    20x20 grid over [-1, 1]^2) and distinct Crafter achievements unlocked, over all training
    steps so far. The sets are part of the checkpoint, so resumed runs continue the count.
    """

    def __init__(self, positions=(), achievements=()):
        self.positions = {tuple(p) for p in positions}
        self.achievements = set(achievements)

    def observe(self, observation) -> None:
        if "log_position" in observation:
            position = np.asarray(observation["log_position"])
            if np.issubdtype(position.dtype, np.floating):
                position = np.floor((position + 1.0) * 10.0).astype(np.int64)
            self.positions.update(map(tuple, position.tolist()))
        if "log_achievements" in observation:
            unlocked = np.asarray(observation["log_achievements"]).max(axis=0) > 0
            self.achievements.update(np.flatnonzero(unlocked).tolist())

    def metrics(self) -> dict:
        out = {}
        if self.positions:
            out["coverage/distinct_positions"] = len(self.positions)
        if self.achievements:
            out["coverage/achievements_unlocked"] = len(self.achievements)
        return out

    def state(self) -> dict:
        return {"positions": sorted(self.positions), "achievements": sorted(self.achievements)}


class _EpisodeTracker:
    """Running return/length per environment; finished episodes as records."""

    def __init__(self, num_envs: int):
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, np.int64)

    def reset(self) -> None:
        self.returns[:] = 0
        self.lengths[:] = 0

    def observe(self, timestep) -> list[dict]:
        first = timestep.step_type == 0
        self.returns = np.where(first, 0.0, self.returns + timestep.reward)
        self.lengths = np.where(first, 0, self.lengths + 1)
        finished = []
        for i in np.flatnonzero(timestep.step_type == 2):
            record = {"return": float(self.returns[i]), "length": int(self.lengths[i])}
            for key, value in timestep.observation.items():
                if key.startswith(env_base.LOG_PREFIX) and key != env_base.TASK_REWARDS_KEY:
                    record[key] = np.asarray(value[i]).tolist()
            finished.append(record)
        return finished


def _replay_step(timestep, action) -> dict:
    return {
        "observation": timestep.observation,
        "action": np.asarray(action),
        "reward": timestep.reward,
        "discount": timestep.discount,
        "is_first": timestep.step_type == 0,
        "is_last": timestep.step_type == 2,
        "is_terminal": (timestep.step_type == 2) & (timestep.discount == 0.0),
    }


def evaluate(agent, act, state, config, index: int) -> dict:
    """`train.eval_episodes` greedy episodes on fresh environments seeded for `index`."""
    episodes = config.train.eval_episodes
    num_envs = min(episodes, config.env.num_envs)
    seed = config.seed + _EVAL_SEED_OFFSET + 101 * index
    rng = jax.random.PRNGKey(seed)
    records: list[dict] = []
    with make_envs(config, num_envs, seed) as envs:
        tracker = _EpisodeTracker(num_envs)
        carry = agent.initial_carry(num_envs)
        timestep = envs.reset()
        while len(records) < episodes:
            rng, key = jax.random.split(rng)
            step = ActInput(
                env_base.agent_observation(timestep.observation), timestep.step_type == 0
            )
            action, carry = act(state, carry, step, key, "eval")
            timestep = envs.step(np.asarray(action))
            records += tracker.observe(timestep)
    return _summarize_episodes(records[:episodes])


def _write_video(agent, state, replay: Replay, out: Path, rng, context: int = 5) -> dict:
    """An open-loop rollout GIF (real | imagined | error) and the error per horizon step."""
    import imageio.v2 as imageio

    batch = replay.sample(4)
    length = batch["is_first"].shape[1]
    horizon = length - context
    imagined = jax.device_get(agent.open_loop(state, batch, context, horizon, rng))
    real = batch["observation"]["image"][:, context:].astype(np.float32) / 255.0
    predicted = np.clip(np.asarray(imagined["image"]), 0.0, 1.0)
    error = ((real - predicted) ** 2).mean(axis=(0, 2, 3, 4))
    frames = []
    for t in range(horizon):
        rows = [
            np.concatenate([real[b, t], predicted[b, t], np.abs(real[b, t] - predicted[b, t])], 1)
            for b in range(real.shape[0])
        ]
        frames.append((np.concatenate(rows, 0) * 255).astype(np.uint8))
    imageio.mimsave(out / "video.gif", frames, duration=0.2, loop=0)
    return {"open_loop_mse": error.round(6).tolist(), "context": context, "horizon": horizon}


def run(
    config: config_lib.TrialConfig,
    out: Path,
    progress: bool = True,
    stop_after: Optional[int] = None,
    on_step: Optional[Callable[[int], None]] = None,
) -> dict:
    """Train (or resume) one trial in `out`; returns the final summary.

    `stop_after` ends the call early after that many environment steps (without writing
    `done.json`), as a kill would; `on_step` is called with the step count each iteration.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config_text = config_lib.to_yaml(config)
    config_path = out / "config.yaml"
    if config_path.exists():
        import yaml

        saved = yaml.safe_load(config_path.read_text())
        changed = config_lib.differences(saved, config.to_dict())
        if changed:
            raise IncompatibleTrialError(
                f"{out} holds a trial with a different configuration:\n  "
                + "\n  ".join(changed)
                + "\nUse another --out folder, or delete this one to start over."
            )
    else:
        checkpoint.write_atomic(config_path, config_text.encode())
    if (out / "done.json").exists():
        return json.loads((out / "done.json").read_text())

    envs = make_envs(config, config.env.num_envs, config.seed)
    stack = contextlib.ExitStack()
    stack.enter_context(envs)
    try:
        return _train(config, out, envs, progress, stop_after, on_step, stack)
    finally:
        stack.close()


def _train(config, out, envs, progress, stop_after, on_step, stack) -> dict:
    train = config.train
    num_envs = config.env.num_envs
    spec = environment_spec(envs)
    agent = agents.make(config.agent, spec, config.agent_config)
    act = jax.jit(agent.act, static_argnums=4)
    update = jax.jit(agent.update)
    init_key, loop_key = jax.random.split(jax.random.PRNGKey(config.seed))
    state = agent.init(init_key)
    replay = Replay(
        train.replay_capacity,
        num_envs,
        train.sequence_length,
        envs.observation_spec(),
        envs.action_spec(),
        seed=config.seed,
    )
    env_steps, updates, evals, episodes_total = 0, 0, 0, 0
    coverage = Coverage()
    offsets: dict[str, Optional[int]] = {"metrics": None, "eval": None}
    checkpoints = out / "checkpoints"
    found = checkpoint.latest(checkpoints)
    if found is not None:
        try:
            state, runner_state = checkpoint.load(found, state)
        except checkpoint.IncompatibleCheckpointError as error:
            raise IncompatibleTrialError(str(error)) from None
        state = jax.tree_util.tree_map(jnp.asarray, state)
        env_steps, updates = runner_state["env_steps"], runner_state["updates"]
        evals, episodes_total = runner_state["evals"], runner_state["episodes"]
        loop_key = jnp.asarray(runner_state["rng"], jnp.uint32)
        offsets = runner_state["offsets"]
        coverage = Coverage(**runner_state.get("coverage", {}))
        replay.load(found / "replay.npz")
    metrics_log = _JsonlLog(out / "metrics.jsonl", offsets["metrics"])
    eval_log = _JsonlLog(out / "eval.jsonl", offsets["eval"])
    stack.callback(metrics_log.close)
    stack.callback(eval_log.close)

    if env_steps:
        envs.seed(config.seed + _RESEED_OFFSET * env_steps)
    timestep = envs.reset()
    carry = agent.initial_carry(num_envs)
    tracker = _EpisodeTracker(num_envs)
    recent_episodes: list[dict] = []
    update_metrics: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=train.steps,
            initial=env_steps,
            unit="step",
            file=sys.stderr,
            desc=f"{config.agent} on {config.env.name}",
            dynamic_ncols=True,
        )
    started, steps_at_start = time.time(), env_steps
    replayed_per_update = train.batch_size * train.sequence_length

    def save_checkpoint():
        runner_state = {
            "env_steps": env_steps,
            "updates": updates,
            "evals": evals,
            "episodes": episodes_total,
            "rng": np.asarray(loop_key).tolist(),
            "offsets": {"metrics": metrics_log.offset(), "eval": eval_log.offset()},
            "coverage": coverage.state(),
        }
        checkpoint.save(checkpoints, env_steps, state, runner_state, replay.save)

    while env_steps < train.steps:
        loop_key, act_key = jax.random.split(loop_key)
        step = ActInput(env_base.agent_observation(timestep.observation), timestep.step_type == 0)
        action, carry = act(state, carry, step, act_key, "explore")
        action = np.asarray(action)
        replay.add(_replay_step(timestep, action))
        timestep = envs.step(action)
        env_steps += num_envs
        finished = tracker.observe(timestep)
        coverage.observe(timestep.observation)
        episodes_total += len(finished)
        recent_episodes += finished

        if agent.learns and agent.rollout_length:
            # On-policy: one update per rollout, on the steps just collected.
            rollout = agent.rollout_length
            if (env_steps // num_envs) % rollout == 0 and len(replay) > rollout * num_envs:
                loop_key, update_key = jax.random.split(loop_key)
                state, metrics = update(state, replay.latest(rollout + 1), update_key)
                updates += 1
                update_metrics.append(metrics)
        elif agent.learns and env_steps >= train.learning_starts and replay.num_windows:
            owed = int(env_steps * train.train_ratio / replayed_per_update) - updates
            for _ in range(max(owed, 0)):
                loop_key, update_key = jax.random.split(loop_key)
                state, metrics = update(state, replay.sample(train.batch_size), update_key)
                updates += 1
                update_metrics.append(metrics)

        checkpoint_due = env_steps % train.checkpoint_every < num_envs or env_steps >= train.steps
        # Metrics are also flushed at checkpoints, so a resumed run writes the same lines.
        if env_steps % train.log_every < num_envs or checkpoint_due:
            record = {"env_steps": env_steps, "updates": updates, "episodes": episodes_total}
            record.update(coverage.metrics())
            record.update(
                {
                    f"episode/{k}": v
                    for k, v in _summarize_episodes(recent_episodes).items()
                    if not isinstance(v, dict)
                }
            )
            if update_metrics:
                stacked = jax.device_get(update_metrics)
                for key in stacked[0]:
                    record[f"train/{key}"] = float(np.mean([m[key] for m in stacked]))
            elapsed = time.time() - started
            record["env_steps_per_second"] = (env_steps - steps_at_start) / max(elapsed, 1e-9)
            metrics_log.write(record)
            recent_episodes, update_metrics = [], []

        if train.eval_every and (
            env_steps % train.eval_every < num_envs or env_steps >= train.steps
        ):
            summary = evaluate(agent, act, state, config, evals)
            evals += 1
            eval_log.write({"env_steps": env_steps, **summary})
            if bar is not None and "return_mean" in summary:
                bar.set_postfix(eval_return=f"{summary['return_mean']:.2f}")

        if checkpoint_due:
            save_checkpoint()
            if env_steps < train.steps:
                envs.seed(config.seed + _RESEED_OFFSET * env_steps)
                timestep = envs.reset()
                tracker.reset()
        if bar is not None:
            bar.update(num_envs)
        if on_step is not None:
            on_step(env_steps)
        if stop_after is not None and env_steps >= stop_after and env_steps < train.steps:
            if bar is not None:
                bar.close()
            return {"stopped_at": env_steps}

    if bar is not None:
        bar.close()
    summary = {
        "env_steps": env_steps,
        "updates": updates,
        "episodes": episodes_total,
        "trial_id": config.trial_id(),
    }
    image_env = "image" in envs.observation_spec()
    if (
        train.video
        and image_env
        and agent.open_loop is not None
        and replay.num_windows
        and train.sequence_length > 6
    ):
        loop_key, video_key = jax.random.split(loop_key)
        video = _write_video(agent, state, replay, out, video_key)
        summary["video"] = {"path": "video.gif", **video}
    if (out / "eval.jsonl").exists():
        lines = (out / "eval.jsonl").read_text().splitlines()
        if lines:
            summary["final_eval"] = json.loads(lines[-1])
    checkpoint.write_atomic(out / "done.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary
