"""Dreamer-style agent: the shared world model plus an actor-critic learned in imagination.

Follows DreamerV3 (Hafner et al. 2023) at small, CPU-friendly sizes:
* the world model is `agents.world_model` (trained on replayed sequences);
* from every posterior of the batch the actor imagines `horizon` steps with the prior
  dynamics; rewards and continuations come from the model's heads;
* lambda-returns (`rlax.lambda_returns`) over the imagined trajectory are the critic's
  targets (two-hot in symlog space) and, normalized by an EMA of their 5th-95th percentile
  range (never scaled up), the actor's REINFORCE advantages, with an entropy bonus;
* a slow critic (EMA of the critic) bootstraps the returns and regularizes the critic.

`explore` samples actions from the actor; `eval` takes its mode (argmax or the mean).

`actor_critic.source="replay"` learns the same actor-critic on the replayed sequences
instead: the posteriors of the batch, the real rewards and the real continuations, with the
lambda-returns cut at episode boundaries. Registered with no dynamics loss as the model-free
control `dreamer_nomodel` (`DreamerNoModelConfig`; design in `agents/nomodel.py`): there the
actor and critic losses also train the representation (encoder + filter), the reward and
continuation heads that nothing reads are not built, and there is no `adapt`. The replayed
actions come from older policies and the replay stores no behaviour probabilities, so the
actor's REINFORCE term has no off-policy correction (as the critic's returns have none).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Annotated, Literal, NamedTuple, Optional

import distrax
import haiku as hk
import jax
import jax.numpy as jnp
import optax
import rlax
from acme import specs as acme_specs

from mbxfer import domains, exploration
from mbxfer.agents import base, networks, nomodel, sequences
from mbxfer.agents import intrinsic as intrinsic_lib
from mbxfer.agents.world_model import (
    FilterCarry,
    LatentState,
    WorldModel,
    WorldModelConfig,
    filter_step,
    initial_filter_carry,
    make_world_model,
)
from mbxfer.domains import at_least, below_one, non_negative, positive, unit_interval
from mbxfer.exploration import ExplorationConfig


@dataclasses.dataclass(frozen=True)
class ActorCriticConfig:
    """The actor-critic learned in imagination."""

    horizon: Annotated[int, positive] = 15
    """Imagined steps from each replayed posterior."""
    discount: Annotated[float, unit_interval] = 0.99
    """Discount per step (multiplied by the predicted continuation)."""
    lambda_: Annotated[float, unit_interval] = 0.95
    """Lambda of the lambda-returns."""
    entropy: Annotated[float, non_negative] = 3e-4
    """Entropy bonus of the actor (advantages are normalized, so this is scale-free)."""
    hidden: Annotated[int, positive] = 128
    """Width of the actor and critic MLPs."""
    layers: Annotated[int, non_negative] = 2
    """Hidden layers of the actor and critic MLPs."""
    critic_bins: Annotated[int, at_least(2)] = 255
    """Two-hot bins of the critic (symlog space)."""
    slow_critic_fraction: Annotated[float, unit_interval] = 0.02
    """EMA step of the slow critic towards the critic, every update."""
    slow_critic_regularizer: Annotated[float, non_negative] = 1.0
    """Weight of the critic's cross-entropy to the slow critic's prediction."""
    return_norm_decay: Annotated[float, unit_interval] = 0.99
    """EMA decay of the return percentile range used to normalize advantages."""
    unimix: Annotated[float, below_one] = 0.01
    """Uniform mixture of the discrete actor's distribution."""
    min_std: Annotated[float, positive] = 0.1
    """Smallest standard deviation of the continuous actor."""
    max_std: Annotated[float, positive] = 1.0
    """Largest standard deviation of the continuous actor."""
    actor_gradient: Literal["reinforce", "dynamics"] = "reinforce"
    """How the actor learns from imagined returns: `reinforce` (score function with
    normalized advantages, as the current DreamerV3 does for every action space) or `dynamics`
    (backpropagate returns through the world model with reparameterized or straight-through
    actions, as DreamerV1/V2 and the DreamerV3 1.5.0 release do for continuous control)."""
    replay_critic: Annotated[float, non_negative] = 0.3
    """Scale of a second critic loss on the replayed sequences (the current DreamerV3's
    `repval_loss`, 0.3 as there; the 1.5.0 release on PyPI has no such loss): the critic also regresses the lambda-returns of the real rewards and
    continuations along the replayed posteriors (bootstrapped from the slow critic, cut at
    episode boundaries), so values learn from real returns even where the reward head does not
    yet predict them in imagination. 0 switches it off; unused with `source="replay"`."""
    source: Literal["imagination", "replay"] = "imagination"
    """Where the actor-critic's trajectories come from: `imagination` (rollouts of `horizon`
    steps through the world model from every replayed posterior) or `replay` (the replayed
    sequences themselves, real rewards and continuations; `horizon` is unused, and the actor and
    critic losses also train the world model's encoder and filter). `replay` with no dynamics
    loss is the `dreamer_nomodel` control."""

    def __post_init__(self):
        domains.check(self)
        if self.min_std > self.max_std:
            raise ValueError(f"min_std={self.min_std} must be <= max_std={self.max_std}")
        if self.source == "replay" and self.actor_gradient == "dynamics":
            raise ValueError(
                "actor_gradient='dynamics' backpropagates through imagined rollouts: it needs "
                "source='imagination'"
            )


