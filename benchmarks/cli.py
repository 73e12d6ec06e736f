"""The `mbxfer` command.

mbxfer run --agent dreamer --env crafter --task reward --steps 20000 --out results/x
                                  train (or resume) one trial
mbxfer sweep SPEC.yaml            run a grid of trials (local processes or Ray), resumable
mbxfer report RESULTS_DIR         IQM/CI tables, CSV files and plots from trial folders
mbxfer eval TRIAL                 evaluate a trial's checkpoint again (or on another task)
mbxfer agents                     list agents and their config classes
mbxfer envs                       list environments and their tasks
mbxfer rollout --env crafter      uniform random policy through the vector environment
mbxfer demo                       the quickstart sweep, then its report (what `make demo` runs)

Help text is written with `code` in backticks, as the docstrings are; the terminal shows it
without them (`plain`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

QUICKSTART = "quickstart.yaml"


def random_rollout(
    env: str, episodes: int, workers: int, seed: int, out: Path | None, task: str | None
) -> dict:
    """Play a uniform random policy until `episodes` episodes end; their summary
    (`envs.scoring`), written with each episode's record to `out` when given."""
    from mbxfer.benchmarks import episodes as episodes_lib
    from mbxfer.envs import registry, scoring, vector

    recipe = registry.factory(env, task=task)
    mode = "process" if workers > 1 else "inline"
    start = time.time()
    with contextlib.ExitStack() as stack:
        envs = stack.enter_context(vector.make(recipe, workers, mode=mode, seed=seed))
        write = None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            lines = stack.enter_context(open(out / "episodes.jsonl", "w"))
            write = lambda record: lines.write(json.dumps(record) + "\n")  # noqa: E731
        policy = episodes_lib.RandomPolicy(envs.action_spec(), seed)
        records = episodes_lib.play(envs, policy, episodes, on_episode=write)
        tasks = envs.tasks
    summary = {
        "env": env,
        "task": task,
        "env_steps": policy.steps,
        "steps_per_second": policy.steps / (time.time() - start),
        **scoring.summarize(records, recipe, tasks),
    }
    if out is not None:
        from mbxfer.benchmarks.checkpoint import write_atomic

        write_atomic(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def _cmd_envs(args) -> int:
    """Each environment's keywords (defaults, allowed values), tasks and missing dependencies,
    read from the registry without building a simulator (`registry.describe`)."""
    import textwrap

    from mbxfer.envs import registry

    def show(label: str, text: str) -> None:
        indent = " " * 12
        wrapped = textwrap.wrap(
            text,
            100,
            break_on_hyphens=False,
            initial_indent=f"  {label:10s}",
            subsequent_indent=indent,
        )
        print("\n".join(wrapped))

    print(
        "Environments for `mbxfer run --env NAME`; their keywords go in env.kwargs, shown as "
        "name=default.\nEvery environment also takes: " + ", ".join(registry.GENERIC_KEYWORDS)
        + ".\n"
    )  # fmt: skip
    for name in registry.names():
        # Built only if it declares no tasks (a plugin's choice), and then for at most 5 s.
        about = registry.describe(name, build_timeout=5.0)
        print(name + (f"  [not installed: {about.install}]" if about.missing else ""))
        if about.tasks is not None:
            marked = [f"{t} (default)" if t == about.default_task else t for t in about.tasks]
            show("tasks:", ", ".join(marked))
        if about.note:
            show("note:", about.note)
        plain = [k for k in about.keywords if not k.choices]
        texts = [
            k.name if k.default is registry.REQUIRED else f"{k.name}={k.default!r}" for k in plain
        ]
        if about.any_keyword:
            texts.append("and any other keyword (passed to its factory)")
        label = "keywords:"
        for item in (k for k in about.keywords if k.choices):
            show(
                label, f"{item.name}={item.default!r}, one of: {', '.join(map(str, item.choices))}"
            )
            label = ""
        if texts:
            show(label, ", ".join(texts))
    return 0


def _cmd_rollout(args) -> int:
    if args.out:
        check_out_folder(Path(args.out))
    summary = random_rollout(
        args.env,
        args.episodes,
        args.workers,
        args.seed,
        Path(args.out) if args.out else None,
        args.task,
    )
    print(json.dumps(summary, indent=2))
    return 0


def packaged_spec(name: str) -> str:
    """The path of sweep spec `name` shipped in `benchmarks/configs`, relative to the current
    folder when it is below it (so `mbxfer demo` in a checkout names it as `make demo` did)."""
    path = Path(__file__).resolve().parent / "configs" / name
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def demo_commands(spec: Optional[str], out: str) -> list[list[str]]:
    """The `mbxfer` commands `mbxfer demo` runs: the quickstart sweep (or `spec`) into `out`,
    then its report."""
    return [["sweep", spec or packaged_spec(QUICKSTART), "--out", out], ["report", out]]


def _cmd_demo(args) -> int:
    for argv in demo_commands(args.spec, args.out):
        print("mbxfer " + " ".join(argv), file=sys.stderr)
        code = main(argv)
        if code:  # As `make` would, no report of a sweep that did not finish.
            return code
    return 0


def _cmd_eval(args) -> int:
    from mbxfer.benchmarks import evaluate_trial

    modes = None
    if args.modes is not None:
        modes = tuple(mode.strip() for mode in args.modes.split(",") if mode.strip())
    request = evaluate_trial.Request(
        checkpoint=args.checkpoint,
        phase=args.phase,
        task=args.task,
        episodes=args.episodes,
        modes=modes,
        seed=args.seed,
        video=args.video,
        name=args.name,
    )
    command = " ".join(["mbxfer", *args.argv])
    result = evaluate_trial.evaluate(Path(args.trial), request, command=command)
    print("\n".join(evaluate_trial.summary_lines(result)))
    return 0


def _run_updates(args) -> dict:
    """Nested config updates from a YAML file, the shortcut flags, then `--set` overrides."""
    from mbxfer.benchmarks import config as config_lib

    updates: dict = {}
    if args.config:
        updates = config_lib.read_config_file(Path(args.config))
    shortcuts = {
        "agent": {"name": args.agent} if args.agent is not None else {},
        "seed": args.seed,
        "env": {
            k: v
            for k, v in {"name": args.env, "task": args.task, "num_envs": args.num_envs}.items()
            if v is not None
        },
        "train": {"steps": args.steps} if args.steps is not None else {},
        "protocol": {"name": args.protocol} if args.protocol is not None else {},
    }
    config_lib.merge(updates, {k: v for k, v in shortcuts.items() if v not in (None, {})})
    if args.task == "none":
        updates["env"]["task"] = None
    config_lib.merge(updates, config_lib.parse_overrides(args.set))
    return updates


EXIT_NONFINITE = 3
"""`mbxfer run`'s exit code when training went non-finite (`loop.NonFiniteError`)."""


def _cmd_run(args) -> int:
    from mbxfer.benchmarks import config as config_lib
    from mbxfer.benchmarks import loop, runner, trial_folder

    config = config_lib.build(_run_updates(args))
    if args.print_config:  # The config as built (keys, types, domains), runnable here or not.
        print(config_lib.to_yaml(config), end="")
        return 0
    config_lib.check_runnable(config)  # Phases and environments: refused before anything runs.
    out = Path(args.out) if args.out else Path("results") / "runs" / config.trial_id()
    check_out_folder(out)
    print(
        f"trial {config.trial_id()}: {config.agent} on {config.env.name} "
        f"(task {config.env.task}), {config.train.steps} steps -> {out}",
        file=sys.stderr,
    )
    start_from = Path(args.start_from) if args.start_from else None
    try:
        summary = runner.run(config, out, progress=not args.no_progress, start_from=start_from)
    except _bad_input_errors():
        raise
    except loop.NonFiniteError as error:
        trial_folder.record_failure(out, traceback.format_exc())
        print(f"mbxfer: error: trial {config.trial_id()}: {error}", file=sys.stderr)
        return EXIT_NONFINITE
    except Exception:
        if (out / "config.yaml").exists():
            _record_failure(out, config.trial_id())
        raise
    (out / "failed.json").unlink(missing_ok=True)
    print(json.dumps(summary, indent=2))
    return 0


def _record_failure(out: Path, trial_id: str) -> None:
    """Mark a trial that failed after it started as failed, as `mbxfer sweep` does, so
    `mbxfer report` and `sweep --dry-run` see it as such (the traceback still follows)."""
    from mbxfer.benchmarks import trial_folder

    error = trial_folder.record_failure(out, traceback.format_exc())
    print(
        f"trial {trial_id} failed: {error} (traceback appended to {out / 'error.txt'}; "
        "run the same command again to resume from its latest checkpoint)",
        file=sys.stderr,
    )


def _cmd_sweep(args) -> int:
    from mbxfer.benchmarks import sweep, sweep_spec

    spec = sweep_spec.load_spec(Path(args.spec), args.scale)
    out = Path(args.out) if args.out else Path("results") / Path(args.spec).stem
    check_out_folder(out)
    count = sweep_spec.count_trials(spec)
    if count > sweep_spec.MAX_TRIALS and not args.yes:
        raise sweep_spec.SpecError(
            f"sweep spec {args.spec} expands to {count:,} trials, more than "
            f"{sweep_spec.MAX_TRIALS:,}: check its axes and grid, or pass --yes to go on"
        )
    if count > sweep_spec.MAX_TRIALS:
        print(f"sweep: checking {count:,} trials (--yes)...", file=sys.stderr, flush=True)
    plan = sweep_spec.expand(spec)
    if args.dry_run:
        rows = sweep.plan(plan, out)
        print(f"{len(rows)} trials in {out}:")
        print(
            f"{'trial':12s}  {'status':8s}  {'env steps':>19s}  agent / env / task / protocol / seed"
        )
        starts = sweep.shared_starts(plan.trials)
        for trial, status, steps in rows:
            labels = trial.labels
            overrides = " ".join(f"{k}={v}" for k, v in labels["overrides"].items())
            shared = ""
            if trial.trial_id in starts:
                leader, index = starts[trial.trial_id]
                shared = f"  (starts from {leader}/phase{index}.ckpt)"
            print(
                f"{trial.trial_id:12s}  {status:8s}  {steps:>9,}/{sweep_spec.trial_budget(trial.config):<9,}  "
                f"{labels['agent']} / {labels['env']} / {labels['task']} / "
                f"{labels['protocol']} / {labels['seed']}  {overrides}".rstrip()
                + shared
            )
        counts = {s: sum(r[1] == s for r in rows) for s in sweep.STATUSES}
        print(", ".join(f"{n} {s}" for s, n in counts.items() if n))
        if starts:
            print(
                f"{len(starts)} trials share their first phases with an earlier trial and start "
                "from its phase checkpoint instead of running them again"
            )
        return 0
    try:
        outcome = sweep.run(
            plan,
            out,
            executor=args.executor,
            workers=args.workers,
            address=args.address,
            retries=args.retries,
            stream=sys.stderr,
            progress=not args.no_progress,
            spec_path=str(args.spec),
        )
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to resume ({out})", file=sys.stderr)
        return 130
    failed = list(sweep.iter_failed(outcome))
    for trial_id, error in failed:
        print(
            f"trial {trial_id} not finished: {error} (see {out / trial_id / 'error.txt'})",
            file=sys.stderr,
        )
    done = len(outcome.statuses) - len(failed)
    print(
        f"{done}/{len(outcome.statuses)} trials done in {out}; tables and plots: "
        f"mbxfer report {out}"
    )
    return 1 if failed else 0


def _cmd_report(args) -> int:
    from mbxfer.benchmarks import report
    from mbxfer.benchmarks.config import ConfigError

    if Path(args.results).exists() and not Path(args.results).is_dir():
        raise ConfigError(f"RESULTS_DIR {args.results} is a file; give the folder of trial folders")
    if args.out:
        check_out_folder(Path(args.out))
    argv = ["mbxfer", "report", args.results] + (["--out", args.out] if args.out else [])
    argv += ["--formats", args.formats] if args.formats != "png,pdf" else []
    path = report.write(
        Path(args.results),
        Path(args.out) if args.out else None,
        command=" ".join(argv),
        reps=args.reps,
        curve_reps=args.curve_reps,
        seed=args.seed,
        formats=args.formats,
    )
    print(f"wrote {path}")
    return 0


def _cmd_agents(args) -> int:
    from mbxfer import agents
    from mbxfer.benchmarks import config as config_lib

    for name in agents.names():
        config_class = agents.config_class(name)
        doc = plain(" ".join((config_class.__doc__ or "").split()))
        print(f"{name:16s} {config_class.__module__}.{config_class.__name__}: {doc}")
        if args.keys:
            instance = config_lib.build({"agent": name}).agent_config
            for line in config_lib.describe(instance, "agent."):
                print("    " + plain(line))
    return 0


def _integer(text: str, low: int, high: Optional[int], what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"{text} is not {what}")
    return value


def _positive(text: str) -> int:
    return _integer(text, 1, None, "a positive integer")


def _non_negative(text: str) -> int:
    return _integer(text, 0, None, "a non-negative integer")


def _seed(text: str) -> int:
    from mbxfer.benchmarks.config import MAX_SEED

    return _integer(text, 0, MAX_SEED, f"a seed (an integer in [0, {MAX_SEED}])")


def check_out_folder(path: Path, option: str = "--out") -> None:
    """Refuse an output folder that cannot be one: an existing file, or below a file or a
    folder this user cannot write to. Creates nothing (a dry run leaves no trace)."""
    from mbxfer.benchmarks.config import ConfigError

    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{option} {path} is a file, not a folder; give a folder")
        return
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{option} {path}: cannot create it, {parent} is not writable")
            return


_EXIT_CODES = (
    "exit codes: 0 all trials done, 1 some trial failed (or is running elsewhere), "
    "2 bad input (spec, options, Ray missing), 130 interrupted"
)


class _KeysHelp(argparse.Action):
    """`--keys`: every config key with its type, default and documentation."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from mbxfer.benchmarks import config as config_lib

        agent = namespace.agent or "dreamer"
        try:
            config = config_lib.build({"agent": agent})
        except config_lib.ConfigError as error:
            parser.error(str(error))
        print(f"config keys for --agent {agent} (set with --set key=value):")
        for line in config_lib.describe(config):
            print("  " + plain(line))
        parser.exit()


def plain(text: str) -> str:
    """`text` for the terminal: `code` and ``code`` without their backticks."""
    return re.sub(r"(`+)([^`\n]+?)\1", r"\2", text)


class _PlainHelpFormatter(argparse.HelpFormatter):
    """argparse's help layout, with descriptions, epilogs and help strings `plain`."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain(text))

    def _expand_help(self, action) -> str:
        return plain(super()._expand_help(action))


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help (its subcommands' too) is `plain`, and whose errors are
    one line and a pointer to `--help` (exit code 2), not the whole usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _PlainHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        message = " ".join(plain(message).split())
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    import mbxfer

    parser = _Parser(prog="mbxfer", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"mbxfer {mbxfer.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_sweep, _add_report, _add_eval, _add_listings):
        add(commands)
    return parser


def _add_run(commands) -> None:
    run = commands.add_parser(
        "run",
        help="train (or resume) one trial",
        description="Train one trial; rerunning with the same --out resumes it.",
        epilog="Every config key, typed and documented: mbxfer run --agent NAME --keys",
    )
    run.add_argument("--agent", default=None, help="agent name (default dreamer)")
    run.add_argument("--env", default=None, help="environment name (mbxfer envs)")
    run.add_argument("--task", default=None, help="task name; 'none' for reward-free")
    run.add_argument("--steps", type=_positive, default=None, help="environment steps")
    run.add_argument("--seed", type=_seed, default=None, help="seed")
    run.add_argument("--num-envs", type=_positive, default=None, help="environments per batch")
    run.add_argument("--out", default=None, help="trial folder (default results/runs/<id>)")
    run.add_argument(
        "--protocol",
        default=None,
        help="transfer protocol: scratch (default), pretrain_finetune, task_transfer, "
        "zero_shot, procedural_generalization, task_generalization, custom",
    )
    run.add_argument(
        "--from",
        dest="start_from",
        default=None,
        metavar="CKPT",
        help="start after the phase that checkpoint ends (results/<trial>/phase0.ckpt) "
        "instead of re-running the earlier phases",
    )
    run.add_argument("--config", default=None, help="YAML file of config values")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. agent.model.latent=deterministic",
    )
    run.add_argument("--print-config", action="store_true", help="print the config and exit")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--keys", action=_KeysHelp, help="list every config key and exit")


def _add_sweep(commands) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="run a sweep spec: a grid of trials, locally or on Ray",
        description=(
            "Expand SPEC.yaml (agents, envs, tasks, protocols, seeds, base, grid, resources; "
            "see benchmarks/sweep_spec.py) into trials, check them all, then run every unfinished "
            "one in OUT/<trial_id>. Re-running skips finished trials, resumes interrupted "
            "ones from their checkpoints and retries failed ones."
        ),
        epilog=_EXIT_CODES,
    )
    sweep.add_argument("spec", metavar="SPEC.yaml", help="sweep spec (YAML)")
    sweep.add_argument("--out", default=None, help="results folder (default results/<spec name>)")
    sweep.add_argument(
        "--workers",
        type=_positive,
        default=None,
        help="local executor: trials at once, each pinned to its share of the cores "
        "(default: cores / resources.num_cpus)",
    )
    sweep.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local process pool (default) or one Ray task per trial",
    )
    sweep.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="Ray cluster address (e.g. auto or HOST:6379); default: start Ray on this machine",
    )
    sweep.add_argument(
        "--retries",
        type=_non_negative,
        default=1,
        metavar="K",
        help="run a failed trial up to K more times (Ray: also when its worker or node dies)",
    )
    sweep.add_argument(
        "--dry-run", action="store_true", help="list the trials and their status, run nothing"
    )
    sweep.add_argument("--no-progress", action="store_true", help="no progress line")
    sweep.add_argument(
        "--yes",
        action="store_true",
        help="go on with a sweep of more than 10,000 trials (sweep_spec.MAX_TRIALS; refused "
        "otherwise)",
    )
    sweep.add_argument(
        "--scale",
        default=None,
        help="merge the spec's scales.NAME over it (presets: 'paper' is the published budget)",
    )


