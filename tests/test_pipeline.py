"""Wan2.1 end to end: whole-folder conversion, WanPipeline, generate -> MP4.

The reference is diffusers' `WanPipeline` itself, built here from tiny
components with EVERY parameter random (transformer, VAE, umT5 encoder), a
tiny SentencePiece tokenizer trained here, and the UniPC scheduler as the
published Wan2.1-Diffusers folders configure it. The pipeline is saved with
`save_pretrained` (the diffusers layout as published), converted with
`astraea convert`, and both pipelines run from the same prompt, negative
prompt and initial noise; the decoded videos must agree.

The original layout (config.json + safetensors, Wan2.1_VAE.pth,
models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/) is written from the same
weights (the .pth files with torch.save, the encoder in bfloat16 as
published) and must convert to the same parameters.

Tolerance of the end-to-end comparison: max |ours - ref| / max |ref| <=
1e-4 on the video. Both run float32 with the same math; the differences
are operation order in each model (~1e-6 relative per forward), amplified
by CFG (scale 5 -> ~11x) over 2 UniPC steps and passed through the VAE.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from astraea_jax import checkpoint, cli, pipelines, testing, video
from astraea_jax.configs import WanConfig
from astraea_jax.models.text.umt5 import UMT5Config
from astraea_jax.vae.wan_vae import WanVAEConfig
from converters import umt5 as umt5_converter
from converters import wan as wan_converter
from converters import wan_vae as vae_converter
from converters.common import Source

# The test extra (pip install -e ".[test]") has both; a missing extra must
# fail the suite, not skip the parity tests silently (issue #24).
import diffusers  # noqa: E402
import transformers  # noqa: E402

CONFIG = WanConfig.tiny(dim=64, ffn_dim=96, num_heads=2, num_layers=2,
                        text_dim=32, text_len=512, freq_dim=16)
# The original T5 code hard-codes max_distance 128 (not in its state dict).
TEXT_CONFIG = UMT5Config.tiny(relative_attention_max_distance=128)
VAE_CONFIG = WanVAEConfig.tiny()
PROMPT = "A cat and a dog baking a cake together in a kitchen."
NEGATIVE = "blurred details, worst quality"
# 5 frames of 32 x 48: latents (16, 2, 4, 6), 12 tokens.
HEIGHT, WIDTH, FRAMES, STEPS, SCALE, SHIFT = 32, 48, 5, 2, 5.0, 3.0
CORPUS = [PROMPT, NEGATIVE, ("The cat is carefully measuring flour, while "
                             "the dog is stirring the batter with a wooden "
                             "spoon.")]


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return np.abs(ours - ref).max() / np.abs(ref).max()


def psnr_uint8(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10 * np.log10(255.0 ** 2 / mse)


# Builders ---------------------------------------------------------------------


def randomize_(module, seed):
  """Every parameter random: norm gains 1 + N(0, 0.2^2), biases N(0, 0.1^2),
  modulation tables N(0, 0.5^2), embeddings N(0, 1), other weights
  N(0, 1/fan_in) (the references zero-init some; random exercises all)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name or name.endswith("gamma"):
        p.copy_(1 + 0.2 * noise)
      elif name.endswith("bias") and "relative_attention" not in name:
        p.copy_(0.1 * noise)
      elif "scale_shift_table" in name:
        p.copy_(0.5 * noise)
      elif name.endswith(("shared.weight", "relative_attention_bias.weight")):
        p.copy_(noise)
      else:
        p.copy_(noise / np.sqrt(p[0].numel()))
  return module.eval()


def tiny_tokenizer(folder):
  """A SentencePiece unigram model (T5 ids: <pad> 0, </s> 1, <unk> 2) and
  the tokenizer.json transformers derives from it, as umT5's files are."""
  import sentencepiece
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=40,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      character_coverage=1.0, minloglevel=2)
  folder.mkdir(parents=True)
  (folder / "spiece.model").write_bytes(model.getvalue())
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "pad_token": "<pad>",
       "eos_token": "</s>", "unk_token": "<unk>"}))
  return transformers.AutoTokenizer.from_pretrained(folder)


