"""Astraea on the OpenSora v1.2 STDiT3: per-frame token selection.

Token selection before each of the 2 * depth blocks (spatial block i,
temporal block i, ...), each block with its own cache (update, input, LSE,
stale; `selection.init_cache` layout, one stack per block kind). At budget
theta every frame computes the same number of tokens K_f = round(theta S)
(S tokens per frame), its K_f best by the Astraea score: balanced
per-frame top-K. Static shapes follow: spatial attention is a batch of T
frames with K_f queries each against all S keys of the frame, temporal
attention a query per selected token against all T frames at its position,
cross-attention and MLP on the T K_f selected tokens; every computed
attention row is exact. Unselected tokens add their cached residual
update. K_f = S runs the dense blocks, K_f = 0 reuses every cached update;
the step compiles once per distinct K_f. docs/astraea_stdit3.md explains
the choice and the alternatives. The blocks run through the one layer loop
(`layer_loop.run`) with a per-frame select hook.

`forward_masked` is the same computation as a masked dense simulation
(every token computed, the per-frame top K_f kept by rank); it takes K_f as
a traced value, for a budget search without recompiles. The dense OpenSora
sampler is `sampling.opensora`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from astraea_jax.astraea import layer_loop
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.models import stdit3 as stdit3_lib
from astraea_jax.sampling import opensora
from astraea_jax.sampling import sampler as dense_sampler

F32 = jnp.float32
BLOCK_KINDS = ("spatial", "temporal")
DEFAULT_SELECTION = selection.SelectionConfig()


# Astraea: per-frame selection, per-block caches ------------------------------


def init_cache(config, batch: int, num_tokens: int,
               selection_config: selection.SelectionConfig):
  """{"spatial": cache, "temporal": cache}, each `selection.init_cache`
  with a leading depth axis: block i of each kind has its own entry."""
  return {kind: selection.init_cache(config.depth, batch, num_tokens,
                                     config.hidden_size, selection_config)
          for kind in BLOCK_KINDS}


def select_per_frame(scores, grid, tokens_per_frame: int):
  """Balanced per-frame top-K: the K_f best-scored tokens of every frame.

  scores (B, N), grid (T, S) with N = T S. Returns (positions (B, T, K_f)
  sorted within each frame, token_index (B, T K_f) = f S + position,
  sorted: the rows `selection.update_layer_cache` reads).
  """
  b = scores.shape[0]
  t, s = grid
  positions = selection.select_tokens(scores.reshape(b * t, s),
                                      tokens_per_frame)
  positions = positions.reshape(b, t, tokens_per_frame)
  token_index = positions + (s * jnp.arange(t, dtype=jnp.int32))[:, None]
  return positions, token_index.reshape(b, t * tokens_per_frame)


def _embed(model, latents, timestep, conditions):
  kwargs = opensora.model_inputs(conditions, timestep)
  tokens, cond = model.embed(latents, timestep, **kwargs)
  grid = model.grid(latents.shape)
  return tokens, cond, (grid[0], grid[1] * grid[2])


def run_blocks(model, x, cond, grid, cache, *, mode: str, config, select=None,
               temporal_sparse: str = "scatter_queries"):
  """Spatial block i then temporal block i through the one layer loop.

  cache: {"spatial", "temporal"} (`init_cache`); select: a hook that
  returns flat token indices (B, T K_f) in frame-major order (the cache's
  rows), which become per-frame positions for the block. Returns
  (x, cache).
  """
  t, s = grid

  def apply(kind, block, x, token_index):
    del kind
    positions = None
    if token_index is not None:
      b = x.shape[0]
      positions = (token_index.reshape(b, t, -1)
                   - (s * jnp.arange(t, dtype=jnp.int32))[:, None])
    return block(x, cond, grid, token_index=positions,
                 temporal_sparse=temporal_sparse)

  x, caches, _ = layer_loop.run(
      tuple(getattr(model, f"{kind}_blocks") for kind in BLOCK_KINDS), x,
      tuple(cache[kind] for kind in BLOCK_KINDS), apply=apply, mode=mode,
      config=config, select=select, unroll=model.config.scan_unroll)
  return x, dict(zip(BLOCK_KINDS, caches))


def forward(model, latents, timestep, conditions: opensora.Conditions, cache,
            *, tokens_per_frame: int, config: selection.SelectionConfig,
            temporal_sparse: str = "scatter_queries"):
  """One STDiT3 evaluation with token selection; returns (out, cache).

  latents (2B, C, T, H, W); timestep (2B,); cache from `init_cache` with
  batch 2B; tokens_per_frame: static K_f in [0, S]. out is the model's
  full output (2B, out_channels, T, H, W).
  """
  x, cond, grid = _embed(model, latents, timestep, conditions)
  s = grid[1]
  if not 0 <= tokens_per_frame <= s:
    raise ValueError(f"{tokens_per_frame=} must lie in [0, {s}] (tokens "
                     "per frame)")
  if temporal_sparse not in stdit3_lib.TEMPORAL_SPARSE:
    raise ValueError(f"unknown {temporal_sparse=}; expected one of "
                     f"{stdit3_lib.TEMPORAL_SPARSE}")

  def select(x, layer_cache, layer, state):
    del layer
    scores = selection.token_scores(x, layer_cache, config)
    return select_per_frame(scores, grid, tokens_per_frame)[1], state

  x, cache = run_blocks(model, x, cond, grid, cache,
                        mode=layer_loop.mode_for(tokens_per_frame, s),
                        config=config, select=select,
                        temporal_sparse=temporal_sparse)
  return model.unembed(x, cond, latents.shape), cache


def forward_masked(model, latents, timestep, conditions: opensora.Conditions,
                   cache, tokens_per_frame, *,
                   config: selection.SelectionConfig):
  """`forward` as a masked dense simulation; tokens_per_frame may be traced.

  Every block computes all tokens; in each frame the K_f best by the same
  scores (ties towards lower positions, as `jax.lax.top_k`) keep their new
  values and refresh their cache, the others add their cached update.
  """
  x, cond, grid = _embed(model, latents, timestep, conditions)
  b, n, _ = x.shape
  tokens_per_frame = jnp.asarray(tokens_per_frame, jnp.int32)

  def keep(x, layer_cache, layer, state):
    del layer
    scores = selection.token_scores(x, layer_cache, config)
    return selection.keep_top(scores.reshape(b, *grid),
                              tokens_per_frame).reshape(b, n), state

  x, cache = run_blocks(model, x, cond, grid, cache, mode="masked",
                        config=config, select=keep)
  return model.unembed(x, cond, latents.shape), cache


class Plan(NamedTuple):
  """The static plan of one step: K_f and the sparse path's options."""
  tokens_per_frame: int
  config: selection.SelectionConfig
  temporal_sparse: str


