"""Wan transformer checkpoints -> astraea-jax parameters.

Wan2.1 T2V and the Wan2.2 DiTs (TI2V-5B, each expert of T2V-A14B and
I2V-A14B: model_type "ti2v" / "t2v" / "i2v", all Wan2.1's parameters with
other channel counts). Wan2.1 I2V/FLF2V, whose DiT adds a CLIP image
embedding (`img_emb.*`), is refused.

Two published layouts are read:
  * original (Wan-AI/Wan2.1-T2V-*, Wan2.2-TI2V-5B/, Wan2.2-*-A14B/
    high_noise_model/ and low_noise_model/): `config.json` with `dim`,
    `num_heads`,
    `text_len`, ... and `diffusion_pytorch_model.safetensors` (or sharded
    `diffusion_pytorch_model-0000k-of-0000n.safetensors` + `.index.json`);
  * diffusers (Wan-AI/Wan2.1-T2V-*-Diffusers): the `transformer/` folder,
    `config.json` with `num_attention_heads`, `attention_head_dim`, ...

Tensors are streamed one at a time from memory-mapped safetensors into
preallocated numpy buffers (blocks stacked on a leading layer axis), so the
checkpoint is in memory once. No torch needed.
"""

from __future__ import annotations

import pathlib
import re

import numpy as np

from astraea_jax.configs import WanConfig
from astraea_jax.models import wan
from converters import common
from converters.common import (CheckpointError, Source,
                               check_keys, flatten_dict, inverted,
                               locate_key, to_ours,
                               open_safetensors_folder, read_json,
                               rename_key, stream_params)

# Our parameter path <- original key. Transform names: "linear" = torch
# (out, in) weight transposed to our (in, out) kernel; "patch" = Conv3d
# weight (dim, C, pt, ph, pw) -> (pt*ph*pw*C, dim) matching `wan.patchify`;
# "same" = copied as is.
TOP_LEVEL_KEYS = {
    "patch_embedding.weight": (("patch_embedding", "kernel"), "patch"),
    "patch_embedding.bias": (("patch_embedding", "bias"), "same"),
    "text_embedding.0.weight": (("text_embedding", "fc1", "kernel"), "linear"),
    "text_embedding.0.bias": (("text_embedding", "fc1", "bias"), "same"),
    "text_embedding.2.weight": (("text_embedding", "fc2", "kernel"), "linear"),
    "text_embedding.2.bias": (("text_embedding", "fc2", "bias"), "same"),
    "time_embedding.0.weight": (("time_embedding", "fc1", "kernel"), "linear"),
    "time_embedding.0.bias": (("time_embedding", "fc1", "bias"), "same"),
    "time_embedding.2.weight": (("time_embedding", "fc2", "kernel"), "linear"),
    "time_embedding.2.bias": (("time_embedding", "fc2", "bias"), "same"),
    "time_projection.1.weight": (("time_projection", "kernel"), "linear"),
    "time_projection.1.bias": (("time_projection", "bias"), "same"),
    "head.head.weight": (("head", "head", "kernel"), "linear"),
    "head.head.bias": (("head", "head", "bias"), "same"),
    "head.modulation": (("head", "modulation"), "same"),
}

# blocks.{i}.<suffix>: stacked at index i of the ("blocks", ...) leaf.
BLOCK_KEYS = {"modulation": (("modulation",), "same"),
              "norm3.weight": (("norm3", "weight"), "same"),
              "norm3.bias": (("norm3", "bias"), "same"),
              "ffn.0.weight": (("ffn", "fc1", "kernel"), "linear"),
              "ffn.0.bias": (("ffn", "fc1", "bias"), "same"),
              "ffn.2.weight": (("ffn", "fc2", "kernel"), "linear"),
              "ffn.2.bias": (("ffn", "fc2", "bias"), "same")}
for _attn in ("self_attn", "cross_attn"):
  for _p in "qkvo":
    BLOCK_KEYS[f"{_attn}.{_p}.weight"] = ((_attn, _p, "kernel"), "linear")
    BLOCK_KEYS[f"{_attn}.{_p}.bias"] = ((_attn, _p, "bias"), "same")
  for _n in ("norm_q", "norm_k"):
    BLOCK_KEYS[f"{_attn}.{_n}.weight"] = ((_attn, _n, "weight"), "same")

