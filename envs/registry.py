"""The one way mbxfer builds environments: `register`, `make`, `names`.

Entry points are `'module:function'` strings imported only when the environment is made, so a
missing optional dependency breaks only its own environments. Third-party packages add
environments through the `mbxfer.envs` entry-point group: each entry point names a function
that is called once with no arguments and calls `register(...)` itself.

`make(name, **overrides)` passes each keyword to the environment's factory when the factory
accepts it; the generic keywords `task`, `action_repeat`, `time_limit` and `image_size` are
otherwise applied as wrappers (see `envs.wrappers`). The task wrapper is always applied, so
`task=None` (the default unless registered otherwise) is reward-free.

    from mbxfer.envs import registry
    registry.register("my_env", "my_package.envs:make_env", difficulty=2)
    env = registry.make("my_env", task="reward", seed=3)

`describe(name)` says what an environment accepts without building it (what `mbxfer envs`
lists): the keywords of its factory's signature, and what its entry point declares as
attributes, `TASKS` (a tuple of task names, or a function of the keywords that returns one)
and `CHOICES` (keyword -> its allowed values), plus the modules `register(..., requires=...)`
names. An entry point that declares no `TASKS` is built once to read them, time-boxed.

`factory(name, **overrides)` checks keyword values before anything is built, from the same
declarations: the type annotations of the factory's signature, `CHOICES`, `DOMAINS` (keyword ->
an `mbxfer.domains` domain, e.g. `{"size": at_least(3)}`), the declared `TASKS`, and an
optional `check_keywords(keywords) -> list[str]` for what depends on several keywords. A bad
value is a `BadKeywordValueError` naming the keyword and what it accepts, raised where the
trial is configured (`mbxfer run`, `sweep --dry-run`), never after a simulator was built.

Every environment also takes `members` and `member_weights`: a mixture of environments that
differ in keywords (Meta-World scenes, Procgen games), built by `envs.mixture`.

Subprocess workers (`envs.vector`) load the plugins before they build an environment, so a
plugin's `register_all()` side effects (a gymnasium id it registers, say) exist there too.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import importlib.util
import inspect
import threading
import typing
import warnings
from typing import Any, Callable, Mapping, Union

import dm_env

from mbxfer import domains
from mbxfer.envs import base
from mbxfer.envs.scoring import RETURN, Scorer

EntryPoint = Union[str, Callable[..., dm_env.Environment]]
PLUGIN_GROUP = "mbxfer.envs"
GENERIC_KEYWORDS = ("task", "action_repeat", "time_limit", "image_size")

# Top-level module that may be missing -> the mbxfer extra that installs it. An environment
# family with a heavy dependency adds its line here together with its extra in pyproject.toml.
OPTIONAL_DEPENDENCIES: dict[str, str] = {
    "envpool": "procgen",
    "metaworld": "metaworld",
    "mujoco": "metaworld",
    "robodesk": "robodesk",
    "dm_control": "robodesk",
    "gym": "robodesk",
}


class UnknownEnvironmentError(base.ConfigurationError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0])


class MissingDependencyError(base.ConfigurationError, ImportError):
    pass


class UnknownKeywordError(base.ConfigurationError, TypeError):
    pass


class BadKeywordValueError(base.ConfigurationError, ValueError):
    """A keyword value the environment declares it does not accept."""


@dataclasses.dataclass(frozen=True)
class EnvEntry:
    """A registered environment: where its factory lives and its default keywords."""

    name: str
    entry_point: EntryPoint
    defaults: Mapping[str, Any]
    eval_episodes: int = 4
    """Evaluation episodes per evaluation unless a trial says otherwise: many where an
    episode is cheap (a handful of evaluation episodes on a deterministic toy task moves in
    large steps), few where it is not."""
    scorer: Scorer = RETURN
    """The family's score key and episode summaries (`envs.scoring`)."""
    requires: tuple[str, ...] = ()
    """Top-level modules the environment imports when built (its optional dependencies),
    checked by `describe` without importing them."""


