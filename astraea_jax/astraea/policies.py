"""Acceleration methods as policies of ONE sampler: what each step computes.

Astraea and the baselines it is compared with (docs/baselines.md) all run
the same CFG sampling loop (`sample` below, built on
`sampling.sampler.guided_step`) on the same model, noise and prompts. A
policy decides, before sampling, which `Plan` every denoising step runs;
a plan says what each block computes at that step:

  Dense      every block, every token (the full model);
  Astraea    K_t = round(theta_t N) tokens per block, chosen by a score
             (plus the paper's ablations: random or fixed tokens,
             step-level skipping, score terms off, other budget schedules);
  ToCa       a full step every `interval` steps, a fixed ratio of tokens
             per block in between (Zou et al. 2024);
  PAB        self- and cross-attention outputs broadcast over steps in the
             middle of sampling (Zhao et al. 2024);
  StepCache  the whole step skipped while the timestep-modulated input has
             changed little (TeaCache, Liu et al. 2024; Delta-DiT).
  EasyCache  the whole step reused (x + cached v - x) while the output
             change estimated from a run-time transformation rate stays
             small (Zhou et al. 2025);
  MagCache   the whole step skipped while a calibrated magnitude-ratio
             curve says the residual has changed little (Ma et al. 2025).
  AstraeaAdaptive  Astraea's schedule, with EasyCache's rule reusing a
             whole sparse step (K = 0) at run time (ours).

A plan (`step_plans`) is what one step computes, a static argument of the
one jitted step (`sampling.run`): one compile per distinct plan. A run's
time is the sum of its steps' cost keys (`Policy.step_costs`), each timed
once on the full-size model by benchmarks/eval_speed.py. Policies by name
and the default sweep: `policy_specs`. The Astraea policy reproduces
`astraea.wan_tokenwise.sample`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.astraea import step_reuse
from astraea_jax.astraea.step_plans import (
    DensePlan,
    PABPlan,
    StepCachePlan,
    TocaScore,
    TokenPlan,
)
from astraea_jax.sampling import sampler as dense_sampler

F32 = jnp.float32


# Policies: a plan per step ---------------------------------------------------


class Policy(typing.Protocol):
  """What every policy provides (see the module docstring)."""

  family: ClassVar[str]

  @property
  def method(self) -> str: ...      # curve name in tables and plots

  def label(self) -> str: ...       # unique setting name

  def plans(self, timesteps, num_tokens: int) -> list: ...

  def init_carry(self, config, batch: int, num_tokens: int, latent_shape,
                 steps: int) -> dict: ...

  def step_costs(self, plans, carry) -> list[str]: ...


def _fmt(x) -> str:
  return f"{x:g}" if isinstance(x, float) else str(x)


class _Base:
  """Shared defaults: cost keys straight from the plans."""

  @property
  def method(self) -> str:
    return self.family

  def step_costs(self, plans, carry) -> list[str]:
    del carry
    return [p.cost_key() for p in plans]

  def settings(self) -> dict:
    out = {}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if isinstance(v, selection.SelectionConfig):
        v = dataclasses.asdict(v)
      out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


@dataclasses.dataclass(frozen=True)
class Dense(_Base):
  """The full model at every step: the reference of every comparison."""
  family: ClassVar[str] = "dense"

  def label(self) -> str:
    return "dense"

  def plans(self, timesteps, num_tokens):
    return [DensePlan()] * len(timesteps)

  def init_carry(self, config, batch, num_tokens, latent_shape, steps):
    return {"step": jnp.zeros((), jnp.int32)}


SCHEDULE_KINDS = ("warmup", "uniform", "step_level")
SELECTORS = ("score", "random", "fixed")


def step_level_schedule(mean_budget: float, steps: int) -> np.ndarray:
  """Budgets in {0, 1}: round(mean_budget * steps) full steps, evenly
  spaced from step 0 (full step j at floor(j * steps / count)); the rest
  reuse every block's cached update (Astraea's step-level ablation)."""
  if not 0.0 < mean_budget <= 1.0:
    raise ValueError(f"{mean_budget=} must lie in (0, 1]")
  count = max(1, round(mean_budget * steps))
  budgets = np.zeros(steps)
  budgets[(np.arange(count) * steps) // count] = 1.0
  return budgets


@dataclasses.dataclass(frozen=True)
class Astraea(_Base):
  """Astraea (Liu et al., ICLR 2026, arXiv 2506.05096) and its ablations.

  Before every block at step t the K_t = round(theta_t N) tokens with the
  highest score S = S_LSE(t-1) * Delta(t) + 0.5 e^n run the block (queries
  of the K tokens against keys/values of all N); the others add the
  residual update cached when they were last computed. theta_t comes from
  a per-step schedule: the evolutionary search's (`schedule=`, name it with
  `schedule_name="searched"`), or one derived from a mean `budget`:
  "warmup" (`schedule.default_schedule`: 10% full steps, then even),
  "uniform" (one full step, then even), "step_level" (the ablation: every
  step computes all tokens or none, `step_level_schedule`). The paper's
  other ablations: `selector="random"` (K uniformly random tokens per
  block), `"fixed"` (the tokens ranked at the first sparse step are kept:
  the first K of that frozen ranking at every later step), and the score's
  terms switched off in `selection` (use_penalty / use_lse / use_delta).
  """
  budget: float | None = None
  schedule: tuple[float, ...] | None = None
  schedule_kind: str = "warmup"
  schedule_name: str = ""
  selector: str = "score"
  selection: selection.SelectionConfig = dataclasses.field(
      default_factory=selection.SelectionConfig)
  seed: int = 0
  family: ClassVar[str] = "astraea"

  def __post_init__(self):
    if (self.budget is None) == (self.schedule is None):
      raise ValueError(f"Astraea needs exactly one of budget and schedule; "
                       f"got {self.budget=} {self.schedule=}")
    if self.schedule_kind not in SCHEDULE_KINDS:
      raise ValueError(f"{self.schedule_kind=} must be one of "
                       f"{SCHEDULE_KINDS}")
    if self.selector not in SELECTORS:
      raise ValueError(f"{self.selector=} must be one of {SELECTORS}")
    if self.schedule is not None:
      object.__setattr__(self, "schedule",
                         tuple(float(b) for b in self.schedule))

  @property
  def ablation(self) -> str:
    """"" for Astraea itself, else the ablation's name."""
    parts = []
    if self.schedule is not None:
      parts.append(self.schedule_name or "schedule")
    elif self.schedule_kind != "warmup":
      parts.append(self.schedule_kind.replace("_", "-"))
    if self.selector != "score":
      parts.append(self.selector)
    for term in ("penalty", "lse", "delta"):
      if not getattr(self.selection, f"use_{term}"):
        parts.append(f"no-{term}")
    state = selection.state_name(self.selection)
    if state:
      parts.append(state)
    return "+".join(parts)

  @property
  def method(self) -> str:
    return "astraea" + (f" ({self.ablation})" if self.ablation else "")

  def label(self) -> str:
    what = (f"budget={_fmt(self.budget)}" if self.schedule is None else
            f"mean={np.mean(self.schedule):.3f}")
    return f"{self.method} {what}"

  def budgets(self, steps: int) -> np.ndarray:
    if self.schedule is not None:
      return schedule_lib.validate(self.schedule, steps)
    if self.schedule_kind == "step_level":
      return schedule_lib.validate(step_level_schedule(self.budget, steps),
                                   steps)
    warmup = 1 if self.schedule_kind == "uniform" else None
    return schedule_lib.validate(
        schedule_lib.default_schedule(self.budget, steps, warmup=warmup),
        steps)

  def plans(self, timesteps, num_tokens):
    plans, frozen = [], False
    for theta in self.budgets(len(timesteps)):
      k = schedule_lib.num_selected(theta, num_tokens)
      selector, freeze = self.selector, False
      if k in (0, num_tokens):
        selector = "score"   # nothing to choose: Astraea's own path
      elif selector == "fixed" and not frozen:
        freeze = frozen = True
      plans.append(TokenPlan(budget=float(theta), num_selected=k,
                             selector=selector, selection=self.selection,
                             freeze=freeze, seed=self.seed))
    return plans

  def init_carry(self, config, batch, num_tokens, latent_shape, steps):
    carry = {"step": jnp.zeros((), jnp.int32),
             "cache": selection.init_cache(config.num_layers, batch,
                                           num_tokens, config.dim,
                                           self.selection)}
    if self.selector == "fixed":
      carry["order"] = jnp.zeros((config.num_layers, batch, num_tokens),
                                 jnp.int32)
    return carry


