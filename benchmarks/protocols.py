"""Transfer protocols as data: a protocol is a list of phases that the one loop runs in order.

A trial's `protocol` section (`ProtocolConfig`) names a protocol; `phases(config)` expands it
against the trial's environment, task and budget:

    scratch                    train on env.task for train.steps from a fresh agent (the control)
    pretrain_finetune          reward-free pretraining with the intrinsic reward, then env.task
    task_transfer              pretrain on protocol.pretrain_task, then finetune on env.task
    zero_shot                  reward-free pretraining, then fit the reward head on the
                               relabelled pretraining data and evaluate: no further env steps
    procedural_generalization  train on protocol.train_kwargs levels; evaluate on those and on
                               protocol.test_kwargs (unseen levels), reporting the gap
    task_generalization        train on protocol.train_kwargs tasks, evaluate on held-out
                               protocol.test_kwargs, then finetune on them

The generalization protocols train on sets too: `train_kwargs: {members: ML10/train}` trains
on a mixture of the ten ML10 scenes in one batch (`envs/mixture.py`) and, with test_kwargs
left out, evaluates and finetunes on the held-out side `{members: ML10/test}`; Procgen's
`{members: "coinrun,starpilot", num_levels: 200}` with test_kwargs `{start_level: 200,
num_levels: 100000}` plays unseen levels of the same games. Scores are per member and their
mean over members (`envs/scoring.py`).
    custom                     protocol.phases, written out phase by phase

Budgets (`steps`) count environment steps after action repeat, summed over the batch of
environments, like `train.steps`.

Carry-over between phases (`Phase.carry`) works on the parts of the agent's state
(`agents.base.PARTS`, named by the agent's `part_of`):

    all                 everything: parameters, optimizer states, counters, exploration module
    world_model         the world model (with its reward head) and its optimizer state; the
                        policy, value function, exploration module and counters are re-initialized
    world_model+policy  the world model and the policy (and their optimizer states); the value
                        function, exploration module and counters are re-initialized
    none                a fresh agent

Optimizer state follows its parameters: carried parameters keep their Adam moments and step
count, re-initialized ones get a fresh optimizer state. (MuZero has one Adam over world model
and prediction heads: its step count follows the world model.) The replay buffer is not carried
unless `Phase.keep_replay` (the zero-shot phase keeps it); a kept replay's rewards are
relabelled to the new task from the task rewards every step stores (`log_task_rewards`).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, Mapping, NamedTuple, Optional

import jax

from mbxfer import domains
from mbxfer.domains import finite, non_negative

CARRY = ("all", "world_model", "world_model+policy", "none")
NAMES = (
    "scratch",
    "pretrain_finetune",
    "task_transfer",
    "zero_shot",
    "procedural_generalization",
    "task_generalization",
    "custom",
)
_CARRIED_PARTS = {
    "all": {"world_model", "policy", "value", "exploration", "counter"},
    "world_model": {"world_model"},
    "world_model+policy": {"world_model", "policy"},
    "none": set(),
}


class ProtocolError(ValueError):
    """A protocol that cannot run as configured; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
    """Which transfer protocol the trial runs (see `benchmarks/protocols.py`)."""

    name: Annotated[str, domains.one_of(*NAMES)] = "scratch"
    """One of scratch, pretrain_finetune, task_transfer, zero_shot, procedural_generalization,
    task_generalization, custom."""
    pretrain_steps: Annotated[int, non_negative] = 0
    """Environment steps of the first phase (after action repeat); 0: the same as train.steps."""
    pretrain_task: Optional[str] = None
    """task_transfer: the source task A (the finetune task is env.task)."""
    intrinsic: Literal["auto", "disagreement", "rnd"] = "auto"
    """Intrinsic reward of reward-free pretraining, when agent.exploration.module is 'none';
    auto: disagreement for agents with a world model, rnd for the others (PPO)."""
    intrinsic_scale: Annotated[float, non_negative] = 1.0
    """Weight of the intrinsic reward during reward-free pretraining."""
    carry: Literal["all", "world_model", "world_model+policy", "none"] = "all"
    """What carries over into the finetune phase."""
    train_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Generalization: environment keywords of training (e.g. {num_levels: 200})."""
    test_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Generalization: environment keywords of the held-out levels or tasks."""
    zero_shot_updates: Annotated[int, non_negative] = 200
    """zero_shot: offline updates (reward head fit + policy learning, no env steps)."""
    threshold: Annotated[Optional[float], finite] = None
    """Score the steps-to-threshold transfer metric counts to (None: not reported)."""
    phases: tuple = ()
    """custom: the phases, each a mapping of `Phase` fields (other protocols ignore it, so a
    sweep can compare custom phases with scratch under one `base`)."""

    def __post_init__(self):
        domains.check(self)
        object.__setattr__(self, "phases", tuple(self.phases))


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Evaluation environments of a phase: the task scored and keywords over the trial's."""

    task: Optional[str] = None
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(f"eval set kwargs={self.kwargs!r} must be a mapping of keywords")


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stage of a protocol."""

    name: str
    steps: Annotated[int, non_negative]
    """Environment steps (after action repeat, over the batch); 0: evaluation only."""
    task: Optional[str] = None
    """Task whose reward the agent receives; None is reward-free."""
    env_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Environment keywords over the trial's `env.kwargs` (levels, goal sets, ...)."""
    extrinsic_scale: Annotated[Optional[float], non_negative] = None
    """Weight of the task reward; None: the agent's own (`agent.exploration.extrinsic_scale`)."""
    intrinsic_scale: Annotated[Optional[float], non_negative] = None
    """Weight of the intrinsic reward; None: the agent's own."""
    carry: Annotated[str, domains.one_of(*CARRY)] = "all"
    """What carries over from the previous phase (ignored by the first phase)."""
    eval_sets: Mapping[str, EvalSet] = dataclasses.field(default_factory=dict)
    """Named evaluations; every evaluation runs all of them."""
    keep_replay: bool = False
    """Keep the previous phase's replay (relabelled to this phase's task)."""
    offline_updates: Annotated[int, non_negative] = 0
    """Updates with `agent.adapt` (reward head only in the world model) before acting."""

    def __post_init__(self):
        found = domains.problems(self)
        if not isinstance(self.env_kwargs, Mapping):
            found.append(f"env_kwargs={self.env_kwargs!r} must be a mapping of keywords")
        if found:
            raise ValueError(f"phase {self.name!r}: {'; '.join(found)}")
        if not self.steps and not self.offline_updates and not self.eval_sets:
            raise ValueError(f"phase {self.name!r} neither trains nor evaluates")


