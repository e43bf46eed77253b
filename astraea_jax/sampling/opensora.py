"""Dense OpenSora v1.2 sampling: rectified flow, Euler, CFG.

Per step i as OpenSora's `RFLOW.sample`:
  1. the CFG batch: latents twice; captions [y; null caption], the caption
     mask shared by both halves; timestep t_i (transformed) for all 2B;
  2. STDiT3 on the batch of 2B; its first in_channels output channels are
     the velocity (x0 - noise: OpenSora's sign);
  3. v = v_uncond + scale (v_cond - v_uncond);
  4. Euler: z += v (t_i - t_{i+1}) / 1000; with a frame mask, conditioning
     frames (mask 0) keep their value.
The loop is `sampling.denoise` with an STDiT3 `model_fn`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from astraea_jax.sampling import sampler as dense_sampler
from astraea_jax.sampling import schedulers as sched_lib

F32 = jnp.float32


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
  check_noise(module, noise)
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


def check_noise(module, noise):
  c = module.config
  if noise.ndim != 5 or noise.shape[1] != c.in_channels:
    raise ValueError(f"noise must be (B, {c.in_channels}, T, H, W); got "
                     f"{noise.shape}")
