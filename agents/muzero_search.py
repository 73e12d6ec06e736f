"""MuZero's networks and search: the shared world model handed to mctx as a pure function.

    representation  world model `encode` + `observe` (the root is a filtered posterior)
    dynamics        world model `imagine`, its reward head, and its continuation head as the
                    search discount (`discount * P(continue)`)
    prediction      policy and value heads owned by the agent (`make_prediction_network`)

`make_search(...)` returns a `Search` whose `recurrent_fn(params, rng_key, action, embedding)
-> (mctx.RecurrentFnOutput, embedding)` is pure, with `params` a `SearchParams` bundling the
world-model and prediction parameters, and whose `run` calls `mctx.muzero_policy` or
`mctx.gumbel_muzero_policy` on a batch of roots.

Continuous actions: Sampled MuZero (Hubert et al. 2021). Every node draws `sampled_actions`
(K) candidate actions from its policy and keeps them in its `Embedding`; mctx searches over K
discrete branches and `recurrent_fn` hands the dynamics the real continuous action of the
chosen branch. Prior correction: the PUCT prior of Sampled MuZero is `(beta_hat / beta) * pi`,
with `beta` the sampling distribution and `beta_hat` the empirical distribution of the K
samples. Candidates are drawn from the policy itself (`beta = pi`), so the corrected prior is
`beta_hat`: uniform over the K samples (zero prior logits; duplicates cannot occur in
continuous spaces). The search's visit distribution (or Gumbel improved policy) over the K
candidates is then the policy target, trained by `-sum_i weight_i * log pi(a_i)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Annotated, Any, Callable, Literal, NamedTuple

import chex
import distrax
import haiku as hk
import jax
import jax.numpy as jnp
import mctx

from mbxfer import domains
from mbxfer.agents import networks
from mbxfer.agents.world_model import LatentState, WorldModel
from mbxfer.domains import non_negative, positive, unit_interval

Array = chex.Array
SEARCH_POLICIES = ("muzero", "gumbel")
SEARCH_MODES = ("explore", "eval", "reanalyse")
MIN_STD, MAX_STD = 0.1, 1.0  # Standard deviation range of the continuous policy.


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """The tree search (mctx) run when acting and when reanalysing replayed data."""

    policy: Literal["muzero", "gumbel"] = "gumbel"
    """`gumbel`: `mctx.gumbel_muzero_policy` (sequential halving, improved-policy targets; it
    improves the policy with few simulations, hence the CPU-sized default); `muzero`:
    `mctx.muzero_policy` (PUCT, visit-count targets, Dirichlet noise at the root)."""
    num_simulations: Annotated[int, positive] = 16
    """Simulations per search (MuZero used 50; fewer keep CPU runs fast)."""
    dirichlet_alpha: Annotated[float, positive] = 0.3
    """Concentration of the Dirichlet noise mixed into the root prior (muzero)."""
    dirichlet_fraction: Annotated[float, unit_interval] = 0.25
    """Weight of the Dirichlet noise in the root prior when exploring and reanalysing (muzero;
    as the acting-time targets of MuZero, without it visit targets collapse onto the prior's
    argmax); no noise when evaluating."""
    pb_c_init: Annotated[float, non_negative] = 1.25
    """PUCT exploration constant c1 (muzero)."""
    pb_c_base: Annotated[float, positive] = 19652.0
    """PUCT constant c2 (muzero)."""
    value_range_floor: Annotated[float, positive] = 0.01
    """Smallest range of sibling Q-values that the min-max normalization of Q divides by
    (mctx's `epsilon`, as EfficientZero's 0.01; both policies): smaller differences count as
    noise and the prior decides, instead of noise deciding every simulation and target."""
    temperature: Annotated[float, positive] = 1.0
    """Exploring actions are sampled with probability proportional to visits^(1/temperature)
    (muzero); evaluation takes the most visited action."""
    max_num_considered_actions: Annotated[int, positive] = 16
    """Actions considered at the root by sequential halving (gumbel; capped by the branches)."""
    gumbel_scale: Annotated[float, non_negative] = 1.0
    """Scale of the Gumbel noise at the root when exploring and reanalysing (gumbel)."""
    sampled_actions: Annotated[int, positive] = 8
    """K: candidate actions drawn from the policy at every node (continuous actions only)."""

    def __post_init__(self):
        domains.check(self)


class SearchParams(NamedTuple):
    """What `recurrent_fn` reads: the shared world model and the agent's prediction heads,
    and the intrinsic reward module's state when the agent has one."""

    model: hk.Params
    prediction: hk.Params
    exploration: Any = None


class Embedding(NamedTuple):
    """A search node's state.

    Attributes:
      latent: `LatentState` `[B, ...]` of the world model.
      candidates: `[B, K, A]` actions sampled at this node (continuous); `[B, 0]` (discrete).
    """

    latent: LatentState
    candidates: Array


