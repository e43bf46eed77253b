"""Speed of every policy of the comparison on the Wan2.1-1.3B architecture.

  PYTHONPATH=. python benchmarks/eval_speed.py            # H200, ~4-5 min
  PYTHONPATH=. python benchmarks/eval_speed.py --small    # CPU smoke run

Random bf16 weights at 480p x 81 frames (latent 16x21x60x104 = 32,760
tokens), CFG batch 2, UniPC, 50 steps, shift 3.0. The policies are those of
`policy_specs.default_sweep()` (docs/baselines.md): Astraea at mean budgets
0.3/0.4/0.5/0.7, its ablations at 0.5, step caching, ToCa and PAB.

A 50-step run is not timed end to end. Every policy is a list of per-step
plans, and each distinct compute configuration (`Plan.cost_key`) is timed
once, in this process, after its compile: the median of --repeats steps
with the policy's caches in place. A setting's 50-step time is the sum of
its steps' times ("extrapolated" in the JSON), its speedup the dense
sampler's 50 steps over that. Step caching decides per step at run time,
so its rows are given per number of computed steps (2..50); `astraea eval
--speed-json` applies the measured per-key times to the steps each run
actually computed. Rows with "row": "step_config" are that per-key table.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import common
import jax
import jax.numpy as jnp
import numpy as np

from astraea_jax import testing
from astraea_jax.astraea import policies as policies_lib
from astraea_jax.astraea import policy_specs, step_plans
from astraea_jax.sampling import sampler as dense

STEPS = 50
SHIFT = 3.0
GUIDANCE = 5.0


def measurements(sweep, timesteps, num_tokens):
  """{cost_key: (policy, plan, threshold or None)} for every distinct step
  configuration of the sweep; StepCache's run-time decision is measured
  both ways (threshold 0: always computes; 1e30: always reuses)."""
  out = {}
  for policy in sweep:
    for plan in policy.plans(timesteps, num_tokens):
      if isinstance(plan, step_plans.StepCachePlan) and plan.mode == (
          "cached"):
        out.setdefault("step_cache:computed", (policy, plan, 0.0))
        out.setdefault("step_cache:reused", (policy, plan, 1e30))
      else:
        out.setdefault(plan.cost_key(), (policy, plan, None))
  return out


def carry_group(policy) -> tuple:
  """Policies whose carries have the same structure share one carry."""
  if isinstance(policy, policies_lib.Astraea):
    return ("astraea", policy.selector == "fixed",
            policy.selection.cache_dtype)
  return (type(policy).__name__,) + tuple(
      getattr(policy, f) for f in ("indicator", "reuse") if hasattr(policy,
                                                                    f))


def compose(policy, plans, ms):
  """50-step milliseconds of a data-independent policy."""
  return float(sum(ms[p.cost_key()] for p in plans))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="tiny model on CPU; writes to a temp path")
  parser.add_argument("--out", default=str(common.RESULTS /
                                           "eval_speed_h200.json"))
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  t_start = time.perf_counter()
  config, shape, text_len = common.wan_setup(args.small)
  graphdef, params = testing.random_wan(config, seed=0)
  noise, ctx2, scheduler, n = common.wan_inputs(config, shape, text_len,
                                                STEPS, SHIFT)
  timesteps = np.asarray(scheduler.timesteps)
  gs = jnp.float32(GUIDANCE)
  sweep = policy_specs.default_sweep()
  todo = measurements(sweep, timesteps, n)
  print(f"{len(sweep)} policy settings, {len(todo)} distinct step "
        f"configurations to time ({n} tokens)")

  # Time each configuration, one carry per group of policies at a time.
  ms, rows = {}, []
  by_group = {}
  for key, (policy, plan, threshold) in todo.items():
    by_group.setdefault(carry_group(policy), []).append(
        (key, policy, plan, threshold))
  for items in by_group.values():
    carry = items[0][1].init_carry(config, 2, n, shape, STEPS)
    for key, policy, plan, threshold in items:
      if threshold is not None:
        carry["threshold"] = jnp.asarray(threshold, jnp.float32)
      times = []
      for r in range(1 + args.repeats):   # the first compiles
        state = scheduler.init(noise)
        jax.block_until_ready((state, carry))
        t0 = time.perf_counter()
        latents, state, carry = dense.step_function()(
            policies_lib.model_fn(graphdef, params, ctx2), scheduler, gs,
            noise, state, carry, plan=plan)
        jax.block_until_ready((latents, carry))
        times.append(time.perf_counter() - t0)
      ms[key] = 1e3 * float(np.median(times[1:]))
      rows.append({"row": "step_config", "cost_key": key,
                   "ms_per_step": ms[key], "compile_s": times[0],
                   "runs_ms": [1e3 * t for t in times[1:]],
                   "measured_with": policy.label()})
      print(f"{key:40s} {ms[key]:9.1f} ms/step (compile {times[0]:.1f} s)")
    del carry
  t_dense = ms["dense"]
  for r in rows:
    r["fraction_of_dense"] = r["ms_per_step"] / t_dense
  peak = common.peak_memory_bytes()

  # Compose the 50-step time of every setting.
  summary = {}
  for policy in sweep:
    plans = policy.plans(timesteps, n)
    if isinstance(policy, policies_lib.StepCache):
      continue
    total = compose(policy, plans, ms)
    summary[policy.label()] = STEPS * t_dense / total
    rows.append({"row": "policy", "label": policy.label(),
                 "method": policy.method, "family": policy.family,
                 "settings": policy.settings(),
                 "cost_keys": [p.cost_key() for p in plans],
                 "extrapolated_s": total / 1e3,
                 "dense_extrapolated_s": STEPS * t_dense / 1e3,
                 "speedup": summary[policy.label()]})
  full, comp, reuse = (ms["step_cache:full"], ms["step_cache:computed"],
                       ms["step_cache:reused"])
  for computed in range(2, STEPS + 1):
    total = 2 * full + (computed - 2) * comp + (STEPS - computed) * reuse
    rows.append({"row": "step_cache_computed_steps", "family": "step_cache",
                 "computed_steps": computed, "extrapolated_s": total / 1e3,
                 "speedup": STEPS * t_dense / total})
  if peak:
    rows.append({"row": "peak_memory", "gib": peak / 2**30})
  for label, speedup in summary.items():
    print(f"{label:45s} {speedup:5.2f}x")

  astraea = [s for lab, s in summary.items() if lab.startswith("astraea ")
             and "(" not in lab]
  targets = [{"name": "astraea_default_sweep_reaches_1.9x",
              "value": max(astraea), "op": ">=", "target": 1.9}]
  settings = {"model": "wan2.1-t2v-1.3b architecture, random weights",
              "dtype": config.dtype, "latent_shape": list(shape),
              "tokens": n, "cfg_batch": 2, "steps": STEPS,
              "scheduler": f"unipc shift {SHIFT}", "repeats": args.repeats,
              "extrapolation": "a setting's time = sum over its 50 steps of "
                               "the measured time of each step's compute "
                               "configuration (cost_key)",
              "wall_s": time.perf_counter() - t_start}
  out = args.out
  if args.small:
    out = tempfile.mkdtemp(prefix="eval_speed_small_") + "/eval_speed.json"
  common.write_results(out, "eval_speed", settings, rows, targets)
  print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
  main()
