"""A whole OpenSora v1.2 download -> one converted model folder.

  astraea convert opensora-v1.2/ opensora/    # the layout below
  astraea generate --model opensora/ --prompt "a red panda eating bamboo" \
      --size 848x480 --frames 51 --budget 0.4 --out panda.mp4

OpenSora v1.2 publishes its parts as three Hugging Face repos; put each in a
subfolder of SRC (either name works):

  SRC/OpenSora-STDiT-v3/  or transformer/   hpcai-tech/OpenSora-STDiT-v3:
      config.json (`hidden_size`, `depth`, `caption_channels`, ...) +
      model.safetensors (or model.safetensors.index.json + shards)
  SRC/OpenSora-VAE-v1.2/  or vae/           hpcai-tech/OpenSora-VAE-v1.2:
      config.json (VideoAutoencoderPipeline) + model.safetensors
  SRC/t5-v1_1-xxl/        or text_encoder/  DeepFloyd/t5-v1_1-xxl:
      config.json (model_type t5) + model*.safetensors, and the tokenizer
      files (tokenizer.json or spiece.model, tokenizer_config.json,
      special_tokens_map.json), here or in SRC/tokenizer/

  e.g. huggingface-cli download hpcai-tech/OpenSora-STDiT-v3 \
           --local-dir SRC/OpenSora-STDiT-v3   (and the same for the others)

The VAE's config.json names its halves by type only (`vae_2d`:
VideoAutoencoderKL, `vae_temporal`: VAE_Temporal_SD), so the architecture is
v1.2's; `micro_frame_size`, `scale`, `shift` and `vae_2d.micro_batch_size`
are read from it. As in OpenSora's registry, where `VAE_Temporal_SD(**kw)`
forwards its keyword arguments to `VAE_Temporal`, `TemporalVAEConfig`
fields in `vae_temporal` and diffusers `AutoencoderKL` config fields in
`vae_2d` override the architecture (the published file has none; small
test models use them).

The output, written atomically (nothing appears at DST unless all of it
converted): manifest.json (format astraea-jax/opensora-v1.2), transformer/
(STDiT3), vae/ (OpenSoraVAE, float32), text_encoder/ (T5 v1.1) and
tokenizer/ (the tokenizer files as published), each a converted checkpoint
(config.json + orbax params/) that `astraea_jax.load_model` reads.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from astraea_jax import checkpoint
from astraea_jax.models.text import tokenizer as tokenizer_lib
from astraea_jax.vae.opensora_vae import SpatialVAEConfig, TemporalVAEConfig
from converters import manifest as manifest_lib
from converters import opensora as stdit3_converter
from converters import opensora_vae as vae_converter
from converters import umt5 as t5_converter
from converters.common import (CheckpointError, MeteredSource,
                               open_safetensors_folder, read_json)

# Subfolder names of each part: the published repo's name, then ours.
PART_FOLDERS = {
    "transformer": ("OpenSora-STDiT-v3", "transformer"),
    "vae": ("OpenSora-VAE-v1.2", "vae"),
    "text_encoder": ("t5-v1_1-xxl", "text_encoder"),
}
WEIGHTS_STEM = "model"
# diffusers AutoencoderKL config fields that `vae_2d` may override.
SPATIAL_FIELDS = tuple(f.name for f in dataclasses.fields(SpatialVAEConfig))
TEMPORAL_FIELDS = tuple(f.name for f in dataclasses.fields(TemporalVAEConfig))


@dataclasses.dataclass(frozen=True)
class OpenSoraFolder:
  """Where each part of a whole OpenSora v1.2 download lives."""
  root: pathlib.Path
  transformer: pathlib.Path
  vae: pathlib.Path
  text_encoder: pathlib.Path
  tokenizer: pathlib.Path
  layout: str = "opensora"


def _json_or_empty(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError):
    return {}


def is_stdit3_folder(folder: pathlib.Path) -> bool:
  cfg = _json_or_empty(folder / "config.json")
  return "caption_channels" in cfg and "hidden_size" in cfg


def _has_tokenizer(folder: pathlib.Path) -> bool:
  return any((folder / n).is_file() for n in (
      tokenizer_lib.TOKENIZER_JSON, tokenizer_lib.SENTENCEPIECE_MODEL))


def _first_dir(root: pathlib.Path, names) -> pathlib.Path | None:
  for name in names:
    if (root / name).is_dir():
      return root / name
  return None


def find_opensora_folder(src) -> OpenSoraFolder | None:
  """The parts of a whole OpenSora v1.2 folder; None if SRC is not one.

  SRC is one when a transformer subfolder holds an STDiT3 config.json, or
  when a published OpenSora repo name is among its subfolders. Raises
  CheckpointError naming every missing part of an incomplete one.
  """
  root = pathlib.Path(src)
  if not root.is_dir():
    return None
  transformer = _first_dir(root, PART_FOLDERS["transformer"])
  named = any((root / names[0]).is_dir() for names in PART_FOLDERS.values())
  if not named and not (transformer and is_stdit3_folder(transformer)):
    return None
  parts = {k: _first_dir(root, names) for k, names in PART_FOLDERS.items()}
  missing = []
  te = parts["text_encoder"]
  if parts["transformer"] is None or not is_stdit3_folder(
      parts["transformer"]):
    missing.append("no transformer: expected OpenSora-STDiT-v3/ (or "
                   "transformer/) with an STDiT3 config.json (hidden_size, "
                   "caption_channels, ...) + model.safetensors "
                   "(hpcai-tech/OpenSora-STDiT-v3)")
  if parts["vae"] is None or not (parts["vae"] / "model.safetensors"
                                  ).is_file():
    missing.append("no VAE: expected OpenSora-VAE-v1.2/ (or vae/) with "
                   "config.json + model.safetensors "
                   "(hpcai-tech/OpenSora-VAE-v1.2)")
  if te is None or not (te / "config.json").is_file():
    missing.append("no text encoder: expected t5-v1_1-xxl/ (or "
                   "text_encoder/) with config.json + model*.safetensors "
                   "(DeepFloyd/t5-v1_1-xxl)")
  tokenizer = next((f for f in (root / "tokenizer", te)
                    if f is not None and f.is_dir() and _has_tokenizer(f)),
                   None)
  if tokenizer is None:
    missing.append(f"no tokenizer: expected {tokenizer_lib.TOKENIZER_JSON} "
                   f"or {tokenizer_lib.SENTENCEPIECE_MODEL} in the text "
                   "encoder's folder or in tokenizer/")
  manifest_lib.check_complete(
      root, "OpenSora v1.2 model folder", missing,
      "to convert the STDiT3 alone, pass its folder with --format opensora")
  return OpenSoraFolder(root, parts["transformer"], parts["vae"], te,
                        tokenizer)


# Components -------------------------------------------------------------------


def vae_config(cfg: dict, source) -> vae_converter.OpenSoraVAEConfig:
  """The VAE's config: v1.2's architecture (config.json's fields and
  overrides, module doc), then the checkpoint's scale/shift buffers."""
  spatial_doc = cfg.get("vae_2d") or {}
  temporal_doc = cfg.get("vae_temporal") or {}
  overrides = {}
  spatial = {k: spatial_doc[k] for k in SPATIAL_FIELDS if k in spatial_doc}
  temporal = {k: temporal_doc[k] for k in TEMPORAL_FIELDS
              if k in temporal_doc}
  try:
    if spatial:
      overrides["spatial"] = SpatialVAEConfig(**spatial)
    if temporal:
      overrides["temporal"] = TemporalVAEConfig(**temporal)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"VAE config.json: {e}") from e
  if spatial_doc.get("micro_batch_size") is not None:
    overrides["micro_batch_size"] = spatial_doc["micro_batch_size"]
  config = vae_converter.config_from_opensora(cfg, **overrides)
  # pylint: disable-next=protected-access
  return vae_converter._normalisation_from(source, config)


