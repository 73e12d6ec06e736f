"""Agent registry: `make(name, env_spec, config)`, `config_class(name)`, `names()`,
`model_based(name)`.

Entries are `'module:make'` and `'module:ConfigClass'` strings, imported when used, and whether
the agent learns a model it plans or imagines with (reports compare model-based agents with
model-free ones). A new agent adds one line to `_AGENTS`.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, NamedTuple, Optional

from mbxfer.agents.base import ActInput, Agent  # noqa: F401  (the public types)


class _Entry(NamedTuple):
    make: str
    config: str
    model_based: Optional[bool]
    """True: plans or imagines with a learned model; False: learns without one; None:
    neither (the random baseline is compared with nothing)."""


_AGENTS = {
    "random": _Entry(
        "mbxfer.agents.random_agent:make", "mbxfer.agents.random_agent:RandomConfig", None
    ),
    "dreamer": _Entry("mbxfer.agents.dreamer:make", "mbxfer.agents.dreamer:DreamerConfig", True),
    "muzero": _Entry("mbxfer.agents.muzero:make", "mbxfer.agents.muzero:MuZeroConfig", True),
    "ppo": _Entry("mbxfer.agents.ppo:make", "mbxfer.agents.ppo:PPOConfig", False),
    # The model-free counterparts of the model-based agents (agents/nomodel.py).
    "muzero_nomodel": _Entry(
        "mbxfer.agents.muzero:make_nomodel", "mbxfer.agents.muzero:MuZeroNoModelConfig", False
    ),
    "dreamer_nomodel": _Entry(
        "mbxfer.agents.dreamer:make_nomodel", "mbxfer.agents.dreamer:DreamerNoModelConfig", False
    ),
}


class UnknownAgentError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def names() -> list[str]:
    return sorted(_AGENTS)


def _load(path: str) -> Any:
    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


def _entry(name: str) -> _Entry:
    if name not in _AGENTS:
        close = difflib.get_close_matches(name, list(_AGENTS), n=3, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownAgentError(f"unknown agent {name!r}.{hint} Available: {', '.join(names())}.")
    return _AGENTS[name]


def config_class(name: str) -> type:
    """The frozen dataclass that configures agent `name`."""
    return _load(_entry(name).config)


def make(name: str, env_spec, config: Any = None) -> Agent:
    """Build agent `name` for `env_spec` (an `acme.specs.EnvironmentSpec`)."""
    entry = _entry(name)
    if config is None:
        config = _load(entry.config)()
    return _load(entry.make)(env_spec, config)


def model_based(name: str) -> Optional[bool]:
    """Whether agent `name` learns a model it plans or imagines with (None: a baseline that
    learns nothing); reports pair model-based agents with model-free ones by it."""
    return _entry(name).model_based
