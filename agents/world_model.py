"""THE shared world model: encode, observe (filter), imagine (one step), heads and losses.

Both agents build it with `make_world_model(config, observation_spec, action_spec)`, which
returns a `WorldModel` of pure, jittable functions over one Haiku parameter tree (types in
`world_model_types.py`, dynamics in `latent.py`, loss terms in `world_model_losses.py`). Those
functions are the module-level functions below with their `WorldModelNetworks` (the Haiku
networks and static facts, built once by `make_networks`) bound first, so each step and the
loss can also be called and tested on its own.

Batch format (what `agents.replay.Replay.sample` returns; batch-major `[B, T, ...]`):
  observation: dict of `[B, T, ...]`: `image` uint8 `[B, T, H, W, 3]` and/or `vector` float32
    `[B, T, V]`; `log_*` keys (e.g. `log_task_rewards`) may be present and are ignored.
  action: int `[B, T]` (discrete) or float32 `[B, T, A]` (continuous, in [-1, 1]).
    `action[:, t]` is the action TAKEN AT observation t, so the model filters step t with
    `action[:, t-1]` (zeros where `is_first`, and before the first step of the batch).
  reward: float32 `[B, T]`, received on arriving at observation t (0 where `is_first`).
  discount: float32 `[B, T]`, 0 where observation t is terminal.
  is_first, is_last, is_terminal: bool `[B, T]`. A window may span an episode boundary: the
    model resets its state where `is_first`.

Sequences in and out of `observe_sequence`, `loss` and `open_loop` are batch-major too.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from dm_env import specs

from mbxfer.agents import latent, networks
from mbxfer.agents.world_model_losses import LOSS_TERMS
from mbxfer.agents.world_model_types import (
    PROJECTION_HEADS,
    Array,
    Batch,
    HeadOutputs,
    LatentState,
    LossConfig,
    LossContext,
    LossTerm,
    Observation,
    Params,
    WorldModel,
    WorldModelConfig,
)

__all__ = [
    "HeadOutputs",
    "LatentState",
    "LossConfig",
    "LossContext",
    "WorldModel",
    "WorldModelConfig",
    "make_world_model",
    "ModelFunctions",
    "WorldModelNetworks",
    "make_networks",
    "as_world_model",
    "action_input",
    "observe",
    "observe_sequence",
    "sum_loss_terms",
    "loss",
    "open_loop",
    "open_loop_error",
    "FilterCarry",
    "initial_filter_carry",
    "filter_step",
]


def _action_info(action_spec: specs.Array) -> tuple[bool, int]:
    """(discrete, action size) of a `DiscreteArray` or a 1-D `BoundedArray` in [-1, 1]."""
    if isinstance(action_spec, specs.DiscreteArray):
        return True, int(action_spec.num_values)
    if isinstance(action_spec, specs.BoundedArray) and len(action_spec.shape) == 1:
        if np.any(action_spec.minimum != -1.0) or np.any(action_spec.maximum != 1.0):
            raise ValueError(f"continuous actions must be bounded in [-1, 1], got {action_spec}")
        return False, int(action_spec.shape[0])
    raise ValueError(f"unsupported action spec {action_spec!r}: need DiscreteArray or 1-D [-1, 1]")


class ModelFunctions(NamedTuple):
    """The Haiku functions of the world model, sharing one set of modules; in
    `WorldModelNetworks.transformed.apply` each takes `params` first."""

    encoder: Callable[..., Array]
    """`(observation) -> embed [..., E]` (agent keys only)."""
    observe: Callable[..., "tuple[LatentState, LatentState]"]
    """`(state, action_input, embed, rng) -> (posterior, prior)`, no reset at `is_first`."""
    imagine: Callable[..., LatentState]
    """`(state, action_input, rng) -> prior`."""
    heads: Callable[[Array], HeadOutputs]
    """`(features) -> HeadOutputs`."""
    project: Callable[[str, Array], Array]
    """`(head, inputs) -> [..., P]` (see `PROJECTION_HEADS`)."""


def _build(config: WorldModelConfig, observation_shapes: Mapping[str, tuple[int, ...]]):
    """The Haiku multi-transform body: one set of modules shared by every function."""
    hidden = [config.hidden] * config.mlp_layers
    encoder = networks.ObservationEncoder(
        config.encoder_depth, hidden, config.min_resolution, conv=config.conv, name="encoder"
    )
    core = latent.make_core(config)
    reward_head = networks.MLP(hidden, config.reward_bins, zero_output=True, name="reward_head")
    continuation_head = networks.MLP(hidden, 1, name="continuation_head")
    decoder = None
    if config.decoder:
        decoder = networks.ObservationDecoder(
            observation_shapes,
            config.encoder_depth,
            hidden,
            config.min_resolution,
            upsample=config.decoder_upsample,
            conv=config.conv,
            name="decoder",
        )

    # Projection heads exist only for the self-supervised terms that are on.
    enabled = {
        "contrastive": config.losses.contrastive,
        "predictive": config.losses.self_predictive,
    }
    projections = {
        name: networks.MLP([config.hidden], config.losses.projection_size, name=name)
        for name in PROJECTION_HEADS
        if enabled[name.split("_")[0]]
    }

    def heads(features: Array) -> HeadOutputs:
        return HeadOutputs(
            reward_logits=reward_head(features),
            continuation_logit=continuation_head(features)[..., 0],
            observation=decoder(features) if decoder is not None else {},
        )

    def project(head: str, inputs: Array) -> Array:
        if head not in projections:
            raise ValueError(
                f"no projection head {head!r}: the contrastive_* heads exist only when "
                "losses.contrastive is non-zero, the predictive_* ones when "
                "losses.self_predictive is"
            )
        return projections[head](inputs)

    def init(observation, state, action, rng):
        embed = encoder(observation)
        posterior, _ = core.observe(state, action, embed, rng)
        features = latent.features(posterior)
        if "contrastive_latent" in projections:
            project("contrastive_latent", features)
            project("contrastive_embed", embed)
        if "predictive_projection" in projections:
            project("predictive_predictor", project("predictive_projection", features))
        return heads(features)

    return init, ModelFunctions(encoder, core.observe, core.imagine, heads, project)


def _mask_first(tree: Any, is_first: Array) -> Any:
    """Zeroes every `[B, ...]` leaf where `is_first` (the initial state is all zeros)."""
    keep = 1.0 - jnp.asarray(is_first, jnp.float32)
    return jax.tree.map(lambda x: x * keep.reshape(keep.shape + (1,) * (x.ndim - 1)), tree)


def _time_major(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), tree)


class WorldModelNetworks(NamedTuple):
    """The world model's Haiku networks and static facts, built once by `make_networks`; every
    function below takes them as its first argument."""

    config: WorldModelConfig
    transformed: hk.MultiTransformed
    """`init(rng, observation, state, action, rng)`; `apply` is a `ModelFunctions`."""
    observation_shapes: Mapping[str, tuple[int, ...]]
    """Shape of each observation key the model reads (no `log_*` keys), without batch axes."""
    observation_dtypes: Mapping[str, Any]
    discrete: bool
    action_size: int
    reward_bins: jax.Array
    """`[K]` two-hot bins of the reward head (symlog space)."""
    loss_terms: Mapping[str, "tuple[float, LossTerm]"]
    """Every term with a non-zero scale: name -> (scale, term), in `LossConfig` order."""


def make_networks(
    config: WorldModelConfig,
    observation_spec: Mapping[str, specs.Array],
    action_spec: specs.Array,
    loss_terms: Mapping[str, LossTerm] = LOSS_TERMS,
) -> WorldModelNetworks:
    """The Haiku networks for these specs and the loss terms whose scale is non-zero.

    `observation_spec` may contain `log_*` keys (ignored). `loss_terms` maps every loss name
    with a non-zero scale in `config.losses` to its term (`world_model_losses.LOSS_TERMS`).
    """
    observation_shapes = {
        key: tuple(observation_spec[key].shape) for key in networks.agent_keys(observation_spec)
    }
    observation_dtypes = {key: observation_spec[key].dtype for key in observation_shapes}
    discrete, action_size = _action_info(action_spec)
    scales = {name: scale for name, scale in config.losses.scales().items() if scale != 0}
    missing = sorted(set(scales) - set(loss_terms))
    if missing:
        raise ValueError(f"no loss term registered for {missing}; known: {sorted(loss_terms)}")
    transformed = hk.without_apply_rng(
        hk.multi_transform(functools.partial(_build, config, observation_shapes))
    )
    return WorldModelNetworks(
        config=config,
        transformed=transformed,
        observation_shapes=observation_shapes,
        observation_dtypes=observation_dtypes,
        discrete=discrete,
        action_size=action_size,
        reward_bins=networks.symlog_bins(config.reward_bins),
        loss_terms={name: (scale, loss_terms[name]) for name, scale in scales.items()},
    )


def action_input(nets: WorldModelNetworks, action: Array) -> jax.Array:
    """int `[...]` -> one-hot `[..., A]` for discrete actions; float `[..., A]` passes through."""
    action = jnp.asarray(action)
    if nets.discrete and jnp.issubdtype(action.dtype, jnp.integer):
        return jax.nn.one_hot(action, nets.action_size, dtype=jnp.float32)
    chex.assert_axis_dimension(action, action.ndim - 1, nets.action_size)
    return action.astype(jnp.float32)


def initial_state(nets: WorldModelNetworks, batch_size: int) -> LatentState:
    """The all-zero state `[batch_size, ...]` that `is_first` resets to."""
    return latent.initial_state(nets.config, batch_size)


def init(nets: WorldModelNetworks, rng: chex.PRNGKey) -> Params:
    """Every parameter of the model (projection heads only for the terms that are on)."""
    observation = {
        key: jnp.zeros((1,) + shape, nets.observation_dtypes[key])
        for key, shape in nets.observation_shapes.items()
    }
    action = jnp.zeros((1, nets.action_size), jnp.float32)
    return nets.transformed.init(rng, observation, initial_state(nets, 1), action, rng)


def encode(nets: WorldModelNetworks, params: Params, observation: Observation) -> jax.Array:
    """`embed [..., E]` of the observation keys the model reads (others are dropped)."""
    observation = {key: observation[key] for key in nets.observation_shapes}
    return nets.transformed.apply.encoder(params, observation)


def observe(
    nets: WorldModelNetworks,
    params: Params,
    state: LatentState,
    prev_action: Array,
    embed: Array,
    is_first: Array,
    rng: chex.PRNGKey,
) -> tuple[LatentState, LatentState]:
    """One filtering step `[B, ...]` -> `(posterior, prior)`; where `is_first` the state and
    the previous action are zeroed first."""
    chex.assert_rank(is_first, 1)
    chex.assert_rank(embed, 2)
    state = _mask_first(state, is_first)
    prev_action = _mask_first(action_input(nets, prev_action), is_first)
    return nets.transformed.apply.observe(params, state, prev_action, embed, rng)


def observe_sequence(
    nets: WorldModelNetworks,
    params: Params,
    state: LatentState,
    actions: Array,
    embeds: Array,
    is_first: Array,
    rng: chex.PRNGKey,
    prev_action: Array | None = None,
) -> tuple[LatentState, LatentState]:
    """`observe` scanned over `[B, T, ...]`: step t is filtered with `actions[:, t-1]` (and
    `prev_action`, default zeros, at t=0); one key of `split(rng, T)` per step."""
    chex.assert_rank(is_first, 2)
    chex.assert_rank(embeds, 3)
    actions = action_input(nets, actions)
    batch_size, length = is_first.shape
    if prev_action is None:
        first_action = jnp.zeros((batch_size, nets.action_size), jnp.float32)
    else:
        first_action = action_input(nets, prev_action)
    prev_actions = jnp.concatenate([first_action[:, None], actions[:, :-1]], axis=1)

    def step(state, inputs):
        prev_action, embed, first, key = inputs
        posterior, prior = observe(nets, params, state, prev_action, embed, first, key)
        return posterior, (posterior, prior)

    inputs = (*_time_major((prev_actions, embeds, is_first)), jax.random.split(rng, length))
    _, (posteriors, priors) = jax.lax.scan(step, state, inputs)
    return _time_major(posteriors), _time_major(priors)


def imagine(
    nets: WorldModelNetworks, params: Params, state: LatentState, action: Array, rng: chex.PRNGKey
) -> LatentState:
    """One step of the prior dynamics from `state` `[B, ...]` taking `action`."""
    return nets.transformed.apply.imagine(params, state, action_input(nets, action), rng)


def reward(nets: WorldModelNetworks, params: Params, features: Array) -> jax.Array:
    """The reward head's two-hot prediction decoded to a reward `[...]`."""
    reward_logits = nets.transformed.apply.heads(params, features).reward_logits
    return networks.two_hot_decode(reward_logits, nets.reward_bins)


