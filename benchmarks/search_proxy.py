"""Cheap proxies of the budget search's fitness on the demo model: how each
ranks candidate schedules against the full fitness, and what it costs
(issue #22: a proxy is admitted only at Spearman rho >= 0.9).

  PYTHONPATH=. python benchmarks/search_proxy.py                # CPU, ~1 h
  PYTHONPATH=. python benchmarks/search_proxy.py --small --out /tmp/p.json

1. Full fitness: MSE of the final video (pixel space: the demo model has no
   VAE, so the latent error IS the decoded-video error) against the full
   model's, mean over 4 samples (training caption j, noise seed j), 20
   UniPC steps, 16 x 48 x 48, CFG 3.0, shift 2.0 (`search.TreeFitness`,
   sparse evaluator, one node per call).
2. Candidates of the kind the search meets: random feasible genomes at mean
   budgets 0.3/0.4/0.5 (the GA's band [0.9, 1.1] x target, the default
   schedule of each among them) and GA mutants (per-gene rate 0.1, then
   repaired into the band) of the shipped 0.4 schedule, where the ranking
   near the top is decided.
3. Proxies, each a `TreeFitness` of its own over the same candidates, on
   all 4 samples (its 1- and 2-sample versions are its first columns of
   `per_sample`: the same rows):
     truncated_M   the first M of the 20 steps, the x0 estimate of step M-1
                   against the full model's (`run_steps=M`);
     steps_N       an N-step sampler, the genome resampled to N steps
                   (`resample_genome`);
     frames_F      the first F frames of each noise (F x 48 x 48);
     size_P        the top-left P x P pixels of each noise (16 x P x P).
4. Per proxy and sample count: Spearman rho against the full fitness over
   all candidates, over the better half (by the full fitness) and over the
   mutants; its cost against the full fitness's: row-steps (one row = one
   CFG model call of one candidate prefix and one sample) computed for the
   candidates, and wall seconds in this process after a warm-up genome
   that compiles every budget (the s-sample versions: s/4 of the rows and
   seconds of the 4-sample run, the same rows); a proxy on the first s
   samples is also ranked against the full fitness over the other 4 - s.
5. Admitted (ours, `admitted`): rho >= 0.9 over all candidates and over
   the better half (and, on fewer samples, against the samples it lacks);
   the targets are the cheapest admitted proxy's.

Recompute the statistics of a stored file without the model:
  PYTHONPATH=. python benchmarks/search_proxy.py --rescore RESULTS
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
from flax import nnx

import common  # isort: skip  (benchmarks/common.py)
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import search
from astraea_jax.demo_model import analysis
from astraea_jax.demo_model import model as demo

BUDGETS = (0.3, 0.4, 0.5)
# Sparse evaluator, one node per call; lanes and memo bound the live states
# (a demo node of 4 samples holds ~42 MB of cache; they change no number).
EVAL = {"evaluator": "sparse", "batch_nodes": 1, "lanes": 8,
        "memo_nodes": 32}
TARGET = 0.9


@dataclasses.dataclass(frozen=True)
class Proxy:
  """A cheaper fitness problem: None fields keep the full problem's."""
  name: str
  run_steps: int | None = None    # truncated trajectory
  steps: int | None = None        # fewer sampling steps, genome resampled
  frames: int | None = None       # noise cropped to the first frames
  size: int | None = None         # noise cropped to the top-left pixels


