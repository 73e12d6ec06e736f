"""N copies of an environment stepped as one batch.

`VectorEnv(factory, num_envs, mode="process" | "inline", seed=0)` builds environment `i` with
`factory(seed=seed + i)`. `reset()` and `step(actions)` return one `dm_env.TimeStep` whose
fields are arrays with a leading `[num_envs]` axis (`step_type` is an int8 array of
`dm_env.StepType` values, observations a dict of stacked arrays).

Auto-reset: after an environment returns a LAST step, the next `step` resets it instead
(its action is ignored) and the batch holds that environment's FIRST step. This is the
dm_env convention, so a LAST step's observation is never lost.

In `process` mode every environment lives in its own subprocess (spawned, so JAX in the
parent is never forked). A worker that dies (killed, segfault, out of memory) is detected on
the next call, restarted with a warning, and the episode it was in ends as truncated (LAST,
reward 0, discount 1, its last observation repeated). `close()` (also on garbage collection
and at interpreter exit) stops every worker; workers also exit when the parent dies, because
their pipe closes.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import traceback
import warnings
import weakref
from typing import Any, Callable, Optional

import dm_env
import numpy as np

_STEP_TYPE_DTYPE = np.int8


class WorkerCrashedWarning(RuntimeWarning):
    pass


class WorkerError(RuntimeError):
    """An environment raised inside a worker; carries the worker's traceback."""


def stack(timesteps: list[dm_env.TimeStep]) -> dm_env.TimeStep:
    """Stack per-environment timesteps into one batched TimeStep (FIRST: reward 0, discount 1)."""
    step_type = np.array([t.step_type for t in timesteps], _STEP_TYPE_DTYPE)
    reward = np.array([0.0 if t.reward is None else t.reward for t in timesteps], np.float32)
    discount = np.array([1.0 if t.discount is None else t.discount for t in timesteps], np.float32)
    keys = timesteps[0].observation.keys()
    observation = {k: np.stack([t.observation[k] for t in timesteps]) for k in keys}
    return dm_env.TimeStep(step_type, reward, discount, observation)


def _worker(connection, factory, seed: int, environment_variables: dict) -> None:
    os.environ.update(environment_variables)
    try:
        env = factory(seed=seed)
    except Exception:  # Report construction errors instead of dying silently.
        connection.send(("error", traceback.format_exc()))
        connection.close()
        return
    connection.send(("ok", None))
    try:
        while True:
            command, payload = connection.recv()
            if command == "step":
                result = env.step(payload)
            elif command == "reset":
                result = env.reset()
            elif command == "seed":
                result = env.seed(payload)
            elif command == "spec":
                result = (env.observation_spec(), env.action_spec(), tuple(env.tasks))
            elif command == "close":
                break
            else:
                raise ValueError(f"unknown command {command!r}")
            connection.send(("ok", result))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass  # The parent went away or is shutting down.
    except Exception:
        try:
            connection.send(("error", traceback.format_exc()))
        except (BrokenPipeError, OSError):
            pass
    finally:
        env.close()
        connection.close()


class _Process:
    """One environment in a subprocess."""

    def __init__(self, context, factory, seed, environment_variables):
        self._factory, self._seed = factory, seed
        self._context, self._variables = context, environment_variables
        self.start()

    def start(self) -> None:
        self.connection, child = self._context.Pipe()
        self.process = self._context.Process(
            target=_worker, args=(child, self._factory, self._seed, self._variables), daemon=True
        )
        self.process.start()
        child.close()
        status, payload = self.connection.recv()
        if status == "error":
            raise WorkerError(f"building the environment failed in its worker:\n{payload}")

    def send(self, command: str, payload: Any = None) -> None:
        self.connection.send((command, payload))

    def receive(self):
        status, payload = self.connection.recv()
        if status == "error":
            raise WorkerError(f"the environment raised in its worker:\n{payload}")
        return payload

    def close(self, timeout: float = 2.0) -> None:
        try:
            self.connection.send(("close", None))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


