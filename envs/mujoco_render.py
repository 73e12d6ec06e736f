"""Headless MuJoCo rendering for the MuJoCo families (Meta-World, RoboDesk).

Two settings, chosen per environment with `render=`:

* `"fast"` (the default): shadow casting off (`model.light_castshadow[:] = 0`), no multisample
  anti-aliasing (`model.vis.quality.offsamples = 0`) and one persistent renderer at the target
  image size. On a CPU (OSMesa, llvmpipe) this is ~5-50x faster than the library defaults.
* `"faithful"`: the library's own rendering path with the model's visual settings untouched
  (Meta-World: its gymnasium renderer at the target size; RoboDesk: its 120x120 render,
  crop and Lanczos resize).

Images of the two settings have the same shape and nearly the same content (tests/
test_rendering.py bounds their difference); they are not bit-identical, so compare runs only
within one setting. Which setting a run used is part of its environment keywords.

OpenGL backend: MuJoCo picks it from `MUJOCO_GL` when `mujoco` is first imported.
`configure_headless()` sets `MUJOCO_GL=osmesa` (software rendering, works on any Linux with
Debian's `libosmesa6`) when the variable is unset; set `MUJOCO_GL=egl` yourself on a GPU
machine. The families call it before importing MuJoCo, and `make test` exports it too.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

RENDER_MODES = ("fast", "faithful")


class UnknownRenderModeError(ValueError):
    pass


def check_render_mode(render: str) -> str:
    if render not in RENDER_MODES:
        raise UnknownRenderModeError(
            f"render={render!r} is not one of {', '.join(map(repr, RENDER_MODES))}"
        )
    return render


def configure_headless() -> None:
    """Default MuJoCo's OpenGL backend to OSMesa (call before `mujoco` is imported)."""
    os.environ.setdefault("MUJOCO_GL", "osmesa")


def apply_fast_visuals(model) -> None:
    """No shadows, no multisampling: the expensive parts of a software render (a model edit)."""
    model.light_castshadow[:] = 0
    model.vis.quality.offsamples = 0


class Renderer:
    """One persistent offscreen renderer of a `mujoco.MjModel` at `height` x `width`.

    `crop=(left, top, right, bottom)`, as fractions of a square view of the camera, renders only
    that window of it (an off-centre frustum), stretched to the target size: the same picture
    as rendering the square view, cropping and resizing, without the large render.
    """

    def __init__(self, model, height: int, width: int, fast: bool = True):
        self._renderer = None  # So that __del__ works if the constructor fails.
        import mujoco

        if fast:
            apply_fast_visuals(model)  # offsamples is read when the GL context is made.
        self._mujoco = mujoco
        self._renderer = mujoco.Renderer(model, height, width)

    def render(
        self, data, camera, crop: Optional[Sequence[float]] = None, flip: bool = False
    ) -> np.ndarray:
        """`camera` is a camera name, id or `mujoco.MjvCamera`; returns uint8 `[H, W, 3]`."""
        self._renderer.update_scene(data, camera=camera)
        if crop is not None:
            scene = self._renderer.scene
            for index in range(2):  # Both eyes: mjSTEREO_NONE renders their average.
                _crop_frustum(scene.camera[index], crop)
        image = self._renderer.render()
        return np.ascontiguousarray(image[::-1]) if flip else image

    def close(self) -> None:
        """Free the GL objects in OUR context, then the context.

        `mujoco.Renderer.close` (3.3) destroys the GL context first and frees the MuJoCo
        render context afterwards, in whichever GL context is current then: with several
        renderers in one process that deletes another renderer's buffers (its images turn
        black). Garbage collection has the same effect, hence `__del__`.
        """
        renderer, self._renderer = self._renderer, None
        if renderer is None:
            return
        gl_context, mjr_context = renderer._gl_context, renderer._mjr_context
        if gl_context is not None and mjr_context is not None:
            gl_context.make_current()
            mjr_context.free()
        renderer._mjr_context = None
        renderer.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # Interpreter shutdown: the GL library may already be gone.
            pass


def _crop_frustum(camera, crop: Sequence[float]) -> None:
    left, top, right, bottom = crop
    # The square view spans [-h, h] both ways at the near plane (frustum_width 0 = from aspect).
    low, high = camera.frustum_bottom, camera.frustum_top
    half = 0.5 * (high - low)
    x0, x1 = -half + 2 * half * left, -half + 2 * half * right
    camera.frustum_center = 0.5 * (x0 + x1)
    camera.frustum_width = 0.5 * (x1 - x0)  # MuJoCo's frustum_width is the half width.
    camera.frustum_top = high - (high - low) * top
    camera.frustum_bottom = high - (high - low) * bottom
