"""Run-time step reuse: EasyCache's and MagCache's plans and rules.

Two whole-step caches of 2025 (docs/baselines.md), as plans of the one
sampler (`policies.sample`): a step either runs the model or reuses what
the last computed step left.

EasyCache (Zhou et al., "Less is Enough: Training-Free Video Diffusion
Acceleration via Runtime-Adaptive Caching", arXiv 2507.02860, sec. 3).
With x_t the model input (the latents) and v_t = u(x_t) its output:
  transformation vector   Delta_i = v_i - x_i      (cached at computed i)
  transformation rate     k_i = |v_i - v_i'| / |x_i - x_i'|
                          (i' the computed step before i)
  step estimate           eps_t = k_i |x_t - x_{t-1}| / |v_i|
  accumulated             E_t = sum of eps since the last computed step
  E_t < tau: v_t = x_t + Delta_i (no model call), else compute, E = 0.
|.| is the mean absolute value (the authors' code); the decision reads the
conditional half of the CFG batch, each half reuses its own Delta (as the
authors' code does). The first `warmup` steps and the last always compute.

MagCache (Ma et al., "MagCache: Fast Video Generation with Magnitude-Aware
Cache", NeurIPS 2025, arXiv 2506.09045, sec. 3). r_t = output - input of
the block stack at step t (the residual), and the magnitude ratio
  gamma_t = mean over tokens of ||r_t||_2 / ||r_{t-1}||_2
is calibrated once from a full run (`MagCachePlan(record=True)`). After
the retention steps, with t^ the last computed step:
  skip error         eps(t^, t) = |1 - prod_{i=t^+1..t} gamma_i|
  accumulated        E_t = sum_{s=t^+1..t} eps(t^, s)
  skip t (head applied to x_t + r_t^) iff E_t < delta and t - t^ <= K,
  else compute and restart (E = 0, product = 1).
The curve is known before sampling, so MagCache's decisions are too:
`magcache_decisions` makes them on the host and the plans are static.
Ours: one curve (mean over the CFG batch and tokens) and one decision for
both CFG halves (the authors keep one per half).

Astraea composed with EasyCache's rule (`AdaptiveTokenPlan`, ours): the
token budget schedule decides K_t, and at a step with 0 < K_t < N the rule
above, measured on the steps that ran, decides at run time whether it runs
with K_t tokens or reuses every token's cached update (K = 0).

Equation numbers are not quoted: the papers' text was not at hand, only
their method descriptions and the authors' code (docs/baselines.md).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from astraea_jax.astraea import step_plans

F32 = jnp.float32


def mean_abs(a):
  return jnp.mean(jnp.abs(a))


# EasyCache -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EasyCachePlan:
  """mode "full": run the model (warm-up and last steps); "adaptive":
  reuse x + Delta while the accumulated estimate stays under the threshold
  in the carry, else run it (see the module docstring)."""
  mode: str = "full"

  def forward(self, model, latents, timestep, context, carry):
    half = latents.shape[0] // 2            # rows [:half]: conditional
    count = carry["computed_count"]         # computed steps so far
    estimate = step_estimate(carry, latents[:half])
    if self.mode == "full":
      compute, accumulated = jnp.bool_(True), jnp.zeros((), F32)
    else:
      accumulated = carry["accumulated"] + estimate
      # A rate needs two computed steps; without one, compute.
      compute = jnp.logical_or(accumulated >= carry["threshold"], count < 2)
      accumulated = jnp.where(compute, 0.0, accumulated)

    def computed(_):
      v = model(latents, timestep, context).astype(F32)
      rate = transformation_rate(carry, v[:half], latents[:half], count)
      return v, (v - latents, v[:half], latents[:half], rate, count + 1)

    def reused(_):
      return latents + carry["delta"], (carry["delta"], carry["v_last"],
                                        carry["x_last"], carry["rate"], count)

    if self.mode == "full":
      velocity, kept = computed(None)
    else:
      velocity, kept = jax.lax.cond(compute, computed, reused, None)
    delta, v_last, x_last, rate, count = kept
    step = carry["step"]
    return velocity, {
        **carry, "delta": delta, "v_last": v_last, "x_last": x_last,
        "rate": rate, "computed_count": count, "x_prev": latents[:half],
        "accumulated": accumulated,
        "computed": carry["computed"].at[step].set(compute),
        "estimates": carry["estimates"].at[step].set(estimate),
        "rates": carry["rates"].at[step].set(rate)}

  def cost_key(self) -> str:
    return "dense" if self.mode == "full" else "easycache:adaptive"


def rule_state(half_shape, threshold: float, steps: int) -> dict:
  """The carry entries EasyCache's rule reads and writes (`step_estimate`,
  `transformation_rate`): the conditional half's last computed output and
  input, the previous step's input, the rate, the computed-step count, the
  accumulated estimate and its threshold, and per step whether it ran and
  its estimate. EasyCache and the Astraea composition both keep them."""
  return {"v_last": jnp.zeros(half_shape, F32),
          "x_last": jnp.zeros(half_shape, F32),
          "x_prev": jnp.zeros(half_shape, F32), "rate": jnp.zeros((), F32),
          "computed_count": jnp.zeros((), jnp.int32),
          "accumulated": jnp.zeros((), F32),
          "threshold": jnp.asarray(threshold, F32),
          "computed": jnp.zeros((steps,), bool),
          "estimates": jnp.zeros((steps,), F32)}


def step_estimate(carry, x_half):
  """eps_t = k_i |x_t - x_{t-1}| / |v_i| (cond half; k_i = 0 until a rate
  exists)."""
  return carry["rate"] * mean_abs(x_half - carry["x_prev"]) / (
      mean_abs(carry["v_last"]) + 1e-12)


def transformation_rate(carry, v_half, x_half, count):
  """k_i = |v_i - v_i'| / |x_i - x_i'| between this computed step and the
  computed step before it (the carry's rate while there is none)."""
  rate = mean_abs(v_half - carry["v_last"]) / (
      mean_abs(x_half - carry["x_last"]) + 1e-12)
  return jnp.where(count >= 1, rate, carry["rate"])


def easycache_decisions(estimates, threshold: float, warmup: int,
                        ) -> list[bool]:
  """Which steps EasyCache computes, given each step's estimate eps_t:
  the first `warmup` and the last always; in between a step computes when
  the estimates summed since the last computed step (its own included)
  reach the threshold. The rule `EasyCachePlan` applies in the jitted
  step (which also computes while it has no rate yet), written out: step
  caching's accumulate-and-reset rule with EasyCache's warm-up."""
  return step_plans.step_cache_decisions(estimates, threshold, warmup)


# Astraea + EasyCache's rule -------------------------------------------------


ADAPTIVE_MODES = ("full", "adaptive", "reuse")


@dataclasses.dataclass(frozen=True)
class AdaptiveTokenPlan:
  """Astraea's step `token` (a `TokenPlan`, K_t tokens per block) under
  EasyCache's rule (`AstraeaAdaptive`). mode "full": always run it (the
  schedule's full steps and the last step); "adaptive": run it unless the
  accumulated estimate E_t is under the carry's threshold, else reuse
  every token's cached block update (K = 0, Astraea's own reuse);
  "reuse": the schedule's K = 0 (no decision, its estimate accumulates).
  The rule's measurements are EasyCache's on the step's input and output
  (`step_estimate`, `transformation_rate`), taken at the steps that ran
  with K_t > 0 tokens."""
  token: step_plans.TokenPlan
  mode: str = "adaptive"

  def __post_init__(self):
    if self.mode not in ADAPTIVE_MODES:
      raise ValueError(f"{self.mode=} must be one of {ADAPTIVE_MODES}")

  @property
  def reuse_plan(self) -> step_plans.TokenPlan:
    """Astraea's K = 0 step (what its schedule's zeros run)."""
    return dataclasses.replace(self.token, budget=0.0, num_selected=0,
                               selector="score", freeze=False)

  def forward(self, model, latents, timestep, context, carry):
    half = latents.shape[0] // 2            # rows [:half]: conditional
    count = carry["computed_count"]
    estimate = step_estimate(carry, latents[:half])
    accumulated = carry["accumulated"] + estimate
    if self.mode == "full":
      compute = jnp.bool_(True)
    elif self.mode == "reuse":
      compute = jnp.bool_(False)
    else:
      compute = jnp.logical_or(accumulated >= carry["threshold"], count < 2)
    accumulated = jnp.where(compute, 0.0, accumulated)

    def run(plan, carry):
      v, carry = plan.forward(model, latents, timestep, context, carry)
      return v.astype(F32), carry

    def computed(carry):
      v, carry = run(self.token, carry)
      rate = transformation_rate(carry, v[:half], latents[:half], count)
      return v, {**carry, "v_last": v[:half], "x_last": latents[:half],
                 "rate": rate, "computed_count": count + 1}

    def reused(carry):
      return run(self.reuse_plan, carry)

    if self.mode == "full":
      velocity, carry = computed(carry)
    elif self.mode == "reuse":
      velocity, carry = reused(carry)
    else:
      velocity, carry = jax.lax.cond(compute, computed, reused, carry)
    step = carry["step"]
    return velocity, {
        **carry, "x_prev": latents[:half], "accumulated": accumulated,
        "computed": carry["computed"].at[step].set(compute),
        "estimates": carry["estimates"].at[step].set(estimate)}

  def cost_key(self) -> str:
    return (self.reuse_plan if self.mode == "reuse" else self.token
            ).cost_key()


def adaptive_decisions(estimates, threshold: float, modes) -> list[bool]:
  """Which steps `AdaptiveTokenPlan`s run with their K_t, given each
  step's estimate eps_t and plan mode, written out for checking: "full"
  runs, "reuse" does not, "adaptive" runs when the estimates summed since
  the last step that ran (its own included) reach the threshold or fewer
  than two steps have run (no rate yet). A step that runs restarts the
  sum."""
  out, accumulated, count = [], 0.0, 0
  for eps, mode in zip(estimates, modes, strict=True):
    accumulated += float(eps)
    run = (mode == "full" or mode == "adaptive" and (
        accumulated >= threshold or count < 2))
    out.append(run)
    if run:
      accumulated, count = 0.0, count + 1
  return out


# MagCache --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MagCachePlan:
  """compute: run the block stack and cache its residual; else apply the
  head to x + the cached residual. record: also store the step's magnitude
  ratio gamma_t (calibration, `MagCache.calibrate`)."""
  compute: bool = True
  record: bool = False

  def forward(self, model, latents, timestep, context, carry):
    x, e, e0, ctx, rope = model.embed(latents, timestep, context)
    carry = dict(carry)
    if self.compute:
      y, _ = model.run_blocks(x, e0, ctx, rope)
      residual = (y - x).astype(F32)
      if self.record:
        carry["ratios"] = carry["ratios"].at[carry["step"]].set(
            magnitude_ratio(residual, carry["residual"]))
      carry["residual"] = residual
    else:
      y = x + carry["residual"]
    return model.unembed(y, e, latents.shape), carry

  def cost_key(self) -> str:
    return "dense" if self.compute else "magcache:reused"


def magnitude_ratio(residual, previous):
  """gamma = mean over rows and tokens of ||r||_2 / ||r_prev||_2 (norms
  over channels); 1 where there is no previous residual (all zero)."""
  num = jnp.linalg.norm(residual, axis=-1)
  den = jnp.linalg.norm(previous, axis=-1)
  return jnp.where(jnp.any(den > 0), jnp.mean(num / (den + 1e-12)), 1.0)


def retention_steps(retention: float, steps: int) -> int:
  """Steps computed before MagCache may skip: floor(retention * steps),
  at least 1 (step 0 has no cached residual)."""
  return max(1, math.floor(retention * steps))


def magcache_decisions(ratios, threshold: float, max_skip: int,
                       retained: int) -> list[bool]:
  """Which steps MagCache computes, from the calibrated ratios gamma_t:
  the first `retained` always; then gamma accumulates as a product since
  the last computed step, |1 - product| as a sum E, and a step is skipped
  while E < threshold and it is at most the max_skip-th step since."""
  out = []
  product, error, skipped = 1.0, 0.0, 0
  for i, gamma in enumerate(ratios):
    if i < retained:
      out.append(True)
      continue
    product *= float(gamma)
    skipped += 1
    error += abs(1.0 - product)
    if error < threshold and skipped <= max_skip:
      out.append(False)
    else:
      out.append(True)
      product, error, skipped = 1.0, 0.0, 0
  return out
