"""Plans: what one denoising step computes, for every policy.

A plan is a small frozen dataclass and a static argument of the jitted step
(`sampling.run`): one compile per distinct plan. `plan.forward(model,
latents_2b, timesteps_2b, context_2b, carry) -> (velocity_2b, carry)` runs
the model; the carry (the policy's caches, a dict with a "step" counter) is
threaded through the steps and donated. Data-dependent decisions
(StepCache's skip) are taken inside the step with `jax.lax.cond`, so a run
never waits on the host. `plan.cost_key` names the step's compute
configuration (benchmarks/eval_speed.py times each key once).

The pieces are the model's own: `WanDiT.embed / run_blocks / unembed`, the
one block forward `WanBlock.__call__` with its hooks for reusing attention
outputs (PAB) and for the cross-attention entropy (ToCa), and the one layer
loop (`layer_loop.run`) with each token selector as a select hook.
Astraea's own steps go through `astraea.wan_tokenwise.forward` unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from astraea_jax.astraea import layer_loop
from astraea_jax.astraea import selection
from astraea_jax.astraea import wan_tokenwise

F32 = jnp.float32


# Plans: what one step computes -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class DensePlan:
  """The full model."""

  def forward(self, model, latents, timestep, context, carry):
    return model(latents, timestep, context), carry

  def cost_key(self) -> str:
    return "dense"


@dataclasses.dataclass(frozen=True)
class TocaScore:
  """ToCa's score (`ToCa` below): importance + weight * stale / interval."""
  importance: str = "cross_entropy"  # "cross_entropy" | "lse" | "random"
  frequency_weight: float = 0.25
  interval: int = 3


@dataclasses.dataclass(frozen=True)
class TokenPlan:
  """K tokens per block run the block; the others reuse their cached update.

  budget: theta (K / N, for the cost key); selector: "score" (Astraea's
  S = S_LSE * Delta + penalty, `selection.token_scores`), "random" (K
  uniformly random distinct tokens per block and CFG half), "fixed" (the
  ranking frozen at the step with freeze=True, then its first K), "toca"
  (`TocaScore`). K = N computes every token and refreshes the cache; K = 0
  reuses every cached update (Astraea's semantics for both).
  """
  budget: float
  num_selected: int
  selector: str = "score"
  selection: selection.SelectionConfig = dataclasses.field(
      default_factory=selection.SelectionConfig)
  freeze: bool = False
  seed: int = 0
  toca: TocaScore | None = None

  @property
  def _entropy(self) -> bool:
    return self.toca is not None and self.toca.importance == "cross_entropy"

  def forward(self, model, latents, timestep, context, carry):
    if self.selector == "score":
      cache = carry["cache"]
      velocity, cache = wan_tokenwise.forward(
          model, latents, timestep, context, cache,
          num_selected=self.num_selected, config=self.selection)
      return velocity, {**carry, "cache": cache}
    return _token_forward(self, model, latents, timestep, context, carry)

  def cost_key(self) -> str:
    if self.num_selected == 0:
      return "tokens:0.000"
    suffix = {"score": "score", "random": "random",
              "fixed": "fixed-freeze" if self.freeze else "fixed"}.get(
                  self.selector, "toca")
    if self._entropy:
      suffix = "toca-xent"
    if self.budget >= 1.0:
      return "tokens:1.000" + (":xent" if self._entropy else "")
    return f"tokens:{self.budget:.3f}:{suffix}"


def _token_forward(plan: TokenPlan, model, latents, timestep, context, carry):
  """Token-wise forward with a selector other than Astraea's score: the one
  layer loop with this plan's select hook (and ToCa's statistic)."""
  x, e, e0, ctx, rope = model.embed(latents, timestep, context)
  step = carry["step"]

  def select(x, layer_cache, layer, order):
    return _select(plan, x, layer_cache, layer, step, order)

  x, cache, order = wan_tokenwise.run_blocks(
      model, x, e0, ctx, rope, carry["cache"],
      mode=layer_loop.mode_for(plan.num_selected, x.shape[1]),
      config=plan.selection, select=select, state=carry.get("order"),
      statistic="cross_entropy" if plan._entropy else "lse",
      cross_entropy=plan._entropy)
  carry = {**carry, "cache": cache}
  if order is not None:
    carry["order"] = order
  return model.unembed(x, e, latents.shape), carry


def _random_key(seed, step, layer):
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step),
                            layer)


def _select(plan: TokenPlan, x, layer_cache, layer, step, order):
  """(token_index (B, K) sorted, order) for one block."""
  k = plan.num_selected
  if plan.selector == "random":
    u = jax.random.uniform(_random_key(plan.seed, step, layer), x.shape[:2])
    return selection.select_tokens(u, k), order
  if plan.selector == "fixed":
    if plan.freeze:
      scores = selection.token_scores(x, layer_cache, plan.selection)
      # Stable: ties go to lower indices, as top_k breaks them, so the
      # freezing step picks exactly Astraea's tokens.
      ranking = jnp.argsort(-scores, axis=-1, stable=True).astype(jnp.int32)
      order = order.at[layer].set(ranking)
    return jnp.sort(order[layer][:, :k], axis=-1), order
  if plan.selector == "toca":
    return selection.select_tokens(
        toca_scores(layer_cache, plan.toca, _random_key(plan.seed, step,
                                                        layer)), k), order
  raise ValueError(f"unknown selector {plan.selector!r}")


