"""What the model-free counterparts share: `muzero_nomodel` and `dreamer_nomodel`.

Each counterpart is its model-based agent run with a switch, not a fork: MuZero with
`planning=False, unroll_steps=0` (`agents.muzero.MuZeroNoModelConfig`), Dreamer with
`actor_critic.source="replay"` (`agents.dreamer.DreamerNoModelConfig`). Both keep:

* the same representation: the world model's encoder and filter (`encode` + `observe`, i.e.
  the recurrent core stepped with real observations and the previous real action), acting
  from its posterior as before;
* the same replay, batch, sequence length and train ratio (the runner's);
* the same policy and value networks and targets (MuZero: n-step value targets from the
  target network and, since `planning=False`, an advantage-weighted policy; Dreamer:
  lambda-returns, slow critic, normalized REINFORCE actor), computed on real replayed steps;

and remove every loss that needs the dynamics (`imagine`): the KL terms, the self-supervised
prediction terms, MuZero's unrolled value/policy/reward losses, Dreamer's imagined rollouts.

What trains the representation: only the agent's own value and policy losses on the real
replayed steps, backpropagated through the filter (as in a recurrent model-free agent). The
world model's observation-level heads (reward, continuation, decoder) need no dynamics, but
they are the model's, so by default they are off too and not built: a control with a
reward-prediction or reconstruction auxiliary would confound "no model" with "no auxiliary
task". They are one override away (`agent.model.losses.reward=1`, or `reconstruction=1` with
`agent.model.decoder=true`), which builds the heads again. The RSSM's prior head still runs
inside each filter step (the posterior reuses the prior's recurrent state), but nothing
trains it any more.

Exploration: the intrinsic module reads the filter's features, as in the model-based agents.
Disagreement keeps its own ensemble of one-step predictors over those features (a forward
model that only ever produces the novelty bonus, as in Pathak et al. 2019 with a model-free
learner), so both modules apply; `protocol.intrinsic=auto` picks disagreement as it does for
the model-based twins. Zero-shot transfer needs a reward head that a model-based learner
plans or imagines with, so the counterparts have no `adapt` and the runner refuses that phase.
"""

from __future__ import annotations

from typing import Any, Literal

import chex
import jax
import jax.numpy as jnp
import rlax

from mbxfer.agents import sequences
from mbxfer.agents.world_model_types import LatentState, LossConfig, WorldModel, WorldModelConfig

Array = chex.Array

HEADS = ("reward_head", "continuation_head")
"""World-model modules that only model losses, imagination and search read."""
DYNAMICS_TERMS = (
    "kl_dynamics", "kl_representation", "contrastive", "self_predictive", "open_loop_heads",
    "open_loop_reconstruction",
)  # fmt: skip
"""World-model loss terms that train or read the dynamics (`imagine` or the prior)."""


def representation_model(latent: Literal["rssm", "deterministic"]) -> WorldModelConfig:
    """The world-model config of a counterpart: its twin's latent, no decoder, no loss term."""
    no_terms = {name: 0.0 for name in LossConfig().scales()}
    return WorldModelConfig(latent=latent, decoder=False, losses=LossConfig(**no_terms))


def check_model_free(agent: str, model: WorldModelConfig) -> None:
    """Refuses a counterpart config whose world-model losses would train the dynamics."""
    scales = model.losses.scales()
    on = [name for name in DYNAMICS_TERMS if scales[name]]
    if on:
        settings = ", ".join(f"agent.model.losses.{name}=0" for name in on)
        raise ValueError(
            f"{agent} has no dynamics loss, but {on} would train the dynamics: set {settings} "
            "(or use the model-based agent)"
        )
    if model.decoder and not model.losses.reconstruction:
        raise ValueError(
            f"{agent}: model.decoder=true without losses.reconstruction builds a decoder that "
            "nothing trains; set agent.model.decoder=false or a reconstruction scale"
        )


def has_loss_terms(model: WorldModelConfig) -> bool:
    """Whether `WorldModel.loss` has any term to run (else the agent only filters)."""
    return any(model.losses.scales().values())


def without_heads(params: Any) -> Any:
    """World-model params without the reward and continuation heads (`HEADS`)."""
    return {name: value for name, value in params.items() if not name.startswith(HEADS)}


def filter_sequence(model: WorldModel, params: Any, batch, rng: chex.PRNGKey) -> LatentState:
    """Posteriors `[B, T, ...]` of a replayed batch, filtered from the initial state: the
    representation alone, without the heads or loss terms that `WorldModel.loss` runs."""
    batch_size = batch["reward"].shape[0]
    posteriors, _ = model.observe_sequence(
        params,
        model.initial_state(batch_size),
        batch["action"],
        model.encode(params, batch["observation"]),
        batch["is_first"],
        rng,
    )
    return posteriors


def replay_lambda_returns(
    reward: Array,
    discount: Array,
    is_first: Array,
    is_last: Array,
    value: Array,
    lambda_: float,
) -> tuple[Array, Array]:
    """Lambda-returns along one replayed sequence, cut at episode boundaries.

    `G_t = r_{t+1} + d_{t+1} ((1 - lambda) v_{t+1} + lambda G_{t+1})` (`rlax.lambda_returns`)
    for the states 0 .. T-2 of the window, in the replay alignment (`agents/world_model.py`:
    `reward[t]` and `discount[t]` are received on arriving at t). The transition t -> t+1
    exists unless t is an episode's last step or t+1 starts an episode (an auto-reset, or the
    runner's reseed at a checkpoint); where the next one does not, the recursion stops and
    bootstraps from `v_{t+1}` (a truncated episode's last state, discount 1; a terminal one
    has discount 0). Past the window's end the last value bootstraps.

    Args:
      reward: `[T]` rewards as replayed (already mixed with any intrinsic reward).
      discount: `[T]` per-step discount times the replayed discount (0 at termination).
      is_first: bool `[T]`.
      is_last: bool `[T]`.
      value: `[T]` bootstrap values of every step.
      lambda_: the lambda of the returns.

    Returns:
      `(returns [T-1], valid [T-1])`: the return of each state and whether its transition
      exists (losses are masked with it).
    """
    chex.assert_rank([reward, discount, is_first, is_last, value], 1)
    chex.assert_equal_shape([reward, discount, is_first, is_last, value])
    valid = sequences.valid_transitions(is_first, is_last)
    mask = valid.astype(value.dtype)
    continue_into_next = jnp.concatenate([mask[1:], jnp.ones((1,), value.dtype)])
    returns = rlax.lambda_returns(
        reward[1:].astype(value.dtype) * mask,
        discount[1:].astype(value.dtype) * mask,
        value[1:],
        lambda_ * continue_into_next,
        stop_target_gradients=True,
    )
    return jax.lax.stop_gradient(returns), valid


__all__ = [
    "DYNAMICS_TERMS",
    "HEADS",
    "check_model_free",
    "filter_sequence",
    "has_loss_terms",
    "replay_lambda_returns",
    "representation_model",
    "without_heads",
]
