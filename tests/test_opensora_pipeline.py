"""OpenSora v1.2 end to end: a whole published folder -> `astraea convert`
-> `astraea generate` -> MP4, and the OpenSoraPipeline's composition.

The source folder is built here in the published layouts, every parameter
random: OpenSora-STDiT-v3/ (config.json + model.safetensors with the
original key names), OpenSora-VAE-v1.2/ (the VideoAutoencoderPipeline
state dict; its config.json carries the tiny architecture as `vae_2d` /
`vae_temporal` overrides), t5-v1_1-xxl/ (a transformers T5EncoderModel
folder) with a tokenizer.json built here with the `tokenizers` library (a
WordLevel vocabulary with T5's `</s>` post-processor; nothing downloaded).

The parity check is exact (equal arrays): the pipeline must run the same
computations as the components called directly (the components' own
parity is tested in test_stdit3.py, test_opensora_vae.py, test_t5.py).
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax import checkpoint, cli, pipelines, testing
from astraea_jax.pipelines import opensora_pipeline
from astraea_jax.astraea import stdit3_tokenwise as astraea_stdit3
from astraea_jax.configs import STDiT3Config
from astraea_jax.models import stdit3
from astraea_jax.models.text import tokenizer as tokenizer_lib
from astraea_jax.models.text.umt5 import T5Config, T5Encoder
from astraea_jax.sampling import opensora as opensora_sampling
from astraea_jax.sampling import sampler as dense_sampler
from astraea_jax.vae import opensora_vae
from astraea_jax.vae.opensora_vae import OpenSoraVAE, OpenSoraVAEConfig
from converters import opensora as stdit3_converter
from converters import opensora_vae as vae_converter
from converters import umt5 as t5_converter
from converters.safetensors_io import SafetensorsFile, save_file

TEXT_LEN = 12
STDIT = STDiT3Config.tiny(hidden_size=32, depth=2, num_heads=2,
                          caption_channels=16, model_max_length=TEXT_LEN)
T5 = T5Config.tiny(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_heads=2,
                   shared_position_bias=True)
# 2x in space, chunks of 9 frames; normalisation buffers exact in float32
# (the checkpoint's buffers win over config.json's values).
VAE = OpenSoraVAEConfig.tiny(shift=(-0.125, 0.375, 0.25, 1.0),
                             scale=(4.0, 2.5, 2.25, 3.0))
WORDS = ("a red panda eats bamboo in the snow aesthetic score : 6.5 . "
         "cat dog").split()
PROMPT = "A red panda eats bamboo in the snow"
# 17 frames of 16 x 24: chunks of 9 + 8 frames -> 3 + 2 = 5 latent frames
# of 8 x 12 -> 4 x 6 patches.
HEIGHT, WIDTH, FRAMES, STEPS = 16, 24, 17, 2
LATENTS = (1, 4, 5, 8, 12)


def randomise(params, seed, scale=0.2):
  """Every parameter random (the inits leave some at zero or one)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: (rng.standard_normal(x.shape) * scale).astype(x.dtype),
      params)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """The whole OpenSora v1.2 folder as published, tiny and random."""
  root = tmp_path_factory.mktemp("opensora-v1.2")
  dit = root / "OpenSora-STDiT-v3"
  dit.mkdir()
  params = randomise(checkpoint.params_of(
      stdit3.STDiT3(STDIT, rngs=nnx.Rngs(0))), seed=0)
  save_file(stdit3_converter.to_checkpoint(params, STDIT),
            dit / "model.safetensors")
  (dit / "config.json").write_text(json.dumps({
      "architectures": ["STDiT3"], "model_type": "STDiT3",
      "hidden_size": STDIT.hidden_size, "depth": STDIT.depth,
      "num_heads": STDIT.num_heads, "patch_size": list(STDIT.patch_size),
      "in_channels": STDIT.in_channels, "pred_sigma": True,
      "caption_channels": STDIT.caption_channels,
      "model_max_length": TEXT_LEN, "mlp_ratio": 4.0, "qk_norm": True,
      "input_sq_size": 512, "class_dropout_prob": 0.1,
      "enable_flash_attn": False, "only_train_temporal": False,
      "freeze_y_embedder": False, "skip_y_embedder": False}))

  vae = root / "OpenSora-VAE-v1.2"
  vae.mkdir()
  vae_params = randomise(checkpoint.params_of(
      OpenSoraVAE(VAE, rngs=nnx.Rngs(1))), seed=1, scale=0.1)
  tensors = vae_converter.to_checkpoint(vae_params, VAE, "opensora")
  tensors["shift"] = np.asarray(VAE.shift, np.float32).reshape(1, 4, 1, 1, 1)
  tensors["scale"] = np.asarray(VAE.scale, np.float32).reshape(1, 4, 1, 1, 1)
  save_file(tensors, vae / "model.safetensors")
  spatial, temporal = VAE.spatial, VAE.temporal
  (vae / "config.json").write_text(json.dumps({
      "architectures": ["VideoAutoencoderPipeline"],
      "model_type": "VideoAutoencoderPipeline",
      "vae_2d": {"type": "VideoAutoencoderKL",
                 "from_pretrained": "PixArt-alpha/pixart_sigma_sdxlvae_"
                                    "T5_diffusers", "subfolder": "vae",
                 "micro_batch_size": VAE.micro_batch_size,
                 "block_out_channels": list(spatial.block_out_channels),
                 "layers_per_block": spatial.layers_per_block,
                 "norm_num_groups": spatial.norm_num_groups},
      "vae_temporal": {"type": "VAE_Temporal_SD", "from_pretrained": None,
                       "filters": temporal.filters,
                       "num_res_blocks": temporal.num_res_blocks,
                       "num_groups": temporal.num_groups},
      "micro_frame_size": VAE.micro_frame_size,
      "shift": list(OpenSoraVAEConfig().shift),
      "scale": list(OpenSoraVAEConfig().scale)}))

  t5 = root / "t5-v1_1-xxl"
  t5.mkdir()
  t5_params = randomise(checkpoint.params_of(
      T5Encoder(T5, rngs=nnx.Rngs(2))), seed=2, scale=0.3)
  save_file(t5_converter.to_checkpoint(t5_params, T5, "diffusers"),
            t5 / "model.safetensors")
  (t5 / "config.json").write_text(json.dumps({
      "architectures": ["T5EncoderModel"], "model_type": "t5",
      "vocab_size": T5.vocab_size, "d_model": T5.d_model, "d_kv": T5.d_kv,
      "d_ff": T5.d_ff, "num_layers": T5.num_layers,
      "num_heads": T5.num_heads,
      "relative_attention_num_buckets": T5.relative_attention_num_buckets,
      "relative_attention_max_distance": T5.relative_attention_max_distance,
      "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
      "is_encoder_decoder": True}))
  testing.write_word_tokenizer(t5, WORDS)
  return {"root": root, "stdit3": params, "vae": vae_params,
          "t5": t5_params}


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
  dst = tmp_path_factory.mktemp("converted") / "opensora"
  assert cli.main(["convert", str(source["root"]), str(dst), "--quiet"]) == 0
  return dst