def _add_report(commands) -> None:
    report = commands.add_parser(
        "report",
        help="tables (IQM, bootstrap CIs), CSV files and plots from trial folders",
        description=(
            "Read every trial folder (*/config.yaml) below RESULTS_DIR and write report.md, "
            "CSV files and plots/ with rliable statistics."
        ),
        epilog="exit codes: 0 ok, 2 no trial folders found",
    )
    report.add_argument("results", metavar="RESULTS_DIR", help="folder holding trial folders")
    report.add_argument("--out", default=None, help="output folder (default RESULTS_DIR)")
    report.add_argument(
        "--reps", type=_positive, default=5000, help="bootstrap resamples for final scores"
    )
    report.add_argument(
        "--curve-reps",
        type=_positive,
        default=1000,
        help="bootstrap resamples per point of learning curves and performance profiles",
    )
    report.add_argument("--seed", type=_seed, default=0, help="seed of the bootstrap")
    report.add_argument(
        "--formats",
        default="png,pdf",
        help="comma-separated figure formats among png, pdf, svg (default png,pdf); "
        "report.md shows the PNGs",
    )


def _add_listings(commands) -> None:
    """`agents`, `envs`, `rollout` and `demo`: look at what is installed."""
    agents_parser = commands.add_parser(
        "agents", help="list registered agents and their config classes"
    )
    agents_parser.add_argument(
        "--keys", action="store_true", help="also list every config key with type and default"
    )

    commands.add_parser("envs", help="list registered environments and their tasks")

    rollout = commands.add_parser(
        "rollout",
        help="run a uniform random policy",
        description="Play a uniform random policy through the vector environment and print "
        "the episodes' summary (`envs/scoring.py`).",
        epilog="The environment check on real Crafter (the published random agent scores "
        "1.6%): mbxfer rollout --env crafter --task reward --episodes 20 --workers 2 "
        "--out results/demo",
    )
    rollout.add_argument("--env", required=True, help="registered environment name")
    rollout.add_argument("--task", default=None, help="task name (default: reward-free)")
    rollout.add_argument("--episodes", type=_positive, default=10, help="episodes to finish")
    rollout.add_argument("--workers", type=_positive, default=1, help="subprocess environments")
    rollout.add_argument("--seed", type=_seed, default=0, help="seed of envs and policy")
    rollout.add_argument("--out", default=None, help="folder for episodes.jsonl/summary.json")

    demo = commands.add_parser(
        "demo",
        help="the quickstart: a small sweep, then its report (what `make demo` runs)",
        description=(
            "Run the quickstart sweep (`benchmarks/configs/quickstart.yaml`: toy-grid transfer "
            "for MuZero, Dreamer and PPO with 5 seeds, the model-free counterparts, a short "
            "real-Crafter leg) into OUT, then `mbxfer report OUT`; the same as `mbxfer sweep "
            "SPEC --out OUT` followed by `mbxfer report OUT`, so it resumes when run again."
        ),
        epilog="About 40 minutes on 2 cores. A random policy on real Crafter instead: "
        "mbxfer rollout --env crafter --task reward --episodes 20 --workers 2",
    )
    demo.add_argument("--out", default="results/quickstart", help="results folder")
    demo.add_argument(
        "--spec", default=None, metavar="SPEC.yaml", help="another sweep spec (default: quickstart)"
    )


