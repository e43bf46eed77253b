"""umT5 text encoder checkpoints -> astraea-jax parameters.

Two layouts are read:
  * diffusers (Wan-AI/Wan2.1-T2V-*-Diffusers): the `text_encoder/` folder of
    a `transformers.UMT5EncoderModel`, `config.json` + `model.safetensors`
    (or sharded `model-0000k-of-0000n.safetensors` + `.index.json`), keys
    such as `encoder.block.{i}.layer.0.SelfAttention.q.weight`;
  * wan (original Wan2.1): the state dict of `wan/modules/t5.py`'s
    `T5Encoder`, which ships as a PyTorch pickle
    (`models_t5_umt5-xxl-enc-bf16.pth`, no config: the umT5-XXL preset). This
    module never unpickles: the caller hands the tensors over as a `Source`.

Tensors stream one at a time from memory-mapped safetensors into
preallocated numpy buffers (layers stacked on a leading axis). No torch.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import tqdm
from flax import nnx

from astraea_jax.models.text import umt5
from astraea_jax.models.text.umt5 import UMT5Config
from converters.common import (CheckpointError, KeyMismatch, Source,
                               flatten_dict, open_safetensors_folder,
                               unflatten_dict)

# Our parameter path <- transformers key. "linear": torch (out, in) weight
# transposed to our (in, out) kernel; "same": copied as is.
TOP_LEVEL_KEYS = {
    "shared.weight": (("embed_tokens", "embedding"), "same"),
    "encoder.final_layer_norm.weight": (("final_layer_norm", "weight"),
                                        "same"),
}
# Surprise: the embedding is stored as `shared.weight`, as
# `encoder.embed_tokens.weight`, or as both (tied). The encoder's forward
# reads `encoder.embed_tokens`; transformers ties it to `shared` only when
# the two are equal, so when both are present `encoder.embed_tokens.weight`
# is the one used.
EMBEDDING_ALIAS = "encoder.embed_tokens.weight"

# encoder.block.{i}.<suffix>: index i of the ("blocks", ...) leaf. Each layer
# has its own relative_attention_bias (umT5; T5 has one in layer 0 only).
BLOCK_KEYS = {
    "layer.0.layer_norm.weight": (("attn_norm", "weight"), "same"),
    "layer.0.SelfAttention.relative_attention_bias.weight": (
        ("attn", "relative_attention_bias"), "same"),
    "layer.1.layer_norm.weight": (("ffn_norm", "weight"), "same"),
}
for _p in "qkvo":
  BLOCK_KEYS[f"layer.0.SelfAttention.{_p}.weight"] = (("attn", _p, "kernel"),
                                                      "linear")
for _w in ("wi_0", "wi_1", "wo"):
  BLOCK_KEYS[f"layer.1.DenseReluDense.{_w}.weight"] = (("ffn", _w, "kernel"),
                                                       "linear")

# Original Wan name -> transformers name. Surprise: the original FFN is
# `fc2(fc1(x) * gate(x))` with the GELU inside `gate`, so `gate.0` is
# transformers' `wi_0` (activated) and `fc1` is `wi_1` (linear).
WAN_TOP_LEVEL = {"token_embedding.weight": "shared.weight",
                 "norm.weight": "encoder.final_layer_norm.weight"}
WAN_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "pos_embedding.embedding.weight":
        "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
for _p in "qkvo":
  WAN_BLOCK[f"attn.{_p}.weight"] = f"layer.0.SelfAttention.{_p}.weight"

LAYOUTS = ("diffusers", "wan")
_BLOCK_RE = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")
_WAN_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


# Folders and configs ----------------------------------------------------------


def find_folder(src) -> pathlib.Path:
  """`src/text_encoder` (a diffusers model folder) or `src` itself."""
  src = pathlib.Path(src)
  if not src.is_dir():
    raise CheckpointError(f"{src} is not a checkpoint folder")
  for folder in (src / "text_encoder", src):
    if (folder / "config.json").is_file():
      return folder
  raise CheckpointError(
      f"{src}: no config.json (nor text_encoder/config.json); expected the "
      "`text_encoder/` folder of a diffusers Wan2.1 checkpoint "
      "(a transformers UMT5EncoderModel)")


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def config_from_checkpoint(cfg: dict, **overrides) -> UMT5Config:
  """UMT5Config from a transformers `config.json` dict."""
  model_type = cfg.get("model_type", "umt5")
  if model_type != "umt5":
    raise CheckpointError(
        f"model_type={model_type!r}: only umT5 encoders (per-layer position "
        "bias) are supported; T5 shares one bias across layers")
  try:
    kw = dict(vocab_size=cfg["vocab_size"], d_model=cfg["d_model"],
              d_kv=cfg["d_kv"], d_ff=cfg["d_ff"],
              num_layers=cfg["num_layers"], num_heads=cfg["num_heads"])
  except KeyError as e:
    raise CheckpointError(f"config.json: missing field {e.args[0]!r}") from e
  for name in ("relative_attention_num_buckets",
               "relative_attention_max_distance", "layer_norm_epsilon",
               "feed_forward_proj"):
    if name in cfg:
      kw[name] = cfg[name]
  kw.update(overrides)
  try:
    return UMT5Config(**kw)
  except ValueError as e:
    raise CheckpointError(f"config.json: {e}") from e


# Key mapping ------------------------------------------------------------------


def to_transformers_key(key: str, layout: str) -> str | None:
  """A checkpoint key in transformers naming, or None if unknown."""
  if layout == "diffusers":
    return key
  if key in WAN_TOP_LEVEL:
    return WAN_TOP_LEVEL[key]
  m = _WAN_BLOCK_RE.match(key)
  if m and m.group(2) in WAN_BLOCK:
    return f"encoder.block.{m.group(1)}.{WAN_BLOCK[m.group(2)]}"
  return None


def from_transformers_key(key: str, layout: str) -> str:
  if layout == "diffusers":
    return key
  inv_top = {v: k for k, v in WAN_TOP_LEVEL.items()}
  if key in inv_top:
    return inv_top[key]
  m = _BLOCK_RE.match(key)
  inv_block = {v: k for k, v in WAN_BLOCK.items()}
  return f"blocks.{m.group(1)}.{inv_block[m.group(2)]}"


def locate(key: str, num_layers: int):
  """transformers key -> (our path, layer index or None, transform), or None."""
  if key == EMBEDDING_ALIAS:
    key = "shared.weight"
  if key in TOP_LEVEL_KEYS:
    path, transform = TOP_LEVEL_KEYS[key]
    return path, None, transform
  m = _BLOCK_RE.match(key)
  if m and m.group(2) in BLOCK_KEYS and int(m.group(1)) < num_layers:
    path, transform = BLOCK_KEYS[m.group(2)]
    return ("blocks",) + path, int(m.group(1)), transform
  return None


def param_shapes(config: UMT5Config) -> dict[tuple, tuple]:
  """Our parameter paths -> shapes, by abstract evaluation (no memory)."""
  state = nnx.state(umt5.abstract_model(config), nnx.Param)
  return {path: tuple(v.shape)
          for path, v in flatten_dict(nnx.to_pure_dict(state)).items()}


def expected_checkpoint_shapes(config: UMT5Config, layout="diffusers"):
  """{checkpoint key: shape} a model of `config` needs; the embedding under
  `shared.weight` (`token_embedding.weight` in the wan layout)."""
  params = param_shapes(config)
  shapes = {}
  for key, (path, transform) in TOP_LEVEL_KEYS.items():
    shapes[key] = _checkpoint_shape(params[path], transform)
  for i in range(config.num_layers):
    for suffix, (path, transform) in BLOCK_KEYS.items():
      shapes[f"encoder.block.{i}.{suffix}"] = _checkpoint_shape(
          params[("blocks",) + path][1:], transform)
  return {from_transformers_key(k, layout): v for k, v in shapes.items()}


def _checkpoint_shape(our_shape, transform):
  return tuple(reversed(our_shape)) if transform == "linear" else our_shape


# Loading ----------------------------------------------------------------------


def _check_keys(source: Source, config: UMT5Config, layout: str):
  """{checkpoint key to read: transformers key}; raises KeyMismatch."""
  expected = expected_checkpoint_shapes(config, layout)
  present = set(source.keys())
  if layout == "diffusers":
    # Either name of the (tied) embedding will do; prefer the one the
    # encoder reads (see EMBEDDING_ALIAS).
    embedding_shape = expected.pop("shared.weight")
    aliases = [k for k in (EMBEDDING_ALIAS, "shared.weight") if k in present]
    for k in aliases:
      expected[k] = embedding_shape
    if not aliases:
      expected["shared.weight (or encoder.embed_tokens.weight)"] = (
          embedding_shape)
  missing = sorted(set(expected) - present)
  unexpected = sorted(present - set(expected))
  misshapen = sorted(
      f"{k}: checkpoint {tuple(source.shape(k))}, expected {expected[k]}"
      for k in present & set(expected)
      if tuple(source.shape(k)) != tuple(expected[k]))
  if missing or unexpected or misshapen:
    raise KeyMismatch(missing=missing, unexpected=unexpected,
                      misshapen=misshapen, layout=f"umT5 {layout}")
  to_read = {k: to_transformers_key(k, layout) for k in expected}
  if layout == "diffusers" and len(aliases) == 2:
    del to_read["shared.weight"]
  return to_read


def load_params(source: Source, config: UMT5Config, layout="diffusers", *,
                progress=False):
  """Stream a checkpoint into a nested dict of numpy arrays (our layout).

  Raises KeyMismatch listing missing, unexpected and misshapen keys by name.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"{layout=} must be one of {LAYOUTS}")
  dtype = np.dtype(config.weight_dtype)
  to_read = _check_keys(source, config, layout)
  buffers = {path: np.empty(shape, dtype)
             for path, shape in param_shapes(config).items()}
  keys = list(to_read)
  if progress:
    keys = tqdm.tqdm(keys, desc="converting text encoder", unit="tensor")
  for key in keys:  # one tensor at a time
    path, layer, transform = locate(to_read[key], config.num_layers)
    value = source.get(key)
    value = (value.T if transform == "linear" else value).astype(dtype)
    if layer is None:
      buffers[path][...] = value
    else:
      buffers[path][layer] = value
  return unflatten_dict(buffers)


def read_checkpoint(src, *, dtype="float32", progress=False):
  """(config, params) from a diffusers `text_encoder/` folder (or the model
  folder holding it), streaming."""
  folder = find_folder(src)
  config = config_from_checkpoint(_read_json(folder / "config.json"),
                                  dtype=dtype, param_dtype=dtype)
  source = open_safetensors_folder(folder, "model")
  return config, load_params(source, config, "diffusers", progress=progress)


def to_checkpoint(params: dict, config: UMT5Config, layout="diffusers"):
  """Our nested params -> {checkpoint key: array} in `layout` (the inverse;
  hands the same weights to the PyTorch references in tests)."""
  flat = flatten_dict(params)
  out = {}
  for key, shape in expected_checkpoint_shapes(config).items():
    path, layer, transform = locate(key, config.num_layers)
    value = np.asarray(flat[path] if layer is None else flat[path][layer])
    value = value.T if transform == "linear" else value
    assert value.shape == shape, (key, value.shape, shape)
    out[from_transformers_key(key, layout)] = np.ascontiguousarray(value)
  return out
