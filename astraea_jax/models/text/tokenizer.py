"""umT5 tokenizer for Wan prompts, from a checkpoint's tokenizer files.

Reads `tokenizer.json` with the `tokenizers` library (the file the
Hugging Face fast tokenizers write), or, when a folder has only the
SentencePiece model `spiece.model`, reads that with `sentencepiece`.
Prompts are cleaned first exactly as Wan does (`prompt_clean` in diffusers'
`pipelines/wan/pipeline_wan.py`, `basic_clean` + `whitespace_clean` in the
original `wan/modules/tokenizers.py`), then tokenized like
`tokenizer(prompts, padding="max_length", max_length=512, truncation=True,
add_special_tokens=True)`: ids end with `</s>`, are cut to max_length
(keeping the `</s>`) and padded with `<pad>`.
"""

from __future__ import annotations

import html
import json
import pathlib
import re

import numpy as np

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "spiece.model"
# Where published checkpoints keep the tokenizer, relative to the model
# folder: diffusers layout, then the original Wan2.1 layout.
SUBFOLDERS = ("tokenizer", "google/umt5-xxl")

# `\s` of the `regex` module, which Wan and diffusers use: Python's `re`
# also counts the separators U+001C..U+001F as whitespace, `regex` does not.
_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")


def clean_prompt(text: str) -> str:
  """Wan's prompt cleaning: ftfy (if installed, as in diffusers), HTML
  unescaping twice, whitespace runs -> one space, stripped."""
  try:
    import ftfy
  except ImportError:  # diffusers skips it too when it is not installed
    ftfy = None
  if ftfy is not None:
    text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return _WHITESPACE.sub(" ", text).strip()


class TokenizerFilesError(FileNotFoundError):
  """A folder has no tokenizer files the tokenizer can read."""


