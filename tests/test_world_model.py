"""Tests for agents/world_model.py on real toy-environment data collected through Replay."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mbxfer.agents import replay as replay_lib
from mbxfer.agents import world_model as wm
from mbxfer.envs import toy

BATCH, LENGTH = 8, 16
SMALL = wm.WorldModelConfig(
    deter=64, stoch_groups=8, stoch_classes=8, hidden=64, mlp_layers=1, encoder_depth=8,
    reward_bins=63,
)  # fmt: skip


def collect(envs, steps, replay, reward_task=None, seed=0):
    """Random-policy steps from every env into `replay`; the reward is one task's reward."""
    rng = np.random.default_rng(seed)
    spec = envs[0].action_spec()
    timesteps = [env.reset() for env in envs]
    for _ in range(steps):
        if hasattr(spec, "num_values"):
            actions = rng.integers(0, spec.num_values, size=len(envs))
        else:
            actions = rng.uniform(-1, 1, size=(len(envs),) + spec.shape).astype(np.float32)
        observations = [timestep.observation for timestep in timesteps]
        rewards = [
            o["log_task_rewards"][reward_task] if reward_task is not None else 0.0
            for o in observations
        ]
        replay.add(
            {
                "observation": {k: np.stack([o[k] for o in observations]) for k in observations[0]},
                "action": actions,
                "reward": np.asarray(rewards, np.float32),
                "discount": np.asarray(
                    [1.0 if t.first() else t.discount for t in timesteps], np.float32
                ),
                "is_first": np.asarray([t.first() for t in timesteps]),
                "is_last": np.asarray([t.last() for t in timesteps]),
                "is_terminal": np.asarray([t.last() and t.discount == 0 for t in timesteps]),
            }
        )
        timesteps = [env.step(action) for env, action in zip(envs, actions, strict=True)]
    return replay


def gridworld(seed, observation="both"):
    return toy.GridWorld(
        size=5,
        num_items=2,
        length=30,
        observation=observation,
        terminate_on_collect_all=True,
        seed=seed,
    )


@pytest.fixture(scope="module")
def gridworld_data():
    envs = [gridworld(seed) for seed in range(2)]
    replay = replay_lib.Replay(
        4000, 2, LENGTH, envs[0].observation_spec(), envs[0].action_spec(), seed=0
    )
    collect(envs, 800, replay, reward_task=4)  # reward: collect_items
    return envs[0].observation_spec(), envs[0].action_spec(), replay


def init_params(model, seed=0):
    """`model.init`, compiled without XLA optimisations: init runs once, and at the default
    level its many random initialisers take seconds to compile on a CPU."""
    rng = jax.random.PRNGKey(seed)
    options = {"xla_backend_optimization_level": 0}
    return jax.jit(model.init).lower(rng).compile(options)(rng)


def train(model, replay, steps, learning_rate=1e-3, seed=0):
    """Adam on the world-model loss: (initial params, trained params, metrics on one fixed batch
    before and after training)."""
    params = initial = init_params(model, seed)
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def update(params, opt_state, batch, rng):
        gradient_fn = jax.value_and_grad(model.loss, has_aux=True)
        (_, (metrics, _, _)), grads = gradient_fn(params, batch, model.initial_state(BATCH), rng)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, metrics

    opt_state = optimizer.init(params)
    fixed = replay.sample(BATCH)
    evaluation_rng = jax.random.PRNGKey(123)
    # `update` reports the metrics of the params it receives: evaluate with it, discard the step.
    before = jax.device_get(update(params, opt_state, fixed, evaluation_rng)[2])
    for step in range(steps):
        params, opt_state, _ = update(
            params, opt_state, replay.sample(BATCH), jax.random.PRNGKey(step)
        )
    after = jax.device_get(update(params, opt_state, fixed, evaluation_rng)[2])
    return initial, params, before, after


