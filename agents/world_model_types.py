"""Types of the shared world model: configuration, latent state, head outputs, the model's
function table and the context handed to loss terms. Read this before `world_model.py`.

Shapes: `B` batch, `T` time, `D` deterministic size, `G` x `C` categorical groups x classes,
`F` feature size, `E` embedding size, `K` reward bins, `A` action size, `P` projection size.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Callable, Literal, Mapping, NamedTuple

import chex

from mbxfer import domains
from mbxfer.domains import at_least, below_one, finite, non_negative, positive

Array = chex.Array
Params = Any  # a Haiku parameter tree
Observation = Mapping[str, Array]
Batch = Mapping[str, Any]

LATENTS = ("rssm", "deterministic")
PROJECTION_HEADS = {
    "contrastive_latent": "features [..., F] -> [..., P] (imagined side of `contrastive`)",
    "contrastive_embed": "embed [..., E] -> [..., P] (encoded side of `contrastive`)",
    "predictive_projection": "features [..., F] -> [..., P] (both sides of `self_predictive`)",
    "predictive_predictor": "[..., P] -> [..., P] (online side of `self_predictive`, as SPR)",
}
"""Projection heads by name -> what they map; `contrastive_*` exist when `contrastive` is on,
`predictive_*` when `self_predictive` is."""


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Scales of the world-model loss terms (0 switches a term off) and their settings.

    Every float field before `free_bits` is the scale of the loss term of the same name in
    `world_model_losses.LOSS_TERMS`; the fields from `free_bits` on configure the terms.
    """

    reconstruction: Annotated[float, non_negative] = 1.0
    """Observation reconstruction (image MSE summed over pixels, vector MSE in symlog space)."""
    reward: Annotated[float, non_negative] = 1.0
    """Two-hot cross-entropy of the reward head against the reward received at each step."""
    continuation: Annotated[float, non_negative] = 1.0
    """Binary cross-entropy of the continuation head against `1 - is_terminal`."""
    kl_dynamics: Annotated[float, non_negative] = 0.5
    """KL(stop_grad(posterior) || prior): trains the prior to predict the posterior."""
    kl_representation: Annotated[float, non_negative] = 0.1
    """KL(posterior || stop_grad(prior)): keeps the posterior predictable."""
    contrastive: Annotated[float, non_negative] = 0.0
    """InfoNCE between imagined future latents and the encoder's embeddings of the observed
    future (CoBERL / ReLIC spirit); the other steps of the batch are the negatives."""
    self_predictive: Annotated[float, non_negative] = 0.0
    """SPR-style: negative cosine similarity between projections of imagined future latents
    and a target network's projections of the filtered future latents (an EMA target when
    the caller passes `target_params`)."""
    open_loop_heads: Annotated[float, non_negative] = 0.0
    """The reward and continuation heads also trained on latents imagined 1..K steps ahead
    with the replayed actions (`open_loop_horizon`), the dynamics receiving their gradient."""
    open_loop_reconstruction: Annotated[float, non_negative] = 0.0
    """The decoder also trained on latents imagined 1..K steps ahead with the replayed actions
    (`open_loop_horizon`), against the observations seen then; the dynamics receive its
    gradient. Needs a decoder."""
    free_bits: Annotated[float, non_negative] = 1.0
    """Each KL term is clipped below at this many nats per step (DreamerV3)."""
    self_supervised_horizon: Annotated[int, positive] = 3
    """Steps imagined ahead (with the replayed actions) by the contrastive and self-predictive
    terms; predictions that cross an episode start or the window's end are masked."""
    open_loop_horizon: Annotated[int, positive] = 5
    """Steps K imagined ahead by the `open_loop_heads` and `open_loop_reconstruction` terms."""
    projection_size: Annotated[int, positive] = 64
    """Width of the projection heads of the contrastive and self-predictive terms."""
    contrastive_temperature: Annotated[float, positive] = 0.1
    """Temperature of the contrastive term's cosine-similarity logits."""

    def __post_init__(self):
        domains.check(self)

    def scales(self) -> dict[str, float]:
        """Loss-term name -> scale, for every field that is the scale of a term."""
        return {
            field.name: float(getattr(self, field.name))
            for field in dataclasses.fields(self)
            if field.name not in _NOT_SCALES
        }


_NOT_SCALES = (
    "free_bits",
    "self_supervised_horizon",
    "open_loop_horizon",
    "projection_size",
    "contrastive_temperature",
)