def proxies(steps: int, frames: int, size: int, patch) -> list[Proxy]:
  """The proxies tried for a `steps`-step, frames x size x size problem
  (sizes kept multiples of the (t, h, w) patch)."""
  out = [Proxy("full")]
  out += [Proxy(f"truncated_{m}", run_steps=m)
          for m in sorted({steps // 2, (3 * steps) // 4, steps - 1})
          if 1 <= m < steps]
  out += [Proxy(f"steps_{steps // 2}", steps=steps // 2)]
  half = max(patch[0], frames // 2 // patch[0] * patch[0])
  two_thirds = max(patch[1], (2 * size) // 3 // patch[1] * patch[1])
  out += [Proxy(f"frames_{half}", frames=half)]
  out += [Proxy(f"size_{two_thirds}", size=two_thirds)]
  return out


def resample_genome(genome, steps: int) -> np.ndarray:
  """A genome on `steps` steps: new step j gets the mean budget of the old
  steps it covers (step index scaled, fractional overlaps weighted),
  rounded to tenths with the rounding error carried forward (the total is
  kept); the first gene stays 10."""
  genome = np.asarray(genome, np.float64)
  total = np.concatenate([[0.0], np.cumsum(genome)])
  edges = np.linspace(0, len(genome), steps + 1)
  area = np.interp(edges, np.arange(len(genome) + 1), total)
  means = np.diff(area) / np.diff(edges)
  out, carry = np.empty(steps, np.int32), 0.0
  for j, mean in enumerate(means):
    out[j] = int(np.clip(np.round(mean + carry), 0, search.FULL))
    carry += mean - out[j]
  out[0] = search.FULL
  return out


def candidates(steps: int, per_budget: int, mutants: int, seed: int):
  """(genomes (n, steps), labels): random feasible genomes per budget and
  mutants of the shipped 0.4 schedule (or of the default one where no
  shipped schedule has `steps` steps); distinct, in a fixed order."""
  genomes, labels = [], []
  key = jax.random.key(seed)
  for budget in BUDGETS:
    key, k = jax.random.split(key)
    config = search.SearchConfig(target_budget=budget, steps=steps,
                                 population=per_budget)
    genomes += np.asarray(search.initial_population(k, config=config)
                          ).tolist()
    labels += [f"random_{budget:g}"] * per_budget
  config = search.SearchConfig(target_budget=0.4, steps=steps)
  lo, hi = config.budget_band()
  shipped, _ = schedule_lib.find_searched(
      demo.SCHEDULES_DIR, 0.4, steps, model=demo.model_id())
  parent = jnp.asarray(search.from_schedule(
      shipped if shipped is not None
      else schedule_lib.default_schedule(0.4, steps)))
  genomes.append(np.asarray(parent).tolist())
  labels.append("shipped_0.4")
  keys = jax.random.split(key, 2 * mutants)
  for k_mut, k_rep in zip(keys[::2], keys[1::2]):
    child = search.repair(k_rep, search.mutate(k_mut, parent, 0.1),
                          lo=lo, hi=hi)
    genomes.append(np.asarray(child).tolist())
    labels.append("mutant_0.4")
  seen, keep = set(), []
  for i, g in enumerate(map(tuple, genomes)):
    if g not in seen:
      seen.add(g)
      keep.append(i)
  return (np.asarray([genomes[i] for i in keep], np.int32),
          [labels[i] for i in keep])


def warmup_genomes(steps: int) -> np.ndarray:
  """Genomes holding every budget 0..9 after their first step (the sparse
  evaluator compiles one step per budget)."""
  count = -(-search.FULL // max(steps - 1, 1))
  genes = np.arange(count * (steps - 1)) % search.FULL
  return np.concatenate([np.full((count, 1), search.FULL),
                         genes.reshape(count, steps - 1)], 1).astype(np.int32)


def fitness_of(model, proxy: Proxy, noise, context, steps):
  """(TreeFitness of the proxy's problem, genome map)."""
  if proxy.frames:
    noise = noise[:, :, :proxy.frames]
  if proxy.size:
    noise = noise[:, :, :, :proxy.size, :proxy.size]
  graphdef, params = nnx.split(model.dit)
  fit = search.TreeFitness(
      graphdef, params, noise, context, jnp.zeros_like(context[:1]),
      steps=proxy.steps or steps, run_steps=proxy.run_steps,
      config=search.EvalConfig(guidance_scale=model.config.guidance,
                               shift=model.config.shift,
                               **EVAL))
  if proxy.steps:
    return fit, lambda gs: np.stack([resample_genome(g, proxy.steps)
                                     for g in gs])
  return fit, lambda gs: gs


def run_proxy(model, proxy, noise, context, steps, genomes):
  """(per-sample fitness (n, S), row-steps, tokens, seconds) of the
  candidates, after warm-up genomes (compiles; the reference trajectory)."""
  fit, to_genomes = fitness_of(model, proxy, noise, context, steps)
  fit.per_sample(warmup_genomes(fit.genome_steps))
  before = int(fit.counts["row_steps"])
  t0 = time.perf_counter()
  values = fit.per_sample(to_genomes(genomes))
  seconds = time.perf_counter() - t0
  return (values, int(fit.counts["row_steps"]) - before, fit.num_tokens,
          seconds)


STATS = ("spearman", "spearman_top_half", "spearman_mutants",
         "spearman_by_group", "spearman_other_samples",
         "spearman_other_samples_top_half", "top_half_genomes", "mutants")


def rank_stats(full, values, labels) -> dict:
  """Spearman rho of `values` against `full` over all candidates, the
  better half by `full`, the mutants (with their parent) and each label
  group of >= 3 genomes (the random genomes of one budget, the
  mutants)."""
  full, values, labels = (np.asarray(full), np.asarray(values),
                          np.asarray(labels))
  top = full <= np.median(full)
  near = np.char.startswith(labels, "random") == 0

  def rho(mask):
    return search.spearman(values[mask], full[mask])

  return {"spearman": rho(np.ones(len(full), bool)),
          "spearman_top_half": rho(top), "spearman_mutants": rho(near),
          "spearman_by_group": {g: rho(labels == g)
                                for g in dict.fromkeys(labels.tolist())
                                if (labels == g).sum() >= 3},
          "top_half_genomes": int(top.sum()), "mutants": int(near.sum())}


def score(rows) -> list:
  """Adds the rank statistics to every proxy row, from the fitness lists
  alone. A proxy on the first s of the S samples is also ranked against
  the full fitness over the other S - s samples (from the full rows'
  means: (S m_S - s m_s) / (S - s)): how much of its agreement is not the
  samples it shares with the full fitness."""
  labels = rows[0]["labels"]
  full = {r["samples"]: np.asarray(r["fitness"]) for r in rows
          if r.get("proxy") == "full"}
  size = max(full)
  for r in rows[1:]:
    for key in STATS:
      r.pop(key, None)
    values = np.asarray(r["fitness"])
    r.update(rank_stats(full[size], values, labels))
    s = r["samples"]
    if s < size and s in full:
      other = (size * full[size] - s * full[s]) / (size - s)
      stats = rank_stats(other, values, labels)
      r["spearman_other_samples"] = stats["spearman"]
      r["spearman_other_samples_top_half"] = stats["spearman_top_half"]
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--small", action="store_true",
                      help="smoke run: the untrained small demo config, "
                           "few candidates")
  parser.add_argument("--out", default=None)
  parser.add_argument("--samples", type=int, default=4)
  parser.add_argument("--per-budget", type=int, default=12)
  parser.add_argument("--mutants", type=int, default=15)
  parser.add_argument("--proxies", default=None,
                      help="comma-separated names (default: all)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--rescore", default=None, metavar="RESULTS",
                      help="no model: recompute the rank statistics of a "
                           "results file from its fitness lists")
  args = parser.parse_args()
  if args.rescore:
    rescore(args.rescore)
    return
  if args.small:
    model = demo.init(demo.DemoConfig.small())
    args.samples, args.per_budget, args.mutants = 2, 3, 3
  else:
    model = demo.load()
  c = model.config
  out = args.out or (None if args.small else str(
      common.RESULTS / "search_proxy_demo.json"))
  captions = analysis.prompt_captions(args.samples, split="train", seed=1)
  seeds = list(range(args.samples))
  context = demo.encode(model, captions)
  noise = jnp.concatenate([demo.noise(c, 1, s) for s in seeds])
  genomes, labels = candidates(c.steps, args.per_budget, args.mutants,
                               args.seed)
  chosen = proxies(c.steps, c.frames, c.height, c.wan.patch_size)
  if args.proxies:
    names = args.proxies.split(",")
    chosen = [p for p in chosen if p.name in names or p.name == "full"]
  print(f"{len(genomes)} candidates, {len(chosen)} fitness runs", flush=True)
  rows = [{"row": "candidates", "genomes": genomes.tolist(),
           "labels": labels}]
  t_all, full = time.perf_counter(), None
  for proxy in chosen:
    values, row_steps, tokens, seconds = run_proxy(
        model, proxy, noise, context, c.steps, genomes)
    if full is None:
      full = {"fitness": values.mean(1), "row_steps": row_steps,
              "tokens": tokens, "seconds": seconds}
    for s in sorted({1, 2, args.samples}):
      if s > args.samples:
        continue
      fitness = values[:, :s].mean(1)
      share = s / args.samples
      row = {"row": "proxy", "proxy": proxy.name, **{
          k: v for k, v in dataclasses.asdict(proxy).items()
          if k != "name" and v is not None}, "samples": s,
             "row_steps": share * row_steps,
             "row_steps_ratio": share * row_steps / full["row_steps"],
             "tokens": tokens,
             # Row-steps x tokens: what the frames/size proxies save.
             "token_row_steps_ratio": share * row_steps * tokens
             / (full["row_steps"] * full["tokens"]),
             "seconds": share * seconds,
             "seconds_ratio": share * seconds / full["seconds"],
             "fitness": fitness.tolist()}
      rows.append(row)
      score(rows)
      print(f"{proxy.name} x{s}: rho {row['spearman']:.3f} (top half "
            f"{row['spearman_top_half']:.3f}, mutants "
            f"{row['spearman_mutants']:.3f}), token-rows "
            f"{row['token_row_steps_ratio']:.2f}, seconds "
            f"{row['seconds_ratio']:.2f} of the full fitness", flush=True)
    if out:
      pathlib.Path(out + ".partial").write_text(json.dumps(rows))
  settings = {
      "model": "shipped demo model (astraea_jax/demo_model)"
               if not args.small else "untrained DemoConfig.small()",
      "steps": c.steps, "video": [c.frames, c.height, c.width],
      "guidance": c.guidance, "shift": c.shift, "captions": captions,
      "seeds": seeds, "budgets": list(BUDGETS),
      "random_per_budget": args.per_budget, "mutants": args.mutants,
      "mutant_parent": "shipped schedule of mean budget 0.4",
      "eval_config": EVAL,
      "fitness": "MSE of the final video vs the full model, mean over the "
                 "samples (pixel space: latent = decoded video)",
      "cost": "row-steps computed for the candidates (x tokens per row: "
              "token_row_steps) and wall seconds after warm-up genomes, "
              "same process; s-sample rows: s/S of the S-sample run (the "
              "same rows)",
      "device": jax.devices()[0].device_kind,
      "device_note": "CPU of the development machine (2 cores, shared "
                     "with another job: seconds are noisy, row-steps are "
                     "exact)",
      "seconds_total": time.perf_counter() - t_all}
  targets = targets_of(rows)
  if out:
    common.write_results(out, "search_proxy", settings, rows, targets)
    pathlib.Path(out + ".partial").unlink(missing_ok=True)
  print(json.dumps(targets, indent=1))


def admitted(row) -> bool:
  """rho >= TARGET over all candidates and over the better half (ours: the
  search decides near the top); a proxy on fewer samples also against the
  samples it lacks (it must rank like samples it never saw)."""
  keys = ["spearman", "spearman_top_half"]
  if "spearman_other_samples" in row:
    keys += ["spearman_other_samples", "spearman_other_samples_top_half"]
  return all(row[k] >= TARGET for k in keys)


def targets_of(rows) -> list:
  """The rank correlations of the cheapest admitted proxy (by row-steps x
  tokens); where none is admitted, each target shows the best value of
  the proxies cheaper than the full fitness."""
  cheaper = [r for r in rows if r["row"] == "proxy"
             and r["token_row_steps_ratio"] < 1.0]
  size = max(r["samples"] for r in rows if r.get("proxy") == "full")
  passing = [r for r in cheaper if admitted(r)]
  targets = []
  for name, key in (("rank_correlation", "spearman"),
                    ("rank_correlation_top_half", "spearman_top_half")):
    best = (min(passing, key=lambda r: r["token_row_steps_ratio"])
            if passing else max(cheaper, key=lambda r: r[key]))
    targets.append({
        "name": name, "value": best[key], "op": ">=", "target": TARGET,
        "met": best[key] >= TARGET, "admitted": admitted(best),
        "proxy": best["proxy"],
        "samples": best["samples"],
        "described": f"{best['proxy']} problem on the first "
                     f"{best['samples']} of the {size} samples",
        "token_row_steps_ratio": best["token_row_steps_ratio"],
        "seconds_ratio": best["seconds_ratio"]})
  return targets


def rescore(path):
  """Recomputes the rank statistics and targets of a results file from its
  fitness lists (no model) and rewrites it."""
  doc = json.loads(pathlib.Path(path).read_text())
  rows = score(doc["rows"])
  measured = doc["settings"].get("measured_commit") or doc.get("commit")
  settings = {**doc["settings"], "measured_commit": measured, "rescored": (
      "rank statistics and targets recomputed (--rescore) from the stored "
      "fitness lists by a later commit; fitness and costs measured at "
      f"commit {measured} (measured_commit)")}
  common.write_results(path, "search_proxy", settings, rows,
                       targets_of(rows))


if __name__ == "__main__":
  main()
