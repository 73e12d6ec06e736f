"""Transfer metrics: a pretrained trial's finetune curve against the matching scratch trial.

A curve is the evaluation score at increasing environment steps of the phase (the first
point is the evaluation before any finetuning step). With `p` the pretrained curve and `s`
the scratch curve:

    jumpstart           p(0) - s(0): the initial performance gain
    auc_ratio           area under p / area under s over the finetune budget (trapezoid rule
                        on the union of their steps, linear between evaluations); None when
                        the scratch area is 0
    final_gain          p(end) - s(end)
    steps_to_threshold  first evaluated step where the score reaches the threshold (None if
                        never), for both curves

The score each environment family is judged by is `envs.registry.score_key(env_name)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mbxfer.benchmarks.trial_folder import TrialFolder


def _area(steps: np.ndarray, values: np.ndarray, grid: np.ndarray) -> float:
    interpolated = np.interp(grid, steps, values)
    return float(np.sum((interpolated[1:] + interpolated[:-1]) / 2 * np.diff(grid)))


def steps_to_threshold(steps: Sequence[float], values: Sequence[float], threshold: float):
    """The first step whose value reaches `threshold`, or None."""
    for step, value in zip(steps, values):
        if value >= threshold:
            return float(step)
    return None


def compare(
    steps: Sequence[float],
    values: Sequence[float],
    scratch_steps: Sequence[float],
    scratch_values: Sequence[float],
    threshold: Optional[float] = None,
) -> dict:
    """The transfer metrics of one pretrained curve against one scratch curve."""
    steps, values = np.asarray(steps, float), np.asarray(values, float)
    scratch_steps, scratch_values = (
        np.asarray(scratch_steps, float),
        np.asarray(scratch_values, float),
    )
    if not len(steps) or not len(scratch_steps):
        raise ValueError("both curves need at least one evaluation")
    end = min(steps[-1], scratch_steps[-1])
    grid = np.union1d(steps, scratch_steps)
    grid = grid[grid <= end]
    out = {
        "jumpstart": float(values[0] - scratch_values[0]),
        "final_gain": float(values[-1] - scratch_values[-1]),
        "auc_ratio": None,
    }
    if len(grid) > 1:
        scratch_area = _area(scratch_steps, scratch_values, grid)
        if scratch_area != 0:
            out["auc_ratio"] = _area(steps, values, grid) / scratch_area
    if threshold is not None:
        out["steps_to_threshold"] = steps_to_threshold(steps, values, threshold)
        out["scratch_steps_to_threshold"] = steps_to_threshold(
            scratch_steps, scratch_values, threshold
        )
    return out


def curve(
    records: list[dict], phase_index: int, key: str, eval_set: str = "eval", mode: str = "sampled"
):
    """`(steps, values)` of one phase, evaluation set and evaluation mode (`sampled` or
    `greedy`) from `eval.jsonl` records; records written before modes existed have no `mode`
    and count as any."""
    points = [
        (r["env_steps"], r[key])
        for r in records
        if r.get("phase_index", 0) == phase_index
        and r.get("eval_set", "eval") == eval_set
        and r.get("mode", mode) == mode
        and r.get(key) is not None
    ]
    return [p[0] for p in points], [p[1] for p in points]


def matched_episodes(
    records: list[dict],
    phase_index: int,
    twin: list[dict],
    twin_phase: int,
    mode: str,
    eval_set: str = "eval",
) -> Optional[bool]:
    """Whether two curves were evaluated on the same episodes: equal `start_digest` at every
    step both evaluated (None when the records carry no digests, as older ones do not).
    `eval_set` is the set of `records` compared with the twin's `eval`."""

    def digests(lines, phase, name):
        return {
            r["env_steps"]: r["start_digest"]
            for r in lines
            if r.get("phase_index", 0) == phase
            and r.get("eval_set", "eval") == name
            and r.get("mode", mode) == mode
            and "start_digest" in r
        }

    mine, theirs = digests(records, phase_index, eval_set), digests(twin, twin_phase, "eval")
    common = set(mine) & set(theirs)
    if not common:
        return None
    return all(mine[step] == theirs[step] for step in common)


def against_twin(
    records: list[dict],
    phase_index: int,
    twin: list[dict],
    score: str,
    mode: str,
    threshold: Optional[float] = None,
    eval_set: str = "eval",
) -> dict[str, dict]:
    """Transfer metrics of `records`' phase `phase_index` (its evaluation set `eval_set`,
    `twin_eval_set`) against the scratch `twin`'s phase 0 (its `eval` set), by score:
    `{score: metrics}`, plus `{"return_mean": metrics}` for families scored by something else
    (success rates are 0 for every agent at CPU budgets, so the return says more). Each has
    `matched_episodes`; `threshold` is in the score's units, so only the score gets steps to
    threshold. Scores with no evaluations on either side are left out."""
    out = {}
    for key in dict.fromkeys([score, "return_mean"]):
        steps, values = curve(records, phase_index, key, eval_set=eval_set, mode=mode)
        twin_steps, twin_values = curve(twin, 0, key, mode=mode)
        if not steps or not twin_steps:
            continue
        metrics = compare(
            steps, values, twin_steps, twin_values, threshold if key == score else None
        )
        metrics["matched_episodes"] = matched_episodes(
            records, phase_index, twin, 0, mode, eval_set
        )
        out[key] = metrics
    return out