@dataclasses.dataclass(frozen=True)
class DreamerConfig:
    """The Dreamer-style agent: world model, actor-critic, optimizers."""

    model: WorldModelConfig = dataclasses.field(default_factory=WorldModelConfig)
    """The shared world model."""
    actor_critic: ActorCriticConfig = dataclasses.field(default_factory=ActorCriticConfig)
    """The actor-critic learned in imagination."""
    model_lr: Annotated[float, positive] = 3e-4
    """Adam learning rate of the world model."""
    actor_lr: Annotated[float, positive] = 1e-4
    """Adam learning rate of the actor."""
    critic_lr: Annotated[float, positive] = 1e-4
    """Adam learning rate of the critic."""
    grad_clip: Annotated[float, positive] = 100.0
    """Global gradient-norm clip of each optimizer."""
    exploration: ExplorationConfig = dataclasses.field(default_factory=ExplorationConfig)
    """Intrinsic reward module and the reward mix of imagined rewards."""

    def __post_init__(self):
        domains.check(self)


class DreamerState(NamedTuple):
    """Everything the Dreamer agent learns, as one pytree."""

    model_params: hk.Params
    actor_params: hk.Params
    critic_params: hk.Params
    slow_critic_params: hk.Params
    model_opt: optax.OptState
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    return_range: jax.Array
    """`[2]` EMA of the 5th and 95th percentile of imagined lambda-returns."""
    step: jax.Array
    exploration: Optional[exploration.ExplorationState] = None
    """The intrinsic reward module's parameters and statistics (None without one)."""
    exploration_opt: Optional[optax.OptState] = None


DreamerCarry = FilterCarry  # The acting carry is the world model's filter state.


def _policy_network(config: ActorCriticConfig, discrete: bool, action_size: int):
    def forward(features):
        hidden = [config.hidden] * config.layers
        if discrete:
            logits = networks.MLP(hidden, action_size, name="actor")(features)
            return logits
        out = networks.MLP(hidden, 2 * action_size, name="actor")(features)
        return out

    return hk.without_apply_rng(hk.transform(forward))


def _critic_network(config: ActorCriticConfig):
    def forward(features):
        hidden = [config.hidden] * config.layers
        return networks.MLP(hidden, config.critic_bins, zero_output=True, name="critic")(features)

    return hk.without_apply_rng(hk.transform(forward))


