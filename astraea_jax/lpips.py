"""LPIPS v0.1 with the AlexNet backbone (Zhang et al. 2018, "The
Unreasonable Effectiveness of Deep Features as a Perceptual Metric").

The distance between images x and y (eq. 1 of the paper):

  d(x, y) = sum_l mean_{h,w} || w_l * (f_l(x) - f_l(y)) ||_2^2

where f_l are the five ReLU outputs of AlexNet's conv stack, each unit-
normalised over channels, and w_l are non-negative per-channel weights
(the "linear heads", 1x1 convolutions with one output channel).

Layout: images are NCHW, (..., 3, H, W), with values in [-1, 1], like the
PyTorch `lpips` package. Videos are scored frame by frame and averaged,
as video acceleration papers report LPIPS.

Weights: the ImageNet backbone is torchvision's `alexnet` state dict
(`features.{0,3,6,8,10}.{weight,bias}`); the heads are the `lpips`
package's `weights/v0.1/alex.pth` (`lin{0..4}.model.1.weight`). Neither is
shipped here: `load_lpips_weights` reads them from paths the user gives,
and `find_lpips_weights` looks in the usual caches.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from astraea_jax import metrics

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST

# The `lpips` package's ScalingLayer: maps [-1, 1] inputs to roughly the
# ImageNet-normalised range AlexNet was trained on, (x - shift) / scale.
INPUT_SHIFT = (-0.030, -0.088, -0.188)
INPUT_SCALE = (0.458, 0.448, 0.450)

# torchvision alexnet().features: index of each conv in the Sequential,
# its (out, in, k, k) shape, stride and padding. lpips taps the ReLU after
# each conv; convs 1 and 2 are followed by a 3x3 stride-2 max-pool
# (torchvision indices 2 and 5), which the next tap sees.
ALEXNET_CONVS = (
  # (index, weight shape, stride, padding, max-pool before this conv)
  (0, (64, 3, 11, 11), 4, 2, False),
  (3, (192, 64, 5, 5), 1, 2, True),
  (6, (384, 192, 3, 3), 1, 1, True),
  (8, (256, 384, 3, 3), 1, 1, False),
  (10, (256, 256, 3, 3), 1, 1, False),
)
HEAD_CHANNELS = tuple(shape[0] for _, shape, *_ in ALEXNET_CONVS)

# torchvision's download cache name for the ImageNet AlexNet weights.
TORCHVISION_ALEXNET_FILE = "alexnet-owt-7be5be79.pth"

# Added to the channel norm, as lpips.normalize_tensor does.
NORM_EPS = 1e-10


# --------------------------------------------------------------------------
# Weights


def _read_tensors(path, *, allow_pth):
  """Name -> float32 numpy array from a safetensors or (opt-in) .pth."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"LPIPS weight file {str(path)!r} does not exist")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file
    return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
  if path.suffix in (".pth", ".pt", ".bin"):
    if not allow_pth:
      raise ValueError(
          f"{str(path)!r} is a torch pickle; convert it to safetensors or "
          "pass allow_pth=True (it is read with torch.load(weights_only="
          "True), which needs torch)")
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() for k, v in state.items()}
  raise ValueError(f"{str(path)!r}: expected a .safetensors or .pth file")


def _take(tensors, name, shape, path):
  if name not in tensors:
    raise KeyError(f"{name!r} not in {str(path)!r}; it has "
                   f"{sorted(tensors)[:20]}")
  value = tensors[name]
  if value.shape != tuple(shape):
    raise ValueError(f"{name!r} in {str(path)!r} has shape {value.shape}, "
                     f"expected {tuple(shape)}")
  return jnp.asarray(value, F32)


def lpips_heads_path_in_package():
  """Path of the `lpips` package's v0.1 AlexNet heads, or None.

  Found without importing the package (which imports torchvision).
  """
  spec = importlib.util.find_spec("lpips")
  if spec is None or not spec.submodule_search_locations:
    return None
  for root in spec.submodule_search_locations:
    path = Path(root) / "weights" / "v0.1" / "alex.pth"
    if path.is_file():
      return path
  return None


def find_lpips_weights():
  """(backbone_path, heads_path) from the usual caches, or None.

  Backbone: $ASTRAEA_LPIPS_BACKBONE, else torchvision's download cache
  ($TORCH_HOME or ~/.cache/torch, hub/checkpoints/alexnet-owt-7be5be79.pth).
  Heads: $ASTRAEA_LPIPS_HEADS, else the installed `lpips` package's file.
  """
  backbone = os.environ.get("ASTRAEA_LPIPS_BACKBONE")
  if backbone is None:
    torch_home = os.environ.get(
        "TORCH_HOME", os.path.join(Path.home(), ".cache", "torch"))
    backbone = Path(torch_home) / "hub" / "checkpoints"
    backbone = backbone / TORCHVISION_ALEXNET_FILE
  heads = os.environ.get("ASTRAEA_LPIPS_HEADS") or lpips_heads_path_in_package()
  if heads is None or not Path(backbone).is_file() or not Path(heads).is_file():
    return None
  return Path(backbone), Path(heads)


