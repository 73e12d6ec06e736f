"""MuZero-style agent on the shared world model: mctx planning, reanalyse, value targets.

    representation  the world model's `encode` + `observe`: the root is the posterior filtered
                    over recent real steps (the acting carry holds it, reset by `is_first`)
    dynamics        the world model's `imagine`, reward head and continuation head
    prediction      policy and value heads owned by this agent (`muzero_search.py`)

Training (`update`), on a replay batch `[B, T, ...]`:
* the world-model loss (`WorldModelConfig.losses`: reward, continuation, KL between filtered
  and predicted latents, optional contrastive / self-predictive terms) filters the batch and
  gives a posterior at every step; every step is a root;
* from every root the model unrolls `unroll_steps` (K) steps with the replayed actions
  (gradients halved at each step, as in MuZero); at each unrolled step it predicts the reward
  (two-hot), the value and the policy;
* value targets: n-step returns over replayed rewards, bootstrapped with the value of a
  target network (an EMA or periodic copy of every parameter) on the batch filtered again;
* policy targets come from REANALYSE: the replay stores no search statistics, so a search with
  the current parameters runs inside `update` on the first `round(reanalyse_fraction * B)`
  sequences of the batch (replay samples them uniformly) at every step. The other sequences
  are masked out of the policy loss (they still train the model, reward and value): with no
  visit counts stored at acting time, the alternatives were to search them with the target
  network (the same cost as reanalysing them, for staler targets) or to reuse the policy's
  own prediction (no target at all). `reanalyse_fraction` is therefore the fraction of the
  batch that trains the policy, and it trades update cost for policy-target throughput;
* `planning=False` is the planning ablation: acting samples the policy head, no search runs
  anywhere, and the policy learns by advantage-weighted regression on replayed actions
  (advantage = n-step target - value); networks, model losses, replay and ratio are the same;
* `planning=False, unroll_steps=0` with no dynamics loss term is the model-free control,
  registered as `muzero_nomodel` (`MuZeroNoModelConfig`; design in `agents/nomodel.py`): value
  and policy losses on the filtered real steps only, nothing through `imagine`. World-model
  heads that nothing reads (reward and continuation, when no loss term trains them) are not
  built, and without a reward head there is no `adapt`.

Continuous actions use Sampled MuZero; the prior correction is documented in `muzero_search`.
Rewards are mixed by `agents.intrinsic` (`mixed_reward` in the search, `replayed_reward` and
`exploration.mix` in the value targets).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Annotated, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import optax
from acme import specs as acme_specs

from mbxfer import domains
from mbxfer import exploration as exploration_lib
from mbxfer.agents import base, networks, nomodel, sequences
from mbxfer.agents import intrinsic as intrinsic_lib
from mbxfer.agents import muzero_targets as targets_lib
from mbxfer.agents.muzero_search import (
    Search,
    SearchConfig,
    SearchParams,
    branch_log_probs,
    make_prediction_network,
    make_search,
    policy_distribution,
)
from mbxfer.agents.world_model import (
    FilterCarry,
    LossConfig,
    WorldModel,
    WorldModelConfig,
    filter_step,
    initial_filter_carry,
    make_world_model,
)
from mbxfer.domains import at_least, below_one, fraction, non_negative, positive, unit_interval
from mbxfer.exploration import ExplorationConfig

__all__ = [
    "MuZeroCarry",
    "MuZeroConfig",
    "MuZeroNetworks",
    "MuZeroNoModelConfig",
    "MuZeroState",
    "SearchConfig",
    "make",
    "make_networks",
    "make_nomodel",
]


def _default_model() -> WorldModelConfig:
    return WorldModelConfig(
        latent="deterministic", decoder=False, losses=LossConfig(reconstruction=0.0)
    )


@dataclasses.dataclass(frozen=True)
class MuZeroConfig:
    """The MuZero-style agent: world model, search, targets, optimizer."""

    model: WorldModelConfig = dataclasses.field(default_factory=_default_model)
    """The shared world model (deterministic latent, no decoder by default)."""
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)
    """The tree search used to act and to reanalyse."""
    planning: bool = True
    """False: the model-free control (act from the policy head, no search anywhere, policy by
    advantage-weighted regression); same networks, replay and ratio."""
    discount: Annotated[float, unit_interval] = 0.99
    """Discount per step, in the search and in the value targets."""
    unroll_steps: Annotated[int, non_negative] = 5
    """K: steps the model is unrolled with replayed actions from every root; 0 (only with
    planning=False): value and policy are learned on the filtered real steps alone."""
    n_step: Annotated[int, positive] = 5
    """Steps of reward before the value target bootstraps from the target network."""
    reanalyse_fraction: Annotated[float, unit_interval] = 1.0
    """Fraction of each batch's sequences that get fresh search policy targets from the current
    network (the rest are masked out of the policy loss); must be > 0 when planning."""
    target_update_rate: Annotated[float, fraction] = 0.01
    """EMA step of the target network towards the trained parameters, every update."""
    target_update_period: Annotated[int, non_negative] = 0
    """If > 0, copy the parameters into the target network every this many updates instead of
    the EMA."""
    policy_unimix: Annotated[float, below_one] = 0.1
    """Uniform mixture of the discrete policy (prior and acting). It keeps every prior above
    `policy_unimix / A`, so that the search, whose Q-term spans about 5 logits (mctx's Gumbel
    scaling; PUCT similarly), can still overturn a confident prior when the values change:
    without it, reanalysed targets that include the prior drive the policy to a point mass the
    search cannot leave (0.1 suffices up to ~17 actions)."""
    value_bins: Annotated[int, at_least(2)] = 255
    """Two-hot bins of the value head (symlog space); reward bins are `model.reward_bins`."""
    hidden: Annotated[int, positive] = 128
    """Width of the policy and value MLPs."""
    layers: Annotated[int, non_negative] = 2
    """Hidden layers of the policy and value MLPs."""
    value_scale: Annotated[float, non_negative] = 0.25
    """Weight of the value loss (MuZero Reanalyse uses 0.25)."""
    policy_scale: Annotated[float, non_negative] = 1.0
    """Weight of the policy loss."""
    reward_scale: Annotated[float, non_negative] = 1.0
    """Weight of the unrolled reward loss (on imagined states; the world model's own reward
    term trains the same head on filtered states)."""
    advantage_temperature: Annotated[float, positive] = 1.0
    """planning=False only: temperature of the advantage weights (advantages are divided by
    their batch standard deviation first)."""
    learning_rate: Annotated[float, positive] = 3e-4
    """Adam learning rate of every parameter (world model and prediction heads)."""
    grad_clip: Annotated[float, positive] = 100.0
    """Global gradient-norm clip."""
    exploration: ExplorationConfig = dataclasses.field(default_factory=ExplorationConfig)
    """Intrinsic reward module and the reward mix, used in the search (reward along the tree)
    and in the value targets."""

    def __post_init__(self):
        domains.check(self)
        if self.planning and self.unroll_steps == 0:
            raise ValueError(
                "planning=True needs unroll_steps >= 1: the search reads the reward, value and "
                "policy of imagined states, which only the unrolled losses train"
            )
        if self.planning and self.reanalyse_fraction == 0.0:
            raise ValueError(
                "planning=True needs reanalyse_fraction > 0: the replay stores no search "
                "statistics, so reanalysed sequences are the only policy targets"
            )


class MuZeroState(NamedTuple):
    """Everything the MuZero agent learns, as one pytree."""

    params: SearchParams
    """World-model and prediction parameters (what the search reads)."""
    target_params: SearchParams
    """The target network: value bootstrap and self-predictive targets."""
    opt_state: optax.OptState
    step: jax.Array
    exploration: Optional[exploration_lib.ExplorationState] = None
    """The intrinsic reward module's parameters and statistics (None without one)."""
    exploration_opt: Optional[optax.OptState] = None


