"""Astraea vs our dense sampler on the OpenSora v1.2 STDiT3-XL/2 (H200).

  PYTHONPATH=. python benchmarks/astraea_opensora.py           # H200
  PYTHONPATH=. python benchmarks/astraea_opensora.py --small   # CPU smoke

Random bf16 weights. Shape: OpenSora v1.2 at 480p, 4 s: 51 frames at
480x854 -> latent 4 x 15 x 60 x 106 (temporal VAE 17 -> 5 frames, spatial
8x), patch (1, 2, 2) -> 15 frames x 30 x 53 = 1,590 tokens per frame,
23,850 tokens. Caption 300 T5 tokens, 120 of them valid. CFG batch 2,
rectified flow Euler, 30 steps with the timestep transform. As
benchmarks/astraea_wan.py: a 30-step run is not timed end to end; every
distinct per-step token count of the schedules is timed (median of
repeated steps after its compile), and a schedule's time is the sum of its
steps' times ("extrapolated" in the JSON). Also: the selection + cache
bookkeeping alone, the two layouts of the sparse temporal attention at
budget 0.4, and peak GPU memory. --small never writes into
benchmarks/results.
"""

from __future__ import annotations

import argparse

import common
import jax
import jax.numpy as jnp
from flax import nnx

from astraea_jax import testing
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.astraea import stdit3_tokenwise as astraea
from astraea_jax.configs import STDiT3Config
from astraea_jax.models import stdit3
from astraea_jax.sampling import opensora
from astraea_jax.sampling import sampler as dense

MEAN_BUDGETS = (0.4, 0.5, 0.7)
STEPS = 30