def tiny_diffusers_pipeline(root):
  c = CONFIG
  transformer = diffusers.WanTransformer3DModel(
      patch_size=c.patch_size, num_attention_heads=c.num_heads,
      attention_head_dim=c.head_dim, in_channels=c.in_dim,
      out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim,
      ffn_dim=c.ffn_dim, num_layers=c.num_layers,
      cross_attn_norm=c.cross_attn_norm, qk_norm="rms_norm_across_heads",
      eps=c.eps, rope_max_seq_len=1024)
  vae = diffusers.AutoencoderKLWan(
      base_dim=VAE_CONFIG.base_dim, z_dim=16, dim_mult=[1, 2, 4, 4],
      num_res_blocks=2, temperal_downsample=[False, True, True])
  t = TEXT_CONFIG
  text_encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
      vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff,
      num_layers=t.num_layers, num_heads=t.num_heads,
      relative_attention_num_buckets=t.relative_attention_num_buckets,
      relative_attention_max_distance=t.relative_attention_max_distance,
      feed_forward_proj=t.feed_forward_proj, dropout_rate=0.0))
  scheduler = diffusers.UniPCMultistepScheduler(
      prediction_type="flow_prediction", use_flow_sigmas=True,
      flow_shift=SHIFT, num_train_timesteps=1000)
  pipe = diffusers.WanPipeline(
      tokenizer=tiny_tokenizer(root / "spm"),
      text_encoder=randomize_(text_encoder, 1), vae=randomize_(vae, 2),
      scheduler=scheduler, transformer=randomize_(transformer, 3))
  pipe.set_progress_bar_config(disable=True)
  return pipe


def state_dict(module):
  return {k: v.numpy() for k, v in module.state_dict().items()}


def write_original_folder(root, pipe, tokenizer_dir):
  """The original Wan2.1 release layout, from the same weights."""
  tensors = {wan_converter.to_original_key(k, "diffusers"): v
             for k, v in state_dict(pipe.transformer).items()}
  testing.write_wan_checkpoint(root, CONFIG, tensors, layout="wan")
  vae = state_dict(pipe.vae)
  vae_original = {
      vae_converter.original_key(path, VAE_CONFIG): vae[key]
      for key, path in vae_converter.key_map(VAE_CONFIG, "diffusers").items()}
  torch.save({k: torch.from_numpy(v) for k, v in vae_original.items()},
             root / "Wan2.1_VAE.pth")
  params = umt5_converter.load_params(
      Source.from_arrays(state_dict(pipe.text_encoder)), TEXT_CONFIG)
  t5 = umt5_converter.to_checkpoint(params, TEXT_CONFIG, layout="wan")
  torch.save({k: torch.from_numpy(v).to(torch.bfloat16)  # "-enc-bf16"
              for k, v in t5.items()},
             root / "models_t5_umt5-xxl-enc-bf16.pth")
  shutil.copytree(tokenizer_dir, root / "google" / "umt5-xxl")
  return root


