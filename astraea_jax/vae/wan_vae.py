"""Wan2.1 3D causal video VAE (`WanVAE_` in the original code) in Flax NNX.

Follows `wan/modules/vae.py` of Wan-Video/Wan2.1 (the same code ships as
`wan/modules/vae2_1.py` in `wan22`, and as diffusers `AutoencoderKLWan`).
Video (B, 3, T, H, W) in [-1, 1] <-> latents (B, 16, 1 + (T-1)/4, H/8, W/8).

Causality and chunking. Every 3x3x3 convolution is causal in time: output
frame t sees input frames t-2..t, with zeros before the first frame. The
original runs the decoder one latent frame at a time and the encoder on
chunks of 1, 4, 4, ... frames, and carries the last 2 input frames of every
causal convolution from one chunk to the next (its `feat_cache`); the first
chunk differs (the temporal up/down-sampling layers skip their time
convolution on it, so the first frame is not doubled / not merged). We do
the same: the cache is a pytree carried from chunk to chunk, the first chunk
runs on its own, and the remaining chunks run under one `jax.lax.scan`, so
memory stays bounded for long videos and the compile time does not grow
with the number of frames (two compiled bodies per direction).

Layout. The public API takes and returns (B, C, T, H, W) like the original;
inside, activations are channels-last (B, T, H, W, C) and kernels are
(kt, kh, kw, in, out). Convolutions take `config.dtype` inputs (float32 by
default, bfloat16 option); RMSNorm statistics and attention softmax run in
float32 and the latent (de)normalisation and outputs are float32.

Usage (jit through split/merge, or `decode_jit` / `encode_jit`):

  vae = converters.wan_vae.load_vae("Wan2.1_VAE.safetensors")
  video = wan_vae.decode_jit(vae, latents, clamp=True)   # (B, 3, T, H, W)
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

# Per-channel statistics of Wan2.1 latents, applied as
# latents = (mu - mean) / std after encoding and inverted before decoding.
# Reference: `Wan2_1_VAE.__init__` in Wan-Video/Wan2.1 wan/modules/vae.py,
# identical to diffusers' AutoencoderKLWan config `latents_mean`/`latents_std`.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# Frames of input context every causal 3x3x3 convolution carries between
# chunks (the original's CACHE_T).
CACHE_FRAMES = 2

_PRECISIONS = {None: None, "default": jax.lax.Precision.DEFAULT,
               "high": jax.lax.Precision.HIGH,
               "highest": jax.lax.Precision.HIGHEST}


@dataclasses.dataclass(frozen=True)
class WanVAEConfig(ModelConfig):
  """Wan2.1 VAE hyper-parameters (`_video_vae` cfg in the original)."""

  MODEL: ClassVar[str] = "wan_vae"

  base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  # Encoder stages that also halve time (the decoder mirrors them).
  temporal_downsample: tuple[bool, ...] = (False, True, True)
  latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
  latents_std: tuple[float, ...] = WAN21_LATENTS_STD
  # Convolution inputs are cast to `dtype`; parameters are stored in
  # `param_dtype`. `precision` is passed to every convolution/einsum
  # (None = JAX's default, which may use TF32 for float32 on GPUs).
  dtype: str = "float32"
  param_dtype: str = "float32"
  precision: str | None = None

  def __post_init__(self):
    for name in ("dim_mult", "temporal_downsample", "latents_mean",
                 "latents_std"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if len(self.dim_mult) < 1:
      raise ValueError(f"{self.dim_mult=} must have at least one stage")
    if len(self.temporal_downsample) != len(self.dim_mult) - 1:
      raise ValueError(
          f"{self.temporal_downsample=} needs one entry per downsampling "
          f"stage, {len(self.dim_mult) - 1} for {self.dim_mult=}")
    if len(self.latents_mean) != self.z_dim:
      raise ValueError(f"{len(self.latents_mean)=} must equal {self.z_dim=}")
    if len(self.latents_std) != self.z_dim:
      raise ValueError(f"{len(self.latents_std)=} must equal {self.z_dim=}")
    if min(self.latents_std) <= 0:
      raise ValueError(f"{self.latents_std=} must be positive")
    if self.num_res_blocks < 1:
      raise ValueError(f"{self.num_res_blocks=} must be >= 1")
    # Upsampling convolutions halve the channels (original: dim // 2).
    if any((self.base_dim * m) % 2 for m in self.dim_mult[1:]):
      raise ValueError(f"{self.base_dim=} x {self.dim_mult=} must be even")
    if self.precision not in _PRECISIONS:
      raise ValueError(f"{self.precision=} must be one of {list(_PRECISIONS)}")
    self.check_dtypes()

  @property
  def temporal_factor(self) -> int:
    return 2 ** sum(self.temporal_downsample)

  @property
  def spatial_factor(self) -> int:
    return 2 ** len(self.temporal_downsample)

  @property
  def lax_precision(self):
    return _PRECISIONS[self.precision]

  def latent_frames(self, num_frames: int) -> int:
    """Latent frames of a video of `num_frames` = 1 + factor * k frames."""
    if num_frames < 1 or (num_frames - 1) % self.temporal_factor:
      raise ValueError(
          f"{num_frames=} must be 1 + {self.temporal_factor} * k for the Wan "
          "VAE (the first frame is encoded alone, then chunks of "
          f"{self.temporal_factor})")
    return 1 + (num_frames - 1) // self.temporal_factor

  def video_frames(self, latent_frames: int) -> int:
    if latent_frames < 1:
      raise ValueError(f"{latent_frames=} must be >= 1")
    return 1 + self.temporal_factor * (latent_frames - 1)

  # Presets ---------------------------------------------------------------

  @classmethod
  def wan21(cls, **overrides) -> WanVAEConfig:
    """The published `Wan2.1_VAE.pth` (Wan2.1 T2V/I2V 1.3B and 14B)."""
    return cls(**overrides)

  @classmethod
  def tiny(cls, **overrides) -> WanVAEConfig:
    """The parity fixture's config (../shared/fixtures/wan21_vae): dim 8."""
    return cls(**{"base_dim": 8, **overrides})


