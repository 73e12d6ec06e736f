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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple, Optional

import distrax
import haiku as hk
import jax
import jax.numpy as jnp
import optax
import rlax
from acme import specs as acme_specs

import exploration
from agents import base, networks
from agents.world_model import (
    FilterCarry,
    LatentState,
    WorldModelConfig,
    filter_step,
    initial_filter_carry,
    make_world_model,
)
from exploration import ExplorationConfig


@dataclasses.dataclass(frozen=True)
class ActorCriticConfig:
    """The actor-critic learned in imagination."""

    horizon: int = 15
    """Imagined steps from each replayed posterior."""
    discount: float = 0.99
    """Discount per step (multiplied by the predicted continuation)."""
    lambda_: float = 0.95
    """Lambda of the lambda-returns."""
    entropy: float = 3e-4
    """Entropy bonus of the actor (advantages are normalized, so this is scale-free)."""
    hidden: int = 128
    """Width of the actor and critic MLPs."""
    layers: int = 2
    """Hidden layers of the actor and critic MLPs."""
    critic_bins: int = 255
    """Two-hot bins of the critic (symlog space)."""
    slow_critic_fraction: float = 0.02
    """EMA step of the slow critic towards the critic, every update."""
    slow_critic_regularizer: float = 1.0
    """Weight of the critic's cross-entropy to the slow critic's prediction."""
    return_norm_decay: float = 0.99
    """EMA decay of the return percentile range used to normalize advantages."""
    unimix: float = 0.01
    """Uniform mixture of the discrete actor's distribution."""
    min_std: float = 0.1
    """Smallest standard deviation of the continuous actor."""
    max_std: float = 1.0
    """Largest standard deviation of the continuous actor."""
    actor_gradient: Literal["reinforce", "dynamics"] = "reinforce"
    """How the actor learns from imagined returns: `reinforce` (score function with
    normalized advantages, as DreamerV3 does for every action space) or `dynamics`
    (backpropagate returns through the world model with reparameterized or straight-through
    actions, as DreamerV1/V2 did for continuous control)."""


@dataclasses.dataclass(frozen=True)
class DreamerConfig:
    """The Dreamer-style agent: world model, actor-critic, optimizers."""

    model: WorldModelConfig = dataclasses.field(default_factory=WorldModelConfig)
    """The shared world model."""
    actor_critic: ActorCriticConfig = dataclasses.field(default_factory=ActorCriticConfig)
    """The actor-critic learned in imagination."""
    model_lr: float = 3e-4
    """Adam learning rate of the world model."""
    actor_lr: float = 1e-4
    """Adam learning rate of the actor."""
    critic_lr: float = 1e-4
    """Adam learning rate of the critic."""
    grad_clip: float = 100.0
    """Global gradient-norm clip of each optimizer."""
    exploration: ExplorationConfig = dataclasses.field(default_factory=ExplorationConfig)
    """Intrinsic reward module and the reward mix of imagined rewards."""


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


