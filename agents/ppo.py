"""PPO: the model-free, on-policy baseline (Schulman et al. 2017), on the suite's encoders.

One `update` per rollout (`Agent.rollout_length = T`): the runner passes the `T + 1` newest
replay rows of every environment (`[N, T + 1, ...]`, layout in `agents/replay.py`). Row `t`
holds the observation and the action taken there; `reward` and `discount` of row `t + 1`
are what that action led to; row `T` only bootstraps. Inside one jitted `update`:

* behaviour log-probabilities and values come from the current (not yet updated) params;
* GAE (`rlax.truncated_generalized_advantage_estimation`) per environment, cut at episode
  boundaries (`rollout_advantages`): termination bootstraps nothing (discount 0),
  truncation bootstraps from the value of the last observation;
* `epochs` passes over the `N * T` transitions in `minibatches` shuffled minibatches
  (`lax.scan`): clipped surrogate objective, optionally clipped value loss, per-minibatch
  advantage normalization, entropy bonus, one Adam step with global-norm clipping each.

Values are regressed in units normalized by running moments of the value targets (MAPPO's
value normalization; `value_normalization=False` regresses raw returns as CleanRL does). With
the suite's LayerNorm encoders and raw returns in the hundreds (CartPole), the value gradient
dominates the clipped global norm and throttles the policy (CartPole, one seed: training
returns about 500 after 25k steps normalized, about 330 after 100k steps without).

A row is not a transition when the next row starts an episode (`is_first`): either it is
the `is_last` step (its action is ignored by the auto-reset) or the runner cut the episode
to reseed its environments (its outcome was never stored). Such rows get no loss and serve
only as the bootstrap of the row before them.

Actions: discrete is a categorical over logits; continuous is a Gaussian with a learned,
state-independent standard deviation whose samples are clipped to [-1, 1] at acting. The
replay stores the clipped action, so log-probabilities are those of the clipped (censored)
Gaussian: the density inside (-1, 1) and the tail mass at +-1 (Fujita & Maeda 2018, "Clipped
Action Policy Gradient"), which are exact for what the environment executed. The entropy
bonus uses the unclipped Gaussian. `eval` mode takes the argmax or the clipped mean.

Exploration: `rnd` computes random network distillation over embeddings of a fixed,
randomly initialised copy of the observation encoder (never trained; images and vectors take
the same path); its reward for row `t` is the novelty of observation `t + 1`, normalized and
mixed with the task reward by `exploration.mix`, and its predictor trains on every rollout.
`disagreement` needs a world model, so PPO refuses it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Annotated, NamedTuple, Optional

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import rlax
from acme import specs as acme_specs
from dm_env import specs

from mbxfer import domains, exploration
from mbxfer.agents import base, networks, sequences
from mbxfer.agents import intrinsic as intrinsic_lib
from mbxfer.domains import finite, non_negative, positive, unit_interval
from mbxfer.exploration import ExplorationConfig


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO: rollout, objective, optimizer, networks.

    Defaults follow CleanRL's `ppo.py` (classic control), except `value_normalization` and
    the encoders, which are the suite's (`agents.networks`: LayerNorm + SiLU layers over
    `symlog(vector)`, or the conv encoder for images).
    """

    rollout_length: Annotated[int, positive] = 128
    """Steps `T` per environment between updates (the runner's on-policy mode)."""
    epochs: Annotated[int, positive] = 4
    """Passes over each rollout."""
    minibatches: Annotated[int, positive] = 4
    """Minibatches per pass; `num_envs * rollout_length` must be divisible by it."""
    discount: Annotated[float, unit_interval] = 0.99
    """Discount per step (multiplied by the environment's discount)."""
    lambda_: Annotated[float, unit_interval] = 0.95
    """GAE lambda."""
    clip_ratio: Annotated[float, positive] = 0.2
    """Clipping epsilon of the surrogate objective's probability ratio."""
    value_clip: Annotated[float, non_negative] = 0.2
    """Clip the new value to this distance from the rollout's value in the value loss
    (the pessimistic maximum of clipped and unclipped errors); 0 disables."""
    normalize_advantages: bool = True
    """Normalize advantages to zero mean and unit std within each minibatch."""
    entropy_coef: Annotated[float, non_negative] = 0.01
    """Weight of the entropy bonus."""
    value_coef: Annotated[float, non_negative] = 0.5
    """Weight of the value loss."""
    value_normalization: bool = True
    """Regress values normalized by a running mean and std of the value targets (MAPPO's
    value normalization), so that the value loss, its share of the clipped gradient norm and
    `value_clip` do not depend on the reward scale. False regresses raw returns (CleanRL)."""
    value_norm_decay: Annotated[float, unit_interval] = 0.99
    """Decay per update of the running moments of the value targets."""
    learning_rate: Annotated[float, positive] = 2.5e-4
    """Adam learning rate (one optimizer over policy, value and encoders)."""
    anneal_steps: Annotated[int, non_negative] = 0
    """Decay the learning rate linearly to 0 over this many environment steps of updates
    (counted by `PPOState.updates`, `N * T` steps each, which a protocol's `carry=all` carries
    into the next phase); 0 keeps it constant."""
    adam_eps: Annotated[float, positive] = 1e-5
    """Adam epsilon."""
    max_grad_norm: Annotated[float, positive] = 0.5
    """Global gradient-norm clip of each minibatch step."""
    hidden: Annotated[int, positive] = 64
    """Width of the vector encoder's and the heads' hidden layers."""
    encoder_layers: Annotated[int, non_negative] = 2
    """Hidden layers of the vector encoder (an MLP over `symlog(vector)`)."""
    head_layers: Annotated[int, non_negative] = 0
    """Hidden layers between the embedding and the policy and value outputs."""
    encoder_depth: Annotated[int, positive] = 16
    """Channels of the conv encoder's first layer; each stride-2 layer doubles them."""
    min_resolution: Annotated[int, positive] = 4
    """The conv encoder halves the image down to this resolution."""
    share_encoder: bool = False
    """One encoder for policy and value (common for images) instead of one each (CleanRL's
    choice for vector observations)."""
    init_log_std: Annotated[float, finite] = 0.0
    """Initial log standard deviation of the continuous policy."""
    exploration: ExplorationConfig = dataclasses.field(default_factory=ExplorationConfig)
    """Intrinsic reward module (`rnd` or `none`) and the reward mix. Protocols that pretrain
    reward-free pick `protocol.intrinsic` when this is `none`: set it to `rnd` for PPO."""

    def __post_init__(self):
        domains.check(self)
        if self.exploration.module == "disagreement":
            raise ValueError(
                "exploration.module='disagreement' needs a world model, which PPO has not: use "
                "exploration.module='rnd' with PPO, or a model-based agent (dreamer, muzero)"
            )

    def trial_problems(self, env, train) -> list[str]:
        """What does not fit a trial's `env` and `train` settings (`config.trial_problems`):
        each rollout of `env.num_envs * rollout_length` steps splits into `minibatches`."""
        size = env.num_envs * self.rollout_length
        if size % self.minibatches:
            return [
                f"agent.minibatches={self.minibatches} must divide env.num_envs * "
                f"agent.rollout_length = {env.num_envs} * {self.rollout_length} = {size}"
            ]
        return []