# Layers ----------------------------------------------------------------------


def _conv(x, kernel, bias, *, strides, padding, config: WanVAEConfig):
  """Channels-last convolution: x (N, *space, I), kernel (*window, I, O)."""
  dtype = config.compute_dtype
  spec = {3: ("NDHWC", "DHWIO", "NDHWC"), 2: ("NHWC", "HWIO", "NHWC")}
  dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape,
                                      spec[kernel.ndim - 2])
  y = jax.lax.conv_general_dilated(
      x.astype(dtype), kernel.astype(dtype), strides, padding,
      dimension_numbers=dn, precision=config.lax_precision)
  return y + bias.astype(dtype)


def _kernel_init(rngs, shape, param_dtype):
  """Normal(0, 1/fan_in) kernel (random weights; checkpoints replace them).

  Built eagerly, the values come from numpy seeded by the rng stream:
  jax.random would compile one XLA program per kernel shape (about 50
  shapes at ~0.6 s each on CPU). Under a trace (jit, nnx.eval_shape) the
  key is abstract and jax.random is used.
  """
  key = rngs.params()
  std = float(np.prod(shape[:-1])) ** -0.5
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  try:
    seed = np.asarray(key).ravel()
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return (jax.random.normal(jax.random.wrap_key_data(key), shape, F32)
            * std).astype(param_dtype)
  values = np.random.default_rng(seed).standard_normal(shape, np.float32)
  return jnp.asarray(values * np.float32(std), dtype=param_dtype)


