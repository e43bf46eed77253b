"""Dense and Astraea CFG sampling with a WanDiT spread over a device mesh.

`sample` is `sampling.sample` and `astraea_sample` is
`astraea.wan_tokenwise.sample` with one more argument, `mesh` (a
`parallel.make_mesh` mesh): the CFG batch of 2B goes over the "data" axis,
each video's tokens over "seq". Same arguments, same results (up to float
summation order; budget 1.0 equals the dense sampler); with seq > 1 Astraea
selects round(K / P) tokens on each of the P shards (see
parallel/sequence_parallel.py). Both run the one host loop (`sampling.run`)
with the step's results pinned to the mesh.

Wan2.2's inputs pass as in the one-device samplers: `token_mask` (TI2V
image-to-video: the image's tokens at timestep 0; the per-token timesteps
are sharded with the tokens), `post_step` (its image frame put back after
every step), `condition` (I2V-A14B's extra input channels), and the A14B
experts' params pair with `boundary_ratio`: each step's plan names its
expert (`sampling.sampler.expert_plan`, one compile per expert and plan;
both experts' params are placed on the mesh as one model's are) and its
guidance scale (`expert_guidance`); Astraea's first step of the next
expert computes every token (`wan_tokenwise.refresh_at_switch`).

Inputs may be host or device arrays and are placed on the mesh
(replicated); results come back replicated, readable on every process of
a multi-host run.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from astraea_jax.astraea import selection
from astraea_jax.astraea import wan_tokenwise
from astraea_jax.parallel import mesh as mesh_lib
from astraea_jax.parallel import sequence_parallel as sp_wan
from astraea_jax.parallel.layout import TokenLayout
from astraea_jax.sampling import sampler as dense_sampler

F32 = jnp.float32


def _dense_velocity(graphdef, params, inputs, sp, carry, latents_2b,
                    timesteps_2b, *, plan=None):
  model = nnx.merge(graphdef, dense_sampler.pick_expert(params, plan))
  return sp_wan.forward(model, latents_2b, inputs.timesteps(timesteps_2b),
                        inputs.context, sp=sp,
                        condition=inputs.condition), carry


def wan_model_fn(graphdef, params, context_2b, sp: sp_wan.SequenceParallel,
                 token_mask=None, condition_2b=None):
  """`sampling.wan_model_fn` with the model sequence-parallel over sp.mesh
  (params: one model's or the experts' pair, the plan its expert;
  token_mask, condition_2b: as `sampling.sampler.WanInputs`)."""
  return jax.tree_util.Partial(
      _dense_velocity, graphdef, params,
      dense_sampler.WanInputs(context_2b, token_mask, condition_2b), sp)


def _placed_inputs(params, noise, context, negative_context, scheduler, mesh,
                   token_mask=None, condition=None, post_step=None):
  """Everything the loop reads, replicated on the mesh: (params, latents,
  WanInputs of the CFG batch, scheduler, post_step)."""
  if context.shape[0] != noise.shape[0]:
    raise ValueError(f"context batch {context.shape[0]} != noise batch "
                     f"{noise.shape[0]}")
  inputs = dense_sampler.WanInputs(
      dense_sampler.cfg_context(jnp.asarray(context),
                                jnp.asarray(negative_context)),
      None if token_mask is None else jnp.asarray(token_mask, F32),
      dense_sampler.cfg_condition(
          None if condition is None else jnp.asarray(condition)))
  return (mesh_lib.replicate(params, mesh),
          mesh_lib.put(noise, mesh).astype(F32),
          mesh_lib.replicate(inputs, mesh),
          mesh_lib.replicate(scheduler, mesh),
          mesh_lib.replicate(post_step, mesh))


def _check_data_axis(sp, noise):
  if (2 * noise.shape[0]) % sp.data_size:
    raise ValueError(
        f"the CFG batch 2 x {noise.shape[0]} must be divisible by the mesh's "
        f"data axis ({sp.data_size}); use make_mesh(..., data=...) with a "
        "divisor of it")


def _replicated(x, mesh):
  return mesh_lib.put(x, mesh)


def sample(model, params, noise, context, negative_context, *, mesh: Mesh,
           strategy: str = "auto", ulysses: int | None = None,
           scheduler: str | Any = "unipc", steps: int | None = 50,
           guidance_scale: float = 5.0, shift: float | None = None,
           return_trajectory: bool = False, loop: str = "python",
           progress: bool = True, step_seconds: list | None = None,
           boundary_ratio: float | None = None, token_mask=None,
           post_step=None, condition=None):
  """Dense CFG sampling over a mesh; `sampling.sample` plus mesh/strategy.

  strategy: "auto" | "ulysses" | "ring" | "hybrid" (parallel.attention);
  ulysses: the hybrid's Ulysses group size. loop "scan" runs
  `sampling.denoise`'s scanned loop (one model only); "python" a jitted
  step per step. params, guidance_scale, boundary_ratio, token_mask,
  post_step, condition: as `sampling.sample` (Wan2.2).
  """
  dense_sampler.check_experts(params, boundary_ratio)
  sp = sp_wan.SequenceParallel(mesh, strategy, ulysses)
  _check_data_axis(sp, noise)
  # Fails before compiling; every input goes on the program's one mesh.
  mesh = sp.program_mesh(nnx.merge(
      model, dense_sampler.pick_expert(params, 0)).config.num_heads)
  scheduler = dense_sampler.resolve_scheduler(scheduler, steps, shift,
                                               noise.shape)
  params, latents, inputs, scheduler, post_step = _placed_inputs(
      params, noise, context, negative_context, scheduler, mesh,
      token_mask, condition, post_step)
  experts = dense_sampler.expert_plan(scheduler.timesteps, boundary_ratio)
  model_fn = jax.tree_util.Partial(_dense_velocity, model, params, inputs,
                                   sp)
  rep = NamedSharding(mesh, P())
  # Pinned output shardings (latents and scheduler state replicated) keep
  # every step's inputs placed alike, so the step compiles once.
  latents, _, trajectory, stats = dense_sampler.run(
      model_fn, latents, scheduler=scheduler,
      guidance_scale=mesh_lib.put(
          dense_sampler.expert_guidance(experts, guidance_scale), mesh),
      plans=None if boundary_ratio is None else experts,
      sched_state=mesh_lib.replicate(scheduler.init(latents), mesh),
      out_shardings=(rep, rep, rep), loop=loop,
      return_trajectory=return_trajectory, progress=progress,
      wait=step_seconds is not None, post_step=post_step)
  if step_seconds is not None:
    step_seconds.extend(stats.step_seconds)
  if return_trajectory:
    trajectory = _replicated(trajectory, mesh)
  return dense_sampler.pack(_replicated(latents, mesh),
                            (return_trajectory, trajectory))


class Plan(NamedTuple):
  """The static plan of one Astraea step over the mesh (expert: as
  `wan_tokenwise.Plan`)."""
  num_selected: int
  config: selection.SelectionConfig
  sp: sp_wan.SequenceParallel
  expert: int = 0


def _astraea_velocity(graphdef, params, inputs, cache, latents_2b,
                      timesteps_2b, *, plan: Plan):
  model = nnx.merge(graphdef, dense_sampler.pick_expert(params, plan.expert))
  return sp_wan.astraea_forward(model, latents_2b,
                                inputs.timesteps(timesteps_2b),
                                inputs.context, cache, sp=plan.sp,
                                num_selected=plan.num_selected,
                                config=plan.config,
                                condition=inputs.condition)


def astraea_model_fn(graphdef, params, context_2b, token_mask=None,
                     condition_2b=None):
  """Astraea over the mesh as a `model_fn` for `sampling.run`."""
  return jax.tree_util.Partial(
      _astraea_velocity, graphdef, params,
      dense_sampler.WanInputs(context_2b, token_mask, condition_2b))


def astraea_sample(model, params, noise, context, negative_context, *,
                   mesh: Mesh, strategy: str = "auto",
                   ulysses: int | None = None, budget=None, schedule=None,
                   scheduler="unipc", steps: int = 50,
                   guidance_scale: float = 5.0, shift: float | None = None,
                   selection_config: selection.SelectionConfig = selection
                   .SelectionConfig(), return_trajectory: bool = False,
                   progress: bool = True, return_stats: bool = False,
                   boundary_ratio: float | None = None,
                   refresh_experts: bool = wan_tokenwise.REFRESH_EXPERTS,
                   token_mask=None,
                   post_step=None, condition=None):
  """Astraea CFG sampling over a mesh; `astraea.wan_tokenwise.sample` plus mesh.

  Each of the P sequence shards computes round(K_t / P) of its own tokens
  at step t (K_t = round(theta_t N)); budget 1.0 steps run the dense
  blocks. Stats (return_stats) count the tokens computed over all shards.
  params, guidance_scale, boundary_ratio, refresh_experts, token_mask,
  post_step, condition: as `wan_tokenwise.sample` (Wan2.2).
  """
  dense_sampler.check_experts(params, boundary_ratio)
  sp = sp_wan.SequenceParallel(mesh, strategy, ulysses)
  _check_data_axis(sp, noise)
  scheduler, budgets, config, n, ks = wan_tokenwise.resolve_steps(
      model, params, noise, budget=budget, schedule=schedule,
      scheduler=scheduler, steps=steps, shift=shift)
  experts, budgets, ks = wan_tokenwise.expert_steps(
      scheduler, budgets, ks, n, boundary_ratio, refresh_experts)
  plan = sp.plan(config.num_heads)
  layout = TokenLayout(n, plan.num_shards)
  mesh = sp.inner_mesh(plan)  # the program's one mesh (program_mesh)
  params, latents, inputs, scheduler, post_step = _placed_inputs(
      params, noise, context, negative_context, scheduler, mesh,
      token_mask, condition, post_step)
  cache = sp_wan.init_cache(config, 2 * noise.shape[0], n, sp,
                            selection_config)
  per_shard = [sp_wan.local_num_selected(k, layout) for k in ks]
  computed = [n if k == n else p * plan.num_shards
              for k, p in zip(ks, per_shard)]
  rep = NamedSharding(mesh, P())
  latents, _, trajectory, stats = dense_sampler.run(
      jax.tree_util.Partial(_astraea_velocity, model, params, inputs),
      latents,
      scheduler=scheduler,
      guidance_scale=mesh_lib.put(
          dense_sampler.expert_guidance(experts, guidance_scale), mesh),
      sched_state=mesh_lib.replicate(scheduler.init(latents), mesh),
      out_shardings=(rep, rep, cache["update"].sharding),
      plans=[Plan(k, selection_config, sp, e) for k, e in zip(ks, experts)],
      carry=cache,
      return_trajectory=return_trajectory, progress=progress,
      wait=return_stats, desc="astraea", post_step=post_step,
      postfix=[{"budget": f"{t:.2f}", "tokens": f"{c}/{n}"}
               for t, c in zip(budgets, computed)])
  stats = dataclasses.replace(
      stats, budgets=budgets, num_selected=computed, num_tokens=n,
      compiled_k=list(dict.fromkeys(ks)), num_shards=plan.num_shards,
      plan=f"{plan.name} (ulysses {plan.ulysses} x ring {plan.ring})",
      selected_per_shard=per_shard)
  if return_trajectory:
    trajectory = _replicated(trajectory, mesh)
  return dense_sampler.pack(_replicated(latents, mesh),
                            (return_trajectory, trajectory),
                            (return_stats, stats))


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
