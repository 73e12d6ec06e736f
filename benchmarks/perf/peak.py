"""The learner against this machine's limit: GFLOP per update, seconds, and % of matmul peak.

    python -m mbxfer.benchmarks.perf.peak                      # crafter_1h and quickstart
    python -m mbxfer.benchmarks.perf.peak --settings crafter_1h --rounds 5 --json peak.json
    python -m mbxfer.benchmarks.perf.peak --quick              # tiny sizes, seconds (tests)

For the Dreamer and MuZero updates at the sizes of a spec's Crafter agents (`crafter_1h`:
`benchmarks/configs/crafter_1h.yaml`, batch 8 x 32; `quickstart`: its Crafter leg, batch 4 x
16; 64x64x3 images, 17 actions, the spec's model sizes, no intrinsic module), on one random
batch in the replay format:

* GFLOP per call from XLA's cost analysis with every `scan` fully unrolled first
  (`unrolled_flops`; of the lowered module, or of the compiled one with `--compiled-flops`):
  XLA counts a loop body once, whatever its trip count, so the rolled figure (also printed,
  from the compiled function that is timed) undercounts the RSSM filter (T steps, forward and
  backward), imagination (H steps), MuZero's unroll (K steps) and search (one body per
  simulation). Loops whose trip count is data-dependent (the search's descent down the tree)
  stay counted once per enclosing iteration.
* Seconds per call: the median over `--rounds` rounds. Every round times each function once
  (`--calls` times, their median), in an order reversed every other round, then a 4096x4096
  float32 matmul (3 calls): the machine's peak as measured in the same run, so that the load
  of a shared machine falls on both alike.
* Achieved GFLOP/s = GFLOP / seconds, and its % of the median matmul GFLOP/s.
* Parts, each jitted on its own and timed the same way: forward + backward (the gradient of
  the sum of squared outputs w.r.t. the parameters) of the encoder on the batch's images, the
  decoder on `[B, T, F]` features, the RSSM filter on the embeddings, the whole world-model
  loss, imagination + actor-critic (Dreamer: `imagination_loss` and the replay critic from
  every posterior) or MuZero's unroll with its heads, MuZero's target-network filtering and
  reanalyse search (forward only, as in the update), and the optimizer step(s). Parts
  overlap (the world-model loss contains the encoder, filter and decoder), so shares of the
  update do not sum to 100%.
* The Dreamer update with each layer variant (`VARIANTS`: decoder upsampling x how the convs
  are computed) side by side, all in every round; the ratio of medians of the first (the
  original layers: `hk.Conv2DTranspose` decoder, XLA's convs) to each other is that
  variant's end-to-end speedup. Each variant's % of peak is printed twice: by XLA's count
  of what it computes (the table) and by the original layers' count, the model's work (the
  sub-pixel decoder also computes a border it crops, im2col's gradient adds its slices).
  The MuZero update with XLA's convs is timed beside it too.

Timing never happens in tests: `tests/test_perf_peak.py` runs `--quick` and the FLOP counting
on small functions, asserting no time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

SETTINGS = ("crafter_1h", "quickstart")
"""Named settings: the Crafter agents of these specs in `benchmarks/configs`."""
DECODERS = ("transpose", "transpose_subpixel", "depth_to_space")
"""`networks.UPSAMPLES`, the decoders timed side by side (a test checks they agree)."""
CONVS = ("matmul", "xla")
"""`networks.CONV_IMPLS`, how the convs are computed (a test checks they agree)."""
VARIANTS = (
    ("transpose", "xla"),
    ("transpose_subpixel", "xla"),
    ("transpose_subpixel", "matmul"),
    ("depth_to_space", "matmul"),
)
"""(decoder_upsample, conv) pairs of the Dreamer update timed side by side; the first is the
original layers, the baseline of the speedups."""
MATMUL_SIZE = 4096


# ---------------------------------------------------------------------------------------
# FLOP counting.


def _unroll_scans(jaxpr):
    """`jaxpr` (a `Jaxpr`) with every `scan`, at any depth, fully unrolled."""
    from jax.extend import core

    def rewrite(value):
        if isinstance(value, core.ClosedJaxpr):
            return core.ClosedJaxpr(_unroll_scans(value.jaxpr), value.consts)
        if isinstance(value, core.Jaxpr):
            return _unroll_scans(value)
        if type(value) is tuple:  # Not NamedTuples (a PRNG implementation is one).
            return tuple(rewrite(item) for item in value)
        return value

    equations = []
    for equation in jaxpr.eqns:
        params = {name: rewrite(value) for name, value in equation.params.items()}
        if equation.primitive.name == "scan":
            params["unroll"] = max(1, params["length"])
        equations.append(equation.replace(params=params))
    return jaxpr.replace(eqns=equations)


def _cost(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # One entry per device in older jax versions.
        cost = cost[0]
    return cost or {}


def rolled_flops(function: Callable, *args) -> float:
    """FLOPs of `jax.jit(function)(*args)` as XLA counts them: each loop body once."""
    import jax

    return float(_cost(jax.jit(function).lower(*args).compile()).get("flops", 0.0))


def unrolled_flops(function: Callable, *args, compiled: bool = False) -> float:
    """FLOPs of `function(*args)` from XLA's cost analysis with every `scan` unrolled, so
    that each loop body counts as many times as the loop runs.

    By default the module is analysed as lowered, before XLA's optimizations: compiling the
    unrolled module (`compiled=True`) costs as long again as compiling the function, for a
    count that differs by the few elementwise ops XLA simplifies away (the dots and
    convolutions are the same)."""
    import jax
    from jax.extend import core

    closed = jax.make_jaxpr(function)(*args)
    unrolled = core.ClosedJaxpr(_unroll_scans(closed.jaxpr), closed.consts)
    lowered = jax.jit(core.jaxpr_as_fun(unrolled)).lower(*jax.tree.leaves(args))
    return float(_cost(lowered.compile() if compiled else lowered).get("flops", 0.0))


# ---------------------------------------------------------------------------------------
# Settings and the functions timed.


@dataclasses.dataclass(frozen=True)
class Setting:
    """A size to measure at: the Dreamer and MuZero configs, the batch shape and the spec."""

    name: str
    env_spec: Any
    dreamer: Any
    """`DreamerConfig` (its decoder is the configured default unless overridden)."""
    muzero: Any
    """`MuZeroConfig`."""
    batch_size: int
    sequence_length: int


def spec_setting(name: str) -> Setting:
    """The Crafter Dreamer and MuZero (no intrinsic module) of the spec `name`."""
    from mbxfer.benchmarks.perf import trials

    setups = {s.label: s for s in trials.agent_setups(name, envs=["crafter"])}
    missing = [label for label in ("dreamer/crafter", "muzero/crafter") if label not in setups]
    if missing:
        raise ValueError(f"spec {name!r} has no {missing} agents to measure")
    dreamer, muzero = setups["dreamer/crafter"], setups["muzero/crafter"]
    train = dreamer.trial.train
    if (train.batch_size, train.sequence_length) != (
        muzero.trial.train.batch_size,
        muzero.trial.train.sequence_length,
    ):
        raise ValueError(f"spec {name!r} trains its Crafter agents on different batch shapes")
    return Setting(
        name,
        dreamer.env_spec,
        dreamer.agent_config,
        muzero.agent_config,
        train.batch_size,
        train.sequence_length,
    )


def quick_setting() -> Setting:
    """Tiny sizes (16x16 images of the toy grid, batch 2 x 4): seconds, for tests."""
    from mbxfer.agents.dreamer import ActorCriticConfig, DreamerConfig
    from mbxfer.agents.muzero import MuZeroConfig, SearchConfig
    from mbxfer.agents.world_model import LossConfig, WorldModelConfig
    from mbxfer.envs import base as env_base
    from mbxfer.envs import registry

    model = dict(deter=16, hidden=16, reward_bins=7, encoder_depth=4, mlp_layers=1)
    env = registry.make("grid_image", size=5, task="reach_bottom_right")
    return Setting(
        "quick",
        env_base.environment_spec(env),
        DreamerConfig(
            model=WorldModelConfig(stoch_groups=2, stoch_classes=2, **model),
            actor_critic=ActorCriticConfig(horizon=3, hidden=16, layers=1, critic_bins=7),
        ),
        MuZeroConfig(
            model=WorldModelConfig(
                latent="deterministic", decoder=True, losses=LossConfig(), **model
            ),
            search=SearchConfig(num_simulations=2),
            unroll_steps=2,
            n_step=2,
            value_bins=7,
            hidden=16,
            layers=1,
        ),
        batch_size=2,
        sequence_length=4,
    )


def with_decoder(config, upsample: str, conv: Optional[str] = None):
    """`config` (an agent config with a `model`) with the decoder's upsampling `upsample` and
    the convs computed by `conv` (unchanged when None)."""
    conv = config.model.conv if conv is None else conv
    return dataclasses.replace(
        config, model=dataclasses.replace(config.model, decoder_upsample=upsample, conv=conv)
    )


def variant_label(upsample: str, conv: str) -> str:
    return f"{upsample}, {conv}"


def random_batch(env_spec, batch_size: int, length: int, seed: int = 0) -> dict[str, Any]:
    """A `[B, T, ...]` batch in the replay format (`agents/replay.py`) for `env_spec`, with
    random content: uint8 images, float vectors, discrete or [-1, 1] actions."""
    from dm_env import specs

    rng = np.random.default_rng(seed)
    shape = (batch_size, length)
    observation = {}
    for key, spec in env_spec.observations.items():
        if np.issubdtype(spec.dtype, np.integer):
            observation[key] = rng.integers(0, 256, shape + spec.shape).astype(spec.dtype)
        else:
            observation[key] = rng.normal(size=shape + spec.shape).astype(spec.dtype)
    actions = env_spec.actions
    if isinstance(actions, specs.DiscreteArray):
        action = rng.integers(0, actions.num_values, shape).astype(np.int32)
    else:
        action = rng.uniform(-1, 1, shape + actions.shape).astype(np.float32)
    is_first = np.zeros(shape, bool)
    is_first[:, 0] = True
    is_terminal = rng.random(shape) < 0.01
    return {
        "observation": observation,
        "action": action,
        "reward": (rng.random(shape) < 0.05).astype(np.float32),
        "discount": (1.0 - is_terminal).astype(np.float32),
        "is_first": is_first,
        "is_last": is_terminal | (rng.random(shape) < 0.01),
        "is_terminal": is_terminal,
    }


@dataclasses.dataclass
class Measured:
    """One function to time: jitted, its arguments, its FLOPs, and the seconds measured."""

    name: str
    function: Callable
    args: tuple
    flops: float = 0.0
    rolled_flops: float = 0.0
    seconds: list = dataclasses.field(default_factory=list)
    group: str = ""
    """The update this is (a part of): parts are reported as shares of it."""

    def run_once(self) -> None:
        import jax

        jax.block_until_ready(self.function(*self.args))


def _float_leaves(tree) -> list:
    import jax
    import jax.numpy as jnp

    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]


def squared_norm_grad(function: Callable) -> Callable:
    """`(params, *data) -> grad of sum(function(params, *data) ** 2)` w.r.t. `params`: a
    forward + backward pass through `function` (data are arguments, not closed-over
    constants, so XLA cannot fold them)."""
    import jax
    import jax.numpy as jnp

    def objective(params, *data):
        return sum(jnp.sum(jnp.square(x)) for x in _float_leaves(function(params, *data)))

    return jax.grad(objective)


def dreamer_items(setting: Setting, batch, seed: int = 0) -> list[Measured]:
    """The Dreamer update with each of `VARIANTS`, the parts of the configured one, and each
    variant's decoder fwd+bwd and each conv's encoder fwd+bwd (a layer's share is of the
    update with its variant)."""
    import jax

    key = jax.random.PRNGKey(seed)
    parts, features = dreamer_parts(setting, batch, key)
    return (
        dreamer_updates(setting, batch, key) + parts + dreamer_layers(setting, batch, features, key)
    )


def dreamer_updates(setting: Setting, batch, key) -> list[Measured]:
    """The whole Dreamer update with each of `VARIANTS` (the configured one marked)."""
    from mbxfer import agents

    default = variant_label(setting.dreamer.model.decoder_upsample, setting.dreamer.model.conv)
    items = []
    for upsample, conv in VARIANTS:
        agent = agents.make(
            "dreamer", setting.env_spec, with_decoder(setting.dreamer, upsample, conv)
        )
        variant = variant_label(upsample, conv)
        label = f"dreamer update [{variant}]" + (" (default)" if variant == default else "")
        items.append(
            Measured(label, agent.update, (agent.init(key), batch, key), group=f"dreamer/{variant}")
        )
    return items


def dreamer_parts(setting: Setting, batch, key) -> tuple[list[Measured], Any]:
    """The parts of the configured Dreamer update (RSSM filtering, world-model loss,
    imagination + actor-critic, optimizers), and the batch's posterior features."""
    import jax
    import jax.numpy as jnp

    from mbxfer.agents import dreamer, sequences

    config = setting.dreamer
    nets = dreamer.make_networks(setting.env_spec, config)
    model, ac = nets.model, config.actor_critic
    state = jax.jit(functools.partial(dreamer.init, nets, config))(key)
    params = state.model_params
    initial = model.initial_state(setting.batch_size)
    embeds = jax.jit(model.encode)(params, batch["observation"])
    posteriors, _ = jax.jit(model.observe_sequence)(
        params, initial, batch["action"], embeds, batch["is_first"], key
    )
    features = model.features(posteriors)
    start = jax.tree.map(sequences.flatten_time, posteriors)
    start_cont = 1.0 - batch["is_terminal"].reshape(-1).astype(jnp.float32)

    def filtering(p, embeds, actions, is_first, rng):
        posteriors, priors = model.observe_sequence(p, initial, actions, embeds, is_first, rng)
        return model.features(posteriors), priors.logits

    def world_model(p, batch, rng):
        return jax.value_and_grad(model.loss, has_aux=True)(p, batch, initial, rng)

    def actor_critic(ac_params, state, start, start_cont, features, batch, rng):
        def objective(ac_params):
            actor, critic = ac_params
            actor_loss, critic_loss, _, _ = dreamer.imagination_loss(
                nets, config, actor, critic, state, start, start_cont, rng
            )
            if ac.replay_critic:
                critic_loss = critic_loss + ac.replay_critic * dreamer.replay_critic_loss(
                    nets, config, critic, state, features, batch
                )
            return actor_loss + critic_loss

        return jax.grad(objective)(ac_params)

    def optimizer(state, grads):
        return dreamer.apply_gradients(nets, ac, state, grads, state.return_range, False)

    grads = jax.tree.map(
        jnp.ones_like, (state.model_params, state.actor_params, state.critic_params)
    )
    default = variant_label(config.model.decoder_upsample, config.model.conv)
    group = f"dreamer/{default}"
    parts = [
        (
            "RSSM filtering fwd+bwd",
            squared_norm_grad(filtering),
            (params, embeds, batch["action"], batch["is_first"], key),
        ),
        ("world-model loss fwd+bwd", world_model, (params, batch, key)),
        (
            f"imagination ({ac.horizon} steps) + actor-critic fwd+bwd",
            actor_critic,
            (
                (state.actor_params, state.critic_params),
                state,
                start,
                start_cont,
                features,
                batch,
                key,
            ),
        ),
        ("optimizers (3 Adam + slow critic)", optimizer, (state, grads)),
    ]
    return [Measured(f"  {name}", fn, args, group=group) for name, fn, args in parts], features