def _add_eval(commands) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="evaluate a trial's checkpoint again (its own task or another one)",
        description=(
            "Evaluate a checkpoint of trial folder TRIAL (default: the latest of its last "
            "phase) as the runner evaluates it: every evaluation set of the checkpoint's phase, "
            "in every mode, on the episodes `episodes.evaluation_seed` gives at the "
            "checkpoint's step count. With the defaults the final checkpoint scores the "
            "trial's own final `eval.jsonl` lines again. Prints a summary and writes it to "
            "TRIAL/evals/NAME.json; the trial's logs and checkpoints are left alone."
        ),
        epilog="e.g. mbxfer eval results/runs/abc123 --task reach_top_left --episodes 64",
    )
    evaluate.add_argument("trial", metavar="TRIAL", help="trial folder (holds config.yaml)")
    evaluate.add_argument(
        "--checkpoint",
        default=None,
        metavar="STEP_OR_PATH",
        help="the trial's env steps at the checkpoint (the N of checkpoints/step-N-...), a "
        "checkpoint name (phase0.ckpt, step-...) or a checkpoint folder",
    )
    evaluate.add_argument(
        "--phase", default=None, metavar="NAME", help="phase name or index: its checkpoints only"
    )
    evaluate.add_argument(
        "--task",
        default=None,
        help="score this task of the trial's environment instead (transfer studies)",
    )
    evaluate.add_argument(
        "--episodes",
        type=_positive,
        default=None,
        metavar="N",
        help="episodes per evaluation set and mode (default: the trial's train.eval_episodes)",
    )
    evaluate.add_argument(
        "--modes",
        default=None,
        metavar="MODES",
        help="comma-separated evaluation modes, sampled and/or greedy (default: the trial's "
        "train.eval_modes)",
    )
    evaluate.add_argument(
        "--seed",
        type=_seed,
        default=None,
        help="seed of the episodes (default: the runner's evaluation seed at the checkpoint, "
        "i.e. the trial's own episodes)",
    )
    evaluate.add_argument(
        "--video",
        action="store_true",
        help="also write a GIF per set and mode: environment 0's first episode (image "
        "environments)",
    )
    evaluate.add_argument(
        "--name",
        default=None,
        help="file name under TRIAL/evals/ (default: the checkpoint and the options given)",
    )


