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

Hooks, never a copy of the loop (Wan2.2): the per-step plan can pick an
expert's parameters (`expert_plan`, `pick_expert`), the guidance scale may
be one per step (`step_guidance`), `post_step` edits the latents after each
scheduler step (TI2V's image frame), `wan_model_fn(token_mask=)` gives
some tokens timestep 0 (`token_timesteps`) and `condition_2b=` adds input
channels (I2V-A14B's mask and image latents; `WanInputs`).

Two loop drivers with identical numerics: "python" (default) calls ONE
jitted step function per step and can show a progress bar; "scan" compiles
the whole loop as `jax.lax.scan` over that same step. Step overhead of each
on the H200: benchmarks/sampling_loop.py.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from astraea_jax import placement as placement_lib
from astraea_jax.sampling import memory
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


def step_guidance(guidance_scale, step):
  """The step's CFG scale: one scale for every step, or (num_steps,) scales
  indexed by the step (Wan2.2 A14B: each expert its own)."""
  guidance_scale = jnp.asarray(guidance_scale)
  return guidance_scale[step] if guidance_scale.ndim else guidance_scale


def guided_step(model_fn, scheduler, guidance_scale, latents, sched_state,
                carry, post_step=None):
  """One CFG denoising step (pure; traced inside both loop drivers).

  guidance_scale: a scale, or one per step (`step_guidance`). post_step:
  None or a pytree function latents -> latents applied after the
  scheduler step (TI2V image-to-video puts the image's latent frame back).
  Returns (latents, sched_state, carry) after the step.
  """
  t = scheduler.timesteps[sched_state.step]
  scale = step_guidance(guidance_scale, sched_state.step)
  latents_2b, timesteps_2b = cfg_batch(latents, t)               # 1.
  velocity_2b, carry = model_fn(carry, latents_2b, timesteps_2b)  # 2.
  velocity = cfg_combine(velocity_2b.astype(latents.dtype), scale)  # 3.
  latents, sched_state = scheduler.step(sched_state, velocity, latents)  # 4.
  if post_step is not None:
    latents = post_step(latents)
  return latents, sched_state, carry


# The host loop ---------------------------------------------------------------


def _plan_step(model_fn, scheduler, guidance_scale, latents, sched_state,
               carry, post_step=None, *, plan=None):
  if plan is not None:
    model_fn = functools.partial(model_fn, plan=plan)
  return guided_step(model_fn, scheduler, guidance_scale, latents,
                     sched_state, carry, post_step)


_STEP_FUNCTIONS = {}  # out_shardings -> the jitted step for that placement


def step_function(out_shardings=None):
  """THE jitted CFG step, static in its plan: one compile per distinct plan.

  The sched_state and carry are donated: their buffers (Astraea's caches)
  are reused in place. The latents are not, so trajectories stay valid.
  out_shardings (a mesh program's pinned result placement) gives a jitted
  function of its own.
  """
  if out_shardings not in _STEP_FUNCTIONS:
    kw = {} if out_shardings is None else {"out_shardings": out_shardings}
    _STEP_FUNCTIONS[out_shardings] = jax.jit(
        _plan_step, static_argnames=("plan",), donate_argnums=(4, 5),
        compiler_options=step_compiler_options(), **kw)
  return _STEP_FUNCTIONS[out_shardings]


def step_compiler_options() -> dict | None:
  """XLA options of the step programs. On GPUs, XLA's Triton GEMM fusions
  are off (cuBLAS only): measured on one H100 with Wan2.1-1.3B 480p, the
  steps run as fast (dense 975 vs 970 ms, Astraea 0.4 479 vs 481 ms,
  0.3 379 vs 385 ms) and compile 2-4x faster (dense 2.2 vs 8.3 s,
  Astraea 0.4 2.8 vs 6.6 s): the cost of a cold run
  (benchmarks/astraea_step_profile.py)."""
  if jax.default_backend() != "gpu":
    return None
  return {"xla_gpu_enable_triton_gemm": False}


def compiled_count() -> int | None:
  """Step programs compiled so far, over every placement, by the jitted
  step functions and ahead of time (None where jax hides its jit cache)."""
  sizes = [getattr(f, "_cache_size", None) for f in _STEP_FUNCTIONS.values()]
  if any(size is None for size in sizes):
    return None
  return sum(size() for size in sizes) + len(_EXECUTABLES)


# Ahead-of-time step programs: (plan, argument signature) -> Future of the
# compiled executable, kept for the process like jax's jit cache. Steps on
# one device run through these, so that (1) the distinct plans compile
# side by side in threads (a cold Wan2.1-1.3B Astraea 0.4 run on one H100
# took 17 s more than a warm one when they compiled one after the other,
# against 5 s for the dense run; benchmarks/results/
# astraea_end_to_end_h100.json), and (2) their compiled memory analyses
# say whether the run fits before its carry (the token caches) is
# allocated (`memory.check_fits`).
_EXECUTABLES: dict = {}
_POOL: list = []


def _pool():
  if not _POOL:
    _POOL.append(concurrent.futures.ThreadPoolExecutor(
        max_workers=4, thread_name_prefix="astraea-compile"))
  return _POOL[0]


def _signature(args):
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple((tuple(x.shape), jnp.dtype(x.dtype),
                         bool(getattr(x, "weak_type", False)))
                        for x in leaves)


def compile_plans(step, plans, args):
  """({plan: Future of its compiled step} for each distinct plan, the set
  of plans this call started compiling): from the process cache, or
  compiled in the background. `args` may hold abstract arrays
  (`jax.ShapeDtypeStruct`) where the real ones are not made yet."""
  out, started = {}, set()
  signature = _signature(args)
  # Every plan is submitted at once, in plan order (the pool runs up to
  # four compiles side by side).
  for plan in dict.fromkeys(plans):
    key = (plan, signature)
    cached = _EXECUTABLES.get(key)
    if cached is None or (cached.done() and cached.exception() is not None):
      _EXECUTABLES[key] = _pool().submit(  # (a failed compile is retried)
          lambda p=plan: step.lower(*args, plan=p).compile())
      started.add(plan)
    out[plan] = _EXECUTABLES[key]
  return out, started


def _call_step(step, executable, args, plan):
  """The step through its ahead-compiled executable where the arguments
  match it, else through the jitted function (which compiles as usual)."""
  if executable is not None:
    try:
      return executable(*args)
    except (TypeError, ValueError):
      pass  # e.g. a weak type that changed after step 0
  return step(*args, plan=plan)


@dataclasses.dataclass
class SampleStats:
  """What a sampling run did, step by step: the one record every sampler
  returns (a field a sampler has no use for keeps its default).

  step_seconds: wall time per step (the first of each plan includes its
    compilation); compiled: step i compiled a new step function (None where
    jax hides it); plans: the static plan each step ran.
  Token-wise samplers: num_tokens N, budgets (one per step), num_selected
  (tokens computed per block, per step), compiled_k (distinct token counts,
  each a compile). estimated_peak_bytes: the device peak the largest
  compiled step program predicts (`memory.check_fits`; None on meshes).
  Sequence parallel: num_shards, plan (the attention plan),
  selected_per_shard. Policies: label, method, cost_keys.
  """
  step_seconds: list[float] = dataclasses.field(default_factory=list)
  compiled: list[bool | None] = dataclasses.field(default_factory=list)
  plans: list = dataclasses.field(default_factory=list)
  num_tokens: int = 0
  budgets: np.ndarray | None = None
  num_selected: list[int] = dataclasses.field(default_factory=list)
  compiled_k: list[int] = dataclasses.field(default_factory=list)
  num_shards: int = 1
  plan: str = ""
  selected_per_shard: list[int] = dataclasses.field(default_factory=list)
  estimated_peak_bytes: int | None = None
  label: str = ""
  method: str = ""
  cost_keys: list[str] = dataclasses.field(default_factory=list)

  @property
  def computed_fraction(self) -> float:
    """Mean over steps of the fraction of the full model's token-blocks
    computed (attention reuse and residual reuse count as computed)."""
    total = 0.0
    for key in self.cost_keys:
      if key.startswith("tokens:"):
        total += float(key.split(":")[1])
      elif not key.endswith(":reused"):   # whole-step reuse computes none
        total += 1.0
    return total / len(self.cost_keys)


def steady_seconds(step_seconds, keys) -> float | None:
  """Sum of per-step times with each compiling step (the first of each
  key, e.g. its token count) replaced by the median of that key's later
  steps; None when some key ran only once (its time would include
  compilation)."""
  by_key = {}
  for t, k in zip(step_seconds, keys):
    by_key.setdefault(k, []).append(t)
  if any(len(times) < 2 for times in by_key.values()):
    return None
  return float(sum(np.median(times[1:]) * len(times)
                   for times in by_key.values()))


@functools.partial(jax.jit, static_argnames=("return_trajectory",),
                   donate_argnums=(4, 5))
def _scanned_loop(model_fn, scheduler, guidance_scale, latents, sched_state,
                  carry, post_step, *, return_trajectory):
  def body(state, _):
    state = guided_step(model_fn, scheduler, guidance_scale, *state,
                        post_step)
    return state, (state[0] if return_trajectory else None)

  (latents, sched_state, carry), trajectory = jax.lax.scan(
      body, (latents, sched_state, carry), None, length=scheduler.num_steps)
  # sched_state is returned only so that its donated buffers have an output
  # to alias.
  return latents, sched_state, carry, trajectory


def run(model_fn, latents, *, scheduler, guidance_scale, plans=None,
        carry=(), make_carry=None, sched_state=None, out_shardings=None,
        loop: str = "python", return_trajectory: bool = False,
        progress: bool = True, wait: bool = False, desc: str = "sampling",
        postfix=None, memory_hint=None, post_step=None,
        return_sched_state: bool = False):
  """THE host sampling loop: every sampler (dense, Astraea on Wan and
  STDiT3, the policies, the mesh samplers) runs its steps here.

  Args:
    model_fn: `model_fn(carry, latents_2b, timesteps_2b[, plan=plan]) ->
      (velocity_2b, carry)`, a pytree (`jax.tree_util.Partial`) so that its
      arrays are traced arguments of the jitted step.
    plans: one static, hashable plan per step, passed to model_fn as
      `plan=` (Astraea: the step's token count); None = one plan-less step
      for all `scheduler.num_steps` steps. One compile per distinct plan.
    carry: pytree threaded through model_fn (caches); consumed (donated).
    make_carry: or a function that makes it, called only after the
      compiled step programs said the run fits the device (`memory`).
    sched_state: the scheduler's state (default `scheduler.init(latents)`).
    out_shardings: the jitted step's result placement (mesh samplers).
    loop: "python" (a jitted step per step, progress bar) or "scan" (the
      whole loop compiled as `jax.lax.scan`; plans must be None).
    wait: wait for every step, so step_seconds are its run time (also
      done with a progress bar).
    desc, postfix: the progress bar's title and per-step postfix dicts.
    memory_hint: hint(needed_bytes, limit_bytes) -> what would fit, for
      the error when the run would not (`memory.check_fits`).
    guidance_scale: one CFG scale, or one per step (`step_guidance`).
    post_step: None or a pytree function latents -> latents after each
      scheduler step (`guided_step`).
    return_sched_state: also return the scheduler's state after the last
      step, to go on from it (`run_by_expert` runs `plans` in parts).

  Returns (latents, carry, trajectory or None, SampleStats with
  step_seconds, compiled, plans and estimated_peak_bytes), and the
  scheduler's state with return_sched_state.
  """
  if loop not in LOOPS:
    raise ValueError(f"{loop=} must be one of {LOOPS}")
  guidance_scale = jnp.asarray(guidance_scale, jnp.float32)
  if guidance_scale.ndim and guidance_scale.shape != (scheduler.num_steps,):
    raise ValueError(f"guidance scales {guidance_scale.shape} must be one "
                     f"scale or one per step ({scheduler.num_steps},)")
  if sched_state is None:
    sched_state = scheduler.init(latents)
  stats = SampleStats()
  if loop == "scan":
    if make_carry is not None:
      carry = make_carry()
    if plans is not None:
      raise ValueError("loop='scan' runs one plan; got a plan per step")
    latents, sched_state, carry, trajectory = _scanned_loop(
        model_fn, scheduler, guidance_scale, latents, sched_state, carry,
        post_step, return_trajectory=return_trajectory)
    return (latents, carry, trajectory, stats) + (
        (sched_state,) if return_sched_state else ())
  if plans is None:
    plans = [None] * scheduler.num_steps
  step = step_function(out_shardings)
  if make_carry is not None:
    carry = jax.eval_shape(make_carry)
  args = (model_fn, scheduler, guidance_scale, latents, sched_state, carry,
            post_step)
  futures, started = {}, set()
  if out_shardings is None:  # mesh programs keep their jitted placement
    futures, started = compile_plans(step, plans, args)
    # Every plan compiled before the carry is allocated: the largest
    # program says whether the run fits, and no compile's autotuning
    # scratch lands on top of the token caches.
    largest = max((futures[p].result() for p in futures),
                  key=memory.program_bytes)
    stats.estimated_peak_bytes = memory.check_fits(largest, args,
                                                   hint=memory_hint)
  if make_carry is not None:
    carry = make_carry()
  trajectory, used = [], set()
  bar = tqdm.tqdm(plans, disable=not progress, desc=desc, unit="step")
  for i, plan in enumerate(bar):
    if progress and postfix is not None:
      bar.set_postfix(postfix[i])
    before = compiled_count()
    start = time.perf_counter()
    executable = futures[plan].result() if plan in futures else None
    args = (model_fn, scheduler, guidance_scale, latents, sched_state, carry,
            post_step)
    latents, sched_state, carry = _call_step(step, executable, args, plan)
    if progress or wait:  # wait for the step to finish
      latents.block_until_ready()
    stats.step_seconds.append(time.perf_counter() - start)
    after = compiled_count()
    if plan in futures:  # the first step of a plan compiled for this run
      stats.compiled.append((plan in started and plan not in used)
                            or bool(after and after > before))
      used.add(plan)
    else:
      stats.compiled.append(None if before is None else after > before)
    stats.plans.append(plan)
    if return_trajectory:
      trajectory.append(latents)
  trajectory = jnp.stack(trajectory) if return_trajectory else None
  return (latents, carry, trajectory, stats) + (
      (sched_state,) if return_sched_state else ())


EXPERT_PLACEMENTS = ("both", "one")


def check_expert_placement(expert_placement: str) -> str:
  """"both": every expert's parameters on the accelerator for the whole
  run; "one": only the running expert's (`run_by_expert`)."""
  if expert_placement not in EXPERT_PLACEMENTS:
    raise ValueError(f"{expert_placement=} must be one of "
                     f"{EXPERT_PLACEMENTS}")
  return expert_placement


def expert_segments(experts):
  """[(start, stop, expert)]: the runs of consecutive steps of one expert
  (Wan2.2 A14B: the high-noise steps, then the low-noise ones)."""
  segments, start = [], 0
  for i in range(1, len(experts) + 1):
    if i == len(experts) or experts[i] != experts[start]:
      segments.append((start, i, experts[start]))
      start = i
  return segments


def run_by_expert(make_model_fn, params, latents, *, experts, plans,
                  expert_placement: str = "both", scheduler, carry=(),
                  make_carry=None, sched_state=None, postfix=None,
                  return_trajectory: bool = False, **options):
  """`run` of a model of one or more experts (Wan2.2 A14B).

  make_model_fn(params) -> the run's model_fn; params: one model's state
  or the experts' tuple; experts: each step's expert (`expert_plan`),
  which its plan picks (`pick_expert`).

  expert_placement "both": ONE `run` with every expert's params as its
  model_fn's (on the accelerator, if they are there, for the whole run).
  "one": `run` once per run of steps of one expert (`expert_segments`),
  its model_fn holding that expert's params alone, the others None: the
  expert's NumPy params (offloaded, `placement.state_placed`) are copied
  to the accelerator when its steps start and that copy is freed when
  they end, before the next expert's is made, so the accelerator never
  holds two experts and each part's memory check (`memory.check_fits`)
  counts one. The latents, the scheduler's state and the carry (Astraea's
  token caches) go from part to part unchanged: the same steps, the same
  numbers as "both". The cost: each expert's copy to the accelerator
  (once per video), and each part's plans compile when it starts (the
  low-noise ones while the carry is allocated).

  Other keyword arguments as `run`; returns what `run` returns, the parts'
  stats and trajectories joined.
  """
  check_expert_placement(expert_placement)
  run_options = dict(scheduler=scheduler, return_trajectory=return_trajectory,
                     **options)
  if expert_placement == "both":
    return run(make_model_fn(params), latents, plans=plans, carry=carry,
               make_carry=make_carry, sched_state=sched_state,
               postfix=postfix, **run_options)
  if not isinstance(params, (tuple, list)):
    raise ValueError("expert_placement='one' places one of two experts; "
                     "this is one model's params")
  if options.get("loop", "python") != "python":
    raise ValueError("expert_placement='one' runs the python loop")
  plans = list(experts if plans is None else plans)
  if sched_state is None:
    sched_state = scheduler.init(latents)
  parts, trajectories = SampleStats(), []
  for start, stop, expert in expert_segments(experts):
    with placement_lib.state_placed(params[expert]) as active:
      latents, carry, trajectory, stats, sched_state = run(
          make_model_fn(tuple(active if e == expert else None
                              for e in range(len(params)))),
          latents, plans=plans[start:stop], carry=carry,
          make_carry=make_carry, sched_state=sched_state,
          postfix=None if postfix is None else postfix[start:stop],
          return_sched_state=True, **run_options)
      make_carry = None  # made once, by the first part
      latents.block_until_ready()  # the expert's last step has read it
    parts.step_seconds += stats.step_seconds
    parts.compiled += stats.compiled
    parts.plans += stats.plans
    if stats.estimated_peak_bytes is not None:
      parts.estimated_peak_bytes = max(parts.estimated_peak_bytes or 0,
                                       stats.estimated_peak_bytes)
    trajectories.append(trajectory)
  trajectory = (jnp.concatenate(trajectories) if return_trajectory
                else None)
  return latents, carry, trajectory, parts


def denoise(model_fn, latents, *, scheduler, guidance_scale, carry=(),
            loop: str = "python", return_trajectory: bool = False,
            progress: bool = True, step_seconds: list | None = None):
  """Runs all `scheduler.num_steps` CFG steps from `latents` (`run` with
  one plan).

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
  latents, carry, trajectory, stats = run(
      model_fn, latents, scheduler=scheduler, guidance_scale=guidance_scale,
      carry=carry, loop=loop, return_trajectory=return_trajectory,
      progress=progress, wait=step_seconds is not None)
  if step_seconds is not None:
    step_seconds.extend(stats.step_seconds)
  return latents, carry, trajectory


def pack(latents, *optional):
  """latents alone, or (latents, *values asked for): each optional result
  is a pair (asked, value), kept in order when asked."""
  out = (latents, *(value for asked, value in optional if asked))
  return out[0] if len(out) == 1 else out


def resolve_scheduler(scheduler, steps, shift, noise_shape, *,
                      schedule: str = "diffusers"):
  """The one scheduler factory of the Wan samplers: a name ("unipc" |
  "euler") with `steps`, `shift` and UniPC's `schedule` (`make_scheduler`)
  -> a scheduler; shift None = the flow shift of the video size implied by
  the latents (`wan_flow_shift`: 3.0 up to 480p, 5.0 above). A scheduler
  pytree passes through (then `steps` must be None or its step count)."""
  if isinstance(scheduler, str):
    if steps is None:
      raise ValueError(f"{scheduler=} needs `steps`")
    if shift is None:
      shift = sched_lib.wan_flow_shift(8 * noise_shape[3], 8 * noise_shape[4])
    return make_scheduler(scheduler, steps, shift=shift, schedule=schedule)
  if steps is not None and steps != scheduler.num_steps:
    raise ValueError(
        f"{steps=} disagrees with the scheduler's {scheduler.num_steps} steps")
  return scheduler


# Wan -------------------------------------------------------------------------


def expert_plan(timesteps, boundary_ratio: float | None,
                num_train_timesteps: int = sched_lib.NUM_TRAIN_TIMESTEPS):
  """Which expert each step runs (Wan2.2 A14B): 0, the high-noise expert,
  while t >= boundary_ratio * T, then 1, the low-noise one (wan22's
  text2video.py switches at the first t below the boundary). None: one
  model, expert 0 throughout."""
  if boundary_ratio is None:
    return [0] * len(timesteps)
  if not 0.0 < boundary_ratio < 1.0:
    raise ValueError(f"{boundary_ratio=} must lie in (0, 1)")
  boundary = boundary_ratio * num_train_timesteps
  return [0 if float(t) >= boundary else 1 for t in np.asarray(timesteps)]


def check_experts(params, boundary_ratio: float | None):
  """Two experts' params go with a boundary_ratio, one model's without
  (every sampler that takes `expert_plan`'s plans checks this first)."""
  if (boundary_ratio is None) == isinstance(params, (tuple, list)):
    raise ValueError("two experts' params go with a boundary_ratio, one "
                     f"model's without ({boundary_ratio=})")


def expert_guidance(experts, guidance_scale):
  """Per-step CFG scales: `guidance_scale` is one scale or, as Wan2.2's
  configs give it, a pair (low-noise expert's, high-noise expert's)."""
  if np.ndim(guidance_scale) == 0:
    return np.full(len(experts), float(guidance_scale), np.float32)
  low, high = guidance_scale  # a ValueError unless a pair
  return np.asarray([high if e == 0 else low for e in experts], np.float32)


def pick_expert(params, expert: int | None):
  """The parameters of one expert: `params` is one model's state, or a
  tuple of experts' states (high noise, low noise) picked by `expert`."""
  if isinstance(params, (tuple, list)):
    return params[expert or 0]
  if expert:
    raise ValueError(f"expert {expert} asked of a single model")
  return params


def token_timesteps(timesteps_2b, token_mask):
  """(2B,) timesteps -> (2B, L) = t * token_mask (TI2V image-to-video:
  mask 0 on the tokens of the conditioning frame, as wan22's
  textimage2video.py builds them); token_mask None keeps (2B,)."""
  if token_mask is None:
    return timesteps_2b
  return timesteps_2b[:, None] * token_mask[None, :].astype(
      timesteps_2b.dtype)


class WanInputs(NamedTuple):
  """What a Wan model call of the CFG batch takes besides the latents and
  the timesteps (a pytree; None fields are empty):

    context: (2B, L, text_dim) text embeddings (`cfg_context`);
    token_mask: None or (L,) per-token timestep factors (TI2V image-to-
      video, `token_timesteps`);
    condition: None or (2B, C', F, H, W) channels concatenated to the
      latents (I2V-A14B: mask and image latents, `cfg_condition`).
  """
  context: Any
  token_mask: Any = None
  condition: Any = None

  def timesteps(self, timesteps_2b):
    """The model's timesteps: (2B,), or (2B, L) with a token mask."""
    return token_timesteps(timesteps_2b, self.token_mask)


def cfg_condition(condition):
  """(B, C', F, H, W) conditioning channels -> (2B, ...) for the CFG batch
  [cond; uncond]: both branches see the same image (wan22 image2video.py
  passes y to both); None stays None."""
  if condition is None:
    return None
  return jnp.concatenate([condition, condition], axis=0)


def _wan_velocity(graphdef, params, inputs: WanInputs, carry, latents_2b,
                  timesteps_2b, *, plan=None):
  model = nnx.merge(graphdef, pick_expert(params, plan))
  return model(latents_2b, inputs.timesteps(timesteps_2b), inputs.context,
               condition=inputs.condition), carry


def wan_model_fn(graphdef, params, context_2b, token_mask=None,
                 condition_2b=None):
  """The dense WanDiT as a `model_fn` (empty carry) for `denoise`.

  params: one model's state, or the experts' states (high, low noise),
  then each step's plan is its expert (`expert_plan`). token_mask,
  condition_2b: as `WanInputs`.
  """
  return jax.tree_util.Partial(_wan_velocity, graphdef, params,
                               WanInputs(context_2b, token_mask,
                                         condition_2b))


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
           guidance_scale=5.0, shift: float | None = None,
           return_trajectory: bool = False, loop: str = "python",
           progress: bool = True, step_seconds: list | None = None,
           boundary_ratio: float | None = None, token_mask=None,
           post_step=None, condition=None,
           expert_placement: str = "both"):
  """Dense CFG sampling with a WanDiT: noise -> latents.

  Args:
    model: the WanDiT `nnx.GraphDef` and params its `nnx.State`
      (`model, params = nnx.split(wan_dit)`), or a pair of states (the
      high- and low-noise experts of Wan2.2 A14B) with `boundary_ratio`.
    noise: (B, C, F, H, W) float32 initial latents (`draw_noise`).
    context, negative_context: (B, L, text_dim) prompt embeddings and
      (B or 1, L', text_dim) negative-prompt embeddings.
    scheduler: "unipc" | "euler", built with `steps` and `shift`, or a
      scheduler pytree (then `steps` must be None or its step count).
    guidance_scale: one CFG scale, or (low-noise, high-noise) per expert.
    shift: flow shift; None = `wan_flow_shift` of the video size implied by
      the latents (3.0 up to 480p, 5.0 above).
    boundary_ratio: two experts switch at the first step with t <
      boundary_ratio * 1000 (`expert_plan`); one compile per expert.
    token_mask: (L,) per-token timestep factors (TI2V image-to-video).
    post_step: latents -> latents after each step (`guided_step`).
    condition: (B, C', F, H, W) channels the model takes after the
      latents' (I2V-A14B: mask and image latents), the same for both CFG
      branches.
    expert_placement: two experts' params on the accelerator for the
      whole run ("both") or one at a time ("one", from offloaded NumPy
      params: `run_by_expert`); the same numbers.
    Others as in `denoise`.

  Returns:
    latents (B, C, F, H, W) float32, or (latents, trajectory) with
    trajectory (steps, B, C, F, H, W) when return_trajectory.
  """
  scheduler = resolve_scheduler(scheduler, steps, shift, noise.shape)
  if context.shape[0] != noise.shape[0]:
    raise ValueError(f"context batch {context.shape[0]} != noise batch "
                     f"{noise.shape[0]}")
  check_experts(params, boundary_ratio)
  experts = expert_plan(scheduler.timesteps, boundary_ratio)
  inputs = (cfg_context(context, negative_context), token_mask,
            cfg_condition(condition))
  latents, _, trajectory, stats = run_by_expert(
      lambda p: wan_model_fn(model, p, *inputs),
      params, jnp.asarray(noise, jnp.float32), scheduler=scheduler,
      guidance_scale=expert_guidance(experts, guidance_scale),
      experts=experts, expert_placement=expert_placement,
      plans=None if boundary_ratio is None else experts, loop=loop,
      return_trajectory=return_trajectory, progress=progress,
      wait=step_seconds is not None, post_step=post_step)
  if step_seconds is not None:
    step_seconds.extend(stats.step_seconds)
  return (latents, trajectory) if return_trajectory else latents
