"""Random network distillation (Burda et al. 2019).

A fixed, randomly initialized target network embeds the next features; a predictor is
trained to match it. The prediction error is high on features unlike the training data, so
it is the intrinsic reward, normalized by its running standard deviation (`rlax.create_ema`).
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import rlax

from mbxfer.exploration import base


def make(config: base.ExplorationConfig, feature_size: int, action_size: int):
    """The RND module over next features `[N, feature_size]` (actions are not used)."""
    del action_size

    def networks(features):
        target = base.mlp(config.hidden, config.layers, config.rnd_output_size, "target")
        predictor = base.mlp(config.hidden, config.layers, config.rnd_output_size, "predictor")
        return jax.lax.stop_gradient(target(features)), predictor(features)

    network = hk.without_apply_rng(hk.transform(networks))
    ema_init, ema_update = rlax.create_ema(config.normalization_decay)

    def raw_reward(params, next_features):
        target, prediction = network.apply(params, next_features)
        return jnp.mean(jnp.square(prediction - target), axis=-1)

    def init(rng) -> base.ExplorationState:
        params = network.init(rng, jnp.zeros((1, feature_size), jnp.float32))
        return base.ExplorationState(params, ema_init(jnp.zeros(())))

    def reward(state: base.ExplorationState, features, action, next_features):
        del features, action
        return base.normalized(state.stats, raw_reward(state.params, next_features))

    def loss(params, batch: base.Transitions):
        error = jnp.mean(raw_reward(params, jax.lax.stop_gradient(batch.next_features)))
        return error, {"intrinsic/rnd_loss": error}

    def update_stats(state: base.ExplorationState, batch: base.Transitions):
        _, stats = ema_update(raw_reward(state.params, batch.next_features), state.stats)
        return state._replace(stats=stats)

    return base.ExplorationModule("rnd", config, init, reward, loss, update_stats)
