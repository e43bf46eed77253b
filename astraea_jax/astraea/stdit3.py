"""OpenSora v1.2 sampling: dense rectified flow, and Astraea on STDiT3.

Dense (`sample_opensora`), per step i as OpenSora's `RFLOW.sample`:
  1. the CFG batch: latents twice; captions [y; null caption], the caption
     mask shared by both halves; timestep t_i (transformed) for all 2B;
  2. STDiT3 on the batch of 2B; its first in_channels output channels are
     the velocity (x0 - noise: OpenSora's sign);
  3. v = v_uncond + scale (v_cond - v_uncond);
  4. Euler: z += v (t_i - t_{i+1}) / 1000; with a frame mask, conditioning
     frames (mask 0) keep their value.
The loop is `sampling.denoise` with an STDiT3 `model_fn`.

Astraea (`sample`): token selection before each of the 2 * depth blocks
(spatial block i, temporal block i, ...), each block with its own cache
(update, input, LSE, stale; `selection.init_cache` layout, one stack per
block kind). At budget theta every frame computes the same number of tokens
K_f = round(theta S) (S tokens per frame), its K_f best by the Astraea
score: balanced per-frame top-K. Static shapes follow: spatial attention is
a batch of T frames with K_f queries each against all S keys of the frame,
temporal attention a query per selected token against all T frames at its
position, cross-attention and MLP on the T K_f selected tokens; every
computed attention row is exact. Unselected tokens add their cached
residual update. K_f = S runs the dense blocks, K_f = 0 reuses every cached
update; the step compiles once per distinct K_f. docs/astraea_stdit3.md
explains the choice and the alternatives.

`forward_masked` is the same computation as a masked dense simulation
(every token computed, the per-frame top K_f kept by rank); it takes K_f as
a traced value, for a budget search without recompiles.
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx, struct

from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.astraea.sampler import SampleStats
from astraea_jax.models import stdit3 as stdit3_lib
from astraea_jax.sampling import sampler as dense_sampler
from astraea_jax.sampling import schedulers as sched_lib

F32 = jnp.float32
BLOCK_KINDS = ("spatial", "temporal")
DEFAULT_SELECTION = selection.SelectionConfig()


# Inputs of the CFG batch ------------------------------------------------------


class Conditions(NamedTuple):
  """What the STDiT3 reads besides latents and timestep, for a CFG batch.

  y: (2B, 1, L, caption_channels) = [caption; null caption].
  mask: (B, L) int, nonzero = valid caption token, or None (all valid). The
    model tiles it to 2B: the null caption shares the caption's mask, as
    OpenSora's sampler does.
  fps, height, width: (B,) float32 (pixels; the model tiles fps, and reads
    height[0], width[0] for its position embedding scale).
  frame_mask: (B, T) float32 in {0, 1}, 0 = conditioning frame, or None.
  """

  y: jax.Array
  mask: jax.Array | None
  fps: jax.Array
  height: jax.Array
  width: jax.Array
  frame_mask: jax.Array | None


def cfg_conditions(model, y, y_mask, *, fps, height, width,
                   frame_mask=None) -> Conditions:
  """The `Conditions` of a CFG batch; checks shapes, names bad values.

  model: the STDiT3 module (for its null caption and config); y (B, 1, L,
  caption_channels); y_mask (B, L) or None; fps/height/width scalars or
  (B,); frame_mask (B, T) in {0, 1} or None.
  """
  c = model.config
  y = jnp.asarray(y, F32)
  if y.ndim != 4 or y.shape[1] != 1 or y.shape[3] != c.caption_channels:
    raise ValueError(f"y must be (B, 1, L, {c.caption_channels}); got "
                     f"{y.shape}")
  b, length = y.shape[0], y.shape[2]
  if length != c.model_max_length:
    raise ValueError(f"caption length {length} != {c.model_max_length=} "
                     "(the null caption's length)")
  if y_mask is not None:
    y_mask = jnp.asarray(y_mask)
    if y_mask.shape != (b, length):
      raise ValueError(f"y_mask must be ({b}, {length}); got {y_mask.shape}")

  def per_sample(name, v):
    v = np.asarray(v, np.float32).reshape(-1)
    if v.shape[0] not in (1, b):
      raise ValueError(f"{name} must be a scalar or ({b},); got {v.shape}")
    return jnp.asarray(np.broadcast_to(v, (b,)))

  if frame_mask is not None:
    frame_mask = np.asarray(frame_mask, np.float32)
    if frame_mask.ndim != 2 or frame_mask.shape[0] != b:
      raise ValueError(f"frame_mask must be ({b}, T); got {frame_mask.shape}")
    if not np.isin(frame_mask, (0.0, 1.0)).all():
      raise ValueError(
          "frame_mask values must be 0 (conditioning frame) or 1; got "
          f"{sorted(set(frame_mask.ravel().tolist()))} (OpenSora's partial "
          "masks, which re-noise frames mid-sampling, are not supported)")
    frame_mask = jnp.asarray(frame_mask)
  null = model.null_caption(b).astype(F32)
  return Conditions(y=jnp.concatenate([y, null], axis=0), mask=y_mask,
                    fps=per_sample("fps", fps),
                    height=per_sample("height", height),
                    width=per_sample("width", width), frame_mask=frame_mask)


def model_inputs(conditions: Conditions, timesteps_2b):
  """Keyword arguments of `STDiT3.__call__`/`embed` at these timesteps.

  x_mask: True where a frame is denoised at this step (OpenSora's
  `mask * 1000 >= t`, repeated over the CFG batch), or None.
  """
  x_mask = None
  if conditions.frame_mask is not None:
    frame_mask_2b = jnp.tile(conditions.frame_mask, (2, 1))
    x_mask = sched_lib.rflow_frame_keep(frame_mask_2b, timesteps_2b)
  return {"y": conditions.y, "mask": conditions.mask, "x_mask": x_mask,
          "fps": conditions.fps, "height": conditions.height,
          "width": conditions.width}


@struct.dataclass
class FrameConditioned:
  """A scheduler whose step keeps OpenSora's conditioning frames.

  After each step, frames with frame_mask 0 return to their value before
  the step (`RFLOW.sample`: z = where(mask_t_upper, z, x0)); with a
  {0, 1} mask they never move from the starting latents.
  """

  scheduler: Any
  frame_mask: jax.Array  # (B, T) float32

  @property
  def timesteps(self):
    return self.scheduler.timesteps

  @property
  def num_steps(self) -> int:
    return self.scheduler.num_steps

  def init(self, sample):
    return self.scheduler.init(sample)

  def step(self, state, model_output, sample):
    keep = sched_lib.rflow_frame_keep(self.frame_mask,
                                      self.scheduler.timesteps[state.step])
    prev_sample, state = self.scheduler.step(state, model_output, sample)
    return sched_lib.rflow_condition_frames(prev_sample, sample, keep), state


def opensora_scheduler(steps: int, *, height, width, num_frames: int,
                       frame_mask=None, use_timestep_transform: bool = True):
  """`FlowEuler.set_timesteps_rflow`, wrapped when there is a frame mask.

  height, width: the video's pixel size, num_frames its frame count (the
  timestep transform's inputs); scalars or per-sample values that agree.
  """
  def scalar(name, v):
    v = np.asarray(v, np.float64).reshape(-1)
    if v.size == 0 or (v != v[0]).any():
      raise ValueError(f"{name} must be one value for the whole batch (one "
                       f"timestep schedule); got {v.tolist()}")
    return float(v[0])

  num_frames = int(scalar("num_frames", num_frames))
  if use_timestep_transform and 1 < num_frames < 17:
    # The transform scales by sqrt((num_frames // 17) * 5): 0 here, which
    # maps every timestep to 0 (0/0 at t = 1000).
    raise ValueError(f"{num_frames=}: OpenSora's timestep transform needs 1 "
                     "or >= 17 frames (use_timestep_transform=False "
                     "otherwise)")
  scheduler = sched_lib.FlowEuler.set_timesteps_rflow(
      steps, height=scalar("height", height), width=scalar("width", width),
      num_frames=num_frames, use_timestep_transform=use_timestep_transform)
  if frame_mask is not None:
    scheduler = FrameConditioned(scheduler, jnp.asarray(frame_mask, F32))
  return scheduler


# Dense sampling ---------------------------------------------------------------


def _velocity(graphdef, params, conditions, carry, latents_2b, timesteps_2b):
  model = nnx.merge(graphdef, params)
  out = model(latents_2b, timesteps_2b, **model_inputs(conditions,
                                                       timesteps_2b))
  return out[:, :model.config.in_channels], carry


def opensora_model_fn(graphdef, params, conditions: Conditions):
  """The dense STDiT3 as a `model_fn` (empty carry) for `denoise`."""
  return jax.tree_util.Partial(_velocity, graphdef, params, conditions)


def sample_opensora(model, params, noise, y, y_mask, *, steps: int = 30,
                    guidance_scale: float = 7.0, fps, height, width,
                    num_frames: int, frame_mask=None,
                    use_timestep_transform: bool = True,
                    return_trajectory: bool = False, loop: str = "python",
                    progress: bool = True, step_seconds: list | None = None):
  """Dense OpenSora v1.2 CFG sampling (rectified flow, Euler): noise -> z.

  Args:
    model, params: `nnx.split(stdit3_model)`.
    noise: (B, in_channels, T, H, W) starting latents.
    y: (B, 1, L, caption_channels) caption embeddings (T5); y_mask (B, L)
      nonzero = valid token, or None.
    fps, height, width: frame rate and pixel size (scalars or (B,));
      num_frames: the video's frame count. height, width and num_frames set
      the timestep transform; fps, height, width are model inputs.
    frame_mask: (B, T) in {0, 1}, 0 = conditioning frame (kept at its
      starting value), or None.
    Others as in `sampling.denoise`.

  Returns latents (B, in_channels, T, H, W) float32, or (latents,
  trajectory (steps, B, ...)) when return_trajectory.
  """
  module = nnx.merge(model, params)
  noise = jnp.asarray(noise, F32)
  _check_noise(module, noise)
  conditions = cfg_conditions(module, y, y_mask, fps=fps, height=height,
                              width=width, frame_mask=frame_mask)
  scheduler = opensora_scheduler(
      steps, height=height, width=width, num_frames=num_frames,
      frame_mask=conditions.frame_mask,
      use_timestep_transform=use_timestep_transform)
  latents, _, trajectory = dense_sampler.denoise(
      opensora_model_fn(model, params, conditions), noise,
      scheduler=scheduler, guidance_scale=guidance_scale, loop=loop,
      return_trajectory=return_trajectory, progress=progress,
      step_seconds=step_seconds)
  return (latents, trajectory) if return_trajectory else latents


def _check_noise(module, noise):
  c = module.config
  if noise.ndim != 5 or noise.shape[1] != c.in_channels:
    raise ValueError(f"noise must be (B, {c.in_channels}, T, H, W); got "
                     f"{noise.shape}")


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


def _layer(tree, i):
  return jax.tree.map(lambda c: c[i], tree)


def _set_layer(tree, i, new):
  return jax.tree.map(
      lambda c, u: jax.lax.dynamic_update_index_in_dim(c, u.astype(c.dtype),
                                                       i, 0), tree, new)


def _scan_blocks(model, x, cache, run_block):
  """Spatial block i then temporal block i, each with its own cache.

  run_block(graphdef, block_state, x, layer_cache) -> (x_next, new_cache).
  """
  defs_states = [nnx.split(getattr(model, f"{kind}_blocks"))
                 for kind in BLOCK_KINDS]

  def body(carry, states):
    x, cache, i = carry
    for kind, (graphdef, _), state in zip(BLOCK_KINDS, defs_states, states):
      x, new = run_block(graphdef, state, x, _layer(cache[kind], i))
      cache = {**cache, kind: _set_layer(cache[kind], i, new)}
    return (x, cache, i + 1), None

  (x, cache, _), _ = jax.lax.scan(
      body, (x, cache, 0), tuple(state for _, state in defs_states),
      unroll=model.config.scan_unroll)
  return x, cache


def _embed(model, latents, timestep, conditions):
  kwargs = model_inputs(conditions, timestep)
  tokens, cond = model.embed(latents, timestep, **kwargs)
  grid = model.grid(latents.shape)
  return tokens, cond, (grid[0], grid[1] * grid[2])


def forward(model, latents, timestep, conditions: Conditions, cache, *,
            tokens_per_frame: int, config: selection.SelectionConfig,
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

  def run_block(graphdef, state, x, layer_cache):
    if tokens_per_frame == 0:
      return selection.reuse_layer_cache(layer_cache, x)
    block = nnx.merge(graphdef, state)
    if tokens_per_frame == s:  # the dense block, as the dense sampler runs
      x_out, aux = block(x, cond, grid)
      return selection.refresh_layer_cache(layer_cache, x, x_out,
                                           aux["lse"], config)
    scores = selection.token_scores(x, layer_cache, config)
    positions, token_index = select_per_frame(scores, grid, tokens_per_frame)
    x_sel, aux = block(x, cond, grid, token_index=positions,
                       temporal_sparse=temporal_sparse)
    return selection.update_layer_cache(layer_cache, x, x_sel, aux["lse"],
                                        token_index, config)

  x, cache = _scan_blocks(model, x, cache, run_block)
  return model.unembed(x, cond, latents.shape), cache


def forward_masked(model, latents, timestep, conditions: Conditions, cache,
                   tokens_per_frame, *, config: selection.SelectionConfig):
  """`forward` as a masked dense simulation; tokens_per_frame may be traced.

  Every block computes all tokens; in each frame the K_f best by the same
  scores (ties towards lower positions, as `jax.lax.top_k`) keep their new
  values and refresh their cache, the others add their cached update.
  """
  x, cond, grid = _embed(model, latents, timestep, conditions)
  b, n, _ = x.shape
  t, s = grid
  tokens_per_frame = jnp.asarray(tokens_per_frame, jnp.int32)

  def run_block(graphdef, state, x, c):
    x_out, aux = nnx.merge(graphdef, state)(x, cond, grid)
    scores = selection.token_scores(x, c, config).reshape(b, t, s)
    order = jnp.argsort(-scores, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)
    keep = (rank < tokens_per_frame).reshape(b, n)
    dtype = c["update"].dtype
    update = jnp.where(keep[..., None], (x_out - x).astype(dtype),
                       c["update"])
    x_next = jnp.where(keep[..., None], x_out, x + update.astype(F32))
    return x_next, {
        "update": update,
        "input": jnp.where(keep[..., None], x.astype(dtype), c["input"]),
        "lse": jnp.where(keep, selection.reduce_heads(aux["lse"], config),
                         c["lse"]),
        "stale": jnp.where(keep, 0, c["stale"] + 1)}

  x, cache = _scan_blocks(model, x, cache, run_block)
  return model.unembed(x, cond, latents.shape), cache


def _astraea_velocity(graphdef, params, conditions, tokens_per_frame, config,
                      temporal_sparse, cache, latents_2b, timesteps_2b):
  model = nnx.merge(graphdef, params)
  out, cache = forward(model, latents_2b, timesteps_2b, conditions, cache,
                       tokens_per_frame=tokens_per_frame, config=config,
                       temporal_sparse=temporal_sparse)
  return out[:, :model.config.in_channels], cache


@functools.partial(
    jax.jit, static_argnames=("tokens_per_frame", "config",
                              "temporal_sparse"), donate_argnums=(5, 6))
def _step(graphdef, params, conditions, scheduler, guidance_scale,
          sched_state, cache, latents, *, tokens_per_frame, config,
          temporal_sparse):
  model_fn = functools.partial(_astraea_velocity, graphdef, params,
                               conditions, tokens_per_frame, config,
                               temporal_sparse)
  return dense_sampler.guided_step(model_fn, scheduler, guidance_scale,
                                   latents, sched_state, cache)


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

  Returns latents, plus the trajectory and/or SampleStats (num_selected:
  tokens computed per block, T K_f, per step) when asked.
  """
  if (budget is None) == (schedule is None):
    raise ValueError("give exactly one of `budget` and `schedule`")
  budgets = schedule_lib.validate(
      schedule_lib.default_schedule(budget, steps) if schedule is None
      else schedule, steps)
  if temporal_sparse not in stdit3_lib.TEMPORAL_SPARSE:
    raise ValueError(f"unknown {temporal_sparse=}; expected one of "
                     f"{stdit3_lib.TEMPORAL_SPARSE}")
  module = nnx.merge(model, params)
  latents = jnp.asarray(noise, F32)
  _check_noise(module, latents)
  conditions = cfg_conditions(module, y, y_mask, fps=fps, height=height,
                              width=width, frame_mask=frame_mask)
  scheduler = opensora_scheduler(
      steps, height=height, width=width, num_frames=num_frames,
      frame_mask=conditions.frame_mask,
      use_timestep_transform=use_timestep_transform)
  frames, per_frame = token_grid(module.config, latents.shape)
  cache = init_cache(module.config, 2 * latents.shape[0], frames * per_frame,
                     selection_config)
  sched_state = scheduler.init(latents)
  guidance_scale = jnp.asarray(guidance_scale, F32)
  stats = SampleStats(budgets=budgets, num_selected=[],
                      num_tokens=frames * per_frame, compiled_k=[],
                      step_seconds=[])
  trajectory = []
  bar = tqdm.tqdm(budgets, disable=not progress, desc="astraea", unit="step")
  for theta in bar:
    k_f = schedule_lib.num_selected(theta, per_frame)
    if frames * k_f not in stats.compiled_k:
      stats.compiled_k.append(frames * k_f)
    if progress:
      bar.set_postfix(budget=f"{theta:.2f}",
                      tokens=f"{k_f}/{per_frame} per frame")
    start = time.perf_counter()
    latents, sched_state, cache = _step(
        model, params, conditions, scheduler, guidance_scale, sched_state,
        cache, latents, tokens_per_frame=k_f, config=selection_config,
        temporal_sparse=temporal_sparse)
    if progress or return_stats:
      latents.block_until_ready()
    stats.step_seconds.append(time.perf_counter() - start)
    stats.num_selected.append(frames * k_f)
    if return_trajectory:
      trajectory.append(latents)
  out = [latents]
  if return_trajectory:
    out.append(jnp.stack(trajectory))
  if return_stats:
    out.append(stats)
  return out[0] if len(out) == 1 else tuple(out)
