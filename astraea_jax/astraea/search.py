"""Evolutionary search of the per-step token budget (Astraea, sec. 3.3).

  astraea search --model wan-1.3b/ --target-budget 0.4 \
      --text-embeddings p0.safetensors p1.safetensors ... --out search/

Genome: one budget per denoising step on `schedule.GRID` = {0, 0.1, ..., 1},
stored as int32 tenths (0..10). The first gene is always 10: the sampler
caches nothing before step 0. A genome is feasible when its mean budget
lies in [0.9, 1.1] x the target (`SearchConfig.band`), i.e. its sum of
tenths lies in `budget_band()`.

One generation (all operators are pure functions of explicit PRNG keys,
vmapped over the children, so one seed gives one result):
  1. parents: tournament selection on the fitness (lower is better);
  2. crossover: uniform (each gene from either parent) or block (one
     contiguous run of genes from the second parent);
  3. mutation: each gene after the first is redrawn with probability p_g,
     decaying geometrically from 0.1 (first generation) to 0.01 (last);
  4. repair: the first gene back to 10 and the sum of tenths moved into the
     band by adding/removing single tenths at random;
  5. fitness of the new children; elitist survival: the `population` best
     distinct genomes of parents + children.

Fitness (`TreeFitness`): the MSE between the final latents of the
accelerated sampler and of the full model, averaged over a few samples
(prompt, noise). Candidates run through `wan_tokenwise.forward_masked` (the
masked dense simulation of the sparse path: one compile for any budget)
inside the CFG step `guided_step`, as one vmapped batch of rows
(candidate x sample), sharded over a "data" mesh axis of all devices (one
code path for 1..N devices). `EvalConfig(evaluator="sparse")` runs the
sampler's own sparse path instead (a step costs ~ its budget, not a full
step; one compile per budget; equal to the masked numbers up to float
rounding).

Cheaper than evaluating every candidate from scratch, without changing any
number (each row's result depends only on its own inputs: the batch shape
is fixed and rows never mix):
  * identical genomes are evaluated once (the search's fitness cache);
  * genomes sharing a prefix share its trajectory: a generation is
    evaluated as a prefix tree, level by level (step by step), each distinct
    prefix once (`PrefixTree`);
  * prefix states are memoised across generations (bounded; pruned to the
    survivors' prefixes, from which every child is bred);
  * the full model's trajectory is the all-10 genome of the same tree,
    computed once.
How much of this fits in memory is set by `EvalConfig` (sized from the
device memory by default); `TreeCounter` replays a search's calls under
other settings without the model, to count what they would compute.
Proxies (fewer frames, lower resolution, fewer samples) are a separate
`Problem` that `run_files` uses only after measuring its rank correlation
with the full fitness (`rank_correlation`).

Search state is checkpointed after every generation (`save_state`); a
resumed search ends with exactly the uninterrupted result.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import pathlib
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from astraea_jax import checkpoint
from astraea_jax.astraea import wan_tokenwise as astraea_sampler
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.sampling import sampler as dense_sampler

F32 = jnp.float32
FULL = 10  # a gene of 10 tenths = budget 1.0
STATE_FILE = "search_state.json"
STATE_VERSION = 1


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


# The search loop -------------------------------------------------------------


@dataclasses.dataclass
class SearchState:
  """Everything the next generation needs; saved after every generation."""
  generation: int
  key_data: np.ndarray           # uint32 PRNG key data
  population: np.ndarray         # (population, steps) int32
  fitness: np.ndarray            # (population,) float64
  fitness_cache: dict            # genome tuple -> float
  history: list                  # per generation: best, mean, new genomes

  def to_json(self, config: SearchConfig, fingerprint) -> dict:
    return {"version": STATE_VERSION, "config": config.to_dict(),
            "fingerprint": fingerprint, "generation": self.generation,
            "key_data": self.key_data.tolist(),
            "population": self.population.tolist(),
            "fitness": [float(f) for f in self.fitness],
            "fitness_cache": {",".join(map(str, g)): float(f)
                              for g, f in self.fitness_cache.items()},
            "history": self.history}

  @classmethod
  def from_json(cls, doc) -> SearchState:
    return cls(generation=int(doc["generation"]),
               key_data=np.asarray(doc["key_data"], np.uint32),
               population=np.asarray(doc["population"], np.int32),
               fitness=np.asarray(doc["fitness"], np.float64),
               fitness_cache={tuple(int(x) for x in g.split(",")): float(f)
                              for g, f in doc["fitness_cache"].items()},
               history=list(doc["history"]))


def save_state(path, state: SearchState, config: SearchConfig, fingerprint):
  """Atomic JSON checkpoint: write a temp file, fsync, rename over `path`.

  JSON (not orbax): the state is a few hundred KB of ints and floats,
  Python writes floats with repr (exact round trip, so a resumed run is bit
  for bit the uninterrupted one), and the file is readable by eye. A kill at
  any moment leaves either the previous or the new file, never a mix.
  """
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(state.to_json(config, fingerprint), f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def load_state(path, config: SearchConfig, fingerprint) -> SearchState:
  """The checkpoint at `path`; a ValueError if it belongs to another search."""
  try:
    doc = json.loads(pathlib.Path(path).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not a search state ({e})") from e
  if doc.get("version") != STATE_VERSION:
    raise ValueError(f"{path}: search state version {doc.get('version')} "
                     f"!= {STATE_VERSION}")
  saved = doc["config"]
  diff = {k: (saved.get(k), v) for k, v in config.to_dict().items()
          if saved.get(k) != v}
  if diff:
    raise ValueError(f"{path} was written by a search with other settings "
                     f"(saved, now): {diff}")
  if doc.get("fingerprint") != fingerprint:
    raise ValueError(
        f"{path} was written for another model, samples or evaluation "
        f"settings (fingerprint {doc.get('fingerprint')!r} != "
        f"{fingerprint!r})")
  return SearchState.from_json(doc)


@dataclasses.dataclass
class SearchResult:
  genome: np.ndarray             # (steps,) int32 tenths
  schedule: np.ndarray           # (steps,) float64 budgets
  fitness: float
  population: np.ndarray
  population_fitness: np.ndarray
  history: list
  genomes_evaluated: int         # distinct genomes whose fitness was computed
  genomes_requested: int         # population + children x generations


def _evaluate_cached(fitness_fn, genomes, cache: dict):
  """Fitness of every genome, computing only genomes not yet in `cache`."""
  keys = [tuple(g) for g in np.asarray(genomes).tolist()]
  new = list(dict.fromkeys(k for k in keys if k not in cache))
  if new:
    values = np.asarray(fitness_fn(np.asarray(new, np.int32)), np.float64)
    if values.shape != (len(new),):
      raise ValueError(f"fitness returned {values.shape}; expected "
                       f"({len(new)},)")
    cache.update(zip(new, values.tolist()))
  return np.asarray([cache[k] for k in keys], np.float64), len(new)


def _history_entry(generation, fitness, new):
  return {"generation": generation, "best": float(np.nanmin(fitness)),
          "mean": float(np.nanmean(fitness)), "new_genomes": int(new)}


def search(fitness_fn: Callable, config: SearchConfig, *, state_path=None,
           resume: bool = False, progress: bool = True) -> SearchResult:
  """Runs the genetic algorithm; lower fitness is better.

  Args:
    fitness_fn: genomes (n, steps) int32 tenths -> (n,) fitness. Optional
      attributes: `fingerprint` (str identifying the problem, checked on
      resume) and `retain(population)` (called after each survival step).
    config: the algorithm's options.
    state_path: checkpoint file written atomically after every generation.
    resume: continue from `state_path` (must exist and match the config).
  Returns the best genome of the last generation and the run's history;
  with `resume` exactly the result of the uninterrupted run.
  """
  fingerprint = getattr(fitness_fn, "fingerprint", None)
  retain = getattr(fitness_fn, "retain", None)
  if resume:
    if state_path is None or not pathlib.Path(state_path).exists():
      raise FileNotFoundError(f"--resume: no search state at {state_path}")
    state = load_state(state_path, config, fingerprint)
  else:
    key, k_init = jax.random.split(jax.random.key(config.seed))
    population = np.asarray(initial_population(k_init, config=config))
    cache = {}
    fitness, new = _evaluate_cached(fitness_fn, population, cache)
    state = SearchState(0, np.asarray(jax.random.key_data(key)), population,
                        fitness, cache, [_history_entry(0, fitness, new)])
    if state_path is not None:
      save_state(state_path, state, config, fingerprint)
  if retain is not None:
    retain(state.population)
  bar = tqdm.tqdm(total=config.generations, initial=state.generation,
                  disable=not progress, desc="search", unit="gen")
  bar.set_postfix(best=f"{state.history[-1]['best']:.4g}",
                  mean=f"{state.history[-1]['mean']:.4g}")
  for generation in range(state.generation + 1, config.generations + 1):
    key, k_children = jax.random.split(
        jax.random.wrap_key_data(state.key_data))
    children = np.asarray(make_children(
        k_children, state.population, state.fitness,
        config.mutation_rate(generation), config=config))
    child_fitness, new = _evaluate_cached(fitness_fn, children,
                                          state.fitness_cache)
    pool = np.concatenate([state.population, children])
    pool_fitness = np.concatenate([state.fitness, child_fitness])
    keep = select_survivors(pool, pool_fitness, config.population)
    state = SearchState(
        generation, np.asarray(jax.random.key_data(key)), pool[keep],
        pool_fitness[keep], state.fitness_cache,
        state.history + [_history_entry(generation, pool_fitness[keep],
                                        new)])
    if state_path is not None:
      save_state(state_path, state, config, fingerprint)
    if retain is not None:
      retain(state.population)
    bar.update(1)
    bar.set_postfix(best=f"{state.history[-1]['best']:.4g}",
                    mean=f"{state.history[-1]['mean']:.4g}", new=new)
  bar.close()
  best = int(np.argmin(np.nan_to_num(state.fitness, nan=np.inf)))
  return SearchResult(
      genome=state.population[best], schedule=to_schedule(
          state.population[best]), fitness=float(state.fitness[best]),
      population=state.population, population_fitness=state.fitness,
      history=state.history, genomes_evaluated=len(state.fitness_cache),
      genomes_requested=config.population
      + config.children * config.generations)


# Fitness: masked simulation over a prefix tree -------------------------------

EVALUATORS = ("masked", "sparse")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """How `TreeFitness` runs the candidates.

  Only `scheduler`, `guidance_scale`, `shift` and `selection` change the
  numbers; the rest trades memory for time.
  """

  scheduler: str = "unipc"
  guidance_scale: float = 5.0
  shift: float | None = None        # None: by video size, as `sample`
  selection: selection.SelectionConfig = dataclasses.field(
      default_factory=selection.SelectionConfig)
  # "masked": `forward_masked`, every budget in one compiled step (the
  # paper's setting; a step costs a dense step). "sparse": the sampler's own
  # sparse `forward`, nodes grouped by budget (one compile per budget, a
  # step costs ~ its budget; same numbers up to float rounding, see
  # tests/test_search.py).
  evaluator: str = "masked"
  # The four sizes below trade memory for time; None = chosen from the
  # device's memory (`resolve_sizes`; on devices that report none: all
  # samples in one pass, 4 nodes per call, no bound on lanes, 4096 memo
  # nodes).
  # Samples per pass. Passes run one after the other, each over its own
  # tree: a smaller node state, the same numbers.
  samples_per_pass: int | None = None
  # Tree nodes (candidate prefixes) per vmapped call; a node is one row per
  # sample of its pass. The call's shape is fixed (short batches are padded)
  # so a row's numbers never depend on what else is in the batch.
  batch_nodes: int | None = None
  # Genomes walked down the tree together; the live states are at most
  # 2 x lanes nodes.
  lanes: int | None = None
  # Prefix states memoised across generations, in nodes (split evenly over
  # the passes).
  memo_nodes: int | None = None
  # Share the trajectories of common prefixes (False: every genome from
  # scratch, the naive evaluation; for tests and counts).
  share_prefixes: bool = True

  def __post_init__(self):
    if self.evaluator not in EVALUATORS:
      raise ValueError(f"{self.evaluator=} must be one of {EVALUATORS}")
    for name in ("samples_per_pass", "batch_nodes", "lanes"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"{name}={value} must be >= 1 or None")
    if self.memo_nodes is not None and self.memo_nodes < 0:
      raise ValueError(f"{self.memo_nodes=} must be >= 0 or None")


# Share of device memory for each use of states under automatic sizing:
# the rows of one call (inputs + outputs), the live tree nodes, the memo.
# The remaining 40% is for parameters and activations.
STATE_MEMORY_SHARE = 0.2
MAX_ROWS_PER_CALL = 64


def resolve_sizes(config: EvalConfig, num_samples: int, row_bytes: int,
                  memory_bytes: int | None):
  """(samples_per_pass, batch_nodes, lanes, memo_nodes) for `config`.

  row_bytes: one sample's state (latents, scheduler, per-block cache).
  memory_bytes: the device's memory, or None when it reports none.
  Unset sizes: with memory M, a call's rows (in + out) get 0.2 M, the live
  nodes (2 x lanes) 0.2 M and the memo 0.2 M (at least one row per call
  and one lane; Wan2.1-1.3B at 480p with a float32 cache has 24 GB rows:
  one row per call on an H200).
  """
  budget = None if memory_bytes is None else STATE_MEMORY_SHARE * memory_bytes
  rows = MAX_ROWS_PER_CALL
  if budget is not None:
    rows = int(min(rows, max(1, budget // (2 * row_bytes))))
  per_pass = config.samples_per_pass or min(num_samples, rows)
  batch_nodes = config.batch_nodes or (
      4 if budget is None else max(1, rows // per_pass))
  node_bytes = per_pass * row_bytes
  lanes = config.lanes
  if lanes is None and budget is not None:
    lanes = max(1, int(budget // (2 * node_bytes)))
  memo_nodes = config.memo_nodes
  if memo_nodes is None:
    memo_nodes = 4096 if budget is None else int(budget // node_bytes)
  return min(per_pass, num_samples), batch_nodes, lanes, memo_nodes


def _velocity(graphdef, params, context_2, num_selected, config, masked,
              cache, latents_2, timesteps_2):
  model = nnx.merge(graphdef, params)
  if masked:
    return astraea_sampler.forward_masked(model, latents_2, timesteps_2,
                                          context_2, cache, num_selected,
                                          config=config)
  return astraea_sampler.forward(model, latents_2, timesteps_2, context_2,
                                 cache, num_selected=num_selected,
                                 config=config)


def _row_step(graphdef, params, scheduler, guidance_scale, contexts,
              num_selected, selection_config, masked, sample, state):
  """One CFG step of one row (candidate prefix, sample)."""
  latents, sched_state, cache = state
  model_fn = functools.partial(_velocity, graphdef, params, contexts[sample],
                               num_selected, selection_config, masked)
  return dense_sampler.guided_step(model_fn, scheduler, guidance_scale,
                                   latents, sched_state, cache)


def _map_rows(step, *rows):
  """jax.vmap over the leading (row) axis; one row runs unbatched, so the
  model and its kernels see exactly the sampler's shapes."""
  if jax.tree.leaves(rows)[0].shape[0] == 1:
    out = step(*jax.tree.map(lambda x: x[0], rows))
    return jax.tree.map(lambda x: x[None], out)
  return jax.vmap(step)(*rows)