def toca_scores(layer_cache, toca: TocaScore, key):
  """ToCa's caching score (B, N); the highest are recomputed.

  importance + frequency_weight * stale / interval, where importance is the
  L2-normalised (over tokens) statistic of the token's last computation:
  1 + cross-attention entropy (ToCa's video score), or the self-attention
  LSE; or uniform random numbers (ToCa's "random" type). `stale` counts the
  steps since the token was last computed (ToCa's cache frequency s3).
  """
  stat = layer_cache["lse"]
  if toca.importance == "random":
    importance = jax.random.uniform(key, stat.shape)
  else:
    if toca.importance == "cross_entropy":
      stat = 1.0 + stat
    importance = stat / (jnp.linalg.norm(stat, axis=-1, keepdims=True)
                         + 1e-12)
  return importance + toca.frequency_weight * (
      layer_cache["stale"].astype(F32) / toca.interval)


@dataclasses.dataclass(frozen=True)
class PABPlan:
  """Self-/cross-attention outputs reused from the cache when set."""
  reuse_self: bool = False
  reuse_cross: bool = False

  def forward(self, model, latents, timestep, context, carry):
    x, e, e0, ctx, rope = model.embed(latents, timestep, context)
    reused = {}
    if self.reuse_self:
      reused["self_attn_out"] = carry["self"]
    if self.reuse_cross:
      reused["cross_attn_out"] = carry["cross"]
    x, aux = model.run_blocks(x, e0, ctx, rope, per_layer=reused,
                              keep_attention_outputs=True)
    carry = dict(carry)
    if not self.reuse_self:
      carry["self"] = aux["self_attn_out"].astype(carry["self"].dtype)
    if not self.reuse_cross:
      carry["cross"] = aux["cross_attn_out"].astype(carry["cross"].dtype)
    return model.unembed(x, e, latents.shape), carry

  def cost_key(self) -> str:
    return (f"pab:self={'reuse' if self.reuse_self else 'compute'},"
            f"cross={'reuse' if self.reuse_cross else 'compute'}")


@dataclasses.dataclass(frozen=True)
class StepCachePlan:
  """mode "full": compute (first and last steps); "cached": compute only
  when the accumulated indicator change reaches the threshold (in the
  carry), else reuse (see `StepCache`)."""
  mode: str = "full"
  indicator: str = "modulated_input"
  reuse: str = "residual"
  rescale: tuple[float, ...] = ()

  def forward(self, model, latents, timestep, context, carry):
    x, e, e0, ctx, rope = model.embed(latents, timestep, context)
    indicator = step_indicator(model, x, e0, self.indicator)
    change = relative_l1(indicator, carry["indicator"])
    if self.rescale:
      change = jnp.polyval(jnp.asarray(self.rescale, F32), change)
    if self.mode == "full":
      compute, accumulated = jnp.bool_(True), jnp.zeros((), F32)
    else:
      accumulated = carry["accumulated"] + change
      compute = accumulated >= carry["threshold"]
      accumulated = jnp.where(compute, 0.0, accumulated)

    def computed(_):
      y, _ = model.run_blocks(x, e0, ctx, rope)
      velocity = model.unembed(y, e, latents.shape)
      return velocity, (y - x if self.reuse == "residual" else velocity)

    def reused(_):
      memo = carry["memo"]
      if self.reuse == "velocity":
        return memo, memo
      return model.unembed(x + memo, e, latents.shape), memo

    if self.mode == "full":
      velocity, memo = computed(None)
    else:
      velocity, memo = jax.lax.cond(compute, computed, reused, None)
    return velocity, {
        **carry, "memo": memo, "indicator": indicator,
        "accumulated": accumulated,
        "computed": carry["computed"].at[carry["step"]].set(compute),
        "changes": carry["changes"].at[carry["step"]].set(change)}

  def cost_key(self) -> str:
    return "step_cache:full" if self.mode == "full" else "step_cache:cached"


def step_cache_decisions(changes, threshold: float, warmup: int = 1
                         ) -> list[bool]:
  """Which steps StepCache computes, given each step's (rescaled)
  indicator change from the previous step: the first and last always; in
  between, a step computes when the changes summed since the last computed
  step (its own included) reach `threshold`. The rule `StepCachePlan`
  applies inside the jitted step, written out for checking. warmup: the
  steps computed first (1; EasyCache's rule is the same with its own)."""
  out, accumulated = [], 0.0
  for i, change in enumerate(changes):
    if i < warmup or i == len(changes) - 1:
      out.append(True)
      accumulated = 0.0
      continue
    accumulated += float(change)
    out.append(accumulated >= threshold)
    if out[-1]:
      accumulated = 0.0
  return out


def step_indicator(model, x, e0, kind: str):
  """What StepCache watches: block 0's modulated input LN(x)(1 + scale) +
  shift (B, N, dim), or the projected timestep embedding e0 (B, 6, dim)."""
  if kind == "timestep_embedding":
    return e0
  graphdef, blocks = nnx.split(model.blocks)
  block0 = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], blocks))
  return block0.self_attn_input(x, e0)


def relative_l1(current, previous):
  """mean |current - previous| / mean |previous| (TeaCache's distance)."""
  return (jnp.mean(jnp.abs(current - previous))
          / (jnp.mean(jnp.abs(previous)) + 1e-12))