class VectorEnv:
    """A batch of environments; see the module docstring for the semantics."""

    def __init__(
        self,
        factory: Callable[..., dm_env.Environment],
        num_envs: int,
        mode: str = "process",
        seed: int = 0,
        start_method: str = "spawn",
    ):
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs} must be >= 1")
        if mode not in ("process", "inline"):
            raise ValueError(f"mode={mode!r} must be 'process' or 'inline'")
        self.num_envs, self.mode = num_envs, mode
        self._needs_reset = np.ones(num_envs, bool)
        self._last_observations: list[Optional[dict]] = [None] * num_envs
        self._closed = False
        if mode == "inline":
            self._envs = [factory(seed=seed + i) for i in range(num_envs)]
            first = self._envs[0]
            self._specs = (first.observation_spec(), first.action_spec(), tuple(first.tasks))
        else:
            context = multiprocessing.get_context(start_method)
            # One thread per worker: the workers are the parallelism.
            variables = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            self._workers = []
            try:
                for i in range(num_envs):
                    self._workers.append(_Process(context, factory, seed + i, variables))
                self._workers[0].send("spec")
                self._specs = self._workers[0].receive()
            except BaseException:
                VectorEnv._shutdown(self.__dict__)
                raise
        self._finalizer = weakref.finalize(self, VectorEnv._shutdown, self.__dict__)

    # -- specs ------------------------------------------------------------------------------
    def observation_spec(self):
        return self._specs[0]

    def action_spec(self):
        return self._specs[1]

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._specs[2]

    # -- stepping ---------------------------------------------------------------------------
    def reset(self) -> dm_env.TimeStep:
        return self._run([("reset", None)] * self.num_envs)

    def seed(self, seed: int) -> None:
        """Reseed environment `i` with `seed + i`; the next `step` or `reset` starts anew."""
        if self._closed:
            raise RuntimeError("this VectorEnv is closed")
        if self.mode == "inline":
            for i, env in enumerate(self._envs):
                env.seed(seed + i)
        else:
            for i, worker in enumerate(self._workers):
                worker.send("seed", seed + i)
            for worker in self._workers:
                worker.receive()
        self._needs_reset[:] = True

    def step(self, actions) -> dm_env.TimeStep:
        actions = np.asarray(actions)
        if len(actions) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} actions, got {len(actions)}")
        commands = [
            ("reset", None) if self._needs_reset[i] else ("step", actions[i])
            for i in range(self.num_envs)
        ]
        return self._run(commands)

    def _run(self, commands) -> dm_env.TimeStep:
        if self._closed:
            raise RuntimeError("this VectorEnv is closed")
        if self.mode == "inline":
            timesteps = [
                env.reset() if command == "reset" else env.step(payload)
                for env, (command, payload) in zip(self._envs, commands)
            ]
        else:
            timesteps = self._run_processes(commands)
        for i, timestep in enumerate(timesteps):
            self._needs_reset[i] = timestep.last()
            self._last_observations[i] = timestep.observation
        return stack(timesteps)

    def _run_processes(self, commands) -> list[dm_env.TimeStep]:
        crashed = set()
        for i, (worker, (command, payload)) in enumerate(zip(self._workers, commands)):
            try:
                worker.send(command, payload)
            except (BrokenPipeError, OSError):
                crashed.add(i)
        timesteps: list[Optional[dm_env.TimeStep]] = [None] * self.num_envs
        for i, worker in enumerate(self._workers):
            if i in crashed:
                continue
            try:
                timesteps[i] = worker.receive()
            except (EOFError, ConnectionResetError, BrokenPipeError, OSError):
                crashed.add(i)
        for i in sorted(crashed):
            timesteps[i] = self._recover(i, commands[i][0])
        return timesteps

    def _recover(self, i: int, command: str) -> dm_env.TimeStep:
        worker = self._workers[i]
        code = worker.process.exitcode
        warnings.warn(
            f"environment worker {i} (pid {worker.process.pid}) died with exit code {code}; "
            "restarting it. Its episode ends as truncated.",
            WorkerCrashedWarning,
            stacklevel=4,
        )
        worker.close(timeout=0.5)
        worker.start()
        if command == "reset" or self._last_observations[i] is None:
            worker.send("reset")
            return worker.receive()
        # End the interrupted episode as a truncation; the next step resets the new worker.
        return dm_env.truncation(np.float32(0.0), self._last_observations[i])

    # -- shutdown ---------------------------------------------------------------------------
    def worker_pids(self) -> list[int]:
        if self.mode != "process":
            return []
        return [w.process.pid for w in self._workers]

    def close(self) -> None:
        self._finalizer()

    @staticmethod
    def _shutdown(state: dict) -> None:
        if state.get("_closed"):
            return
        state["_closed"] = True
        for env in state.get("_envs", []):
            env.close()
        for worker in state.get("_workers", []):
            worker.close()

    def __enter__(self) -> "VectorEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make(
    factory: Callable[..., dm_env.Environment], num_envs: int, mode: str = "process", seed: int = 0
):
    """The batch of `num_envs` environments the rest of mbxfer uses (see `VectorEnv`).

    The one place that decides how a registered environment is batched. A family that is
    batched natively (Procgen on envpool) gives its own batch with the interface and auto-reset
    semantics of `VectorEnv`: its entry point has `make_batch(num_envs, seed, keywords)`,
    which returns None when the keywords need per-copy wrappers (then, and for every other
    environment, the copies run in a `VectorEnv`, in subprocesses or inline by `mode`).
    """
    native = _native_batch(factory, num_envs, seed)
    if native is not None:
        return native
    return VectorEnv(factory, num_envs, mode=mode, seed=seed)


def _native_batch(factory, num_envs: int, seed: int):
    from envs import registry  # Local: registry must not import the vector machinery.

    if not isinstance(factory, registry.EnvFactory):
        return None
    if num_envs < 1:
        raise ValueError(f"num_envs={num_envs} must be >= 1")
    # Resolving the entry point imports its module, with the registry's missing-extra errors.
    make_batch = getattr(registry._resolve(factory.entry), "make_batch", None)
    if make_batch is None:
        return None
    return make_batch(num_envs, seed, {**factory.entry.defaults, **factory.overrides})