def dreamer_layers(setting: Setting, batch, features, key) -> list[Measured]:
    """The decoder's fwd+bwd with each of `VARIANTS` (on `features`) and the encoder's with
    each of `CONVS`, each in the group of the update it belongs to."""
    import jax

    from mbxfer.agents.world_model import make_world_model

    config, items = setting.dreamer, []
    if config.model.decoder:
        for upsample, conv in VARIANTS:
            decoder_model = make_world_model(
                with_decoder(config, upsample, conv).model, setting.env_spec.observations,
                setting.env_spec.actions,
            )  # fmt: skip
            decoder_params = jax.jit(decoder_model.init)(key)

            def decode(p, f, model=decoder_model):
                return model.heads(p, f).observation

            variant = variant_label(upsample, conv)
            items.append(
                Measured(
                    f"  decoder fwd+bwd [{variant}]",
                    squared_norm_grad(decode),
                    (decoder_params, features),
                    group=f"dreamer/{variant}",
                )
            )
    for conv in CONVS:
        encoder_model = make_world_model(
            with_decoder(config, config.model.decoder_upsample, conv).model,
            setting.env_spec.observations,
            setting.env_spec.actions,
        )
        items.append(
            Measured(
                f"  encoder fwd+bwd [{conv}]",
                squared_norm_grad(encoder_model.encode),
                (jax.jit(encoder_model.init)(key), batch["observation"]),
                group=f"dreamer/{variant_label(config.model.decoder_upsample, conv)}",
            )
        )
    return items