# diffusers name -> original name. Surprises: diffusers' `norm2` is the
# original `norm3` (the affine LayerNorm before cross-attention); the head
# and the blocks both call their modulation `scale_shift_table`.
DIFFUSERS_TOP_LEVEL = {
    "patch_embedding.weight": "patch_embedding.weight",
    "patch_embedding.bias": "patch_embedding.bias",
    "condition_embedder.text_embedder.linear_1.weight": "text_embedding.0.weight",
    "condition_embedder.text_embedder.linear_1.bias": "text_embedding.0.bias",
    "condition_embedder.text_embedder.linear_2.weight": "text_embedding.2.weight",
    "condition_embedder.text_embedder.linear_2.bias": "text_embedding.2.bias",
    "condition_embedder.time_embedder.linear_1.weight": "time_embedding.0.weight",
    "condition_embedder.time_embedder.linear_1.bias": "time_embedding.0.bias",
    "condition_embedder.time_embedder.linear_2.weight": "time_embedding.2.weight",
    "condition_embedder.time_embedder.linear_2.bias": "time_embedding.2.bias",
    "condition_embedder.time_proj.weight": "time_projection.1.weight",
    "condition_embedder.time_proj.bias": "time_projection.1.bias",
    "proj_out.weight": "head.head.weight",
    "proj_out.bias": "head.head.bias",
    "scale_shift_table": "head.modulation",
}
DIFFUSERS_BLOCK = {"scale_shift_table": "modulation",
                   "norm2.weight": "norm3.weight",
                   "norm2.bias": "norm3.bias",
                   "ffn.net.0.proj.weight": "ffn.0.weight",
                   "ffn.net.0.proj.bias": "ffn.0.bias",
                   "ffn.net.2.weight": "ffn.2.weight",
                   "ffn.net.2.bias": "ffn.2.bias"}
for _d, _o in (("attn1", "self_attn"), ("attn2", "cross_attn")):
  for _dp, _op in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                   ("to_out.0", "o")):
    for _w in ("weight", "bias"):
      DIFFUSERS_BLOCK[f"{_d}.{_dp}.{_w}"] = f"{_o}.{_op}.{_w}"
  for _n in ("norm_q", "norm_k"):
    DIFFUSERS_BLOCK[f"{_d}.{_n}.weight"] = f"{_o}.{_n}.weight"

_BLOCK_RE = re.compile(r"^blocks\.(?P<layer>\d+)\.(?P<suffix>.+)$")

# The original config's model_type values whose DiT is Wan2.1's block stack
# (wan22 `WanModel`: "i2v" is Wan2.2's, without Wan2.1's CLIP `img_emb`).
MODEL_TYPES = ("t2v", "i2v", "ti2v")


# Layout detection and configs -----------------------------------------------


def detect_layout(src) -> tuple[str, pathlib.Path]:
  """Returns ("wan" | "diffusers", folder holding config.json + weights)."""
  src = pathlib.Path(src)
  if not src.is_dir():
    raise CheckpointError(f"{src} is not a checkpoint folder")
  folder = src / "transformer" if (src / "transformer" / "config.json").exists() else src
  cfg_path = folder / "config.json"
  if not cfg_path.exists():
    raise CheckpointError(
        f"{src}: no config.json (nor transformer/config.json); expected a "
        "Wan2.1 checkpoint folder in the original or diffusers layout")
  cfg = read_json(cfg_path)
  if "num_attention_heads" in cfg and "attention_head_dim" in cfg:
    return "diffusers", folder
  if "dim" in cfg and "num_heads" in cfg:
    return "wan", folder
  raise CheckpointError(
      f"{cfg_path}: unknown layout (neither the original Wan keys `dim`/"
      f"`num_heads` nor the diffusers keys `num_attention_heads`/"
      f"`attention_head_dim`); found keys {sorted(cfg)}")


def config_from_checkpoint(layout, cfg, *, text_len=None, **overrides):
  """WanConfig from a checkpoint's config.json dict."""
  if layout == "wan":
    if cfg.get("model_type", "t2v") not in MODEL_TYPES:
      raise CheckpointError(
          f"model_type={cfg['model_type']!r}: supported are {MODEL_TYPES}")
    if tuple(cfg.get("window_size", (-1, -1))) != (-1, -1):
      raise CheckpointError(f"window_size={cfg['window_size']}: local "
                            "attention windows are not supported")
    if not cfg.get("qk_norm", True):
      raise CheckpointError("qk_norm=False is not supported")
    kw = dict(dim=cfg["dim"], ffn_dim=cfg["ffn_dim"],
              num_heads=cfg["num_heads"], num_layers=cfg["num_layers"],
              in_dim=cfg.get("in_dim", 16), out_dim=cfg.get("out_dim", 16),
              text_dim=cfg.get("text_dim", 4096),
              text_len=cfg.get("text_len", 512),
              freq_dim=cfg.get("freq_dim", 256),
              patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
              eps=cfg.get("eps", 1e-6),
              cross_attn_norm=cfg.get("cross_attn_norm", True))
  else:
    for key in ("image_dim", "added_kv_proj_dim"):
      if cfg.get(key) is not None:
        raise CheckpointError(
            f"{key}={cfg[key]}: image-to-video checkpoints are not supported")
    if cfg.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
      raise CheckpointError(f"qk_norm={cfg['qk_norm']!r} is not supported")
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    # diffusers leaves the text length to the pipeline (512 for Wan2.1).
    kw = dict(dim=heads * head_dim, ffn_dim=cfg["ffn_dim"], num_heads=heads,
              num_layers=cfg["num_layers"],
              in_dim=cfg.get("in_channels", 16),
              out_dim=cfg.get("out_channels", 16),
              text_dim=cfg.get("text_dim", 4096), text_len=512,
              freq_dim=cfg.get("freq_dim", 256),
              patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
              eps=cfg.get("eps", 1e-6),
              cross_attn_norm=cfg.get("cross_attn_norm", True))
  if not kw["cross_attn_norm"]:
    raise CheckpointError("cross_attn_norm=False is not supported")
  if text_len is not None:
    kw["text_len"] = text_len
  kw.update(overrides)
  return WanConfig(**kw)


