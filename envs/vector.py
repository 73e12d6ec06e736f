"""N copies of an environment stepped as one batch.

`VectorEnv(factory, num_envs, mode="process" | "inline", seed=0)` builds environment `i` with
`factory(seed=seed + i)`. `reset()` and `step(actions)` return one `dm_env.TimeStep` whose
fields are arrays with a leading `[num_envs]` axis (`step_type` is an int8 array of
`dm_env.StepType` values, observations a dict of stacked arrays).

Auto-reset: after an environment returns a LAST step, the next `step` resets it instead
(its action is ignored) and the batch holds that environment's FIRST step. This is the
dm_env convention, so a LAST step's observation is never lost.

In `process` mode every environment lives in its own subprocess (spawned, so JAX in the
parent is never forked). The observation arrays the observation spec declares travel through
one shared memory block holding `[num_envs, *shape]` per key: worker `i` writes row `i`, the
parent copies each key out once per batch. The pipe carries only the step type, reward,
discount and any observation key the spec does not declare. An observation whose shape
differs from its spec is an error; its dtype is cast to the spec's (`same_kind` casting).

A worker resets its environment as soon as it has sent a LAST step (the next call resets it
anyway), so the reset overlaps the parent's work between calls.

A worker whose environment fails to build raises `EnvironmentBuildError` in the parent: one
line naming the environment and the worker's exception, and how to see the full traceback
(also kept on the error as `worker_traceback`). Workers load the `mbxfer.envs` plugins before
building (`registry.EnvFactory`), so plugin environments work in them as in the parent.

A worker that dies (killed, segfault, out of memory) is detected on the next call, restarted
with a warning, and the episode it was in ends as truncated (LAST, reward 0, discount 1, its
last observation repeated). `close()` (also on garbage collection and at interpreter exit)
stops every worker and unlinks the shared memory. Workers also exit when the parent dies,
because their pipe closes; multiprocessing's resource tracker then unlinks the block.

`get_state()` / `set_state(state)` save and restore every environment of the batch
(`envs.base.Environment.get_state`), including a reset a worker made ahead of time; a state
taken in one mode restores in the other. `StateNotSupported` when the environment has none.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import traceback
import warnings
import weakref
from multiprocessing import shared_memory
from typing import Any, Callable, Mapping, Optional

import dm_env
import numpy as np
from acme import specs as acme_specs
from dm_env import specs

from mbxfer.envs import base

_STEP_TYPE_DTYPE = np.int8
_LAST = int(dm_env.StepType.LAST)  # Enum attribute lookups are slow in the per-step path.
_ALIGNMENT = 64  # Bytes: each key's block starts on its own cache line.


class WorkerCrashedWarning(RuntimeWarning):
    pass


class WorkerError(RuntimeError):
    """An environment raised inside a worker; carries the worker's traceback."""


class EnvironmentBuildError(WorkerError, base.ConfigurationError):
    """Building the environment failed in its worker (a missing package, a bad keyword or an
    id a plugin did not register): the message is the worker's exception in one line."""

    def __init__(self, message: str, worker_traceback: str):
        super().__init__(message)
        self.worker_traceback = worker_traceback


