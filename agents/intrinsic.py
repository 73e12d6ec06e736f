"""Exploration wiring, written once for every agent: build the intrinsic reward module, put its
state into the agent's state, read its reward (mixed with the task reward) and train it.

An agent state that has a module carries it in two fields, `exploration`
(`exploration.ExplorationState`) and `exploration_opt` (its optimizer state); both are None
without one. The module reads features (world-model features, or any embedding) and actions as
`sequences.action_input` gives them (one-hot for discrete actions).

    wiring = intrinsic.make(config.exploration, feature_size, action_size, discrete)
    state = intrinsic.attach(state, wiring, rng)                      # at init
    reward = intrinsic.mixed_reward(wiring, config.exploration, state.exploration,
                                    task_reward, features, action, next_features)
    state, metrics = intrinsic.train_on_sequences(wiring, state, features, actions)
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import optax

from mbxfer import exploration
from mbxfer.agents import sequences
from mbxfer.exploration import ExplorationConfig, ExplorationModule, ExplorationState

Array = chex.Array


class Intrinsic(NamedTuple):
    """The intrinsic reward module of an agent and what feeding it needs."""

    module: ExplorationModule
    optimizer: optax.GradientTransformation
    discrete: bool
    action_size: int

    def actions(self, action: Array) -> Array:
        """Replayed or imagined actions as the module reads them (`sequences.action_input`)."""
        return sequences.action_input(action, self.discrete, self.action_size)


def make(
    config: ExplorationConfig, feature_size: int, action_size: int, discrete: bool
) -> Optional[Intrinsic]:
    """The configured module with its Adam optimizer, or None for `module="none"`."""
    module = exploration.make(config, feature_size, action_size)
    if module is None:
        return None
    return Intrinsic(module, optax.adam(config.learning_rate), discrete, action_size)


def attach(agent_state: Any, wiring: Optional[Intrinsic], rng: chex.PRNGKey) -> Any:
    """`agent_state` with the module's fresh state and optimizer state (unchanged without a
    module). The module's key is folded from `rng`, so the agent's other keys do not move."""
    if wiring is None:
        return agent_state
    return exploration.base.attach(agent_state, wiring.module, wiring.optimizer, rng)


def reward(
    wiring: Optional[Intrinsic],
    config: ExplorationConfig,
    state: Optional[ExplorationState],
    features: Array,
    action: Array,
    next_features: Array,
) -> Optional[Array]:
    """The intrinsic reward `[...]` of transitions `features, action -> next_features`, or None
    when there is no module or its reward is not mixed in (`intrinsic_scale=0`)."""
    if wiring is None or not config.intrinsic_scale:
        return None
    return wiring.module.reward(state, features, wiring.actions(action), next_features)


def mixed_reward(
    wiring: Optional[Intrinsic],
    config: ExplorationConfig,
    state: Optional[ExplorationState],
    task_reward: Array,
    features: Array,
    action: Array,
    next_features: Array,
) -> Array:
    """THE reward an agent maximizes for a transition: `exploration.mix` of `task_reward` and
    the intrinsic reward of the transition (`reward`)."""
    intrinsic = reward(wiring, config, state, features, action, next_features)
    return exploration.mix(config, task_reward, intrinsic)


def replayed_reward(
    wiring: Optional[Intrinsic],
    config: ExplorationConfig,
    state: Optional[ExplorationState],
    features: Array,
    actions: Array,
    is_first: Optional[Array] = None,
) -> Optional[Array]:
    """`[B, T]` intrinsic reward of each replayed transition aligned with `batch["reward"]`
    (`sequences.to_rows`: row t+1 holds the transition out of row t, row 0 holds 0; with
    `is_first`, episode starts hold 0 too), or None as in `reward`. `features` `[B, T, F]`."""
    transition_reward = reward(
        wiring, config, state, features[:, :-1], actions[:, :-1], features[:, 1:]
    )
    if transition_reward is None:
        return None
    return sequences.to_rows(transition_reward, is_first)


def train_on_sequences(
    wiring: Optional[Intrinsic], agent_state: Any, features: Array, actions: Array
) -> tuple[Any, dict]:
    """One optimizer step of the module on the one-step transitions of replayed sequences
    (`features` `[B, T, F]`, `actions` `[B, T, ...]` as replayed), in the agent state's
    `exploration` and `exploration_opt` fields; no-op without a module."""
    if wiring is None:
        return agent_state, {}
    transitions = exploration.base.sequence_transitions(features, wiring.actions(actions))
    module_state, opt_state, metrics = exploration.base.train_step(
        wiring.module,
        wiring.optimizer,
        agent_state.exploration,
        agent_state.exploration_opt,
        transitions,
    )
    return agent_state._replace(exploration=module_state, exploration_opt=opt_state), metrics


__all__ = [
    "Intrinsic",
    "attach",
    "make",
    "mixed_reward",
    "replayed_reward",
    "reward",
    "train_on_sequences",
]