# Key mapping -----------------------------------------------------------------


def to_original_key(key: str, layout: str) -> str | None:
  """A checkpoint key in original naming, or None if the layout lacks it."""
  if layout == "wan":
    return key
  return rename_key(key, DIFFUSERS_TOP_LEVEL, _BLOCK_RE, DIFFUSERS_BLOCK,
                    "blocks")


def from_original_key(key: str, layout: str) -> str:
  if layout == "wan":
    return key
  return rename_key(key, inverted(DIFFUSERS_TOP_LEVEL), _BLOCK_RE,
                    inverted(DIFFUSERS_BLOCK), "blocks")


def locate(original_key: str, num_layers: int):
  """original key -> (our path, layer index or None, transform), or None."""
  return locate_key(original_key, TOP_LEVEL_KEYS, _BLOCK_RE, BLOCK_KEYS,
                    num_layers)


def expected_checkpoint_shapes(config: WanConfig, layout: str = "wan"):
  """{checkpoint key: shape} that a model of `config` needs (no weights)."""
  shapes = common.checkpoint_shapes(
      param_shapes(config), TOP_LEVEL_KEYS, BLOCK_KEYS, config.num_layers,
      {"blocks": "blocks"},
      patch_shape=(config.dim, config.in_dim, *config.patch_size))
  return {from_original_key(k, layout): v for k, v in shapes.items()}


def param_shapes(config: WanConfig) -> dict[tuple, tuple]:
  """Our parameter paths -> shapes, by abstract evaluation (no memory)."""
  return common.param_shapes(wan.abstract_model(config))


# Loading -----------------------------------------------------------------------


def load_params(source: Source, layout: str, config: WanConfig, *,
                progress=False):
  """Stream a checkpoint into a nested dict of numpy arrays (our layout).

  Raises KeyMismatch listing missing, unexpected and misshapen keys by name.
  """
  clip = sorted(k for k in source.keys()
                if k.startswith(("img_emb.", "condition_embedder.image_")))
  if clip:
    raise CheckpointError(
        f"{clip[0]} ...: a CLIP image embedding, i.e. Wan2.1 image-to-video; "
        "only the Wan2.2 image-to-video DiTs (no image embedding) are "
        "supported")
  check_keys(source, expected_checkpoint_shapes(config, layout),
             layout=layout)

  def place(key, array):
    path, layer, transform = locate(to_original_key(key, layout),
                                    config.num_layers)
    return path, layer, to_ours(array, transform)

  return stream_params(source, source.keys(), param_shapes(config),
                       np.dtype(config.weight_dtype), place,
                       progress=progress)


def read_checkpoint(src, *, format="auto", dtype="float32", text_len=None,
                    progress=False):
  """(config, params) from a Wan2.1 checkpoint folder, streaming."""
  layout, folder = detect_layout(src)
  if format not in ("auto", layout):
    raise CheckpointError(
        f"{src}: --format {format} requested, but the folder is in the "
        f"{layout!r} layout")
  cfg = read_json(folder / "config.json")
  try:
    config = config_from_checkpoint(layout, cfg, text_len=text_len,
                                    param_dtype=dtype, dtype=dtype)
  except KeyError as e:
    raise CheckpointError(
        f"{folder / 'config.json'}: missing field {e.args[0]!r}") from e
  source = open_safetensors_folder(folder, "diffusion_pytorch_model")
  return config, load_params(source, layout, config, progress=progress)


def to_checkpoint(params: dict, config: WanConfig, layout: str = "wan"):
  """Our nested params -> {checkpoint key: array} in `layout` (the inverse).

  Used to hand the same weights to the PyTorch references in tests and
  benchmarks.
  """
  flat = flatten_dict(params)
  out = {}
  for key, shape in expected_checkpoint_shapes(config, "wan").items():
    path, layer, transform = locate(key, config.num_layers)
    value = np.asarray(flat[path] if layer is None else flat[path][layer])
    if transform == "linear":
      value = value.T
    elif transform == "patch":
      value = value.reshape(*config.patch_size, config.in_dim, config.dim)
      value = value.transpose(4, 3, 0, 1, 2)
    assert value.shape == shape, (key, value.shape, shape)
    out[from_original_key(key, layout)] = np.ascontiguousarray(value)
  return out
