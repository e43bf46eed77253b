"""Brute-force reference of the budget search's fitness (NumPy, float64).

Astraea (arXiv 2506.05096, sec. 3.3; DESIGN.md item 4): a genome is one
budget per step on {0, 0.1, ..., 1}; its fitness is the MSE between the
final latents of the accelerated sampler and of the full model, averaged
over the samples (prompt, noise); lower is better; feasible genomes have a
mean budget within [0.9, 1.1] x the target. Here every genome of a small
grid is sampled from scratch with the NumPy Astraea sampler of
reference_wan.py (CFG, flow-matching Euler; K = round(theta N) per step,
the first step at budget 1), sharing only computed prefixes, so that the
library's prefix-tree fitness and its genetic search can be checked
against the exhaustive answer. Nothing is imported from the library.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np

import reference_wan as rw


def final_latents(model, noise, ctx2b, genome, *, steps, shift, guidance,
                  out_channels, memo):
  """Final latents (B, C, F, H, W) of the Astraea sampler for `genome`
  (tenths per step); memo: {prefix: (latents, cache)} shared across
  calls."""
  ts, dt = rw.euler_schedule(steps, shift)
  genome = tuple(int(g) for g in genome)
  start = 0
  state = (np.asarray(noise, np.float64), None)
  for i in range(len(genome), 0, -1):
    if genome[:i] in memo:
      start, state = i, memo[genome[:i]]
      break
  x, cache = state[0].copy(), copy.deepcopy(state[1])
  for i in range(start, steps):
    x2b = np.concatenate([x, x])
    t2b = np.full(x2b.shape[0], float(ts[i]))
    xs, e, e0, ctx, ang, grid = model.embed(x2b, t2b, ctx2b)
    n = xs.shape[1]
    if cache is None:
      cache = rw.empty_cache(model.num_layers, x2b.shape[0], n, model.dim)
    k = int(round(genome[i] / 10 * n))
    xs, _ = rw.astraea_blocks(model, xs, e0, ctx, ang, cache, k)
    v = model.unembed(xs, e, grid, out_channels)
    cond, uncond = np.split(v, 2)
    x = x + float(dt[i]) * (uncond + guidance * (cond - uncond))
    memo[genome[:i + 1]] = (x.copy(), copy.deepcopy(cache))
  return x


def fitness(model, samples, genomes, **kw):
  """{genome: mean over samples of mean((x(genome) - x(full))^2)}.

  samples: [(noise (1, C, F, H, W), ctx2b (2, L, D))]."""
  steps = kw["steps"]
  out = {}
  for noise, ctx2b in samples:
    memo = {}
    full = final_latents(model, noise, ctx2b, (10,) * steps, memo=memo, **kw)
    for g in genomes:
      x = final_latents(model, noise, ctx2b, g, memo=memo, **kw)
      out.setdefault(tuple(g), []).append(float(((x - full) ** 2).mean()))
  return {g: float(np.mean(v)) for g, v in out.items()}


def grid_genomes(steps, levels):
  """Every genome with first gene 10 and the others from `levels`."""
  return [(10,) + rest for rest in itertools.product(levels,
                                                     repeat=steps - 1)]


def feasible_genomes(steps, target_budget, band=(0.9, 1.1)):
  """Every genome on the 0.1 grid (first gene 10) whose mean budget lies in
  band x target (in tenths: sum within [ceil(lo), floor(hi)])."""
  lo = band[0] * target_budget * 10 * steps
  hi = band[1] * target_budget * 10 * steps
  out = []
  for g in grid_genomes(steps, range(11)):
    if lo - 1e-9 <= sum(g) <= hi + 1e-9:
      out.append(g)
  return out
