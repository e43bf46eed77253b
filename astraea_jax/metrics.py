"""Quality of an accelerated video against the full model's video.

Videos are arrays (..., T, H, W, C) or (..., C, T, H, W) with values in a
known range (`data_range`, e.g. 2.0 for [-1, 1] decoder output). PSNR and
SSIM need no weights; they are computed per frame and averaged, as video
acceleration papers (Astraea, ToCa, PAB) report them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


def psnr(video, reference, *, data_range: float = 2.0):
  """Peak signal-to-noise ratio in dB over the whole video (mean MSE)."""
  video, reference = jnp.asarray(video, F32), jnp.asarray(reference, F32)
  if video.shape != reference.shape:
    raise ValueError(f"shapes differ: {video.shape=} {reference.shape=}")
  mse = jnp.mean(jnp.square(video - reference))
  return 10.0 * jnp.log10(data_range ** 2 / mse)


def _gaussian_window(size=11, sigma=1.5):
  x = np.arange(size) - (size - 1) / 2
  g = np.exp(-x ** 2 / (2 * sigma ** 2))
  return jnp.asarray(g / g.sum(), F32)


def _blur(images, window):
  """Separable 'valid' Gaussian filter over H and W of (N, H, W)."""
  k = window.shape[0]
  images = images[:, None]  # N 1 H W
  kh = window.reshape(1, 1, k, 1)
  kw = window.reshape(1, 1, 1, k)
  dn = ("NCHW", "OIHW", "NCHW")
  out = jax.lax.conv_general_dilated(images, kh, (1, 1), "VALID",
                                     dimension_numbers=dn,
                                     precision=jax.lax.Precision.HIGHEST)
  out = jax.lax.conv_general_dilated(out, kw, (1, 1), "VALID",
                                     dimension_numbers=dn,
                                     precision=jax.lax.Precision.HIGHEST)
  return out[:, 0]


def channels_first_pair(video, reference, channel_axis):
  """Two videos of one shape as float32 (..., C, H, W): from
  `channel_axis=-1` (..., H, W, C) or -3 (already channels first)."""
  video, reference = jnp.asarray(video, F32), jnp.asarray(reference, F32)
  if video.shape != reference.shape:
    raise ValueError(f"shapes differ: {video.shape=} {reference.shape=}")
  if channel_axis == -1:
    video, reference = (jnp.moveaxis(a, -1, -3) for a in (video, reference))
  elif channel_axis != -3:
    raise ValueError(f"{channel_axis=} must be -1 or -3")
  return video, reference


def ssim(video, reference, *, data_range: float = 2.0, channel_axis=-1):
  """Mean SSIM (Wang et al. 2004, eq. 13) with an 11x11 Gaussian window,
  sigma 1.5, K1 = 0.01, K2 = 0.03, per frame and channel, averaged.

  Images are (..., H, W, C) with `channel_axis=-1`, or (..., C, H, W)
  with `channel_axis=-3`; every leading axis (batch, time) is averaged.
  """
  video, reference = channels_first_pair(video, reference, channel_axis)
  h, w = video.shape[-2:]
  if min(h, w) < 11:
    raise ValueError(f"frames of {h}x{w} are smaller than the 11x11 window")
  x = video.reshape(-1, h, w)
  y = reference.reshape(-1, h, w)
  win = _gaussian_window()
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mu_x, mu_y = _blur(x, win), _blur(y, win)
  sxx = _blur(x * x, win) - mu_x ** 2
  syy = _blur(y * y, win) - mu_y ** 2
  sxy = _blur(x * y, win) - mu_x * mu_y
  s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)
       / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2)))
  return jnp.mean(s)
