"""The uniform random agent: the floor every learning curve is compared with."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from acme import specs as acme_specs
from dm_env import specs

from mbxfer.agents import base


@dataclasses.dataclass(frozen=True)
class RandomConfig:
    """The random agent has nothing to configure."""


class RandomState(NamedTuple):
    """Updates counted, so the runner's bookkeeping is the same for every agent."""

    step: jax.Array


def make(env_spec: acme_specs.EnvironmentSpec, config: RandomConfig) -> base.Agent:
    action_spec = env_spec.actions
    discrete = isinstance(action_spec, specs.DiscreteArray)

    @jax.jit
    def init(rng):
        del rng
        return RandomState(jnp.zeros((), jnp.int32))

    def initial_carry(num_envs: int):
        return jnp.zeros((num_envs,), jnp.int32)

    def act(state, carry, step: base.ActInput, rng, mode: str):
        del state, mode
        num_envs = step.is_first.shape[0]
        if discrete:
            action = jax.random.randint(rng, (num_envs,), 0, action_spec.num_values)
        else:
            action = jax.random.uniform(rng, (num_envs,) + action_spec.shape, minval=-1, maxval=1)
        return action, carry

    def update(state, batch, rng):
        del batch, rng
        return RandomState(state.step + 1), {}

    return base.Agent("random", config, init, initial_carry, act, update, learns=False)