@dataclasses.dataclass(frozen=True)
class AstraeaAdaptive(Astraea):
  """Astraea's budget schedule with EasyCache's run-time rule deciding
  which of its sparse steps are reused whole (ours; docs/baselines.md).

  Every setting of `Astraea` (budget or searched schedule, ablations)
  gives K_t per step. The schedule's full steps (K_t = N), its K_t = 0
  steps, the last step (as EasyCache's) and the "fixed" ablation's ranking
  step are kept as they are; at every other step,
  EasyCache's estimate of the relative output change (`step_reuse`:
  transformation rate k_i, measured on the steps that ran) is summed since
  the last step that ran, and while the sum stays under `tau` the step
  runs no block: every token adds its cached update (Astraea's K = 0 step).
  Else it runs with its K_t tokens and the sum restarts. A step runs while
  no rate exists (two steps that ran). tau 0 is Astraea itself.
  """
  tau: float = 0.05
  family: ClassVar[str] = "astraea_adaptive"

  def __post_init__(self):
    super().__post_init__()
    if (isinstance(self.tau, bool) or not isinstance(self.tau, (int, float))
        or not 0.0 <= self.tau < math.inf):
      raise ValueError(f"{self.tau=} must be a finite number >= 0")

  @property
  def method(self) -> str:
    return "astraea+easycache" + (f" ({self.ablation})" if self.ablation
                                  else "")

  def label(self) -> str:
    return f"{super().label()} tau={_fmt(float(self.tau))}"

  def plans(self, timesteps, num_tokens):
    steps = len(timesteps)
    out = []
    for i, plan in enumerate(super().plans(timesteps, num_tokens)):
      if plan.num_selected == 0:
        mode = "reuse"
      elif plan.num_selected == num_tokens or plan.freeze or (
          i == steps - 1):   # freeze: the "fixed" ablation ranks here
        mode = "full"
      else:
        mode = "adaptive"
      out.append(step_reuse.AdaptiveTokenPlan(plan, mode))
    return out

  def init_carry(self, config, batch, num_tokens, latent_shape, steps):
    half = (batch // 2,) + tuple(latent_shape[1:])
    return {**super().init_carry(config, batch, num_tokens, latent_shape,
                                 steps),
            **step_reuse.rule_state(half, self.tau, steps)}

  def step_costs(self, plans, carry):
    computed = np.asarray(carry["computed"])
    return [p.cost_key() if computed[i] else p.reuse_plan.cost_key()
            for i, p in enumerate(plans)]


@dataclasses.dataclass(frozen=True)
class ToCa(_Base):
  """ToCa, token-wise feature caching (Zou et al., "Accelerating Diffusion
  Transformers with Token-wise Feature Caching", ICLR 2025, arXiv
  2410.05317).

  Every `interval` steps (ToCa's caching interval N, from step 0) all
  tokens are computed and the cache refreshed; at the steps in between a
  fixed `ratio` R of the tokens is recomputed in every block and the rest
  reuse their cached features. Which tokens: the highest score
  importance + frequency_weight * stale / interval, importance being the
  token's cross-attention entropy (1 + H, L2-normalised over tokens, from
  the step that last computed it: ToCa's score for video models), its
  self-attention LSE ("lse"), or random ("random"); stale counts the steps
  since the token was recomputed (ToCa's cache-frequency score; defaults
  N = 3, R = 0.3, weight 0.25 from ToCa's PixArt settings).
  Differences from ToCa (ours): ToCa caches each module's output (self-
  attention, cross-attention, MLP) with a ratio per module type and depth,
  and in its OpenSora version reuses self-attention whole between refresh
  steps; here a selected token runs the whole block (its queries against
  the keys/values of ALL tokens, as Wan's full 3-D self-attention needs)
  and an unselected one adds its cached block update (Astraea's cache),
  with one ratio everywhere. ToCa's self-attention-map score (column sums
  of the attention matrix) needs the full map, which flash attention never
  forms, and its spatial-uniformity bonus is left out.
  """
  interval: int = 3
  ratio: float = 0.3
  importance: str = "cross_entropy"
  frequency_weight: float = 0.25
  seed: int = 0
  # The cache's storage (ToCa reads no Delta: only cache_dtype matters).
  selection: selection.SelectionConfig = dataclasses.field(
      default_factory=selection.SelectionConfig)
  family: ClassVar[str] = "toca"

  def __post_init__(self):
    if self.interval < 1:
      raise ValueError(f"{self.interval=} must be >= 1")
    if not 0.0 <= self.ratio <= 1.0:
      raise ValueError(f"{self.ratio=} must lie in [0, 1]")
    if self.importance not in ("cross_entropy", "lse", "random"):
      raise ValueError(f"unknown {self.importance=}")

  @property
  def method(self) -> str:
    return "toca" if self.importance == "cross_entropy" else (
        f"toca ({self.importance})")

  def label(self) -> str:
    return (f"{self.method} interval={self.interval} "
            f"ratio={_fmt(self.ratio)}")

  def plans(self, timesteps, num_tokens):
    score = TocaScore(self.importance, self.frequency_weight, self.interval)
    plans = []
    for i in range(len(timesteps)):
      theta = 1.0 if i % self.interval == 0 else self.ratio
      plans.append(TokenPlan(
          budget=theta, num_selected=schedule_lib.num_selected(theta,
                                                               num_tokens),
          selector="toca", toca=score, selection=self.selection,
          seed=self.seed))
    return plans

  def init_carry(self, config, batch, num_tokens, latent_shape, steps):
    return {"step": jnp.zeros((), jnp.int32),
            "cache": selection.init_cache(config.num_layers, batch,
                                          num_tokens, config.dim,
                                          self.selection)}


@dataclasses.dataclass(frozen=True)
class PAB(_Base):
  """Pyramid Attention Broadcast (Zhao et al., "Real-Time Video Generation
  with Pyramid Attention Broadcast", arXiv 2408.12588).

  Attention outputs change little between adjacent steps in the middle of
  sampling (the change is U-shaped over the steps), and cross-attention
  changes least: so inside a timestep window (lo < t < hi, of 1000) each
  attention output is computed once and broadcast to the next range - 1
  steps, with a longer range for cross-attention (the "pyramid"); outside
  the window everything is computed. Wan has no separate spatial and
  temporal attention: its one full 3-D self-attention takes the
  `self_range` (PAB's spatial range is the shortest, 2), cross-attention
  `cross_range`. The broadcast value is the attention output after its
  output projection; the gate and the residual add use the current step's
  modulation (as PAB's attention-module hooks do). Counting starts at the
  window's first step (ours); PAB's optional MLP broadcast is left out.
  """
  self_range: int = 2
  cross_range: int = 4
  window: tuple[float, float] = (100.0, 800.0)
  family: ClassVar[str] = "pab"

  def __post_init__(self):
    if self.self_range < 1 or self.cross_range < 1:
      raise ValueError(f"{self.self_range=} and {self.cross_range=} must be "
                       ">= 1")
    object.__setattr__(self, "window", tuple(float(w) for w in self.window))

  def label(self) -> str:
    lo, hi = self.window
    return (f"pab self={self.self_range} cross={self.cross_range} "
            f"window={lo:g}-{hi:g}")

  def plans(self, timesteps, num_tokens):
    lo, hi = self.window
    inside = [bool(lo < float(t) < hi) for t in timesteps]
    first = inside.index(True) if any(inside) else 0
    plans = []
    for i, w in enumerate(inside):
      offset = i - first
      plans.append(PABPlan(
          reuse_self=w and i > 0 and offset % self.self_range != 0,
          reuse_cross=w and i > 0 and offset % self.cross_range != 0))
    return plans

  def init_carry(self, config, batch, num_tokens, latent_shape, steps):
    shape = (config.num_layers, batch, num_tokens, config.dim)
    return {"step": jnp.zeros((), jnp.int32),
            "self": jnp.zeros(shape, config.compute_dtype),
            "cross": jnp.zeros(shape, config.compute_dtype)}


@dataclasses.dataclass(frozen=True)
class StepCache(_Base):
  """Step-level caching, TeaCache style (Liu et al., "Timestep Embedding
  Tells: It's Time to Cache for Video Diffusion Model", CVPR 2025, arXiv
  2411.19108; the reuse of a cached residual is also Delta-DiT's, Chen et
  al. 2024, arXiv 2406.01125).

  The model's input modulated by the timestep embedding (block 0's
  LN(x)(1 + scale) + shift, or the projected timestep embedding itself)
  predicts how much the model output will change. Its relative L1 change
  from the previous step is summed over steps; while the sum stays below
  `threshold` the whole model is skipped, else it runs and the sum
  restarts from 0. A skipped step adds the cached residual of the block
  stack (output - input of the last computed step) to the current input
  and applies the head ("residual", TeaCache's Wan version), or returns
  the cached velocity ("velocity"). The first and last steps always run.
  TeaCache maps the indicator's change through a polynomial fitted per
  model (`rescale`, coefficients highest power first); we fit none, so the
  default is the identity. CFG's two halves share one decision (their
  modulated inputs are identical). threshold 0 computes every step.
  """
  threshold: float = 0.1
  indicator: str = "modulated_input"
  reuse: str = "residual"
  rescale: tuple[float, ...] = ()
  family: ClassVar[str] = "step_cache"

  def __post_init__(self):
    if self.indicator not in ("modulated_input", "timestep_embedding"):
      raise ValueError(f"unknown {self.indicator=}")
    if self.reuse not in ("residual", "velocity"):
      raise ValueError(f"unknown {self.reuse=}")
    if self.threshold < 0:
      raise ValueError(f"{self.threshold=} must be >= 0")
    object.__setattr__(self, "rescale", tuple(float(c) for c in self.rescale))

  def label(self) -> str:
    extra = "" if self.indicator == "modulated_input" else " indicator=t"
    extra += "" if self.reuse == "residual" else " reuse=velocity"
    return f"step_cache threshold={_fmt(self.threshold)}{extra}"

  def plans(self, timesteps, num_tokens):
    steps = len(timesteps)
    kw = {"indicator": self.indicator, "reuse": self.reuse,
              "rescale": self.rescale}
    return [StepCachePlan("full" if i in (0, steps - 1) else "cached", **kw)
            for i in range(steps)]

  def init_carry(self, config, batch, num_tokens, latent_shape, steps):
    if self.reuse == "residual":
      memo = jnp.zeros((batch, num_tokens, config.dim), F32)
    else:
      memo = jnp.zeros((batch, config.out_dim) + tuple(latent_shape[2:]), F32)
    indicator = ((batch, num_tokens, config.dim)
                 if self.indicator == "modulated_input"
                 else (batch, 6, config.dim))
    return {"step": jnp.zeros((), jnp.int32), "memo": memo,
            "indicator": jnp.zeros(indicator, F32),
            "accumulated": jnp.zeros((), F32),
            "threshold": jnp.asarray(self.threshold, F32),
            "computed": jnp.zeros((steps,), bool),
            "changes": jnp.zeros((steps,), F32)}

  def step_costs(self, plans, carry):
    computed = np.asarray(carry["computed"])
    return [p.cost_key() if p.mode == "full" else (
        "step_cache:computed" if computed[i] else "step_cache:reused")
            for i, p in enumerate(plans)]


def _fraction_steps(fraction: float, steps: int) -> int:
  return max(1, math.floor(fraction * steps))


@dataclasses.dataclass(frozen=True)
class EasyCache(_Base):
  """EasyCache, run-time adaptive step reuse (Zhou et al., "Less is
  Enough: Training-Free Video Diffusion Acceleration via Runtime-Adaptive
  Caching", arXiv 2507.02860; rule in `step_reuse`).

  At a computed step i the model's transformation vector Delta_i = v_i -
  x_i is cached and its transformation rate k_i = |v_i - v_i'| / |x_i -
  x_i'| measured against the computed step i' before it. A later step t
  estimates its relative output change eps_t = k_i |x_t - x_{t-1}| /
  |v_i|; while the sum of the estimates since i stays under `tau` the
  model is not run and v_t = x_t + Delta_i, else it runs and the sum
  restarts. The first floor(warmup * steps) steps (at least 1) and the
  last always run; a step runs while no rate exists yet (two computed
  steps). |.| = mean absolute value, measured on the conditional half of
  the CFG batch, one decision for both halves, each reusing its own
  Delta (as the authors' code). tau 0 computes every step.
  """
  tau: float = 0.05
  warmup: float = 0.1
  family: ClassVar[str] = "easycache"

  def __post_init__(self):
    if self.tau < 0:
      raise ValueError(f"{self.tau=} must be >= 0")
    if not 0.0 <= self.warmup < 1.0:
      raise ValueError(f"{self.warmup=} must lie in [0, 1)")

  def label(self) -> str:
    extra = "" if self.warmup == 0.1 else f" warmup={_fmt(self.warmup)}"
    return f"easycache tau={_fmt(self.tau)}{extra}"

  def warmup_steps(self, steps: int) -> int:
    return _fraction_steps(self.warmup, steps)

  def plans(self, timesteps, num_tokens):
    steps, warm = len(timesteps), self.warmup_steps(len(timesteps))
    return [step_reuse.EasyCachePlan(
        "full" if i < warm or i == steps - 1 else "adaptive")
            for i in range(steps)]

  def init_carry(self, config, batch, num_tokens, latent_shape, steps):
    half = (batch // 2,) + tuple(latent_shape[1:])
    return {"step": jnp.zeros((), jnp.int32),
            "delta": jnp.zeros((batch,) + tuple(latent_shape[1:]), F32),
            **step_reuse.rule_state(half, self.tau, steps),
            "rates": jnp.zeros((steps,), F32)}

  def step_costs(self, plans, carry):
    computed = np.asarray(carry["computed"])
    return ["dense" if computed[i] else "easycache:reused"
            for i in range(len(plans))]


@dataclasses.dataclass(frozen=True)
class MagCache(_Base):
  """MagCache, magnitude-aware step skipping (Ma et al., "MagCache: Fast
  Video Generation with Magnitude-Aware Cache", NeurIPS 2025, arXiv
  2506.09045; rule in `step_reuse`).

  `ratios` is the magnitude-ratio curve gamma_t = mean ||r_t|| / ||r_{t-1}||
  of the block stack's residual r_t, one value per step, calibrated from
  one full run (`calibrate`, as the paper does with one sample). After the
  first floor(retention * steps) steps (at least 1), a step is skipped --
  the head applied to x_t + the residual cached at the last computed step
  t^ -- while the accumulated error sum_s |1 - prod_{t^<i<=s} gamma_i|
  stays under `thresh` and the step is at most the `max_skip`-th (K) since
  t^. The curve fixes every decision before sampling (static plans). Ours:
  one curve and one decision for both CFG halves. thresh 0 computes every
  step.
  """
  thresh: float = 0.06
  max_skip: int = 2
  retention: float = 0.2
  ratios: tuple[float, ...] = ()
  family: ClassVar[str] = "magcache"

  def __post_init__(self):
    if self.thresh < 0 or self.max_skip < 0:
      raise ValueError(f"{self.thresh=} and {self.max_skip=} must be >= 0")
    if not 0.0 <= self.retention < 1.0:
      raise ValueError(f"{self.retention=} must lie in [0, 1)")
    object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))

  @property
  def needs_calibration(self) -> bool:
    return not self.ratios

  def label(self) -> str:
    extra = "" if self.retention == 0.2 else (
        f" retention={_fmt(self.retention)}")
    return f"magcache thresh={_fmt(self.thresh)} K={self.max_skip}{extra}"

  def decisions(self, steps: int) -> list[bool]:
    if self.needs_calibration:
      raise ValueError(
          f"{self.label()} has no magnitude-ratio curve: calibrate it first "
          "(MagCache.calibrate on one sample, as `astraea eval` does, or "
          "ratios=g0/g1/... in the spec)")
    if len(self.ratios) != steps:
      raise ValueError(
          f"{self.label()}: its ratio curve has {len(self.ratios)} values "
          f"for {steps} steps; calibrate it with the same steps "
          "(MagCache.calibrate, or `astraea eval` does it on its first "
          "sample)")
    return step_reuse.magcache_decisions(
        self.ratios, self.thresh, self.max_skip,
        step_reuse.retention_steps(self.retention, steps))

  def plans(self, timesteps, num_tokens):
    return [step_reuse.MagCachePlan(compute=c)
            for c in self.decisions(len(timesteps))]

  def init_carry(self, config, batch, num_tokens, latent_shape, steps):
    return {"step": jnp.zeros((), jnp.int32),
            "residual": jnp.zeros((batch, num_tokens, config.dim), F32)}

  def calibrate(self, graphdef, params, noise, context, negative_context,
                **sample_kwargs) -> "MagCache":
    """This policy with the ratio curve of one full run of the model on
    (noise, context) with the sampling settings given (`sample`'s)."""
    _, carry = sample(graphdef, params, noise, context, negative_context,
                      policy=MagCacheCalibration(), return_carry=True,
                      **{k: v for k, v in sample_kwargs.items()
                         if k not in ("return_stats", "return_carry")})
    return dataclasses.replace(
        self, ratios=tuple(np.asarray(carry["ratios"]).tolist()))


