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
    scale = max(1, 128 // max(frames[0].shape[:2]))
    images = [
        _paletted(np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1)) for frame in frames
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)


def _paletted(frame: np.ndarray):
    """A GIF frame (PIL "P" image): its own colours when it has at most 256, else a 256-colour
    palette by fast octree quantization. PIL's default for RGB frames (median cut, dithered)
    took ~0.4 s a frame here: most of a short trial's video time."""
    from PIL import Image

    packed = (frame[..., 0].astype(np.uint32) << 16) | (frame[..., 1].astype(np.uint32) << 8)
    packed |= frame[..., 2]
    colours, indices = np.unique(packed, return_inverse=True)
    if len(colours) > 256:
        return Image.fromarray(frame).quantize(
            256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE
        )
    image = Image.fromarray(indices.reshape(frame.shape[:2]).astype(np.uint8), mode="P")
    palette = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], -1)
    image.putpalette(palette.astype(np.uint8).tobytes())
    return image