def bookkeeping_fn(depth, grid, k_f, cfg):
  """Per-frame selection + cache updates of all 2 * depth blocks, without
  the blocks themselves."""

  @jax.jit
  def run(x, cache):
    def one(layer_cache):
      scores = selection.token_scores(x, layer_cache, cfg)
      _, idx = astraea.select_per_frame(scores, grid, k_f)
      x_sel = jnp.take_along_axis(x, idx[..., None], axis=1)
      lse = jnp.zeros((x.shape[0], 1, idx.shape[1]), jnp.float32)
      return selection.update_layer_cache(layer_cache, x, x_sel + 1, lse,
                                          idx, cfg)[1]

    def body(cache, i):
      for kind in astraea.BLOCK_KINDS:
        c = jax.tree.map(lambda a: a[i], cache[kind])
        new = one(c)
        cache = {**cache, kind: jax.tree.map(
            lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u, i, 0),
            cache[kind], new)}
      return cache, None
    return jax.lax.scan(body, cache, jnp.arange(depth))[0]

  return run


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--small", action="store_true",
                      help="tiny model on CPU; writes to /tmp only")
  parser.add_argument("--out", default=str(common.RESULTS /
                                           "astraea_opensora_h200.json"))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--compare-temporal-layouts",
                      action=argparse.BooleanOptionalAction, default=True,
                      help="also time the gather_keys temporal layout at "
                           "budget 0.4 (one more compile)")
  args = parser.parse_args()
  if args.small:
    config = STDiT3Config.tiny()
    shape, caption_len, valid = (1, 4, 3, 8, 12), 8, 5
    video = {"height": 64, "width": 96, "num_frames": 17}
    out_path = "/tmp/astraea_opensora_small.json"
  else:
    config = STDiT3Config.opensora_v1_2(dtype="bfloat16",
                                        param_dtype="bfloat16")
    shape, caption_len, valid = (1, 4, 15, 60, 106), 300, 120
    video = {"height": 480, "width": 854, "num_frames": 51}
    out_path = args.out
  graphdef, abstract = nnx.split(stdit3.abstract_model(config))
  params = testing.random_params(abstract, jax.random.key(0))
  module = nnx.merge(graphdef, params)
  noise = dense.draw_noise(jax.random.key(1), shape)
  y = jax.random.normal(jax.random.key(2),
                        (1, 1, caption_len, config.caption_channels))
  y_mask = (jnp.arange(caption_len) < valid).astype(jnp.int32)[None]
  conditions = opensora.cfg_conditions(module, y, y_mask, fps=24,
                                      height=video["height"],
                                      width=video["width"])
  scheduler = opensora.opensora_scheduler(STEPS, **video)
  gs = jnp.float32(7.0)
  frames, per_frame = astraea.token_grid(config, shape)
  n = frames * per_frame
  rows, targets, timings = [], [], {}
  cfg = selection.SelectionConfig()
  settings = {"model": ("tiny STDiT3 (fixture config)" if args.small else
                        "opensora-v1.2 STDiT3-XL/2 architecture")
                       + ", random weights", "dtype": config.dtype,
              "latent_shape": list(shape), "video": video,
              "tokens": n, "frames": frames, "tokens_per_frame": per_frame,
              "caption_tokens": caption_len, "valid_caption_tokens": valid,
              "cfg_batch": 2, "steps": STEPS,
              "scheduler": "rectified flow Euler, OpenSora timestep "
                           "transform", "guidance_scale": 7.0,
              "repeats": args.repeats,
              "selection": "balanced per-frame top-K, K_f = round(theta "
                           "S); " + str(cfg),
              "extrapolation": "schedule time = sum of measured per-K step "
                               "times"}

  def save():
    common.write_results(out_path, "astraea_opensora", settings, rows,
                         targets)

  # Dense: our sampler's jitted step.
  row, t_dense, peak_dense = common.time_dense_step(
      common.Stepper(scheduler, gs, noise),
      opensora.opensora_model_fn(graphdef, params, conditions), n,
      args.repeats)
  rows.append(row)

  # Astraea: every K_f the schedules use.
  schedules = {b: schedule_lib.default_schedule(b, STEPS)
               for b in MEAN_BUDGETS}
  budgets = sorted({float(x) for s in schedules.values() for x in s},
                   reverse=True)
  a = common.Stepper(scheduler, gs, noise,
                     astraea.init_cache(config, 2, n, cfg))
  astraea_fn = astraea.model_fn(graphdef, params, conditions)

  def time_budget(theta, layout):
    k_f = schedule_lib.num_selected(theta, per_frame)
    compile_s, seconds = a.time(astraea_fn, args.repeats,
                                plan=astraea.Plan(k_f, cfg, layout))
    print(f"budget {theta:.1f} (K_f={k_f}/{per_frame}, {layout}): "
          f"{1e3 * seconds:.1f} ms/step = {seconds / t_dense:.3f} of dense")
    return k_f, seconds, compile_s

  for theta in budgets:  # 1.0 first: fills the cache
    k_f, timings[theta], compile_s = time_budget(theta, "scatter_queries")
    rows.append({"method": "astraea_step", "budget": theta,
                 "tokens_per_frame": k_f, "tokens": frames * k_f,
                 "temporal_sparse": "scatter_queries",
                 "ms_per_step": 1e3 * timings[theta],
                 "fraction_of_dense": timings[theta] / t_dense,
                 "compile_s": compile_s})
    save()
  peak_astraea = common.peak_memory_bytes()

  for b, sched in schedules.items():
    total = float(sum(timings[float(x)] for x in sched))
    speedup = STEPS * t_dense / total
    rows.append({"method": "astraea_schedule", "mean_budget": b,
                 "schedule": [float(x) for x in sched],
                 "extrapolated_s": total,
                 "dense_extrapolated_s": STEPS * t_dense,
                 "speedup": speedup})
    print(f"mean budget {b}: {speedup:.2f}x over dense")
    if b == 0.4:
      targets.append({"name": "speedup_budget_0.4", "value": speedup,
                      "op": ">=", "target": 2.4})
  if peak_dense and peak_astraea:
    rows.append({"method": "peak_memory", "dense_gib": peak_dense / 2**30,
                 "astraea_gib": peak_astraea / 2**30})
  save()

  k04 = schedule_lib.num_selected(0.4, per_frame)
  x_tokens = jax.random.normal(jax.random.key(3), (2, n, config.hidden_size))
  book = bookkeeping_fn(config.depth, (frames, per_frame), k04, cfg)
  t_book = common.time_call(book, x_tokens, a.carry, repeats=args.repeats)
  rows.append({"method": "selection_and_cache_bookkeeping", "budget": 0.4,
               "tokens_per_frame": k04, "ms_per_step": 1e3 * t_book,
               "fraction_of_step": t_book / timings[0.4]})
  targets.append({"name": "bookkeeping_fraction_budget_0.4",
                  "value": t_book / timings[0.4], "op": "<=",
                  "target": 0.02})
  save()

  if args.compare_temporal_layouts:
    k_f, seconds, compile_s = time_budget(0.4, "gather_keys")
    rows.append({"method": "astraea_step", "budget": 0.4,
                 "tokens_per_frame": k_f, "tokens": frames * k_f,
                 "temporal_sparse": "gather_keys",
                 "ms_per_step": 1e3 * seconds,
                 "fraction_of_dense": seconds / t_dense,
                 "vs_scatter_queries": seconds / timings[0.4],
                 "compile_s": compile_s})
    save()


if __name__ == "__main__":
  main()
