"""The budget search against brute force on a tiny model (Astraea sec. 3.3).

1. Fitness: every schedule of a 4-step x 3-level grid ({0, 0.5, 1} after
   the full first step: 27 genomes) gets the library's prefix-tree fitness
   (masked simulation) and the NumPy reference's from-scratch fitness
   (tests/reference_search.py, sparse path in float64). They agree to
   rtol 1e-3: fitness is an MSE of a difference of two trajectories, so
   float32 rounding of ~1e-6 x |x| becomes ~1e-6 |x| / |x - x_full|
   relative (measured 6.4e-7); the argmin must be the same genome.
2. Search: the library's genetic search on 3 steps with target budget 0.5
   (feasible: first gene 10, the others summing to 4..6 tenths: 18
   genomes) must return the brute-force optimum over every feasible genome
   and its fitness. The GA is seeded, so this is deterministic; seed 0's
   initial population of 8 lacks the optimum (asserted), so the search
   must breed its way to it: a broken crossover, mutation, repair, survival
   or fitness cache fails it. (A GA need not find the optimum: seeds 2, 3
   and 5 do not, in 8 generations; that is not a failure of the library.)
"""

import numpy as np
import pytest

import _method_adapter as lib
import reference_search as rs
import reference_wan

WAN = dict(num_layers=2, dim=64, ffn_dim=96, num_heads=2, text_dim=24,
           text_len=8, freq_dim=16)
RUN = dict(shift=3.0, guidance=5.0)


@pytest.fixture(scope="module")
def problem():
  split, kw = lib.wan_model(seed=11, **WAN)
  ref = reference_wan.WanRef(lib.flat_params(split[1]), **kw)
  rng = np.random.default_rng(4)
  noise = rng.standard_normal((2, 16, 2, 8, 8))  # 2 samples, N = 32
  ctx = rng.standard_normal((2, 6, WAN["text_dim"]))
  neg = rng.standard_normal((1, 6, WAN["text_dim"]))
  samples = [(noise[i:i + 1], np.concatenate([ctx[i:i + 1], neg]))
             for i in range(2)]
  return split, ref, noise, ctx, neg, samples


def test_fitness_equals_brute_force_on_a_grid(problem):
  split, ref, noise, ctx, neg, samples = problem
  genomes = rs.grid_genomes(4, (0, 5, 10))
  want = rs.fitness(ref, samples, genomes, steps=4, out_channels=16, **RUN)
  fit = lib.tree_fitness(split, noise, ctx, neg, steps=4, **RUN)
  got = np.asarray(fit(np.asarray(genomes, np.int32)))
  want = np.asarray([want[g] for g in genomes])
  np.testing.assert_allclose(got, want, rtol=1e-3)
  assert got[genomes.index((10, 10, 10, 10))] == 0.0
  assert np.argmin(np.where(want > 0, want, np.inf)) == np.argmin(
      np.where(got > 0, got, np.inf))


def test_search_returns_the_brute_force_optimum(problem):
  split, ref, noise, ctx, neg, samples = problem
  feasible = rs.feasible_genomes(3, 0.5)
  assert len(feasible) == 18
  want = rs.fitness(ref, samples, feasible, steps=3, out_channels=16, **RUN)
  best = min(want, key=want.get)
  fit = lib.tree_fitness(split, noise, ctx, neg, steps=3, **RUN)
  genome, value, band, initial = lib.run_search(
      fit, steps=3, target_budget=0.5, population=8, children=6,
      generations=8, seed=0)
  assert band == (14, 16)
  assert best not in initial  # found by breeding, not drawn
  assert tuple(genome.tolist()) == best, (genome, best, want)
  np.testing.assert_allclose(value, want[best], rtol=1e-3)
  second = sorted(want.values())[1]
  assert second > want[best] * 1.01  # the optimum is not a near-tie