MuZeroCarry = FilterCarry  # The acting carry is the world model's filter state.


class MuZeroNetworks(NamedTuple):
    """The agent's pure functions: the shared world model, its prediction network, the search
    over both (whose reward is `intrinsic.mixed_reward` of the reward head and the intrinsic
    module, as in the value targets), the optimizer and the two-hot bins."""

    model: WorldModel
    prediction: hk.Transformed
    """`apply(params, features) -> Prediction` (policy and value heads)."""
    search: Search
    intrinsic: Optional[intrinsic_lib.Intrinsic]
    """The intrinsic reward module (None without one)."""
    optimizer: optax.GradientTransformation
    value_bins: jax.Array
    reward_bins: jax.Array


def make_networks(env_spec: acme_specs.EnvironmentSpec, config: MuZeroConfig) -> MuZeroNetworks:
    """The world model, prediction network, search and optimizer of the agent for `env_spec`."""
    model = make_world_model(config.model, env_spec.observations, env_spec.actions)
    prediction = make_prediction_network(
        config.hidden,
        config.layers,
        config.value_bins,
        model.action_size,
        model.discrete,
        config.policy_unimix,
    )
    wiring = intrinsic_lib.make(
        config.exploration, config.model.feature_size, model.action_size, model.discrete
    )

    def search_reward(params: SearchParams, features, action, next_features):
        task_reward = model.reward(params.model, next_features)
        return intrinsic_lib.mixed_reward(
            wiring,
            config.exploration,
            params.exploration,
            task_reward,
            features,
            action,
            next_features,
        )

    value_bins = networks.symlog_bins(config.value_bins)
    search = make_search(
        model, prediction.apply, config.search, config.discount, value_bins, search_reward
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(config.grad_clip), optax.adam(config.learning_rate, eps=1e-8)
    )
    reward_bins = networks.symlog_bins(config.model.reward_bins)
    return MuZeroNetworks(model, prediction, search, wiring, optimizer, value_bins, reward_bins)


