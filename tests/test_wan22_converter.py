"""`astraea convert` on whole Wan2.2 downloads, tiny and random, written in
the published layouts:

  original   Wan2.2-TI2V-5B/: config.json (model_type ti2v) + sharded
             diffusion_pytorch_model-*.safetensors, Wan2.2_VAE.pth,
             models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/;
             Wan2.2-{T2V,I2V}-A14B/: high_noise_model/ + low_noise_model/
             (each config.json + shards), Wan2.1_VAE.pth, the same T5.
  diffusers  model_index.json (WanPipeline with expand_timesteps for
             TI2V; WanPipeline / WanImageToVideoPipeline with
             transformer_2 and boundary_ratio for A14B), transformer/
             (+ transformer_2/), vae/ (is_residual for TI2V),
             text_encoder/, tokenizer/.
Both layouts of a model must convert to the same parameters, equal to the
tensors written; the manifest names the model, the experts and where
they switch.
"""

import json
import shutil

import jax
import numpy as np
import pytest
import torch

from astraea_jax import checkpoint, cli, testing
from astraea_jax.configs import WanConfig
from astraea_jax.models.text.umt5 import UMT5Config
from astraea_jax.vae.wan22_vae import Wan22VAEConfig
from astraea_jax.vae.wan_vae import WanVAEConfig
from converters import model_folder
from converters import umt5 as umt5_converter
from converters import wan as wan_converter
from converters import wan_vae as vae_converter
from converters.common import CheckpointError, Source
from converters.safetensors_io import save_file

SMALL = dict(dim=32, ffn_dim=48, num_heads=2, num_layers=1, text_dim=32,
             text_len=512, freq_dim=16)
TI2V = WanConfig.tiny(in_dim=48, out_dim=48, **SMALL)
I2V = WanConfig.tiny(in_dim=36, out_dim=16, **SMALL)
T2V = WanConfig.tiny(**SMALL)
# The original T5 code hard-codes max_distance 128 (not in its state dict).
TEXT = UMT5Config.tiny(relative_attention_max_distance=128)
VAE22 = Wan22VAEConfig.tiny(num_res_blocks=1)
VAE21 = WanVAEConfig.tiny()
WORDS = "a cat bakes a cake in the kitchen".split()


def random_tensors(shapes, seed):
  rng = np.random.default_rng(seed)
  return {k: (0.1 * rng.standard_normal(s)).astype(np.float32)
          for k, s in shapes.items()}


def write_dit(folder, config, tensors, layout, model_type, shards=1):
  """One DiT as published: the original into folder/ (config.json with
  `model_type`), the diffusers one moved from write_wan_checkpoint's
  transformer/ to folder/."""
  named = {wan_converter.from_original_key(k, layout): v
           for k, v in tensors.items()}
  if layout == "wan":
    testing.write_wan_checkpoint(folder, config, named, shards=shards)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(
        {**cfg, "model_type": model_type}))
    return
  tmp = folder.parent / f".{folder.name}"
  testing.write_wan_checkpoint(tmp, config, named, layout=layout)
  (tmp / "transformer").rename(folder)
  tmp.rmdir()


def vae_tensors(config, layout, seed):
  """Random VAE tensors by our parameter path, named in `layout`."""
  original = random_tensors(vae_converter.expected_shapes(config,
                                                          "original"), seed)
  by_path = {p: original[k]
             for k, p in vae_converter.key_map(config, "original").items()}
  return {k: by_path[p]
          for k, p in vae_converter.key_map(config, layout).items()}


def save_pth(tensors, path):
  torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, path)


