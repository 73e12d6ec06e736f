"""THE training loop, written once for every agent.

    vector environment -> batched jitted `act` -> replay -> `update` at the train ratio
    -> periodic evaluation episodes -> metrics.jsonl / eval.jsonl -> atomic checkpoints

`run(config, out)` trains one trial in folder `out` and resumes it from its latest checkpoint
when one exists. A trial folder holds:

    config.yaml       the resolved TrialConfig (a resume with a different config is refused)
    metrics.jsonl     training metrics every `train.log_every` environment steps
    eval.jsonl        one line per evaluation (and evaluation set)
    episodes.jsonl    one line per finished training episode (return, length, log_* data such
                      as Crafter achievements)
    phaseN.ckpt       the checkpoint at the end of phase N (see benchmarks/protocols.py)
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
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from acme import specs as acme_specs

import agents
from agents.base import ActInput
from agents.replay import Replay
from benchmarks import checkpoint, protocols, transfer
from benchmarks import config as config_lib
from envs import base as env_base
from envs import registry, scoring, vector

_EVAL_SEED_OFFSET = 1_000_003
_RESEED_OFFSET = 7_919


class IncompatibleTrialError(config_lib.ConfigError):
    pass


def enable_compilation_cache() -> None:
    """Share compiled XLA programs between trials through an on-disk cache.

    A sweep compiles the same agent for every seed (and every phase); with the cache only the
    first compile is paid. The directory is `JAX_COMPILATION_CACHE_DIR` when set, else
    `~/.cache/mbxfer/jax`. A cache left by another jax version is ignored by jax itself.
    """
    import os

    if jax.config.jax_compilation_cache_dir:
        return
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "mbxfer", "jax"
    )
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def environment_spec(envs: vector.VectorEnv) -> acme_specs.EnvironmentSpec:
    """The spec agents are built from (agent keys only) for a batch of environments."""
    observations = env_base.agent_observation(envs.observation_spec())
    return acme_specs.EnvironmentSpec(
        observations=observations,
        actions=envs.action_spec(),
        rewards=env_base.Environment.reward_spec(None),
        discounts=env_base.Environment.discount_spec(None),
    )


def env_recipe(config: config_lib.TrialConfig, task, *kwargs: Mapping) -> registry.EnvFactory:
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


def _copy_logs(source: Path, out: Path, offsets: dict) -> dict:
    """Copy the first `offsets[name]` bytes of each of `source`'s logs (what it had written at
    a checkpoint) into `out`; the offsets to continue `out`'s logs from."""
    copied = {}
    for name, offset in offsets.items():
        path = source / f"{name}.jsonl"
        if offset is None or not path.exists():
            copied[name] = None
            continue
        with open(path, "rb") as file:
            data = file.read(offset)
        (out / f"{name}.jsonl").write_bytes(data)
        copied[name] = len(data)
    return copied


def _summarize_episodes(records: list[dict], tasks: Optional[tuple] = None) -> dict:
    """Aggregate finished episodes: mean return/length, the Crafter score when logged, the
    success rate of the selected task (`log_success`, from its flag at the episode's last
    step) and, for environments with one success flag per task, every task's success rate
    (`task_success_rates`, named by `tasks` when given)."""
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
    if env_base.SUCCESS_KEY in records[0]:
        out["success_rate"] = float(np.mean([r[env_base.SUCCESS_KEY] for r in records]))
    if env_base.TASK_SUCCESS_KEY in records[0]:
        rates = np.mean([r[env_base.TASK_SUCCESS_KEY] for r in records], axis=0).round(4)
        names = tasks if tasks is not None and len(tasks) == len(rates) else range(len(rates))
        out["task_success_rates"] = {str(name): float(v) for name, v in zip(names, rates)}
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


def _normalized_return(recipe: registry.EnvFactory, returns: list[float]) -> Optional[float]:
    """Procgen's normalized return of `returns` (None for other families or unknown games)."""
    if recipe.entry.name != "procgen":
        return None
    from envs import procgen

    keywords = {**recipe.entry.defaults, **recipe.overrides}
    try:
        normalized = procgen.normalized_return(
            keywords.get("game", "coinrun"), keywords.get("distribution_mode", "easy"), returns
        )
    except env_base.ConfigurationError:
        return None
    return float(np.mean(normalized))


