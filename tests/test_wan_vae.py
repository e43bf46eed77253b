"""Wan2.1 VAE: parity with the original code and diffusers, converter checks.

Parity tolerance (float32, same math in a different order): max abs error
<= 1e-5 * max|reference| + 1e-6. References:
  * ../shared/fixtures/wan21_vae: `WanVAE_` of Wan-Video/Wan2.1 (dim 8);
  * diffusers `AutoencoderKLWan` built here with every parameter random,
    read through the diffusers-layout converter.
"""

import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax import testing
from astraea_jax.vae import wan_vae
from astraea_jax.vae.wan_vae import WanVAEConfig
from converters import wan_vae as converter
from converters.common import CheckpointError, KeyMismatch
from converters.safetensors_io import SafetensorsFile, save_file


@pytest.fixture(scope="module")
def fixture_dir(fixtures):
  return fixtures / "wan21_vae"


@pytest.fixture(scope="module")
def io(fixture_dir):
  f = SafetensorsFile(fixture_dir / "io.safetensors")
  return {k: np.array(f.get(k)) for k in f.keys()}


@pytest.fixture(scope="module")
def weights(fixture_dir):
  f = SafetensorsFile(fixture_dir / "weights.safetensors")
  return {k: np.array(f.get(k)) for k in f.keys()}


@pytest.fixture(scope="module")
def vae(fixture_dir):
  """The fixture's original-key safetensors through `load_vae`."""
  return converter.load_vae(fixture_dir / "weights.safetensors")


@pytest.fixture(scope="module")
def decoded(vae, io):
  return np.asarray(wan_vae.decode_jit(vae, io["z"]))


# Against the original code (fixture) -----------------------------------------


def test_config_matches_fixture(vae):
  assert vae.config == WanVAEConfig.tiny()


def test_latent_statistics_match_fixture_and_diffusers(io):
  """Our Wan2.1 constants = the fixture's scale pair = diffusers defaults."""
  vae = wan_vae.abstract_model(WanVAEConfig.tiny())
  mean, inv_std = vae._scale()  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(mean), io["scale_mean"])
  np.testing.assert_array_equal(np.asarray(inv_std), io["scale_inv_std"])
  diffusers = importlib.import_module("diffusers")
  params = inspect.signature(diffusers.AutoencoderKLWan.__init__).parameters
  assert tuple(params["latents_mean"].default) == wan_vae.WAN21_LATENTS_MEAN
  assert tuple(params["latents_std"].default) == wan_vae.WAN21_LATENTS_STD


def test_decode_matches_original(decoded, io):
  assert decoded.shape == (1, 3, 5, 32, 32)
  testing.assert_close(decoded, io["decode_out"])


def test_clamped_decode_matches_original(decoded, io):
  clamped = np.asarray(wan_vae.clamp_video(decoded))
  testing.assert_close(clamped, io["decode_out_clamped"])
  # The reference leaves the range: clamping is exercised, not a no-op.
  assert np.abs(io["decode_out"]).max() > 1.0


def test_encode_matches_original(vae, io):
  mu = wan_vae.encode_jit(vae, io["video"])
  assert mu.shape == (1, 16, 2, 4, 4)
  testing.assert_close(mu, io["encode_mu"])


def test_bfloat16_decode_close_to_original(fixture_dir, io):
  """bf16 compute and weights: 8-bit mantissa (2^-9 relative rounding) over
  ~40 stacked convolutions; measured 2.2% of max|ref| max, 0.3% mean."""
  vae16 = converter.load_vae(fixture_dir / "weights.safetensors",
                             dtype="bfloat16", param_dtype="bfloat16")
  assert vae16.decoder.conv1.kernel[...].dtype == jnp.bfloat16
  out = np.asarray(wan_vae.decode_jit(vae16, io["z"]))
  assert out.dtype == np.float32
  ref = io["decode_out"]
  err = np.abs(out - ref)
  assert err.max() <= 0.05 * np.abs(ref).max()
  assert err.mean() <= 0.01 * np.abs(ref).max()


def test_compiled_graph_does_not_grow_with_frames(vae):
  """Chunks after the first run in one lax.scan: same program for any T."""
  graphdef, state = nnx.split(vae)

  def eqns(fn, x):
    return len(jax.make_jaxpr(fn)(state, x).eqns)

  def dec(s, z):
    return nnx.merge(graphdef, s).decode(z)

  def enc(s, v):
    return nnx.merge(graphdef, s).encode(v)

  assert eqns(dec, jnp.zeros((1, 16, 2, 4, 4))) == eqns(
      dec, jnp.zeros((1, 16, 21, 4, 4)))
  assert eqns(enc, jnp.zeros((1, 3, 5, 16, 16))) == eqns(
      enc, jnp.zeros((1, 3, 81, 16, 16)))