class DreamerNetworks(NamedTuple):
    """The Dreamer agent's pure functions, built once by `make_networks`; every loss and update
    below takes them as its first argument."""

    model: WorldModel
    actor: hk.Transformed
    """`apply(params, features)` -> logits (discrete) or mean and raw std (continuous)."""
    critic: hk.Transformed
    """`apply(params, features)` -> two-hot logits over `critic_bins`."""
    critic_bins: jax.Array
    optimizers: tuple[optax.GradientTransformation, ...]
    """Of the world model, the actor and the critic."""
    intrinsic: Optional[intrinsic_lib.Intrinsic]
    """The intrinsic reward module (None without one)."""


def make_networks(env_spec: acme_specs.EnvironmentSpec, config: DreamerConfig) -> DreamerNetworks:
    """The world model, actor, critic, optimizers and intrinsic module for `env_spec`."""
    model = make_world_model(config.model, env_spec.observations, env_spec.actions)
    ac = config.actor_critic

    def optimizer(lr):
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adam(lr, eps=1e-8))

    return DreamerNetworks(
        model,
        _policy_network(ac, model.discrete, model.action_size),
        _critic_network(ac),
        networks.symlog_bins(ac.critic_bins),
        (optimizer(config.model_lr), optimizer(config.actor_lr), optimizer(config.critic_lr)),
        intrinsic_lib.make(
            config.exploration, config.model.feature_size, model.action_size, model.discrete
        ),
    )


def has_heads(config: DreamerConfig) -> bool:
    """Whether the world model's reward and continuation heads are built: imagination reads
    them, and so does every model loss term (`WorldModel.loss` runs the heads); learning from
    replay alone reads neither."""
    return config.actor_critic.source != "replay" or nomodel.has_loss_terms(config.model)


def policy(
    nets: DreamerNetworks, ac: ActorCriticConfig, actor_params, features
) -> distrax.Distribution:
    """The actor's distribution: a categorical with `unimix` uniform mixture, or a Gaussian with
    tanh mean and std squashed into `[min_std, max_std]`."""
    out = nets.actor.apply(actor_params, features)
    if nets.model.discrete:
        probs = jax.nn.softmax(out, axis=-1)
        probs = (1.0 - ac.unimix) * probs + ac.unimix / nets.model.action_size
        return distrax.Categorical(probs=probs)
    mean, std = jnp.split(out, 2, axis=-1)
    std = (ac.max_std - ac.min_std) * jax.nn.sigmoid(std + 2.0) + ac.min_std
    return distrax.Independent(distrax.Normal(jnp.tanh(mean), std), 1)


def value(nets: DreamerNetworks, critic_params, features) -> jax.Array:
    """The critic's (or slow critic's) value of `features` `[..., F]` -> `[...]`."""
    return networks.two_hot_decode(nets.critic.apply(critic_params, features), nets.critic_bins)


def init(nets: DreamerNetworks, config: DreamerConfig, rng) -> DreamerState:
    """A fresh `DreamerState` (the slow critic starts as the critic)."""
    model_key, actor_key, critic_key = jax.random.split(rng, 3)
    model_params = nets.model.init(model_key)
    if not has_heads(config):
        model_params = nomodel.without_heads(model_params)
    features = jnp.zeros((1, config.model.feature_size), jnp.float32)
    actor_params = nets.actor.init(actor_key, features)
    critic_params = nets.critic.init(critic_key, features)
    model_opt, actor_opt, critic_opt = nets.optimizers
    state = DreamerState(
        model_params,
        actor_params,
        critic_params,
        critic_params,
        model_opt.init(model_params),
        actor_opt.init(actor_params),
        critic_opt.init(critic_params),
        jnp.zeros(2, jnp.float32),
        jnp.zeros((), jnp.int32),
    )
    return intrinsic_lib.attach(state, nets.intrinsic, rng)