def has_heads(config: MuZeroConfig) -> bool:
    """Whether the world model's reward and continuation heads are built: the search, the
    unrolled reward loss and the world-model loss terms read them."""
    return config.planning or config.unroll_steps > 0 or nomodel.has_loss_terms(config.model)


def value(nets: MuZeroNetworks, prediction_params, features) -> jax.Array:
    """The value head's value of `features` `[..., F]` -> `[...]`."""
    logits = nets.prediction.apply(prediction_params, features).value_logits
    return networks.two_hot_decode(logits, nets.value_bins)


def search_params(state: MuZeroState, params: SearchParams) -> SearchParams:
    """`params` with the intrinsic module's state, which the search's reward reads."""
    return params._replace(exploration=state.exploration)


def init(nets: MuZeroNetworks, config: MuZeroConfig, rng) -> MuZeroState:
    """A fresh `MuZeroState` (the target network starts as the network)."""
    model_key, prediction_key = jax.random.split(rng)
    features = jnp.zeros((1, config.model.feature_size), jnp.float32)
    model_params = nets.model.init(model_key)
    if not has_heads(config):
        model_params = nomodel.without_heads(model_params)
    params = SearchParams(model_params, nets.prediction.init(prediction_key, features))
    state = MuZeroState(params, params, nets.optimizer.init(params), jnp.zeros((), jnp.int32))
    return intrinsic_lib.attach(state, nets.intrinsic, rng)


def act(
    nets: MuZeroNetworks,
    config: MuZeroConfig,
    state: MuZeroState,
    carry: MuZeroCarry,
    step: base.ActInput,
    rng,
    mode: str,
):
    """Filter the new observation, then search (planning) or read the policy head."""
    if mode not in base.MODES:
        raise ValueError(f"mode={mode!r} must be one of {base.MODES}")
    model, discrete = nets.model, nets.model.discrete
    observe_key, action_key = jax.random.split(rng)
    params = state.params
    posterior = filter_step(
        model, params.model, carry, step.observation, step.is_first, observe_key
    )
    if config.planning:
        action = nets.search.run(search_params(state, params), posterior, action_key, mode).action
    else:
        policy = nets.prediction.apply(params.prediction, model.features(posterior)).policy
        distribution = policy_distribution(policy, discrete)
        if mode == "explore":
            action = distribution.sample(seed=action_key)
        else:
            action = distribution.mode()
        if not discrete:
            action = jnp.clip(action, -1.0, 1.0)
    if discrete:
        action = action.astype(jnp.int32)
    return action, MuZeroCarry(posterior, action)


def bootstrap_targets(
    nets: MuZeroNetworks, config: MuZeroConfig, target_params: SearchParams, batch, intrinsic, rng
):
    """n-step value targets `[B, T]` (and where they exist) over the replayed rewards mixed with
    the replayed `intrinsic` reward, bootstrapped from the target network's values of the batch
    filtered again."""
    posteriors = nomodel.filter_sequence(nets.model, target_params.model, batch, rng)
    values = value(nets, target_params.prediction, nets.model.features(posteriors))
    rewards = exploration_lib.mix(
        config.exploration, jnp.asarray(batch["reward"], jnp.float32), intrinsic
    )
    return targets_lib.value_targets(
        rewards,
        jnp.asarray(batch["discount"], jnp.float32),
        sequences.episode_ends(batch["is_first"], batch["is_last"]),
        values,
        config.n_step,
        config.discount,
    )


