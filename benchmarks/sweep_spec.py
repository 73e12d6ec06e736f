"""Sweep specs: a YAML grid of trials, loaded, expanded and validated before anything runs.

    agents: [random, {name: dreamer, model: {deter: 512}}]   # names (`mbxfer agents`), or
                                                   # a name with that agent's config values
    envs: [grid, {name: crafter, task: reward, kwargs: {size: 64}}]
    tasks: [collect_items, null]                   # for envs that do not name their own task
    protocols: [scratch, pretrain_finetune]        # -> protocol.name
    seeds: [0, 1, 2]
    base: {train: {steps: 20000}}                  # nested TrialConfig updates, every trial
    grid: {agent.model.latent: [rssm, deterministic]}   # dotted key -> values (product)
    resources: {num_cpus: 1, num_gpus: 0}          # per trial
    scales: {paper: {...}}                         # `load_spec(path, scale)` merges one over it
    parts: [{...}, ...]                            # several grids in one spec

`expand(spec)` builds every combination with `config.build`, checks what each would refuse
once running (`config.check_runnable`: protocol phases, environment keywords and tasks) and
reports all the problems of all trials at once (`SpecError`) before anything runs.
`count_trials(spec)` says how many trials that is from the axes' lengths alone, so a grid too
large to expand is caught before it is (`MAX_TRIALS`). `benchmarks/sweep.py` runs the result.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import math
from pathlib import Path
from typing import Any, Mapping, Optional

from mbxfer.benchmarks import config as config_lib

AXES = ("agents", "envs", "tasks", "protocols", "seeds")
SPEC_KEYS = (*AXES, "base", "grid", "resources", "name", "description", "scales", "parts")
MAX_TRIALS = 10_000
"""Sweeps of more trials are refused unless confirmed (`mbxfer sweep --yes`): a grid that
large is more often a mistake than a plan, and expanding it takes minutes."""


class SpecError(config_lib.ConfigError):
    """A sweep spec that cannot run; the message names every problem."""


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one trial asks of a Ray cluster (and, locally, how many cores a worker gets)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclasses.dataclass(frozen=True)
class Trial:
    """One resolved trial and the spec values that made it (for the index and reports)."""

    config: config_lib.TrialConfig
    labels: Mapping[str, Any]

    @property
    def trial_id(self) -> str:
        return self.config.trial_id()


@dataclasses.dataclass(frozen=True)
class Sweep:
    trials: tuple[Trial, ...]
    resources: Resources = Resources()
    name: str = "sweep"


def load_spec(path: Path, scale: Optional[str] = None) -> dict:
    """The spec in `path`; with `scale`, its `scales: {NAME: {...}}` entry merged over it (a
    preset's CPU-sized default and, e.g., its `paper` scale for clusters in one file)."""
    try:
        spec = config_lib.read_yaml_file(Path(path), "sweep spec")
    except config_lib.ConfigError as error:
        raise SpecError(str(error)) from None
    if not isinstance(spec, Mapping):
        raise SpecError(f"sweep spec {path} must be a YAML mapping (agents:, envs:, seeds:, ...)")
    spec = dict(spec)
    scales = spec.pop("scales", None) or {}
    if not isinstance(scales, Mapping):
        raise SpecError(f"sweep spec {path}: scales must map names to spec mappings")
    if scale is not None:
        if scale not in scales:
            raise SpecError(
                f"sweep spec {path} has no scale {scale!r}{_close(scale, list(scales) or ['-'])}"
            )
        if not isinstance(scales[scale], Mapping):
            raise SpecError(f"sweep spec {path}: scales.{scale} must be a spec mapping")
        spec = config_lib.merge(spec, scales[scale])
    return spec


def count_trials(spec: Mapping) -> int:
    """How many trials `spec` expands to at most (identical trials merge in `expand`), from
    the lengths of its axes and grid alone: nothing is built, so a huge grid is counted at
    once. Malformed axes count as one value (`expand` reports them)."""
    if spec.get("parts") is not None:
        parts = spec["parts"]
        if not isinstance(parts, list):
            return 0
        shared = {k: v for k, v in spec.items() if k != "parts"}
        return sum(
            count_trials(config_lib.merge(copy.deepcopy(shared), part))
            for part in parts
            if isinstance(part, Mapping) and "parts" not in part
        )

    def length(values: Any) -> int:
        return len(values) if isinstance(values, list) and values else 1

    tasks = length(spec.get("tasks"))
    envs = spec.get("envs")
    if isinstance(envs, list) and envs:
        env_tasks = sum(1 if isinstance(e, Mapping) and "task" in e else tasks for e in envs)
    else:
        env_tasks = tasks
    grid = spec.get("grid")
    grid_size = math.prod(length(v) for v in grid.values()) if isinstance(grid, Mapping) else 1
    others = math.prod(length(spec.get(key)) for key in ("agents", "protocols", "seeds"))
    return others * env_tasks * grid_size


def _close(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(name), valid, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"{hint}; valid: {', '.join(valid)}"


def _nest(dotted: str, value: Any) -> dict:
    keys = dotted.split(".")
    if keys == ["agent"]:
        keys = ["agent", "name"]  # As in `config.parse_overrides`.
    nested: dict = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        nested = {key: nested}
    return nested


def _axis(spec: Mapping, key: str, problems: list[str]) -> list:
    if key not in spec:
        return [None]  # Not swept: the base (or the default) decides.
    values = spec[key]
    if not isinstance(values, list) or not values:
        problems.append(f"{key}: must be a non-empty list (got {values!r})")
        return [None]  # Go on validating the rest of the spec without this axis.
    return values


def _named_axis(spec: Mapping, key: str, valid: list[str], problems: list[str]) -> list:
    """`agents` or `envs`: names, or mappings with a `name`; unknown names are problems."""
    kind = {"agents": "agent", "envs": "environment"}[key]
    entries = []
    for index, value in enumerate(_axis(spec, key, problems)):
        entry = {"name": value} if isinstance(value, str) else value
        if value is None:
            entries.append(None)
        elif not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)):
            problems.append(f"{key}[{index}]: must be a name or a mapping with a name")
        elif entry["name"] not in valid:
            name = entry["name"]
            problems.append(f"{key}[{index}]: unknown {kind} {name!r}{_close(name, valid)}")
        else:
            entries.append(dict(entry))
    return entries