class Prediction(NamedTuple):
    """Outputs of the prediction network on features `[..., F]`.

    Attributes:
      policy: `[..., A]` log-probabilities (discrete) or `[..., 2A]` mean and raw scale
        (continuous).
      value_logits: `[..., V]` two-hot logits of the value (symlog bins).
    """

    policy: Array
    value_logits: Array


class SearchOutput(NamedTuple):
    """A batch of searches.

    Attributes:
      action: `[B]` int (discrete) or `[B, A]` float: the action to take.
      branches: `[B, M]` int (discrete: `0..A-1`) or `[B, M, A]` float (continuous: the K
        candidates): the root's branches.
      weights: `[B, M]` the policy target over the branches (visit distribution, or the
        Gumbel improved policy).
      value: `[B]` the root's search value.
    """

    action: Array
    branches: Array
    weights: Array
    value: Array


def make_prediction_network(
    hidden: int, layers: int, value_bins: int, action_size: int, discrete: bool, unimix: float
):
    """Haiku transform `features [..., F] -> Prediction`: separate policy and value MLPs whose
    output layers start at zero (a uniform prior, zero value).

    Discrete policies are returned as log-probabilities of `(1 - unimix) * softmax + unimix / A`,
    so every consumer (search prior, policy loss, acting) sees the same bounded distribution.
    """

    def forward(features: Array) -> Prediction:
        sizes = [hidden] * layers
        policy_size = action_size if discrete else 2 * action_size
        policy = networks.MLP(sizes, policy_size, zero_output=True, name="policy_head")(features)
        value = networks.MLP(sizes, value_bins, zero_output=True, name="value_head")(features)
        if discrete and unimix > 0:
            probs = (1.0 - unimix) * jax.nn.softmax(policy, -1) + unimix / action_size
            policy = jnp.log(probs)
        return Prediction(policy, value)

    return hk.without_apply_rng(hk.transform(forward))


def policy_distribution(policy: Array, discrete: bool) -> distrax.Distribution:
    """Categorical over logits, or a diagonal Normal with mean `tanh(mean)` (continuous)."""
    if discrete:
        return distrax.Categorical(logits=policy)
    mean, scale = jnp.split(policy, 2, axis=-1)
    std = (MAX_STD - MIN_STD) * jax.nn.sigmoid(scale + 2.0) + MIN_STD
    return distrax.Independent(distrax.Normal(jnp.tanh(mean), std), 1)


def branch_log_probs(policy: Array, branches: Array, discrete: bool) -> Array:
    """`log pi(branch)` `[..., M]` for int branches `[..., M]` or actions `[..., M, A]`."""
    if discrete:
        log_probs = jax.nn.log_softmax(policy, axis=-1)
        return jnp.take_along_axis(log_probs, branches, axis=-1)
    return policy_distribution(policy[..., None, :], discrete=False).log_prob(branches)


class Search(NamedTuple):
    """The search as pure functions (see the module docstring)."""

    recurrent_fn: Callable[..., "tuple[mctx.RecurrentFnOutput, Embedding]"]
    """`recurrent_fn(params, rng_key, action [B], embedding) -> (output, embedding)`."""
    root: Callable[..., mctx.RootFnOutput]
    """`root(params, latent, rng, greedy) -> RootFnOutput`; `greedy` puts the policy mean
    among the continuous candidates."""
    run: Callable[..., SearchOutput]
    """`run(params, latent [B, ...], rng, mode) -> SearchOutput`, `mode` in `SEARCH_MODES`
    (a Python string)."""
    num_branches: int
    """M: actions (discrete) or sampled candidates (continuous) per node."""


class SearchModel(NamedTuple):
    """What the search functions below read besides their parameters (see `make_search`)."""

    model: WorldModel
    predict: Callable[[hk.Params, Array], Prediction]
    config: SearchConfig
    discount: float
    value_bins: Array
    reward_fn: Callable[[SearchParams, Array, Array, Array], Array]
    num_branches: int


def evaluate(search: SearchModel, params: SearchParams, latent: LatentState, rng, greedy=False):
    """Prior logits `[B, M]`, value `[B]` and the node's `Embedding` (continuous: the node's
    `num_branches` candidates sampled from the policy, its mean first when `greedy`)."""
    model = search.model
    prediction = search.predict(params.prediction, model.features(latent))
    value = networks.two_hot_decode(prediction.value_logits, search.value_bins)
    batch_size = value.shape[0]
    if model.discrete:
        return prediction.policy, value, Embedding(latent, jnp.zeros((batch_size, 0)))
    distribution = policy_distribution(prediction.policy, discrete=False)
    candidates = distribution.sample(seed=rng, sample_shape=search.num_branches)  # [K, B, A]
    candidates = jnp.clip(jnp.swapaxes(candidates, 0, 1), -1.0, 1.0)
    if greedy:
        candidates = candidates.at[:, 0].set(distribution.mode())
    # Sampled MuZero prior correction with beta = pi: uniform over the K samples.
    prior_logits = jnp.zeros((batch_size, search.num_branches), jnp.float32)
    return prior_logits, value, Embedding(latent, candidates)


