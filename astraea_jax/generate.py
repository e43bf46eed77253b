"""`astraea generate`: a video (or latents) from a converted Wan2.1.

A converted OpenSora v1.2 folder (its manifest says so) is sampled by
`opensora_pipeline.generate`, with the same outputs and report.

  astraea generate --model wan-1.3b/ --prompt "A cat baking a cake" \
      --size 832x480 --frames 81 --budget 0.4 --out cat.mp4
  astraea generate wan-dit/ --text-embeddings prompt.safetensors \
      --height 480 --width 832 --frames 81 --budget 0.4 --compare --out out/

The model is a converted whole-model folder (`astraea convert` of a full
Wan2.1 download: manifest.json, transformer/, vae/, text_encoder/,
tokenizer/) or a converted transformer alone. `--prompt` needs the whole
model; `--text-embeddings` works with either (a transformer alone decodes
only with `--vae`).

Outputs: `--out NAME.mp4` writes the video (Astraea's when accelerated),
plus NAME.full.mp4 with --compare and NAME.latents.safetensors with
--save-latents; any other `--out` is a folder with outputs.safetensors
(latents, and videos when decoded), report.json and video_<run>.mp4 per
decoded run. Every file is written atomically (temporary name, then
rename); existing outputs need --overwrite, which replaces only earlier
astraea outputs (`outputs.check_destination`).

Numbered like a diffusers pipeline:
  1. load the converted DiT (with the VAE and text encoder of a whole-model
     folder, or the VAE given by `--vae`);
  2. the text embeddings: `--prompt` / `--negative-prompt` through the
     tokenizer and umT5 encoder, or a safetensors file with `context` (L, D)
     or (1, L, D) and optionally `negative_context` (zeros otherwise);
  3. draw the noise from `--seed`;
  4. sample: dense, or Astraea with `--budget` / `--schedule`;
     `--compare` also samples the full model from the same noise;
  5. decode with the VAE (if any) and write the outputs atomically.
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

from astraea_jax import checkpoint, metrics, outputs
from astraea_jax import pipeline as pipeline_lib
from astraea_jax import video as video_lib
from astraea_jax.astraea import wan_tokenwise as astraea_sampler
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
  scheduler: str | None = None  # None: the model's (Wan2.1: unipc)
  seed: int = 0
  budget: float | None = None
  schedule: tuple[float, ...] | None = None
  compare: bool = False
  devices: int | None = None  # N: astraea_jax.parallel over N devices


OPENSORA = "opensora-v1.2"
# `astraea generate` defaults per model (None in the CLI = these).
WAN_DEFAULTS = {"height": 480, "width": 832, "frames": 81, "steps": 50,
                "guidance": 5.0, "fps": float(video_lib.WAN_FPS),
                "scheduler": "unipc"}


def model_family(model_path) -> str:
  """"opensora-v1.2" for a converted OpenSora folder, else "wan2.1-t2v"
  (a Wan folder or a converted transformer alone)."""
  if pipeline_lib.is_model_folder(model_path):
    return pipeline_lib.manifest_model(model_path)
  return "wan2.1-t2v"


def defaults_for(model_path) -> dict:
  """The CLI defaults (size, frames, steps, guidance, fps, scheduler) of
  the model in `model_path`."""
  if model_family(model_path) == OPENSORA:
    # pylint: disable-next=import-outside-toplevel
    from astraea_jax import opensora_pipeline
    return dict(opensora_pipeline.DEFAULTS)
  return dict(WAN_DEFAULTS)


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


def steady_seconds(step_seconds, keys) -> float | None:
  """Sum of per-step times with each compiling step (the first of each
  key) replaced by the median of that key's later steps; None when some key
  ran only once (its time would include compilation)."""
  by_key = {}
  for t, k in zip(step_seconds, keys):
    by_key.setdefault(k, []).append(t)
  if any(len(times) < 2 for times in by_key.values()):
    return None
  return float(sum(np.median(times[1:]) * len(times)
                   for times in by_key.values()))


def is_video_path(out) -> bool:
  return pathlib.Path(out).suffix.lower() == ".mp4"


def output_paths(out, *, accelerated: bool, compare: bool,
                 save_latents: bool) -> dict[str, pathlib.Path]:
  """{what: path} that `generate` writes for `out` (see the module doc)."""
  out = pathlib.Path(out)
  if not is_video_path(out):
    return {"folder": out}
  paths = {"astraea" if accelerated else "full": out}
  if accelerated and compare:
    paths["full"] = out.with_name(f"{out.stem}.full.mp4")
  if save_latents:
    paths["latents"] = out.with_name(f"{out.stem}.latents.safetensors")
  return paths


def _load(model_path, *, vae_path, allow_pth, dtype, with_text: bool):
  """The pipeline of a whole-model folder, or of a transformer (+ VAE)."""
  if pipeline_lib.is_model_folder(model_path):
    if vae_path is not None:
      raise ValueError(f"--vae: {model_path} is a whole-model folder with "
                       "its own VAE")
    return pipeline_lib.WanPipeline.from_pretrained(
        model_path, dtype=dtype, load_text_encoder=with_text)
  if with_text:
    raise ValueError(
        f"--prompt needs a converted whole-model folder with the text "
        f"encoder (manifest.json), but {model_path} is not one; convert the "
        "full Wan2.1 download with `astraea convert SRC DST`, or pass "
        "--text-embeddings")
  model = checkpoint.load_model(model_path, dtype=dtype)
  vae = None
  if vae_path is not None:
    from converters import wan_vae  # pylint: disable=g-import-not-at-top
    vae = wan_vae.load_vae(vae_path, allow_pth=allow_pth)
  return pipeline_lib.WanPipeline(model, vae)


def generate(model_path, embeddings_path, out, *, config: GenerateConfig,
             vae_path=None, allow_pth=False, dtype=None, overwrite=False,
             prompt=None, negative_prompt=None, save_latents=False,
             fps: float = video_lib.WAN_FPS, sources=()):
  """Runs the pipeline; returns the report dict (see the module doc).

  Give `prompt` (str; needs a whole-model folder) or `embeddings_path`.
  The report's "outputs" lists the files written. sources: other (flag,
  path) pairs the caller read (e.g. the --schedule file), which the outputs
  must not overlap either.
  """
  if (prompt is None) == (embeddings_path is None):
    raise ValueError("give a prompt (--prompt) or text embeddings "
                     "(--text-embeddings), not both")
  accelerated = config.budget is not None or config.schedule is not None
  paths = output_paths(out, accelerated=accelerated, compare=config.compare,
                       save_latents=save_latents)
  check_outputs(paths, out, overwrite=overwrite, sources=[
      ("--model", model_path), ("--vae", vae_path),
      ("--text-embeddings", embeddings_path), *sources])
  if model_family(model_path) == OPENSORA:
    # pylint: disable-next=import-outside-toplevel
    from astraea_jax import opensora_pipeline
    return opensora_pipeline.generate(
        model_path, out, config=config, prompt=prompt,
        embeddings_path=embeddings_path, negative_prompt=negative_prompt,
        vae_path=vae_path, dtype=dtype, overwrite=overwrite,
        save_latents=save_latents, fps=fps)
  whole = pipeline_lib.is_model_folder(model_path)
  if is_video_path(out) and not whole and vae_path is None:
    raise ValueError(f"--out {out} needs a VAE to decode the video: a "
                     "whole-model folder, or --vae")
  transformer_dir = pathlib.Path(model_path) / ("transformer" if whole
                                                else "")
  pipeline_lib.latent_shape(                     # fail before loading weights
      config.height, config.width, config.frames,
      patch_size=checkpoint.load_config(transformer_dir).patch_size)
  pipe = _load(model_path, vae_path=vae_path, allow_pth=allow_pth,  # 1.
               dtype=dtype, with_text=prompt is not None)
  model = pipe.transformer
  if prompt is not None:                                             # 2.
    context, negative = pipe.encode_prompt(prompt, negative_prompt or "",
                                           progress=True)
    pipe.text_encoder = None  # free its memory before sampling
  else:
    context, negative = read_text_embeddings(embeddings_path,
                                             model.config.text_dim)
  shape = pipe.latent_shape(config.height, config.width, config.frames)  # 3.
  noise = dense_sampler.draw_noise(jax.random.key(config.seed), shape)
  graphdef, params = nnx.split(model)
  common = dict(scheduler=config.scheduler or WAN_DEFAULTS["scheduler"],
                steps=config.steps,
                guidance_scale=config.guidance_scale, shift=config.shift)
  dense_sample, astraea_sample = dense_sampler.sample, astraea_sampler.sample
  if config.devices is not None:
    from astraea_jax import parallel  # pylint: disable=g-import-not-at-top
    dense_sample, astraea_sample = parallel.samplers(config.devices,
                                                     batch=2 * shape[0])
  report = {"latent_shape": list(shape), "seed": config.seed, **{
      k: v for k, v in dataclasses.asdict(config).items()
      if k not in ("schedule",)}}
  results = {}
  if accelerated:                                                    # 4.
    t0 = time.perf_counter()
    latents, stats = astraea_sample(
        graphdef, params, noise, context, negative, budget=config.budget,
        schedule=config.schedule, return_stats=True, **common)
    report["astraea"] = {
        "seconds": time.perf_counter() - t0,
        "seconds_without_compiles": steady_seconds(stats.step_seconds,
                                                    stats.num_selected),
        "schedule": [float(b) for b in stats.budgets],
        "mean_budget": float(np.mean(stats.budgets)),
        "compiles": len(stats.compiled_k)}
    results["astraea"] = latents
  if not accelerated or config.compare:
    step_seconds = []
    t0 = time.perf_counter()
    results["full"] = dense_sample(graphdef, params, noise, context,
                                   negative, step_seconds=step_seconds,
                                   **common)
    report["full"] = {"seconds": time.perf_counter() - t0,
                      "seconds_without_compiles": steady_seconds(
                          step_seconds, [0] * len(step_seconds))}
  videos = {}
  if pipe.vae is not None:                                           # 5.
    videos = {k: pipe.decode(v, progress=True) for k, v in results.items()}
  if accelerated and config.compare:
    compare_report(report, results, videos)
  if prompt is not None:
    report["prompt"], report["negative_prompt"] = prompt, negative_prompt or ""
  report["outputs"] = [str(p) for p in paths.values()]
  write_outputs(out, paths, results, videos, report, overwrite=overwrite,
                fps=fps)
  return report


def check_outputs(paths, out, *, overwrite, sources):
  """`outputs.check_destination` for each of `output_paths`' files (or the
  folder), before anything is loaded."""
  for name, path in paths.items():
    outputs.check_destination(
        path, flag="--out" if path == pathlib.Path(out)
        else f"--out ({name} output)", overwrite=overwrite,
        sources=[(f, p) for f, p in sources if p is not None],
        kind="folder" if name == "folder" else "file")


def compare_report(report, results, videos):
  """Adds speedup and PSNR (and SSIM on videos) of Astraea vs the full
  model to `report` (which holds both runs' "seconds_without_compiles")."""
  full = report["full"]["seconds_without_compiles"]
  fast = report["astraea"]["seconds_without_compiles"]
  # Only from compiled steps: a token count that ran once has no warm time.
  report["speedup_without_compiles"] = (full / fast if full and fast
                                        else None)
  a, b = (videos or results)["astraea"], (videos or results)["full"]
  rng = 2.0 if videos else float(jnp.max(b) - jnp.min(b))
  report["compared_on"] = "video" if videos else "latents"
  report["psnr_db"] = float(metrics.psnr(a, b, data_range=rng))
  if videos:
    report["ssim"] = float(metrics.ssim(a, b, channel_axis=-3))


def write_outputs(out, paths, results, videos, report, *, overwrite, fps):
  """Writes `output_paths`' files (each atomically), or the output folder
  (atomically as a whole): latents, videos and report.json."""
  latents = {f"latents_{k}": np.asarray(v) for k, v in results.items()}
  if "folder" not in paths:
    for name, path in paths.items():
      if name == "latents":
        safetensors_io.save_file(latents, path,
                                 metadata=outputs.SAFETENSORS_METADATA)
      else:
        video_lib.write_mp4(path, videos[name], fps=fps)
    return
  with outputs.atomic_folder(out, overwrite=overwrite,
                             command="generate") as tmp:
    tensors = dict(latents)
    tensors.update({f"video_{k}": np.asarray(v) for k, v in videos.items()})
    safetensors_io.save_file(tensors, tmp / "outputs.safetensors",
                             metadata=outputs.SAFETENSORS_METADATA)
    for k, v in videos.items():
      video_lib.write_mp4(tmp / f"video_{k}.mp4", v, fps=fps)
    (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def load_schedule(path, steps):
  return tuple(schedule_lib.load_for_steps(path, steps))