def act(
    nets: DreamerNetworks,
    ac: ActorCriticConfig,
    state: DreamerState,
    carry: DreamerCarry,
    step: base.ActInput,
    rng,
    mode: str,
):
    """Filter the new observation, then sample the actor (`explore`) or take its mode."""
    if mode not in base.MODES:
        raise ValueError(f"mode={mode!r} must be one of {base.MODES}")
    model = nets.model
    observe_key, action_key = jax.random.split(rng)
    posterior = filter_step(
        model, state.model_params, carry, step.observation, step.is_first, observe_key
    )
    distribution = policy(nets, ac, state.actor_params, model.features(posterior))
    if mode == "explore":
        action = distribution.sample(seed=action_key)
    else:
        action = distribution.mode()
    if not model.discrete:
        action = jnp.clip(action, -1.0, 1.0)
    return action, DreamerCarry(posterior, action)


def return_normalization(
    ac: ActorCriticConfig, state: DreamerState, returns, valid=None
) -> tuple[jax.Array, jax.Array]:
    """`(return_range, scale)`: the EMA of the 5th..95th percentile range of `returns` (over
    the `valid` entries when given; the first update takes the range itself) and the advantage
    scale `max(1, high - low)`, so advantages are never scaled up."""
    if valid is None:
        low, high = jnp.percentile(returns, 5.0), jnp.percentile(returns, 95.0)
    else:
        masked = jnp.where(valid, returns, jnp.nan)
        low, high = jnp.nanpercentile(masked, 5.0), jnp.nanpercentile(masked, 95.0)
        low, high = jnp.where(jnp.any(valid), jnp.stack([low, high]), 0.0)
    decay = ac.return_norm_decay
    return_range = jnp.where(
        state.step == 0,
        jnp.stack([low, high]),
        decay * state.return_range + (1 - decay) * jnp.stack([low, high]),
    )
    return return_range, jnp.maximum(1.0, return_range[1] - return_range[0])


def imagine(nets: DreamerNetworks, ac: ActorCriticConfig, model_params, actor_params, start, rng):
    """Roll the actor through the prior for `horizon` steps from `start` `[M, ...]`.

    Returns time-major states `[H+1, M, ...]` (the start, then every imagined state) and the
    actions `[H, M, ...]` taken in the first H of them. With the dynamics gradient, actions
    carry gradients (straight-through one-hot or reparameterized samples).
    """
    model = nets.model

    def step(state, key):
        policy_key, dynamics_key = jax.random.split(key)
        distribution = policy(nets, ac, actor_params, model.features(state))
        action = distribution.sample(seed=policy_key)
        if model.discrete:
            model_action = jax.nn.one_hot(action, model.action_size)
            if ac.actor_gradient == "dynamics":
                probs = distribution.probs
                model_action = model_action + probs - jax.lax.stop_gradient(probs)
        else:
            model_action = jnp.clip(action, -1.0, 1.0)
        next_state = model.imagine(model_params, state, model_action, dynamics_key)
        return next_state, (next_state, action)

    _, (states, actions) = jax.lax.scan(step, start, jax.random.split(rng, ac.horizon))
    states = jax.tree.map(lambda s, x: jnp.concatenate([s[None], x]), start, states)
    return states, actions


def critic_loss(nets, ac: ActorCriticConfig, critic_params, features, returns, slow_values):
    """Per-state two-hot loss `[...]` of the critic at `features` against `returns`, plus the
    `slow_critic_regularizer`-weighted loss against the slow critic's `slow_values`."""
    logits = nets.critic.apply(critic_params, features)
    loss = networks.two_hot_loss(logits, returns, nets.critic_bins)
    regularizer = networks.two_hot_loss(logits, slow_values, nets.critic_bins)
    return loss + ac.slow_critic_regularizer * regularizer