class RMSNorm(nnx.Module):
  """`F.normalize(x, dim=C) * sqrt(C) * gamma` over the channel axis.

  F.normalize divides by max(||x||_2, 1e-12). Statistics in float32.
  """

  def __init__(self, dim: int, *, config: WanVAEConfig, rngs: nnx.Rngs):
    del rngs
    self.scale = float(dim) ** 0.5
    self.gamma = nnx.Param(jnp.ones((dim,), config.weight_dtype))

  def __call__(self, x):
    xf = x.astype(F32)
    norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
    y = xf / jnp.maximum(norm, 1e-12) * self.scale
    return (y * self.gamma[...].astype(F32)).astype(x.dtype)


class CausalConv3d(nnx.Module):
  """3-D convolution, causal in time, 'same' zero padding in space.

  kernel (kt, kh, kw, in, out). Called with a chunk x (B, T, H, W, in) and
  the last kt - 1 input frames of the previous chunk (`cache`, zeros before
  the first frame); returns (y (B, T, H, W, out), new cache). The
  downsampling time convolution (stride 2, no causal padding) is driven by
  `Resample` through `conv` instead.
  """

  def __init__(self, in_dim, out_dim, kernel_size, *, config: WanVAEConfig,
               rngs: nnx.Rngs, time_stride: int = 1):
    self.config = config
    self.kernel_size = tuple(kernel_size)
    self.time_stride = time_stride
    self.kernel = nnx.Param(_kernel_init(
        rngs, (*self.kernel_size, in_dim, out_dim), config.weight_dtype))
    self.bias = nnx.Param(jnp.zeros((out_dim,), config.weight_dtype))

  @property
  def cache_frames(self) -> int:
    return self.kernel_size[0] - 1

  def conv(self, x):
    """'valid' in time (no padding), 'same' in space."""
    _, kh, kw = self.kernel_size
    padding = ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2))
    return _conv(x, self.kernel[...], self.bias[...],
                 strides=(self.time_stride, 1, 1), padding=padding,
                 config=self.config)

  def __call__(self, x, cache=None):
    if self.time_stride != 1:
      raise ValueError(f"{self.time_stride=}: strided time convolutions "
                       "take their context through `conv`")
    n = self.cache_frames
    if n == 0:
      return self.conv(x), None
    if cache is None:
      b, _, h, w, c = x.shape
      cache = jnp.zeros((b, n, h, w, c), x.dtype)
    context = jnp.concatenate([cache.astype(x.dtype), x], axis=1)
    return self.conv(context), context[:, -n:]


class Conv2d(nnx.Module):
  """Per-frame 2-D convolution on (B, T, H, W, C); kernel (kh, kw, in, out)."""

  def __init__(self, in_dim, out_dim, kernel_size, *, padding, stride=1,
               config: WanVAEConfig, rngs: nnx.Rngs):
    self.config = config
    self.padding = tuple(tuple(p) for p in padding)
    self.stride = stride
    self.kernel = nnx.Param(_kernel_init(
        rngs, (kernel_size, kernel_size, in_dim, out_dim),
        config.weight_dtype))
    self.bias = nnx.Param(jnp.zeros((out_dim,), config.weight_dtype))

  def __call__(self, x):
    b, t = x.shape[:2]
    y = _conv(x.reshape(b * t, *x.shape[2:]), self.kernel[...],
              self.bias[...], strides=(self.stride, self.stride),
              padding=self.padding, config=self.config)
    return y.reshape(b, t, *y.shape[1:])