def test_input_validation(vae):
  with pytest.raises(ValueError, match="num_frames=6"):
    vae.encode(jnp.zeros((1, 3, 6, 32, 32)))
  with pytest.raises(ValueError, match="h=36"):
    vae.encode(jnp.zeros((1, 3, 5, 36, 32)))
  with pytest.raises(ValueError, match="latents.shape"):
    vae.decode(jnp.zeros((1, 4, 2, 4, 4)))
  assert WanVAEConfig.wan21().latent_frames(81) == 21
  assert WanVAEConfig.wan21().video_frames(21) == 81


# Against diffusers AutoencoderKLWan, every parameter random ----------------


def _random_diffusers_vae(torch, seed=0):
  diffusers = importlib.import_module("diffusers")
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKLWan(
      base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
      temperal_downsample=[False, True, True]).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if name.endswith("gamma"):
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      else:  # conv weights (out, in, *window): unit-variance activations
        p.copy_(noise / p[0].numel() ** 0.5)
  return model


def test_diffusers_parity(tmp_path):
  """Decode (3 latent frames: the scan runs 2 chunks) and encode (9 frames),
  batch 2, through a diffusers-layout folder (config.json + safetensors)."""
  torch = importlib.import_module("torch")
  model = _random_diffusers_vae(torch)
  folder = tmp_path / "vae"
  folder.mkdir()
  save_file({k: v.numpy() for k, v in model.state_dict().items()},
            folder / "diffusion_pytorch_model.safetensors")
  model.save_config(folder)  # config.json
  ours = converter.load_vae(tmp_path)  # finds vae/ like a model folder
  assert ours.config == WanVAEConfig.tiny()

  g = torch.Generator().manual_seed(7)
  latents = torch.randn(2, 16, 3, 4, 4, generator=g)
  video = torch.rand(2, 3, 9, 32, 32, generator=g) * 2 - 1
  mean = torch.tensor(model.config.latents_mean).view(1, 16, 1, 1, 1)
  inv_std = 1.0 / torch.tensor(model.config.latents_std).view(1, 16, 1, 1, 1)
  with torch.no_grad():
    # The diffusers pipeline de-normalises; its decode clamps to [-1, 1].
    ref_video = model.decode(latents / inv_std + mean).sample.numpy()
    ref_mu = ((model.encode(video).latent_dist.mean - mean)
              * inv_std).numpy()
  # Most values inside (-1, 1): the clamped comparison is informative.
  assert np.mean(np.abs(ref_video) < 1.0) > 0.5

  out = wan_vae.decode_jit(ours, latents.numpy(), clamp=True)
  assert out.shape == (2, 3, 9, 32, 32)
  testing.assert_close(out, ref_video)
  testing.assert_close(wan_vae.encode_jit(ours, video.numpy()), ref_mu)


def test_key_map_equals_diffusers_conversion(weights):
  """Our derived diffusers names = diffusers' own convert_wan_vae_to_diffusers
  applied to the original-layout fixture, tensor for tensor; and the full
  Wan2.1 size matches AutoencoderKLWan's default state dict, key and shape."""
  torch = importlib.import_module("torch")
  diffusers = importlib.import_module("diffusers")
  with torch.device("meta"):  # shapes only, no memory
    full = diffusers.AutoencoderKLWan()
  assert {k: tuple(v.shape) for k, v in full.state_dict().items()} == (
      converter.expected_shapes(WanVAEConfig.wan21(), "diffusers"))

  single_file_utils = importlib.import_module(
      "diffusers.loaders.single_file_utils")
  converted = single_file_utils.convert_wan_vae_to_diffusers(dict(weights))
  config = WanVAEConfig.tiny()
  to_path = converter.key_map(config, "diffusers")
  from_path = {p: k for k, p in converter.key_map(config, "original").items()}
  assert sorted(converted) == sorted(to_path)
  for key, value in converted.items():
    assert value is weights[from_path[to_path[key]]], key


# Key validation and .pth refusal ---------------------------------------------


def test_missing_key_named(weights):
  broken = dict(weights)
  del broken["decoder.upsamples.4.shortcut.weight"]
  with pytest.raises(KeyMismatch) as e:
    converter.vae_from_state_dict(broken, WanVAEConfig.tiny())
  assert e.value.missing == ["decoder.upsamples.4.shortcut.weight"]
  assert not e.value.unexpected and not e.value.misshapen
  assert "decoder.upsamples.4.shortcut.weight" in str(e.value)


def test_unexpected_key_named(weights):
  broken = dict(weights, **{"decoder.upsamples.99.weight": np.zeros(3)})
  with pytest.raises(KeyMismatch) as e:
    converter.vae_from_state_dict(broken, WanVAEConfig.tiny())
  assert e.value.unexpected == ["decoder.upsamples.99.weight"]
  assert "decoder.upsamples.99.weight" in str(e.value)


