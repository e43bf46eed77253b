"""`astraea generate`: latents (and a decoded video) from a converted Wan.

  astraea generate wan-1.3b/ --text-embeddings prompt.safetensors \
      --height 480 --width 832 --frames 81 --budget 0.4 --compare --out out/

Numbered like a diffusers pipeline:
  1. load the converted DiT (and the VAE if `--vae` is given);
  2. read the text embeddings: a safetensors file with `context` (L, D) or
     (1, L, D) and optionally `negative_context` (zeros otherwise);
  3. draw the noise from `--seed`;
  4. sample: dense, or Astraea with `--budget` / `--schedule`;
     `--compare` also samples the full model from the same noise;
  5. decode with the VAE (if given) and write the outputs atomically.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax import checkpoint, metrics
from astraea_jax.astraea import sampler as astraea_sampler
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.sampling import sampler as dense_sampler
from converters import safetensors_io


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  height: int = 480
  width: int = 832
  frames: int = 81
  steps: int = 50
  guidance_scale: float = 5.0
  shift: float | None = None
  scheduler: str = "unipc"
  seed: int = 0
  budget: float | None = None
  schedule: tuple[float, ...] | None = None
  compare: bool = False


def read_text_embeddings(path, text_dim: int):
  """(context (1, L, D), negative_context (1, L', D)) from a safetensors file."""
  try:
    f = safetensors_io.SafetensorsFile(path)
  except (OSError, safetensors_io.SafetensorsError) as e:
    raise ValueError(f"cannot read text embeddings {path}: {e}") from e
  if "context" not in f.entries:
    raise ValueError(f"{path}: no tensor named 'context' (found "
                     f"{f.keys()}); expected (L, {text_dim}) embeddings")
  out = []
  for name in ("context", "negative_context"):
    if name not in f.entries:
      out.append(jnp.zeros((1, 1, text_dim), jnp.float32))
      continue
    x = np.asarray(f.get(name), np.float32)
    x = x[None] if x.ndim == 2 else x
    if x.ndim != 3 or x.shape[0] != 1 or x.shape[2] != text_dim:
      raise ValueError(f"{path}: {name} has shape {f.shape(name)}; expected "
                       f"(L, {text_dim}) or (1, L, {text_dim})")
    out.append(jnp.asarray(x))
  return tuple(out)


def _steady_seconds(step_seconds, keys):
  """Sum of per-step times with each compile replaced by a warm median."""
  by_key = {}
  for t, k in zip(step_seconds, keys):
    by_key.setdefault(k, []).append(t)
  total = 0.0
  for times in by_key.values():
    warm = times[1:] or times
    total += np.median(warm) * len(times)
  return float(total)


def generate(model_path, embeddings_path, out, *, config: GenerateConfig,
             vae_path=None, allow_pth=False, dtype=None, overwrite=False):
  """Runs the pipeline; returns the report dict (also written to out/)."""
  out = pathlib.Path(out)
  if out.exists() and not overwrite:
    raise checkpoint.CheckpointExistsError(
        f"{out} already exists; pass --overwrite to replace it")
  model = checkpoint.load_model(model_path, dtype=dtype)            # 1.
  vae = None
  if vae_path is not None:
    from converters import wan_vae  # pylint: disable=g-import-not-at-top
    vae = wan_vae.load_vae(vae_path, allow_pth=allow_pth)
  context, negative = read_text_embeddings(embeddings_path,         # 2.
                                           model.config.text_dim)
  shape = dense_sampler.wan_latent_shape(config.height, config.width,  # 3.
                                         config.frames)
  noise = dense_sampler.draw_noise(jax.random.key(config.seed), shape)
  graphdef, params = nnx.split(model)
  common = dict(scheduler=config.scheduler, steps=config.steps,
                guidance_scale=config.guidance_scale, shift=config.shift)
  report = {"latent_shape": list(shape), "seed": config.seed, **{
      k: v for k, v in dataclasses.asdict(config).items()
      if k not in ("schedule",)}}
  results = {}
  accelerated = config.budget is not None or config.schedule is not None
  if accelerated:                                                    # 4.
    t0 = time.perf_counter()
    latents, stats = astraea_sampler.sample(
        graphdef, params, noise, context, negative, budget=config.budget,
        schedule=config.schedule, return_stats=True, **common)
    report["astraea"] = {
        "seconds": time.perf_counter() - t0,
        "seconds_without_compiles": _steady_seconds(stats.step_seconds,
                                                    stats.num_selected),
        "schedule": [float(b) for b in stats.budgets],
        "mean_budget": float(np.mean(stats.budgets)),
        "compiles": len(stats.compiled_k)}
    results["astraea"] = latents
  if not accelerated or config.compare:
    step_seconds = []
    t0 = time.perf_counter()
    results["full"] = dense_sampler.sample(graphdef, params, noise, context,
                                           negative, step_seconds=step_seconds,
                                           **common)
    report["full"] = {"seconds": time.perf_counter() - t0,
                      "seconds_without_compiles": _steady_seconds(
                          step_seconds, [0] * len(step_seconds))}
  videos = {}
  if vae is not None:                                                # 5.
    videos = {k: vae.decode(v, clamp=True) for k, v in results.items()}
  if accelerated and config.compare:
    report["speedup_without_compiles"] = (
        report["full"]["seconds_without_compiles"]
        / report["astraea"]["seconds_without_compiles"])
    a, b = (videos or results)["astraea"], (videos or results)["full"]
    rng = 2.0 if videos else float(jnp.max(b) - jnp.min(b))
    report["compared_on"] = "video" if videos else "latents"
    report["psnr_db"] = float(metrics.psnr(a, b, data_range=rng))
    if videos:
      report["ssim"] = float(metrics.ssim(a, b, channel_axis=-3))
  with checkpoint.atomic_folder(out, overwrite=overwrite) as tmp:
    tensors = {f"latents_{k}": np.asarray(v) for k, v in results.items()}
    tensors.update({f"video_{k}": np.asarray(v) for k, v in videos.items()})
    safetensors_io.save_file(tensors, tmp / "outputs.safetensors")
    (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  return report


def load_schedule(path, steps):
  return tuple(schedule_lib.validate(schedule_lib.load(path), steps))
