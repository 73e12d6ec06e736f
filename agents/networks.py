"""Haiku building blocks shared by every agent, and the symlog / two-hot value transforms.

Transforms (pure, shape-agnostic over leading axes):
  * `symlog(x) = sign(x) log(1 + |x|)` and its inverse `symexp` (Hafner et al. 2023, DreamerV3).
  * `two_hot(x, bins)`: the two-hot encoding of `symlog(x)` over `bins`, which are evenly
    spaced in symlog space (`symlog_bins`). `two_hot_decode(logits, bins)` is the inverse
    (expectation in symlog space, then `symexp`), and `two_hot_loss` the cross-entropy.

Modules: `MLP`, `ConvEncoder`, `ConvDecoder`, `VectorEncoder`, and `ObservationEncoder` /
`ObservationDecoder` for observation dicts with `image` (uint8 `[..., H, W, 3]`) and/or
`vector` (float32 `[..., D]`) keys. Every layer is Linear/Conv -> LayerNorm -> SiLU.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import rlax

LOG_PREFIX = "log_"  # same as envs.base.LOG_PREFIX; observation keys agents ignore
IMAGE_KEY = "image"
VECTOR_KEY = "vector"


# ---------------------------------------------------------------------------------------
# Transforms.


def symlog(x: chex.Array) -> chex.Array:
    """`sign(x) * log(1 + |x|)`: compresses large magnitudes, identity-like near zero."""
    return rlax.signed_logp1(jnp.asarray(x, jnp.float32))


def symexp(x: chex.Array) -> chex.Array:
    """Inverse of `symlog`: `sign(x) * (exp(|x|) - 1)`."""
    return rlax.signed_expm1(jnp.asarray(x, jnp.float32))


def symlog_bins(num_bins: int = 255, limit: float = 20.0) -> jax.Array:
    """`[num_bins]` bin centres evenly spaced in symlog space over `[-limit, limit]`."""
    if num_bins < 2:
        raise ValueError(f"num_bins={num_bins} must be at least 2")
    return jnp.linspace(-limit, limit, num_bins, dtype=jnp.float32)


def two_hot(x: chex.Array, bins: chex.Array) -> jax.Array:
    """Two-hot encoding `[..., K]` of `symlog(x)` (`x`: `[...]`) over evenly spaced `bins` `[K]`.

    The two bins around `symlog(x)` share the mass so that the expectation over `bins` is
    exactly `symlog(x)`; values outside the range are clipped to the end bins.
    """
    chex.assert_rank(bins, 1)
    chex.assert_type(x, float)
    return rlax.transform_to_2hot(symlog(x), bins[0], bins[-1], bins.shape[0])


def two_hot_decode(logits: chex.Array, bins: chex.Array) -> jax.Array:
    """Scalar `[...]` of categorical `logits` `[..., K]`: `symexp` of the expected bin."""
    chex.assert_rank(bins, 1)
    chex.assert_axis_dimension(logits, logits.ndim - 1, bins.shape[0])
    # rlax.transform_from_2hot adds a leading axis to unbatched inputs, so sum directly.
    return symexp(jnp.sum(jax.nn.softmax(logits, axis=-1) * bins, axis=-1))


def two_hot_loss(logits: chex.Array, target: chex.Array, bins: chex.Array) -> jax.Array:
    """Cross-entropy `[...]` between `two_hot(target)` and `softmax(logits)` `[..., K]`.

    The target encoding carries no gradient; the loss is minimal (equal to the entropy of the
    two-hot target) when `softmax(logits) == two_hot(target, bins)`.
    """
    chex.assert_rank(bins, 1)
    chex.assert_axis_dimension(logits, logits.ndim - 1, bins.shape[0])
    chex.assert_equal_shape_prefix([logits, target], target.ndim)
    target_probs = jax.lax.stop_gradient(two_hot(target, bins))
    return -jnp.sum(target_probs * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def image_to_float(image: chex.Array) -> jax.Array:
    """uint8 image in [0, 255] -> float32 in [0, 1]."""
    return jnp.asarray(image, jnp.float32) / 255.0


def agent_keys(observation: Mapping[str, object]) -> list[str]:
    """The sorted observation keys an agent reads (drops `log_*`); rejects unknown keys."""
    keys = sorted(k for k in observation if not k.startswith(LOG_PREFIX))
    unknown = [k for k in keys if k not in (IMAGE_KEY, VECTOR_KEY)]
    if unknown or not keys:
        raise ValueError(
            f"observation keys {sorted(observation)}: agents read `{IMAGE_KEY}` and/or "
            f"`{VECTOR_KEY}` (plus ignored `{LOG_PREFIX}*` keys); unknown: {unknown}"
        )
    return keys


# ---------------------------------------------------------------------------------------
# Modules.


def _norm_act(x: jax.Array, name: str) -> jax.Array:
    x = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name=name)(x)
    return jax.nn.silu(x)


class MLP(hk.Module):
    """`[..., I] -> [..., O]`: hidden layers of Linear -> LayerNorm -> SiLU, optional output."""

    def __init__(
        self,
        hidden_sizes: Sequence[int],
        output_size: Optional[int] = None,
        zero_output: bool = False,
        name: Optional[str] = None,
    ):
        """`zero_output` zero-initialises the output layer (heads that should start at 0)."""
        super().__init__(name=name)
        self._hidden_sizes = tuple(hidden_sizes)
        self._output_size = output_size
        self._zero_output = zero_output

    def __call__(self, x: chex.Array) -> jax.Array:
        for i, size in enumerate(self._hidden_sizes):
            x = _norm_act(hk.Linear(size, name=f"linear_{i}")(x), name=f"norm_{i}")
        if self._output_size is not None:
            w_init = hk.initializers.Constant(0.0) if self._zero_output else None
            x = hk.Linear(self._output_size, w_init=w_init, name="output")(x)
        return x


def _num_stride_layers(size: int, min_resolution: int) -> int:
    ratio = size / min_resolution
    layers = int(round(math.log2(ratio))) if ratio >= 1 else -1
    if layers < 1 or min_resolution * 2**layers != size:
        raise ValueError(
            f"image size {size} must be min_resolution={min_resolution} times a power of two"
        )
    return layers


CONV_IMPLS = ("matmul", "xla")
"""How the encoder's strided convs and the sub-pixel decoder's convs are computed (`conv`):
`matmul`, patches gathered by slicing and one matrix multiply (`conv2d`); `xla`, XLA's
convolution. The same function up to float rounding, with the same parameters."""


def check_conv(conv: str) -> None:
    """Raise a `ValueError` naming the choices unless `conv` is one of `CONV_IMPLS`."""
    if conv not in CONV_IMPLS:
        raise ValueError(f"conv={conv!r} must be one of {', '.join(CONV_IMPLS)}")


def space_to_depth(x: chex.Array, block: int = 2) -> jax.Array:
    """`[N, H, W, C]` -> `[N, H / block, W / block, block * block * C]`, the inverse of
    `depth_to_space` (channel index `(dy * block + dx) * C + c`)."""
    n, height, width, channels = x.shape
    x = x.reshape(n, height // block, block, width // block, block, channels)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(n, height // block, width // block, block * block * channels)


def conv2d(
    x: chex.Array,
    w: chex.Array,
    stride: int,
    padding: tuple[tuple[int, int], tuple[int, int]],
    impl: str = "matmul",
) -> jax.Array:
    """A 2-D convolution `[N, H, W, I]` x `[kh, kw, I, O]` -> `[N, H', W', O]` (NHWC, HWIO,
    explicit `padding` per spatial axis, as `lax.conv_general_dilated`).

    `impl="matmul"` computes it as im2col: the input padded, a stride-2 conv of even kernel
    rewritten as a stride-1 conv of half the kernel over `space_to_depth` of the input (so the
    patches are contiguous slices), the `kh * kw` shifted slices concatenated along channels
    and one `[N H' W', kh kw I] x [kh kw I, O]` matrix multiply. Its gradient is slices, pads
    and matrix multiplies too, where XLA's CPU backend computes a strided conv's input gradient
    as a conv over a zero-dilated tensor and its kernel gradient as a dilated conv, both
    several times slower than a matmul of the same FLOPs. `impl="xla"`: XLA's conv.
    """
    if impl == "xla":
        return jax.lax.conv_general_dilated(
            x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    check_conv(impl)
    (top, bottom), (left, right) = padding
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw, inputs, outputs = w.shape
    if stride == 2:
        # Output pixel i reads padded inputs 2i .. 2i + k - 1; in blocks of 2, blocks i ..
        # i + k/2 - 1. Pad to whole blocks (the extra row/column is never read).
        if kh % 2 or kw % 2:
            raise ValueError(f"conv2d(impl='matmul') with stride 2 needs an even kernel: {w.shape}")
        out_h, out_w = (x.shape[1] - kh) // 2 + 1, (x.shape[2] - kw) // 2 + 1
        x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)))
        x = space_to_depth(x, 2)
        w = w.reshape(kh // 2, 2, kw // 2, 2, inputs, outputs)
        w = jnp.transpose(w, (0, 2, 1, 3, 4, 5)).reshape(kh // 2, kw // 2, 4 * inputs, outputs)
        kh, kw = kh // 2, kw // 2
    elif stride == 1:
        out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    else:
        raise ValueError(f"conv2d(impl='matmul') supports strides 1 and 2, got {stride}")
    n = x.shape[0]
    patches = [x[:, dy : dy + out_h, dx : dx + out_w] for dy in range(kh) for dx in range(kw)]
    patches = jnp.concatenate(patches, axis=-1) if len(patches) > 1 else patches[0]
    out = patches.reshape(n * out_h * out_w, -1) @ w.reshape(-1, outputs)
    return out.reshape(n, out_h, out_w, outputs)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """XLA's (and `hk.Conv2D`'s) SAME padding of one axis: `(before, after)`."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2D(hk.Module):
    """`hk.Conv2D(channels, kernel, stride)` with padding SAME, computed by `conv2d` (`impl`):
    the same parameters (`w` `[k, k, I, O]`, `b` `[O]`), initializers and so initial values."""

    def __init__(
        self,
        channels: int,
        kernel: int,
        stride: int = 1,
        impl: str = "matmul",
        w_init: Optional[hk.initializers.Initializer] = None,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._channels = channels
        self._kernel = kernel
        self._stride = stride
        self._impl = impl
        self._w_init = w_init

    def __call__(self, x: chex.Array) -> jax.Array:
        inputs = x.shape[-1]
        # hk.Conv2D's default initializer.
        w_init = self._w_init or hk.initializers.TruncatedNormal(
            stddev=1.0 / math.sqrt(self._kernel * self._kernel * inputs)
        )
        shape = (self._kernel, self._kernel, inputs, self._channels)
        w = hk.get_parameter("w", shape, x.dtype, init=w_init)
        b = hk.get_parameter("b", (self._channels,), x.dtype, init=jnp.zeros)
        padding = tuple(same_padding(size, self._kernel, self._stride) for size in x.shape[1:3])
        return conv2d(x, w, self._stride, padding, self._impl) + b


class ConvEncoder(hk.Module):
    """uint8 image `[..., H, W, C]` -> `[..., E]` by stride-2 convs with channels `depth * 2**i`.

    Halves the resolution until `min_resolution` (16x16 -> 2 layers, 64x64 -> 4 layers).
    """

    def __init__(
        self,
        depth: int = 16,
        min_resolution: int = 4,
        kernel: int = 4,
        conv: str = "matmul",
        name: Optional[str] = None,
    ):
        """`conv`: how the convs are computed (`CONV_IMPLS`); the parameters are the same."""
        super().__init__(name=name)
        check_conv(conv)
        self._depth = depth
        self._min_resolution = min_resolution
        self._kernel = kernel
        self._conv = conv

    def __call__(self, image: chex.Array) -> jax.Array:
        if image.ndim < 3:
            raise ValueError(f"ConvEncoder needs images [..., H, W, C], got {image.shape}")
        height, width = image.shape[-3:-1]
        if height != width:
            raise ValueError(f"ConvEncoder needs square images, got {image.shape[-3:]}")
        lead = image.shape[:-3]
        x = image_to_float(image).reshape((-1,) + image.shape[-3:]) - 0.5
        for i in range(_num_stride_layers(height, self._min_resolution)):
            conv = Conv2D(
                self._depth * 2**i, self._kernel, stride=2, impl=self._conv, name=f"conv_{i}"
            )
            x = _norm_act(conv(x), name=f"norm_{i}")
        return x.reshape(lead + (-1,))


UPSAMPLES = ("transpose", "transpose_subpixel", "depth_to_space")
"""How `ConvDecoder` doubles the resolution (`upsample`): `transpose`, a stride-2 transposed
conv; `transpose_subpixel`, the same layer computed as a stride-1 conv and a pixel shuffle;
`depth_to_space`, a stride-1 conv of half the kernel to 4x the channels and a pixel shuffle."""


def depth_to_space(x: chex.Array, block: int = 2) -> jax.Array:
    """`[N, H, W, block * block * C]` -> `[N, H * block, W * block, C]`: the channels of each
    pixel fill a `block` x `block` patch, row-major (channel index `(dy * block + dx) * C + c`)."""
    n, height, width, channels = x.shape
    if channels % (block * block):
        raise ValueError(f"depth_to_space needs channels divisible by {block * block}: {x.shape}")
    c = channels // (block * block)
    x = x.reshape(n, height, width, block, block, c)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(n, height * block, width * block, c)


class SubpixelTranspose(hk.Module):
    """`hk.Conv2DTranspose(channels, 4, stride=2)` (padding SAME) computed without a
    transposed conv: the same parameters (`w` `[4, 4, O, I]`, `b` `[O]`, same initializers,
    so the same initial values), the same outputs up to float rounding.

    A transposed conv of stride 2 and kernel 4 gives output pixel `2i + p` (phase `p`) from
    inputs `i - 1 + p` and `i + p` through kernel taps `1 - p` and `3 - p` (per axis). So one
    stride-1 conv of kernel 2, over the input padded by one pixel, computes every phase of
    every output pixel (`4 O` channels, its kernel gathered from `w`), and a 2x2 pixel
    shuffle, cropped by one pixel on each side, puts them in place. XLA's CPU backend runs the
    transposed conv as a conv over the input dilated with zeros, several times slower.
    """

    TAPS = ((1, 0), (3, 2))
    """`TAPS[t][q]`: the row (column) of `w` at tap `t` of the stride-1 conv for the
    shuffled phase `q` (`q = 1 - p`, the crop shifts the phases by one)."""

    def __init__(self, channels: int, conv: str = "matmul", name: Optional[str] = None):
        """`conv`: how the stride-1 conv is computed (`CONV_IMPLS`)."""
        super().__init__(name=name)
        self._channels = channels
        self._conv = conv

    def __call__(self, x: chex.Array) -> jax.Array:
        n, height, width, inputs = x.shape
        stddev = 1.0 / math.sqrt(4 * 4 * inputs)  # hk.Conv2DTranspose's default
        w = hk.get_parameter(
            "w",
            (4, 4, self._channels, inputs),
            x.dtype,
            init=hk.initializers.TruncatedNormal(stddev=stddev),
        )
        b = hk.get_parameter("b", (self._channels,), x.dtype, init=jnp.zeros)
        taps = jnp.asarray(self.TAPS)
        kernel = w[taps[:, :, None, None], taps[None, None, :, :]]  # [ty, qy, tx, qx, O, I]
        kernel = jnp.transpose(kernel, (0, 2, 5, 1, 3, 4)).reshape(2, 2, inputs, -1)
        if self._conv == "matmul":
            phases = conv2d(x, kernel, 1, ((1, 1), (1, 1)), "matmul")
        else:
            # One pixel before each axis; SAME adds the one after (XLA's CPU backend runs SAME
            # convs faster than VALID ones, whose input gradient needs padding on both sides).
            padded = jnp.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0)))
            phases = jax.lax.conv_general_dilated(
                padded, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        return depth_to_space(phases, 2)[:, 1 : 2 * height + 1, 1 : 2 * width + 1] + b


def upsample(
    x: chex.Array, channels: int, kernel: int, mode: str, index: int, conv: str = "matmul"
) -> jax.Array:
    """`[N, H, W, I]` -> `[N, 2H, 2W, channels]`: the decoder's stride-2 upsampling layer.

    `transpose`: `hk.Conv2DTranspose(channels, kernel, stride=2)`, named `deconv_{index}`.
    `transpose_subpixel`: the same layer, parameters and initial values (kernel 4 only),
    computed by `SubpixelTranspose`. `depth_to_space`: a stride-1 `hk.Conv2D(4 * channels,
    kernel // 2)` and a 2x2 pixel shuffle (sub-pixel convolution, Shi et al. 2016), named
    `upsample_{index}`: every output pixel reads a `kernel/2` x `kernel/2` patch of inputs
    through weights of its own position in the 2x2 block, with the transposed conv's parameter
    count and FLOPs, but all four positions read the same patch (the transposed conv's phases
    read patches shifted by one pixel). Its weights start with the transposed conv's standard
    deviation (`1 / sqrt(kernel**2 * I)`), so both start at the same output scale. XLA's CPU
    backend runs both stride-1 forms several times faster than the zero-dilated conv it makes
    of a transposed one. `conv` (`CONV_IMPLS`) computes the stride-1 convs of both.
    """
    if mode == "transpose":
        return hk.Conv2DTranspose(channels, kernel, stride=2, name=f"deconv_{index}")(x)
    if mode == "transpose_subpixel":
        if kernel != 4:
            raise ValueError(f"transpose_subpixel upsampling needs kernel 4, got {kernel}")
        return SubpixelTranspose(channels, conv, name=f"deconv_{index}")(x)
    if mode != "depth_to_space":
        raise ValueError(f"upsample={mode!r} must be one of {', '.join(UPSAMPLES)}")
    if kernel % 2:
        raise ValueError(f"depth_to_space upsampling needs an even kernel, got {kernel}")
    stddev = 1.0 / math.sqrt(kernel**2 * x.shape[-1])
    layer = Conv2D(
        4 * channels,
        kernel // 2,
        impl=conv,
        w_init=hk.initializers.TruncatedNormal(stddev=stddev),
        name=f"upsample_{index}",
    )
    return depth_to_space(layer(x), 2)


class ConvDecoder(hk.Module):
    """Features `[..., F]` -> image `[..., H, W, C]` in [0, 1] units (unclipped), mirroring
    `ConvEncoder` with stride-2 upsampling layers (`upsample`, one of `UPSAMPLES`)."""

    def __init__(
        self,
        output_shape: Sequence[int],
        depth: int = 16,
        min_resolution: int = 4,
        kernel: int = 4,
        upsample: str = "transpose_subpixel",
        conv: str = "matmul",
        name: Optional[str] = None,
    ):
        """`conv`: how the stride-1 convs of the sub-pixel upsamplings are computed
        (`CONV_IMPLS`; `upsample="transpose"` is always XLA's transposed conv)."""
        super().__init__(name=name)
        self._output_shape = tuple(output_shape)
        height, width, _ = self._output_shape
        if height != width:
            raise ValueError(f"ConvDecoder needs square images, got {self._output_shape}")
        if upsample not in UPSAMPLES:
            raise ValueError(f"upsample={upsample!r} must be one of {', '.join(UPSAMPLES)}")
        check_conv(conv)
        self._conv = conv
        self._layers = _num_stride_layers(height, min_resolution)
        self._depth = depth
        self._min_resolution = min_resolution
        self._kernel = kernel
        self._upsample = upsample

    def __call__(self, features: chex.Array) -> jax.Array:
        lead = features.shape[:-1]
        channels = [self._depth * 2**i for i in range(self._layers)]
        r = self._min_resolution
        x = hk.Linear(r * r * channels[-1], name="project")(
            features.reshape(-1, features.shape[-1])
        )
        x = _norm_act(x.reshape(-1, r, r, channels[-1]), name="project_norm")
        for i in reversed(range(1, self._layers)):
            x = upsample(x, channels[i - 1], self._kernel, self._upsample, i, self._conv)
            x = _norm_act(x, name=f"norm_{i}")
        x = upsample(x, self._output_shape[-1], self._kernel, self._upsample, 0, self._conv)
        x = x + 0.5
        return x.reshape(lead + self._output_shape)


class VectorEncoder(hk.Module):
    """float vector `[..., D]` -> `[..., E]`: an MLP over `symlog(vector)`."""

    def __init__(self, hidden_sizes: Sequence[int], name: Optional[str] = None):
        super().__init__(name=name)
        self._hidden_sizes = tuple(hidden_sizes)

    def __call__(self, vector: chex.Array) -> jax.Array:
        return MLP(self._hidden_sizes, name="mlp")(symlog(vector))


class ObservationEncoder(hk.Module):
    """Observation dict (`image` and/or `vector`, `log_*` ignored) -> embedding `[..., E]`.

    The embedding concatenates the image and vector embeddings in sorted key order.
    """

    def __init__(
        self,
        depth: int = 16,
        hidden_sizes: Sequence[int] = (128, 128),
        min_resolution: int = 4,
        conv: str = "matmul",
        name: Optional[str] = None,
    ):
        """`conv`: how the image encoder's convs are computed (`CONV_IMPLS`)."""
        super().__init__(name=name)
        self._depth = depth
        self._hidden_sizes = tuple(hidden_sizes)
        self._min_resolution = min_resolution
        self._conv = conv

    def __call__(self, observation: Mapping[str, chex.Array]) -> jax.Array:
        embeddings = []
        for key in agent_keys(observation):
            if key == IMAGE_KEY:
                encoder = ConvEncoder(
                    self._depth, self._min_resolution, conv=self._conv, name="image_encoder"
                )
            else:
                encoder = VectorEncoder(self._hidden_sizes, name="vector_encoder")
            embeddings.append(encoder(observation[key]))
        return jnp.concatenate(embeddings, axis=-1)


class ObservationDecoder(hk.Module):
    """Features `[..., F]` -> dict of predictions for the keys of `observation_shapes`.

    `image`: `[..., H, W, C]` in [0, 1] units (unclipped); `vector`: `[..., D]` in symlog space.
    """

    def __init__(
        self,
        observation_shapes: Mapping[str, Sequence[int]],
        depth: int = 16,
        hidden_sizes: Sequence[int] = (128, 128),
        min_resolution: int = 4,
        upsample: str = "transpose_subpixel",
        conv: str = "matmul",
        name: Optional[str] = None,
    ):
        """`upsample`: how the image decoder doubles its resolution (`UPSAMPLES`); `conv`:
        how its convs are computed (`CONV_IMPLS`)."""
        super().__init__(name=name)
        self._shapes = {k: tuple(observation_shapes[k]) for k in agent_keys(observation_shapes)}
        self._depth = depth
        self._hidden_sizes = tuple(hidden_sizes)
        self._min_resolution = min_resolution
        self._upsample = upsample
        self._conv = conv

    def __call__(self, features: chex.Array) -> dict[str, jax.Array]:
        predictions = {}
        for key, shape in self._shapes.items():
            if key == IMAGE_KEY:
                decoder = ConvDecoder(
                    shape,
                    self._depth,
                    self._min_resolution,
                    upsample=self._upsample,
                    conv=self._conv,
                    name="image_decoder",
                )
            else:
                decoder = MLP(self._hidden_sizes, output_size=shape[-1], name="vector_decoder")
            predictions[key] = decoder(features)
        return predictions
