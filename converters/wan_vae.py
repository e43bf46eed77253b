"""Wan VAE checkpoints -> a ready `WanVAE` (Wan2.1) or `Wan22VAE` (Wan2.2).

Which VAE a checkpoint holds is read from it: the Wan2.2 VAE (Wan2.2
TI2V-5B's `Wan2.2_VAE.pth`, diffusers `is_residual=True`) nests each
encoder/decoder stage's blocks (`encoder.downsamples.{i}.downsamples.{j}`,
diffusers `encoder.down_blocks.{i}.resnets.{j}` / `.downsampler`) and folds
2x2 pixels into 12 input channels.

Layouts read:
  * original (`Wan2.1_VAE.pth` of Wan-AI/Wan2.1-*, or the same keys in a
    safetensors file such as the parity fixture): `encoder.downsamples.{k}.
    residual.{0,2,3,6}`, `decoder.upsamples.{k}`, `conv1` / `conv2`, ...;
  * diffusers (`vae/` of Wan-AI/Wan2.1-*-Diffusers, `AutoencoderKLWan`):
    `config.json` + `diffusion_pytorch_model.safetensors`.

The published `.pth` is a PyTorch pickle, and unpickling can run arbitrary
code: it is read only with `allow_pth=True` (CLI: --allow-pth), only when
torch is installed, and then with `torch.load(weights_only=True)`. Every
other path is safetensors on numpy, no torch needed.

Both layouts name the same tensors; we derive each key from our parameter
path (`original_key`, `diffusers_key`). The renames follow diffusers'
`convert_wan_vae_to_diffusers` (loaders/single_file_utils.py), generalised
from its hard-coded block indices to any `num_res_blocks` / `dim_mult`.
"""

from __future__ import annotations

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from astraea_jax.vae import wan22_vae, wan_vae
from astraea_jax.vae.wan22_vae import Wan22VAEConfig
from astraea_jax.vae.wan_vae import WanVAE, WanVAEConfig
from converters import common
from converters.common import (CheckpointError, Source, as_source,
                               read_json)
from converters.safetensors_io import SafetensorsError, SafetensorsFile

# Our attribute inside a block -> original name. The original blocks are
# nn.Sequential, so names are indices: residual = [RMS_norm, SiLU, conv,
# RMS_norm, SiLU, Dropout, conv]; Resample.resample = [Upsample or
# ZeroPad2d, Conv2d]. Attention members keep their names.
ORIGINAL_MEMBER = {
    "norm1": "residual.0", "conv1": "residual.2",
    "norm2": "residual.3", "conv2": "residual.6", "shortcut": "shortcut",
    "conv": "resample.1", "time_conv": "time_conv",
    "norm": "norm", "to_qkv": "to_qkv", "proj": "proj",
}
# diffusers keeps `resample.1` and `time_conv` inside its WanResample.
DIFFUSERS_MEMBER = {
    "norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
    "shortcut": "conv_shortcut", "conv": "resample.1",
    "time_conv": "time_conv", "norm": "norm", "to_qkv": "to_qkv",
    "proj": "proj",
}
# Top-level and encoder/decoder-level modules.
ORIGINAL_MODULE = {"conv1": "conv1", "conv2": "conv2",
                   "head_norm": "head.0", "head_conv": "head.2"}
# Surprise: the top-level `conv1`/`conv2` are diffusers' quant convs, while
# encoder/decoder `conv1` is `conv_in`.
DIFFUSERS_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
DIFFUSERS_CODER = {"conv1": "conv_in", "head_norm": "norm_out",
                   "head_conv": "conv_out"}
# The middle list [res, attn, res] is split by type in diffusers.
DIFFUSERS_MIDDLE = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0",
                    2: "mid_block.resnets.1"}
LEAF = {"kernel": "weight", "bias": "bias", "gamma": "gamma"}

LAYOUTS = ("original", "diffusers")


# Key naming ------------------------------------------------------------------


def _check_path(path, ok):
  if not ok:
    raise ValueError(f"no checkpoint name for parameter path {path}")


def original_key(path: tuple, config: WanVAEConfig) -> str:
  """Our parameter path -> its key in the original `WanVAE_` state dict."""
  del config
  *mods, leaf = path
  _check_path(path, leaf in LEAF)
  if len(mods) == 1:  # conv1, conv2
    return f"{ORIGINAL_MODULE[mods[0]]}.{LEAF[leaf]}"
  coder = mods[0]
  if len(mods) == 2:  # encoder.conv1, decoder.head.0, ...
    return f"{coder}.{ORIGINAL_MODULE[mods[1]]}.{LEAF[leaf]}"
  _check_path(path, len(mods) in (4, 6))
  # Wan2.2 stages nest their blocks: downsamples.{i}.downsamples.{j}.
  *blocks, member = mods[1:]
  return (f"{coder}.{'.'.join(map(str, blocks))}."
          f"{ORIGINAL_MEMBER[member]}.{LEAF[leaf]}")


