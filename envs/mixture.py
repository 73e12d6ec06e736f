"""Mixtures: one batch whose environments differ in a keyword (Meta-World scenes, Procgen games).

    envs = vector.make(registry.factory("metaworld", members="ML10/train", task="reward"), 4)
    envs = vector.make(registry.factory("procgen", members="coinrun,starpilot", task="reward"), 8)
    env = registry.make("grid", members=[{"num_items": 1}, {"num_items": 3}], seed=0)

Any registered environment takes two more keywords (`envs.registry` hands them here):

* `members`: the member environments, each the trial's keywords updated by its own. Either
  a named set the family declares (`MEMBER_SETS` on its entry point: Meta-World `ML10/train`,
  `ML10/test`, `ML45/train`, `ML45/test`, `MT10`, `MT50`; Procgen `procgen16`), or values of
  the family's member keyword (`MEMBER_KEYWORD`: Meta-World `scene`, Procgen `game`) as a list
  or a comma-separated string (`"coinrun,starpilot"`, optionally prefixed by the family,
  `"procgen:coinrun,starpilot"`), or a list of keyword mappings (`{num_items: 1}`; a mapping
  may name another registered environment with `env:` and give itself a `name:`).
* `member_weights`: how often each member is played, a list in the members' order or a mapping
  from member name to weight (non-negative, not all 0). Left out: uniform.

Which environment plays which member:

* Families built copy by copy (Meta-World, RoboDesk, the toy environments): every copy of the
  batch is a `Mixture` holding one environment per member, and each episode picks its member
  at reset. Without `member_weights` the members are cycled: the copy seeded `s + i` of a batch
  of `n` (`envs.vector.make` tells each copy `n`) plays members `s + i`, `s + i + n`,
  `s + i + 2n`, ... modulo the number of members, so the batch's episodes, round after round,
  go through the members in order, as if episode `j` of the batch played member `s + j`; an
  evaluation of `k * len(members)` episodes of equal length plays each member `k` times.
  With weights, each reset draws the member by weight from the copy's seeded generator
  (Meta-World's ML benchmarks sample a training task per episode in the same way).
* Families batched natively (Procgen on envpool, which cannot mix games in one pool): the
  batch's slots are split among the members (`MixtureBatch`), a contiguous block of slots per
  member sized by weight (largest remainder, at least one slot per member of weight > 0), and
  each block is that member's own native batch. So `num_envs` must be at least the number of
  members played.

Members must be mixable: the same agent-visible observation keys with equal shapes and dtypes,
the same `log_*` keys, the same action spec and the same tasks, checked when the mixture is
built (all members are built then); otherwise a `MixtureError` names the two members and what
differs. Each timestep carries `log_member` (int32, the member's index in `members`); scoring
(`envs.scoring`) groups the episodes by member and reports each member under `members`, and the
family's score as the mean over members (each member counts once, however many episodes it
played). Saved state (`get_state`) holds every member's state, the member being played and the
sampler, so mixtures resume mid-episode whenever their members do.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, Optional, Sequence

import dm_env
import numpy as np
from dm_env import specs

from mbxfer.envs import base

MEMBERS = "members"
WEIGHTS = "member_weights"
STRIDE = "member_stride"
"""Set by `envs.vector.make` to the batch size, so the copies of a batch cycle in step."""
KEYWORDS = (MEMBERS, WEIGHTS, STRIDE)
MEMBER_KEY = "log_member"
_SEED_SALT = 0x6D6978  # Keeps member seeds apart from the seeds of plain copies.


class MixtureError(base.ConfigurationError, ValueError):
    """Members that cannot be named, weighted or mixed; the message names them."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One member of a mixture: its name, its environment and its keywords over the shared."""

    name: str
    env: str
    overrides: Mapping[str, Any]


def is_mixture(keywords: Mapping[str, Any]) -> bool:
    return keywords.get(MEMBERS) is not None


def _entry_point(env_name: str):
    from mbxfer.envs import registry

    return registry._resolve(registry.entry(env_name))


def set_names(env_name: str) -> tuple[str, ...]:
    """The named member sets environment `env_name` declares (`MEMBER_SETS`)."""
    return tuple(getattr(_entry_point(env_name), "MEMBER_SETS", {}) or {})


