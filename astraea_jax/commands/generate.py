"""`astraea generate`: a video (or latents) from a converted Wan2.1,
Wan2.2 (TI2V-5B, T2V-A14B, I2V-A14B) or OpenSora v1.2 model.

  astraea generate --model wan-1.3b/ --prompt "A cat baking a cake" \
      --size 832x480 --frames 81 --budget 0.4 --out cat.mp4
  astraea generate wan-dit/ --text-embeddings prompt.safetensors \
      --height 480 --width 832 --frames 81 --budget 0.4 --compare --out out/
  astraea generate ti2v-5b/ --prompt "A cat" --image cat.png --out cat.mp4
  astraea generate i2v-a14b/ --prompt "A cat" --image cat.png --out cat.mp4

The model is a converted whole-model folder (`astraea convert` of a full
Wan2.1 or OpenSora v1.2 download: manifest.json, transformer/, vae/,
text_encoder/, tokenizer/) or a converted Wan2.1 transformer alone.
`--prompt` needs a whole-model folder; `--text-embeddings` (Wan2.1 only)
works with either (a transformer alone decodes only with `--vae`).

Outputs: `--out NAME.mp4` writes the video (Astraea's when accelerated),
plus NAME.full.mp4 with --compare and NAME.latents.safetensors with
--save-latents; any other `--out` is a folder with outputs.safetensors
(latents, and videos when decoded), report.json and video_<run>.mp4 per
decoded run. Every file is written atomically (temporary name, then
rename); existing outputs need --overwrite, which replaces only earlier
astraea outputs (`outputs.check_destination`).

Numbered like a diffusers pipeline:
  1. load the pipeline (the family's `prepare`: a whole-model folder, or a
     Wan2.1 transformer with the VAE given by `--vae`);
  2. the text conditioning: `--prompt` through the tokenizer and text
     encoder, or a safetensors file (`text_embeddings`);
  3.-5. `Pipeline.generate`: noise from `--seed`, dense or Astraea
     sampling (`--compare`: both), decoding; then the outputs, atomically.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from astraea_jax import checkpoint, outputs, pipelines
from astraea_jax import video as video_lib
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import wan_tokenwise
from astraea_jax.commands import common
from astraea_jax.pipelines import (
    opensora_pipeline,
    wan22_pipeline,
    wan_pipeline,
)
from astraea_jax.pipelines.base import GenerateConfig
from astraea_jax.sampling import sampler as dense_sampler
from astraea_jax.text_embeddings import read_text_embeddings
from converters import safetensors_io
from converters import wan_vae as wan_vae_converter

WAN = wan_pipeline.WanPipeline.MODEL
OPENSORA = opensora_pipeline.OpenSoraPipeline.MODEL
TI2V = wan22_pipeline.Wan22TI2VPipeline.MODEL
T2V_A14B = wan22_pipeline.Wan22T2VA14BPipeline.MODEL
I2V_A14B = wan22_pipeline.Wan22I2VA14BPipeline.MODEL
# The models that take --image, those that need it, those of two experts.
IMAGE_MODELS = (TI2V, I2V_A14B)
IMAGE_REQUIRED = (I2V_A14B,)
TWO_EXPERTS = (T2V_A14B, I2V_A14B)
WAN22 = (TI2V, T2V_A14B, I2V_A14B)


def model_family(model_path) -> str:
  """"opensora-v1.2" for a converted OpenSora folder, else "wan2.1-t2v"
  (a Wan folder or a converted transformer alone)."""
  if checkpoint.is_model_folder(model_path):
    return pipelines.pipeline_class(model_path).MODEL
  return WAN


def expert_switch(value: str | None, family: str, model_path, *,
                  accelerated: bool = True) -> str | None:
  """The --expert-switch of a run (`wan_tokenwise.EXPERT_SWITCHES`): the
  given one or the default for an Astraea run of two experts, None where
  there is no switch; a UsageError for a model of one expert or a dense
  run."""
  if value is not None and family not in TWO_EXPERTS:
    raise common.UsageError(
        f"--expert-switch {value}: {model_path} holds {family}, one model "
        f"with no expert switch (only {' and '.join(TWO_EXPERTS)} have two "
        "experts)")
  if value is not None and not accelerated:
    raise common.UsageError(
        f"--expert-switch {value} sets what Astraea's token caches do at "
        "the expert switch: give --budget or --schedule too")
  if family not in TWO_EXPERTS or not accelerated:
    return None
  return value or wan_tokenwise.EXPERT_SWITCH


def expert_placement(value: str | None, family: str, model_path, *,
                     devices: int | None = None) -> str | None:
  """The --expert-placement of a run (`sampler.EXPERT_PLACEMENTS`): the
  given one, or for two experts "one" on one device (the CLI offloads
  every model: the idle expert waits in host memory) and "both" over
  --devices (the mesh shards both); None for a model of one expert. A
  UsageError for a model of one expert, or "one" with --devices."""
  if value is not None and family not in TWO_EXPERTS:
    raise common.UsageError(
        f"--expert-placement {value}: {model_path} holds {family}, one "
        f"model (only {' and '.join(TWO_EXPERTS)} have two experts)")
  if family not in TWO_EXPERTS:
    return None
  if value == "one" and devices is not None:
    raise common.UsageError(
        f"--expert-placement one places one expert on one device; with "
        f"--devices {devices} both experts are sharded over the devices "
        "(give --expert-placement both, or leave it out)")
  return value or ("both" if devices is not None else "one")


def add_expert_switch_option(p):
  p.add_argument(
      "--expert-switch", choices=list(wan_tokenwise.EXPERT_SWITCHES),
      default=None,
      help="Wan2.2 A14B with Astraea: at the switch to the low-noise expert "
           "the token caches hold the other expert's updates; refresh "
           "computes every token at that step, keep runs the schedule's "
           f"budget there (default {wan_tokenwise.EXPERT_SWITCH}: measured "
           "better, benchmarks/results/expert_switch_cpu.json)")


def defaults_for(model_path) -> dict:
  """The CLI defaults (size, frames, steps, guidance, fps, scheduler) of
  the model in `model_path`."""
  return dict(pipelines.PIPELINES[model_family(model_path)].DEFAULTS)


# The files --------------------------------------------------------------------


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


def check_outputs(paths, out, *, overwrite, sources):
  """`outputs.check_destination` for each of `output_paths`' files (or the
  folder), before anything is loaded."""
  for name, path in paths.items():
    outputs.check_destination(
        path, flag="--out" if path == pathlib.Path(out)
        else f"--out ({name} output)", overwrite=overwrite,
        sources=[(f, p) for f, p in sources if p is not None],
        kind="folder" if name == "folder" else "file")


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


# Each family: check the request, load, condition ------------------------------


def _config_fields(config: GenerateConfig, *unreported) -> dict:
  return {k: v for k, v in vars(config).items()
          if k not in ("schedule", "selection", *unreported)}


def _wan_text(pipe, report, prompt, negative_prompt, embeddings_path,
              text_encoder_device):
  """The Wan (2.1 or 2.2) text conditioning: --prompt encoded (the encoder
  then dropped, freeing its host memory before sampling; the prompts go
  into `report`), or the --text-embeddings file."""
  if prompt is None:
    return read_text_embeddings(embeddings_path,
                                pipe.transformer.config.text_dim)
  conditioning = pipe.encode_prompt(prompt, negative_prompt or "",
                                    progress=True)
  pipe.text_encoder = None
  report.update(prompt=prompt, negative_prompt=negative_prompt or "",
                text_encoder_device=text_encoder_device)
  return conditioning


def prepare_wan(model_path, out, *, config, prompt, negative_prompt,
                embeddings_path, vae_path, allow_pth, dtype, fps,
                text_encoder_device, image=None):
  """(WanPipeline, (context, negative), report fields) for a Wan2.1
  folder or transformer."""
  del fps, image  # MP4 frame rate only; `generate` refused an image
  whole = checkpoint.is_model_folder(model_path)
  if is_video_path(out) and not whole and vae_path is None:
    raise ValueError(f"--out {out} needs a VAE to decode the video: a "
                     "whole-model folder, or --vae")
  if whole and vae_path is not None:
    raise ValueError(f"--vae: {model_path} is a whole-model folder with "
                     "its own VAE")
  if not whole and prompt is not None:
    raise ValueError(
        f"--prompt needs a converted whole-model folder with the text "
        f"encoder (manifest.json), but {model_path} is not one; convert the "
        "full Wan2.1 download with `astraea convert SRC DST`, or pass "
        "--text-embeddings")
  transformer_dir = pathlib.Path(model_path) / ("transformer" if whole
                                                else "")
  wan_pipeline.latent_shape(                     # fail before loading weights
      config.height, config.width, config.frames,
      patch_size=checkpoint.load_config(transformer_dir).patch_size)
  vae = (wan_vae_converter.load_vae(vae_path, allow_pth=allow_pth)
         if vae_path is not None else None)
  pipe = wan_pipeline.WanPipeline.from_checkpoint(                   # 1.
      model_path, vae=vae, dtype=dtype, load_text_encoder=prompt is not None,
      text_encoder_device=text_encoder_device)
  report = _config_fields(config)
  conditioning = _wan_text(pipe, report, prompt, negative_prompt,   # 2.
                           embeddings_path, text_encoder_device)
  return pipe, conditioning, report


def prepare_opensora(model_path, out, *, config, prompt, negative_prompt,
                     embeddings_path, vae_path, allow_pth, dtype, fps,
                     text_encoder_device, image=None):
  """(OpenSoraPipeline, (y, mask), report fields) for an OpenSora folder;
  refuses the options v1.2 has no use for."""
  del out, allow_pth, image  # `generate` refused an image
  unsupported = {
      "--text-embeddings": embeddings_path is not None,
      "--negative-prompt (v1.2 guides with its learned null caption)":
          negative_prompt is not None,
      "--vae (the folder has its VAE)": vae_path is not None,
      "--devices": config.devices is not None,
      "--vae-tile (its VAE decodes 17-frame chunks)":
          config.vae_tile is not None,
      "--shift (OpenSora transforms timesteps by resolution instead)":
          config.shift is not None,
      f"--scheduler {config.scheduler} (OpenSora samples with rectified-flow"
      " Euler)": config.scheduler not in (None, "euler"),
  }
  refused = [k for k, v in unsupported.items() if v]
  if refused:
    raise ValueError(f"{model_path} is an OpenSora v1.2 folder; not "
                     f"supported for it: {', '.join(refused)}")
  if prompt is None:
    raise ValueError("OpenSora needs --prompt")
  pipeline_class = opensora_pipeline.OpenSoraPipeline
  transformer_config, vae_config = pipeline_class.read_configs(model_path)
  opensora_pipeline.latent_shape(                # fail before loading weights
      config.height, config.width, config.frames, vae_config=vae_config,
      patch_size=transformer_config.patch_size,
      channels=transformer_config.in_channels)
  pipe = pipeline_class.from_pretrained(                              # 1.
      model_path, dtype=dtype, text_encoder_device=text_encoder_device)
  conditioning = pipe.encode_prompt(prompt, progress=True)           # 2.
  pipe.text_encoder = None  # free its (host) memory before sampling
  report = {"model": OPENSORA, "prompt": prompt,
            "text_encoder_device": text_encoder_device,
            "text": opensora_pipeline.prompt_text(prompt), "fps": fps,
            **_config_fields(config, "shift")}
  return pipe, conditioning, report


def check_wan22_size(model_path, height: int, width: int, frames: int):
  """A ValueError unless a Wan2.2 folder's model samples that video size
  (read from its configs, before any weights load)."""
  transformer_config, vae_config = pipelines.pipeline_class(
      model_path).read_configs(model_path)
  wan_pipeline.latent_shape(height, width, frames,
                            patch_size=transformer_config.patch_size,
                            temporal_factor=vae_config.temporal_factor,
                            spatial_factor=vae_config.spatial_factor)


def prepare_wan22(model_path, out, *, config, prompt, negative_prompt,
                  embeddings_path, vae_path, allow_pth, dtype, fps,
                  text_encoder_device, image=None):
  """(a Wan2.2 pipeline, (context, negative[, image conditioning]),
  report fields) for a converted Wan2.2 folder; `image` (3, H, W) in
  [-1, 1] at the video's size (TI2V-5B, I2V-A14B)."""
  del out, allow_pth, fps
  pipeline_class = pipelines.pipeline_class(model_path)
  if vae_path is not None:
    raise ValueError(f"{model_path} is a Wan2.2 folder; not supported for "
                     "it: --vae (the folder has its VAE)")
  check_wan22_size(model_path, config.height, config.width, config.frames)
  experts = ({} if config.expert_placement is None
             else {"expert_placement": config.expert_placement})
  pipe = pipeline_class.from_pretrained(                             # 1.
      model_path, dtype=dtype, load_text_encoder=prompt is not None,
      text_encoder_device=text_encoder_device, **experts)
  report = {"model": pipeline_class.MODEL, **_config_fields(config)}
  conditioning = _wan_text(pipe, report, prompt, negative_prompt,   # 2.
                           embeddings_path, text_encoder_device)
  if image is not None:
    conditioning = (*conditioning,
                    pipe.image_conditioning(image[None], config.frames))
    report["image_to_video"] = True
  return pipe, conditioning, report