@dataclasses.dataclass(frozen=True)
class EnvFactory:
    """A picklable recipe for one environment; `factory(seed=3)` builds it.

    Subprocess workers receive this, so a user's `register(...)` in the parent process works
    in the workers as long as the entry point is an importable string or a module-level
    function.
    """

    entry: EnvEntry
    overrides: Mapping[str, Any]

    def __call__(self, **more: Any) -> dm_env.Environment:
        # In a fresh worker process nothing has run the plugins yet; a plugin's entry may
        # depend on what its `register_all()` did (a gymnasium id it registered, say).
        _load_plugins()
        return _build(self.entry, {**self.overrides, **more})

    @property
    def keywords(self) -> dict:
        """The keywords the environment is built with: its defaults updated by overrides."""
        return {**self.entry.defaults, **self.overrides}


_REGISTRY: dict[str, EnvEntry] = {}
_PLUGINS_LOADED = False
_LOCK = threading.Lock()


def register(
    name: str,
    entry_point: EntryPoint,
    *,
    eval_episodes: int = 4,
    scorer: Scorer = RETURN,
    requires: tuple[str, ...] = (),
    **defaults: Any,
) -> None:
    """Register `name`; `entry_point` is `'module:function'` or a callable; `defaults` are
    keywords for it. `eval_episodes` is how many episodes an evaluation plays by default;
    `scorer` is how its episodes are scored (`envs.scoring.Scorer`; default: the return);
    `requires` names the optional top-level modules it needs (listed by `mbxfer envs`)."""
    if isinstance(entry_point, str) and entry_point.count(":") != 1:
        raise ValueError(
            f"entry point {entry_point!r} for {name!r} must look like 'package.module:function'"
        )
    if name in _REGISTRY and _REGISTRY[name].entry_point != entry_point:
        warnings.warn(
            f"environment {name!r} is registered again; the new entry replaces it", stacklevel=2
        )
    _REGISTRY[name] = EnvEntry(
        name, entry_point, dict(defaults), eval_episodes, scorer, tuple(requires)
    )


def names() -> list[str]:
    """All registered environment names, sorted."""
    _load_plugins()
    return sorted(_REGISTRY)


def find(name: str) -> EnvEntry | None:
    """The entry registered as `name`, or None."""
    _load_plugins()
    return _REGISTRY.get(name)


def scorer(env_name: str) -> Scorer:
    """The scorer of environment `env_name`. A name that is not registered (results of a
    plugin not installed here) is looked up by its family, the part before `-` or `/`
    (`crafter-64` is scored as `crafter`), else the return."""
    for name in (env_name, env_name.split("/")[0].split("-")[0]):
        found = find(name)
        if found is not None:
            return found.scorer
    return RETURN


def score_key(env_name: str) -> str:
    """The summary key environment `env_name` is scored by (see `scorer`)."""
    return scorer(env_name).key


def entry(name: str) -> EnvEntry:
    _load_plugins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownEnvironmentError(
            f"unknown environment {name!r}.{hint} Registered: {', '.join(sorted(_REGISTRY))}."
        )
    return _REGISTRY[name]


def factory(name: str, **overrides: Any) -> EnvFactory:
    """A picklable recipe for `make(name, **overrides)`, checked now rather than in a worker:
    keyword names, and keyword values against what the entry point declares (see the module
    docstring); nothing is built."""
    recipe = EnvFactory(entry(name), dict(overrides))
    if _mixture_keywords(recipe.entry, recipe.keywords):
        from mbxfer.envs import mixture

        mixture.check(name, recipe.keywords)
        return recipe
    own, generic = _check_keywords(recipe.entry, recipe.keywords)
    _check_values(recipe.entry, own, generic)
    return recipe


def make(name: str, **overrides: Any) -> dm_env.Environment:
    """Build a registered environment with its defaults updated by `overrides`."""
    found = entry(name)
    return _build(found, dict(overrides))