@dataclasses.dataclass(frozen=True)
class WorldModelConfig:
    """The shared world model; defaults are small enough to train on a CPU."""

    latent: Literal["rssm", "deterministic"] = "rssm"
    """`rssm`: deterministic GRU state plus categorical stochastic latents (DreamerV2/V3);
    `deterministic`: a GRU state only (MuZero-like), see `LatentState`."""
    deter: Annotated[int, positive] = 128
    """Size `D` of the deterministic (GRU) state."""
    stoch_groups: Annotated[int, positive] = 8
    """Number `G` of categorical latent variables (rssm only)."""
    stoch_classes: Annotated[int, positive] = 8
    """Number `C` of classes of each categorical latent (rssm only)."""
    observe_update_bias: Annotated[float, finite] = -1.0
    """Initial bias of the update gate of the deterministic latent's filtering GRU (deterministic
    only): at -1 (the GRU default, DreamerV3's) a filtering step moves the state ~27 % of the way
    towards what the observation says and keeps ~73 % of the prior, so a poor prior early in
    training carries into the posterior; +1 starts it at ~73 % towards the observation."""
    hidden: Annotated[int, positive] = 128
    """Width of every hidden layer (dynamics, heads, vector encoder and decoder)."""
    mlp_layers: Annotated[int, non_negative] = 2
    """Hidden layers of the heads and of the vector encoder/decoder."""
    encoder_depth: Annotated[int, positive] = 16
    """Channels of the first conv layer; each stride-2 layer doubles them."""
    min_resolution: Annotated[int, positive] = 4
    """The conv encoder halves the image down to this resolution (the decoder mirrors it)."""
    unimix: Annotated[float, below_one] = 0.01
    """Mixed into every categorical as a uniform distribution, so no class has zero mass."""
    reward_bins: Annotated[int, at_least(2)] = 255
    """Two-hot bins of the reward head, evenly spaced in symlog space over [-20, 20]."""
    decoder: bool = True
    """Whether the model has an observation decoder (needed by the reconstruction loss)."""
    decoder_upsample: Literal["transpose", "transpose_subpixel", "depth_to_space"] = (
        "transpose_subpixel"
    )
    """How the image decoder doubles its resolution at each layer (`networks.upsample`):
    `transpose_subpixel` (default), a stride-2 transposed conv (kernel 4) computed as a
    stride-1 conv and a pixel shuffle, ~4x faster fwd+bwd on XLA's CPU backend; `transpose`,
    the same layer (same parameters and initial values, same outputs up to rounding: trained
    side by side they learned identically, `benchmarks/configs/decoder_upsample.yaml`) as
    `hk.Conv2DTranspose`; `depth_to_space`, a stride-1 conv of kernel 2 to 4x the channels and
    a pixel shuffle: its own parameters (as many, the same FLOPs, every position of a 2x2
    output block reading the same 2x2 input patch), a little faster still, but it
    reconstructed worse in that comparison."""
    conv: Literal["matmul", "xla"] = "matmul"
    """How the image encoder's stride-2 convs and the decoder's sub-pixel convs are computed
    (`networks.conv2d`): `matmul` (default), im2col, patches gathered by slicing and one
    matrix multiply, whose gradient is matrix multiplies too; `xla`, XLA's convolution, whose
    input and kernel gradients of a strided conv run several times slower on XLA's CPU
    backend. Same parameters and initial values, the same function up to float rounding
    (`benchmarks/perf/peak.py` times both)."""
    losses: LossConfig = dataclasses.field(default_factory=LossConfig)
    """Loss scales and free bits."""

    def __post_init__(self):
        domains.check(self)
        for term in ("reconstruction", "open_loop_reconstruction"):
            if not self.decoder and getattr(self.losses, term) != 0:
                raise ValueError(f"decoder=False needs losses.{term}=0")

    @property
    def stoch_size(self) -> int:
        """Width of `LatentState.stoch`: `G * C` for rssm, 0 for deterministic."""
        return self.stoch_groups * self.stoch_classes if self.latent == "rssm" else 0

    @property
    def feature_size(self) -> int:
        """Width `F` of `features(state)`."""
        return self.deter + self.stoch_size


class LatentState(NamedTuple):
    """The world model's state at one step (or a sequence of them, with a `T` axis after `B`).

    For `latent="deterministic"` the stochastic part has zero width, so the same code path
    serves both latents and `features(state) == deter`.

    Attributes:
      deter: `[B, D]` deterministic (GRU) state.
      stoch: `[B, G * C]` flattened one-hot sample of the categorical latents (with
        straight-through gradients); `[B, 0]` for the deterministic latent.
      logits: `[B, G, C]` log-probabilities (unimix applied) the sample was drawn from;
        `[B, 0, C]` for the deterministic latent.
    """

    deter: Array
    stoch: Array
    logits: Array


class HeadOutputs(NamedTuple):
    """Raw head outputs on features `[..., F]`, in the units the losses use.

    Attributes:
      reward_logits: `[..., K]` logits of the two-hot reward distribution.
      continuation_logit: `[...]` logit of P(episode continues after this step).
      observation: predicted observation: `image` `[..., H, W, 3]` in [0, 1] units
        (unclipped), `vector` `[..., V]` in symlog space; empty without a decoder.
    """

    reward_logits: Array
    continuation_logit: Array
    observation: Mapping[str, Array]