def test_wrong_shape_named(weights):
  broken = dict(weights)
  broken["encoder.conv1.weight"] = np.zeros((8, 3, 3, 3, 2), np.float32)
  with pytest.raises(KeyMismatch) as e:
    converter.vae_from_state_dict(broken, WanVAEConfig.tiny())
  (line,) = e.value.misshapen
  assert line.startswith("encoder.conv1.weight")
  assert "(8, 3, 3, 3, 2)" in line and "(8, 3, 3, 3, 3)" in line
  # A full Wan2.1 config against tiny weights: every conv is misshapen.
  with pytest.raises(KeyMismatch, match="wrong shapes"):
    converter.vae_from_state_dict(weights, WanVAEConfig.wan21())


def test_diffusers_layout_errors_use_diffusers_names(weights):
  config = WanVAEConfig.tiny()
  path_to_diffusers = {
      p: k for k, p in converter.key_map(config, "diffusers").items()}
  to_diffusers = {k: path_to_diffusers[p]
                  for k, p in converter.key_map(config, "original").items()}
  renamed = {to_diffusers[k]: v for k, v in weights.items()}
  del renamed["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"]
  renamed["decoder.up_blocks.0.upsamplers.0.time_conv.bias"] = np.zeros(5)
  with pytest.raises(KeyMismatch) as e:
    converter.vae_from_state_dict(renamed)
  assert e.value.missing == [
      "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"]
  assert e.value.misshapen[0].startswith(
      "decoder.up_blocks.0.upsamplers.0.time_conv.bias")


def test_unknown_layout_rejected():
  with pytest.raises(CheckpointError, match="layout"):
    converter.vae_from_state_dict({"foo.weight": np.zeros(3)})


def test_pth_refused_without_allow_pth(tmp_path, weights, monkeypatch, io,
                                       decoded):
  torch = importlib.import_module("torch")
  path = tmp_path / "Wan2.1_VAE.pth"
  torch.save({k: torch.from_numpy(v) for k, v in weights.items()}, path)

  def no_unpickling(*args, **kwargs):
    raise AssertionError("torch.load called without allow_pth")

  with monkeypatch.context() as m:
    m.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError, match="--allow-pth"):
      converter.load_vae(path)
    with pytest.raises(CheckpointError, match="allow_pth=True"):
      converter.read_pth(path)
  # Allowed: weights_only load, the same model as from safetensors.
  vae = converter.load_vae(path, allow_pth=True)
  testing.assert_close(wan_vae.decode_jit(vae, io["z"]), decoded, rel=0, abs_=0)


def test_tiled_decode_is_close_to_whole_frames():
  """Spatial tiling (`decode_tiled`, `astraea generate --vae-tile`) on the
  tiny random VAE, 12 x 20 latents (96 x 160 pixels), 3 latent frames.

  A tile covering the frame is the untiled decode exactly; smaller tiles
  are not (a tile's convolutions see zeros past its edge, its attention
  only its own pixels), and the linear blend over the overlap is what
  keeps the seams small. Measured here: tiles of 96 px (1 x 2 tiles, the
  default overlap 24 px) 30.2 dB PSNR against whole frames, without
  overlap 26.6 dB. Bounds: >= 28 dB, and the blend >= 2 dB better than
  none (random weights make texture, the hardest case for seams: a real
  VAE's smooth output differs less)."""
  vae = wan_vae.WanVAE(WanVAEConfig.tiny(), rngs=nnx.Rngs(0))
  latents = np.random.default_rng(0).standard_normal(
      (1, 16, 3, 12, 20)).astype(np.float32)
  # Whole frames one latent frame at a time: `decode`'s numbers (the jitted
  # whole decode vs these chunks: tests/test_pipeline.py).
  whole = wan_vae.decode_chunked(vae, latents, to_host=True)
  np.testing.assert_array_equal(
      wan_vae.decode_tiled(vae, latents, tile=160), whole)

  def psnr(video):
    return 10 * np.log10(4.0 / np.mean((video - whole) ** 2))

  blended = psnr(wan_vae.decode_tiled(vae, latents, tile=96))
  seams = psnr(wan_vae.decode_tiled(vae, latents, tile=96, overlap=0))
  assert blended >= 28 and blended >= seams + 2, (blended, seams)
  with pytest.raises(ValueError, match="multiple of 8"):
    wan_vae.decode_tiled(vae, latents, tile=100)
  # 12 latent rows fit one 96 px tile; 20 columns take two, the second
  # flush with the right edge (latent starts 0 and 8: 4 columns shared).
  assert wan_vae.tile_grid(vae.config, 12, 20, 96) == (12, 3, [(0, 0),
                                                               (0, 8)])