class ResidualBlock(nnx.Module):
  """x -> shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))).

  The original's nn.Sequential indices: norm1 = residual.0, conv1 =
  residual.2, norm2 = residual.3, conv2 = residual.6 (1, 4 are SiLU, 5 is
  Dropout(0)). shortcut: 1x1x1 conv when the channel count changes.
  """

  def __init__(self, in_dim, out_dim, *, config: WanVAEConfig,
               rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    self.norm1 = RMSNorm(in_dim, **kw)
    self.conv1 = CausalConv3d(in_dim, out_dim, (3, 3, 3), **kw)
    self.norm2 = RMSNorm(out_dim, **kw)
    self.conv2 = CausalConv3d(out_dim, out_dim, (3, 3, 3), **kw)
    self.shortcut = (CausalConv3d(in_dim, out_dim, (1, 1, 1), **kw)
                     if in_dim != out_dim else None)

  def __call__(self, x, cache=None, *, first=False):
    del first
    cache1, cache2 = cache if cache is not None else (None, None)
    h = x if self.shortcut is None else self.shortcut(x)[0]
    x, cache1 = self.conv1(jax.nn.silu(self.norm1(x)), cache1)
    x, cache2 = self.conv2(jax.nn.silu(self.norm2(x)), cache2)
    return x + h, (cache1, cache2)


class AttentionBlock(nnx.Module):
  """Single-head self-attention over the H*W positions of each frame.

  Computed here rather than through models.layers.attention: it is spatial
  attention inside one frame with one head of width C (384 for Wan2.1),
  no part of Astraea's token selection. Scale C^-1/2, softmax in float32.
  """

  def __init__(self, dim, *, config: WanVAEConfig, rngs: nnx.Rngs):
    self.config = config
    kw = dict(config=config, rngs=rngs)
    self.norm = RMSNorm(dim, **kw)
    self.to_qkv = Conv2d(dim, 3 * dim, 1, padding=((0, 0), (0, 0)), **kw)
    self.proj = Conv2d(dim, dim, 1, padding=((0, 0), (0, 0)), **kw)

  def __call__(self, x, cache=None, *, first=False):
    del first
    b, t, h, w, c = x.shape
    qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c)
    q, k, v = jnp.split(qkv, 3, axis=-1)  # (B*T, HW, C) each
    prec = self.config.lax_precision
    logits = jnp.einsum("nqc,nkc->nqk", q, k, precision=prec,
                        preferred_element_type=F32) * (c ** -0.5)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("nqk,nkc->nqc", probs, v, precision=prec)
    out = self.proj(out.reshape(b, t, h, w, c))
    return x + out.astype(x.dtype), cache


class Resample(nnx.Module):
  """Spatial x2 up/down-sampling, optionally with x2 in time.

  upsample2d/3d: nearest x2 in space, 3x3 conv to dim // 2 channels. For
    3d first a causal (3,1,1) `time_conv` to 2*dim channels whose halves
    become frames 2t and 2t+1; the first chunk skips it (frame 0 is not
    doubled), and the second chunk sees zeros before it (the original's
    'Rep' cache marker), so frame 0 never enters the time convolution.
  downsample2d/3d: zero pad right/bottom by 1, 3x3 conv stride 2. For 3d
    then a (3,1,1) stride-2 `time_conv` over [last frame of the previous
    chunk, chunk]; on the first chunk it is skipped (frame 0 kept).
  """

  MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

  def __init__(self, dim, mode, *, config: WanVAEConfig, rngs: nnx.Rngs,
               upsample_out_dim: int | None = None):
    if mode not in self.MODES:
      raise ValueError(f"{mode=} must be one of {self.MODES}")
    self.mode = mode
    kw = dict(config=config, rngs=rngs)
    if mode.startswith("upsample"):
      # Wan2.1 halves the channels here; Wan2.2 passes out_dim = dim.
      out = dim // 2 if upsample_out_dim is None else upsample_out_dim
      self.conv = Conv2d(dim, out, 3, padding=((1, 1), (1, 1)), **kw)
    else:
      self.conv = Conv2d(dim, dim, 3, padding=((0, 1), (0, 1)), stride=2,
                         **kw)
    if mode == "upsample3d":
      self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), **kw)
    elif mode == "downsample3d":
      self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), time_stride=2, **kw)
    else:
      self.time_conv = None

  def __call__(self, x, cache=None, *, first=False):
    b, t, h, w, c = x.shape
    if self.mode == "upsample3d":
      if first:
        cache = jnp.zeros((b, CACHE_FRAMES, h, w, c), x.dtype)
      else:
        y, cache = self.time_conv(x, cache)  # (B, T, H, W, 2C)
        # Channel half j of time step t becomes frame 2t + j.
        y = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5)
        x = y.reshape(b, 2 * t, h, w, c)
    if self.mode.startswith("upsample"):
      x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest x2
    x = self.conv(x)
    if self.mode == "downsample3d":
      new_cache = x[:, -1:]
      if not first:
        x = self.time_conv.conv(jnp.concatenate([cache, x], axis=1))
      cache = new_cache
    return x, cache


