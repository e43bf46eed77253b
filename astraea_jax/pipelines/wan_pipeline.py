"""Wan2.1 text-to-video end to end: prompt -> umT5 -> DiT sampling -> VAE.

  astraea convert Wan-AI/Wan2.1-T2V-1.3B-Diffusers wan-1.3b/
  python -c 'from astraea_jax.pipelines import WanPipeline; ...'

  pipe = WanPipeline.from_pretrained("wan-1.3b", dtype="bfloat16")
  video = pipe("A cat and a dog baking a cake together in a kitchen.",
               height=480, width=832, num_frames=81, budget=0.4)
  astraea_jax.video.write_mp4("cat.mp4", video)

Numbered like diffusers' `WanPipeline.__call__`:
  1. encode the prompt and the negative prompt (tokenizer on the host, then
     the umT5 encoder; outputs cut to each prompt's tokens and zero-padded
     to text_len, as Wan does);
  2. draw the initial noise from `seed` (or take `noise`);
  3. denoise: CFG sampling, dense or Astraea (`budget` / `schedule`);
  4. decode the latents with the VAE: video (B, 3, T, H, W) in [-1, 1].

Each stage is a method that is also a pure function of the pipeline's
parameters, so it can run under `jax.jit` (split the pipeline like any NNX
module): `encode_tokens(ids, mask)`, `denoise(noise, context, negative,
loop="scan")` (dense) and `decode(latents)`. The host-side conveniences
(strings, progress bars, per-step compiles of Astraea's K) live in
`encode_prompt`, `denoise(loop="python")` and `decode(progress=True)`:

  graphdef, state = nnx.split(pipe)
  decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z))

A converted whole-model folder (what `astraea convert` writes from a full
Wan2.1 download) holds `manifest.json` and one converted checkpoint per
component: transformer/, vae/, text_encoder/ (config.json + orbax params/)
and tokenizer/ (the tokenizer files as published); `checkpoint` reads it,
`pipelines.base.Pipeline` loads it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import tqdm
from flax import nnx

from astraea_jax import checkpoint, parallel
from astraea_jax import video as video_lib
from astraea_jax.astraea import wan_tokenwise as astraea_sampler
from astraea_jax.pipelines import base
from astraea_jax.sampling import sampler as dense_sampler
from astraea_jax.vae import wan_vae

F32 = jnp.float32
# Video -> latent factors of the Wan2.1 VAE (used when no VAE is loaded).
WAN21_TEMPORAL_FACTOR, WAN21_SPATIAL_FACTOR = 4, 8


# Shapes -----------------------------------------------------------------------


def latent_shape(height: int, width: int, num_frames: int, *,
                 patch_size=(1, 2, 2), temporal_factor=WAN21_TEMPORAL_FACTOR,
                 spatial_factor=WAN21_SPATIAL_FACTOR, batch: int = 1,
                 channels: int = 16):
  """(B, C, F, h, w) latents of a video, or a ValueError saying what fits.

  The VAE keeps the first frame and compresses the rest `temporal_factor`x
  in time, `spatial_factor`x in space; the DiT then cuts the latents into
  patches of `patch_size` (t, h, w).
  """
  if num_frames < 1 or (num_frames - 1) % temporal_factor:
    lower = max(1, (num_frames - 1) // temporal_factor * temporal_factor + 1)
    raise ValueError(
        f"{num_frames=} must be 1 + {temporal_factor}k (the VAE keeps the "
        f"first frame and compresses time {temporal_factor}x); nearest: "
        f"{lower} or {lower + temporal_factor}")
  frames = (num_frames - 1) // temporal_factor + 1
  h, w = base.latent_size(height, width, num_frames, frames,
                          patch_size=patch_size,
                          spatial_factor=spatial_factor,
                          note="; multiples of 16 for Wan2.1")
  return (batch, channels, frames, h, w)


# Jitted host-side stages: graphdefs static, parameters traced. -------------


@functools.partial(jax.jit, static_argnums=(0, 4))
def _encode_jit(graphdef, state, ids, mask, text_len):
  return nnx.merge(graphdef, state).encode_for_wan(ids, mask,
                                                   text_len=text_len)


# The pipeline -----------------------------------------------------------------


class WanPipeline(base.Pipeline):
  """Wan2.1 text-to-video: tokenizer, umT5 encoder, WanDiT, Wan VAE.

  An NNX module (split/merge/jit it like one); the tokenizer is a static
  attribute. `text_encoder`/`tokenizer` may be None when prompts come as
  embeddings, `vae` None when only latents are wanted.
  """

  MODEL = checkpoint.MANIFEST_MODELS[checkpoint.MANIFEST_FORMAT]
  # `astraea generate` defaults.
  DEFAULTS = {"height": 480, "width": 832, "frames": 81, "steps": 50,
              "guidance": 5.0, "fps": float(video_lib.WAN_FPS),
              "scheduler": "unipc"}

  def _default_text_len(self) -> int:
    return self.transformer.config.text_len

  def _check_components(self):
    if self.text_encoder is not None and self.transformer is not None:
      d = self.text_encoder.config.d_model
      want = self.transformer.config.text_dim
      if d != want:
        raise ValueError(f"text encoder width {d} != the transformer's "
                         f"text_dim={want}")

  @classmethod
  def from_checkpoint(cls, path, *, vae=None, dtype: str | None = None,
                      load_text_encoder: bool = True,
                      text_encoder_device: str = "accelerator"
                      ) -> WanPipeline:
    """A converted whole-model folder (`from_pretrained`), or a converted
    transformer alone with `vae` (a loaded VAE, or None)."""
    if checkpoint.is_model_folder(path):
      return cls.from_pretrained(path, dtype=dtype,
                                 load_text_encoder=load_text_encoder,
                                 text_encoder_device=text_encoder_device)
    return cls(checkpoint.load_model(path, dtype=dtype), vae)

  @classmethod
  def text_only(cls, path, *, dtype: str | None = None) -> WanPipeline:
    """Only the text encoder and tokenizer of a converted whole-model
    folder (`encode_prompt` without loading the DiT and the VAE)."""
    manifest = checkpoint.read_manifest(path)
    return cls(None, None, *cls._load_text_parts(path, manifest, dtype),
               text_len=manifest["text_len"])

  # 1. Text -------------------------------------------------------------------

  def tokenize(self, prompts):
    """(ids, mask) (B, text_len) int32 numpy: Wan's cleaning + umT5 tokens."""
    if self.tokenizer is None:
      raise ValueError("this pipeline has no tokenizer: load a whole-model "
                       "folder, or pass prompt embeddings")
    return self.tokenizer(prompts, self.text_len)

  def encode_tokens(self, ids, mask):
    """(B, text_len) ids and mask -> Wan context (B, text_len, text_dim),
    zero past each prompt's tokens. Pure; jittable."""
    if self.text_encoder is None:
      raise ValueError("this pipeline has no text encoder: load a "
                       "whole-model folder, or pass prompt embeddings")
    return self.text_encoder.encode_for_wan(
        jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
        text_len=self.text_len)

  @base.stage("text_encoder")
  def encode_prompt(self, prompt, negative_prompt="", *,
                    progress: bool = False):
    """(context, negative_context), each (B, text_len, text_dim) float32.

    prompt: a string or a list of B strings; negative_prompt: a string
    (used for every prompt) or a list of B. An empty negative prompt is
    encoded like any other (diffusers' default), not replaced by zeros.
    One prompt per encoder call (one compile for all).
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = ([negative_prompt] * len(prompts)
                 if isinstance(negative_prompt, str) else list(negative_prompt))
    if not prompts or len(negatives) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts and {len(negatives)} negative"
                       " prompts: give one negative prompt or one per prompt")
    if self.text_encoder is None or self.tokenizer is None:
      raise ValueError("this pipeline has no text encoder and tokenizer: "
                       "load a whole-model folder, or pass prompt embeddings")
    graphdef, state = nnx.split(self.text_encoder)
    rows = []
    for text in tqdm.tqdm(prompts + negatives, disable=not progress,
                          desc="text encoding", unit="prompt"):
      ids, mask = self.tokenize([text])
      rows.append(_encode_jit(graphdef, state, jnp.asarray(ids),
                              jnp.asarray(mask), self.text_len))
      if progress:
        rows[-1].block_until_ready()
    b = len(prompts)
    return jnp.concatenate(rows[:b]), jnp.concatenate(rows[b:])

  def text_conditioning(self, prompt, negative_prompt, prompt_embeds,
                        negative_prompt_embeds, *, progress: bool = False):
    """(context, negative_context) of `__call__`: the prompts encoded, or
    the given embeddings (no negative ones: a zero row, as Wan's empty
    context)."""
    base.check_one_text_input(prompt, prompt_embeds)
    if prompt is not None:
      return self.encode_prompt(prompt, negative_prompt, progress=progress)
    context = jnp.asarray(prompt_embeds, F32)
    negative = (jnp.zeros_like(context[:, :1])
                if negative_prompt_embeds is None
                else jnp.asarray(negative_prompt_embeds, F32))
    return context, negative

  # 2. Noise ------------------------------------------------------------------

  def latent_shape(self, height: int, width: int, num_frames: int,
                   batch: int = 1):
    """Latent shape of a video, checked against the VAE and patch sizes."""
    vae = self.vae.config if self.vae is not None else None
    return latent_shape(
        height, width, num_frames, patch_size=self.transformer.config
        .patch_size, batch=batch, channels=self.transformer.config.in_dim,
        temporal_factor=vae.temporal_factor if vae else WAN21_TEMPORAL_FACTOR,
        spatial_factor=vae.spatial_factor if vae else WAN21_SPATIAL_FACTOR)

  # 3. Denoising --------------------------------------------------------------

  @base.stage("transformer")
  def denoise(self, noise, context, negative_context, *,
              num_inference_steps: int = 50, guidance_scale: float = 5.0,
              shift: float | None = None, scheduler="unipc", budget=None,
              schedule=None, selection_config=None, loop: str = "python",
              progress: bool = False, return_stats: bool = False,
              step_seconds: list | None = None, devices: int | None = None):
    """CFG sampling from `noise` (B, 16, F, h, w) -> latents.

    Dense unless `budget` (mean token budget in (0, 1]) or `schedule` (one
    budget per step) asks for Astraea. Dense with loop="scan" is one XLA
    program (jittable as a whole); Astraea compiles one step per distinct K
    and runs them from the host. return_stats (Astraea only): also return
    the `SampleStats`; step_seconds (dense only): a list that receives each
    step's time. devices: sample on N devices (`parallel.samplers`).
    """
    graphdef, params = nnx.split(self.transformer)
    common = {"scheduler": scheduler, "steps": num_inference_steps,
              "guidance_scale": guidance_scale, "shift": shift,
              "progress": progress}
    dense_sample, astraea_sample = dense_sampler.sample, astraea_sampler.sample
    if devices is not None:
      dense_sample, astraea_sample = parallel.samplers(
          devices, batch=2 * noise.shape[0])
    if budget is None and schedule is None:
      if return_stats:
        raise ValueError("return_stats needs Astraea (budget or schedule)")
      return dense_sample(graphdef, params, noise, context, negative_context,
                          loop=loop, step_seconds=step_seconds, **common)
    extra = {} if selection_config is None else {
        "selection_config": selection_config}
    return astraea_sample(
        graphdef, params, noise, context, negative_context, budget=budget,
        schedule=schedule, return_stats=return_stats, **extra, **common)

  # 4. Decoding ---------------------------------------------------------------

  @base.stage("vae")
  def decode(self, latents, *, num_frames: int | None = None,
             progress: bool = False, to_host: bool = False,
             tile: int | None = None):
    """latents (B, 16, F, h, w) -> video (B, 3, 1 + 4(F-1), 8h, 8w) float32
    in [-1, 1]. With neither `progress` nor `to_host` nor `tile`:
    `WanVAE.decode` jitted (pure; works under an outer jit too). Otherwise
    one latent frame at a time from the host (`wan_vae.decode_chunked`, the
    same numbers), with a progress bar if `progress`; to_host copies each
    chunk's frames to host memory as it finishes (a NumPy video, never
    whole on the device). tile: decode in spatial tiles of `tile` pixels
    (`wan_vae.decode_tiled`: for sizes above 720p or small GPUs; close to,
    not equal to, the untiled video), a NumPy video. num_frames: the
    video's frames, if given checked against the latents."""
    if self.vae is None:
      raise ValueError("this pipeline has no VAE to decode with")
    if num_frames is not None and (self.vae.config.latent_frames(num_frames)
                                   != latents.shape[2]):
      raise ValueError(
          f"{num_frames=} frames encode to "
          f"{self.vae.config.latent_frames(num_frames)} latent frames, but "
          f"the latents have {latents.shape[2]}")
    if not progress and not to_host and tile is None:
      return wan_vae.decode_jit(self.vae, latents, clamp=True)
    _, _, frames, h, w = latents.shape
    tiles = (1 if tile is None else
             len(wan_vae.tile_grid(self.vae.config, h, w, tile)[2]))
    with tqdm.tqdm(total=frames * tiles, desc="decoding",
                   unit="latent frame", disable=not progress) as bar:
      if tile is not None:
        return wan_vae.decode_tiled(self.vae, latents, tile=tile,
                                    on_frame=bar.update)
      return wan_vae.decode_chunked(self.vae, latents, to_host=to_host,
                                    on_frame=bar.update)

  # All of it -----------------------------------------------------------------

  def __call__(self, prompt=None, negative_prompt="", *, height: int = 480,
               width: int = 832, num_frames: int = 81,
               num_inference_steps: int = 50, guidance_scale: float = 5.0,
               shift: float | None = None, scheduler="unipc", seed: int = 0,
               noise=None, prompt_embeds=None, negative_prompt_embeds=None,
               budget=None, schedule=None, selection_config=None,
               output_type: str = "video", progress: bool = True):
    """Text -> video (B, 3, num_frames, height, width) float32 in [-1, 1].

    prompt / negative_prompt: strings (or lists), or prompt_embeds /
    negative_prompt_embeds (B, L, text_dim) instead. noise: the initial
    latents (B, 16, F, h, w); default drawn from `seed`. budget / schedule:
    Astraea (see `denoise`); neither = the full model. output_type:
    "video" (a device array), "np" (NumPy: each decoded chunk copied to the
    host as it finishes) or "latents" (skip decoding). shift None = 3.0 up
    to 480p, 5.0 above (Wan2.1's defaults).
    """
    base.check_output_type(output_type)
    context, negative = self.text_conditioning(                       # 1.
        prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
        progress=progress)
    return self.sample_video(                                      # 2.-4.
        (context, negative), height=height, width=width,
        num_frames=num_frames, seed=seed, noise=noise,
        output_type=output_type, progress=progress,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, shift=shift, scheduler=scheduler,
        budget=budget, schedule=schedule, selection_config=selection_config)

  def _generate_options(self, config: base.GenerateConfig, fps: float):
    del fps  # Wan2.1 has no frame-rate condition
    return {"shift": config.shift,
            "scheduler": config.scheduler or self.DEFAULTS["scheduler"],
            "devices": config.devices}