def imagination_loss(
    nets: DreamerNetworks,
    config: DreamerConfig,
    actor_params,
    critic_params,
    state: DreamerState,
    start: LatentState,
    start_cont,
    rng,
):
    """`(actor_loss, critic_loss, return_range, metrics)` of `horizon`-step rollouts from the
    posteriors `start` `[M, ...]` (whose real continuation is `start_cont` `[M]`).

    Rewards `[H, M]` are the reward head's mixed with the intrinsic reward; lambda-returns
    bootstrap from the slow critic; states after a predicted termination weigh less (the
    cumulative continuation). The actor maximizes normalized returns (REINFORCE with the slow
    critic as baseline, or backpropagated through the dynamics) plus an entropy bonus.
    """
    ac, model = config.actor_critic, nets.model
    dynamics_gradient = ac.actor_gradient == "dynamics"
    model_params = jax.lax.stop_gradient(state.model_params)
    imagination_actor = actor_params if dynamics_gradient else None
    if imagination_actor is None:
        imagination_actor = jax.lax.stop_gradient(actor_params)
    states, actions = imagine(nets, ac, model_params, imagination_actor, start, rng)
    actions = jax.lax.stop_gradient(actions)
    # With the dynamics gradient, returns depend on the actor through the imagined states.
    features_with_gradient = model.features(states)  # [H+1, M, F]
    features = jax.lax.stop_gradient(features_with_gradient)
    task_reward = model.reward(model_params, features_with_gradient[1:])  # [H, M]
    reward = intrinsic_lib.mixed_reward(
        nets.intrinsic,
        config.exploration,
        state.exploration,
        task_reward,
        features[:-1],
        actions,
        features_with_gradient[1:],
    )
    continuation = model.continuation(model_params, features)
    continuation = continuation.at[0].set(start_cont)  # the real step's continuation
    discount = ac.discount * continuation[1:]
    slow_values = value(nets, state.slow_critic_params, features_with_gradient)  # [H+1, M]
    returns = jax.vmap(rlax.lambda_returns, in_axes=(1, 1, 1, None), out_axes=1)(
        reward, discount, slow_values[1:], ac.lambda_
    )  # [H, M]: the return of state i
    weight = jax.lax.stop_gradient(jnp.cumprod(continuation[:-1], axis=0))

    target_returns = jax.lax.stop_gradient(returns)
    return_range, scale = return_normalization(ac, state, target_returns)

    distribution = policy(nets, ac, actor_params, features[:-1])
    entropy = distribution.entropy()
    if dynamics_gradient:
        objective = returns / scale
    else:
        baseline = value(nets, state.slow_critic_params, features[:-1])
        advantage = jax.lax.stop_gradient((returns - baseline) / scale)
        objective = distribution.log_prob(actions) * advantage
    actor_loss = -jnp.mean(weight * (objective + ac.entropy * entropy))
    losses = critic_loss(nets, ac, critic_params, features[:-1], target_returns, slow_values[:-1])
    metrics = {
        "actor/loss": actor_loss,
        "actor/entropy": jnp.mean(entropy),
        "critic/loss": jnp.mean(weight * losses),
        "imagined/return": jnp.mean(target_returns),
        "imagined/reward": jnp.mean(reward),
        "imagined/return_scale": scale,
    }
    return actor_loss, metrics["critic/loss"], return_range, metrics


def replay_returns(
    nets: DreamerNetworks, config: DreamerConfig, state: DreamerState, features, batch
):
    """`(reward [B, T], slow_values [B, T], returns [B, T-1], valid [B, T-1])` of the replayed
    sequences: the replayed rewards mixed with the intrinsic reward of each replayed transition
    (`intrinsic.replayed_reward`), continuations the replayed discounts; lambda-returns bootstrap
    from the slow critic and stop at episode boundaries (`nomodel.replay_lambda_returns`).
    `features` `[B, T, F]` carry no gradient."""
    ac = config.actor_critic
    slow_values = value(nets, state.slow_critic_params, features)  # [B, T]
    intrinsic = intrinsic_lib.replayed_reward(
        nets.intrinsic, config.exploration, state.exploration, features, batch["action"]
    )
    reward = exploration.mix(
        config.exploration, jnp.asarray(batch["reward"], jnp.float32), intrinsic
    )
    discount = ac.discount * jnp.asarray(batch["discount"], jnp.float32)
    returns, valid = jax.vmap(nomodel.replay_lambda_returns, in_axes=(0, 0, 0, 0, 0, None))(
        reward,
        discount,
        jnp.asarray(batch["is_first"], bool),
        jnp.asarray(batch["is_last"], bool),
        slow_values,
        ac.lambda_,
    )  # [B, T-1]: the return of state t
    return reward, slow_values, returns, valid


