"""Tests for agents/networks.py: symlog and two-hot transforms, encoders and decoders."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbxfer.agents import networks

VALUES = np.array([-1e4, -37.5, -1.0, -0.3, 0.0, 0.25, 1.0, 2.5, 100.0, 5e5], np.float32)


def test_symexp_inverts_symlog():
    np.testing.assert_allclose(networks.symexp(networks.symlog(VALUES)), VALUES, rtol=1e-5)
    np.testing.assert_allclose(
        networks.symlog(networks.symexp(VALUES / 1e4)), VALUES / 1e4, atol=1e-6
    )
    assert float(networks.symlog(jnp.float32(0.0))) == 0.0
    assert float(networks.symlog(jnp.float32(-3.0))) == pytest.approx(-np.log(4.0))


def test_two_hot_encodes_symlog_value():
    bins = networks.symlog_bins(255)
    encoding = networks.two_hot(jnp.asarray(VALUES), bins)
    assert encoding.shape == (len(VALUES), 255)
    np.testing.assert_allclose(encoding.sum(-1), 1.0, atol=1e-5)
    assert int(jnp.max(jnp.sum(encoding > 0, axis=-1))) <= 2
    np.testing.assert_allclose(encoding @ bins, networks.symlog(VALUES), atol=1e-3)


def test_two_hot_decode_round_trip():
    bins = networks.symlog_bins(255)
    logits = jnp.log(networks.two_hot(jnp.asarray(VALUES), bins) + 1e-12)
    np.testing.assert_allclose(networks.two_hot_decode(logits, bins), VALUES, rtol=2e-3, atol=1e-3)
    # Unbatched and batched calls agree.
    single = networks.two_hot_decode(logits[3], bins)
    assert single.shape == () and float(single) == pytest.approx(float(VALUES[3]), abs=1e-3)


def test_two_hot_loss_is_minimal_at_target():
    bins = networks.symlog_bins(41)
    target = jnp.float32(3.7)
    best = jnp.log(networks.two_hot(target, bins) + 1e-12)
    rng = np.random.default_rng(0)
    best_loss = networks.two_hot_loss(best, target, bins)
    for _ in range(20):
        perturbed = best + jnp.asarray(rng.normal(0, 0.5, 41), jnp.float32)
        assert float(networks.two_hot_loss(perturbed, target, bins)) > float(best_loss)
    gradient = jax.grad(networks.two_hot_loss)(best, target, bins)
    np.testing.assert_allclose(gradient, 0.0, atol=1e-5)
    # Decoding the minimiser gives the target back.
    assert float(networks.two_hot_decode(best, bins)) == pytest.approx(3.7, rel=1e-3)


def test_two_hot_loss_trains_towards_target():
    bins = networks.symlog_bins(255)
    targets = jnp.asarray([-12.0, 0.0, 0.7, 250.0])
    logits = jnp.zeros((4, 255))
    step = jax.jit(
        lambda z: z - 5.0 * jax.grad(lambda y: networks.two_hot_loss(y, targets, bins).sum())(z)
    )
    for _ in range(300):
        logits = step(logits)
    np.testing.assert_allclose(networks.two_hot_decode(logits, bins), targets, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("upsample", networks.UPSAMPLES)
@pytest.mark.parametrize("size", [16, 64])
def test_conv_encoder_decoder_shapes(size, upsample):
    def forward(image):
        features = networks.ConvEncoder(depth=4)(image)
        decoder = networks.ConvDecoder((size, size, 3), depth=4, upsample=upsample)
        return features, decoder(features)

    model = hk.without_apply_rng(hk.transform(forward))
    image = jnp.zeros((2, 3, size, size, 3), jnp.uint8)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), image)
    features, reconstruction = jax.eval_shape(model.apply, params, image)
    layers = {16: 2, 64: 4}[size]
    assert features.shape == (2, 3, 4 * 4 * 4 * 2 ** (layers - 1))
    assert reconstruction.shape == (2, 3, size, size, 3)


def test_depth_to_space_fills_each_patch_from_one_pixel():
    # Pixel (i, j) with channels (dy * 2 + dx) * C + c lands at (2i + dy, 2j + dx, c).
    x = jnp.arange(2 * 3 * 3 * 8, dtype=jnp.float32).reshape(2, 3, 3, 8)
    y = networks.depth_to_space(x, 2)
    assert y.shape == (2, 6, 6, 2)
    for dy in range(2):
        for dx in range(2):
            block = (dy * 2 + dx) * 2
            np.testing.assert_array_equal(y[:, dy::2, dx::2, :], x[..., block : block + 2])
    with pytest.raises(ValueError, match="divisible by 4"):
        networks.depth_to_space(jnp.zeros((1, 2, 2, 6)), 2)


def test_depth_to_space_upsample_equals_transposed_conv_it_rearranges():
    # A kernel-2 stride-2 transposed conv writes each input pixel to its own 2x2 block: the
    # depth_to_space layer of kernel 2 (a 1x1 conv) computes it exactly with the weights
    # rearranged, which pins down its pixel order. Same weight count at kernel 4.
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 3, 5))

    def layer(mode, kernel):
        return hk.without_apply_rng(
            hk.transform(lambda x: networks.upsample(x, 4, kernel, mode, index=0))
        )

    transposed = layer("transpose", 2)
    params = transposed.init(jax.random.PRNGKey(0), x)["deconv_0"]
    # Conv2DTranspose weights are [kh, kw, out, in] applied flipped.
    weights = jnp.transpose(params["w"][::-1, ::-1], (3, 0, 1, 2)).reshape(1, 1, 5, 16)
    shuffled = {"upsample_0": {"w": weights, "b": jnp.tile(params["b"], 4)}}
    np.testing.assert_allclose(
        layer("depth_to_space", 2).apply(shuffled, x),
        transposed.apply({"deconv_0": params}, x),
        atol=1e-5,
    )
    sizes = {}
    for mode in networks.UPSAMPLES:
        shapes = jax.eval_shape(layer(mode, 4).init, jax.random.PRNGKey(0), x)
        (weight,) = [leaf for leaf in jax.tree.leaves(shapes) if leaf.ndim == 4]
        sizes[mode] = weight.size
    assert sizes["transpose"] == sizes["depth_to_space"] == 4 * 4 * 5 * 4


@pytest.mark.parametrize("size", [1, 4, 5])
def test_subpixel_transpose_is_the_transposed_conv(size):
    # Same parameters and initial values (the same key gives the same tree), same outputs
    # for any weights.
    x = jax.random.normal(jax.random.PRNGKey(1), (2, size, size, 6))

    def layer(mode):
        return hk.without_apply_rng(hk.transform(lambda x: networks.upsample(x, 3, 4, mode, 2)))

    params = layer("transpose").init(jax.random.PRNGKey(0), x)
    same = layer("transpose_subpixel").init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, same) == {
        "deconv_2": {"w": True, "b": True}
    }
    noise = jax.random.normal(jax.random.PRNGKey(5), params["deconv_2"]["w"].shape)
    params = {"deconv_2": {"w": noise, "b": jnp.arange(3.0)}}
    expected = layer("transpose").apply(params, x)
    assert expected.shape == (2, 2 * size, 2 * size, 3)
    np.testing.assert_allclose(layer("transpose_subpixel").apply(params, x), expected, atol=1e-4)


def test_upsample_rejects_unknown_modes_and_odd_kernels():
    x = jnp.zeros((1, 2, 2, 3))
    with pytest.raises(ValueError, match="transpose, transpose_subpixel, depth_to_space"):
        hk.transform(lambda x: networks.upsample(x, 4, 4, "bilinear", 0)).init(None, x)
    with pytest.raises(ValueError, match="even kernel"):
        hk.transform(lambda x: networks.upsample(x, 4, 3, "depth_to_space", 0)).init(None, x)
    with pytest.raises(ValueError, match="kernel 4"):
        hk.transform(lambda x: networks.upsample(x, 4, 2, "transpose_subpixel", 0)).init(None, x)


def test_conv_encoder_rejects_unsupported_sizes():
    model = hk.transform(lambda image: networks.ConvEncoder()(image))
    with pytest.raises(ValueError, match="power of two"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 12, 3), jnp.uint8))


def test_observation_encoder_and_decoder_handle_dicts():
    shapes = {"image": (16, 16, 3), "vector": (5,), "log_task_rewards": (3,)}

    def forward(observation):
        embed = networks.ObservationEncoder(depth=4, hidden_sizes=(8,))(observation)
        return embed, networks.ObservationDecoder(shapes, depth=4, hidden_sizes=(8,))(embed)

    model = hk.without_apply_rng(hk.transform(forward))
    observation = {
        "image": jnp.zeros((2, 16, 16, 3), jnp.uint8),
        "vector": jnp.ones((2, 5)),
        "log_task_rewards": jnp.ones((2, 3)),
    }
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), observation)
    embed, predicted = jax.eval_shape(model.apply, params, observation)
    assert embed.shape == (2, 4 * 4 * 8 + 8)
    assert set(predicted) == {"image", "vector"}
    assert predicted["image"].shape == (2, 16, 16, 3) and predicted["vector"].shape == (2, 5)
    with pytest.raises(ValueError, match="unknown"):
        jax.eval_shape(model.apply, params, {**observation, "depth": jnp.zeros((2, 4))})


def test_observation_encoder_ignores_log_keys():
    model = hk.without_apply_rng(
        hk.transform(
            lambda observation: networks.ObservationEncoder(hidden_sizes=(8,))(observation)
        )
    )
    observation = {"vector": jnp.arange(10.0).reshape(2, 5), "log_task_rewards": jnp.ones((2, 3))}
    params = model.init(jax.random.PRNGKey(0), observation)
    embed = model.apply(params, observation)
    np.testing.assert_allclose(model.apply(params, {"vector": observation["vector"]}), embed)
    assert embed.shape == (2, 8)


def test_mlp_zero_output_starts_at_zero():
    model = hk.without_apply_rng(
        hk.transform(lambda x: networks.MLP([8, 8], 3, zero_output=True)(x))
    )
    x = jnp.ones((4, 5))
    params = model.init(jax.random.PRNGKey(0), x)
    np.testing.assert_allclose(model.apply(params, x), 0.0)
