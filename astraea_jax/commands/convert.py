"""`astraea convert SRC DST`: a downloaded checkpoint -> a converted one."""

from __future__ import annotations

import pathlib
import time

import converters
from astraea_jax import checkpoint, outputs
from astraea_jax.commands import common
from converters import model_folder


def run(args) -> int:
  local = pathlib.Path(args.src).exists()
  outputs.check_destination(args.dst, flag="DST",
                            sources=common.sources(
                                ("SRC", args.src if local else None)),
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


def add_parser(sub, parents):
  p = sub.add_parser(
      "convert", parents=parents,
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
  p.add_argument("--text-len", type=common.POSITIVE_INT, default=None,
                 help="text tokens the model pads context to (default: the "
                      "checkpoint's text_len, or 512 for diffusers)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace DST if it is an earlier astraea-jax output")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(run=run)