def replay_critic_loss(
    nets: DreamerNetworks,
    config: DreamerConfig,
    critic_params,
    state: DreamerState,
    features,
    batch,
):
    """The critic's loss (`critic_loss`) on the replayed posteriors `features` `[B, T, F]`
    against `replay_returns`, over valid transitions (`replay_critic`)."""
    features = jax.lax.stop_gradient(features)
    _, slow_values, returns, valid = replay_returns(nets, config, state, features, batch)
    losses = critic_loss(
        nets, config.actor_critic, critic_params, features[:, :-1], returns, slow_values[:, :-1]
    )
    return sequences.masked_mean(losses, valid)


def replay_actor_critic_loss(
    nets: DreamerNetworks,
    config: DreamerConfig,
    actor_params,
    critic_params,
    state: DreamerState,
    features,
    batch,
):
    """The actor-critic losses on the replayed sequences `[B, T]` (`source="replay"`), with the
    returns of `replay_returns`, over valid transitions. The `features` `[B, T, F]` keep their
    gradient: both losses train the representation."""
    ac = config.actor_critic
    features_with_gradient, features = features, jax.lax.stop_gradient(features)
    actions = jnp.asarray(batch["action"])
    reward, slow_values, returns, valid = replay_returns(nets, config, state, features, batch)
    return_range, scale = return_normalization(ac, state, returns, valid)

    distribution = policy(nets, ac, actor_params, features_with_gradient[:, :-1])
    entropy = distribution.entropy()
    advantage = jax.lax.stop_gradient((returns - slow_values[:, :-1]) / scale)
    objective = distribution.log_prob(actions[:, :-1]) * advantage
    actor_loss = -sequences.masked_mean(objective + ac.entropy * entropy, valid)
    losses = critic_loss(
        nets, ac, critic_params, features_with_gradient[:, :-1], returns, slow_values[:, :-1]
    )
    critic = sequences.masked_mean(losses, valid)
    metrics = {
        "actor/loss": actor_loss,
        "actor/entropy": sequences.masked_mean(entropy, valid),
        "critic/loss": critic,
        "replayed/return": sequences.masked_mean(returns, valid),
        "replayed/reward": sequences.masked_mean(reward[:, 1:], valid),
        "replayed/return_scale": scale,
    }
    return actor_loss, critic, return_range, metrics


def apply_gradients(
    nets: DreamerNetworks, ac: ActorCriticConfig, state: DreamerState, grads, return_range, adapt
) -> DreamerState:
    """One optimizer step of each of the model, the actor and the critic, then the slow
    critic's EMA step; `adapt` keeps the model's reward head only."""
    model_opt, actor_opt, critic_opt = nets.optimizers
    model_grads, actor_grads, critic_grads = grads
    updates, model_opt_state = model_opt.update(model_grads, state.model_opt)
    if adapt:
        updates = base.only_reward_head(updates)
    model_params = optax.apply_updates(state.model_params, updates)
    updates, actor_opt_state = actor_opt.update(actor_grads, state.actor_opt)
    actor_params = optax.apply_updates(state.actor_params, updates)
    updates, critic_opt_state = critic_opt.update(critic_grads, state.critic_opt)
    critic_params = optax.apply_updates(state.critic_params, updates)
    slow_critic_params = optax.incremental_update(
        critic_params, state.slow_critic_params, ac.slow_critic_fraction
    )
    return state._replace(
        model_params=model_params,
        actor_params=actor_params,
        critic_params=critic_params,
        slow_critic_params=slow_critic_params,
        model_opt=model_opt_state,
        actor_opt=actor_opt_state,
        critic_opt=critic_opt_state,
        return_range=return_range,
        step=state.step + 1,
    )