@dataclasses.dataclass(frozen=True)
class MagCacheCalibration(_Base):
  """The full model, recording MagCache's magnitude ratio at every step
  (carry "ratios"; gamma_0 = 1)."""
  family: ClassVar[str] = "magcache_calibration"

  def label(self) -> str:
    return "magcache calibration"

  def plans(self, timesteps, num_tokens):
    return [step_reuse.MagCachePlan(compute=True, record=True)
            ] * len(timesteps)

  def init_carry(self, config, batch, num_tokens, latent_shape, steps):
    return {"step": jnp.zeros((), jnp.int32),
            "residual": jnp.zeros((batch, num_tokens, config.dim), F32),
            "ratios": jnp.ones((steps,), F32)}


# The sampler -----------------------------------------------------------------


def _velocity(graphdef, params, context_2b, carry, latents_2b, timesteps_2b,
              *, plan):
  model = nnx.merge(graphdef, params)
  velocity, carry = plan.forward(model, latents_2b, timesteps_2b, context_2b,
                                 carry)
  return velocity, {**carry, "step": carry["step"] + 1}


def model_fn(graphdef, params, context_2b):
  """The WanDiT under a policy's plans as a `model_fn` for `sampling.run`
  (plan: the step's plan; the carry counts the steps)."""
  return jax.tree_util.Partial(_velocity, graphdef, params, context_2b)


