"""Wan2.2 video VAE (`WanVAE_` of `wan/modules/vae2_2.py`) in Flax NNX.

Video (B, 3, T, H, W) in [-1, 1] <-> latents (B, 48, 1 + (T-1)/4, H/16,
W/16), the VAE of Wan2.2 TI2V-5B (the A14B models use the Wan2.1 VAE).
What differs from Wan2.1 (astraea_jax/vae/wan_vae.py, whose layers, chunked
causal encode/decode loops and jitted entry points this module reuses):
  * each frame is first folded 2x2 into channels (`patchify`: 3 -> 12
    channels at half the height and width) and unfolded after decoding,
    so the spatial factor is 2 x 8 = 16;
  * each encoder stage is a `DownBlock`: its residual blocks and resample
    plus a parameter-free shortcut that averages the input over the
    stage's space-time reduction (`avg_down`); each decoder stage an
    `UpBlock` whose shortcut repeats its input (`dup_up`), and whose
    upsampling convolution keeps the channels (Wan2.1 halves them);
  * the decoder has its own width (`decoder_base_dim`, 256 vs 160).
Both chunk alike (first frame alone, then 4 frames / 1 latent frame per
chunk), so `WanVAE.encode` / `decode` run this model unchanged.

  vae = converters.wan_vae.load_vae("Wan2.2_VAE.pth", allow_pth=True)
  video = wan_vae.decode_jit(vae, latents, clamp=True)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from astraea_jax.vae import wan_vae
from astraea_jax.vae.wan_vae import (CausalConv3d, Resample, ResidualBlock,
                                     RMSNorm, WanVAE, WanVAEConfig)

F32 = jnp.float32

# Per-channel statistics of Wan2.2 latents (48 channels). Reference:
# `Wan2_2_VAE.__init__` in the wan22 package's wan/modules/vae2_2.py.
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


@dataclasses.dataclass(frozen=True)
class Wan22VAEConfig(WanVAEConfig):
  """Wan2.2 VAE hyper-parameters (`Wan2_2_VAE` / `_video_vae` in the
  original; diffusers `AutoencoderKLWan(is_residual=True, patch_size=2)`).
  base_dim is the encoder's width."""

  MODEL: ClassVar[str] = "wan22_vae"

  base_dim: int = 160
  z_dim: int = 48
  latents_mean: tuple[float, ...] = WAN22_LATENTS_MEAN
  latents_std: tuple[float, ...] = WAN22_LATENTS_STD
  decoder_base_dim: int = 256
  # Frames are folded patch_size x patch_size into channels first.
  patch_size: int = 2

  def __post_init__(self):
    super().__post_init__()
    if self.patch_size < 1 or self.decoder_base_dim < 1:
      raise ValueError(f"{self.patch_size=} and {self.decoder_base_dim=} "
                       "must be >= 1")

  @property
  def spatial_factor(self) -> int:
    return self.patch_size * 2 ** len(self.temporal_downsample)

  @property
  def video_channels(self) -> int:
    """Channels of a folded frame: 3 * patch_size^2."""
    return 3 * self.patch_size ** 2

  @classmethod
  def wan22(cls, **overrides) -> Wan22VAEConfig:
    """The published `Wan2.2_VAE.pth` (Wan2.2 TI2V-5B)."""
    return cls(**overrides)

  @classmethod
  def tiny(cls, **overrides) -> Wan22VAEConfig:
    """Tiny widths for tests (encoder 8, decoder 12), Wan2.2's structure."""
    return cls(**{"base_dim": 8, "decoder_base_dim": 12, **overrides})


# Pure functions over channels-last arrays (B, T, H, W, C) ---------------------


