"""Genetic operators of the budget search: genomes, crossover, mutation,
repair, selection (pure functions, one explicit PRNG key each)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from astraea_jax.astraea import schedule as schedule_lib

F32 = jnp.float32
FULL = 10  # a gene of 10 tenths = budget 1.0


# Configuration ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Options of the genetic algorithm; defaults are the paper's settings."""

  target_budget: float = 0.4
  steps: int = 50
  population: int = 50
  children: int = 30
  generations: int = 30
  # Feasible mean budgets: [band[0], band[1]] x target_budget.
  band: tuple[float, float] = (0.9, 1.1)
  # Per-gene mutation probability, geometric from start (generation 1) to
  # end (last generation).
  mutation_start: float = 0.1
  mutation_end: float = 0.01
  # Probability that a child is bred by block (else uniform) crossover.
  block_crossover: float = 0.5
  tournament: int = 2
  # Seed the initial population with `schedule.default_schedule` (ours: the
  # search then never returns a schedule worse than the default).
  include_default: bool = True
  seed: int = 0

  def __post_init__(self):
    if not 0.0 < self.target_budget <= 1.0:
      raise ValueError(f"{self.target_budget=} must lie in (0, 1]")
    for name in ("steps", "population", "children"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
    if self.generations < 0:
      raise ValueError(f"{self.generations=} must be >= 0")
    lo, hi = self.band
    if not 0.0 < lo <= 1.0 <= hi:
      raise ValueError(f"{self.band=} must satisfy 0 < band[0] <= 1 <= "
                       "band[1]")
    if not 0.0 < self.mutation_end <= self.mutation_start <= 1.0:
      raise ValueError(f"need 0 < {self.mutation_end=} <= "
                       f"{self.mutation_start=} <= 1")
    if not 0.0 <= self.block_crossover <= 1.0:
      raise ValueError(f"{self.block_crossover=} must lie in [0, 1]")
    if not 1 <= self.tournament <= self.population:
      raise ValueError(f"{self.tournament=} must lie in [1, "
                       f"{self.population=}]")
    lo_tenths, hi_tenths = self.budget_band()
    if hi_tenths < FULL or lo_tenths > hi_tenths:
      raise ValueError(
          f"no feasible schedule: {self.target_budget=} x {self.band} over "
          f"{self.steps=} allows {lo_tenths}..{hi_tenths} tenths in total, "
          f"but the first step alone spends {FULL} (budget 1.0); raise the "
          "target or the number of steps")

  def budget_band(self) -> tuple[int, int]:
    """Feasible sums of tenths (lo, hi), inclusive."""
    tenths = self.target_budget * self.steps * FULL
    lo = max(FULL, math.ceil(self.band[0] * tenths - 1e-9))
    hi = min(FULL * self.steps, math.floor(self.band[1] * tenths + 1e-9))
    return lo, hi

  def mutation_rate(self, generation: int) -> float:
    """p_g of generation g = 1..generations (geometric decay)."""
    if self.generations <= 1:
      return self.mutation_start
    frac = (generation - 1) / (self.generations - 1)
    return self.mutation_start * (self.mutation_end
                                  / self.mutation_start) ** frac

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["band"] = list(self.band)
    return d


# Genomes <-> schedules -------------------------------------------------------


def to_schedule(genome) -> np.ndarray:
  """Tenths (T,) -> budgets (T,) float64 on the grid."""
  return schedule_lib.GRID[np.asarray(genome, np.int64)]


def from_schedule(budgets) -> np.ndarray:
  """Budgets on the 0.1 grid -> tenths int32; a ValueError off the grid."""
  budgets = np.asarray(budgets, np.float64)
  tenths = np.round(budgets * FULL)
  if np.abs(tenths - budgets * FULL).max(initial=0) > 1e-6:
    raise ValueError(f"budgets {budgets.tolist()} are not on the 0.1 grid")
  return tenths.astype(np.int32)


# Population operators (pure, one explicit key each) ---------------------------


def repair(key, genome, *, lo: int, hi: int):
  """Genome with gene 0 = 10 and lo <= sum <= hi, changed as little as needed.

  Think of gene i as 10 unit slots, the first g_i of them filled. If the
  sum is above hi, (sum - hi) filled slots of steps 1.. are emptied; if
  below lo, (lo - sum) empty slots are filled; the slots are chosen
  uniformly at random (a random priority per slot, the top ones win), so
  large genes give up tenths more often than small ones.
  """
  steps = genome.shape[0]
  genome = jnp.clip(genome, 0, FULL).at[0].set(FULL)
  total = genome.sum()
  removing = total > hi
  need = jnp.where(removing, total - hi, jnp.maximum(lo - total, 0))
  filled = jnp.arange(FULL)[None, :] < genome[:, None]          # (T, 10)
  movable = (jnp.arange(steps) > 0)[:, None] & jnp.where(removing, filled,
                                                         ~filled)
  priority = jnp.where(movable, jax.random.uniform(key, (steps, FULL)), -1.0)
  order = jnp.argsort(-priority.ravel(), stable=True)
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size))
  chosen = (rank.reshape(steps, FULL) < need) & movable
  change = chosen.sum(axis=1).astype(genome.dtype)
  return genome + jnp.where(removing, -change, change)


