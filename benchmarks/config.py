"""Typed trial configuration: frozen dataclasses, dotted overrides, YAML round trip.

A trial is `TrialConfig`: which agent on which environment and task, the loop's budget and
ratios, and the agent's own frozen config (`agents.config_class(agent)`). Overrides are
dotted paths (`agent.model.latent=deterministic`, `train.batch_size=8`); unknown keys and
values of the wrong type are all reported at once, with the closest valid names.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from typing import Any, Mapping, Optional

import yaml

from mbxfer import agents
from mbxfer.benchmarks.protocols import ProtocolConfig


class ConfigError(ValueError):
    """A bad configuration key or value; the message names every problem and the fix."""


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """Which environment the trial runs on."""

    name: str = "grid"
    """A name from `mbxfer envs` (the environment registry)."""
    task: Optional[str] = None
    """The task whose reward is trained on. Left out, it is the environment's registered
    default task (`registry.register(..., task=...)`: `reward` for CartPole, Pendulum and
    Meta-World); written as null (`--task none` on the command line), it is reward-free."""
    num_envs: int = 4
    """Environments stepped as one batch."""
    workers: bool = False
    """Run each environment in its own subprocess (True) or in this process (False)."""
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Extra keywords for `envs.registry.make` (e.g. `{size: 5, action_repeat: 2}`)."""


EVAL_MODES = {"sampled": "explore", "greedy": "eval"}
"""Evaluation mode -> the agent's `act` mode it runs."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The one loop's budget, data ratios, evaluation and checkpoint schedule."""

    steps: int = 20000
    """Environment steps to train for (summed over the batch of environments)."""
    batch_size: int = 16
    """Sequences per update."""
    sequence_length: int = 32
    """Steps per replayed sequence."""
    train_ratio: float = 64.0
    """Replayed steps trained on per environment step (as in DreamerV3)."""
    learning_starts: int = 1000
    """Environment steps collected before the first update."""
    ratio_clock: str = "zero"
    """Which steps `train_ratio` counts: `zero` (every step of the phase, so the first update
    step runs a burst of `learning_starts * train_ratio / (batch_size * sequence_length)`
    updates on the prefill) or `learning_starts` (one update when training starts, then only
    the steps after it, as DreamerV3's `when.Ratio`)."""
    replay_capacity: int = 100000
    """Steps the replay buffer holds (over all environments)."""
    eval_every: int = 5000
    """Evaluate every this many environment steps (and at the end); 0 disables."""
    eval_episodes: Optional[int] = None
    """Episodes per evaluation and mode, on separate environments; None takes the
    environment's own default (`envs.registry.register(..., eval_episodes=)`: 32 for the toy
    environments, 4 otherwise)."""
    eval_modes: tuple[str, ...] = ("sampled", "greedy")
    """How the agent acts in evaluation episodes, each mode on the same episodes: `sampled`
    (the behaviour policy: actions sampled from the policy, MuZero's search with its
    exploration noise) and/or `greedy` (the mode of the policy / argmax of the search). The
    first mode is the headline score that reports and transfer metrics use."""
    checkpoint_every: int = 5000
    """Checkpoint every this many environment steps (and at the end)."""
    log_every: int = 1000
    """Write training metrics every this many environment steps."""
    video: bool = True
    """Write an open-loop world-model video at the end (image environments, model agents)."""

    def __post_init__(self):
        modes = tuple(self.eval_modes)
        if not modes or len(set(modes)) != len(modes) or not set(modes) <= set(EVAL_MODES):
            raise ValueError(
                f"train.eval_modes={list(modes)} must list distinct modes of "
                f"{list(EVAL_MODES)}, the headline first"
            )
        if self.ratio_clock not in ("zero", "learning_starts"):
            raise ValueError(
                f"train.ratio_clock={self.ratio_clock!r} must be one of ['zero', 'learning_starts']"
            )
        if self.eval_episodes is not None and self.eval_episodes < 1:
            raise ValueError(
                f"train.eval_episodes={self.eval_episodes} must be >= 1 (or null for the "
                "environment's default)"
            )


