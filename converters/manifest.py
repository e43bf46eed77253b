"""What every whole-model conversion writes besides the weights: the
tokenizer files (copied, then checked to load) and `manifest.json`, which
`checkpoint.read_manifest` reads back."""

from __future__ import annotations

import json
import pathlib
import shutil

from astraea_jax import checkpoint
from astraea_jax.models.text import tokenizer as tokenizer_lib
from converters.common import CheckpointError

# The tokenizer files `UMT5Tokenizer` reads; copied as they are.
TOKENIZER_FILES = (tokenizer_lib.TOKENIZER_JSON,
                   tokenizer_lib.SENTENCEPIECE_MODEL, "tokenizer_config.json",
                   "special_tokens_map.json")


def copy_tokenizer(src: pathlib.Path, dst: pathlib.Path, vocab_size: int):
  """Copies the tokenizer files and checks that they load and fit."""
  dst.mkdir()
  for name in TOKENIZER_FILES:
    if (src / name).is_file():
      shutil.copy2(src / name, dst / name)
  try:
    tokenizer = tokenizer_lib.UMT5Tokenizer.from_folder(dst)
  except (tokenizer_lib.TokenizerFilesError, ImportError) as e:
    raise CheckpointError(f"{src}: the tokenizer does not load: {e}") from e
  if tokenizer.vocab_size > vocab_size:
    raise CheckpointError(
        f"{src}: the tokenizer has {tokenizer.vocab_size} tokens but the "
        f"text encoder embeds only {vocab_size}")


def write_manifest(dst: pathlib.Path, *, manifest_format: str, source: str,
                   layout: str, text_len: int, converted_from: dict,
                   configs: dict) -> dict:
  """Writes DST/manifest.json of a converted whole-model folder; returns
  it. configs: {component: its config} (their parameter dtypes are
  recorded)."""
  manifest = {
      "format": manifest_format,
      "version": checkpoint.MANIFEST_VERSION,
      "model": checkpoint.MANIFEST_MODELS[manifest_format],
      "source": source,
      "layout": layout,
      "text_len": text_len,
      "components": {c: c for c in checkpoint.COMPONENTS},
      "converted_from": converted_from,
      "param_dtype": {name: config.param_dtype
                      for name, config in configs.items()},
  }
  (dst / checkpoint.MANIFEST_FILE).write_text(
      json.dumps(manifest, indent=2) + "\n")
  return manifest
