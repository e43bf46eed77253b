"""T5-family text encoder checkpoints (umT5, T5 v1.1) -> astraea-jax params.

Two layouts are read:
  * diffusers / transformers: the folder of a `transformers.UMT5EncoderModel`
    (the `text_encoder/` of Wan-AI/Wan2.1-T2V-*-Diffusers) or
    `T5EncoderModel` (DeepFloyd/t5-v1_1-xxl, OpenSora v1.2's encoder):
    `config.json` + `model.safetensors` (or sharded
    `model-0000k-of-0000n.safetensors` + `.index.json`), keys such as
    `encoder.block.{i}.layer.0.SelfAttention.q.weight`. config.json's
    `model_type` says which: "umt5" has a relative position bias in every
    block, "t5" only in block 0 (shared by all layers);
  * wan (original Wan2.1): the state dict of `wan/modules/t5.py`'s
    `T5Encoder`, which ships as a PyTorch pickle
    (`models_t5_umt5-xxl-enc-bf16.pth`, no config: the umT5-XXL preset). This
    module never unpickles: the caller hands the tensors over as a `Source`.

Tensors stream one at a time from memory-mapped safetensors into
preallocated numpy buffers (layers stacked on a leading axis). No torch.
"""

from __future__ import annotations

import pathlib
import re

import numpy as np

from astraea_jax.models.text import umt5
from astraea_jax.models.text.umt5 import UMT5Config
from converters import common
from converters.common import (CheckpointError, Source, check_keys,
                               flatten_dict, inverted, locate_key,
                               open_safetensors_folder, read_json,
                               rename_key, stream_params)

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

# encoder.block.{i}.<suffix>: index i of the ("blocks", ...) leaf.
BLOCK_KEYS = {
    "layer.0.layer_norm.weight": (("attn_norm", "weight"), "same"),
    "layer.1.layer_norm.weight": (("ffn_norm", "weight"), "same"),
}
for _p in "qkvo":
  BLOCK_KEYS[f"layer.0.SelfAttention.{_p}.weight"] = (("attn", _p, "kernel"),
                                                      "linear")
for _w in ("wi_0", "wi_1", "wo"):
  BLOCK_KEYS[f"layer.1.DenseReluDense.{_w}.weight"] = (("ffn", _w, "kernel"),
                                                       "linear")

# The relative position bias. umT5: one table per block, a BLOCK_KEYS entry.
# T5: one table in block 0 only, which every layer reuses; ours sits at the
# top of the encoder, so for T5 the block-0 key is a top-level key.
POSITION_BIAS_SUFFIX = "layer.0.SelfAttention.relative_attention_bias.weight"
PER_LAYER_POSITION_BIAS = {
    POSITION_BIAS_SUFFIX: (("attn", "relative_attention_bias"), "same")}
SHARED_POSITION_BIAS = {
    f"encoder.block.0.{POSITION_BIAS_SUFFIX}": (("relative_attention_bias",),
                                                "same")}

# Original Wan name -> transformers name. Surprise: the original FFN is
# `fc2(fc1(x) * gate(x))` with the GELU inside `gate`, so `gate.0` is
# transformers' `wi_0` (activated) and `fc1` is `wi_1` (linear).
WAN_TOP_LEVEL = {"token_embedding.weight": "shared.weight",
                 "norm.weight": "encoder.final_layer_norm.weight"}
# T5Encoder(shared_pos=True) keeps its one table at the top.
WAN_SHARED_POSITION_BIAS = {
    "pos_embedding.embedding.weight": f"encoder.block.0.{POSITION_BIAS_SUFFIX}"}
WAN_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
for _p in "qkvo":
  WAN_BLOCK[f"attn.{_p}.weight"] = f"layer.0.SelfAttention.{_p}.weight"
# T5Encoder(shared_pos=False): a table in every block.
WAN_PER_LAYER_POSITION_BIAS = {
    "pos_embedding.embedding.weight": POSITION_BIAS_SUFFIX}

LAYOUTS = ("diffusers", "wan")
_BLOCK_RE = re.compile(
    r"^encoder\.block\.(?P<layer>\d+)\.(?P<suffix>.+)$")
_WAN_BLOCK_RE = re.compile(r"^blocks\.(?P<layer>\d+)\.(?P<suffix>.+)$")


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
      "`text_encoder/` folder of a diffusers Wan2.1 checkpoint (a "
      "transformers UMT5EncoderModel) or a T5EncoderModel folder")


# config.json `model_type` -> UMT5Config.shared_position_bias.
SHARED_POSITION_BIAS_OF = {"umt5": False, "t5": True}


def config_from_checkpoint(cfg: dict, **overrides) -> UMT5Config:
  """UMT5Config from a transformers `config.json` dict (umT5 or T5)."""
  model_type = cfg.get("model_type", "umt5")
  if model_type not in SHARED_POSITION_BIAS_OF:
    raise CheckpointError(
        f"model_type={model_type!r}: expected one of "
        f"{sorted(SHARED_POSITION_BIAS_OF)} (T5-family encoders)")
  if cfg.get("is_decoder"):
    raise CheckpointError("config.json: is_decoder=True; only encoders are "
                          "supported")
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
  kw["shared_position_bias"] = SHARED_POSITION_BIAS_OF[model_type]
  kw.update(overrides)
  try:
    return UMT5Config(**kw)
  except ValueError as e:
    raise CheckpointError(f"config.json: {e}") from e


# Key mapping ------------------------------------------------------------------


def _wan_names(config: UMT5Config):
  """(top-level, per-block) original Wan names -> transformers names."""
  if config.shared_position_bias:
    return {**WAN_TOP_LEVEL, **WAN_SHARED_POSITION_BIAS}, WAN_BLOCK
  return WAN_TOP_LEVEL, {**WAN_BLOCK, **WAN_PER_LAYER_POSITION_BIAS}