class PPOState(NamedTuple):
    """Everything PPO learns, as one pytree."""

    params: hk.Params
    """Encoder(s), policy and value heads (and the continuous policy's `log_std`)."""
    opt_state: optax.OptState
    updates: jax.Array
    """Updates done (one per rollout); drives the learning-rate schedule."""
    value_stats: rlax.EmaState
    """Running moments of the value targets (used with `value_normalization`)."""
    feature_encoder: Optional[hk.Params] = None
    """RND: the fixed random encoder whose embeddings RND reads (None without exploration)."""
    exploration: Optional[exploration.ExplorationState] = None
    exploration_opt: Optional[optax.OptState] = None


class _Minibatch(NamedTuple):
    """Flattened transitions `[M, ...]` of one rollout."""

    observation: dict
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    advantage: jax.Array
    value_target: jax.Array
    valid: jax.Array


def rollout_advantages(
    value: chex.Array,
    reward: chex.Array,
    discount: chex.Array,
    is_first: chex.Array,
    is_last: chex.Array,
    gamma: float,
    lambda_: float,
) -> tuple[jax.Array, jax.Array]:
    """GAE `[T]` over one environment's replay rows `[T + 1]`, and which rows are transitions.

    Row `t < T` is a transition (`valid[t]`) unless row `t + 1` starts an episode. A valid
    row's TD error uses `reward[t + 1]` and `gamma * discount[t + 1]` (0 at termination, so
    truncation bootstraps from `value[t + 1]`); the lambda-recursion stops before an invalid
    row, so no advantage crosses an episode boundary. Invalid rows get advantage `-value[t]`
    (reward and discount zeroed), which callers mask out.

    Args:
      value: `[T + 1]` values of every row's observation.
      reward, discount, is_first, is_last: `[T + 1]` replay rows.
      gamma: discount factor per step.
      lambda_: GAE lambda.
    """
    chex.assert_rank([value, reward, discount, is_first, is_last], 1)
    chex.assert_equal_shape([value, reward, discount, is_first, is_last])
    chex.assert_type(value, float)
    valid = sequences.valid_transitions(is_first, is_last)
    mask = valid.astype(value.dtype)
    r_t = reward[1:].astype(value.dtype) * mask
    discount_t = gamma * discount[1:].astype(value.dtype) * mask
    # lambda_t[t] multiplies the advantage of row t + 1: zero it where that row is invalid.
    lambda_t = lambda_ * jnp.concatenate([mask[1:], jnp.ones((1,), value.dtype)])
    advantage = rlax.truncated_generalized_advantage_estimation(r_t, discount_t, lambda_t, value)
    return advantage, valid