def _input_bytes(folder: OpenSoraFolder) -> int:
  files = [f for part in (folder.transformer, folder.vae,
                          folder.text_encoder)
           for f in part.glob("*.safetensors")]
  return sum(f.stat().st_size for f in files)


def read_transformer(folder: OpenSoraFolder, *, dtype, bar):
  config = stdit3_converter.config_from_checkpoint(
      read_json(folder.transformer / "config.json"), param_dtype=dtype,
      dtype=dtype)
  source = open_safetensors_folder(folder.transformer, WEIGHTS_STEM)
  metered = MeteredSource(source, bar)
  return config, stdit3_converter.load_params(metered, config)


def read_vae(folder: OpenSoraFolder, *, bar):
  cfg_file = folder.vae / "config.json"
  cfg = read_json(cfg_file) if cfg_file.is_file() else {}
  source = open_safetensors_folder(folder.vae, WEIGHTS_STEM)
  layout = vae_converter.detect_layout(source.keys())
  if layout != "opensora":
    raise CheckpointError(
        f"{folder.vae}: a {layout} AutoencoderKL holds only the image VAE; "
        "expected the OpenSora VAE (spatial_vae.module.*, temporal_vae.*) "
        "of hpcai-tech/OpenSora-VAE-v1.2")
  config = vae_config(cfg, source)
  return config, vae_converter.load_params(MeteredSource(source, bar), config,
                                           layout)


