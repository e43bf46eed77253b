"""What every benchmark records: device, versions, commit, date; JSON out."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import kinds

from astraea_jax.configs import WanConfig
from astraea_jax.provenance import environment  # noqa: F401 (re-exported)
from astraea_jax.sampling import sampler as dense

RESULTS = pathlib.Path(__file__).parent / "results"


def write_results(path, benchmark: str, settings: dict, rows: list,
                  targets: list):
  """Writes the DESIGN.md results format atomically, every row and target
  labelled measured/composed/projected by benchmarks/kinds.py."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  doc = {"benchmark": benchmark, **environment(), "settings": settings,
         "rows": rows, "targets": targets}
  kinds.label(doc)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "w") as f:
    json.dump(doc, f, indent=2)
  os.replace(tmp, path)
  print(f"wrote {path}")


def time_call(fn, *args, repeats=3, warmup=1):
  """Median wall seconds of fn(*args) with its outputs ready."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def timed(fn, repeats):
  """(seconds of the first call of fn(), its compile included; median
  seconds of `repeats` more calls), outputs ready."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  return first, time_call(fn, repeats=repeats, warmup=0)


def peak_memory_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


# Wan sampler steps -----------------------------------------------------------


def wan_setup(small: bool):
  """(config, latent shape, text length) of the Wan step benchmarks:
  Wan2.1-1.3B in bf16 at 480p x 81 frames (latent 16x21x60x104), or a
  2-layer tiny model for CPU smoke runs."""
  if small:
    return WanConfig.tiny(num_layers=2), (1, 16, 3, 8, 12), 16
  return (WanConfig.wan21_t2v_1_3b(dtype="bfloat16", param_dtype="bfloat16"),
          (1, 16, 21, 60, 104), 512)


def num_tokens(config, shape) -> int:
  """Patch tokens of a (batch, channels, frames, height, width) latent."""
  return int(np.prod([s // p for s, p in zip(shape[2:], config.patch_size)]))


def wan_inputs(config, shape, text_len, steps, shift):
  """(noise, CFG context: random text and zeros, UniPC scheduler, token
  count) of a Wan sampling run with random inputs."""
  noise = dense.draw_noise(jax.random.key(0), shape)
  ctx = jax.random.normal(jax.random.key(1), (1, text_len, config.text_dim))
  ctx2 = dense.cfg_context(ctx, jnp.zeros_like(ctx))
  scheduler = dense.make_scheduler("unipc", steps, shift=shift)
  return noise, ctx2, scheduler, num_tokens(config, shape)


class Stepper:
  """THE jitted CFG sampler step (`sampler.step_function`) applied to a
  kept state, one call one step, for timing: the latents, the scheduler
  state and the model's carry (() when dense, Astraea's cache)."""

  def __init__(self, scheduler, guidance, noise, carry=(), *,
               init_state=None, step_fn=None):
    self.scheduler, self.guidance, self.noise = scheduler, guidance, noise
    self.init_state = init_state or scheduler.init
    self.step_fn = step_fn or dense.step_function()
    self.lat, self.carry = noise, carry
    self.restart()

  def restart(self):
    """Back to the scheduler's first step (keeps the step index in range);
    the latents and carry go on."""
    self.st = self.init_state(self.noise)

  def __call__(self, model_fn, plan=None):
    self.lat, self.st, self.carry = self.step_fn(
        model_fn, self.scheduler, self.guidance, self.lat, self.st,
        self.carry, plan=plan)
    return self.lat

  def time(self, model_fn, repeats, plan=None):
    """timed(): one step of `plan` from the first step, then `repeats`."""
    self.restart()
    return timed(lambda: self(model_fn, plan), repeats)


def time_dense_step(stepper, model_fn, tokens, repeats):
  """(row, seconds per step, peak memory bytes) of the dense step; prints
  it."""
  compile_s, seconds = stepper.time(model_fn, repeats)
  peak = peak_memory_bytes()
  print(f"dense: {1e3 * seconds:.1f} ms/step (compile {compile_s:.1f} s)")
  return ({"method": "dense", "tokens": tokens, "ms_per_step": 1e3 * seconds,
           "compile_s": compile_s}, seconds, peak)