def clipped_gaussian_log_prob(mean: chex.Array, std: chex.Array, action: chex.Array) -> jax.Array:
    """Log-probability `[...]` of `action` `[..., A]` under a Gaussian clipped to [-1, 1].

    Inside (-1, 1) it is the Gaussian log-density; at -1 and 1 the log of the Gaussian mass
    beyond (the clipped distribution puts it all there).
    """
    chex.assert_equal_shape([mean, action])
    normal = jax.scipy.stats.norm
    log_density = normal.logpdf(action, mean, std)
    log_mass_below = normal.logcdf((-1.0 - mean) / std)
    log_mass_above = normal.logcdf((mean - 1.0) / std)
    log_prob = jnp.where(
        action <= -1.0, log_mass_below, jnp.where(action >= 1.0, log_mass_above, log_density)
    )
    return jnp.sum(log_prob, axis=-1)


def _action_space(action_spec: specs.Array) -> tuple[bool, int]:
    """(discrete, action size); continuous actions must be 1-D and bounded in [-1, 1]."""
    if isinstance(action_spec, specs.DiscreteArray):
        return True, int(action_spec.num_values)
    if isinstance(action_spec, specs.BoundedArray) and len(action_spec.shape) == 1:
        if np.all(action_spec.minimum == -1.0) and np.all(action_spec.maximum == 1.0):
            return False, int(action_spec.shape[0])
    raise ValueError(f"PPO needs a DiscreteArray or a 1-D [-1, 1] action spec, got {action_spec}")


def _encoder(config: PPOConfig, name: str) -> networks.ObservationEncoder:
    hidden = [config.hidden] * config.encoder_layers
    return networks.ObservationEncoder(
        config.encoder_depth, hidden, config.min_resolution, name=name
    )


def _actor_critic(config: PPOConfig, discrete: bool, action_size: int):
    """Haiku functions `policy(obs) -> (logits | mean, log_std)` and `both(obs) -> (policy
    output, normalized value)`."""

    def build():
        policy_encoder = _encoder(config, "encoder" if config.share_encoder else "policy_encoder")
        value_encoder = (
            policy_encoder if config.share_encoder else _encoder(config, "value_encoder")
        )
        hidden = [config.hidden] * config.head_layers
        # A zero output layer starts from the uniform (or zero-mean) policy.
        policy_head = networks.MLP(hidden, action_size, zero_output=True, name="policy_head")
        value_head = networks.MLP(hidden, 1, name="value_head")

        def policy_from(embedding):
            out = policy_head(embedding)
            if discrete:
                return out, None
            init = hk.initializers.Constant(config.init_log_std)
            return out, hk.get_parameter("log_std", (action_size,), init=init)

        def policy(observation):
            return policy_from(policy_encoder(observation))

        def both(observation):
            embedding = policy_encoder(observation)
            value_embedding = embedding if config.share_encoder else value_encoder(observation)
            return policy_from(embedding), value_head(value_embedding)[..., 0]

        return both, (policy, both)

    return hk.without_apply_rng(hk.multi_transform(build))