def policy_targets(
    nets: MuZeroNetworks,
    config: MuZeroConfig,
    params: SearchParams,
    posteriors,
    batch,
    returns,
    returns_valid,
    root_values,
    rng,
):
    """`(PolicyTargets, metrics)`: reanalysed search targets for the first rows (planning) or
    advantage weights on the replayed actions of every row (model-free control)."""
    discrete = nets.model.discrete
    if not config.planning:
        weights = targets_lib.advantage_weights(
            returns - root_values, returns_valid, config.advantage_temperature
        )
        actions = jnp.asarray(batch["action"])
        branches = actions[:, :, None] if discrete else actions[:, :, None, :]
        return targets_lib.PolicyTargets(branches, weights[..., None], returns_valid), {}
    batch_size, length = batch["reward"].shape
    rows = max(1, round(config.reanalyse_fraction * batch_size))
    roots = jax.tree.map(lambda x: sequences.flatten_time(x[:rows]), posteriors)
    output = nets.search.run(params, roots, rng, "reanalyse")

    def unflatten(x):  # [R*T, ...] -> [R, T, ...]
        return x.reshape((rows, length) + x.shape[1:])

    not_last = ~jnp.asarray(batch["is_last"], bool)[:rows]
    weights = unflatten(output.weights)
    search_entropy = -jnp.sum(weights * jnp.log(jnp.maximum(weights, 1e-12)), -1)
    metrics = {
        "muzero/search_value": jnp.mean(output.value),
        "muzero/search_policy_entropy": jnp.mean(search_entropy),
    }
    return targets_lib.PolicyTargets(unflatten(output.branches), weights, not_last), metrics


def unroll(
    nets: MuZeroNetworks, config: MuZeroConfig, params: SearchParams, posteriors, batch, rng
):
    """Predictions `[B, T, K+1, ...]` (and reward logits `[B, T, K, ...]`, None when K=0)
    unrolled from every posterior with the replayed actions (gradients halved per step)."""
    model, K = nets.model, config.unroll_steps
    if K == 0:
        prediction = nets.prediction.apply(params.prediction, model.features(posteriors))
        return jax.tree.map(lambda x: x[:, :, None], prediction), None
    batch_size, length = batch["reward"].shape
    start = jax.tree.map(sequences.flatten_time, posteriors)

    def step(latent, inputs):
        action, key = inputs
        latent = model.imagine(params.model, targets_lib.scale_gradient(latent, 0.5), action, key)
        return latent, latent

    actions = targets_lib.unroll_actions(jnp.asarray(batch["action"]), K)
    _, imagined = jax.lax.scan(step, start, (actions, jax.random.split(rng, K)))
    latents = jax.tree.map(lambda s, x: jnp.concatenate([s[None], x]), start, imagined)
    features = model.features(latents)  # [K+1, B*T, F]
    prediction = nets.prediction.apply(params.prediction, features)
    reward_logits = model.heads(params.model, features[1:]).reward_logits

    def batch_major(x):  # [S, B*T, ...] -> [B, T, S, ...]
        return jnp.moveaxis(x.reshape((x.shape[0], batch_size, length) + x.shape[2:]), 0, 2)

    return jax.tree.map(batch_major, prediction), batch_major(reward_logits)


def representation_loss(
    nets: MuZeroNetworks, config: MuZeroConfig, params: SearchParams, state, batch, rng
):
    """`(loss, metrics, posteriors [B, T, ...])`: the world-model loss terms on the batch
    (self-predictive targets from the target network), or only the filter without any term."""
    model = nets.model
    batch_size = batch["reward"].shape[0]
    if not nomodel.has_loss_terms(config.model):
        return 0.0, {}, nomodel.filter_sequence(model, params.model, batch, rng)
    model_loss, (metrics, posteriors, _) = model.loss(
        params.model,
        batch,
        model.initial_state(batch_size),
        rng,
        target_params=state.target_params.model,
    )
    metrics = dict(metrics)
    metrics["loss/world_model"] = metrics.pop("loss/total")
    return model_loss, metrics, posteriors