PREPARE = {WAN: prepare_wan, OPENSORA: prepare_opensora,
           **{model: prepare_wan22 for model in WAN22}}
# The area TI2V's image-to-video fits the image's aspect ratio into, and
# the multiple of its sides (VAE 16x times the 2x2 patch).
TI2V_IMAGE_MULTIPLE = 32


def check_image(image_path, family: str, model_path):
  """A UsageError where --image is missing (I2V-A14B) or given to a model
  that takes no image."""
  if family in IMAGE_REQUIRED and image_path is None:
    raise common.UsageError(
        f"the following arguments are required for {family} (image to "
        f"video, {model_path}): --image PATH (an RGB image, the first frame)")
  if image_path is not None and family not in IMAGE_MODELS:
    raise common.UsageError(f"--image: {model_path} holds {family}; only "
                            f"{' and '.join(IMAGE_MODELS)} take an image")


def read_image(path, *, area: int, model: str = TI2V):
  """(pixels (3, H, W) float32 in [-1, 1], (H, W)) of the RGB image at
  `path`, at the video size `model` makes of it within `area` pixels:
  TI2V-5B: the size of area <= `area` nearest the image's aspect ratio
  (multiples of 32), the image scaled to cover it and centre-cropped
  (wan22's textimage2video.py); I2V-A14B: wan22 image2video.py's size
  (`wan22_pipeline.i2v_size`, multiples of 16), the image resized to it
  bicubically as PyTorch does (no crop)."""
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError("--image needs Pillow: pip install "
                     "'astraea-jax[image]'") from None
  try:
    with Image.open(path) as opened:
      opened.load()
      image = opened.copy()
  except OSError as e:  # UnidentifiedImageError is an OSError
    raise ValueError(f"--image {path}: cannot read it as an image ({e})"
                     ) from None
  bands = image.getbands()
  if bands != ("R", "G", "B"):
    raise ValueError(f"--image {path} has {len(bands)} channel(s) "
                     f"({image.mode}); give an RGB image (3 channels)")
  if model == I2V_A14B:
    width, height = wan22_pipeline.i2v_size(image.width, image.height, area)
    pixels = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
    return (wan22_pipeline.bicubic_resize(pixels * 2.0 - 1.0, height, width),
            (height, width))
  m = TI2V_IMAGE_MULTIPLE
  width, height = wan22_pipeline.best_output_size(image.width, image.height,
                                                  m, m, area)
  return wan22_pipeline.resize_crop(image, width, height), (height, width)