# Fixtures ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """{"pipe": diffusers pipeline, "diffusers"/"original": source folders,
  "converted"/"converted_original": `astraea convert` outputs}."""
  root = tmp_path_factory.mktemp("wan")
  pipe = tiny_diffusers_pipeline(root)
  pipe.save_pretrained(root / "diffusers")
  write_original_folder(root / "original", pipe, root / "diffusers" /
                        "tokenizer")
  for src, dst, extra in (("diffusers", "converted", []),
                          ("original", "converted_original",
                           ["--allow-pth"])):
    assert cli.main(["convert", str(root / src), str(root / dst), "--quiet",
                     *extra]) == 0
  return {"pipe": pipe, **{k: root / k for k in (
      "diffusers", "original", "converted", "converted_original")}}


@pytest.fixture(scope="module")
def ours(folders):
  return pipelines.WanPipeline.from_pretrained(folders["converted"])


@pytest.fixture(scope="module")
def noise():
  shape = (1, 16, 1 + (FRAMES - 1) // 4, HEIGHT // 8, WIDTH // 8)
  return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def our_video(ours, noise):
  return ours(PROMPT, NEGATIVE, height=HEIGHT, width=WIDTH,
              num_frames=FRAMES, num_inference_steps=STEPS,
              guidance_scale=SCALE, shift=SHIFT, noise=jnp.asarray(noise),
              progress=True)


# Conversion -------------------------------------------------------------------


def test_converted_folder_layout(folders):
  dst = folders["converted"]
  manifest = json.loads((dst / "manifest.json").read_text())
  assert manifest["layout"] == "diffusers" and manifest["text_len"] == 512
  assert manifest["components"] == {c: c for c in checkpoint.COMPONENTS}
  assert checkpoint.load_config(dst / "transformer") == CONFIG
  assert checkpoint.load_config(dst / "vae") == VAE_CONFIG
  assert checkpoint.load_config(dst / "text_encoder") == TEXT_CONFIG
  assert (dst / "tokenizer" / "tokenizer.json").is_file()
  assert not [p for p in dst.parent.iterdir() if ".partial" in p.name]


def test_original_layout_converts_to_the_same_parameters(folders):
  """Transformer and VAE bit-identical; the text encoder equals the
  bfloat16-rounded diffusers weights (the original .pth is bf16)."""
  a, b = folders["converted"], folders["converted_original"]
  manifest = json.loads((b / "manifest.json").read_text())
  assert manifest["layout"] == "original"
  assert manifest["converted_from"]["vae"] == "Wan2.1_VAE.pth"
  for part in ("transformer", "vae"):
    jax.tree.map(np.testing.assert_array_equal,
                 checkpoint.params_of(checkpoint.load_model(b / part)),
                 checkpoint.params_of(checkpoint.load_model(a / part)))
  assert checkpoint.load_config(b / "text_encoder") == TEXT_CONFIG
  bf16 = lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32)
  reference = checkpoint.params_of(checkpoint.load_model(a / "text_encoder"))
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, bf16(y)),
               checkpoint.params_of(checkpoint.load_model(b /
                                                          "text_encoder")),
               reference)


def convert_fails(src, dst, capsys, *needles, extra=()):
  assert cli.main(["convert", str(src), str(dst), "--quiet", *extra]) == 1
  err = capsys.readouterr().err
  for needle in needles:
    assert needle in err, f"{needle!r} not in:\n{err}"
  assert not dst.exists()
  assert not [p for p in dst.parent.iterdir() if ".partial" in p.name]


def test_pth_needs_allow_pth(folders, tmp_path, capsys):
  convert_fails(folders["original"], tmp_path / "dst", capsys,
                "Wan2.1_VAE.pth is a PyTorch pickle", "--allow-pth")


@pytest.mark.parametrize("layout,remove,message", [
    ("diffusers", "vae", ("no VAE: expected vae/ (diffusers) or "
                          "Wan2.1_VAE.pth (original, needs --allow-pth)")),
    ("diffusers", "tokenizer", "no tokenizer: expected tokenizer/"),
    ("original", "models_t5_umt5-xxl-enc-bf16.pth",
     "no text encoder: expected models_t5_umt5-xxl-enc-bf16.pth"),
    ("original", "google", "no tokenizer: expected google/umt5-xxl/"),
])
def test_missing_part_is_named(folders, tmp_path, capsys, layout, remove,
                               message):
  src = tmp_path / "src"
  shutil.copytree(folders[layout], src)
  target = src / remove
  shutil.rmtree(target) if target.is_dir() else target.unlink()
  convert_fails(src, tmp_path / "dst", capsys, "incomplete Wan model "
                f"folder ({layout} layout)", message, extra=["--allow-pth"])


def test_one_part_with_format(folders, tmp_path):
  """--format names one part of a whole folder: the transformer alone."""
  assert cli.main(["convert", str(folders["diffusers"]), str(tmp_path / "t"),
                   "--format", "diffusers", "--quiet"]) == 0
  assert not (tmp_path / "t" / "manifest.json").exists()
  assert checkpoint.load_config(tmp_path / "t") == CONFIG


def test_hub_repo_id_from_the_offline_cache(folders, tmp_path):
  """SRC = org/name: snapshot_download resolves refs/main in a local
  folder laid out like the hub cache (HF_HUB_OFFLINE=1, no network); an
  uncached id fails with a message naming it."""
  revision = "0123456789abcdef0123456789abcdef01234567"
  repo = tmp_path / "hub" / "models--Wan-AI--Tiny-Wan2.1-Diffusers"
  shutil.copytree(folders["diffusers"], repo / "snapshots" / revision)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(revision)
  script = (
      "import sys\n"
      "from astraea_jax import cli\n"
      "assert cli.main(['convert', 'Wan-AI/Tiny-Wan2.1-Diffusers', sys.argv[1],"
      " '--quiet']) == 0\n"
      "assert cli.main(['convert', 'Wan-AI/Not-Cached', sys.argv[1] + '2',"
      " '--quiet']) == 1\n")
  env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"),
         "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(testing.REPO_ROOT)}
  result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "dst")],
                          env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "'Wan-AI/Not-Cached' is not a local folder, and fetching it from " \
         "the Hugging Face hub failed" in result.stderr
  manifest = json.loads((tmp_path / "dst" / "manifest.json").read_text())
  assert manifest["source"] == "Wan-AI/Tiny-Wan2.1-Diffusers"
  jax.tree.map(np.testing.assert_array_equal,
               checkpoint.params_of(checkpoint.load_model(
                   tmp_path / "dst" / "transformer")),
               checkpoint.params_of(checkpoint.load_model(
                   folders["converted"] / "transformer")))
  assert not (tmp_path / "dst2").exists()


# The pipeline -----------------------------------------------------------------


def test_matches_diffusers_wan_pipeline(folders, noise, our_video):
  with torch.no_grad():
    ref = folders["pipe"](
        PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH,
        num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=SCALE,
        latents=torch.from_numpy(noise), output_type="np").frames
  # diffusers: (B, T, H, W, 3) in [0, 1]; ours: (B, 3, T, H, W) in [-1, 1].
  out = np.asarray(our_video).transpose(0, 2, 3, 4, 1) / 2 + 0.5
  assert out.shape == ref.shape == (1, FRAMES, HEIGHT, WIDTH, 3)
  # Mostly unclamped, varied values: the comparison is informative.
  assert np.mean((ref > 0) & (ref < 1)) > 0.5 and ref.std() > 0.05
  assert rel_err(out, ref) <= 1e-4


def test_stages_under_jit(ours, noise, our_video):
  """Each stage as one jitted pure function of the split pipeline gives
  the host path's numbers: text encoding, dense denoising as one scan,
  and decoding (vs the chunk-by-chunk decode with a progress bar). Same
  math in each pair; XLA may fuse one program differently from several,
  so float32 rounding may differ: <= 1e-5 relative."""
  graphdef, state = nnx.split(ours)
  ids, mask = ours.tokenize([PROMPT, NEGATIVE])
  context = jax.jit(lambda s, i, m: nnx.merge(graphdef, s).encode_tokens(
      i, m))(state, ids, mask)
  host_context, host_negative = ours.encode_prompt(PROMPT, NEGATIVE)
  assert context.shape == (2, 512, CONFIG.text_dim)
  assert rel_err(context, jnp.concatenate([host_context, host_negative])
                 ) <= 1e-5

  def denoise(s, x, c, n):
    return nnx.merge(graphdef, s).denoise(
        x, c, n, num_inference_steps=STEPS, guidance_scale=SCALE, shift=SHIFT,
        loop="scan")

  latents = jax.jit(denoise)(state, noise, context[:1], context[1:])
  host_latents = ours.denoise(noise, host_context, host_negative,
                              num_inference_steps=STEPS, guidance_scale=SCALE,
                              shift=SHIFT)
  assert rel_err(latents, host_latents) <= 1e-5
  decoded = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))(
      state, host_latents)
  assert rel_err(decoded, our_video) <= 1e-5


def test_astraea_budget_and_embeddings(ours, noise):
  """budget=1.0 computes every token: the dense latents, here from
  prompt_embeds; a lower budget reuses cached tokens: other latents."""
  kw = {"height": HEIGHT, "width": WIDTH, "num_frames": FRAMES,
        "num_inference_steps": STEPS, "guidance_scale": SCALE,
        "shift": SHIFT, "noise": jnp.asarray(noise),
        "output_type": "latents", "progress": False}
  dense = ours(PROMPT, NEGATIVE, **kw)
  context, negative = ours.encode_prompt(PROMPT, NEGATIVE)
  full_budget = ours(prompt_embeds=context, negative_prompt_embeds=negative,
                     budget=1.0, **kw)
  assert rel_err(full_budget, dense) <= 1e-5
  sparse = ours(PROMPT, NEGATIVE, schedule=[1.0, 0.5], **kw)
  assert np.isfinite(sparse).all() and sparse.shape == dense.shape
  assert rel_err(sparse, dense) > 1e-3  # half the tokens reused


@pytest.mark.parametrize("height,width,frames,message", [
    (32, 48, 6, "num_frames=6 must be 1 + 4k"),
    (32, 40, 5, "multiples of 16 and 16"),
    (0, 48, 5, "multiples of 16"),
])
def test_video_size_is_checked(ours, height, width, frames, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    ours.latent_shape(height, width, frames)


# astraea generate -> MP4 ------------------------------------------------------


@pytest.mark.parametrize("layout", ["converted", "converted_original"])
def test_generate_writes_an_mp4(folders, ours, tmp_path, capsys, layout):
  """From each layout: the MP4 holds FRAMES frames of WIDTH x HEIGHT at 16
  fps, and they are the pipeline's decoding of the saved latents, frame by
  frame in order (up to H.264 at the default quality)."""
  out = tmp_path / "cat.mp4"
  extra = (["--budget", "0.5", "--compare"] if layout == "converted"
           else [])
  assert cli.main(["generate", "--model", str(folders[layout]), "--prompt",
                   PROMPT, "--negative-prompt", NEGATIVE, "--size",
                   f"{WIDTH}x{HEIGHT}", "--frames", str(FRAMES), "--steps",
                   str(STEPS), "--seed", "3", "--out", str(out),
                   "--save-latents", *extra]) == 0
  printed = capsys.readouterr().out
  assert f"wrote {out}" in printed
  frames, fps = testing.read_mp4(out)
  assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and fps == 16
  from converters.safetensors_io import SafetensorsFile
  run = "astraea" if extra else "full"
  latents = SafetensorsFile(tmp_path / "cat.latents.safetensors")
  expected = video.to_frames(ours.decode(jnp.asarray(
      latents.get(f"latents_{run}"))))
  # The random model's video is fine-grained texture, the hardest case for
  # H.264: measured 20.5 dB; the same video shifted by one pixel scores
  # 16.2 dB, in reverse frame order 12.4 dB.
  assert psnr_uint8(frames, expected) > 18
  nearest = [np.argmax([psnr_uint8(f, e) for e in expected]) for f in frames]
  assert nearest == list(range(FRAMES))
  if extra:
    assert "speedup" in printed and "PSNR vs full (video)" in printed
    full, _ = testing.read_mp4(tmp_path / "cat.full.mp4")
    assert full.shape == frames.shape
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      ["cat.mp4", "cat.latents.safetensors"]
      + (["cat.full.mp4"] if extra else []))


def test_generate_folder_output_has_videos(folders, tmp_path):
  """Also with the text encoder on the CPU device (here the only device:
  the path, not the speed)."""
  out = tmp_path / "out"
  assert cli.main(["generate", str(folders["converted"]), "--prompt", PROMPT,
                   "--height", str(HEIGHT), "--width", str(WIDTH),
                   "--frames", str(FRAMES), "--steps", str(STEPS),
                   "--text-encoder-device", "cpu", "--out", str(out)]) == 0
  report = json.loads((out / "report.json").read_text())
  assert report["prompt"] == PROMPT and report["negative_prompt"] == ""
  assert report["text_encoder_device"] == "cpu"
  frames, _ = testing.read_mp4(out / "video_full.mp4")
  assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3)


def test_offloaded_stages_keep_the_numbers(folders, ours, noise):
  """`from_pretrained` offloads by default: each model is on the device
  only during its stage, and the numbers are those of a pipeline that
  keeps every model on the device (the same programs on the same
  parameters: bit for bit), also with the text encoder on the CPU device;
  the decode streamed to the host ("np") is the on-device chunked decode."""
  from astraea_jax import placement
  resident = pipelines.WanPipeline.from_pretrained(folders["converted"],
                                                   offload=False)
  on_cpu = pipelines.WanPipeline.from_pretrained(
      folders["converted"], text_encoder_device="cpu")
  for part in ("text_encoder", "transformer", "vae"):
    assert placement.is_on_host(getattr(ours, part))
    assert not placement.is_on_host(getattr(resident, part))
  assert on_cpu.text_encoder.embed_tokens.embedding[...].devices() == {
      jax.devices("cpu")[0]}
  kw = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES,
            num_inference_steps=STEPS, guidance_scale=SCALE, shift=SHIFT,
            noise=jnp.asarray(noise), progress=False)
  contexts = [p.encode_prompt(PROMPT, NEGATIVE)
              for p in (ours, resident, on_cpu)]
  for c in contexts[1:]:
    np.testing.assert_array_equal(np.asarray(c[0]), contexts[0][0])
  latents = [p(prompt_embeds=contexts[0][0],
               negative_prompt_embeds=contexts[0][1], output_type="latents",
               **kw) for p in (ours, resident)]
  np.testing.assert_array_equal(np.asarray(latents[0]), latents[1])
  # Released again after every stage.
  for part in ("text_encoder", "transformer", "vae"):
    assert placement.is_on_host(getattr(ours, part))
  streamed = ours.decode(latents[0], to_host=True)
  assert isinstance(streamed, np.ndarray) and streamed.dtype == np.float32
  np.testing.assert_array_equal(
      streamed, np.asarray(resident.decode(latents[0], progress=True)))


def test_generate_out_of_memory_names_the_stage(folders, tmp_path, capsys,
                                                monkeypatch):
  """A device out-of-memory error while decoding (simulated: XLA's
  RESOURCE_EXHAUSTED text) ends in one line naming the stage and what would
  fit, and no output file: nothing was written."""
  from astraea_jax.vae import wan_vae

  def out_of_memory(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                       "allocate 3221225472 bytes.")

  monkeypatch.setattr(wan_vae, "_decode_next", out_of_memory)
  out = tmp_path / "v.mp4"
  assert cli.main(["generate", str(folders["converted"]), "--prompt", PROMPT,
                   "--height", str(HEIGHT), "--width", str(WIDTH),
                   "--frames", str(FRAMES), "--steps", "1",
                   "--out", str(out)]) == 1
  err = capsys.readouterr().err
  assert "decoding ran out of device memory" in err and "--vae-tile" in err
  assert "Traceback" not in err
  assert [l for l in err.splitlines() if "error" in l] == [
      err.splitlines()[-1]]  # one line, after the progress bars
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("changes,message", [
    ({"--frames": "8"}, "num_frames=8 must be 1 + 4k"),
    ({"--size": "50x32"}, "must be multiples of 16"),
    ({"--size": "832"}, "must be WIDTHxHEIGHT"),
    ({"--size": "48x32", "--height": "32"}, "not both"),
    ({"--model": "TRANSFORMER", "--out": "OUT/folder"},
     "--prompt needs a converted whole-model"),
    ({"--model": "TRANSFORMER", "--prompt": None, "--text-embeddings": "E"},
     "needs a VAE to decode the video: a whole-model folder, or --vae"),
    ({"--negative-prompt": "x", "--prompt": None, "--text-embeddings": "E"},
     "--negative-prompt needs --prompt"),
])
def test_generate_bad_input(folders, tmp_path, capsys, changes, message):
  """Rejected before any weights load, with nothing written."""
  options = {"--model": str(folders["converted"]), "--prompt": PROMPT,
             "--out": str(tmp_path / "v.mp4"), **changes}
  transformer = str(folders["converted"] / "transformer")
  argv = ["generate"]
  for name, value in options.items():
    if value is not None:
      argv += [name, value.replace("TRANSFORMER", transformer)
               .replace("OUT", str(tmp_path))]
  assert cli.main(argv) == 1
  assert message in capsys.readouterr().err
  assert not list(tmp_path.iterdir())


def test_generate_refuses_to_overwrite(folders, tmp_path, capsys):
  out = tmp_path / "v.mp4"
  out.write_bytes(b"mine")
  for extra in ([], ["--overwrite"]):  # not a video astraea wrote
    assert cli.main(["generate", "--model", str(folders["converted"]),
                     "--prompt", PROMPT, "--out", str(out), *extra]) == 1
    assert "is not an astraea-jax output" in capsys.readouterr().err
    assert out.read_bytes() == b"mine"


# MP4 writing ------------------------------------------------------------------


def smooth_video(t=9, h=32, w=48):
  yy, xx = np.mgrid[0:h, 0:w]
  frames = [np.sin(xx / 7 + i / 3) * 0.8 for i in range(t)]
  v = np.stack(frames)
  return np.stack([v, np.cos(yy / 5 + v), -0.5 * v])[None]  # (1,3,T,H,W)


def test_write_mp4_round_trip(tmp_path):
  clip = smooth_video()
  path = video.write_mp4(tmp_path / "a.mp4", clip, fps=12)
  frames, fps = testing.read_mp4(path)
  assert frames.shape == (9, 32, 48, 3) and fps == 12
  assert psnr_uint8(frames, video.to_frames(clip)) > 28
  assert os.listdir(tmp_path) == ["a.mp4"]  # no temporary file left


def test_to_frames_maps_the_range():
  clip = np.zeros((3, 1, 2, 2), np.float32)
  clip[:, 0, 0, 0], clip[:, 0, 0, 1], clip[:, 0, 1, 0] = -1, 1, 2
  frames = video.to_frames(clip)
  assert frames.dtype == np.uint8 and frames.shape == (1, 2, 2, 3)
  assert list(frames[0, :, :, 0].ravel()) == [0, 255, 255, 128]


def test_write_mp4_errors(tmp_path):
  with pytest.raises(ValueError, match="must be even"):
    video.write_mp4(tmp_path / "a.mp4", smooth_video(h=31))
  with pytest.raises(ValueError, match="NaN"):
    video.write_mp4(tmp_path / "a.mp4", np.full((1, 3, 1, 2, 2), np.nan))
  (tmp_path / "b.mp4").write_bytes(b"mine")
  with pytest.raises(FileExistsError):
    video.write_mp4(tmp_path / "b.mp4", smooth_video(), overwrite=False)
  assert sorted(os.listdir(tmp_path)) == ["b.mp4"]
