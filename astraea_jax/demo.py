"""`astraea demo`: the embedded demo model, full vs Astraea, on a CPU.

Loads the demo model that ships in the package (astraea_jax/demo_model:
a small Wan-architecture DiT trained by the project on procedurally
rendered clips of coloured shapes), generates a video for a prompt with the
full model and with Astraea from the SAME noise, and writes into --out:

  demo_full.mp4, demo_astraea.mp4   the two videos (frames upscaled 4x,
                                    nearest neighbour, for viewing)
  demo_compare.png                  a strip of frames: top row full model,
                                    bottom row Astraea
  report.json                       settings, budgets, timings, quality

and prints the speed ratio and PSNR / SSIM (and LPIPS when AlexNet weights
are found) of Astraea against the full model.

Speed: the ratio of the two samplers' steady-state (compiled) times,
measured in this process: each step is waited for and timed; the first step
of each compiled shape (the full model's step, and Astraea's step for each
distinct token count) includes compilation, so a step's time is the median
of the other steps with the same token count (`demo_model.compare`;
`--timing-runs N` times N further whole runs instead).
"""

from __future__ import annotations

import math
import pathlib
import struct
import sys
import zlib

import numpy as np

from astraea_jax import outputs

UPSCALE = 4  # nearest-neighbour upscaling of the 48 x 48 frames for viewing
FPS = 8  # 16 frames -> a 2 s clip
STRIP_FRAMES = 8  # frames shown in the PNG strip (evenly spaced)


def schedules_folder(weights=None):
  """Where the searched schedules of a demo weights folder are: the
  package's demo_model/schedules/ for the packaged weights, else
  WEIGHTS/schedules/."""
  # pylint: disable=import-outside-toplevel
  from astraea_jax.astraea import schedule as schedule_lib
  from astraea_jax.demo_model import model as demo_model
  if weights is None or pathlib.Path(weights).resolve() == (
      demo_model.WEIGHTS_DIR.resolve()):
    return demo_model.SCHEDULES_DIR
  return pathlib.Path(weights) / schedule_lib.SCHEDULES_DIR


def main(*, prompt: str | None = None, budget: float | None = 0.5,
         schedule: str | None = None, default_schedule: bool = False,
         steps: int | None = None,
         seed: int = 0, guidance: float | None = None,
         out: str = "astraea-demo", weights: str | None = None,
         timing_runs: int = 0, progress: bool = True) -> int:
  # pylint: disable=import-outside-toplevel
  import jax

  from astraea_jax import lpips, metrics, video
  from astraea_jax.astraea import schedule as schedule_lib
  from astraea_jax.demo_model import model as demo_model

  model = demo_model.load(weights)
  config, training = demo_model.load_config(weights)
  prompt = demo_model.DEFAULT_PROMPT if prompt is None else prompt
  demo_model.encode(model, [prompt])  # checks the words before any work
  steps = config.steps if steps is None else steps
  searched = None
  if schedule is not None:
    budgets = schedule_lib.load_for_steps(schedule, steps)
    source, schedule_note = f"--schedule {schedule}", None
  else:
    # The searched schedule of this budget (shipped with the packaged
    # weights; WEIGHTS/schedules/ for others), where one fits.
    searched, schedule_note = common_searched(budget, steps, weights,
                                              default_schedule)
    source = ("searched" if searched is not None else
              "default (full warm-up steps, then even)")
    budgets = searched
    if searched is None:
      budgets, warning = schedule_lib.for_mean_budget(budget, steps)
      if warning:
        print(f"warning: --budget {budget:g} with {steps} steps: {warning}",
              file=sys.stderr)
  budget = None
  print(f"astraea demo: {prompt!r}, {steps} steps, seed {seed}, "
        f"{config.frames} frames of {config.width}x{config.height} "
        f"({config.num_tokens} tokens)")
  if schedule_note:
    print(schedule_note)
  run = demo_model.compare(model, prompt, seed=seed, steps=steps,
                           guidance=guidance, budget=budget,
                           schedule=budgets, progress=progress,
                           timing_runs=timing_runs)
  stats = run["stats"]
  full = np.clip(np.asarray(run["full"], np.float32), -1, 1)
  fast = np.clip(np.asarray(run["astraea"], np.float32), -1, 1)
  quality = {"psnr_db": float(metrics.psnr(fast, full)),
             "ssim": float(metrics.ssim(fast, full, channel_axis=-3))}
  frames_full = demo_model.to_uint8(full)[0]  # (F, H, W, 3)
  frames_fast = demo_model.to_uint8(fast)[0]
  found = lpips.find_lpips_weights()
  if found is None:
    quality["lpips"] = None
    lpips_note = ("LPIPS: no AlexNet weights found (set "
                  "ASTRAEA_LPIPS_BACKBONE to torchvision's "
                  "alexnet-owt-7be5be79.pth, or place it in "
                  "~/.cache/torch/hub/checkpoints/)")
  else:
    lp_weights = lpips.load_lpips_weights(*found, allow_pth=True)
    # (1, 3, F, H, W) -> (F, 3, H, W) frames.
    quality["lpips"] = float(lpips.lpips(
        np.moveaxis(fast[0], 0, 1), np.moveaxis(full[0], 0, 1), lp_weights))
    lpips_note = f"LPIPS {quality['lpips']:.4f}"
  speedup = run["seconds_full"] / run["seconds_astraea"]
  report = {
      "model": "astraea demo model (astraea_jax/demo_model/MODEL_CARD.md)",
      "weights": str(weights or demo_model.WEIGHTS_DIR),
      "training": training_summary(training),
      "prompt": prompt, "seed": seed, "steps": steps,
      "guidance": config.guidance if guidance is None else guidance,
      "shift": config.shift,
      "video": [config.frames, config.height, config.width],
      "tokens": stats.num_tokens,
      "budget_schedule": [float(b) for b in stats.budgets],
      "schedule_source": source,
      "schedule_note": schedule_note,
      "mean_budget": float(np.mean(stats.budgets)),
      "tokens_per_step": stats.num_selected,
      "compiled_token_counts": stats.compiled_k,
      "seconds_full": run["seconds_full"],
      "seconds_astraea": run["seconds_astraea"],
      "seconds_full_first_run_incl_compile": run["seconds_full_first"],
      "seconds_astraea_first_run_incl_compile": run["seconds_astraea_first"],
      "speedup": speedup,
      "timing": f"{run['timing']}; on {jax.devices()[0].device_kind}",
      **quality,
      "files": ["demo_full.mp4", "demo_astraea.mp4", "demo_compare.png"],
      "png_rows": ["full model", "astraea"],
  }
  out = pathlib.Path(out)
  # The folder appears whole at the end; an earlier demo output there is
  # replaced (the CLI refused anything else before the model loaded).
  with outputs.atomic_folder(out, overwrite=True, command="demo") as tmp:
    video.write_mp4(tmp / "demo_full.mp4", upscale(frames_full), fps=FPS)
    video.write_mp4(tmp / "demo_astraea.mp4", upscale(frames_fast), fps=FPS)
    write_png(tmp / "demo_compare.png", comparison_strip(frames_full,
                                                         frames_fast))
    outputs.write_json(tmp / "report.json", report)
  speed = (f"speed ratio {speedup:.2f}x ({run['seconds_full']:.2f} s full, "
           f"{run['seconds_astraea']:.2f} s Astraea, compiled, on this "
           "machine)")
  print(f"Astraea at mean budget {report['mean_budget']:.2f} vs the full "
        f"model: {speed}; PSNR {quality['psnr_db']:.2f} dB, SSIM "
        f"{quality['ssim']:.4f}; {lpips_note}")
  print(f"wrote {out}/demo_full.mp4, demo_astraea.mp4, demo_compare.png "
        "(top: full, bottom: Astraea), report.json")
  return 0 if all(math.isfinite(quality[k]) for k in ("psnr_db", "ssim")) \
      else 1


