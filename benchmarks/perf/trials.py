"""The distinct agents of a sweep spec, built as its trials build them (for perf benchmarks).

`agent_setups(spec_path)` expands the spec (`benchmarks.sweep_spec`), keeps one trial per
distinct (agent, agent config in the first phase, environment), and gives each the
environment spec its agent is built from. Seeds, tasks and protocols that only repeat an
agent are dropped; a protocol that adds an intrinsic module (pretrain_finetune) gives a
distinct agent config, so it is kept.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

from acme import specs as acme_specs

from mbxfer.benchmarks import config as config_lib
from mbxfer.benchmarks import protocols, sweep_spec

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
"""`benchmarks/configs`, where the named specs live."""


@dataclasses.dataclass(frozen=True)
class AgentSetup:
    """One agent of a spec, ready to build with `agents.make(agent, env_spec, agent_config)`."""

    label: str
    """`agent/env` (`+module` when the protocol adds an intrinsic module)."""
    agent: str
    agent_config: Any
    """The agent's config in the trial's first phase (`protocols.agent_config_for`)."""
    env_spec: acme_specs.EnvironmentSpec
    trial: config_lib.TrialConfig
    """The first trial of the spec with this agent (its `train` holds batch and sequence
    length)."""


def spec_path(name_or_path: str) -> Path:
    """A spec file: a path, or the name of one in `benchmarks/configs` (`crafter_1h`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return CONFIGS / f"{name_or_path}.yaml"


def _first_phase_config(trial: config_lib.TrialConfig) -> tuple[Any, protocols.Phase]:
    phases = protocols.phases(trial)
    agent_config = protocols.with_module(trial.agent_config, phases, trial.protocol)
    return protocols.agent_config_for(agent_config, phases[0], trial.protocol), phases[0]


def _environment_spec(trial: config_lib.TrialConfig, phase: protocols.Phase):
    from mbxfer.envs import base as env_base
    from mbxfer.envs import registry

    env = registry.factory(
        trial.env.name, task=phase.task, **{**trial.env.kwargs, **phase.env_kwargs}
    )(seed=0)
    try:
        return env_base.environment_spec(env)
    finally:
        env.close()


def agent_setups(
    spec: str, agents: Optional[Sequence[str]] = None, envs: Optional[Sequence[str]] = None
) -> list[AgentSetup]:
    """The distinct agents of the spec `spec` (a path or a name in `benchmarks/configs`), in
    spec order, optionally only those named in `agents` and on `envs`."""
    expanded = sweep_spec.expand(sweep_spec.load_spec(spec_path(spec)))
    setups: list[AgentSetup] = []
    seen: list[tuple] = []
    env_specs: dict[str, acme_specs.EnvironmentSpec] = {}
    for item in expanded.trials:
        trial = item.config
        if agents is not None and trial.agent not in agents:
            continue
        if envs is not None and trial.env.name not in envs:
            continue
        agent_config, phase = _first_phase_config(trial)
        env_key = repr((trial.env.name, sorted(trial.env.kwargs.items()), phase.task))
        key = (trial.agent, agent_config, env_key)
        if key in seen:
            continue
        seen.append(key)
        if env_key not in env_specs:
            env_specs[env_key] = _environment_spec(trial, phase)
        module = getattr(getattr(agent_config, "exploration", None), "module", "none")
        label = f"{trial.agent}/{trial.env.name}" + (f"+{module}" if module != "none" else "")
        setups.append(AgentSetup(label, trial.agent, agent_config, env_specs[env_key], trial))
    return setups