def generate(model_path, embeddings_path, out, *, config: GenerateConfig,
             vae_path=None, allow_pth=False, dtype=None, overwrite=False,
             prompt=None, negative_prompt=None, save_latents=False,
             fps: float = video_lib.WAN_FPS, sources=(),
             text_encoder_device: str = "accelerator", image_path=None):
  """Runs the pipeline; returns the report dict (see the module doc).

  Give `prompt` (str; needs a whole-model folder) or `embeddings_path`.
  The report's "outputs" lists the files written. sources: other (flag,
  path) pairs the caller read (e.g. the --schedule file), which the outputs
  must not overlap either. Each model is on the accelerator only during
  its stage (`placement`); text_encoder_device="cpu" encodes on the CPU.
  image_path: an RGB image (TI2V-5B image-to-video; I2V-A14B needs one);
  the video's size becomes the one of area <= height x width that fits
  the image (`read_image`).
  """
  if (prompt is None) == (embeddings_path is None):
    raise ValueError("give a prompt (--prompt) or text embeddings "
                     "(--text-embeddings), not both")
  paths = output_paths(out, accelerated=config.accelerated,
                       compare=config.compare, save_latents=save_latents)
  check_outputs(paths, out, overwrite=overwrite, sources=[
      ("--model", model_path), ("--vae", vae_path),
      ("--text-embeddings", embeddings_path), *sources])
  family = model_family(model_path)
  check_image(image_path, family, model_path)
  image = None
  if image_path is not None:
    image, (height, width) = read_image(
        image_path, area=config.height * config.width, model=family)
    config = dataclasses.replace(config, height=height, width=width)
  pipe, conditioning, report = PREPARE[family](
      model_path, out, config=config, prompt=prompt,
      negative_prompt=negative_prompt, embeddings_path=embeddings_path,
      vae_path=vae_path, allow_pth=allow_pth, dtype=dtype, fps=fps,
      text_encoder_device=text_encoder_device, image=image)
  results, videos, run_report = pipe.generate(conditioning, config,
                                              fps=fps)          # 3.-5.
  report.update(run_report, outputs=[str(p) for p in paths.values()])
  write_outputs(out, paths, results, videos, report, overwrite=overwrite,
                fps=fps)
  return report


