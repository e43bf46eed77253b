"""Plain-NumPy references of EasyCache's and MagCache's step-reuse rules.

Written from the papers (and docs/baselines.md, which states where the
library departs from them), on the NumPy Wan of reference_wan.py; nothing
is imported from the library.

EasyCache (Zhou et al., "Less is Enough: Training-Free Video Diffusion
Acceleration via Runtime-Adaptive Caching", arXiv 2507.02860, method
section): x_t model input, v_t model output. A computed step i caches the
transformation vector Delta_i = v_i - x_i and, when a computed step i'
precedes it, the transformation rate k_i = |v_i - v_i'| / |x_i - x_i'|.
A later step t estimates eps_t = k_i |x_t - x_{t-1}| / |v_i| and sums the
estimates since i; under tau the step returns x_t + Delta_i, else the model
runs and the sum restarts. |a| = mean absolute value of a (the authors'
code), taken on the conditional half of the CFG batch; warm-up steps and
the last step always run; a step runs while no rate exists.

Astraea + EasyCache's rule (the library's composition, ours; see
docs/baselines.md): the same estimate and sum decide at Astraea's sparse
steps whether they run with their K tokens or reuse every token (K = 0).

MagCache (Ma et al., "MagCache: Fast Video Generation with Magnitude-Aware
Cache", arXiv 2506.09045, method section): residual r_t = block-stack
output - input; magnitude ratio gamma_t = mean_tokens ||r_t|| / ||r_{t-1}||
(one calibration run, full model); with t^ the last computed step, step t
(after the retention steps) is skipped iff
    E_t = sum_{s=t^+1}^{t} |1 - prod_{i=t^+1}^{s} gamma_i| < delta
and t - t^ <= K; a skipped step applies the head to x_t + r_t^. One curve
(mean over the CFG batch) and one decision for both halves (the library's
stated choice).
"""

from __future__ import annotations

import numpy as np

import reference_wan as rw


def mabs(a):
  return float(np.mean(np.abs(a)))


# EasyCache --------------------------------------------------------------------


class EasyCacheRule:
  """The decision and reuse of EasyCache, step by step.

  step(i, x_2b, run_model) -> (v_2b, computed, eps): x_2b the CFG batch
  [cond; uncond] of inputs; run_model() the model's output on it.
  """

  def __init__(self, *, steps, tau, warmup):
    self.steps, self.tau, self.warmup = steps, tau, warmup
    self.computed_steps = []       # (x_cond, v_cond) of each computed step
    self.delta = None
    self.x_before = None           # the previous step's input (cond)
    self.total = 0.0

  def rate(self):
    if len(self.computed_steps) < 2:
      return None
    (x0, v0), (x1, v1) = self.computed_steps[-2:]
    return mabs(v1 - v0) / mabs(x1 - x0)

  def step(self, i, x_2b, run_model):
    b = x_2b.shape[0] // 2
    x = x_2b[:b]
    k = self.rate()
    eps = 0.0
    if k is not None:
      eps = k * mabs(x - self.x_before) / mabs(self.computed_steps[-1][1])
    self.x_before = x
    if i < self.warmup or i == self.steps - 1 or k is None:
      run = True
    else:
      self.total += eps
      run = self.total >= self.tau
    if run:
      self.total = 0.0
      v = np.asarray(run_model(), np.float64)
      self.computed_steps.append((x, v[:b]))
      self.delta = v - x_2b
      return v, True, eps
    return x_2b + self.delta, False, eps


def easycache_sample(model, noise, ctx2b, *, steps, shift, guidance, tau,
                     warmup, out_channels):
  """CFG Euler sampling under EasyCache -> (latents, computed, eps)."""
  ts, dt = rw.euler_schedule(steps, shift)
  rule = EasyCacheRule(steps=steps, tau=tau, warmup=warmup)
  computed, estimates = [], []

  def velocity(i, x2b, t2b):
    v, run, eps = rule.step(
        i, x2b, lambda: model.forward(x2b, t2b, ctx2b, out_channels))
    computed.append(run)
    estimates.append(eps)
    return v

  out = rw.cfg_sample(velocity, noise, ts, dt, guidance)
  return out, computed, estimates