def common_searched(budget, steps, weights, default_schedule):
  """(budgets or None, the line to print) for the demo's --budget: the
  searched schedule of that budget for these weights, where one fits."""
  # pylint: disable=import-outside-toplevel
  from astraea_jax.astraea import schedule as schedule_lib
  from astraea_jax.demo_model import model as demo_model
  if default_schedule:
    return None, ("schedule: the default (full warm-up steps, then even), "
                  "as --default-schedule asks")
  folder = schedules_folder(weights)
  try:
    found, note = schedule_lib.find_searched(
        folder, budget, steps, model=demo_model.model_id(weights))
  except ValueError as e:
    raise ValueError(f"--budget {budget:g}: {e} (or pass "
                     "--default-schedule)") from None
  if found is None:
    return None, (f"schedule: the default (full warm-up steps, then even): "
                  f"{note}")
  return found, (f"schedule: the {note} (--default-schedule uses the "
                 "default one)")


def training_summary(training: dict) -> dict:
  """The weights' training record as report.json states it: the steps of
  every run (the model card's total), the last run's loss and device."""
  runs = training.get("runs") or [{"steps": training.get("steps")}]
  steps = [r.get("steps") for r in runs]
  return {"steps": (sum(steps) if all(isinstance(n, int) for n in steps)
                    else training.get("steps")),
          "steps_per_run": steps,
          "final_loss": training.get("final_loss"),
          "device": training.get("device")}


# Images ---------------------------------------------------------------------


def upscale(frames: np.ndarray, factor: int = UPSCALE) -> np.ndarray:
  """(..., H, W, C) -> (..., H * factor, W * factor, C), nearest."""
  return np.repeat(np.repeat(frames, factor, axis=-3), factor, axis=-2)


def comparison_strip(frames_top: np.ndarray, frames_bottom: np.ndarray, *,
                     count: int = STRIP_FRAMES, factor: int = UPSCALE,
                     gap: int = 4) -> np.ndarray:
  """(H', W', 3) uint8: `count` evenly spaced frames of two videos
  (T, H, W, 3) side by side, top row and bottom row, white gaps."""
  t = frames_top.shape[0]
  index = np.linspace(0, t - 1, min(count, t)).round().astype(int)

  def row(frames):
    tiles = [upscale(frames[i], factor) for i in index]
    h = tiles[0].shape[0]
    sep = np.full((h, gap, 3), 255, np.uint8)
    return np.concatenate(
        [x for tile in tiles for x in (tile, sep)][:-1], axis=1)

  top, bottom = row(frames_top), row(frames_bottom)
  sep = np.full((gap, top.shape[1], 3), 255, np.uint8)
  return np.concatenate([top, sep, bottom], axis=0)


def png_bytes(rgb: np.ndarray) -> bytes:
  """An 8-bit RGB PNG (no filtering, zlib level 9) of (H, W, 3) uint8."""
  rgb = np.ascontiguousarray(rgb, np.uint8)
  if rgb.ndim != 3 or rgb.shape[2] != 3:
    raise ValueError(f"PNG image must be (H, W, 3) uint8; got {rgb.shape}")
  h, w, _ = rgb.shape
  raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

  def chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

  header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
          + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def write_png(path, rgb: np.ndarray) -> pathlib.Path:
  return outputs.write_bytes(path, png_bytes(rgb))
