"""OpenSora v1.2 VAE checkpoints -> a ready `astraea_jax.vae.opensora_vae`.

Layouts read (safetensors only, no torch):
  * opensora: the pipeline's state dict as published in
    hpcai-tech/OpenSora-VAE-v1.2 (`model.safetensors` + `config.json` of a
    transformers `VideoAutoencoderPipeline`): `spatial_vae.module.<diffusers
    AutoencoderKL key>`, `temporal_vae.<VAE_Temporal key>` and the
    normalisation buffers `scale` / `shift` (shape (1, 4, 1, 1, 1));
  * diffusers: a diffusers `AutoencoderKL` alone (`vae/` folder:
    `config.json` + `diffusion_pytorch_model.safetensors`, e.g. the SDXL VAE
    of PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers that OpenSora starts
    from) -> the image VAE, `opensora_vae.SpatialVAE`;
  * temporal: a bare `VAE_Temporal` state dict (what `VAE_Temporal_SD(
    from_pretrained=...)` loads: the pipeline's `temporal_vae.*` keys
    without the prefix) -> `opensora_vae.TemporalVAE`.

Our parameter names are the checkpoint's, so each key is derived from our
parameter path by walking the model's modules (`key_map`): convolutions
and linears rename `kernel` to `weight`; OpenSora's `CausalConv3d` wraps its
`nn.Conv3d` as `.conv`; diffusers' attention output projection is
`to_out.0` (`to_out.1` is a Dropout).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from astraea_jax.vae import opensora_vae
from astraea_jax.vae.opensora_vae import (
  CausalConv3d,
  Conv,
  Dense,
  GroupNorm,
  OpenSoraVAE,
  OpenSoraVAEConfig,
  SpatialVAE,
  SpatialVAEConfig,
  TemporalVAEConfig,
)
from converters import common
from converters.common import CheckpointError, as_source, read_json
from converters.safetensors_io import SafetensorsError, SafetensorsFile

LAYOUTS = ("opensora", "diffusers", "temporal")

# Where each half of the pipeline sits in the OpenSora state dict. Surprise:
# `VideoAutoencoderKL` keeps the diffusers model as `.module`.
OPENSORA_PREFIX = {"spatial_vae": "spatial_vae.module.",
                   "temporal_vae": "temporal_vae."}
# Keys only a bare VAE_Temporal has (diffusers' AutoencoderKL has
# `encoder.conv_in.weight`, with no `.conv`).
TEMPORAL_MARKERS = ("encoder.conv_in.conv.", "decoder.conv_out.conv.")
# The pipeline's normalisation buffers (`register_buffer` in
# `VideoAutoencoderPipeline.__init__`); optional, they override the config.
NORMALISATION_KEYS = ("shift", "scale")
# diffusers < 0.15 names of the mid-block attention, which diffusers still
# renames on load (`_convert_deprecated_attention_blocks`).
DEPRECATED_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value",
                        "to_out.0": "proj_attn"}


# Key naming -------------------------------------------------------------------


def _module_keys(model) -> dict[tuple, str]:
  """{our parameter path: checkpoint key without prefix} for every Param."""
  out = {}
  for path, module in nnx.iter_modules(model):
    name = ".".join(str(p) for p in path)
    if isinstance(module, CausalConv3d):
      name += ".conv"  # OpenSora's CausalConv3d holds an nn.Conv3d `conv`
    elif isinstance(module, Dense) and path[-1] == "to_out":
      name += ".0"
    if isinstance(module, (Conv, Dense)):
      leaves = {"kernel": "weight", "bias": "bias"}
    elif isinstance(module, GroupNorm):
      leaves = {"weight": "weight", "bias": "bias"}
    else:
      continue
    for leaf, torch_name in leaves.items():
      if getattr(module, leaf) is not None:
        out[(*path, leaf)] = f"{name}.{torch_name}"
  return out


def _with_prefixes(keys: dict[tuple, str]) -> dict[tuple, str]:
  """OpenSora layout: `spatial_vae.module.` / `temporal_vae.` prefixes."""
  out = {}
  for path, key in keys.items():
    top, rest = path[0], key.partition(".")[2]
    out[path] = OPENSORA_PREFIX[top] + rest
  return out


def abstract_for(config: OpenSoraVAEConfig, layout: str):
  """The abstract model a layout fills: the pipeline or the image VAE."""
  if layout == "opensora":
    return opensora_vae.abstract_model(config)
  if layout == "diffusers":
    return opensora_vae.abstract_spatial_vae(config)
  if layout == "temporal":
    return opensora_vae.abstract_temporal_vae(config)
  raise ValueError(f"{layout=} must be one of {LAYOUTS}")


@functools.lru_cache(maxsize=8)
def _layout_info(config: OpenSoraVAEConfig, layout: str):
  """({our path: shape}, {checkpoint key: our path}) of one abstract model
  (abstract evaluation of the v1.2 VAE takes seconds; done once)."""
  model = abstract_for(config, layout)
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model,
                                                              nnx.Param)))
  shapes = {path: tuple(v.shape) for path, v in flat.items()}
  keys = _module_keys(model)
  if layout == "opensora":
    keys = _with_prefixes(keys)
  unnamed = sorted(set(shapes) - set(keys))
  if unnamed:  # a module kind without a naming rule above
    raise ValueError(f"no checkpoint name for parameter paths {unnamed}")
  return shapes, {key: path for path, key in keys.items()}


def param_shapes(config: OpenSoraVAEConfig, layout: str) -> dict[tuple, tuple]:
  """Our parameter paths -> shapes, by abstract evaluation (no memory)."""
  return dict(_layout_info(config, layout)[0])


def key_map(config: OpenSoraVAEConfig, layout: str) -> dict[str, tuple]:
  """{checkpoint key: our parameter path} for `layout`."""
  return dict(_layout_info(config, layout)[1])


def checkpoint_shape(path: tuple, shape: tuple) -> tuple:
  """PyTorch shape of the tensor that becomes our leaf of `shape`."""
  if path[-1] == "kernel":  # (*window, in, out) -> (out, in, *window)
    return (shape[-1], shape[-2], *shape[:-2])
  return tuple(shape)


def expected_shapes(config: OpenSoraVAEConfig, layout: str):
  """{checkpoint key: PyTorch shape} a model of `config` needs."""
  shapes = param_shapes(config, layout)
  return {key: checkpoint_shape(path, shapes[path])
          for key, path in key_map(config, layout).items()}


def to_ours(path: tuple, array: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel":  # (out, in, *window) -> (*window, in, out)
    return array.transpose(*range(2, array.ndim), 1, 0)
  return array


def to_checkpoint(params: dict, config: OpenSoraVAEConfig,
                  layout: str) -> dict[str, np.ndarray]:
  """Our nested params -> {checkpoint key: array} (the inverse of
  `load_params`, without the normalisation buffers)."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for key, path in key_map(config, layout).items():
    value = np.asarray(flat[path])
    if path[-1] == "kernel":
      value = value.transpose(value.ndim - 1, value.ndim - 2,
                              *range(value.ndim - 2))
    out[key] = np.ascontiguousarray(value)
  return out


