"""LPIPS-Alex against the PyTorch `lpips` package (0.1.4) with the same
weights: a random AlexNet backbone and the package's own v0.1 heads.

`lpips` imports torchvision at module level only to build
`torchvision.models.alexnet(pretrained=...).features`; torchvision from
PyPI does not import beside the CPU torch the test extra pins. When it is
missing, the test puts a minimal `torchvision.models.alexnet` into
sys.modules for the duration of this module, building the same
`features` Sequential torchvision defines (Conv 11/4/2, ReLU, MaxPool 3/2,
Conv 5/1/2, ReLU, MaxPool, Conv 3/1/1, ReLU, Conv 3/1/1, ReLU,
Conv 3/1/1, ReLU, MaxPool) with random weights. `pnet_rand=True` asks
torchvision for `pretrained=False`, so nothing is downloaded either way.
Everything else (scaling layer, taps, normalisation, heads, averaging) is
the package's real code.
"""

import importlib.util
import re
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch as safetensors_torch
import torch

from astraea_jax import lpips as lp
from astraea_jax import testing

if importlib.util.find_spec("lpips") is None:  # the test extra, --no-deps
  raise ImportError("the `lpips` package (test extra) is not installed: "
                    f"{testing.NO_DEPS_EXTRA}")

# fp32 on both sides, same math; differences are summation order only.
RTOL = 1e-5


def _alexnet_features():
  nn = torch.nn
  return nn.Sequential(
      nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True),
      nn.MaxPool2d(3, 2),
      nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True),
      nn.MaxPool2d(3, 2),
      nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
      nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
      nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
      nn.MaxPool2d(3, 2))


def _fake_torchvision():
  def alexnet(pretrained=False, **unused):
    assert not pretrained, "the test must never ask for ImageNet weights"
    return types.SimpleNamespace(features=_alexnet_features())
  models = types.ModuleType("torchvision.models")
  models.alexnet = alexnet
  tv = types.ModuleType("torchvision")
  tv.models = models
  return tv, models


@pytest.fixture(scope="module")
def reference_lpips():
  """The package's LPIPS(net='alex') with a random backbone, in eval mode."""
  with pytest.MonkeyPatch.context() as mp:
    if importlib.util.find_spec("torchvision") is None:
      tv, models = _fake_torchvision()
      mp.setitem(sys.modules, "torchvision", tv)
      mp.setitem(sys.modules, "torchvision.models", models)
    for name in [m for m in sys.modules if m.split(".")[0] == "lpips"]:
      mp.delitem(sys.modules, name)
    import lpips
    torch.manual_seed(0)
    model = lpips.LPIPS(net="alex", version="0.1", pretrained=True,
                        pnet_rand=True, verbose=False)
    yield model.eval()


@pytest.fixture(scope="module")
def weight_files(reference_lpips, tmp_path_factory):
  """The reference's weights in the files users give: torchvision's alexnet
  key names for the backbone, lpips' names for the heads."""
  root = tmp_path_factory.mktemp("lpips")
  state = reference_lpips.state_dict()
  backbone, heads = {}, {}
  for name, value in state.items():
    # lpips nests torchvision's features.{i} as net.slice{s}.{i}.
    if name.startswith("net.slice"):
      backbone["features." + name.split(".", 2)[2]] = value.contiguous()
    elif re.fullmatch(r"lin\d\.model\.1\.weight", name):
      # (`lins.{l}.*` is the same tensor, seen through the ModuleList.)
      heads[name] = value.contiguous()
  assert len(backbone) == 10 and len(heads) == 5, (list(backbone), list(heads))
  safetensors_torch.save_file(backbone, root / "alexnet.safetensors")
  safetensors_torch.save_file(heads, root / "heads.safetensors")
  return root / "alexnet.safetensors", root / "heads.safetensors"


def _reference_scores(model, x, y):
  with torch.no_grad():
    out = model(torch.from_numpy(x), torch.from_numpy(y))
  return out.reshape(-1).numpy().astype(np.float64)


@pytest.mark.parametrize("height,width", [(64, 64), (72, 100)])
def test_matches_lpips_package(reference_lpips, weight_files, height, width):
  weights = lp.load_lpips_weights(*weight_files)
  rng = np.random.default_rng(height + width)
  x = rng.uniform(-1, 1, (3, 3, height, width)).astype(np.float32)
  # The second image is a perturbation of the first, as in video quality
  # use, plus one unrelated pair.
  y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1)
  y[2] = rng.uniform(-1, 1, (3, height, width))
  y = y.astype(np.float32)
  expected = _reference_scores(reference_lpips, x, y)
  assert np.all(expected > 0) and len(set(expected.round(6))) == 3, expected
  ours = np.asarray(lp.lpips_images(weights, x, y), np.float64)
  np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=0)
  # Identical images: zero up to rounding (the two halves of the batch may
  # take different conv code paths; the scores above are ~1e-2).
  assert np.all(np.abs(np.asarray(lp.lpips_images(weights, x, x))) < 1e-12)


def test_video_is_mean_over_frames(reference_lpips, weight_files):
  weights = lp.load_lpips_weights(*weight_files)
  rng = np.random.default_rng(1)
  video = rng.uniform(-1, 1, (2, 3, 3, 40, 48)).astype(np.float32)  # B T C
  ref = np.clip(video + 0.2 * rng.standard_normal(video.shape), -1, 1)
  ref = ref.astype(np.float32)
  per_frame = _reference_scores(reference_lpips, video.reshape(-1, 3, 40, 48),
                                ref.reshape(-1, 3, 40, 48))
  expected = per_frame.mean()
  got = float(lp.lpips(video, ref, weights))
  np.testing.assert_allclose(got, expected, rtol=RTOL)
  got_batched = float(lp.lpips(video, ref, weights, frames_per_batch=4))
  np.testing.assert_allclose(got_batched, expected, rtol=RTOL)
  channels_last = float(lp.lpips(np.moveaxis(video, 2, -1),
                                 np.moveaxis(ref, 2, -1), weights,
                                 channel_axis=-1))
  np.testing.assert_allclose(channels_last, expected, rtol=RTOL)


def test_heads_from_package_pth_need_allow_pth(weight_files):
  backbone, _ = weight_files
  with pytest.raises(ValueError, match="allow_pth"):
    lp.load_lpips_weights(backbone)
  weights = lp.load_lpips_weights(backbone, allow_pth=True)
  # The paper's heads are trained with non-negative weights (clamped).
  assert all(float(jnp.min(h)) >= 0 for h in weights["heads"])
  assert [h.shape[0] for h in weights["heads"]] == [64, 192, 384, 256, 256]


def test_clear_errors(weight_files, tmp_path):
  backbone, heads = weight_files
  with pytest.raises(FileNotFoundError, match="does not exist"):
    lp.load_lpips_weights(tmp_path / "missing.safetensors", heads)
  partial = safetensors_torch.load_file(backbone)
  del partial["features.8.weight"]
  safetensors_torch.save_file(partial, tmp_path / "partial.safetensors")
  with pytest.raises(KeyError, match="features.8.weight"):
    lp.load_lpips_weights(tmp_path / "partial.safetensors", heads)
  weights = lp.load_lpips_weights(backbone, heads)
  small = np.zeros((1, 3, 30, 64), np.float32)
  with pytest.raises(ValueError, match="too small"):
    lp.lpips(small, small, weights)
  with pytest.raises(ValueError, match="shapes differ"):
    lp.lpips(small, small[..., :32], weights)
