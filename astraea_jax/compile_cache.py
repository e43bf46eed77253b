"""The persistent XLA compilation cache the commands turn on by default.

A second `astraea generate` (or demo, eval, search) of the same model and
video size loads its compiled steps from disk instead of compiling them
again: about 4 s for a dense Wan2.1-1.3B step and 8 s for each token count
of an Astraea schedule at 480p (issue #25), which a single cold video pays
in full. The folder is $ASTRAEA_COMPILE_CACHE if set ("off" turns the cache
off), else $XDG_CACHE_HOME/astraea-jax/xla (~/.cache/astraea-jax/xla). Its
entries are jax's own (keyed by the program, the jax version and the
device), safe to delete at any time.
"""

from __future__ import annotations

import os
import pathlib
import sys

import jax

ENV = "ASTRAEA_COMPILE_CACHE"
OFF = ("", "0", "off", "none", "false")


def cache_dir() -> pathlib.Path | None:
  """Where the cache lives; None when turned off by $ASTRAEA_COMPILE_CACHE."""
  value = os.environ.get(ENV)
  if value is not None:
    if value.strip().lower() in OFF:
      return None
    return pathlib.Path(value).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "astraea-jax" / "xla"


def enable(path: pathlib.Path | None = None) -> pathlib.Path | None:
  """Points jax's persistent compilation cache at `path` (default:
  `cache_dir()`); returns the folder, or None when off or not writable
  (a warning, never an error: the cache only saves time)."""
  path = cache_dir() if path is None else pathlib.Path(path)
  if path is None:
    return None
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    print(f"astraea: compilation cache off ({path}: {e.strerror}); set "
          f"{ENV} to a writable folder", file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", str(path))
  # Every step program is worth keeping; the tiny ones cost nothing.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path
