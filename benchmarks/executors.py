"""Executors that run a sweep's trials: a local spawn process pool or Ray.

An executor is `submit(job) -> handle`, `wait(handles, timeout) -> finished handles`,
`result(handle) -> dict` (raises `WorkerLost` when the process or node died) and
`close(abort)`; it calls the `run` function it was made with (the sweep's `run_trial`) on
each `Job`. The local executor's workers die with the driver; the Ray executor runs one
`ray.remote` task per trial (`max_retries` resubmits trials whose worker or node died). On
both, a trial's process computes on exactly `resources.num_cpus` cores (rounded up) with
XLA's Eigen matrix products single-threaded (`pin_threads`), so a trial gives the same
results whatever the executor and the worker count.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import multiprocessing
import os
import sys
from typing import Callable, Optional

from mbxfer.benchmarks import config as config_lib
from mbxfer.benchmarks.sweep_spec import Resources, SpecError


class MissingRayError(config_lib.ConfigError):
    """`--executor ray` without Ray installed; bad input, as a bad config is."""


@dataclasses.dataclass(frozen=True)
class Job:
    """What a worker needs to run one trial."""

    config: config_lib.TrialConfig
    folder: str
    threads: Optional[int] = None
    """Pin the trial's process to this many cores (Ray tasks, `pin_threads`); None: the
    process is pinned already (local workers)."""
    start_from: Optional[str] = None
    """Another trial's phase-boundary checkpoint that ends this trial's first phases."""


class WorkerLost(RuntimeError):
    """The process (or node) running a trial died; the trial may not have started."""


EIGEN_FLAG = "--xla_cpu_multi_thread_eigen"


def trial_threads(resources: Resources) -> int:
    """The cores (and so XLA threads) every trial of a sweep computes with: its
    `resources.num_cpus`, rounded up, whatever the executor and the worker count."""
    return max(1, math.ceil(resources.num_cpus))


def _usable_cores() -> list[int]:
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return cores or list(range(os.cpu_count() or 1))


def pin_threads(threads: int, slot: int) -> list[int]:
    """Pin this process to `threads` cores, block `slot` of those it may use (wrapping
    around, so shared when too few), with every thread count to match; call it before JAX
    makes its backend (a worker's first act). Returns the cores.

    XLA's CPU thread pool is as wide as the cores a process may use, and the pool's width
    changes how matrix products split their sums: the same trial ended about 1e-5 apart
    under `mbxfer sweep --workers 1` (two cores) and `--workers 2` (one core each). So a
    trial's process gets exactly `trial_threads` cores on every executor and worker count,
    and XLA's multi-threaded Eigen products are off (`limit_threads`): a trial then gives
    the same bits wherever it runs (tests/test_trial_folder.py checks this). Give trials more
    cores with the sweep's `resources.num_cpus`."""
    usable = _usable_cores()
    cores = sorted({usable[(slot * threads + i) % len(usable)] for i in range(threads)})
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    limit_threads(len(cores))
    return cores


def limit_threads(cores: int) -> None:
    """Thread counts of a process that computes on `cores` cores, and XLA's Eigen matrix
    products single-threaded (`--xla_cpu_multi_thread_eigen=false`: with it on, their sums
    depend on the thread count); set before JAX makes its backend. An
    `--xla_cpu_multi_thread_eigen` already in XLA_FLAGS is the user's and kept."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(max(1, cores))
    flags = os.environ.get("XLA_FLAGS", "")
    if EIGEN_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {EIGEN_FLAG}=false".strip()


def thread_setting() -> dict:
    """What this process computes with, as `done.json` records it (`threads`): the cores it
    may use (the width of XLA's CPU thread pool) and whether XLA's Eigen matrix products are
    multi-threaded (XLA_FLAGS, as the backend read it). Two trials with the same setting
    give the same results; `mbxfer sweep` gives every trial the same (`pin_threads`)."""
    eigen = True
    for flag in os.environ.get("XLA_FLAGS", "").split():
        if flag.startswith(f"{EIGEN_FLAG}="):
            eigen = flag.split("=", 1)[1].lower() not in ("false", "0")
    return {"cores": len(_usable_cores()), "xla_cpu_multi_thread_eigen": eigen}


def core_shares(workers: int) -> list[list[int]]:
    """Split this process's cores into `workers` contiguous shares (shared when too few)."""
    cores = _usable_cores()
    if workers >= len(cores):
        return [[cores[i % len(cores)]] for i in range(workers)]
    bounds = [round(i * len(cores) / workers) for i in range(workers + 1)]
    return [cores[bounds[i] : bounds[i + 1]] for i in range(workers)]


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when the driver dies, so no orphan trains on."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _init_local_worker(slots, threads: int, parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:
        os._exit(1)
    pin_threads(threads, slots.get())


class LocalExecutor:
    """A spawn process pool of `workers` processes, each pinned to its own `threads` cores
    (`pin_threads`); a crashed worker (segfault, OOM kill) restarts the pool."""

    def __init__(self, workers: int, run: Callable[[Job], dict], threads: int = 1):
        self.workers, self.threads = workers, threads
        self.run = run
        self.pool: Optional[concurrent.futures.ProcessPoolExecutor] = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        slots = context.Queue()
        for slot in range(self.workers):
            slots.put(slot)
        self.pool = concurrent.futures.ProcessPoolExecutor(
            self.workers,
            mp_context=context,
            initializer=_init_local_worker,
            initargs=(slots, self.threads, os.getpid()),
        )

    def submit(self, job: Job):
        if self.pool is None:
            self._start()
        try:
            return self.pool.submit(self.run, job)
        except concurrent.futures.process.BrokenProcessPool:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self._start()
            return self.pool.submit(self.run, job)

    def wait(self, handles: list, timeout: float) -> list:
        finished, _ = concurrent.futures.wait(
            handles, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )
        return list(finished)

    def result(self, handle) -> dict:
        try:
            return handle.result()
        except concurrent.futures.process.BrokenProcessPool as error:
            raise WorkerLost(f"a worker process died abruptly ({error})") from None

    def close(self, abort: bool = False) -> None:
        """Wait for the workers to exit; with `abort` (Ctrl-C), end running trials now (they
        resume from their checkpoints next time)."""
        if self.pool is None:
            return
        if abort:
            # The executor has no public way to stop running calls; its processes are known.
            for process in list(getattr(self.pool, "_processes", {}).values()):
                process.terminate()
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """One `ray.remote` task per trial; Ray resubmits tasks whose worker or node died."""

    def __init__(
        self,
        address: Optional[str],
        resources: Resources,
        retries: int,
        run: Callable[[Job], dict],
    ):
        try:
            import ray
        except ImportError:
            raise MissingRayError(
                "--executor ray needs Ray, which is not installed: pip install 'mbxfer[ray]'"
            ) from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self.remote = ray.remote(
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, max_retries=retries
        )(run)
        self.threads = trial_threads(resources)
        self.pending: set = set()

    def submit(self, job: Job):
        handle = self.remote.remote(dataclasses.replace(job, threads=self.threads))
        self.pending.add(handle)
        return handle

    def wait(self, handles: list, timeout: float) -> list:
        finished, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        self.pending.difference_update(finished)
        return finished

    def result(self, handle) -> dict:
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayError as error:
            raise WorkerLost(f"{type(error).__name__}: {error}") from None

    def close(self, abort: bool = False) -> None:
        if abort and not self.started:
            for handle in self.pending:
                self.ray.cancel(handle, force=True)
        if self.started:
            self.ray.shutdown()  # Ends this sweep's tasks with the cluster it started.


def check_executor(executor: str, address: Optional[str]) -> None:
    """Fail before anything runs or is written: unknown executor, stray address, no Ray."""
    import importlib.util

    if executor not in ("local", "ray"):
        raise SpecError(f"unknown executor {executor!r}; valid: local, ray")
    if executor == "local" and address:
        raise SpecError("--address is for --executor ray")
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        raise MissingRayError(
            "--executor ray needs Ray, which is not installed: pip install 'mbxfer[ray]'"
        )


def make_executor(
    executor: str,
    workers: int,
    address: Optional[str],
    resources: Resources,
    retries: int,
    run: Callable[[Job], dict],
):
    """`local` or `ray`, calling `run` (picklable: a module-level function) on each job."""
    check_executor(executor, address)
    if executor == "local":
        return LocalExecutor(workers, run, trial_threads(resources))
    return RayExecutor(address, resources, retries, run)


def default_workers(resources: Resources) -> int:
    cores = len(core_shares(1)[0])
    return max(1, int(cores // max(resources.num_cpus, 1.0)))
