"""OpenSora v1.2 STDiT3 checkpoints -> astraea-jax parameters.

The published layout (hpcai-tech/OpenSora-STDiT-v3, a transformers
`PreTrainedModel` folder): `config.json` with `hidden_size`, `depth`,
`num_heads`, `caption_channels`, `model_max_length`, `patch_size`,
`in_channels`, `pred_sigma`, `mlp_ratio`, `qk_norm`, `input_sq_size`, ...
and `model.safetensors` (or `model-0000k-of-0000n.safetensors` shards +
`model.safetensors.index.json`) with the original key names.

Tensors are streamed one at a time from memory-mapped safetensors into
preallocated numpy buffers (spatial and temporal blocks each stacked on a
leading layer axis), so the checkpoint is in memory once. No torch needed.
"""

from __future__ import annotations

import pathlib
import re

import numpy as np

from astraea_jax.configs import STDiT3Config
from astraea_jax.models import stdit3
from converters import common
from converters.common import (
  check_keys,
  locate_key,
  read_json,
  stream_params,
  to_ours,
  CheckpointError,
  Source,
  flatten_dict,
  open_safetensors_folder,
)

# Our parameter path <- original key. Transform names: "linear" = torch
# (out, in) weight transposed to our (in, out) kernel; "patch" = Conv3d
# weight (hidden, C, pt, ph, pw) -> (pt*ph*pw*C, hidden) matching
# `wan.patchify`; "same" = copied as is.
TOP_LEVEL_KEYS = {
    "x_embedder.proj.weight": (("x_embedder", "kernel"), "patch"),
    "x_embedder.proj.bias": (("x_embedder", "bias"), "same"),
    "t_block.1.weight": (("t_block", "kernel"), "linear"),
    "t_block.1.bias": (("t_block", "bias"), "same"),
    # A buffer in the original (the null caption for classifier-free
    # guidance), a parameter here.
    "y_embedder.y_embedding": (("y_embedder", "y_embedding"), "same"),
    "final_layer.scale_shift_table": (("final_layer", "scale_shift_table"),
                                      "same"),
    "final_layer.linear.weight": (("final_layer", "linear", "kernel"),
                                  "linear"),
    "final_layer.linear.bias": (("final_layer", "linear", "bias"), "same"),
}
# nn.Sequential(Linear, SiLU, Linear) numbers its linears 0 and 2; timm's
# Mlp names them fc1 and fc2. Both become fc1/fc2 here.
for _name in ("t_embedder", "fps_embedder"):
  for _i, _fc in (("0", "fc1"), ("2", "fc2")):
    TOP_LEVEL_KEYS[f"{_name}.mlp.{_i}.weight"] = ((_name, _fc, "kernel"),
                                                  "linear")
    TOP_LEVEL_KEYS[f"{_name}.mlp.{_i}.bias"] = ((_name, _fc, "bias"), "same")
for _fc in ("fc1", "fc2"):
  TOP_LEVEL_KEYS[f"y_embedder.y_proj.{_fc}.weight"] = (
      ("y_embedder", "y_proj", _fc, "kernel"), "linear")
  TOP_LEVEL_KEYS[f"y_embedder.y_proj.{_fc}.bias"] = (
      ("y_embedder", "y_proj", _fc, "bias"), "same")

# {spatial,temporal}_blocks.{i}.<suffix>: stacked at index i of the
# (stack, ...) leaf. Spatial and temporal blocks have the same keys; the
# temporal blocks' RoPE has no parameters of its own (see ROPE_KEY).
BLOCK_KEYS = {"scale_shift_table": (("scale_shift_table",), "same")}
for _p in ("attn.qkv", "attn.proj", "cross_attn.q_linear",
           "cross_attn.kv_linear", "cross_attn.proj", "mlp.fc1", "mlp.fc2"):
  _path = tuple(_p.split("."))
  BLOCK_KEYS[f"{_p}.weight"] = (_path + ("kernel",), "linear")
  BLOCK_KEYS[f"{_p}.bias"] = (_path + ("bias",), "same")
QK_NORM_KEYS = {f"attn.{n}.weight": (("attn", n, "weight"), "same")
                for n in ("q_norm", "k_norm")}

# `rope.freqs` (head_dim // 2,): the temporal RoPE frequencies, a fixed
# buffer 1 / 10000^(2i / head_dim) (rotary_embedding_torch, not learned).
# The model computes them; the converter checks the checkpoint agrees.
ROPE_KEY = "rope.freqs"

# Keys read and dropped. OpenSora v1.3 checkpoints of the same model add
# two patch embedders that are used only for image/video conditioning with
# `mask_index` (i2v / v2v); text-to-video never reads them.
IGNORED_KEYS = frozenset({
    "x_embedder_cond.proj.weight", "x_embedder_cond.proj.bias",
    "x_embedder_cond_mask.proj.weight", "x_embedder_cond_mask.proj.bias",
})

_BLOCK_RE = re.compile(
    r"^(?P<stack>spatial_blocks|temporal_blocks)\.(?P<layer>\d+)\."
    r"(?P<suffix>.+)$")
WEIGHTS_STEM = "model"


# Configs ----------------------------------------------------------------------