class PPONetworks(NamedTuple):
    """PPO's pure functions, built once by `make_networks`; every loss and update below takes
    them as its first argument."""

    network: hk.MultiTransformed
    """`init(rng, observation)`; `apply = (policy, both)` (see `_actor_critic`)."""
    optimizer: optax.GradientTransformation
    """Clipping and Adam's scaling; the (annealed) learning rate is applied in `update`."""
    dummy: dict
    """A `[1, ...]` zero observation of the agent keys (to initialize the networks)."""
    discrete: bool
    action_size: int
    feature_net: hk.Transformed
    """RND: the fixed random encoder whose embeddings the intrinsic module reads."""
    intrinsic: Optional[intrinsic_lib.Intrinsic]
    """The intrinsic reward module (None without one)."""


def make_networks(env_spec: acme_specs.EnvironmentSpec, config: PPOConfig) -> PPONetworks:
    """The actor-critic, optimizer and intrinsic module of PPO for `env_spec`."""
    discrete, action_size = _action_space(env_spec.actions)
    dummy = {
        key: jnp.zeros((1,) + tuple(spec.shape), spec.dtype)
        for key, spec in env_spec.observations.items()
        if key in networks.agent_keys(env_spec.observations)
    }
    optimizer = optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm), optax.scale_by_adam(eps=config.adam_eps)
    )
    feature_net = hk.without_apply_rng(hk.transform(lambda obs: _encoder(config, "features")(obs)))
    wiring = None
    if config.exploration.module != "none":
        feature_size = jax.eval_shape(feature_net.init, jax.random.PRNGKey(0), dummy)
        feature_size = jax.eval_shape(feature_net.apply, feature_size, dummy).shape[-1]
        wiring = intrinsic_lib.make(config.exploration, feature_size, action_size, discrete)
    network = _actor_critic(config, discrete, action_size)
    return PPONetworks(network, optimizer, dummy, discrete, action_size, feature_net, wiring)


def log_prob(nets: PPONetworks, policy_out, action) -> jax.Array:
    """Log-probability of the executed `action` (the clipped Gaussian's for continuous)."""
    out, log_std = policy_out
    if nets.discrete:
        log_probs = jax.nn.log_softmax(out, axis=-1)
        return jnp.take_along_axis(log_probs, action[..., None].astype(jnp.int32), -1)[..., 0]
    return clipped_gaussian_log_prob(out, jnp.exp(log_std) * jnp.ones_like(out), action)


def entropy(nets: PPONetworks, policy_out) -> jax.Array:
    """Entropy of the policy (the unclipped Gaussian's for continuous)."""
    out, log_std = policy_out
    if nets.discrete:
        log_probs = jax.nn.log_softmax(out, axis=-1)
        return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    per_dimension = 0.5 * jnp.log(2.0 * jnp.pi * jnp.e) + log_std
    return jnp.sum(per_dimension) * jnp.ones(out.shape[:-1])


def init(nets: PPONetworks, rng) -> PPOState:
    """A fresh `PPOState` (with RND's random encoder and module when configured)."""
    params = nets.network.init(rng, nets.dummy)
    value_stats = rlax.EmaState(mu=jnp.zeros(()), nu=jnp.zeros(()), decay_product=jnp.ones(()))
    state = PPOState(params, nets.optimizer.init(params), jnp.zeros((), jnp.int32), value_stats)
    if nets.intrinsic is not None:
        # fold_in, not split: the other keys stay those of the agent without exploration.
        encoder_key, explorer_key = jax.random.split(jax.random.fold_in(rng, 17))
        explorer_state = nets.intrinsic.module.init(explorer_key)
        state = state._replace(
            feature_encoder=nets.feature_net.init(encoder_key, nets.dummy),
            exploration=explorer_state,
            exploration_opt=nets.intrinsic.optimizer.init(explorer_state.params),
        )
    return state


