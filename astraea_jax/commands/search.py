"""`astraea search`: the per-step token budget schedule of a converted
Wan2.1 checkpoint or Wan2.2 folder (`astraea.search`); prompts are encoded
to files here.

  astraea search --model t2v-a14b/ --target-budget 0.5 --prompts p.txt \
      --size 832x480 --out search/
  astraea search --model i2v-a14b/ --image cat.png --target-budget 0.5 \
      --prompts p.txt --out search/

A Wan2.2 folder searches with its pipeline (`Wan22Pipeline.search_model`):
its latents, its timesteps, shift, steps and guidance as defaults, the
A14B experts switched at the boundary with their guidance scales (the
switch step as `--expert-switch` says, as `astraea generate`), and with
`--image` (TI2V-5B; required for I2V-A14B) the image-to-video problem:
every sample starts from the image, sized as `astraea generate --image`
sizes it.
"""

from __future__ import annotations

import pathlib
import tempfile

import numpy as np

from astraea_jax import checkpoint, outputs, pipelines
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import search
from astraea_jax.astraea import wan_tokenwise
from astraea_jax.commands import common
from astraea_jax.commands import generate
from converters.safetensors_io import save_file


def read_prompts(path, flag="--prompts") -> list[str]:
  try:
    with open(path, encoding="utf-8") as f:
      lines = [line.strip() for line in f if line.strip()]
  except UnicodeDecodeError as e:
    raise common.UsageError(
        f"{flag} {path}: not a UTF-8 text file ({e.reason})") from None
  if not lines:
    raise common.UsageError(f"{flag} {path}: no prompts (the file is empty)")
  return lines


def encode_prompt_files(model, prompts, folder) -> list[str]:
  """Encodes prompts with a whole-model folder's umT5 into one safetensors
  file each (`context`, `negative_context` of the empty negative prompt,
  as `astraea generate --prompt` conditions)."""
  pipe = pipelines.WanPipeline.text_only(model)
  paths = []
  for i, prompt in enumerate(prompts):
    context, negative = pipe.encode_prompt(prompt, "")
    path = pathlib.Path(folder) / f"prompt_{i:03d}.safetensors"
    save_file({"context": np.asarray(context[0]),
               "negative_context": np.asarray(negative[0])}, path)
    paths.append(str(path))
  return paths


def video_problem(args, family):
  """(height, width, frames, steps, guidance, shift, image pixels or None):
  the options given, else the model's defaults (`generate.defaults_for`);
  with --image the video takes the image's size (`generate.read_image`)."""
  defaults = generate.defaults_for(args.model)
  pick = lambda name, key: (getattr(args, name) if getattr(args, name)
                            is not None else defaults.get(key))
  height, width = pick("height", "height"), pick("width", "width")
  pixels = None
  if args.image is not None:
    if args.proxy_height is not None or args.proxy_width is not None:
      raise common.UsageError(
          "--proxy-height/--proxy-width: with --image the video takes the "
          "image's size; a proxy may change --proxy-frames and "
          "--proxy-samples only")
    pixels, (height, width) = generate.read_image(
        args.image, area=height * width, model=family)
  return (height, width, pick("frames", "frames"), pick("steps", "steps"),
          pick("guidance", "guidance"), pick("shift", "shift"), pixels)


