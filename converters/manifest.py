"""What every whole-model conversion does: the parts converted one after
the other into one folder (`convert_parts`), the tokenizer files (copied,
then checked to load) and `manifest.json`, which `checkpoint.read_manifest`
reads back."""

from __future__ import annotations

import json
import pathlib
import shutil

import tqdm

from astraea_jax import checkpoint, outputs
from astraea_jax.models.text import tokenizer as tokenizer_lib
from converters.common import CheckpointError

# The tokenizer files `UMT5Tokenizer` reads; copied as they are.
TOKENIZER_FILES = (tokenizer_lib.TOKENIZER_JSON,
                   tokenizer_lib.SENTENCEPIECE_MODEL, "tokenizer_config.json",
                   "special_tokens_map.json")


def check_complete(root: pathlib.Path, what: str, missing: list, hint: str):
  """Raises CheckpointError naming each part a whole-model folder lacks
  (`missing`) and what the folder holds, if anything is missing."""
  if missing:
    found = sorted(p.name + ("/" if p.is_dir() else "")
                   for p in root.iterdir())
    raise CheckpointError(
        f"{root}: incomplete {what}:\n  " + "\n  ".join(missing)
        + f"\nfound: {found}\n({hint})")


def convert_parts(dst, parts: dict, *, check_fit, tokenizer: pathlib.Path,
                  input_bytes: int, overwrite: bool, progress: bool,
                  text_len, **manifest) -> dict:
  """Converts a whole model into DST atomically; returns the manifest.

  parts: {"transformer" | "vae" | "text_encoder" (| "transformer_2"):
  read(bar=bar) -> (config, params)}, read and saved to DST/<part> one
  at a time (one part's parameters in memory); check_fit(**configs) raises
  where the parts do not fit together; the tokenizer folder is copied;
  text_len(transformer config) and `manifest` (write_manifest's other
  arguments) go into manifest.json. One progress bar over input_bytes.
  """
  with outputs.atomic_folder(dst, overwrite=overwrite,
                             command="convert") as tmp, tqdm.tqdm(
      total=input_bytes, unit="B", unit_scale=True, unit_divisor=1024,
      desc="converting", disable=not progress) as bar:
    configs = {}
    for part, read in parts.items():
      bar.set_postfix_str(part.replace("_", " "))
      configs[part], params = read(bar=bar)
      checkpoint.save(tmp / part, configs[part], params)
      del params
    check_fit(**configs)
    copy_tokenizer(tokenizer, tmp / "tokenizer",
                   configs["text_encoder"].vocab_size)
    bar.update(bar.total - bar.n)
    return write_manifest(tmp, text_len=text_len(configs["transformer"]),
                          configs=configs, **manifest)


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
                   configs: dict, extra: dict | None = None) -> dict:
  """Writes DST/manifest.json of a converted whole-model folder; returns
  it. configs: {component: its config} (their parameter dtypes are
  recorded; a component beyond `checkpoint.COMPONENTS`, e.g. Wan2.2's
  `transformer_2`, is listed too); extra: more model facts (Wan2.2's
  `boundary_ratio`, `experts`)."""
  components = {c: c for c in dict.fromkeys([*checkpoint.COMPONENTS,
                                             *configs])}
  manifest = {
      "format": manifest_format,
      "version": checkpoint.MANIFEST_VERSION,
      "model": checkpoint.MANIFEST_MODELS[manifest_format],
      "source": source,
      "layout": layout,
      "text_len": text_len,
      "components": components,
      "converted_from": converted_from,
      "param_dtype": {name: config.param_dtype
                      for name, config in configs.items()},
      **(extra or {}),
  }
  (dst / checkpoint.MANIFEST_FILE).write_text(
      json.dumps(manifest, indent=2) + "\n")
  return manifest