def _middle(dim, kw):
  """The (res, attn, res) middle of the encoder and the decoder."""
  return nnx.List([ResidualBlock(dim, dim, **kw), AttentionBlock(dim, **kw),
                   ResidualBlock(dim, dim, **kw)])


def _cached_chain(module, blocks, x, cache, first):
  """module.conv1 -> blocks -> head (norm, SiLU, conv), each with its slot
  of the causal cache: x, new cache (a list: conv1, each block, head)."""
  cache = list(cache) if cache is not None else [None] * (len(blocks) + 2)
  new = []
  x, c = module.conv1(x, cache[0])
  new.append(c)
  for block, c in zip(blocks, cache[1:-1]):
    x, c = block(x, c, first=first)
    new.append(c)
  x, c = module.head_conv(jax.nn.silu(module.head_norm(x)), cache[-1])
  return x, new + [c]


class Encoder3d(nnx.Module):
  """conv1 -> downsamples -> middle (res, attn, res) -> head (norm, conv)."""

  def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    dims = [config.base_dim * m for m in (1, *config.dim_mult)]
    self.conv1 = CausalConv3d(3, dims[0], (3, 3, 3), **kw)
    blocks = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(config.num_res_blocks):
        blocks.append(ResidualBlock(in_dim, out_dim, **kw))
        in_dim = out_dim
      if i != len(config.dim_mult) - 1:
        mode = ("downsample3d" if config.temporal_downsample[i]
                else "downsample2d")
        blocks.append(Resample(out_dim, mode, **kw))
    self.downsamples = nnx.List(blocks)
    top = dims[-1]
    self.middle = _middle(top, kw)
    self.head_norm = RMSNorm(top, **kw)
    self.head_conv = CausalConv3d(top, 2 * config.z_dim, (3, 3, 3), **kw)

  def __call__(self, x, cache=None, *, first=False):
    """x (B, T, H, W, 3) -> (B, T', H/8, W/8, 2 z_dim), new cache (a list)."""
    return _cached_chain(self, [*self.downsamples, *self.middle], x, cache,
                         first)


class Decoder3d(nnx.Module):
  """conv1 -> middle (res, attn, res) -> upsamples -> head (norm, conv)."""

  def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    mult = config.dim_mult
    dims = [config.base_dim * m for m in (mult[-1], *mult[::-1])]
    temporal_upsample = config.temporal_downsample[::-1]
    self.conv1 = CausalConv3d(config.z_dim, dims[0], (3, 3, 3), **kw)
    self.middle = _middle(dims[0], kw)
    blocks = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      if i > 0:  # the previous stage's upsampling conv halved the channels
        in_dim //= 2
      for _ in range(config.num_res_blocks + 1):
        blocks.append(ResidualBlock(in_dim, out_dim, **kw))
        in_dim = out_dim
      if i != len(mult) - 1:
        mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
        blocks.append(Resample(out_dim, mode, **kw))
    self.upsamples = nnx.List(blocks)
    self.head_norm = RMSNorm(dims[-1], **kw)
    self.head_conv = CausalConv3d(dims[-1], 3, (3, 3, 3), **kw)

  def __call__(self, x, cache=None, *, first=False):
    """x (B, 1, h, w, z_dim) -> (B, 1 or 4, 8h, 8w, 3), new cache."""
    return _cached_chain(self, [*self.middle, *self.upsamples], x, cache,
                         first)


# The VAE ---------------------------------------------------------------------


def clamp_video(video):
  """What the Wan pipeline and diffusers' decode return: clip to [-1, 1]."""
  return jnp.clip(video, -1.0, 1.0)