def _velocity(graphdef, params, conditions, cache, latents_2b, timesteps_2b,
              *, plan: Plan):
  model = nnx.merge(graphdef, params)
  out, cache = forward(model, latents_2b, timesteps_2b, conditions, cache,
                       tokens_per_frame=plan.tokens_per_frame,
                       config=plan.config,
                       temporal_sparse=plan.temporal_sparse)
  return out[:, :model.config.in_channels], cache


def model_fn(graphdef, params, conditions: opensora.Conditions):
  """Astraea's STDiT3 as a `model_fn` for `sampling.run` (plan: `Plan`)."""
  return jax.tree_util.Partial(_velocity, graphdef, params, conditions)


def token_grid(config, latent_shape):
  """(T, S) tokens per video and per frame, after patch padding."""
  t, h, w = (-(-d // p) for d, p in zip(latent_shape[2:], config.patch_size))
  return t, h * w


def sample(model, params, noise, y, y_mask, *, budget=None, schedule=None,
           steps: int = 30, guidance_scale: float = 7.0, fps, height, width,
           num_frames: int, frame_mask=None,
           use_timestep_transform: bool = True,
           selection_config: selection.SelectionConfig = DEFAULT_SELECTION,
           temporal_sparse: str = "scatter_queries",
           return_trajectory: bool = False, progress: bool = True,
           return_stats: bool = False):
  """Astraea CFG sampling of an STDiT3: `sample_opensora` with a budget.

  Args:
    budget: mean budget in (0, 1] -> `schedule.default_schedule`; or
    schedule: one budget in [0, 1] per step (the first must be 1.0).
      Step i computes K_f = round(theta_i S) tokens in every frame.
    selection_config: the token score's options (`selection`).
    temporal_sparse: layout of the sparse temporal attention
      ("scatter_queries" | "gather_keys", `STDiT3Block`).
    Others as in `sample_opensora`.

  Returns latents, plus the trajectory and/or `sampling.SampleStats`
  (num_selected: tokens computed per block, T K_f, per step) when asked.
  """
  budgets = schedule_lib.resolve(budget, schedule, steps)
  if temporal_sparse not in stdit3_lib.TEMPORAL_SPARSE:
    raise ValueError(f"unknown {temporal_sparse=}; expected one of "
                     f"{stdit3_lib.TEMPORAL_SPARSE}")
  module = nnx.merge(model, params)
  latents = jnp.asarray(noise, F32)
  opensora.check_noise(module, latents)
  conditions = opensora.cfg_conditions(module, y, y_mask, fps=fps,
                                       height=height, width=width,
                                       frame_mask=frame_mask)
  scheduler = opensora.opensora_scheduler(
      steps, height=height, width=width, num_frames=num_frames,
      frame_mask=conditions.frame_mask,
      use_timestep_transform=use_timestep_transform)
  frames, per_frame = token_grid(module.config, latents.shape)
  batch, n = 2 * latents.shape[0], frames * per_frame
  k_fs = [schedule_lib.num_selected(theta, per_frame) for theta in budgets]
  latents, _, trajectory, stats = dense_sampler.run(
      model_fn(model, params, conditions), latents, scheduler=scheduler,
      guidance_scale=guidance_scale,
      plans=[Plan(k_f, selection_config, temporal_sparse) for k_f in k_fs],
      make_carry=lambda: init_cache(module.config, batch, n,
                                    selection_config),
      # the two stacks hold as much as one of 2 x depth blocks
      memory_hint=selection.state_hint(
          (2 * module.config.depth, batch, n, module.config.hidden_size),
          selection_config),
      return_trajectory=return_trajectory, progress=progress,
      wait=return_stats, desc="astraea",
      postfix=[{"budget": f"{t:.2f}", "tokens": f"{k_f}/{per_frame} per frame"}
               for t, k_f in zip(budgets, k_fs)])
  ks = [frames * k_f for k_f in k_fs]
  stats = dataclasses.replace(stats, budgets=budgets,
                              num_tokens=frames * per_frame, num_selected=ks,
                              compiled_k=list(dict.fromkeys(ks)))
  return dense_sampler.pack(latents, (return_trajectory, trajectory),
                           (return_stats, stats))
