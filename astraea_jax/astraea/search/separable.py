"""The cheap search: a fitness model separable over steps, optimised exactly.

  astraea search --method dp --model wan-1.3b/ --target-budget 0.4 ...

Model (ours; issue #22): the quality loss of a schedule is the sum over its
steps of what each step's budget costs on its own,

    F(g) ~ F(base) + sum_t c_t(g_t),
    c_t(b) = F(base with step t at budget b) - F(base),

measured by perturbing ONE step at a time of a base schedule (the full
model by default, so c_t(10) = 0 and one measurement serves every target
budget). All perturbations of step t share the base trajectory up to t
(the prefix tree of `TreeFitness`), so step t's row costs T - t denoising
steps per sample and per measured budget. Budgets not measured at a step
are filled from a budget profile: c_t(b) = c_t(ref) * phi(b), phi(b) the
median over the profile steps (where every budget is measured) of
c_s(b) / c_s(ref).

The sum is minimised exactly by dynamic programming over the 0.1 grid
(`solve`): the first gene fixed at 10 (nothing is cached before step 0),
the sum of tenths in the search's band (`SearchConfig.budget_band`), in
O(T * 10T * 11) operations. Whether the model ranks schedules like the
real fitness is measured, not assumed (benchmarks/search_dp_demo.py).

Cost at T steps and S samples: S * (3T + sum_t m_t (T - t)) row-steps at
most, m_t the budgets measured at step t (`count_row_steps`), against
the GA's ~ (population + children x generations) * T * S.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib

import numpy as np
import tqdm

from astraea_jax import outputs
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea.search.genetic import (
    FULL,
    SearchConfig,
    from_schedule,
    to_schedule,
)

DP_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DPConfig:
  """What the separable model measures.

  genes: budgets (tenths, < 10) measured at every step (the others are
    filled from the profile); ref_gene (the profile's reference) must be
    one of them.
  profile_steps: steps where every budget 0..9 is measured (None: the
    last `profile_count` steps, the cheapest: a late step's perturbation
    runs few steps). With genes = all of 0..9 no profile is needed.
  """

  genes: tuple[int, ...] = (0, 5)
  ref_gene: int = 0
  profile_count: int = 3
  profile_steps: tuple[int, ...] | None = None
  # The trajectory perturbed: "full" (the full model: one measurement for
  # every target budget) or "default" (`schedule.default_schedule` of the
  # target: the costs include the staleness of neighbouring sparse steps;
  # budget 1.0 is measured too, its cost is a gain).
  base: str = "full"
  # Also evaluate `schedule.default_schedule` of the target and return it
  # where it measures better than the DP's optimum (as the GA seeds its
  # population with it: never worse than the default).
  include_default: bool = True

  def __post_init__(self):
    genes = tuple(sorted(set(int(g) for g in self.genes)))
    object.__setattr__(self, "genes", genes)
    if not genes or genes[0] < 0 or genes[-1] >= FULL:
      raise ValueError(f"genes={self.genes} must be tenths in [0, {FULL})")
    if self.ref_gene not in genes:
      raise ValueError(f"{self.ref_gene=} must be one of genes={genes}")
    if self.profile_count < 0:
      raise ValueError(f"{self.profile_count=} must be >= 0")
    if self.base not in ("full", "default"):
      raise ValueError(f"{self.base=} must be 'full' or 'default'")

  @property
  def complete(self) -> bool:
    return self.genes == tuple(range(FULL))

  def base_genome(self, config: SearchConfig) -> np.ndarray:
    """The perturbed trajectory's genome for a search config."""
    if self.base == "full":
      return np.full(config.steps, FULL, np.int32)
    genome = from_schedule(schedule_lib.default_schedule(
        config.target_budget, config.steps))
    lo, hi = config.budget_band()
    if not lo <= genome.sum() <= hi:
      raise ValueError(f"the default schedule of {config.target_budget:g} "
                       f"has {genome.sum()} tenths, outside the band "
                       f"[{lo}, {hi}]")
    return genome

  def plan(self, steps: int, base=None) -> dict[int, tuple[int, ...]]:
    """{step: genes measured there} for steps 1..steps-1 (never the base's
    own gene; 10 too where the base is not full)."""
    base = np.full(steps, FULL) if base is None else np.asarray(base)
    plan = self._plan(steps)
    return {t: tuple(g for g in genes + ((FULL,) if base[t] != FULL
                                         else ()) if g != base[t])
            for t, genes in plan.items()}

  def _plan(self, steps: int) -> dict[int, tuple[int, ...]]:
    if self.complete:
      return {t: self.genes for t in range(1, steps)}
    profile = self.profile_steps
    if profile is None:
      count = min(self.profile_count, steps - 1)
      profile = tuple(range(steps - count, steps))
    bad = [t for t in profile if not 1 <= t < steps]
    if bad:
      raise ValueError(f"profile steps {bad} outside 1..{steps - 1}")
    return {t: tuple(range(FULL)) if t in profile else self.genes
            for t in range(1, steps)}

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["genes"] = list(self.genes)
    d["profile_steps"] = (None if self.profile_steps is None
                          else list(self.profile_steps))
    return d


def count_row_steps(steps: int, samples: int, config: DPConfig) -> int:
  """Row-steps (one candidate, one sample, one CFG step) the DP search
  computes at most with prefix sharing: the base (= reference) trajectory
  and its last step again for its own fitness, each perturbation of step
  t from t to the end, the chosen schedule and the default schedule
  (after their first step; less where they start with more full steps)."""
  plan = config.plan(steps)
  per_sample = steps + 1 + sum(len(g) * (steps - t) for t, g in plan.items())
  return samples * (per_sample + (steps - 1) * (1 + config.include_default))


# Exact optimum ---------------------------------------------------------------


def solve(costs, lo: int, hi: int) -> tuple[np.ndarray, float]:
  """The genome minimising sum_t costs[t, g_t] with g_0 = 10 and
  lo <= sum_t g_t <= hi, by dynamic programming over (step, sum of tenths).

  costs: (T, 11) finite floats (row 0 is ignored: step 0 is budget 1.0).
  Ties go to the larger budget at the later step, then to the smaller sum:
  deterministic. Returns (genome int32 (T,), its total cost). A ValueError
  when no genome fits the band.
  """
  costs = np.asarray(costs, np.float64)
  steps = costs.shape[0]
  if costs.ndim != 2 or costs.shape[1] != FULL + 1 or steps < 1:
    raise ValueError(f"costs must be (steps >= 1, {FULL + 1}); got "
                     f"{costs.shape}")
  if not np.isfinite(costs[1:]).all():
    raise ValueError("costs must be finite (fill unmeasured budgets first)")
  lo, hi = max(lo, FULL), min(hi, FULL * steps)
  if lo > hi:
    raise ValueError(f"no genome of {steps} steps starting at {FULL} has a "
                     f"sum of tenths in [{lo}, {hi}]")
  width = FULL * steps + 1
  best = np.full(width, np.inf)
  best[FULL] = 0.0
  choice = np.zeros((steps, width), np.int8)
  choice[0, FULL] = FULL
  for t in range(1, steps):
    new = np.full(width, np.inf)
    pick = np.zeros(width, np.int8)
    for g in range(FULL, -1, -1):       # strict <: the larger gene wins ties
      cand = np.full(width, np.inf)
      cand[g:] = best[:width - g] + costs[t, g]
      better = cand < new
      new[better], pick[better] = cand[better], g
    best, choice[t] = new, pick
  window = best[lo:hi + 1]
  total = lo + int(np.argmin(window))   # the smaller sum wins ties
  value = float(best[total])
  genome = np.zeros(steps, np.int32)
  for t in range(steps - 1, -1, -1):
    genome[t] = choice[t, total]
    total -= genome[t]
  return genome, value


def brute_force(costs, lo: int, hi: int) -> tuple[np.ndarray, float]:
  """`solve` by enumeration of all 11^(T-1) genomes (tests, T <= 6)."""
  costs = np.asarray(costs, np.float64)
  steps = costs.shape[0]
  best, best_genome = np.inf, None
  for tail in itertools.product(range(FULL + 1), repeat=steps - 1):
    total = FULL + sum(tail)
    if lo <= total <= hi:
      value = sum(costs[t + 1, g] for t, g in enumerate(tail))
      if value < best:
        best, best_genome = value, np.asarray((FULL,) + tail, np.int32)
  return best_genome, float(best)


# The cost table --------------------------------------------------------------


def fill_costs(measured: dict, steps: int, config: DPConfig,
               base=None) -> np.ndarray:
  """(steps, 11) cost table from measured {(t, gene): c_t(gene)}.

  The base's own gene costs 0 (base None: the full model, gene 10);
  unmeasured genes are c_t(ref) * phi(gene), phi the median ratio over
  the steps where the gene and ref were both measured (0 where ref cost 0).
  """
  base = np.full(steps, FULL) if base is None else np.asarray(base)
  table = np.full((steps, FULL + 1), np.nan)
  table[0] = 0.0
  for t in range(1, steps):
    table[t, base[t]] = 0.0
  for (t, g), value in measured.items():
    table[t, g] = value
  ref = config.ref_gene
  missing = np.isnan(table[1:]).any(axis=1)
  if missing.any():
    phi = np.ones(FULL + 1)
    for g in range(FULL + 1):
      rows = [t for t in range(1, steps)
              if not np.isnan(table[t, g]) and not np.isnan(table[t, ref])
              and table[t, ref] != 0]
      if rows:
        phi[g] = float(np.median([table[t, g] / table[t, ref]
                                  for t in rows]))
    for t in range(1, steps):
      gaps = np.isnan(table[t])
      table[t, gaps] = table[t, ref] * phi[gaps]
  if np.isnan(table[1:]).any():
    raise ValueError("the measurements leave budgets unfilled: measure "
                     f"gene {ref} (ref_gene) at every step")
  return table


# The search ------------------------------------------------------------------


@dataclasses.dataclass
class DPResult:
  genome: np.ndarray
  schedule: np.ndarray
  fitness: float                  # the real fitness of the chosen genome
  predicted: float                # F(base) + the model's sum
  costs: np.ndarray               # (steps, 11) filled table
  measured: dict                  # {(t, gene): c_t(gene)}
  base_fitness: float
  genomes_evaluated: int
  chosen: str = "dp"             # "default" where the default measured better


def _state_doc(measured, base_fitness, search_config, dp_config,
               fingerprint):
  return {"version": DP_STATE_VERSION, "method": "dp",
          "config": search_config.to_dict(), "dp": dp_config.to_dict(),
          "fingerprint": fingerprint, "base_fitness": base_fitness,
          "measured": [[t, g, v] for (t, g), v in sorted(measured.items())]}


def save_state(path, measured, base_fitness, search_config, dp_config,
               fingerprint):
  """Atomic JSON checkpoint of the measured costs (temp file + rename)."""
  outputs.write_json(path, _state_doc(measured, base_fitness, search_config,
                                      dp_config, fingerprint),
                     indent=None, durable=True)


def load_state(path, search_config, dp_config, fingerprint):
  """(measured, base_fitness) of a DP checkpoint; a ValueError if it
  belongs to another search (settings or problem)."""
  try:
    doc = json.loads(pathlib.Path(path).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not a search state ({e})") from e
  if doc.get("method") != "dp" or doc.get("version") != DP_STATE_VERSION:
    raise ValueError(f"{path}: not a --method dp search state (method "
                     f"{doc.get('method', 'ga')!r}, version "
                     f"{doc.get('version')!r})")
  # From the full model, the target budget only enters the DP's last
  # (free) step.
  free = ("target_budget", "band") if dp_config.base == "full" else ()
  keep = lambda d: {k: v for k, v in d.items() if k not in free}
  if (keep(doc["config"]) != keep(search_config.to_dict())
      or doc["dp"] != dp_config.to_dict()):
    raise ValueError(f"{path} was written by a search with other settings")
  if doc.get("fingerprint") != fingerprint:
    raise ValueError(f"{path} was written for another model, samples or "
                     "evaluation settings")
  return ({(int(t), int(g)): float(v) for t, g, v in doc["measured"]},
          float(doc["base_fitness"]))


def search(fitness_fn, config: SearchConfig, dp_config: DPConfig = DPConfig(),
           *, state_path=None, resume: bool = False,
           progress: bool = True) -> DPResult:
  """Measures the step costs (one step at a time, from the full model's
  trajectory), solves the DP for `config`'s band and evaluates the chosen
  genome once. fitness_fn: genomes (n, steps) -> (n,), as the GA's (its
  `retain` keeps the base trajectory memoised between steps).

  With `state_path` the measured costs are checkpointed after every step;
  `resume` continues from there (same numbers as an uninterrupted run).
  """
  steps = config.steps
  fingerprint = getattr(fitness_fn, "fingerprint", None)
  retain = getattr(fitness_fn, "retain", None)
  base = dp_config.base_genome(config)
  measured, base_fitness = {}, None
  if resume:
    if state_path is None or not pathlib.Path(state_path).exists():
      raise FileNotFoundError(f"--resume: no search state at {state_path}")
    measured, base_fitness = load_state(state_path, config, dp_config,
                                        fingerprint)
  if base_fitness is None:
    base_fitness = float(fitness_fn(base[None])[0])
  plan = dp_config.plan(steps, base)
  todo = [t for t in plan if any((t, g) not in measured for g in plan[t])]
  bar = tqdm.tqdm(total=len(plan), initial=len(plan) - len(todo),
                  disable=not progress, desc="dp: step costs", unit="step")
  evaluated = 1
  for t in todo:
    if retain is not None:
      retain(base[None])
    genes = [g for g in plan[t] if (t, g) not in measured]
    genomes = np.repeat(base[None], len(genes), axis=0)
    genomes[:, t] = genes
    values = np.asarray(fitness_fn(genomes), np.float64)
    evaluated += len(genes)
    for g, v in zip(genes, values):
      measured[(t, g)] = float(v) - base_fitness
    if state_path is not None:
      save_state(state_path, measured, base_fitness, config, dp_config,
                 fingerprint)
    bar.update(1)
    bar.set_postfix(step=t, worst=f"{max(values) - base_fitness:.3g}")
  bar.close()
  costs = fill_costs(measured, steps, dp_config, base)
  lo, hi = config.budget_band()
  genome, value = solve(costs, lo, hi)
  if retain is not None:
    retain(base[None])
  fitness = float(fitness_fn(genome[None])[0])
  chosen = "dp"
  default = from_schedule(schedule_lib.default_schedule(config.target_budget,
                                                        steps))
  if (dp_config.include_default and lo <= default.sum() <= hi
      and not np.array_equal(default, genome)):
    default_fitness = float(fitness_fn(default[None])[0])
    evaluated += 1
    if default_fitness < fitness:
      genome, fitness, chosen = default, default_fitness, "default"
      value = float(costs[np.arange(steps), default].sum())
  if progress:
    which = ("the DP optimum" if chosen == "dp" else
             "the default: it measured better than the DP optimum")
    print(f"dp: {len(measured)} step costs measured; schedule ({which}), "
          f"mean budget {genome.mean() / FULL:.3f}, predicted fitness "
          f"{base_fitness + value:.4g}, measured {fitness:.4g}")
  return DPResult(genome=genome, schedule=to_schedule(genome),
                  fitness=fitness, predicted=base_fitness + value,
                  costs=costs, measured=measured, base_fitness=base_fitness,
                  genomes_evaluated=evaluated + 1, chosen=chosen)
