"""Replay-alignment helpers every agent shares: transitions, masks, one-hot actions.

THE alignment (the replay format, `agents/world_model.py`): row t holds observation t, the
action TAKEN AT t (`action[t]`), and what arriving at t brought: `reward[t]`, `discount[t]`
(0 where t is terminal), `is_first[t]`, `is_last[t]`. So the transition out of row t is
`(observation[t], action[t]) -> (observation[t+1], reward[t+1], discount[t+1])`, and a value
that belongs to that transition (an intrinsic reward, a TD error) is stored in row t+1, next to
the reward it is mixed with; row 0 of a window has no transition into it.

Every function works on the last axis as time, so it takes one sequence `[T]` or a batch of
them `[B, T]` alike.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

Array = chex.Array


def valid_transitions(is_first: Array, is_last: Array) -> Array:
    """bool `[..., T-1]`: whether the transition out of row t exists.

    It does not where row t is an episode's last step (its action is ignored by the auto-reset)
    or where row t+1 starts an episode without row t being last (the runner cut the episode to
    reseed its environments, so the outcome was never stored). Losses on transitions are masked
    with it; returns stop before an invalid transition.
    """
    return jnp.logical_not(is_last[..., :-1]) & jnp.logical_not(is_first[..., 1:])


def episode_ends(is_first: Array, is_last: Array) -> Array:
    """bool `[..., T]`: the last step of an episode inside the window: `is_last`, or a step
    followed by an episode start without one (a cut episode), so that no return crosses into
    the next episode. The window's last row is an end only if `is_last` (what follows is
    unknown). Equivalently, `~episode_ends[..., :-1] == valid_transitions`."""
    is_first = jnp.asarray(is_first, bool)
    cut = jnp.concatenate([is_first[..., 1:], jnp.zeros_like(is_first[..., :1])], axis=-1)
    return jnp.asarray(is_last, bool) | cut


def masked_mean(x: Array, valid: Array) -> Array:
    """The mean of `x` over the entries where `valid` (bool or 0/1 float), 0 when there is none."""
    valid = valid.astype(x.dtype)
    return jnp.sum(x * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def action_input(action: Array, discrete: bool, action_size: int) -> jax.Array:
    """The action as a network reads it: one-hot float32 `[..., A]` for discrete actions (int
    `[...]`), float32 `[..., A]` as given for continuous ones."""
    action = jnp.asarray(action)
    if discrete:
        return jax.nn.one_hot(action, action_size)
    return action.astype(jnp.float32)


def to_rows(per_transition: Array, is_first: Array | None = None) -> jax.Array:
    """`[..., T-1]` values of the transitions out of rows 0..T-2 -> `[..., T]` aligned with
    `reward`: row t+1 holds the transition into it, row 0 holds 0. With `is_first`, rows that
    start an episode hold 0 too (their "transition" crossed an episode boundary)."""
    if is_first is not None:
        per_transition = jnp.where(jnp.asarray(is_first)[..., 1:], 0.0, per_transition)
    zeros = jnp.zeros_like(per_transition[..., :1])
    return jnp.concatenate([zeros, per_transition], axis=-1)


def flatten_time(x: Array) -> jax.Array:
    """`[B, T, ...]` -> `[B * T, ...]`, with an explicit leading size: the deterministic
    latent's `stoch` has zero width, and reshaping a zero-size array to `(-1, 0)` is ambiguous."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


__all__ = [
    "action_input",
    "episode_ends",
    "flatten_time",
    "masked_mean",
    "to_rows",
    "valid_transitions",
]
