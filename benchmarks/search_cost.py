"""Cost of the budget search for the paper's settings on Wan2.1-1.3B (H200).

  PYTHONPATH=. python benchmarks/search_cost.py            # H200, ~5 min
  PYTHONPATH=. python benchmarks/search_cost.py --small    # CPU smoke run

The paper's search: 50 steps, population 50, 30 children x 30 generations,
fitness over 4 samples, at 480p x 81 frames (latent 16x21x60x104, 32,760
tokens). Its cost is the sum, over the steps the search computes, of the
time of that step, so two measurements:

1. Counts: what is computed. The real search (`astraea_jax.astraea.search`:
   fitness computed for real, prefix tree, memo, fitness cache) runs with
   the paper's settings on a tiny RANDOM Wan (latent 16x2x8x8, 32 tokens),
   in a CPU subprocess next to the GPU timing: the genetic dynamics need a
   real fitness, and a tiny model is the one we can run 950 candidates x 50
   steps x 4 samples with. Its calls are recorded and replayed through the
   same planner without the model (`search.TreeCounter`) under the plans
   below. Counts are row-steps: one candidate, one sample, one CFG
   denoising step (a model call of batch 2). Caveat: the tiny model's
   fitness landscape stands in for Wan's; the counts depend on it through
   how fast the population converges.
2. Time per row-step on the Wan2.1-1.3B architecture (random bf16 weights,
   the default selection config: float32 cache), through the search's own
   step (`TreeFitness.step_nodes`, one row per call): the masked simulation
   (any budget costs a full step) and the sparse evaluator at budgets 0,
   0.4 and 1.0 (linear through 0.4 and 1.0 for the other budgets: every
   term of a sparse block is linear in K).

Plans: no_prefix_sharing (every distinct genome from scratch);
tree_unbounded_memory (prefix tree + memo of every survivor prefix: what
small models get); tree_one_h200 (one sample per pass, one genome at a
time, a memo of the states that fit next to the measured peak of a step,
split over the samples' passes: what one H200 holds at full scale).
GPU-hours = sum over budgets of row-steps x seconds per row-step / 3600.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import common  # isort: skip  (benchmarks/common.py)
from astraea_jax import testing
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import search
from astraea_jax.configs import WanConfig
from astraea_jax.sampling import sampler as dense

PAPER = search.SearchConfig(target_budget=0.4, steps=50, population=50,
                            children=30, generations=30, seed=0)
SMALL = dataclasses.replace(PAPER, steps=10, population=10, children=6,
                            generations=4)
SAMPLES = 4
TIMED_GENES = (0, 4, 10)


# 1. Counts (run in a CPU subprocess) -----------------------------------------


def count_run(config: search.SearchConfig, samples: int, out: pathlib.Path):
  """The real search on a tiny random Wan; writes its calls and summary."""
  model = WanConfig.tiny(num_layers=2, dim=32, ffn_dim=64, num_heads=2,
                         text_dim=16, text_len=8, freq_dim=16)
  graphdef, params = testing.random_wan(model, seed=0)
  noise = jnp.stack([dense.draw_noise(jax.random.key(i), (16, 2, 8, 8))
                     for i in range(samples)])
  ctx = jax.random.normal(jax.random.key(100), (samples, 6, model.text_dim))
  neg = jnp.zeros((1, 1, model.text_dim))
  fitness = search.TreeFitness(
      graphdef, params, noise, ctx, neg, steps=config.steps,
      config=search.EvalConfig(batch_nodes=8, memo_nodes=1 << 30))
  recording = search.RecordingFitness(fitness)
  t0 = time.perf_counter()
  result = search.search(recording, config, progress=False)
  seconds = time.perf_counter() - t0
  summary = {"seconds": seconds, "device": jax.devices()[0].platform,
             "genomes_requested": result.genomes_requested,
             "genomes_distinct": result.genomes_evaluated,
             "best_fitness": result.fitness,
             "history": result.history,
             "run_counts": dict(fitness.counts),
             "searched_vs_uniform": uniform_vs_searched(fitness, result)}
  np.savez(out / "events.npz", **{f"{i}_{kind}": genomes for i, (
      kind, genomes) in enumerate(recording.events)})
  (out / "summary.json").write_text(json.dumps(summary))


def uniform_vs_searched(fitness, result):
  """The searched schedule vs the default (warm-up + even) schedule of the
  same mean budget: MSE and PSNR of the final latents vs the full model."""
  mean = float(np.mean(result.schedule))
  uniform = search.from_schedule(
      schedule_lib.default_schedule(mean, len(result.schedule)))
  mse_uniform = float(fitness(uniform[None])[0])
  ref = fitness.reference       # PSNR over the latents' range, as generate
  data_range = float(jnp.max(ref) - jnp.min(ref))

  def psnr(mse):
    return float(10 * np.log10(data_range ** 2 / mse))

  return {"mean_budget": mean, "searched_mse": result.fitness,
          "uniform_mse": mse_uniform,
          "searched_psnr_db": psnr(result.fitness),
          "uniform_psnr_db": psnr(mse_uniform),
          "uniform_schedule": search.to_schedule(uniform).tolist(),
          "searched_schedule": result.schedule.tolist()}


def start_counts(small: bool, folder: pathlib.Path):
  """The count run as a CPU subprocess (the GPU stays free for timing)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
  args = [sys.executable, __file__, "--counts-to", str(folder)]
  return subprocess.Popen(args + (["--small"] if small else []), env=env)


