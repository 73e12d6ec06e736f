"""Latent dynamics of the world model: the RSSM and the deterministic core, as Haiku modules,
plus the pure functions over `LatentState` (initial state, features, KL, entropy).

RSSM (Hafner et al. 2021/2023, DreamerV2/V3), one step with previous state (h, z):
  prior:     h' = GRU(h, [z, a]),  z' ~ p(z' | h')
  posterior: h' as above,          z' ~ q(z' | h', embed)
Categorical latents with `unimix` and straight-through sampling.

Deterministic (MuZero-like): h' = GRU(h, a) is the prior; the posterior folds the embedding in
with a second GRU step, h'' = GRU_obs(h', embed). The KL terms then become the KL between
unit-variance Gaussians centred at the two states, `0.5 * ||h'' - h'||^2`.
"""

from __future__ import annotations

from typing import Optional

import chex
import distrax
import haiku as hk
import jax
import jax.numpy as jnp

from mbxfer.agents import networks
from mbxfer.agents.world_model_types import LatentState, WorldModelConfig


def initial_state(config: WorldModelConfig, batch_size: int) -> LatentState:
    """The all-zeros state `[B, ...]` that episodes start from."""
    return LatentState(
        deter=jnp.zeros((batch_size, config.deter), jnp.float32),
        stoch=jnp.zeros((batch_size, config.stoch_size), jnp.float32),
        logits=jnp.zeros(
            (batch_size, config.stoch_size // config.stoch_classes, config.stoch_classes),
            jnp.float32,
        ),
    )


def features(state: LatentState) -> jax.Array:
    """`[..., D + G*C]`: the deterministic state and the flattened stochastic sample."""
    return jnp.concatenate([state.deter, state.stoch], axis=-1)


def kl_divergence(lhs: LatentState, rhs: LatentState, latent: str) -> jax.Array:
    """KL(lhs || rhs) `[...]` summed over latent groups (see the module docstring)."""
    if latent == "rssm":
        lhs_dist = distrax.Categorical(logits=lhs.logits)
        return lhs_dist.kl_divergence(distrax.Categorical(logits=rhs.logits)).sum(-1)
    return 0.5 * jnp.sum(jnp.square(lhs.deter - rhs.deter), axis=-1)


def entropy(state: LatentState) -> jax.Array:
    """Entropy `[...]` of the categorical latents, summed over groups (0 if deterministic)."""
    return distrax.Categorical(logits=state.logits).entropy().sum(-1)


class GRUCell(hk.Module):
    """LayerNorm GRU (DreamerV3): `(inputs [B, I], state [B, D]) -> state [B, D]`.

    The update gate is biased towards keeping the state (`update_bias` -1, DreamerV3), which
    eases long-range memory; a larger bias starts it closer to taking each new input.
    """

    def __init__(self, size: int, name: Optional[str] = None, update_bias: float = -1.0):
        super().__init__(name=name)
        self._size = size
        self._update_bias = update_bias

    def __call__(self, inputs: chex.Array, state: chex.Array) -> jax.Array:
        parts = hk.Linear(3 * self._size, with_bias=False, name="linear")(
            jnp.concatenate([inputs, state], axis=-1)
        )
        parts = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name="norm")(parts)
        reset, candidate, update = jnp.split(parts, 3, axis=-1)
        candidate = jnp.tanh(jax.nn.sigmoid(reset) * candidate)
        update = jax.nn.sigmoid(update + self._update_bias)
        return update * candidate + (1.0 - update) * state


def _dense(size: int, name: str) -> hk.Module:
    """Linear -> LayerNorm -> SiLU."""
    return networks.MLP([size], name=name)