@functools.partial(jax.jit, static_argnames=("selection_config",))
def _masked_rows_step(graphdef, params, scheduler, guidance_scale, contexts,
                      k_table, samples, genes, states, *, selection_config):
  """`_row_step` vmapped over rows, each with its own (traced) budget."""

  def step(sample, gene, state):
    return _row_step(graphdef, params, scheduler, guidance_scale, contexts,
                     k_table[gene], selection_config, True, sample, state)

  return _map_rows(step, samples, genes, states)


@functools.partial(jax.jit, static_argnames=("num_selected",
                                             "selection_config"))
def _sparse_rows_step(graphdef, params, scheduler, guidance_scale, contexts,
                      samples, states, *, num_selected, selection_config):
  """`_row_step` vmapped over rows that share one static K."""
  step = functools.partial(_row_step, graphdef, params, scheduler,
                           guidance_scale, contexts, num_selected,
                           selection_config, False)
  return _map_rows(step, samples, states)


@jax.jit
def _sample_mse(latents, reference):
  """Per-sample MSE (S,) between final latents (S, 1, C, F, H, W)."""
  return jnp.mean(jnp.square(latents - reference),
                  axis=tuple(range(1, latents.ndim)))


def _nbytes(tree):
  return sum(x.size * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _concat(trees):
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)