def twin_eval_set(config, last) -> str:
    """The evaluation set of `config`'s last phase `last` (a `protocols.Phase`) that plays
    what its scratch twin's `eval` set plays (the target task on the trial's `env.kwargs`):
    `eval` when the phase has it, else the first set of the target task whose keywords (over
    the phase's) the trial's `env.kwargs` already hold. task_generalization finetunes and
    evaluates on `train`/`test` splits: when the trial's environment is the held-out side
    (`anand2022_metaworld.yaml`: env `members: ML10/test`), its `test` set is what the scratch
    twin trained and was scored on. `eval` when no set qualifies (the comparison then finds
    no evaluations)."""
    if not last.eval_sets or "eval" in last.eval_sets:
        return "eval"
    env = dict(config.env.kwargs)
    for name, eval_set in last.eval_sets.items():
        plays = {**env, **last.env_kwargs, **eval_set.kwargs}
        if eval_set.task == config.env.task and plays == env:
            return name
    return "eval"


def against_scratch(
    trial: Path, config, phase, phase_index: int, records: list, score: str
) -> dict:
    """`done.json`'s `transfer`: the metrics of phase `phase_index` (`phase`, the trial's last)
    of the trial in folder `trial` (its evaluation lines `records`) against its finished
    scratch twin next to it."""
    scratch = matching_scratch(Path(trial).parent, config)
    if scratch is None:
        return {"status": "no finished scratch trial with the same settings next to this one"}
    theirs = TrialFolder(scratch).read("eval")
    mode = config.train.eval_modes[0]
    eval_set = twin_eval_set(config, phase)
    by_score = against_twin(
        records, phase_index, theirs, score, mode, config.protocol.threshold, eval_set
    )
    if score not in by_score:
        return {"status": f"no {score} evaluations to compare"}
    out = {
        "phase": phase.name,
        "score": score,
        "mode": mode,
        "eval_set": eval_set,
        "scratch_trial": scratch.name,
        **by_score[score],
    }
    if score != "return_mean" and "return_mean" in by_score:
        out["return"] = by_score["return_mean"]
    return out


def generalization_gap(final_evals: dict, score: str) -> Optional[dict]:
    """Train minus test `score` when the last phase evaluated both splits (None otherwise)."""
    if "train" not in final_evals or "test" not in final_evals:
        return None
    train, test = final_evals["train"].get(score), final_evals["test"].get(score)
    if train is None or test is None:
        return None
    out = {"score": score, "train": train, "test": test, "gap": train - test}
    by_split = {split: member_scores(final_evals[split], score) for split in ("train", "test")}
    shared = [name for name in by_split["train"] if name in by_split["test"]]
    if shared:  # The same members on both sides (Procgen games on train vs unseen levels).
        out["members"] = {
            name: {
                "train": by_split["train"][name],
                "test": by_split["test"][name],
                "gap": by_split["train"][name] - by_split["test"][name],
            }
            for name in shared
        }
    for split, scores in by_split.items():
        if scores and not shared:  # Different members (ML10's train vs held-out scenes).
            out[f"{split}_members"] = scores
    return out


def member_scores(summary: dict, score: str) -> dict:
    """Member name -> its `score`, from a mixture's summary (`envs.scoring`); {} otherwise."""
    members = summary.get("members")
    if not isinstance(members, dict):
        return {}
    return {
        str(name): float(member[score])
        for name, member in members.items()
        if isinstance(member, dict) and isinstance(member.get(score), (int, float))
    }


def matching_scratch(root: Path, config) -> Optional[Path]:
    """A finished trial folder under `root` that is `config`'s scratch control: the same agent,
    environment, seed, budget and agent config (the intrinsic module aside), protocol scratch."""
    import yaml

    wanted = twin_key(config.to_dict())
    for candidate in sorted(Path(root).glob("*/config.yaml")):
        try:
            other = yaml.safe_load(candidate.read_text())
        except (yaml.YAMLError, UnicodeDecodeError, OSError):  # Not a trial's config.
            continue
        if not isinstance(other, dict) or not (candidate.parent / "done.json").exists():
            continue
        if other.get("protocol", {}).get("name", "scratch") != "scratch":
            continue
        try:
            if twin_key(other) == wanted:
                return candidate.parent
        except ValueError:  # A config.yaml this version cannot read is nobody's twin.
            continue
    return None


def twin_key(plain: dict) -> str:
    """What a trial (its config as a plain dict, either spelling of the agent) and its
    scratch twin share: everything but the protocol and the agent's exploration settings."""
    from mbxfer.benchmarks import config as config_lib

    out = config_lib.with_agent_mapping(plain)
    out.pop("protocol", None)
    out["agent"] = {k: v for k, v in out["agent"].items() if k != "exploration"}
    return json.dumps(out, sort_keys=True, default=str)
