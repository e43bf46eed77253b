"""Dense and Astraea CFG sampling with a WanDiT spread over a device mesh.

`sample` is `sampling.sample` and `astraea_sample` is
`astraea.wan_tokenwise.sample` with one more argument, `mesh` (a
`parallel.make_mesh` mesh): the CFG batch of 2B goes over the "data" axis,
each video's tokens over "seq". Same arguments, same results (up to float
summation order; budget 1.0 equals the dense sampler); with seq > 1 Astraea
selects round(K / P) tokens on each of the P shards (see parallel/sequence_parallel.py).

Inputs may be host or device arrays and are placed on the mesh
(replicated); results come back replicated, readable on every process of
a multi-host run.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from astraea_jax.astraea import wan_tokenwise as astraea_sampler
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.parallel import mesh as mesh_lib
from astraea_jax.parallel import sequence_parallel as sp_wan
from astraea_jax.parallel.layout import TokenLayout
from astraea_jax.sampling import sampler as dense_sampler
from astraea_jax.sampling import schedulers as sched_lib

F32 = jnp.float32


def _dense_velocity(graphdef, params, context_2b, sp, carry, latents_2b,
                    timesteps_2b):
  model = nnx.merge(graphdef, params)
  return sp_wan.forward(model, latents_2b, timesteps_2b, context_2b,
                        sp=sp), carry


def wan_model_fn(graphdef, params, context_2b, sp: sp_wan.SequenceParallel):
  """`sampling.wan_model_fn` with the model sequence-parallel over sp.mesh."""
  return jax.tree_util.Partial(_dense_velocity, graphdef, params, context_2b,
                               sp)


def _make_scheduler(scheduler, steps, shift, noise_shape):
  if isinstance(scheduler, str):
    if steps is None:
      raise ValueError(f"{scheduler=} needs `steps`")
    if shift is None:
      shift = sched_lib.wan_flow_shift(8 * noise_shape[3], 8 * noise_shape[4])
    return dense_sampler.make_scheduler(scheduler, steps, shift=shift)
  if steps is not None and steps != scheduler.num_steps:
    raise ValueError(
        f"{steps=} disagrees with the scheduler's {scheduler.num_steps} steps")
  return scheduler


def _placed_inputs(params, noise, context, negative_context, scheduler, mesh):
  """Everything the loop reads, replicated on the mesh."""
  if context.shape[0] != noise.shape[0]:
    raise ValueError(f"context batch {context.shape[0]} != noise batch "
                     f"{noise.shape[0]}")
  context_2b = dense_sampler.cfg_context(jnp.asarray(context),
                                         jnp.asarray(negative_context))
  return (mesh_lib.replicate(params, mesh),
          mesh_lib.put(noise, mesh).astype(F32),
          mesh_lib.put(context_2b, mesh),
          mesh_lib.replicate(scheduler, mesh))


def _check_data_axis(sp, noise):
  if (2 * noise.shape[0]) % sp.data_size:
    raise ValueError(
        f"the CFG batch 2 x {noise.shape[0]} must be divisible by the mesh's "
        f"data axis ({sp.data_size}); use make_mesh(..., data=...) with a "
        "divisor of it")


def _replicated(x, mesh):
  return mesh_lib.put(x, mesh)


@functools.cache
def _dense_step_fn(mesh: Mesh):
  """The dense sampler's jitted step with results pinned to the mesh.

  Pinned output shardings (latents and scheduler state replicated) keep
  every step's inputs placed alike, so the step compiles once.
  """
  rep = NamedSharding(mesh, P())
  return jax.jit(dense_sampler.guided_step, donate_argnums=(4, 5),
                 out_shardings=(rep, rep, rep))


def sample(model, params, noise, context, negative_context, *, mesh: Mesh,
           strategy: str = "auto", ulysses: int | None = None,
           scheduler: str | Any = "unipc", steps: int | None = 50,
           guidance_scale: float = 5.0, shift: float | None = None,
           return_trajectory: bool = False, loop: str = "python",
           progress: bool = True, step_seconds: list | None = None):
  """Dense CFG sampling over a mesh; `sampling.sample` plus mesh/strategy.

  strategy: "auto" | "ulysses" | "ring" | "hybrid" (parallel.attention);
  ulysses: the hybrid's Ulysses group size. loop "scan" runs
  `sampling.denoise`'s scanned loop; "python" a jitted step per step.
  """
  sp = sp_wan.SequenceParallel(mesh, strategy, ulysses)
  _check_data_axis(sp, noise)
  # Fails before compiling; every input goes on the program's one mesh.
  mesh = sp.program_mesh(nnx.merge(model, params).config.num_heads)
  scheduler = _make_scheduler(scheduler, steps, shift, noise.shape)
  params, latents, context_2b, scheduler = _placed_inputs(
      params, noise, context, negative_context, scheduler, mesh)
  model_fn = wan_model_fn(model, params, context_2b, sp)
  if loop != "python":
    latents, _, trajectory = dense_sampler.denoise(
        model_fn, latents, scheduler=scheduler,
        guidance_scale=guidance_scale, loop=loop,
        return_trajectory=return_trajectory, progress=progress,
        step_seconds=step_seconds)
  else:
    step = _dense_step_fn(mesh)
    guidance_scale = mesh_lib.put(np.float32(guidance_scale), mesh)
    sched_state = mesh_lib.replicate(scheduler.init(latents), mesh)
    trajectory = []
    for _ in tqdm.trange(scheduler.num_steps, disable=not progress,
                         desc="sampling", unit="step"):
      start = time.perf_counter()
      latents, sched_state, _ = step(model_fn, scheduler, guidance_scale,
                                     latents, sched_state, ())
      if progress or step_seconds is not None:
        latents.block_until_ready()
      if step_seconds is not None:
        step_seconds.append(time.perf_counter() - start)
      if return_trajectory:
        trajectory.append(latents)
    trajectory = jnp.stack(trajectory) if return_trajectory else None
  latents = _replicated(latents, mesh)
  if return_trajectory:
    return latents, _replicated(trajectory, mesh)
  return latents


def _astraea_velocity(graphdef, params, context_2b, num_selected, config, sp,
                      cache, latents_2b, timesteps_2b):
  model = nnx.merge(graphdef, params)
  return sp_wan.astraea_forward(model, latents_2b, timesteps_2b, context_2b,
                                cache, sp=sp, num_selected=num_selected,
                                config=config)


def _astraea_step_body(graphdef, params, context_2b, scheduler,
                       guidance_scale, sched_state, cache, latents, *,
                       num_selected, config, sp):
  model_fn = functools.partial(_astraea_velocity, graphdef, params,
                               context_2b, num_selected, config, sp)
  return dense_sampler.guided_step(model_fn, scheduler, guidance_scale,
                                   latents, sched_state, cache)


@functools.cache
def _astraea_step_fn(cache_sharding: NamedSharding):
  rep = NamedSharding(cache_sharding.mesh, P())
  return jax.jit(_astraea_step_body,
                 static_argnames=("num_selected", "config", "sp"),
                 donate_argnums=(5, 6),
                 out_shardings=(rep, rep, cache_sharding))


def _astraea_step(graphdef, params, context_2b, scheduler, guidance_scale,
                  sched_state, cache, latents, *, num_selected, config, sp):
  """One jitted Astraea CFG step over sp.mesh (compiled once per K)."""
  return _astraea_step_fn(cache["update"].sharding)(
      graphdef, params, context_2b, scheduler, guidance_scale, sched_state,
      cache, latents, num_selected=num_selected, config=config, sp=sp)


@dataclasses.dataclass
class ParallelSampleStats(astraea_sampler.SampleStats):
  """`SampleStats` plus the split: tokens each shard computed per step."""
  num_shards: int = 1
  plan: str = ""
  selected_per_shard: list[int] = dataclasses.field(default_factory=list)


def astraea_sample(model, params, noise, context, negative_context, *,
                   mesh: Mesh, strategy: str = "auto",
                   ulysses: int | None = None, budget=None, schedule=None,
                   scheduler="unipc", steps: int = 50,
                   guidance_scale: float = 5.0, shift: float | None = None,
                   selection_config: selection.SelectionConfig = selection
                   .SelectionConfig(), return_trajectory: bool = False,
                   progress: bool = True, return_stats: bool = False):
  """Astraea CFG sampling over a mesh; `astraea.wan_tokenwise.sample` plus mesh.

  Each of the P sequence shards computes round(K_t / P) of its own tokens
  at step t (K_t = round(theta_t N)); budget 1.0 steps run the dense
  blocks. Stats (return_stats) count the tokens computed over all shards.
  """
  if (budget is None) == (schedule is None):
    raise ValueError("give exactly one of `budget` and `schedule`")
  sp = sp_wan.SequenceParallel(mesh, strategy, ulysses)
  _check_data_axis(sp, noise)
  scheduler = _make_scheduler(scheduler, steps, shift, noise.shape)
  steps = scheduler.num_steps
  budgets = schedule_lib.validate(
      schedule_lib.default_schedule(budget, steps) if schedule is None
      else schedule, steps)
  config = nnx.merge(model, params).config
  grid = tuple(s // p for s, p in zip(noise.shape[2:], config.patch_size))
  n = int(np.prod(grid))
  plan = sp.plan(config.num_heads)
  layout = TokenLayout(n, plan.num_shards)
  mesh = sp.inner_mesh(plan)  # the program's one mesh (program_mesh)
  params, latents, context_2b, scheduler = _placed_inputs(
      params, noise, context, negative_context, scheduler, mesh)
  cache = sp_wan.init_cache(config, 2 * noise.shape[0], n, sp,
                            selection_config)
  sched_state = mesh_lib.replicate(scheduler.init(latents), mesh)
  guidance_scale = mesh_lib.put(np.float32(guidance_scale), mesh)
  stats = ParallelSampleStats(
      budgets=budgets, num_selected=[], num_tokens=n, compiled_k=[],
      step_seconds=[], num_shards=plan.num_shards,
      plan=f"{plan.name} (ulysses {plan.ulysses} x ring {plan.ring})")
  trajectory = []
  bar = tqdm.tqdm(budgets, disable=not progress, desc="astraea", unit="step")
  for theta in bar:
    k = schedule_lib.num_selected(theta, n)
    per_shard = sp_wan.local_num_selected(k, layout)
    computed = n if k == n else per_shard * plan.num_shards
    if k not in stats.compiled_k:
      stats.compiled_k.append(k)
    if progress:
      bar.set_postfix(budget=f"{theta:.2f}", tokens=f"{computed}/{n}")
    t0 = time.perf_counter()
    latents, sched_state, cache = _astraea_step(
        model, params, context_2b, scheduler, guidance_scale, sched_state,
        cache, latents, num_selected=k, config=selection_config, sp=sp)
    if progress or return_stats:
      latents.block_until_ready()
    stats.step_seconds.append(time.perf_counter() - t0)
    stats.num_selected.append(computed)
    stats.selected_per_shard.append(per_shard)
    if return_trajectory:
      trajectory.append(latents)
  out = [_replicated(latents, mesh)]
  if return_trajectory:
    out.append(_replicated(jnp.stack(trajectory), mesh))
  if return_stats:
    out.append(stats)
  return out[0] if len(out) == 1 else tuple(out)


def samplers(num_devices: int, *, batch: int, strategy: str = "auto"):
  """(dense, astraea) samplers over `num_devices` devices.

  Drop-in for (`sampling.sample`, `astraea.wan_tokenwise.sample`), as `astraea
  generate --devices N` uses them: the CFG batch of `batch` goes over the
  data axis as far as it divides (no communication), the tokens over the
  rest (`default_mesh_shape`); e.g. 2 GPUs -> data 2, 8 GPUs -> 2 x seq 4.
  """
  data, _ = mesh_lib.default_mesh_shape(num_devices, batch)
  mesh = mesh_lib.make_mesh(num_devices, data=data)
  return (functools.partial(sample, mesh=mesh, strategy=strategy),
          functools.partial(astraea_sample, mesh=mesh, strategy=strategy))
