"""Trial folders as the report reads them: one `TrialRecord` per trial, evaluations normalized.

Every `config.yaml` below the results folder is a trial (so folders copied from several
machines merge; a trial found twice, by its trial id, is counted once). Trials are grouped
by (environment, task, protocol, agent) over seeds; when trials of one group differ in other
config values (a grid over `agent.model.latent`, say), each variant is its own group.

A trial's score is its last evaluation in its last phase, per evaluation set, by its
environment family's score key (`envs/scoring.py`). Crafter trials also get the eval set
`training episodes`: the Crafter score of all the training episodes of the last phase (how
the Crafter paper scores).

A trial folder without `done.json` that holds a failure record (`failed.json`, written with
`error.txt` by `trial_folder.record_failure` when a sweep's or `mbxfer run`'s trial fails) is
left out, and named in one note; unfinished trials without one (running, or killed) are read.
A trial whose `done.json` is not a summary (`trial_folder.load_done`) is left out with a note.
A group whose trials computed with different XLA thread settings (`done.json`'s `threads`, see
`executors.limit_threads`) is named in a note: its scores may differ at about 1e-5 for that.
Finished trials that ran on more than one code version (`done.json`'s `code`, per phase and
for the trial, `provenance.code_version`) get one note listing the versions and their trials:
the trial id hashes the config only, so such a folder can mix results of different code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import yaml

from mbxfer.benchmarks import config as config_lib
from mbxfer.benchmarks import provenance, trial_folder
from mbxfer.envs import registry, scoring

FALLBACK_SCORE = scoring.DEFAULT_KEY
SCRATCH = "scratch"
TRAINING_EPISODES = "training episodes"


@dataclasses.dataclass
class TrialRecord:
    """One trial folder as the report sees it."""

    folder: Path
    trial_id: str
    config: dict
    evals: list[dict]
    """Evaluations with `phase`, `phase_index`, `eval_set` and `total_env_steps` filled in."""
    done: Optional[dict]
    variant: str = ""

    @property
    def agent(self) -> str:
        return str(self.config["agent"].get("name"))  # Loaded with the agent as one mapping.

    @property
    def env(self) -> str:
        return str((self.config.get("env") or {}).get("name"))

    @property
    def task(self) -> str:
        return str((self.config.get("env") or {}).get("task"))

    @property
    def protocol(self) -> str:
        return str((self.config.get("protocol") or {}).get("name") or SCRATCH)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def label(self) -> str:
        """The agent as shown in tables: its name, and its variant when there are several."""
        return f"{self.agent} [{self.variant}]" if self.variant else self.agent

    @property
    def group(self) -> tuple[str, str, str, str]:
        return (self.env, self.task, self.protocol, self.label)

    @property
    def score_key(self) -> str:
        return registry.score_key(self.env)

    def final_evals(self) -> dict[str, dict]:
        """Eval set -> the last evaluation of the last phase; for Crafter also the last
        phase's training episodes (see `training_episodes`)."""
        out: dict[str, dict] = {}
        if self.evals:
            last_phase = max(e["phase_index"] for e in self.evals)
            for record in self.evals:
                if record["phase_index"] == last_phase:
                    out[record["eval_set"]] = record  # Written in order: the last one wins.
        training = self.training_episodes()
        if training is not None:
            out[TRAINING_EPISODES] = training
        return out

    def training_episodes(self) -> Optional[dict]:
        """The score of every training episode of the last phase, as a pseudo evaluation set,
        for families whose published protocol scores those (`envs.scoring.Scorer`).

        The Crafter paper (Hafner 2021) scores an agent by the success rates over all the
        episodes it played during training, not by separate evaluation episodes; reports show
        that score next to the evaluation's, so numbers can be set beside the published ones.
        Finished trials only (the runner writes the summary into `done.json`)."""
        if not registry.scorer(self.env).training_episodes:
            return None
        if not self.done or not self.done.get("phases"):
            return None
        phase = self.done["phases"][-1]
        summary = (phase.get("training_episodes") if isinstance(phase, dict) else None) or {}
        if self.score_key not in summary:
            return None
        total = int(self.done.get("env_steps", phase.get("env_steps", 0)))
        return {
            **summary,
            "phase": phase.get("name", ""),
            "phase_index": phase.get("index", len(self.done["phases"]) - 1),
            "eval_set": TRAINING_EPISODES,
            "env_steps": int(phase.get("env_steps", 0)),
            "total_env_steps": total,
        }


def headline_mode(config: dict) -> str:
    """The evaluation mode a trial is scored by: the first of its `train.eval_modes`
    (`greedy` for trials from before evaluation modes, which evaluated greedily)."""
    modes = (config.get("train") or {}).get("eval_modes") or ["greedy"]
    return str(modes[0])


def _read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    records = []
    if not path.exists():
        return records
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # A line cut by a kill; the runner rewrites it on resume.
            notes.append(f"{path}:{number}: unreadable line skipped")
    return records


def _normalize_eval(record: dict, headline: str = "sampled") -> dict:
    """An `eval.jsonl` line as the report groups it: evaluations in a mode other than the
    trial's headline mode form their own evaluation set, `<set> (<mode>)`."""
    record = dict(record)
    mode = record.get("mode")
    if mode is not None and mode != headline:
        record["eval_set"] = f"{record.get('eval_set', 'eval')} ({mode})"
    record.setdefault("phase", "train")
    record.setdefault("phase_index", 0)
    record.setdefault("eval_set", "eval")
    record.setdefault("total_env_steps", record.get("env_steps", 0))
    return record