@pytest.fixture(scope="module")
def pipe(converted):
  return opensora_pipeline.OpenSoraPipeline.from_pretrained(converted)


def generate_args(converted, out, *extra):
  return ["generate", "--model", str(converted), "--prompt", PROMPT,
          "--size", f"{WIDTH}x{HEIGHT}", "--frames", str(FRAMES),
          "--steps", str(STEPS), "--out", str(out), *extra]


# Conversion -------------------------------------------------------------------


def test_converted_folder(converted, source):
  manifest = json.loads((converted / "manifest.json").read_text())
  assert manifest["format"] == "astraea-jax/opensora-v1.2"
  assert manifest["model"] == "opensora-v1.2"
  assert manifest["text_len"] == TEXT_LEN
  assert manifest["converted_from"] == {
      "transformer": "OpenSora-STDiT-v3/", "vae": "OpenSora-VAE-v1.2/",
      "text_encoder": "t5-v1_1-xxl/", "tokenizer": "t5-v1_1-xxl/"}
  assert checkpoint.manifest_model(converted) == "opensora-v1.2"
  for part, want in (("transformer", source["stdit3"]),
                     ("vae", source["vae"]), ("text_encoder", source["t5"])):
    model = checkpoint.load_model(converted / part)
    jax.tree.map(np.testing.assert_array_equal, checkpoint.params_of(model),
                 want)
  assert checkpoint.load_config(converted / "vae") == VAE
  assert checkpoint.load_config(converted / "transformer") == STDIT
  assert checkpoint.load_config(converted / "text_encoder") == T5


