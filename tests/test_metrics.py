"""PSNR / SSIM against scikit-image on random videos."""

import numpy as np
import pytest
from skimage import metrics as skimage_metrics  # the `test` extra

from astraea_jax import metrics


@pytest.fixture(scope="module")
def videos():
  rng = np.random.default_rng(0)
  ref = np.clip(rng.standard_normal((3, 24, 20, 3)) * 0.4, -1, 1)
  noisy = np.clip(ref + 0.1 * rng.standard_normal(ref.shape), -1, 1)
  return noisy.astype(np.float32), ref.astype(np.float32)


def test_psnr_matches_skimage(videos):
  ours = float(metrics.psnr(*videos, data_range=2.0))
  ref = skimage_metrics.peak_signal_noise_ratio(videos[1], videos[0],
                                                data_range=2.0)
  assert abs(ours - ref) < 1e-4  # float32 MSE vs float64


def test_ssim_matches_skimage_per_frame(videos):
  ours = float(metrics.ssim(*videos, data_range=2.0))
  ref = np.mean([
      skimage_metrics.structural_similarity(
          videos[0][t], videos[1][t], data_range=2.0, channel_axis=-1,
          gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
      for t in range(3)])
  # float32 sums over 11x11 windows vs skimage's float64.
  assert abs(ours - ref) < 1e-5


def test_identical_videos_and_errors(videos):
  assert float(metrics.ssim(videos[1], videos[1])) == pytest.approx(1.0,
                                                                    abs=1e-6)
  with pytest.raises(ValueError, match="shapes differ"):
    metrics.psnr(videos[0], videos[1][:2])
  with pytest.raises(ValueError, match="smaller than the 11x11 window"):
    metrics.ssim(videos[0][:, :8, :8], videos[1][:, :8, :8])