def phases(config) -> list[Phase]:
    """The phases of `config.protocol` for this trial (a `benchmarks.config.TrialConfig`);
    raises `ProtocolError` when they cannot run with this agent."""
    expanded = _expand(config)
    agent_config = with_module(config.agent_config, expanded, config.protocol)
    for phase in expanded:
        _check_rewarded(config, phase, agent_config_for(agent_config, phase, config.protocol))
    return expanded


def _check_rewarded(config, phase: Phase, agent_config: Any) -> None:
    """Refuse a phase that would train a learning agent on reward 0: no task and no intrinsic
    reward. (An agent without a reward mix, such as `random`, learns nothing from rewards, so a
    reward-free phase only measures what it visits; that is allowed.)"""
    exploration = getattr(agent_config, "exploration", None)
    if phase.task is not None or phase.steps <= 0 or exploration is None:
        return
    if exploration.module != "none" and exploration.intrinsic_scale > 0:
        return
    raise ProtocolError(
        f"phase {phase.name!r} has no task and no intrinsic reward, so {config.agent} would "
        f"train on reward 0: set env.task (`mbxfer envs` lists {config.env.name}'s tasks) or "
        "an intrinsic reward (agent.exploration.module=disagreement|rnd with "
        "agent.exploration.intrinsic_scale > 0, or protocol.name=pretrain_finetune)"
    )


class _Budget(NamedTuple):
    """What every protocol's phases are made of."""

    protocol: ProtocolConfig
    target: Optional[str]
    """env.task: the task finetuned on and evaluated."""
    steps: int
    """train.steps: the budget of the (last) phase on the target task."""
    pretrain: int
    """protocol.pretrain_steps, or train.steps when 0."""

    @property
    def evaluate(self) -> dict:
        return {"eval": EvalSet(self.target)}

    def needs_target(self) -> None:
        if self.target is None:
            raise ProtocolError(
                f"protocol {self.protocol.name!r} trains on env.task, which is None; set "
                "env.task (see `mbxfer envs` for the tasks of each environment)"
            )

    def reward_free(self) -> Phase:
        return Phase(
            "pretrain",
            self.pretrain,
            task=None,
            extrinsic_scale=0.0,
            intrinsic_scale=self.protocol.intrinsic_scale,
            eval_sets=self.evaluate,
        )

    def finetune(self, eval_sets: dict, env_kwargs: Optional[dict] = None) -> Phase:
        return Phase(
            "finetune",
            self.steps,
            self.target,
            env_kwargs=dict(env_kwargs or {}),
            carry=self.protocol.carry,
            eval_sets=eval_sets,
        )


def _scratch(b: _Budget) -> list[Phase]:
    return [Phase("train", b.steps, b.target, eval_sets=b.evaluate)]