def make(env_spec: acme_specs.EnvironmentSpec, config: DreamerConfig) -> base.Agent:
    """The Dreamer agent for `env_spec` (see `agents.base` for the contract)."""
    model = make_world_model(config.model, env_spec.observations, env_spec.actions)
    ac = config.actor_critic
    discrete, action_size = model.discrete, model.action_size
    actor_net = _policy_network(ac, discrete, action_size)
    critic_net = _critic_network(ac)
    critic_bins = networks.symlog_bins(ac.critic_bins)
    explorer = exploration.make(config.exploration, config.model.feature_size, action_size)
    explorer_opt = optax.adam(config.exploration.learning_rate)

    def optimizer(lr):
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adam(lr, eps=1e-8))

    model_opt, actor_opt, critic_opt = (
        optimizer(config.model_lr),
        optimizer(config.actor_lr),
        optimizer(config.critic_lr),
    )

    def policy(actor_params, features) -> distrax.Distribution:
        out = actor_net.apply(actor_params, features)
        if discrete:
            probs = jax.nn.softmax(out, axis=-1)
            probs = (1.0 - ac.unimix) * probs + ac.unimix / action_size
            return distrax.Categorical(probs=probs)
        mean, std = jnp.split(out, 2, axis=-1)
        std = (ac.max_std - ac.min_std) * jax.nn.sigmoid(std + 2.0) + ac.min_std
        return distrax.Independent(distrax.Normal(jnp.tanh(mean), std), 1)

    def value(critic_params, features):
        return networks.two_hot_decode(critic_net.apply(critic_params, features), critic_bins)

    def init(rng) -> DreamerState:
        model_key, actor_key, critic_key = jax.random.split(rng, 3)
        model_params = model.init(model_key)
        features = jnp.zeros((1, config.model.feature_size), jnp.float32)
        actor_params = actor_net.init(actor_key, features)
        critic_params = critic_net.init(critic_key, features)
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
        if explorer is not None:
            # fold_in, not split: the other keys stay those of the agent without exploration.
            explorer_state = explorer.init(jax.random.fold_in(rng, 17))
            state = state._replace(
                exploration=explorer_state, exploration_opt=explorer_opt.init(explorer_state.params)
            )
        return state

    def initial_carry(num_envs: int) -> DreamerCarry:
        return initial_filter_carry(model, num_envs)

    def act(state: DreamerState, carry: DreamerCarry, step: base.ActInput, rng, mode: str):
        if mode not in base.MODES:
            raise ValueError(f"mode={mode!r} must be one of {base.MODES}")
        observe_key, action_key = jax.random.split(rng)
        posterior = filter_step(
            model, state.model_params, carry, step.observation, step.is_first, observe_key
        )
        distribution = policy(state.actor_params, model.features(posterior))
        if mode == "explore":
            action = distribution.sample(seed=action_key)
        else:
            action = distribution.mode()
        if not discrete:
            action = jnp.clip(action, -1.0, 1.0)
        return action, DreamerCarry(posterior, action)

    use_dynamics_gradient = ac.actor_gradient == "dynamics"

    def imagine(model_params, actor_params, start: LatentState, rng):
        """Roll the actor through the prior for `horizon` steps from `start` `[M, ...]`.

        Returns time-major states `[H+1, M, ...]` (the start, then every imagined state) and
        the actions `[H, M, ...]` taken in the first H of them. With the dynamics gradient,
        actions carry gradients (straight-through one-hot or reparameterized samples).
        """

        def step(state, key):
            policy_key, dynamics_key = jax.random.split(key)
            distribution = policy(actor_params, model.features(state))
            action = distribution.sample(seed=policy_key)
            if discrete:
                model_action = jax.nn.one_hot(action, action_size)
                if use_dynamics_gradient:
                    probs = distribution.probs
                    model_action = model_action + probs - jax.lax.stop_gradient(probs)
            else:
                model_action = jnp.clip(action, -1.0, 1.0)
            next_state = model.imagine(model_params, state, model_action, dynamics_key)
            return next_state, (next_state, action)

        _, (states, actions) = jax.lax.scan(step, start, jax.random.split(rng, ac.horizon))
        states = jax.tree.map(lambda s, x: jnp.concatenate([s[None], x]), start, states)
        return states, actions

    def actor_critic_loss(actor_params, critic_params, state: DreamerState, start, start_cont, rng):
        model_params = jax.lax.stop_gradient(state.model_params)
        imagination_actor = actor_params if use_dynamics_gradient else None
        if imagination_actor is None:
            imagination_actor = jax.lax.stop_gradient(actor_params)
        states, actions = imagine(model_params, imagination_actor, start, rng)
        actions = jax.lax.stop_gradient(actions)
        # With the dynamics gradient, returns depend on the actor through the imagined states.
        features_with_gradient = model.features(states)  # [H+1, M, F]
        features = jax.lax.stop_gradient(features_with_gradient)
        task_reward = model.reward(model_params, features_with_gradient[1:])  # [H, M]
        intrinsic = None
        if explorer is not None:
            action_input = jax.nn.one_hot(actions, action_size) if discrete else actions
            intrinsic = explorer.reward(
                state.exploration, features[:-1], action_input, features_with_gradient[1:]
            )
        reward = exploration.mix(config.exploration, task_reward, intrinsic)
        continuation = model.continuation(model_params, features)
        continuation = continuation.at[0].set(start_cont)  # the real step's continuation
        discount = ac.discount * continuation[1:]
        slow_values = value(state.slow_critic_params, features_with_gradient)  # [H+1, M]
        returns = jax.vmap(rlax.lambda_returns, in_axes=(1, 1, 1, None), out_axes=1)(
            reward, discount, slow_values[1:], ac.lambda_
        )  # [H, M]: the return of state i
        # States after a predicted termination contribute less (cumulative continuation).
        weight = jax.lax.stop_gradient(jnp.cumprod(continuation[:-1], axis=0))

        # Return normalization: EMA of the 5th..95th percentile range, never scaled up.
        target_returns = jax.lax.stop_gradient(returns)
        low = jnp.percentile(target_returns, 5.0)
        high = jnp.percentile(target_returns, 95.0)
        decay = ac.return_norm_decay
        return_range = jnp.where(
            state.step == 0,
            jnp.stack([low, high]),
            decay * state.return_range + (1 - decay) * jnp.stack([low, high]),
        )
        scale = jnp.maximum(1.0, return_range[1] - return_range[0])

        distribution = policy(actor_params, features[:-1])
        entropy = distribution.entropy()
        if use_dynamics_gradient:
            objective = returns / scale
        else:
            baseline = value(state.slow_critic_params, features[:-1])
            advantage = jax.lax.stop_gradient((returns - baseline) / scale)
            objective = distribution.log_prob(actions) * advantage
        actor_loss = -jnp.mean(weight * (objective + ac.entropy * entropy))
        returns = target_returns

        critic_logits = critic_net.apply(critic_params, features[:-1])
        critic_loss = networks.two_hot_loss(
            critic_logits, jax.lax.stop_gradient(returns), critic_bins
        )
        regularizer = networks.two_hot_loss(critic_logits, slow_values[:-1], critic_bins)
        critic_loss = jnp.mean(weight * (critic_loss + ac.slow_critic_regularizer * regularizer))
        metrics = {
            "actor/loss": actor_loss,
            "actor/entropy": jnp.mean(entropy),
            "critic/loss": critic_loss,
            "imagined/return": jnp.mean(returns),
            "imagined/reward": jnp.mean(reward),
            "imagined/return_scale": scale,
        }
        return actor_loss, critic_loss, return_range, metrics

    def update_explorer(state: DreamerState, posteriors: LatentState, batch):
        """Train the intrinsic reward module on the replayed one-step transitions."""
        actions = batch["action"]
        if discrete:
            actions = jax.nn.one_hot(actions, action_size)
        transitions = exploration.base.sequence_transitions(model.features(posteriors), actions)
        explorer_state, opt_state, metrics = exploration.base.train_step(
            explorer, explorer_opt, state.exploration, state.exploration_opt, transitions
        )
        return state._replace(exploration=explorer_state, exploration_opt=opt_state), metrics

    def update(state: DreamerState, batch, rng, adapt: bool = False):
        model_key, imagine_key = jax.random.split(rng)
        batch_size = batch["reward"].shape[0]
        (_, (model_metrics, posteriors, _)), model_grads = jax.value_and_grad(
            model.loss, has_aux=True
        )(state.model_params, batch, model.initial_state(batch_size), model_key)
        updates, model_opt_state = model_opt.update(model_grads, state.model_opt)
        if adapt:
            updates = base.only_reward_head(updates)
        model_params = optax.apply_updates(state.model_params, updates)

        start = jax.tree.map(
            lambda x: x.reshape((-1,) + x.shape[2:]), jax.lax.stop_gradient(posteriors)
        )
        start_cont = 1.0 - batch["is_terminal"].reshape(-1).astype(jnp.float32)
        explorer_metrics = {}
        if explorer is not None:
            state, explorer_metrics = update_explorer(state, posteriors, batch)

        def objective(params):
            # The two losses touch disjoint parameters (imagination is stop-gradient), so
            # one backward pass gives each its own gradient.
            actor_loss, critic_loss, return_range, metrics = actor_critic_loss(
                params[0], params[1], state, start, start_cont, imagine_key
            )
            return actor_loss + critic_loss, (return_range, metrics)

        (_, (return_range, ac_metrics)), (actor_grads, critic_grads) = jax.value_and_grad(
            objective, has_aux=True
        )((state.actor_params, state.critic_params))
        updates, actor_opt_state = actor_opt.update(actor_grads, state.actor_opt)
        actor_params = optax.apply_updates(state.actor_params, updates)
        updates, critic_opt_state = critic_opt.update(critic_grads, state.critic_opt)
        critic_params = optax.apply_updates(state.critic_params, updates)
        slow_critic_params = optax.incremental_update(
            critic_params, state.slow_critic_params, ac.slow_critic_fraction
        )
        new_state = state._replace(
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
        metrics = {**model_metrics, **ac_metrics, **explorer_metrics}
        metrics["grad_norm/model"] = optax.tree.norm(model_grads)
        metrics["grad_norm/actor"] = optax.tree.norm(actor_grads)
        return new_state, metrics

    def open_loop(state: DreamerState, batch, context: int, horizon: int, rng):
        return model.open_loop(state.model_params, batch, context, horizon, rng)

    return base.Agent(
        "dreamer",
        config,
        init,
        initial_carry,
        act,
        update,
        True,
        open_loop,
        part_of=PARTS,
        adapt=functools.partial(update, adapt=True),
    )


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