def _failure(folder: Path) -> Optional[str]:
    """The last error of a trial that failed and has not finished since, else None."""
    if (folder / "done.json").exists() or not (folder / "failed.json").exists():
        return None
    try:
        error = json.loads((folder / "failed.json").read_text())["error"]
    except (OSError, ValueError, KeyError, TypeError):
        error = "failed"
    return str(error).splitlines()[-1] if str(error).strip() else "failed"


def load_trials(results: Path, notes: Optional[list[str]] = None) -> list[TrialRecord]:
    """Every trial folder below `results`, once each, with variants labelled; failed trials
    (see the module docstring) are skipped with one note naming them."""
    notes = notes if notes is not None else []
    found: dict[str, TrialRecord] = {}
    failed: list[str] = []
    for path in sorted(Path(results).rglob("config.yaml")):
        if "checkpoints" in path.relative_to(results).parts:
            continue
        folder = path.parent
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            notes.append(f"{path}: unreadable ({error}); skipped")
            continue
        if not isinstance(config, dict) or "agent" not in config or "env" not in config:
            notes.append(f"{path}: not a trial config; skipped")
            continue
        error = _failure(folder)
        if error is not None:
            failed.append(f"{folder} ({error[:100]})")
            continue
        headline = headline_mode(config)
        evals = [_normalize_eval(r, headline) for r in _read_jsonl(folder / "eval.jsonl", notes)]
        done, problem = trial_folder.load_done(folder)
        if problem is not None:
            notes.append(
                f"{folder / 'done.json'}: not a finished trial's summary ({problem}); trial "
                "skipped (delete done.json and run the trial again to finish it)"
            )
            continue
        # The id of the folder as written (either spelling); the agent as one mapping after.
        trial_id = config_lib.trial_id_of(config)
        try:
            config = config_lib.with_agent_mapping(config)
        except config_lib.ConfigError as error:
            notes.append(f"{path}: {error}; skipped")
            continue
        record = TrialRecord(folder, trial_id, config, evals, done)
        previous = found.get(record.trial_id)
        if previous is not None:
            keep = max(previous, record, key=lambda r: (r.done is not None, len(r.evals)))
            notes.append(
                f"trial {record.trial_id} found twice ({previous.folder}, {folder}); "
                f"using {keep.folder}"
            )
            record = keep
        found[record.trial_id] = record
    if failed:
        notes.append(
            f"skipped {len(failed)} failed trial folder{'s' if len(failed) > 1 else ''} "
            f"(no done.json; the traceback is in each one's error.txt): {'; '.join(failed)}"
        )
    trials = list(found.values())
    _label_variants(trials)
    notes.extend(_mixed_thread_settings(trials))
    notes.extend(_mixed_code_versions(trials))
    return trials


def _numerics(threads: Any) -> Optional[str]:
    """A trial's recorded thread setting (`executors.thread_setting`), None when not
    recorded: the width of XLA's thread pool and whether Eigen products use it."""
    if not isinstance(threads, dict) or "cores" not in threads:
        return None
    eigen = "multi" if threads.get("xla_cpu_multi_thread_eigen", True) else "single"
    return f"{threads['cores']} cores, {eigen}-threaded Eigen products"


def _mixed_thread_settings(trials: list[TrialRecord]) -> list[str]:
    """One note per group whose finished trials recorded different thread settings."""
    settings: dict[tuple, set] = {}
    for trial in trials:
        setting = _numerics((trial.done or {}).get("threads"))
        if setting is not None:
            settings.setdefault(trial.group, set()).add(setting)
    return [
        f"{' / '.join(group)}: trials computed with different XLA thread settings "
        f"({'; '.join(sorted(found))}), so their results may differ at about 1e-5 for that "
        "alone (mbxfer sweep gives every trial resources.num_cpus cores)"
        for group, found in sorted(settings.items())
        if len(found) > 1
    ]


def _mixed_code_versions(trials: list[TrialRecord]) -> list[str]:
    """One note when the finished trials (their phases included) recorded more than one code
    version; trials finished before `code` was recorded are not counted."""
    by_version: dict[str, list[str]] = {}
    for trial in trials:
        done = trial.done or {}
        records = [done.get("code")] + [p.get("code") for p in done.get("phases", [])]
        for name in {provenance.label(r) for r in records if isinstance(r, dict)}:
            by_version.setdefault(name, []).append(f"{' / '.join(trial.group)} seed {trial.seed}")
    if len(by_version) < 2:
        return []
    parts = [
        f"{name} ({len(labels)} trial{'s' if len(labels) > 1 else ''}"
        + (f": {', '.join(sorted(labels))}" if len(labels) <= 3 else "")
        + ")"
        for name, labels in sorted(by_version.items(), key=lambda item: -len(item[1]))
    ]
    return [
        f"finished trials ran on {len(by_version)} code versions (done.json's code): "
        f"{'; '.join(parts)}. The trial id hashes the config only, so results of one config "
        "may differ between them; re-run the odd ones on one version to compare like with like"
    ]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: json.dumps(value, sort_keys=True)}


def _label_variants(trials: list[TrialRecord]) -> None:
    """Trials of one (env, task, protocol, agent) that differ beyond the seed get a label."""
    by_group: dict[tuple, list[TrialRecord]] = {}
    for trial in trials:
        by_group.setdefault((trial.env, trial.task, trial.protocol, trial.agent), []).append(trial)
    for members in by_group.values():
        flat = [_flatten(t.config) for t in members]
        keys = sorted(set().union(*flat))
        varying = [k for k in keys if k != "seed" and len({f.get(k, "<unset>") for f in flat}) > 1]
        for trial, values in zip(members, flat):
            parts = []
            for key in varying:
                parts.append(f"{key}={json.loads(values[key]) if key in values else '<unset>'}")
            trial.variant = ", ".join(parts)
