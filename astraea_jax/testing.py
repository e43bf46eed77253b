"""Helpers for tests and examples: fixture location, tiny checkpoints."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def fixtures_dir() -> pathlib.Path:
  """The parity fixtures: $ASTRAEA_FIXTURES or <repo>/../shared/fixtures."""
  env = os.environ.get("ASTRAEA_FIXTURES")
  return pathlib.Path(env) if env else REPO_ROOT.parent / "shared" / "fixtures"


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
      name = jax.tree_util.keystr(path)
      x = jax.random.normal(k, leaf.shape, "float32")
      if "kernel" in name:
        x = x * leaf.shape[-2] ** -0.5
      elif "modulation" in name:
        x = x * 0.5
      elif "norm" in name and "weight" in name:
        x = 1 + 0.1 * x
      else:
        x = 0.1 * x
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