def to_transformers_key(key: str, layout: str,
                        config: UMT5Config) -> str | None:
  """A checkpoint key in transformers naming, or None if unknown."""
  if layout == "diffusers":
    return key
  top, block = _wan_names(config)
  return rename_key(key, top, _WAN_BLOCK_RE, block, "encoder.block")


def from_transformers_key(key: str, layout: str, config: UMT5Config) -> str:
  if layout == "diffusers":
    return key
  top, block = _wan_names(config)
  return rename_key(key, inverted(top), _BLOCK_RE, inverted(block), "blocks")


def top_level_keys(config: UMT5Config) -> dict:
  """{transformers key: (our path, transform)} outside the stacked blocks."""
  if config.shared_position_bias:
    return {**TOP_LEVEL_KEYS, **SHARED_POSITION_BIAS}
  return TOP_LEVEL_KEYS


def block_keys(config: UMT5Config) -> dict:
  """{suffix of encoder.block.{i}.: (our path in a layer, transform)}."""
  if config.shared_position_bias:
    return BLOCK_KEYS
  return {**BLOCK_KEYS, **PER_LAYER_POSITION_BIAS}


def locate(key: str, config: UMT5Config):
  """transformers key -> (our path, layer index or None, transform), or None."""
  if key == EMBEDDING_ALIAS:
    key = "shared.weight"
  return locate_key(key, top_level_keys(config), _BLOCK_RE,
                    block_keys(config), config.num_layers)


def param_shapes(config: UMT5Config) -> dict[tuple, tuple]:
  """Our parameter paths -> shapes, by abstract evaluation (no memory)."""
  return common.param_shapes(umt5.abstract_model(config))


def expected_checkpoint_shapes(config: UMT5Config, layout="diffusers"):
  """{checkpoint key: shape} a model of `config` needs; the embedding under
  `shared.weight` (`token_embedding.weight` in the wan layout)."""
  shapes = common.checkpoint_shapes(
      param_shapes(config), top_level_keys(config), block_keys(config),
      config.num_layers, {"encoder.block": "blocks"})
  return {from_transformers_key(k, layout, config): v
          for k, v in shapes.items()}


# Loading ----------------------------------------------------------------------


def _check_position_bias_kind(present, config: UMT5Config, layout: str):
  """A clear error for a umT5 checkpoint read as T5, or the reverse."""
  if layout != "diffusers" or config.num_layers < 2:
    return
  with_bias = sorted(
      int(m.group(1)) for m in map(_BLOCK_RE.match, present)
      if m and m.group(2) == POSITION_BIAS_SUFFIX)
  if config.shared_position_bias and any(i > 0 for i in with_bias):
    raise CheckpointError(
        "config.json says model_type 't5' (one relative position bias, in "
        f"block 0) but the checkpoint has a per-layer position bias in blocks "
        f"{with_bias}: is it a umT5 encoder (model_type 'umt5')?")
  if not config.shared_position_bias and with_bias == [0]:
    raise CheckpointError(
        "config.json says model_type 'umt5' (a per-layer position bias) but "
        "the checkpoint has a position bias in block 0 only: is it a T5 "
        "encoder (model_type 't5')?")


def _check_keys(source: Source, config: UMT5Config, layout: str):
  """{checkpoint key to read: transformers key}; raises KeyMismatch."""
  expected = expected_checkpoint_shapes(config, layout)
  present = set(source.keys())
  _check_position_bias_kind(present, config, layout)
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
  check_keys(source, expected, layout=f"{_family(config)} {layout}")
  to_read = {k: to_transformers_key(k, layout, config) for k in expected}
  if layout == "diffusers" and len(aliases) == 2:
    del to_read["shared.weight"]
  return to_read


def _family(config: UMT5Config) -> str:
  return "T5" if config.shared_position_bias else "umT5"


def load_params(source: Source, config: UMT5Config, layout="diffusers", *,
                progress=False):
  """Stream a checkpoint into a nested dict of numpy arrays (our layout).

  Raises KeyMismatch listing missing, unexpected and misshapen keys by name.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"{layout=} must be one of {LAYOUTS}")
  to_read = _check_keys(source, config, layout)

  def place(key, array):
    path, layer, transform = locate(to_read[key], config)
    return path, layer, array.T if transform == "linear" else array

  return stream_params(source, list(to_read), param_shapes(config),
                       np.dtype(config.weight_dtype), place,
                       progress=progress, desc="converting text encoder")


def read_checkpoint(src, *, dtype="float32", progress=False):
  """(config, params) from a transformers encoder folder: a diffusers
  `text_encoder/` folder (or the model folder holding it), or a
  `T5EncoderModel` folder; umT5 or T5 from config.json, streaming."""
  folder = find_folder(src)
  config = config_from_checkpoint(read_json(folder / "config.json"),
                                  dtype=dtype, param_dtype=dtype)
  source = open_safetensors_folder(folder, "model")
  return config, load_params(source, config, "diffusers", progress=progress)


def to_checkpoint(params: dict, config: UMT5Config, layout="diffusers"):
  """Our nested params -> {checkpoint key: array} in `layout` (the inverse;
  hands the same weights to the PyTorch references in tests)."""
  flat = flatten_dict(params)
  out = {}
  for key, shape in expected_checkpoint_shapes(config).items():
    path, layer, transform = locate(key, config)
    value = np.asarray(flat[path] if layer is None else flat[path][layer])
    value = value.T if transform == "linear" else value
    assert value.shape == shape, (key, value.shape, shape)
    out[from_transformers_key(key, layout, config)] = np.ascontiguousarray(
        value)
  return out