def _grid(spec: Mapping, problems: list[str]) -> dict[str, list]:
    grid = spec.get("grid") or {}
    if not isinstance(grid, Mapping):
        problems.append(f"grid: must map dotted keys to lists of values (got {grid!r})")
        return {}
    axes = {"agent": "agents", "agent.name": "agents", "seed": "seeds", "env.name": "envs",
            "env.task": "tasks", "protocol.name": "protocols"}  # fmt: skip
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            problems.append(
                f"grid.{key}: must be a non-empty list of values (got {values!r}); "
                "a single value belongs in base"
            )
        if axes.get(key) in spec:
            problems.append(f"grid.{key}: duplicates the {axes[key]} axis; use one of them")
    return {str(k): v for k, v in grid.items() if isinstance(v, list) and v}


def _updates(base: Mapping, axes: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """Nested config updates of one trial: the base, then its axis values, then the grid's."""
    updates = config_lib.merge({}, base)
    if axes["agent"] is not None:
        config_lib.merge(updates, {"agent": axes["agent"]})
    if axes["env"] is not None:
        config_lib.merge(updates, {"env": axes["env"]})
    if axes["task"] is not None:
        config_lib.merge(updates, {"env": {"task": axes["task"][0]}})
    if axes["protocol"] is not None:
        config_lib.merge(updates, {"protocol": {"name": axes["protocol"]}})
    if axes["seed"] is not None:
        updates["seed"] = axes["seed"]
    for key, value in overrides.items():
        config_lib.merge(updates, _nest(key, value))
    return updates


def expand(spec: Mapping) -> Sweep:
    """Every trial of `spec`, validated; raises `SpecError` naming all problems at once.

    `parts: [{...}, ...]` makes one spec of several grids: each part is merged over the rest
    of the spec (e.g. a toy study and a short real-environment leg with other budgets).
    """
    if spec.get("parts") is not None:
        return _expand_parts(spec)
    from mbxfer import agents
    from mbxfer.envs import registry

    problems: list[str] = []
    for key in spec:
        if key not in SPEC_KEYS:
            problems.append(f"unknown spec key {key!r}{_close(key, list(SPEC_KEYS))}")
    base = spec.get("base") or {}
    if not isinstance(base, Mapping):
        problems.append(f"base: must be a mapping of config values (got {base!r})")
        base = {}
    base = dict(base)
    base = config_lib.with_agent_mapping(base)
    grid = _grid(spec, problems)
    resources = _resources(spec.get("resources") or {}, problems)
    agent_axis = _named_axis(spec, "agents", agents.names(), problems)
    env_axis = _named_axis(spec, "envs", registry.names(), problems)
    # Tasks are boxed so that a swept `null` (reward-free) differs from "not swept".
    task_values = _axis(spec, "tasks", problems)
    swept = isinstance(spec.get("tasks"), list) and spec["tasks"]
    tasks = [(task,) for task in task_values] if swept else [None]
    protocols = _axis(spec, "protocols", problems)
    seeds = _axis(spec, "seeds", problems)
    # With no valid agent the rest is still checked with the default agent, except the
    # agent's own keys, which only the intended agent can check.
    agents_unknown = not agent_axis

    trials: dict[str, Trial] = {}
    checked_envs: dict = {}
    for agent, env, protocol, seed in itertools.product(
        agent_axis or [None], env_axis or [None], protocols, seeds
    ):
        env_tasks = [None] if env is not None and "task" in env else tasks  # Its own task.
        for task, values in itertools.product(env_tasks, itertools.product(*grid.values())):
            overrides = dict(zip(grid, values))
            axes = {"agent": agent, "env": env, "task": task, "protocol": protocol, "seed": seed}
            try:
                config = config_lib.build(_updates(base, axes, overrides))
                # Protocol phases, environment keywords, values and tasks; builds nothing.
                config_lib.check_runnable(config, checked_envs)
            except (config_lib.ConfigError, ValueError) as error:
                lines = _problem_lines(error)
                problems += [p for p in lines if not (agents_unknown and "'agent." in p)]
                continue
            labels = {
                "agent": config.agent,
                "env": config.env.name,
                "task": config.env.task,
                "protocol": _protocol_name(config),
                "seed": config.seed,
                "overrides": overrides,
            }
            trials.setdefault(config.trial_id(), Trial(config, labels))
    if not problems and not trials:
        problems.append("the spec expands to no trials")
    if problems:
        unique = list(dict.fromkeys(problems))
        raise SpecError(
            f"invalid sweep spec ({len(unique)} problem{'s' * (len(unique) > 1)}; "
            "nothing was run):\n  " + "\n  ".join(unique)
        )
    return Sweep(tuple(trials.values()), resources, str(spec.get("name") or "sweep"))


def _expand_parts(spec: Mapping) -> Sweep:
    """`expand` of a spec with `parts`: the union of its parts' trials, all problems at once."""
    parts = spec["parts"]
    if not isinstance(parts, list) or not parts:
        raise SpecError("parts: must be a non-empty list of spec mappings")
    shared = {k: v for k, v in spec.items() if k != "parts"}
    trials: dict[str, Trial] = {}
    problems: list[str] = []
    sweep = None
    for index, part in enumerate(parts):
        if not isinstance(part, Mapping) or "parts" in part:
            problems.append(f"parts[{index}]: must be a spec mapping without parts")
            continue
        try:
            sweep = expand(config_lib.merge(copy.deepcopy(shared), part))
        except SpecError as error:
            problems += [f"parts[{index}]: {line}" for line in _problem_lines(error)[1:]]
            continue
        for trial in sweep.trials:
            trials.setdefault(trial.trial_id, trial)
    if problems:
        raise SpecError(
            f"invalid sweep spec ({len(problems)} problems; nothing was run):\n  "
            + "\n  ".join(problems)
        )
    return Sweep(tuple(trials.values()), sweep.resources, str(spec.get("name") or "sweep"))


def _problem_lines(error: Exception) -> list[str]:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    prefix = "invalid configuration:"
    return [line.removeprefix(prefix).strip() for line in lines if line != prefix]


def _resources(value: Any, problems: list[str]) -> Resources:
    if not isinstance(value, Mapping):
        problems.append("resources: must be a mapping like {num_cpus: 1, num_gpus: 0}")
        return Resources()
    fields = [f.name for f in dataclasses.fields(Resources)]
    out = {}
    for key, number in value.items():
        if key not in fields:
            problems.append(f"unknown key 'resources.{key}'{_close(key, fields)}")
        elif isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
            problems.append(f"resources.{key}={number!r} must be a number >= 0")
        else:
            out[key] = float(number)
    return Resources(**out)


def trial_budget(config: config_lib.TrialConfig) -> int:
    """Environment steps over all the trial's phases; raises ValueError for a bad protocol."""
    if not hasattr(config, "protocol"):  # Before protocols: one phase of train.steps.
        return config.train.steps
    from mbxfer.benchmarks import protocols

    return sum(phase.steps for phase in protocols.phases(config))


def _protocol_name(config: config_lib.TrialConfig) -> str:
    protocol = getattr(config, "protocol", None)
    return getattr(protocol, "name", None) or "scratch"