def resolve(env_name: str, members: Any) -> tuple[Member, ...]:
    """The members `members` (see the module docstring) of environment `env_name`."""
    factory = _entry_point(env_name)
    keyword = getattr(factory, "MEMBER_KEYWORD", None)
    sets = dict(getattr(factory, "MEMBER_SETS", {}) or {})
    if isinstance(members, str):
        text = members.strip()
        if text in sets:
            return tuple(_by_value(env_name, keyword, v) for v in sets[text])
        prefix, _, rest = text.partition(":")
        if rest and prefix.strip() == env_name:
            text = rest
        if "/" in text or (keyword is None and "," not in text):
            raise MixtureError(_unknown_set(env_name, members, sets))
        members = [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(members, (list, tuple)) or not members:
        raise MixtureError(
            f"{MEMBERS}={members!r} must be a named set ({', '.join(sets) or 'none declared'}), "
            "a comma-separated string or a non-empty list of values or keyword mappings"
        )
    resolved = []
    for item in members:
        if isinstance(item, Mapping):
            resolved.append(_by_mapping(env_name, item))
        elif keyword is None:
            raise MixtureError(
                f"environment {env_name!r} declares no member keyword (MEMBER_KEYWORD), so its "
                f"members must be keyword mappings, e.g. [{{size: 5}}, {{size: 7}}]; got {item!r}"
            )
        else:
            resolved.append(_by_value(env_name, keyword, item))
    names = [member.name for member in resolved]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise MixtureError(f"{MEMBERS}: members named more than once: {', '.join(duplicates)}")
    return tuple(resolved)


def _unknown_set(env_name: str, members: str, sets: Mapping) -> str:
    close = difflib.get_close_matches(members, list(sets), n=3, cutoff=0.4)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    known = ", ".join(sets) if sets else "none"
    return f"environment {env_name!r} has no member set {members!r}.{hint} Its sets: {known}."


def _by_value(env_name: str, keyword: str, value: Any) -> Member:
    return Member(str(value), env_name, {keyword: value})


def _by_mapping(env_name: str, item: Mapping) -> Member:
    overrides = dict(item)
    name = overrides.pop("name", None)
    env = overrides.pop("env", env_name)
    if any(key in overrides for key in KEYWORDS):
        raise MixtureError(f"member {dict(item)!r}: a member cannot hold {MEMBERS} itself")
    if name is None:
        shown = ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
        name = f"{env}:{shown}" if env != env_name else (shown or env)
    return Member(str(name), str(env), overrides)


def weights(members: Sequence[Member], raw: Any) -> Optional[np.ndarray]:
    """The members' normalized weights, or None when `raw` is None (uniform, cycled)."""
    if raw is None:
        return None
    names = [member.name for member in members]
    if isinstance(raw, Mapping):
        unknown = [str(k) for k in raw if str(k) not in names]
        if unknown:
            close = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            shown = ", ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "")
                              for k, c in close.items())  # fmt: skip
            raise MixtureError(f"{WEIGHTS} names no member {shown}; members: {', '.join(names)}")
        raw = [raw.get(name, 0.0) for name in names]
    if not isinstance(raw, (list, tuple)) or len(raw) != len(names):
        raise MixtureError(
            f"{WEIGHTS}={raw!r} must be a list of {len(names)} weights (one per member, in the "
            "order of members) or a mapping from member name to weight"
        )
    try:
        values = np.asarray(raw, np.float64)
    except (TypeError, ValueError):
        raise MixtureError(f"{WEIGHTS}={raw!r} must hold numbers") from None
    if not np.all(np.isfinite(values)) or np.any(values < 0) or values.sum() <= 0:
        raise MixtureError(f"{WEIGHTS}={list(raw)} must be finite, >= 0 and not all 0")
    return values / values.sum()


def recipes(env_name: str, keywords: Mapping[str, Any]) -> tuple[tuple[Member, ...], list]:
    """The members and one checked `registry.EnvFactory` per member: the shared keywords
    (all but `members` and `member_weights`) updated by the member's own."""
    from mbxfer.envs import registry

    members = resolve(env_name, keywords[MEMBERS])
    shared = {k: v for k, v in keywords.items() if k not in KEYWORDS and k != "seed"}
    built = []
    for member in members:
        try:
            built.append(registry.factory(member.env, **{**shared, **member.overrides}))
        except base.ConfigurationError as error:
            raise type(error)(f"member {member.name!r} of the mixture: {error}") from None
    weights(members, keywords.get(WEIGHTS))
    return members, built


def check(env_name: str, keywords: Mapping[str, Any]) -> None:
    """Raise `MixtureError` (or the member's own error) for members that cannot be built."""
    recipes(env_name, keywords)


def member_seed(seed: int, index: int) -> int:
    """The seed of member `index` of a copy seeded `seed`: distinct per copy and member."""
    return int(np.random.SeedSequence([_SEED_SALT, int(seed), index]).generate_state(1)[0])


# -- compatibility ------------------------------------------------------------------------------
def _describe_array(spec) -> str:
    if isinstance(spec, specs.DiscreteArray):
        return f"Discrete({spec.num_values})"
    text = f"{np.dtype(spec.dtype).name}{list(spec.shape)}"
    if isinstance(spec, specs.BoundedArray):
        low, high = np.min(spec.minimum), np.max(spec.maximum)
        text += f" in [{low:g}, {high:g}]"
    return text