class LossContext(NamedTuple):
    """Everything a loss term may read. Sequences are batch-major `[B, T, ...]`.

    Attributes:
      model: the world model's pure functions (to run heads, imagine, encode, ...).
      config: the model's configuration.
      params: parameters being trained.
      target_params: parameters of a slow copy for self-predictive targets (an EMA kept by
        the agent); `stop_gradient(params)` when the caller passes none.
      batch: the training batch (format in `world_model.py`).
      embeds: `[B, T, E]` encoder outputs of `batch["observation"]`.
      posteriors: `LatentState` `[B, T, ...]` filtered with the observations.
      priors: `LatentState` `[B, T, ...]` predicted one step ahead without the observation.
      features: `[B, T, F]` features of the posteriors.
      heads: `HeadOutputs` `[B, T, ...]` on `features`.
      rng: a key for terms that sample (e.g. negatives of a contrastive loss).
      initial_state: `LatentState` `[B, ...]` the sequence was filtered from (a target
        network filters the batch again from it).
    """

    model: "WorldModel"
    config: WorldModelConfig
    params: Params
    target_params: Params
    batch: Batch
    embeds: Array
    posteriors: LatentState
    priors: LatentState
    features: Array
    heads: HeadOutputs
    rng: Array
    initial_state: LatentState


LossTerm = Callable[[LossContext], "tuple[Array, dict[str, Array]]"]
"""A loss term: context -> (per-step loss `[B, T]`, extra metrics). The caller averages,
scales and reports it as `loss/<name>`."""


class WorldModel(NamedTuple):
    """The shared world model as pure functions over one Haiku parameter tree.

    `state` arguments are `LatentState` `[B, ...]`; sequences are batch-major `[B, T, ...]`.
    Discrete actions are int `[B]` (one-hot inside) or float one-hot `[B, A]` (e.g. a
    straight-through policy sample); continuous actions are float `[B, A]` in [-1, 1].
    """

    init: Callable[[Array], Params]
    """`init(rng) -> params`."""
    initial_state: Callable[[int], LatentState]
    """`initial_state(batch_size) -> LatentState` of zeros (what `is_first` resets to)."""
    encode: Callable[[Params, Observation], Array]
    """`encode(params, observation) -> embed [..., E]` for observation leaves `[..., *shape]`."""
    observe: Callable[..., "tuple[LatentState, LatentState]"]
    """`observe(params, state, prev_action, embed, is_first, rng) -> (posterior, prior)`: one
    filtering step; resets `state` to initial and zeroes `prev_action` where `is_first`."""
    observe_sequence: Callable[..., "tuple[LatentState, LatentState]"]
    """`observe_sequence(params, state, actions, embeds, is_first, rng, prev_action=None)
    -> (posteriors, priors)` `[B, T, ...]`; `actions[:, t]` is taken at step t, so step t is
    filtered with `actions[:, t-1]` (and `prev_action`, default zeros, at t=0)."""
    imagine: Callable[[Params, LatentState, Array, Array], LatentState]
    """`imagine(params, state, action, rng) -> prior`: one step of the prior dynamics."""
    features: Callable[[LatentState], Array]
    """`features(state) -> [..., F]`: what every head, policy and exploration module reads."""
    heads: Callable[[Params, Array], HeadOutputs]
    """`heads(params, features) -> HeadOutputs` (raw logits and predictions)."""
    reward: Callable[[Params, Array], Array]
    """`reward(params, features) -> [...]` decoded reward prediction."""
    continuation: Callable[[Params, Array], Array]
    """`continuation(params, features) -> [...]` probability that the episode continues."""
    decode: Callable[[Params, Array], "dict[str, Array]"]
    """`decode(params, features) -> observation dict`: `image` float in [0, 1], `vector`."""
    project: Callable[[Params, str, Array], Array]
    """`project(params, head, inputs) -> [..., P]`: a projection head of the self-supervised
    terms (`PROJECTION_HEADS`); a term's heads exist only while its scale is non-zero."""
    loss: Callable[..., "tuple[Array, tuple[dict[str, Array], LatentState, LatentState]]"]
    """`loss(params, batch, state, rng, target_params=None) -> (total, (metrics, posteriors,
    last_state))`."""
    open_loop: Callable[..., "dict[str, Array]"]
    """`open_loop(params, batch, context, horizon, rng) -> observation dict [B, horizon, ...]`
    imagined after `context` real steps."""
    config: WorldModelConfig
    """The configuration the model was built from."""
    action_size: int
    """`A`: number of discrete actions or size of the continuous action."""
    discrete: bool
    """Whether actions are discrete."""
