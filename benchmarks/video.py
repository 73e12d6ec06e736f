"""The world-model video: an open-loop rollout from replayed context, beside the real frames.

Each frame stacks, for 4 replayed sequences, the real image | the imagined one | their
absolute error; `done.json` keeps the mean squared error per imagined step. `write_gif` is
the one GIF writer (`mbxfer eval --video` uses it too); frame times are in milliseconds (the
imageio call it replaces passed 0.2, which imageio 2.38 reads as 0.2 ms).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np


def write_open_loop(agent, state, replay, out: Path, rng, context: int = 5) -> dict:
    """Write `out/video.gif`: `agent.open_loop` imagines the rest of 4 replayed sequences
    from their first `context` steps; the error per horizon step."""
    batch = replay.sample(4)
    length = batch["is_first"].shape[1]
    horizon = length - context
    # One compiled call (run op by op, a rollout of Crafter's decoder took seconds).
    open_loop = jax.jit(agent.open_loop, static_argnums=(2, 3))
    imagined = jax.device_get(open_loop(state, batch, context, horizon, rng))
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
    write_gif(frames, out / "video.gif", frame_ms=200)
    return {"open_loop_mse": error.round(6).tolist(), "context": context, "horizon": horizon}


def write_gif(frames: list, path: Path, frame_ms: int = 100) -> None:
    """`frames` (uint8 HxWx3) as a looping GIF, `frame_ms` per frame, small images scaled up
    to about 128 pixels. (GIF merges repeated frames into one shown longer.)"""
    from PIL import Image

    scale = max(1, 128 // max(frames[0].shape[:2]))
    images = [
        Image.fromarray(np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1))
        for frame in frames
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)