def _scan_chunks(run_chunk, cache, chunks):
  """lax.scan of `run_chunk(chunk, cache) -> (out, cache)` over axis 0."""

  def body(carry, chunk):
    out, carry = run_chunk(chunk, carry)
    return carry, out

  _, outs = jax.lax.scan(body, cache, chunks)
  return outs


class WanVAE(nnx.Module):
  """Wan2.1 video VAE: `encode` video -> latents, `decode` latents -> video.

  Latents at the API are normalised ((mu - mean) / std per channel, what the
  DiT consumes); `decode` undoes it first, as `WanVAE_.decode(z, scale)`.
  Parameter names follow the original (`encoder`, `conv1` = quant conv,
  `conv2` = post-quant conv, `decoder`); converters/wan_vae.py maps them.
  """

  def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config = config
    kw = dict(config=config, rngs=rngs)
    z = config.z_dim
    self.encoder = Encoder3d(config, rngs=rngs)
    self.conv1 = CausalConv3d(2 * z, 2 * z, (1, 1, 1), **kw)
    self.conv2 = CausalConv3d(z, z, (1, 1, 1), **kw)
    self.decoder = Decoder3d(config, rngs=rngs)

  def _scale(self):
    """(mean, 1/std) in float32, as the original's `scale` pair."""
    mean = np.asarray(self.config.latents_mean, np.float32)
    inv_std = np.float32(1.0) / np.asarray(self.config.latents_std,
                                           np.float32)
    return jnp.asarray(mean), jnp.asarray(inv_std)

  def decoder_input(self, latents):
    """The decoder's input (B, T, h, w, z_dim) channels-last: latents
    de-normalised as the original, z / (1 / std) + mean, then the
    post-quant conv."""
    mean, inv_std = self._scale()
    z = jnp.moveaxis(latents.astype(F32), 1, -1)  # (B, T, h, w, z_dim)
    z = z / inv_std + mean
    return self.conv2(z.astype(self.config.compute_dtype))[0]

  def decode(self, latents, *, clamp: bool = False):
    """latents (B, z_dim, T, h, w) -> video (B, 3, 1 + 4(T-1), 8h, 8w) f32.

    Unclamped unless `clamp` (the pipeline clamps; see `clamp_video`).
    """
    cfg = self.config
    if latents.ndim != 5 or latents.shape[1] != cfg.z_dim:
      raise ValueError(f"{latents.shape=} must be (B, {cfg.z_dim}, T, h, w)")
    b, _, t, _, _ = latents.shape
    x = self.decoder_input(latents)
    video, cache = self.decoder(x[:, :1], None, first=True)
    if t > 1:
      # One latent frame per chunk -> temporal_factor video frames each.
      frames = jnp.moveaxis(x[:, 1:, None], 1, 0)  # (T-1, B, 1, h, w, C)
      rest = _scan_chunks(
          lambda f, c: self.decoder(f, c, first=False), cache, frames)
      rest = jnp.moveaxis(rest, 0, 1)  # (B, T-1, 4, H, W, 3)
      rest = rest.reshape(b, -1, *rest.shape[3:])
      video = jnp.concatenate([video, rest], axis=1)
    video = jnp.moveaxis(video.astype(F32), -1, 1)  # (B, 3, T', H, W)
    return clamp_video(video) if clamp else video

  def encode(self, video):
    """video (B, 3, 1 + 4k, H, W) in [-1, 1] -> latents (B, z, 1 + k, ...).

    Returns the normalised posterior mean, (mu - mean) / std, float32.
    """
    cfg = self.config
    if video.ndim != 5 or video.shape[1] != 3:
      raise ValueError(f"{video.shape=} must be (B, 3, T, H, W)")
    b, _, t, h, w = video.shape
    if h % cfg.spatial_factor or w % cfg.spatial_factor:
      raise ValueError(
          f"{h=} and {w=} must be multiples of {cfg.spatial_factor}")
    num_chunks = cfg.latent_frames(t) - 1
    x = jnp.moveaxis(video, 1, -1).astype(cfg.compute_dtype)
    out, cache = self.encoder(x[:, :1], None, first=True)
    if num_chunks:
      # Chunks of temporal_factor frames after the first frame.
      chunks = x[:, 1:].reshape(b, num_chunks, cfg.temporal_factor,
                                *x.shape[2:])
      rest = _scan_chunks(lambda c, k: self.encoder(c, k, first=False),
                          cache, jnp.moveaxis(chunks, 1, 0))
      rest = jnp.moveaxis(rest, 0, 1).reshape(b, num_chunks,
                                              *rest.shape[3:])
      out = jnp.concatenate([out, rest], axis=1)
    moments, _ = self.conv1(out)
    mu = moments[..., :cfg.z_dim].astype(F32)  # [z_dim:] is log-variance
    mean, inv_std = self._scale()
    return jnp.moveaxis((mu - mean) * inv_std, -1, 1)