def _slice(tree, start, stop):
  return jax.tree.map(lambda x: x[start:stop], tree)


def _passes(num_samples, samples_per_pass):
  per_pass = samples_per_pass or num_samples
  return [np.arange(i, min(i + per_pass, num_samples))
          for i in range(0, num_samples, per_pass)]


def _nodes_per_call(batch_nodes, passes, num_devices):
  """batch_nodes rounded up so every pass's rows split evenly over devices
  (padding stays whole nodes)."""
  while any((batch_nodes * len(p)) % num_devices for p in passes):
    batch_nodes += 1
  return batch_nodes


class PrefixTree:
  """Which tree nodes a generation computes: the planner of `TreeFitness`.

  Genomes are walked down their prefix tree one level (denoising step) at a
  time; each distinct (pass, prefix) node is computed once from its parent,
  starting from the deepest prefix found in the memo. Subclasses say how a
  batch of nodes is stepped (`step_nodes`); `TreeCounter` only counts, so
  the cost of other settings can be replayed without the model.
  """

  def _init_tree(self, *, steps, num_samples, config, num_devices,
                 row_bytes=0, memory_bytes=None):
    self.steps, self.num_samples, self.config = steps, num_samples, config
    self.num_devices = num_devices
    per_pass, batch_nodes, self.lanes, self.memo_nodes = resolve_sizes(
        config, num_samples, row_bytes, memory_bytes)
    self.passes = _passes(num_samples, per_pass)
    self.batch_nodes = _nodes_per_call(batch_nodes, self.passes, num_devices)
    self.memos = [collections.OrderedDict() for _ in self.passes]
    self._uses, self._chunk = {}, 0
    # calls, node_steps, row_steps (a row = one candidate prefix and one
    # sample: one CFG model call), padded_row_steps (wasted on padding).
    self.counts = collections.Counter()
    self.row_steps_by_gene = np.zeros(FULL + 1, np.int64)

  def retain(self, population):
    """Forget memoised prefixes that no member of `population` starts with
    (every later child is bred from these members)."""
    keep = {tuple(g[:d]) for g in np.asarray(population).tolist()
            for d in range(1, self.steps)}
    for memo in self.memos:
      for prefix in [p for p in memo if p not in keep]:
        del memo[prefix]

  def _next_use(self, prefix):
    """The next chunk of the running call that needs `prefix` (inf: none)."""
    uses = self._uses.get(prefix, ())
    i = bisect.bisect_right(uses, self._chunk)
    return uses[i] if i < len(uses) else math.inf

  def _memo_put(self, memo, prefix, state):
    quota = self.memo_nodes // len(self.passes)
    if quota == 0:
      return
    memo[prefix] = state
    memo.move_to_end(prefix)
    if len(memo) > quota:
      # Belady's rule within the call: drop the state needed furthest in
      # the future (chunks are known in advance), the shallowest of equals
      # (a deeper state saves more steps); then least recently used.
      order = {p: i for i, p in enumerate(memo)}
      victim = max(memo, key=lambda p: (self._next_use(p), -len(p),
                                        -order[p]))
      del memo[victim]

  def _run(self, genomes):
    """{genome: [final state of each pass]} for the distinct genomes."""
    genomes = sorted(dict.fromkeys(genomes))
    lanes = self.lanes or max(len(genomes), 1)
    chunks = [genomes[i:i + lanes] for i in range(0, len(genomes), lanes)]
    # prefix -> ascending chunk indices with a genome starting with it.
    self._uses = collections.defaultdict(list)
    for c, chunk in enumerate(chunks):
      for prefix in {g[:d] for g in chunk for d in range(1, self.steps)}:
        self._uses[prefix].append(c)
    finals = {g: [] for g in genomes}
    for p in range(len(self.passes)):
      for self._chunk, chunk in enumerate(chunks):
        for g, state in self._run_chunk(p, chunk).items():
          finals[g].append(state)
    self._uses, self._chunk = {}, 0
    return finals

  def _run_chunk(self, p, genomes):
    """Walks `genomes` down their prefix tree in pass p, one level per step.

    A node is (owner, prefix): owner -1 when prefixes are shared, else the
    genome's position (the naive evaluation shares nothing).
    """
    steps, share, memo = self.steps, self.config.share_prefixes, self.memos[p]
    live, start, root = {}, [], None
    for j, g in enumerate(genomes):
      depth = next((d for d in range(steps - 1, 0, -1) if g[:d] in memo),
                   0) if share else 0
      if depth:
        memo.move_to_end(g[:depth])
        state = memo[g[:depth]]
      else:
        root = self._root(p) if root is None else root
        state = root
      start.append(depth)
      live[(-1 if share else j, g[:depth])] = state
    for depth in range(1, steps + 1):
      level = {}
      for j, g in enumerate(genomes):
        if start[j] < depth:
          owner = -1 if share else j
          level.setdefault((owner, g[:depth]),
                           ((owner, g[:depth - 1]), g[depth - 1]))
      items = sorted(level.items())
      for batch in self._batches(items):
        outs = self.step_nodes(p, [live[parent] for _, (parent, _) in batch],
                                [gene for _, (_, gene) in batch])
        for (node, _), state in zip(batch, outs):
          live[node] = state
          if share and depth < steps:
            self._memo_put(memo, node[1], state)
      for parent in {parent for _, (parent, _) in items}:
        del live[parent]
    return {g: live[(-1 if share else j, g)] for j, g in enumerate(genomes)}

  def _batches(self, items):
    """Calls of at most batch_nodes nodes; one budget per call if sparse."""
    if self.config.evaluator == "masked":
      groups = [items]
    else:
      groups = [list(g) for _, g in itertools.groupby(
          sorted(items, key=lambda item: item[1][1]),
          key=lambda item: item[1][1])]
    return [group[i:i + self.batch_nodes] for group in groups
            for i in range(0, len(group), self.batch_nodes)]

  def _count(self, p, genes):
    s, n = len(self.passes[p]), len(genes)
    self.counts["calls"] += 1
    self.counts["node_steps"] += n
    self.counts["row_steps"] += n * s
    self.counts["padded_row_steps"] += (self.batch_nodes - n) * s
    np.add.at(self.row_steps_by_gene, genes, s)

  def _root(self, p):
    raise NotImplementedError

  def step_nodes(self, p, states, genes):
    raise NotImplementedError