WANDB_MODES = ("offline", "online")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Where a trial's metrics are mirrored besides its JSONL logs, which stay the record
    (`benchmarks/loggers.py`). A run option, not part of the trial: `TrialConfig.to_dict`
    leaves it out, so it never changes the trial id, `config.yaml` or which folder resumes."""

    tensorboard: bool = True
    """Write TensorBoard event files into `<trial>/tensorboard/`: every training-metric and
    evaluation line as scalars tagged by phase, and the world-model video."""
    wandb: bool = False
    """Also log them to a Weights & Biases run (needs `pip install 'mbxfer[wandb]'`)."""
    wandb_project: str = "mbxfer"
    """The W&B project the trial's run goes to."""
    wandb_entity: Optional[str] = None
    """The W&B user or team; None is the logged-in user's default entity."""
    wandb_mode: str = "offline"
    """`offline` (the run is kept in `<trial>/wandb/`, uploaded later by `wandb sync`) or
    `online` (streamed to the W&B server; needs `wandb login`)."""

    def __post_init__(self):
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(
                f"log.wandb_mode={self.wandb_mode!r} must be one of {list(WANDB_MODES)}"
            )


RUN_OPTIONS = ("log",)
"""`TrialConfig` fields that say how a trial is watched, not what it computes: left out of
`to_dict`, hence out of trial ids, `config.yaml` and the checks that a folder holds the same
trial (switching TensorBoard off still resumes the same trial)."""