def _build(found: EnvEntry, overrides: Mapping[str, Any]) -> dm_env.Environment:
    from mbxfer.envs import (
        wrappers,  # Local: wrappers import nothing heavy, but keep the cycle out.
    )

    keywords = {**found.defaults, **overrides}
    if _mixture_keywords(found, keywords):
        from mbxfer.envs import mixture

        return mixture.Mixture(found.name, keywords, seed=keywords.get("seed", 0))
    own, generic = _check_keywords(found, keywords)
    env = _resolve(found)(**own)
    if generic.get("time_limit"):  # Counted in environment steps, before action repeat.
        env = wrappers.TimeLimit(env, generic["time_limit"])
    if generic.get("action_repeat", 1) != 1:
        env = wrappers.ActionRepeat(env, generic["action_repeat"])
    if generic.get("image_size"):
        env = wrappers.ResizeImage(env, generic["image_size"])
    return wrappers.SelectTask(env, generic.get("task"))


def _mixture_keywords(found: EnvEntry, keywords: Mapping[str, Any]) -> bool:
    """Whether `keywords` ask for a mixture of members (`envs.mixture`)."""
    if keywords.get("members") is not None:
        return True
    if keywords.get("member_weights") is not None:
        raise UnknownKeywordError(
            f"environment {found.name!r}: member_weights weighs the members of a mixture; "
            "set members too (see envs/mixture.py)"
        )
    return False


def _check_keywords(found: EnvEntry, keywords: Mapping[str, Any]):
    parameters = inspect.signature(_resolve(found)).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    own, generic, unknown = {}, {}, []
    for key, value in keywords.items():
        if key in parameters or (takes_any and key not in GENERIC_KEYWORDS):
            own[key] = value
        elif key in GENERIC_KEYWORDS:
            generic[key] = value
        else:
            unknown.append(key)
    if unknown:
        accepted = sorted(
            {k for k, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
            | set(GENERIC_KEYWORDS)
        )
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, accepted, n=3, cutoff=0.5)
            hints.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise UnknownKeywordError(
            f"environment {found.name!r} got unknown keyword(s) {', '.join(hints)}. "
            f"Accepted: {', '.join(accepted)}."
        )
    return own, generic


GENERIC_DOMAINS = {
    "action_repeat": domains.FieldDomain(int, False, domains.positive),
    "time_limit": domains.FieldDomain(int, True, domains.non_negative),
}
"""The generic keywords' values (`task` and `image_size` are checked on their own):
`time_limit` 0 or null is no limit."""


def _check_values(found: EnvEntry, own: Mapping[str, Any], generic: Mapping[str, Any]) -> None:
    """Raise `BadKeywordValueError` naming every keyword value `found` declares it refuses."""
    factory = _resolve(found)
    problems = []
    for key, spec in _keyword_domains(factory).items():
        if key in own:
            problem = spec.problem(own[key])
            if problem is not None:
                problems.append(f"{key}={_shown(own[key])} {problem}")
    for key, spec in GENERIC_DOMAINS.items():
        if key in generic and spec.problem(generic[key]) is not None:
            problems.append(f"{key}={_shown(generic[key])} {spec.problem(generic[key])}")
    if "image_size" in generic:
        problems += _image_size_problems(generic["image_size"])
    if not problems and callable(getattr(factory, "check_keywords", None)):
        signature_defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(factory).parameters.items()
            if parameter.default is not inspect.Parameter.empty
        }
        problems += factory.check_keywords({**signature_defaults, **own, **generic})
    if problems:
        raise BadKeywordValueError(f"environment {found.name!r}: " + "; ".join(problems))
    task = generic.get("task")
    tasks = _declared_tasks(factory, own)
    if task is not None and tasks is not None and task not in tasks:
        from mbxfer.envs.wrappers import UnknownTaskError

        close = difflib.get_close_matches(str(task), tasks, n=3, cutoff=0.4)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownTaskError(
            f"environment {found.name!r} has no task {_shown(task)}{hint}; its tasks: "
            f"{', '.join(tasks)} (or null for reward-free)"
        )