class TreeCounter(PrefixTree):
  """A `PrefixTree` that runs no model: counts the steps `TreeFitness` with
  `config` would compute for the same calls (see `replay`)."""

  def __init__(self, *, steps: int, num_samples: int, config: EvalConfig,
               num_devices: int = 1):
    self._init_tree(steps=steps, num_samples=num_samples, config=config,
                    num_devices=num_devices)
    self._run([(FULL,) * steps])                     # the full model

  def __call__(self, genomes):
    self._run([tuple(g) for g in np.asarray(genomes).tolist()])
    return np.zeros(len(genomes))

  def replay(self, events):
    """Replays `RecordingFitness.events`; returns `self.counts`."""
    for kind, genomes in events:
      (self if kind == "evaluate" else self.retain)(genomes)
    return self.counts

  def _root(self, p):
    return None

  def step_nodes(self, p, states, genes):
    self._count(p, genes)
    return [None] * len(states)


class RecordingFitness:
  """Wraps a fitness; records its calls (`events`) for `TreeCounter.replay`."""

  def __init__(self, inner):
    self.inner, self.events = inner, []
    self.fingerprint = getattr(inner, "fingerprint", None)

  def __call__(self, genomes):
    self.events.append(("evaluate", np.asarray(genomes)))
    return self.inner(genomes)

  def retain(self, population):
    self.events.append(("retain", np.asarray(population)))
    if hasattr(self.inner, "retain"):
      self.inner.retain(population)


