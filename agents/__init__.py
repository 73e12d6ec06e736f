"""Agent registry: `make(name, env_spec, config)`, `config_class(name)`, `names()`.

Entries are `'module:make'` and `'module:ConfigClass'` strings, imported when used. A new agent
adds one line to `_AGENTS`.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from agents.base import ActInput, Agent  # noqa: F401  (the public types)

_AGENTS = {
    "random": ("agents.random_agent:make", "agents.random_agent:RandomConfig"),
    "dreamer": ("agents.dreamer:make", "agents.dreamer:DreamerConfig"),
    "muzero": ("agents.muzero:make", "agents.muzero:MuZeroConfig"),
    "ppo": ("agents.ppo:make", "agents.ppo:PPOConfig"),
    # The model-free counterparts of the model-based agents (agents/nomodel.py).
    "muzero_nomodel": ("agents.muzero:make_nomodel", "agents.muzero:MuZeroNoModelConfig"),
    "dreamer_nomodel": ("agents.dreamer:make_nomodel", "agents.dreamer:DreamerNoModelConfig"),
}


class UnknownAgentError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def names() -> list[str]:
    return sorted(_AGENTS)


def _load(path: str) -> Any:
    module, attribute = path.split(":")
    return getattr(importlib.import_module(module), attribute)


def _entry(name: str) -> tuple[str, str]:
    if name not in _AGENTS:
        close = difflib.get_close_matches(name, list(_AGENTS), n=3, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownAgentError(f"unknown agent {name!r}.{hint} Available: {', '.join(names())}.")
    return _AGENTS[name]


def config_class(name: str) -> type:
    """The frozen dataclass that configures agent `name`."""
    return _load(_entry(name)[1])


def make(name: str, env_spec, config: Any = None) -> Agent:
    """Build agent `name` for `env_spec` (an `acme.specs.EnvironmentSpec`)."""
    make_fn, config_path = _entry(name)
    if config is None:
        config = _load(config_path)()
    return _load(make_fn)(env_spec, config)