# Sources and configs ----------------------------------------------------------


def detect_layout(keys) -> str:
  """'opensora', 'diffusers' or 'temporal' from the key names."""
  keys = set(keys)
  if any(k.startswith(tuple(OPENSORA_PREFIX.values())) for k in keys):
    return "opensora"
  if any(k.startswith(TEMPORAL_MARKERS) for k in keys):
    return "temporal"
  if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks."))
         for k in keys):
    return "diffusers"
  raise CheckpointError(
      "cannot tell the OpenSora VAE layout: expected OpenSora keys "
      "(spatial_vae.module.*, temporal_vae.*), diffusers AutoencoderKL "
      "keys (encoder.down_blocks.*) or VAE_Temporal keys "
      f"(encoder.conv_in.conv.*); found {sorted(keys)[:10]} ...")


def spatial_config_from_diffusers(cfg: dict) -> SpatialVAEConfig:
  """SpatialVAEConfig from a diffusers `AutoencoderKL` config.json dict."""
  if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
    raise CheckpointError(f"_class_name={cfg['_class_name']!r}: expected a "
                          "diffusers AutoencoderKL")
  for name, want in (("down_block_types", "DownEncoderBlock2D"),
                     ("up_block_types", "UpDecoderBlock2D")):
    kinds = set(cfg.get(name, [want]))
    if kinds != {want}:
      raise CheckpointError(f"{name}={cfg[name]}: only {want} is supported")
  if cfg.get("act_fn", "silu") != "silu":
    raise CheckpointError(f"act_fn={cfg['act_fn']!r}: only silu is "
                          "supported")
  kw = {}
  for name in ("in_channels", "out_channels", "latent_channels",
               "layers_per_block", "norm_num_groups",
               "mid_block_add_attention", "use_quant_conv",
               "use_post_quant_conv"):
    if cfg.get(name) is not None:
      kw[name] = cfg[name]
  if cfg.get("block_out_channels") is not None:
    kw["block_out_channels"] = tuple(cfg["block_out_channels"])
  # `scaling_factor` (0.13025 for the SDXL VAE) is not read: OpenSora's
  # `VideoAutoencoderKL` hard-codes 0.18215 (OpenSoraVAEConfig).
  try:
    return SpatialVAEConfig(**kw)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"config.json: {e}") from e


