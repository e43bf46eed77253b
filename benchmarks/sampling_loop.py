"""Per-step cost of the sampling loop drivers: Python loop vs lax.scan.

  PYTHONPATH=. python benchmarks/sampling_loop.py            # H200, 1.3B 480p
  PYTHONPATH=. python benchmarks/sampling_loop.py --small    # CPU smoke run

Full mode: Wan2.1-T2V-1.3B config in bfloat16 with random weights, 480p x 81
frames (latent 16 x 21 x 60 x 104, 32,760 tokens), CFG batch 2, UniPC.
Each driver of `astraea_jax.sampling.denoise` runs `--steps` steps:
  * "python": the jitted step in a Python loop, asynchronous dispatch;
  * "python_progress": the same with the tqdm bar, which waits for every
    step (the default of `sample`);
  * "scan": the whole loop compiled as `jax.lax.scan`.
Two models: the WanDiT, and a null model (velocity = a cheap function of
the input) that isolates the loop's own overhead per step, which the
model's run-to-run noise would hide. Times are medians of `--repeats`
timed runs after one warm-up (compile) run.

Writes benchmarks/results/sampling_loop_h200.json (DESIGN.md format) only
after every measurement succeeded; `--small` writes to a temporary folder
(or `--out`), never into benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

import common
from astraea_jax import sampling, testing
from astraea_jax.configs import WanConfig

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "sampling_loop_h200.json"
METHODS = ("python", "python_progress", "scan")


def _null_velocity(carry, latents_2b, timesteps_2b):
  """A model stand-in costing one elementwise op: loop overhead only."""
  return latents_2b * (timesteps_2b[:, None, None, None, None] * 1e-3), carry


def time_denoise(model_fn, noise, scheduler, method, repeats):
  """(first-call seconds, [per-run seconds]) of `denoise` with `method`."""
  loop = "scan" if method == "scan" else "python"
  progress = method == "python_progress"

  def run():
    start = time.perf_counter()
    latents, _, _ = sampling.denoise(
        model_fn, noise, scheduler=scheduler, guidance_scale=5.0, loop=loop,
        progress=progress)
    latents.block_until_ready()
    return time.perf_counter() - start

  first = run()  # compiles
  return first, [run() for _ in range(repeats)]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="tiny config and latent (CPU smoke run)")
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--latent", type=int, nargs=3, metavar=("F", "H", "W"),
                      help="latent frames/height/width (default 21 60 104)")
  parser.add_argument("--out", type=pathlib.Path)
  args = parser.parse_args(argv)

  if args.small:
    config = WanConfig.tiny(num_layers=2)
    latent = tuple(args.latent or (3, 8, 12))
    text_len = config.text_len
    out = args.out or pathlib.Path(tempfile.mkdtemp()) / "sampling_loop.json"
    if out.resolve().is_relative_to((REPO / "benchmarks" / "results")
                                    .resolve()):
      parser.error(f"--small must not write into benchmarks/results ({out})")
  else:
    config = WanConfig.wan21_t2v_1_3b(dtype="bfloat16",
                                      param_dtype="bfloat16")
    latent = tuple(args.latent or (21, 60, 104))
    text_len = config.text_len
    out = args.out or DEFAULT_OUT

  shape = (1, config.in_dim) + latent
  print(f"devices: {jax.devices()}; config dim={config.dim} "
        f"layers={config.num_layers} {config.dtype}; latent {shape}",
        file=sys.stderr)
  _, key_noise, key_text = jax.random.split(jax.random.key(0), 3)
  graphdef, params = testing.random_wan(config, seed=0)
  noise = sampling.draw_noise(key_noise, shape)
  context = jax.random.normal(key_text, (2, text_len, config.text_dim),
                              jnp.float32)
  scheduler = sampling.FlowUniPC.set_timesteps(args.steps, shift=3.0)
  models = {
      "wan": sampling.wan_model_fn(graphdef, params, context),
      "null": jax.tree_util.Partial(_null_velocity),
  }

  rows = []
  for model_name, model_fn in models.items():
    for method in METHODS:
      first, runs = time_denoise(model_fn, noise, scheduler, method,
                                 args.repeats)
      median = statistics.median(runs)
      rows.append({
          "shape": "x".join(map(str, shape)), "model": model_name,
          "method": method, "steps": args.steps,
          "ms": round(1e3 * median, 3),
          "ms_per_step": round(1e3 * median / args.steps, 4),
          "runs_ms": [round(1e3 * r, 3) for r in runs],
          "first_call_s": round(first, 3),
      })
      print(json.dumps(rows[-1]), file=sys.stderr)

  per_step = {(r["model"], r["method"]): r["ms_per_step"] for r in rows}
  targets = [
      # The default (Python loop) is kept only if it is as fast as scan.
      {"name": "python_vs_scan_step_time_wan",
       "value": round(per_step["wan", "python"] / per_step["wan", "scan"], 4),
       "op": "<=", "target": 1.01},
      {"name": "python_progress_vs_scan_step_time_wan",
       "value": round(per_step["wan", "python_progress"]
                      / per_step["wan", "scan"], 4),
       "op": "<=", "target": 1.01},
      # Loop overhead per step (ms), null model: Python loop minus scan.
      {"name": "python_loop_overhead_ms_per_step",
       "value": round(per_step["null", "python"] - per_step["null", "scan"],
                      4),
       "op": "<=", "target": 1.0},
  ]
  settings = {
      "config": "wan-tiny" if args.small else "wan2.1-t2v-1.3b",
      "dim": config.dim, "num_layers": config.num_layers,
      "dtype": config.dtype, "param_dtype": config.param_dtype,
      "latent_shape": list(shape), "cfg_batch": 2,
      "text_len": text_len, "scheduler": "unipc", "shift": 3.0,
      "steps": args.steps, "repeats": args.repeats,
      "weights": "random", "small": args.small,
      "platform": jax.default_backend(), "host_cpus": os.cpu_count(),
  }
  common.write_results(out, "sampling_loop", settings, rows, targets)
  for t in targets:
    print(f"{t['name']}: {t['value']} ({t['op']} {t['target']})")


if __name__ == "__main__":
  main()