def sample(graphdef, params, noise, context, negative_context, *,
           policy, scheduler="unipc", steps: int = 50,
           guidance_scale: float = 5.0, shift: float | None = None,
           progress: bool = True, return_stats: bool = False,
           return_carry: bool = False):
  """CFG sampling of a WanDiT under an acceleration policy.

  Args as `astraea_jax.sampling.sample` (graphdef, params = nnx.split of
  the WanDiT; noise (B, C, F, H, W)); policy: Dense(), Astraea(...),
  ToCa(...), PAB(...), StepCache(...), EasyCache(...) or a calibrated
  MagCache(...) (`MagCache.calibrate`). Every step is waited for when
  progress or return_stats (per-step wall times).

  Returns latents, then `sampling.SampleStats` (label, method, plans,
  cost_keys, step_seconds, compiled) if return_stats, then the final carry
  (the policy's caches) if return_carry.
  """
  scheduler = dense_sampler.resolve_scheduler(
      scheduler, steps if isinstance(scheduler, str) else None, shift,
      noise.shape)
  if context.shape[0] != noise.shape[0]:
    raise ValueError(f"context batch {context.shape[0]} != noise batch "
                     f"{noise.shape[0]}")
  config = nnx.merge(graphdef, params).config
  grid = tuple(s // p for s, p in zip(noise.shape[2:], config.patch_size))
  n = int(np.prod(grid))
  timesteps = np.asarray(scheduler.timesteps)
  plans = policy.plans(timesteps, n)
  if len(plans) != len(timesteps):
    raise ValueError(f"{policy.label()} made {len(plans)} plans for "
                     f"{len(timesteps)} steps")
  latents, carry, _, stats = dense_sampler.run(
      model_fn(graphdef, params,
               dense_sampler.cfg_context(context, negative_context)),
      jnp.asarray(noise, F32), scheduler=scheduler,
      guidance_scale=guidance_scale, plans=plans,
      make_carry=lambda: policy.init_carry(config, 2 * noise.shape[0], n,
                                           noise.shape, len(plans)),
      progress=progress, wait=return_stats, desc=policy.label())
  stats = dataclasses.replace(
      stats, label=policy.label(), method=policy.method,
      cost_keys=policy.step_costs(plans, carry), num_tokens=n)
  return dense_sampler.pack(latents, (return_stats, stats),
                            (return_carry, carry))
