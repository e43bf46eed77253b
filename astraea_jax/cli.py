"""The `astraea` command: demo, train-demo, generate, convert, search, eval.

Benchmarks are the scripts in benchmarks/ (results in benchmarks/results/).

  astraea convert SRC DST [--format auto|wan|diffusers|opensora|umt5]
      [--allow-pth] [--dtype float32|bfloat16]
  astraea generate --model DST --prompt "..." --out video.mp4
  astraea demo
  astraea eval --model demo --policies default --out eval/

Every value is checked when the command line is read, before any model
loads, and a mistake is named by its flag with the allowed range. Every
output is checked by `outputs.check_destination` before anything is read:
nothing a command reads, and nothing astraea did not write, is ever
replaced. A user mistake ends in one line on stderr and exit code 1 (2 for
an unreadable command line); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import tempfile
import threading
import time

from astraea_jax import compile_cache, outputs

# Values ----------------------------------------------------------------------

SEED_MAX = 2**32 - 1


def _number(kind, low=None, high=None, *, low_open=False, high_open=False):
  """An argparse `type` for a finite int/float in a range; the message
  says the range (argparse adds the flag's name)."""
  lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
  hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
  if low is not None and high is not None:
    span = f"in {lo}, {hi}"
  elif low is not None:
    span = f"{'>' if low_open else '>='} {low:g}"
  else:
    span = f"{'<' if high_open else '<='} {high:g}"
  noun = "a whole number" if kind is int else "a number"

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"{text!r} is not {noun} ({span})") from None
    if isinstance(value, float) and not math.isfinite(value):
      raise argparse.ArgumentTypeError(f"{text!r} must be finite ({span})")
    bad = ((low is not None and (value < low or low_open and value == low))
           or (high is not None
               and (value > high or high_open and value == high)))
    if bad:
      raise argparse.ArgumentTypeError(f"{text} is out of range: must be "
                                       f"{span}")
    return value

  parse.__name__ = kind.__name__  # argparse names the type in its messages
  return parse


BUDGET = _number(float, 0, 1, low_open=True)
SEED = _number(int, 0, SEED_MAX)
POSITIVE_INT = _number(int, 1)
NONNEGATIVE_INT = _number(int, 0)
POSITIVE = _number(float, 0, low_open=True)
NONNEGATIVE = _number(float, 0)
FRACTION = _number(float, 0, 1, high_open=True)


class UsageError(ValueError):
  """A combination of options that cannot work (names the flags)."""


def _sources(*pairs):
  """(flag, path) pairs of what a command reads (None: not given)."""
  return [(flag, path) for flag, path in pairs if path is not None]


# convert ---------------------------------------------------------------------


def _convert(args) -> int:
  import converters
  from astraea_jax import checkpoint
  from converters import model_folder
  local = pathlib.Path(args.src).exists()
  outputs.check_destination(args.dst, flag="DST",
                            sources=_sources(("SRC", args.src if local
                                              else None)),
                            overwrite=args.overwrite)
  t0 = time.perf_counter()
  src = model_folder.resolve_source(args.src, revision=args.revision,
                                    allow_pth=args.allow_pth)
  if not local:  # a hub download: the snapshot is the source
    outputs.check_destination(args.dst, flag="DST", sources=[("SRC", src)],
                              overwrite=args.overwrite)
  whole = (model_folder.find_model_folder(src) if args.format == "auto"
           else None)
  if whole is not None:
    manifest = model_folder.convert(
        whole, args.dst, dtype=args.dtype, text_len=args.text_len,
        allow_pth=args.allow_pth, overwrite=args.overwrite,
        progress=not args.quiet, source_name=str(args.src))
    print(f"converted the {manifest['model']} model {args.src} "
          f"({whole.layout} layout: {', '.join(manifest['components'])}) -> "
          f"{args.dst} in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0
  config, params, layout = converters.read_checkpoint(
      src, format=args.format, dtype=args.dtype, text_len=args.text_len,
      progress=not args.quiet)
  checkpoint.save(args.dst, config, params, overwrite=args.overwrite,
                  metadata={"source": str(args.src), "layout": layout})
  print(f"converted {args.src} ({layout} layout) -> {args.dst} "
        f"({type(config).__name__}, {config.param_dtype}) in "
        f"{time.perf_counter() - t0:.1f} s")
  return 0


def _add_convert(sub, common):
  p = sub.add_parser(
      "convert", parents=[common],
      help="convert a checkpoint folder: a whole Wan2.1 T2V model "
      "(original or diffusers layout), a whole OpenSora v1.2 model "
      "(OpenSora-STDiT-v3/, OpenSora-VAE-v1.2/, t5-v1_1-xxl/) or one model "
      "(Wan2.1 transformer, OpenSora v1.2 STDiT3, umT5)",
      description="Converts a downloaded checkpoint into DST (atomically). "
      "SRC is only read; DST must lie outside it. --overwrite replaces only "
      "an earlier astraea-jax output, never a folder of yours.")
  p.add_argument("src", help="checkpoint folder as published, or a Hugging "
                 "Face repo id (org/name) to download")
  p.add_argument("dst", help="output folder: manifest.json + one converted "
                 "folder per component for a whole model, else config.json "
                 "+ orbax params/")
  p.add_argument("--format", choices=["auto", "wan", "diffusers", "opensora",
                                      "umt5"], default="auto",
                 help="auto: a whole Wan2.1 model when SRC has one, else the "
                      "single model found; the others convert that one part")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                 help="parameter dtype of the converted weights (a whole "
                      "model's VAE stays float32)")
  p.add_argument("--allow-pth", action="store_true",
                 help="read the original release's PyTorch pickles "
                      "(Wan2.1_VAE.pth, models_t5_*.pth) with "
                      "torch.load(weights_only=True)")
  p.add_argument("--revision", default=None,
                 help="branch, tag or commit of a hub repo id")
  p.add_argument("--text-len", type=POSITIVE_INT, default=None,
                 help="text tokens the model pads context to (default: the "
                      "checkpoint's text_len, or 512 for diffusers)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace DST if it is an earlier astraea-jax output")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(run=_convert)


