"""Astraea at the Wan2.2 A14B expert switch: refresh the token caches or
keep them (issue #23 item 4), measured on CPU.

  PYTHONPATH=. python benchmarks/expert_switch.py            # CPU, ~10 min
  PYTHONPATH=. python benchmarks/expert_switch.py --small --out /tmp/x.json

The token caches hold the high-noise expert's block updates when the
low-noise expert takes over. "refresh" (`wan_tokenwise.sample(...,
refresh_experts=True)`) computes every token at the first low-noise step;
"keep" (False) runs the schedule's K there, so the unselected tokens add
the other expert's cached update. Refresh costs the rest of a full step,
so keep is also run at the same cost ("keep_same_cost": the default
schedule of refresh's computed mean budget, the extra tokens spread over
the steps).

What runs (float32, the default lean token state):
  * TINY random experts, NOT trained models: A14B-like two-expert Wan DiTs
    (T2V: 16 input channels; I2V: 36, a random image latent and its mask
    as `condition`), 4 layers of width 64, 72 tokens (latent 3 x 8 x 12);
  * two relations of the experts: "independent" (two random draws) and
    "related" (low noise = 0.8 high + 0.2 another draw: trained experts
    share an initialisation; how close the real ones are is not known);
  * the models' sampling: Wan UniPC schedule, T2V shift 12, boundary
    0.875, CFG (3.0, 4.0); I2V shift 5, boundary 0.9, CFG 3.5; 20 steps
    (the switch at step 13 / 8);
  * 8 samples (noise seed j, a random prompt embedding each) as one batch;
  * mean budgets 0.3 and 0.5 (`schedule.default_schedule`).
Quality: PSNR of each sample's final latents against the dense two-expert
sample from the same noise (peak = the dense latents' range), mean over
samples, and the max / mean absolute error; cost: the fraction of the
full model's tokens computed (mean over steps of K_t / N).
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import common  # isort: skip  (benchmarks/common.py)
from astraea_jax import testing
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import wan_tokenwise
from astraea_jax.configs import WanConfig
from astraea_jax.pipelines import wan22_pipeline
from astraea_jax.sampling import sampler as dense

SIZES = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=4, text_dim=32,
             text_len=16, freq_dim=32)
# wan22 configs/wan_t2v_A14B.py and wan_i2v_A14B.py: shift, boundary,
# guidance (low noise, high noise); in_dim 16 / 36.
MODELS = {
    "t2v": dict(config=WanConfig.tiny(**SIZES), shift=12.0, boundary=0.875,
                guidance=(3.0, 4.0)),
    "i2v": dict(config=WanConfig.tiny(in_dim=36, out_dim=16, **SIZES),
                shift=5.0, boundary=0.9, guidance=(3.5, 3.5)),
}
RELATIONS = {"independent": 1.0, "related": 0.2}  # share of another draw
BUDGETS = (0.3, 0.5)


def experts(config, seed, mix):
  """(graphdef, (high, low)): low = (1 - mix) high + mix another draw."""
  graphdef, high = testing.random_wan(config, seed)
  _, other = testing.random_wan(config, seed + 1000)
  low = jax.tree.map(lambda h, o: (1 - mix) * h + mix * o, high, other)
  return graphdef, (high, low)


def inputs(config, kind, samples, latent):
  """(noise, context, negative, condition or None) of `samples` samples."""
  shape = (samples, config.out_dim, *latent)
  noise = dense.draw_noise(jax.random.key(0), shape)
  context = jax.random.normal(jax.random.key(1),
                              (samples, 7, config.text_dim))
  negative = jnp.zeros((1, 3, config.text_dim))
  condition = None
  if kind == "i2v":
    image = jax.random.normal(jax.random.key(2), shape)
    condition = wan22_pipeline.i2v_condition(image)
  return noise, context, negative, condition


def sample_errors(latents, dense_latents):
  """Per-sample PSNR (peak: the dense sample's range), max and mean
  absolute error."""
  x = np.asarray(latents, np.float64)
  ref = np.asarray(dense_latents, np.float64)
  axes = tuple(range(1, x.ndim))
  err = np.abs(x - ref)
  peak = ref.max(axes) - ref.min(axes)
  psnr = 10 * np.log10(peak ** 2 / np.mean(err ** 2, axes))
  return psnr, err.max(axes), err.mean(axes)


def run_setting(kind, relation, *, samples, steps, latent, seed):
  spec = MODELS[kind]
  graphdef, params = experts(spec["config"], seed, RELATIONS[relation])
  noise, context, negative, condition = inputs(spec["config"], kind,
                                               samples, latent)
  scheduler = dense.make_scheduler("unipc", steps, shift=spec["shift"],
                                   schedule="wan")
  experts_of_step = dense.expert_plan(scheduler.timesteps, spec["boundary"])
  switch = experts_of_step.index(1)
  common_args = dict(scheduler=scheduler, steps=None,
                     guidance_scale=spec["guidance"],
                     boundary_ratio=spec["boundary"], condition=condition,
                     progress=False)
  full = dense.sample(graphdef, params, noise, context, negative,
                      **common_args)
  def run(budget, name, schedule, refresh):
    latents, stats = wan_tokenwise.sample(
        graphdef, params, noise, context, negative, schedule=schedule,
        refresh_experts=refresh, return_stats=True, **common_args)
    psnr, max_err, mean_err = sample_errors(latents, full)
    row = {"model": kind, "experts": relation, "budget": budget,
           "switch": name, "switch_step": switch,
           "computed_fraction": float(np.mean(stats.num_selected)
                                      / stats.num_tokens),
           "schedule": [float(b) for b in stats.budgets],
           "mean_budget": float(np.mean(stats.budgets)),
           "psnr_db": float(psnr.mean()),
           "psnr_db_per_sample": [round(float(p), 3) for p in psnr],
           "max_abs_err": float(max_err.max()),
           "mean_abs_err": float(mean_err.mean())}
    print(f"{kind} {relation} {budget}: {name:15s} "
          f"cost {row['computed_fraction']:.3f} PSNR "
          f"{row['psnr_db']:.2f} dB, max err {row['max_abs_err']:.3g}")
    return row

  rows = []
  for budget in BUDGETS:
    schedule = schedule_lib.default_schedule(budget, steps)
    refreshed = run(budget, "refresh", schedule, True)
    same_cost = schedule_lib.default_schedule(refreshed["mean_budget"],
                                              steps)
    rows += [refreshed, run(budget, "keep", schedule, False),
             run(budget, "keep_same_cost", same_cost, False)]
  return rows


def targets_of(rows):
  """Refresh's mean PSNR minus keep's, at the schedule's budget and at
  refresh's cost, per model, relation and budget (> 0: refresh better)."""
  by = {(r["model"], r["experts"], r["budget"], r["switch"]): r
        for r in rows}
  targets = []
  for (kind, relation, budget, switch), r in by.items():
    if switch != "refresh":
      continue
    for other in ("keep", "keep_same_cost"):
      o = by[(kind, relation, budget, other)]
      diff = np.asarray(r["psnr_db_per_sample"]) - np.asarray(
          o["psnr_db_per_sample"])
      targets.append({
          "name": f"refresh_minus_{other}_psnr_db_{kind}_{relation}_"
                  f"budget_{budget:g}",
          "value": float(r["psnr_db"] - o["psnr_db"]), "op": ">",
          "target": 0.0, "samples_refresh_better": int((diff > 0).sum()),
          "samples": len(diff)})
  return targets


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--small", action="store_true",
                      help="smoke run: 2 samples, 6 steps, 2 models only")
  parser.add_argument("--out", default=str(common.RESULTS /
                                           "expert_switch_cpu.json"))
  args = parser.parse_args()
  samples, steps, latent = (2, 6, (2, 4, 6)) if args.small else (
      8, 20, (3, 8, 12))
  if args.small and common.RESULTS.resolve() in pathlib.Path(
      args.out).resolve().parents:
    parser.error("--small never writes into benchmarks/results")
  rows = []
  for kind in MODELS:
    for relation in RELATIONS:
      rows += run_setting(kind, relation, samples=samples, steps=steps,
                          latent=latent, seed=10)
  settings = {"samples": samples, "steps": steps, "latent": list(latent),
              "model_sizes": SIZES, "budgets": list(BUDGETS),
              "relations": RELATIONS,
              "models": {k: {"in_dim": v["config"].in_dim,
                             "shift": v["shift"], "boundary": v["boundary"],
                             "guidance": list(v["guidance"])}
                         for k, v in MODELS.items()},
              "weights": "tiny RANDOM experts (testing.random_wan), not "
                         "trained Wan2.2 models",
              "token_state": "selection.SelectionConfig() (the default)",
              "dtype": "float32"}
  common.write_results(args.out, "expert_switch", settings, rows,
                       targets_of(rows))


if __name__ == "__main__":
  main()