def assert_trained(config, before, after):
    assert after["loss/total"] < 0.5 * before["loss/total"]
    assert after["loss/reconstruction"] < 0.5 * before["loss/reconstruction"]
    assert after["loss/reward"] < 0.5 * before["loss/reward"]
    assert after["loss/continuation"] < before["loss/continuation"]
    for name in ("loss/kl_dynamics", "loss/kl_representation"):
        # A regulariser clipped below at free bits: it stays near that floor while the
        # posterior becomes informative, rather than falling.
        floor = config.losses.free_bits
        assert floor - 1e-5 <= after[name] <= 1.5 * max(before[name], floor)
    assert all(np.isfinite(value) for value in after.values())
    scales = config.losses.scales()
    expected = sum(scale * after[f"loss/{name}"] for name, scale in scales.items() if scale)
    np.testing.assert_allclose(after["loss/total"], expected, rtol=1e-5)


def open_loop_error(model, params, batch, key, context=5, horizon=10):
    open_loop = jax.jit(model.open_loop, static_argnums=(2, 3))
    predicted = open_loop(params, batch, context, horizon, jax.random.PRNGKey(7))
    error = np.asarray(wm.open_loop_error(predicted, batch, context, key=key))
    assert error.shape == (horizon,)
    return error


def test_rssm_trains_on_gridworld_images(gridworld_data):
    observation_spec, action_spec, replay = gridworld_data
    model = wm.make_world_model(SMALL, observation_spec, action_spec)
    initial, params, before, after = train(model, replay, steps=100)
    assert_trained(SMALL, before, after)
    assert after["world_model/posterior_entropy"] < before["world_model/posterior_entropy"]

    batch = replay.sample(BATCH)
    trained_error = open_loop_error(model, params, batch, key="image")
    untrained_error = open_loop_error(model, initial, batch, key="image")
    assert trained_error.mean() < 0.25 * untrained_error.mean()


@pytest.mark.slow
def test_rssm_open_loop_beats_copying_and_mean_frame(gridworld_data):
    """After 2000 steps (~1 min) imagined frames beat two action-blind baselines: repeating
    the last context frame, and the batch's mean frame. The fast test above only shows the
    model beats its untrained self (which a blurry mean-frame predictor also does)."""
    observation_spec, action_spec, replay = gridworld_data
    model = wm.make_world_model(SMALL, observation_spec, action_spec)
    _, params, _, _ = train(model, replay, steps=2000)
    batch = replay.sample(64)
    error = open_loop_error(model, params, batch, key="image")
    images = batch["observation"]["image"][:, :15].astype(np.float32) / 255.0
    truth = images[:, 5:]
    copy_error = np.square(truth - images[:, 4:5]).mean(axis=(0, 2, 3, 4))
    mean_error = np.square(truth - truth.mean(axis=(0, 1))).mean(axis=(0, 2, 3, 4))
    assert np.all(error < copy_error), (error, copy_error)
    assert error.mean() < 0.9 * mean_error.mean(), (error, mean_error)


def test_deterministic_latent_with_continuous_actions_on_pointmass():
    envs = [toy.PointMass(length=20, observation="vector", seed=seed) for seed in range(2)]
    replay = replay_lib.Replay(2000, 2, LENGTH, envs[0].observation_spec(), envs[0].action_spec())
    collect(envs, 300, replay, reward_task=0)
    # PointMass never terminates: switch the continuation loss off (and check that it is off).
    config = dataclasses.replace(
        SMALL, latent="deterministic", losses=wm.LossConfig(continuation=0.0)
    )
    model = wm.make_world_model(config, envs[0].observation_spec(), envs[0].action_spec())
    assert not model.discrete and model.action_size == 2
    initial, params, before, after = train(model, replay, steps=100)
    assert after["loss/total"] < 0.5 * before["loss/total"]
    assert after["loss/reconstruction"] < 0.5 * before["loss/reconstruction"]
    assert after["loss/reward"] < 0.5 * before["loss/reward"]
    assert "world_model/posterior_entropy" not in after  # no categorical latents
    # Scale 0: no metric, and no gradient ever reached the continuation head (Adam left it as
    # initialised), while every other part moved.
    assert "loss/continuation" not in after and "world_model/continuation_accuracy" not in after
    for name in initial:
        unchanged = all(np.array_equal(initial[name][k], params[name][k]) for k in initial[name])
        assert unchanged == name.startswith("continuation_head"), name

    batch = replay.sample(BATCH)
    trained_error = open_loop_error(model, params, batch, key="vector")
    untrained_error = open_loop_error(model, initial, batch, key="vector")
    assert trained_error.mean() < 0.25 * untrained_error.mean()