# generate --------------------------------------------------------------------


def _video_size(args, default=(480, 832)) -> tuple[int, int]:
  """(height, width) from --size WxH or --height/--width (default: the
  model's 480p size)."""
  if args.size is None:
    return args.height or default[0], args.width or default[1]
  if args.height is not None or args.width is not None:
    raise UsageError("give --size WIDTHxHEIGHT or --height/--width, not both")
  parts = args.size.lower().replace("*", "x").split("x")
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    raise UsageError(f"--size {args.size!r} must be WIDTHxHEIGHT, e.g. "
                     "832x480 (480p) or 1280x720")
  width, height = (int(p) for p in parts)
  if not width or not height:
    raise UsageError(f"--size {args.size!r}: width and height must be > 0")
  return height, width


def _check_model(path, flag="--model"):
  """Fails (one line) unless `path` is a converted checkpoint: a whole-model
  folder (manifest.json) or a single converted model."""
  from astraea_jax import checkpoint, pipeline
  if pipeline.is_model_folder(path):
    pipeline.read_manifest(path)
    return
  try:
    checkpoint.load_config(path)
  except checkpoint.CheckpointReadError as e:
    raise type(e)(f"{flag}: {e}") from None


def _note_empty_prompt(prompt):
  if prompt is not None and not prompt.strip():
    print("note: --prompt is empty: the model samples unconditionally "
          "(the text condition is the empty caption)", file=sys.stderr)


def _budget_schedule(args, steps):
  """The per-step budgets of --budget / --schedule (None: dense), with a
  warning where the request is degenerate."""
  from astraea_jax.astraea import schedule as schedule_lib
  if args.schedule is not None:
    return tuple(schedule_lib.load_for_steps(args.schedule, steps,
                                             flag="--schedule"))
  if args.budget is None:
    return None
  budgets, warning = schedule_lib.for_mean_budget(args.budget, steps)
  if warning:
    print(f"warning: --budget {args.budget:g} with --steps {steps}: "
          f"{warning}", file=sys.stderr)
  return tuple(float(b) for b in budgets)


