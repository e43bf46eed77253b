"""Wan2.2 VAE: parity with wan22's `vae2_2.WanVAE_` and diffusers'
`AutoencoderKLWan(is_residual=True)`, through the converter.

Tiny random config (encoder width 8, decoder 12, z 48, one residual block
per encoder stage and two per decoder stage: the compile time on CPU grows
with the block count), every parameter random (`randomise_`). A 9-frame
32 x 48 video: the first frame alone and two chunks of 4 frames, so both
the first-chunk path (zero-padded shortcut average, undoubled first frame)
and the cached chunks run.
Tolerance: max abs error <= 1e-5 * max|reference| + 1e-6 (float32, the same
math in a different order; `testing.assert_close`).
"""

from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from _wan22_reference import load_wan22_module, randomise_
from astraea_jax import testing
from astraea_jax.vae import wan22_vae, wan_vae
from astraea_jax.vae.wan22_vae import Wan22VAEConfig
from converters import wan_vae as converter

CONFIG = Wan22VAEConfig.tiny(num_res_blocks=1)
VIDEO_SHAPE = (1, 3, 9, 32, 48)
LATENT_SHAPE = (1, 48, 3, 2, 3)


@pytest.fixture(scope="module")
def reference():
  """(wan22's WanVAE_ with random weights, its state dict as numpy)."""
  module = load_wan22_module("vae2_2")
  ref = module.WanVAE_(dim=8, dec_dim=12, z_dim=48, dim_mult=[1, 2, 4, 4],
                       num_res_blocks=1,
                       temperal_downsample=[False, True, True]).eval()
  randomise_(ref, seed=31)
  return ref, {k: v.numpy() for k, v in ref.state_dict().items()}


@pytest.fixture(scope="module")
def vae(reference):
  return converter.vae_from_state_dict(reference[1])


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(4)
  video = rng.uniform(-1, 1, VIDEO_SHAPE).astype(np.float32)
  latents = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
  return video, latents


def scale():
  return [torch.tensor(CONFIG.latents_mean),
          1 / torch.tensor(CONFIG.latents_std)]


def test_config_is_read_from_the_original_state_dict(vae):
  assert isinstance(vae, wan22_vae.Wan22VAE)
  assert vae.config == CONFIG


def test_latent_statistics_are_the_originals():
  """Wan2_2_VAE's scale pair, read without building its 2.8 GB model."""
  module = load_wan22_module("vae2_2")
  with mock.patch.object(module, "_video_vae"):
    original = module.Wan2_2_VAE(device="cpu")
  np.testing.assert_array_equal(np.float32(CONFIG.latents_mean),
                                original.scale[0].numpy())
  np.testing.assert_allclose(1 / np.float32(CONFIG.latents_std),
                             original.scale[1].numpy(), rtol=1e-7)


def test_encode_matches_original(reference, vae, data):
  with torch.no_grad():
    expected = reference[0].encode(torch.from_numpy(data[0]),
                                   scale()).numpy()
  mu = wan_vae.encode_jit(vae, data[0])
  assert mu.shape == LATENT_SHAPE
  testing.assert_close(mu, expected)


def test_decode_matches_original(reference, vae, data):
  with torch.no_grad():
    expected = reference[0].decode(torch.from_numpy(data[1]),
                                   scale()).numpy()
  video = wan_vae.decode_jit(vae, data[1])
  assert video.shape == VIDEO_SHAPE
  testing.assert_close(video, expected)


def test_diffusers_layout_matches_diffusers(data):
  """AutoencoderKLWan's own encode (posterior mean) and decode (clamped),
  on latents normalised as the pipelines do."""
  from diffusers import AutoencoderKLWan  # pylint: disable=g-import-not-at-top
  ref = AutoencoderKLWan(
      base_dim=8, decoder_base_dim=12, z_dim=48, is_residual=True,
      num_res_blocks=1,
      patch_size=2, in_channels=12, out_channels=12,
      latents_mean=list(CONFIG.latents_mean),
      latents_std=list(CONFIG.latents_std),
      scale_factor_spatial=16).eval()
  randomise_(ref, seed=32)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  vae = converter.vae_from_state_dict(
      sd, converter.config_from_diffusers(dict(ref.config)))
  assert vae.config == CONFIG
  mean = torch.tensor(CONFIG.latents_mean)[None, :, None, None, None]
  std = torch.tensor(CONFIG.latents_std)[None, :, None, None, None]
  video, latents = data
  with torch.no_grad():
    mu = ref.encode(torch.from_numpy(video)).latent_dist.mean
    decoded = ref.decode(torch.from_numpy(latents) * std + mean).sample
  testing.assert_close(wan_vae.encode_jit(vae, video),
                       ((mu - mean) / std).numpy())
  decoded = decoded.numpy()
  # diffusers clamps: the comparison means something where it did not
  # saturate. Clamped here, the decode compiled for the test above serves.
  assert np.mean(np.abs(decoded) < 0.99) > 0.2
  testing.assert_close(wan_vae.clamp_video(wan_vae.decode_jit(vae, latents)),
                       decoded)


def test_fold_and_shortcuts_invert_where_they_should():
  """patchify / unpatchify are inverses; dup_up of a first chunk keeps one
  frame; avg_down of ones is ones, except on a zero-padded first frame:
  the groups it averages are consecutive channels of the (c, t, h, w)
  fold, so the pad's entries and the frame's fall into alternate groups."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 4, 6, 3)),
                  jnp.float32)
  np.testing.assert_array_equal(
      wan22_vae.unpatchify(wan22_vae.patchify(x, 2), 2), x)
  assert wan22_vae.dup_up(x, 2, 2, 3, first=True).shape == (1, 3, 8, 12, 3)
  ones = jnp.ones((1, 1, 4, 4, 8))
  alternate = np.tile([0.0, 1.0], 8) + np.zeros((1, 1, 2, 2, 1))
  np.testing.assert_array_equal(wan22_vae.avg_down(ones, 2, 2, 16),
                                alternate)
  np.testing.assert_array_equal(
      wan22_vae.avg_down(jnp.ones((1, 4, 4, 4, 8)), 2, 2, 16), 1.0)


def test_shortcut_channel_mismatch_is_refused():
  with pytest.raises(ValueError, match="do not divide evenly"):
    wan22_vae.abstract_model(Wan22VAEConfig.tiny(base_dim=6,
                                                 dim_mult=(1, 3, 4, 4)))