def act(nets: PPONetworks, state: PPOState, carry, step: base.ActInput, rng, mode: str):
    """Sample the policy (`explore`) or take its argmax / clipped mean (`eval`)."""
    if mode not in base.MODES:
        raise ValueError(f"mode={mode!r} must be one of {base.MODES}")
    policy_apply, _ = nets.network.apply
    out, log_std = policy_apply(state.params, step.observation)
    if nets.discrete:
        if mode == "explore":
            return jax.random.categorical(rng, out, axis=-1), carry
        return jnp.argmax(out, axis=-1), carry
    action = out
    if mode == "explore":
        action = out + jnp.exp(log_std) * jax.random.normal(rng, out.shape, out.dtype)
    return jnp.clip(action, -1.0, 1.0), carry


def value_scale(config: PPOConfig, stats: rlax.EmaState):
    """(mean, std) that turn the value head's output into a value."""
    if not config.value_normalization:
        return 0.0, 1.0
    moments = stats.debiased_moments()
    started = stats.decay_product < 1.0
    std = jnp.maximum(jnp.sqrt(moments.variance), 1e-3)
    return jnp.where(started, moments.mean, 0.0), jnp.where(started, std, 1.0)


def update_value_stats(config: PPOConfig, stats: rlax.EmaState, target, mask) -> rlax.EmaState:
    """The running moments of the value targets after this rollout's valid `target`s."""
    if not config.value_normalization:
        return stats
    decay = config.value_norm_decay
    return rlax.EmaState(
        mu=decay * stats.mu + (1 - decay) * sequences.masked_mean(target, mask),
        nu=decay * stats.nu + (1 - decay) * sequences.masked_mean(jnp.square(target), mask),
        decay_product=stats.decay_product * decay,
    )


def loss(nets: PPONetworks, config: PPOConfig, params, batch: _Minibatch):
    """`(total, metrics)` of one minibatch: clipped surrogate (advantages normalized within the
    minibatch), optionally clipped value regression in normalized units, entropy bonus; every
    term averages the valid transitions only."""
    _, both_apply = nets.network.apply
    policy_out, value = both_apply(params, batch.observation)
    mask = batch.valid.astype(jnp.float32)
    log_ratio = log_prob(nets, policy_out, batch.action) - batch.log_prob
    ratio = jnp.exp(log_ratio)
    advantage = batch.advantage
    if config.normalize_advantages:
        mean = sequences.masked_mean(advantage, mask)
        std = jnp.sqrt(sequences.masked_mean(jnp.square(advantage - mean), mask))
        advantage = (advantage - mean) / (std + 1e-8)
    # rlax averages over every entry; zero advantages and rescale to average valid ones.
    coverage = mask.size / jnp.maximum(jnp.sum(mask), 1.0)
    policy_loss = coverage * rlax.clipped_surrogate_pg_loss(
        ratio, advantage * mask, config.clip_ratio
    )
    value_error = jnp.square(value - batch.value_target)
    if config.value_clip:
        clipped = batch.value + jnp.clip(value - batch.value, -config.value_clip, config.value_clip)
        value_error = jnp.maximum(value_error, jnp.square(clipped - batch.value_target))
    value_loss = 0.5 * sequences.masked_mean(value_error, mask)
    entropy_bonus = sequences.masked_mean(entropy(nets, policy_out), mask)
    total = policy_loss + config.value_coef * value_loss - config.entropy_coef * entropy_bonus
    clipped_fraction = (jnp.abs(ratio - 1.0) > config.clip_ratio).astype(jnp.float32)
    metrics = {
        "loss/policy": policy_loss,
        "loss/value": value_loss,
        "policy/entropy": entropy_bonus,
        "policy/approx_kl": sequences.masked_mean((ratio - 1.0) - log_ratio, mask),
        "policy/clip_fraction": sequences.masked_mean(clipped_fraction, mask),
    }
    return total, metrics