def _generate(args) -> int:
  from astraea_jax import generate
  if args.model is not None and args.model_option is not None:
    raise UsageError("give the model once: positionally or with --model")
  model = args.model if args.model is not None else args.model_option
  if model is None:
    raise UsageError("no model: pass --model DST (a converted folder)")
  if args.negative_prompt is not None and args.prompt is None:
    raise UsageError("--negative-prompt needs --prompt")
  _check_model(model)
  accelerated = args.budget is not None or args.schedule is not None
  if args.compare and not accelerated:
    raise UsageError("--compare compares Astraea with the full model: give "
                     "--budget or --schedule too")
  # Unset options take the model's defaults (Wan2.1 or OpenSora v1.2).
  defaults = generate.defaults_for(model)
  pick = lambda name: (getattr(args, name) if getattr(args, name) is not None
                       else defaults[name])
  height, width = _video_size(args, (defaults["height"], defaults["width"]))
  steps = pick("steps")
  _note_empty_prompt(args.prompt)
  schedule = _budget_schedule(args, steps)
  config = generate.GenerateConfig(
      height=height, width=width, frames=pick("frames"),
      steps=steps, guidance_scale=pick("guidance"), shift=args.shift,
      scheduler=pick("scheduler"), seed=args.seed, budget=None,
      schedule=schedule, compare=args.compare, devices=args.devices)
  report = generate.generate(model, args.text_embeddings, args.out,
                             config=config, vae_path=args.vae,
                             allow_pth=args.allow_pth, dtype=args.dtype,
                             overwrite=args.overwrite, prompt=args.prompt,
                             negative_prompt=args.negative_prompt,
                             save_latents=args.save_latents,
                             fps=pick("fps"),
                             sources=_sources(("--schedule", args.schedule)))
  for name in ("full", "astraea"):
    if name in report:
      r = report[name]
      steady = r["seconds_without_compiles"]
      print(f"{name}: {r['seconds']:.1f} s"
            + (f" ({steady:.1f} s without compilation)" if steady is not None
               else " (compilation included)"))
  if "psnr_db" in report:
    extra = (f", SSIM {report['ssim']:.4f}" if "ssim" in report else "")
    speed = (f"speedup {report['speedup_without_compiles']:.2f}x (compiled "
             "steps)" if report.get("speedup_without_compiles")
             else "speedup not measured (a token count ran only once, so "
             "its time includes compilation; use more --steps)")
    print(f"{speed}; PSNR vs full ({report['compared_on']}) "
          f"{report['psnr_db']:.2f} dB{extra}")
  if generate.is_video_path(args.out):
    print(f"wrote {', '.join(report['outputs'])}")
  else:
    videos = sorted(p.name for p in pathlib.Path(args.out).glob("*.mp4"))
    print(f"wrote {args.out}/outputs.safetensors, {args.out}/report.json"
          + "".join(f", {args.out}/{v}" for v in videos))
  return 0


def _add_budget_options(p, help_budget):
  group = p.add_mutually_exclusive_group()
  group.add_argument("--budget", type=BUDGET, default=None, help=help_budget)
  group.add_argument("--schedule", default=None, metavar="FILE",
                     help="schedule.json (astraea search) with one budget "
                          "per step")
  return group


def _add_generate(sub, common):
  p = sub.add_parser(
      "generate", parents=[common], help="text to video with a converted "
      "Wan2.1 or OpenSora v1.2 model",
      description="Sample a converted Wan2.1 model: from a prompt (a "
      "whole-model folder) or from text embeddings (a whole-model folder, or "
      "a converted transformer alone); or a converted OpenSora v1.2 folder "
      "from a prompt. --out NAME.mp4 writes the video; any "
      "other --out is a folder with latents, videos and report.json.")
  p.add_argument("model", nargs="?", default=None,
                 help="converted folder (astraea convert); or use --model")
  p.add_argument("--model", dest="model_option", default=None,
                 help="converted folder (astraea convert)")
  text = p.add_mutually_exclusive_group(required=True)
  text.add_argument("--prompt", default=None,
                    help="the text prompt (needs a whole-model folder); an "
                         "empty one samples unconditionally")
  text.add_argument("--text-embeddings", default=None,
                    help="safetensors with `context` (L, text_dim) and "
                         "optional `negative_context`")
  p.add_argument("--negative-prompt", default=None,
                 help="what to steer away from (default: empty)")
  p.add_argument("--out", required=True,
                 help="NAME.mp4 (the video), or an output folder")
  p.add_argument("--size", default=None,
                 help="WIDTHxHEIGHT, e.g. 832x480 (Wan2.1 default), 848x480 "
                      "(OpenSora default) or 1280x720; multiples of 16")
  p.add_argument("--height", type=POSITIVE_INT, default=None)
  p.add_argument("--width", type=POSITIVE_INT, default=None)
  p.add_argument("--frames", type=POSITIVE_INT, default=None,
                 help="Wan2.1: 1 + 4k (default 81); OpenSora: 1 or >= 17 "
                      "(default 51)")
  p.add_argument("--fps", type=POSITIVE, default=None,
                 help="frame rate of the MP4 (Wan2.1: 16; OpenSora: 24, also "
                      "its fps condition)")
  p.add_argument("--save-latents", action="store_true",
                 help="with --out NAME.mp4, also write "
                      "NAME.latents.safetensors (folders always hold them)")
  p.add_argument("--steps", type=POSITIVE_INT, default=None,
                 help="sampling steps (Wan2.1: 50; OpenSora: 30)")
  p.add_argument("--guidance", type=NONNEGATIVE, default=None,
                 help="CFG scale >= 0 (Wan2.1: 5.0; OpenSora: 7.0)")
  p.add_argument("--shift", type=POSITIVE, default=None,
                 help="flow shift (default: 3.0 up to 480p, else 5.0)")
  p.add_argument("--scheduler", choices=["unipc", "euler"], default=None,
                 help="Wan2.1: unipc (default) or euler; OpenSora: its "
                      "rectified-flow Euler only")
  p.add_argument("--seed", type=SEED, default=0)
  _add_budget_options(p, "Astraea mean token budget in (0, 1]")
  p.add_argument("--compare", action="store_true",
                 help="also run the full model; print speedup and PSNR/SSIM")
  p.add_argument("--vae", default=None,
                 help="Wan VAE (.safetensors, diffusers vae/ folder, or .pth "
                      "with --allow-pth) to decode the video")
  p.add_argument("--allow-pth", action="store_true",
                 help="allow reading a PyTorch pickle (.pth) VAE")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                 help="compute dtype (default: the checkpoint's)")
  p.add_argument("--devices", type=POSITIVE_INT, default=None,
                 help="sample on N devices: the CFG branches over a data "
                      "axis, each video's tokens over the rest (sequence "
                      "parallel); default: one device")
  p.add_argument("--overwrite", action="store_true",
                 help="replace outputs of an earlier astraea run")
  p.set_defaults(run=_generate)