def run(args) -> int:
  common.check_model(args.model)
  outputs.check_destination(
      args.out, flag="--out", overwrite=args.resume,
      overwrite_flag="--resume to continue the search in it, or choose "
      "another --out",
      sources=common.sources(("--model", args.model),
                             ("--prompts", args.prompts),
                             ("--image", args.image),
                             *(("--text-embeddings", p)
                               for p in args.text_embeddings or ())))
  family = generate.model_family(args.model)
  wan22 = family in generate.WAN22
  generate.check_image(args.image, family, args.model)
  switch = generate.expert_switch(args.expert_switch, family, args.model)
  whole = checkpoint.is_model_folder(args.model)
  prompts = read_prompts(args.prompts) if args.prompts else None
  if prompts and not whole:
    raise common.UsageError(
        f"--prompts needs a converted whole-model folder (with its umT5 text "
        f"encoder), but --model {args.model} is a converted transformer "
        "alone: convert the full Wan2.1 download, or pass --text-embeddings")
  if not prompts and not args.text_embeddings:
    raise common.UsageError("no prompts: pass --prompts FILE (whole-model "
                            "folder) or --text-embeddings FILE ...")
  if args.proxy_samples is not None and args.proxy_samples > args.samples:
    raise common.UsageError(
        f"--proxy-samples {args.proxy_samples} > --samples {args.samples}: "
        "a proxy must be cheaper than the full problem")
  if args.proxy_check < 3:
    raise common.UsageError(f"--proxy-check {args.proxy_check}: a rank "
                            "correlation needs at least 3 genomes")
  band = tuple(args.band) if args.band else (
      (1.0, 1.0) if args.method == "dp" else (0.9, 1.1))
  if not 0.0 < band[0] <= 1.0 <= band[1]:
    raise common.UsageError(f"--band {band[0]:g} {band[1]:g}: need "
                            "0 < LO <= 1 <= HI")
  if args.install and band != (1.0, 1.0):
    raise common.UsageError(
        f"--install stores the schedule as the one of mean budget "
        f"{args.target_budget:g}, so it needs that exact mean: --band 1 1 "
        f"(got --band {band[0]:g} {band[1]:g})")
  height, width, frames, steps, guidance, shift, pixels = video_problem(
      args, family)
  try:
    config = search.SearchConfig(
        target_budget=args.target_budget, steps=steps,
        population=args.population, children=args.children,
        generations=args.generations, seed=args.seed, band=band)
  except ValueError as e:
    raise common.UsageError(f"--target-budget/--steps/--band: {e}") from None
  try:
    dp_config = search.DPConfig(genes=tuple(args.dp_genes),
                                ref_gene=min(args.dp_genes),
                                profile_count=args.dp_profile_steps,
                                base=args.dp_base)
  except ValueError as e:
    raise common.UsageError(f"--dp-genes: {e}") from None
  install = None
  if args.install:
    install = (pathlib.Path(args.model) / schedule_lib.SCHEDULES_DIR,
               common.model_schedule_id(args.model))
  problem = search.Problem(height=height, width=width, frames=frames,
                           samples=args.samples, seed=args.seed)
  proxy = None
  if any(v is not None for v in (args.proxy_height, args.proxy_width,
                                 args.proxy_frames, args.proxy_samples)):
    proxy = search.Problem(
        height=args.proxy_height or height, width=args.proxy_width or width,
        frames=args.proxy_frames or frames,
        samples=args.proxy_samples or args.samples, seed=args.seed)
  if wan22:  # fail before loading weights
    for p in (problem,) + ((proxy,) if proxy else ()):
      generate.check_wan22_size(args.model, p.height, p.width, p.frames)
  eval_config = search.EvalConfig(
      scheduler=args.scheduler, guidance_scale=guidance, shift=shift,
      timesteps=(pipelines.pipeline_class(args.model).TIMESTEPS if wan22
                 else "diffusers"),
      refresh_experts=wan_tokenwise.EXPERT_SWITCHES[
          switch or wan_tokenwise.EXPERT_SWITCH],
      evaluator=args.evaluator,
      batch_nodes=args.batch_nodes, lanes=args.lanes,
      memo_nodes=args.memo_nodes, samples_per_pass=args.samples_per_pass)
  model = (pathlib.Path(args.model) / "transformer" if whole and not wan22
           else args.model)
  with tempfile.TemporaryDirectory(prefix="astraea-prompts-") as tmp:
    embeddings = (encode_prompt_files(args.model, prompts, tmp) if prompts
                  else args.text_embeddings)
    search_model = None
    if wan22:
      search_model = pipelines.pipeline_class(args.model).from_pretrained(
          args.model, dtype=args.dtype, load_text_encoder=False
      ).search_model(pixels)
    report = search.run_files(
        model, embeddings, args.out, config=config, model=search_model,
        problem=problem, eval_config=eval_config, proxy=proxy,
        proxy_check=args.proxy_check,
        min_rank_correlation=args.min_rank_correlation, dtype=args.dtype,
        resume=args.resume, progress=not args.quiet, method=args.method,
        dp_config=dp_config, install=install)
  steps = report["row_steps"]
  print(f"schedule (mean budget {report['mean_budget']:.3f}, fitness "
        f"{report['fitness']:.4g}): {report['schedule']}")
  print(f"computed {steps.get('row_steps', 0)} row-steps in this run; "
        f"{report['naive_row_steps']} without sharing or caching")
  print(f"wrote {args.out}/schedule.json (astraea generate --schedule), "
        "report.json, search_state.json")
  if install is not None:
    print(f"installed {report['installed']}: `astraea generate --model "
          f"{args.model} --budget {args.target_budget:g} --steps "
          f"{steps}` uses it from now on")
  return 0