def _one_line(error: BaseException) -> str:
    """`Type: message`, on one line: what the parent shows of a worker's exception."""
    text = " ".join(str(error).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _factory_name(factory) -> str:
    """The registered name of an `EnvFactory`, else the callable's own name."""
    entry = getattr(factory, "entry", None)
    name = getattr(entry, "name", None) or getattr(factory, "__qualname__", None)
    return repr(name) if name else repr(factory)


def stack(timesteps: list[dm_env.TimeStep]) -> dm_env.TimeStep:
    """Stack per-environment timesteps into one batched TimeStep (FIRST: reward 0, discount 1)."""
    step_type = np.array([t.step_type for t in timesteps], _STEP_TYPE_DTYPE)
    reward = np.array([0.0 if t.reward is None else t.reward for t in timesteps], np.float32)
    discount = np.array([1.0 if t.discount is None else t.discount for t in timesteps], np.float32)
    keys = timesteps[0].observation.keys()
    observation = {k: np.stack([t.observation[k] for t in timesteps]) for k in keys}
    return dm_env.TimeStep(step_type, reward, discount, observation)


# -- shared observations ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Field:
    """One observation key in the shared block: `[num_envs, *shape]` of `dtype` at `offset`."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    offset: int


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where every environment's declared observation arrays live in the shared block."""

    num_envs: int
    fields: tuple[_Field, ...]
    size: int  # Bytes, at least 1 (a shared memory block cannot be empty).

    @classmethod
    def from_spec(cls, observation_spec: Mapping[str, Any], num_envs: int) -> _Layout:
        fields, offset = [], 0
        for key, spec in observation_spec.items():
            dtype = np.dtype(spec.dtype) if isinstance(spec, specs.Array) else None
            if dtype is None or dtype.hasobject:
                continue  # Not a fixed-size array: it goes through the pipe.
            fields.append(_Field(key, tuple(spec.shape), dtype.str, offset))
            size = num_envs * int(np.prod(spec.shape, dtype=np.int64)) * dtype.itemsize
            offset += -(-size // _ALIGNMENT) * _ALIGNMENT
        return cls(num_envs, tuple(fields), max(offset, 1))

    def arrays(self, buffer) -> dict[str, np.ndarray]:
        """`[num_envs, *shape]` views of `buffer`, by key."""
        return {
            field.key: np.ndarray((self.num_envs, *field.shape), field.dtype, buffer, field.offset)
            for field in self.fields
        }


class _SharedBlock:
    """The shared memory the workers write observations into; the parent creates and unlinks it."""

    def __init__(self, layout: _Layout):
        self.layout = layout
        self.memory = shared_memory.SharedMemory(create=True, size=layout.size)
        self.arrays = layout.arrays(self.memory.buf)

    @property
    def name(self) -> str:
        return self.memory.name

    def release(self) -> None:
        self.arrays = {}  # Views must go before the mapping can be closed.
        self.memory.unlink()
        self.memory.close()


def _send(connection, message) -> None:
    # Plain pickle: multiprocessing's pickler costs several microseconds more per message, and
    # messages here never carry connections or file descriptors.
    connection.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))


def _receive(connection):
    return pickle.loads(connection.recv_bytes())


def _encode_action(action) -> tuple:
    """`(values, dtype)`: pickling a numpy scalar or array costs ~10 us more (its dtype)."""
    if isinstance(action, (np.generic, np.ndarray)) and not action.dtype.hasobject:
        return action.tolist(), action.dtype.str
    return action, None


def _decode_action(payload):
    values, dtype = payload
    return values if dtype is None else np.asarray(values, dtype)[()]


def _publish(timestep: dm_env.TimeStep, rows: dict[str, np.ndarray]) -> tuple:
    """Write `timestep`'s declared observation arrays into `rows`; return what the pipe carries.

    Returns `(step_type, reward, discount, extras)`: plain Python numbers (reward and discount
    None on FIRST steps) and a dict of the observation keys without a row, or None.
    """
    extras = {}
    for key, value in timestep.observation.items():
        row = rows.get(key)
        if row is None:
            extras[key] = value
            continue
        if np.shape(value) != row.shape:
            raise ValueError(
                f"observation {key!r} has shape {np.shape(value)}, its spec says {row.shape}"
            )
        np.copyto(row, value, casting="same_kind")
    if len(timestep.observation) - len(extras) != len(rows):
        missing = sorted(set(rows) - set(timestep.observation))
        raise ValueError(f"the observation lacks the keys {missing} of its spec")
    reward = None if timestep.reward is None else float(timestep.reward)
    discount = None if timestep.discount is None else float(timestep.discount)
    return int(timestep.step_type), reward, discount, extras or None