def value_loss(nets: MuZeroNetworks, K: int, value_logits, returns, returns_valid, valid):
    """The value head's two-hot loss at every unroll step `[B, T, K+1]` against the n-step
    target of the step it reached, masked, root weighted 1 and unrolled steps 1/K."""
    loss = networks.two_hot_loss(value_logits, targets_lib.at_future(returns, K), nets.value_bins)
    loss_valid = valid & targets_lib.at_future(returns_valid, K)
    return targets_lib.unroll_weighted(targets_lib.masked_step_means(loss, loss_valid))


def reward_loss(nets: MuZeroNetworks, K: int, reward_logits, reward, valid):
    """The reward head's two-hot loss on the imagined states `[B, T, K]` against the replayed
    reward of the step each one predicts, masked, averaged over steps."""
    targets = targets_lib.at_future(jnp.asarray(reward, jnp.float32), K)
    loss = networks.two_hot_loss(reward_logits, targets[:, :, 1:], nets.reward_bins)
    return jnp.mean(targets_lib.masked_step_means(loss, valid[:, :, 1:]))


def policy_loss(discrete: bool, K: int, policy, targets: targets_lib.PolicyTargets, valid):
    """Cross-entropy of the policy at every unroll step of the target rows `[R, T, K+1]` to the
    weighted target branches of the step it reached, masked, weighted as `value_loss`."""
    rows = targets.weights.shape[0]
    log_probs = branch_log_probs(
        policy[:rows], targets_lib.at_future(targets.branches, K), discrete
    )  # [R, T, K+1, M]
    loss = -jnp.sum(targets_lib.at_future(targets.weights, K) * log_probs, axis=-1)
    loss_valid = valid[:rows] & targets_lib.at_future(targets.valid, K)
    return targets_lib.unroll_weighted(targets_lib.masked_step_means(loss, loss_valid))


def loss(nets: MuZeroNetworks, config: MuZeroConfig, params: SearchParams, state, batch, rng):
    """`(total, (metrics, posteriors))`: world-model, value, unrolled reward and policy losses
    of `params` on a replay batch (see the module docstring)."""
    model, K, discrete = nets.model, config.unroll_steps, nets.model.discrete
    model_key, unroll_key, target_key, search_key = jax.random.split(rng, 4)
    model_loss, metrics, posteriors = representation_loss(
        nets, config, params, state, batch, model_key
    )
    intrinsic = intrinsic_lib.replayed_reward(
        nets.intrinsic,
        config.exploration,
        state.exploration,
        jax.lax.stop_gradient(model.features(posteriors)),
        batch["action"],
        batch["is_first"],
    )
    returns, returns_valid = bootstrap_targets(
        nets, config, state.target_params, batch, intrinsic, target_key
    )
    prediction, reward_logits = unroll(nets, config, params, posteriors, batch, unroll_key)
    valid = targets_lib.unroll_valid(batch["is_first"], K)  # [B, T, K+1]
    value_term = value_loss(nets, K, prediction.value_logits, returns, returns_valid, valid)
    reward_term = 0.0
    if reward_logits is not None:
        reward_term = reward_loss(nets, K, reward_logits, batch["reward"], valid)
        metrics["loss/unroll_reward"] = reward_term

    root_logits = jax.lax.stop_gradient(prediction.value_logits[:, :, 0])
    root_values = networks.two_hot_decode(root_logits, nets.value_bins)
    frozen_params, frozen_posteriors = jax.lax.stop_gradient(
        (search_params(state, params), posteriors)
    )
    targets, search_metrics = policy_targets(
        nets, config, frozen_params, frozen_posteriors, batch, returns, returns_valid,
        root_values, search_key,
    )  # fmt: skip
    metrics.update(search_metrics)
    policy_term = policy_loss(discrete, K, prediction.policy, targets, valid)
    total = (
        model_loss
        + config.value_scale * value_term
        + config.policy_scale * policy_term
        + config.reward_scale * reward_term
    )
    entropy = policy_distribution(prediction.policy[:, :, 0], discrete).entropy()
    metrics.update(
        {
            "loss/value": value_term,
            "loss/policy": policy_term,
            "loss/total": total,
            "muzero/value_target": sequences.masked_mean(returns, returns_valid),
            "muzero/root_value": jnp.mean(root_values),
            "muzero/policy_entropy": jnp.mean(entropy),
        }
    )
    if intrinsic is not None:
        metrics["muzero/intrinsic_reward"] = jnp.mean(intrinsic)
    return total, (metrics, posteriors)


