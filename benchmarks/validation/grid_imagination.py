"""Whether a grid trial's world model knows where the agent is, observed and imagined.

    python -m mbxfer.benchmarks.validation.grid_imagination results/<sweep>/<trial> [--episodes 32]

The checkpoint is the one `mbxfer eval` picks by default, restored as the runner built it
(`evaluate_trial.restore`). The agent plays `--episodes` whole episodes in its sampled mode
through its own `act`; beside it, the world model filters the same observations and actions
(`WorldModel.observe`). At every step the decoder reads the posterior, and the latent imagined
k = 1, 2, 3, 5 steps ahead of it with the actions the agent then took (`WorldModel.imagine`);
a latent "knows the cell" when the argmax of its decoded position one-hot is the agent's true
cell. Printed: the share of steps whose posterior knows the cell, and for each k the share of
imagined latents that know the cell reached, both over steps where the agent is off the
rewarded cells (a policy that sits in the goal corner would otherwise fill the count with one
easy cell). An actor-critic that learns in imagination can only steer by what these latents
carry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mbxfer.agents import world_model as world_model_lib
from mbxfer.agents.base import ActInput
from mbxfer.benchmarks import evaluate_trial
from mbxfer.benchmarks.validation import grid_policy
from mbxfer.envs import base as env_base

HORIZONS = (1, 2, 3, 5)


def _model(restored: evaluate_trial.Restored, env):
    """The trial's world model and its parameters; refuses agents without a decoder."""
    config = getattr(restored.agent.config, "model", None)
    params = getattr(restored.state, "model_params", None)
    if config is None or params is None or not config.decoder:
        raise SystemExit(
            f"grid_imagination reads a world model with a decoder (Dreamer's); agent "
            f"{restored.agent.name!r} of this trial has none"
        )
    spec = env_base.environment_spec(env)
    model = world_model_lib.make_world_model(config, spec.observations, spec.actions)
    return model, params


def play(restored: evaluate_trial.Restored, episodes: int, seed: int = 0) -> dict:
    """`episodes` sampled episodes played side by side: per step the true cell `[T, E]`,
    whether the agent stands on a rewarded cell `[T, E]`, the actions `[T, E]` and the model's
    posteriors (a `LatentState` with leaves `[T, E, ...]`)."""
    envs = grid_policy.grid_envs(restored, range(seed, seed + episodes), "grid_imagination")
    model, params = _model(restored, envs[0])
    size = envs[0].unwrapped.size
    timesteps = [env.reset() for env in envs]
    carry, first = restored.agent.initial_carry(episodes), np.ones(episodes, bool)
    state, prev_action = model.initial_state(episodes), jnp.zeros(episodes, jnp.int32)
    key = jax.random.PRNGKey(seed)
    found = {"cell": [], "rewarded": [], "action": [], "posterior": []}
    while not timesteps[0].last() or first[0]:
        observation = grid_policy.stacked([t.observation for t in timesteps])
        key, observe_key, act_key = jax.random.split(key, 3)
        embed = model.encode(params, observation)
        state, _ = model.observe(params, state, prev_action, embed, jnp.asarray(first), observe_key)
        action, carry = restored.act(
            restored.state, carry, ActInput(observation, first), act_key, "explore"
        )
        found["cell"].append([e.unwrapped.visited_cell() for e in envs])
        found["rewarded"].append([float(t.reward or 0.0) > 0 for t in timesteps])
        found["action"].append(np.asarray(action))
        found["posterior"].append(state)
        timesteps = [env.step(int(a)) for env, a in zip(envs, np.asarray(action))]
        prev_action, first = jnp.asarray(action), np.zeros(episodes, bool)
    cells = np.asarray(found["cell"])  # [T, E, 2]
    return {
        "cell": cells[..., 0] * size + cells[..., 1],
        "rewarded": np.asarray(found["rewarded"]),
        "action": np.asarray(found["action"]),
        "posterior": jax.tree.map(lambda *x: jnp.stack(x), *found["posterior"]),
        "model": model,
        "params": params,
        "size": size,
    }


def knows_the_cell(played: dict, horizons=HORIZONS) -> dict:
    """`{0: share, k: share, ...}`: over steps off the rewarded cells, the share whose posterior
    (0) or k-step imagined latent decodes the true cell, with the count of steps behind each."""
    model, params, size = played["model"], played["params"], played["size"]
    cells, rewarded, actions = played["cell"], played["rewarded"], played["action"]
    length = cells.shape[0]

    def decoded_cell(state):
        vector = model.decode(params, model.features(state))["vector"]
        return np.asarray(jnp.argmax(vector[..., : size * size], axis=-1))

    def share(predicted, true, off):
        return float(np.sum((predicted == true) & off) / max(np.sum(off), 1)), int(np.sum(off))

    found = {0: share(decoded_cell(played["posterior"]), cells, ~rewarded)}
    key = jax.random.PRNGKey(0)
    for k in horizons:
        # Explicit sizes: the deterministic latent's `stoch` has width 0, so -1 is ambiguous.
        flat = jax.tree.map(
            lambda x, n=length - k: x[:n].reshape((n * x.shape[1],) + x.shape[2:]),
            played["posterior"],
        )
        for step in range(k):
            action = actions[step : length - k + step].reshape(-1)
            key, imagine_key = jax.random.split(key)
            flat = model.imagine(params, flat, jnp.asarray(action), imagine_key)
        predicted = decoded_cell(flat).reshape(length - k, -1)
        found[k] = share(predicted, cells[k:], ~rewarded[k:])
    return found


def render(found: dict) -> str:
    lines = ["latents that decode the agent's true cell, off the rewarded cells:"]
    for k, (value, count) in found.items():
        name = "posterior (filtered)" if k == 0 else f"imagined {k} step{'s' * (k > 1)} ahead"
        lines.append(f"  {name:<24} {value:5.2f}  ({count} steps)")
    return "\n".join(lines)


def main(argv=None) -> int:
    count = ("--episodes", 32, "sampled episodes played")
    restored, args = grid_policy.restore_from_arguments(argv, __doc__, count)
    print(render(knows_the_cell(play(restored, args.episodes, args.seed))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
