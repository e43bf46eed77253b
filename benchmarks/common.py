"""What every benchmark records: device, versions, commit, date; JSON out."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time

import jax

import kinds

from astraea_jax.provenance import environment  # noqa: F401 (re-exported)

RESULTS = pathlib.Path(__file__).parent / "results"


def write_results(path, benchmark: str, settings: dict, rows: list,
                  targets: list):
  """Writes the DESIGN.md results format atomically, every row and target
  labelled measured/composed/projected by benchmarks/kinds.py."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  doc = {"benchmark": benchmark, **environment(), "settings": settings,
         "rows": rows, "targets": targets}
  kinds.label(doc)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "w") as f:
    json.dump(doc, f, indent=2)
  os.replace(tmp, path)
  print(f"wrote {path}")


def time_call(fn, *args, repeats=3, warmup=1):
  """Median wall seconds of fn(*args) with its outputs ready."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def peak_memory_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")