def _differences(first, other) -> list[str]:
    """What differs between two members' `(observation_spec, action_spec, tasks)`."""
    (obs_a, act_a, tasks_a), (obs_b, act_b, tasks_b) = first, other
    found = []
    if set(obs_a) != set(obs_b):
        found.append(f"observation keys {sorted(obs_a)} vs {sorted(obs_b)}")
    for key in sorted(set(obs_a) & set(obs_b)):
        a, b = _describe_array(obs_a[key]), _describe_array(obs_b[key])
        if a != b:
            found.append(f"observation {key!r} {a} vs {b}")
    if _describe_array(act_a) != _describe_array(act_b) or type(act_a) is not type(act_b):
        found.append(f"action spec {_describe_array(act_a)} vs {_describe_array(act_b)}")
    if tuple(tasks_a) != tuple(tasks_b):
        found.append(f"tasks {list(tasks_a)} vs {list(tasks_b)}")
    return found


def check_compatible(names: Sequence[str], member_specs: Sequence[tuple]) -> None:
    """Raise `MixtureError` unless every member has the first member's specs and tasks."""
    for name, spec in zip(names[1:], member_specs[1:]):
        found = _differences(member_specs[0], spec)
        if found:
            raise MixtureError(
                f"members {names[0]!r} and {name!r} cannot be mixed in one batch: "
                f"{'; '.join(found)}. Mix only members with equal specs."
            )


def _with_member(observation: Mapping, index: int) -> dict:
    return {**observation, MEMBER_KEY: np.asarray(index, np.int32)}


def _member_spec(observation_spec: Mapping) -> dict:
    return {**observation_spec, MEMBER_KEY: specs.Array((), np.int32, MEMBER_KEY)}


# -- one copy: a member per episode -------------------------------------------------------------
class Mixture(base.Environment):
    """One copy of a mixture built copy by copy; each episode plays one member (see above)."""

    def __init__(self, env_name: str, keywords: Mapping[str, Any], seed: int = 0):
        self.members, member_recipes = recipes(env_name, keywords)
        self.names = tuple(member.name for member in self.members)
        self._weights = weights(self.members, keywords.get(WEIGHTS))
        self._stride = int(keywords.get(STRIDE) or 1)
        self._envs = []
        try:
            for index, recipe in enumerate(member_recipes):
                self._envs.append(recipe(seed=member_seed(seed, index)))
            check_compatible(
                self.names,
                [(e.observation_spec(), e.action_spec(), tuple(e.tasks)) for e in self._envs],
            )
        except BaseException:
            self.close()
            raise
        self._current: Optional[int] = None
        self.seed(seed)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self._envs[0].tasks)

    def seed(self, seed: int) -> None:
        self._rng = np.random.default_rng([_SEED_SALT, int(seed)])
        self._next = int(seed) % len(self._envs)  # Cycling starts at the seed's member.
        for index, env in enumerate(self._envs):
            env.seed(member_seed(seed, index))
        self._current, self._needs_reset = None, True

    def _next_member(self) -> int:
        if self._weights is not None:
            return int(self._rng.choice(len(self._envs), p=self._weights))
        index = self._next
        self._next = (self._next + self._stride) % len(self._envs)
        return index

    def reset(self) -> dm_env.TimeStep:
        self._current = self._next_member()
        self._needs_reset = False
        timestep = self._envs[self._current].reset()
        return timestep._replace(observation=_with_member(timestep.observation, self._current))

    def step(self, action) -> dm_env.TimeStep:
        if self._needs_reset or self._current is None:
            return self.reset()
        timestep = self._envs[self._current].step(action)
        if timestep.last():
            self._needs_reset = True
        return timestep._replace(observation=_with_member(timestep.observation, self._current))

    def get_state(self) -> dict:
        """Every member's state, the member being played and the member sampler."""
        return {
            "members": self.names,
            "envs": [env.get_state() for env in self._envs],
            "current": self._current,
            "needs_reset": self._needs_reset,
            "next": self._next,
            "rng": self._rng.bit_generator.state,
        }

    def set_state(self, state: dict) -> None:
        if tuple(state["members"]) != self.names:
            raise MixtureError(
                f"a state of members {list(state['members'])}, this mixture has {list(self.names)}"
            )
        for env, env_state in zip(self._envs, state["envs"]):
            env.set_state(env_state)
        self._current, self._needs_reset = state["current"], bool(state["needs_reset"])
        self._next = int(state["next"])
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state["rng"]

    def observation_spec(self) -> dict:
        return _member_spec(self._envs[0].observation_spec())

    def action_spec(self):
        return self._envs[0].action_spec()

    def member_env(self, index: int) -> dm_env.Environment:
        """Member `index`'s environment (for scripted policies and tests)."""
        return self._envs[index]

    @property
    def current(self) -> Optional[int]:
        """The index of the member being played (None before the first reset)."""
        return self._current

    def close(self) -> None:
        for env in self._envs:
            env.close()