class RSSMCore(hk.Module):
    """Recurrent state-space model with categorical latents."""

    def __init__(self, config: WorldModelConfig, name: Optional[str] = "rssm"):
        super().__init__(name=name)
        self._config = config
        groups, classes = config.stoch_groups, config.stoch_classes
        self._imagine_input = _dense(config.hidden, name="imagine_input")
        self._gru = GRUCell(config.deter, name="gru")
        self._prior_head = networks.MLP([config.hidden], groups * classes, name="prior_head")
        self._posterior_head = networks.MLP(
            [config.hidden], groups * classes, name="posterior_head"
        )

    def _sample(self, raw_logits: jax.Array, rng: chex.PRNGKey) -> tuple[jax.Array, jax.Array]:
        """Unimix logits `[B, G, C]` and a straight-through one-hot sample `[B, G*C]`."""
        config = self._config
        raw_logits = raw_logits.reshape(raw_logits.shape[:-1] + (config.stoch_groups, -1))
        probs = jax.nn.softmax(raw_logits, axis=-1)
        probs = (1.0 - config.unimix) * probs + config.unimix / config.stoch_classes
        logits = jnp.log(probs)
        sample = jax.nn.one_hot(jax.random.categorical(rng, logits), config.stoch_classes)
        sample = sample + probs - jax.lax.stop_gradient(probs)
        return logits, sample.reshape(sample.shape[:-2] + (-1,))

    def imagine(self, state: LatentState, action: chex.Array, rng: chex.PRNGKey) -> LatentState:
        """One prior step from `state` taking `action` `[B, A]` (float)."""
        inputs = self._imagine_input(jnp.concatenate([state.stoch, action], axis=-1))
        deter = self._gru(inputs, state.deter)
        logits, stoch = self._sample(self._prior_head(deter), rng)
        return LatentState(deter=deter, stoch=stoch, logits=logits)

    def observe(
        self, state: LatentState, prev_action: chex.Array, embed: chex.Array, rng: chex.PRNGKey
    ) -> tuple[LatentState, LatentState]:
        """One filtering step: `(posterior, prior)` for the observation embedded as `embed`."""
        prior_rng, posterior_rng = jax.random.split(rng)
        prior = self.imagine(state, prev_action, prior_rng)
        raw_logits = self._posterior_head(jnp.concatenate([prior.deter, embed], axis=-1))
        logits, stoch = self._sample(raw_logits, posterior_rng)
        return LatentState(deter=prior.deter, stoch=stoch, logits=logits), prior


class DeterministicCore(hk.Module):
    """A purely deterministic latent: a GRU over actions, corrected by each embedding."""

    def __init__(self, config: WorldModelConfig, name: Optional[str] = "deterministic"):
        super().__init__(name=name)
        self._config = config
        self._imagine_input = _dense(config.hidden, name="imagine_input")
        self._gru = GRUCell(config.deter, name="gru")
        self._observe_input = _dense(config.hidden, name="observe_input")
        self._observe_gru = GRUCell(
            config.deter, name="observe_gru", update_bias=config.observe_update_bias
        )

    def _state(self, deter: jax.Array) -> LatentState:
        batch = deter.shape[:-1]
        classes = self._config.stoch_classes
        return LatentState(
            deter=deter,
            stoch=jnp.zeros(batch + (0,), deter.dtype),
            logits=jnp.zeros(batch + (0, classes), deter.dtype),
        )

    def imagine(self, state: LatentState, action: chex.Array, rng: chex.PRNGKey) -> LatentState:
        """One prior step from `state` taking `action` `[B, A]`; `rng` is unused."""
        del rng
        return self._state(self._gru(self._imagine_input(action), state.deter))

    def observe(
        self, state: LatentState, prev_action: chex.Array, embed: chex.Array, rng: chex.PRNGKey
    ) -> tuple[LatentState, LatentState]:
        """One filtering step: the prior, then a GRU step over the embedding."""
        prior = self.imagine(state, prev_action, rng)
        deter = self._observe_gru(self._observe_input(embed), prior.deter)
        return self._state(deter), prior


def make_core(config: WorldModelConfig) -> RSSMCore | DeterministicCore:
    """The dynamics core for `config.latent` (call inside a Haiku transform)."""
    if config.latent == "rssm":
        return RSSMCore(config)
    return DeterministicCore(config)