def _keyword_domains(factory: Callable) -> dict[str, domains.FieldDomain]:
    """Keyword -> its declared type and domain: the signature's annotation, then `CHOICES`
    and `DOMAINS` of the entry point. Keywords with nothing declared are left out."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # A plugin's annotation that does not resolve: check no types.
        hints = {}
    parameters = inspect.signature(factory).parameters
    choices = dict(getattr(factory, "CHOICES", {}) or {})
    declared = dict(getattr(factory, "DOMAINS", {}) or {})
    out = {}
    for name, parameter in parameters.items():
        if parameter.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        spec = domains.field_domain(hints.get(name, Any))
        domain = spec.domain
        if name in declared:
            domain = declared[name]
        elif name in choices:
            domain = domains.OneOf(tuple(choices[name]))
        optional = spec.optional or parameter.default is None
        kind = spec.kind if spec.kind in (bool, int, float, str) else Any
        if domain is not None or kind is not Any:
            out[name] = domains.FieldDomain(kind, optional, domain)
    return out


def _image_size_problems(size: Any) -> list[str]:
    """The generic `image_size`: a side length, a `[height, width]` pair, or 0/null (none)."""
    if size is None or (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
        return []
    if (
        isinstance(size, (list, tuple))
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        return []
    return [f"image_size={_shown(size)} must be an integer >= 0 (0: keep) or [height, width]"]


def _declared_tasks(factory: Callable, own: Mapping[str, Any]) -> tuple[str, ...] | None:
    declared = getattr(factory, "TASKS", None)
    if callable(declared):
        return tuple(declared(own))
    return tuple(declared) if declared is not None else None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _resolve(found: EnvEntry) -> Callable[..., dm_env.Environment]:
    if callable(found.entry_point):
        return found.entry_point
    module_name, attribute = found.entry_point.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if missing and missing != module_name.split(".")[0]:
            extra = OPTIONAL_DEPENDENCIES.get(missing)
            fix = f"pip install 'mbxfer[{extra}]'" if extra else f"pip install {missing}"
            raise MissingDependencyError(
                f"environment {found.name!r} needs the optional dependency {missing!r}, "
                f"which is not installed. Install it with: {fix}"
            ) from error
        raise
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ImportError(
            f"entry point {found.entry_point!r} of environment {found.name!r}: "
            f"module {module_name!r} has no attribute {attribute!r}"
        ) from None


# -- describing without building ----------------------------------------------------------------
REQUIRED = inspect.Parameter.empty
"""The default of a keyword the factory cannot do without."""


@dataclasses.dataclass(frozen=True)
class Keyword:
    """One keyword an environment's factory accepts, with the value it gets unless overridden."""

    name: str
    default: Any = REQUIRED
    choices: tuple = ()
    """The allowed values, when the entry point declares them (`CHOICES`)."""


@dataclasses.dataclass(frozen=True)
class Description:
    """What `mbxfer envs` shows of one environment; `describe` builds it without a simulator."""

    name: str
    keywords: tuple[Keyword, ...]
    any_keyword: bool
    """The factory takes `**keywords`: any further keyword reaches it."""
    tasks: tuple[str, ...] | None
    """None when the entry point declares no `TASKS` and building it failed or took too long."""
    default_task: str | None
    note: str = ""
    """Why something is unknown (the entry point failed to import, building it timed out)."""
    missing: tuple[str, ...] = ()
    """Modules of the entry's `requires` that are not installed."""

    @property
    def install(self) -> str:
        """The command that installs the missing modules ('' when nothing is missing)."""
        extras = sorted(
            {OPTIONAL_DEPENDENCIES[m] for m in self.missing if m in OPTIONAL_DEPENDENCIES}
        )
        others = [m for m in self.missing if m not in OPTIONAL_DEPENDENCIES]
        commands = [f"pip install 'mbxfer[{','.join(extras)}]'"] if extras else []
        if others:
            commands.append(f"pip install {' '.join(others)}")
        return "; ".join(commands)