def continuation(nets: WorldModelNetworks, params: Params, features: Array) -> jax.Array:
    """P(episode continues) `[...]` from the continuation head."""
    return jax.nn.sigmoid(nets.transformed.apply.heads(params, features).continuation_logit)


def decode(nets: WorldModelNetworks, params: Params, features: Array) -> dict[str, jax.Array]:
    """The decoded observation: `image` clipped to [0, 1], `vector` back from symlog space."""
    if not nets.config.decoder:
        raise ValueError("decode needs a decoder (config.decoder=True)")
    predicted = dict(nets.transformed.apply.heads(params, features).observation)
    if networks.IMAGE_KEY in predicted:
        predicted[networks.IMAGE_KEY] = jnp.clip(predicted[networks.IMAGE_KEY], 0.0, 1.0)
    if networks.VECTOR_KEY in predicted:
        predicted[networks.VECTOR_KEY] = networks.symexp(predicted[networks.VECTOR_KEY])
    return predicted


def sum_loss_terms(
    loss_terms: Mapping[str, "tuple[float, LossTerm]"], context: LossContext
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`(total, metrics)`: `total = sum(scale * mean(term(context)))` over `loss_terms`
    (name -> (scale, term)), in their order; metrics hold `loss/<name>` (the unscaled mean),
    each term's extra metrics and `loss/total`."""
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for name, (scale, term) in loss_terms.items():
        per_step, extra_metrics = term(context)
        value = jnp.mean(per_step)
        total = total + scale * value
        metrics[f"loss/{name}"] = value
        metrics.update(extra_metrics)
    metrics["loss/total"] = total
    return total, metrics


def loss(
    nets: WorldModelNetworks,
    params: Params,
    batch: Batch,
    state: LatentState,
    rng: chex.PRNGKey,
    target_params: Params | None = None,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], LatentState, LatentState]]:
    """`(total, (metrics, posteriors [B, T, ...], last_state [B, ...]))`.

    `state` is the latent before the batch's first step: `initial_state(B)` for windows
    sampled at random (step 0 then starts afresh), or a previous call's `last_state` for
    consecutive chunks. Differentiate with `jax.value_and_grad(loss, has_aux=True)`.
    """
    chex.assert_rank(batch["reward"], 2)
    chex.assert_equal_shape([batch["reward"], batch["is_first"], batch["is_terminal"]])
    observe_rng, terms_rng = jax.random.split(rng)
    embeds = encode(nets, params, batch["observation"])
    posteriors, priors = observe_sequence(
        nets, params, state, batch["action"], embeds, batch["is_first"], observe_rng
    )
    features = latent.features(posteriors)
    context = LossContext(
        model=as_world_model(nets),
        config=nets.config,
        params=params,
        target_params=jax.lax.stop_gradient(params) if target_params is None else target_params,
        batch=batch,
        embeds=embeds,
        posteriors=posteriors,
        priors=priors,
        features=features,
        heads=nets.transformed.apply.heads(params, features),
        rng=terms_rng,
        initial_state=state,
    )
    total, metrics = sum_loss_terms(nets.loss_terms, context)
    last_state = jax.lax.stop_gradient(jax.tree.map(lambda x: x[:, -1], posteriors))
    return total, (metrics, posteriors, last_state)