@pytest.mark.parametrize("remove, message", [
    ("OpenSora-VAE-v1.2", "no VAE: expected OpenSora-VAE-v1.2/"),
    ("t5-v1_1-xxl", "no text encoder: expected t5-v1_1-xxl/"),
    ("t5-v1_1-xxl/tokenizer.json", "no tokenizer: expected tokenizer.json"),
    ("OpenSora-STDiT-v3", "no transformer: expected OpenSora-STDiT-v3/"),
])
def test_missing_part_is_named(source, tmp_path, capsys, remove, message):
  src = tmp_path / "src"
  shutil.copytree(source["root"], src)
  target = src / remove
  shutil.rmtree(target) if target.is_dir() else target.unlink()
  assert cli.main(["convert", str(src), str(tmp_path / "out"),
                   "--quiet"]) == 1
  err = capsys.readouterr().err
  assert "incomplete OpenSora v1.2 model folder" in err and message in err
  assert not (tmp_path / "out").exists()


def test_wan_pipeline_refuses_an_opensora_folder(converted):
  with pytest.raises(ValueError, match="OpenSoraPipeline"):
    pipelines.WanPipeline.from_pretrained(converted)


# The pipeline -----------------------------------------------------------------


def test_tokenizer_pads_to_300_style_length_with_mask(pipe):
  ids, mask = pipe.tokenize(PROMPT)
  text = opensora_pipeline.prompt_text(PROMPT)
  assert text == "a red panda eats bamboo in the snow aesthetic score: 6.5."
  n = len(text.split()) + 1  # WordLevel: one id a word, then </s>
  assert ids.shape == mask.shape == (1, TEXT_LEN)
  assert mask[0].tolist() == [1] * n + [0] * (TEXT_LEN - n)
  assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all()  # </s>, <pad>s


def direct_video(converted, budget=None):
  """The components called directly, as the pipeline documents them."""
  transformer = checkpoint.load_model(converted / "transformer")
  t5 = checkpoint.load_model(converted / "text_encoder")
  vae = checkpoint.load_model(converted / "vae")
  tok = tokenizer_lib.UMT5Tokenizer.from_folder(converted / "tokenizer")
  ids, mask = tok([opensora_pipeline.prompt_text(PROMPT)], TEXT_LEN,
                  clean=False)
  graphdef, state = nnx.split(t5)
  y = jax.jit(lambda s, i, m: nnx.merge(graphdef, s).encode(i, m))(
      state, jnp.asarray(ids), jnp.asarray(mask))[:, None]
  noise = dense_sampler.draw_noise(jax.random.key(0), LATENTS)
  graphdef, params = nnx.split(transformer)
  common = dict(steps=STEPS, guidance_scale=7.0, fps=24.0, height=HEIGHT,
                width=WIDTH, num_frames=FRAMES, progress=False)
  if budget is None:
    latents = opensora_sampling.sample_opensora(graphdef, params, noise, y,
                                             jnp.asarray(mask), **common)
  else:
    latents = astraea_stdit3.sample(graphdef, params, noise, y,
                                    jnp.asarray(mask), budget=budget,
                                    **common)
  video = opensora_vae.decode_jit(vae, latents, num_frames=FRAMES,
                                  clamp=True)
  return latents, video