# -- natively batched members: slots split among them ---------------------------------------------
def slot_counts(num_envs: int, member_weights: Optional[np.ndarray], count: int) -> list[int]:
    """Slots per member: proportional to the weights (uniform when None) by largest remainder,
    at least one per member of weight > 0; `MixtureError` when there are too few slots."""
    w = np.full(count, 1.0 / count) if member_weights is None else np.asarray(member_weights)
    played = int(np.count_nonzero(w > 0))
    if num_envs < played:
        raise MixtureError(
            f"a batch of {num_envs} environments cannot play {played} members of a natively "
            f"batched family (one slot each at least): use num_envs >= {played} or fewer members"
        )
    counts = np.where(w > 0, 1, 0)
    exact = w * (num_envs - played)
    counts += np.floor(exact).astype(int)
    remainders = exact - np.floor(exact)
    for index in np.argsort(-remainders, kind="stable")[: num_envs - counts.sum()]:
        counts[index] += 1
    return counts.tolist()


class MixtureBatch:
    """A batch of natively batched members (Procgen): a block of slots per member, each its
    member's own batch; the interface and auto-reset of `envs.vector.VectorEnv`."""

    mode = "native"

    def __init__(self, env_name: str, keywords: Mapping[str, Any], num_envs: int, seed: int,
                 make_batch):  # fmt: skip
        self.members, member_recipes = recipes(env_name, keywords)
        self.names = tuple(member.name for member in self.members)
        member_weights = weights(self.members, keywords.get(WEIGHTS))
        counts = slot_counts(num_envs, member_weights, len(self.members))
        self.num_envs = num_envs
        self._played = [i for i, n in enumerate(counts) if n > 0]
        self._offsets = np.cumsum([0] + [counts[i] for i in self._played]).tolist()
        self._batches = []
        try:
            for start, index in zip(self._offsets, self._played):
                self._batches.append(make_batch(member_recipes[index], counts[index], seed + start))
            check_compatible(
                [self.names[i] for i in self._played],
                [(b.observation_spec(), b.action_spec(), tuple(b.tasks)) for b in self._batches],
            )
        except BaseException:
            self.close()
            raise
        self.slot_members = np.repeat(self._played, [counts[i] for i in self._played]).astype(
            np.int32
        )
        """The member index each slot plays."""

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self._batches[0].tasks)

    def observation_spec(self) -> dict:
        return _member_spec(self._batches[0].observation_spec())

    def action_spec(self):
        return self._batches[0].action_spec()

    def _join(self, timesteps: list) -> dm_env.TimeStep:
        observation = {
            key: np.concatenate([t.observation[key] for t in timesteps])
            for key in timesteps[0].observation
        }
        observation[MEMBER_KEY] = self.slot_members.copy()
        return dm_env.TimeStep(
            np.concatenate([t.step_type for t in timesteps]).astype(np.int8),
            np.concatenate([t.reward for t in timesteps]).astype(np.float32),
            np.concatenate([t.discount for t in timesteps]).astype(np.float32),
            observation,
        )

    def reset(self) -> dm_env.TimeStep:
        return self._join([batch.reset() for batch in self._batches])

    def step(self, actions) -> dm_env.TimeStep:
        actions = np.asarray(actions)
        if len(actions) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} actions, got {len(actions)}")
        bounds = zip(self._offsets[:-1], self._offsets[1:])
        return self._join(
            [batch.step(actions[a:b]) for batch, (a, b) in zip(self._batches, bounds)]
        )

    def seed(self, seed: int) -> None:
        for batch, start in zip(self._batches, self._offsets):
            batch.seed(seed + start)

    def get_state(self) -> dict:
        return {"members": self.names, "batches": [b.get_state() for b in self._batches]}

    def set_state(self, state: dict) -> None:
        if tuple(state["members"]) != self.names:
            raise MixtureError(
                f"a state of members {list(state['members'])}, this mixture has {list(self.names)}"
            )
        for batch, batch_state in zip(self._batches, state["batches"]):
            batch.set_state(batch_state)

    def worker_pids(self) -> list[int]:
        return [pid for batch in self._batches for pid in batch.worker_pids()]

    def close(self) -> None:
        for batch in self._batches:
            batch.close()

    def __enter__(self) -> "MixtureBatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