def patchify(x, p: int):
  """(B, T, H, W, C) -> (B, T, H/p, W/p, C*p*p); channel c*p*p + j*p + i
  holds pixel (i, j) of each p x p patch (row i, column j), the original's
  "c (r q)" order with r along the width."""
  b, t, h, w, c = x.shape
  x = x.reshape(b, t, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 2, 4, 6, 5, 3)  # b t h' w' c j i
  return x.reshape(b, t, h // p, w // p, c * p * p)


def unpatchify(x, p: int):
  """The inverse of `patchify`."""
  b, t, h, w, cpp = x.shape
  x = x.reshape(b, t, h, w, cpp // (p * p), p, p)  # b t h w c j i
  x = x.transpose(0, 1, 2, 6, 3, 5, 4)  # b t h i w j c
  return x.reshape(b, t, h * p, w * p, cpp // (p * p))


def avg_down(x, factor_t: int, factor_s: int, out_dim: int):
  """The DownBlock shortcut (`AvgDown3D`): fold each factor_t x factor_s^2
  block of (time, height, width) into channels, then average groups of
  consecutive channels down to out_dim. An odd chunk (the first frame) is
  padded with zero frames in front, which the average counts."""
  b, t, h, w, c = x.shape
  pad = -t % factor_t
  x = jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)))
  t, h, w = (t + pad) // factor_t, h // factor_s, w // factor_s
  x = x.reshape(b, t, factor_t, h, factor_s, w, factor_s, c)
  x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)  # b t h w c ft fs_h fs_w
  x = x.reshape(b, t, h, w, out_dim, -1)
  return jnp.mean(x.astype(F32), axis=-1).astype(x.dtype)


def dup_up(x, factor_t: int, factor_s: int, out_dim: int, *, first: bool):
  """The UpBlock shortcut (`DupUp3D`): repeat each channel so that the
  channels unfold into factor_t x factor_s^2 blocks of out_dim channels;
  on the first chunk only the last of the factor_t frames is kept (the
  first frame is not doubled)."""
  b, t, h, w, c = x.shape
  factor = factor_t * factor_s * factor_s
  x = jnp.repeat(x, out_dim * factor // c, axis=-1)
  x = x.reshape(b, t, h, w, out_dim, factor_t, factor_s, factor_s)
  x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)  # b t ft h fs_h w fs_w c
  x = x.reshape(b, t * factor_t, h * factor_s, w * factor_s, out_dim)
  return x[:, factor_t - 1:] if first else x


def _check_fold(channels, factor, into, what):
  if (channels * factor) % into:
    raise ValueError(f"{what}: {channels} channels x {factor=} do not "
                     f"divide evenly into {into}")


# Blocks -----------------------------------------------------------------------

# Wan2.1's (res, attn, res) middle and its chain of cached blocks between
# conv1 and the head serve here unchanged.
_middle = wan_vae._middle  # pylint: disable=protected-access
_cached_chain = wan_vae._cached_chain  # pylint: disable=protected-access


def _run_list(blocks, x, cache, first):
  """Cached blocks one after the other: x, their new caches (a list)."""
  cache = list(cache) if cache is not None else [None] * len(blocks)
  new = []
  for block, c in zip(blocks, cache):
    x, c = block(x, c, first=first)
    new.append(c)
  return x, new


