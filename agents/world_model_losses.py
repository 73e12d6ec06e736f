"""World-model loss terms: one pure function per term, registered in `LOSS_TERMS`.

A term maps a `LossContext` (params, batch, embeddings, posteriors, priors, features, head
outputs; all batch-major `[B, T, ...]`) to `(per_step_loss [B, T], extra_metrics)`.
`WorldModel.loss` runs every term whose scale in `WorldModelConfig.losses` is non-zero, takes
the mean of its per-step loss, reports it as `loss/<name>` and adds `scale * mean` to the total.
A term with scale 0 is never run: no metric, no gradient.

Self-supervised terms (off by default; `LossConfig.contrastive`, `LossConfig.self_predictive`)
predict the future: from every posterior of the batch they `imagine` up to
`self_supervised_horizon` steps with the replayed actions, and compare each imagined latent with
the observed future through projection heads (`WorldModel.project`):
  * `contrastive` (CoBERL / ReLIC spirit, no augmentations): InfoNCE that picks the encoder's
    embedding of the true future observation among every embedding of the batch;
  * `self_predictive` (SPR, Schwarzer et al. 2021): negative cosine similarity between the
    online projection + predictor of the imagined latent and the target network's projection
    of the latent it filters from the real observations (`context.target_params`: the agent's
    EMA copy, or the stopped online parameters).

Adding a term takes three edits and no change to callers of `loss`:
  1. write `def my_term(context: LossContext) -> tuple[Array, dict[str, Array]]` here;
  2. add `"my_term": my_term` to `LOSS_TERMS`;
  3. add `my_term: float = 0.0` (with a docstring) to `LossConfig`, before `free_bits`.
New parameters it needs (projection heads) go into `world_model.py`'s Haiku builder and
are reached through `context.model`. `make_world_model` also takes a `loss_terms` table, so
an experiment can register a term without editing this file.
"""

from __future__ import annotations

from typing import Mapping

import chex
import jax
import jax.numpy as jnp
import optax

from mbxfer.agents import latent, networks, sequences
from mbxfer.agents.world_model_types import Array, LossContext, LossTerm


def _per_step(loss: Array, context: LossContext) -> Array:
    chex.assert_shape(loss, context.batch["reward"].shape[:2])
    return loss


def reconstruction(context: LossContext) -> tuple[Array, dict[str, Array]]:
    """Image: squared error summed over pixels in [0, 1] units; vector: squared error summed
    over dimensions in symlog space (DreamerV3). Both are added."""
    predicted = context.heads.observation
    if not predicted:
        raise ValueError("the reconstruction loss needs a decoder (config.decoder=True)")
    errors = _observation_errors(predicted, context.batch["observation"])
    metrics = {f"loss/reconstruction_{key}": error.mean() for key, error in errors.items()}
    return _per_step(sum(errors.values()), context), metrics


def _observation_errors(predicted: Mapping[str, Array], observed) -> dict[str, Array]:
    """Per observation key, the decoder's squared error summed over the key's own axes: image
    pixels in [0, 1] units, vector dimensions in symlog space (DreamerV3)."""
    errors = {}
    for key, prediction in predicted.items():
        if key == networks.IMAGE_KEY:
            target, axes = networks.image_to_float(observed[key]), (-3, -2, -1)
        else:
            target, axes = networks.symlog(observed[key]), -1
        errors[key] = jnp.sum(jnp.square(prediction - target), axis=axes)
    return errors


def reward(context: LossContext) -> tuple[Array, dict[str, Array]]:
    """Two-hot cross-entropy of the reward head against the reward received at each step."""
    bins = networks.symlog_bins(context.config.reward_bins)
    target = jnp.asarray(context.batch["reward"], jnp.float32)
    loss = networks.two_hot_loss(context.heads.reward_logits, target, bins)
    return _per_step(loss, context), {}


def continuation(context: LossContext) -> tuple[Array, dict[str, Array]]:
    """Binary cross-entropy of the continuation head against `1 - is_terminal`."""
    target = 1.0 - jnp.asarray(context.batch["is_terminal"], jnp.float32)
    logit = context.heads.continuation_logit
    loss = optax.sigmoid_binary_cross_entropy(logit, target)
    accuracy = jnp.mean((logit > 0) == (target > 0.5))
    return _per_step(loss, context), {"world_model/continuation_accuracy": accuracy}


def kl_dynamics(context: LossContext) -> tuple[Array, dict[str, Array]]:
    """`max(free_bits, KL(stop_grad(posterior) || prior))`: trains the dynamics (prior)."""
    posteriors = jax.lax.stop_gradient(context.posteriors)
    kl = latent.kl_divergence(posteriors, context.priors, context.config.latent)
    loss = jnp.maximum(kl, context.config.losses.free_bits)
    metrics = {"world_model/kl": kl.mean()}
    if context.config.latent == "rssm":
        metrics["world_model/prior_entropy"] = latent.entropy(context.priors).mean()
        metrics["world_model/posterior_entropy"] = latent.entropy(context.posteriors).mean()
    return _per_step(loss, context), metrics


