"""OpenSora v1.2 VAE: parity of both halves and the pipeline, converter.

References:
  * the image VAE: diffusers `AutoencoderKL`, live on the CPU torch wheel,
    every parameter random (GroupNorm affines included), run in float64;
  * the temporal VAE: the ORIGINAL `VAE_Temporal` (hpcaitech/Open-Sora,
    commit 3552145f, `opensora/models/vae/vae_temporal.py`), run once in
    float32 with random weights by tools/build_opensora_vae_temporal_
    fixture.py into tests/fixtures/opensora_vae_temporal/ (weights under
    the original key names, inputs and outputs, meta.json);
  * the temporal VAE and the pipeline around it: a NumPy float64
    transcription, below, written from hpcaitech/Open-Sora at commit
    3552145f847b5171cd2c85982d116b04eb98c5bf: `opensora/models/vae/
    vae_temporal.py` (`CausalConv3d`, `ResBlock`, `Encoder`, `Decoder`,
    `VAE_Temporal.encode/decode/get_latent_size`) and `opensora/models/vae/
    vae.py` (`VideoAutoencoderKL`, `VideoAutoencoderPipeline.encode/decode`,
    `OpenSoraVAE_V1_2`). It reads the weights by the original key names and
    the tests check that it read every tensor of the checkpoint.

Parity tolerance (float32 vs float64 references, same math in another
order): max abs error <= 1e-5 * max|reference| + 1e-6.
"""

import importlib
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax import testing
from astraea_jax.vae import opensora_vae
from astraea_jax.vae.opensora_vae import (
  OpenSoraVAEConfig,
  SpatialVAEConfig,
  TemporalVAEConfig,
)
from converters import opensora_vae as converter
from converters.common import CheckpointError, KeyMismatch, Source
from converters.safetensors_io import SafetensorsFile, save_file

torch = importlib.import_module("torch")
diffusers = importlib.import_module("diffusers")

# tiny: 2x in space, 4x in time, micro-frame chunks of 9 frames (3 latent
# frames), micro-batches of 3 frames for the image VAE.
CONFIG = OpenSoraVAEConfig.tiny()
# Checkpoint normalisation buffers, unlike the v1.2 constants, so that the
# test sees which ones are used.
SHIFT = (0.3, -0.2, 0.1, 0.5)
SCALE = (1.5, 2.5, 0.8, 3.0)


# NumPy float64 transcription of the OpenSora code (commit above) --------------


class Weights(dict):
  """A state dict that records which keys were read."""

  def __init__(self, arrays):
    super().__init__({k: np.asarray(v, np.float64) for k, v in arrays.items()})
    self.read = set()

  def __getitem__(self, key):
    self.read.add(key)
    return super().__getitem__(key)

  def get(self, key, default=None):
    if key in self:
      self.read.add(key)
    return super().get(key, default)


def np_silu(x):
  return x / (1 + np.exp(-x))


def np_group_norm(x, weight, bias, groups, eps):
  """torch.nn.GroupNorm on (B, C, ...)."""
  b, c = x.shape[:2]
  g = x.reshape(b, groups, -1)
  g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
  shape = (1, c) + (1,) * (x.ndim - 2)
  return g.reshape(x.shape) * weight.reshape(shape) + bias.reshape(shape)