def evaluation_seed(trial_seed: int, eval_set: str, task: Optional[str], env_steps: int) -> int:
    """The seed of one evaluation's episodes: a function of the trial's seed, the evaluation
    set (its name and task) and the environment steps into the phase, never of how many
    evaluations ran before. So a finetuning phase and its scratch twin (same seed and task)
    are scored on the same start states at the same step count, whatever phases came
    before, and every mode of one evaluation plays the same episodes."""
    text = json.dumps([int(trial_seed), str(eval_set), task, int(env_steps)])
    return (zlib.crc32(text.encode()) + _EVAL_SEED_OFFSET) % 2**31


def _start_digest(observation, index: int) -> int:
    """A fingerprint of environment `index`'s observation (its agent keys and `log_*` keys)."""
    digest = 0
    for key in sorted(observation):
        if key != env_base.TASK_REWARDS_KEY:
            digest = zlib.crc32(np.ascontiguousarray(observation[key][index]).tobytes(), digest)
    return digest


def evaluate(agent, act, state, config, seed: int, recipe=None, mode: str = "sampled") -> dict:
    """Evaluation episodes (`train.eval_episodes`, else the environment's default) on fresh
    environments seeded with `seed`, the agent acting in evaluation `mode` (`sampled` or
    `greedy`, `config_lib.EVAL_MODES`). `start_digest` fingerprints the episodes' first
    observations: equal digests mean the same start states."""
    recipe = recipe if recipe is not None else env_recipe(config, config.env.task)
    episodes = config.train.eval_episodes or recipe.entry.eval_episodes
    num_envs = min(episodes, config.env.num_envs)
    rng = jax.random.PRNGKey(seed)
    records: list[dict] = []
    with make_envs(config, num_envs, seed, recipe) as envs:
        tracker = _EpisodeTracker(num_envs)
        carry = agent.initial_carry(num_envs)
        timestep = envs.reset()
        starts = [_start_digest(timestep.observation, i) for i in range(num_envs)]
        while len(records) < episodes:
            rng, key = jax.random.split(rng)
            step = ActInput(
                env_base.agent_observation(timestep.observation), timestep.step_type == 0
            )
            action, carry = act(state, carry, step, key, config_lib.EVAL_MODES[mode])
            timestep = envs.step(np.asarray(action))
            finished = tracker.observe(timestep)
            for record, i in zip(finished, np.flatnonzero(timestep.step_type == 2)):
                record["start"] = starts[i]
            records += finished
            for i in np.flatnonzero(timestep.step_type == 0):
                starts[i] = _start_digest(timestep.observation, i)
        tasks = envs.tasks
    records = records[:episodes]
    summary = _summarize_episodes(records, tasks)
    summary["start_digest"] = zlib.crc32(json.dumps([r["start"] for r in records]).encode())
    normalized = _normalized_return(recipe, [r["return"] for r in records])
    if normalized is not None:
        summary["normalized_return"] = normalized
    return summary


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
    start_from: Optional[Path] = None,
) -> dict:
    """Train (or resume) one trial in `out`, phase after phase; returns the final summary.

    `stop_after` ends the call early after that many environment steps in all (without
    writing `done.json`), as a kill would; `on_step` is called with the total step count each
    iteration. `start_from` is a phase-boundary checkpoint (`<trial>/phase0.ckpt`) of a trial
    whose earlier phases are this trial's: the trial starts at the next phase from it instead
    of re-running them.
    """
    out = Path(out)
    all_phases = protocols.phases(config)  # protocol errors before anything is written
    enable_compilation_cache()
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
    with contextlib.ExitStack() as stack:
        return _Trial(config, out, all_phases, progress, stack).run(stop_after, on_step, start_from)