# Jitted entry points: parameters are arguments, the graph is static. --------


@functools.partial(jax.jit, static_argnums=0, static_argnames="clamp")
def _decode(graphdef, state, latents, *, clamp):
  return nnx.merge(graphdef, state).decode(latents, clamp=clamp)


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, video):
  return nnx.merge(graphdef, state).encode(video)


def decode_jit(vae: WanVAE, latents, *, clamp: bool = False):
  """Jitted `vae.decode`; compiles once per input shape."""
  graphdef, state = nnx.split(vae)
  return _decode(graphdef, state, latents, clamp=clamp)


def encode_jit(vae: WanVAE, video):
  """Jitted `vae.encode`; compiles once per input shape."""
  graphdef, state = nnx.split(vae)
  return _encode(graphdef, state, video)


# Host-driven decoding: bounded memory, frames streamed out ------------------


def _to_video(frames):
  """(B, t, H, W, 3) decoder output -> (B, 3, t, H, W) float32 in [-1, 1]
  (exact: a transpose and a clip)."""
  return clamp_video(jnp.moveaxis(frames.astype(F32), -1, 1))


@functools.partial(jax.jit, static_argnums=0)
def _decode_first(graphdef, state, latents):
  """(decoder input of every latent frame, video frame 0 (B, 3, 1, H, W),
  causal cache)."""
  vae = nnx.merge(graphdef, state)
  x = vae.decoder_input(latents)
  frames, cache = vae.decoder(x[:, :1], None, first=True)
  return x, _to_video(frames), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _decode_next(graphdef, state, x, cache):
  """(the next temporal_factor video frames (B, 3, 4, H, W), the next
  cache) of one latent frame x (B, 1, h, w, z_dim). The cache is donated:
  the next one reuses its buffers (float32 frames of every causal
  convolution, 3.5 GiB at 480p) instead of both being alive at once."""
  frames, cache = nnx.merge(graphdef, state).decoder(x, cache, first=False)
  return _to_video(frames), cache


def decode_chunked(vae: WanVAE, latents, *, to_host: bool = False,
                   on_frame=None):
  """`vae.decode(latents, clamp=True)` one latent frame at a time from the
  host: two compiled programs (the first frame, then any next one with the
  causal cache carried), so the device holds one chunk's activations and
  the cache, not the whole video's. to_host: each chunk's frames are copied
  to host memory while the next chunk computes, and the video is a NumPy
  array (never whole on the device). on_frame(): called after each latent
  frame (a progress bar)."""
  graphdef, state = nnx.split(vae)
  x, frames, cache = _decode_first(graphdef, state, jnp.asarray(latents))
  chunks = []

  def finish(frames):
    if to_host:
      chunks.append(np.asarray(frames))  # waits for its copy only
    else:
      chunks.append(frames.block_until_ready())
    if on_frame is not None:
      on_frame()

  for t in range(1, latents.shape[2]):
    if to_host:
      frames.copy_to_host_async()
    following, cache = _decode_next(graphdef, state, x[:, t:t + 1], cache)
    finish(frames)
    frames = following
  finish(frames)
  return (np if to_host else jnp).concatenate(chunks, axis=2)


