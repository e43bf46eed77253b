"""Astraea vs our dense sampler on the Wan2.1-1.3B architecture (H200).

  PYTHONPATH=. python benchmarks/astraea_wan.py            # H200, ~5 min
  PYTHONPATH=. python benchmarks/astraea_wan.py --small    # CPU smoke run

Random bf16 weights at 480p x 81 frames (latent 16x21x60x104 = 32,760
tokens), CFG batch 2, UniPC, 50 steps. A 50-step run is not timed end to
end: every distinct per-step token count K of the schedules is timed
(median of repeated steps, after its compile), and a schedule's time is
the sum of its steps' times (stated in the JSON as "extrapolated"). Also:
the selection + cache bookkeeping alone, and peak GPU memory.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import common
from astraea_jax import testing
from astraea_jax.astraea import wan_tokenwise as astraea
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.sampling import sampler as dense

MEAN_BUDGETS = (0.3, 0.4, 0.5, 0.7)


def bookkeeping_fn(num_layers, k, cfg):
  """Selection + cache updates of all layers, without the blocks."""

  @jax.jit
  def run(x, cache):
    def body(cache, i):
      scores = selection.token_scores(x, selection.layer_cache(cache, i), cfg)
      idx = selection.select_tokens(scores, k)
      x_sel = jnp.take_along_axis(x, idx[..., None], axis=1)
      lse = jnp.zeros((x.shape[0], 1, k), jnp.float32)
      _, cache = selection.write_selected(cache, i, x, idx, x_sel + 1, lse,
                                          cfg)
      return cache, None
    return jax.lax.scan(body, cache, jnp.arange(num_layers))[0]

  return run


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--small", action="store_true")
  parser.add_argument("--out", default=str(common.RESULTS /
                                           "astraea_wan_h200.json"))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--cache-dtype", default="float32",
                      choices=["float32", "bfloat16"])
  args = parser.parse_args()
  steps = 50
  config, shape, text_len = common.wan_setup(args.small)
  graphdef, params = testing.random_wan(config, seed=0)
  noise, ctx2, scheduler, n = common.wan_inputs(config, shape, text_len,
                                                steps, shift=3.0)
  gs = jnp.float32(5.0)
  rows, timings = [], {}

  # Dense: our sampler's jitted step.
  row, t_dense, peak_dense = common.time_dense_step(
      common.Stepper(scheduler, gs, noise),
      dense.wan_model_fn(graphdef, params, ctx2), n, args.repeats)
  rows.append(row)

  # Astraea: every K the schedules use.
  cfg = selection.SelectionConfig(cache_dtype=args.cache_dtype)
  schedules = {b: schedule_lib.default_schedule(b, steps)
               for b in MEAN_BUDGETS}
  budgets = sorted({float(x) for s in schedules.values() for x in s},
                   reverse=True)
  cache = selection.init_cache(config.num_layers, 2, n, config.dim, cfg)
  a = common.Stepper(scheduler, gs, noise, cache)
  astraea_fn = astraea.model_fn(graphdef, params, ctx2)

  for theta in budgets:  # 1.0 first: fills the cache
    k = schedule_lib.num_selected(theta, n)
    compile_s, timings[theta] = a.time(astraea_fn, args.repeats,
                                       plan=astraea.Plan(k, cfg))
    rows.append({"method": "astraea_step", "budget": theta, "tokens": k,
                 "ms_per_step": 1e3 * timings[theta],
                 "fraction_of_dense": timings[theta] / t_dense,
                 "compile_s": compile_s})
    print(f"budget {theta:.1f} (K={k}): {1e3 * timings[theta]:.1f} ms/step "
          f"= {timings[theta] / t_dense:.3f} of dense")
  peak_astraea = common.peak_memory_bytes()

  k04 = schedule_lib.num_selected(0.4, n)
  x_tokens = jax.random.normal(jax.random.key(3), (2, n, config.dim))
  book = bookkeeping_fn(config.num_layers, k04, cfg)
  t_book = common.time_call(book, x_tokens, a.carry, repeats=args.repeats)
  rows.append({"method": "selection_and_cache_bookkeeping", "budget": 0.4,
               "tokens": k04, "ms_per_step": 1e3 * t_book,
               "fraction_of_step": t_book / timings.get(0.4, np.nan)})

  targets = []
  for b, sched in schedules.items():
    total = float(sum(timings[float(x)] for x in sched))
    speedup = steps * t_dense / total
    rows.append({"method": "astraea_schedule", "mean_budget": b,
                 "schedule": [float(x) for x in sched],
                 "extrapolated_s": total, "dense_extrapolated_s":
                 steps * t_dense, "speedup": speedup})
    print(f"mean budget {b}: {speedup:.2f}x over dense")
    if b == 0.4:
      targets.append({"name": "speedup_budget_0.4", "value": speedup,
                      "op": ">=", "target": 2.4})
    if b == 0.7:
      targets.append({"name": "speedup_budget_0.7", "value": speedup,
                      "op": ">=", "target": 1.4})
  targets.append({"name": "bookkeeping_fraction_budget_0.4",
                  "value": t_book / timings[0.4], "op": "<=",
                  "target": 0.02})
  if peak_dense and peak_astraea:
    rows.append({"method": "peak_memory", "dense_gib": peak_dense / 2**30,
                 "astraea_gib": peak_astraea / 2**30})
    targets.append({"name": "peak_memory_ratio",
                    "value": peak_astraea / peak_dense, "op": "<=",
                    "target": 1.25})
  settings = {"model": "wan2.1-t2v-1.3b architecture, random weights",
              "dtype": config.dtype, "latent_shape": list(shape),
              "tokens": n, "cfg_batch": 2, "steps": steps,
              "scheduler": "unipc shift 3.0", "repeats": args.repeats,
              "extrapolation": "schedule time = sum of measured per-K step "
                               "times", "selection": str(cfg)}
  out = args.out if not args.small else "/tmp/astraea_wan_small.json"
  common.write_results(out, "astraea_wan", settings, rows, targets)


if __name__ == "__main__":
  main()
