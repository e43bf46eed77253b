"""The `astraea` command: demo, generate, convert, search, bench.

  astraea convert SRC DST [--format auto|wan|diffusers] [--dtype float32|bfloat16]
  astraea demo
"""

from __future__ import annotations

import argparse
import sys
import time

_NOT_YET = {
    "generate": "text-to-video generation from a converted checkpoint "
                "(Wan pipeline issue: VAE, text encoder, MP4 output)",
    "search": "the evolutionary budget search (budget-search issue)",
    "bench": "benchmarks; until this subcommand exists run the scripts in "
             "benchmarks/ directly",
}


def _convert(args) -> int:
  from astraea_jax import checkpoint
  from converters import wan as wan_converter
  t0 = time.perf_counter()
  config, params = wan_converter.read_checkpoint(
      args.src, format=args.format, dtype=args.dtype, text_len=args.text_len,
      progress=not args.quiet)
  checkpoint.save(args.dst, config, params, overwrite=args.overwrite,
                  metadata={"source": str(args.src),
                            "layout": wan_converter.detect_layout(args.src)[0]})
  print(f"converted {args.src} -> {args.dst} ({config.num_layers} layers, "
        f"dim {config.dim}, {config.param_dtype}) in "
        f"{time.perf_counter() - t0:.1f} s")
  return 0


def _demo(args) -> int:
  from astraea_jax import demo
  return demo.main(steps=args.steps, budget=args.budget, seed=args.seed,
                   out=args.out)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="astraea", description="Token-wise accelerated video DiTs in JAX.")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("convert", help="convert a Wan2.1 checkpoint folder")
  p.add_argument("src", help="checkpoint folder (original or diffusers layout)")
  p.add_argument("dst", help="output folder (config.json + orbax params)")
  p.add_argument("--format", choices=["auto", "wan", "diffusers"],
                 default="auto")
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
  except (CheckpointError, CheckpointExistsError, FileNotFoundError) as e:
    print(f"astraea {args.command}: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