def muzero_items(setting: Setting, batch, seed: int = 0) -> list[Measured]:
    """The MuZero update with each of `CONVS` (the configured one first), and the parts of
    the configured one."""
    import jax

    key = jax.random.PRNGKey(seed)
    return muzero_updates(setting, batch, key) + muzero_parts(setting, batch, key)


def muzero_updates(setting: Setting, batch, key) -> list[Measured]:
    """The whole MuZero update, and with the other conv (`CONVS`)."""
    from mbxfer import agents

    config = setting.muzero
    agent = agents.make("muzero", setting.env_spec, config)
    items = [Measured("muzero update", agent.update, (agent.init(key), batch, key), group="muzero")]
    other = next(conv for conv in CONVS if conv != config.model.conv)
    other_agent = agents.make(
        "muzero", setting.env_spec, with_decoder(config, config.model.decoder_upsample, other)
    )
    items.append(
        Measured(
            f"muzero update [{other} convs]",
            other_agent.update,
            (other_agent.init(key), batch, key),
            group=f"muzero/{other}",
        )
    )
    return items


def muzero_parts(setting: Setting, batch, key) -> list[Measured]:
    """The parts of the MuZero update: encoder, filtering, decoder, world-model loss,
    target filtering, unroll, search (reanalyse) and optimizer."""
    import jax
    import jax.numpy as jnp
    import optax

    from mbxfer.agents import muzero, nomodel

    config = setting.muzero
    nets = muzero.make_networks(setting.env_spec, config)
    state = jax.jit(functools.partial(muzero.init, nets, config))(key)
    model = nets.model
    params = state.params
    initial = model.initial_state(setting.batch_size)
    embeds = jax.jit(model.encode)(params.model, batch["observation"])
    posteriors = jax.jit(functools.partial(nomodel.filter_sequence, model))(
        params.model, batch, key
    )
    shape = batch["reward"].shape
    returns, returns_valid = jnp.zeros(shape), jnp.ones(shape, bool)

    def filtering(p, embeds, actions, is_first, rng):
        posteriors, priors = model.observe_sequence(p, initial, actions, embeds, is_first, rng)
        return model.features(posteriors), priors.logits

    def world_model(p, state, batch, rng):
        def objective(p):
            loss, _, _ = muzero.representation_loss(nets, config, p, state, batch, rng)
            return loss

        return jax.grad(objective)(p)

    def target_filtering(target_params, state, batch, rng):
        intrinsic = None
        return muzero.bootstrap_targets(nets, config, target_params, batch, intrinsic, rng)

    def search(p, posteriors, batch, returns, returns_valid, rng):
        roots = jnp.zeros(batch["reward"].shape)
        return muzero.policy_targets(
            nets, config, p, posteriors, batch, returns, returns_valid, roots, rng
        )

    def optimizer(state, grads):
        updates, opt_state = nets.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        target = optax.incremental_update(params, state.target_params, config.target_update_rate)
        return params, target, opt_state

    grads = jax.tree.map(jnp.ones_like, params)
    K = config.unroll_steps
    parts = [
        ("encoder fwd+bwd", squared_norm_grad(model.encode), (params.model, batch["observation"])),
        (
            "filtering fwd+bwd",
            squared_norm_grad(filtering),
            (params.model, embeds, batch["action"], batch["is_first"], key),
        ),
    ]
    if config.model.decoder and config.model.losses.reconstruction:
        features = model.features(posteriors)
        parts.append(
            (
                f"decoder fwd+bwd [{config.model.decoder_upsample}]",
                squared_norm_grad(lambda p, f: model.heads(p, f).observation),
                (params.model, features),
            )
        )
    parts += [
        ("world-model loss fwd+bwd", world_model, (params, state, batch, key)),
        (
            "target-network filtering (fwd)",
            target_filtering,
            (state.target_params, state, batch, key),
        ),
        (
            f"unroll ({K} steps) + heads fwd+bwd",
            squared_norm_grad(
                lambda p, posteriors, batch, rng: muzero.unroll(
                    nets, config, p, posteriors, batch, rng
                )
            ),
            (params, posteriors, batch, key),
        ),
        (
            f"search ({config.search.num_simulations} simulations, reanalyse, fwd)",
            search,
            (muzero.search_params(state, params), posteriors, batch, returns, returns_valid, key),
        ),
        ("optimizer (Adam + target EMA)", optimizer, (state, grads)),
    ]
    return [Measured(f"  {name}", fn, args, group="muzero") for name, fn, args in parts]