def minibatch_epochs(config: PPOConfig, step, carry, data, key):
    """`carry, metrics = step(carry, minibatch)` over `epochs` shuffled passes of `data`
    `[M, ...]` in `minibatches` minibatches each; returns the carry and mean metrics."""
    size = jax.tree.leaves(data)[0].shape[0]
    shape = (config.minibatches, size // config.minibatches)

    def epoch(carry, epoch_key):
        order = jax.random.permutation(epoch_key, size)
        minibatches = jax.tree.map(lambda x: x[order].reshape(shape + x.shape[1:]), data)
        return jax.lax.scan(step, carry, minibatches)

    carry, metrics = jax.lax.scan(epoch, carry, jax.random.split(key, config.epochs))
    return carry, jax.tree.map(jnp.mean, metrics)


def rollout_intrinsic_reward(
    nets: PPONetworks, config: PPOConfig, state: PPOState, observation, action, rng
):
    """RND novelty `[N, T]` of rows 1..T, the state with the module after this rollout, metrics.

    Unlike the replay agents (`intrinsic.train_on_sequences`), the statistics include this
    rollout before its rewards are read (from the predictor as it was while acting), and the
    predictor trains on the rollout as PPO does: `epochs` passes of `minibatches`."""
    module, optimizer = nets.intrinsic.module, nets.intrinsic.optimizer
    features = jax.lax.stop_gradient(nets.feature_net.apply(state.feature_encoder, observation))
    transitions = exploration.base.sequence_transitions(features, nets.intrinsic.actions(action))
    explorer_state = module.update_stats(state.exploration, transitions)
    reward = module.reward(explorer_state, *transitions)

    def step(carry, minibatch):
        params, opt_state = carry
        (_, metrics), grads = jax.value_and_grad(module.loss, has_aux=True)(params, minibatch)
        updates, opt_state = optimizer.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), metrics

    (params, opt_state), metrics = minibatch_epochs(
        config, step, (explorer_state.params, state.exploration_opt), transitions, rng
    )
    explorer_state = explorer_state._replace(params=params)
    metrics.update(exploration.base.reward_statistics(module.name, reward))
    state = state._replace(exploration=explorer_state, exploration_opt=opt_state)
    return reward.reshape(features.shape[0], -1), state, metrics


class _Rollout(NamedTuple):
    """What `update` learns from and reports on: rows `[N, T + 1]`, transitions `[N, T]`."""

    transitions: _Minibatch
    value: jax.Array
    reward: jax.Array
    advantage: jax.Array
    value_target: jax.Array
    mask: jax.Array


def prepare_rollout(nets: PPONetworks, config: PPOConfig, state: PPOState, batch, rng):
    """`(rollout, state, explorer_metrics)`: behaviour log-probabilities and values of the
    current params, rewards mixed with RND's (the module trained on the rollout), GAE per
    environment, and the value moments including this rollout (in `state`)."""
    _, both_apply = nets.network.apply
    observation = {k: batch["observation"][k] for k in networks.agent_keys(batch["observation"])}
    num_envs, rows = batch["reward"].shape
    length = rows - 1
    size = num_envs * length
    if size % config.minibatches:
        raise ValueError(
            f"num_envs * rollout_length = {num_envs} * {length} is not divisible by "
            f"minibatches={config.minibatches}"
        )
    action = batch["action"]
    policy_out, normalized_value = both_apply(state.params, observation)  # [N, T + 1]
    value_mean, value_std = value_scale(config, state.value_stats)
    value = normalized_value * value_std + value_mean
    behaviour_log_prob = log_prob(nets, policy_out, action)
    reward = exploration.mix(config.exploration, batch["reward"][:, 1:], None)
    explorer_metrics = {}
    if nets.intrinsic is not None:
        intrinsic, state, explorer_metrics = rollout_intrinsic_reward(
            nets, config, state, observation, action, rng
        )
        reward = exploration.mix(config.exploration, batch["reward"][:, 1:], intrinsic)
    reward = sequences.to_rows(reward)
    advantage, valid = jax.vmap(rollout_advantages, in_axes=(0, 0, 0, 0, 0, None, None))(
        value, reward, batch["discount"], batch["is_first"], batch["is_last"],
        config.discount, config.lambda_,
    )  # fmt: skip
    value_target = advantage + value[:, :-1]
    mask = valid.astype(jnp.float32)
    # The value loss lives in the space normalized with the moments including this rollout.
    state = state._replace(
        value_stats=update_value_stats(config, state.value_stats, value_target, mask)
    )
    value_mean, value_std = value_scale(config, state.value_stats)
    normalize = lambda x: (x - value_mean) / value_std  # noqa: E731
    flat = lambda x: x[:, :length].reshape((size,) + x.shape[2:])  # noqa: E731
    transitions = _Minibatch(
        jax.tree.map(flat, observation),
        flat(action),
        flat(behaviour_log_prob),
        flat(normalize(value)),
        advantage.reshape(size),
        normalize(value_target).reshape(size),
        valid.reshape(size),
    )
    rollout = _Rollout(transitions, value, reward, advantage, value_target, mask)
    return rollout, state, explorer_metrics