# demo ------------------------------------------------------------------------


def _demo(args) -> int:
  from astraea_jax import demo
  from astraea_jax.demo_model import model as demo_model
  weights = args.weights
  outputs.check_destination(
      args.out, flag="--out", overwrite=True, overwrite_flag=None,
      sources=_sources(("--weights", weights or demo_model.WEIGHTS_DIR),
                       ("--schedule", args.schedule)))
  _note_empty_prompt(args.prompt)
  return demo.main(prompt=args.prompt, budget=args.budget,
                   schedule=args.schedule, steps=args.steps, seed=args.seed,
                   guidance=args.guidance, out=args.out,
                   weights=weights, timing_runs=args.timing_runs,
                   progress=not args.quiet)


def _add_demo(sub, common):
  p = sub.add_parser(
      "demo", parents=[common],
      help="the embedded demo model: full vs Astraea on this machine",
      description="Generates a clip with the demo model that ships in the "
      "package (a small Wan DiT trained on coloured shapes; see "
      "astraea_jax/demo_model/MODEL_CARD.md), with the full model and with "
      "Astraea from the same noise. Writes OUT/demo_full.mp4, "
      "demo_astraea.mp4, demo_compare.png (top row full, bottom Astraea) "
      "and report.json; prints the speed ratio (compiled runs, this "
      "machine) and PSNR/SSIM/LPIPS of Astraea against the full model. "
      "Prompts: 'a COLOUR SHAPE moving DIRECTION [and a COLOUR SHAPE "
      "moving DIRECTION] on a BACKGROUND background' with colours red, "
      "green, blue, yellow, purple, white; shapes circle, square, "
      "triangle; directions left, right, up, down; backgrounds black, "
      "gray, striped, checkered.")
  p.add_argument("--prompt", default=None,
                 help="default: 'a red circle moving right on a striped "
                      "background'")
  _add_budget_options(p, "Astraea mean token budget in (0, 1] (default 0.5)")
  p.set_defaults(budget=0.5)
  p.add_argument("--steps", type=POSITIVE_INT, default=None,
                 help="sampling steps (default: the model's, 20)")
  p.add_argument("--guidance", type=NONNEGATIVE, default=None,
                 help="classifier-free guidance scale >= 0 (default: the "
                      "model's)")
  p.add_argument("--seed", type=SEED, default=0, help="noise seed")
  p.add_argument("--out", default="astraea-demo",
                 help="output folder, written whole at the end; an earlier "
                      "demo output there is replaced, any other existing "
                      "file or folder is refused")
  p.add_argument("--weights", default=None, metavar="DIR",
                 help="demo weights folder (default: the packaged one)")
  p.add_argument("--timing-runs", type=NONNEGATIVE_INT, default=0,
                 help="0: steady-state times from the per-step times of the "
                      "first runs (compiling steps excluded); N: the median "
                      "of N further whole runs of each sampler")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.set_defaults(run=_demo)


# train-demo ------------------------------------------------------------------