def kl_representation(context: LossContext) -> tuple[Array, dict[str, Array]]:
    """`max(free_bits, KL(posterior || stop_grad(prior)))`: keeps representations predictable."""
    priors = jax.lax.stop_gradient(context.priors)
    kl = latent.kl_divergence(context.posteriors, priors, context.config.latent)
    return _per_step(jnp.maximum(kl, context.config.losses.free_bits), context), {}


def imagined_futures(context: LossContext, horizon: int = 0) -> tuple[Array, Array, Array]:
    """Latents imagined ahead of every posterior with the replayed actions (`horizon` steps,
    by default `self_supervised_horizon`).

    Returns `(features [B, T, H, F], future_index [T, H], valid [B, T, H])`: `features[:, t,
    k-1]` is imagined k steps after step t and predicts step `future_index[t, k-1] = t + k`
    (clipped to T-1); `valid` is False where t + k is past the window or an episode starts
    in t+1 .. t+k (the replayed action there belongs to another episode).
    """
    model, batch = context.model, context.batch
    horizon = horizon or context.config.losses.self_supervised_horizon
    batch_size, length = batch["reward"].shape
    steps = jnp.arange(length)[:, None] + jnp.arange(1, horizon + 1)[None, :]  # [T, H]: t + k
    future_index = jnp.minimum(steps, length - 1)
    # The action taken at t + k - 1 leads to t + k.
    actions = jnp.moveaxis(batch["action"][:, jnp.minimum(steps - 1, length - 1)], 2, 0)
    actions = actions.reshape((horizon, batch_size * length) + actions.shape[3:])  # [H, B*T, ...]
    start = jax.tree.map(sequences.flatten_time, context.posteriors)

    def step(state, inputs):
        action, key = inputs
        state = model.imagine(context.params, state, action, key)
        return state, model.features(state)

    keys = jax.random.split(context.rng, horizon)
    _, features = jax.lax.scan(step, start, (actions, keys))  # [H, B*T, F]
    features = jnp.moveaxis(features.reshape((horizon, batch_size, length, -1)), 0, 2)
    episode_starts = jnp.cumsum(jnp.asarray(batch["is_first"], jnp.int32), axis=1)  # [B, T]
    crossed = episode_starts[:, future_index] != episode_starts[:, :, None]
    valid = (steps < length)[None] & ~crossed
    return features, future_index, valid


def open_loop_heads(context: LossContext) -> tuple[Array, dict[str, Array]]:
    """The reward and continuation heads on latents imagined 1..K steps ahead
    (`open_loop_horizon`) of every posterior with the replayed actions, against the reward
    and continuation observed K steps later; predictions that cross an episode start or the
    window's end are masked.

    The `reward` and `continuation` terms train the heads on filtered posteriors only, yet an
    actor-critic in imagination reads them on prior rollouts: this term trains what it reads,
    and its gradient reaches the dynamics, which must then carry what predicts reward (as
    MuZero's K-step unroll does; Schrittwieser et al. 2020). Metric: the mean absolute error
    of the imagined reward where the observed reward is non-zero.
    """
    config = context.config
    imagined, future_index, valid = imagined_futures(context, config.losses.open_loop_horizon)
    heads = context.model.heads(context.params, imagined)  # [B, T, K, ...]
    reward = jnp.asarray(context.batch["reward"], jnp.float32)[:, future_index]  # [B, T, K]
    bins = networks.symlog_bins(config.reward_bins)
    reward_loss = networks.two_hot_loss(heads.reward_logits, reward, bins)
    cont = 1.0 - jnp.asarray(context.batch["is_terminal"], jnp.float32)[:, future_index]
    cont_loss = optax.sigmoid_binary_cross_entropy(heads.continuation_logit, cont)
    predicted = networks.two_hot_decode(heads.reward_logits, bins)
    rewarded = valid & (reward != 0)
    error = jnp.sum(jnp.abs(predicted - reward) * rewarded) / jnp.maximum(jnp.sum(rewarded), 1)
    return _per_step(_masked_mean_over_horizon(reward_loss + cont_loss, valid), context), {
        "world_model/open_loop_reward_error": error
    }


