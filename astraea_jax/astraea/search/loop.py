"""The search loop and its resumable state (`search`)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable

import jax
import numpy as np
import tqdm

from astraea_jax import outputs
from astraea_jax.astraea.search.genetic import (
    SearchConfig,
    initial_population,
    make_children,
    select_survivors,
    to_schedule,
)

STATE_FILE = "search_state.json"
STATE_VERSION = 1


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
  outputs.write_json(path, state.to_json(config, fingerprint), indent=None,
                     durable=True)


def load_state(path, config: SearchConfig, fingerprint) -> SearchState:
  """The checkpoint at `path`; a ValueError if it belongs to another search."""
  try:
    doc = json.loads(pathlib.Path(path).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not a search state ({e})") from e
  if doc.get("method", "ga") != "ga":
    raise ValueError(f"{path} is a --method {doc['method']} search state, "
                     "not the GA's: resume it with --method "
                     f"{doc['method']}")
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
