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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.astraea import layer_loop
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.sampling import sampler as dense_sampler

F32 = jnp.float32


def run_blocks(model, x, e0, ctx, rope, cache, *, mode: str, config,
               select=None, state=None, statistic: str = "lse", **hooks):
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
            config: selection.SelectionConfig, condition=None):
  """One model evaluation with token selection; returns (velocity, cache).

  latents (B, C, F, H, W); timestep (B,) or per token (B, L); cache from
  `selection.init_cache` with batch B; num_selected: static K; condition:
  the model's extra input channels (`WanDiT.__call__`).
  """
  x, e, e0, ctx, rope = model.embed(latents, timestep, context, condition)
  mode = layer_loop.mode_for(num_selected, x.shape[1])
  x, cache, _ = run_blocks(model, x, e0, ctx, rope, cache, mode=mode,
                           config=config,
                           select=layer_loop.score_top_k(num_selected,
                                                         config))
  return model.unembed(x, e, latents.shape), cache


def forward_masked(model, latents, timestep, context, cache, num_selected,
                   *, config: selection.SelectionConfig, condition=None):
  """`forward` as a masked dense simulation; num_selected may be traced.

  Every block computes all tokens; the top-K by the same scores (ties
  broken towards lower indices, as `jax.lax.top_k`) keep their new values.
  """
  x, e, e0, ctx, rope = model.embed(latents, timestep, context, condition)
  keep = layer_loop.score_keep(jnp.asarray(num_selected, jnp.int32), config)
  x, cache, _ = run_blocks(model, x, e0, ctx, rope, cache, mode="masked",
                           config=config, select=keep)
  return model.unembed(x, e, latents.shape), cache


class Plan(NamedTuple):
  """The static plan of one Astraea step: K, the score's options and the
  expert whose parameters run (Wan2.2 A14B; 0 for one model)."""
  num_selected: int
  config: selection.SelectionConfig
  expert: int = 0


def _velocity(graphdef, params, inputs: dense_sampler.WanInputs, cache,
              latents_2b, timesteps_2b, *, plan: Plan):
  model = nnx.merge(graphdef, dense_sampler.pick_expert(params, plan.expert))
  return forward(model, latents_2b, inputs.timesteps(timesteps_2b),
                 inputs.context, cache, num_selected=plan.num_selected,
                 config=plan.config, condition=inputs.condition)


def model_fn(graphdef, params, context_2b, token_mask=None,
             condition_2b=None):
  """Astraea's WanDiT as a `model_fn` for `sampling.run` (plan: `Plan`).

  params: one model's state or the experts' (`sampler.pick_expert`);
  token_mask, condition_2b: as `sampler.WanInputs`.
  """
  return jax.tree_util.Partial(_velocity, graphdef, params,
                               dense_sampler.WanInputs(
                                   context_2b, token_mask, condition_2b))


# What Astraea's token caches do at a Wan2.2 A14B expert switch (**ours**;
# the paper has one model): "refresh" computes every token at the first
# step of the next expert (`refresh_at_switch`), "keep" runs the
# schedule's K there, the unselected tokens adding the other expert's
# cached updates. Measured on CPU (benchmarks/expert_switch.py -> results/
# expert_switch_cpu.json: TINY RANDOM experts, not trained models; T2V and
# I2V configs, 20 steps, 8 samples, PSNR of the final latents against the
# dense two-expert sample): refresh is 1.4-2.2 dB better than keep at mean
# budget 0.3 and 0.4-1.7 dB at 0.5 (one tie: I2V, related experts, 0.5),
# for 0.04 (0.3) / 0.03 (0.5) more of the tokens; given those extra tokens
# elsewhere, keep is still 0.3-2.5 dB worse (0.03-0.13 dB at 0.5 with
# related experts). So refresh is the default.
EXPERT_SWITCHES = {"refresh": True, "keep": False}  # -> refresh_experts
EXPERT_SWITCH = "refresh"
REFRESH_EXPERTS = EXPERT_SWITCHES[EXPERT_SWITCH]


def refresh_at_switch(ks, experts, num_tokens: int):
  """K per step with every expert switch a full step (K = N): the token
  caches hold one expert's block updates, so the first step of the next
  expert recomputes every token and refreshes them (**ours**; the paper
  has one model)."""
  return [num_tokens if i and e != experts[i - 1] else k
          for i, (k, e) in enumerate(zip(ks, experts))]