def write_original(root, dits, vae_config, seed=0):
  """dits: {subfolder ("." for the root): (config, model_type)}."""
  root.mkdir(parents=True)
  for i, (sub, (config, model_type)) in enumerate(dits.items()):
    tensors = random_tensors(wan_converter.expected_checkpoint_shapes(config),
                             seed + i)
    write_dit(root / sub, config, tensors, "wan", model_type, shards=2)
  name = ("Wan2.2_VAE" if isinstance(vae_config, Wan22VAEConfig)
          else "Wan2.1_VAE")
  save_pth(vae_tensors(vae_config, "original", seed + 10),
           root / f"{name}.pth")
  save_pth(random_tensors(umt5_converter.expected_checkpoint_shapes(
      TEXT, "wan"), seed + 20), root / "models_t5_umt5-xxl-enc-bf16.pth")
  testing.write_word_tokenizer(root / "google" / "umt5-xxl", WORDS)
  return root


def write_diffusers(root, dits, vae_config, index, seed=0):
  """dits: {"transformer" (, "transformer_2"): config}, the same tensors as
  write_original's for the same seed."""
  root.mkdir(parents=True)
  for i, (sub, config) in enumerate(dits.items()):
    tensors = random_tensors(wan_converter.expected_checkpoint_shapes(config),
                             seed + i)
    write_dit(root / sub, config, tensors, "diffusers", None)
  vae = root / "vae"
  vae.mkdir()
  save_file(vae_tensors(vae_config, "diffusers", seed + 10),
            vae / "diffusion_pytorch_model.safetensors")
  c = vae_config
  cfg = {"_class_name": "AutoencoderKLWan", "base_dim": c.base_dim,
         "z_dim": c.z_dim, "dim_mult": list(c.dim_mult),
         "num_res_blocks": c.num_res_blocks,
         "temperal_downsample": list(c.temporal_downsample),
         "latents_mean": list(c.latents_mean),
         "latents_std": list(c.latents_std), "attn_scales": []}
  if isinstance(c, Wan22VAEConfig):
    cfg.update(decoder_base_dim=c.decoder_base_dim, is_residual=True,
               patch_size=2, in_channels=12, out_channels=12,
               scale_factor_spatial=16)
  (vae / "config.json").write_text(json.dumps(cfg))
  te = root / "text_encoder"
  te.mkdir()
  original = random_tensors(umt5_converter.expected_checkpoint_shapes(
      TEXT, "wan"), seed + 20)
  params = umt5_converter.load_params(
      Source.from_arrays(original), TEXT, "wan")
  save_file(umt5_converter.to_checkpoint(params, TEXT, "diffusers"),
            te / "model.safetensors")
  (te / "config.json").write_text(json.dumps({
      "architectures": ["UMT5EncoderModel"], "model_type": "umt5",
      "vocab_size": TEXT.vocab_size, "d_model": TEXT.d_model,
      "d_kv": TEXT.d_kv, "d_ff": TEXT.d_ff, "num_layers": TEXT.num_layers,
      "num_heads": TEXT.num_heads,
      "relative_attention_num_buckets": TEXT.relative_attention_num_buckets,
      "relative_attention_max_distance":
          TEXT.relative_attention_max_distance,
      "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6}))
  testing.write_word_tokenizer(root / "tokenizer", WORDS)
  (root / "model_index.json").write_text(json.dumps(index))
  return root


def convert(src, dst, *extra):
  return cli.main(["convert", str(src), str(dst), "--quiet", *extra])


def assert_same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal,
               checkpoint.params_of(checkpoint.load_model(a)),
               checkpoint.params_of(checkpoint.load_model(b)))


def index(name="WanPipeline", **extra):
  return {"_class_name": name, "_diffusers_version": "0.35.0",
          "transformer": ["diffusers", "WanTransformer3DModel"],
          "transformer_2": [None, None], "boundary_ratio": None,
          "vae": ["diffusers", "AutoencoderKLWan"], **extra}


def test_ti2v_5b_original_and_diffusers_convert_alike(tmp_path):
  original = write_original(tmp_path / "orig", {".": (TI2V, "ti2v")}, VAE22)
  diffusers = write_diffusers(tmp_path / "diff", {"transformer": TI2V},
                              VAE22, index(expand_timesteps=True))
  assert convert(original, tmp_path / "a", "--allow-pth") == 0
  assert convert(diffusers, tmp_path / "b") == 0
  manifest = checkpoint.read_manifest(tmp_path / "a")
  assert manifest["model"] == "wan2.2-ti2v-5b"
  assert manifest["format"] == "astraea-jax/wan2.2-ti2v-5b"
  assert manifest["converted_from"]["vae"] == "Wan2.2_VAE.pth"
  assert "boundary_ratio" not in manifest
  assert checkpoint.manifest_model(tmp_path / "b") == "wan2.2-ti2v-5b"
  assert checkpoint.load_config(tmp_path / "a" / "transformer") == TI2V
  assert checkpoint.load_config(tmp_path / "b" / "vae") == VAE22
  for part in ("transformer", "vae"):
    assert_same_params(tmp_path / "a" / part, tmp_path / "b" / part)


def test_generate_runs_a_converted_ti2v_folder(tmp_path, capsys):
  """`astraea generate` on a converted TI2V-5B folder (diffusers layout):
  the Wan2.2 pipeline, the model's defaults where no flag is given (24
  fps), a decoded MP4 of the frames asked for."""
  diffusers = write_diffusers(tmp_path / "diff", {"transformer": TI2V},
                              VAE22, index(expand_timesteps=True))
  assert convert(diffusers, tmp_path / "m") == 0
  out = tmp_path / "v.mp4"
  assert cli.main(["generate", str(tmp_path / "m"), "--prompt", "a cat",
                   "--size", "64x32", "--frames", "5", "--steps", "2",
                   "--out", str(out)]) == 0, capsys.readouterr().err
  frames, fps = testing.read_mp4(out)
  assert frames.shape == (5, 32, 64, 3)
  assert fps == 24.0


def test_generate_says_i2v_a14b_needs_an_image(tmp_path, capsys):
  """I2V-A14B from the diffusers layout converts; generating without
  --image is one line naming the flag, before anything loads or is
  written (tests/test_wan22_pipeline.py samples it)."""
  diffusers = write_diffusers(
      tmp_path / "diff", {"transformer": I2V, "transformer_2": I2V}, VAE21,
      index("WanImageToVideoPipeline", boundary_ratio=0.9,
            transformer_2=["diffusers", "WanTransformer3DModel"]))
  assert convert(diffusers, tmp_path / "m") == 0
  out = tmp_path / "v.mp4"
  assert cli.main(["generate", str(tmp_path / "m"), "--prompt", "a cat",
                   "--out", str(out)]) == 1
  err = capsys.readouterr().err
  assert "required for wan2.2-i2v-a14b" in err and "--image" in err
  assert not out.exists()


@pytest.mark.parametrize("config,model_type,pipeline,model,boundary", [
    (T2V, "t2v", "WanPipeline", "wan2.2-t2v-a14b", 0.875),
    (I2V, "i2v", "WanImageToVideoPipeline", "wan2.2-i2v-a14b", 0.9),
])
def test_a14b_experts_convert_alike_from_both_layouts(
    tmp_path, config, model_type, pipeline, model, boundary):
  original = write_original(
      tmp_path / "orig", {"high_noise_model": (config, model_type),
                          "low_noise_model": (config, model_type)}, VAE21)
  diffusers = write_diffusers(
      tmp_path / "diff", {"transformer": config, "transformer_2": config},
      VAE21, index(pipeline, boundary_ratio=boundary,
                   transformer_2=["diffusers", "WanTransformer3DModel"]))
  assert convert(original, tmp_path / "a", "--allow-pth") == 0
  assert convert(diffusers, tmp_path / "b") == 0
  for dst in ("a", "b"):
    manifest = checkpoint.read_manifest(tmp_path / dst)
    assert manifest["model"] == model
    assert manifest["boundary_ratio"] == boundary
    assert manifest["experts"] == {"high_noise": "transformer",
                                   "low_noise": "transformer_2"}
    assert manifest["components"]["transformer_2"] == "transformer_2"
  assert manifest["converted_from"]["transformer_2"] == "transformer_2/"
  assert checkpoint.read_manifest(tmp_path / "a")["converted_from"][
      "transformer"] == "high_noise_model/"
  for part in ("transformer", "transformer_2", "vae"):
    assert_same_params(tmp_path / "a" / part, tmp_path / "b" / part)
  high = checkpoint.params_of(checkpoint.load_model(tmp_path / "a" /
                                                    "transformer"))
  low = checkpoint.params_of(checkpoint.load_model(tmp_path / "a" /
                                                   "transformer_2"))
  # high_noise_model/ was written with seed 0, low_noise_model/ with seed 1
  written = random_tensors(wan_converter.expected_checkpoint_shapes(config),
                           1)
  back = wan_converter.to_checkpoint(low, config, "wan")
  for k in written:
    np.testing.assert_array_equal(back[k], written[k], err_msg=k)
  assert not np.array_equal(high["head"]["head"]["kernel"],
                            low["head"]["head"]["kernel"])
  assert checkpoint.load_config(tmp_path / "b" / "transformer_2") == config


# Bad folders: named, nothing written ------------------------------------------


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
  root = tmp_path_factory.mktemp("a14b")
  return write_diffusers(
      root / "diff", {"transformer": T2V, "transformer_2": T2V}, VAE21,
      index(boundary_ratio=0.875,
            transformer_2=["diffusers", "WanTransformer3DModel"]))


@pytest.mark.parametrize("change,message", [
    (lambda r: shutil.rmtree(r / "transformer_2"),
     "no transformer_2/ with config.json"),
    (lambda r: edit_index(r, boundary_ratio=None),
     "boundary_ratio=None: the step at which the experts switch"),
    (lambda r: edit_index(r, _class_name="WanImageToVideoPipeline",
                          transformer_2=[None, None]),
     "Wan2.1 image-to-video (CLIP image encoder), which is not supported"),
])
def test_bad_two_expert_folders_are_named(a14b, tmp_path, capsys, change,
                                          message):
  src = tmp_path / "src"
  shutil.copytree(a14b, src)
  change(src)
  assert convert(src, tmp_path / "dst") == 1
  assert message in capsys.readouterr().err
  assert not (tmp_path / "dst").exists()


def edit_index(root, **changes):
  doc = json.loads((root / "model_index.json").read_text())
  (root / "model_index.json").write_text(json.dumps({**doc, **changes}))


def test_parts_that_do_not_fit_are_refused():
  check_fit = model_folder._check_fit  # pylint: disable=protected-access
  text = TEXT.replace(d_model=32)
  with pytest.raises(CheckpointError, match="two experts differ"):
    check_fit(T2V, VAE21, text, T2V.replace(ffn_dim=64),
              model="wan2.2-t2v-a14b")
  vae48 = VAE21.replace(z_dim=48, latents_mean=(0.0,) * 48,
                        latents_std=(1.0,) * 48)
  with pytest.raises(CheckpointError, match="TI2V-5B uses the Wan2.2 VAE"):
    check_fit(TI2V, vae48, text, model="wan2.2-ti2v-5b")
  with pytest.raises(CheckpointError,
                     match="z_dim=48 != the transformer's out_dim=16"):
    check_fit(T2V, VAE22, text, model="wan2.1-t2v")


def test_wan21_image_to_video_dit_is_refused():
  tensors = random_tensors(wan_converter.expected_checkpoint_shapes(I2V), 0)
  tensors["img_emb.proj.0.weight"] = np.zeros((4,), np.float32)
  with pytest.raises(CheckpointError, match="CLIP image embedding"):
    wan_converter.load_params(Source.from_arrays(tensors),
                              "wan", I2V)
