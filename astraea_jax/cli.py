"""The `astraea` command: demo, train-demo, generate, convert, search, eval.

Benchmarks are the scripts in benchmarks/ (results in benchmarks/results/).

  astraea convert SRC DST [--format auto|wan|diffusers|opensora|umt5]
      [--allow-pth] [--dtype float32|bfloat16]
  astraea generate --model DST --prompt "..." --out video.mp4
  astraea demo
  astraea eval --model demo --policies default --out eval/
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time


def _convert(args) -> int:
  import converters
  from astraea_jax import checkpoint
  from converters import model_folder
  t0 = time.perf_counter()
  src = model_folder.resolve_source(args.src, revision=args.revision,
                                    allow_pth=args.allow_pth)
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


def _video_size(args, default=(480, 832)) -> tuple[int, int]:
  """(height, width) from --size WxH or --height/--width (default: the
  model's 480p size)."""
  if args.size is None:
    return args.height or default[0], args.width or default[1]
  if args.height is not None or args.width is not None:
    raise ValueError("give --size WIDTHxHEIGHT or --height/--width, not both")
  parts = args.size.lower().replace("*", "x").split("x")
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    raise ValueError(f"--size {args.size!r} must be WIDTHxHEIGHT, e.g. "
                     "832x480 (480p) or 1280x720")
  width, height = (int(p) for p in parts)
  return height, width


def _generate(args) -> int:
  from astraea_jax import generate
  if args.model is not None and args.model_option is not None:
    raise ValueError("give the model once: positionally or with --model")
  model = args.model if args.model is not None else args.model_option
  if model is None:
    raise ValueError("no model: pass --model DST (a converted folder)")
  if args.negative_prompt is not None and args.prompt is None:
    raise ValueError("--negative-prompt needs --prompt")
  # Unset options take the model's defaults (Wan2.1 or OpenSora v1.2).
  defaults = generate.defaults_for(model)
  pick = lambda name: (getattr(args, name) if getattr(args, name) is not None
                       else defaults[name])
  height, width = _video_size(args, (defaults["height"], defaults["width"]))
  steps = pick("steps")
  schedule = (generate.load_schedule(args.schedule, steps)
              if args.schedule else None)
  config = generate.GenerateConfig(
      height=height, width=width, frames=pick("frames"),
      steps=steps, guidance_scale=pick("guidance"), shift=args.shift,
      scheduler=pick("scheduler"), seed=args.seed, budget=args.budget,
      schedule=schedule, compare=args.compare, devices=args.devices)
  report = generate.generate(model, args.text_embeddings, args.out,
                             config=config, vae_path=args.vae,
                             allow_pth=args.allow_pth, dtype=args.dtype,
                             overwrite=args.overwrite, prompt=args.prompt,
                             negative_prompt=args.negative_prompt,
                             save_latents=args.save_latents,
                             fps=pick("fps"))
  for name in ("full", "astraea"):
    if name in report:
      r = report[name]
      print(f"{name}: {r['seconds']:.1f} s ({r['seconds_without_compiles']:.1f}"
            " s without compilation)")
  if "speedup_without_compiles" in report:
    extra = (f", SSIM {report['ssim']:.4f}" if "ssim" in report else "")
    print(f"speedup {report['speedup_without_compiles']:.2f}x; PSNR vs full "
          f"({report['compared_on']}) {report['psnr_db']:.2f} dB{extra}")
  if generate.is_video_path(args.out):
    print(f"wrote {', '.join(report['outputs'])}")
  else:
    videos = sorted(p.name for p in pathlib.Path(args.out).glob("*.mp4"))
    print(f"wrote {args.out}/outputs.safetensors, {args.out}/report.json"
          + "".join(f", {args.out}/{v}" for v in videos))
  return 0


def _search(args) -> int:
  from astraea_jax.astraea import search
  if args.prompts is not None:
    with open(args.prompts, encoding="utf-8") as f:
      lines = [line for line in f if line.strip()]
    if not lines:
      raise ValueError(f"{args.prompts}: no prompts (the file is empty)")
    raise ValueError(
        "--prompts needs the umT5 text encoder, which is not available in "
        "astraea-jax yet; encode the prompts elsewhere and pass "
        "--text-embeddings a.safetensors b.safetensors ... (each with a "
        "`context` tensor)")
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
  report = search.run_files(
      args.model, args.text_embeddings or [], args.out, config=config,
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


def _eval(args) -> int:
  from astraea_jax import evaluation
  return evaluation.command(args)


def _demo(args) -> int:
  from astraea_jax import demo
  return demo.main(prompt=args.prompt, budget=args.budget,
                   schedule=args.schedule, steps=args.steps, seed=args.seed,
                   guidance=args.guidance, out=args.out,
                   weights=args.weights, timing_runs=args.timing_runs,
                   progress=not args.quiet)


def _train_demo(args) -> int:
  from astraea_jax.demo_model import train
  return train.run_cli(args)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="astraea", description="Token-wise accelerated video DiTs in JAX.")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser(
      "convert", help="convert a checkpoint folder: a whole Wan2.1 T2V model "
      "(original or diffusers layout), a whole OpenSora v1.2 model "
      "(OpenSora-STDiT-v3/, OpenSora-VAE-v1.2/, t5-v1_1-xxl/) or one model "
      "(Wan2.1 transformer, OpenSora v1.2 STDiT3, umT5)")
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
  p.add_argument("--text-len", type=int, default=None,
                 help="text tokens the model pads context to (default: the "
                      "checkpoint's text_len, or 512 for diffusers)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace DST if it exists")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(run=_convert)

  p = sub.add_parser(
      "demo", help="the embedded demo model: full vs Astraea on this machine",
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
  group = p.add_mutually_exclusive_group()
  group.add_argument("--budget", type=float, default=0.5,
                     help="Astraea mean token budget in (0, 1] (default "
                          "0.5)")
  group.add_argument("--schedule", default=None, metavar="FILE",
                     help="schedule.json with one budget per step (astraea "
                          "search)")
  p.add_argument("--steps", type=int, default=None,
                 help="sampling steps (default: the model's, 20)")
  p.add_argument("--guidance", type=float, default=None,
                 help="classifier-free guidance scale (default: the "
                      "model's)")
  p.add_argument("--seed", type=int, default=0, help="noise seed")
  p.add_argument("--out", default="astraea-demo",
                 help="output folder (files in it are replaced)")
  p.add_argument("--weights", default=None, metavar="DIR",
                 help="demo weights folder (default: the packaged one)")
  p.add_argument("--timing-runs", type=int, default=0,
                 help="0: steady-state times from the per-step times of the "
                      "first runs (compiling steps excluded); N: the median "
                      "of N further whole runs of each sampler")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.set_defaults(run=_demo)

  p = sub.add_parser(
      "train-demo", help="train (and export) the embedded demo model",
      description="Flow-matching training of the demo model (a small Wan "
      "DiT + caption encoder) on procedurally rendered clips, drawn on the "
      "device each step. Stops after --minutes of wall time (compilation "
      "included) or at --steps, checkpointing (orbax) every "
      "--checkpoint-minutes and at the end; writes WORKDIR/loss.json, "
      "loss.png and summary.json. Example (one H200, ~8 min): astraea "
      "train-demo --workdir work --minutes 7.5 --export-to weights")
  p.add_argument("--workdir", required=True,
                 help="run folder: checkpoints/, run.json, loss.json")
  p.add_argument("--minutes", type=float, default=None,
                 help="wall-time limit of this invocation, compile included")
  p.add_argument("--steps", type=int, default=None,
                 help="stop at this global step")
  p.add_argument("--resume", action="store_true",
                 help="continue the run in WORKDIR from its last checkpoint "
                      "(same settings required)")
  p.add_argument("--small", action="store_true",
                 help="tiny model and clips (4 x 16 x 16) for CPU tests")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
  p.add_argument("--warmup", type=int, default=500,
                 help="linear warm-up steps")
  p.add_argument("--lr-schedule", choices=["constant", "cosine"],
                 default="constant",
                 help="after warm-up: constant, or cosine to 10%% over "
                      "--steps")
  p.add_argument("--weight-decay", type=float, default=0.01)
  p.add_argument("--ema-decay", type=float, default=0.999)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--sigma-shift", type=float, default=None,
                 help="flow shift of the training noise levels (default: "
                      "the model's sampling shift)")
  p.add_argument("--init-from", default=None, metavar="DIR",
                 help="start from these exported weights (fine-tuning)")
  p.add_argument("--attention", choices=["auto", "xla", "cudnn"],
                 default="auto",
                 help="training attention: auto = cuDNN on a GPU if it "
                      "compiles, else XLA")
  p.add_argument("--checkpoint-minutes", type=float, default=2.0)
  p.add_argument("--log-every", type=int, default=25,
                 help="steps per loss.json entry (mean loss over them)")
  p.add_argument("--export-to", default=None, metavar="DIR",
                 help="after training, write the EMA weights to DIR "
                      "(demo.safetensors + config.json)")
  p.add_argument("--export", action="store_true",
                 help="--export-to the package's demo_model/weights/")
  p.add_argument("--export-only", action="store_true",
                 help="no training: export WORKDIR's latest checkpoint")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(run=_train_demo)

  p = sub.add_parser(
      "generate", help="text to video with a converted Wan2.1 or OpenSora "
      "v1.2 model",
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
                    help="the text prompt (needs a whole-model folder)")
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
  p.add_argument("--height", type=int, default=None)
  p.add_argument("--width", type=int, default=None)
  p.add_argument("--frames", type=int, default=None,
                 help="Wan2.1: 1 + 4k (default 81); OpenSora: 1 or >= 17 "
                      "(default 51)")
  p.add_argument("--fps", type=float, default=None,
                 help="frame rate of the MP4 (Wan2.1: 16; OpenSora: 24, also "
                      "its fps condition)")
  p.add_argument("--save-latents", action="store_true",
                 help="with --out NAME.mp4, also write "
                      "NAME.latents.safetensors (folders always hold them)")
  p.add_argument("--steps", type=int, default=None,
                 help="sampling steps (Wan2.1: 50; OpenSora: 30)")
  p.add_argument("--guidance", type=float, default=None,
                 help="CFG scale (Wan2.1: 5.0; OpenSora: 7.0)")
  p.add_argument("--shift", type=float, default=None,
                 help="flow shift (default: 3.0 up to 480p, else 5.0)")
  p.add_argument("--scheduler", choices=["unipc", "euler"], default=None,
                 help="Wan2.1: unipc (default) or euler; OpenSora: its "
                      "rectified-flow Euler only")
  p.add_argument("--seed", type=int, default=0)
  group = p.add_mutually_exclusive_group()
  group.add_argument("--budget", type=float, default=None,
                     help="Astraea mean token budget in (0, 1]")
  group.add_argument("--schedule", default=None,
                     help="schedule.json with one budget per step")
  p.add_argument("--compare", action="store_true",
                 help="also run the full model; print speedup and PSNR/SSIM")
  p.add_argument("--vae", default=None,
                 help="Wan VAE (.safetensors, diffusers vae/ folder, or .pth "
                      "with --allow-pth) to decode the video")
  p.add_argument("--allow-pth", action="store_true",
                 help="allow reading a PyTorch pickle (.pth) VAE")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                 help="compute dtype (default: the checkpoint's)")
  p.add_argument("--devices", type=int, default=None,
                 help="sample on N devices: the CFG branches over a data "
                      "axis, each video's tokens over the rest (sequence "
                      "parallel); default: one device")
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(run=_generate)

  p = sub.add_parser(
      "search", help="search the per-step token budget schedule",
      description="Evolutionary search of one token budget per denoising "
      "step (Astraea sec. 3.3) for a target mean budget; writes "
      "OUT/schedule.json for `astraea generate --schedule`.")
  p.add_argument("--model", required=True,
                 help="converted checkpoint folder (astraea convert)")
  p.add_argument("--target-budget", type=float, required=True,
                 help="target mean token budget in (0, 1]")
  prompts = p.add_mutually_exclusive_group()
  prompts.add_argument("--prompts", default=None,
                       help="text file, one prompt a line (needs the text "
                            "encoder: not available yet)")
  prompts.add_argument("--text-embeddings", nargs="+", default=None,
                       metavar="FILE",
                       help="safetensors files with `context` (L, text_dim) "
                            "and optional `negative_context`, one a prompt")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--height", type=int, default=480)
  p.add_argument("--width", type=int, default=832)
  p.add_argument("--frames", type=int, default=81)
  p.add_argument("--samples", type=int, default=4,
                 help="(prompt, noise) pairs the fitness averages over; "
                      "sample j: prompt j mod #prompts, noise seed + j")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--population", type=int, default=50)
  p.add_argument("--children", type=int, default=30)
  p.add_argument("--generations", type=int, default=30)
  p.add_argument("--guidance", type=float, default=5.0)
  p.add_argument("--shift", type=float, default=None,
                 help="flow shift (default: 3.0 up to 480p, else 5.0)")
  p.add_argument("--scheduler", choices=["unipc", "euler"], default="unipc")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                 help="compute dtype (default: the checkpoint's)")
  p.add_argument("--evaluator", choices=["masked", "sparse"],
                 default="masked",
                 help="masked dense simulation (one compile) or the sparse "
                      "sampler (cost ~ budget; one compile per budget)")
  p.add_argument("--samples-per-pass", type=int, default=None,
                 help="samples per prefix-tree pass (fewer: less memory)")
  p.add_argument("--batch-nodes", type=int, default=None,
                 help="candidate prefixes per vmapped call")
  p.add_argument("--lanes", type=int, default=None,
                 help="genomes walked down the prefix tree together")
  p.add_argument("--memo-nodes", type=int, default=None,
                 help="prefix states kept across generations (these four "
                      "sizes default to what the device memory allows)")
  p.add_argument("--proxy-height", type=int, default=None)
  p.add_argument("--proxy-width", type=int, default=None)
  p.add_argument("--proxy-frames", type=int, default=None)
  p.add_argument("--proxy-samples", type=int, default=None,
                 help="search on this cheaper problem after measuring its "
                      "rank correlation with the full fitness")
  p.add_argument("--proxy-check", type=int, default=8,
                 help="genomes the proxy's rank correlation is measured on")
  p.add_argument("--min-rank-correlation", type=float, default=0.8,
                 help="stop if the proxy's Spearman rho is lower")
  p.add_argument("--resume", action="store_true",
                 help="continue the search in OUT from its last generation")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(run=_search)

  p = sub.add_parser(
      "eval", help="compare Astraea with step caching, ToCa, PAB and the "
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
  p.add_argument("--budgets", nargs="+", type=float,
                 default=[0.3, 0.4, 0.5, 0.7],
                 help="Astraea mean budgets of the default sweep")
  p.add_argument("--ablation-budget", type=float, default=0.5,
                 help="mean budget of the default sweep's ablations")
  p.add_argument("--seeds", nargs="+", type=int, default=[0])
  p.add_argument("--steps", type=int, default=None,
                 help="default: the demo model's, else 50")
  p.add_argument("--guidance", type=float, default=None)
  p.add_argument("--shift", type=float, default=None)
  p.add_argument("--scheduler", choices=["unipc", "euler"], default="unipc")
  p.add_argument("--height", type=int, default=480)
  p.add_argument("--width", type=int, default=832)
  p.add_argument("--frames", type=int, default=81)
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
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(run=_eval)

  return parser


def main(argv=None) -> int:
  from converters.common import CheckpointError
  from astraea_jax.checkpoint import CheckpointExistsError
  args = build_parser().parse_args(argv)
  try:
    return args.run(args)
  except (CheckpointError, CheckpointExistsError, FileNotFoundError,
          ValueError) as e:
    print(f"astraea {args.command}: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