def _pretrain_finetune(b: _Budget) -> list[Phase]:
    b.needs_target()
    return [b.reward_free(), b.finetune(b.evaluate)]


def _task_transfer(b: _Budget) -> list[Phase]:
    b.needs_target()
    source_task = b.protocol.pretrain_task
    if source_task is None:
        raise ProtocolError("task_transfer pretrains on protocol.pretrain_task; set it")
    sets = {"source": EvalSet(source_task), **b.evaluate}
    return [Phase("pretrain", b.pretrain, source_task, eval_sets=sets), b.finetune(sets)]


def _zero_shot(b: _Budget) -> list[Phase]:
    b.needs_target()
    adapt = Phase(
        "zero_shot",
        0,
        b.target,
        carry="all",
        eval_sets=b.evaluate,
        keep_replay=True,
        offline_updates=b.protocol.zero_shot_updates,
    )
    return [b.reward_free(), adapt]


def _generalization(b: _Budget) -> list[Phase]:
    """Train on protocol.train_kwargs, evaluate on both splits; task_generalization then
    finetunes on the held-out split."""
    b.needs_target()
    name, protocol = b.protocol.name, b.protocol
    test_kwargs = dict(protocol.test_kwargs) or held_out(protocol.train_kwargs)
    if not test_kwargs:
        raise ProtocolError(
            f"{name} evaluates on protocol.test_kwargs (the held-out levels or tasks, "
            "e.g. {start_level: 200, num_levels: 100000} for Procgen, or train_kwargs "
            "{members: ML10/train} whose held-out side is ML10/test); set it"
        )
    splits = {
        "train": EvalSet(b.target, dict(protocol.train_kwargs)),
        "test": EvalSet(b.target, test_kwargs),
    }
    steps = b.pretrain if name == "task_generalization" else b.steps
    first = Phase(
        "train", steps, b.target, env_kwargs=dict(protocol.train_kwargs), eval_sets=splits
    )
    if name == "procedural_generalization":
        return [first]
    return [first, b.finetune(splits, test_kwargs)]


def held_out(train_kwargs: Mapping[str, Any]) -> dict:
    """The held-out side of a named member set (`envs.mixture`): train_kwargs
    `{members: ML10/train}` -> `{members: ML10/test}`; {} when there is none to name."""
    members = train_kwargs.get("members")
    if isinstance(members, str) and members.endswith("/train"):
        return {"members": members[: -len("/train")] + "/test"}
    return {}


def _custom(b: _Budget) -> list[Phase]:
    if not b.protocol.phases:
        raise ProtocolError("protocol.name=custom needs protocol.phases (a list of phases)")
    return [_phase_from_mapping(i, raw, b.target) for i, raw in enumerate(b.protocol.phases)]


_PROTOCOLS = {
    "scratch": _scratch,
    "pretrain_finetune": _pretrain_finetune,
    "task_transfer": _task_transfer,
    "zero_shot": _zero_shot,
    "procedural_generalization": _generalization,
    "task_generalization": _generalization,
    "custom": _custom,
}


def _expand(config) -> list[Phase]:
    protocol: ProtocolConfig = config.protocol
    if protocol.name not in _PROTOCOLS:
        raise ProtocolError(f"unknown protocol {protocol.name!r}")
    steps = config.train.steps
    budget = _Budget(protocol, config.env.task, steps, protocol.pretrain_steps or steps)
    return _PROTOCOLS[protocol.name](budget)