# The command ------------------------------------------------------------------


def _video_size(args, default=(480, 832)) -> tuple[int, int]:
  """(height, width) from --size WxH or --height/--width (default: the
  model's 480p size)."""
  if args.size is None:
    return args.height or default[0], args.width or default[1]
  if args.height is not None or args.width is not None:
    raise common.UsageError("give --size WIDTHxHEIGHT or --height/--width, "
                            "not both")
  parts = args.size.lower().replace("*", "x").split("x")
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    raise common.UsageError(f"--size {args.size!r} must be WIDTHxHEIGHT, "
                            "e.g. 832x480 (480p) or 1280x720")
  width, height = (int(p) for p in parts)
  if not width or not height:
    raise common.UsageError(f"--size {args.size!r}: width and height must "
                            "be > 0")
  return height, width


def _print_report(report, out):
  for name in ("full", "astraea"):
    if name in report:
      r = report[name]
      steady = r["seconds_without_compiles"]
      print(f"{name}: {r['seconds']:.1f} s with its compiles"
            + (f", {steady:.1f} s warm (compiled steps)" if steady is not None
               else ""))
  if "astraea" in report and report["astraea"]["estimated_peak_gib"]:
    r = report["astraea"]
    print(f"astraea token state: {r['cache_dtype']} updates, Delta sketch "
          f"{r['delta_sketch'] or 'off (exact)'}; estimated device peak "
          f"{r['estimated_peak_gib']:.1f} GiB")
  if "psnr_db" in report:
    extra = (f", SSIM {report['ssim']:.4f}" if "ssim" in report else "")
    warm = (f"speedup {report['speedup_without_compiles']:.2f}x warm"
            if report.get("speedup_without_compiles")
            else "warm speedup not measured (a token count ran only once, "
            "so its time includes compilation; use more --steps)")
    print(f"{warm}, {report['speedup_with_compiles']:.2f}x with compiles "
          "(cached for the next run); PSNR vs full "
          f"({report['compared_on']}) {report['psnr_db']:.2f} dB{extra}")
  if is_video_path(out):
    print(f"wrote {', '.join(report['outputs'])}")
  else:
    videos = sorted(p.name for p in pathlib.Path(out).glob("*.mp4"))
    print(f"wrote {out}/outputs.safetensors, {out}/report.json"
          + "".join(f", {out}/{v}" for v in videos))


