"""What the Wan2.1 and OpenSora v1.2 pipelines share: loading a converted
whole-model folder (`from_pretrained`), steps 2-4 of `__call__` (noise,
denoise, decode) and `generate`, the timed run `astraea generate` reports.

A family's pipeline subclasses `Pipeline` and names its `MODEL` (the
manifest's model), `DEFAULTS` (`astraea generate`'s) and the family's
`tokenize` / `encode_prompt` / `latent_shape` / `denoise` / `decode`;
`_video_options` and `_generate_options` pass what its `denoise` needs
beyond the shared arguments. Subclasses register themselves by `MODEL`
(`PIPELINES`), so a folder's manifest picks its pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax import checkpoint, metrics
from astraea_jax import placement as placement_lib
from astraea_jax.astraea import selection as selection_lib
from astraea_jax.astraea import wan_tokenwise
from astraea_jax.models.text import tokenizer as tokenizer_lib
from astraea_jax.sampling import memory
from astraea_jax.sampling import sampler as dense_sampler

F32 = jnp.float32
# {manifest model: its pipeline class}, filled by the subclasses.
PIPELINES: dict[str, type] = {}


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """What `astraea generate` samples: the video, the sampler, Astraea's
  budget (None: the full model) and whether to compare with the full
  model."""

  height: int = 480
  width: int = 832
  frames: int = 81
  steps: int = 50
  guidance_scale: float = 5.0
  shift: float | None = None
  scheduler: str | None = None  # None: the model's (Wan2.1: unipc)
  seed: int = 0
  budget: float | None = None
  schedule: tuple[float, ...] | None = None
  compare: bool = False
  devices: int | None = None  # N: astraea_jax.parallel over N devices
  # Astraea's token state (None: selection.SelectionConfig()'s lean one).
  selection: selection_lib.SelectionConfig | None = None
  # Decode in spatial tiles of this many pixels (None: whole frames).
  vae_tile: int | None = None
  # Two experts (Wan2.2 A14B) with Astraea: what the token caches do at
  # the switch, a key of `wan_tokenwise.EXPERT_SWITCHES` (None: the
  # sampler's default; models of one expert have no switch).
  expert_switch: str | None = None
  # Two experts: "one" on the accelerator at a time, or "both" for the
  # whole run (`sampler.run_by_expert`; None: the pipeline's own).
  expert_placement: str | None = None

  def __post_init__(self):
    if self.expert_switch not in (None, *wan_tokenwise.EXPERT_SWITCHES):
      raise ValueError(f"{self.expert_switch=} must be None or one of "
                       f"{tuple(wan_tokenwise.EXPERT_SWITCHES)}")
    if self.expert_placement is not None:
      dense_sampler.check_expert_placement(self.expert_placement)

  @property
  def accelerated(self) -> bool:
    return self.budget is not None or self.schedule is not None


def pipeline_class(path) -> type:
  """The pipeline class of a converted whole-model folder's model; a
  ValueError for a model with no pipeline (its models load with
  `checkpoint.load_model`)."""
  model = checkpoint.manifest_model(path)
  if model not in PIPELINES:
    raise ValueError(
        f"{path} holds {model}: its models load with "
        "astraea_jax.checkpoint.load_model, but no pipeline runs it yet "
        f"(pipelines: {', '.join(sorted(PIPELINES))})")
  return PIPELINES[model]


def latent_size(height: int, width: int, num_frames: int, frames: int, *,
                patch_size, spatial_factor: int, note: str = ""):
  """(h, w) of the latents of a `height` x `width` video whose
  `num_frames` frames encode to `frames` latent frames; a ValueError names
  the nearest sizes that fit the VAE's `spatial_factor` and `patch_size`
  (`note` is added to the reason)."""
  pt, ph, pw = patch_size
  if frames % pt:
    raise ValueError(f"{num_frames=} gives {frames} latent frames, not a "
                     f"multiple of the temporal patch {pt}")
  mh, mw = spatial_factor * ph, spatial_factor * pw
  if height % mh or width % mw or height < mh or width < mw:
    near = lambda x, m: sorted({max(m, x // m * m), max(m, -(-x // m) * m)})
    raise ValueError(
        f"{height=} and {width=} must be multiples of {mh} and {mw} (VAE "
        f"{spatial_factor}x times patch {ph}x{pw}{note}): nearest height "
        f"{near(height, mh)}, width {near(width, mw)}")
  return height // spatial_factor, width // spatial_factor


# {component: (its stage, what fits when the stage runs out of memory)}.
STAGES = {
    "text_encoder": ("text encoding", "run the text encoder on the CPU "
                     "(--text-encoder-device cpu; text_encoder_device='cpu')"),
    "transformer": ("denoising", "a smaller video (--size/--frames); with "
                    "--budget the 8-bit token state (--cache-dtype float8); "
                    "or more devices (--devices N)"),
    "vae": ("decoding", "decode in spatial tiles (--vae-tile 256; "
            "decode(tile=256))"),
}


def stage(component: str):
  """Decorates a pipeline method that computes with `component`
  ("text_encoder", "transformer" or "vae"): an offloaded component is on
  the accelerator while the method runs and released after it
  (`placement.placed`); outputs computed on the CPU device (a "cpu" text
  encoder) come back on the accelerator; running out of device memory
  ends in one `DoesNotFitError` naming the stage and what would fit
  (the pipeline's `STAGES`)."""

  def wrap(method):
    @functools.wraps(method)
    def run(self, *args, **kwargs):
      with memory.stage(*self.STAGES[component]), placement_lib.placed(
          self.stage_module(component)):
        return placement_lib.to_accelerator(method(self, *args, **kwargs))
    return run

  return wrap


OUTPUT_TYPES = ("video", "np", "latents")


def check_output_type(output_type: str):
  """"video": a device array; "np": NumPy frames, each decoded chunk copied
  to the host as it finishes (the whole video never sits on the
  accelerator); "latents": no decoding."""
  if output_type not in OUTPUT_TYPES:
    raise ValueError(f"{output_type=} must be one of {OUTPUT_TYPES}")


def check_one_text_input(prompt, prompt_embeds):
  if (prompt is None) == (prompt_embeds is None):
    raise ValueError("give exactly one of `prompt` and `prompt_embeds`")


def compare_report(report, results, videos):
  """Adds speedup and PSNR (and SSIM on videos) of Astraea vs the full
  model to `report` (which holds both runs' "seconds_without_compiles")."""
  full = report["full"]["seconds_without_compiles"]
  fast = report["astraea"]["seconds_without_compiles"]
  # Only from compiled steps: a token count that ran once has no warm time.
  report["speedup_without_compiles"] = (full / fast if full and fast
                                        else None)
  # Cold: each run with its compiles in this process (a first video); the
  # compilation cache makes the next process's runs close to the warm one.
  report["speedup_with_compiles"] = (report["full"]["seconds"]
                                     / report["astraea"]["seconds"])
  a, b = (videos or results)["astraea"], (videos or results)["full"]
  rng = 2.0 if videos else float(jnp.max(b) - jnp.min(b))
  report["compared_on"] = "video" if videos else "latents"
  report["psnr_db"] = float(metrics.psnr(a, b, data_range=rng))
  if videos:
    report["ssim"] = float(metrics.ssim(a, b, channel_axis=-3))


class Pipeline(nnx.Module):
  """Tokenizer, text encoder, DiT and VAE of one model family.

  An NNX module (split/merge/jit it like one); the tokenizer is a static
  attribute. `text_encoder`/`tokenizer` may be None when prompts come as
  embeddings, `vae` None when only latents are wanted.
  """

  MODEL: ClassVar[str]
  DEFAULTS: ClassVar[dict]
  # {component: (its stage, what fits when the stage runs out of memory)}.
  STAGES: ClassVar[dict] = STAGES

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "MODEL" in cls.__dict__:  # a shared intermediate class names none
      PIPELINES[cls.MODEL] = cls

  def __init__(self, transformer, vae=None, text_encoder=None,
               tokenizer=None, *, text_len: int | None = None):
    self.transformer = transformer
    self.vae = vae
    self.text_encoder = text_encoder
    self.tokenizer = tokenizer
    self.text_len = int(text_len or self._default_text_len())
    self._check_components()

  def _default_text_len(self) -> int:
    raise NotImplementedError

  def _check_components(self):
    """Raises ValueError where the components do not fit together."""

  def stage_module(self, component: str):
    """The module `stage(component)` places for its stage (None: the
    stage places its parameters itself, as Wan2.2 A14B's experts one at a
    time)."""
    return getattr(self, component)

  # Loading -------------------------------------------------------------------

  @classmethod
  def read_manifest(cls, path) -> dict:
    """The folder's manifest, refused unless it holds this family."""
    model = checkpoint.manifest_model(path)
    if model != cls.MODEL:
      other = pipeline_class(path).__name__
      raise ValueError(f"{path} holds {model}, not {cls.MODEL}: load it "
                       f"with astraea_jax.pipelines.{other}")
    return checkpoint.read_manifest(path)

  @classmethod
  def read_configs(cls, path):
    """(transformer config, VAE config) of a converted whole-model folder,
    without loading weights (to check a video size first)."""
    manifest = cls.read_manifest(path)
    return tuple(checkpoint.load_config(
        checkpoint.component_path(path, manifest, name))
                 for name in ("transformer", "vae"))

  @staticmethod
  def _load_text_parts(path, manifest, dtype, placement="accelerator"):
    """(text encoder, tokenizer) of a converted whole-model folder."""
    part = lambda name: checkpoint.component_path(path, manifest, name)
    return (checkpoint.load_model(part("text_encoder"), dtype=dtype,
                                  placement=placement),
            tokenizer_lib.UMT5Tokenizer.from_folder(part("tokenizer")))

  @classmethod
  def from_pretrained(cls, path, *, dtype: str | None = None,
                      vae_dtype: str | None = None,
                      text_encoder_dtype: str | None = None,
                      load_text_encoder: bool = True, offload: bool = True,
                      text_encoder_device: str = "accelerator"):
    """From a converted whole-model folder (`astraea convert` output).

    dtype: compute dtype of the transformer (default: as converted);
    text_encoder_dtype defaults to `dtype`; vae_dtype to the VAE's own
    (float32). load_text_encoder=False skips the encoder and tokenizer
    (prompts then come as embeddings). offload (default): each model's
    parameters stay in host memory and are on the accelerator only during
    its stage (text encoding, denoising, decoding), so the accelerator
    holds one model at a time; False keeps all of them there (no copy per
    call: faster for many videos from one pipeline). text_encoder_device
    "cpu" runs the text encoder on the CPU (no accelerator memory; slow).
    See `astraea_jax.placement`.
    """
    if text_encoder_device not in ("accelerator", "cpu"):
      raise ValueError(f"{text_encoder_device=} must be 'accelerator' or "
                       "'cpu'")
    where = "offload" if offload else "accelerator"
    path = pathlib.Path(path)
    manifest = cls.read_manifest(path)
    part = lambda name: checkpoint.component_path(path, manifest, name)
    transformer = checkpoint.load_model(part("transformer"), dtype=dtype,
                                        placement=where)
    vae = checkpoint.load_model(part("vae"), dtype=vae_dtype,
                                placement=where)
    text_parts = (cls._load_text_parts(
        path, manifest, text_encoder_dtype or dtype,
        "cpu" if text_encoder_device == "cpu" else where)
                  if load_text_encoder else (None, None))
    return cls(transformer, vae, *text_parts,
               text_len=manifest.get("text_len"))

  # The family's stages -------------------------------------------------------

  def latent_shape(self, height: int, width: int, num_frames: int,
                   batch: int = 1):
    raise NotImplementedError

  def denoise(self, noise, *conditioning, **options):
    raise NotImplementedError

  def decode(self, latents, *, num_frames: int | None = None,
             progress: bool = False, to_host: bool = False):
    raise NotImplementedError

  def _video_options(self, height: int, width: int, num_frames: int) -> dict:
    """What `denoise` needs to know of the video besides the noise."""
    del height, width, num_frames
    return {}

  def _generate_options(self, config: GenerateConfig, fps: float) -> dict:
    """`denoise` options of `generate` beyond steps and guidance."""
    raise NotImplementedError

  # 2.-4. of __call__ ----------------------------------------------------------

  def noise_for(self, shape, *, seed: int = 0, noise=None):
    """`noise` checked against the latent shape, or drawn from `seed`."""
    if noise is None:
      return dense_sampler.draw_noise(jax.random.key(seed), shape)
    if tuple(noise.shape) != shape:
      raise ValueError(f"{noise.shape=} does not match the video: {shape}")
    return noise

  def sample_video(self, conditioning, *, height: int, width: int,
                   num_frames: int, seed: int = 0, noise=None,
                   output_type: str = "video", progress: bool = True,
                   **options):
    """Steps 2-4 of `__call__` from the text conditioning (a tuple whose
    first entry has the batch size): the noise, `denoise` and `decode`."""
    shape = self.latent_shape(height, width, num_frames,               # 2.
                              batch=conditioning[0].shape[0])
    noise = self.noise_for(shape, seed=seed, noise=noise)
    latents = self.denoise(                                            # 3.
        noise, *conditioning, progress=progress,
        **self._video_options(height, width, num_frames), **options)
    if output_type == "latents":
      return latents
    return self.decode(latents, num_frames=num_frames,                 # 4.
                       progress=progress, to_host=output_type == "np")

  # `astraea generate` ---------------------------------------------------------

  def generate(self, conditioning, config: GenerateConfig, *, fps: float):
    """(latents, videos, report) of the runs `config` asks for: Astraea
    and/or the full model from the same noise, each timed (without the
    compiling steps too); videos only with a VAE; speedup and PSNR/SSIM
    with `config.compare`."""
    shape = self.latent_shape(config.height, config.width, config.frames)
    noise = self.noise_for(shape, seed=config.seed)
    options = dict(num_inference_steps=config.steps,
                   guidance_scale=config.guidance_scale, progress=True,
                   **self._video_options(config.height, config.width,
                                         config.frames),
                   **self._generate_options(config, fps))
    report = {"latent_shape": list(shape), "seed": config.seed}
    results = {}
    with memory.stage(*self.STAGES["transformer"]), placement_lib.placed(
        self.stage_module("transformer")):  # placed once for both runs
      self._sample_runs(noise, conditioning, config, options, report,
                        results)
    videos = {}
    if self.vae is not None:
      tiled = {} if config.vae_tile is None else {"tile": config.vae_tile}
      videos = {k: self.decode(v, num_frames=config.frames, progress=True,
                               to_host=True, **tiled)
                for k, v in results.items()}
    if config.accelerated and config.compare:
      compare_report(report, results, videos)
    return results, videos, report

  def _sample_runs(self, noise, conditioning, config, options, report,
                   results):
    """`generate`'s sampling: Astraea and/or the full model into
    `results`, their times into `report`."""
    if config.accelerated:
      t0 = time.perf_counter()
      state = config.selection or selection_lib.SelectionConfig()
      latents, stats = self.denoise(
          noise, *conditioning, budget=config.budget,
          schedule=config.schedule, return_stats=True,
          selection_config=state, **options)
      report["astraea"] = {
          "seconds": time.perf_counter() - t0,
          "seconds_without_compiles": dense_sampler.steady_seconds(
              stats.step_seconds, stats.num_selected),
          "schedule": [float(b) for b in stats.budgets],
          "mean_budget": float(np.mean(stats.budgets)),
          "compiles": len(stats.compiled_k),
          "cache_dtype": state.cache_dtype,
          "delta_sketch": state.delta_sketch,
          "estimated_peak_gib": (
              None if stats.estimated_peak_bytes is None
              else stats.estimated_peak_bytes / 2**30)}
      results["astraea"] = latents
    if not config.accelerated or config.compare:
      step_seconds = []
      t0 = time.perf_counter()
      results["full"] = self.denoise(noise, *conditioning,
                                     step_seconds=step_seconds, **options)
      report["full"] = {
          "seconds": time.perf_counter() - t0,
          "seconds_without_compiles": dense_sampler.steady_seconds(
              step_seconds, [0] * len(step_seconds))}