def open_loop_reconstruction(context: LossContext) -> tuple[Array, dict[str, Array]]:
    """The decoder on latents imagined 1..K steps ahead (`open_loop_horizon`) of every
    posterior with the replayed actions, against the observation seen K steps later (the
    `reconstruction` term's error, masked as `open_loop_heads`).

    `reconstruction` trains the decoder on filtered posteriors only, so nothing asks an
    imagined latent to still hold what was observed: this term does, and its gradient reaches
    the dynamics (an observation-space multi-step loss, as PlaNet's overshooting is one in
    latent space; Hafner et al. 2019). Metric: its mean error at the last imagined step.
    """
    config = context.config
    imagined, future_index, valid = imagined_futures(context, config.losses.open_loop_horizon)
    predicted = context.model.heads(context.params, imagined).observation  # [B, T, K, ...]
    if not predicted:
        raise ValueError("the open_loop_reconstruction loss needs a decoder (config.decoder=True)")
    observed = {key: context.batch["observation"][key][:, future_index] for key in predicted}
    total = sum(_observation_errors(predicted, observed).values())  # [B, T, K]
    last = valid[..., -1]
    final_error = jnp.sum(total[..., -1] * last) / jnp.maximum(jnp.sum(last), 1)
    return _per_step(_masked_mean_over_horizon(total, valid), context), {
        "world_model/open_loop_reconstruction_last": final_error
    }


def _masked_mean_over_horizon(loss: Array, valid: Array) -> Array:
    """`[B, T, H]` -> `[B, T]`: the mean over the valid horizon steps (0 where none is)."""
    valid = valid.astype(jnp.float32)
    return jnp.sum(loss * valid, -1) / jnp.maximum(jnp.sum(valid, -1), 1.0)


def _normalize(x: Array) -> Array:
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-8)


def contrastive(context: LossContext) -> tuple[Array, dict[str, Array]]:
    """InfoNCE between imagined future latents and encoded future observations.

    For step t and horizon k, the query is `project("contrastive_latent", imagined_{t,k})` and
    the positive key is `project("contrastive_embed", embed_{t+k})`; the keys of every other
    step of the batch (`B * T - 1` of them) are the negatives. Logits are cosine similarities
    over `contrastive_temperature`; gradients reach both the dynamics and the encoder (CoBERL's
    targets are the encoder's own embeddings). Metric: top-1 accuracy of the positive.
    """
    losses = context.config.losses
    imagined, future_index, valid = imagined_futures(context)
    batch_size, length, horizon = valid.shape
    queries = _normalize(context.model.project(context.params, "contrastive_latent", imagined))
    keys = _normalize(context.model.project(context.params, "contrastive_embed", context.embeds))
    keys = keys.reshape(batch_size * length, -1)  # [B*T, P]
    logits = jnp.einsum("bthp,np->bthn", queries, keys) / losses.contrastive_temperature
    positive = jnp.arange(batch_size)[:, None, None] * length + future_index[None]  # [B, T, H]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, positive)
    correct = (jnp.argmax(logits, -1) == positive).astype(jnp.float32)
    accuracy = jnp.sum(correct * valid) / jnp.maximum(jnp.sum(valid), 1)
    return _per_step(_masked_mean_over_horizon(loss, valid), context), {
        "world_model/contrastive_accuracy": accuracy
    }


def self_predictive(context: LossContext) -> tuple[Array, dict[str, Array]]:
    """SPR: `1 - cos(q(g(imagined_{t,k})), stop_grad(g_target(target_posterior_{t+k})))`.

    `g` is the `predictive_projection` head and `q` the `predictive_predictor` head of the
    online parameters; `g_target` and the target posteriors (the batch filtered again from the
    same initial state) use `context.target_params`, the agent's EMA copy. Metric: the mean
    cosine similarity over valid predictions.
    """
    model = context.model
    imagined, future_index, valid = imagined_futures(context)
    online = model.project(context.params, "predictive_projection", imagined)
    online = _normalize(model.project(context.params, "predictive_predictor", online))
    target_params = jax.lax.stop_gradient(context.target_params)
    observe_key = jax.random.fold_in(context.rng, 1)
    target_posteriors, _ = model.observe_sequence(
        target_params,
        jax.lax.stop_gradient(context.initial_state),
        context.batch["action"],
        model.encode(target_params, context.batch["observation"]),
        context.batch["is_first"],
        observe_key,
    )
    target_features = model.features(target_posteriors)[:, future_index]  # [B, T, H, F]
    target = model.project(target_params, "predictive_projection", target_features)
    target = jax.lax.stop_gradient(_normalize(target))
    cosine = jnp.sum(online * target, axis=-1)  # [B, T, H]
    mean_cosine = jnp.sum(cosine * valid) / jnp.maximum(jnp.sum(valid), 1)
    return _per_step(_masked_mean_over_horizon(1.0 - cosine, valid), context), {
        "world_model/self_predictive_cosine": mean_cosine
    }


LOSS_TERMS: Mapping[str, LossTerm] = {
    "reconstruction": reconstruction,
    "reward": reward,
    "continuation": continuation,
    "kl_dynamics": kl_dynamics,
    "kl_representation": kl_representation,
    "contrastive": contrastive,
    "self_predictive": self_predictive,
    "open_loop_heads": open_loop_heads,
    "open_loop_reconstruction": open_loop_reconstruction,
}
"""Loss-term name (a `LossConfig` field) -> term."""
