"""The decoder's upsampling option (`WorldModelConfig.decoder_upsample`): declared, validated,
and both choices build a world model that decodes images of the right shape."""

import typing

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
    assert "transpose" in message and "depth_to_space" in message
    with pytest.raises(ValueError, match="depth_to_space"):
        wm.WorldModelConfig(decoder_upsample="pixel_shuffle")
    built = config_lib.build({"agent": {"name": agent, "model": {"decoder": True}}})
    assert built.agent_config.model.decoder_upsample == "transpose"


@pytest.mark.parametrize("upsample", networks.UPSAMPLES)
def test_world_model_decodes_images_with_either_upsampling(upsample):
    env = registry.make("grid_image", size=5)
    config = wm.WorldModelConfig(decoder_upsample=upsample, **TINY)
    model = wm.make_world_model(config, env.observation_spec(), env.action_spec())
    params = model.init(jax.random.PRNGKey(0))
    layer = "deconv_0" if upsample == "transpose" else "upsample_0"
    decoder = params[f"decoder/image_decoder/{layer}"]
    assert decoder["w"].ndim == 4
    image = model.decode(params, np.zeros((3, config.feature_size), np.float32))["image"]
    assert image.shape == (3,) + env.observation_spec()["image"].shape
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