def _decoder_block_name(index: int, config: WanVAEConfig) -> str:
  """decoder.upsamples.{index} -> diffusers up_blocks.{s}.(resnets|upsamplers).

  Each decoder stage holds num_res_blocks + 1 residual blocks, then one
  Resample except the last stage; diffusers groups them per stage.
  """
  per_stage = config.num_res_blocks + 2
  stage, j = divmod(index, per_stage)
  if j <= config.num_res_blocks:
    return f"up_blocks.{stage}.resnets.{j}"
  return f"up_blocks.{stage}.upsamplers.0"


def _stage_block_name(group, stage, inner, index, config) -> str:
  """Wan2.2 {group}.{stage}.{inner}.{index} -> diffusers' name: a stage's
  residual blocks are `resnets.{index}`, its Resample after them is
  `downsampler` / `upsampler` (encoder / decoder)."""
  del inner
  if group == "downsamples":
    block, resample = f"down_blocks.{stage}", "downsampler"
    resnets = config.num_res_blocks
  else:
    block, resample = f"up_blocks.{stage}", "upsampler"
    resnets = config.num_res_blocks + 1
  return f"{block}.resnets.{index}" if index < resnets else (
      f"{block}.{resample}")


def diffusers_key(path: tuple, config: WanVAEConfig) -> str:
  """Our parameter path -> its key in diffusers' `AutoencoderKLWan`."""
  *mods, leaf = path
  _check_path(path, leaf in LEAF)
  if len(mods) == 1:
    return f"{DIFFUSERS_TOP[mods[0]]}.{LEAF[leaf]}"
  coder = mods[0]
  if len(mods) == 2:
    return f"{coder}.{DIFFUSERS_CODER[mods[1]]}.{LEAF[leaf]}"
  _check_path(path, len(mods) in (4, 6))
  if len(mods) == 6:
    return f"{coder}.{_stage_block_name(*mods[1:5], config)}." \
        f"{DIFFUSERS_MEMBER[mods[5]]}.{LEAF[leaf]}"
  group, index, member = mods[1:]
  if group == "middle":
    block = DIFFUSERS_MIDDLE[index]
  elif group == "downsamples":  # same flat index, renamed list
    block = f"down_blocks.{index}"
  else:
    block = _decoder_block_name(index, config)
  return f"{coder}.{block}.{DIFFUSERS_MEMBER[member]}.{LEAF[leaf]}"


KEY_FUNCTIONS = {"original": original_key, "diffusers": diffusers_key}


# Tensor layouts --------------------------------------------------------------


def checkpoint_shape(path: tuple, shape: tuple) -> tuple:
  """PyTorch shape of the tensor that becomes our leaf of `shape`."""
  leaf = path[-1]
  if leaf == "kernel":  # (*window, in, out) -> (out, in, *window)
    return (shape[-1], shape[-2], *shape[:-2])
  if leaf == "gamma":  # RMS_norm gamma: (C,1,1) on images, (C,1,1,1) video
    ones = (1, 1) if path[-2] == "norm" else (1, 1, 1)
    return (shape[0], *ones)
  return tuple(shape)