def update(nets: MuZeroNetworks, config: MuZeroConfig, state: MuZeroState, batch, rng, adapt=False):
    """One optimizer step on `loss`, the target network's update, then the intrinsic module's
    step; `adapt` trains the world model's reward head only (zero-shot)."""
    (_, (metrics, posteriors)), grads = jax.value_and_grad(
        functools.partial(loss, nets, config), has_aux=True
    )(state.params, state, batch, rng)
    updates, opt_state = nets.optimizer.update(grads, state.opt_state, state.params)
    if adapt:
        updates = updates._replace(model=base.only_reward_head(updates.model))
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    if config.target_update_period:
        target_params = optax.periodic_update(
            params, state.target_params, step, config.target_update_period
        )
    else:
        target_params = optax.incremental_update(
            params, state.target_params, config.target_update_rate
        )
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state._replace(
        params=params, target_params=target_params, opt_state=opt_state, step=step
    )
    new_state, explorer_metrics = intrinsic_lib.train_on_sequences(
        nets.intrinsic, new_state, nets.model.features(posteriors), batch["action"]
    )
    metrics.update(explorer_metrics)
    return new_state, metrics


def make(env_spec: acme_specs.EnvironmentSpec, config: MuZeroConfig) -> base.Agent:
    """The MuZero agent for `env_spec` (see `agents.base` for the contract)."""
    nets = make_networks(env_spec, config)
    model = nets.model
    train = functools.partial(update, nets, config)

    def initial_carry(num_envs: int) -> MuZeroCarry:
        return initial_filter_carry(model, num_envs)

    open_loop = None
    if config.model.decoder:

        def open_loop(state: MuZeroState, batch, context: int, horizon: int, rng):
            return model.open_loop(state.params.model, batch, context, horizon, rng)

    return base.Agent(
        "muzero",
        config,
        jax.jit(functools.partial(init, nets, config)),
        initial_carry,
        functools.partial(act, nets, config),
        train,
        True,
        open_loop,
        part_of=PARTS,
        # Zero-shot adaptation fits the reward head: there is none to fit without one.
        adapt=functools.partial(train, adapt=True) if has_heads(config) else None,
    )


@dataclasses.dataclass(frozen=True)
class MuZeroNoModelConfig(MuZeroConfig):
    """The model-free control of MuZero (`muzero_nomodel`; the Q-learning control of Anand et
    al. 2022): MuZero's representation (encoder + filter) and prediction heads, trained only by
    n-step value targets from the target network and an advantage-weighted policy on real
    replayed steps; no dynamics loss, no unroll, no search (`agents/nomodel.py`)."""

    model: WorldModelConfig = dataclasses.field(
        default_factory=lambda: nomodel.representation_model("deterministic")
    )
    """The representation: MuZero's deterministic latent with no decoder and no loss term
    (reward, continuation and reconstruction may be switched on as auxiliaries; the dynamics
    terms are refused)."""
    planning: bool = False
    """Always False: act from the policy head, no search."""
    unroll_steps: int = 0
    """Always 0: value and policy learn on the filtered real steps only."""

    def __post_init__(self):
        if self.planning or self.unroll_steps:
            raise ValueError(
                "muzero_nomodel needs planning=false and unroll_steps=0 (use agent=muzero for "
                "the model-based agent)"
            )
        nomodel.check_model_free("muzero_nomodel", self.model)
        super().__post_init__()


def make_nomodel(env_spec: acme_specs.EnvironmentSpec, config: MuZeroNoModelConfig) -> base.Agent:
    """The model-free MuZero control for `env_spec` (no `adapt`: zero-shot needs a model)."""
    if not isinstance(config, MuZeroNoModelConfig):
        raise TypeError(f"muzero_nomodel needs a MuZeroNoModelConfig, got {type(config).__name__}")
    return make(env_spec, config)._replace(name="muzero_nomodel", adapt=None)


PARTS = base.parts_by_substring(
    [
        ("exploration", "exploration"),
        (".model", "world_model"),
        ("policy_head", "policy"),
        ("value_head", "value"),
        # The one Adam's step count: it follows the world model, whose moments it corrects.
        (".opt_state", "world_model"),
    ]
)
"""Which part of `MuZeroState` each leaf is (see `agents.base.Agent.part_of`)."""
