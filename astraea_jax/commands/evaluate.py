"""`astraea eval`: Astraea against step caching, ToCa, PAB, EasyCache,
MagCache and the ablations on one model (`evaluation`)."""

from __future__ import annotations

from astraea_jax import evaluation, outputs
from astraea_jax.commands import common
from astraea_jax.demo_model import model as demo_model


def run(args) -> int:
  demo = args.model == "demo"
  if not demo:
    common.check_model(args.model)
  sources = common.sources(
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


def add_parser(sub, parents):
  p = sub.add_parser(
      "eval", parents=parents,
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
                 help="'default' (the whole sweep), 'frontier' (EasyCache "
                      "and MagCache over their thresholds) and/or specs "
                      "such as astraea:budget=0.4 "
                      "astraea:budget=0.5,ablation=random "
                      "toca:interval=3,ratio=0.3 pab:self=2,cross=4 "
                      "step_cache:threshold=0.1 easycache:tau=0.05 "
                      "magcache:thresh=0.06,K=2 "
                      "astraea_adaptive:budget=0.4,tau=0.05 (Astraea + "
                      "EasyCache's rule; see astraea_jax/astraea/"
                      "policy_specs.py parse_policy)")
  p.add_argument("--schedule", nargs="+", default=None, metavar="FILE",
                 help="searched schedule.json files to add (astraea search)")
  p.add_argument("--budgets", nargs="+", type=common.BUDGET,
                 default=[0.3, 0.4, 0.5, 0.7],
                 help="Astraea mean budgets of the default sweep, in (0, 1]")
  p.add_argument("--ablation-budget", type=common.BUDGET, default=0.5,
                 help="mean budget of the default sweep's ablations")
  p.add_argument("--seeds", nargs="+", type=common.SEED, default=[0])
  p.add_argument("--steps", type=common.POSITIVE_INT, default=None,
                 help="default: the demo model's, else 50")
  p.add_argument("--guidance", type=common.NONNEGATIVE, default=None)
  p.add_argument("--shift", type=common.POSITIVE, default=None)
  p.add_argument("--scheduler", choices=["unipc", "euler"], default="unipc")
  common.add_video_size_options(p)
  p.add_argument("--vae", default=None,
                 help="Wan VAE to decode a transformer-only checkpoint")
  p.add_argument("--allow-pth", action="store_true")
  common.add_dtype_option(p, help_dtype=None)
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
  p.set_defaults(run=run)
