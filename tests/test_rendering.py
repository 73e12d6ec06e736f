"""Headless MuJoCo rendering: fast vs faithful, the cropped frustum, several renderers at once.

Renders on OSMesa are expensive: small images, few renders.
"""

import time

import numpy as np
import pytest
from PIL import Image

from mbxfer.envs import mujoco_render, registry

pytest.importorskip("mujoco", reason="pip install 'mbxfer[metaworld]'")


def _gray(image):
    return image.astype(np.float64).mean(axis=-1)


def _similar(fast, faithful, min_correlation):
    """Same shape, not blank, same brightness within 25%, correlated pixel layout."""
    assert fast.shape == faithful.shape and fast.dtype == faithful.dtype == np.uint8
    a, b = _gray(fast), _gray(faithful)
    assert a.std() > 10 and b.std() > 10, "a blank image"
    assert 0.75 < a.mean() / b.mean() < 1.25
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > min_correlation


def _time_steps(env, steps):
    env.step(np.zeros(env.action_spec().shape, np.float32))  # Warm up the GL context.
    start = time.perf_counter()
    for _ in range(steps):
        env.step(np.zeros(env.action_spec().shape, np.float32))
    return (time.perf_counter() - start) / steps


@pytest.mark.parametrize(
    "name, keywords, min_correlation",
    [
        ("metaworld", {"scene": "pick-place", "observation": "pixels"}, 0.9),
        # MuJoCo's shadow pass also brightens RoboDesk's lit wood: same geometry, other tone.
        ("robodesk", {}, 0.5),
    ],
)
def test_fast_and_faithful_look_alike_and_fast_is_faster(name, keywords, min_correlation):
    pytest.importorskip(name)
    fast = registry.make(name, render="fast", seed=1, **keywords)
    faithful = registry.make(name, render="faithful", seed=1, **keywords)
    _similar(
        fast.reset().observation["image"],
        faithful.reset().observation["image"],
        min_correlation,
    )
    assert _time_steps(fast, 4) < 0.8 * _time_steps(faithful, 2)
    fast.close()
    faithful.close()


def test_cropped_frustum_equals_render_then_crop():
    pytest.importorskip("robodesk")
    from mbxfer.envs.robodesk import _CROP_BOX, _RAW_SIZE

    env = registry.make("robodesk", seed=0)
    env.reset()
    desk = env.unwrapped
    physics = desk.raw.physics
    large = mujoco_render.Renderer(physics.model.ptr, _RAW_SIZE, _RAW_SIZE)
    full = large.render(physics.data.ptr, desk._camera)
    large.close()
    expected = np.asarray(
        Image.fromarray(full).crop(_CROP_BOX).resize((64, 64), Image.LANCZOS), np.float64
    )
    cropped = desk.render().astype(np.float64)  # Still renders after the other one closed.
    assert cropped.std() > 10
    assert np.abs(cropped - expected).mean() < 12  # Aliasing differs; the picture does not.


def test_unknown_render_mode():
    with pytest.raises(ValueError, match="render='fastest'"):
        mujoco_render.check_render_mode("fastest")