def config_from_checkpoint(cfg: dict, **overrides) -> STDiT3Config:
  """STDiT3Config from a checkpoint's config.json dict.

  Fields that change the architecture in ways this port does not implement
  (OpenSora v1.3 windowed attention and spatial RoPE, skipped temporal
  blocks or caption embedder) are rejected by name.
  """
  model_type = cfg.get("model_type", "STDiT3")
  if model_type != "STDiT3":
    raise CheckpointError(f"{model_type=}: not an STDiT3 checkpoint")
  unsupported = {"skip_y_embedder": False, "skip_temporal": False,
                 "kernel_size": None, "use_spatial_rope": False}
  for key, supported in unsupported.items():
    if cfg.get(key, supported) != supported:
      raise CheckpointError(
          f"{key}={cfg[key]!r} is not supported (only {supported!r})")
  required = ("hidden_size", "depth", "num_heads")
  absent = [k for k in required if k not in cfg]
  if absent:
    raise CheckpointError(
        f"config.json lacks {absent}; found keys {sorted(cfg)}")
  optional = ("patch_size", "in_channels", "pred_sigma", "caption_channels",
              "model_max_length", "mlp_ratio", "qk_norm", "input_sq_size")
  kw = {k: cfg[k] for k in required + optional if k in cfg}
  kw.update(overrides)
  try:
    return STDiT3Config(**kw)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"config.json describes an invalid model: {e}") from e


# Key mapping ------------------------------------------------------------------


def block_keys(config: STDiT3Config) -> dict:
  return {**BLOCK_KEYS, **(QK_NORM_KEYS if config.qk_norm else {})}


def locate(key: str, config: STDiT3Config):
  """original key -> (our path, layer index or None, transform), or None."""
  return locate_key(key, TOP_LEVEL_KEYS, _BLOCK_RE, block_keys(config),
                    config.depth)


def expected_checkpoint_shapes(config: STDiT3Config):
  """{checkpoint key: shape} that a model of `config` needs (no weights).

  Includes `rope.freqs`; excludes the ignored v1.3 keys (IGNORED_KEYS).
  """
  return {ROPE_KEY: (config.head_dim // 2,), **common.checkpoint_shapes(
      param_shapes(config), TOP_LEVEL_KEYS, block_keys(config), config.depth,
      {stack: stack for stack in ("spatial_blocks", "temporal_blocks")},
      patch_shape=(config.hidden_size, config.in_channels,
                   *config.patch_size))}


def param_shapes(config: STDiT3Config) -> dict[tuple, tuple]:
  """Our parameter paths -> shapes, by abstract evaluation (no memory)."""
  return common.param_shapes(stdit3.abstract_model(config))


# Loading ----------------------------------------------------------------------


def check_rope_frequencies(value: np.ndarray, config: STDiT3Config):
  """The checkpoint's `rope.freqs` must be the fixed frequencies we compute."""
  expected = stdit3.rope_frequencies(config.head_dim, config.rope_theta)
  value = np.asarray(value, np.float64)
  err = np.abs(value - expected).max() / np.abs(expected).max()
  # bfloat16 checkpoints round the values to 8 bits of mantissa.
  if not err <= 2 ** -8:
    raise CheckpointError(
        f"{ROPE_KEY} differs from 1/10000^(2i/{config.head_dim}) (relative "
        f"error {err:.3g}): this RoPE variant is not supported; got "
        f"{value[:4]}..., expected {expected[:4]}...")


def load_params(source: Source, config: STDiT3Config, *, progress=False):
  """Stream a checkpoint into a nested dict of numpy arrays (our layout).

  Raises KeyMismatch listing missing, unexpected and misshapen keys by name
  (the v1.3 keys in IGNORED_KEYS are allowed and dropped).
  """
  expected = expected_checkpoint_shapes(config)
  check_keys(source, expected, layout="opensora", ignored=IGNORED_KEYS)
  check_rope_frequencies(source.get(ROPE_KEY), config)

  def place(key, array):
    path, layer, transform = locate(key, config)
    return path, layer, to_ours(array, transform)

  keys = [k for k in source.keys() if k in expected and k != ROPE_KEY]
  return stream_params(source, keys, param_shapes(config),
                       np.dtype(config.weight_dtype), place,
                       progress=progress)


def read_checkpoint(src, *, dtype="float32", progress=False):
  """(config, params) from an STDiT3 checkpoint folder, streaming."""
  folder = pathlib.Path(src)
  if not folder.is_dir():
    raise CheckpointError(f"{src} is not a checkpoint folder")
  cfg_path = folder / "config.json"
  if not cfg_path.exists():
    raise CheckpointError(
        f"{src}: no config.json; expected an OpenSora STDiT3 checkpoint "
        f"folder (config.json + {WEIGHTS_STEM}.safetensors)")
  config = config_from_checkpoint(read_json(cfg_path), param_dtype=dtype,
                                  dtype=dtype)
  source = open_safetensors_folder(folder, WEIGHTS_STEM)
  return config, load_params(source, config, progress=progress)


def to_checkpoint(params: dict, config: STDiT3Config):
  """Our nested params -> {original key: array} (the inverse of load_params).

  Writes `rope.freqs` too. Used to hand the same weights to references and
  to build test checkpoints.
  """
  flat = flatten_dict(params)
  out = {ROPE_KEY: stdit3.rope_frequencies(config.head_dim,
                                           config.rope_theta)}
  for key, shape in expected_checkpoint_shapes(config).items():
    if key == ROPE_KEY:
      continue
    path, layer, transform = locate(key, config)
    value = np.asarray(flat[path] if layer is None else flat[path][layer])
    if transform == "linear":
      value = value.T
    elif transform == "patch":
      value = value.reshape(*config.patch_size, config.in_channels,
                            config.hidden_size).transpose(4, 3, 0, 1, 2)
    assert value.shape == shape, (key, value.shape, shape)
    out[key] = np.ascontiguousarray(value)
  return out