def root(search: SearchModel, params: SearchParams, latent: LatentState, rng, greedy=False):
    """The roots `[B]` of a search from the posteriors `latent`."""
    prior_logits, value, embedding = evaluate(search, params, latent, rng, greedy)
    return mctx.RootFnOutput(prior_logits=prior_logits, value=value, embedding=embedding)


def branch_action(search: SearchModel, embedding: Embedding, index: Array) -> Array:
    """The environment action of branch `index` `[B]` of each node."""
    if search.model.discrete:
        return index
    return jnp.take_along_axis(embedding.candidates, index[:, None, None], axis=1)[:, 0]


def recurrent_fn(
    search: SearchModel, params: SearchParams, rng_key, action: Array, embedding: Embedding
):
    """mctx's `recurrent_fn`: one imagined step of the world model along branch `action`, with
    the agent's reward, the continuation as discount, and the prediction at the new node."""
    model = search.model
    imagine_key, sample_key = jax.random.split(rng_key)
    env_action = branch_action(search, embedding, action)
    latent = model.imagine(params.model, embedding.latent, env_action, imagine_key)
    features = model.features(latent)
    reward = search.reward_fn(params, model.features(embedding.latent), env_action, features)
    continuation = model.continuation(params.model, features)
    prior_logits, value, next_embedding = evaluate(search, params, latent, sample_key)
    output = mctx.RecurrentFnOutput(
        reward=reward,
        discount=search.discount * continuation,
        prior_logits=prior_logits,
        value=value,
    )
    return output, next_embedding


def _policy_output(search: SearchModel, params, rng, roots, mode: str):
    """`(mctx.PolicyOutput, chosen branch [B])` of `config.policy` (no exploration noise in
    `eval`; `eval` of the MuZero policy takes the most visited branch)."""
    config = search.config
    step = functools.partial(recurrent_fn, search)
    if config.policy == "muzero":
        output = mctx.muzero_policy(
            params,
            rng,
            roots,
            step,
            config.num_simulations,
            dirichlet_fraction=0.0 if mode == "eval" else config.dirichlet_fraction,
            dirichlet_alpha=config.dirichlet_alpha,
            pb_c_init=config.pb_c_init,
            pb_c_base=config.pb_c_base,
            temperature=config.temperature,
            qtransform=functools.partial(
                mctx.qtransform_by_parent_and_siblings, epsilon=config.value_range_floor
            ),
        )
        index = output.action if mode == "explore" else jnp.argmax(output.action_weights, -1)
        return output, index
    output = mctx.gumbel_muzero_policy(
        params,
        rng,
        roots,
        step,
        config.num_simulations,
        max_num_considered_actions=min(config.max_num_considered_actions, search.num_branches),
        gumbel_scale=0.0 if mode == "eval" else config.gumbel_scale,
        qtransform=functools.partial(
            mctx.qtransform_completed_by_mix_value, epsilon=config.value_range_floor
        ),
    )
    return output, output.action


def run(search: SearchModel, params: SearchParams, latent: LatentState, rng, mode: str):
    """A batch of searches from the posteriors `latent` `[B, ...]` -> `SearchOutput`."""
    if mode not in SEARCH_MODES:
        raise ValueError(f"mode={mode!r} must be one of {SEARCH_MODES}")
    root_key, search_key = jax.random.split(rng)
    roots = root(search, params, latent, root_key, greedy=mode == "eval")
    output, index = _policy_output(search, params, search_key, roots, mode)
    batch_size, num_branches = index.shape[0], search.num_branches
    if search.model.discrete:
        branches = jnp.broadcast_to(jnp.arange(num_branches), (batch_size, num_branches))
    else:
        branches = roots.embedding.candidates
    return SearchOutput(
        action=branch_action(search, roots.embedding, index),
        branches=branches,
        weights=output.action_weights,
        value=output.search_tree.summary().value,
    )


def make_search(
    model: WorldModel,
    predict: Callable[[hk.Params, Array], Prediction],
    config: SearchConfig,
    discount: float,
    value_bins: Array,
    reward_fn: Callable[[SearchParams, Array, Array, Array], Array],
) -> Search:
    """The search over `model` and the prediction network `predict(params, features)`.

    `reward_fn(params, features, action, next_features)` is the reward the search maximizes on
    each imagined transition (`action` is the environment action): the agent's reward mix of
    the reward head's prediction and, if it explores, the intrinsic reward.
    """
    num_branches = model.action_size if model.discrete else config.sampled_actions
    search = SearchModel(model, predict, config, discount, value_bins, reward_fn, num_branches)
    return Search(
        functools.partial(recurrent_fn, search),
        functools.partial(root, search),
        functools.partial(run, search),
        num_branches,
    )
