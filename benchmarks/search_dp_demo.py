"""The separable (DP) budget search against the paper's GA on the demo model,
and how the searched schedules hold on held-out captions (issue #22, 1-3).

  PYTHONPATH=. python benchmarks/search_dp_demo.py                # GPU, ~5 min
  PYTHONPATH=. python benchmarks/search_dp_demo.py --small --out /tmp/x.json

1. Search problem: the shipped demo model (20 UniPC steps, CFG 3.0, shift
   2.0), N training-split captions, one noise seed each; fitness = MSE of
   the final video against the full model's (`search.TreeFitness`, masked
   simulation, prefix tree).
2. DP variants (`search.separable`): the complete step-cost table (every
   budget 0..0.9 at every step) and cheaper measurement plans; each run on
   a fresh fitness, so its row-steps are its own (measured).
3. Additivity: random feasible genomes at each mean budget: the real
   fitness against each table's prediction (Spearman rho, per budget).
4. The paper's GA (population 50, 30 children, 30 generations) at each
   mean budget, with its row-steps.
5. Every search at exact mean budget (band (1.0, 1.0)); the schedules'
   real fitness; then PSNR/SSIM of the decoded clips against the full
   model on held-out captions (`evaluation.evaluate`) for the DP, GA,
   default (warm-up) and uniform schedules.
6. Paper-setting cost (50 steps, 4 samples): the DP's row-steps counted by
   replaying its calls through `search.TreeCounter` (projected: not run at
   that size), against the GA's counts in search_cost_h200.json, priced
   with that file's per-budget seconds per row-step (projected).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import common  # isort: skip  (benchmarks/common.py)
from astraea_jax import evaluation
from astraea_jax.astraea import policies as policies_lib
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import search
from astraea_jax.astraea.search import separable
from astraea_jax.demo_model import analysis

BUDGETS = (0.3, 0.4, 0.5, 0.7)
PLANS = {
    "complete": separable.DPConfig(genes=tuple(range(10))),
    "genes_0_5_profile_3": separable.DPConfig(genes=(0, 5), profile_count=3),
    "genes_0_profile_3": separable.DPConfig(genes=(0,), profile_count=3),
    "genes_0_3_6_profile_2": separable.DPConfig(genes=(0, 3, 6),
                                                profile_count=2),
}
SHIPPED_PLAN = "genes_0_5_profile_3"   # = separable.DPConfig() (default)


def search_problem(model, captions, seeds, steps):
  from astraea_jax.demo_model import model as demo
  c = model.config
  context = demo.encode(model, list(captions))
  noise = jnp.concatenate([demo.noise(c, 1, s) for s in seeds])
  return noise, context, jnp.zeros_like(context[:1])


EVAL = {"evaluator": "sparse", "batch_nodes": 1}


def fresh_fitness(model, noise, context, negative, steps):
  from flax import nnx
  graphdef, params = nnx.split(model.dit)
  return search.TreeFitness(
      graphdef, params, noise, context, negative, steps=steps,
      config=search.EvalConfig(guidance_scale=model.config.guidance,
                               shift=model.config.shift, **EVAL))


def counts_of(fitness):
  return int(fitness.counts["row_steps"])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--small", action="store_true",
                      help="CPU smoke run: 6 steps, tiny GA, 2 held-out")
  parser.add_argument("--out", default=None)
  parser.add_argument("--schedules-out", default=None,
                      help="folder for the DP schedules at BUDGETS")
  parser.add_argument("--train", type=int, default=4)
  parser.add_argument("--held-out", type=int, default=16)
  parser.add_argument("--random-genomes", type=int, default=16,
                      help="per budget, for the additivity check")
  parser.add_argument("--ga", default="50,30,30",
                      help="population,children,generations")
  parser.add_argument("--ga-budgets", default=",".join(map(str, BUDGETS)))
  parser.add_argument("--plans", default=",".join(PLANS),
                      help="DP measurement plans to run (names of PLANS)")
  parser.add_argument("--quality-budgets",
                      default=",".join(map(str, BUDGETS)))
  parser.add_argument("--evaluator", default="masked",
                      choices=["masked", "sparse"])
  parser.add_argument("--batch-nodes", type=int, default=None)
  parser.add_argument("--default-base-budgets", type=float, nargs="*",
                      default=[0.4],
                      help="also run the DP linearised around the default "
                           "schedule of these budgets")
  parser.add_argument("--recount", default=None, metavar="RESULTS",
                      help="no model: recount the paper-setting rows of a "
                           "results file with this code, ship from its "
                           "schedule rows (--schedules-out) and rewrite it")
  args = parser.parse_args()
  if args.recount:
    doc = json.loads(pathlib.Path(args.recount).read_text())
    rows = [r for r in doc["rows"] if r.get("row") != "paper_setting_count"]
    rows += paper_counts()
    settings = {**doc["settings"], "recounted": (
        "paper_setting_count rows recounted (--recount) by a later commit "
        "than the measured rows: separable.search then also evaluated the "
        f"default schedule; measured rows from commit {doc.get('commit')}")}
    if args.schedules_out:
      s = doc["settings"]
      ship(rows, args.schedules_out, s["steps"], s["search_captions"],
           s["search_seeds"])
    write(args.out or args.recount, rows, settings, None,
          s["ga"]["budgets"] if (s := doc["settings"]) else [])
    return
  EVAL.update(evaluator=args.evaluator, batch_nodes=args.batch_nodes)
  plans = {n: PLANS[n] for n in args.plans.split(",")}
  quality_budgets = [float(b) for b in args.quality_budgets.split(",")]
  from astraea_jax.demo_model import model as demo
  model = demo.load()
  steps = 6 if args.small else model.config.steps
  if args.small:
    args.train, args.held_out, args.random_genomes = 2, 2, 4
    args.ga = "6,4,2"
  population, children, generations = map(int, args.ga.split(","))
  ga_budgets = [float(b) for b in args.ga_budgets.split(",") if b]
  train_captions = analysis.prompt_captions(args.train, split="train",
                                            seed=1)
  held_captions = analysis.prompt_captions(args.held_out, split="held_out",
                                           seed=0)
  train_seeds = list(range(args.train))
  held_seeds = [1000 + i for i in range(args.held_out)]
  noise, context, negative = search_problem(model, train_captions,
                                            train_seeds, steps)
  rows, t_all = [], time.perf_counter()

  def config(budget, **kw):
    return search.SearchConfig(target_budget=budget, steps=steps,
                               band=(1.0, 1.0), **kw)

  # 2. DP variants, each on a fresh fitness (its own row-steps).
  out = args.out or (None if args.small else str(
      common.RESULTS / "search_generalisation_demo.json"))

  def checkpoint_rows():
    if out:
      pathlib.Path(out + ".partial").write_text(json.dumps(rows, default=str))

  dp = {}
  for name, dp_config in plans.items():
    source = next((n for n in dp if _subset(dp_config, plans[n], steps)),
                  None)
    if source is not None:
      # Its measurements are a subset of a plan already run (each is a
      # deterministic row of its own): the same numbers, not run again.
      keep = {k: v for k, v in dp[source]["result"].measured.items()
              if k[1] in dp_config.plan(steps).get(k[0], ())}
      costs = separable.fill_costs(keep, steps, dp_config)
      dp[name] = {"result": dataclasses.replace(
          dp[source]["result"], costs=costs, measured=keep)}
      rows.append({"row": "dp_run", "plan": name,
                   "dp_config": dp_config.to_dict(), "derived_from": source,
                   "row_steps_formula": separable.count_row_steps(
                       steps, args.train, dp_config)})
      continue
    fit = fresh_fitness(model, noise, context, negative, steps)
    t0 = time.perf_counter()
    result = separable.search(fit, config(0.4), dp_config, progress=False)
    seconds = time.perf_counter() - t0
    dp[name] = {"result": result, "row_steps": counts_of(fit),
                "seconds": seconds, "fitness": fit}
    expected = separable.count_row_steps(steps, args.train, dp_config)
    rows.append({"row": "dp_run", "plan": name,
                 "dp_config": dp_config.to_dict(),
                 "row_steps": counts_of(fit), "row_steps_formula": expected,
                 "seconds": seconds, "device": jax.devices()[0].device_kind,
                 "genomes_evaluated": result.genomes_evaluated})
    print(f"dp {name}: {counts_of(fit)} row-steps (formula {expected}), "
          f"{seconds:.1f} s", flush=True)
  full_fit = fresh_fitness(model, noise, context, negative, steps)

  def real(genomes):
    return np.asarray(full_fit(np.asarray(genomes, np.int32)), np.float64)

  # 3. Additivity: random feasible genomes per budget, real vs predicted.
  rng_key = jax.random.key(7)
  additivity = {}
  for budget in quality_budgets:
    rng_key, k = jax.random.split(rng_key)
    cfg = config(budget, population=args.random_genomes)
    genomes = np.asarray(search.initial_population(k, config=cfg))
    uniform = search.from_schedule(schedule_lib.default_schedule(
        budget, steps, warmup=1))
    genomes = np.unique(np.concatenate([genomes, uniform[None]]), axis=0)
    truth = real(genomes)
    for name in plans:
      costs = dp[name]["result"].costs
      predicted = costs[np.arange(steps)[None], genomes].sum(1)
      rho = search.spearman(predicted, truth)
      additivity.setdefault(name, {})[budget] = rho
      rows.append({"row": "additivity", "plan": name, "budget": budget,
                   "genomes": len(genomes), "spearman": rho,
                   "predicted_over_real_median": float(np.median(
                       predicted / np.maximum(truth, 1e-30)))})
    checkpoint_rows()
    print(f"additivity at {budget}: " + ", ".join(
        f"{n} {additivity[n][budget]:.3f}" for n in plans), flush=True)

  # 5a. DP schedules per budget (from each plan's table) and their fitness.
  schedules = {}
  for name in plans:
    for budget in BUDGETS:
      lo, hi = config(budget).budget_band()
      genome, value = separable.solve(dp[name]["result"].costs, lo, hi)
      fitness = float(real(genome[None])[0])
      schedules[(f"dp_{name}", budget)] = genome
      rows.append({"row": "schedule", "search": "dp", "plan": name,
                   "budget": budget, "genome": genome.tolist(),
                   "mean_budget": float(genome.mean() / 10),
                   "predicted_fitness": value, "fitness": fitness})
      print(f"dp {name} {budget}: fitness {fitness:.5g} (predicted "
            f"{value:.5g}) {genome.tolist()}", flush=True)
  # DP linearised around the default schedule of each budget (its own
  # measurement per budget).
  for budget in args.default_base_budgets:
    dp_config = separable.DPConfig(base="default")
    fit = fresh_fitness(model, noise, context, negative, steps)
    t0 = time.perf_counter()
    result = separable.search(fit, config(budget), dp_config,
                              progress=False)
    seconds = time.perf_counter() - t0
    schedules[("dp_default_base", budget)] = result.genome
    rows.append({"row": "dp_run", "plan": "default_base", "budget": budget,
                 "dp_config": dp_config.to_dict(),
                 "row_steps": counts_of(fit), "seconds": seconds,
                 "genomes_evaluated": result.genomes_evaluated})
    rows.append({"row": "schedule", "search": "dp", "plan": "default_base",
                 "budget": budget, "genome": result.genome.tolist(),
                 "mean_budget": float(result.genome.mean() / 10),
                 "predicted_fitness": result.predicted,
                 "fitness": float(real(result.genome[None])[0])})
    print(f"dp default_base {budget}: {counts_of(fit)} row-steps, fitness "
          f"{rows[-1]['fitness']:.5g} {result.genome.tolist()}", flush=True)
  checkpoint_rows()
  for budget in BUDGETS:
    for kind, warmup in (("default", None), ("uniform", 1)):
      genome = search.from_schedule(schedule_lib.default_schedule(
          budget, steps, warmup=warmup))
      schedules[(kind, budget)] = genome
      rows.append({"row": "schedule", "search": kind, "budget": budget,
                   "genome": genome.tolist(),
                   "mean_budget": float(genome.mean() / 10),
                   "fitness": float(real(genome[None])[0])})
      print(f"{kind} {budget}: fitness {rows[-1]['fitness']:.5g}",
            flush=True)

  # 4. The paper's GA per budget, each on a fresh fitness.
  for budget in ga_budgets:
    fit = fresh_fitness(model, noise, context, negative, steps)
    t0 = time.perf_counter()
    result = search.search(fit, config(budget, population=population,
                                       children=children,
                                       generations=generations),
                           progress=False)
    seconds = time.perf_counter() - t0
    schedules[("ga", budget)] = result.genome
    rows.append({"row": "ga_run", "budget": budget,
                 "population": population, "children": children,
                 "generations": generations, "row_steps": counts_of(fit),
                 "seconds": seconds, "genomes_evaluated":
                 result.genomes_evaluated,
                 "best_per_generation": [h["best"] for h in result.history]})
    rows.append({"row": "schedule", "search": "ga", "budget": budget,
                 "genome": result.genome.tolist(),
                 "mean_budget": float(result.genome.mean() / 10),
                 "fitness": float(real(result.genome[None])[0])})
    print(f"ga {budget}: {counts_of(fit)} row-steps, {seconds:.1f} s, "
          f"fitness {result.fitness:.5g} {result.genome.tolist()}",
          flush=True)
    checkpoint_rows()

  # 5b. Held-out (and training) PSNR/SSIM of the decoded clips.
  policies = []
  for (kind, budget), genome in schedules.items():
    if kind.startswith("dp_") and kind not in (
        f"dp_{SHIPPED_PLAN}", "dp_complete", "dp_default_base") or (
            budget not in quality_budgets):
      continue
    policies.append(policies_lib.Astraea(
        schedule=tuple(search.to_schedule(genome)),
        schedule_name=f"{kind}@{budget:g}"))
  quality = {}
  for split, captions, seeds in (("held_out", held_captions, held_seeds),
                                 ("train", train_captions, train_seeds)):
    runs = quality_runs(model, policies, captions, seeds, steps)
    for p in policies:
      mine = [r for r in runs if r["label"] == p.label()]
      kind, budget = p.schedule_name.split("@")
      psnr = [r["psnr"] for r in mine]
      ssim = [r["ssim"] for r in mine]
      quality[(split, kind, float(budget))] = float(np.mean(psnr))
      rows.append({"row": "quality", "split": split, "schedule": kind,
                   "budget": float(budget), "samples": len(mine),
                   "psnr_db": float(np.mean(psnr)),
                   "psnr_db_std": float(np.std(psnr)),
                   "ssim": float(np.mean(ssim)),
                   "ssim_std": float(np.std(ssim)),
                   "schedule_budgets": list(p.schedule)})
      print(f"{split} {kind}@{budget}: PSNR {np.mean(psnr):.2f} dB, SSIM "
            f"{np.mean(ssim):.4f}", flush=True)
    checkpoint_rows()

  rows += paper_counts()
  if args.schedules_out:
    ship(rows, args.schedules_out, steps, train_captions, train_seeds)
  write(out, rows, settings_of(locals()), quality_budgets, ga_budgets)


def quality_runs(model, policies, captions, seeds, steps):
  """`evaluation.evaluate`'s runs (PSNR/SSIM vs the full model) of the
  policies on one sample per caption: caption j with noise seed seeds[j]."""
  from astraea_jax.demo_model import model as demo
  problem = evaluation.demo_problem(captions, (0,), steps=steps)
  problem.samples = [dataclasses.replace(s, seed=seed, noise=demo.noise(
      model.config, 1, seed)) for s, seed in zip(problem.samples, seeds)]
  runs, _ = evaluation.evaluate(problem, policies, progress=False)
  return runs


def paper_counts(samples: int = 4, plans=None):
  """6. Paper-setting counts (projected) against the GA's stored counts:
  the DP's calls at 50 steps on `samples` samples, per plan of `plans`
  (default PLANS)."""
  rows = []
  stored = json.loads((common.RESULTS / "search_cost_h200.json").read_text())
  ga_rows = {(r.get("plan"), r.get("evaluator")): r for r in stored["rows"]}
  timing = next(r for r in stored["rows"] if r.get("timing"))
  per_gene = np.asarray(timing["sparse_by_budget"])
  paper = search.SearchConfig(target_budget=0.4, steps=50)
  for name, dp_config in (plans or PLANS).items():
    recording = search.RecordingFitness(_Zero(paper.steps))
    separable.search(recording, paper, dp_config, progress=False)
    counter = search.TreeCounter(steps=paper.steps, num_samples=samples,
                                 config=search.EvalConfig(
                                     memo_nodes=1 << 30, batch_nodes=1,
                                     samples_per_pass=1))
    counter.replay(recording.events)
    total = int(counter.row_steps_by_gene.sum())
    hours = float(counter.row_steps_by_gene @ per_gene) / 3600
    masked_hours = total * timing["masked"] / 3600
    rows.append({"row": "paper_setting_count", "plan": name,
                 "samples": samples, "row_steps": total,
                 "row_steps_formula": separable.count_row_steps(
                     50, samples, dp_config),
                 "row_steps_by_budget": counter.row_steps_by_gene.tolist(),
                 "h200_hours_sparse": hours,
                 "h200_hours_masked": masked_hours,
                 "ga_row_steps_tree": ga_rows[("tree_unbounded_memory",
                                               "sparse")]["row_steps"],
                 "ga_row_steps_one_h200": ga_rows[("tree_one_h200",
                                                   "sparse")]["row_steps"],
                 "ga_h200_hours_one_h200": ga_rows[("tree_one_h200",
                                                    "sparse")]["gpu_hours"]})

  return rows


def ship(rows, folder, steps, captions, seeds):
  """The shipped schedule of each budget: of the DP searches' schedules
  and the default one (which `separable.search` also evaluates), the one
  with the lowest measured fitness."""
  from astraea_jax.demo_model import model as demo
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  for budget in BUDGETS:
    candidates = [r for r in rows if r.get("row") == "schedule"
                  and r["budget"] == budget
                  and r["search"] in ("dp", "default")]
    best = min(candidates, key=lambda r: r["fitness"])
    plan = best.get("plan", "default")
    schedule_lib.save_searched(
        folder / schedule_lib.searched_name(budget),
        search.to_schedule(best["genome"]), model=demo.model_id(),
        target_budget=budget, steps=steps, method="dp",
        chosen=("dp" if best["search"] == "dp" else "default"),
        dp_plan=plan,
        dp_config=(separable.DPConfig(base="default").to_dict()
                   if plan == "default_base" else PLANS[plan].to_dict()
                   if plan in PLANS else None),
        prompts=captions, seeds=seeds, fitness_mse=best["fitness"],
        candidates={r.get("plan", r["search"]): r["fitness"]
                    for r in candidates},
        made_by="benchmarks/search_dp_demo.py")
    print(f"shipped {budget}: {plan} (fitness {best['fitness']:.5g})")


def settings_of(v):
  return {
      "model": "shipped demo model (astraea_jax/demo_model)",
      "steps": v["steps"], "guidance": v["model"].config.guidance,
      "shift": v["model"].config.shift,
      "search_captions": v["train_captions"],
      "search_seeds": v["train_seeds"],
      "held_out_captions": v["held_captions"],
      "held_out_seeds": v["held_seeds"], "band": [1.0, 1.0],
      "ga": {"population": v["population"], "children": v["children"],
             "generations": v["generations"], "budgets": v["ga_budgets"]},
      "shipped_plan": SHIPPED_PLAN,
      "plans": {n: c.to_dict() for n, c in v["plans"].items()},
      "fitness": "MSE of the final video vs the full model, mean over "
                 "the search samples", "eval_config": dict(EVAL),
      "device_note": "run on the CPU of the development machine",
      "quality": "PSNR (data range 2) / SSIM of the decoded clip vs the full "
                 "model from the same noise and caption",
      "paper_setting_counts": "the DP's calls at 50 steps, 4 samples, "
                              "replayed through search.TreeCounter (memo of "
                              "the base trajectory, one row per call); GA "
                              "counts and seconds per row-step from "
                              "search_cost_h200.json",
      "seconds_total": time.perf_counter() - v["t_all"]}


def write(out, rows, settings, quality_budgets, ga_budgets):
  """Targets from the rows; the results file."""
  quality = {(r["split"], r["schedule"], r["budget"]): r["psnr_db"]
             for r in rows if r.get("row") == "quality"}
  additivity = {}
  for r in rows:
    if r.get("row") == "additivity":
      additivity.setdefault(r["plan"], []).append(r["spearman"])
  targets = []
  paper_row = next(r for r in rows if r.get("row") == "paper_setting_count"
                   and r["plan"] == SHIPPED_PLAN)
  targets.append({"name": "search_count_ratio_vs_ga_paper_settings",
                  "value": paper_row["ga_row_steps_one_h200"]
                  / paper_row["row_steps"], "op": ">=", "target": 12.0,
                  "plan": SHIPPED_PLAN})
  targets.append({"name": "search_h200_hours_paper_settings_dp",
                  "value": paper_row["h200_hours_sparse"], "op": "<=",
                  "target": 2.0, "plan": SHIPPED_PLAN})
  for name, rhos in additivity.items():
    targets.append({"name": f"proxy_rank_correlation_min_{name}",
                    "value": min(rhos), "op": ">=", "target": 0.9})
  if ("held_out", f"dp_{SHIPPED_PLAN}", 0.5) in quality:
    targets.append({"name": "dp_psnr_held_out_budget_0.5",
                    "value": quality[("held_out", f"dp_{SHIPPED_PLAN}", 0.5)],
                    "op": ">=", "target": 27.0})
  for budget in ga_budgets:
    key = ("held_out", f"dp_{SHIPPED_PLAN}", budget)
    if key in quality and ("held_out", "ga", budget) in quality:
      targets.append({"name": f"dp_minus_ga_psnr_held_out_budget_{budget:g}",
                      "value": quality[key] - quality[("held_out", "ga",
                                                       budget)],
                      "op": ">=", "target": 0.0})
  if out:
    common.write_results(out, "search_generalisation", settings, rows,
                         targets)
  print(json.dumps(targets, indent=1))


def _subset(a: separable.DPConfig, b: separable.DPConfig, steps) -> bool:
  """Whether plan a measures only what plan b measures (both from the
  full model)."""
  pa, pb = a.plan(steps), b.plan(steps)
  return a.base == b.base == "full" and all(
      set(pa[t]) <= set(pb[t]) for t in pa)


class _Zero:
  """A fitness of zeros: the DP's calls do not depend on its values."""

  def __init__(self, steps):
    self.steps = steps

  def __call__(self, genomes):
    return np.zeros(len(genomes))


if __name__ == "__main__":
  main()