class _Trial:
    """The phases of one trial and what runs across them (logs, counters, the resume point)."""

    def __init__(self, config, out: Path, all_phases, progress: bool, stack):
        self.config, self.out, self.phases, self.progress = config, out, all_phases, progress
        self.stack = stack
        self.agent_config = protocols.with_module(config.agent_config, all_phases, config.protocol)

    # -- resume ---------------------------------------------------------------------------
    def _resume_point(self, start_from: Optional[Path]):
        """(checkpoint folder, its runner.json, whether it is another trial's) or Nones."""
        found = checkpoint.latest(self.out / "checkpoints")
        if found is not None:
            return found, json.loads((found / "runner.json").read_text()), False
        if start_from is None:
            return None, None, False
        start_from = Path(start_from)
        if not (start_from / "runner.json").exists():
            raise IncompatibleTrialError(
                f"--from {start_from}: not a checkpoint folder (expected <trial>/phaseN.ckpt)"
            )
        runner_state = json.loads((start_from / "runner.json").read_text())
        index = runner_state.get("phase_index", 0)
        if not runner_state.get("phase_done") or index + 1 >= len(self.phases):
            raise IncompatibleTrialError(
                f"--from {start_from}: it ends phase {index}, so this trial would start at "
                f"phase {index + 1}, but its protocol has {len(self.phases)} phases"
            )
        source_config = start_from.parent / "config.yaml"
        if source_config.exists():
            import yaml

            source = config_lib.build(yaml.safe_load(source_config.read_text()))
            if protocols.prefix_key(source, index + 1) != protocols.prefix_key(
                self.config, index + 1
            ):
                raise IncompatibleTrialError(
                    f"--from {start_from}: that trial's phases 0..{index}, agent, agent config, "
                    "seed, environment or training settings differ from this trial's "
                    f"(compare {source_config} with this trial's config.yaml)"
                )
        return start_from, runner_state, True

    # -- the phases -----------------------------------------------------------------------
    def run(self, stop_after, on_step, start_from) -> dict:
        resume_from, resume_state, from_other_trial = self._resume_point(start_from)
        offsets = {"metrics": None, "eval": None, "episodes": None}
        if resume_state is not None and not from_other_trial:
            offsets = resume_state["offsets"]
        elif from_other_trial:  # The earlier phases' lines, so this folder tells it all.
            offsets = _copy_logs(resume_from.parent, self.out, resume_state["offsets"])
        self.metrics_log = _JsonlLog(self.out / "metrics.jsonl", offsets["metrics"])
        self.eval_log = _JsonlLog(self.out / "eval.jsonl", offsets["eval"])
        self.episodes_log = _JsonlLog(self.out / "episodes.jsonl", offsets.get("episodes"))
        for log in (self.metrics_log, self.eval_log, self.episodes_log):
            self.stack.callback(log.close)
        history = dict(resume_state or {}).get("history", {"phases": [], "evals": 0})
        if from_other_trial:
            history = {
                "phases": history["phases"],
                "evals": history["evals"],
                "from": str(resume_from),
            }
        self.history = history
        start_index = 0
        if resume_state is not None:
            start_index = resume_state.get("phase_index", 0) + bool(resume_state.get("phase_done"))
        state = replay = None
        for index in range(start_index, len(self.phases)):
            phase_resume = None
            if resume_state is not None and index == start_index:
                phase_resume = (resume_from, resume_state)
            result = self._run_phase(index, state, replay, phase_resume, stop_after, on_step)
            if result is None:
                return {"stopped_at": self.stopped_at}
            state, replay, agent = result
        return self._finish(state, replay, agent)

    def _phase_keys(self, index: int):
        root = jax.random.PRNGKey(self.config.seed)
        return jax.random.split(root if index == 0 else jax.random.fold_in(root, index))

    def _phase_seed(self, index: int) -> int:
        return self.config.seed + 100_003 * index

    def _run_phase(self, index, previous_state, previous_replay, resume, stop_after, on_step):
        config, train, phase = self.config, self.config.train, self.phases[index]
        num_envs = config.env.num_envs
        recipe = env_recipe(config, phase.task, phase.env_kwargs)
        seed = self._phase_seed(index)
        envs = make_envs(config, num_envs, seed, recipe)
        self.stack.callback(envs.close)  # Also closed at the end of the phase.
        spec = environment_spec(envs)
        agent_config = protocols.agent_config_for(self.agent_config, phase, config.protocol)
        agent = agents.make(config.agent, spec, agent_config)
        act = jax.jit(agent.act, static_argnums=4)
        update = jax.jit(agent.update)
        init_key, loop_key = self._phase_keys(index)
        fresh = agent.init(init_key)
        state = fresh
        if previous_state is not None:
            state = protocols.carry_over(phase.carry, previous_state, fresh, agent.part_of)
        rollout = agent.rollout_length if agent.learns else 0

        def new_replay():
            # On-policy agents only read the newest rollout: hold just that.
            capacity = train.replay_capacity
            if rollout:
                capacity = max(rollout + 1, train.sequence_length) * num_envs
            return Replay(
                capacity,
                num_envs,
                train.sequence_length,
                envs.observation_spec(),
                envs.action_spec(),
                seed=seed,
            )

        task_index = None
        if phase.keep_replay and phase.task is not None:
            task_index = list(envs.tasks).index(phase.task)
        if phase.keep_replay and previous_replay is not None:
            replay = previous_replay
        else:
            replay = new_replay()
        env_steps, updates, episodes_total = 0, 0, 0
        self._total_steps = sum(p["env_steps"] for p in self.history["phases"][:index])
        coverage = Coverage()
        if resume is not None:
            folder, runner_state = resume
            try:
                state, _ = checkpoint.load(folder, fresh)
            except checkpoint.IncompatibleCheckpointError as error:
                raise IncompatibleTrialError(str(error)) from None
            state = jax.tree_util.tree_map(jnp.asarray, state)
            if (folder / "replay.npz").exists():
                replay.load(folder / "replay.npz")
            if runner_state.get("phase_done"):
                # A phase boundary: this phase starts from the previous phase's final state.
                state = protocols.carry_over(phase.carry, state, fresh, agent.part_of)
                if not phase.keep_replay:
                    replay = new_replay()
            else:
                env_steps, updates = runner_state["env_steps"], runner_state["updates"]
                episodes_total = runner_state["episodes"]
                loop_key = jnp.asarray(runner_state["rng"], jnp.uint32)
                coverage = Coverage(**runner_state.get("coverage", {}))
        metrics_log, eval_log = self.metrics_log, self.eval_log
        tag = {"phase": phase.name, "phase_index": index}

        def sample(batch_size):
            batch = replay.sample(batch_size)
            return protocols.relabel(batch, task_index) if phase.keep_replay else batch

        def run_evaluations():
            """Every evaluation set in every mode; a set's result is its headline mode's
            summary (the first of `train.eval_modes`) with every mode's under `modes`."""
            results = {}
            for set_name, eval_set in phase.eval_sets.items():
                eval_recipe = env_recipe(config, eval_set.task, phase.env_kwargs, eval_set.kwargs)
                eval_seed = evaluation_seed(config.seed, set_name, eval_set.task, env_steps)
                by_mode = {}
                for mode in train.eval_modes:
                    summary = evaluate(agent, act, state, config, eval_seed, eval_recipe, mode)
                    eval_log.write(
                        {
                            **tag,
                            "eval_set": set_name,
                            "mode": mode,
                            "env_steps": env_steps,
                            "total_env_steps": self._total_steps + env_steps,
                            **summary,
                        }
                    )
                    by_mode[mode] = summary
                self.history["evals"] += 1
                headline = train.eval_modes[0]
                results[set_name] = {**by_mode[headline], "mode": headline, "modes": by_mode}
            return results

        def save_checkpoint(phase_done: bool):
            runner_state = {
                **tag,
                "phase_done": phase_done,
                "env_steps": env_steps,
                "updates": updates,
                "episodes": episodes_total,
                "rng": np.asarray(loop_key).tolist(),
                "offsets": {
                    "metrics": metrics_log.offset(),
                    "eval": eval_log.offset(),
                    "episodes": self.episodes_log.offset(),
                },
                "coverage": coverage.state(),
                "history": self.history,
            }
            total = self._total_steps + env_steps
            return checkpoint.save(
                self.out / "checkpoints",
                total,
                state,
                runner_state,
                replay.save,
                name=f"step-{total:012d}-phase{index}",
            )

        # Offline adaptation (zero-shot): the reward head learns the new task from the kept
        # replay, and the policy from it, before any environment step of this phase.
        if phase.offline_updates and env_steps == 0:
            if agent.adapt is None:
                raise protocols.ProtocolError(
                    f"phase {phase.name!r} adapts offline, but agent {config.agent!r} has no "
                    "world model whose reward head could be fitted"
                )
            if not replay.num_windows:
                raise protocols.ProtocolError(
                    f"phase {phase.name!r} adapts offline but the replay holds no sequences "
                    "(set keep_replay and run a phase before it)"
                )
            adapt = jax.jit(agent.adapt)
            adapt_metrics = []
            for _ in range(phase.offline_updates):
                loop_key, update_key = jax.random.split(loop_key)
                state, metrics = adapt(state, sample(train.batch_size), update_key)
                adapt_metrics.append(metrics)
            stacked = jax.device_get(adapt_metrics)
            record = {**tag, "env_steps": 0, "total_env_steps": self._total_steps,
                      "offline_updates": phase.offline_updates}  # fmt: skip
            for key in stacked[-1]:
                record[f"train/{key}"] = float(np.mean([m[key] for m in stacked]))
            metrics_log.write(record)

        final_evals: dict = {}
        if env_steps == 0 and phase.eval_sets and (train.eval_every or not phase.steps):
            final_evals = run_evaluations()  # The phase's starting point (jumpstart).

        if env_steps:
            envs.seed(seed + _RESEED_OFFSET * env_steps)
        timestep = envs.reset()
        carry = agent.initial_carry(num_envs)
        tracker = _EpisodeTracker(num_envs)
        recent_episodes: list[dict] = []
        update_metrics: list[dict] = []
        bar = None
        if self.progress and phase.steps:
            from tqdm import tqdm

            bar = tqdm(
                total=phase.steps,
                initial=env_steps,
                unit="step",
                file=sys.stderr,
                desc=f"{config.agent} on {config.env.name}: {phase.name}",
                dynamic_ncols=True,
            )
        started, steps_at_start = time.time(), env_steps
        replayed_per_update = train.batch_size * train.sequence_length
        action_spec = envs.action_spec()
        placeholder_action = np.zeros((num_envs,) + action_spec.shape, action_spec.dtype)

        while env_steps < phase.steps:
            loop_key, act_key = jax.random.split(loop_key)
            step = ActInput(
                env_base.agent_observation(timestep.observation), timestep.step_type == 0
            )
            if rollout:
                # On-policy: the step joins the replay before acting, so that every
                # `rollout` steps the update sees the rollout just collected, all of it acted
                # with the current parameters, with this step as the bootstrap row.
                replay.add(_replay_step(timestep, placeholder_action))
                if env_steps and (env_steps // num_envs) % rollout == 0:
                    loop_key, update_key = jax.random.split(loop_key)
                    state, metrics = update(state, replay.latest(rollout + 1), update_key)
                    updates += 1
                    update_metrics.append(metrics)
                action, carry = act(state, carry, step, act_key, "explore")
                action = np.asarray(action)
                replay.set_newest_action(action)
            else:
                action, carry = act(state, carry, step, act_key, "explore")
                action = np.asarray(action)
                replay.add(_replay_step(timestep, action))
            timestep = envs.step(action)
            env_steps += num_envs
            finished = tracker.observe(timestep)
            for record in finished:
                self.episodes_log.write(
                    {**tag, "total_env_steps": self._total_steps + env_steps, **record}
                )
            coverage.observe(timestep.observation)
            episodes_total += len(finished)
            recent_episodes += finished

            if (
                agent.learns
                and not rollout
                and env_steps >= train.learning_starts
                and replay.num_windows
            ):
                owed = int(env_steps * train.train_ratio / replayed_per_update) - updates
                for _ in range(max(owed, 0)):
                    loop_key, update_key = jax.random.split(loop_key)
                    state, metrics = update(state, sample(train.batch_size), update_key)
                    updates += 1
                    update_metrics.append(metrics)

            ended = env_steps >= phase.steps
            checkpoint_due = env_steps % train.checkpoint_every < num_envs and not ended
            # Metrics are also flushed at checkpoints, so a resumed run writes the same lines.
            if env_steps % train.log_every < num_envs or checkpoint_due or ended:
                record = {
                    **tag,
                    "env_steps": env_steps,
                    "total_env_steps": self._total_steps + env_steps,
                    "updates": updates,
                    "episodes": episodes_total,
                }
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

            if (
                train.eval_every
                and phase.eval_sets
                and (env_steps % train.eval_every < num_envs or ended)
            ):
                final_evals = run_evaluations()
                if bar is not None and "return_mean" in next(iter(final_evals.values())):
                    bar.set_postfix(
                        eval_return=f"{next(iter(final_evals.values()))['return_mean']:.2f}"
                    )

            if checkpoint_due:
                save_checkpoint(phase_done=False)
                envs.seed(seed + _RESEED_OFFSET * env_steps)
                timestep = envs.reset()
                tracker.reset()
            if bar is not None:
                bar.update(num_envs)
            if on_step is not None:
                on_step(self._total_steps + env_steps)
            total = self._total_steps + env_steps
            if stop_after is not None and total >= stop_after and not ended:
                if bar is not None:
                    bar.close()
                self.stopped_at = total
                return None
        if bar is not None:
            bar.close()

        summary = {
            "name": phase.name,
            "index": index,
            "env_steps": env_steps,
            "updates": updates,
            "episodes": episodes_total,
            **coverage.metrics(),
            "final_eval": final_evals,
            "training_episodes": self._phase_episodes(index, envs.tasks),
        }
        self.history["phases"] = self.history["phases"][:index] + [summary]
        folder = save_checkpoint(phase_done=True)
        checkpoint.link_copy(folder, self.out / f"phase{index}.ckpt")
        self.image_env = "image" in envs.observation_spec()
        envs.close()
        return state, replay, agent

    def _phase_episodes(self, index: int, tasks=None) -> dict:
        """The training episodes of phase `index`, summarized (from `episodes.jsonl`, so a
        resumed phase counts the episodes before the kill too): for reward-free phases this
        is how much the exploration achieved (e.g. the Crafter score of its episodes)."""
        self.episodes_log.offset()  # flush
        records = [json.loads(line) for line in (self.out / "episodes.jsonl").open()]
        return _summarize_episodes([r for r in records if r["phase_index"] == index], tasks)

    def _finish(self, state, replay, agent) -> dict:
        config, out = self.config, self.out
        phases_summary = self.history["phases"]
        summary = {
            "env_steps": sum(p["env_steps"] for p in phases_summary),
            "updates": sum(p["updates"] for p in phases_summary),
            "episodes": sum(p["episodes"] for p in phases_summary),
            "trial_id": config.trial_id(),
            "protocol": config.protocol.name,
            "phases": phases_summary,
        }
        if "from" in self.history:
            summary["from"] = self.history["from"]
        last = phases_summary[-1]["final_eval"] if phases_summary else {}
        if last:
            summary["final_eval"] = last.get("eval", next(iter(last.values())))
        score_key = scoring.score_key(config.env.name)
        if "train" in last and "test" in last:
            train_score, test_score = last["train"].get(score_key), last["test"].get(score_key)
            if train_score is not None and test_score is not None:
                summary["generalization_gap"] = {
                    "score": score_key,
                    "train": train_score,
                    "test": test_score,
                    "gap": train_score - test_score,
                }
        if config.protocol.name != "scratch":
            summary["transfer"] = self._transfer(score_key)
        train = config.train
        if (
            train.video
            and self.image_env
            and agent.open_loop is not None
            and replay.num_windows
            and train.sequence_length > 6
        ):
            video_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 999)
            video = _write_video(agent, state, replay, out, video_key)
            summary["video"] = {"path": "video.gif", **video}
        checkpoint.write_atomic(out / "done.json", (json.dumps(summary, indent=2) + "\n").encode())
        return summary

    def _transfer(self, score_key: str) -> dict:
        """Transfer metrics of the last phase against the matching scratch trial, if finished."""
        scratch = transfer.matching_scratch(self.out.parent, self.config)
        if scratch is None:
            return {"status": "no finished scratch trial with the same settings next to this one"}
        mine = [json.loads(line) for line in (self.out / "eval.jsonl").read_text().splitlines()]
        theirs = [json.loads(line) for line in (scratch / "eval.jsonl").read_text().splitlines()]
        last = len(self.phases) - 1
        mode = self.config.train.eval_modes[0]
        by_score = transfer.against_twin(
            mine, last, theirs, score_key, mode, self.config.protocol.threshold
        )
        if score_key not in by_score:
            return {"status": f"no {score_key} evaluations to compare"}
        out = {
            "phase": self.phases[last].name,
            "score": score_key,
            "mode": mode,
            "scratch_trial": scratch.name,
            **by_score[score_key],
        }
        if score_key != "return_mean" and "return_mean" in by_score:
            out["return"] = by_score["return_mean"]
        return out