def run(args) -> int:
  if args.model is not None and args.model_option is not None:
    raise common.UsageError("give the model once: positionally or with "
                            "--model")
  model = args.model if args.model is not None else args.model_option
  if model is None:
    raise common.UsageError("no model: pass --model DST (a converted folder)")
  if args.negative_prompt is not None and args.prompt is None:
    raise common.UsageError("--negative-prompt needs --prompt")
  common.check_model(model)
  accelerated = args.budget is not None or args.schedule is not None
  if args.compare and not accelerated:
    raise common.UsageError("--compare compares Astraea with the full "
                            "model: give --budget or --schedule too")
  switch = expert_switch(args.expert_switch, model_family(model), model,
                         accelerated=accelerated)
  placement = expert_placement(args.expert_placement, model_family(model),
                               model, devices=args.devices)
  # Unset options take the model's defaults (Wan2.1 or OpenSora v1.2).
  defaults = defaults_for(model)
  pick = lambda name: (getattr(args, name) if getattr(args, name) is not None
                       else defaults[name])
  height, width = _video_size(args, (defaults["height"], defaults["width"]))
  steps = pick("steps")
  common.note_empty_prompt(args.prompt)
  if args.default_schedule and args.budget is None:
    raise common.UsageError("--default-schedule picks the schedule of a "
                            "--budget: give --budget too")
  searched = (pathlib.Path(model) / schedule_lib.SCHEDULES_DIR,
              common.model_schedule_id(model))
  schedule = common.budget_schedule(args, steps, searched=searched)
  state = common.token_state(args, accelerated)
  config = GenerateConfig(
      height=height, width=width, frames=pick("frames"),
      steps=steps, guidance_scale=pick("guidance"), shift=args.shift,
      scheduler=pick("scheduler"), seed=args.seed, budget=None,
      schedule=schedule, compare=args.compare, devices=args.devices,
      selection=state, vae_tile=args.vae_tile, expert_switch=switch,
      expert_placement=placement)
  report = generate(model, args.text_embeddings, args.out, config=config,
                    vae_path=args.vae, allow_pth=args.allow_pth,
                    dtype=args.dtype, overwrite=args.overwrite,
                    prompt=args.prompt, negative_prompt=args.negative_prompt,
                    save_latents=args.save_latents, fps=pick("fps"),
                    sources=common.sources(("--schedule", args.schedule),
                                           ("--image", args.image)),
                    text_encoder_device=args.text_encoder_device,
                    image_path=args.image)
  _print_report(report, args.out)
  return 0