@dataclasses.dataclass(frozen=True)
class TrialConfig:
    """One trial: agent x environment x seed, with every knob typed."""

    agent: str = "dreamer"
    """A name from `agents.names()`."""
    seed: int = 0
    """Seeds parameters, environments, replay sampling and action noise."""
    env: EnvConfig = dataclasses.field(default_factory=EnvConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    protocol: ProtocolConfig = dataclasses.field(default_factory=ProtocolConfig)
    """The transfer protocol: the phases the trial runs (`benchmarks/protocols.py`)."""
    agent_config: Any = None
    """The agent's own frozen config; built from its class when left None."""
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    """Where metrics are mirrored (TensorBoard, W&B); a run option outside the trial id."""

    def __post_init__(self):
        if self.agent_config is None:
            object.__setattr__(self, "agent_config", agents.config_class(self.agent)())

    def to_dict(self) -> dict:
        """The trial as plain data, with the agent spelled as everywhere a user writes it:
        `agent: {name: dreamer, model: {...}, ...}` (the name and the agent's own config).
        Run options (`RUN_OPTIONS`: `log`) are not the trial's and are left out."""
        plain = _to_plain(self)
        for key in RUN_OPTIONS:
            plain.pop(key)
        agent = {"name": plain.pop("agent"), **plain.pop("agent_config")}
        return {"agent": agent, **plain}

    def trial_id(self) -> str:
        """A stable id from the resolved config."""
        return trial_id_of(self.to_dict())


def with_agent_mapping(plain: Mapping) -> dict:
    """A plain config with the agent as one mapping (`to_dict`'s spelling): `agent: NAME`
    becomes `agent: {name: NAME}`, and the `agent_config: {...}` of trial folders written
    before mbxfer had one spelling is merged under it (`agent`'s own keys win)."""
    out = dict(plain)
    if "agent" not in out and "agent_config" not in out:
        return out
    agent = out.pop("agent", None)
    mapping = dict(agent) if isinstance(agent, Mapping) else {}
    if agent is not None and not isinstance(agent, Mapping):
        mapping["name"] = agent
    legacy = out.pop("agent_config", None) or {}
    if not isinstance(legacy, Mapping):
        raise ConfigError(f"agent_config: {legacy!r} must be a mapping")
    return {"agent": {**legacy, **mapping}, **out}


def merge(into: dict, more: Mapping) -> dict:
    """Deep-merge the nested updates `more` into `into` (mappings merge, values replace)."""
    for key, value in more.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value
    return into


def trial_id_of(config: Mapping) -> str:
    """The trial id of a config in plain form (`TrialConfig.to_dict()`, or a trial folder's
    `config.yaml` as loaded): the one hash that names trial folders and that reports count by.
    Run options (`RUN_OPTIONS`) do not count, should a plain config hold them."""
    trial = {key: value for key, value in config.items() if key not in RUN_OPTIONS}
    text = json.dumps(trial, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_value(path: str, value: Any, annotation: Any) -> Any:
    """Coerce `value` to `annotation` or raise ConfigError naming the path and the type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(path, value, option)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{path}={value!r} must be one of {typing.get_args(annotation)}")
        return value
    if annotation is Any or origin in (Mapping, dict) or annotation in (dict, Mapping):
        if origin in (Mapping, dict) and not isinstance(value, Mapping):
            raise ConfigError(f"{path}={value!r} must be a mapping")
        return dict(value) if isinstance(value, Mapping) else value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r} must be an integer")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} must be a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} must be a string")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} must be a list")
        return tuple(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping of {annotation.__name__} fields")
        return value  # Nested mappings are merged by `_apply`.
    return value


def _apply(cls: type, base: Any, updates: Mapping[str, Any], prefix: str, problems: list) -> Any:
    """A new `cls` instance: `base`'s fields updated by the nested `updates` mapping."""
    hints = _field_types(cls)
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            problems.append(
                f"unknown key {path!r}{hint}; valid keys: {', '.join(prefix + k for k in hints)}"
            )
            continue
        annotation = hints[key]
        current = values[key]
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            values[key] = _apply(type(current), current, value, f"{path}.", problems)
            continue
        try:
            values[key] = _check_value(path, value, annotation)
        except ConfigError as error:
            problems.append(str(error))
    try:
        return cls(**values)
    except (ValueError, TypeError) as error:
        problems.append(f"{prefix or 'config'}: {error}")
        return base


def parse_overrides(items: list[str]) -> dict:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}`; values are parsed as YAML."""
    nested: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        path, text = item.split("=", 1)
        value = yaml.safe_load(text) if text else ""
        keys = path.strip().split(".")
        if keys[0] == "agent" and len(keys) == 1:
            keys = ["agent", "name"]  # `agent=NAME` and `agent.x=...` may be mixed.
        node = nested
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} sets a key below {key!r}, which is a value")
            node = child
        node[keys[-1]] = value
    return nested


def build(updates: Mapping[str, Any] | None = None) -> TrialConfig:
    """A validated `TrialConfig` from nested updates (YAML or parsed overrides)."""
    updates = with_agent_mapping(updates or {})
    problems: list[str] = []
    agent_updates = dict(updates.pop("agent", None) or {})
    agent = agent_updates.pop("name", TrialConfig.agent)
    try:
        agent_class = agents.config_class(agent)
    except KeyError as error:
        raise ConfigError(str(error)) from None
    defaults = TrialConfig(agent=agent, agent_config=agent_class())
    config = _apply(TrialConfig, defaults, updates, "", problems)
    agent_config = _apply(agent_class, defaults.agent_config, agent_updates, "agent.", problems)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    env_updates = updates.get("env")
    if not (isinstance(env_updates, Mapping) and "task" in env_updates):
        config = dataclasses.replace(config, env=_with_default_task(config.env))
    return dataclasses.replace(config, agent_config=agent_config)


def _with_default_task(env: EnvConfig) -> EnvConfig:
    """`env` with the task its environment is registered with, when the user named none (an
    unknown environment is left for the registry to refuse with its close names)."""
    from mbxfer.envs import registry

    found = registry.find(env.name)
    task = found.defaults.get("task") if found is not None else None
    return env if task is None else dataclasses.replace(env, task=task)


def from_yaml(text: str) -> TrialConfig:
    return build(yaml.safe_load(text) or {})


def to_yaml(config: TrialConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def differences(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
    """Dotted paths where two plain config dicts differ."""
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        left, right = a.get(key), b.get(key)
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            out += differences(left, right, f"{prefix}{key}.")
        elif left != right:
            out.append(f"{prefix}{key}: {left!r} -> {right!r}")
    return out


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (read from its source, and from
    its base classes' for inherited fields)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def describe(instance: Any, prefix: str = "") -> list[str]:
    """One line per leaf field: `path (type, default): doc`, recursing into dataclasses."""
    cls = type(instance)
    docs = field_docs(cls)
    hints = _field_types(cls)
    lines = []
    for field in dataclasses.fields(cls):
        value = getattr(instance, field.name)
        path = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            # The agent's own config is addressed as `agent.<field>` on the command line.
            lines += describe(value, "agent." if path == "agent_config" else f"{path}.")
            continue
        annotation = hints[field.name]
        kind = annotation.__name__ if isinstance(annotation, type) else str(annotation)
        kind = kind.replace("typing.", "")
        lines.append(f"{path} ({kind}, default {value!r}): {docs.get(field.name, '')}")
    return lines