def expert_steps(scheduler, budgets, ks, num_tokens: int,
                 boundary_ratio: float | None, refresh_experts: bool):
  """(expert, budget, K) per step of an Astraea run: `expert_plan`, and
  with refresh_experts every switch a full step (`refresh_at_switch`;
  its budget then reads 1.0)."""
  experts = dense_sampler.expert_plan(scheduler.timesteps, boundary_ratio)
  if refresh_experts:
    ks = refresh_at_switch(ks, experts, num_tokens)
    budgets = np.asarray([k / num_tokens if k == num_tokens else b
                          for k, b in zip(ks, budgets)])
  return experts, budgets, ks


def resolve_steps(graphdef, params, noise, *, budget, schedule, scheduler,
                  steps, shift):
  """(scheduler, budgets, model config, N, K per step) of a Wan Astraea run;
  a scheduler pytree keeps its own step count."""
  scheduler = dense_sampler.resolve_scheduler(
      scheduler, steps if isinstance(scheduler, str) else None, shift,
      noise.shape)
  budgets = schedule_lib.resolve(budget, schedule, scheduler.num_steps)
  config = nnx.merge(graphdef, dense_sampler.pick_expert(params, 0)).config
  grid = tuple(s // p for s, p in zip(noise.shape[2:], config.patch_size))
  n = int(np.prod(grid))
  ks = [schedule_lib.num_selected(theta, n) for theta in budgets]
  return scheduler, budgets, config, n, ks


def sample(model, params, noise, context, negative_context, *, budget=None,
           schedule=None, scheduler="unipc", steps: int = 50,
           guidance_scale=5.0, shift: float | None = None,
           selection_config: selection.SelectionConfig = selection
           .SelectionConfig(), return_trajectory: bool = False,
           progress: bool = True, return_stats: bool = False,
           boundary_ratio: float | None = None, token_mask=None,
           post_step=None, refresh_experts: bool = REFRESH_EXPERTS,
           condition=None, expert_placement: str = "both"):
  """Astraea CFG sampling: like `sampling.sample`, with a token budget.

  Args:
    model, params: `nnx.split(wan_dit)`; or params the experts' pair with
      `boundary_ratio` (Wan2.2 A14B, as `sampling.sample`).
    budget: mean budget in (0, 1] -> `schedule.default_schedule`; or
    schedule: one budget in [0, 1] per step (first must be 1.0).
    refresh_experts: the first step of the low-noise expert computes every
      token (`refresh_at_switch`), so no token reuses the other expert's
      cached update; False keeps the schedule's K there (default: the
      measured `EXPERT_SWITCH`).
    token_mask, post_step, condition, guidance_scale, expert_placement:
      as in `sampling.sample` ("one": the token caches go from the
      high-noise expert's steps to the low-noise expert's unchanged).
    Others as in `astraea_jax.sampling.sample`.

  Returns latents, plus the trajectory and/or SampleStats when asked.
  """
  dense_sampler.check_experts(params, boundary_ratio)
  scheduler, budgets, config, n, ks = resolve_steps(
      model, params, noise, budget=budget, schedule=schedule,
      scheduler=scheduler, steps=steps, shift=shift)
  experts, budgets, ks = expert_steps(scheduler, budgets, ks, n,
                                      boundary_ratio, refresh_experts)
  cache_args = (config.num_layers, 2 * noise.shape[0], n, config.dim)
  inputs = (dense_sampler.cfg_context(context, negative_context),
            token_mask, dense_sampler.cfg_condition(condition))
  latents, _, trajectory, stats = dense_sampler.run_by_expert(
      lambda p: model_fn(model, p, *inputs), params,
      jnp.asarray(noise, F32), scheduler=scheduler, experts=experts,
      expert_placement=expert_placement,
      guidance_scale=dense_sampler.expert_guidance(experts, guidance_scale),
      plans=[Plan(k, selection_config, e) for k, e in zip(ks, experts)],
      make_carry=lambda: selection.init_cache(*cache_args, selection_config),
      memory_hint=selection.state_hint(cache_args, selection_config),
      return_trajectory=return_trajectory, progress=progress,
      wait=return_stats, desc="astraea", post_step=post_step,
      postfix=[{"budget": f"{t:.2f}", "tokens": f"{k}/{n}"}
               for t, k in zip(budgets, ks)])
  stats = dataclasses.replace(stats, budgets=budgets, num_tokens=n,
                              num_selected=ks,
                              compiled_k=list(dict.fromkeys(ks)))
  return dense_sampler.pack(latents, (return_trajectory, trajectory),
                           (return_stats, stats))