def add_parser(sub, parents):
  p = sub.add_parser(
      "search", parents=parents,
      help="search the per-step token budget schedule",
      description="Search of one token budget per denoising step for a "
      "target mean budget: the paper's evolutionary search (Astraea sec. "
      "3.3, --method ga) or the separable model optimised by dynamic "
      "programming (--method dp); writes OUT/schedule.json for `astraea "
      "generate --schedule` (and with --install MODEL/schedules/, where "
      "`astraea generate --budget` finds it).")
  p.add_argument("--model", required=True,
                 help="converted checkpoint folder (astraea convert): a "
                      "whole-model folder (Wan2.1 or Wan2.2), or a "
                      "transformer alone")
  p.add_argument("--target-budget", type=common.BUDGET, required=True,
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
  p.add_argument("--image", default=None, metavar="PATH",
                 help="image-to-video search (Wan2.2 TI2V-5B; required for "
                      "I2V-A14B): every sample starts from this RGB image; "
                      "the video takes a size of area <= WIDTHxHEIGHT near "
                      "its aspect ratio, as `astraea generate --image`")
  p.add_argument("--steps", type=common.POSITIVE_INT, default=None,
                 help="denoising steps (default: the model's; Wan2.1 50)")
  common.add_video_size_options(p, height=None, width=None, frames=None,
                                help_frames="video size and frames "
                                "(default: the model's; Wan2.1 480 x 832 x "
                                "81)")
  p.add_argument("--samples", type=common.POSITIVE_INT, default=4,
                 help="(prompt, noise) pairs the fitness averages over; "
                      "sample j: prompt j mod #prompts, noise seed + j")
  p.add_argument("--seed", type=common.SEED, default=0)
  p.add_argument("--method", choices=list(search.runner.METHODS),
                 default="ga",
                 help="ga: the paper's evolutionary search (default); dp: "
                      "step costs measured one step at a time from the "
                      "full model's trajectory, optimised exactly by dynamic "
                      "programming (far fewer model evaluations)")
  p.add_argument("--band", type=common.POSITIVE, nargs=2, default=None,
                 metavar=("LO", "HI"),
                 help="feasible mean budgets [LO, HI] x target (default: "
                      "0.9 1.1 for ga, as the paper; 1 1, the exact mean, "
                      "for dp)")
  p.add_argument("--dp-genes", type=common.number(int, 0, 9), nargs="+",
                 default=[0, 5], metavar="TENTHS",
                 help="dp: budgets (tenths, 0..9) measured at every step; "
                      "the others follow the profile steps (default 0 5)")
  p.add_argument("--dp-profile-steps", type=common.NONNEGATIVE_INT,
                 default=3,
                 help="dp: the last steps where every budget is measured "
                      "(default 3)")
  p.add_argument("--dp-base", choices=["full", "default"], default="full",
                 help="dp: perturb the full model's trajectory (default; "
                      "one measurement serves every budget) or the default "
                      "schedule of the target (measured per budget)")
  p.add_argument("--install", action="store_true",
                 help="also store the schedule in MODEL/schedules/, where "
                      "`astraea generate --budget` finds it (needs --band "
                      "1 1, the default for dp)")
  p.add_argument("--population", type=common.number(int, 2), default=50)
  p.add_argument("--children", type=common.POSITIVE_INT, default=30)
  p.add_argument("--generations", type=common.NONNEGATIVE_INT, default=30)
  p.add_argument("--guidance", type=common.NONNEGATIVE, default=None,
                 help="CFG scale (default: the model's; Wan2.1 5.0, Wan2.2 "
                      "A14B one scale per expert; this flag sets both)")
  p.add_argument("--shift", type=common.POSITIVE, default=None,
                 help="flow shift (default: the model's; Wan2.1: 3.0 up to "
                      "480p, else 5.0)")
  generate.add_expert_switch_option(p)
  p.add_argument("--scheduler", choices=["unipc", "euler"], default="unipc")
  common.add_dtype_option(p)
  p.add_argument("--evaluator", choices=["masked", "sparse"],
                 default="masked",
                 help="masked dense simulation (one compile) or the sparse "
                      "sampler (cost ~ budget; one compile per budget)")
  p.add_argument("--samples-per-pass", type=common.POSITIVE_INT,
                 default=None,
                 help="samples per prefix-tree pass (fewer: less memory)")
  p.add_argument("--batch-nodes", type=common.POSITIVE_INT, default=None,
                 help="candidate prefixes per vmapped call")
  p.add_argument("--lanes", type=common.POSITIVE_INT, default=None,
                 help="genomes walked down the prefix tree together")
  p.add_argument("--memo-nodes", type=common.NONNEGATIVE_INT, default=None,
                 help="prefix states kept across generations (these four "
                      "sizes default to what the device memory allows)")
  common.add_video_size_options(p, height=None, width=None, frames=None,
                                prefix="--proxy-")
  p.add_argument("--proxy-samples", type=common.POSITIVE_INT, default=None,
                 help="search on this cheaper problem after measuring its "
                      "rank correlation with the full fitness; fewer "
                      "samples than prompts keep the first prompts (the "
                      "full problem's first samples; measured on the demo "
                      "model: 2 of 4 rank like all 4 at Spearman 0.99)")
  p.add_argument("--proxy-check", type=common.POSITIVE_INT, default=8,
                 help="genomes the proxy's rank correlation is measured on "
                      "(>= 3)")
  p.add_argument("--min-rank-correlation", type=common.number(float, -1, 1),
                 default=0.9, help="stop if the proxy's Spearman rho is "
                 "lower (in [-1, 1]; default 0.9)")
  p.add_argument("--resume", action="store_true",
                 help="continue the search in OUT from its last generation")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(run=run)
