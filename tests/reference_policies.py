"""Plain-NumPy references of the baselines' rules (ToCa, PAB, step caching).

Written from the papers and docs/baselines.md (which states where the
library departs from each paper), on the NumPy Wan of reference_wan.py;
nothing is imported from the library. Each function is a whole CFG Euler
sampling run (reference_wan.cfg_sample) so that the rule's effect on the
result is compared, not only its decisions.

ToCa (Zou et al., "Accelerating Diffusion Transformers with Token-wise
Feature Caching", ICLR 2025, arXiv 2410.05317; the cache-score section:
score = importance + lambda * cache frequency): every `interval` steps all
tokens are computed; between refreshes each block recomputes the
round(ratio N) tokens with the highest
    s_i = (1 + H_i) / ||1 + H||_2 + w * n_i / interval
H_i the head-mean entropy of token i's cross-attention softmax from its last
computation (ToCa's score for video models), n_i the steps since it was
computed, w = 0.25; the others reuse their cached block update (ours, as
docs/baselines.md says: ToCa caches per module).

PAB (Zhao et al., "Real-Time Video Generation with Pyramid Attention
Broadcast", arXiv 2408.12588, the broadcast-range rule of its method
section): inside the timestep window lo < t < hi the attention output of a
step is broadcast to the next range - 1 steps (range 2 for self-attention,
the longer cross range for cross-attention), counting from the window's
first step; outside it, every attention runs.

Step caching (TeaCache: Liu et al., "Timestep Embedding Tells: It's Time
to Cache for Video Diffusion Model", CVPR 2025, arXiv 2411.19108, its
caching criterion: accumulate the relative L1 distance of the timestep-
modulated input, compute when the sum reaches the threshold): the
indicator is block 0's LN(x)(1 + scale1) + shift1 over the CFG batch;
change_i = mean|I_i - I_{i-1}| / mean|I_{i-1}|; the first and last steps
compute; a skipped step applies the head to x + the cached residual of the
block stack (Delta-DiT / TeaCache-Wan reuse; no rescaling polynomial).
"""

from __future__ import annotations

import numpy as np

import reference_wan as rw


def toca_score(stat, stale, interval, weight=0.25):
  imp = 1.0 + stat
  imp = imp / (np.sqrt((imp * imp).sum()) + 1e-12)
  return imp + weight * stale / interval


def toca_sample(model, noise, ctx2b, *, steps, shift, guidance, interval,
                ratio, out_channels):
  """-> (latents, cache)."""
  b2 = 2 * noise.shape[0]
  ts, dt = rw.euler_schedule(steps, shift)
  cache = None

  def velocity(i, x2b, t2b):
    nonlocal cache
    x, e, e0, ctx, ang, grid = model.embed(x2b, t2b, ctx2b)
    n = x.shape[1]
    if cache is None:
      cache = rw.empty_cache(model.num_layers, b2, n, model.dim)
    k = n if i % interval == 0 else int(round(ratio * n))
    score = lambda xs, last, stat, stale: toca_score(stat, stale, interval)
    x, _ = rw.astraea_blocks(model, x, e0, ctx, ang, cache, k,
                             score_fn=score, statistic="cross_entropy")
    return model.unembed(x, e, grid, out_channels)

  out = rw.cfg_sample(velocity, noise, ts, dt, guidance)
  return out, cache


def pab_plan(timesteps, self_range, cross_range, window):
  """[(reuse_self, reuse_cross)] per step."""
  lo, hi = window
  inside = [lo < float(t) < hi for t in timesteps]
  first = inside.index(True) if any(inside) else 0
  plan = []
  for i, w in enumerate(inside):
    since = i - first
    plan.append((w and i > 0 and since % self_range != 0,
                 w and i > 0 and since % cross_range != 0))
  return plan


def pab_sample(model, noise, ctx2b, *, steps, shift, guidance, self_range,
               cross_range, window, out_channels):
  """-> (latents, plan)."""
  ts, dt = rw.euler_schedule(steps, shift)
  plan = pab_plan(ts, self_range, cross_range, window)
  kept = {}  # (layer, sample) -> (self_out, cross_out)

  def velocity(i, x2b, t2b):
    x, e, e0, ctx, ang, grid = model.embed(x2b, t2b, ctx2b)
    reuse_self, reuse_cross = plan[i]
    for layer in range(model.num_layers):
      rows = []
      for b in range(x.shape[0]):
        old = kept.get((layer, b), (None, None))
        out, aux = model.block(
            layer, x[b], e0[b], ctx[b], ang,
            self_out=old[0] if reuse_self else None,
            cross_out=old[1] if reuse_cross else None)
        kept[(layer, b)] = (aux["self_out"], aux["cross_out"])
        rows.append(out)
      x = np.stack(rows)
    return model.unembed(x, e, grid, out_channels)

  return rw.cfg_sample(velocity, noise, ts, dt, guidance), plan


def step_cache_sample(model, noise, ctx2b, *, steps, shift, guidance,
                      threshold, out_channels):
  """-> (latents, computed flags, changes)."""
  ts, dt = rw.euler_schedule(steps, shift)
  state = {"prev": None, "acc": 0.0, "memo": None}
  computed, changes = [], []

  def velocity(i, x2b, t2b):
    x, e, e0, ctx, ang, grid = model.embed(x2b, t2b, ctx2b)
    blk0 = model.blk(0)
    m = blk0["modulation"][0][None] + e0  # (2B, 6, dim)
    ind = (rw.layer_norm(x, model.eps) * (1 + m[:, 1:2]) + m[:, 0:1])
    prev = np.zeros_like(ind) if state["prev"] is None else state["prev"]
    change = np.abs(ind - prev).mean() / (np.abs(prev).mean() + 1e-12)
    state["prev"] = ind
    changes.append(change)
    if i in (0, steps - 1):
      run, state["acc"] = True, 0.0
    else:
      state["acc"] += change
      run = state["acc"] >= threshold
      if run:
        state["acc"] = 0.0
    computed.append(run)
    if run:
      y = x
      for layer in range(model.num_layers):
        y = np.stack([model.block(layer, y[b], e0[b], ctx[b], ang)[0]
                      for b in range(y.shape[0])])
      state["memo"] = y - x
    else:
      y = x + state["memo"]
    return model.unembed(y, e, grid, out_channels)

  out = rw.cfg_sample(velocity, noise, ts, dt, guidance)
  return out, computed, changes