# Astraea + EasyCache's rule ---------------------------------------------------


class AstraeaAdaptiveRule:
  """EasyCache's decision (the rule above) on Astraea's steps, as
  docs/baselines.md states the composition: a step whose budget is 1 and
  the last step run, a budget-0 step never runs; at any other step the
  estimates eps summed since the last step that ran (this one's included)
  decide: run when the sum reaches tau or no rate exists, else reuse. eps
  and the rate are EasyCache's, measured on the steps that ran.

  step(i, x_2b, run_model) -> (ran, eps); run_model() returns the step's
  output (2B, ...) when it runs.
  """

  def __init__(self, *, budgets, tau):
    self.budgets, self.tau = list(budgets), tau
    self.ran = []                  # (x_cond, v_cond) of each step that ran
    self.x_before = None
    self.total = 0.0

  def step(self, i, x_2b, run_model):
    b = x_2b.shape[0] // 2
    x = np.asarray(x_2b[:b], np.float64)
    eps = 0.0
    if len(self.ran) >= 2:
      (x0, v0), (x1, v1) = self.ran[-2:]
      k = mabs(v1 - v0) / mabs(x1 - x0)
      eps = k * mabs(x - self.x_before) / mabs(v1)
    self.x_before = x
    self.total += eps
    budget = self.budgets[i]
    if budget == 0:
      run = False
    elif budget == 1 or i == len(self.budgets) - 1:
      run = True
    else:
      run = self.total >= self.tau or len(self.ran) < 2
    if run:
      self.total = 0.0
      v = np.asarray(run_model(), np.float64)
      self.ran.append((x, v[:b]))
    return run, eps


# MagCache ---------------------------------------------------------------------


def magcache_skips(ratios, delta, max_skip, retained):
  """[computed?] per step from the calibrated curve (explicit products)."""
  computed, last = [], None
  for t in range(len(ratios)):
    if t < retained or last is None:
      computed.append(True)
      last = t
      continue
    window = ratios[last + 1:t + 1]
    error = sum(abs(1.0 - float(np.prod(window[:j + 1])))
                for j in range(len(window)))
    skip = error < delta and t - last <= max_skip
    computed.append(not skip)
    if not skip:
      last = t
  return computed


def _blocks(model, x, e0, ctx, ang):
  y = x
  for layer in range(model.num_layers):
    y = np.stack([model.block(layer, y[b], e0[b], ctx[b], ang)[0]
                  for b in range(y.shape[0])])
  return y


def magcache_calibrate(model, noise, ctx2b, *, steps, shift, guidance,
                       out_channels):
  """gamma_t of a full CFG Euler run (gamma_0 = 1)."""
  ts, dt = rw.euler_schedule(steps, shift)
  residuals = []

  def velocity(i, x2b, t2b):
    x, e, e0, ctx, ang, grid = model.embed(x2b, t2b, ctx2b)
    y = _blocks(model, x, e0, ctx, ang)
    residuals.append(y - x)
    return model.unembed(y, e, grid, out_channels)

  rw.cfg_sample(velocity, noise, ts, dt, guidance)
  ratios = [1.0]
  for prev, cur in zip(residuals, residuals[1:]):
    ratios.append(float(np.mean(np.linalg.norm(cur, axis=-1)
                                / np.linalg.norm(prev, axis=-1))))
  return ratios


def magcache_sample(model, noise, ctx2b, *, steps, shift, guidance,
                    computed, out_channels):
  """CFG Euler sampling that computes the steps `computed` says and skips
  the others with the cached residual -> latents."""
  ts, dt = rw.euler_schedule(steps, shift)
  cache = {}

  def velocity(i, x2b, t2b):
    x, e, e0, ctx, ang, grid = model.embed(x2b, t2b, ctx2b)
    if computed[i]:
      y = _blocks(model, x, e0, ctx, ang)
      cache["r"] = y - x
    else:
      y = x + cache["r"]
    return model.unembed(y, e, grid, out_channels)

  return rw.cfg_sample(velocity, noise, ts, dt, guidance)
