"""Prompt embeddings from a file: the `--text-embeddings` safetensors of
`astraea generate`, `search` and `eval` (`context` (L, D) or (1, L, D) and
optionally `negative_context`)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from converters import safetensors_io


def read_text_embeddings(path, text_dim: int):
  """(context (1, L, D), negative_context (1, L', D)) from a safetensors file
  (zeros (1, 1, D) where it holds no `negative_context`)."""
  try:
    f = safetensors_io.SafetensorsFile(path)
  except (OSError, safetensors_io.SafetensorsError) as e:
    raise ValueError(f"cannot read text embeddings {path}: {e}") from e
  if "context" not in f.entries:
    raise ValueError(f"{path}: no tensor named 'context' (found "
                     f"{f.keys()}); expected (L, {text_dim}) embeddings")
  out = []
  for name in ("context", "negative_context"):
    if name not in f.entries:
      out.append(jnp.zeros((1, 1, text_dim), jnp.float32))
      continue
    x = np.asarray(f.get(name), np.float32)
    x = x[None] if x.ndim == 2 else x
    if x.ndim != 3 or x.shape[0] != 1 or x.shape[2] != text_dim:
      raise ValueError(f"{path}: {name} has shape {f.shape(name)}; expected "
                       f"(L, {text_dim}) or (1, L, {text_dim})")
    out.append(jnp.asarray(x))
  return tuple(out)
