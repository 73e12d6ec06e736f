"""The world-model video: an open-loop rollout from replayed context, beside the real frames.

Each frame stacks, for 4 replayed sequences, the real image | the imagined one | their
absolute error; `done.json` keeps the mean squared error per imagined step.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np


def write_open_loop(agent, state, replay, out: Path, rng, context: int = 5) -> dict:
    """Write `out/video.gif`: `agent.open_loop` imagines the rest of 4 replayed sequences
    from their first `context` steps; the error per horizon step."""
    import imageio.v2 as imageio

    batch = replay.sample(4)
    length = batch["is_first"].shape[1]
    horizon = length - context
    imagined = jax.device_get(agent.open_loop(state, batch, context, horizon, rng))
    real = batch["observation"]["image"][:, context:].astype(np.float32) / 255.0
    predicted = np.clip(np.asarray(imagined["image"]), 0.0, 1.0)
    error = ((real - predicted) ** 2).mean(axis=(0, 2, 3, 4))
    frames = []
    for t in range(horizon):
        rows = [
            np.concatenate([real[b, t], predicted[b, t], np.abs(real[b, t] - predicted[b, t])], 1)
            for b in range(real.shape[0])
        ]
        frames.append((np.concatenate(rows, 0) * 255).astype(np.uint8))
    imageio.mimsave(out / "video.gif", frames, duration=0.2, loop=0)
    return {"open_loop_mse": error.round(6).tolist(), "context": context, "horizon": horizon}
