"""Reference side of `benchmarks/perf/learner.py`: the official DreamerV3 (PyPI `dreamerv3==1.5.0`).

Runs ONLY inside its own venv (2023-era jax; `learner.py --help` says how it is built) and is
started by `learner.py`, never imported by the package or the tests. It drives the installed
package as `dreamerv3/train.py` does (config blocks from its `configs.yaml`, the Crafter env
wrapped by its `wrap_env`, `Agent(obs_space, act_space, step, config)`), minus the env loop,
replay and logger (the TensorBoard one imports tensorflow): only `agent.train` is timed.

    python dreamerv3_reference.py --blocks crafter,debug --overrides '{"batch_size": 16, ...}'

Protocol: one JSON object per line on stdout (the package's own prints go to stderr).
  -> {"event": "ready", "compile_s": ..., "params": ..., ...} after two warm-up (compiling) updates;
  then for each stdin line `run N`: N more updates on the same batch, blocked on the result,
  -> {"event": "timed", "steps": N, "seconds": wall, "cpu_seconds": process CPU time}; stdin
  `quit` (or EOF) ends the process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _protocol_stream():
    """A private handle on stdout for the protocol; fd 1 then points at stderr for the rest."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def _random_batch(spaces, batch_size: int, length: int, seed: int):
    """A batch `[B, T, ...]` for every space (the keys of `JAXAgent._dummy_batch`), random."""
    import numpy as np

    rng = np.random.default_rng(seed)
    data = {}
    for key, space in spaces.items():
        shape = (batch_size, length) + tuple(space.shape)
        if key == "image":
            data[key] = rng.integers(0, 256, shape, dtype=np.uint8)
        elif key == "action":
            index = rng.integers(0, space.shape[-1], (batch_size, length))
            data[key] = np.eye(space.shape[-1], dtype=np.float32)[index]
        elif key == "reward":
            data[key] = (rng.random(shape) < 0.05).astype(np.float32)
        elif key == "is_first":
            data[key] = np.zeros(shape, bool)
            data[key][:, 0] = True
        elif key in ("is_last", "is_terminal"):
            data[key] = rng.random(shape) < 0.002
        else:
            data[key] = np.zeros(shape, space.dtype)
    return data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", default="crafter,debug", help="configs.yaml blocks, in order")
    parser.add_argument("--overrides", default="{}", help="JSON {dotted.key: value} applied last")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    protocol = _protocol_stream()

    import dreamerv3
    import embodied
    import jax
    from dreamerv3 import jaxutils
    from embodied.envs import crafter

    config = embodied.Config(dreamerv3.configs["defaults"])
    for block in filter(None, args.blocks.split(",")):
        config = config.update(dreamerv3.configs[block])
    config = config.update(json.loads(args.overrides))

    env = dreamerv3.wrap_env(crafter.Crafter("reward", size=(64, 64), seed=args.seed), config)
    obs_space, act_space = env.obs_space, env.act_space
    batch = _random_batch(
        {**obs_space, **act_space}, config.batch_size, config.batch_length, args.seed
    )

    start = time.perf_counter()
    agent = dreamerv3.Agent(obs_space, act_space, embodied.Counter(), config)
    init_s = time.perf_counter() - start
    device = agent.train_devices[0]
    batch = jax.device_put(batch, device)  # Explicit: the agent sets jax_transfer_guard=disallow.

    def block():
        for leaf in jax.tree_util.tree_leaves(agent.varibs):
            leaf.block_until_ready()

    # Two warm-up updates: the first traces and compiles `train` from the initial state, the
    # second retraces once more because the carried state's types differ from the initial one.
    start = time.perf_counter()
    _, state, _ = agent.train(batch)
    block()
    first_s = time.perf_counter() - start
    _, state, _ = agent.train(batch, state)
    block()
    compile_s = time.perf_counter() - start
    counts = {
        name.split("/")[-1]: int(count) for name, count in jaxutils.Optimizer.PARAM_COUNTS.items()
    }
    protocol.write(
        json.dumps(
            {
                "event": "ready",
                "init_s": init_s,
                "compile_s": compile_s,
                "first_update_s": first_s,
                "params": sum(counts.values()),
                "params_by_optimizer": counts,
                "jax": jax.__version__,
                "python": platform.python_version(),
                "precision": str(config.jax.precision),
                "batch": [config.batch_size, config.batch_length],
            }
        )
        + "\n"
    )
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] == "quit":
            break
        if command[0] != "run" or len(command) != 2:
            raise ValueError(f"unknown command {line!r}: expected `run N` or `quit`")
        steps = int(command[1])
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            _, state, _ = agent.train(batch, state)
        block()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        message = {"event": "timed", "steps": steps, "seconds": seconds, "cpu_seconds": cpu_seconds}
        protocol.write(json.dumps(message) + "\n")


if __name__ == "__main__":
    main()
