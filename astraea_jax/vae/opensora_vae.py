"""OpenSora v1.2 video VAE (`OpenSoraVAE_V1_2`) in Flax NNX.

Follows hpcaitech/Open-Sora at commit 3552145f847b5171cd2c85982d116b04eb98c5bf:
`opensora/models/vae/vae.py` (`VideoAutoencoderPipeline`, `VideoAutoencoderKL`,
`OpenSoraVAE_V1_2`) and `opensora/models/vae/vae_temporal.py`
(`VAE_Temporal_SD`). Two VAEs in series:

  spatial   the SD(XL) image VAE, diffusers `AutoencoderKL` (OpenSora loads
            PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers, subfolder vae),
            applied to every frame on its own: 8x in space, 3 <-> 4 channels;
  temporal  `VAE_Temporal`, a MAGVIT-style VAE of causal 3-D convolutions
            over the spatial latents: 4x in time, 4 <-> 4 channels.

  encode(video):  x_z = spatial.encode(frame) * 0.18215, frame by frame
                  z   = temporal.encode(chunk of 17 x_z frames), chunk by chunk
                  latents = (z - shift) / scale
  decode(latents, num_frames):
                  z   = latents * scale + shift
                  x_z = temporal.decode(chunk of 5 z frames), chunk by chunk
                  video = spatial.decode(x_z / 0.18215), frame by frame

Micro-frame chunks (`micro_frame_size` = 17 in v1.2) are independent: the
temporal VAE sees one chunk at a time and its GroupNorms take statistics
over the whole chunk (time included), so chunks are not streamed but run
whole, under `jax.lax.map` (full chunks) plus one call for a shorter last
chunk. The temporal encoder pads each chunk at the FRONT with zeros to a
multiple of 4 frames (17 -> 20 frames -> 5 latent frames); its decoder
drops as many frames from the front.

Scaling factor: `VideoAutoencoderKL` hard-codes 0.18215 (the SD 1.x value),
not the 0.13025 of the SDXL VAE's own config.json; we follow the code.

Sampling: both VAEs return a diagonal Gaussian; OpenSora's `encode` draws
from both (`posterior.sample()`). `encode(video)` returns the means (the
mode, deterministic); `encode(video, key=...)` samples like OpenSora.

Layout. The public API takes and returns (B, C, T, H, W) like the original;
inside, activations are channels-last and kernels are (*window, in, out).
Convolutions take `config.dtype` inputs; GroupNorm statistics and the
attention softmax run in float32; latents and outputs are float32.
Parameter names follow the checkpoints (diffusers names inside
`spatial_vae`, OpenSora's inside `temporal_vae`), so that
converters/opensora_vae.py is mostly a join of the path.

Usage:

  vae = converters.opensora_vae.load_vae("OpenSora-VAE-v1.2/")
  video = opensora_vae.decode_jit(vae, latents, num_frames=51, clamp=True)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.configs import ModelConfig

F32 = jnp.float32

# `VideoAutoencoderKL.encode` multiplies the SD-VAE latents by this and
# `decode` divides by it (vae.py at the commit above).
SD_SCALING_FACTOR = 0.18215
# Per-channel normalisation of the temporal latents, `OpenSoraVAE_V1_2` in
# vae.py: latents = (z - shift) / scale.
OPENSORA_V1_2_SHIFT = (-0.10, 0.34, 0.27, 0.98)
OPENSORA_V1_2_SCALE = (3.85, 2.32, 2.33, 3.06)
# diffusers `DiagonalGaussianDistribution` and OpenSora's copy of it clamp
# the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)
# GroupNorm epsilons: diffusers' VAE blocks pass 1e-6; OpenSora's temporal
# VAE uses torch's nn.GroupNorm default.
SPATIAL_NORM_EPS = 1e-6
TEMPORAL_NORM_EPS = 1e-5

_PRECISIONS = {None: None, "default": jax.lax.Precision.DEFAULT,
               "high": jax.lax.Precision.HIGH,
               "highest": jax.lax.Precision.HIGHEST}
_ACTIVATIONS = {"swish": jax.nn.silu, "silu": jax.nn.silu,
                "relu": jax.nn.relu}


def _tuple_fields(obj, names):
  for name in names:
    object.__setattr__(obj, name, tuple(getattr(obj, name)))


def _check_groups(what, channels, groups):
  bad = sorted({c for c in channels if c % groups})
  if bad:
    raise ValueError(f"{what}: channel counts {bad} are not multiples of "
                     f"{groups=} (GroupNorm)")


@dataclasses.dataclass(frozen=True)
class SpatialVAEConfig:
  """diffusers `AutoencoderKL` (DownEncoderBlock2D / UpDecoderBlock2D, SiLU)
  sizes, named as its config.json names them. Defaults: the SD / SDXL VAE
  (PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers `vae/config.json`)."""

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True

  def __post_init__(self):
    _tuple_fields(self, ["block_out_channels"])
    if not self.block_out_channels:
      raise ValueError(f"{self.block_out_channels=} must not be empty")
    if self.layers_per_block < 1:
      raise ValueError(f"{self.layers_per_block=} must be >= 1")
    _check_groups("SpatialVAEConfig.block_out_channels",
                  self.block_out_channels, self.norm_num_groups)

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


@dataclasses.dataclass(frozen=True)
class TemporalVAEConfig:
  """OpenSora's `VAE_Temporal` arguments; defaults: `VAE_Temporal_SD`."""

  in_out_channels: int = 4
  latent_embed_dim: int = 4
  embed_dim: int = 4
  filters: int = 128
  num_res_blocks: int = 4
  channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
  # Encoder stages (all but the last) that also halve time; the decoder
  # mirrors them. Space is never resampled.
  temporal_downsample: tuple[bool, ...] = (False, True, True)
  num_groups: int = 32
  activation_fn: str = "swish"

  def __post_init__(self):
    _tuple_fields(self, ["channel_multipliers", "temporal_downsample"])
    if not self.channel_multipliers:
      raise ValueError(f"{self.channel_multipliers=} must not be empty")
    if len(self.temporal_downsample) != len(self.channel_multipliers) - 1:
      raise ValueError(
          f"{self.temporal_downsample=} needs an entry per stage but the "
          f"last, {len(self.channel_multipliers) - 1} for "
          f"{self.channel_multipliers=}")
    if self.num_res_blocks < 1:
      raise ValueError(f"{self.num_res_blocks=} must be >= 1")
    if self.activation_fn not in _ACTIVATIONS:
      raise ValueError(f"{self.activation_fn=} must be one of "
                       f"{sorted(_ACTIVATIONS)}")
    _check_groups("TemporalVAEConfig filters x channel_multipliers",
                  [self.filters * m for m in self.channel_multipliers],
                  self.num_groups)

  @property
  def temporal_factor(self) -> int:
    return 2 ** sum(bool(d) for d in self.temporal_downsample)

  def latent_frames(self, num_frames: int) -> int:
    """`get_latent_size` in time: frames padded up to a multiple of the
    factor, then divided."""
    return -(-num_frames // self.temporal_factor)


@dataclasses.dataclass(frozen=True)
class OpenSoraVAEConfig(ModelConfig):
  """`OpenSoraVAE_V1_2`: the spatial and temporal VAEs and how they chain."""

  MODEL: ClassVar[str] = "opensora_vae"

  spatial: SpatialVAEConfig = dataclasses.field(
      default_factory=SpatialVAEConfig)
  temporal: TemporalVAEConfig = dataclasses.field(
      default_factory=TemporalVAEConfig)
  # Frames per independent temporal chunk (None: the whole video at once).
  micro_frame_size: int | None = 17
  # Frames per spatial VAE call (memory only; the results do not depend on
  # it). None: all frames at once.
  micro_batch_size: int | None = 4
  spatial_scaling_factor: float = SD_SCALING_FACTOR
  shift: tuple[float, ...] = OPENSORA_V1_2_SHIFT
  scale: tuple[float, ...] = OPENSORA_V1_2_SCALE
  # Convolution inputs are cast to `dtype`; parameters are stored in
  # `param_dtype`. `precision` is passed to every convolution/einsum
  # (None = JAX's default, which may use TF32 for float32 on GPUs).
  dtype: str = "float32"
  param_dtype: str = "float32"
  precision: str | None = None

  def __post_init__(self):
    for name, cls in (("spatial", SpatialVAEConfig),
                      ("temporal", TemporalVAEConfig)):
      value = getattr(self, name)
      if isinstance(value, dict):
        object.__setattr__(self, name, cls(**value))
    _tuple_fields(self, ["shift", "scale"])
    s, t = self.spatial, self.temporal
    if t.in_out_channels != s.latent_channels:
      raise ValueError(
          f"temporal.in_out_channels={t.in_out_channels} must equal "
          f"spatial.latent_channels={s.latent_channels}: the temporal VAE "
          "runs on the spatial latents")
    for name in ("shift", "scale"):
      value = getattr(self, name)
      if len(value) != t.embed_dim:
        raise ValueError(f"{name}={value} needs one value per latent "
                         f"channel, temporal.embed_dim={t.embed_dim}")
    if min(self.scale) <= 0:
      raise ValueError(f"{self.scale=} must be positive")
    for name in ("micro_frame_size", "micro_batch_size"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"{name}={value} must be >= 1 or None")
    if self.spatial_scaling_factor <= 0:
      raise ValueError(f"{self.spatial_scaling_factor=} must be positive")
    if self.precision not in _PRECISIONS:
      raise ValueError(f"{self.precision=} must be one of {list(_PRECISIONS)}")
    self.check_dtypes()

  @property
  def lax_precision(self):
    return _PRECISIONS[self.precision]

  @property
  def latent_channels(self) -> int:
    return self.temporal.embed_dim

  @property
  def spatial_factor(self) -> int:
    return self.spatial.spatial_factor

  def micro_chunks(self, num_frames: int) -> tuple[int, int]:
    """(number of full micro-frame chunks, frames in the last short one)."""
    if num_frames < 1:
      raise ValueError(f"{num_frames=} must be >= 1")
    if self.micro_frame_size is None:
      return 0, num_frames
    return divmod(num_frames, self.micro_frame_size)

  def latent_frames(self, num_frames: int) -> int:
    """Latent frames of a video of `num_frames` frames (any count)."""
    full, rest = self.micro_chunks(num_frames)
    per_chunk = (self.temporal.latent_frames(self.micro_frame_size)
                 if full else 0)
    return full * per_chunk + (self.temporal.latent_frames(rest)
                               if rest else 0)

  # Presets ---------------------------------------------------------------

  @classmethod
  def opensora_v1_2(cls, **overrides) -> OpenSoraVAEConfig:
    """hpcai-tech/OpenSora-VAE-v1.2 as the v1.2 inference configs build it
    (`OpenSoraVAE_V1_2(micro_frame_size=17, micro_batch_size=4)`)."""
    return cls(**overrides)

  @classmethod
  def tiny(cls, **overrides) -> OpenSoraVAEConfig:
    """A few-kilobyte VAE with every kind of layer, for tests: 2x in space
    (one down/upsampling stage), 4x in time, GroupNorm of 4 groups."""
    kw = dict(
        spatial=SpatialVAEConfig(block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4),
        temporal=TemporalVAEConfig(filters=8, num_res_blocks=1,
                                   num_groups=4),
        micro_frame_size=9, micro_batch_size=3)
    kw.update(overrides)
    return cls(**kw)


# Layers -----------------------------------------------------------------------


def _kernel_init(rngs, shape, param_dtype):
  """Normal(0, 1/fan_in) kernel (random weights; checkpoints replace them).

  Built eagerly, the values come from numpy seeded by the rng stream:
  jax.random would compile one XLA program per kernel shape. Under a trace
  (jit, nnx.eval_shape) the key is a tracer and jax.random is used; it is
  tested for up front, as converting a tracer to numpy only to catch the
  error costs ~50 ms per kernel (jax builds a detailed message).
  """
  key = rngs.params()
  std = float(np.prod(shape[:-1])) ** -0.5
  if isinstance(key, jax.core.Tracer):
    return (jax.random.normal(key, shape, F32) * std).astype(param_dtype)
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  values = np.random.default_rng(np.asarray(key).ravel()).standard_normal(
      shape, np.float32)
  return jnp.asarray(values * np.float32(std), dtype=param_dtype)


def _conv(x, kernel, *, strides, padding, config: OpenSoraVAEConfig):
  """Channels-last convolution: x (N, *space, I), kernel (*window, I, O)."""
  dtype = config.compute_dtype
  spec = {3: ("NDHWC", "DHWIO", "NDHWC"), 2: ("NHWC", "HWIO", "NHWC")}
  dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape,
                                      spec[kernel.ndim - 2])
  return jax.lax.conv_general_dilated(
      x.astype(dtype), kernel.astype(dtype), strides, padding,
      dimension_numbers=dn, precision=config.lax_precision)