def _train_demo(args) -> int:
  from astraea_jax.demo_model import model as demo_model
  from astraea_jax.demo_model import train
  sources = _sources(("--init-from", args.init_from))
  workdir = pathlib.Path(args.workdir)
  if not args.export_only:
    # The workdir is this command's own output (resumable): refuse a file
    # or a folder of the user's; train() itself refuses an earlier run
    # without --resume.
    outputs.check_destination(workdir, flag="--workdir", sources=sources,
                              overwrite=True, overwrite_flag=None)
  export_to = args.export_to
  if args.export:
    if export_to is not None:
      raise UsageError("give --export or --export-to DIR, not both")
    export_to = demo_model.WEIGHTS_DIR
  if export_to is not None:
    # An earlier export (the packaged weights included) is replaced; a
    # folder of the user's is not, nor the workdir it exports from.
    outputs.check_destination(
        export_to, flag="--export-to", overwrite=True, overwrite_flag=None,
        sources=[*sources, ("--workdir", workdir)])
  return train.run_cli(args)


def _add_train_demo(sub, common):
  p = sub.add_parser(
      "train-demo", parents=[common],
      help="train (and export) the embedded demo model",
      description="Flow-matching training of the demo model (a small Wan "
      "DiT + caption encoder) on procedurally rendered clips, drawn on the "
      "device each step. Stops after --minutes of wall time (compilation "
      "included) or at --steps, checkpointing (orbax) every "
      "--checkpoint-minutes and at the end; writes WORKDIR/loss.json, "
      "loss.png and summary.json. Example (one H200, ~8 min): astraea "
      "train-demo --workdir work --minutes 7.5 --export-to weights")
  p.add_argument("--workdir", required=True,
                 help="run folder: checkpoints/, run.json, loss.json")
  p.add_argument("--minutes", type=POSITIVE, default=None,
                 help="wall-time limit of this invocation, compile included")
  p.add_argument("--steps", type=POSITIVE_INT, default=None,
                 help="stop at this global step")
  p.add_argument("--resume", action="store_true",
                 help="continue the run in WORKDIR from its last checkpoint "
                      "(same settings required)")
  p.add_argument("--small", action="store_true",
                 help="tiny model and clips (4 x 16 x 16) for CPU tests")
  p.add_argument("--batch", type=POSITIVE_INT, default=128)
  p.add_argument("--lr", type=POSITIVE, default=1e-3,
                 help="peak learning rate")
  p.add_argument("--warmup", type=NONNEGATIVE_INT, default=500,
                 help="linear warm-up steps")
  p.add_argument("--lr-schedule", choices=["constant", "cosine"],
                 default="constant",
                 help="after warm-up: constant, or cosine to 10%% over "
                      "--steps")
  p.add_argument("--weight-decay", type=NONNEGATIVE, default=0.01)
  p.add_argument("--ema-decay", type=FRACTION, default=0.999,
                 help="in [0, 1)")
  p.add_argument("--seed", type=SEED, default=0)
  p.add_argument("--sigma-shift", type=POSITIVE, default=None,
                 help="flow shift of the training noise levels (default: "
                      "the model's sampling shift)")
  p.add_argument("--init-from", default=None, metavar="DIR",
                 help="start from these exported weights (fine-tuning)")
  p.add_argument("--attention", choices=["auto", "xla", "cudnn"],
                 default="auto",
                 help="training attention: auto = cuDNN on a GPU if it "
                      "compiles, else XLA")
  p.add_argument("--checkpoint-minutes", type=POSITIVE, default=2.0)
  p.add_argument("--log-every", type=POSITIVE_INT, default=25,
                 help="steps per loss.json entry (mean loss over them)")
  p.add_argument("--export-to", default=None, metavar="DIR",
                 help="after training, write the EMA weights to DIR "
                      "(demo.safetensors + config.json; an earlier export "
                      "there is replaced, a folder of yours is refused)")
  p.add_argument("--export", action="store_true",
                 help="--export-to the package's demo_model/weights/")
  p.add_argument("--export-only", action="store_true",
                 help="no training: export WORKDIR's latest checkpoint")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(run=_train_demo)


# search ----------------------------------------------------------------------


def _read_prompts(path, flag="--prompts") -> list[str]:
  try:
    with open(path, encoding="utf-8") as f:
      lines = [line.strip() for line in f if line.strip()]
  except UnicodeDecodeError as e:
    raise UsageError(f"{flag} {path}: not a UTF-8 text file ({e.reason})") \
        from None
  if not lines:
    raise UsageError(f"{flag} {path}: no prompts (the file is empty)")
  return lines


def _encode_prompt_files(model, prompts, folder) -> list[str]:
  """Encodes prompts with a whole-model folder's umT5 into one safetensors
  file each (`context`, `negative_context` of the empty negative prompt,
  as `astraea generate --prompt` conditions)."""
  import numpy as np
  from astraea_jax import pipeline
  from converters.safetensors_io import save_file
  pipe = pipeline.WanPipeline.text_only(model)
  paths = []
  for i, prompt in enumerate(prompts):
    context, negative = pipe.encode_prompt(prompt, "")
    path = pathlib.Path(folder) / f"prompt_{i:03d}.safetensors"
    save_file({"context": np.asarray(context[0]),
               "negative_context": np.asarray(negative[0])}, path)
    paths.append(str(path))
  return paths