# ---------------------------------------------------------------------------------------
# Measuring.


def matmul_item(size: int) -> Measured:
    """A `size` x `size` float32 matmul: the machine's peak for dense float32 work."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
    return Measured(
        f"matmul {size}x{size} float32", jnp.matmul, (a, b), flops=2.0 * size**3, group="peak"
    )


def prepare(
    items: Sequence[Measured], log: Callable[[str], None], compiled_flops: bool = False
) -> None:
    """Compile every item (its rolled FLOPs come from that executable), count its FLOPs with
    the scans unrolled (`unrolled_flops`), and run it once."""
    import jax

    for item in items:
        start = time.perf_counter()
        compiled = jax.jit(item.function).lower(*item.args).compile()
        if item.group != "peak":
            item.rolled_flops = float(_cost(compiled).get("flops", 0.0))
            item.flops = unrolled_flops(item.function, *item.args, compiled=compiled_flops)
        else:
            item.rolled_flops = item.flops
        item.function = compiled
        item.run_once()
        log(f"  compiled {item.name.strip()} ({time.perf_counter() - start:.0f} s)")


def measure(items: Sequence[Measured], calls: int) -> None:
    """One round: every item, in order, runs `calls` times and records the median seconds
    per call."""
    for item in items:
        seconds = []
        for _ in range(calls):
            start = time.perf_counter()
            item.run_once()
            seconds.append(time.perf_counter() - start)
        item.seconds.append(statistics.median(seconds))


def summarize(items: Sequence[Measured], peak: Measured) -> list[dict[str, Any]]:
    """One row per item: GFLOP, seconds (median over rounds), GFLOP/s, % of peak and share
    of its update."""
    peak_gflops = peak.flops / statistics.median(peak.seconds) / 1e9
    updates = {item.group: item for item in items if not item.name.startswith(" ")}
    rows = []
    for item in items:
        seconds = statistics.median(item.seconds)
        gflops = item.flops / seconds / 1e9
        update = updates.get(item.group)
        rows.append(
            {
                "name": item.name,
                "group": item.group,
                "gflop": item.flops / 1e9,
                "rolled_gflop": item.rolled_flops / 1e9,
                "seconds": seconds,
                "seconds_by_round": list(item.seconds),
                "gflop_per_s": gflops,
                "percent_of_peak": 100.0 * gflops / peak_gflops,
                "share_of_update": (
                    seconds / statistics.median(update.seconds)
                    if update is not None and update is not item
                    else None
                ),
            }
        )
    return rows


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'':58s} {'GFLOP':>8s} {'(rolled)':>9s} {'s/call':>8s} {'GFLOP/s':>8s} "
        f"{'% peak':>7s} {'share':>6s}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        share = row["share_of_update"]
        lines.append(
            f"{row['name']:58s} {row['gflop']:8.3g} {row['rolled_gflop']:9.3g} "
            f"{row['seconds']:8.3f} {row['gflop_per_s']:8.1f} {row['percent_of_peak']:6.1f}% "
            + (f"{100 * share:5.0f}%" if share is not None else f"{'':6s}")
        )
    return "\n".join(lines)


def run_setting(
    setting: Setting,
    rounds: int,
    calls: int,
    matmul_size: int,
    seed: int,
    log,
    compiled_flops: bool = False,
) -> dict[str, Any]:
    """Every item of `setting`, measured; the rows, the peak and the decoder comparison."""
    import jax

    batch = jax.device_put(
        random_batch(setting.env_spec, setting.batch_size, setting.sequence_length, seed)
    )
    log(f"[{setting.name}] building and compiling (FLOPs counted with scans unrolled) ...")
    items = dreamer_items(setting, batch, seed) + muzero_items(setting, batch, seed)
    peak = matmul_item(matmul_size)
    prepare(items + [peak], log, compiled_flops)
    log(f"[{setting.name}] timing {rounds} rounds of {len(items)} functions + the matmul ...")
    start = time.perf_counter()
    for round_index in range(rounds):
        # ABBA: the order reverses every round, so no function always follows the same one.
        measure(items if round_index % 2 == 0 else items[::-1], calls)
        measure([peak], max(calls, 3))
        log(f"  round {round_index + 1}/{rounds} ({time.perf_counter() - start:.0f} s)")
    rows = summarize(items, peak)
    updates = {row["group"]: row for row in rows if not row["name"].startswith(" ")}
    transpose = updates[f"dreamer/{variant_label(*VARIANTS[0])}"]
    speedups = {}
    for upsample, conv in VARIANTS[1:]:
        variant = variant_label(upsample, conv)
        other = updates[f"dreamer/{variant}"]
        speedups[variant] = {
            "ratio_of_medians": transpose["seconds"] / other["seconds"],
            # The model's work: the original layers' FLOPs, whatever the variant computes
            # on top (the sub-pixel decoder's cropped border, im2col's gradient adds).
            "percent_of_peak_model_flops": 100.0
            * transpose["gflop"]
            / other["seconds"]
            / (peak.flops / statistics.median(peak.seconds) / 1e9),
            "by_round": [
                a / b for a, b in zip(transpose["seconds_by_round"], other["seconds_by_round"])
            ],
        }
    return {
        "setting": setting.name,
        "batch": [setting.batch_size, setting.sequence_length],
        "observation": {k: list(v.shape) for k, v in setting.env_spec.observations.items()},
        "peak_gflop_per_s": peak.flops / statistics.median(peak.seconds) / 1e9,
        "peak_gflop_per_s_by_round": [peak.flops / s / 1e9 for s in peak.seconds],
        "rows": rows,
        "decoder_speedups": speedups,
        "default_decoder": variant_label(
            setting.dreamer.model.decoder_upsample, setting.dreamer.model.conv
        ),
    }


def report(result: dict[str, Any]) -> str:
    batch, length = result["batch"]
    images = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in result["observation"].items())
    peaks = result["peak_gflop_per_s_by_round"]
    default = result["default_decoder"]
    updates = {r["group"]: r for r in result["rows"] if not r["name"].startswith(" ")}
    lines = [
        f"{result['setting']}: batch {batch} x {length}, {images}; matmul peak "
        f"{result['peak_gflop_per_s']:.1f} GFLOP/s (median; rounds {min(peaks):.0f}-"
        f"{max(peaks):.0f})",
        format_rows(result["rows"]),
        f"Dreamer update speedup over [{variant_label(*VARIANTS[0])}] (ratio of median "
        "seconds; per round):",
    ]
    for variant, speedup in result["decoder_speedups"].items():
        rounds = ", ".join(f"{r:.2f}" for r in speedup["by_round"])
        lines.append(
            f"  {variant:28s} {speedup['ratio_of_medians']:.2f}x ({rounds}); "
            f"{speedup['percent_of_peak_model_flops']:.1f}% of peak counting the original "
            "layers' FLOPs"
        )
    lines.append(
        f"Default layers [{default}]: the Dreamer update reaches "
        f"{updates[f'dreamer/{default}']['percent_of_peak']:.1f}% of the matmul peak; the MuZero "
        f"update {updates['muzero']['percent_of_peak']:.1f}%"
    )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help=f"comma-separated spec names (default {','.join(SETTINGS)})",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--calls", type=int, default=1, help="calls per function per round")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and a 256x256 matmul (seconds)"
    )
    parser.add_argument(
        "--compiled-flops",
        action="store_true",
        help="count the unrolled FLOPs on the compiled module, not the lowered one (slower)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.calls < 1:
        parser.error("--rounds and --calls must be at least 1")

    def log(message: str) -> None:
        print(message, flush=True)

    if args.quick:
        settings, matmul_size = [quick_setting()], 256
    else:
        names = [name for name in args.settings.split(",") if name]
        if not names:
            parser.error("--settings names no spec")
        try:
            settings = [spec_setting(name) for name in names]
        except (OSError, ValueError) as error:
            parser.error(str(error))
        matmul_size = MATMUL_SIZE
    results = []
    for setting in settings:
        start = time.perf_counter()
        result = run_setting(
            setting, args.rounds, args.calls, matmul_size, args.seed, log, args.compiled_flops
        )
        result["wall_s"] = time.perf_counter() - start
        results.append(result)
        print()
        print(report(result))
        print()
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return results


if __name__ == "__main__":
    main()
