"""The dense sampling loop: classifier-free guidance, one jitted step.

Numbered like diffusers' `WanPipeline.__call__`, per step i:
  1. the CFG batch: latents twice, (cond, uncond), timestep t_i for all 2B;
  2. one model call on the batch of 2B -> velocities;
  3. guidance: v = v_uncond + scale (v_cond - v_uncond);
  4. the scheduler step x_{i+1} = step(x_i, v).

The loop is built around a pluggable model function

    model_fn(carry, latents_2b, timesteps_2b) -> (velocity_2b, carry)

with an arbitrary `carry` pytree threaded from step to step (Astraea keeps
its per-block token caches there; the dense model ignores it). `model_fn`
is a pytree itself, normally a `jax.tree_util.Partial` whose bound
arguments (parameters, text embeddings) are jit arguments rather than
constants baked into the compiled step. `denoise` runs the loop; `sample`
is the thin Wan wrapper with an empty carry.

Two loop drivers with identical numerics: "python" (default) calls ONE
jitted step function per step and can show a progress bar; "scan" compiles
the whole loop as `jax.lax.scan` over that same step. Step overhead of each
on the H200: benchmarks/sampling_loop.py.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import tqdm
from flax import nnx

from astraea_jax.sampling import schedulers as sched_lib

LOOPS = ("python", "scan")


# Pieces ----------------------------------------------------------------------


def draw_noise(key, shape, dtype=jnp.float32):
  """Standard normal initial latents from a PRNG key (deterministic)."""
  return jax.random.normal(key, shape, dtype)


def wan_latent_shape(height: int, width: int, num_frames: int,
                     batch: int = 1, channels: int = 16):
  """Latent shape (B, C, F, H, W) of a Wan2.1 video: VAE 4x time, 8x space.

  num_frames must be 4k + 1 (the causal VAE keeps the first frame), height
  and width multiples of 16 (8x VAE times the 2x2 patch).
  """
  if (num_frames - 1) % 4:
    raise ValueError(f"{num_frames=} must be 4k + 1")
  if height % 16 or width % 16:
    raise ValueError(f"{height=} and {width=} must be multiples of 16")
  return (batch, channels, (num_frames - 1) // 4 + 1, height // 8, width // 8)


def cfg_batch(latents, timestep):
  """(latents_2b, timesteps_2b): latents twice, one timestep for all 2B."""
  latents_2b = jnp.concatenate([latents, latents], axis=0)
  return latents_2b, jnp.full((latents_2b.shape[0],), timestep, jnp.float32)


def cfg_combine(velocity_2b, guidance_scale):
  """Classifier-free guidance over the batch [cond (B); uncond (B)].

  v = v_uncond + scale (v_cond - v_uncond)  (Ho & Salimans 2022, eq. 6
  rewritten as the references compute it).
  """
  cond, uncond = jnp.split(velocity_2b, 2, axis=0)
  return uncond + guidance_scale * (cond - uncond)


def cfg_context(context, negative_context):
  """Text embeddings of the CFG batch: (2B, L, D) = [context; negative].

  A negative context of batch 1 is broadcast to B. The shorter of the two is
  zero-padded to the longer length (Wan pads every context with zeros to
  text_len anyway, so this changes nothing).
  """
  b = context.shape[0]
  if negative_context.shape[0] not in (1, b):
    raise ValueError(
        f"negative_context batch {negative_context.shape[0]} must be 1 or "
        f"{b} (context {context.shape})")
  if context.shape[2] != negative_context.shape[2]:
    raise ValueError(f"embedding dims differ: {context.shape=} "
                     f"{negative_context.shape=}")
  negative_context = jnp.broadcast_to(
      negative_context, (b,) + negative_context.shape[1:])
  length = max(context.shape[1], negative_context.shape[1])

  def pad(x):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0)))

  return jnp.concatenate([pad(context), pad(negative_context)], axis=0)


def guided_step(model_fn, scheduler, guidance_scale, latents, sched_state,
                carry):
  """One CFG denoising step (pure; traced inside both loop drivers).

  Returns (latents, sched_state, carry) after the step.
  """
  t = scheduler.timesteps[sched_state.step]
  latents_2b, timesteps_2b = cfg_batch(latents, t)               # 1.
  velocity_2b, carry = model_fn(carry, latents_2b, timesteps_2b)  # 2.
  velocity = cfg_combine(velocity_2b.astype(latents.dtype),       # 3.
                         guidance_scale)
  latents, sched_state = scheduler.step(sched_state, velocity, latents)  # 4.
  return latents, sched_state, carry


# The sched_state and carry are donated: their buffers (Astraea's caches)
# are reused in place. The latents are not, so trajectories stay valid.
@functools.partial(jax.jit, donate_argnums=(4, 5))
def _jitted_step(model_fn, scheduler, guidance_scale, latents, sched_state,
                 carry):
  return guided_step(model_fn, scheduler, guidance_scale, latents,
                     sched_state, carry)


@functools.partial(jax.jit, static_argnames=("return_trajectory",),
                   donate_argnums=(4, 5))
def _scanned_loop(model_fn, scheduler, guidance_scale, latents, sched_state,
                  carry, *, return_trajectory):
  def body(state, _):
    state = guided_step(model_fn, scheduler, guidance_scale, *state)
    return state, (state[0] if return_trajectory else None)

  (latents, sched_state, carry), trajectory = jax.lax.scan(
      body, (latents, sched_state, carry), None, length=scheduler.num_steps)
  # sched_state is returned only so that its donated buffers have an output
  # to alias.
  return latents, sched_state, carry, trajectory


def denoise(model_fn, latents, *, scheduler, guidance_scale, carry=(),
            loop: str = "python", return_trajectory: bool = False,
            progress: bool = True, step_seconds: list | None = None):
  """Runs all `scheduler.num_steps` CFG steps from `latents`.

  Args:
    model_fn: `model_fn(carry, latents_2b, timesteps_2b) -> (velocity_2b,
      carry)`, a pytree (e.g. `jax.tree_util.Partial`) so that its arrays are
      traced arguments of the jitted step.
    latents: (B, C, F, H, W) starting latents (noise), float32.
    scheduler: a scheduler pytree (`FlowUniPC`, `FlowEuler`).
    guidance_scale: CFG scale (traced: changing it does not recompile).
    carry: pytree threaded through `model_fn`; consumed (donated).
    loop: "python" (jitted step in a Python loop, progress bar) or "scan".
    return_trajectory: also return the latents after every step.
    progress: tqdm progress bar (python loop; waits for each step).
    step_seconds: if a list, the python loop waits for every step and
      appends its wall time (the first includes compilation).

  Returns:
    (latents, carry, trajectory): trajectory (num_steps, B, C, F, H, W) or
    None.
  """
  if loop not in LOOPS:
    raise ValueError(f"{loop=} must be one of {LOOPS}")
  guidance_scale = jnp.asarray(guidance_scale, jnp.float32)
  sched_state = scheduler.init(latents)
  if loop == "scan":
    latents, _, carry, trajectory = _scanned_loop(
        model_fn, scheduler, guidance_scale, latents, sched_state, carry,
        return_trajectory=return_trajectory)
    return latents, carry, trajectory
  trajectory = []
  steps = tqdm.trange(scheduler.num_steps, disable=not progress,
                      desc="sampling", unit="step")
  for _ in steps:
    start = time.perf_counter()
    latents, sched_state, carry = _jitted_step(
        model_fn, scheduler, guidance_scale, latents, sched_state, carry)
    if progress or step_seconds is not None:  # wait for the step to finish
      latents.block_until_ready()
    if step_seconds is not None:
      step_seconds.append(time.perf_counter() - start)
    if return_trajectory:
      trajectory.append(latents)
  trajectory = jnp.stack(trajectory) if return_trajectory else None
  return latents, carry, trajectory


# Wan -------------------------------------------------------------------------


def _wan_velocity(graphdef, params, context_2b, carry, latents_2b,
                  timesteps_2b):
  model = nnx.merge(graphdef, params)
  return model(latents_2b, timesteps_2b, context_2b), carry


def wan_model_fn(graphdef, params, context_2b):
  """The dense WanDiT as a `model_fn` (empty carry) for `denoise`."""
  return jax.tree_util.Partial(_wan_velocity, graphdef, params, context_2b)


def make_scheduler(name: str, steps: int, *, shift: float,
                   schedule: str = "diffusers"):
  """"unipc" (Wan's default) or "euler" with `steps` steps and flow shift."""
  if name == "unipc":
    return sched_lib.FlowUniPC.set_timesteps(steps, shift=shift,
                                             schedule=schedule)
  if name == "euler":
    return sched_lib.FlowEuler.set_timesteps(steps, shift=shift)
  raise ValueError(f"unknown scheduler {name!r}; expected 'unipc' or 'euler'")


def sample(model, params, noise, context, negative_context, *,
           scheduler: str | Any = "unipc", steps: int | None = 50,
           guidance_scale: float = 5.0, shift: float | None = None,
           return_trajectory: bool = False, loop: str = "python",
           progress: bool = True, step_seconds: list | None = None):
  """Dense CFG sampling with a WanDiT: noise -> latents.

  Args:
    model: the WanDiT `nnx.GraphDef` and params its `nnx.State`
      (`model, params = nnx.split(wan_dit)`).
    noise: (B, 16, F, H, W) float32 initial latents (`draw_noise`).
    context, negative_context: (B, L, text_dim) prompt embeddings and
      (B or 1, L', text_dim) negative-prompt embeddings.
    scheduler: "unipc" | "euler", built with `steps` and `shift`, or a
      scheduler pytree (then `steps` must be None or its step count).
    shift: flow shift; None = `wan_flow_shift` of the video size implied by
      the latents (3.0 up to 480p, 5.0 above).
    Others as in `denoise`.

  Returns:
    latents (B, 16, F, H, W) float32, or (latents, trajectory) with
    trajectory (steps, B, 16, F, H, W) when return_trajectory.
  """
  if isinstance(scheduler, str):
    if steps is None:
      raise ValueError(f"{scheduler=} needs `steps`")
    if shift is None:
      shift = sched_lib.wan_flow_shift(8 * noise.shape[3], 8 * noise.shape[4])
    scheduler = make_scheduler(scheduler, steps, shift=shift)
  elif steps is not None and steps != scheduler.num_steps:
    raise ValueError(
        f"{steps=} disagrees with the scheduler's {scheduler.num_steps} steps")
  if context.shape[0] != noise.shape[0]:
    raise ValueError(f"context batch {context.shape[0]} != noise batch "
                     f"{noise.shape[0]}")
  model_fn = wan_model_fn(model, params, cfg_context(context,
                                                     negative_context))
  latents, _, trajectory = denoise(
      model_fn, jnp.asarray(noise, jnp.float32), scheduler=scheduler,
      guidance_scale=guidance_scale, loop=loop,
      return_trajectory=return_trajectory, progress=progress,
      step_seconds=step_seconds)
  return (latents, trajectory) if return_trajectory else latents