def _search(args) -> int:
  from astraea_jax import pipeline
  from astraea_jax.astraea import search
  _check_model(args.model)
  outputs.check_destination(
      args.out, flag="--out", overwrite=args.resume,
      overwrite_flag="--resume to continue the search in it, or choose "
      "another --out",
      sources=_sources(("--model", args.model), ("--prompts", args.prompts),
                       *(("--text-embeddings", p)
                         for p in args.text_embeddings or ())))
  whole = pipeline.is_model_folder(args.model)
  prompts = _read_prompts(args.prompts) if args.prompts else None
  if prompts and not whole:
    raise UsageError(
        f"--prompts needs a converted whole-model folder (with its umT5 text "
        f"encoder), but --model {args.model} is a converted transformer "
        "alone: convert the full Wan2.1 download, or pass --text-embeddings")
  if not prompts and not args.text_embeddings:
    raise UsageError("no prompts: pass --prompts FILE (whole-model folder) "
                     "or --text-embeddings FILE ...")
  if args.proxy_check < 3:
    raise UsageError(f"--proxy-check {args.proxy_check}: a rank "
                     "correlation needs at least 3 genomes")
  config = search.SearchConfig(
      target_budget=args.target_budget, steps=args.steps,
      population=args.population, children=args.children,
      generations=args.generations, seed=args.seed)
  problem = search.Problem(height=args.height, width=args.width,
                           frames=args.frames, samples=args.samples,
                           seed=args.seed)
  proxy = None
  if any(v is not None for v in (args.proxy_height, args.proxy_width,
                                 args.proxy_frames, args.proxy_samples)):
    proxy = search.Problem(
        height=args.proxy_height or args.height,
        width=args.proxy_width or args.width,
        frames=args.proxy_frames or args.frames,
        samples=args.proxy_samples or args.samples, seed=args.seed)
  eval_config = search.EvalConfig(
      scheduler=args.scheduler, guidance_scale=args.guidance,
      shift=args.shift, evaluator=args.evaluator,
      batch_nodes=args.batch_nodes, lanes=args.lanes,
      memo_nodes=args.memo_nodes, samples_per_pass=args.samples_per_pass)
  model = (pathlib.Path(args.model) / "transformer" if whole
           else args.model)
  with tempfile.TemporaryDirectory(prefix="astraea-prompts-") as tmp:
    embeddings = (_encode_prompt_files(args.model, prompts, tmp) if prompts
                  else args.text_embeddings)
    report = search.run_files(
        model, embeddings, args.out, config=config,
        problem=problem, eval_config=eval_config, proxy=proxy,
        proxy_check=args.proxy_check,
        min_rank_correlation=args.min_rank_correlation, dtype=args.dtype,
        resume=args.resume, progress=not args.quiet)
  steps = report["row_steps"]
  print(f"schedule (mean budget {report['mean_budget']:.3f}, fitness "
        f"{report['fitness']:.4g}): {report['schedule']}")
  print(f"computed {steps.get('row_steps', 0)} row-steps in this run; "
        f"{report['naive_row_steps']} without sharing or caching")
  print(f"wrote {args.out}/schedule.json (astraea generate --schedule), "
        "report.json, search_state.json")
  return 0


