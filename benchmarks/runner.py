"""One trial, phase after phase; its final summary.

    run(config, out)    train (or resume) the trial in folder `out`; its `done.json`

The protocol (benchmarks/protocols.py) gives the trial's phases; each runs as a
`benchmarks.phase.Phase`, carrying the previous one's state and replay into the next. The
trial ends with `done.json`: the phases' summaries, the generalization gap, transfer against
the matching scratch trial (benchmarks/transfer.py), the world-model video, the XLA
thread setting the trial computed with (`executors.thread_setting`) and the code it ran
(`provenance.code_version`). Its folder is
`benchmarks.trial_folder.TrialFolder`; a run resumes from the folder's latest checkpoint, or
starts after a phase of another trial (`start_from`, `mbxfer run --from`).

Resume is exact: a killed trial resumed from a checkpoint ends with the same parameters and
metrics as an uninterrupted run (tests/test_runner.py kills one for real). The price is that
every checkpoint also restarts the training environments from seeds derived from the step
count, in both runs, because simulators such as Crafter or MuJoCo cannot be saved mid-episode.
Episodes cut this way are not reported as episodes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, ContextManager, Optional

import jax

from mbxfer.benchmarks import config as config_lib
from mbxfer.benchmarks import executors, loggers, protocols, provenance, timing, transfer
from mbxfer.benchmarks.phase import EvalEnvs, Phase, Watch
from mbxfer.benchmarks.trial_folder import IncompatibleTrialError, Resume, TrialFolder
from mbxfer.envs import registry

__all__ = ["IncompatibleTrialError", "run"]


def enable_compilation_cache() -> None:
    """Share compiled XLA programs between trials through an on-disk cache.

    A sweep compiles the same agent for every seed (and every phase); with the cache only the
    first compile is paid. The directory is `JAX_COMPILATION_CACHE_DIR` when set, else
    `~/.cache/mbxfer/jax`. A cache left by another jax version is ignored by jax itself.
    """
    if jax.config.jax_compilation_cache_dir:
        return
    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "mbxfer", "jax"
    )
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(
    config: config_lib.TrialConfig,
    out: Path,
    progress: bool = True,
    stop_after: Optional[int] = None,
    on_step: Optional[Callable[[int], None]] = None,
    start_from: Optional[Path] = None,
    timer: Callable[[str], ContextManager] = timing.NO_TIMER,
) -> dict:
    """Train (or resume) one trial in `out`, phase after phase; returns the final summary.

    `stop_after` ends the call early after that many environment steps in all (without
    writing `done.json`), as a kill would; `on_step` is called with the total step count each
    iteration. `start_from` is a phase-boundary checkpoint (`<trial>/phase0.ckpt`) of a trial
    whose earlier phases are this trial's: the trial starts at the next phase from it instead
    of re-running them. `timer` times the trial's parts (`benchmarks.timing`; benchmarks).
    """
    phases = protocols.phases(config)  # Protocol errors before anything is written.
    enable_compilation_cache()
    folder = TrialFolder.open(Path(out), config)
    done = folder.done()
    if done is not None:
        return done
    resume = folder.resume_point(start_from, config, phases)
    with contextlib.ExitStack() as stack:
        folder.open_logs(resume)
        stack.callback(folder.close)
        # Opened on the logs as cut back to `resume`: the mirrors replay them from the start.
        mirrors = stack.enter_context(loggers.open_mirrors(config, folder.out))
        watch = Watch(progress, stop_after, on_step, mirrors, timer)
        return _Trial(config, phases, folder, watch, stack).run(resume)


class _Trial:
    """The phases of one trial and what they share: the folder and the phase summaries."""

    def __init__(self, config, phases, folder: TrialFolder, watch: Watch, stack):
        self.config, self.phases, self.folder, self.watch = config, phases, folder, watch
        self.stack = stack
        self.eval_envs = EvalEnvs(config)
        stack.callback(self.eval_envs.close)
        self.agent_config = protocols.with_module(config.agent_config, phases, config.protocol)
        self.history: dict = {"phases": []}

    def run(self, resume: Optional[Resume]) -> dict:
        start = 0
        if resume is not None:
            self.history = {"phases": resume.state.history.get("phases", [])}
            source = str(resume.folder) if resume.other_trial else resume.state.history.get("from")
            if source is not None:
                self.history["from"] = source
            start = resume.state.next_phase
        if start == len(self.phases):  # Killed after the last phase's end, before done.json.
            last = Phase(self.config, self.phases, start - 1, self.folder, self.agent_config,
                         self.history, self.watch, self.stack, self.eval_envs)  # fmt: skip
            return self._finish(*last.ended(resume))
        carried = None
        for index in range(start, len(self.phases)):
            phase = Phase(self.config, self.phases, index, self.folder, self.agent_config,
                          self.history, self.watch, self.stack, self.eval_envs)  # fmt: skip
            carried = phase.run(carried, resume if index == start else None)
            if carried is None:
                return {"stopped_at": phase.stopped_at}
        return self._finish(*carried)

    def _finish(self, state, replay, phase: Phase) -> dict:
        config = self.config
        summaries = self.history["phases"]
        summary = {
            "env_steps": sum(p["env_steps"] for p in summaries),
            "updates": sum(p["updates"] for p in summaries),
            "episodes": sum(p["episodes"] for p in summaries),
            "trial_id": config.trial_id(),
            "protocol": config.protocol.name,
            "phases": summaries,
            "threads": executors.thread_setting(),  # See executors.limit_threads.
            "code": provenance.code_version(),  # The trial id hashes the config only.
        }
        if "from" in self.history:
            summary["from"] = self.history["from"]
        last = summaries[-1]["final_eval"] if summaries else {}
        if last:
            summary["final_eval"] = last.get("eval", next(iter(last.values())))
        score_key = registry.score_key(config.env.name)
        gap = transfer.generalization_gap(last, score_key)
        if gap is not None:
            summary["generalization_gap"] = gap
        if config.protocol.name != "scratch":
            last_phase = len(self.phases) - 1
            summary["transfer"] = transfer.against_scratch(
                self.folder.out, config, self.phases[last_phase], last_phase,
                self.folder.read("eval"), score_key,
            )  # fmt: skip
        with self.watch.timer("video"):
            video = phase.video(state, replay)
        if video is not None:
            summary["video"] = video
            self.watch.mirrors.video(
                phase.phase.name, summary["env_steps"], self.folder.out / video["path"]
            )
        self.folder.write_done(summary)
        return summary
