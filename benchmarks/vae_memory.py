"""Where the Wan VAE decode's device memory goes (issue #26).

  PYTHONPATH=. python benchmarks/vae_memory.py --probe --out DIR   # GPU
  PYTHONPATH=. python benchmarks/vae_memory.py --one chunked --size 480p

One configuration per process (JAX's peak is cumulative): the Wan2.1 VAE
with random float32 weights decodes random latents of a 480p or 720p x 81
video (16 x 21 x 60 x 104 / 90 x 160) through one decode path. The path's
programs are compiled ahead of time first, so the allocator peak during
compilation (autotuning scratch) is read apart from the peak of running
them; then the decode runs twice (the second is the steady time). Each
program's own memory analysis (arguments, outputs, temporaries) is
recorded next to the allocator's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
from flax import nnx

from astraea_jax.vae import wan_vae

SIZES = {"480p": (60, 104), "720p": (90, 160), "small": (4, 6)}
GIB = 2 ** 30


def _stats():
  s = jax.devices()[0].memory_stats() or {}
  return {"bytes_in_use_gib": s.get("bytes_in_use", 0) / GIB,
          "peak_gib": s.get("peak_bytes_in_use", 0) / GIB}


def _chunked_decode(vae, latents):
  """The path `astraea generate` decodes with: `wan_vae.decode_chunked`
  (frames streamed to the host), or on a tree from before it (the base
  run) the pipeline's chunk loop of that time."""
  if hasattr(wan_vae, "decode_chunked"):
    return wan_vae.decode_chunked(vae, latents, to_host=True)
  from astraea_jax.pipelines import wan_pipeline as wp
  graphdef, state = nnx.split(vae)
  x, first, cache = wp._decode_first(graphdef, state, latents)
  chunks = [first.block_until_ready()]
  for t in range(1, latents.shape[2]):
    frames, cache = wp._decode_next(graphdef, state, x[:, t:t + 1], cache)
    chunks.append(frames.block_until_ready())
  return wp._finish_video(chunks)


PATHS = {
    "chunked": _chunked_decode,
    "whole": lambda vae, latents: wan_vae.decode_jit(vae, latents,
                                                     clamp=True),
    "tiled256": lambda vae, latents: wan_vae.decode_tiled(vae, latents,
                                                          tile=256),
}


def run_one(path: str, size: str) -> dict:
  """Decodes twice in this process; the first run compiles (unless the
  persistent cache holds the programs), so the peak after it includes
  compilation and the one after the second run is the same peak (JAX's
  peak is cumulative): run the configuration twice with one cache folder
  to read the peak of running alone."""
  h, w = SIZES[size]
  config = (wan_vae.WanVAEConfig.tiny() if size == "small"
            else wan_vae.WanVAEConfig.wan21())
  vae = wan_vae.WanVAE(config, rngs=nnx.Rngs(0))
  latents = jax.random.normal(jax.random.key(1), (1, 16, 21, h, w))
  jax.block_until_ready((nnx.state(vae), latents))
  row = {"path": path, "size": size, "latent_shape": list(latents.shape),
         "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "compile_cache": os.environ.get("JAX_COMPILATION_CACHE_DIR", ""),
         "device": jax.devices()[0].device_kind,
         "after_load": _stats()}
  for name in ("first_run", "second_run"):
    t0 = time.perf_counter()
    video = jax.block_until_ready(PATHS[path](vae, latents))
    row[name + "_s"] = time.perf_counter() - t0
    row["after_" + name] = _stats()
  row["video_shape"] = list(video.shape)
  row["video_mean_abs"] = float(np.mean(np.abs(np.asarray(video))))
  return row


# (source tree: "." or an unpacked older commit, path, size, XLA_FLAGS,
#  compile cache: "" off, or a name shared by a cold and a warm row)
PROBE = [
    (".base937", "chunked", "480p", "", "b480"),  # cold: compiles, fills
    (".base937", "chunked", "480p", "", "b480"),  # warm: loads the programs
    (".base937", "chunked", "480p", "--xla_gpu_autotune_level=0", ""),
    (".", "chunked", "480p", "", "n480"),
    (".", "chunked", "480p", "", "n480"),
]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--one", choices=sorted(PATHS))
  parser.add_argument("--size", default="480p", choices=sorted(SIZES))
  parser.add_argument("--probe", action="store_true")
  parser.add_argument("--out", type=pathlib.Path)
  args = parser.parse_args()
  if args.one:
    print(json.dumps(run_one(args.one, args.size)))
    return
  rows = []
  cache_root = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "vae_cache"
  for tree, path, size, flags, cache in PROBE:
    env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=tree)
    if cache:
      env["JAX_COMPILATION_CACHE_DIR"] = str(cache_root / cache)
      env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    proc = subprocess.run([sys.executable, __file__, "--one", path, "--size",
                           size], env=env, capture_output=True, text=True)
    if proc.returncode:
      rows.append({"path": path, "size": size, "xla_flags": flags,
                   "compile_cache": cache, "error": proc.stderr[-3000:]})
    else:
      rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows[-1]["tree"] = tree
    print(json.dumps(rows[-1]), flush=True)
    if args.out:
      args.out.mkdir(parents=True, exist_ok=True)
      (args.out / "vae_memory_probe.json").write_text(json.dumps(rows,
                                                                 indent=1))


if __name__ == "__main__":
  main()