def tile_ramp(size: int, start: int, tile: int, overlap: int):
  """Blend weights (tile,) of a tile at `start` along an axis of `size`:
  a linear ramp in (0, 1) over `overlap` pixels at each edge it shares
  with a neighbour (none at the video's borders), 1 elsewhere. Where
  neighbours overlap by exactly `overlap`, their ramps sum to 1; the
  blend divides by the summed weights anyway (the last tile, flush with
  the end, may overlap more)."""
  w = np.ones(tile, np.float32)
  ramp = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
  if start > 0:
    w[:overlap] = ramp
  if start + tile < size:
    w[tile - overlap:] = ramp[::-1]
  return w


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
  """Starts of tiles of `tile` covering [0, size), neighbours overlapping
  by exactly `overlap` except the last, placed flush with the end (its
  overlap with the one before is larger; the blend uses `overlap`)."""
  if tile >= size:
    return [0]
  stride = tile - overlap
  starts = list(range(0, size - tile, stride)) + [size - tile]
  return sorted(set(starts))


def tile_grid(config: WanVAEConfig, h: int, w: int, tile: int,
              overlap: int | None = None):
  """(tile, overlap) in latent pixels and the (y, x) latent starts of the
  spatial tiles of an (h, w) latent decoded in tiles of `tile` video
  pixels overlapping by `overlap` (default tile / 4), both multiples of
  the VAE's spatial factor (a ValueError names the rule)."""
  f = config.spatial_factor
  if tile % f or tile < 2 * f:
    raise ValueError(f"tile={tile} must be a multiple of {f} (the VAE's "
                     f"spatial factor) and at least {2 * f} pixels")
  overlap = tile // 4 // f * f if overlap is None else overlap
  if overlap % f or not 0 <= overlap < tile:
    raise ValueError(f"overlap={overlap} must be a multiple of {f} in "
                     f"[0, {tile})")
  lt, lo = tile // f, overlap // f
  return lt, lo, [(y, x) for y in tile_starts(h, lt, lo)
                  for x in tile_starts(w, lt, lo)]


def decode_tiled(vae: WanVAE, latents, *, tile: int, overlap: int | None = None,
                 on_frame=None):
  """A NumPy video (B, 3, T, H, W) decoded in spatial tiles of `tile`
  video pixels (`tile_grid`), each through `decode_chunked` (all frames,
  its own causal cache), blended linearly where tiles meet (`tile_ramp`).
  The device holds one tile's activations: for videos above 720p, or GPUs
  too small for a whole frame. Not the same numbers as the untiled decode:
  a tile's convolutions see zeros past its edge and its attention sees
  only its own pixels; the blend hides the seams (tests bound the
  difference). on_frame(): called after each latent frame of each tile."""
  f = vae.config.spatial_factor
  b, _, t, h, w = latents.shape
  lt, lo, grid = tile_grid(vae.config, h, w, tile, overlap)
  th, tw = min(lt, h), min(lt, w)
  out = np.zeros((b, 3, vae.config.video_frames(t), h * f, w * f),
                 np.float32)
  weight = np.zeros((h * f, w * f), np.float32)
  latents = np.asarray(latents)
  for y, x in grid:
    video = decode_chunked(vae, latents[..., y:y + th, x:x + tw],
                           to_host=True, on_frame=on_frame)
    blend = np.outer(tile_ramp(h * f, y * f, th * f, lo * f),
                     tile_ramp(w * f, x * f, tw * f, lo * f))
    region = (slice(y * f, (y + th) * f), slice(x * f, (x + tw) * f))
    out[(..., *region)] += video * blend
    weight[region] += blend
  return out / weight


def abstract_model(config: WanVAEConfig) -> WanVAE:
  """The model with ShapeDtypeStruct leaves: shapes without memory."""
  return nnx.eval_shape(lambda: WanVAE(config, rngs=nnx.Rngs(0)))