@pytest.mark.parametrize("budget", [None, 0.5])
def test_pipeline_equals_components_called_directly(pipe, converted, budget):
  latents, video = direct_video(converted, budget)
  ours = pipe(PROMPT, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
              num_inference_steps=STEPS, seed=0, budget=budget,
              progress=False)
  assert ours.shape == (1, 3, FRAMES, HEIGHT, WIDTH)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(video))
  assert float(jnp.std(video)) > 1e-3  # a real, non-constant video
  ours_latents = pipe(PROMPT, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                      num_inference_steps=STEPS, seed=0, budget=budget,
                      output_type="latents", progress=False)
  np.testing.assert_array_equal(np.asarray(ours_latents),
                                np.asarray(latents))


def test_chunked_decode_equals_whole_decode(pipe):
  """decode(progress=True) runs the VAE's independent micro-frame chunks
  one by one; the same per-chunk computation as the whole decode, so the
  only differences are XLA's fusion choices (float32 rounding)."""
  latents = jax.random.normal(jax.random.key(3), LATENTS)
  with jax.default_matmul_precision("float32"):  # no TF32 on GPUs
    whole = np.asarray(pipe.decode(latents, num_frames=FRAMES))
    chunked = np.asarray(pipe.decode(latents, num_frames=FRAMES,
                                     progress=True))
  np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5)


def test_latent_shape_of_the_v1_2_model():
  """OpenSora v1.2: 8x VAE and 2x2 patches -> multiples of 16; 17-frame
  chunks -> 5 latent frames each."""
  vae = OpenSoraVAEConfig.opensora_v1_2()
  shape = lambda h, w, t: opensora_pipeline.latent_shape(h, w, t,
                                                         vae_config=vae)
  assert shape(480, 848, 51) == (1, 4, 15, 60, 106)
  assert shape(720, 1280, 102) == (1, 4, 30, 90, 160)
  assert shape(480, 848, 1) == (1, 4, 1, 60, 106)
  with pytest.raises(ValueError, match=r"nearest height \[480\], width "
                     r"\[848, 864\]"):
    shape(480, 854, 51)
  with pytest.raises(ValueError, match="1 frame or at least 17"):
    shape(480, 848, 16)


# astraea generate -------------------------------------------------------------


def test_generate_dense_mp4_and_latents(converted, pipe, tmp_path, capsys):
  out = tmp_path / "panda.mp4"
  assert cli.main(generate_args(converted, out, "--save-latents")) == 0
  assert "wrote" in capsys.readouterr().out
  frames, fps = testing.read_mp4(out)
  assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and fps == 24.0
  latents = SafetensorsFile(tmp_path / "panda.latents.safetensors")
  assert latents.keys() == ["latents_full"]
  expected = pipe(PROMPT, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                  num_inference_steps=STEPS, seed=0, output_type="latents",
                  progress=False)
  np.testing.assert_array_equal(latents.get("latents_full"),
                                np.asarray(expected))
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "panda.latents.safetensors", "panda.mp4"]  # no temporary files left


def test_generate_astraea_with_compare(converted, tmp_path, capsys):
  out = tmp_path / "panda.mp4"
  assert cli.main(generate_args(converted, out, "--budget", "0.5",
                                "--compare", "--save-latents")) == 0
  printed = capsys.readouterr().out
  assert "speedup" in printed and "PSNR" in printed
  for path in (out, tmp_path / "panda.full.mp4"):
    frames, _ = testing.read_mp4(path)
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)
  latents = SafetensorsFile(tmp_path / "panda.latents.safetensors")
  assert sorted(latents.keys()) == ["latents_astraea", "latents_full"]
  assert latents.shape("latents_astraea") == LATENTS


@pytest.mark.parametrize("extra, message", [
    (("--size", "22x16"), "multiples of 4 and 4"),
    (("--frames", "9"), "1 frame or at least 17"),
    (("--negative-prompt", "blurry"), "--negative-prompt"),
    (("--shift", "3"), "--shift"),
    (("--scheduler", "unipc"), "--scheduler unipc"),
])
def test_generate_bad_input(converted, tmp_path, capsys, extra, message):
  out = tmp_path / "bad.mp4"
  assert cli.main(generate_args(converted, out, *extra)) == 1
  err = capsys.readouterr().err
  assert "error" in err and message in err
  assert not any(tmp_path.iterdir())
