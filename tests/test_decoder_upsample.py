"""The decoder's upsampling option (`WorldModelConfig.decoder_upsample`): declared, validated,
and both choices build a world model that decodes images of the right shape."""

import typing

import haiku as hk
import jax
import numpy as np
import pytest

from mbxfer.agents import networks
from mbxfer.agents import world_model as wm
from mbxfer.benchmarks import config as config_lib
from mbxfer.envs import registry

TINY = dict(deter=16, hidden=16, stoch_groups=2, stoch_classes=2, reward_bins=7, encoder_depth=4)


def test_field_choices_are_the_networks_upsamples():
    hints = typing.get_type_hints(wm.WorldModelConfig)
    assert typing.get_args(hints["decoder_upsample"]) == networks.UPSAMPLES


@pytest.mark.parametrize("agent", ["dreamer", "muzero"])
def test_bad_upsample_is_a_config_error_naming_the_choices(agent):
    updates = {"agent": {"name": agent, "model": {"decoder_upsample": "pixel_shuffle"}}}
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.build(updates)
    message = str(error.value)
    assert "agent.model.decoder_upsample" in message
    assert all(choice in message for choice in networks.UPSAMPLES)
    with pytest.raises(ValueError, match="depth_to_space"):
        wm.WorldModelConfig(decoder_upsample="pixel_shuffle")
    built = config_lib.build({"agent": {"name": agent, "model": {"decoder": True}}})
    assert built.agent_config.model.decoder_upsample == "transpose_subpixel"


@pytest.mark.parametrize("upsample", networks.UPSAMPLES)
def test_world_model_decodes_images_with_each_upsampling(upsample):
    env = registry.make("grid_image", size=5)
    config = wm.WorldModelConfig(decoder_upsample=upsample, **TINY)
    model = wm.make_world_model(config, env.observation_spec(), env.action_spec())
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    layer = "upsample_0" if upsample == "depth_to_space" else "deconv_0"
    assert params[f"decoder/image_decoder/{layer}"]["w"].ndim == 4
    features = jax.ShapeDtypeStruct((3, config.feature_size), np.float32)
    image = jax.eval_shape(model.decode, params, features)["image"]
    assert image.shape == (3,) + env.observation_spec()["image"].shape


def test_transpose_subpixel_decoder_is_the_transposed_decoder():
    # A checkpoint of one loads into the other: same parameters, same predictions.
    def decoder(upsample):
        return hk.without_apply_rng(
            hk.transform(lambda f: networks.ConvDecoder((16, 16, 3), 4, upsample=upsample)(f))
        )

    features = jax.random.normal(jax.random.PRNGKey(1), (3, 8))
    params = decoder("transpose").init(jax.random.PRNGKey(0), features)
    same = decoder("transpose_subpixel").init(jax.random.PRNGKey(0), features)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, same))
    np.testing.assert_allclose(
        decoder("transpose_subpixel").apply(params, features),
        decoder("transpose").apply(params, features),
        atol=1e-5,
    )