def config_from_opensora(cfg: dict, **overrides) -> OpenSoraVAEConfig:
  """OpenSoraVAEConfig from a `VideoAutoencoderPipeline` config.json dict.

  It names its halves by registry type; only OpenSora v1.2's pair
  (`VideoAutoencoderKL` with the SD(XL) VAE, `VAE_Temporal_SD`) is known,
  so the architectures are the v1.2 ones; `micro_frame_size`, `scale` and
  `shift` come from the file.
  """
  for name, want in (("vae_2d", "VideoAutoencoderKL"),
                     ("vae_temporal", "VAE_Temporal_SD")):
    kind = (cfg.get(name) or {}).get("type", want)
    if kind != want:
      raise CheckpointError(f"{name}.type={kind!r}: only {want} (OpenSora "
                            "v1.2) is supported")
  kw = {}
  if "micro_frame_size" in cfg:
    kw["micro_frame_size"] = cfg["micro_frame_size"]
  for name in NORMALISATION_KEYS:
    if name in cfg:
      value = np.asarray(cfg[name], np.float64).reshape(-1)
      kw[name] = tuple(float(v) for v in np.broadcast_to(value, (4,)))
  kw.update(overrides)
  try:
    return OpenSoraVAEConfig(**kw)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"config.json: {e}") from e


def _normalisation_from(source, config: OpenSoraVAEConfig):
  """The config with `scale` / `shift` from the checkpoint's buffers (what
  `from_pretrained` loads), when present."""
  changes = {}
  c = config.latent_channels
  for name in NORMALISATION_KEYS:
    if name in set(source.keys()):
      value = np.asarray(source.get(name), np.float64).reshape(-1)
      if value.size not in (1, c):
        raise CheckpointError(
            f"{name}: shape {tuple(source.shape(name))}, expected {c} "
            "values (or one)")
      changes[name] = tuple(float(v) for v in np.broadcast_to(value, (c,)))
  return config.replace(**changes) if changes else config


# Loading ----------------------------------------------------------------------


def _aliases(key: str) -> list[str]:
  """Other names a checkpoint may use for `key` (deprecated attention)."""
  for new, old in DEPRECATED_ATTENTION.items():
    marker = f"mid_block.attentions.0.{new}."
    if marker in key:
      return [key.replace(marker, f"mid_block.attentions.0.{old}.")]
  return []


def check_keys(source, config: OpenSoraVAEConfig, layout: str):
  """{checkpoint key to read: our path}; raises KeyMismatch naming every
  missing, unexpected and misshapen key."""
  expected = expected_shapes(config, layout)
  paths = key_map(config, layout)
  ignored = set(NORMALISATION_KEYS) if layout == "opensora" else set()
  present = set(source.keys()) - ignored
  to_read, wanted = {}, {}
  for key, shape in expected.items():
    found = [k for k in (key, *_aliases(key)) if k in present]
    name = found[0] if found else key
    to_read[name], wanted[name] = paths[key], shape
  common.check_keys(source, wanted, layout=f"OpenSora VAE, {layout}",
                    ignored=ignored)
  return to_read


def load_params(source, config: OpenSoraVAEConfig, layout: str) -> dict:
  """Nested dict {path part: numpy array} in our layout, one tensor at a
  time, cast to `config.param_dtype` (bfloat16 through ml_dtypes)."""
  to_read = check_keys(source, config, layout)
  dtype = np.dtype(config.weight_dtype)
  flat = {path: np.ascontiguousarray(to_ours(path, source.get(key))
                                     .astype(dtype))
          for key, path in to_read.items()}
  return traverse_util.unflatten_dict(flat)


def _from_params(abstract, params: dict):
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


def vae_from_params(params: dict, config: OpenSoraVAEConfig) -> OpenSoraVAE:
  """An OpenSoraVAE whose parameters are the nested dict `params`."""
  return _from_params(opensora_vae.abstract_model(config), params)


def spatial_vae_from_params(params: dict,
                            config: OpenSoraVAEConfig) -> SpatialVAE:
  """A SpatialVAE (diffusers AutoencoderKL) holding `params`."""
  return _from_params(opensora_vae.abstract_spatial_vae(config), params)