def rollout_metrics(rollout: _Rollout) -> dict:
    """Value-fit and rollout statistics over the valid transitions."""
    value_target, mask, masked_mean = rollout.value_target, rollout.mask, sequences.masked_mean
    returns_variance = masked_mean(jnp.square(value_target - masked_mean(value_target, mask)), mask)
    residual = value_target - rollout.value[:, :-1]
    residual_variance = masked_mean(jnp.square(residual - masked_mean(residual, mask)), mask)
    return {
        "value/explained_variance": 1.0 - residual_variance / (returns_variance + 1e-8),
        "value/mean": masked_mean(rollout.value[:, :-1], mask),
        "value/target_std": jnp.sqrt(returns_variance),
        "advantage/mean": masked_mean(rollout.advantage, mask),
        "reward/mean": masked_mean(rollout.reward[:, 1:], mask),
        "rollout/valid_fraction": jnp.mean(mask),
    }


def update(nets: PPONetworks, config: PPOConfig, state: PPOState, batch, rng):
    """One PPO update on the newest rollout `[N, T + 1]` (see the module docstring)."""
    batch = jax.tree.map(jnp.asarray, batch)
    ppo_key, explorer_key = jax.random.split(rng)
    rollout, state, explorer_metrics = prepare_rollout(nets, config, state, batch, explorer_key)
    size = rollout.advantage.size
    learning_rate = config.learning_rate
    if config.anneal_steps:
        done = state.updates.astype(jnp.float32) * size
        learning_rate *= jnp.maximum(0.0, 1.0 - done / config.anneal_steps)

    def minibatch_step(carry, minibatch):
        params, opt_state = carry
        (_, metrics), grads = jax.value_and_grad(
            functools.partial(loss, nets, config), has_aux=True
        )(params, minibatch)
        updates, opt_state = nets.optimizer.update(grads, opt_state)
        updates = jax.tree.map(lambda u: -learning_rate * u, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return (optax.apply_updates(params, updates), opt_state), metrics

    (params, opt_state), metrics = minibatch_epochs(
        config, minibatch_step, (state.params, state.opt_state), rollout.transitions, ppo_key
    )
    metrics.update(explorer_metrics)
    metrics.update(rollout_metrics(rollout))
    metrics["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    new_state = state._replace(params=params, opt_state=opt_state, updates=state.updates + 1)
    return new_state, metrics


def make(env_spec: acme_specs.EnvironmentSpec, config: PPOConfig) -> base.Agent:
    """The PPO agent for `env_spec` (see `agents.base` for the contract)."""
    nets = make_networks(env_spec, config)

    def initial_carry(num_envs: int):
        return jnp.zeros((num_envs,), jnp.int32)  # PPO is feed-forward.

    return base.Agent(
        "ppo",
        config,
        jax.jit(functools.partial(init, nets)),
        initial_carry,
        functools.partial(act, nets),
        functools.partial(update, nets, config),
        rollout_length=config.rollout_length,
        part_of=PARTS,
    )


PARTS = base.parts_by_substring(
    [
        ("exploration", "exploration"),
        (".feature_encoder", "exploration"),
        ("value_", "value"),  # value encoder and head, and the value normalization moments
        ("policy_", "policy"),
        ("log_std", "policy"),
        ("['encoder/", "policy"),  # the shared encoder (`share_encoder`)
        # The one Adam's step count follows the policy.
        (".opt_state", "policy"),
    ]
)
"""Which part of `PPOState` each leaf is (see `agents.base.Agent.part_of`); PPO has no world
model, so `carry=world_model` starts the finetune phase from a fresh PPO."""
