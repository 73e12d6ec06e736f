"""The agent contract: a set of pure functions over explicit state. Read this first.

An agent never owns a loop, a logger, an environment or a file: `benchmarks/runner.py` drives
every agent the same way.

    agent = agents.make("dreamer", env_spec, config)
    state = agent.init(rng)                         # params, optimizer states, counters
    carry = agent.initial_carry(num_envs)           # per-environment recurrent acting state
    action, carry = agent.act(state, carry, step, rng, mode)  # mode: "explore" | "eval"
    state, metrics = agent.update(state, batch, rng)

`step` is the batched acting input: `observation` (dict of `[N, ...]` agent keys) and
`is_first` (`[N]` bool), so recurrent agents reset their carry where an episode starts.
`batch` is a replay sample in the format documented in `agents/replay.py`. Everything but
`init` and `initial_carry` is jitted by the runner; `mode` is static.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import chex

Array = chex.Array
AgentState = Any  # a NamedTuple pytree owned by the agent
Carry = Any  # a pytree with a leading [N] axis
Metrics = Mapping[str, Array]
MODES = ("explore", "eval")


class ActInput(NamedTuple):
    """What an agent sees at each acting step.

    Attributes:
      observation: agent keys only (`image` uint8 `[N, H, W, 3]`, `vector` `[N, D]`).
      is_first: `[N]` bool, True where this observation starts an episode.
    """

    observation: Mapping[str, Array]
    is_first: Array


class Agent(NamedTuple):
    """An agent as pure functions; see the module docstring."""

    name: str
    config: Any
    init: Callable[[chex.PRNGKey], AgentState]
    initial_carry: Callable[[int], Carry]
    act: Callable[[AgentState, Carry, ActInput, chex.PRNGKey, str], "tuple[Array, Carry]"]
    update: Callable[[AgentState, Mapping[str, Any], chex.PRNGKey], "tuple[AgentState, Metrics]"]
    learns: bool = True
    """False for agents without parameters to train (the runner then skips replay updates)."""
    open_loop: Optional[Callable[..., Mapping[str, Array]]] = None
    """Model-based agents: `open_loop(state, batch, context, horizon, rng)` -> observations
    imagined after `context` real steps of `batch` (`[B, horizon, ...]`, image in [0, 1])."""
    rollout_length: int = 0
    """On-policy agents (PPO): every `rollout_length` steps of each environment the runner
    calls `update` once on `replay.latest(rollout_length + 1)` (`[num_envs, T + 1, ...]`, the
    steps just collected with the current parameters; the last row is the bootstrap step)
    instead of on replay samples at the train ratio. 0: off-policy replay training."""