def _add_search(sub, common):
  p = sub.add_parser(
      "search", parents=[common],
      help="search the per-step token budget schedule",
      description="Evolutionary search of one token budget per denoising "
      "step (Astraea sec. 3.3) for a target mean budget; writes "
      "OUT/schedule.json for `astraea generate --schedule`.")
  p.add_argument("--model", required=True,
                 help="converted checkpoint folder (astraea convert): a "
                      "whole-model folder, or a transformer alone")
  p.add_argument("--target-budget", type=BUDGET, required=True,
                 help="target mean token budget in (0, 1]")
  prompts = p.add_mutually_exclusive_group()
  prompts.add_argument("--prompts", default=None,
                       help="text file, one prompt a line (needs a "
                            "whole-model folder: its umT5 encodes them)")
  prompts.add_argument("--text-embeddings", nargs="+", default=None,
                       metavar="FILE",
                       help="safetensors files with `context` (L, text_dim) "
                            "and optional `negative_context`, one a prompt")
  p.add_argument("--out", required=True,
                 help="output folder (new, or an earlier search with "
                      "--resume)")
  p.add_argument("--steps", type=POSITIVE_INT, default=50)
  p.add_argument("--height", type=POSITIVE_INT, default=480)
  p.add_argument("--width", type=POSITIVE_INT, default=832)
  p.add_argument("--frames", type=POSITIVE_INT, default=81)
  p.add_argument("--samples", type=POSITIVE_INT, default=4,
                 help="(prompt, noise) pairs the fitness averages over; "
                      "sample j: prompt j mod #prompts, noise seed + j")
  p.add_argument("--seed", type=SEED, default=0)
  p.add_argument("--population", type=_number(int, 2), default=50)
  p.add_argument("--children", type=POSITIVE_INT, default=30)
  p.add_argument("--generations", type=NONNEGATIVE_INT, default=30)
  p.add_argument("--guidance", type=NONNEGATIVE, default=5.0)
  p.add_argument("--shift", type=POSITIVE, default=None,
                 help="flow shift (default: 3.0 up to 480p, else 5.0)")
  p.add_argument("--scheduler", choices=["unipc", "euler"], default="unipc")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                 help="compute dtype (default: the checkpoint's)")
  p.add_argument("--evaluator", choices=["masked", "sparse"],
                 default="masked",
                 help="masked dense simulation (one compile) or the sparse "
                      "sampler (cost ~ budget; one compile per budget)")
  p.add_argument("--samples-per-pass", type=POSITIVE_INT, default=None,
                 help="samples per prefix-tree pass (fewer: less memory)")
  p.add_argument("--batch-nodes", type=POSITIVE_INT, default=None,
                 help="candidate prefixes per vmapped call")
  p.add_argument("--lanes", type=POSITIVE_INT, default=None,
                 help="genomes walked down the prefix tree together")
  p.add_argument("--memo-nodes", type=NONNEGATIVE_INT, default=None,
                 help="prefix states kept across generations (these four "
                      "sizes default to what the device memory allows)")
  p.add_argument("--proxy-height", type=POSITIVE_INT, default=None)
  p.add_argument("--proxy-width", type=POSITIVE_INT, default=None)
  p.add_argument("--proxy-frames", type=POSITIVE_INT, default=None)
  p.add_argument("--proxy-samples", type=POSITIVE_INT, default=None,
                 help="search on this cheaper problem after measuring its "
                      "rank correlation with the full fitness")
  p.add_argument("--proxy-check", type=POSITIVE_INT, default=8,
                 help="genomes the proxy's rank correlation is measured on "
                      "(>= 3)")
  p.add_argument("--min-rank-correlation", type=_number(float, -1, 1),
                 default=0.8, help="stop if the proxy's Spearman rho is "
                 "lower (in [-1, 1])")
  p.add_argument("--resume", action="store_true",
                 help="continue the search in OUT from its last generation")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(run=_search)


# eval ------------------------------------------------------------------------


def _eval(args) -> int:
  from astraea_jax import evaluation
  from astraea_jax.demo_model import model as demo_model
  demo = args.model == "demo"
  if not demo:
    _check_model(args.model)
  sources = _sources(
      ("--model", None if demo else args.model),
      ("--demo-weights", (args.demo_weights or demo_model.WEIGHTS_DIR)
       if demo else None),
      ("--prompts", args.prompts), ("--vae", args.vae),
      ("--speed-json", args.speed_json),
      ("--lpips-backbone", args.lpips_backbone),
      ("--lpips-heads", args.lpips_heads),
      *(("--text-embeddings", p) for p in args.text_embeddings or ()),
      *(("--schedule", p) for p in args.schedule or ()))
  outputs.check_destination(args.out, flag="--out", sources=sources,
                            overwrite=args.overwrite)
  return evaluation.command(args)


