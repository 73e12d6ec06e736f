"""How the convs are computed (`WorldModelConfig.conv`, `networks.conv2d`): `matmul` (im2col)
is `hk.Conv2D` / XLA's conv with the same parameters, the same outputs and gradients up to
float rounding, at every stride, kernel and size the networks use (and odd sizes)."""

import typing

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbxfer.agents import networks
from mbxfer.agents import world_model as wm
from mbxfer.benchmarks import config as config_lib


def _pair(make):
    return [
        hk.without_apply_rng(hk.transform(lambda x, i=impl: make(i)(x)))
        for impl in ("matmul", "xla")
    ]


@pytest.mark.parametrize("size", [8, 9, 16])
@pytest.mark.parametrize("kernel, stride", [(4, 2), (2, 2), (4, 1), (3, 1), (2, 1)])
def test_conv2d_matches_haiku_conv(size, kernel, stride):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, size, size, 5))
    reference = hk.without_apply_rng(
        hk.transform(lambda x: hk.Conv2D(7, kernel, stride=stride, name="c")(x))
    )
    matmul, xla = _pair(lambda impl: networks.Conv2D(7, kernel, stride, impl=impl, name="c"))
    params = reference.init(jax.random.PRNGKey(0), x)
    for ours in (matmul, xla):  # same parameter names, shapes and initial values
        assert jax.tree.all(
            jax.tree.map(np.array_equal, params, ours.init(jax.random.PRNGKey(0), x))
        )
    expected = reference.apply(params, x)
    for ours in (matmul, xla):
        np.testing.assert_allclose(ours.apply(params, x), expected, atol=1e-5)

    def gradients(f):
        return jax.grad(lambda p, x: jnp.sum(jnp.sin(f.apply(p, x))), argnums=(0, 1))(params, x)

    expected_grads = gradients(reference)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
        gradients(matmul),
        expected_grads,
    )


def test_conv2d_refuses_what_it_cannot_compute():
    x, w = jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 2, 4))
    with pytest.raises(ValueError, match="even kernel"):
        networks.conv2d(x, w, 2, ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="strides 1 and 2"):
        networks.conv2d(x, jnp.zeros((4, 4, 2, 4)), 3, ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="matmul, xla"):
        networks.conv2d(x, w, 1, ((1, 1), (1, 1)), impl="fft")


@pytest.mark.parametrize("upsample", networks.UPSAMPLES)
def test_encoder_and_decoder_compute_the_same_function_either_way(upsample):
    image = jax.random.randint(jax.random.PRNGKey(1), (3, 16, 16, 3), 0, 256).astype(jnp.uint8)
    features = jax.random.normal(jax.random.PRNGKey(2), (3, 8))

    def model(conv):
        def body(image, features):
            embed = networks.ConvEncoder(depth=4, conv=conv)(image)
            decoded = networks.ConvDecoder((16, 16, 3), 4, upsample=upsample, conv=conv)(features)
            return embed, decoded

        return hk.without_apply_rng(hk.transform(body))

    params = model("xla").init(jax.random.PRNGKey(0), image, features)
    same = model("matmul").init(jax.random.PRNGKey(0), image, features)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, same))
    for ours, theirs in zip(
        model("matmul").apply(params, image, features), model("xla").apply(params, image, features)
    ):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_conv_is_a_checked_config_field_defaulting_to_matmul():
    hints = typing.get_type_hints(wm.WorldModelConfig)
    assert set(typing.get_args(hints["conv"])) == set(networks.CONV_IMPLS)
    assert wm.WorldModelConfig().conv == "matmul"
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.build({"agent": {"name": "dreamer", "model": {"conv": "cudnn"}}})
    assert "agent.model.conv" in str(error.value) and "xla" in str(error.value)
    encoder = hk.transform(lambda image: networks.ConvEncoder(conv="cudnn")(image))
    with pytest.raises(ValueError, match="matmul, xla"):
        encoder.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3), jnp.uint8))