class Conv(nnx.Module):
  """N-D convolution with fixed zero padding; kernel (*window, in, out).

  Used for 2-D convolutions on (N, H, W, C), and by `CausalConv3d`.
  """

  def __init__(self, in_dim, out_dim, window, *, config: OpenSoraVAEConfig,
               rngs: nnx.Rngs, stride=None, padding=None, bias=True):
    window = tuple(window)
    self.config = config
    self.stride = tuple(stride or (1,) * len(window))
    # Default: 'same' for odd windows and stride 1.
    self.padding = tuple(tuple(p) for p in (
        padding or [(k // 2, k // 2) for k in window]))
    self.kernel = nnx.Param(_kernel_init(rngs, (*window, in_dim, out_dim),
                                         config.weight_dtype))
    self.bias = (nnx.Param(jnp.zeros((out_dim,), config.weight_dtype))
                 if bias else None)

  def __call__(self, x):
    y = _conv(x, self.kernel[...], strides=self.stride, padding=self.padding,
              config=self.config)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm on channels-last x (N, ..., C), affine.

  Groups are contiguous channel ranges; statistics (biased variance) over
  each group's channels and every non-batch position, in float32.
  """

  def __init__(self, num_groups: int, dim: int, *, eps: float,
               config: OpenSoraVAEConfig, rngs: nnx.Rngs):
    del rngs
    if dim % num_groups:
      raise ValueError(f"{dim=} must be a multiple of {num_groups=}")
    self.num_groups = num_groups
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), config.weight_dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), config.weight_dtype))

  def __call__(self, x):
    n, c = x.shape[0], x.shape[-1]
    xf = x.astype(F32).reshape(n, -1, self.num_groups, c // self.num_groups)
    mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=(1, 3), keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    y = y * self.weight[...].astype(F32) + self.bias[...].astype(F32)
    return y.astype(x.dtype)


class Dense(nnx.Module):
  """x @ kernel + bias; kernel (in, out) (a torch Linear weight transposed)."""

  def __init__(self, in_dim, out_dim, *, config: OpenSoraVAEConfig,
               rngs: nnx.Rngs):
    self.config = config
    self.kernel = nnx.Param(_kernel_init(rngs, (in_dim, out_dim),
                                         config.weight_dtype))
    self.bias = nnx.Param(jnp.zeros((out_dim,), config.weight_dtype))

  def __call__(self, x):
    dtype = self.config.compute_dtype
    y = jnp.einsum("...i,io->...o", x.astype(dtype),
                   self.kernel[...].astype(dtype),
                   precision=self.config.lax_precision)
    return y + self.bias[...].astype(y.dtype)


# The spatial VAE: diffusers AutoencoderKL -------------------------------------


class ResnetBlock2D(nnx.Module):
  """x -> shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))).

  diffusers `ResnetBlock2D` without time embedding; `conv_shortcut` (1x1)
  when the channel count changes. Output scale factor 1.
  """

  def __init__(self, in_dim, out_dim, *, config: OpenSoraVAEConfig,
               rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    groups = config.spatial.norm_num_groups
    self.norm1 = GroupNorm(groups, in_dim, eps=SPATIAL_NORM_EPS, **kw)
    self.conv1 = Conv(in_dim, out_dim, (3, 3), **kw)
    self.norm2 = GroupNorm(groups, out_dim, eps=SPATIAL_NORM_EPS, **kw)
    self.conv2 = Conv(out_dim, out_dim, (3, 3), **kw)
    self.conv_shortcut = (Conv(in_dim, out_dim, (1, 1), **kw)
                          if in_dim != out_dim else None)

  def __call__(self, x):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return shortcut + h


class Attention2D(nnx.Module):
  """The mid-block self-attention: one head of width C over the H*W
  positions of an image, GroupNorm first, residual added (diffusers
  `Attention(heads=1, dim_head=C, norm_num_groups=..., residual_connection
  =True)`). Scale C^-1/2, logits and softmax in float32. Not routed through
  models.layers.attention: it is no part of Astraea's token selection."""

  def __init__(self, dim, *, config: OpenSoraVAEConfig, rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    self.config = config
    self.group_norm = GroupNorm(config.spatial.norm_num_groups, dim,
                                eps=SPATIAL_NORM_EPS, **kw)
    self.to_q = Dense(dim, dim, **kw)
    self.to_k = Dense(dim, dim, **kw)
    self.to_v = Dense(dim, dim, **kw)
    self.to_out = Dense(dim, dim, **kw)

  def __call__(self, x):
    n, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(n, h * w, c)
    q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
    prec = self.config.lax_precision
    logits = jnp.einsum("nqc,nkc->nqk", q, k, precision=prec,
                        preferred_element_type=F32) * (c ** -0.5)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("nqk,nkc->nqc", probs, v, precision=prec)
    return x + self.to_out(out).reshape(n, h, w, c).astype(x.dtype)


class Downsample2D(nnx.Module):
  """Zero pad right/bottom by 1, 3x3 conv stride 2 (diffusers, padding=0)."""

  def __init__(self, dim, *, config: OpenSoraVAEConfig, rngs: nnx.Rngs):
    self.conv = Conv(dim, dim, (3, 3), stride=(2, 2),
                     padding=((0, 1), (0, 1)), config=config, rngs=rngs)

  def __call__(self, x):
    return self.conv(x)


class Upsample2D(nnx.Module):
  """Nearest x2, then 3x3 conv."""

  def __init__(self, dim, *, config: OpenSoraVAEConfig, rngs: nnx.Rngs):
    self.conv = Conv(dim, dim, (3, 3), config=config, rngs=rngs)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownEncoderBlock2D(nnx.Module):
  def __init__(self, in_dim, out_dim, *, downsample: bool,
               config: OpenSoraVAEConfig, rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    self.resnets = nnx.List([
        ResnetBlock2D(in_dim if j == 0 else out_dim, out_dim, **kw)
        for j in range(config.spatial.layers_per_block)])
    self.downsamplers = nnx.List([Downsample2D(out_dim, **kw)]
                                 if downsample else [])

  def __call__(self, x):
    for layer in [*self.resnets, *self.downsamplers]:
      x = layer(x)
    return x


class UpDecoderBlock2D(nnx.Module):
  def __init__(self, in_dim, out_dim, *, upsample: bool,
               config: OpenSoraVAEConfig, rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    self.resnets = nnx.List([
        ResnetBlock2D(in_dim if j == 0 else out_dim, out_dim, **kw)
        for j in range(config.spatial.layers_per_block + 1)])
    self.upsamplers = nnx.List([Upsample2D(out_dim, **kw)]
                               if upsample else [])

  def __call__(self, x):
    for layer in [*self.resnets, *self.upsamplers]:
      x = layer(x)
    return x


class MidBlock2D(nnx.Module):
  """resnet, attention, resnet (diffusers `UNetMidBlock2D`, one layer)."""

  def __init__(self, dim, *, config: OpenSoraVAEConfig, rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock2D(dim, dim, **kw),
                             ResnetBlock2D(dim, dim, **kw)])
    self.attentions = nnx.List(
        [Attention2D(dim, **kw)]
        if config.spatial.mid_block_add_attention else [])

  def __call__(self, x):
    x = self.resnets[0](x)
    for attention in self.attentions:
      x = attention(x)
    return self.resnets[1](x)


class Encoder2D(nnx.Module):
  """conv_in -> down blocks -> mid block -> GroupNorm, SiLU, conv_out."""

  def __init__(self, config: OpenSoraVAEConfig, *, rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    s = config.spatial
    channels = s.block_out_channels
    self.conv_in = Conv(s.in_channels, channels[0], (3, 3), **kw)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(channels[max(i - 1, 0)], c,
                           downsample=i < len(channels) - 1, **kw)
        for i, c in enumerate(channels)])
    self.mid_block = MidBlock2D(channels[-1], **kw)
    self.conv_norm_out = GroupNorm(s.norm_num_groups, channels[-1],
                                   eps=SPATIAL_NORM_EPS, **kw)
    self.conv_out = Conv(channels[-1], 2 * s.latent_channels, (3, 3), **kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder2D(nnx.Module):
  """conv_in -> mid block -> up blocks -> GroupNorm, SiLU, conv_out."""

  def __init__(self, config: OpenSoraVAEConfig, *, rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    s = config.spatial
    channels = s.block_out_channels[::-1]
    self.conv_in = Conv(s.latent_channels, channels[0], (3, 3), **kw)
    self.mid_block = MidBlock2D(channels[0], **kw)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(channels[max(i - 1, 0)], c,
                         upsample=i < len(channels) - 1, **kw)
        for i, c in enumerate(channels)])
    self.conv_norm_out = GroupNorm(s.norm_num_groups, channels[-1],
                                   eps=SPATIAL_NORM_EPS, **kw)
    self.conv_out = Conv(channels[-1], s.out_channels, (3, 3), **kw)

  def __call__(self, x):
    x = self.mid_block(self.conv_in(x))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class SpatialVAE(nnx.Module):
  """diffusers `AutoencoderKL` on channels-last images (N, H, W, C)."""

  def __init__(self, config: OpenSoraVAEConfig, *, rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    s = config.spatial
    z = s.latent_channels
    self.config = config
    self.encoder = Encoder2D(config, rngs=rngs)
    self.quant_conv = (Conv(2 * z, 2 * z, (1, 1), **kw)
                       if s.use_quant_conv else None)
    self.post_quant_conv = (Conv(z, z, (1, 1), **kw)
                            if s.use_post_quant_conv else None)
    self.decoder = Decoder2D(config, rngs=rngs)

  def encode_moments(self, images):
    """images (N, H, W, in) -> (N, H/f, W/f, 2 latent) [mean | logvar]."""
    moments = self.encoder(images)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    return moments.astype(F32)

  def decode(self, latents):
    """latents (N, h, w, latent) (unscaled) -> images (N, fh, fw, out)."""
    x = latents.astype(self.config.compute_dtype)
    if self.post_quant_conv is not None:
      x = self.post_quant_conv(x)
    return self.decoder(x).astype(F32)


# The temporal VAE: OpenSora's VAE_Temporal ------------------------------------


class CausalConv3d(Conv):
  """3-D convolution, causal in time: zeros before the first frame.

  On (B, T, H, W, C) with kernel (kt, kh, kw): the time axis is padded at
  the front with kt - 1 + (1 - stride) zeros (none at the end), space with
  k // 2 zeros each side (OpenSora's `CausalConv3d`, pad_mode "constant").
  """

  def __init__(self, in_dim, out_dim, window, *, config: OpenSoraVAEConfig,
               rngs: nnx.Rngs, time_stride: int = 1, bias=True):
    kt, kh, kw = window
    for k in (kh, kw):
      if k % 2 == 0:
        raise ValueError(f"{window=}: spatial kernel sizes must be odd")
    padding = ((kt - 1 + 1 - time_stride, 0), (kh // 2, kh // 2),
               (kw // 2, kw // 2))
    super().__init__(in_dim, out_dim, window, config=config, rngs=rngs,
                     stride=(time_stride, 1, 1), padding=padding, bias=bias)


class ResBlock3D(nnx.Module):
  """x -> shortcut(x) + conv2(act(norm2(conv1(act(norm1(x)))))).

  OpenSora's `ResBlock`: convolutions without bias, 1x1x1 `conv3` shortcut
  when the channel count changes.
  """

  def __init__(self, in_dim, out_dim, *, config: OpenSoraVAEConfig,
               rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    t = config.temporal
    self.activation = _ACTIVATIONS[t.activation_fn]
    self.norm1 = GroupNorm(t.num_groups, in_dim, eps=TEMPORAL_NORM_EPS, **kw)
    self.conv1 = CausalConv3d(in_dim, out_dim, (3, 3, 3), bias=False, **kw)
    self.norm2 = GroupNorm(t.num_groups, out_dim, eps=TEMPORAL_NORM_EPS, **kw)
    self.conv2 = CausalConv3d(out_dim, out_dim, (3, 3, 3), bias=False, **kw)
    self.conv3 = (CausalConv3d(in_dim, out_dim, (1, 1, 1), bias=False, **kw)
                  if in_dim != out_dim else None)

  def __call__(self, x):
    h = self.conv1(self.activation(self.norm1(x)))
    h = self.conv2(self.activation(self.norm2(h)))
    return (x if self.conv3 is None else self.conv3(x)) + h


class Identity(nnx.Module):
  """A stage without temporal resampling (`nn.Identity` in the original)."""

  def __call__(self, x):
    return x


def _stage_channels(t: TemporalVAEConfig):
  return [t.filters * m for m in t.channel_multipliers]


class TemporalEncoder(nnx.Module):
  """conv_in -> per stage: res blocks, [stride-2 time conv] -> res blocks
  -> GroupNorm, act, 1x1x1 conv2 to 2 latent_embed_dim channels."""

  def __init__(self, config: OpenSoraVAEConfig, *, rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    t = config.temporal
    self.activation = _ACTIVATIONS[t.activation_fn]
    channels = _stage_channels(t)
    self.conv_in = CausalConv3d(t.in_out_channels, t.filters, (3, 3, 3),
                                bias=False, **kw)
    stages, downsamples = [], []
    prev = t.filters
    for i, c in enumerate(channels):
      stages.append(nnx.List([ResBlock3D(prev if j == 0 else c, c, **kw)
                              for j in range(t.num_res_blocks)]))
      prev = c
      if i < len(channels) - 1:
        downsamples.append(
            CausalConv3d(c, c, (3, 3, 3), time_stride=2, **kw)
            if t.temporal_downsample[i] else Identity())
    self.block_res_blocks = nnx.List(stages)
    self.conv_blocks = nnx.List(downsamples)
    self.res_blocks = nnx.List([ResBlock3D(prev, prev, **kw)
                                for _ in range(t.num_res_blocks)])
    self.norm1 = GroupNorm(t.num_groups, prev, eps=TEMPORAL_NORM_EPS, **kw)
    self.conv2 = CausalConv3d(prev, 2 * t.latent_embed_dim, (1, 1, 1), **kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for i, stage in enumerate(self.block_res_blocks):
      for block in stage:
        x = block(x)
      if i < len(self.conv_blocks):
        x = self.conv_blocks[i](x)
    for block in self.res_blocks:
      x = block(x)
    return self.conv2(self.activation(self.norm1(x)))


class TemporalDecoder(nnx.Module):
  """conv1 -> res blocks -> per stage, deepest first: res blocks, [time
  conv to 2x channels, depth-to-time] -> GroupNorm, act, conv_out.

  `block_res_blocks[i]` / `conv_blocks[i - 1]` belong to encoder stage i,
  as in the original (which fills its lists from the back).
  """

  def __init__(self, config: OpenSoraVAEConfig, *, rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    t = config.temporal
    self.activation = _ACTIVATIONS[t.activation_fn]
    channels = _stage_channels(t)
    top = channels[-1]
    self.conv1 = CausalConv3d(t.latent_embed_dim, top, (3, 3, 3), **kw)
    self.res_blocks = nnx.List([ResBlock3D(top, top, **kw)
                                for _ in range(t.num_res_blocks)])
    stages = [None] * len(channels)
    upsamples = [None] * (len(channels) - 1)
    prev = top
    for i in reversed(range(len(channels))):
      c = channels[i]
      stages[i] = nnx.List([ResBlock3D(prev if j == 0 else c, c, **kw)
                            for j in range(t.num_res_blocks)])
      prev = c
      if i > 0:
        upsamples[i - 1] = (
            CausalConv3d(c, 2 * c, (3, 3, 3), **kw)
            if t.temporal_downsample[i - 1] else Identity())
    self.block_res_blocks = nnx.List(stages)
    self.conv_blocks = nnx.List(upsamples)
    self.norm1 = GroupNorm(t.num_groups, prev, eps=TEMPORAL_NORM_EPS, **kw)
    self.conv_out = CausalConv3d(prev, t.in_out_channels, (3, 3, 3), **kw)

  def __call__(self, x):
    x = self.conv1(x)
    for block in self.res_blocks:
      x = block(x)
    for i in reversed(range(len(self.block_res_blocks))):
      for block in self.block_res_blocks[i]:
        x = block(x)
      if i > 0 and not isinstance(self.conv_blocks[i - 1], Identity):
        x = depth_to_time(self.conv_blocks[i - 1](x), 2)
    return self.conv_out(self.activation(self.norm1(x)))


def depth_to_time(x, factor: int):
  """(B, T, H, W, C * factor) -> (B, T * factor, H, W, C).

  einops "B (C ts) T H W -> B C (T ts) H W": channel c * factor + s becomes
  channel c of frame t * factor + s (channel-major, unlike Wan's halves).
  """
  b, t, h, w, cf = x.shape
  x = x.reshape(b, t, h, w, cf // factor, factor)
  return x.transpose(0, 1, 5, 2, 3, 4).reshape(b, t * factor, h, w,
                                               cf // factor)


class TemporalVAE(nnx.Module):
  """OpenSora's `VAE_Temporal` on channels-last clips (B, T, H, W, C)."""

  def __init__(self, config: OpenSoraVAEConfig, *, rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    t = config.temporal
    self.config = config
    self.encoder = TemporalEncoder(config, rngs=rngs)
    self.quant_conv = CausalConv3d(2 * t.latent_embed_dim, 2 * t.embed_dim,
                                   (1, 1, 1), **kw)
    self.post_quant_conv = CausalConv3d(t.embed_dim, t.latent_embed_dim,
                                        (1, 1, 1), **kw)
    self.decoder = TemporalDecoder(config, rngs=rngs)

  def _time_padding(self, num_frames: int) -> int:
    factor = self.config.temporal.temporal_factor
    return -num_frames % factor

  def encode_moments(self, x):
    """One clip x (B, T, H, W, C) -> (B, ceil(T/4), H, W, 2 embed_dim).

    The clip is first zero-padded at the front to a multiple of 4 frames.
    """
    pad = self._time_padding(x.shape[1])
    x = jnp.pad(x.astype(self.config.compute_dtype),
                ((0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)))
    return self.quant_conv(self.encoder(x)).astype(F32)

  def decode(self, z, num_frames: int):
    """One clip of latents z (B, t, H, W, embed_dim) -> (B, num_frames, H, W,
    C): 4t frames decoded, the first 4t - num_frames dropped."""
    pad = self._time_padding(num_frames)
    if self.config.temporal.latent_frames(num_frames) != z.shape[1]:
      raise ValueError(
          f"{num_frames=} frames need "
          f"{self.config.temporal.latent_frames(num_frames)} latent frames, "
          f"got {z.shape[1]}")
    x = self.post_quant_conv(z.astype(self.config.compute_dtype))
    return self.decoder(x)[:, pad:].astype(F32)


# Posterior --------------------------------------------------------------------


def posterior_sample(moments, key=None):
  """Mean (key None) or a sample of the diagonal Gaussian in `moments`.

  moments (..., 2C) float32 = [mean | logvar] on the last axis; logvar is
  clamped to LOGVAR_RANGE; sample = mean + exp(logvar / 2) * N(0, 1).
  """
  mean, logvar = jnp.split(moments.astype(F32), 2, axis=-1)
  if key is None:
    return mean
  logvar = jnp.clip(logvar, *LOGVAR_RANGE)
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape,
                                                          F32)


# Chunked execution ------------------------------------------------------------


def _micro_batched(fn, x, size):
  """fn over axis 0 of x in slices of `size` under lax.map (one compiled
  body). fn must treat rows independently: the last slice is padded with
  zero rows, whose outputs are dropped."""
  n = x.shape[0]
  if size is None or n <= size:
    return fn(x)
  slices = -(-n // size)
  x = jnp.pad(x, [(0, slices * size - n)] + [(0, 0)] * (x.ndim - 1))
  out = jax.lax.map(fn, x.reshape(slices, size, *x.shape[1:]))
  return out.reshape(slices * size, *out.shape[2:])[:n]


def _time_chunked(fn, x, full, chunk, rest):
  """fn(clip, None) over `full` clips of `chunk` steps of x's axis 1
  (lax.map), then fn(the remaining steps, rest) if rest; concatenated."""
  outs = []
  done = full * chunk if full else 0
  if full:
    b = x.shape[0]
    head = x[:, :done].reshape(b, full, chunk, *x.shape[2:])
    out = jax.lax.map(lambda c: fn(c, None), jnp.moveaxis(head, 1, 0))
    out = jnp.moveaxis(out, 0, 1)
    outs.append(out.reshape(b, -1, *out.shape[3:]))
  if rest:
    outs.append(fn(x[:, done:], rest))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


# The pipeline -----------------------------------------------------------------


class OpenSoraVAE(nnx.Module):
  """`VideoAutoencoderPipeline`: `encode` video -> latents, `decode` back.

  Latents at the API are normalised ((z - shift) / scale per channel, what
  STDiT3 consumes). Parameters: `spatial_vae` (diffusers AutoencoderKL
  names) and `temporal_vae` (OpenSora VAE_Temporal names).
  """

  def __init__(self, config: OpenSoraVAEConfig, *, rngs: nnx.Rngs = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config = config
    self.spatial_vae = SpatialVAE(config, rngs=rngs)
    self.temporal_vae = TemporalVAE(config, rngs=rngs)

  def _normalisation(self):
    return (jnp.asarray(np.asarray(self.config.shift, np.float32)),
            jnp.asarray(np.asarray(self.config.scale, np.float32)))

  def encode(self, video, *, key=None):
    """video (B, 3, T, H, W) in [-1, 1] -> latents (B, 4, T', H/8, W/8) f32.

    T' = config.latent_frames(T). key None: the posterior means of both
    VAEs; a PRNG key: samples from both, as OpenSora's `encode` does.
    """
    cfg = self.config
    s = cfg.spatial
    if video.ndim != 5 or video.shape[1] != s.in_channels:
      raise ValueError(f"{video.shape=} must be (B, {s.in_channels}, T, H, W)")
    b, _, t, h, w = video.shape
    f = cfg.spatial_factor
    if h % f or w % f:
      raise ValueError(f"{h=} and {w=} must be multiples of {f}")
    spatial_key, temporal_key = (jax.random.split(key) if key is not None
                                 else (None, None))
    # 1. Every frame through the image VAE (micro-batches of frames).
    frames = jnp.moveaxis(video, 1, -1).reshape(b * t, h, w, s.in_channels)
    moments = _micro_batched(
        lambda x: self.spatial_vae.encode_moments(
            x.astype(cfg.compute_dtype)), frames, cfg.micro_batch_size)
    x_z = posterior_sample(moments, spatial_key) * cfg.spatial_scaling_factor
    x_z = x_z.reshape(b, t, *x_z.shape[1:])
    # 2. Micro-frame chunks through the temporal VAE, independently.
    full, rest = cfg.micro_chunks(t)
    moments = _time_chunked(
        lambda clip, _: self.temporal_vae.encode_moments(clip), x_z, full,
        cfg.micro_frame_size, rest)
    z = posterior_sample(moments, temporal_key)
    # 3. Normalise.
    shift, scale = self._normalisation()
    return jnp.moveaxis((z - shift) / scale, -1, 1)

  def decode(self, latents, *, num_frames: int, clamp: bool = False):
    """latents (B, 4, T', h, w) -> video (B, 3, num_frames, 8h, 8w) f32.

    num_frames: the video length, needed because the temporal encoder pads
    each chunk up to a multiple of 4 frames (OpenSora passes it too); it
    must satisfy config.latent_frames(num_frames) == T'. Unclamped unless
    `clamp` (OpenSora clamps to [-1, 1] when saving).
    """
    cfg = self.config
    c = cfg.latent_channels
    if latents.ndim != 5 or latents.shape[1] != c:
      raise ValueError(f"{latents.shape=} must be (B, {c}, T, h, w)")
    b, _, t, h, w = latents.shape
    if cfg.latent_frames(num_frames) != t:
      raise ValueError(
          f"{num_frames=} frames encode to {cfg.latent_frames(num_frames)} "
          f"latent frames, but latents have {t} (micro_frame_size="
          f"{cfg.micro_frame_size})")
    # 1. Undo the normalisation.
    shift, scale = self._normalisation()
    z = jnp.moveaxis(latents.astype(F32), 1, -1) * scale + shift
    # 2. Latent chunks through the temporal decoder, independently: full
    #    chunks give micro_frame_size frames, a last short one the rest.
    full, rest = cfg.micro_chunks(num_frames)
    chunk = (cfg.temporal.latent_frames(cfg.micro_frame_size) if full
             else None)
    x_z = _time_chunked(
        lambda clip, n: self.temporal_vae.decode(
            clip, cfg.micro_frame_size if n is None else n),
        z, full, chunk, rest)
    # 3. Every frame through the image decoder.
    frames = x_z.reshape(b * num_frames, h, w, x_z.shape[-1])
    video = _micro_batched(
        lambda x: self.spatial_vae.decode(x / cfg.spatial_scaling_factor),
        frames, cfg.micro_batch_size)
    video = video.reshape(b, num_frames, *video.shape[1:])
    video = jnp.moveaxis(video, -1, 1)
    return jnp.clip(video, -1.0, 1.0) if clamp else video


# Jitted entry points: parameters are arguments, the graph is static. ----------


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("num_frames", "clamp"))
def _decode(graphdef, state, latents, *, num_frames, clamp):
  return nnx.merge(graphdef, state).decode(latents, num_frames=num_frames,
                                           clamp=clamp)


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, video, key):
  return nnx.merge(graphdef, state).encode(video, key=key)


def decode_jit(vae: OpenSoraVAE, latents, *, num_frames: int,
               clamp: bool = False):
  """Jitted `vae.decode`; compiles once per shape and num_frames."""
  graphdef, state = nnx.split(vae)
  return _decode(graphdef, state, latents, num_frames=num_frames,
                 clamp=clamp)


def encode_jit(vae: OpenSoraVAE, video, *, key=None):
  """Jitted `vae.encode`; compiles once per input shape (and key or not)."""
  graphdef, state = nnx.split(vae)
  return _encode(graphdef, state, video, key)


def abstract_model(config: OpenSoraVAEConfig) -> OpenSoraVAE:
  """The model with ShapeDtypeStruct leaves: shapes without memory."""
  return nnx.eval_shape(lambda: OpenSoraVAE(config, rngs=nnx.Rngs(0)))


def abstract_spatial_vae(config: OpenSoraVAEConfig) -> SpatialVAE:
  """The image VAE alone (a diffusers AutoencoderKL), abstract."""
  return nnx.eval_shape(lambda: SpatialVAE(config, rngs=nnx.Rngs(0)))


def abstract_temporal_vae(config: OpenSoraVAEConfig) -> TemporalVAE:
  """The temporal VAE alone (OpenSora's `VAE_Temporal`), abstract."""
  return nnx.eval_shape(lambda: TemporalVAE(config, rngs=nnx.Rngs(0)))


def latent_shape(config: OpenSoraVAEConfig, video_shape) -> tuple:
  """(B, 4, T', h, w) latents of a (B, 3, T, H, W) video."""
  b, _, t, h, w = video_shape
  f = config.spatial_factor
  if h % f or w % f:
    raise ValueError(f"{h=} and {w=} must be multiples of {f}")
  return (b, config.latent_channels, config.latent_frames(t), h // f, w // f)