def np_causal_conv3d(x, weight, bias, time_stride=1):
  """`CausalConv3d.forward`: pad time (kt - 1 + 1 - stride, 0) and space
  (k//2, k//2) with zeros, then nn.Conv3d with stride (stride, 1, 1)."""
  kt, kh, kw = weight.shape[2:]
  x = np.pad(x, ((0, 0), (0, 0), (kt - 1 + 1 - time_stride, 0),
                 (kh // 2, kh // 2), (kw // 2, kw // 2)))
  t_out = (x.shape[2] - kt) // time_stride + 1
  h_out, w_out = x.shape[3] - kh + 1, x.shape[4] - kw + 1
  out = np.zeros((x.shape[0], weight.shape[0], t_out, h_out, w_out))
  for a, i, j in itertools.product(range(kt), range(kh), range(kw)):
    window = x[:, :, a:a + time_stride * (t_out - 1) + 1:time_stride,
               i:i + h_out, j:j + w_out]
    out += np.einsum("bcthw,oc->bothw", window, weight[:, :, a, i, j])
  if bias is not None:
    out += bias[None, :, None, None, None]
  return out


class TemporalReference:
  """`VAE_Temporal` with weights under the OpenSora key names."""

  def __init__(self, weights: Weights, config: TemporalVAEConfig,
               prefix="temporal_vae."):
    self.w, self.c, self.prefix = weights, config, prefix

  def conv(self, name, x, time_stride=1):
    p = self.prefix + name + ".conv."
    return np_causal_conv3d(x, self.w[p + "weight"], self.w.get(p + "bias"),
                            time_stride)

  def norm(self, name, x):
    p = self.prefix + name + "."
    return np_group_norm(x, self.w[p + "weight"], self.w[p + "bias"],
                         self.c.num_groups, 1e-5)

  def res_block(self, name, x):
    h = self.conv(name + ".conv1", np_silu(self.norm(name + ".norm1", x)))
    h = self.conv(name + ".conv2", np_silu(self.norm(name + ".norm2", h)))
    if self.prefix + name + ".conv3.conv.weight" in self.w:  # in != out
      x = self.conv(name + ".conv3", x)
    return x + h

  def encoder(self, x):
    n = len(self.c.channel_multipliers)
    x = self.conv("encoder.conv_in", x)
    for i in range(n):
      for j in range(self.c.num_res_blocks):
        x = self.res_block(f"encoder.block_res_blocks.{i}.{j}", x)
      if i < n - 1 and self.c.temporal_downsample[i]:  # else nn.Identity
        x = self.conv(f"encoder.conv_blocks.{i}", x, time_stride=2)
    for j in range(self.c.num_res_blocks):
      x = self.res_block(f"encoder.res_blocks.{j}", x)
    return self.conv("encoder.conv2", np_silu(self.norm("encoder.norm1", x)))

  def decoder(self, z):
    n = len(self.c.channel_multipliers)
    x = self.conv("decoder.conv1", z)
    for j in range(self.c.num_res_blocks):
      x = self.res_block(f"decoder.res_blocks.{j}", x)
    for i in reversed(range(n)):
      for j in range(self.c.num_res_blocks):
        x = self.res_block(f"decoder.block_res_blocks.{i}.{j}", x)
      if i > 0:
        ts = 2 if self.c.temporal_downsample[i - 1] else 1
        if ts == 2:
          x = self.conv(f"decoder.conv_blocks.{i - 1}", x)
        # rearrange "B (C ts hs ws) T H W -> B C (T ts) (H hs) (W ws)", hs =
        # ws = 1
        b, cts, t, h, w = x.shape
        x = x.reshape(b, cts // ts, ts, t, h, w).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, cts // ts, t * ts, h, w)
    return self.conv("decoder.conv_out", np_silu(self.norm("decoder.norm1",
                                                           x)))

  def time_padding(self, num_frames):
    factor = 2 ** sum(self.c.temporal_downsample)
    return 0 if num_frames % factor == 0 else factor - num_frames % factor

  def encode(self, x):
    """-> (mean, clamped logvar), each (B, embed_dim, T', H, W)."""
    pad = self.time_padding(x.shape[2])
    x = np.pad(x, ((0, 0), (0, 0), (pad, 0), (0, 0), (0, 0)))
    moments = self.conv("quant_conv", self.encoder(x))
    mean, logvar = np.split(moments, 2, axis=1)
    return mean, np.clip(logvar, -30.0, 20.0)

  def decode(self, z, num_frames):
    pad = self.time_padding(num_frames)
    return self.decoder(self.conv("post_quant_conv", z))[:, :, pad:]

  def latent_frames(self, num_frames):  # get_latent_size, time axis
    factor = 2 ** sum(self.c.temporal_downsample)
    return (num_frames + self.time_padding(num_frames)) // factor


def reference_latent_frames(num_frames, micro_frame_size, temporal):
  """`VideoAutoencoderPipeline.get_latent_size`, time axis."""
  if micro_frame_size is None:
    return temporal.latent_frames(num_frames)
  size = temporal.latent_frames(micro_frame_size) * (num_frames //
                                                      micro_frame_size)
  if num_frames % micro_frame_size > 0:
    size += temporal.latent_frames(num_frames % micro_frame_size)
  return size


class PipelineReference:
  """`VideoAutoencoderPipeline` (cal_loss False) with posterior means; the
  image VAE is diffusers' AutoencoderKL in float64, frame by frame; scale
  and shift are the checkpoint's buffers, (1, C, 1, 1, 1)."""

  def __init__(self, autoencoder, temporal: TemporalReference,
               micro_frame_size):
    self.autoencoder, self.temporal = autoencoder, temporal
    self.micro_frame_size = micro_frame_size
    self.shift, self.scale = temporal.w["shift"], temporal.w["scale"]

  def spatial_encode(self, x):  # VideoAutoencoderKL.encode, B C T H W
    b, c, t, h, w = x.shape
    frames = torch.from_numpy(x.transpose(0, 2, 1, 3, 4).reshape(-1, c, h, w))
    with torch.no_grad():
      z = self.autoencoder.encode(frames).latent_dist.mean.numpy() * 0.18215
    return z.reshape(b, t, *z.shape[1:]).transpose(0, 2, 1, 3, 4)

  def spatial_decode(self, z):  # VideoAutoencoderKL.decode
    b, c, t, h, w = z.shape
    frames = torch.from_numpy(z.transpose(0, 2, 1, 3, 4).reshape(-1, c, h, w))
    with torch.no_grad():
      x = self.autoencoder.decode(frames / 0.18215).sample.numpy()
    return x.reshape(b, t, *x.shape[1:]).transpose(0, 2, 1, 3, 4)

  def encode(self, video):
    x_z = self.spatial_encode(video)
    m = self.micro_frame_size
    if m is None:
      z = self.temporal.encode(x_z)[0]
    else:
      z = np.concatenate([self.temporal.encode(x_z[:, :, i:i + m])[0]
                          for i in range(0, x_z.shape[2], m)], axis=2)
    return (z - self.shift) / self.scale

  def decode(self, z, num_frames):
    z = z * self.scale + self.shift
    m = self.micro_frame_size
    if m is None:
      return self.spatial_decode(self.temporal.decode(z, num_frames))
    mz = self.temporal.latent_frames(m)
    chunks = []
    for i in range(0, z.shape[2], mz):
      chunks.append(self.temporal.decode(z[:, :, i:i + mz],
                                         num_frames=min(m, num_frames)))
      num_frames -= m
    return self.spatial_decode(np.concatenate(chunks, axis=2))


# Random checkpoints -----------------------------------------------------------


def randomise_(module, seed):
  """Every parameter of a torch module random: weights N(0, 1/fan_in),
  biases N(0, 0.1^2), GroupNorm gains 1 + N(0, 0.2^2) (diffusers would
  initialise gains to 1 and biases to 0, hiding misplaced ones)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.1 * noise)
      else:
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
  return module


def random_temporal_weights(config: OpenSoraVAEConfig, seed):
  """{temporal_vae.* key: array} with the names and shapes the published
  layout has (the reference checks it reads each of them)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in converter.expected_shapes(config, "opensora").items():
    if not key.startswith("temporal_vae."):
      continue
    noise = rng.standard_normal(shape).astype(np.float32)
    if "norm" in key and key.endswith("weight"):
      out[key] = 1 + 0.2 * noise
    elif key.endswith("bias"):
      out[key] = 0.1 * noise
    else:
      out[key] = noise / np.float32(np.sqrt(np.prod(shape[1:])))
  return out


def autoencoder_kl(spatial: SpatialVAEConfig, seed):
  model = diffusers.AutoencoderKL(
      in_channels=spatial.in_channels, out_channels=spatial.out_channels,
      down_block_types=("DownEncoderBlock2D",) * len(
          spatial.block_out_channels),
      up_block_types=("UpDecoderBlock2D",) * len(spatial.block_out_channels),
      block_out_channels=spatial.block_out_channels,
      layers_per_block=spatial.layers_per_block,
      latent_channels=spatial.latent_channels,
      norm_num_groups=spatial.norm_num_groups)
  return randomise_(model.eval(), seed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """The OpenSora-layout folder (model.safetensors + config.json of a
  VideoAutoencoderPipeline) of a tiny random VAE, and its references."""
  autoencoder = autoencoder_kl(CONFIG.spatial, seed=0)
  tensors = {f"spatial_vae.module.{k}": v.numpy()
             for k, v in autoencoder.state_dict().items()}
  tensors.update(random_temporal_weights(CONFIG, seed=1))
  tensors["shift"] = np.asarray(SHIFT, np.float32).reshape(1, 4, 1, 1, 1)
  tensors["scale"] = np.asarray(SCALE, np.float32).reshape(1, 4, 1, 1, 1)
  folder = tmp_path_factory.mktemp("opensora_vae")
  save_file(tensors, folder / "model.safetensors")
  (folder / "config.json").write_text(json.dumps({
      "architectures": ["VideoAutoencoderPipeline"],
      "model_type": "VideoAutoencoderPipeline",
      "vae_2d": {"type": "VideoAutoencoderKL"},
      "vae_temporal": {"type": "VAE_Temporal_SD", "from_pretrained": None},
      "micro_frame_size": CONFIG.micro_frame_size,
      "shift": list(OpenSoraVAEConfig().shift),
      "scale": list(OpenSoraVAEConfig().scale)}))
  weights = Weights(tensors)
  temporal = TemporalReference(weights, CONFIG.temporal)
  pipeline = PipelineReference(autoencoder.double(), temporal,
                               CONFIG.micro_frame_size)
  return {"folder": folder, "tensors": tensors, "weights": weights,
          "temporal": temporal, "pipeline": pipeline}


@pytest.fixture(scope="module")
def vae(checkpoint):
  # config.json gives v1.2's architecture; the test's tiny one is passed.
  return converter.load_vae(checkpoint["folder"], config=CONFIG)


def random_video(shape, seed):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def jitted(module, method, *args, **static):
  graphdef, state = nnx.split(module)

  @jax.jit
  def run(state, *args):
    return getattr(nnx.merge(graphdef, state), method)(*args, **static)

  return np.asarray(run(state, *args))


# The image VAE vs diffusers ---------------------------------------------------


def test_spatial_vae_matches_diffusers(tmp_path):
  """A deeper image VAE than the tiny preset's (2 resnets per encoder
  stage, 3 per decoder stage), read by `load_spatial_vae` from the folder
  diffusers writes; moments = quant_conv output (mean | logvar)."""
  spatial = SpatialVAEConfig(block_out_channels=(8, 16),
                             layers_per_block=2, norm_num_groups=4)
  reference = autoencoder_kl(spatial, seed=2)
  reference.save_pretrained(tmp_path / "vae")
  ours = converter.load_spatial_vae(tmp_path)
  assert ours.config.spatial == spatial
  images = random_video((2, 3, 16, 12), seed=2)  # N C H W
  latents = np.random.default_rng(3).standard_normal(
      (2, 4, 8, 6)).astype(np.float32)
  reference = reference.double()
  with torch.no_grad():
    posterior = reference.encode(torch.from_numpy(images).double()).latent_dist
    decoded = reference.decode(torch.from_numpy(latents).double()).sample
  moments = jitted(ours, "encode_moments", images.transpose(0, 2, 3, 1))
  mean, logvar = np.split(moments.transpose(0, 3, 1, 2), 2, axis=1)
  testing.assert_close(mean, posterior.mean.numpy())
  testing.assert_close(np.clip(logvar, -30, 20), posterior.logvar.numpy())
  out = jitted(ours, "decode", latents.transpose(0, 2, 3, 1))
  testing.assert_close(out.transpose(0, 3, 1, 2), decoded.numpy())


# The temporal VAE vs the NumPy transcription ----------------------------------


def test_temporal_vae_matches_reference(vae, checkpoint):
  """9 frames: padded to 12 at the front (3 latent frames), and back."""
  ref = checkpoint["temporal"]
  x = random_video((2, 4, 9, 3, 5), seed=4)  # B C T H W (spatial latents)
  moments = jitted(vae.temporal_vae, "encode_moments",
                   x.transpose(0, 2, 3, 4, 1))
  mean, logvar = np.split(moments.transpose(0, 4, 1, 2, 3), 2, axis=1)
  ref_mean, ref_logvar = ref.encode(x.astype(np.float64))
  assert mean.shape == (2, 4, 3, 3, 5)
  testing.assert_close(mean, ref_mean)
  testing.assert_close(np.clip(logvar, -30, 20), ref_logvar)
  z = np.random.default_rng(5).standard_normal((2, 4, 3, 3, 5)).astype(
      np.float32)
  out = jitted(vae.temporal_vae, "decode", z.transpose(0, 2, 3, 4, 1),
               num_frames=9)
  testing.assert_close(out.transpose(0, 4, 1, 2, 3), ref.decode(z, num_frames=9))


# The temporal VAE vs the original code -----------------------------------------

UPSTREAM = pathlib.Path(__file__).parent / "fixtures" / "opensora_vae_temporal"


@pytest.fixture(scope="module")
def upstream():
  """The fixture's meta.json, io arrays, weights and our TemporalVAE read
  from its weights by the converter (bare `VAE_Temporal` key names)."""
  meta = json.loads((UPSTREAM / "meta.json").read_text())
  io = SafetensorsFile(UPSTREAM / "io.safetensors")
  weights = SafetensorsFile(UPSTREAM / "weights.safetensors")
  config = OpenSoraVAEConfig(temporal=TemporalVAEConfig(**meta["config"]))
  assert converter.detect_layout(weights.keys()) == "temporal"
  # check_keys inside raises KeyMismatch on any missing, unexpected or
  # misshapen key: every upstream tensor is read.
  model = converter.temporal_vae_from_state_dict(weights, config)
  return {"meta": meta, "io": {k: io.get(k) for k in io.keys()},
          "weights": {k: weights.get(k) for k in weights.keys()},
          "config": config, "model": model}


def test_upstream_fixture_is_what_the_generator_says(upstream):
  """The fixture is the v1.2 code's VAE_Temporal at the stdit3 fixture's
  commit, with the architecture of VAE_Temporal_SD at a tiny width."""
  meta = upstream["meta"]
  assert meta["reference"]["repo"] == "hpcaitech/Open-Sora"
  assert meta["reference"]["commit"] == (
      "3552145f847b5171cd2c85982d116b04eb98c5bf")
  t = upstream["config"].temporal
  assert (t.channel_multipliers, t.temporal_downsample) == (
      (1, 2, 2, 4), (False, True, True))
  # Random GroupNorm affines (PyTorch would initialise 1 and 0).
  gains = upstream["weights"]["encoder.norm1.weight"]
  assert np.abs(gains - 1).max() > 0.05


@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_temporal_vae_matches_upstream(upstream, case):
  """Encode (posterior mean and clamped logvar) and decode of the original
  float32 code: a = 9 frames (front-padded to 12), b = 8 (no padding;
  decoded to 6, dropping 2), c = 17 (v1.2's micro-frame chunk).

  Tolerance: max abs error <= 1e-5 * max|reference| + 1e-6. Both sides are
  float32 with the same operations (~40 convolutions, GroupNorms) summed
  in other orders; JAX's CPU convolutions are full float32. Measured
  (2 CPU cores, jax CPU): at most 1.7e-6 * max|reference| over the three
  cases and outputs, a 6x margin.
  """
  io, model = upstream["io"], upstream["model"]
  num_frames = upstream["meta"]["cases"][case]["num_frames"]
  x = io[f"{case}.x"]
  moments = jitted(model, "encode_moments", x.transpose(0, 2, 3, 4, 1))
  mean, logvar = np.split(moments.transpose(0, 4, 1, 2, 3), 2, axis=1)
  testing.assert_close(mean, io[f"{case}.mean"])
  testing.assert_close(np.clip(logvar, -30, 20), io[f"{case}.logvar"])
  out = jitted(model, "decode", io[f"{case}.z"].transpose(0, 2, 3, 4, 1),
               num_frames=num_frames)
  testing.assert_close(out.transpose(0, 4, 1, 2, 3), io[f"{case}.decoded"])


def test_numpy_reference_matches_upstream(upstream):
  """The float64 transcription the pipeline tests use agrees with the
  original code on case a (float32 upstream vs float64: the same
  1e-5 * max|reference| + 1e-6 bound), so those tests rest on it too."""
  io = upstream["io"]
  weights = Weights({f"temporal_vae.{k}": v
                     for k, v in upstream["weights"].items()})
  ref = TemporalReference(weights, upstream["config"].temporal)
  mean, logvar = ref.encode(io["a.x"].astype(np.float64))
  decoded = ref.decode(io["a.z"].astype(np.float64),
                       num_frames=upstream["meta"]["cases"]["a"]["num_frames"])
  testing.assert_close(io["a.mean"], mean)
  testing.assert_close(io["a.logvar"], logvar)
  testing.assert_close(io["a.decoded"], decoded)
  assert weights.read == set(weights)  # every upstream tensor used


def test_bare_temporal_checkpoint_is_refused_by_load_vae(upstream):
  with pytest.raises(CheckpointError, match="temporal_vae_from_state_dict"):
    converter.vae_from_state_dict(upstream["weights"])


def test_depth_to_time_is_channel_major():
  """einops "B (C ts) T -> B C (T ts)": channel c*2 + s -> frame 2t + s."""
  x = np.arange(3 * 6).reshape(1, 3, 1, 1, 6)  # B T H W (C ts)
  out = np.asarray(opensora_vae.depth_to_time(jnp.asarray(x), 2))
  assert out.shape == (1, 6, 1, 1, 3)
  for t, s, c in itertools.product(range(3), range(2), range(3)):
    assert out[0, 2 * t + s, 0, 0, c] == x[0, t, 0, 0, 2 * c + s]


# The pipeline -----------------------------------------------------------------


def test_pipeline_matches_reference(vae, checkpoint):
  """22 frames = chunks of 9, 9 and 4 frames (3 + 3 + 1 latent frames),
  image VAE in micro-batches of 3 of the 44 frames (a remainder of 2), the
  checkpoint's scale/shift (not config.json's), encode and decode."""
  ref = checkpoint["pipeline"]
  np.testing.assert_array_equal(vae.config.shift, np.float32(SHIFT))
  np.testing.assert_array_equal(vae.config.scale, np.float32(SCALE))
  video = random_video((2, 3, 22, 8, 6), seed=6)
  latents = np.asarray(opensora_vae.encode_jit(vae, video))
  assert latents.shape == opensora_vae.latent_shape(CONFIG, video.shape) == (
      2, 4, 7, 4, 3)
  testing.assert_close(latents, ref.encode(video.astype(np.float64)))
  z = np.random.default_rng(7).standard_normal(latents.shape).astype(
      np.float32)
  out = np.asarray(opensora_vae.decode_jit(vae, z, num_frames=22))
  testing.assert_close(out, ref.decode(z.astype(np.float64), num_frames=22))
  # The reference read every tensor of the checkpoint but the image VAE's
  # (diffusers reads those).
  assert checkpoint["weights"].read == {
      k for k in checkpoint["tensors"] if not k.startswith("spatial_vae.")}
  clamped = np.asarray(opensora_vae.decode_jit(vae, z, num_frames=22,
                                               clamp=True))
  np.testing.assert_array_equal(clamped, np.clip(out, -1, 1))
  assert np.abs(out).max() > 1  # so the clamp did something


def test_bfloat16_decode_close_to_reference(checkpoint):
  """bf16 weights and convolution inputs (GroupNorm statistics, softmax and
  outputs in float32), one chunk: 8-bit mantissa (2^-9 relative rounding)
  over ~30 stacked convolutions; measured over 4 seeds 1.4-2.2% of
  max|ref| max, 0.24-0.28% mean."""
  vae16 = converter.load_vae(
      checkpoint["folder"], config=CONFIG.replace(micro_frame_size=None,
                                                  micro_batch_size=None),
      dtype="bfloat16", param_dtype="bfloat16")
  assert vae16.temporal_vae.decoder.conv1.kernel[...].dtype == jnp.bfloat16
  z = np.random.default_rng(10).standard_normal((1, 4, 2, 4, 3)).astype(
      np.float32)
  out = np.asarray(opensora_vae.decode_jit(vae16, z, num_frames=7))
  assert out.dtype == np.float32
  ref = PipelineReference(checkpoint["pipeline"].autoencoder,
                          checkpoint["temporal"], None).decode(z, 7)
  err = np.abs(out - ref)
  assert 1e-4 * np.abs(ref).max() < err.max() <= 0.04 * np.abs(ref).max()
  assert err.mean() <= 0.01 * np.abs(ref).max()


def test_compiled_graph_does_not_grow_with_frames(vae):
  """Full micro-frame chunks and micro-batches of frames run under
  lax.map: the same program for 2 or 6 chunks (same last chunk)."""
  graphdef, state = nnx.split(vae)

  def eqns(method, x, **kw):
    fn = lambda s, x: getattr(nnx.merge(graphdef, s), method)(x, **kw)
    return len(jax.make_jaxpr(fn)(state, x).eqns)

  assert eqns("decode", jnp.zeros((1, 4, 7, 2, 2)), num_frames=22) == eqns(
      "decode", jnp.zeros((1, 4, 19, 2, 2)), num_frames=58)
  assert eqns("encode", jnp.zeros((1, 3, 22, 4, 4))) == eqns(
      "encode", jnp.zeros((1, 3, 58, 4, 4)))


def test_sampling_draws_from_both_posteriors(checkpoint):
  """One chunk, one micro-batch (a smaller program to compile: the chunking
  is the same code with or without a key)."""
  vae = converter.load_vae(checkpoint["folder"], config=CONFIG.replace(
      micro_frame_size=None, micro_batch_size=None))
  video = random_video((1, 3, 5, 4, 4), seed=8)
  mean = np.asarray(opensora_vae.encode_jit(vae, video))
  a = np.asarray(opensora_vae.encode_jit(vae, video, key=jax.random.key(0)))
  b = np.asarray(opensora_vae.encode_jit(vae, video, key=jax.random.key(0)))
  c = np.asarray(opensora_vae.encode_jit(vae, video, key=jax.random.key(1)))
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - mean).max() > 1e-3 and np.abs(a - c).max() > 1e-3


def test_posterior_sample_clamps_logvar():
  rng = np.random.default_rng(9)
  mean = rng.standard_normal((3, 5, 2)).astype(np.float32)
  logvar = np.array([-40.0, 25.0], np.float32) * np.ones((3, 5, 1),
                                                         np.float32)
  moments = jnp.asarray(np.concatenate([mean, logvar], axis=-1))
  np.testing.assert_array_equal(opensora_vae.posterior_sample(moments), mean)
  key = jax.random.key(3)
  noise = np.asarray(jax.random.normal(key, mean.shape, jnp.float32))
  expected = mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * noise
  np.testing.assert_allclose(opensora_vae.posterior_sample(moments, key),
                             expected, rtol=1e-6)


def test_decode_checks_num_frames(vae):
  z = jnp.zeros((1, 4, 7, 2, 2))
  with pytest.raises(ValueError, match="num_frames=18 frames encode to 6 "
                     "latent frames, but latents have 7"):
    vae.decode(z, num_frames=18)
  with pytest.raises(ValueError, match=r"must be \(B, 3, T, H, W\)"):
    vae.encode(jnp.zeros((1, 4, 5, 4, 4)))
  with pytest.raises(ValueError, match="h=5 and w=4 must be multiples of 2"):
    vae.encode(jnp.zeros((1, 3, 5, 5, 4)))


# Configs ----------------------------------------------------------------------


@pytest.mark.parametrize("micro_frame_size", [17, 9, 4, None])
def test_latent_frames_match_get_latent_size(micro_frame_size):
  config = OpenSoraVAEConfig(micro_frame_size=micro_frame_size)
  temporal = TemporalReference({}, config.temporal)
  for n in range(1, 120):
    assert config.latent_frames(n) == reference_latent_frames(
        n, micro_frame_size, temporal), n


def test_v1_2_preset():
  """OpenSora v1.2's numbers: 51 frames (its 2 s) -> 15 latent frames,
  102 (4 s) -> 30, 8x in space."""
  config = OpenSoraVAEConfig.opensora_v1_2()
  assert config.latent_frames(51) == 15 and config.latent_frames(102) == 30
  assert opensora_vae.latent_shape(config, (1, 3, 51, 480, 848)) == (
      1, 4, 15, 60, 106)
  assert (config.shift, config.scale) == (
      (-0.10, 0.34, 0.27, 0.98), (3.85, 2.32, 2.33, 3.06))
  assert config.spatial_scaling_factor == 0.18215
  assert OpenSoraVAEConfig.from_dict(config.to_dict()) == config
  assert OpenSoraVAEConfig.from_dict(
      json.loads(json.dumps(CONFIG.to_dict()))) == CONFIG


@pytest.mark.parametrize("make,message", [
    (lambda: CONFIG.replace(shift=(0.0,) * 3),
     (r"shift=\(0.0, 0.0, 0.0\) needs one value per latent channel, "
      "temporal.embed_dim=4")),
    (lambda: CONFIG.replace(scale=(1.0, 0.0, 1.0, 1.0)), "must be positive"),
    (lambda: CONFIG.replace(micro_frame_size=0),
     "micro_frame_size=0 must be >= 1"),
    (lambda: SpatialVAEConfig(block_out_channels=(8, 12), norm_num_groups=8),
     r"channel counts \[12\] are not multiples of groups=8"),
    (lambda: TemporalVAEConfig(temporal_downsample=(True, True)),
     r"temporal_downsample=\(True, True\) needs an entry per stage"),
    (lambda: CONFIG.replace(spatial=SpatialVAEConfig(latent_channels=8)),
     "temporal.in_out_channels=4 must equal spatial.latent_channels=8"),
])
def test_config_errors(make, message):
  with pytest.raises(ValueError, match=message):
    make()


# Converter --------------------------------------------------------------------


def test_v1_2_checkpoint_names_and_shapes():
  """The published hpcai-tech/OpenSora-VAE-v1.2 `model.safetensors`: the
  image VAE is diffusers' AutoencoderKL with the SD(XL) VAE config (built
  here on the meta device), and temporal_vae.* tensors as listed by
  mindspore-lab/mindone `examples/opensora_hpcai/tools/
  pt_pnames_vae1.2.txt` (a dump of that file: 103 temporal tensors besides
  GroupNorms; a few shapes below)."""
  config = OpenSoraVAEConfig.opensora_v1_2()
  shapes = converter.expected_shapes(config, "opensora")
  with torch.device("meta"):
    sdxl_vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=4)
  assert {f"spatial_vae.module.{k}": tuple(v.shape)
          for k, v in sdxl_vae.state_dict().items()} == {
              k: v for k, v in shapes.items() if k.startswith("spatial_vae.")}
  temporal = {k: v for k, v in shapes.items()
              if k.startswith("temporal_vae.") and ".norm" not in k}
  assert len(temporal) == 103
  for key, shape in {
      "temporal_vae.encoder.conv_in.conv.weight": (128, 4, 3, 3, 3),
      "temporal_vae.encoder.conv_blocks.1.conv.weight": (256, 256, 3, 3, 3),
      "temporal_vae.encoder.block_res_blocks.3.0.conv3.conv.weight": (
          512, 256, 1, 1, 1),
      "temporal_vae.encoder.conv2.conv.bias": (8,),
      "temporal_vae.decoder.conv_blocks.2.conv.weight": (1024, 512, 3, 3, 3),
      "temporal_vae.decoder.block_res_blocks.0.0.conv1.conv.weight": (
          128, 256, 3, 3, 3),
      "temporal_vae.decoder.conv_out.conv.weight": (4, 128, 3, 3, 3),
      "temporal_vae.quant_conv.conv.weight": (8, 8, 1, 1, 1),
  }.items():
    assert shapes[key] == shape, key
  assert "temporal_vae.encoder.conv_blocks.0.conv.weight" not in shapes


def test_config_json_and_round_trip(checkpoint):
  """config.json gives micro_frame_size/scale/shift (v1.2 architecture);
  the checkpoint's buffers win; to_checkpoint inverts load_params."""
  folder = checkpoint["folder"]
  config = converter.config_from_opensora(
      json.loads((folder / "config.json").read_text()))
  assert config == OpenSoraVAEConfig(micro_frame_size=CONFIG.micro_frame_size)
  source = Source.from_arrays(checkpoint["tensors"])
  params = converter.load_params(source, CONFIG, "opensora")
  back = converter.to_checkpoint(params, CONFIG, "opensora")
  assert set(back) | {"scale", "shift"} == set(checkpoint["tensors"])
  for key, value in back.items():
    np.testing.assert_array_equal(value, checkpoint["tensors"][key])
  no_buffers = {k: v for k, v in checkpoint["tensors"].items()
                if k not in ("scale", "shift")}
  assert converter.vae_from_state_dict(no_buffers, CONFIG).config == CONFIG


def test_deprecated_attention_names_are_read(checkpoint, vae):
  renamed = {}
  for key, value in checkpoint["tensors"].items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
    renamed[key] = value
  assert any(".proj_attn." in k for k in renamed)
  other = converter.vae_from_state_dict(renamed, CONFIG)
  jax.tree.map(np.testing.assert_array_equal,
               nnx.to_pure_dict(nnx.state(other, nnx.Param)),
               nnx.to_pure_dict(nnx.state(vae, nnx.Param)))


def test_key_mismatch_names_every_offending_key(checkpoint):
  tensors = dict(checkpoint["tensors"])
  del tensors["temporal_vae.decoder.conv_blocks.2.conv.bias"]
  del tensors["spatial_vae.module.decoder.mid_block.attentions.0.to_k.bias"]
  tensors["temporal_vae.encoder.conv_blocks.0.conv.weight"] = np.zeros(
      (8, 8, 3, 3, 3), np.float32)
  tensors["temporal_vae.encoder.norm1.weight"] = np.ones(5, np.float32)
  with pytest.raises(KeyMismatch, match="OpenSora VAE, opensora") as e:
    converter.vae_from_state_dict(tensors, CONFIG)
  assert e.value.missing == [
      "spatial_vae.module.decoder.mid_block.attentions.0.to_k.bias",
      "temporal_vae.decoder.conv_blocks.2.conv.bias"]
  assert e.value.unexpected == [
      "temporal_vae.encoder.conv_blocks.0.conv.weight"]
  assert e.value.misshapen == [
      "temporal_vae.encoder.norm1.weight: checkpoint (5,), expected (32,)"]


def test_layout_and_file_errors(tmp_path, checkpoint):
  spatial_only = {k[len("spatial_vae.module."):]: v
                  for k, v in checkpoint["tensors"].items()
                  if k.startswith("spatial_vae.")}
  assert converter.detect_layout(spatial_only) == "diffusers"
  with pytest.raises(CheckpointError, match="load it with load_spatial_vae"):
    converter.vae_from_state_dict(spatial_only, CONFIG)
  with pytest.raises(CheckpointError, match="cannot tell the OpenSora VAE"):
    converter.detect_layout(["foo.weight"])
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
    converter.load_vae(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="only VAE_Temporal_SD"):
    converter.config_from_opensora({"vae_temporal": {"type": "VAE_MAGVIT"}})
  with pytest.raises(CheckpointError, match="only DownEncoderBlock2D"):
    converter.spatial_config_from_diffusers(
        {"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
  with pytest.raises(CheckpointError, match=r"scale: shape \(3,\)"):
    converter.vae_from_state_dict(
        {**checkpoint["tensors"], "scale": np.ones(3, np.float32)}, CONFIG)