def random_genome(key, steps: int, *, lo: int, hi: int):
  """Genes uniform on the grid (gene 0 = 10), then repaired into the band."""
  k_genes, k_repair = jax.random.split(key)
  genome = jax.random.randint(k_genes, (steps,), 0, FULL + 1, jnp.int32)
  return repair(k_repair, genome, lo=lo, hi=hi)


def uniform_crossover(key, a, b):
  """Each gene from a or b with probability 1/2."""
  return jnp.where(jax.random.bernoulli(key, 0.5, a.shape), b, a)


def block_crossover(key, a, b):
  """a with one contiguous block [i, j) taken from b (i <= j uniform)."""
  cuts = jnp.sort(jax.random.randint(key, (2,), 0, a.shape[0] + 1))
  pos = jnp.arange(a.shape[0])
  return jnp.where((pos >= cuts[0]) & (pos < cuts[1]), b, a)


def mutate(key, genome, rate):
  """Each gene after the first becomes another grid value w.p. `rate`."""
  k_where, k_value = jax.random.split(key)
  hit = jax.random.bernoulli(k_where, rate, genome.shape)
  hit = hit & (jnp.arange(genome.shape[0]) > 0)
  # Uniform over the 10 values other than the current one.
  value = jax.random.randint(k_value, genome.shape, 0, FULL, genome.dtype)
  value = value + (value >= genome)
  return jnp.where(hit, value, genome)


def tournament(key, fitness, size: int):
  """Index of the fittest (lowest) of `size` members drawn with replacement."""
  idx = jax.random.randint(key, (size,), 0, fitness.shape[0])
  return idx[jnp.argmin(fitness[idx])]


def make_child(key, population, fitness, rate, *, config: SearchConfig):
  """One child: tournament parents -> crossover -> mutation -> repair."""
  lo, hi = config.budget_band()
  k_a, k_b, k_kind, k_cross, k_mut, k_rep = jax.random.split(key, 6)
  a = population[tournament(k_a, fitness, config.tournament)]
  b = population[tournament(k_b, fitness, config.tournament)]
  child = jnp.where(jax.random.bernoulli(k_kind, config.block_crossover),
                    block_crossover(k_cross, a, b),
                    uniform_crossover(k_cross, a, b))
  child = mutate(k_mut, child, rate)
  return repair(k_rep, child, lo=lo, hi=hi)


@functools.partial(jax.jit, static_argnames=("config",))
def make_children(key, population, fitness, rate, *, config: SearchConfig):
  """(children, steps) int32: `make_child` vmapped over children keys."""
  keys = jax.random.split(key, config.children)
  return jax.vmap(functools.partial(make_child, config=config),
                  in_axes=(0, None, None, None))(
                      keys, population, jnp.asarray(fitness, F32),
                      jnp.asarray(rate, F32))


@functools.partial(jax.jit, static_argnames=("config",))
def initial_population(key, *, config: SearchConfig):
  """(population, steps) int32 random feasible genomes; member 0 is the
  repaired default schedule when `config.include_default`."""
  lo, hi = config.budget_band()
  keys = jax.random.split(key, config.population + 1)
  genomes = jax.vmap(functools.partial(random_genome, steps=config.steps,
                                       lo=lo, hi=hi))(keys[1:])
  if config.include_default:
    default = from_schedule(schedule_lib.default_schedule(
        config.target_budget, config.steps))
    genomes = genomes.at[0].set(repair(keys[0], jnp.asarray(default),
                                       lo=lo, hi=hi))
  return genomes


def select_survivors(genomes, fitness, size: int) -> np.ndarray:
  """Indices of the `size` best genomes, elitist and deterministic.

  Order: distinct genomes before repeats, then fitness (NaN last), then
  position (parents come first, so ties keep the incumbent).
  """
  genomes = np.asarray(genomes)
  seen, repeat = set(), np.zeros(len(genomes), bool)
  for i, g in enumerate(map(tuple, genomes.tolist())):
    repeat[i] = g in seen
    seen.add(g)
  fitness = np.asarray(fitness, np.float64)
  order = np.lexsort((np.arange(len(genomes)), fitness, repeat))
  return order[:size]