def find_tokenizer_folder(path) -> pathlib.Path:
  """`path` itself, or its `tokenizer/` (diffusers) or `google/umt5-xxl/`
  (original Wan) subfolder: the first holding tokenizer.json/spiece.model."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise TokenizerFilesError(f"{path} is not a folder")
  for folder in (path, *(path / s for s in SUBFOLDERS)):
    if ((folder / TOKENIZER_JSON).is_file()
        or (folder / SENTENCEPIECE_MODEL).is_file()):
      return folder
  found = sorted(p.name for p in path.iterdir())
  raise TokenizerFilesError(
      f"{path}: no {TOKENIZER_JSON} or {SENTENCEPIECE_MODEL} in it nor in "
      f"{[s + '/' for s in SUBFOLDERS]}; found {found}")


def _read_json(path) -> dict:
  if not path.is_file():
    return {}
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise TokenizerFilesError(f"{path}: invalid JSON ({e})") from e


def _token_name(value):
  """A special token as tokenizer_config.json writes it: str or dict."""
  return value.get("content") if isinstance(value, dict) else value


class UMT5Tokenizer:
  """`tokenizer(prompts, max_length=512) -> (ids, mask)`, numpy int32.

  Build it with `UMT5Tokenizer.from_folder(path)`.
  """

  def __init__(self, backend, *, pad_id: int, eos_id: int,
               padding_side="right", truncation_side="right", source=""):
    for name, side in (("padding_side", padding_side),
                       ("truncation_side", truncation_side)):
      if side not in ("left", "right"):
        raise ValueError(f"{name}={side!r} must be 'left' or 'right'")
    self._backend = backend
    self.pad_id, self.eos_id = int(pad_id), int(eos_id)
    self.padding_side, self.truncation_side = padding_side, truncation_side
    self.source = source

  @classmethod
  def from_folder(cls, path) -> UMT5Tokenizer:
    """From tokenizer.json, else spiece.model, with the special tokens and
    sides of tokenizer_config.json / special_tokens_map.json when present."""
    folder = find_tokenizer_folder(path)
    settings = {**_read_json(folder / "special_tokens_map.json"),
                **_read_json(folder / "tokenizer_config.json")}
    pad = _token_name(settings.get("pad_token")) or "<pad>"
    eos = _token_name(settings.get("eos_token")) or "</s>"
    sides = dict(padding_side=settings.get("padding_side", "right"),
                 truncation_side=settings.get("truncation_side", "right"))
    if (folder / TOKENIZER_JSON).is_file():
      backend = _TokenizersBackend(folder / TOKENIZER_JSON)
    else:
      backend = _SentencePieceBackend(folder / SENTENCEPIECE_MODEL)
    ids = {}
    for name, token in (("pad_token", pad), ("eos_token", eos)):
      ids[name] = backend.token_to_id(token)
      if ids[name] is None:
        raise TokenizerFilesError(
            f"{backend.path}: {name} {token!r} is not in the vocabulary")
    return cls(backend, pad_id=ids["pad_token"], eos_id=ids["eos_token"],
               source=str(backend.path), **sides)

  @property
  def vocab_size(self) -> int:
    return self._backend.vocab_size()

  def token_ids(self, text: str, max_length: int) -> list[int]:
    """Ids of one cleaned prompt with `</s>`, truncated to max_length."""
    return self._backend.encode(text, max_length, self.eos_id,
                                self.truncation_side)

  def __call__(self, prompts, max_length: int = 512, *, clean=True):
    """prompts (str or list of str) -> (ids, mask), both (B, max_length)
    int32; mask is 1 on real tokens (the `</s>` included), 0 on padding."""
    if isinstance(prompts, str):
      prompts = [prompts]
    if max_length < 1:
      raise ValueError(f"{max_length=} must be >= 1")
    ids = np.full((len(prompts), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(prompts), max_length), np.int32)
    for row, prompt in enumerate(prompts):
      tokens = self.token_ids(clean_prompt(prompt) if clean else prompt,
                              max_length)
      n = len(tokens)
      cols = (slice(0, n) if self.padding_side == "right"
              else slice(max_length - n, max_length))
      ids[row, cols], mask[row, cols] = tokens, 1
    return ids, mask

  tokenize = __call__


class _TokenizersBackend:
  """tokenizer.json through the `tokenizers` library (its post-processor
  appends `</s>`; its truncation keeps room for it)."""

  def __init__(self, path):
    try:
      import tokenizers
    except ImportError as e:
      raise ImportError(
          f"reading {path} needs the `tokenizers` package: "
          "pip install tokenizers") from e
    self.path = path
    try:
      self._tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises plain Exception
      raise TokenizerFilesError(f"{path}: not a valid tokenizer.json ({e})") \
          from e
    self._tok.no_padding()

  def token_to_id(self, token):
    return self._tok.token_to_id(token)

  def vocab_size(self):
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text, max_length, eos_id, truncation_side):
    del eos_id  # the post-processor in tokenizer.json adds it
    self._tok.enable_truncation(max_length, direction=truncation_side)
    return self._tok.encode(text, add_special_tokens=True).ids


class _SentencePieceBackend:
  """spiece.model through `sentencepiece`; `</s>` appended here."""

  def __init__(self, path):
    try:
      import sentencepiece
    except ImportError as e:
      raise ImportError(
          f"{path.parent} has only {path.name}; reading it needs the "
          "`sentencepiece` package (pip install sentencepiece), or add the "
          f"checkpoint's {TOKENIZER_JSON}") from e
    self.path = path
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
      raise TokenizerFilesError(
          f"{path}: not a valid SentencePiece model ({e})") from e

  def token_to_id(self, token):
    i = self._sp.piece_to_id(token)  # the unknown id if it is not a piece
    return i if self._sp.id_to_piece(i) == token else None

  def vocab_size(self):
    return self._sp.get_piece_size()

  def encode(self, text, max_length, eos_id, truncation_side):
    ids = self._sp.encode(text)
    keep = max_length - 1  # room for </s>
    if len(ids) > keep:
      ids = ids[:keep] if truncation_side == "right" else ids[len(ids) - keep:]
    return [*ids, eos_id]