def load_counts(folder: pathlib.Path):
  summary = json.loads((folder / "summary.json").read_text())
  with np.load(folder / "events.npz") as f:
    keys = sorted(f.files, key=lambda k: int(k.split("_")[0]))
    events = [(k.split("_", 1)[1], f[k]) for k in keys]
  return summary, events


def replay(events, config, samples, eval_config):
  counter = search.TreeCounter(steps=config.steps, num_samples=samples,
                               config=eval_config)
  counter.replay(events)
  return counter


# 2. Time per row-step ---------------------------------------------------------


def time_steps(model_config, shape, text_len, steps, repeats):
  """Seconds per row-step (masked; sparse by gene) and memory, full scale."""
  graphdef, params = testing.random_wan(model_config, seed=0)
  noise = dense.draw_noise(jax.random.key(0), shape)
  ctx = jax.random.normal(jax.random.key(1), (1, text_len,
                                              model_config.text_dim))
  neg = jnp.zeros((1, 1, model_config.text_dim))
  out = {"sparse_s": {}, "compile_s": {}}
  for evaluator in ("masked", "sparse"):
    f = search.TreeFitness(graphdef, params, noise, ctx, neg, steps=steps,
                           config=search.EvalConfig(
                               evaluator=evaluator, batch_nodes=1,
                               samples_per_pass=1))
    out["node_state_bytes"] = f.node_state_bytes
    out["tokens"] = f.num_tokens
    root = f.root_state(0)
    for gene in (TIMED_GENES if evaluator == "sparse" else (4,)):
      def call(f=f, root=root, gene=gene):
        return f.step_nodes(0, [root], [gene], 0)
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      compile_s = time.perf_counter() - t0
      seconds = common.time_call(call, repeats=repeats, warmup=0)
      name = evaluator if evaluator == "masked" else f"sparse_{gene}"
      out["compile_s"][name] = compile_s
      if evaluator == "masked":
        out["masked_s"] = seconds
      else:
        out["sparse_s"][gene] = seconds
      print(f"{name}: {1e3 * seconds:.1f} ms per row-step "
            f"(compile {compile_s:.1f} s)", flush=True)
    del root, f
  out["peak_bytes"] = common.peak_memory_bytes()
  stats = jax.devices()[0].memory_stats() or {}
  out["bytes_limit"] = stats.get("bytes_limit")
  return out


def sparse_seconds_by_gene(sparse_s):
  """Measured genes as measured; 1..9 on the line through 0.4 and 1.0."""
  slope = (sparse_s[10] - sparse_s[4]) / 6
  return np.asarray([sparse_s.get(g, sparse_s[4] + slope * (g - 4))
                     for g in range(11)])