def vae_from_state_dict(state_dict, config: OpenSoraVAEConfig | None = None,
                        **overrides) -> OpenSoraVAE:
  """A ready OpenSoraVAE from an OpenSora-layout state dict (numpy arrays
  or a tensor source). Without `config`: the v1.2 preset; `scale`/`shift`
  buffers in the state dict win over the config's; `overrides` (e.g.
  dtype="bfloat16", micro_frame_size=...) go into the config."""
  source = as_source(state_dict)
  layout = detect_layout(source.keys())
  if layout != "opensora":
    half, loader = (("a diffusers AutoencoderKL holds only the image VAE",
                     "load_spatial_vae") if layout == "diffusers" else
                    ("a bare VAE_Temporal holds only the temporal VAE",
                     "temporal_vae_from_state_dict"))
    raise CheckpointError(
        f"{half}; load it with {loader}, or pass the OpenSora VAE "
        "checkpoint (spatial_vae.module.*, temporal_vae.*)")
  config = (config or OpenSoraVAEConfig.opensora_v1_2()).replace(**overrides)
  config = _normalisation_from(source, config)
  return vae_from_params(load_params(source, config, layout), config)


def temporal_vae_from_state_dict(state_dict,
                                 config: OpenSoraVAEConfig | None = None,
                                 **overrides) -> opensora_vae.TemporalVAE:
  """A ready TemporalVAE from a bare `VAE_Temporal` state dict (numpy
  arrays or a tensor source; keys as `VAE_Temporal.state_dict()` names
  them). Without `config`: v1.2's `VAE_Temporal_SD` (config.temporal is
  the architecture; dtype / param_dtype / precision apply too)."""
  source = as_source(state_dict)
  layout = detect_layout(source.keys())
  if layout != "temporal":
    raise CheckpointError(
        f"{layout} layout: expected a bare VAE_Temporal state dict "
        "(encoder.conv_in.conv.weight, ...); load a pipeline checkpoint "
        "with load_vae")
  config = (config or OpenSoraVAEConfig.opensora_v1_2()).replace(**overrides)
  return _from_params(opensora_vae.abstract_temporal_vae(config),
                      load_params(source, config, layout))


# Files ------------------------------------------------------------------------


def _open(path):
  try:
    return SafetensorsFile(path)
  except SafetensorsError as e:
    raise CheckpointError(str(e)) from e


def load_vae(path, *, config: OpenSoraVAEConfig | None = None,
             **overrides) -> OpenSoraVAE:
  """A ready OpenSoraVAE from the published folder (`model.safetensors` +
  `config.json`) or a `.safetensors` file in the OpenSora layout.

  Without `config`: v1.2's architecture with config.json's
  micro_frame_size / scale / shift; the checkpoint's scale / shift buffers
  win. overrides go into the config (dtype="bfloat16", ...).
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise CheckpointError(f"{path}: no such file or folder")
  if path.is_dir():
    weights = common.weights_file(
        path, "model.safetensors",
        "the OpenSora VAE folder, e.g. hpcai-tech/OpenSora-VAE-v1.2")
    if config is None and (path / "config.json").exists():
      config = config_from_opensora(read_json(path / "config.json"))
    path = weights
  return vae_from_state_dict(_open(path), config, **overrides)


def load_spatial_vae(path, *, config: OpenSoraVAEConfig | None = None,
                     **overrides) -> SpatialVAE:
  """The image VAE alone from a diffusers AutoencoderKL folder (`vae/`
  of a pipeline, or the folder itself: config.json +
  diffusion_pytorch_model.safetensors). overrides: dtype, param_dtype,
  precision, micro_batch_size."""
  path = pathlib.Path(path)
  folder = path / "vae" if (path / "vae" / "config.json").exists() else path
  weights = common.weights_file(folder, "diffusion_pytorch_model.safetensors",
                                "a diffusers AutoencoderKL folder")
  if config is None:
    spatial = (spatial_config_from_diffusers(read_json(folder /
                                                        "config.json"))
               if (folder / "config.json").exists() else SpatialVAEConfig())
    t = TemporalVAEConfig(in_out_channels=spatial.latent_channels)
    config = OpenSoraVAEConfig(spatial=spatial, temporal=t)
  config = config.replace(**overrides)
  source = _open(weights)
  layout = detect_layout(source.keys())
  if layout != "diffusers":
    raise CheckpointError(f"{weights}: {layout} layout; expected a diffusers "
                          "AutoencoderKL")
  return spatial_vae_from_params(load_params(source, config, layout), config)
