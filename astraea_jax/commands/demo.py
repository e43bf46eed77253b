"""`astraea demo` (the embedded demo model: full vs Astraea on this
machine) and `astraea train-demo` (train and export that model)."""

from __future__ import annotations

import pathlib

from astraea_jax import demo as demo_lib
from astraea_jax import outputs
from astraea_jax.commands import common
from astraea_jax.demo_model import model as demo_model
from astraea_jax.demo_model import train


def run_demo(args) -> int:
  weights = args.weights
  outputs.check_destination(
      args.out, flag="--out", overwrite=True, overwrite_flag=None,
      sources=common.sources(
          ("--weights", weights or demo_model.WEIGHTS_DIR),
          ("--schedule", args.schedule)))
  common.note_empty_prompt(args.prompt)
  if args.default_schedule and args.schedule is not None:
    raise common.UsageError("give --schedule FILE or --default-schedule, "
                            "not both")
  return demo_lib.main(prompt=args.prompt, budget=args.budget,
                       schedule=args.schedule,
                       default_schedule=args.default_schedule,
                       steps=args.steps,
                       seed=args.seed, guidance=args.guidance, out=args.out,
                       weights=weights, timing_runs=args.timing_runs,
                       progress=not args.quiet)


def add_demo_parser(sub, parents):
  p = sub.add_parser(
      "demo", parents=parents,
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
  common.add_budget_options(
      p, "Astraea mean token budget in (0, 1] (default 0.5); the shipped "
      "searched schedule of that budget is used where one exists "
      "(0.3, 0.4, 0.5, 0.7 at 20 steps), else the default schedule")
  p.set_defaults(budget=0.5)
  p.add_argument("--steps", type=common.POSITIVE_INT, default=None,
                 help="sampling steps (default: the model's, 20)")
  p.add_argument("--guidance", type=common.NONNEGATIVE, default=None,
                 help="classifier-free guidance scale >= 0 (default: the "
                      "model's)")
  p.add_argument("--seed", type=common.SEED, default=0, help="noise seed")
  p.add_argument("--out", default="astraea-demo",
                 help="output folder, written whole at the end; an earlier "
                      "demo output there is replaced, any other existing "
                      "file or folder is refused")
  p.add_argument("--weights", default=None, metavar="DIR",
                 help="demo weights folder (default: the packaged one)")
  p.add_argument("--timing-runs", type=common.NONNEGATIVE_INT, default=0,
                 help="0: steady-state times from the per-step times of the "
                      "first runs (compiling steps excluded); N: the median "
                      "of N further whole runs of each sampler")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  p.set_defaults(run=run_demo)


def run_train_demo(args) -> int:
  sources = common.sources(("--init-from", args.init_from))
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
      raise common.UsageError("give --export or --export-to DIR, not both")
    export_to = demo_model.WEIGHTS_DIR
  if export_to is not None:
    # An earlier export (the packaged weights included) is replaced; a
    # folder of the user's is not, nor the workdir it exports from.
    outputs.check_destination(
        export_to, flag="--export-to", overwrite=True, overwrite_flag=None,
        sources=[*sources, ("--workdir", workdir)])
  return train.run_cli(args)


def add_train_demo_parser(sub, parents):
  p = sub.add_parser(
      "train-demo", parents=parents,
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
  p.add_argument("--minutes", type=common.POSITIVE, default=None,
                 help="wall-time limit of this invocation, compile included")
  p.add_argument("--steps", type=common.POSITIVE_INT, default=None,
                 help="stop at this global step")
  p.add_argument("--resume", action="store_true",
                 help="continue the run in WORKDIR from its last checkpoint "
                      "(same settings required)")
  p.add_argument("--small", action="store_true",
                 help="tiny model and clips (4 x 16 x 16) for CPU tests")
  p.add_argument("--batch", type=common.POSITIVE_INT, default=128)
  p.add_argument("--lr", type=common.POSITIVE, default=1e-3,
                 help="peak learning rate")
  p.add_argument("--warmup", type=common.NONNEGATIVE_INT, default=500,
                 help="linear warm-up steps")
  p.add_argument("--lr-schedule", choices=["constant", "cosine"],
                 default="constant",
                 help="after warm-up: constant, or cosine to 10%% over "
                      "--steps")
  p.add_argument("--weight-decay", type=common.NONNEGATIVE, default=0.01)
  p.add_argument("--ema-decay", type=common.FRACTION, default=0.999,
                 help="in [0, 1)")
  p.add_argument("--seed", type=common.SEED, default=0)
  p.add_argument("--sigma-shift", type=common.POSITIVE, default=None,
                 help="flow shift of the training noise levels (default: "
                      "the model's sampling shift)")
  p.add_argument("--init-from", default=None, metavar="DIR",
                 help="start from these exported weights (fine-tuning)")
  p.add_argument("--attention", choices=["auto", "xla", "cudnn"],
                 default="auto",
                 help="training attention: auto = cuDNN on a GPU if it "
                      "compiles, else XLA")
  p.add_argument("--checkpoint-minutes", type=common.POSITIVE, default=2.0)
  p.add_argument("--log-every", type=common.POSITIVE_INT, default=25,
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
  p.set_defaults(run=run_train_demo)
