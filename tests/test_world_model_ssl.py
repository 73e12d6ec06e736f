"""The self-supervised world-model terms: contrastive (InfoNCE) and self-predictive (SPR)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mbxfer.agents import replay as replay_lib
from mbxfer.agents import world_model as wm
from mbxfer.agents import world_model_losses
from mbxfer.envs import toy

BATCH, LENGTH = 8, 12
SMALL = wm.WorldModelConfig(
    latent="deterministic", deter=32, hidden=32, mlp_layers=1, reward_bins=31, decoder=False,
    losses=wm.LossConfig(reconstruction=0.0),
)  # fmt: skip


def _config(**losses) -> wm.WorldModelConfig:
    return dataclasses.replace(
        SMALL, losses=wm.LossConfig(reconstruction=0.0, projection_size=16, **losses)
    )


@pytest.fixture(scope="module")
def grid_replay():
    """Random-policy steps of two 5x5 grids (vector observations, collect_items reward)."""
    envs = [toy.GridWorld(size=5, num_items=2, length=20, observation="vector", seed=s) for s in (0, 1)]  # fmt: skip
    spec = envs[0].action_spec()
    replay = replay_lib.Replay(2000, 2, LENGTH, envs[0].observation_spec(), spec, seed=0)
    rng = np.random.default_rng(0)
    timesteps = [env.reset() for env in envs]
    for _ in range(400):
        actions = rng.integers(0, spec.num_values, size=2)
        observations = [t.observation for t in timesteps]
        replay.add(
            {
                "observation": {k: np.stack([o[k] for o in observations]) for k in observations[0]},
                "action": actions,
                "reward": np.asarray([t.reward or 0.0 for t in timesteps], np.float32),
                "discount": np.asarray([1.0 if t.first() else t.discount for t in timesteps]),
                "is_first": np.asarray([t.first() for t in timesteps]),
                "is_last": np.asarray([t.last() for t in timesteps]),
                "is_terminal": np.asarray([t.last() and t.discount == 0 for t in timesteps]),
            }
        )
        timesteps = [env.step(a) for env, a in zip(envs, actions)]
    return envs[0].observation_spec(), spec, replay


def _train(config, grid_replay, steps=120, ema=0.05):
    """Adam on the world-model loss with an EMA target: metrics on a fixed batch before/after."""
    observation_spec, action_spec, replay = grid_replay
    model = wm.make_world_model(config, observation_spec, action_spec)
    params = model.init(jax.random.PRNGKey(0))
    optimizer = optax.adam(1e-3)

    @jax.jit
    def update(params, target, opt_state, batch, rng):
        gradient_fn = jax.value_and_grad(model.loss, has_aux=True)
        state = model.initial_state(BATCH)
        (_, (metrics, _, _)), grads = gradient_fn(params, batch, state, rng, target)
        updates, opt_state = optimizer.update(grads, opt_state)
        params = optax.apply_updates(params, updates)
        return params, optax.incremental_update(params, target, ema), opt_state, metrics

    target, opt_state = params, optimizer.init(params)
    fixed, key = replay.sample(BATCH), jax.random.PRNGKey(1)
    before = jax.device_get(update(params, target, opt_state, fixed, key)[3])
    for step in range(steps):
        params, target, opt_state, _ = update(
            params, target, opt_state, replay.sample(BATCH), jax.random.PRNGKey(step)
        )
    after = jax.device_get(update(params, target, opt_state, fixed, key)[3])
    return model, params, before, after


def test_contrastive_loss_decreases_and_finds_the_future(grid_replay):
    model, params, before, after = _train(_config(contrastive=1.0), grid_replay)
    # InfoNCE over B*T keys starts near log(B*T) and must fall well below it.
    assert before["loss/contrastive"] > 0.8 * np.log(BATCH * LENGTH)
    assert after["loss/contrastive"] < 0.6 * before["loss/contrastive"]
    assert after["world_model/contrastive_accuracy"] > before["world_model/contrastive_accuracy"]
    assert "loss/self_predictive" not in after and "world_model/self_predictive_cosine" not in after
    assert any("contrastive_latent" in name for name in params)
    assert not any("predictive" in name for name in params)  # Only the heads of terms on.


def test_self_predictive_loss_decreases_against_an_ema_target(grid_replay):
    _, _, before, after = _train(_config(self_predictive=1.0), grid_replay)
    assert after["loss/self_predictive"] < 0.5 * before["loss/self_predictive"]
    assert (
        after["world_model/self_predictive_cosine"] > before["world_model/self_predictive_cosine"]
    )
    assert "loss/contrastive" not in after and "world_model/contrastive_accuracy" not in after
    scales = _config(self_predictive=1.0).losses.scales()
    expected = sum(scale * after[f"loss/{name}"] for name, scale in scales.items() if scale)
    np.testing.assert_allclose(after["loss/total"], expected, rtol=1e-5)


def test_switched_off_terms_leave_no_metric_and_no_parameters(grid_replay):
    observation_spec, action_spec, replay = grid_replay
    model = wm.make_world_model(_config(), observation_spec, action_spec)
    params = model.init(jax.random.PRNGKey(0))
    assert not any(head in name for name in params for head in wm.PROJECTION_HEADS)
    _, (metrics, _, _) = model.loss(
        params, replay.sample(2), model.initial_state(2), jax.random.PRNGKey(0)
    )
    assert not any("contrastive" in k or "self_predictive" in k for k in metrics)
    with pytest.raises(ValueError, match="no projection head"):
        model.project(params, "contrastive_latent", jnp.zeros((1, SMALL.feature_size)))
    # The Dreamer default has both terms off.
    assert wm.LossConfig().scales()["contrastive"] == 0.0
    assert wm.LossConfig().scales()["self_predictive"] == 0.0
    assert "free_bits" not in wm.LossConfig().scales()


def test_imagined_futures_mask_episode_starts_and_the_window_end(grid_replay):
    observation_spec, action_spec, replay = grid_replay
    config = _config(contrastive=1.0, self_supervised_horizon=2)
    model = wm.make_world_model(config, observation_spec, action_spec)
    params = model.init(jax.random.PRNGKey(0))
    batch = replay.sample(2)
    batch["is_first"] = np.zeros_like(batch["is_first"])
    batch["is_first"][0, 5] = True
    embeds = model.encode(params, batch["observation"])
    posteriors, priors = model.observe_sequence(
        params, model.initial_state(2), batch["action"], embeds, batch["is_first"], jax.random.PRNGKey(0)
    )  # fmt: skip
    context = wm.LossContext(
        model, config, params, params, batch, embeds, posteriors, priors,
        model.features(posteriors), model.heads(params, model.features(posteriors)),
        jax.random.PRNGKey(0), model.initial_state(2),
    )  # fmt: skip
    features, future_index, valid = world_model_losses.imagined_futures(context)
    assert features.shape == (2, LENGTH, 2, config.feature_size)
    np.testing.assert_array_equal(future_index[3], [4, 5])
    valid = np.asarray(valid)
    assert valid[0, 3].tolist() == [True, False]  # Step 5 starts a new episode.
    assert valid[0, 4].tolist() == [False, False]
    assert valid[0, 5].tolist() == [True, True]
    assert valid[1, LENGTH - 2].tolist() == [True, False]  # Past the window's end.
    assert not valid[:, LENGTH - 1].any()
    # One imagined step with the replayed action equals the model's own imagine.
    start = jax.tree.map(lambda x: x[:, 3], posteriors)
    one_step = model.imagine(params, start, batch["action"][:, 3], jax.random.PRNGKey(0))
    np.testing.assert_allclose(features[:, 3, 0], model.features(one_step), rtol=1e-5, atol=1e-6)


def test_open_loop_reconstruction_makes_imagined_latents_decode_the_future(grid_replay):
    """The term's gradient reaches the dynamics, and with it on, latents imagined 5 steps ahead
    with the replayed actions decode to the observations then seen better than when only
    posteriors are decoded (same budget; error averaged over 8 batches)."""
    observation_spec, action_spec, replay = grid_replay
    errors = {}
    for scale in (0.0, 1.0):
        config = dataclasses.replace(
            SMALL,
            decoder=True,
            losses=wm.LossConfig(open_loop_reconstruction=scale, open_loop_horizon=5),
        )
        model, params, before, after = _train(config, grid_replay, steps=300)
        assert ("loss/open_loop_reconstruction" in after) == bool(scale)
        batches = [replay.sample(BATCH) for _ in range(8)]
        errors[scale] = np.mean(
            [wm.open_loop_error(model.open_loop(params, b, 4, 5, jax.random.PRNGKey(2)), b, 4,
                                "vector") for b in batches], axis=0)  # fmt: skip
        if scale:
            assert after["loss/open_loop_reconstruction"] < before["loss/open_loop_reconstruction"]
    print({k: np.round(v, 4) for k, v in errors.items()})
    assert errors[1.0][-1] < 0.9 * errors[0.0][-1]
    # Alone, the term trains the imagination's GRU (the prior), not only the decoder.
    alone = dataclasses.replace(
        SMALL, decoder=True,
        losses=wm.LossConfig(**{**{n: 0.0 for n in wm.LossConfig().scales()},
                                "open_loop_reconstruction": 1.0}),
    )  # fmt: skip
    model = wm.make_world_model(alone, observation_spec, action_spec)
    params = model.init(jax.random.PRNGKey(0))
    grads = jax.grad(lambda p: model.loss(p, replay.sample(BATCH), model.initial_state(BATCH),
                                          jax.random.PRNGKey(0))[0])(params)  # fmt: skip
    imagine_grads = [v for name, mod in grads.items() if "deterministic/~/gru/" in name
                     for v in jax.tree.leaves(mod)]  # fmt: skip
    assert imagine_grads and any(float(jnp.abs(g).max()) > 0 for g in imagine_grads)