def update_in_imagination(
    nets: DreamerNetworks, config: DreamerConfig, state: DreamerState, batch, rng, adapt: bool
):
    """`(state, grads, metrics)`: the world-model loss on `batch`, the intrinsic module's step,
    then the actor-critic losses in imagination from every posterior (and `replay_critic`)."""
    ac, model = config.actor_critic, nets.model
    model_key, imagine_key = jax.random.split(rng)
    batch_size = batch["reward"].shape[0]
    (_, (model_metrics, posteriors, _)), model_grads = jax.value_and_grad(model.loss, has_aux=True)(
        state.model_params, batch, model.initial_state(batch_size), model_key
    )
    start = jax.tree.map(sequences.flatten_time, jax.lax.stop_gradient(posteriors))
    start_cont = 1.0 - batch["is_terminal"].reshape(-1).astype(jnp.float32)
    # Trained before the losses that read its reward.
    state, explorer_metrics = intrinsic_lib.train_on_sequences(
        nets.intrinsic, state, model.features(posteriors), batch["action"]
    )

    def objective(params):
        # The two losses touch disjoint parameters (imagination is stop-gradient), so one
        # backward pass gives each its own gradient.
        actor_loss, critic, return_range, metrics = imagination_loss(
            nets, config, params[0], params[1], state, start, start_cont, imagine_key
        )
        if ac.replay_critic:
            replay_loss = replay_critic_loss(
                nets, config, params[1], state, model.features(posteriors), batch
            )
            critic = critic + ac.replay_critic * replay_loss
            metrics = {**metrics, "critic/replay_loss": replay_loss}
        return actor_loss + critic, (return_range, metrics)

    (_, (return_range, ac_metrics)), (actor_grads, critic_grads) = jax.value_and_grad(
        objective, has_aux=True
    )((state.actor_params, state.critic_params))
    grads = (model_grads, actor_grads, critic_grads)
    new_state = apply_gradients(nets, ac, state, grads, return_range, adapt)
    return new_state, grads, {**model_metrics, **ac_metrics, **explorer_metrics}


def update_on_replay(
    nets: DreamerNetworks, config: DreamerConfig, state: DreamerState, batch, rng, adapt: bool
):
    """`(state, grads, metrics)`: the actor-critic losses on the replayed sequences (plus any
    world-model loss term), one backward pass through the representation, then the intrinsic
    module's step."""
    model = nets.model
    batch_size = batch["reward"].shape[0]

    def objective(params):
        model_params, actor_params, critic_params = params
        if nomodel.has_loss_terms(config.model):
            model_loss, (model_metrics, posteriors, _) = model.loss(
                model_params, batch, model.initial_state(batch_size), rng
            )
        else:
            model_loss, model_metrics = 0.0, {}
            posteriors = nomodel.filter_sequence(model, model_params, batch, rng)
        actor_loss, critic, return_range, metrics = replay_actor_critic_loss(
            nets, config, actor_params, critic_params, state, model.features(posteriors), batch
        )
        aux = (return_range, {**model_metrics, **metrics}, posteriors)
        return model_loss + actor_loss + critic, aux

    (_, (return_range, metrics, posteriors)), grads = jax.value_and_grad(objective, has_aux=True)(
        (state.model_params, state.actor_params, state.critic_params)
    )
    new_state = apply_gradients(nets, config.actor_critic, state, grads, return_range, adapt)
    # Trained after the losses that read its reward, as MuZero does.
    new_state, explorer_metrics = intrinsic_lib.train_on_sequences(
        nets.intrinsic,
        new_state,
        model.features(jax.lax.stop_gradient(posteriors)),
        batch["action"],
    )
    return new_state, grads, {**metrics, **explorer_metrics}