def read_text_encoder(folder: OpenSoraFolder, *, dtype, bar):
  cfg = read_json(folder.text_encoder / "config.json")
  config = t5_converter.config_from_checkpoint(cfg, dtype=dtype,
                                               param_dtype=dtype)
  if not config.shared_position_bias:
    raise CheckpointError(
        f"{folder.text_encoder}: model_type={cfg.get('model_type')!r}; "
        "OpenSora v1.2 encodes prompts with T5 v1.1 (model_type 't5', "
        "DeepFloyd/t5-v1_1-xxl)")
  source = open_safetensors_folder(folder.text_encoder, WEIGHTS_STEM)
  return config, t5_converter.load_params(MeteredSource(source, bar), config,
                                          "diffusers")


def check_fit(transformer, vae, text_encoder):
  """The parts must fit together; raises CheckpointError with the sizes."""
  if text_encoder.d_model != transformer.caption_channels:
    raise CheckpointError(
        f"the text encoder's width d_model={text_encoder.d_model} != the "
        f"STDiT3's caption_channels={transformer.caption_channels}")
  if vae.latent_channels != transformer.in_channels:
    raise CheckpointError(
        f"the VAE's latent channels {vae.latent_channels} != the STDiT3's "
        f"in_channels={transformer.in_channels}")


def convert(folder: OpenSoraFolder, dst, *, dtype: str = "float32",
            overwrite: bool = False, progress: bool = True,
            source_name: str | None = None) -> dict:
  """Converts every part into DST (atomically); returns the manifest.

  dtype: parameter dtype of the STDiT3 and the text encoder (the VAE stays
  float32).
  """
  rel = lambda p: str(p.relative_to(folder.root)) + "/"
  return manifest_lib.convert_parts(
      dst, {"transformer": lambda bar: read_transformer(folder, dtype=dtype,
                                                        bar=bar),
            "vae": lambda bar: read_vae(folder, bar=bar),
            "text_encoder": lambda bar: read_text_encoder(
                folder, dtype=dtype, bar=bar)},
      check_fit=check_fit, tokenizer=folder.tokenizer,
      input_bytes=_input_bytes(folder), overwrite=overwrite,
      progress=progress, text_len=lambda config: config.model_max_length,
      manifest_format=checkpoint.OPENSORA_MANIFEST_FORMAT,
      source=source_name or str(folder.root), layout=folder.layout,
      converted_from={
          "transformer": rel(folder.transformer), "vae": rel(folder.vae),
          "text_encoder": rel(folder.text_encoder),
          "tokenizer": rel(folder.tokenizer)})