def open_loop(
    nets: WorldModelNetworks,
    params: Params,
    batch: Batch,
    context: int,
    horizon: int,
    rng: chex.PRNGKey,
) -> dict[str, jax.Array]:
    """Decoded observations `[B, horizon, ...]` for steps `context .. context+horizon-1`,
    imagined from the posterior after the first `context` real steps using the batch's
    actions. `context` and `horizon` are Python ints (static under `jax.jit`). Episode
    boundaries inside the horizon are not reset."""
    length = batch["reward"].shape[1]
    if context < 1 or horizon < 1 or context + horizon > length:
        raise ValueError(f"need 1 <= context, 1 <= horizon, context + horizon <= {length}")
    observe_rng, imagine_rng = jax.random.split(rng)
    observation = {key: value[:, :context] for key, value in batch["observation"].items()}
    posteriors, _ = observe_sequence(
        nets,
        params,
        initial_state(nets, batch["reward"].shape[0]),
        batch["action"][:, :context],
        encode(nets, params, observation),
        batch["is_first"][:, :context],
        observe_rng,
    )
    start = jax.tree.map(lambda x: x[:, -1], posteriors)
    actions = _time_major(batch["action"][:, context - 1 : context - 1 + horizon])

    def step(state, inputs):
        prior = imagine(nets, params, state, *inputs)
        return prior, prior

    _, priors = jax.lax.scan(step, start, (actions, jax.random.split(imagine_rng, horizon)))
    return decode(nets, params, latent.features(_time_major(priors)))