def update(
    nets: DreamerNetworks, config: DreamerConfig, state: DreamerState, batch, rng, adapt=False
):
    """One update on a replay batch (`source` picks imagination or replay); `adapt` trains the
    world model's reward head only (zero-shot)."""
    from_replay = config.actor_critic.source == "replay"
    learn = update_on_replay if from_replay else update_in_imagination
    new_state, (model_grads, actor_grads, _), metrics = learn(
        nets, config, state, batch, rng, adapt
    )
    metrics["grad_norm/model"] = optax.tree.norm(model_grads)
    metrics["grad_norm/actor"] = optax.tree.norm(actor_grads)
    return new_state, metrics


def make(env_spec: acme_specs.EnvironmentSpec, config: DreamerConfig) -> base.Agent:
    """The Dreamer agent for `env_spec` (see `agents.base` for the contract)."""
    nets = make_networks(env_spec, config)
    model = nets.model
    train = functools.partial(update, nets, config)

    def initial_carry(num_envs: int) -> DreamerCarry:
        return initial_filter_carry(model, num_envs)

    def open_loop(state: DreamerState, batch, context: int, horizon: int, rng):
        return model.open_loop(state.model_params, batch, context, horizon, rng)

    # The open-loop video decodes imagined states: it needs a decoder and a trained prior.
    video = config.model.decoder and config.model.losses.kl_dynamics > 0
    return base.Agent(
        "dreamer",
        config,
        jax.jit(functools.partial(init, nets, config)),
        initial_carry,
        functools.partial(act, nets, config.actor_critic),
        train,
        True,
        open_loop if video else None,
        part_of=PARTS,
        # Zero-shot adaptation fits the reward head: there is none to fit without one.
        adapt=functools.partial(train, adapt=True) if has_heads(config) else None,
    )


@dataclasses.dataclass(frozen=True)
class DreamerNoModelConfig(DreamerConfig):
    """The model-free control of Dreamer (`dreamer_nomodel`): Dreamer's representation
    (encoder + RSSM filter), actor and critic, learned on the real replayed sequences (real
    rewards and continuations) instead of imagined rollouts; no dynamics loss, and the actor and
    critic losses train the representation (`agents/nomodel.py`)."""

    model: WorldModelConfig = dataclasses.field(
        default_factory=lambda: nomodel.representation_model("rssm")
    )
    """The representation: Dreamer's RSSM with no decoder and no loss term (reward,
    continuation and reconstruction may be switched on as auxiliaries; the dynamics terms are
    refused)."""
    actor_critic: ActorCriticConfig = dataclasses.field(
        default_factory=lambda: ActorCriticConfig(source="replay", replay_critic=0.0)
    )
    """The actor-critic; its `source` is always `replay` (so `replay_critic` is unused)."""

    def __post_init__(self):
        super().__post_init__()
        if self.actor_critic.source != "replay":
            raise ValueError(
                "dreamer_nomodel needs actor_critic.source=replay (use agent=dreamer for the "
                "model-based agent)"
            )
        nomodel.check_model_free("dreamer_nomodel", self.model)


def make_nomodel(env_spec: acme_specs.EnvironmentSpec, config: DreamerNoModelConfig) -> base.Agent:
    """The model-free Dreamer control for `env_spec` (no `adapt`: zero-shot needs a model)."""
    if not isinstance(config, DreamerNoModelConfig):
        raise TypeError(
            f"dreamer_nomodel needs a DreamerNoModelConfig, got {type(config).__name__}"
        )
    return make(env_spec, config)._replace(name="dreamer_nomodel", adapt=None)


PARTS = base.parts_by_substring(
    [
        ("exploration", "exploration"),
        (".model_", "world_model"),
        (".actor_", "policy"),
        ("critic", "value"),
        (".return_range", "value"),
    ]
)
"""Which part of `DreamerState` each leaf is (see `agents.base.Agent.part_of`)."""
