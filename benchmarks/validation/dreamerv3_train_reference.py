"""Reference side of `dreamer_parity.py`: the official DreamerV3 (PyPI `dreamerv3==1.5.0`)
trained on one of OUR environments, with its own agent, replay and training loop.

Runs ONLY inside the reference venv (`benchmarks/perf/learner.py` builds it;
`dreamer_parity.py` adds dm-env, dm-acme and gymnasium to it so that `envs` imports) and is
started by `dreamer_parity.py`, never imported by the package or the tests.

    python dreamerv3_train_reference.py --repo /work/main --env grid \
        --task reach_bottom_right --env-kwargs '{"size": 5, "observation": "vector"}' \
        --seed 0 --steps 3000 --overrides '{"batch_size": 16, ...}'

The loop is `embodied.run.train` of the package (the same pieces in the same order:
random-policy prefill until the replay holds `max(batch_size * batch_length, run.train_fill)`
items, `embodied.when.Ratio(run.train_ratio / (batch_size * batch_length))` on the driver's
step counter, `agent.dataset(replay.dataset)`, `agent.train` per due update, `agent.sync`
every `run.sync_every` updates, policy mode `train`) without its logger (the TensorBoard
output imports tensorflow) and checkpoints; the only change is the stopping rule, which counts
real environment steps (actions taken) rather than the driver's steps, because the driver
also counts the observation returned by each reset as a step.

Output: one JSON object per line on stdout (the package's own prints go to stderr):
  {"event": "config", ...}                              once, after the agent is built;
  {"event": "episode", "return", "length", "env_steps", "driver_steps", "updates", "wall_s",
   "train_metrics"}                                    per finished training episode;
  {"event": "summary", "eval_returns": [...], "eval_return_mean", "env_steps", "updates",
   "wall_s", ...}                                       at the end: `--eval-episodes`
                                                        episodes acting with actions sampled
                                                        from the policy (mode `eval`, which
                                                        in 1.5.0 samples the task actor).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

_LOGGED_METRICS = r"(policy_entropy_mean|_loss_mean$|return_raw_mean|adv_mean|model_loss)"


def _protocol_stream():
    """A private handle on stdout for the protocol; fd 1 then points at stderr."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def make_adapter(embodied, np, dm_env_instance):
    """Our dm_env.Environment as an `embodied.Env` (obs `vector` + the flags, act `action`)."""
    from dm_env import specs

    class DmEnvAdapter(embodied.Env):
        def __init__(self, env):
            self._env = env
            self._done = True
            obs_spec = env.observation_spec()
            if "vector" not in obs_spec:
                raise ValueError(f"expected a `vector` observation, got {sorted(obs_spec)}")
            self._vector_shape = tuple(obs_spec["vector"].shape)
            act = env.action_spec()
            self._discrete = isinstance(act, specs.DiscreteArray)
            if self._discrete:
                self._action_space = embodied.Space(np.int32, (), 0, act.num_values)
            else:
                self._action_space = embodied.Space(np.float32, tuple(act.shape), -1.0, 1.0)

        @property
        def obs_space(self):
            return {
                "vector": embodied.Space(np.float32, self._vector_shape),
                "reward": embodied.Space(np.float32),
                "is_first": embodied.Space(bool),
                "is_last": embodied.Space(bool),
                "is_terminal": embodied.Space(bool),
            }

        @property
        def act_space(self):
            return {"action": self._action_space, "reset": embodied.Space(bool)}

        def step(self, action):
            if action["reset"] or self._done:
                self._done = False
                return self._obs(self._env.reset(), is_first=True)
            value = action["action"]
            value = int(value) if self._discrete else np.asarray(value, np.float32)
            timestep = self._env.step(value)
            self._done = timestep.last()
            return self._obs(
                timestep,
                is_last=bool(timestep.last()),
                # Truncation (time limit) ends with discount 1, termination with 0.
                is_terminal=bool(timestep.last() and float(timestep.discount) == 0.0),
            )

        def _obs(self, timestep, is_first=False, is_last=False, is_terminal=False):
            reward = 0.0 if timestep.reward is None else float(timestep.reward)
            return {
                "vector": np.asarray(timestep.observation["vector"], np.float32),
                "reward": np.float32(reward),
                "is_first": is_first,
                "is_last": is_last,
                "is_terminal": is_terminal,
            }

        def close(self):
            self._env.close()

    return DmEnvAdapter(dm_env_instance)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", required=True, help="the mbxfer checkout (for `envs`)")
    parser.add_argument("--env", required=True)
    parser.add_argument("--task", default=None)
    parser.add_argument("--env-kwargs", default="{}", help="JSON keywords of registry.make")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, required=True, help="real environment steps")
    parser.add_argument("--num-envs", type=int, default=4)
    parser.add_argument("--eval-episodes", type=int, default=32)
    parser.add_argument("--blocks", default="", help="configs.yaml blocks after `defaults`")
    parser.add_argument("--overrides", default="{}", help="JSON {dotted.key: value}, last")
    args = parser.parse_args(argv)
    protocol = _protocol_stream()
    started = time.time()

    sys.path.insert(0, args.repo)
    import numpy as np

    np.random.seed(args.seed)  # embodied's RandomAgent and OneHotAction sample from np.random.
    import dreamerv3
    import embodied

    from mbxfer.envs import registry

    config = embodied.Config(dreamerv3.configs["defaults"])
    for block in filter(None, args.blocks.split(",")):
        config = config.update(dreamerv3.configs[block])
    config = config.update(json.loads(args.overrides))
    config = config.update({"seed": args.seed, "envs.amount": args.num_envs})

    env_kwargs = json.loads(args.env_kwargs)

    def make_env(index: int, offset: int):
        env = registry.make(args.env, task=args.task, **env_kwargs)
        env.seed(args.seed * 1000 + offset + index)
        return dreamerv3.wrap_env(make_adapter(embodied, np, env), config)

    env = embodied.BatchEnv([make_env(i, 0) for i in range(args.num_envs)], parallel=False)
    batch_steps = config.batch_size * config.batch_length
    replay = embodied.replay.Uniform(
        config.batch_length,
        int(config.replay_size),
        None,
        online=config.replay_online,
        seed=args.seed,
    )
    step = embodied.Counter()  # The driver's steps, as DreamerV3 counts them.
    agent = dreamerv3.Agent(env.obs_space, env.act_space, step, config)
    from dreamerv3 import jaxutils

    counts = {k.split("/")[-1]: int(v) for k, v in jaxutils.Optimizer.PARAM_COUNTS.items()}
    protocol.write(
        json.dumps(
            {
                "event": "config",
                "params": sum(counts.values()),
                "params_by_optimizer": counts,
                "config": json.loads(json.dumps(dict(config), default=str)),
                "obs_space": {k: str(v) for k, v in env.obs_space.items()},
                "act_space": {k: str(v) for k, v in env.act_space.items()},
            }
        )
        + "\n"
    )

    real_steps = [0]
    last_metrics: dict = {}  # The latest scalar training metrics (every `jax.metrics_every`).
    updates = embodied.Counter()

    def per_episode(ep):
        protocol.write(
            json.dumps(
                {
                    "event": "episode",
                    "return": float(ep["reward"].astype(np.float64).sum()),
                    "length": len(ep["reward"]) - 1,
                    "env_steps": real_steps[0],
                    "driver_steps": int(step),
                    "updates": int(updates),
                    "wall_s": time.time() - started,
                    "train_metrics": dict(last_metrics),
                }
            )
            + "\n"
        )

    def count(tran, worker):
        step.increment()
        if not tran["is_first"]:
            real_steps[0] += 1

    driver = embodied.Driver(env)
    driver.on_step(count)
    driver.on_step(replay.add)
    driver.on_episode(lambda ep, worker: per_episode(ep))

    random_agent = embodied.RandomAgent(env.act_space)
    while len(replay) < max(batch_steps, config.run.train_fill) and real_steps[0] < args.steps:
        driver(random_agent.policy, steps=args.num_envs)
    prefill_steps = real_steps[0]

    should_train = embodied.when.Ratio(config.run.train_ratio / batch_steps)
    should_sync = embodied.when.Every(config.run.sync_every)
    dataset = agent.dataset(replay.dataset)
    state = [None]
    train_seconds = [0.0]

    def train_step(tran, worker):
        for _ in range(should_train(step)):
            start = time.perf_counter()
            batch = next(dataset)
            _, state[0], mets = agent.train(batch, state[0])
            for key, value in mets.items():
                if re.search(_LOGGED_METRICS, key) and np.ndim(value) == 0:
                    last_metrics[key] = float(value)
            train_seconds[0] += time.perf_counter() - start
            updates.increment()
        if should_sync(updates):
            agent.sync()

    driver.on_step(train_step)

    def policy(obs, policy_state):
        return agent.policy(obs, policy_state, mode="train")

    while real_steps[0] < args.steps:
        driver(policy, steps=args.num_envs)
    train_wall = time.time() - started

    # Evaluation: fresh environments (other seeds), actions sampled from the policy.
    eval_env = embodied.BatchEnv([make_env(i, 500) for i in range(args.num_envs)], parallel=False)
    returns: list[float] = []
    eval_driver = embodied.Driver(eval_env)
    eval_driver.on_episode(
        lambda ep, worker: returns.append(float(ep["reward"].astype(np.float64).sum()))
    )

    def eval_policy(obs, policy_state):
        return agent.policy(obs, policy_state, mode="eval")

    while len(returns) < args.eval_episodes:
        eval_driver(eval_policy, episodes=1)
    returns = returns[: args.eval_episodes]
    protocol.write(
        json.dumps(
            {
                "event": "summary",
                "eval_returns": returns,
                "eval_return_mean": float(np.mean(returns)),
                "env_steps": real_steps[0],
                "driver_steps": int(step),
                "prefill_env_steps": prefill_steps,
                "updates": int(updates),
                "train_update_seconds": train_seconds[0],
                "train_wall_s": train_wall,
                "wall_s": time.time() - started,
                "params": sum(counts.values()),
            }
        )
        + "\n"
    )
    env.close()
    eval_env.close()


if __name__ == "__main__":
    main()