def add_parser(sub, parents):
  p = sub.add_parser(
      "generate", parents=parents, help="text to video with a converted "
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
  p.add_argument("--image", default=None, metavar="PATH",
                 help="Wan2.2 image-to-video (TI2V-5B; required for "
                      "I2V-A14B): an RGB image as the first frame; the "
                      "video takes a size of area <= WIDTHxHEIGHT near its "
                      "aspect ratio")
  p.add_argument("--negative-prompt", default=None,
                 help="what to steer away from (default: empty)")
  p.add_argument("--out", required=True,
                 help="NAME.mp4 (the video), or an output folder")
  p.add_argument("--size", default=None,
                 help="WIDTHxHEIGHT, e.g. 832x480 (Wan2.1 default), 848x480 "
                      "(OpenSora default) or 1280x720; multiples of 16")
  common.add_video_size_options(
      p, height=None, width=None, frames=None,
      help_frames="Wan2.1: 1 + 4k (default 81); OpenSora: 1 or >= 17 "
      "(default 51)")
  p.add_argument("--fps", type=common.POSITIVE, default=None,
                 help="frame rate of the MP4 (Wan2.1: 16; OpenSora: 24, also "
                      "its fps condition)")
  p.add_argument("--save-latents", action="store_true",
                 help="with --out NAME.mp4, also write "
                      "NAME.latents.safetensors (folders always hold them)")
  p.add_argument("--steps", type=common.POSITIVE_INT, default=None,
                 help="sampling steps (Wan2.1: 50; OpenSora: 30)")
  p.add_argument("--guidance", type=common.NONNEGATIVE, default=None,
                 help="CFG scale >= 0 (Wan2.1, Wan2.2 TI2V: 5.0; OpenSora: "
                      "7.0; Wan2.2 T2V-A14B: 4.0 high-noise / 3.0 "
                      "low-noise expert, I2V-A14B: 3.5 both; this flag sets "
                      "both)")
  p.add_argument("--shift", type=common.POSITIVE, default=None,
                 help="flow shift (Wan2.1: 3.0 up to 480p, else 5.0; Wan2.2: "
                      "TI2V 5.0, T2V-A14B 12.0, I2V-A14B 5.0)")
  p.add_argument("--scheduler", choices=["unipc", "euler"], default=None,
                 help="Wan2.1: unipc (default) or euler; OpenSora: its "
                      "rectified-flow Euler only")
  p.add_argument("--seed", type=common.SEED, default=0)
  common.add_budget_options(p, "Astraea mean token budget in (0, 1]")
  common.add_token_state_options(p)
  add_expert_switch_option(p)
  p.add_argument(
      "--expert-placement", choices=list(dense_sampler.EXPERT_PLACEMENTS),
      default=None,
      help="Wan2.2 A14B: keep one expert on the accelerator at a time (one: "
           "the default on one device, the other waits in host memory: at "
           "480p one expert and Astraea's state fit 80 GB by arithmetic, "
           "not yet measured) or both for the whole run "
           "(both: no copy at the switch; the default with --devices); the "
           "same video either way")
  p.add_argument("--compare", action="store_true",
                 help="also run the full model; print speedup and PSNR/SSIM")
  p.add_argument("--vae", default=None,
                 help="Wan VAE (.safetensors, diffusers vae/ folder, or .pth "
                      "with --allow-pth) to decode the video")
  p.add_argument("--allow-pth", action="store_true",
                 help="allow reading a PyTorch pickle (.pth) VAE")
  common.add_dtype_option(p)
  p.add_argument("--vae-tile", type=common.vae_tile, default=None,
                 metavar="PIXELS",
                 help="Wan: decode in spatial tiles of PIXELS (a multiple of "
                      "8, e.g. 256), blended where they meet: for sizes "
                      "above 720p or small GPUs (close to, not equal to, "
                      "whole frames); default: whole frames")
  p.add_argument("--text-encoder-device", choices=["accelerator", "cpu"],
                 default="accelerator",
                 help="where the text encoder runs: on the accelerator "
                      "(default; it leaves before sampling starts) or on the "
                      "CPU (no accelerator memory, slower: as Wan's t5_cpu)")
  p.add_argument("--devices", type=common.POSITIVE_INT, default=None,
                 help="sample on N devices: the CFG branches over a data "
                      "axis, each video's tokens over the rest (sequence "
                      "parallel); default: one device")
  p.add_argument("--overwrite", action="store_true",
                 help="replace outputs of an earlier astraea run")
  p.set_defaults(run=run)