def _vector_model(latent="rssm", **losses):
    env = gridworld(0, observation="vector")
    config = dataclasses.replace(
        SMALL, latent=latent, deter=16, stoch_groups=4, stoch_classes=4, hidden=16
    )
    config = dataclasses.replace(config, losses=wm.LossConfig(**losses))
    replay = replay_lib.Replay(400, 1, 6, env.observation_spec(), env.action_spec())
    collect([env], 60, replay, reward_task=4)
    return wm.make_world_model(config, env.observation_spec(), env.action_spec()), replay


@pytest.mark.parametrize("latent", ["rssm", "deterministic"])
def test_observe_imagine_interface(latent):
    model, replay = _vector_model(latent)
    config = model.config
    params = init_params(model)
    batch = replay.sample(3)
    rng = jax.random.PRNGKey(2)

    @jax.jit
    def run(params, batch):
        embeds = model.encode(params, batch["observation"])
        state = model.initial_state(3)
        posteriors, priors = model.observe_sequence(
            params, state, batch["action"], embeds, batch["is_first"], rng
        )
        features = model.features(posteriors)
        last = jax.tree.map(lambda x: x[:, -1], posteriors)
        # is_first resets the state and zeroes the previous action.
        first = jnp.ones(3, bool)
        reset, _ = model.observe(params, last, batch["action"][:, 0], embeds[:, 0], first, rng)
        no_action = jnp.zeros((3, model.action_size))
        fresh, _ = model.observe(params, state, no_action, embeds[:, 0], ~first, rng)
        # Integer and one-hot discrete actions are the same action.
        action = jnp.asarray([0, 3, 4])
        by_index = model.imagine(params, last, action, rng)
        by_one_hot = model.imagine(params, last, jax.nn.one_hot(action, model.action_size), rng)
        predictions = (
            model.reward(params, features),
            model.continuation(params, features),
            model.decode(params, features),
        )
        return (
            embeds,
            posteriors,
            priors,
            features,
            (reset, fresh),
            (by_index, by_one_hot),
            predictions,
        )

    embeds, posteriors, priors, features, resets, imagined, predictions = run(params, batch)
    assert embeds.shape[:2] == (3, 6)
    assert posteriors.deter.shape == (3, 6, config.deter)
    groups = config.stoch_groups if latent == "rssm" else 0
    assert posteriors.stoch.shape == (3, 6, groups * config.stoch_classes)
    assert priors.logits.shape == (3, 6, groups, config.stoch_classes)
    assert features.shape == (3, 6, config.feature_size)
    jax.tree.map(np.testing.assert_allclose, *resets)
    jax.tree.map(np.testing.assert_allclose, *imagined)
    assert imagined[0].deter.shape == (3, config.deter)
    reward, continuation, decoded = predictions
    assert reward.shape == (3, 6)
    assert continuation.shape == (3, 6) and bool(jnp.all((continuation >= 0) & (continuation <= 1)))
    assert decoded["vector"].shape == batch["observation"]["vector"].shape


def test_deterministic_latent_has_zero_width_stochastic_part():
    env = gridworld(0, observation="vector")
    config = dataclasses.replace(SMALL, latent="deterministic", deter=16, hidden=16)
    model = wm.make_world_model(config, env.observation_spec(), env.action_spec())
    state = model.initial_state(2)
    assert state.stoch.shape == (2, 0) and state.logits.shape == (2, 0, config.stoch_classes)
    assert model.features(state).shape == (2, 16) == (2, config.feature_size)