def _bad_input_errors() -> tuple:
    """Errors that name bad input and its fix: printed in one line, exit code 2."""
    from mbxfer.agents import UnknownAgentError
    from mbxfer.benchmarks.checkpoint import IncompatibleCheckpointError
    from mbxfer.benchmarks.config import ConfigError
    from mbxfer.benchmarks.protocols import ProtocolError
    from mbxfer.benchmarks.yaml_input import YAMLInputError
    from mbxfer.envs.base import ConfigurationError

    return (
        ConfigurationError,
        ConfigError,
        ProtocolError,
        UnknownAgentError,
        IncompatibleCheckpointError,
        YAMLInputError,
    )


def main(argv: list[str] | None = None) -> int:
    """Run one `mbxfer` command; its exit code. Bad input (options, configs, specs, folders)
    is one to three lines on stderr and exit code 2; anything else is a bug and keeps its
    traceback."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, --version, --keys (0) and option errors (2).
        return exit.code if isinstance(exit.code, int) else 0
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    handlers = {
        "run": _cmd_run,
        "sweep": _cmd_sweep,
        "report": _cmd_report,
        "eval": _cmd_eval,
        "agents": _cmd_agents,
        "envs": _cmd_envs,
        "rollout": _cmd_rollout,
        "demo": _cmd_demo,
    }
    import yaml

    try:
        return handlers[args.command](args)
    except _bad_input_errors() as error:
        # Registry and config errors already name the problem and the fix.
        print(f"mbxfer: error: {error}", file=sys.stderr)
        return 2
    except yaml.YAMLError as error:  # A file of a trial folder that is not YAML, say.
        from mbxfer.benchmarks.yaml_input import describe_error

        if isinstance(error, yaml.MarkedYAMLError):
            mark = error.problem_mark or error.context_mark
            name = mark.name if mark is not None and not mark.name.startswith("<") else None
            text = describe_error(error, None, name or "a YAML file")
        else:
            text = " ".join(str(error).split())
        print(f"mbxfer: error: cannot read YAML: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