def describe(name: str, build_timeout: float = 0.0) -> Description:
    """What environment `name` accepts and its tasks, read from its entry point's signature
    and declared `TASKS`/`CHOICES` without building it. Only when `TASKS` is not declared and
    `build_timeout > 0` is it built (in a thread, waited on for at most that many seconds)."""
    found = entry(name)
    missing = tuple(m for m in found.requires if importlib.util.find_spec(m) is None)
    default_task = found.defaults.get("task")
    try:
        factory = _resolve(found)
    except Exception as error:  # A plugin whose module imports a missing package, say.
        note = str(error) if isinstance(error, ImportError) else f"{type(error).__name__}: {error}"
        return Description(name, (), False, None, default_task, note, missing)
    choices = dict(getattr(factory, "CHOICES", {}))
    keywords, any_keyword = [], False
    for parameter in inspect.signature(factory).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            any_keyword = True
            continue
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        default = found.defaults.get(parameter.name, parameter.default)
        keywords.append(Keyword(parameter.name, default, tuple(choices.get(parameter.name, ()))))
    own = {k: v for k, v in found.defaults.items() if k not in GENERIC_KEYWORDS}
    known = {keyword.name for keyword in keywords}
    keywords += [Keyword(k, v) for k, v in own.items() if k not in known]  # Via **keywords.
    declared = getattr(factory, "TASKS", None)
    note = ""
    if callable(declared):
        tasks = tuple(declared(own))
    elif declared is not None:
        tasks = tuple(declared)
    elif build_timeout > 0:
        tasks, note = _tasks_by_building(found, build_timeout)
    else:
        tasks, note = None, "tasks not declared (TASKS on the entry point)"
    return Description(name, tuple(keywords), any_keyword, tasks, default_task, note, missing)


def _tasks_by_building(found: EnvEntry, timeout: float) -> tuple[tuple[str, ...] | None, str]:
    """The tasks of one built instance, or None and why; a daemon thread, so a simulator that
    hangs delays the caller by `timeout` seconds and not its exit."""
    result: dict[str, Any] = {}

    def build() -> None:
        try:
            env = _build(found, {})
            result["tasks"] = tuple(env.tasks)
            env.close()
        except Exception as error:  # Reported as the reason the tasks are unknown.
            result["error"] = f"building it failed: {type(error).__name__}: {error}"

    thread = threading.Thread(target=build, name=f"describe {found.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if "tasks" in result:
        return result["tasks"], ""
    return None, result.get("error", f"tasks not declared, and building it took over {timeout:g} s")


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    with _LOCK:
        if _PLUGINS_LOADED:
            return
        _PLUGINS_LOADED = True
    for plugin in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            plugin.load()()
        except Exception as error:  # A broken plugin must not hide the built-in environments.
            warnings.warn(
                f"mbxfer.envs plugin {plugin.name!r} failed to load: {error!r}", stacklevel=2
            )


# Built-in environments. The table is the only place that names them.
register("grid", "mbxfer.envs.toy:GridWorld", eval_episodes=32)
register("grid_image", "mbxfer.envs.toy:GridWorld", eval_episodes=32, observation="image")
register("point_mass", "mbxfer.envs.toy:PointMass", eval_episodes=32)
register("point_mass_image", "mbxfer.envs.toy:PointMass", eval_episodes=32, observation="image")
register(
    "crafter",
    "mbxfer.envs.crafter:Crafter",
    scorer=Scorer("crafter_score", "mbxfer.envs.crafter:summarize", training_episodes=True),
)
register(
    "cartpole",
    "mbxfer.envs.wrappers:from_gymnasium",
    eval_episodes=16,
    gym_id="CartPole-v1",
    task="reward",
)
register("pendulum", "mbxfer.envs.wrappers:from_gymnasium", gym_id="Pendulum-v1", task="reward")
register(
    "procgen",
    "mbxfer.envs.procgen:Procgen",
    scorer=Scorer("normalized_return", "mbxfer.envs.procgen:summarize"),
    requires=("envpool",),
    task="reward",
)
# Success of the selected task (`log_success`, see envs/base.py) is what they are scored by.
register(
    "metaworld",
    "mbxfer.envs.metaworld:MetaWorld",
    scorer=Scorer("success_rate"),
    requires=("metaworld", "mujoco"),
    task="reward",
)
register(
    "robodesk",
    "mbxfer.envs.robodesk:RoboDesk",
    scorer=Scorer("success_rate"),
    requires=("robodesk", "dm_control", "mujoco"),
)
