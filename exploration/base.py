"""The intrinsic-exploration contract, and reward mixing. Read this first.

An intrinsic reward module works on world-model features, so any agent with a world model can
use it; it imports nothing of `agents`.

    module = exploration.make(config, feature_size, action_size)
    state = module.init(rng)                                  # params + normalization stats
    r = module.reward(state, features, action, next_features)         # [N], normalized
    (loss, metrics), grads = jax.value_and_grad(module.loss, has_aux=True)(state.params, batch)
    state = module.update_stats(state._replace(params=new_params), batch)

`batch` is a `Transitions` of `[N, ...]` arrays. Reward mixing lives in one place, `mix`:
`reward = extrinsic_scale * task_reward + intrinsic_scale * intrinsic_reward`, so reward-free
pretraining is `extrinsic_scale = 0` on an environment made with `task=None`.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Callable, Literal, Mapping, NamedTuple

import chex
import jax
import jax.numpy as jnp

from mbxfer import domains
from mbxfer.domains import at_least, non_negative, positive, unit_interval

Array = chex.Array
MODULES = ("none", "disagreement", "rnd")


@dataclasses.dataclass(frozen=True)
class ExplorationConfig:
    """Which intrinsic reward drives exploration, and how rewards are mixed."""

    module: Literal["none", "disagreement", "rnd"] = "none"
    """`disagreement`: ensemble disagreement (Plan2Explore); `rnd`: random network
    distillation; `none`: no intrinsic reward (the module is not built)."""
    extrinsic_scale: Annotated[float, non_negative] = 1.0
    """Weight of the task reward: 0 for reward-free pretraining."""
    intrinsic_scale: Annotated[float, non_negative] = 0.0
    """Weight of the intrinsic reward; 0 leaves the agent exactly extrinsic-only."""
    ensemble_size: Annotated[int, at_least(2)] = 5
    """Disagreement: number of one-step predictors."""
    hidden: Annotated[int, positive] = 128
    """Width of the predictor (and RND target) MLPs."""
    layers: Annotated[int, non_negative] = 2
    """Hidden layers of the predictor (and RND target) MLPs."""
    rnd_output_size: Annotated[int, positive] = 64
    """RND: size of the random target embedding."""
    learning_rate: Annotated[float, positive] = 3e-4
    """Adam learning rate of the module's trained networks."""
    normalization_decay: Annotated[float, unit_interval] = 0.99
    """Decay of the running moments that normalize intrinsic rewards (`rlax.create_ema`)."""

    def __post_init__(self):
        domains.check(self)
        if self.intrinsic_scale and self.module == "none":
            raise ValueError(
                "intrinsic_scale is non-zero but module='none': choose 'disagreement' or 'rnd'"
            )


class Transitions(NamedTuple):
    """One-step transitions in feature space, `[N, ...]`.

    Attributes:
      features: `[N, F]` features of the state the action was taken in.
      action: `[N, A]` float action (one-hot for discrete actions).
      next_features: `[N, F]` features of the resulting state (the prediction target).
    """

    features: Array
    action: Array
    next_features: Array


class ExplorationState(NamedTuple):
    """Trained parameters and the running moments of the raw intrinsic reward."""

    params: Any
    stats: Any  # rlax.EmaState


class ExplorationModule(NamedTuple):
    """An intrinsic reward as pure functions; see the module docstring."""

    name: str
    config: ExplorationConfig
    init: Callable[[chex.PRNGKey], ExplorationState]
    reward: Callable[[ExplorationState, Array, Array, Array], Array]
    loss: Callable[[Any, Transitions], "tuple[Array, Mapping[str, Array]]"]
    update_stats: Callable[[ExplorationState, Transitions], ExplorationState]


def mix(config: ExplorationConfig, extrinsic: Array, intrinsic: Array | None) -> Array:
    """`extrinsic_scale * extrinsic + intrinsic_scale * intrinsic`: THE reward mix."""
    reward = config.extrinsic_scale * extrinsic
    if intrinsic is not None and config.intrinsic_scale:
        reward = reward + config.intrinsic_scale * intrinsic
    return reward


def normalized(stats, raw: Array) -> Array:
    """`raw / std(raw)` under the running moments (no mean shift: rewards stay >= 0).

    Before the first statistics update (`decay_product == 1`) the raw reward is returned.
    """
    moments = stats.debiased_moments()
    std = jnp.maximum(jnp.sqrt(moments.variance), 1e-3)
    return jnp.where(stats.decay_product < 1.0, raw / std, raw)


def reward_statistics(name: str, reward: Array) -> dict[str, Array]:
    """Metrics that show the intrinsic reward during updates."""
    return {
        f"intrinsic/{name}_mean": jnp.mean(reward),
        f"intrinsic/{name}_std": jnp.std(reward),
        f"intrinsic/{name}_max": jnp.max(reward),
    }


def mlp(hidden: int, layers: int, output: int, name: str):
    """Linear -> LayerNorm -> SiLU hidden layers and a linear output (inside a Haiku transform)."""
    import haiku as hk

    modules = []
    for i in range(layers):
        modules += [
            hk.Linear(hidden, name=f"{name}_linear_{i}"),
            hk.LayerNorm(-1, True, True, name=f"{name}_norm_{i}"),
            jax.nn.silu,
        ]
    return hk.Sequential(modules + [hk.Linear(output, name=f"{name}_output")], name=name)


def stop_gradient_transitions(batch: Transitions) -> Transitions:
    return jax.tree.map(jax.lax.stop_gradient, batch)


def sequence_transitions(features: Array, actions: Array) -> Transitions:
    """The one-step transitions of replayed sequences, flattened to `[B * (T - 1), ...]`.

    `features` `[B, T, F]` (stop-gradient), `actions` `[B, T, A]` float (one-hot if discrete):
    the action at row t leads from row t to row t + 1. Pairs that cross an episode start are
    included; they are a small fraction and only make the predictors slightly noisier.
    """
    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
    features = jax.lax.stop_gradient(features)
    return Transitions(
        flat(features[:, :-1]), flat(actions[:, :-1].astype(jnp.float32)), flat(features[:, 1:])
    )


def attach(agent_state, module: ExplorationModule, optimizer, rng):
    """`agent_state` with the module's fresh state and optimizer state in its `exploration` and
    `exploration_opt` fields. The module's key is folded from `rng`, not split off it, so every
    other key of the agent stays what it is without exploration (`intrinsic_scale=0` then gives
    exactly the extrinsic-only agent)."""
    state = module.init(jax.random.fold_in(rng, 17))
    return agent_state._replace(exploration=state, exploration_opt=optimizer.init(state.params))


def train_step(module: ExplorationModule, optimizer, state: ExplorationState, opt_state, batch):
    """One optimizer step of the module on `batch`, then its reward statistics.

    Returns `(state, opt_state, metrics)`; the metrics include the intrinsic reward of the
    batch after the step (`reward_statistics`). Shared by every agent that has a module.
    """
    import optax

    (_, metrics), grads = jax.value_and_grad(module.loss, has_aux=True)(state.params, batch)
    updates, opt_state = optimizer.update(grads, opt_state)
    state = module.update_stats(
        state._replace(params=optax.apply_updates(state.params, updates)), batch
    )
    replayed = module.reward(state, batch.features, batch.action, batch.next_features)
    return state, opt_state, {**metrics, **reward_statistics(module.name, replayed)}