def _add_eval(sub, common):
  p = sub.add_parser(
      "eval", parents=[common],
      help="compare Astraea with step caching, ToCa, PAB and the "
      "ablations on one model (docs/baselines.md)",
      description="Sample every policy from the same noise and prompts as "
      "the full model; write OUT/eval.{csv,md,json,png}: speedup, PSNR, "
      "SSIM, LPIPS (when its weights are found), mean +- std over "
      "prompts and seeds, Pareto fronts of quality vs speedup.")
  p.add_argument("--model", default="demo",
                 help="'demo' (the packaged demo model) or a converted "
                      "Wan2.1 folder (astraea convert)")
  p.add_argument("--prompts", default=None,
                 help="text file, one prompt a line (demo model, or a "
                      "whole-model folder with its text encoder)")
  p.add_argument("--prompt", action="append", default=None,
                 help="a prompt (repeatable)")
  p.add_argument("--text-embeddings", nargs="+", default=None,
                 metavar="FILE", help="safetensors with `context`, one a "
                 "prompt (converted checkpoints)")
  p.add_argument("--policies", nargs="+", default=["default"],
                 metavar="SPEC",
                 help="'default' (the whole sweep) and/or specs such as "
                      "astraea:budget=0.4 astraea:budget=0.5,ablation=random "
                      "toca:interval=3,ratio=0.3 pab:self=2,cross=4 "
                      "step_cache:threshold=0.1 (see astraea_jax/astraea/"
                      "policy_specs.py parse_policy)")
  p.add_argument("--schedule", nargs="+", default=None, metavar="FILE",
                 help="searched schedule.json files to add (astraea search)")
  p.add_argument("--budgets", nargs="+", type=BUDGET,
                 default=[0.3, 0.4, 0.5, 0.7],
                 help="Astraea mean budgets of the default sweep, in (0, 1]")
  p.add_argument("--ablation-budget", type=BUDGET, default=0.5,
                 help="mean budget of the default sweep's ablations")
  p.add_argument("--seeds", nargs="+", type=SEED, default=[0])
  p.add_argument("--steps", type=POSITIVE_INT, default=None,
                 help="default: the demo model's, else 50")
  p.add_argument("--guidance", type=NONNEGATIVE, default=None)
  p.add_argument("--shift", type=POSITIVE, default=None)
  p.add_argument("--scheduler", choices=["unipc", "euler"], default="unipc")
  p.add_argument("--height", type=POSITIVE_INT, default=480)
  p.add_argument("--width", type=POSITIVE_INT, default=832)
  p.add_argument("--frames", type=POSITIVE_INT, default=81)
  p.add_argument("--vae", default=None,
                 help="Wan VAE to decode a transformer-only checkpoint")
  p.add_argument("--allow-pth", action="store_true")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
  p.add_argument("--demo-weights", default=None,
                 help="demo model weights folder (default: the packaged one)")
  p.add_argument("--speed-json", default=None,
                 help="benchmarks/results/eval_speed_h200.json: also report "
                      "each run's speedup at full size on the H200")
  p.add_argument("--lpips-backbone", default=None,
                 help="torchvision AlexNet weights (default: the caches)")
  p.add_argument("--lpips-heads", default=None,
                 help="lpips v0.1 alex heads (default: the lpips package's)")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--overwrite", action="store_true",
                 help="replace the files of an earlier `astraea eval` in OUT")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(run=_eval)


# The command ------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="astraea", description="Token-wise accelerated video DiTs in JAX.")
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--debug", action="store_true",
                      help="on an error, show the Python traceback")
  sub = parser.add_subparsers(dest="command", required=True)
  for add in (_add_convert, _add_demo, _add_train_demo, _add_generate,
              _add_search, _add_eval):
    add(sub, common)
  return parser


def _is_teardown_noise(error) -> bool:
  """tensorstore's I/O threads report into asyncio loops that orbax has
  closed after a failed restore; the error itself was already raised."""
  return (isinstance(error, RuntimeError)
          and "Event loop is closed" in str(error))


def _silence_teardown_noise():
  thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook

  def on_thread_error(args):
    if not _is_teardown_noise(args.exc_value):
      thread_hook(args)

  def on_unraisable(args):
    if not _is_teardown_noise(args.exc_value):
      unraisable_hook(args)

  threading.excepthook = on_thread_error
  sys.unraisablehook = on_unraisable


def _message(error: BaseException) -> tuple[str, int]:
  """(one line for the user, exit code) for an error a command raised."""
  from converters.common import CheckpointError
  text = str(error).strip() or type(error).__name__
  if isinstance(error, KeyboardInterrupt):
    return ("interrupted; outputs are written whole or not at all, so "
            "nothing half-written was left", 130)
  if isinstance(error, (ValueError, CheckpointError)):
    return text, 1
  if isinstance(error, OSError):
    name = getattr(error, "filename", None)
    reason = error.strerror or text
    return (f"{name}: {reason}" if name else reason), 1
  if isinstance(error, ImportError):
    return f"a package is missing: {text}", 1
  if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
    return ("the device ran out of memory: use a smaller --size/--frames, "
            "--dtype bfloat16, or more --devices (details with --debug)"), 1
  return (f"internal error ({type(error).__name__}: {text.splitlines()[0]}); "
          "this is a bug in astraea-jax: rerun with --debug for the "
          "traceback and report it"), 1


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  if not args.debug:
    _silence_teardown_noise()
  compile_cache.enable()
  try:
    return args.run(args)
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    if args.debug:
      raise
    text, code = _message(e)
    print(f"astraea {args.command}: error: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
  sys.exit(main())