def _phase_from_mapping(index: int, raw: Mapping, target: Optional[str]) -> Phase:
    if not isinstance(raw, Mapping):
        raise ProtocolError(f"protocol.phases[{index}] must be a mapping of Phase fields")
    fields = {f.name for f in dataclasses.fields(Phase)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ProtocolError(
            f"protocol.phases[{index}]: unknown keys {unknown}; valid: {sorted(fields)}"
        )
    values = dict(raw)
    values.setdefault("name", f"phase{index}")
    values.setdefault("task", target)
    sets = values.pop("eval_sets", None)
    if sets is None:
        sets = {"eval": {"task": values["task"]}}
    try:
        if not isinstance(sets, Mapping) or not all(isinstance(v, Mapping) for v in sets.values()):
            raise ValueError("eval_sets must map names to {task: ..., kwargs: {...}}")
        values["eval_sets"] = {str(k): EvalSet(**dict(v)) for k, v in sets.items()}
        return Phase(**values)
    except (TypeError, ValueError) as error:
        raise ProtocolError(f"protocol.phases[{index}]: {error}") from None


def agent_config_for(agent_config: Any, phase: Phase, protocol: ProtocolConfig) -> Any:
    """The agent's config in `phase`: the reward mix is the phase's.

    The intrinsic module is the agent's own (`agent.exploration.module`), or the protocol's
    `intrinsic` when the agent has none and some phase uses an intrinsic reward; it is built in
    every phase of the trial, so the state keeps one structure across phases.
    """
    mix = {
        key: value
        for key, value in (
            ("extrinsic_scale", phase.extrinsic_scale),
            ("intrinsic_scale", phase.intrinsic_scale),
        )
        if value is not None
    }
    exploration = getattr(agent_config, "exploration", None)
    if exploration is None:
        if mix.get("intrinsic_scale") or mix.get("extrinsic_scale", 1.0) != 1.0:
            raise ProtocolError(
                f"phase {phase.name!r} mixes rewards ({mix}) but this agent has no "
                "exploration config (no intrinsic reward): use protocol scratch or task_transfer"
            )
        return agent_config
    if not mix:
        return agent_config
    return dataclasses.replace(agent_config, exploration=dataclasses.replace(exploration, **mix))


def with_module(agent_config: Any, all_phases: list[Phase], protocol: ProtocolConfig) -> Any:
    """`agent_config` with the intrinsic module set when a phase needs one and it has none."""
    exploration = getattr(agent_config, "exploration", None)
    if exploration is None or exploration.module != "none":
        return agent_config
    if not any(p.intrinsic_scale for p in all_phases):
        return agent_config
    choices = ("disagreement", "rnd") if protocol.intrinsic == "auto" else (protocol.intrinsic,)
    for module in choices:
        try:  # Agents refuse modules they cannot feed (disagreement needs a world model).
            return dataclasses.replace(
                agent_config, exploration=dataclasses.replace(exploration, module=module)
            )
        except ValueError as error:
            problem = error
    raise ProtocolError(f"protocol.intrinsic={protocol.intrinsic}: {problem}")


def prefix_key(config, count: int) -> str:
    """A fingerprint of everything that decides how the first `count` phases of a trial run.

    Two trials with the same fingerprint end phase `count - 1` in the same state and with the
    same logs (same agent and its config, seed, environment, training settings and phases
    0..count-1), so one's `phase{count-1}.ckpt` can start the other's phase `count`
    (`runner.run(start_from=...)`; sweeps share pretraining this way). What only later phases
    read is left out: `env.task` and `train.steps` (phases carry their own task and budget),
    the protocol's name and fields (phases carry what they decide) and the first phase's
    `carry`, which nothing reads.
    """
    import hashlib
    import json

    expanded = phases(config)
    if not 1 <= count <= len(expanded):
        raise ProtocolError(f"count={count}: the protocol has {len(expanded)} phases")
    data = config.to_dict()
    data.pop("protocol")
    data["env"] = {key: value for key, value in data["env"].items() if key != "task"}
    data["train"] = {key: value for key, value in data["train"].items() if key != "steps"}
    agent_config = with_module(config.agent_config, expanded, config.protocol)
    data["agent"] = {"name": config.agent, **dataclasses.asdict(agent_config)}
    prefix = [dataclasses.replace(expanded[0], carry="all"), *expanded[1:count]]
    data["phases"] = [dataclasses.asdict(phase) for phase in prefix]
    text = json.dumps(data, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def carry_over(rule: str, previous: Any, fresh: Any, part_of) -> Any:
    """The state a phase starts from: `previous`'s leaves for the carried parts, `fresh`'s
    for the rest (see the module docstring)."""
    if rule not in CARRY:
        raise ProtocolError(f"carry={rule!r} must be one of {CARRY}")
    if rule == "all":
        return previous
    if rule == "none":
        return fresh
    if part_of is None:
        raise ProtocolError(
            f"carry={rule!r} needs the agent to name the parts of its state (Agent.part_of); "
            "this agent does not: use carry=all or carry=none"
        )
    carried = _CARRIED_PARTS[rule]
    return jax.tree_util.tree_map_with_path(
        lambda path, old, new: old if part_of(jax.tree_util.keystr(path)) in carried else new,
        previous,
        fresh,
    )


def relabel(batch: dict, task_index: Optional[int]) -> dict:
    """`batch` with `reward` recomputed for task `task_index` from `log_task_rewards`
    (reward-free when None)."""
    stored = batch["observation"].get("log_task_rewards")
    if stored is None:
        raise ProtocolError(
            "the kept replay stores no task rewards (log_task_rewards), so it cannot be "
            "relabelled to a new task"
        )
    reward = stored[..., task_index] if task_index is not None else stored[..., 0] * 0.0
    return {**batch, "reward": reward.astype("float32")}