def as_world_model(nets: WorldModelNetworks) -> WorldModel:
    """The `WorldModel` table of the functions above with `nets` bound."""

    def bind(function):
        return functools.partial(function, nets)

    return WorldModel(
        init=bind(init),
        initial_state=bind(initial_state),
        encode=bind(encode),
        observe=bind(observe),
        observe_sequence=bind(observe_sequence),
        imagine=bind(imagine),
        features=latent.features,
        heads=nets.transformed.apply.heads,
        reward=bind(reward),
        continuation=bind(continuation),
        decode=bind(decode),
        project=nets.transformed.apply.project,
        loss=bind(loss),
        open_loop=bind(open_loop),
        config=nets.config,
        action_size=nets.action_size,
        discrete=nets.discrete,
    )


def make_world_model(
    config: WorldModelConfig,
    observation_spec: Mapping[str, specs.Array],
    action_spec: specs.Array,
    loss_terms: Mapping[str, LossTerm] = LOSS_TERMS,
) -> WorldModel:
    """The world model's pure functions (`WorldModel`) over `make_networks(...)`'s networks."""
    return as_world_model(make_networks(config, observation_spec, action_spec, loss_terms))


def open_loop_error(
    predicted: Mapping[str, Array], batch: Batch, context: int, key: str = networks.IMAGE_KEY
) -> jax.Array:
    """Per-step mean squared error `[horizon]` of `open_loop` predictions against the batch.

    Images are compared in [0, 1] units, vectors in their own units.
    """
    prediction = predicted[key]
    horizon = prediction.shape[1]
    truth = batch["observation"][key][:, context : context + horizon]
    if key == networks.IMAGE_KEY:
        truth = networks.image_to_float(truth)
    chex.assert_equal_shape([prediction, truth])
    error = jnp.square(prediction - jnp.asarray(truth, jnp.float32))
    return error.reshape(error.shape[:2] + (-1,)).mean(axis=(0, 2))


class FilterCarry(NamedTuple):
    """Acting state per environment: the filtered latent and the previous action."""

    latent: LatentState
    prev_action: jax.Array
    """`[N]` int (discrete) or `[N, A]` float (continuous)."""


def initial_filter_carry(model: WorldModel, num_envs: int) -> FilterCarry:
    """The carry agents start acting from (reset again wherever `is_first`)."""
    if model.discrete:
        prev_action = jnp.zeros((num_envs,), jnp.int32)
    else:
        prev_action = jnp.zeros((num_envs, model.action_size), jnp.float32)
    return FilterCarry(model.initial_state(num_envs), prev_action)


def filter_step(
    model: WorldModel, params: Params, carry: FilterCarry, observation, is_first, rng
) -> LatentState:
    """The posterior of one real acting step `[N, ...]`: what every agent's policy reads."""
    embed = model.encode(params, observation)
    posterior, _ = model.observe(params, carry.latent, carry.prev_action, embed, is_first, rng)
    return posterior
