"""Ensemble disagreement (Plan2Explore; Sekar et al. 2020).

An ensemble of one-step predictors maps (features, action) to the next features. Where the
members disagree the model has seen little data, so the intrinsic reward is the ensemble's
disagreement: the variance of the members' predictions, averaged over output dimensions,
normalized by its running standard deviation. Each member is trained on the same
transitions from its own initialization (the source of its diversity).
"""

from __future__ import annotations

import haiku as hk
import jax.numpy as jnp
import rlax

from mbxfer.exploration import base


def make(config: base.ExplorationConfig, feature_size: int, action_size: int):
    """The disagreement module for features `[N, feature_size]` and actions `[N, action_size]`."""

    def ensemble(features, action):
        inputs = jnp.concatenate([features, action], axis=-1)
        members = [
            base.mlp(config.hidden, config.layers, feature_size, f"member_{k}")(inputs)
            for k in range(config.ensemble_size)
        ]
        return jnp.stack(members)  # [K, N, F]

    network = hk.without_apply_rng(hk.transform(ensemble))
    ema_init, ema_update = rlax.create_ema(config.normalization_decay)

    def raw_reward(params, features, action):
        predictions = network.apply(params, features, action)
        return jnp.mean(jnp.var(predictions, axis=0), axis=-1)

    def init(rng) -> base.ExplorationState:
        params = network.init(
            rng, jnp.zeros((1, feature_size), jnp.float32), jnp.zeros((1, action_size), jnp.float32)
        )
        return base.ExplorationState(params, ema_init(jnp.zeros(())))

    def reward(state: base.ExplorationState, features, action, next_features):
        del next_features  # Disagreement needs no outcome: it is about the prediction.
        return base.normalized(state.stats, raw_reward(state.params, features, action))

    def loss(params, batch: base.Transitions):
        batch = base.stop_gradient_transitions(batch)
        predictions = network.apply(params, batch.features, batch.action)
        error = jnp.mean(jnp.square(predictions - batch.next_features[None]))
        return error, {"intrinsic/disagreement_loss": error}

    def update_stats(state: base.ExplorationState, batch: base.Transitions):
        raw = raw_reward(state.params, batch.features, batch.action)
        _, stats = ema_update(raw, state.stats)
        return state._replace(stats=stats)

    return base.ExplorationModule("disagreement", config, init, reward, loss, update_stats)
