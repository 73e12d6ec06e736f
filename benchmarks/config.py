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
from collections import abc
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional

import yaml

from mbxfer import agents, domains
from mbxfer.benchmarks import yaml_input
from mbxfer.benchmarks.protocols import ProtocolConfig
from mbxfer.domains import non_negative, one_of, positive


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
    num_envs: Annotated[int, positive] = 4
    """Environments stepped as one batch."""
    workers: bool = False
    """Run each environment in its own subprocess (True) or in this process (False)."""
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Extra keywords for `envs.registry.make` (e.g. `{size: 5, action_repeat: 2}`); their
    values are checked against what the environment declares (`mbxfer envs`)."""

    def __post_init__(self):
        domains.check(self)


EVAL_MODES = {"sampled": "explore", "greedy": "eval"}
"""Evaluation mode -> the agent's `act` mode it runs."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The one loop's budget, data ratios, evaluation and checkpoint schedule."""

    steps: Annotated[int, positive] = 20000
    """Environment steps to train for (summed over the batch of environments)."""
    batch_size: Annotated[int, positive] = 16
    """Sequences per update."""
    sequence_length: Annotated[int, positive] = 32
    """Steps per replayed sequence."""
    train_ratio: Annotated[float, non_negative] = 64.0
    """Replayed steps trained on per environment step (as in DreamerV3); 0 never updates."""
    learning_starts: Annotated[int, non_negative] = 1000
    """Environment steps collected before the first update."""
    ratio_clock: Annotated[str, one_of("zero", "learning_starts")] = "zero"
    """Which steps `train_ratio` counts: `zero` (every step of the phase, so the first update
    step runs a burst of `learning_starts * train_ratio / (batch_size * sequence_length)`
    updates on the prefill) or `learning_starts` (one update when training starts, then only
    the steps after it, as DreamerV3's `when.Ratio`)."""
    replay_capacity: Annotated[int, positive] = 100000
    """Steps the replay buffer holds (over all environments): at least `sequence_length` per
    environment."""
    eval_every: Annotated[int, non_negative] = 5000
    """Evaluate every this many environment steps (and at the end); 0 disables."""
    eval_episodes: Annotated[Optional[int], positive] = None
    """Episodes per evaluation and mode, on separate environments; None takes the
    environment's own default (`envs.registry.register(..., eval_episodes=)`: 32 for the toy
    environments, 4 otherwise)."""
    eval_modes: tuple[str, ...] = ("sampled", "greedy")
    """How the agent acts in evaluation episodes, each mode on the same episodes: `sampled`
    (the behaviour policy: actions sampled from the policy, MuZero's search with its
    exploration noise) and/or `greedy` (the mode of the policy / argmax of the search). The
    first mode is the headline score that reports and transfer metrics use."""
    checkpoint_every: Annotated[int, positive] = 5000
    """Checkpoint every this many environment steps (and at the end)."""
    log_every: Annotated[int, positive] = 1000
    """Write training metrics every this many environment steps."""
    video: bool = True
    """Write an open-loop world-model video at the end (image environments, model agents)."""

    def __post_init__(self):
        domains.check(self)
        modes = tuple(self.eval_modes)
        if not modes or len(set(modes)) != len(modes) or not set(modes) <= set(EVAL_MODES):
            raise ValueError(
                f"eval_modes={list(modes)} must list distinct modes of "
                f"{list(EVAL_MODES)}, the headline first"
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
    wandb_mode: Annotated[str, one_of(*WANDB_MODES)] = "offline"
    """`offline` (the run is kept in `<trial>/wandb/`, uploaded later by `wandb sync`) or
    `online` (streamed to the W&B server; needs `wandb login`)."""

    def __post_init__(self):
        domains.check(self)


MAX_SEED = 2**32 - 1
"""The largest seed: `jax.random.PRNGKey` keeps 32 bits of it (2**32 is seed 0 again)."""

RUN_OPTIONS = ("log",)
"""`TrialConfig` fields that say how a trial is watched, not what it computes: left out of
`to_dict`, hence out of trial ids, `config.yaml` and the checks that a folder holds the same
trial (switching TensorBoard off still resumes the same trial)."""


@dataclasses.dataclass(frozen=True)
class TrialConfig:
    """One trial: agent x environment x seed, with every knob typed."""

    agent: str = "dreamer"
    """A name from `agents.names()`."""
    seed: Annotated[int, domains.in_range(0, MAX_SEED)] = 0
    """Seeds parameters, environments, replay sampling and action noise (JAX keys hold 32
    bits, so larger seeds would repeat smaller ones)."""
    env: EnvConfig = dataclasses.field(default_factory=EnvConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    protocol: ProtocolConfig = dataclasses.field(default_factory=ProtocolConfig)
    """The transfer protocol: the phases the trial runs (`benchmarks/protocols.py`)."""
    agent_config: Any = None
    """The agent's own frozen config; built from its class when left None."""
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    """Where metrics are mirrored (TensorBoard, W&B); a run option outside the trial id."""

    def __post_init__(self):
        domains.check(self)
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
    """Deep-merge the nested updates `more` into `into` (mappings merge, values replace).
    Mappings are copied at every depth, so later merges into `into` never reach `more`."""
    for key, value in more.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = merge({}, value) if isinstance(value, Mapping) else value
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


INT_LIMIT = 2**63
"""Integers must lie in (-INT_LIMIT, INT_LIMIT): NumPy and JAX hold them in 64 bits."""


def _shown(value: Any) -> str:
    """`value` for an error message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_value(path: str, value: Any, annotation: Any) -> Any:
    """Coerce `value` to `annotation` or raise ConfigError naming the path and the type."""
    origin = typing.get_origin(annotation)
    shown = _shown(value)
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
        choices = typing.get_args(annotation)
        if not isinstance(value, str) or value not in choices:
            hint = domains.OneOf(choices).hint(value)
            raise ConfigError(f"{path}={shown} must be one of {choices}{hint}")
        return value
    if origin in (Mapping, abc.Mapping, dict) or annotation in (dict, Mapping, abc.Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}={shown} must be a mapping like {{key: value}}")
        bad = [key for key in value if not isinstance(key, str)]
        if bad:
            raise ConfigError(f"{path}: key {bad[0]!r} must be a string (a keyword name)")
        return dict(value)
    if annotation is Any:
        return dict(value) if isinstance(value, Mapping) else value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={shown} must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={shown} must be an integer")
        if not -INT_LIMIT < value < INT_LIMIT:
            raise ConfigError(f"{path}={shown} must be an integer of at most 64 bits")
        return value
    if annotation is float:
        if isinstance(value, str):  # A quoted number, or YAML 1.1's `3e-4` in old files.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={shown} must be a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            hint = f" (quote it: '{value}')" if isinstance(value, (int, float, bool)) else ""
            raise ConfigError(f"{path}={shown} must be a string{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={shown} must be a list")
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_value(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value))
        return tuple(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping of {annotation.__name__} fields")
        return value  # Nested mappings are merged by `_apply`.
    return value


def _apply(cls: type, base: Any, updates: Mapping[str, Any], prefix: str, problems: list) -> Any:
    """A new `cls` instance: `base`'s fields updated by the nested `updates` mapping. Every
    problem (unknown key, wrong type, value outside its domain, fields that do not fit
    together) goes to `problems`; a field with a problem keeps `base`'s value, so that the
    others are still checked together."""
    hints = _field_types(cls)
    field_domains = domains.fields_of(cls)
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            problems.append(
                f"unknown key {str(path)!r}{hint}; valid keys: "
                + ", ".join(prefix + k for k in hints)
            )
            continue
        annotation = hints[key]
        current = values[key]
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            values[key] = _apply(type(current), current, value, f"{path}.", problems)
            continue
        try:
            checked = _check_value(path, value, annotation)
        except ConfigError as error:
            problems.append(str(error))
            continue
        problem = field_domains[key].problem(checked)
        if problem is not None:
            problems.append(f"{path}={_shown(checked)} {problem}")
            continue
        values[key] = checked
    try:
        return cls(**values)
    except (ValueError, TypeError) as error:
        where = prefix.rstrip(".")
        problems.append(f"{where}: {error}" if where else str(error))
        return base


def parse_overrides(items: list[str]) -> dict:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}`; values are parsed as YAML
    (`yaml_input`: `on`, `1:00` and `0x10` stay strings)."""
    nested: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        path, text = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(key.strip() for key in keys):
            raise ConfigError(
                f"override {item!r}: {path.strip()!r} is not a dotted key like train.steps"
            )
        keys = [key.strip() for key in keys]
        try:
            value = yaml_input.load(text, f"--set {path.strip()}") if text else ""
        except yaml_input.YAMLInputError as error:
            raise ConfigError(str(error)) from None
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
    """A validated `TrialConfig` from nested updates (YAML or parsed overrides): unknown keys,
    wrong types, values outside their fields' domains (`mbxfer.domains`) and fields that do
    not fit together are all reported at once."""
    if updates is not None and not isinstance(updates, Mapping):
        raise ConfigError(
            f"a config must be a mapping of keys (agent:, env:, train:, ...), not {_kind(updates)}"
        )
    updates = with_agent_mapping(updates or {})
    problems: list[str] = []
    agent_updates = updates.pop("agent", None) or {}
    if not isinstance(agent_updates, Mapping):
        raise ConfigError(f"agent={_shown(agent_updates)} must be an agent name or a mapping")
    agent_updates = dict(agent_updates)
    agent = agent_updates.pop("name", TrialConfig.agent)
    if not isinstance(agent, str):
        raise ConfigError(
            f"agent={_shown(agent)} must be an agent name: one of {', '.join(agents.names())}"
        )
    try:
        agent_class = agents.config_class(agent)
    except KeyError as error:
        raise ConfigError(str(error)) from None
    defaults = TrialConfig(agent=agent, agent_config=agent_class())
    config = _apply(TrialConfig, defaults, updates, "", problems)
    agent_config = _apply(agent_class, defaults.agent_config, agent_updates, "agent.", problems)
    if not problems:
        problems += trial_problems(dataclasses.replace(config, agent_config=agent_config))
    if problems:
        raise ConfigError(_problem_text(problems))
    env_updates = updates.get("env")
    if not (isinstance(env_updates, Mapping) and "task" in env_updates):
        config = dataclasses.replace(config, env=_with_default_task(config.env))
    return dataclasses.replace(config, agent_config=agent_config)


def _problem_text(problems: list[str]) -> str:
    """One line for one problem; a header and one indented line each for several."""
    unique = list(dict.fromkeys(problems))
    if len(unique) == 1:
        return f"invalid configuration: {unique[0]}"
    return "invalid configuration:\n  " + "\n  ".join(unique)


def trial_problems(config: TrialConfig) -> list[str]:
    """What does not fit together across the sections of `config` (each section's own fields
    are checked when it is built): the replay must hold a sequence per environment, and the
    agent's config may check the trial (`trial_problems(env, train)`, e.g. PPO's minibatches
    against the batch of environments)."""
    env, train = config.env, config.train
    problems = []
    rollout = getattr(config.agent_config, "rollout_length", None)
    if rollout is None and train.replay_capacity // env.num_envs < train.sequence_length:
        problems.append(
            f"train.replay_capacity={train.replay_capacity} holds "
            f"{train.replay_capacity // env.num_envs} steps per environment "
            f"(env.num_envs={env.num_envs}), fewer than train.sequence_length="
            f"{train.sequence_length}"
        )
    check = getattr(config.agent_config, "trial_problems", None)
    if check is not None:
        problems += check(env, train)
    return problems


def check_runnable(config: TrialConfig, checked: Optional[dict] = None) -> None:
    """Raise `ConfigError` naming what the run of `config` would refuse once started: its
    protocol's phases (`protocols.phases`) and every environment that a phase trains on or
    evaluates on (`registry.factory`: keyword names and values, tasks, optional
    dependencies). Builds nothing, so `mbxfer run` and `sweep --dry-run` refuse such a trial
    before anything starts. `checked` (recipe -> its problem or None) lets a sweep check each
    environment recipe once."""
    from mbxfer.benchmarks import protocols
    from mbxfer.envs import base as env_base
    from mbxfer.envs import registry

    try:
        phases = protocols.phases(config)
    except ValueError as error:  # ProtocolError, and a custom phase's bad field.
        raise ConfigError(str(error)) from None
    checked = {} if checked is None else checked
    problems = []
    for phase in phases:
        recipes = [(phase.task, dict(phase.env_kwargs))]
        for eval_set in phase.eval_sets.values():
            recipes.append((eval_set.task, {**phase.env_kwargs, **eval_set.kwargs}))
        for task, extra in recipes:
            kwargs = {**config.env.kwargs, **extra}
            key = json.dumps([config.env.name, task, kwargs], sort_keys=True, default=repr)
            if key not in checked:
                checked[key] = None
                bad = [k for k in kwargs if not isinstance(k, str)]
                try:
                    if bad:
                        raise registry.UnknownKeywordError(
                            f"environment keyword {bad[0]!r} of phase {phase.name!r} must be "
                            "a string"
                        )
                    registry.factory(config.env.name, task=task, **kwargs)
                except env_base.ConfigurationError as error:
                    checked[key] = str(error)
            if checked[key] is not None:
                problems.append(checked[key])
    if problems:
        unique = list(dict.fromkeys(problems))
        raise ConfigError(unique[0] if len(unique) == 1 else "\n".join(unique))


def _with_default_task(env: EnvConfig) -> EnvConfig:
    """`env` with the task its environment is registered with, when the user named none (an
    unknown environment is left for the registry to refuse with its close names)."""
    from mbxfer.envs import registry

    found = registry.find(env.name)
    task = found.defaults.get("task") if found is not None else None
    return env if task is None else dataclasses.replace(env, task=task)


def from_yaml(text: str, source: str = "config") -> TrialConfig:
    """The `TrialConfig` of YAML `text` (a `--config` file, a trial's `config.yaml`)."""
    return build(load_yaml(text, source) or {})


def load_yaml(text: str, source: str) -> Any:
    """`yaml_input.load`, its errors as `ConfigError`."""
    try:
        return yaml_input.load(text, source)
    except yaml_input.YAMLInputError as error:
        raise ConfigError(str(error)) from None


def read_yaml_file(path: Path, what: str) -> Any:
    """The YAML document in file `path` (`what` names it in errors: "--config", "sweep
    spec"); a missing, unreadable, binary or malformed file is a `ConfigError`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give a YAML file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as error:
        raise ConfigError(f"cannot read {what} {path}: {error.strerror or error}") from None
    if len(data) > yaml_input.MAX_CHARS:
        raise ConfigError(
            f"{what} {path} has {len(data):,} bytes, more than the "
            f"{yaml_input.MAX_CHARS:,} a config or spec may have"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte {error.start}); give a YAML file"
        ) from None
    return load_yaml(text, f"{what} {path}")


def _kind(value: Any) -> str:
    """`value`'s YAML kind, for messages: `a list`, `an integer`, ..."""
    kinds = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
             list: "a list", bytes: "binary data"}  # fmt: skip
    return kinds.get(type(value), f"a {type(value).__name__}")


def read_config_file(path: Path) -> dict:
    """Nested config updates from a `--config` YAML file: a mapping (empty file: none)."""
    loaded = read_yaml_file(path, "--config")
    if loaded is None:
        return {}
    if not isinstance(loaded, Mapping):
        raise ConfigError(
            f"--config {path} must hold a mapping of config keys (agent:, env:, train:, ...), "
            f"not {_kind(loaded)}"
        )
    return with_agent_mapping(loaded)


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
    """One line per leaf field: `path (type and domain, default): doc`, recursing into
    dataclasses (`train.batch_size (int > 0, default 16): Sequences per update.`)."""
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
        spec = domains.fields_of(cls)[field.name]
        if spec.domain is not None or spec.kind in (bool, int, float, str):
            kind = spec.describe()  # `int > 0`, `float in [0, 1]`, `str, one of a, b`
        else:
            kind = annotation.__name__ if isinstance(annotation, type) else str(annotation)
            kind = kind.replace("typing.", "").replace("collections.abc.", "")
        lines.append(f"{path} ({kind}, default {value!r}): {docs.get(field.name, '')}")
    return lines
