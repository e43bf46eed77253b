"""Checkpoint converters: published layouts -> astraea-jax parameters.

`read_checkpoint(src, format="auto")` picks the converter for a folder:
  wan        Wan2.1 transformer, original layout (config.json with `dim`)
  diffusers  Wan2.1 transformer, diffusers layout (`transformer/`)
  opensora   OpenSora v1.2 STDiT3 (config.json with `caption_channels`)
  umt5       umT5 text encoder (`text_encoder/`, transformers layout)
  t5         T5 v1.1 text encoder (transformers `T5EncoderModel` folder)
"""

from __future__ import annotations

import json
import pathlib

from converters.common import CheckpointError

FORMATS = ("wan", "diffusers", "opensora", "umt5", "t5")


def _config(folder: pathlib.Path):
  try:
    return json.loads((folder / "config.json").read_text())
  except (OSError, json.JSONDecodeError):
    return None


def detect_format(src) -> str:
  """The format of a checkpoint folder (a DiT first, for a model root)."""
  from converters import wan  # pylint: disable=g-import-not-at-top
  src = pathlib.Path(src)
  if not src.is_dir():
    raise CheckpointError(f"{src} is not a checkpoint folder")
  cfg = _config(src) or {}
  if "caption_channels" in cfg and "hidden_size" in cfg:
    return "opensora"
  text_encoder = not (src / "transformer").is_dir() and (
      src / "text_encoder").is_dir()
  if text_encoder and "model_type" not in cfg:
    cfg = _config(src / "text_encoder") or {}
  if cfg.get("model_type") == "t5":
    return "t5"
  if cfg.get("model_type") == "umt5" or text_encoder:
    return "umt5"
  return wan.detect_layout(src)[0]


def read_checkpoint(src, *, format="auto", dtype="float32", text_len=None,
                    progress=False):
  """(config, params, format) from a checkpoint folder, streaming."""
  # pylint: disable=g-import-not-at-top
  if format not in ("auto",) + FORMATS:
    raise CheckpointError(f"unknown {format=}; expected auto or one of "
                          f"{FORMATS}")
  detected = detect_format(src) if format == "auto" else format
  if detected in ("wan", "diffusers"):
    from converters import wan
    config, params = wan.read_checkpoint(src, format=format, dtype=dtype,
                                         text_len=text_len,
                                         progress=progress)
    return config, params, wan.detect_layout(src)[0]
  if text_len is not None:
    raise CheckpointError(f"--text-len applies to Wan checkpoints, not "
                          f"{detected}")
  if detected == "opensora":
    from converters import opensora
    return (*opensora.read_checkpoint(src, dtype=dtype, progress=progress),
            detected)
  from converters import umt5  # both T5 kinds; config.json says which
  return (*umt5.read_checkpoint(src, dtype=dtype, progress=progress),
          detected)