# -- workers ------------------------------------------------------------------------------------
def _worker(connection, factory, seed: int, environment_variables: dict) -> None:
    os.environ.update(environment_variables)
    try:
        env = factory(seed=seed)
    except Exception as error:  # Report construction errors instead of dying silently.
        _send(connection, ("build_error", (_one_line(error), traceback.format_exc())))
        connection.close()
        return
    memory, rows = None, {}
    # After a LAST step the parent's next call for this environment is a reset, so the worker
    # starts it at once and keeps its FIRST step here: the reset overlaps the parent's work.
    next_first: Optional[dm_env.TimeStep] = None
    try:
        _send(connection, ("ok", None))  # Inside: the parent may be gone already (Ctrl-C).
        while True:
            command, payload = _receive(connection)
            if command in ("step", "reset"):
                if command == "step":
                    timestep = env.step(_decode_action(payload))
                else:
                    timestep = env.reset() if next_first is None else next_first
                    next_first = None
                _send(connection, ("ok", _publish(timestep, rows)))
                if timestep.last():
                    next_first = env.reset()
                continue
            if command == "seed":
                next_first = None
                result = env.seed(payload)
            elif command == "get_state":
                try:
                    result = (env.get_state(), next_first)
                except base.StateNotSupported as error:
                    _send(connection, ("unsupported", str(error)))
                    continue
            elif command == "set_state":
                env_state, next_first = payload
                result = env.set_state(env_state)
            elif command == "spec":
                result = (env.observation_spec(), env.action_spec(), tuple(env.tasks))
            elif command == "attach":
                name, layout, index = payload
                memory = shared_memory.SharedMemory(name=name)
                arrays = layout.arrays(memory.buf)
                rows = {key: array[index, ...] for key, array in arrays.items()}  # Views.
                result = None
            elif command == "close":
                break
            else:
                raise ValueError(f"unknown command {command!r}")
            _send(connection, ("ok", result))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass  # The parent went away or is shutting down.
    except Exception:
        try:
            _send(connection, ("error", traceback.format_exc()))
        except (BrokenPipeError, OSError):
            pass
    finally:
        rows = None  # Views must go before the mapping can be closed.
        if memory is not None:
            memory.close()
        env.close()
        connection.close()
    # Skip the interpreter's teardown of the environment's imports (1-1.5 s for Crafter's,
    # paid at every close): nothing is left to flush or release.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _describe_exit(code: Optional[int]) -> str:
    """How a worker process ended, from its exit code (None: it has not, yet)."""
    if code is None:
        return "stopped answering (still running; it is killed)"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _Process:
    """One environment in a subprocess, writing its observations into its row of the block."""

    def __init__(self, context, factory, seed, environment_variables):
        self._factory, self._seed = factory, seed
        self._context, self._variables = context, environment_variables
        self.attachment: Optional[tuple[str, _Layout, int]] = None  # Sent again on restart.
        self.launch()

    def launch(self) -> None:
        """Start the process; it builds its environment while the caller goes on."""
        self.connection, child = self._context.Pipe()
        self.process = self._context.Process(
            target=_worker, args=(child, self._factory, self._seed, self._variables), daemon=True
        )
        self.process.start()
        child.close()

    def wait_ready(self) -> None:
        """Wait until the environment is built (and attached to the block, on a restart)."""
        status, payload = _receive(self.connection)
        if status == "build_error":
            summary, worker_traceback = payload
            raise EnvironmentBuildError(
                f"environment {_factory_name(self._factory)} could not be built in its worker "
                f"process: {summary}\nFor the full traceback, build it in this process "
                "(env.workers=false, or VectorEnv(mode='inline')).",
                worker_traceback,
            )
        if self.attachment is not None:
            self.send("attach", self.attachment)
            self.receive()

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def send(self, command: str, payload: Any = None) -> None:
        _send(self.connection, (command, payload))

    def receive(self):
        status, payload = _receive(self.connection)
        if status == "error":
            raise WorkerError(f"the environment raised in its worker:\n{payload}")
        if status == "unsupported":
            raise base.StateNotSupported(payload)
        return payload

    def request_close(self) -> None:
        """Ask the worker to exit (`close` waits for it)."""
        try:
            self.send("close")
        except (BrokenPipeError, OSError):
            pass

    def close(self, timeout: float = 2.0) -> None:
        self.request_close()
        self.wait_closed(timeout)

    def wait_closed(self, timeout: float = 2.0) -> None:
        """Wait for the worker to exit after `request_close`, killing it if it does not."""
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
        # Process mode: the last batch's observation, repeated for a crashed worker's row.
        self._previous: Optional[dict[str, np.ndarray]] = None
        self._closed = False
        if mode == "inline":
            self._envs = [factory(seed=seed + i) for i in range(num_envs)]
            self._firsts: list[Optional[dm_env.TimeStep]] = [None] * num_envs
            first = self._envs[0]
            self._specs = (first.observation_spec(), first.action_spec(), tuple(first.tasks))
        else:
            context = multiprocessing.get_context(start_method)
            # One thread per worker: the workers are the parallelism.
            variables = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            self._workers = []
            try:
                for i in range(num_envs):  # They all build their environments at once.
                    self._workers.append(_Process(context, factory, seed + i, variables))
                for worker in self._workers:
                    worker.wait_ready()
                self._workers[0].send("spec")
                self._specs = self._workers[0].receive()
                self._shared = _SharedBlock(_Layout.from_spec(self._specs[0], num_envs))
                for i, worker in enumerate(self._workers):
                    worker.attachment = (self._shared.name, self._shared.layout, i)
                    worker.send("attach", worker.attachment)
                for worker in self._workers:
                    worker.receive()
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
        self._check_open()
        if self.mode == "inline":
            for i, env in enumerate(self._envs):
                env.seed(seed + i)
            self._firsts = [None] * self.num_envs
        else:
            for i, worker in enumerate(self._workers):
                worker.send("seed", seed + i)
            for worker in self._workers:
                worker.receive()
        self._needs_reset[:] = True

    def get_state(self) -> dict:
        """Every environment's state (`envs.base.Environment.get_state`) and which of them
        reset at the next call; `StateNotSupported` when the environment has none."""
        self._check_open()
        if self.mode == "inline":
            states = [(env.get_state(), first) for env, first in zip(self._envs, self._firsts)]
        else:
            for worker in self._workers:
                worker.send("get_state")
            states, unsupported = [], None
            for worker in self._workers:  # Read every reply: the pipes stay in step.
                try:
                    states.append(worker.receive())
                except base.StateNotSupported as error:
                    unsupported = error
            if unsupported is not None:
                raise unsupported
        return {"envs": states, "needs_reset": self._needs_reset.copy()}

    def set_state(self, state: dict) -> None:
        """Restore what `get_state` gave, from a batch of as many environments of the same
        keywords (in either mode); the next `step` continues every episode where it was."""
        self._check_open()
        states = state["envs"]
        if len(states) != self.num_envs:
            raise ValueError(
                f"a state of {len(states)} environments, this batch has {self.num_envs}"
            )
        if self.mode == "inline":
            for env, (env_state, _) in zip(self._envs, states):
                env.set_state(env_state)
            self._firsts = [first for _, first in states]
        else:
            for worker, env_state in zip(self._workers, states):
                worker.send("set_state", env_state)
            for worker in self._workers:
                worker.receive()
        self._needs_reset = np.array(state["needs_reset"], bool)
        self._previous = None

    def step(self, actions) -> dm_env.TimeStep:
        actions = np.asarray(actions)
        if len(actions) != self.num_envs:
            raise ValueError(f"expected {self.num_envs} actions, got {len(actions)}")
        commands = [
            ("reset", None) if self._needs_reset[i] else ("step", actions[i])
            for i in range(self.num_envs)
        ]
        return self._run(commands)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this VectorEnv is closed")

    def _run(self, commands) -> dm_env.TimeStep:
        self._check_open()
        if self.mode == "inline":
            timesteps = [
                self._reset_inline(i) if command == "reset" else env.step(payload)
                for i, (env, (command, payload)) in enumerate(zip(self._envs, commands))
            ]
            self._needs_reset = np.array([timestep.last() for timestep in timesteps])
            return stack(timesteps)
        return self._run_processes(commands)

    def _reset_inline(self, i: int) -> dm_env.TimeStep:
        # A state restored from process mode may hold a reset its worker had done already.
        first, self._firsts[i] = self._firsts[i], None
        return self._envs[i].reset() if first is None else first

    def _run_processes(self, commands) -> dm_env.TimeStep:
        crashed = set()
        for i, (worker, (command, payload)) in enumerate(zip(self._workers, commands)):
            try:
                worker.send(command, _encode_action(payload) if command == "step" else None)
            except (BrokenPipeError, OSError):
                crashed.add(i)
        results: list[Optional[tuple]] = [None] * self.num_envs
        error = None
        for i, worker in enumerate(self._workers):
            if i in crashed:
                continue
            try:
                results[i] = worker.receive()
            except WorkerError as raised:  # Read the other replies first: pipes stay in step.
                error = error or raised
            except (EOFError, ConnectionResetError, BrokenPipeError, OSError):
                crashed.add(i)
        if error is not None:
            raise error  # That worker has exited; the next call restarts it.
        repeated = []
        for i in sorted(crashed):
            results[i], repeat = self._recover(i, commands[i][0])
            if repeat:
                repeated.append(i)
        # Copies: the block is overwritten by the next batch.
        observation = {key: array.copy() for key, array in self._shared.arrays.items()}
        for i in repeated:
            for key, array in observation.items():
                array[i] = self._previous[key][i]
        for key in results[0][3] or ():
            observation[key] = np.stack([result[3][key] for result in results])
        step_type = np.array([result[0] for result in results], _STEP_TYPE_DTYPE)
        reward = np.array([result[1] or 0.0 for result in results], np.float32)
        discount = np.array([1.0 if r[2] is None else r[2] for r in results], np.float32)
        self._needs_reset = step_type == _LAST
        self._previous = {key: array.copy() for key, array in observation.items()}
        return dm_env.TimeStep(step_type, reward, discount, observation)

    def _recover(self, i: int, command: str) -> tuple[tuple, bool]:
        """Restart worker `i`; its result for this batch, and whether to repeat its last row."""
        worker = self._workers[i]
        # Its pipe may break an instant before the process is gone: wait for the exit code.
        worker.process.join(timeout=1.0)
        warnings.warn(
            f"environment worker {i} (pid {worker.process.pid}) "
            f"{_describe_exit(worker.process.exitcode)}; "
            "restarting it. Its episode ends as truncated.",
            WorkerCrashedWarning,
            stacklevel=5,
        )
        worker.close(timeout=0.5)
        worker.start()
        if command == "reset" or self._previous is None:
            worker.send("reset")
            return worker.receive(), False
        # End the interrupted episode as a truncation; the next step resets the new worker.
        extras = {k: v[i] for k, v in self._previous.items() if k not in self._shared.arrays}
        return (_LAST, 0.0, 1.0, extras or None), True

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
            worker.request_close()  # All exit together; then each is waited for.
        for worker in state.get("_workers", []):
            worker.wait_closed()
        if state.get("_shared") is not None:
            state["_shared"].release()

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
    A mixture (`members`, see `envs.mixture`) of natively batched members is a
    `mixture.MixtureBatch` of one native batch per member.
    """
    native = _native_batch(factory, num_envs, seed, mode)
    if native is not None:
        return native
    if _is_mixture(factory):  # Its copies cycle through the members in step (envs.mixture).
        factory = dataclasses.replace(
            factory, overrides={**factory.overrides, "member_stride": num_envs}
        )
    return VectorEnv(factory, num_envs, mode=mode, seed=seed)


def _native_batch(factory, num_envs: int, seed: int, mode: str = "process"):
    from mbxfer.envs import mixture, registry  # Local: registry must not import vector.

    if not isinstance(factory, registry.EnvFactory):
        return None
    if num_envs < 1:
        raise ValueError(f"num_envs={num_envs} must be >= 1")
    if mixture.is_mixture(factory.keywords):
        # Natively batched members cannot share a batch (one envpool plays one game): each gets
        # a block of slots; other families run `mixture.Mixture` copies in a `VectorEnv`.
        _, recipes = mixture.recipes(factory.entry.name, factory.keywords)
        if not all(_has_native_batch(recipe) for recipe in recipes):
            return None
        return mixture.MixtureBatch(
            factory.entry.name,
            factory.keywords,
            num_envs,
            seed,
            lambda recipe, count, at: make(recipe, count, mode=mode, seed=at),
        )
    # Resolving the entry point imports its module, with the registry's missing-extra errors.
    make_batch = getattr(registry._resolve(factory.entry), "make_batch", None)
    if make_batch is None:
        return None
    return make_batch(num_envs, seed, {**factory.entry.defaults, **factory.overrides})


def _is_mixture(factory) -> bool:
    from mbxfer.envs import mixture, registry

    return isinstance(factory, registry.EnvFactory) and mixture.is_mixture(factory.keywords)


def _has_native_batch(factory) -> bool:
    from mbxfer.envs import registry

    return getattr(registry._resolve(factory.entry), "make_batch", None) is not None


def environment_spec(envs) -> acme_specs.EnvironmentSpec:
    """The spec agents are built from (agent keys only) for a batch of environments: one
    environment's spec, as `envs.base.environment_spec` gives it for a single one."""
    return acme_specs.EnvironmentSpec(
        observations=base.agent_observation(envs.observation_spec()),
        actions=envs.action_spec(),
        rewards=base.Environment.reward_spec(None),
        discounts=base.Environment.discount_spec(None),
    )
