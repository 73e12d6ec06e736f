"""Malformed input at every entry point of the `mbxfer` command (issue #16).

Each case runs `cli.main([...])` in this process and must end with exit code 2, one to three
lines on stderr that name the offending key or value, no traceback, and nothing started:
training, sweeps and environment rollouts are replaced by functions that fail the test if
they are reached. The cases are grouped by class of mistake; `POSITIVE` holds inputs that look
odd but are legal and must still pass.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import yaml

from mbxfer import domains
from mbxfer.benchmarks import cli, runner, sweep, sweep_spec, yaml_input
from mbxfer.benchmarks import config as config_lib
from mbxfer.envs import vector

BOMB = "\n".join(
    ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi")]
)
"""Billion laughs: nine levels of nine aliases, 9**9 strings once expanded."""


@dataclasses.dataclass(frozen=True)
class Case:
    """`argv` (with `{tmp}` for the test's folder), the texts the error must hold, and the
    files to write first (name -> text or bytes)."""

    argv: tuple[str, ...]
    expect: tuple[str, ...]
    files: tuple[tuple[str, object], ...] = ()


def run_set(*items: str, expect: tuple | str) -> Case:
    """`mbxfer run --set ITEM...` (the agent is dreamer unless an item names it)."""
    argv = ["run", "--out", "{tmp}/out"]
    for item in items:
        argv += ["--set", item]
    return Case(tuple(argv), _tuple(expect))


def run_args(*args: str, expect: tuple | str) -> Case:
    return Case(("run", "--out", "{tmp}/out", *args), _tuple(expect))


def run_env(env: str, kwargs: str, expect: tuple | str, *more: str) -> Case:
    """`mbxfer run --agent random --env ENV --set env.kwargs=KWARGS`."""
    return run_set("agent=random", f"env.name={env}", f"env.kwargs={kwargs}", *more, expect=expect)


def config_file(content: object, expect: tuple | str) -> Case:
    argv = ("run", "--out", "{tmp}/out", "--config", "{tmp}/config.yaml")
    return Case(argv, _tuple(expect), (("config.yaml", content),))


def spec(content: object, expect: tuple | str, *more: str) -> Case:
    """`mbxfer sweep SPEC --dry-run` of a spec with `content` (YAML text, bytes, or data
    dumped as YAML over a tiny valid base)."""
    if isinstance(content, dict):
        content = yaml.safe_dump({"base": TINY, "seeds": [0], **content})
    argv = ("sweep", "{tmp}/spec.yaml", "--dry-run", "--out", "{tmp}/sweep", *more)
    return Case(argv, _tuple(expect), (("spec.yaml", content),))


def command(*argv: str, expect: tuple | str, files: tuple = ()) -> Case:
    return Case(tuple(argv), _tuple(expect), files)


def _tuple(expect) -> tuple:
    return (expect,) if isinstance(expect, str) else tuple(expect)


TINY = {
    "agent": "random",
    "env": {"name": "grid", "task": "collect_items", "num_envs": 2},
    "train": {"steps": 40, "eval_every": 40, "checkpoint_every": 40, "log_every": 40},
}

CASES: dict[str, dict[str, Case]] = {}

# -- options: numbers, names and missing arguments the parser refuses ---------------------------
CASES["options"] = {
    "run seed -1": run_args("--seed", "-1", expect=("--seed", "-1")),
    "run seed above 2**64": run_args("--seed", str(2**64 + 1), expect=("--seed", str(2**64 + 1))),
    "run seed 2**32": run_args("--seed", str(2**32), expect=("--seed", str(2**32))),
    "run seed abc": run_args("--seed", "abc", expect=("--seed", "'abc'")),
    "run seed 1.5": run_args("--seed", "1.5", expect=("--seed", "1.5")),
    "run steps -5": run_args("--steps", "-5", expect=("--steps", "-5")),
    "run steps 0": run_args("--steps", "0", expect=("--steps", "0")),
    "run steps 1e6": run_args("--steps", "1e6", expect=("--steps", "1e6")),
    "run num-envs 0": run_args("--num-envs", "0", expect=("--num-envs", "0")),
    "run num-envs -2": run_args("--num-envs", "-2", expect=("--num-envs", "-2")),
    "run unknown option": run_args("--stpes", "5", expect="--stpes"),
    "run unknown agent": run_args("--agent", "nosuch", expect="'nosuch'"),
    "run unknown agent --keys": run_args("--agent", "nosuch", "--keys", expect="'nosuch'"),
    "run unknown env": run_args("--agent", "random", "--env", "nosuch", expect="'nosuch'"),
    "run close env name": run_args("--agent", "random", "--env", "craftr", expect="crafter"),
    "run unknown task": run_args("--agent", "random", "--task", "nosuch", expect="'nosuch'"),
    "run unknown protocol": run_args("--protocol", "scratc", expect=("scratc", "scratch")),
    "run --set without =": run_args("--set", "train.steps", expect="'train.steps'"),
    "sweep workers 0": command("sweep", "x.yaml", "--workers", "0", expect=("--workers", "0")),
    "sweep retries -1": command("sweep", "x.yaml", "--retries", "-1", expect=("--retries", "-1")),
    "sweep executor": command("sweep", "x.yaml", "--executor", "slurm", expect="'slurm'"),
    "sweep no spec": command("sweep", expect="SPEC.yaml"),
    "rollout workers 0": command("rollout", "--env", "grid", "--workers", "0", expect="--workers"),
    "rollout episodes 0": command(
        "rollout", "--env", "grid", "--episodes", "0", expect="--episodes"
    ),
    "rollout episodes -1": command(
        "rollout", "--env", "grid", "--episodes", "-1", expect=("--episodes", "-1")
    ),
    "rollout seed -3": command("rollout", "--env", "grid", "--seed", "-3", expect=("--seed", "-3")),
    "rollout no env": command("rollout", expect="--env"),
    "report reps 0": command("report", "{tmp}", "--reps", "0", expect=("--reps", "0")),
    "report curve-reps -1": command(
        "report", "{tmp}", "--curve-reps", "-1", expect=("--curve-reps", "-1")
    ),
    "report seed -1": command("report", "{tmp}", "--seed", "-1", expect=("--seed", "-1")),
    "eval episodes 0": command("eval", "{tmp}", "--episodes", "0", expect=("--episodes", "0")),
    "eval seed -1": command("eval", "{tmp}", "--seed", "-1", expect=("--seed", "-1")),
    "unknown command": command("trian", expect="'trian'"),
}

# -- override syntax ------------------------------------------------------------------------------
CASES["override syntax"] = {
    "empty key": run_set("=5", expect="'=5'"),
    "leading dot": run_set(".steps=5", expect="'.steps'"),
    "double dot": run_set("train..steps=5", expect="'train..steps'"),
    "key below a value": run_set("train=5", "train.steps=1", expect="'train'"),
    "unknown key": run_set("trian.steps=5", expect=("'trian'", "train")),
    "unknown nested key": run_set("train.stpes=5", expect=("'train.stpes'", "train.steps")),
    "unknown agent key": run_set("agent.model.latnt=rssm", expect="'agent.model.latnt'"),
    "unknown agent via agent=": run_set("agent=nosuch", expect="'nosuch'"),
    "agent is a number": run_set("agent=5", expect="agent=5"),
    "agent is a list": run_set("agent.name=[dreamer]", expect="agent=['dreamer']"),
    "agent_config a number": run_set("agent_config=5", expect="agent_config: 5"),
    "env a number": run_set("env=5", expect="env"),
    "train empty": run_set("train=", expect="train"),
    "env.kwargs a number": run_set("env.kwargs=5", expect="env.kwargs=5"),
    "env.kwargs a list": run_set("env.kwargs=[1, 2]", expect="env.kwargs=[1, 2]"),
    "env.kwargs number key": run_set("env.kwargs={1: 2}", expect=("env.kwargs", "1")),
    "protocol a string": run_set("protocol=scratch", expect="protocol"),
}

# -- values of the wrong type (YAML 1.1 surprises included) -------------------------------------
CASES["types"] = {
    "int field gets a word": run_set("train.batch_size=big", expect="train.batch_size='big'"),
    "int field gets 1.5": run_set("train.steps=1.5", expect="train.steps=1.5"),
    "int field gets 1:00": run_set("train.steps=1:00", expect="train.steps='1:00'"),
    "int field gets 0x10": run_set("train.steps=0x10", expect="train.steps='0x10'"),
    "int field gets 1_000": run_set("train.steps=1_000", expect="train.steps='1_000'"),
    "int field gets 1e6": run_set("train.steps=1e6", expect="train.steps=1000000.0"),
    "int field gets true": run_set("seed=true", expect="seed=True"),
    "int field gets a list": run_set("env.num_envs=[4]", expect="env.num_envs=[4]"),
    "int above 64 bits": run_set("seed=99999999999999999999", expect="seed=99999999999999999999"),
    "bool field gets yes": run_set("train.video=yes", expect="train.video='yes'"),
    "bool field gets on": run_set("log.tensorboard=on", expect="log.tensorboard='on'"),
    "bool field gets 1": run_set("log.tensorboard=1", expect="log.tensorboard=1"),
    "float field gets a word": run_set("train.train_ratio=abc", expect="train.train_ratio='abc'"),
    "float field gets a list": run_set("train.train_ratio=[1]", expect="train.train_ratio=[1]"),
    "str field gets a number": run_set("env.task=5", expect="env.task=5"),
    "str field gets a mapping": run_set("env.name={a: 1}", expect="env.name={'a': 1}"),
    "literal field": run_set("agent.model.latent=stochastic", expect="stochastic"),
    "literal near miss": run_set("agent.exploration.module=rdn", expect=("rdn", "rnd")),
    "one-of field": run_set("train.ratio_clock=sometimes", expect="train.ratio_clock='sometimes'"),
    "wandb mode": run_set("log.wandb_mode=x", expect="log.wandb_mode='x'"),
    "protocol carry": run_set("protocol.carry=most", expect="'most'"),
    "eval modes a string": run_set("train.eval_modes=sampled", expect="train.eval_modes='sampled'"),
    "eval modes unknown": run_set("train.eval_modes=[sampled, bogus]", expect="'bogus'"),
    "eval modes empty": run_set("train.eval_modes=[]", expect="eval_modes=[]"),
    "eval modes twice": run_set("train.eval_modes=[greedy, greedy]", expect="'greedy'"),
    "eval modes nested": run_set("train.eval_modes=[[sampled]]", expect="train.eval_modes[0]"),
    "agent section a number": run_set("agent.model=5", expect="agent.model"),
}

# -- values outside their field's domain (all accepted silently before) -------------------------
_DOMAIN = {
    # TrialConfig, EnvConfig, TrainConfig
    "seed=-1": "seed=-1",
    "seed=4294967296": "seed=4294967296",
    "env.num_envs=0": "env.num_envs=0",
    "train.steps=0": "train.steps=0",
    "train.steps=-5": "train.steps=-5",
    "train.batch_size=0": "train.batch_size=0",
    "train.batch_size=-1": "train.batch_size=-1",
    "train.sequence_length=0": "train.sequence_length=0",
    "train.train_ratio=-1": "train.train_ratio=-1",
    "train.train_ratio=.nan": "train.train_ratio=nan",
    "train.train_ratio=.inf": "train.train_ratio=inf",
    "train.learning_starts=-1": "train.learning_starts=-1",
    "train.replay_capacity=0": "train.replay_capacity=0",
    "train.eval_every=-1": "train.eval_every=-1",
    "train.eval_episodes=0": "train.eval_episodes=0",
    "train.checkpoint_every=0": "train.checkpoint_every=0",
    "train.checkpoint_every=-5": "train.checkpoint_every=-5",
    "train.log_every=0": "train.log_every=0",
    "train.log_every=-1": "train.log_every=-1",
    # ProtocolConfig
    "protocol.pretrain_steps=-1": "protocol.pretrain_steps=-1",
    "protocol.intrinsic_scale=-1": "protocol.intrinsic_scale=-1",
    "protocol.zero_shot_updates=-1": "protocol.zero_shot_updates=-1",
    "protocol.threshold=.nan": "protocol.threshold=nan",
    # Dreamer: optimizers, actor-critic, world model, losses, exploration
    "agent.model_lr=-1": "agent.model_lr=-1",
    "agent.actor_lr=0": "agent.actor_lr=0",
    "agent.critic_lr=.nan": "agent.critic_lr=nan",
    "agent.grad_clip=0": "agent.grad_clip=0",
    "agent.actor_critic.discount=2.0": "agent.actor_critic.discount=2.0",
    "agent.actor_critic.discount=-0.1": "agent.actor_critic.discount=-0.1",
    "agent.actor_critic.lambda_=1.5": "agent.actor_critic.lambda_=1.5",
    "agent.actor_critic.horizon=0": "agent.actor_critic.horizon=0",
    "agent.actor_critic.hidden=-1": "agent.actor_critic.hidden=-1",
    "agent.actor_critic.layers=-1": "agent.actor_critic.layers=-1",
    "agent.actor_critic.critic_bins=1": "agent.actor_critic.critic_bins=1",
    "agent.actor_critic.unimix=1.0": "agent.actor_critic.unimix=1.0",
    "agent.actor_critic.min_std=0": "agent.actor_critic.min_std=0",
    "agent.actor_critic.min_std=2": "min_std=2.0",
    "agent.actor_critic.entropy=-1": "agent.actor_critic.entropy=-1",
    "agent.actor_critic.slow_critic_fraction=2": "agent.actor_critic.slow_critic_fraction=2",
    "agent.actor_critic.return_norm_decay=1.5": "agent.actor_critic.return_norm_decay=1.5",
    "agent.actor_critic.replay_critic=-0.3": "agent.actor_critic.replay_critic=-0.3",
    "agent.model.deter=0": "agent.model.deter=0",
    "agent.model.hidden=-1": "agent.model.hidden=-1",
    "agent.model.stoch_groups=0": "agent.model.stoch_groups=0",
    "agent.model.reward_bins=1": "agent.model.reward_bins=1",
    "agent.model.unimix=-0.1": "agent.model.unimix=-0.1",
    "agent.model.mlp_layers=-1": "agent.model.mlp_layers=-1",
    "agent.model.encoder_depth=0": "agent.model.encoder_depth=0",
    "agent.model.losses.kl_dynamics=-1": "agent.model.losses.kl_dynamics=-1",
    "agent.model.losses.reward=.nan": "agent.model.losses.reward=nan",
    "agent.model.losses.free_bits=-1": "agent.model.losses.free_bits=-1",
    "agent.model.losses.contrastive_temperature=0": "contrastive_temperature=0",
    "agent.model.losses.projection_size=0": "agent.model.losses.projection_size=0",
    "agent.model.losses.open_loop_horizon=0": "agent.model.losses.open_loop_horizon=0",
    "agent.exploration.ensemble_size=1": "agent.exploration.ensemble_size=1",
    "agent.exploration.intrinsic_scale=-1": "agent.exploration.intrinsic_scale=-1",
    "agent.exploration.extrinsic_scale=-1": "agent.exploration.extrinsic_scale=-1",
    "agent.exploration.hidden=0": "agent.exploration.hidden=0",
    "agent.exploration.learning_rate=0": "agent.exploration.learning_rate=0",
    "agent.exploration.normalization_decay=2": "agent.exploration.normalization_decay=2",
}
_MUZERO = {
    "agent.discount=2.0": "agent.discount=2.0",
    "agent.value_bins=1": "agent.value_bins=1",
    "agent.hidden=-1": "agent.hidden=-1",
    "agent.learning_rate=-1": "agent.learning_rate=-1",
    "agent.n_step=0": "agent.n_step=0",
    "agent.unroll_steps=-1": "agent.unroll_steps=-1",
    "agent.reanalyse_fraction=1.5": "agent.reanalyse_fraction=1.5",
    "agent.target_update_rate=0": "agent.target_update_rate=0",
    "agent.policy_unimix=1": "agent.policy_unimix=1",
    "agent.value_scale=-1": "agent.value_scale=-1",
    "agent.search.num_simulations=0": "agent.search.num_simulations=0",
    "agent.search.temperature=0": "agent.search.temperature=0",
    "agent.search.dirichlet_fraction=1.5": "agent.search.dirichlet_fraction=1.5",
    "agent.search.pb_c_base=0": "agent.search.pb_c_base=0",
    "agent.search.value_range_floor=0": "agent.search.value_range_floor=0",
    "agent.search.policy=alphazero": "alphazero",
}
_PPO = {
    "agent.rollout_length=0": "agent.rollout_length=0",
    "agent.epochs=0": "agent.epochs=0",
    "agent.minibatches=0": "agent.minibatches=0",
    "agent.minibatches=3": "agent.minibatches=3",
    "agent.clip_ratio=0": "agent.clip_ratio=0",
    "agent.learning_rate=-1": "agent.learning_rate=-1",
    "agent.discount=1.5": "agent.discount=1.5",
    "agent.value_norm_decay=2": "agent.value_norm_decay=2",
    "agent.init_log_std=.inf": "agent.init_log_std=inf",
    "agent.adam_eps=0": "agent.adam_eps=0",
    "agent.exploration.module=disagreement": "disagreement",
}
CASES["domains"] = {
    **{item: run_set(item, expect=text) for item, text in _DOMAIN.items()},
    **{f"muzero {k}": run_set("agent=muzero", k, expect=v) for k, v in _MUZERO.items()},
    **{f"ppo {k}": run_set("agent=ppo", k, expect=v) for k, v in _PPO.items()},
    "replay smaller than a sequence": run_set(
        "train.replay_capacity=10", expect=("train.replay_capacity=10", "sequence_length")
    ),
    "muzero_nomodel planning": run_set(
        "agent=muzero_nomodel", "agent.planning=true", expect="planning"
    ),
}

# -- environment keywords: names, values, tasks ----------------------------------------------------
CASES["environment"] = {
    "grid size 2": run_env("grid", "{size: 2}", "size=2"),
    "grid size big": run_env("grid", "{size: big}", "size='big'"),
    "grid size 1.5": run_env("grid", "{size: 1.5}", "size=1.5"),
    "grid observation rgb": run_env("grid", "{observation: rgb}", ("observation='rgb'", "image")),
    "grid start middle": run_env("grid", "{start: middle}", "start='middle'"),
    "grid too many items": run_env("grid", "{size: 3, num_items: 9}", "num_items=9"),
    "grid negative items": run_env("grid", "{num_items: -1}", "num_items=-1"),
    "grid length 0": run_env("grid", "{length: 0}", "length=0"),
    "grid image_size -4": run_env("grid", "{image_size: -4}", "image_size=-4"),
    "grid seed -1": run_env("grid", "{seed: -1}", "seed=-1"),
    "grid unknown keyword": run_env("grid", "{sise: 5}", ("'sise'", "size")),
    "action_repeat 0": run_env("grid", "{action_repeat: 0}", "action_repeat=0"),
    "action_repeat 1.5": run_env("grid", "{action_repeat: 1.5}", "action_repeat=1.5"),
    "time_limit -1": run_env("grid", "{time_limit: -1}", "time_limit=-1"),
    "time_limit a word": run_env("grid", "{time_limit: long}", "time_limit='long'"),
    "point_mass goal_radius 0": run_env("point_mass", "{goal_radius: 0}", "goal_radius=0"),
    "point_mass dt -1": run_env("point_mass", "{dt: -1}", "dt=-1"),
    "point_mass observation": run_env("point_mass", "{observation: pixels}", "'pixels'"),
    "crafter image_size -4": run_env("crafter", "{image_size: -4}", "image_size=-4"),
    "crafter image_size triple": run_env("crafter", "{image_size: [1, 2, 3]}", "image_size"),
    "crafter size 17": run_env("crafter", "{size: 17}", "size=17"),
    "crafter view 2": run_env("crafter", "{view: 2}", "view=2"),
    "crafter area 0": run_env("crafter", "{area: 0}", "area=0"),
    "crafter length -1": run_env("crafter", "{length: -1}", "length=-1"),
    "procgen num_levels -1": run_env("procgen", "{num_levels: -1}", "num_levels=-1"),
    "procgen start_level -5": run_env("procgen", "{start_level: -5}", "start_level=-5"),
    "robodesk episode_length -3": run_env("robodesk", "{episode_length: -3}", "episode_length=-3"),
    "robodesk size 0": run_env("robodesk", "{size: 0}", "size=0"),
    "metaworld size -2": run_env("metaworld", "{size: -2}", "size=-2"),
    "cartpole unknown gym id": run_env("cartpole", "{gym_id: NoSuch-v0}", "NoSuch-v0"),
    "cartpole unknown keyword": run_env("cartpole", "{bogus: 1}", "'bogus'"),
    "unknown environment": run_set("agent=random", "env.name=nosuch", expect="'nosuch'"),
    "unknown task": run_set("agent=random", "env.task=nosuch", expect="'nosuch'"),
    "task on is a name": run_set("agent=random", "env.task=on", expect="'on'"),
    "task of another env": run_set(
        "agent=random", "env.name=point_mass", "env.task=collect_items", expect="'collect_items'"
    ),
    "source task unknown": run_set(
        "agent=random",
        "env.task=collect_items",
        "protocol.name=task_transfer",
        "protocol.pretrain_task=nosuch",
        expect="'nosuch'",
    ),
    "test split bad value": run_set(
        "agent=random",
        "env.task=collect_items",
        "protocol.name=procedural_generalization",
        "protocol.test_kwargs={size: 2}",
        expect="size=2",
    ),
    "train split bad keyword": run_set(
        "agent=random",
        "env.task=collect_items",
        "protocol.name=procedural_generalization",
        "protocol.train_kwargs={bogus: 1}",
        "protocol.test_kwargs={size: 5}",
        expect="'bogus'",
    ),
}

# -- protocols ------------------------------------------------------------------------------------
_CUSTOM = ("agent=random", "env.task=collect_items", "protocol.name=custom")
CASES["protocol"] = {
    "task_transfer without source": run_set(
        "env.task=collect_items", "protocol.name=task_transfer", expect="pretrain_task"
    ),
    "finetune without a task": run_set(
        "protocol.name=pretrain_finetune", "env.task=null", expect="env.task"
    ),
    "generalization without test split": run_set(
        "env.task=collect_items", "protocol.name=procedural_generalization", expect="test_kwargs"
    ),
    "custom without phases": run_set(*_CUSTOM, expect="protocol.phases"),
    "dreamer on reward 0": run_set("env.task=null", expect=("env.task", "intrinsic")),
    "custom phase unknown key": run_set(*_CUSTOM, "protocol.phases=[{stepz: 5}]", expect="stepz"),
    "custom phase negative steps": run_set(
        *_CUSTOM, "protocol.phases=[{steps: -1}]", expect="steps=-1"
    ),
    "custom phase steps 1.5": run_set(
        *_CUSTOM, "protocol.phases=[{steps: 1.5}]", expect="steps=1.5"
    ),
    "custom phase carry": run_set(
        *_CUSTOM, "protocol.phases=[{steps: 5}, {steps: 5, carry: most}]", expect="carry='most'"
    ),
    "custom phase not a mapping": run_set(*_CUSTOM, "protocol.phases=[5]", expect="phases[0]"),
    "custom phase bad kwargs": run_set(
        *_CUSTOM, "protocol.phases=[{steps: 5, env_kwargs: {size: 2}}]", expect="size=2"
    ),
    "custom eval set task": run_set(
        *_CUSTOM,
        "protocol.phases=[{steps: 5, eval_sets: {x: {task: nosuch}}}]",
        expect="'nosuch'",
    ),
    "custom eval set key": run_set(
        *_CUSTOM, "protocol.phases=[{steps: 5, eval_sets: {x: {tsk: a}}}]", expect="tsk"
    ),
    "custom eval sets a list": run_set(
        *_CUSTOM, "protocol.phases=[{steps: 5, eval_sets: [a]}]", expect="eval_sets"
    ),
    "custom phase scale": run_set(
        *_CUSTOM, "protocol.phases=[{steps: 5, extrinsic_scale: -1}]", expect="extrinsic_scale=-1"
    ),
}

# -- YAML in --set ------------------------------------------------------------------------------
CASES["override YAML"] = {
    "unclosed list": run_set("train.steps=[1", expect=("--set train.steps", "line 1")),
    "unclosed mapping": run_set("env.kwargs={size: 5", expect=("--set env.kwargs", "{size: 5")),
    "duplicate key": run_set("env.kwargs={size: 5, size: 6}", expect=("duplicate key 'size'",)),
    "unterminated quote": run_set("env.task='reach", expect="--set env.task"),
    "python tag": run_set("train.steps=!!python/object:os.system x", expect="python/object"),
    "explicit hex int": run_set("train.steps=!!int 0x10", expect="'0x10'"),
    "undefined alias": run_set("env.kwargs=*x", expect="'x'"),
    "recursive anchor": run_set("env.kwargs=&a [1, *a]", expect=("--set env.kwargs", "recursive")),
    "tab indent": run_set("env.kwargs=\t- x", expect="--set env.kwargs"),
    "nul byte": run_set("env.task=\x00", expect="--set env.task"),
    "mapping in a scalar": run_set("env.task=a: b: c", expect="--set env.task"),
    "deep nesting": run_set("env.kwargs=" + "[" * 3000 + "]" * 3000, expect="--set env.kwargs"),
    "alias bomb": run_set("env.kwargs=" + "{" + BOMB.replace("\n", ", ") + "}", expect="alias"),
}

# -- --config files -----------------------------------------------------------------------------
CASES["config file"] = {
    "a list": config_file("- 1\n- 2\n", ("config.yaml", "a list")),
    "a scalar": config_file("5\n", ("config.yaml", "an integer")),
    "a string": config_file("hello\n", ("config.yaml", "a string")),
    "binary": config_file(bytes(range(256)), ("config.yaml", "UTF-8")),
    "nul bytes": config_file("agent: \x00\n", "config.yaml"),
    "syntax error": config_file("train: {steps: 5\n", ("config.yaml", "line 2")),
    "bad indentation": config_file(
        "train:\n  steps: 5\n batch_size: 3\n", ("config.yaml", "line 3")
    ),
    "duplicate key": config_file(
        "train: {}\ntrain: {}\n", ("config.yaml", "duplicate key 'train'")
    ),
    "alias bomb": config_file(BOMB, ("config.yaml", "alias")),
    "too large": config_file("a: " + "x" * 1_000_001, ("config.yaml", "1,000,000")),
    "unknown key inside": config_file("train: {stpes: 5}\n", "'train.stpes'"),
    "sexagesimal steps": config_file("train: {steps: 1:00}\n", "train.steps='1:00'"),
    "yes as a bool": config_file("train: {video: yes}\n", "train.video='yes'"),
    "domain inside": config_file("train: {batch_size: 0}\n", "train.batch_size=0"),
    "agent_config a list": config_file("agent_config: [1]\n", "agent_config"),
    "missing": command("run", "--config", "{tmp}/nosuch.yaml", expect="nosuch.yaml"),
    "a folder": command("run", "--config", "{tmp}", expect="is a folder"),
}

# -- output folders ----------------------------------------------------------------------------------
_FILE = (("afile", "x"),)
CASES["output folder"] = {
    "run out a file": command(
        "run", "--agent", "random", "--out", "{tmp}/afile", expect="afile", files=_FILE
    ),
    "run out below a file": command(
        "run", "--agent", "random", "--out", "{tmp}/afile/x", expect="afile", files=_FILE
    ),
    "sweep out a file": Case(
        ("sweep", "{tmp}/spec.yaml", "--dry-run", "--out", "{tmp}/afile"),
        ("afile",),
        (("spec.yaml", yaml.safe_dump({"base": TINY, "seeds": [0]})), *_FILE),
    ),
    "rollout out a file": command(
        "rollout", "--env", "grid", "--out", "{tmp}/afile", expect="afile", files=_FILE
    ),
    "report out a file": command(
        "report", "{tmp}", "--out", "{tmp}/afile", expect="afile", files=_FILE
    ),
}

# -- sweep specs -------------------------------------------------------------------------------------
CASES["sweep spec"] = {
    "syntax error": spec("agents: [random]\nseeds: [0\n", ("spec.yaml", "line 3")),
    "a list": spec("- agents\n", ("spec.yaml", "mapping")),
    "a scalar": spec("5\n", ("spec.yaml", "mapping")),
    "binary": spec(bytes(range(128, 256)), ("spec.yaml", "UTF-8")),
    "missing": command("sweep", "{tmp}/nosuch.yaml", "--dry-run", expect="nosuch.yaml"),
    "a folder": command("sweep", "{tmp}", "--dry-run", expect="is a folder"),
    "alias bomb": spec(BOMB, ("spec.yaml", "alias")),
    "duplicate key": spec("seeds: [0]\nseeds: [1]\n", "duplicate key 'seeds'"),
    "million-trial grid": spec(
        {"grid": {f"train.{k}": list(range(1, 101)) for k in ("steps", "batch_size", "log_every")}},
        ("1,000,000 trials", "--yes"),
    ),
    "unknown spec key": spec({"resourcs": {}}, ("'resourcs'", "resources")),
    "unknown agent": spec({"agents": ["dremer"]}, ("'dremer'", "dreamer")),
    "unknown env": spec({"envs": ["gird"]}, ("'gird'", "grid")),
    "unknown task": spec({"tasks": ["nosuch"]}, "'nosuch'"),
    "task on": spec("base: {agent: random}\ntasks: [on]\nseeds: [0]\n", "'on'"),
    "env keyword value": spec({"envs": [{"name": "grid", "kwargs": {"size": 2}}]}, "size=2"),
    "env keyword name": spec({"envs": [{"name": "grid", "kwargs": {"sise": 5}}]}, "'sise'"),
    "negative seed": spec({"seeds": [0, -1]}, "seed=-1"),
    "seed a word": spec({"seeds": ["one"]}, "seed='one'"),
    "zero interval": spec(
        {"base": {**TINY, "train": {"checkpoint_every": 0}}}, "checkpoint_every=0"
    ),
    "grid value domain": spec({"grid": {"train.log_every": [10, 0]}}, "train.log_every=0"),
    "grid unknown key": spec({"grid": {"train.stpes": [1, 2]}}, "'train.stpes'"),
    "grid not a list": spec({"grid": {"train.steps": 5}}, "grid.train.steps"),
    "seeds not a list": spec({"seeds": 0}, "seeds"),
    "base not a mapping": spec("base: 5\nseeds: [0]\n", "base"),
    "protocol without target": spec(
        {"base": {**TINY, "env": {"name": "grid"}}, "protocols": ["pretrain_finetune"]},
        "env.task",
    ),
    "parts not a list": spec({"parts": 5}, "parts"),
    "part with a bad env": spec({"parts": [{"envs": ["gird"]}]}, ("parts[0]", "'gird'")),
    "resources negative": spec({"resources": {"num_cpus": -1}}, "resources.num_cpus=-1"),
    "unknown scale": spec({"scales": {"paper": {}}}, ("'papr'", "paper"), "--scale", "papr"),
    "scale not a mapping": spec({"scales": {"paper": 5}}, "scales.paper", "--scale", "paper"),
    "demo spec missing": command(
        "demo", "--spec", "{tmp}/nosuch.yaml", "--out", "{tmp}/demo", expect="nosuch.yaml"
    ),
}

# -- reading results and trial folders ----------------------------------------------------------
_GARBAGE = (("t/config.yaml", "agent: [\n"), ("t/eval.jsonl", "{not json"), ("x/config.yaml", "5"))
CASES["results"] = {
    "report missing folder": command("report", "{tmp}/nosuch", expect="nosuch"),
    "report a file": command("report", "{tmp}/afile", expect="afile", files=_FILE),
    "report garbage only": command("report", "{tmp}", expect="no trial folders", files=_GARBAGE),
    "report formats": command("report", "{tmp}", "--formats", "gif", expect="gif"),
    "eval not a trial": command("eval", "{tmp}", expect="config.yaml"),
    "eval garbage config": command("eval", "{tmp}/t", expect=("YAML", "line 2"), files=_GARBAGE),
    "rollout unknown env": command("rollout", "--env", "gird", expect="'gird'"),
    "rollout unknown task": command(
        "rollout", "--env", "grid", "--task", "nosuch", expect="'nosuch'"
    ),
    "rollout task on": command("rollout", "--env", "grid", "--task", "on", expect="'on'"),
}

ALL = {f"{group}: {name}": case for group, cases in CASES.items() for name, case in cases.items()}


@pytest.fixture
def nothing_starts(monkeypatch):
    """Training, sweeps and environment rollouts fail the test if reached."""

    def started(*args, **kwargs):
        raise AssertionError("validation let the input through: something started")

    monkeypatch.setattr(runner, "run", started)
    monkeypatch.setattr(sweep, "run", started)
    monkeypatch.setattr(vector, "make", started)


def _invoke(case: Case, tmp_path: Path, capsys) -> tuple[int, str, str]:
    for name, content in case.files:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in case.argv]
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_there_are_many_cases_of_every_class():
    assert len(ALL) >= 150
    assert all(len(cases) >= 5 for cases in CASES.values())


@pytest.mark.parametrize("case", list(ALL.values()), ids=list(ALL))
def test_malformed_input_is_one_short_error(case, tmp_path, capsys, nothing_starts):
    code, _, err = _invoke(case, tmp_path, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert 1 <= len(lines) <= 3, err
    assert lines[0].startswith("mbxfer"), err
    for text in case.expect:
        assert text.replace("{tmp}", str(tmp_path)) in err, (text, err)


POSITIVE = {
    "eval_every 0 disables evaluation": ("train.eval_every=0",),
    "learning_starts 0": ("train.learning_starts=0",),
    "train_ratio 0 never updates": ("train.train_ratio=0",),
    "task null is reward-free": ("agent=random", "env.task=null"),
    "time_limit 0 is none": ("env.kwargs={time_limit: 0}",),
    "crafter image_size 32": (
        "agent=random",
        "env.name=crafter",
        "env.task=collect_wood",
        "env.kwargs={image_size: 32}",
    ),
    "decimal with leading zero": ("train.steps=0100",),
    "float in scientific notation": ("agent.model_lr=1e-3",),
    "quoted number for a float": ("agent.model_lr='0.001'",),
    "merge key": ("env.kwargs={<<: {size: 5}, num_items: 2}",),
    "seed at the top of the range": (f"seed={config_lib.MAX_SEED}",),
    "ppo minibatches dividing the batch": ("agent=ppo", "agent.minibatches=8"),
    "a string that YAML 1.1 reads as a bool": ("log.wandb_project=off",),
}


@pytest.mark.parametrize("items", list(POSITIVE.values()), ids=list(POSITIVE))
def test_odd_but_legal_input_still_passes(items, tmp_path, capsys, monkeypatch):
    """Every check passes and the trial reaches the runner (replaced by a recorder)."""
    started = []
    monkeypatch.setattr(runner, "run", lambda config, out, **kwargs: started.append(config) or {})
    items = ("env.task=collect_items", *items)
    argv = ["run", "--out", str(tmp_path / "out")]
    argv += [x for item in items for x in ("--set", item)]
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert len(started) == 1 and "Traceback" not in captured.err
    if "log.wandb_project=off" in items:
        assert started[0].log.wandb_project == "off"


def test_legal_config_file_and_spec_pass(tmp_path, capsys, nothing_starts):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert cli.main(["run", "--agent", "random", "--config", str(empty), "--print-config"]) == 0
    # --print-config prints the config as built, even one this machine could not run.
    assert cli.main(["run", "--agent", "muzero", "--print-config"]) == 0
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"base": TINY, "seeds": [0, 1], "tasks": ["collect_items"]}))
    assert cli.main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    assert "2 trials" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()  # A dry run writes nothing.


def test_yaml_keeps_ambiguous_scalars_as_written():
    loaded = yaml_input.load("[1:00, on, off, yes, no, 0x10, 0o7, 010, 1_000, 2024-01-01, 3e-4]")
    assert loaded == ["1:00", "on", "off", "yes", "no", "0x10", "0o7", 10, "1_000", "2024-01-01",
                      3e-4]  # fmt: skip
    assert yaml_input.load("{a: true, b: null, c: ~, d: -5, e: .inf}") == {
        "a": True, "b": None, "c": None, "d": -5, "e": float("inf")
    }  # fmt: skip


def test_alias_bomb_is_refused_quickly():
    start = time.perf_counter()
    with pytest.raises(yaml_input.YAMLInputError, match="aliases"):
        yaml_input.load(BOMB, "bomb.yaml")
    assert time.perf_counter() - start < 1.0


def test_a_huge_grid_is_counted_without_expanding_it(tmp_path):
    grid = {f"train.{k}": list(range(1, 101)) for k in ("steps", "batch_size", "log_every")}
    big = {"base": TINY, "seeds": [0, 1], "tasks": ["collect_items", None], "grid": grid}
    start = time.perf_counter()
    assert sweep_spec.count_trials(big) == 4_000_000
    assert time.perf_counter() - start < 1.0
    small = {"envs": [{"name": "grid", "task": "a"}, "grid"], "tasks": [1, 2, 3], "seeds": [0, 1]}
    assert sweep_spec.count_trials(small) == 8  # An env with its own task is not crossed.


def test_every_config_field_declares_its_domain():
    """Each number of every config class states its domain, and every default lies in it."""
    from mbxfer import agents
    from mbxfer.benchmarks import protocols

    classes, seen = [], set()
    queue = [config_lib.TrialConfig(), *(agents.config_class(name)() for name in agents.names())]
    while queue:
        instance = queue.pop()
        if type(instance) in seen:
            continue
        seen.add(type(instance))
        classes.append(type(instance))
        queue += [getattr(instance, f.name) for f in dataclasses.fields(instance)]
        queue = [x for x in queue if dataclasses.is_dataclass(x)]
    names = {cls.__name__ for cls in classes}
    assert {"TrainConfig", "EnvConfig", "ProtocolConfig", "LogConfig", "WorldModelConfig",
            "LossConfig", "ActorCriticConfig", "SearchConfig", "PPOConfig",
            "ExplorationConfig", "MuZeroConfig", "DreamerConfig"} <= names  # fmt: skip
    undeclared = [
        f"{cls.__name__}.{name}"
        for cls in classes + [protocols.Phase]
        for name, spec in domains.fields_of(cls).items()
        if spec.kind in (int, float)
        and spec.domain is None
        and not (cls.__name__ == "MuZeroNoModelConfig" and name == "unroll_steps")
    ]
    assert undeclared == []
    for cls in classes:
        assert domains.problems(cls()) == [], cls


def test_keys_print_each_domain(capsys):
    assert cli.main(["run", "--agent", "muzero", "--keys"]) == 0
    out = capsys.readouterr().out
    assert "train.batch_size (int > 0, default 16)" in out
    assert "train.eval_every (int >= 0, default 5000)" in out
    assert "agent.discount (float in [0, 1], default 0.99)" in out
    assert "agent.search.policy (str, one of muzero, gumbel, default 'gumbel')" in out
    assert "train.eval_episodes (int > 0 or null, default None)" in out


def test_configs_built_in_python_keep_their_domains():
    from mbxfer.agents.world_model_types import WorldModelConfig

    with pytest.raises(ValueError, match="batch_size=0 must be > 0"):
        config_lib.TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="unimix=1.0 must be in \\[0, 1\\)"):
        WorldModelConfig(unimix=1.0)


def test_a_bug_still_shows_its_traceback(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(config_lib, "check_runnable", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["run", "--agent", "random", "--out", str(tmp_path)])


def test_yes_lets_a_sweep_past_the_trial_limit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep_spec, "MAX_TRIALS", 3)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"base": TINY, "seeds": [0, 1, 2, 3]}))
    argv = ["sweep", str(path), "--dry-run", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "4 trials, more than 3" in capsys.readouterr().err
    assert cli.main([*argv, "--yes"]) == 0
    assert "4 trials in" in capsys.readouterr().out