class DownBlock(nnx.Module):
  """One encoder stage (`Down_ResidualBlock`): residual blocks, then a
  stride-2 Resample (also in time if `temporal`), plus `avg_down` of the
  stage's input. The last stage neither downsamples nor changes the
  channels: its shortcut is the identity."""

  def __init__(self, in_dim, out_dim, *, temporal: bool, down: bool,
               config: Wan22VAEConfig, rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    self.factors = (2 if temporal else 1, 2 if down else 1)
    self.out_dim = out_dim
    _check_fold(in_dim, self.factors[0] * self.factors[1] ** 2, out_dim,
                "encoder shortcut (avg_down)")
    blocks = []
    for _ in range(config.num_res_blocks):
      blocks.append(ResidualBlock(in_dim, out_dim, **kw))
      in_dim = out_dim
    if down:
      mode = "downsample3d" if temporal else "downsample2d"
      blocks.append(Resample(out_dim, mode, **kw))
    self.downsamples = nnx.List(blocks)

  def __call__(self, x, cache=None, *, first=False):
    y, cache = _run_list(self.downsamples, x, cache, first)
    return y + avg_down(x, *self.factors, self.out_dim), cache


class UpBlock(nnx.Module):
  """One decoder stage (`Up_ResidualBlock`): num_res_blocks + 1 residual
  blocks, then a x2 Resample keeping the channels (also in time if
  `temporal`), plus `dup_up` of the stage's input; the last stage has
  neither the Resample nor a shortcut."""

  def __init__(self, in_dim, out_dim, *, temporal: bool, up: bool,
               config: Wan22VAEConfig, rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    self.factors = (2 if temporal else 1, 2) if up else None
    self.out_dim = out_dim
    if up:
      _check_fold(out_dim, self.factors[0] * 4, in_dim,
                  "decoder shortcut (dup_up)")
    blocks = []
    for _ in range(config.num_res_blocks + 1):
      blocks.append(ResidualBlock(in_dim, out_dim, **kw))
      in_dim = out_dim
    if up:
      mode = "upsample3d" if temporal else "upsample2d"
      blocks.append(Resample(out_dim, mode, upsample_out_dim=out_dim, **kw))
    self.upsamples = nnx.List(blocks)

  def __call__(self, x, cache=None, *, first=False):
    y, cache = _run_list(self.upsamples, x, cache, first)
    if self.factors is None:
      return y, cache
    return y + dup_up(x, *self.factors, self.out_dim, first=first), cache


class Encoder3d(nnx.Module):
  """patchify -> conv1 -> DownBlocks -> middle -> head (norm, conv)."""

  def __init__(self, config: Wan22VAEConfig, *, rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    self.patch_size = config.patch_size
    dims = [config.base_dim * m for m in (1, *config.dim_mult)]
    last = len(config.dim_mult) - 1
    self.conv1 = CausalConv3d(config.video_channels, dims[0], (3, 3, 3), **kw)
    self.downsamples = nnx.List([
        DownBlock(dims[i], dims[i + 1], down=i != last,
                  temporal=i != last and config.temporal_downsample[i], **kw)
        for i in range(len(config.dim_mult))])
    self.middle = _middle(dims[-1], kw)
    self.head_norm = RMSNorm(dims[-1], **kw)
    self.head_conv = CausalConv3d(dims[-1], 2 * config.z_dim, (3, 3, 3), **kw)

  def __call__(self, x, cache=None, *, first=False):
    """x (B, T, H, W, 3) -> (B, T', H/16, W/16, 2 z_dim), new cache."""
    return _cached_chain(self, [*self.downsamples, *self.middle],
                         patchify(x, self.patch_size), cache, first)


class Decoder3d(nnx.Module):
  """conv1 -> middle -> UpBlocks -> head (norm, conv) -> unpatchify."""

  def __init__(self, config: Wan22VAEConfig, *, rngs: nnx.Rngs):
    kw = dict(config=config, rngs=rngs)
    self.patch_size = config.patch_size
    mult = config.dim_mult
    dims = [config.decoder_base_dim * m for m in (mult[-1], *mult[::-1])]
    temporal_upsample = config.temporal_downsample[::-1]
    last = len(mult) - 1
    self.conv1 = CausalConv3d(config.z_dim, dims[0], (3, 3, 3), **kw)
    self.middle = _middle(dims[0], kw)
    self.upsamples = nnx.List([
        UpBlock(dims[i], dims[i + 1], up=i != last,
                temporal=i != last and temporal_upsample[i], **kw)
        for i in range(len(mult))])
    self.head_norm = RMSNorm(dims[-1], **kw)
    self.head_conv = CausalConv3d(dims[-1], config.video_channels, (3, 3, 3),
                                  **kw)

  def __call__(self, x, cache=None, *, first=False):
    """x (B, 1, h, w, z_dim) -> (B, 1 or 4, 16h, 16w, 3), new cache."""
    y, cache = _cached_chain(self, [*self.middle, *self.upsamples], x,
                             cache, first)
    return unpatchify(y, self.patch_size), cache


class Wan22VAE(WanVAE):
  """The Wan2.2 VAE: Wan2.1's `encode` / `decode` (normalised latents,
  chunked causal loops) over the Wan2.2 encoder and decoder. Parameter
  names follow the original (converters/wan_vae.py maps both layouts)."""

  def __init__(self, config: Wan22VAEConfig, *, rngs: nnx.Rngs = None):
    # pylint: disable=super-init-not-called  (the parts differ; the API not)
    if not isinstance(config, Wan22VAEConfig):
      raise TypeError(f"expected a Wan22VAEConfig, got {type(config)}")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config = config
    z = config.z_dim
    self.encoder = Encoder3d(config, rngs=rngs)
    self.conv1 = CausalConv3d(2 * z, 2 * z, (1, 1, 1), config=config,
                              rngs=rngs)
    self.conv2 = CausalConv3d(z, z, (1, 1, 1), config=config, rngs=rngs)
    self.decoder = Decoder3d(config, rngs=rngs)


def abstract_model(config: Wan22VAEConfig) -> Wan22VAE:
  """The model with ShapeDtypeStruct leaves: shapes without memory."""
  return nnx.eval_shape(lambda: Wan22VAE(config, rngs=nnx.Rngs(0)))
