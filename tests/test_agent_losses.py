"""The shared replay-alignment helpers and the agents' module-level losses, on small cases with
known answers (hand-computed values, or invariants that a wrong loss would break)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mbxfer.agents import dreamer, muzero, ppo, sequences
from mbxfer.agents import muzero_targets as targets
from mbxfer.benchmarks import config as config_lib
from mbxfer.envs import base as env_base
from mbxfer.envs import registry

# Two sequences of 5 rows: sequence 0 ends an episode at row 1 (is_last) and starts one at
# row 2; sequence 1 is cut by the runner between rows 2 and 3 (row 3 starts an episode, row 2
# is not last).
IS_FIRST = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 0]], bool)
IS_LAST = np.array([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
VALID = np.array([[1, 0, 1, 1], [1, 1, 0, 1]], bool)  # transitions out of rows 0..3


def test_valid_transitions_and_episode_ends_at_boundaries():
    np.testing.assert_array_equal(sequences.valid_transitions(IS_FIRST, IS_LAST), VALID)
    ends = sequences.episode_ends(IS_FIRST, IS_LAST)
    np.testing.assert_array_equal(ends, [[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(~ends[:, :-1], VALID)
    # One sequence `[T]` as well as a batch.
    np.testing.assert_array_equal(sequences.valid_transitions(IS_FIRST[1], IS_LAST[1]), VALID[1])


def test_masked_mean_averages_valid_entries_only():
    x = jnp.array([[1.0, 100.0, 2.0, 3.0]])
    assert float(sequences.masked_mean(x, VALID[:1])) == 2.0
    assert float(sequences.masked_mean(x, VALID[:1].astype(np.float32))) == 2.0
    assert float(sequences.masked_mean(x, np.zeros_like(VALID[:1]))) == 0.0


def test_to_rows_puts_each_transition_in_the_row_it_reaches():
    per_transition = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    np.testing.assert_array_equal(
        sequences.to_rows(per_transition), [[0, 1, 2, 3, 4], [0, 5, 6, 7, 8]]
    )
    # Rows that start an episode were reached by no transition of that episode.
    np.testing.assert_array_equal(
        sequences.to_rows(per_transition, IS_FIRST), [[0, 1, 0, 3, 4], [0, 5, 6, 0, 8]]
    )


def test_action_input_is_one_hot_or_float():
    np.testing.assert_array_equal(
        sequences.action_input(np.array([2, 0]), True, 3), [[0, 0, 1], [1, 0, 0]]
    )
    continuous = sequences.action_input(np.array([[0.5, -1.0]], np.float64), False, 2)
    assert continuous.dtype == jnp.float32


def _spec():
    env = registry.make("grid", size=5, observation="vector", task="reach_bottom_right")
    return env_base.environment_spec(env)


def _config(*items):
    return config_lib.build(config_lib.parse_overrides(list(items))).agent_config


def test_dreamer_return_normalization_takes_then_tracks_the_percentile_range():
    ac = dreamer.ActorCriticConfig(return_norm_decay=0.99)
    returns = jnp.arange(101.0)
    first = types.SimpleNamespace(step=0, return_range=jnp.zeros(2))
    return_range, scale = dreamer.return_normalization(ac, first, returns)
    np.testing.assert_allclose(return_range, [5.0, 95.0])
    assert float(scale) == pytest.approx(90.0)
    later = types.SimpleNamespace(step=3, return_range=jnp.array([0.0, 10.0]))
    return_range, scale = dreamer.return_normalization(ac, later, returns)
    np.testing.assert_allclose(return_range, [0.05, 10.85], rtol=1e-6)
    assert float(scale) == pytest.approx(10.8, rel=1e-6)
    # Masked: percentiles of 0..50 only; a narrow range never scales advantages up.
    return_range, _ = dreamer.return_normalization(ac, first, returns, returns <= 50)
    np.testing.assert_allclose(return_range, [2.5, 47.5])
    _, scale = dreamer.return_normalization(ac, first, jnp.full(8, 3.0), np.ones(8, bool))
    assert float(scale) == 1.0


def _replay_batch(rng, batch_size=2, length=5, action_size=5):
    return {
        "action": rng.integers(action_size, size=(batch_size, length)).astype(np.int32),
        "reward": rng.normal(size=(batch_size, length)).astype(np.float32),
        "discount": np.ones((batch_size, length), np.float32),
        "is_first": IS_FIRST,
        "is_last": IS_LAST,
        "is_terminal": np.zeros_like(IS_LAST),
    }


def test_dreamer_replay_losses_ignore_invalid_transitions():
    config = _config(
        "agent=dreamer_nomodel", "agent.model.deter=16", "agent.actor_critic.hidden=16"
    )
    nets = dreamer.make_networks(_spec(), config)
    state = dreamer.init(nets, config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = _replay_batch(rng)
    features = jnp.asarray(rng.normal(size=(2, 5, config.model.feature_size)), jnp.float32)

    def losses(batch):
        actor, critic, _, metrics = dreamer.replay_actor_critic_loss(
            nets, config, state.actor_params, state.critic_params, state, features, batch
        )
        return float(actor), float(critic), float(metrics["replayed/return"])

    reference = losses(batch)
    # The action out of an invalid row, and the reward of a row no transition reaches.
    other = {**batch, "action": batch["action"].copy(), "reward": batch["reward"].copy()}
    other["action"][0, 1] = (other["action"][0, 1] + 1) % 5  # row 1 is last
    other["reward"][0, 2] += 10.0  # row 2 starts an episode
    assert losses(other) == reference
    # ... but the action out of a valid row changes the actor loss.
    changed = {**batch, "action": batch["action"].copy()}
    changed["action"][0, 0] = (changed["action"][0, 0] + 1) % 5
    assert losses(changed)[0] != reference[0]


def test_muzero_policy_loss_is_the_cross_entropy_to_the_target_branches():
    rng = np.random.default_rng(1)
    policy = jnp.asarray(rng.normal(size=(2, 4, 1, 3)), jnp.float32)  # [R, T, K+1, A], K=0
    # One branch per step, weight 1: the loss is -log pi(action) averaged over valid steps.
    actions = np.array([[0, 2, 1, 1], [2, 2, 0, 1]])
    valid = np.array([[1, 1, 0, 1], [1, 0, 1, 1]], bool)
    policy_targets = targets.PolicyTargets(
        jnp.asarray(actions[..., None]), jnp.ones((2, 4, 1)), jnp.asarray(valid)
    )
    loss = muzero.policy_loss(True, 0, policy, policy_targets, jnp.ones((2, 4, 1), bool))
    log_probs = np.asarray(jax.nn.log_softmax(policy[:, :, 0], -1))
    expected = -np.mean(np.take_along_axis(log_probs, actions[..., None], -1)[..., 0][valid])
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_muzero_value_loss_weights_the_root_one_and_unrolled_steps_one_over_k():
    config = _config("agent=muzero", "agent.value_bins=31", "agent.hidden=16")
    nets = muzero.make_networks(_spec(), config)
    returns = jnp.array([[0.0, 1.0, 2.0]])
    logits = jnp.zeros((1, 3, 3, 31))  # K=2: uniform predictions, equal loss per entry
    all_valid = jnp.ones((1, 3), bool)
    valid = targets.unroll_valid(jnp.zeros((1, 3), bool), 2)
    loss = muzero.value_loss(nets, 2, logits, returns, all_valid, valid)
    # Uniform logits: each entry's cross-entropy is log(31) whatever the target.
    assert float(loss) == pytest.approx(2.0 * np.log(31.0), rel=1e-5)
    # Steps whose target does not exist do not count.
    loss = muzero.value_loss(nets, 2, logits, returns, jnp.zeros((1, 3), bool), valid)
    assert float(loss) == 0.0


def test_ppo_loss_at_the_behaviour_policy_is_the_value_error_and_the_entropy():
    config = _config("agent=ppo", "agent.hidden=16", "agent.value_clip=0")
    nets = ppo.make_networks(_spec(), config)
    state = ppo.init(nets, jax.random.PRNGKey(0))
    rng = np.random.default_rng(2)
    size = _spec().observations["vector"].shape[0]
    observation = {"vector": jnp.asarray(rng.normal(size=(6, size)), jnp.float32)}
    _, both = nets.network.apply
    policy_out, value = both(state.params, observation)
    action = jnp.asarray(rng.integers(5, size=6), jnp.int32)
    valid = jnp.array([1, 1, 0, 1, 1, 0], bool)
    value_target = value + jnp.arange(6.0)
    minibatch = ppo._Minibatch(
        observation,
        action,
        ppo.log_prob(nets, policy_out, action),  # the current policy: ratio 1
        value,
        jnp.asarray(rng.normal(size=6), jnp.float32),
        value_target,
        valid,
    )
    total, metrics = ppo.loss(nets, config, state.params, minibatch)
    # Ratio 1 and advantages normalized over valid entries: no policy gradient signal.
    assert float(metrics["loss/policy"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["policy/approx_kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["policy/clip_fraction"]) == 0.0
    expected_value = 0.5 * np.mean(np.square(np.arange(6.0))[np.asarray(valid)])
    assert float(metrics["loss/value"]) == pytest.approx(expected_value, rel=1e-6)
    # The zero-initialized policy head is uniform over the 5 actions.
    assert float(metrics["policy/entropy"]) == pytest.approx(np.log(5.0), rel=1e-5)
    expected_total = config.value_coef * expected_value - config.entropy_coef * np.log(5.0)
    assert float(total) == pytest.approx(expected_total, rel=1e-5)
