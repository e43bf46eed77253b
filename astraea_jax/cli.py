"""The `astraea` command: demo, generate, convert, search, bench.

  astraea convert SRC DST [--format auto|wan|diffusers|opensora|umt5]
  astraea demo
"""

from __future__ import annotations

import argparse
import sys
import time

_NOT_YET = {
    "search": "the evolutionary budget search (budget-search issue)",
    "bench": "benchmarks; until this subcommand exists run the scripts in "
             "benchmarks/ directly",
}


def _convert(args) -> int:
  import converters
  from astraea_jax import checkpoint
  t0 = time.perf_counter()
  config, params, layout = converters.read_checkpoint(
      args.src, format=args.format, dtype=args.dtype, text_len=args.text_len,
      progress=not args.quiet)
  checkpoint.save(args.dst, config, params, overwrite=args.overwrite,
                  metadata={"source": str(args.src), "layout": layout})
  print(f"converted {args.src} ({layout} layout) -> {args.dst} "
        f"({type(config).__name__}, {config.param_dtype}) in "
        f"{time.perf_counter() - t0:.1f} s")
  return 0


def _generate(args) -> int:
  from astraea_jax import generate
  schedule = (generate.load_schedule(args.schedule, args.steps)
              if args.schedule else None)
  config = generate.GenerateConfig(
      height=args.height, width=args.width, frames=args.frames,
      steps=args.steps, guidance_scale=args.guidance, shift=args.shift,
      scheduler=args.scheduler, seed=args.seed, budget=args.budget,
      schedule=schedule, compare=args.compare)
  report = generate.generate(args.model, args.text_embeddings, args.out,
                             config=config, vae_path=args.vae,
                             allow_pth=args.allow_pth, dtype=args.dtype,
                             overwrite=args.overwrite)
  for name in ("full", "astraea"):
    if name in report:
      r = report[name]
      print(f"{name}: {r['seconds']:.1f} s ({r['seconds_without_compiles']:.1f}"
            " s without compilation)")
  if "speedup_without_compiles" in report:
    extra = (f", SSIM {report['ssim']:.4f}" if "ssim" in report else "")
    print(f"speedup {report['speedup_without_compiles']:.2f}x; PSNR vs full "
          f"({report['compared_on']}) {report['psnr_db']:.2f} dB{extra}")
  print(f"wrote {args.out}/outputs.safetensors and {args.out}/report.json")
  return 0


def _demo(args) -> int:
  from astraea_jax import demo
  return demo.main(steps=args.steps, budget=args.budget, seed=args.seed,
                   out=args.out)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="astraea", description="Token-wise accelerated video DiTs in JAX.")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("convert", help="convert a checkpoint folder (Wan2.1 "
                     "original/diffusers, OpenSora v1.2 STDiT3, umT5)")
  p.add_argument("src", help="checkpoint folder as published")
  p.add_argument("dst", help="output folder (config.json + orbax params)")
  p.add_argument("--format", choices=["auto", "wan", "diffusers", "opensora",
                                      "umt5"], default="auto")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                 help="parameter dtype of the converted weights")
  p.add_argument("--text-len", type=int, default=None,
                 help="text tokens the model pads context to (default: the "
                      "checkpoint's text_len, or 512 for diffusers)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace DST if it exists")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(run=_convert)

  p = sub.add_parser("demo", help="run the default model end to end")
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--budget", type=float, default=0.5,
                 help="Astraea mean token budget in (0, 1]")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="astraea-demo",
                 help="output folder (replaced if it exists)")
  p.set_defaults(run=_demo)

  p = sub.add_parser("generate", help="sample a converted Wan checkpoint")
  p.add_argument("model", help="converted checkpoint folder (astraea convert)")
  p.add_argument("--text-embeddings", required=True,
                 help="safetensors with `context` (L, text_dim) and optional "
                      "`negative_context`")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--height", type=int, default=480)
  p.add_argument("--width", type=int, default=832)
  p.add_argument("--frames", type=int, default=81)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--guidance", type=float, default=5.0)
  p.add_argument("--shift", type=float, default=None,
                 help="flow shift (default: 3.0 up to 480p, else 5.0)")
  p.add_argument("--scheduler", choices=["unipc", "euler"], default="unipc")
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
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(run=_generate)

  for name, what in _NOT_YET.items():
    p = sub.add_parser(name, help=f"(not available yet) {what}")
    p.set_defaults(run=lambda args, name=name, what=what: _not_yet(name, what))
  return parser


def _not_yet(name, what) -> int:
  print(f"astraea {name}: not available yet in this version: {what}.",
        file=sys.stderr)
  return 2


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
