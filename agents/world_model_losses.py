"""World-model loss terms: one pure function per term, registered in `LOSS_TERMS`.

A term maps a `LossContext` (params, batch, embeddings, posteriors, priors, features, head
outputs; all batch-major `[B, T, ...]`) to `(per_step_loss [B, T], extra_metrics)`.
`WorldModel.loss` runs every term whose scale in `WorldModelConfig.losses` is non-zero, takes
the mean of its per-step loss, reports it as `loss/<name>` and adds `scale * mean` to the total.
A term with scale 0 is never run: no metric, no gradient.

Adding a term (e.g. `contrastive`: InfoNCE between `imagine`d and encoded future latents, or
`self_predictive`: SPR-style cosine similarity to projections under `context.target_params`,
an EMA copy kept by the agent) takes three edits and no change to callers of `loss`:
  1. write `def contrastive(context: LossContext) -> tuple[Array, dict[str, Array]]` here;
  2. add `"contrastive": contrastive` to `LOSS_TERMS`;
  3. add `contrastive: float = 0.0` (with a docstring) to `LossConfig`.
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

from agents import latent, networks
from agents.world_model_types import Array, LossContext, LossTerm


def _per_step(loss: Array, context: LossContext) -> Array:
    chex.assert_shape(loss, context.batch["reward"].shape[:2])
    return loss


def reconstruction(context: LossContext) -> tuple[Array, dict[str, Array]]:
    """Image: squared error summed over pixels in [0, 1] units; vector: squared error summed
    over dimensions in symlog space (DreamerV3). Both are added."""
    predicted = context.heads.observation
    observation = context.batch["observation"]
    if not predicted:
        raise ValueError("the reconstruction loss needs a decoder (config.decoder=True)")
    total, metrics = 0.0, {}
    for key, prediction in predicted.items():
        if key == networks.IMAGE_KEY:
            target = networks.image_to_float(observation[key])
            error = jnp.sum(jnp.square(prediction - target), axis=(-3, -2, -1))
        else:
            target = networks.symlog(observation[key])
            error = jnp.sum(jnp.square(prediction - target), axis=-1)
        metrics[f"loss/reconstruction_{key}"] = error.mean()
        total = total + error
    return _per_step(total, context), metrics


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


LOSS_TERMS: Mapping[str, LossTerm] = {
    "reconstruction": reconstruction,
    "reward": reward,
    "continuation": continuation,
    "kl_dynamics": kl_dynamics,
    "kl_representation": kl_representation,
}
"""Loss-term name (a `LossConfig` field) -> term."""