def to_ours(path: tuple, array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":  # (out, in, *window) -> (*window, in, out)
    n = array.ndim
    return array.transpose(*range(2, n), 1, 0)
  if path[-1] == "gamma":
    return array.reshape(array.shape[0])
  return array


def vae_module(config: WanVAEConfig):
  """The module (wan_vae or wan22_vae) whose VAE a config builds."""
  return wan22_vae if isinstance(config, Wan22VAEConfig) else wan_vae


def param_shapes(config: WanVAEConfig) -> dict[tuple, tuple]:
  """Our parameter paths -> shapes, by abstract evaluation (no memory)."""
  return dict(_param_shapes(config))


@functools.cache
def _param_shapes(config):
  # Memoised: loading asks three times, ~0.8 s each for a tiny VAE on CPU.
  state = nnx.state(vae_module(config).abstract_model(config), nnx.Param)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  return {path: tuple(v.shape) for path, v in flat.items()}


def key_map(config: WanVAEConfig, layout: str) -> dict[str, tuple]:
  """{checkpoint key: our parameter path} for `layout`."""
  if layout not in LAYOUTS:
    raise ValueError(f"{layout=} must be one of {LAYOUTS}")
  name = KEY_FUNCTIONS[layout]
  return {name(path, config): path for path in param_shapes(config)}


def expected_shapes(config: WanVAEConfig, layout: str) -> dict[str, tuple]:
  """{checkpoint key: PyTorch shape} a model of `config` needs."""
  shapes = param_shapes(config)
  return {key: checkpoint_shape(path, shapes[path])
          for key, path in key_map(config, layout).items()}


# Sources: anything with keys() / shape(key) / get(key) -----------------------


def detect_layout(keys) -> str:
  """'original' or 'diffusers' from the key names."""
  keys = set(keys)
  if {"quant_conv.weight", "post_quant_conv.weight"} & keys or any(
      k.startswith(("decoder.up_blocks.", "encoder.down_blocks.",
                    "decoder.conv_in.")) for k in keys):
    return "diffusers"
  if {"conv1.weight", "conv2.weight"} & keys or any(
      k.startswith(("decoder.upsamples.", "encoder.downsamples.",
                    "decoder.conv1.")) for k in keys):
    return "original"
  raise CheckpointError(
      "cannot tell the Wan VAE layout: expected original keys (conv1.weight, "
      "decoder.upsamples.*) or diffusers keys (quant_conv.weight, "
      f"decoder.up_blocks.*); found {sorted(keys)[:10]} ...")


# The first encoder stage's residual blocks' first norms, which only the
# Wan2.2 VAE nests in stages (a Wan2.2 checkpoint has a match for block 0).
WAN22_RESNET = {
    "original": re.compile(
        r"^encoder\.downsamples\.0\.downsamples\.(\d+)\.residual\.0\.gamma$"),
    "diffusers": re.compile(
        r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.norm1\.gamma$")}


def infer_config(source, layout: str, **overrides) -> WanVAEConfig:
  """The config from the tensor shapes: Wan2.1, or Wan2.2 where the keys
  nest (`WAN22_RESNET`); base_dim, z_dim (and for Wan2.2 the decoder width,
  the pixel folding and the residual blocks per stage) are read from the
  checkpoint.

  The original checkpoint carries no config; its other hyper-parameters are
  the published ones, and `load_state` then checks every key and shape.
  """
  names = {"original": ("encoder.conv1.weight", "conv2.weight",
                        "decoder.conv1.weight"),
           "diffusers": ("encoder.conv_in.weight", "post_quant_conv.weight",
                         "decoder.conv_in.weight")}[layout]
  first, post, decoder_first = names
  keys = set(source.keys())
  resnets = [k for k in keys if WAN22_RESNET[layout].match(k)]
  wan22 = bool(resnets)
  cls = Wan22VAEConfig if wan22 else WanVAEConfig
  z_known = len(cls().latents_mean)
  kw = {"num_res_blocks": len(resnets)} if wan22 else {}
  if first in keys:
    kw["base_dim"] = int(source.shape(first)[0])
  if post in keys:
    kw["z_dim"] = int(source.shape(post)[0])
  if wan22 and first in keys:
    kw["patch_size"] = round((source.shape(first)[1] / 3) ** 0.5)
  if wan22 and decoder_first in keys:
    kw["decoder_base_dim"] = (int(source.shape(decoder_first)[0])
                              // cls().dim_mult[-1])
  if kw.get("z_dim", z_known) != z_known and "latents_mean" not in overrides:
    raise CheckpointError(
        f"z_dim={kw['z_dim']} from {post}: only the {z_known}-channel "
        f"{'Wan2.2' if wan22 else 'Wan2.1'} latent statistics are known; "
        "pass latents_mean/latents_std")
  kw.update(overrides)
  return cls(**kw)


def config_from_diffusers(cfg: dict, **overrides) -> WanVAEConfig:
  """WanVAEConfig (Wan22VAEConfig when `is_residual`) from an
  `AutoencoderKLWan` config.json dict."""
  wan22 = bool(cfg.get("is_residual", False))
  patch = cfg.get("patch_size") or 1
  if wan22 and patch < 2:
    raise CheckpointError(f"is_residual=True with patch_size={patch}: the "
                          "Wan2.2 VAE folds 2x2 pixels (patch_size=2)")
  if not wan22 and patch != 1:
    raise CheckpointError(f"patch_size={patch} without is_residual: not a "
                          "published Wan VAE")
  if cfg.get("attn_scales"):
    raise CheckpointError(f"attn_scales={cfg['attn_scales']}: the Wan VAEs "
                          "have attention only in the middle blocks")
  base = cfg.get("base_dim", 96)
  decoder_base = cfg.get("decoder_base_dim") or base
  if not wan22 and decoder_base != base:
    raise CheckpointError(f"decoder_base_dim={decoder_base} differs from "
                          f"base_dim={base}: not a Wan2.1 VAE")
  channels = 3 * patch * patch  # diffusers folds pixels before conv_in
  for key in ("in_channels", "out_channels"):
    if cfg.get(key, channels) != channels:
      raise CheckpointError(f"{key}={cfg[key]} is not supported (needs "
                            f"{channels} with patch_size={patch})")
  kw = dict(base_dim=base, z_dim=cfg.get("z_dim", 16),
            dim_mult=tuple(cfg.get("dim_mult", (1, 2, 4, 4))),
            num_res_blocks=cfg.get("num_res_blocks", 2),
            temporal_downsample=tuple(
                cfg.get("temperal_downsample", (False, True, True))))
  if wan22:
    kw.update(decoder_base_dim=decoder_base, patch_size=patch)
  if cfg.get("latents_mean") is not None:
    kw["latents_mean"] = tuple(cfg["latents_mean"])
  if cfg.get("latents_std") is not None:
    kw["latents_std"] = tuple(cfg["latents_std"])
  kw.update(overrides)
  return (Wan22VAEConfig if wan22 else WanVAEConfig)(**kw)


# Loading ---------------------------------------------------------------------


def check_keys(source, config: WanVAEConfig, layout: str):
  """Raise KeyMismatch naming every missing, unexpected, misshapen key."""
  common.check_keys(source, expected_shapes(config, layout),
                    layout=f"Wan VAE, {layout}")


def load_params(source, config: WanVAEConfig, layout: str) -> dict:
  """Nested dict {path part: numpy array} in our layout, one tensor at a time.

  Tensors are cast to `config.param_dtype` (bfloat16 through ml_dtypes).
  """
  check_keys(source, config, layout)
  dtype = np.dtype(config.weight_dtype)
  flat = {path: np.ascontiguousarray(to_ours(path, source.get(key))
                                     .astype(dtype))
          for key, path in key_map(config, layout).items()}
  return traverse_util.unflatten_dict(flat)


def vae_from_params(params: dict, config: WanVAEConfig) -> WanVAE:
  """A WanVAE (Wan22VAE for a Wan22VAEConfig) whose parameters are the
  nested dict `params` (our layout)."""
  graphdef, state = nnx.split(vae_module(config).abstract_model(config))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def vae_from_state_dict(state_dict, config: WanVAEConfig | None = None, *,
                        layout: str = "auto", **overrides) -> WanVAE:
  """A ready WanVAE from a state dict of numpy arrays (or a tensor source).

  layout: "original", "diffusers" or "auto" (from the key names). Without
  `config`, base_dim and z_dim come from the tensor shapes and the rest is
  Wan2.1's; `overrides` (e.g. dtype="bfloat16") go into the config.
  """
  source = as_source(state_dict)
  if layout == "auto":
    layout = detect_layout(source.keys())
  elif layout not in LAYOUTS:
    raise ValueError(f"{layout=} must be 'auto' or one of {LAYOUTS}")
  if config is None:
    config = infer_config(source, layout, **overrides)
  elif overrides:
    config = config.replace(**overrides)
  return vae_from_params(load_params(source, config, layout), config)


# Files -----------------------------------------------------------------------


def read_pth(path, *, allow_pth: bool = False) -> dict[str, np.ndarray]:
  """The state dict of a PyTorch `.pth` as numpy arrays, only if allowed
  (`common.PthSource`: refused before opening the file unless
  allow_pth=True, then torch.load(weights_only=True))."""
  source = common.PthSource(path, allow_pth=allow_pth)
  return {k: source.get(k) for k in source.keys()}


def open_checkpoint(path, *, allow_pth: bool = False):
  """(source, layout, diffusers config.json dict or None) for a path.

  path: a `.pth` (original layout, needs allow_pth), a `.safetensors` file
  (either layout, detected from the keys) or a diffusers `vae/` folder
  (config.json + diffusion_pytorch_model.safetensors).
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointError(f"{path}: no such file or folder")
  cfg = None
  if path.is_dir():
    folder = path / "vae" if (path / "vae" / "config.json").exists() else path
    weights = common.weights_file(folder,
                                  "diffusion_pytorch_model.safetensors",
                                  "a diffusers AutoencoderKLWan folder")
    if (folder / "config.json").exists():
      cfg = read_json(folder / "config.json")
    path = weights
  if path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
    source = Source.from_arrays(read_pth(path, allow_pth=allow_pth))
  else:
    try:
      source = SafetensorsFile(path)
    except SafetensorsError as e:
      raise CheckpointError(str(e)) from e
  return source, detect_layout(source.keys()), cfg


def load_vae(path, *, allow_pth: bool = False,
             config: WanVAEConfig | None = None, **overrides) -> WanVAE:
  """A ready WanVAE from a `.pth`, a `.safetensors` or a diffusers folder.

  overrides go into the config (e.g. dtype="bfloat16", param_dtype=...).
  """
  source, layout, cfg = open_checkpoint(path, allow_pth=allow_pth)
  if config is None and cfg is not None:
    config = config_from_diffusers(cfg, **overrides)
    overrides = {}
  return vae_from_state_dict(source, config, layout=layout, **overrides)
