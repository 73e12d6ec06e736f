"""MuZero's training targets and losses, as small pure functions over replayed sequences.

Alignment (the replay format, `agents/world_model.py`): observation t is reached with
`reward[t]`, `discount[t]` (0 if t is terminal) and `is_last[t]`; `action[t]` is taken AT t.
A model unrolled k steps from root t with actions `action[t .. t+k-1]` predicts step t+k.

Every function handles episode boundaries inside a window: n-step returns stop at an
episode's last step (bootstrapping from it when it was truncated, not when it terminated), and
an unroll step is invalid once it crosses an episode start.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import rlax

from mbxfer.agents import sequences

Array = chex.Array


def n_step_returns(r_t: Array, discount_t: Array, is_last_t: Array, v_t: Array, n: int) -> Array:
    """n-step bootstrapped returns `G_0 .. G_{T-2}` of one sequence, cut at episode ends.

    `G_t = r_{t+1} + g_{t+1} (r_{t+2} + ... + g_{t+n} v_{t+n})` (`rlax.n_step_bootstrapped_
    returns`), where `g = discount * continuation`. A last step u (`is_last_t`) ends the
    recursion: `G_{u-1} = r_u + g_u v_u` (rlax's lambda is 0 there), so a truncated episode
    bootstraps from its last state and a terminated one (g_u = 0) does not, and nothing of the
    next episode leaks in. Past the window's end the last value bootstraps.

    Args:
      r_t: rewards `[T-1]` at times 1 .. T-1.
      discount_t: `discount * continuation` `[T-1]` at times 1 .. T-1.
      is_last_t: bool `[T-1]` at times 1 .. T-1.
      v_t: bootstrap values `[T-1]` at times 1 .. T-1.
      n: the number of steps.

    Returns:
      returns `[T-1]` for times 0 .. T-2.
    """
    chex.assert_rank([r_t, discount_t, is_last_t, v_t], 1)
    chex.assert_equal_shape([r_t, discount_t, is_last_t, v_t])
    lambda_t = 1.0 - jnp.asarray(is_last_t, jnp.float32)
    return rlax.n_step_bootstrapped_returns(
        r_t, discount_t, v_t, n, lambda_t=lambda_t, stop_target_gradients=True
    )


def value_targets(
    rewards: Array, discounts: Array, is_last: Array, values: Array, n: int, discount: float
) -> tuple[Array, Array]:
    """Batched n-step targets over replay-aligned `[B, T]` arrays: `(targets, valid)`.

    `targets[:, t]` is the n-step return from observation t; `valid` is False at the window's
    last step (no reward after it) and at episode ends (no action is taken there).
    """
    chex.assert_rank([rewards, discounts, is_last, values], 2)
    returns = jax.vmap(n_step_returns, in_axes=(0, 0, 0, 0, None))(
        rewards[:, 1:], discount * discounts[:, 1:], is_last[:, 1:], values[:, 1:], n
    )
    targets = jnp.concatenate([returns, values[:, -1:]], axis=1)
    length = rewards.shape[1]
    valid = (jnp.arange(length) < length - 1)[None] & ~is_last
    return jax.lax.stop_gradient(targets), valid


def unroll_index(length: int, unroll_steps: int) -> tuple[Array, Array]:
    """`(future_index, inside)` `[T, K+1]`: step t+k clipped to T-1, and whether t+k < T."""
    steps = jnp.arange(length)[:, None] + jnp.arange(unroll_steps + 1)[None, :]
    return jnp.minimum(steps, length - 1), steps < length


def unroll_valid(is_first: Array, unroll_steps: int) -> Array:
    """bool `[B, T, K+1]`: unrolling k steps from t stays inside the window and its episode."""
    future_index, inside = unroll_index(is_first.shape[1], unroll_steps)
    episode = jnp.cumsum(jnp.asarray(is_first, jnp.int32), axis=1)  # [B, T]
    return inside[None] & (episode[:, future_index] == episode[:, :, None])


def at_future(x: Array, unroll_steps: int) -> Array:
    """`[B, T, ...]` -> `[B, T, K+1, ...]`: `x[:, t + k]` (clipped at the window's end)."""
    future_index, _ = unroll_index(x.shape[1], unroll_steps)
    return x[:, future_index]


def unroll_actions(actions: Array, unroll_steps: int) -> Array:
    """`[B, T, ...]` -> `[K, B * T, ...]`: the replayed action of unroll step k from every t."""
    batch_size, length = actions.shape[:2]
    future = at_future(actions, unroll_steps)[:, :, :unroll_steps]  # [B, T, K, ...]
    future = jnp.moveaxis(future, 2, 0)
    return future.reshape((unroll_steps, batch_size * length) + actions.shape[2:])


def scale_gradient(tree: Any, scale: float) -> Any:
    """Identity forward; multiplies gradients by `scale` (MuZero halves them per unroll step)."""
    return jax.tree.map(lambda x: x * scale + jax.lax.stop_gradient(x) * (1.0 - scale), tree)


def masked_step_means(loss: Array, valid: Array) -> Array:
    """`[B, T, S]` -> `[S]`: the mean of `loss` over valid (B, T) entries of each step."""
    chex.assert_equal_shape([loss, valid])
    valid = valid.astype(jnp.float32)
    return jnp.sum(loss * valid, (0, 1)) / jnp.maximum(jnp.sum(valid, (0, 1)), 1.0)


def unroll_weighted(step_means: Array) -> Array:
    """`[K+1]` -> scalar: step 0 (the root) weighs 1, every unrolled step 1/K (MuZero)."""
    steps = step_means.shape[0]
    if steps == 1:
        return step_means[0]
    return step_means[0] + jnp.mean(step_means[1:])


class PolicyTargets(NamedTuple):
    """Policy targets at every replayed step of the rows that have them.

    Attributes:
      branches: `[R, T, M]` int or `[R, T, M, A]` float: actions the targets weight.
      weights: `[R, T, M]`: the target weight of each branch.
      valid: bool `[R, T]`: where a target exists.
    """

    branches: Array
    weights: Array
    valid: Array


def advantage_weights(advantages: Array, valid: Array, temperature: float) -> Array:
    """Advantage-weighted regression weights `min(exp(A / (temperature * std(A))), 20)` `[B, T]`
    (the model-free control's policy improvement; `std` over valid steps, no gradient)."""
    valid = valid.astype(jnp.float32)
    mean = sequences.masked_mean(advantages, valid)
    std = jnp.sqrt(sequences.masked_mean(jnp.square(advantages - mean), valid)) + 1e-3
    weights = jnp.minimum(jnp.exp(advantages / (temperature * std)), 20.0)
    return jax.lax.stop_gradient(weights * valid)