class TreeFitness(PrefixTree):
  """Fitness of budget genomes on one model and a fixed set of samples.

  fitness(genome) = mean over samples s of
      mean((x_T(genome, s) - x_T(full, s))^2)
  with x_T the final latents of the CFG sampler from the sample's noise and
  prompt; the accelerated sampler is simulated by `forward_masked` (or run
  by the sparse `forward`, `EvalConfig.evaluator`), the full model is the
  all-10 genome of the same tree.

  Args:
    graphdef, params: `nnx.split(wan_dit)`.
    noise: (S, C, F, H, W) initial latents, one per sample.
    contexts: (S, L, text_dim) text embeddings; negative_contexts (S or 1,
      L', text_dim).
    steps: denoising steps (= genome length).
    config: `EvalConfig`.
    devices: devices to shard the rows of a call over (default: all); one
      code path for 1..N devices.

  Attributes: `counts` and `row_steps_by_gene` (what was computed),
  `reference` (the full model's final latents), `fingerprint`,
  `node_state_bytes`.
  """

  def __init__(self, graphdef, params, noise, contexts, negative_contexts, *,
               steps: int, config: EvalConfig = EvalConfig(), devices=None):
    noise = jnp.asarray(noise, F32)
    if noise.ndim != 5 or noise.shape[0] < 1:
      raise ValueError(f"noise must be (S >= 1, C, F, H, W); got "
                       f"{noise.shape}")
    num_samples = noise.shape[0]
    if contexts.shape[0] != num_samples:
      raise ValueError(f"{contexts.shape[0]} contexts for {num_samples} "
                       "noise samples")
    if steps < 1:
      raise ValueError(f"{steps=} must be >= 1")
    devices = list(devices if devices is not None else jax.devices())
    self.scheduler = dense_sampler.resolve_scheduler(
        config.scheduler, steps, config.shift, noise.shape)
    model_config = nnx.merge(graphdef, params).config
    grid = [s // p for s, p in zip(noise.shape[2:], model_config.patch_size)]
    self.num_tokens = int(np.prod(grid))
    self.k_of_gene = [schedule_lib.num_selected(g / FULL, self.num_tokens)
                      for g in range(FULL + 1)]
    self.k_table = jnp.asarray(self.k_of_gene, jnp.int32)
    mesh = Mesh(np.asarray(devices), ("data",))
    self._rows = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    self.graphdef = graphdef
    self.params = jax.device_put(params, replicated)
    negative_contexts = jnp.broadcast_to(
        negative_contexts, (num_samples,) + negative_contexts.shape[1:])
    contexts_2 = jnp.stack([
        dense_sampler.cfg_context(c[None], n[None])
        for c, n in zip(contexts, negative_contexts)])      # (S, 2, L, D)
    self.contexts = jax.device_put(contexts_2, replicated)
    self.guidance_scale = jnp.asarray(config.guidance_scale, F32)
    self._cache_shape = (model_config.num_layers, 2, self.num_tokens,
                         model_config.dim)
    self._selection = config.selection
    self._noise = noise
    self._noise_and_contexts = (noise, contexts_2)
    row_bytes = _nbytes(jax.eval_shape(self._initial_state, noise[:1]))
    memory = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
    self._init_tree(steps=steps, num_samples=num_samples, config=config,
                    num_devices=len(devices), row_bytes=row_bytes,
                    memory_bytes=None if None in memory else min(memory))
    self.node_state_bytes = row_bytes * len(self.passes[0])
    self._reference = None

  @property
  def reference(self):
    """The full model's final latents (S, 1, C, F, H, W), computed once."""
    if self._reference is None:
      full = (FULL,) * self.steps
      self._reference = self._finals([full])[full]
    return self._reference

  @property
  def fingerprint(self) -> str:
    """Identifies the problem (checked when a search resumes)."""
    return self._fingerprint(*self._noise_and_contexts)

  def root_state(self, p):
    """The state before step 0 of pass p's samples: (latents (s, 1, C, F,
    H, W), scheduler state, empty cache), made on demand."""
    return self._initial_state(self._noise[self.passes[p]])

  def _initial_state(self, noise):
    latents = noise[:, None]
    cache = selection.init_cache(*self._cache_shape, self._selection)
    n = latents.shape[0]
    return (latents, jax.vmap(self.scheduler.init)(latents),
            jax.tree.map(lambda c: jnp.broadcast_to(c, (n,) + c.shape),
                         cache))

  def __call__(self, genomes) -> np.ndarray:
    """(n, steps) int tenths -> (n,) float64 fitness (lower is better)."""
    genomes = np.asarray(genomes)
    if genomes.ndim != 2 or genomes.shape[1] != self.steps:
      raise ValueError(f"genomes must be (n, {self.steps}); got "
                       f"{genomes.shape}")
    if ((genomes < 0) | (genomes > FULL)).any() or (
        genomes[:, 0] != FULL).any():
      raise ValueError("genes must be tenths in [0, 10], the first 10")
    reference = self.reference      # the full model's trajectory first
    keys = [tuple(g) for g in genomes.tolist()]
    finals = self._finals(keys)
    # Per-sample MSE in float32 on device, mean over samples in float64.
    return np.asarray([
        np.mean(np.asarray(_sample_mse(finals[k], reference), np.float64))
        for k in keys], np.float64)

  def _finals(self, genomes):
    """{genome: final latents (S, 1, C, F, H, W)}."""
    return {g: jnp.concatenate([state[0] for state in states])
            for g, states in self._run(genomes).items()}

  def _fingerprint(self, noise, contexts_2):
    h = hashlib.sha256()
    for x in (noise, contexts_2, self.reference, self.k_table,
              self.scheduler.timesteps):
      h.update(np.asarray(x).tobytes())
    # The batch shape and device count enter too: they fix each row's float
    # rounding, so a resumed run needs them to match the interrupted one.
    h.update(repr((self.config.scheduler, self.config.guidance_scale,
                   self.config.evaluator, self.config.selection,
                   self.batch_nodes, [len(p) for p in self.passes],
                   self.num_devices)).encode())
    return h.hexdigest()[:16]

  def _root(self, p):
    return self.root_state(p)

  def step_nodes(self, p, states, genes):
    """One denoising step of up to batch_nodes nodes of pass p (padded to
    batch_nodes): states of the parents, genes of the step; returns the
    children's states."""
    sample_ids = self.passes[p]
    s, n = len(sample_ids), len(states)
    pad = self.batch_nodes - n
    batch = states[0] if self.batch_nodes == 1 else _concat(
        states + [states[0]] * pad)
    samples = np.tile(sample_ids.astype(np.int32), self.batch_nodes)
    row_genes = np.repeat(np.asarray(genes + [genes[0]] * pad, np.int32), s)
    batch, samples, row_genes = jax.device_put((batch, samples, row_genes),
                                               self._rows)
    common = (self.graphdef, self.params, self.scheduler, self.guidance_scale,
              self.contexts)
    if self.config.evaluator == "masked":
      out = _masked_rows_step(*common, self.k_table, samples, row_genes, batch,
                              selection_config=self.config.selection)
    else:
      out = _sparse_rows_step(*common, samples, batch,
                              num_selected=self.k_of_gene[genes[0]],
                              selection_config=self.config.selection)
    self._count(p, genes)
    if self.batch_nodes == 1:
      return [out]
    return [_slice(out, i * s, (i + 1) * s) for i in range(n)]


# Proxies --------------------------------------------------------------------


def spearman(a, b) -> float:
  """Spearman rank correlation (average ranks for ties)."""
  def ranks(x):
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for value in np.unique(x):      # ties share their mean rank
      tie = x == value
      r[tie] = r[tie].mean()
    return r
  ra, rb = ranks(a), ranks(b)
  if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
    return float("nan")
  return float(np.corrcoef(ra, rb)[0, 1])


def rank_correlation(proxy, full, genomes) -> dict:
  """How well `proxy` ranks `genomes` like `full` (Spearman rho)."""
  proxy_fitness, full_fitness = proxy(genomes), full(genomes)
  return {"spearman": spearman(proxy_fitness, full_fitness),
          "genomes": np.asarray(genomes).tolist(),
          "proxy_fitness": proxy_fitness.tolist(),
          "full_fitness": full_fitness.tolist()}


# Plot -----------------------------------------------------------------------


def plot(path, history, schedule, target_budget) -> bool:
  """PNG: best/mean fitness per generation and the chosen schedule.

  Needs matplotlib (the optional extra `plot`); without it, prints a note
  and returns False.
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print(f"note: matplotlib is not installed, so {path} was not drawn "
          "(pip install 'astraea-jax[plot]'); the numbers are in "
          "report.json")
    return False
  gens = [h["generation"] for h in history]
  fig, (ax_fit, ax_sched) = plt.subplots(1, 2, figsize=(11, 4))
  ax_fit.plot(gens, [h["best"] for h in history], "o-", label="best")
  ax_fit.plot(gens, [h["mean"] for h in history], "s--",
              label="population mean")
  ax_fit.set_yscale("log")
  ax_fit.set_xlabel("generation")
  ax_fit.set_ylabel("fitness: MSE vs full model (lower is better)")
  ax_fit.legend()
  steps = np.arange(len(schedule))
  ax_sched.bar(steps, schedule, color="tab:blue")
  ax_sched.axhline(target_budget, color="k", ls="--",
                   label=f"target {target_budget:g}")
  ax_sched.axhline(float(np.mean(schedule)), color="tab:red", ls=":",
                   label=f"mean {np.mean(schedule):.3f}")
  ax_sched.set_ylim(0, 1.05)
  ax_sched.set_xlabel("denoising step")
  ax_sched.set_ylabel("token budget")
  ax_sched.legend()
  fig.tight_layout()
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                             suffix=".png")
  os.close(fd)
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)
  return True


# From files: what `astraea search` runs --------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
  """The samples the fitness averages over: video size, count, seed."""
  height: int = 480
  width: int = 832
  frames: int = 81
  samples: int = 4
  seed: int = 0


def load_samples(embedding_paths, text_dim: int, problem: Problem):
  """(noise (S, 16, F, H, W), contexts (S, L, D), negatives (S, L', D)).

  Sample j uses prompt j mod len(paths) and noise from seed + j (sample 0
  is the noise `astraea generate --seed SEED` draws).
  """
  from astraea_jax import generate  # pylint: disable=g-import-not-at-top
  if not embedding_paths:
    raise ValueError("no prompts: pass --text-embeddings with one "
                     "safetensors file (`context`) per prompt")
  if problem.samples < len(embedding_paths):
    raise ValueError(f"{problem.samples=} must be >= the "
                     f"{len(embedding_paths)} prompts given")
  pairs = [generate.read_text_embeddings(p, text_dim)
           for p in embedding_paths]
  shape = dense_sampler.wan_latent_shape(problem.height, problem.width,
                                         problem.frames)[1:]

  def stack(arrays):
    length = max(a.shape[1] for a in arrays)
    return jnp.concatenate([jnp.pad(a, ((0, 0), (0, length - a.shape[1]),
                                        (0, 0))) for a in arrays])

  idx = [j % len(pairs) for j in range(problem.samples)]
  noise = jnp.stack([dense_sampler.draw_noise(
      jax.random.key(problem.seed + j), (1,) + shape)[0]
                     for j in range(problem.samples)])
  return (noise, stack([pairs[i][0] for i in idx]),
          stack([pairs[i][1] for i in idx]))


def _write_json(path, doc):
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def run_files(model_path, embedding_paths, out, *, config: SearchConfig,
              problem: Problem = Problem(), eval_config: EvalConfig =
              EvalConfig(), proxy: Problem | None = None,
              proxy_check: int = 8, min_rank_correlation: float = 0.8,
              dtype: str | None = None, resume: bool = False,
              progress: bool = True) -> dict:
  """`astraea search`: the budget schedule of one converted checkpoint.

  Writes into `out`: search_state.json (after every generation),
  schedule.json (for `astraea generate --schedule`), report.json and
  search.png. With `proxy` (a cheaper Problem: fewer frames, lower
  resolution, fewer samples) the search runs on the proxy after measuring
  its Spearman rank correlation with the full fitness on `proxy_check`
  random feasible genomes; below `min_rank_correlation` it stops.
  """
  out = pathlib.Path(out)
  state_path = out / STATE_FILE
  if resume and not state_path.exists():
    raise FileNotFoundError(f"--resume: {state_path} does not exist")
  if not resume and state_path.exists():
    raise ValueError(f"{out} holds a search already ({STATE_FILE}); pass "
                     "--resume to continue it or choose another --out")
  if not embedding_paths:
    raise ValueError("no prompts: pass --text-embeddings with one "
                     "safetensors file (`context`) per prompt")
  for p in (problem,) + ((proxy,) if proxy else ()):
    dense_sampler.wan_latent_shape(p.height, p.width, p.frames)
  checkpoint.load_config(model_path)   # not a checkpoint: FileNotFoundError
  try:
    model = checkpoint.load_model(model_path, dtype=dtype)
  except Exception as e:  # orbax/JSON errors of a damaged checkpoint
    raise ValueError(f"cannot read the checkpoint {model_path}: "
                     f"{type(e).__name__}: {e}") from e
  graphdef, params = nnx.split(model)
  out.mkdir(parents=True, exist_ok=True)

  def fitness_of(p):
    return TreeFitness(graphdef, params,
                       *load_samples(embedding_paths, model.config.text_dim,
                                     p),
                       steps=config.steps, config=eval_config)

  full = fitness_of(problem)
  report = {"config": config.to_dict(),
            "problem": dataclasses.asdict(problem),
            "eval_config": {k: v for k, v in dataclasses.asdict(
                eval_config).items() if k != "selection"},
            "model": str(model_path),
            "prompts": [str(p) for p in embedding_paths],
            "fingerprint": full.fingerprint}
  fitness_fn = full
  if proxy is not None:
    fitness_fn = fitness_of(proxy)
    check_path = out / "proxy_check.json"
    check = None
    if check_path.exists():
      check = json.loads(check_path.read_text())
      if check.get("fingerprints") != [full.fingerprint,
                                       fitness_fn.fingerprint]:
        check = None
    if check is None:
      # Random feasible genomes (and the default schedule), drawn apart
      # from the search's own stream.
      check_config = config if proxy_check <= config.population else (
          dataclasses.replace(config, population=proxy_check))
      genomes = np.asarray(initial_population(
          jax.random.key(config.seed + 1), config=check_config))[:proxy_check]
      check = {**rank_correlation(fitness_fn, full, genomes),
               "fingerprints": [full.fingerprint, fitness_fn.fingerprint]}
      _write_json(check_path, check)
    report["proxy"] = {**dataclasses.asdict(proxy),
                       "spearman": check["spearman"],
                       "check_genomes": len(check["genomes"])}
    print(f"proxy {proxy}: Spearman rank correlation with the full fitness "
          f"over {len(check['genomes'])} genomes: {check['spearman']:.3f}")
    if not check["spearman"] >= min_rank_correlation:
      raise ValueError(
          f"the proxy ranks candidates unlike the full fitness: Spearman "
          f"rho={check['spearman']:.3f} < {min_rank_correlation=}; use a "
          "closer proxy or none")
  result = search(fitness_fn, config, state_path=state_path, resume=resume,
                  progress=progress)
  report.update(
      schedule=result.schedule.tolist(),
      mean_budget=float(np.mean(result.schedule)),
      fitness=result.fitness, history=result.history,
      genomes_requested=result.genomes_requested,
      genomes_evaluated=result.genomes_evaluated,
      # This process's work (a resumed run counts only what it did).
      row_steps=dict(fitness_fn.counts),
      row_steps_by_gene=fitness_fn.row_steps_by_gene.tolist(),
      naive_row_steps=(result.genomes_requested + 1) * config.steps
      * fitness_fn.num_samples)
  if proxy is not None:
    report["fitness_full"] = float(full(result.genome[None])[0])
  schedule_lib.save(out / "schedule.json", result.schedule,
                    target_budget=config.target_budget,
                    fitness_mse=report.get("fitness_full", result.fitness),
                    steps=config.steps, searched_with=str(model_path))
  _write_json(out / "report.json", report)
  plot(out / "search.png", result.history, result.schedule,
       config.target_budget)
  return report
