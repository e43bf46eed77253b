"""Helpers for tests and examples: fixture location, tiny checkpoints."""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def fixtures_dir() -> pathlib.Path:
  """The parity fixtures: $ASTRAEA_FIXTURES or <repo>/../shared/fixtures."""
  env = os.environ.get("ASTRAEA_FIXTURES")
  return pathlib.Path(env) if env else REPO_ROOT.parent / "shared" / "fixtures"


# The test extra's reference packages installed without their dependencies
# (README: `pip install --no-deps wan22==2.2.11 lpips==0.1.4`).
NO_DEPS_EXTRA = "pip install --no-deps wan22==2.2.11 lpips==0.1.4"


def wan22_dir() -> pathlib.Path:
  """The folder of the `wan` package (PyPI `wan22`, the Wan reference code
  the parity tests run), located without importing it: its __init__
  touches CUDA. Raises ImportError naming the install command, so a
  missing test extra fails the tests that need it instead of skipping
  them."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("wan")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(f"the Wan reference package wan22 (test extra) is not "
                      f"installed: {NO_DEPS_EXTRA}")
  return pathlib.Path(spec.submodule_search_locations[0])


def random_wan_tensors(config, *, seed=0, layout="wan", dtype=np.float32):
  """Random tensors for every key of a Wan2.1 checkpoint of `config`.

  ALL parameters are random (the references zero-init some layers; random
  values exercise every path): weights ~ N(0, 1/fan_in), biases ~ N(0,
  0.1^2), norm gains ~ 1 + N(0, 0.1^2), modulation tables ~ N(0, 0.5^2).
  """
  from converters import wan as wan_converter
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in wan_converter.expected_checkpoint_shapes(config,
                                                             layout).items():
    original = wan_converter.to_original_key(key, layout)
    if "modulation" in original:
      value = 0.5 * rng.standard_normal(shape)
    elif "norm" in original and original.endswith("weight"):
      value = 1 + 0.1 * rng.standard_normal(shape)
    elif original.endswith("bias"):
      value = 0.1 * rng.standard_normal(shape)
    else:
      fan_in = int(np.prod(shape[1:]))
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    out[key] = value.astype(dtype)
  return out


def wan_config_json(config, layout):
  """config.json content as the published checkpoints write it."""
  if layout == "wan":
    return {"_class_name": "WanModel", "model_type": "t2v",
            "dim": config.dim, "ffn_dim": config.ffn_dim,
            "num_heads": config.num_heads, "num_layers": config.num_layers,
            "in_dim": config.in_dim, "out_dim": config.out_dim,
            "text_dim": config.text_dim, "text_len": config.text_len,
            "freq_dim": config.freq_dim,
            "patch_size": list(config.patch_size), "eps": config.eps}
  return {"_class_name": "WanTransformer3DModel",
          "num_attention_heads": config.num_heads,
          "attention_head_dim": config.head_dim, "ffn_dim": config.ffn_dim,
          "num_layers": config.num_layers, "in_channels": config.in_dim,
          "out_channels": config.out_dim, "text_dim": config.text_dim,
          "freq_dim": config.freq_dim, "patch_size": list(config.patch_size),
          "eps": config.eps, "cross_attn_norm": True,
          "qk_norm": "rms_norm_across_heads", "image_dim": None,
          "added_kv_proj_dim": None, "rope_max_seq_len": 1024}


def write_wan_checkpoint(folder, config, tensors=None, *, layout="wan",
                         seed=0, shards=1, dtype=np.float32):
  """Writes a Wan2.1 transformer folder exactly as published.

  layout "wan": config.json + diffusion_pytorch_model.safetensors (or
  `shards` files + index); "diffusers": the same inside `transformer/`.
  Returns the folder to pass to `astraea convert`.
  """
  from converters.safetensors_io import save_file
  folder = pathlib.Path(folder)
  target = folder / "transformer" if layout == "diffusers" else folder
  target.mkdir(parents=True, exist_ok=True)
  if tensors is None:
    tensors = random_wan_tensors(config, seed=seed, layout=layout,
                                 dtype=dtype)
  (target / "config.json").write_text(
      json.dumps(wan_config_json(config, layout), indent=2))
  stem = "diffusion_pytorch_model"
  if shards == 1:
    save_file(tensors, target / f"{stem}.safetensors")
    return folder
  keys = list(tensors)
  weight_map = {}
  for i, chunk in enumerate(np.array_split(np.arange(len(keys)), shards)):
    name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
    save_file({keys[j]: tensors[keys[j]] for j in chunk}, target / name)
    weight_map.update({keys[j]: name for j in chunk})
  (target / f"{stem}.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
  return folder


def write_word_tokenizer(folder, words):
  """A tiny T5-style tokenizer (<pad> 0, </s> 1, <unk> 2, then one id per
  distinct word of `words`, split on whitespace; </s> appended) written as
  the tokenizer.json + tokenizer_config.json that umT5/T5 folders hold."""
  # pylint: disable=g-import-not-at-top
  import tokenizers
  from tokenizers import models, pre_tokenizers, processors
  from astraea_jax.models.text import tokenizer as tokenizer_lib
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
  for w in words:
    vocab.setdefault(w, len(vocab))
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", special_tokens=[("</s>", 1)])
  tok.save(str(folder / tokenizer_lib.TOKENIZER_JSON))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
       "model_max_length": 512}))
  return folder


def scaled_like_init(name: str, x, shape):
  """A standard-normal draw `x` for parameter `name` scaled as the trained
  weights are: kernels by fan-in^-1/2, modulation tables by 0.5, norm
  weights around 1, everything else by 0.1."""
  if "kernel" in name:
    return x * shape[-2] ** -0.5
  if "modulation" in name:
    return x * 0.5
  if "norm" in name and "weight" in name:
    return 1 + 0.1 * x
  return 0.1 * x


def random_params(abstract_state, key):
  """Random values for every leaf of an abstract nnx.State, in one jit.

  The same rules as `random_wan_tensors`, by leaf name: kernels
  ~ N(0, 1/fan_in), norm gains ~ 1 + N(0, 0.1^2), modulation tables
  ~ N(0, 0.5^2), everything else (biases) ~ N(0, 0.1^2).
  """
  import jax  # pylint: disable=g-import-not-at-top

  @jax.jit
  def draw(key):
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(
        abstract_state)
    keys = jax.random.split(key, len(paths_leaves))
    leaves = []
    for k, (path, leaf) in zip(keys, paths_leaves):
      x = jax.random.normal(k, leaf.shape, "float32")
      x = scaled_like_init(jax.tree_util.keystr(path), x, leaf.shape)
      leaves.append(x.astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)

  return draw(key)


def random_wan(config, seed=0):
  """(graphdef, params) of a WanDiT with every parameter random.

  Built from the abstract model (no eager initialisation, which is slow):
  use `nnx.merge(graphdef, params)` for the module.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from astraea_jax.models import wan  # pylint: disable=g-import-not-at-top
  graphdef, abstract = nnx.split(wan.abstract_model(config))
  return graphdef, random_params(abstract, jax.random.key(seed))


def assert_close(actual, reference, rel=1e-5, abs_=1e-6):
  """max |actual - reference| <= rel * max |reference| + abs_ (the
  difference taken in float64), shapes equal."""
  actual, reference = np.asarray(actual), np.asarray(reference)
  assert actual.shape == reference.shape, (actual.shape, reference.shape)
  tol = rel * np.abs(reference).max() + abs_
  err = np.abs(actual.astype(np.float64) - reference).max()
  assert err <= tol, f"max abs error {err:.3g} > tolerance {tol:.3g}"


def read_mp4(path):
  """(frames (T, H, W, 3) uint8, fps) through imageio: a reader other than
  our writer, so the file is checked as any player would open it. imageio
  starts ffmpeg with a pre-exec hook, which makes JAX warn about os.fork
  (our writer does not); the warning is silenced here only."""
  import imageio.v2 as imageio  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="os.fork",
                            category=RuntimeWarning)
    with imageio.get_reader(path, format="FFMPEG") as reader:
      fps = float(reader.get_meta_data()["fps"])
      frames = np.stack([np.asarray(f) for f in reader])
  return frames, fps
