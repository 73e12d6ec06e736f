"""Intrinsic rewards on world-model features: `make(config, feature_size, action_size)`."""

from __future__ import annotations

from typing import Optional

from mbxfer.exploration.base import (  # noqa: F401  (the public types)
    ExplorationConfig,
    ExplorationModule,
    ExplorationState,
    Transitions,
    mix,
)


def make(
    config: ExplorationConfig, feature_size: int, action_size: int
) -> Optional[ExplorationModule]:
    """The configured module, or None for `module="none"`."""
    if config.module == "disagreement":
        from mbxfer.exploration import disagreement

        return disagreement.make(config, feature_size, action_size)
    if config.module == "rnd":
        from mbxfer.exploration import rnd

        return rnd.make(config, feature_size, action_size)
    return None