def load_lpips_weights(backbone_path, heads_path=None, *, allow_pth=False):
  """LPIPS-Alex weights as a pytree {"convs": [(w, b)] * 5, "heads": [w] * 5}.

  Args:
    backbone_path: torchvision alexnet state dict (full model or only
      `features.*`), safetensors, or .pth when `allow_pth`.
    heads_path: lpips heads (`lin{l}.model.1.weight`, (1, C, 1, 1)). None
      takes the installed `lpips` package's v0.1 alex.pth (needs
      `allow_pth`, since the package ships a torch pickle).
    allow_pth: permit torch pickles, read with torch.load(weights_only=True).
  Conv weights stay OIHW; head weights become (C,).
  """
  if heads_path is None:
    heads_path = lpips_heads_path_in_package()
    if heads_path is None:
      raise FileNotFoundError(
          "heads_path=None but the `lpips` package is not installed; pass "
          "the path of lpips' weights/v0.1/alex.pth (or a safetensors copy)")
  backbone = _read_tensors(backbone_path, allow_pth=allow_pth)
  heads = _read_tensors(heads_path, allow_pth=allow_pth)
  convs = []
  for index, shape, *_ in ALEXNET_CONVS:
    w = _take(backbone, f"features.{index}.weight", shape, backbone_path)
    b = _take(backbone, f"features.{index}.bias", shape[:1], backbone_path)
    convs.append((w, b))
  head_ws = []
  for layer, channels in enumerate(HEAD_CHANNELS):
    w = _take(heads, f"lin{layer}.model.1.weight", (1, channels, 1, 1),
              heads_path)
    head_ws.append(w.reshape(channels))
  return {"convs": convs, "heads": head_ws}


# --------------------------------------------------------------------------
# Network


def _conv(x, w, b, stride, padding):
  y = jax.lax.conv_general_dilated(
      x, w, (stride, stride), [(padding, padding)] * 2,
      dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=HIGHEST)
  return y + b[None, :, None, None]


def _max_pool_3x3_s2(x):
  # torch MaxPool2d(kernel_size=3, stride=2): no padding, floor mode.
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 3, 3),
                               (1, 1, 2, 2), "VALID")


def alexnet_features(convs, images):
  """The five ReLU outputs lpips taps, for images (N, 3, H, W)."""
  shift = jnp.asarray(INPUT_SHIFT, F32)[None, :, None, None]
  scale = jnp.asarray(INPUT_SCALE, F32)[None, :, None, None]
  x = (images - shift) / scale
  taps = []
  for (w, b), (_, _, stride, padding, pool) in zip(convs, ALEXNET_CONVS):
    if pool:
      x = _max_pool_3x3_s2(x)
    x = jax.nn.relu(_conv(x, w, b, stride, padding))
    taps.append(x)
  return taps


def _unit_normalise(features):
  norm = jnp.sqrt(jnp.sum(jnp.square(features), axis=1, keepdims=True))
  return features / (norm + NORM_EPS)


@jax.jit
def lpips_images(weights, images, reference):
  """LPIPS per image pair: images, reference (N, 3, H, W) in [-1, 1] -> (N,).

  Eq. 1: sum over layers of the spatial mean of the head-weighted squared
  difference of channel-normalised features.
  """
  images = jnp.asarray(images, F32)
  reference = jnp.asarray(reference, F32)
  both = jnp.concatenate([images, reference], axis=0)
  n = images.shape[0]
  total = jnp.zeros((n,), F32)
  for taps, head in zip(alexnet_features(weights["convs"], both),
                        weights["heads"]):
    taps = _unit_normalise(taps)
    diff = jnp.square(taps[:n] - taps[n:])  # (N, C, h, w)
    weighted = jnp.einsum("nchw,c->nhw", diff, head, precision=HIGHEST)
    total = total + jnp.mean(weighted, axis=(1, 2))
  return total


def lpips(video, reference, weights, *, channel_axis=-3, frames_per_batch=None):
  """Mean LPIPS-Alex over all frames of (..., 3, H, W) videos in [-1, 1].

  `channel_axis=-1` takes (..., H, W, 3) instead. Every leading axis
  (batch, time) is a frame; frames go through the network
  `frames_per_batch` at a time (all at once when None) to bound memory.
  """
  video, reference = metrics.channels_first_pair(video, reference,
                                                 channel_axis)
  if video.ndim < 3 or video.shape[-3] != 3:
    raise ValueError(f"{video.shape=} must be (..., 3, H, W) RGB frames")
  h, w = video.shape[-2:]
  # The last taps need a 1x1 map: conv1 (k11 s4 p2) then two 3x3/2 pools.
  if min(h, w) < 31:
    raise ValueError(f"frames of {h}x{w} are too small for AlexNet (>= 31)")
  frames = video.reshape(-1, 3, h, w)
  frames_ref = reference.reshape(-1, 3, h, w)
  if frames_per_batch is None or frames_per_batch >= frames.shape[0]:
    return jnp.mean(lpips_images(weights, frames, frames_ref))
  scores = jax.lax.map(
      lambda pair: lpips_images(weights, pair[0][None], pair[1][None])[0],
      (frames, frames_ref), batch_size=frames_per_batch)
  return jnp.mean(scores)
