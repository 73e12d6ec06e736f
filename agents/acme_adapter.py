"""Any mbxfer agent as an `acme.core.Actor`, so it runs inside `acme.EnvironmentLoop`.

The adapter acts with the agent's jitted `act` on a batch of one and keeps its carry; it does
not learn (learning is `benchmarks/loop.py`'s job), so `update` does nothing.

    actor = ActorAdapter(agent, state, seed=0, mode="eval")
    acme.EnvironmentLoop(env, actor).run(num_episodes=2)
"""

from __future__ import annotations

import dm_env
import jax
import numpy as np
from acme import core

from mbxfer.agents import base

_LOG_PREFIX = "log_"


class ActorAdapter(core.Actor):
    """Wraps `agent` acting from the fixed (or later replaced) `state`."""

    def __init__(
        self, agent: base.Agent, state: base.AgentState, seed: int = 0, mode: str = "eval"
    ):
        if mode not in base.MODES:
            raise ValueError(f"mode={mode!r} must be one of {base.MODES}")
        self._agent = agent
        self._act = jax.jit(agent.act, static_argnums=4)
        self.state = state
        self._mode = mode
        self._rng = jax.random.PRNGKey(seed)
        self._carry = agent.initial_carry(1)
        self._is_first = True

    def observe_first(self, timestep: dm_env.TimeStep) -> None:
        self._is_first = True

    def observe(self, action, next_timestep: dm_env.TimeStep) -> None:
        self._is_first = False

    def select_action(self, observation):
        self._rng, key = jax.random.split(self._rng)
        batched = {
            key_: np.asarray(value)[None]
            for key_, value in observation.items()
            if not key_.startswith(_LOG_PREFIX)
        }
        step = base.ActInput(batched, np.array([self._is_first]))
        action, self._carry = self._act(self.state, self._carry, step, key, self._mode)
        return np.asarray(action)[0]

    def update(self, wait: bool = False) -> None:
        """Acting only: parameters change when the runner replaces `state`."""
