"""Token-wise (Astraea) sampling of a WanDiT with a per-step budget.

Per step t with budget theta_t and K = round(theta_t N):
  1. before each block, score the tokens (selection.token_scores) and keep
     the top K;
  2. the block runs those K queries against the keys/values of all N tokens
     (WanBlock(..., token_index=idx));
  3. computed tokens take their new block output and refresh their cache
     (update, input, LSE, stale counter); the others add their cached
     residual update.
K = N runs the dense block (and refreshes every cache entry); K = 0 reuses
every cached update. The step function is compiled once per distinct K
(at most 11 on the 0.1 grid). CFG: the cond and uncond halves of the batch
select their tokens independently.

`forward_masked` is the same computation as a masked dense simulation: all
tokens computed, the K best kept by rank. It gives the same numbers as the
sparse path (tests/test_astraea.py) and takes K as a traced value, so the
budget search can vmap candidates of different budgets without recompiling.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from astraea_jax.astraea import layer_loop
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.sampling import sampler as dense_sampler
from astraea_jax.sampling import schedulers as sched_lib

F32 = jnp.float32


def run_blocks(model, x, e0, ctx, rope, cache, *, mode: str, config, select=None,
               state=None, statistic: str = "lse", **hooks):
  """The WanDiT's blocks through the one layer loop; (x, cache, state).

  hooks: keyword arguments of every `WanBlock.__call__` (attention,
  cross_entropy); the rest as `layer_loop.run`.
  """

  def apply(kind, block, x, token_index):
    del kind
    return block(x, e0, ctx, rope, token_index=token_index, **hooks)

  x, (cache,), state = layer_loop.run(
      (model.blocks,), x, (cache,), apply=apply, mode=mode, config=config,
      select=select, state=state, statistic=statistic,
      unroll=model.config.scan_unroll)
  return x, cache, state


def forward(model, latents, timestep, context, cache, *, num_selected: int,
            config: selection.SelectionConfig):
  """One model evaluation with token selection; returns (velocity, cache).

  latents (B, C, F, H, W); cache from `selection.init_cache` with batch B;
  num_selected: static K.
  """
  x, e, e0, ctx, rope = model.embed(latents, timestep, context)
  mode = layer_loop.mode_for(num_selected, x.shape[1])
  x, cache, _ = run_blocks(model, x, e0, ctx, rope, cache, mode=mode,
                           config=config,
                           select=layer_loop.score_top_k(num_selected,
                                                         config))
  return model.unembed(x, e, latents.shape), cache


def forward_masked(model, latents, timestep, context, cache, num_selected,
                   *, config: selection.SelectionConfig):
  """`forward` as a masked dense simulation; num_selected may be traced.

  Every block computes all tokens; the top-K by the same scores (ties
  broken towards lower indices, as `jax.lax.top_k`) keep their new values.
  """
  x, e, e0, ctx, rope = model.embed(latents, timestep, context)
  keep = layer_loop.score_keep(jnp.asarray(num_selected, jnp.int32), config)
  x, cache, _ = run_blocks(model, x, e0, ctx, rope, cache, mode="masked",
                           config=config, select=keep)
  return model.unembed(x, e, latents.shape), cache


def _velocity(graphdef, params, context_2b, num_selected, config, cache,
              latents_2b, timesteps_2b):
  model = nnx.merge(graphdef, params)
  return forward(model, latents_2b, timesteps_2b, context_2b, cache,
                 num_selected=num_selected, config=config)


@functools.partial(jax.jit, static_argnames=("num_selected", "config"),
                   donate_argnums=(5, 6))
def _step(graphdef, params, context_2b, scheduler, guidance_scale, sched_state,
          cache, latents, *, num_selected, config):
  model_fn = functools.partial(_velocity, graphdef, params, context_2b,
                               num_selected, config)
  return dense_sampler.guided_step(model_fn, scheduler, guidance_scale,
                                   latents, sched_state, cache)


@dataclasses.dataclass
class SampleStats:
  """What a run did: budgets, K per step, compiles, wall time per step."""
  budgets: np.ndarray
  num_selected: list[int]
  num_tokens: int
  compiled_k: list[int]
  step_seconds: list[float]


def sample(model, params, noise, context, negative_context, *, budget=None,
           schedule=None, scheduler="unipc", steps: int = 50,
           guidance_scale: float = 5.0, shift: float | None = None,
           selection_config: selection.SelectionConfig = selection
           .SelectionConfig(), return_trajectory: bool = False,
           progress: bool = True, return_stats: bool = False):
  """Astraea CFG sampling: like `sampling.sample`, with a token budget.

  Args:
    model, params: `nnx.split(wan_dit)`.
    budget: mean budget in (0, 1] -> `schedule.default_schedule`; or
    schedule: one budget in [0, 1] per step (first must be 1.0).
    Others as in `astraea_jax.sampling.sample`.

  Returns latents, plus the trajectory and/or SampleStats when asked.
  """
  if (budget is None) == (schedule is None):
    raise ValueError("give exactly one of `budget` and `schedule`")
  if isinstance(scheduler, str):
    if shift is None:
      shift = sched_lib.wan_flow_shift(8 * noise.shape[3], 8 * noise.shape[4])
    scheduler = dense_sampler.make_scheduler(scheduler, steps, shift=shift)
  steps = scheduler.num_steps
  budgets = schedule_lib.validate(
      schedule_lib.default_schedule(budget, steps) if schedule is None
      else schedule, steps)
  config = nnx.merge(model, params).config
  grid = tuple(s // p for s, p in zip(noise.shape[2:], config.patch_size))
  n = int(np.prod(grid))
  b2 = 2 * noise.shape[0]
  context_2b = dense_sampler.cfg_context(context, negative_context)
  cache = selection.init_cache(config.num_layers, b2, n, config.dim,
                               selection_config)
  latents = jnp.asarray(noise, F32)
  sched_state = scheduler.init(latents)
  guidance_scale = jnp.asarray(guidance_scale, F32)
  stats = SampleStats(budgets=budgets, num_selected=[], num_tokens=n,
                      compiled_k=[], step_seconds=[])
  trajectory = []
  bar = tqdm.tqdm(budgets, disable=not progress, desc="astraea", unit="step")
  for theta in bar:
    k = schedule_lib.num_selected(theta, n)
    if k not in stats.compiled_k:
      stats.compiled_k.append(k)
    if progress:
      bar.set_postfix(budget=f"{theta:.2f}", tokens=f"{k}/{n}")
    t0 = time.perf_counter()
    latents, sched_state, cache = _step(
        model, params, context_2b, scheduler, guidance_scale, sched_state,
        cache, latents, num_selected=k, config=selection_config)
    if progress or return_stats:
      latents.block_until_ready()
    stats.step_seconds.append(time.perf_counter() - t0)
    stats.num_selected.append(k)
    if return_trajectory:
      trajectory.append(latents)
  out = [latents]
  if return_trajectory:
    out.append(jnp.stack(trajectory))
  if return_stats:
    out.append(stats)
  return out[0] if len(out) == 1 else tuple(out)
