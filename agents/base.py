"""The agent contract: a set of pure functions over explicit state. Read this first.

An agent never owns a loop, a logger, an environment or a file: `benchmarks/loop.py` drives
every agent the same way.

    agent = agents.make("dreamer", env_spec, config)
    state = agent.init(rng)                         # params, optimizer states, counters
    carry = agent.initial_carry(num_envs)           # per-environment recurrent acting state
    action, carry = agent.act(state, carry, step, rng, mode)  # mode: "explore" | "eval"
    state, metrics = agent.update(state, batch, rng)

`step` is the batched acting input: `observation` (dict of `[N, ...]` agent keys) and
`is_first` (`[N]` bool), so recurrent agents reset their carry where an episode starts.
`batch` is a replay sample in the format documented in `agents/replay.py`. Everything but
`init` and `initial_carry` is jitted by the runner; `mode` is static. Each agent jits its own
`init` (`jax.jit` where it is built): run op by op, a world model's init dispatches thousands
of small ops (48 s for Dreamer at crafter_1h sizes), compiled it is one call.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import chex
import jax

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
    """`init(rng) -> state`, jitted by the agent."""
    initial_carry: Callable[[int], Carry]
    act: Callable[[AgentState, Carry, ActInput, chex.PRNGKey, str], "tuple[Array, Carry]"]
    update: Callable[[AgentState, Mapping[str, Any], chex.PRNGKey], "tuple[AgentState, Metrics]"]
    learns: bool = True
    """False for agents without parameters to train (the runner then skips replay updates)."""
    open_loop: Optional[Callable[..., Mapping[str, Array]]] = None
    """Model-based agents: `open_loop(state, batch, context, horizon, rng)` -> observations
    imagined after `context` real steps of `batch` (`[B, horizon, ...]`, image in [0, 1])."""
    rollout_length: int = 0
    """On-policy agents (PPO): every `rollout_length` steps of each environment, before acting
    on the newest step, the runner calls `update` once on `replay.latest(rollout_length + 1)`
    (`[num_envs, T + 1, ...]`: the T steps just collected, every action taken with the current
    parameters, then the newest step as the bootstrap row, whose action is not yet chosen)
    instead of on replay samples at the train ratio. 0: off-policy replay training."""
    part_of: Optional[Callable[[str], str]] = None
    """`part_of(path)` names the part of the agent a state leaf belongs to (`path` is
    `jax.tree_util.keystr` of the leaf): one of `PARTS`. The transfer protocols carry parts
    over between phases by it (`benchmarks/protocols.py`). None: the state is one part."""
    adapt: Optional[Callable[[AgentState, Mapping[str, Any], chex.PRNGKey], Any]] = None
    """Model-based agents: `update` with the world model frozen except its reward head (the
    zero-shot protocol fits the reward head on relabelled pretraining data, and the policy
    learns from it, without environment steps)."""


PARTS = ("world_model", "policy", "value", "exploration", "counter")
"""The parts of an agent's state: the world model (with its reward head), the policy, the value
function, the intrinsic reward module, and step counters."""


def parts_by_substring(rules: Sequence[tuple[str, str]]) -> Callable[[str], str]:
    """A `part_of` from `(substring, part)` rules tried in order; unmatched leaves: counter."""
    for _, part in rules:
        if part not in PARTS:
            raise ValueError(f"part {part!r} must be one of {PARTS}")

    def part_of(path: str) -> str:
        for substring, part in rules:
            if substring in path:
                return part
        return "counter"

    return part_of


def only_reward_head(updates, head: str = "reward_head"):
    """World-model parameter updates with every leaf outside `head` zeroed (for `adapt`)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u if head in jax.tree_util.keystr(path) else jax.numpy.zeros_like(u),
        updates,
    )