# Main -------------------------------------------------------------------------


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--small", action="store_true",
                      help="CPU smoke run: tiny sizes, prints only")
  parser.add_argument("--out", default=None)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--counts-to", default=None,
                      help=argparse.SUPPRESS)  # the count subprocess
  args = parser.parse_args()
  config, samples = (SMALL, 2) if args.small else (PAPER, SAMPLES)
  if args.counts_to:
    count_run(config, samples, pathlib.Path(args.counts_to))
    return
  if args.small:
    model_config = WanConfig.tiny(num_layers=2)
    shape, text_len = (1, 16, 3, 8, 12), 16
    out = args.out
    if out and common.RESULTS.resolve() in pathlib.Path(
        out).resolve().parents:
      parser.error("--small never writes into benchmarks/results")
  else:
    model_config = WanConfig.wan21_t2v_1_3b(dtype="bfloat16",
                                            param_dtype="bfloat16")
    shape, text_len = (1, 16, 21, 60, 104), 512
    out = args.out or str(common.RESULTS / "search_cost_h200.json")

  with tempfile.TemporaryDirectory() as tmp:
    counting = start_counts(args.small, pathlib.Path(tmp))
    try:
      timing = time_steps(model_config, shape, text_len, config.steps,
                          args.repeats)
    except BaseException:
      counting.kill()
      raise
    if counting.wait() != 0:
      raise SystemExit(f"the count run failed ({counting.returncode})")
    summary, events = load_counts(pathlib.Path(tmp))
  quality = summary["searched_vs_uniform"]
  print(f"search on the tiny model: {summary['seconds']:.0f} s, "
        f"{summary['genomes_distinct']} distinct genomes of "
        f"{summary['genomes_requested']}; mean budget "
        f"{quality['mean_budget']:.3f}: searched "
        f"{quality['searched_psnr_db']:.2f} dB, uniform "
        f"{quality['uniform_psnr_db']:.2f} dB (final latents vs full)")

  # States that fit next to the peak of a step (the memo of one H200).
  capacity = 0
  if timing["bytes_limit"] and timing["peak_bytes"]:
    capacity = max(0, timing["bytes_limit"] - timing["peak_bytes"]) // (
        timing["node_state_bytes"])
  one_row = {"batch_nodes": 1, "samples_per_pass": 1}
  plans = {
      "no_prefix_sharing": search.EvalConfig(share_prefixes=False,
                                             memo_nodes=0, **one_row),
      "tree_unbounded_memory": search.EvalConfig(memo_nodes=1 << 30,
                                                 **one_row),
      "tree_one_h200": search.EvalConfig(lanes=1, memo_nodes=int(capacity),
                                         **one_row),
  }
  seconds = {"masked": np.full(11, timing["masked_s"]),
             "sparse": sparse_seconds_by_gene(timing["sparse_s"])}
  rows, hours, naive_rows = [], {}, None
  for plan, eval_config in plans.items():
    by_gene = replay(events, config, samples, eval_config).row_steps_by_gene
    total = int(by_gene.sum())
    if plan == "no_prefix_sharing":
      naive_rows = total
      # Each distinct genome (and the full model) from scratch.
      assert total == (summary["genomes_distinct"] + 1) * config.steps * (
          samples), total
    for evaluator, per_gene in seconds.items():
      hours[(plan, evaluator)] = float(by_gene @ per_gene) / 3600
      rows.append({"plan": plan, "evaluator": evaluator, "row_steps": total,
                   "row_steps_by_budget": by_gene.tolist(),
                   "row_steps_saved": naive_rows - total,
                   "saved_fraction": 1 - total / naive_rows,
                   "gpu_hours": hours[(plan, evaluator)]})
      print(f"{plan:22s} {evaluator:6s}: {total:7d} row-steps "
            f"({1 - total / naive_rows:.1%} saved), "
            f"{hours[(plan, evaluator)]:.2f} GPU-hours")
  every = (summary["genomes_requested"] + 1) * config.steps * samples
  rows.append({"plan": "no_fitness_cache", "evaluator": "masked",
               "row_steps": every,
               "gpu_hours": every * timing["masked_s"] / 3600,
               "note": "every requested candidate from scratch, repeats "
                       "included"})
  rows.append({"timing": "seconds_per_row_step",
               "masked": timing["masked_s"],
               "sparse_measured": {str(g): t
                                   for g, t in timing["sparse_s"].items()},
               "sparse_by_budget": seconds["sparse"].tolist(),
               "compile_s": timing["compile_s"],
               "row_state_gib": timing["node_state_bytes"] / 2**30,
               "peak_gib": (timing["peak_bytes"] or 0) / 2**30,
               "bytes_limit_gib": (timing["bytes_limit"] or 0) / 2**30,
               "memo_capacity_states": int(capacity)})
  feasible = {k: v for k, v in hours.items()
              if k[0] != "tree_unbounded_memory"}
  best = min(feasible, key=feasible.get)
  targets = [
      {"name": "search_h200_hours_paper_settings", "value": hours[best],
       "op": "<=", "target": 8.0, "plan": "/".join(best)},
      {"name": "search_h200_hours_paper_settings_stretch",
       "value": hours[best], "op": "<=", "target": 2.0},
      {"name": "search_h200_hours_masked_simulation_one_h200",
       "value": hours[("tree_one_h200", "masked")], "op": "<=",
       "target": 8.0},
  ]
  settings = {
      "search": config.to_dict(), "samples": samples,
      "model": "wan2.1-t2v-1.3b architecture, random bf16 weights, "
               "float32 Astraea cache",
      "latent_shape": list(shape), "tokens": timing["tokens"],
      "timed_with": "TreeFitness.step_nodes, 1 row (candidate x sample) "
                    "per call, CFG batch 2",
      "counts_from": "the real search with these settings on a tiny random "
                     "Wan (latent 16x2x8x8, 32 tokens, 2 layers, dim 32) on "
                     "CPU; its calls replayed through search.TreeCounter "
                     "per plan",
      "count_run": {k: v for k, v in summary.items() if k != "history"},
      "best_fitness_per_generation": [h["best"] for h in summary["history"]],
      "gpu_hours": "sum over budgets of row-steps x seconds per row-step",
      "paper_gpu_hours": 82}
  if out:
    common.write_results(out, "search_cost", settings, rows, targets)
  else:
    print(json.dumps({"targets": targets}, indent=1))


if __name__ == "__main__":
  main()