def test_observe_update_bias_sets_how_far_a_filtering_step_moves_from_the_prior():
    """The deterministic filter's update gate: the same parameters but for the gate's initial
    bias move the posterior further from the prior the larger the bias (at the GRU default -1
    a step keeps ~73 % of the prior)."""
    env = gridworld(0, observation="vector")
    timestep = env.reset()
    observation = {"vector": jnp.asarray(timestep.observation["vector"])[None]}
    moved = []
    for bias in (-4.0, -1.0, 1.0, 4.0):
        config = dataclasses.replace(
            SMALL, latent="deterministic", deter=16, hidden=16, observe_update_bias=bias
        )
        model = wm.make_world_model(config, env.observation_spec(), env.action_spec())
        params = model.init(jax.random.PRNGKey(0))  # the same draw for every bias
        state = model.initial_state(1)._replace(deter=jnp.full((1, 16), 0.5))
        embed = model.encode(params, observation)
        key = jax.random.PRNGKey(1)
        posterior, prior = model.observe(params, state, jnp.zeros(1, jnp.int32), embed,
                                         jnp.zeros(1, bool), key)  # fmt: skip
        moved.append(float(jnp.linalg.norm(posterior.deter - prior.deter)))
    assert moved == sorted(moved) and moved[0] < 0.25 * moved[-1], moved


def test_config_validation():
    with pytest.raises(ValueError, match="latent"):
        wm.WorldModelConfig(latent="gaussian")
    with pytest.raises(ValueError, match="reconstruction"):
        wm.WorldModelConfig(decoder=False)
    config = wm.WorldModelConfig(decoder=False, losses=wm.LossConfig(reconstruction=0.0))
    env = gridworld(0)
    model = wm.make_world_model(config, env.observation_spec(), env.action_spec())
    with pytest.raises(ValueError, match="decoder"):
        model.decode(None, jnp.zeros((1, config.feature_size)))
    with pytest.raises(ValueError, match="no loss term"):
        wm.make_world_model(SMALL, env.observation_spec(), env.action_spec(), loss_terms={})


def test_action_input_one_hots_indices_and_checks_the_width():
    env = gridworld(0, observation="vector")
    nets = wm.make_networks(SMALL, env.observation_spec(), env.action_spec())
    size = nets.action_size
    one_hot = wm.action_input(nets, jnp.asarray([[0, 2], [1, size - 1]]))
    assert one_hot.dtype == jnp.float32
    np.testing.assert_array_equal(one_hot, np.eye(size)[[[0, 2], [1, size - 1]]])
    # A float action (e.g. a straight-through policy sample) is already the model's input.
    soft = jnp.full((3, size), 1.0 / size)
    np.testing.assert_array_equal(wm.action_input(nets, soft), soft)
    with pytest.raises(AssertionError):
        wm.action_input(nets, jnp.zeros((3, size + 1)))


def test_loss_terms_are_scaled_means_in_config_order():
    env = gridworld(0, observation="vector")
    losses = wm.LossConfig(reconstruction=0.0, reward=2.0, continuation=0.0, kl_dynamics=0.5)
    config = dataclasses.replace(SMALL, losses=losses)
    terms = {
        "kl_dynamics": lambda context: (jnp.full((2, 2), 2.0), {}),
        "reward": lambda context: (jnp.asarray([[1.0, 3.0], [5.0, 7.0]]), {"reward/extra": 1.0}),
        "kl_representation": lambda context: (context.features, {}),
        "continuation": None,  # scale 0: never looked up or run
    }
    nets = wm.make_networks(config, env.observation_spec(), env.action_spec(), terms)
    assert list(nets.loss_terms) == ["reward", "kl_dynamics", "kl_representation"]
    hand_made = {name: nets.loss_terms[name] for name in ("reward", "kl_dynamics")}
    total, metrics = wm.sum_loss_terms(hand_made, context=None)
    assert float(total) == 2.0 * 4.0 + 0.5 * 2.0
    assert list(metrics) == ["loss/reward", "reward/extra", "loss/kl_dynamics", "loss/total"]
    assert float(metrics["loss/reward"]) == 4.0 and metrics["loss/total"] is total
