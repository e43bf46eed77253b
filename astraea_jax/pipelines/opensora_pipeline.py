"""OpenSora v1.2 text-to-video end to end: prompt -> T5 -> STDiT3 -> VAE.

  astraea convert opensora-v1.2/ opensora/   # converters/opensora_folder.py
  pipe = OpenSoraPipeline.from_pretrained("opensora", dtype="bfloat16")
  video = pipe("a red panda eating bamboo", height=480, width=848,
               num_frames=51, budget=0.4)
  astraea_jax.video.write_mp4("panda.mp4", video, fps=24)

As OpenSora's `scripts/inference.py` with the v1.2 sample config
(hpcaitech/Open-Sora, configs/opensora-v1-2/inference/sample.py: 30 rflow
steps, CFG scale 7.0, fps 24, aes 6.5, timestep transform on):
  1. the prompt: " aesthetic score: 6.5." appended (`append_score_to_prompts`)
     and lower-cased / whitespace-collapsed (`text_preprocessing` without
     `clean_caption`: its URL/HTML/punctuation rules are not reproduced);
     tokenized to 300 tokens (`</s>` appended, right padding, mask 1 on the
     real tokens) and encoded by T5 v1.1: y (B, 1, 300, 4096) and the mask
     (B, 300), which the STDiT3 uses to drop the padding tokens from its
     cross-attention. The unconditional branch is the STDiT3's learned null
     caption with the prompt's mask (there is no negative prompt in v1.2);
  2. noise (B, 4, T', H/8, W/8) from `seed`;
  3. rectified-flow Euler sampling with OpenSora's CFG and timestep
     transform (`sampling.opensora.sample_opensora`), or Astraea on the STDiT3
     (`astraea.stdit3_tokenwise.sample`, `budget` / `schedule`);
  4. the OpenSora VAE decodes the latents: video (B, 3, T, H, W) in [-1, 1].

Video sizes: the VAE is 8x in space (times the 2x2 patch: multiples of 16)
and 4x in time within chunks of 17 frames (17 frames -> 5 latent frames;
any count works, a short last chunk is padded); OpenSora's timestep
transform needs 1 or >= 17 frames. `latent_shape` checks both and names the
nearest valid values.

Each stage is a method; `encode_tokens` and `decode` are pure functions of
the parameters (jittable after `nnx.split`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from astraea_jax import checkpoint
from astraea_jax.astraea import stdit3_tokenwise as astraea_stdit3
from astraea_jax.pipelines import base
from astraea_jax.sampling import opensora as opensora_sampling
from astraea_jax.vae import opensora_vae

F32 = jnp.float32
# The v1.2 sample config's aesthetic score (appended to every prompt).
AESTHETIC_SCORE = 6.5
# OpenSora's timestep transform divides the frame count by 17 (one VAE
# chunk): it needs 1 frame (an image) or at least 17.
MIN_VIDEO_FRAMES = 17
# `astraea generate` defaults for OpenSora: 480p at 16:9 (OpenSora's
# 480x854 rounded to a multiple of 16), 51 frames (its "2s"), 30 steps,
# CFG 7.0, 24 fps.
DEFAULTS = {"height": 480, "width": 848, "frames": 51, "steps": 30,
            "guidance": 7.0, "fps": 24.0, "scheduler": "euler"}


def prompt_text(prompt: str, aesthetic_score: float | None = AESTHETIC_SCORE):
  """The text OpenSora's T5 sees: the score appended (unless the prompt
  has one), lower case, whitespace runs collapsed."""
  text = prompt.strip()
  if aesthetic_score is not None and "aesthetic score:" not in text:
    text = f"{text} aesthetic score: {aesthetic_score:.1f}."
  return " ".join(text.lower().split())


def latent_shape(height: int, width: int, num_frames: int, *,
                 vae_config: opensora_vae.OpenSoraVAEConfig,
                 patch_size=(1, 2, 2), channels: int = 4, batch: int = 1,
                 use_timestep_transform: bool = True):
  """(B, C, T', h, w) latents of a video, or a ValueError saying what fits."""
  if num_frames < 1:
    raise ValueError(f"{num_frames=} must be >= 1")
  if use_timestep_transform and 1 < num_frames < MIN_VIDEO_FRAMES:
    raise ValueError(
        f"{num_frames=}: OpenSora's timestep transform needs 1 frame or at "
        f"least {MIN_VIDEO_FRAMES} (one VAE chunk); e.g. 17, 34, 51 (2 s at "
        "24 fps), 102 (4 s)")
  frames = vae_config.latent_frames(num_frames)
  h, w = base.latent_size(height, width, num_frames, frames,
                          patch_size=patch_size,
                          spatial_factor=vae_config.spatial_factor)
  return (batch, channels, frames, h, w)


@functools.partial(jax.jit, static_argnums=0)
def _encode_jit(graphdef, state, ids, mask):
  return nnx.merge(graphdef, state).encode(ids, mask)[:, None]


class OpenSoraPipeline(base.Pipeline):
  """OpenSora v1.2: T5 tokenizer, T5 v1.1 encoder, STDiT3, OpenSora VAE.

  An NNX module (the tokenizer is a static attribute). `text_encoder` /
  `tokenizer` may be None when captions come as embeddings, `vae` None
  when only latents are wanted.
  """

  MODEL = checkpoint.MANIFEST_MODELS[checkpoint.OPENSORA_MANIFEST_FORMAT]
  DEFAULTS = DEFAULTS
  STAGES = {**base.STAGES, "vae": (
      "decoding", "a smaller video (--size): the VAE decodes one 17-frame "
      "chunk at a time already")}

  def _default_text_len(self) -> int:
    return self.transformer.config.model_max_length

  def _check_components(self):
    c = self.transformer.config
    if self.text_len != c.model_max_length:
      raise ValueError(f"text_len={self.text_len} != the STDiT3's "
                       f"model_max_length={c.model_max_length}")
    if self.text_encoder is not None and (
        self.text_encoder.config.d_model != c.caption_channels):
      raise ValueError(f"text encoder width "
                       f"{self.text_encoder.config.d_model} != the STDiT3's "
                       f"caption_channels={c.caption_channels}")
    vae = self.vae
    if vae is not None and vae.config.latent_channels != c.in_channels:
      raise ValueError(f"VAE latent channels {vae.config.latent_channels} "
                       f"!= the STDiT3's in_channels={c.in_channels}")

  # 1. Text -------------------------------------------------------------------

  def tokenize(self, prompts, *, aesthetic_score=AESTHETIC_SCORE):
    """(ids, mask) (B, text_len) int32 numpy of `prompt_text(prompt)`."""
    if self.tokenizer is None:
      raise ValueError("this pipeline has no tokenizer: load a converted "
                       "OpenSora folder, or pass prompt embeddings")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    texts = [prompt_text(p, aesthetic_score) for p in prompts]
    return self.tokenizer(texts, self.text_len, clean=False)

  def encode_tokens(self, ids, mask):
    """(B, L) ids and mask -> y (B, 1, L, caption_channels) float32: T5's
    last hidden state over all L positions (the STDiT3 drops the padding
    through the mask). Pure; jittable."""
    if self.text_encoder is None:
      raise ValueError("this pipeline has no text encoder")
    return self.text_encoder.encode(jnp.asarray(ids, jnp.int32),
                                    jnp.asarray(mask, jnp.int32))[:, None]

  @base.stage("text_encoder")
  def encode_prompt(self, prompt, *, aesthetic_score=AESTHETIC_SCORE,
                    progress: bool = False):
    """(y (B, 1, L, D) float32, mask (B, L) int32) for a prompt or a list;
    one prompt per encoder call (one compile for all)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
      raise ValueError("no prompt")
    if self.text_encoder is None or self.tokenizer is None:
      raise ValueError("this pipeline has no text encoder and tokenizer: "
                       "load a converted OpenSora folder")
    graphdef, state = nnx.split(self.text_encoder)
    ys, masks = [], []
    for text in tqdm.tqdm(prompts, disable=not progress,
                          desc="text encoding", unit="prompt"):
      ids, mask = self.tokenize([text], aesthetic_score=aesthetic_score)
      ys.append(_encode_jit(graphdef, state, jnp.asarray(ids),
                            jnp.asarray(mask)))
      masks.append(mask)
    return jnp.concatenate(ys), jnp.asarray(np.concatenate(masks))

  # 2. Noise ------------------------------------------------------------------

  def latent_shape(self, height: int, width: int, num_frames: int,
                   batch: int = 1):
    """Latent shape of a video, checked against the VAE and patch sizes."""
    vae_config = (self.vae.config if self.vae is not None
                  else opensora_vae.OpenSoraVAEConfig.opensora_v1_2())
    c = self.transformer.config
    return latent_shape(height, width, num_frames, vae_config=vae_config,
                        patch_size=c.patch_size, channels=c.in_channels,
                        batch=batch)

  # 3. Denoising --------------------------------------------------------------

  @base.stage("transformer")
  def denoise(self, noise, y, mask, *, height: int, width: int,
              num_frames: int, fps: float = DEFAULTS["fps"],
              num_inference_steps: int = DEFAULTS["steps"],
              guidance_scale: float = DEFAULTS["guidance"], budget=None,
              schedule=None, selection_config=None, progress: bool = False,
              return_stats: bool = False, step_seconds=None):
    """CFG rectified-flow sampling from `noise` -> latents (B, 4, T', h, w).

    Dense unless `budget` (mean token budget in (0, 1]) or `schedule` (one
    budget per step) asks for Astraea. height/width/num_frames: the
    video's pixel size and frame count (model inputs and the timestep
    transform's); fps: the frame-rate condition.
    """
    graphdef, params = nnx.split(self.transformer)
    common = dict(steps=num_inference_steps, guidance_scale=guidance_scale,
                  fps=fps, height=height, width=width,
                  num_frames=num_frames, progress=progress)
    if budget is None and schedule is None:
      if return_stats:
        raise ValueError("return_stats needs Astraea (budget or schedule)")
      return opensora_sampling.sample_opensora(
          graphdef, params, noise, y, mask, step_seconds=step_seconds,
          **common)
    extra = {} if selection_config is None else {
        "selection_config": selection_config}
    return astraea_stdit3.sample(
        graphdef, params, noise, y, mask, budget=budget, schedule=schedule,
        return_stats=return_stats, **extra, **common)

  # 4. Decoding ---------------------------------------------------------------

  @base.stage("vae")
  def decode(self, latents, *, num_frames: int | None = None,
             progress: bool = False, to_host: bool = False):
    """latents (B, 4, T', h, w) -> video (B, 3, num_frames, 8h, 8w) float32
    in [-1, 1]. progress=False and to_host=False: `OpenSoraVAE.decode`
    jitted (pure); otherwise its independent micro-frame chunks one by one
    from the host (the same computation per chunk), with a progress bar if
    `progress`, and with to_host each chunk copied to host memory as it
    finishes (a NumPy video). num_frames is required: the latents do not
    determine it."""
    if self.vae is None:
      raise ValueError("this pipeline has no VAE to decode with")
    if num_frames is None:
      raise ValueError("OpenSora's decode needs num_frames")
    cfg = self.vae.config
    if cfg.latent_frames(num_frames) != latents.shape[2]:
      raise ValueError(
          f"{num_frames=} frames encode to {cfg.latent_frames(num_frames)} "
          f"latent frames, but the latents have {latents.shape[2]}")
    if (not progress and not to_host) or cfg.micro_frame_size is None:
      video = opensora_vae.decode_jit(self.vae, latents,
                                      num_frames=num_frames, clamp=True)
      return np.asarray(video) if to_host else video
    full, rest = cfg.micro_chunks(num_frames)
    per_chunk = cfg.temporal.latent_frames(cfg.micro_frame_size)
    chunks = [(i * per_chunk, (i + 1) * per_chunk, cfg.micro_frame_size)
              for i in range(full)]
    if rest:
      chunks.append((full * per_chunk, latents.shape[2], rest))
    keep = np.asarray if to_host else jax.block_until_ready
    videos = []
    for start, stop, frames in tqdm.tqdm(chunks, desc="decoding",
                                         unit="chunk", disable=not progress):
      videos.append(keep(opensora_vae.decode_jit(
          self.vae, latents[:, :, start:stop], num_frames=frames,
          clamp=True)))
    return (np if to_host else jnp).concatenate(videos, axis=2)

  # All of it -----------------------------------------------------------------

  def __call__(self, prompt=None, *, height: int = DEFAULTS["height"],
               width: int = DEFAULTS["width"],
               num_frames: int = DEFAULTS["frames"],
               num_inference_steps: int = DEFAULTS["steps"],
               guidance_scale: float = DEFAULTS["guidance"],
               fps: float = DEFAULTS["fps"], seed: int = 0, noise=None,
               prompt_embeds=None, prompt_mask=None, budget=None,
               schedule=None, selection_config=None,
               aesthetic_score=AESTHETIC_SCORE, output_type: str = "video",
               progress: bool = True):
    """Text -> video (B, 3, num_frames, height, width) float32 in [-1, 1].

    prompt: a string or list; or prompt_embeds (B, 1, L, D) with
    prompt_mask (B, L) (None: all tokens valid). noise: the initial
    latents; default drawn from `seed`. output_type: "video" (a device
    array), "np" (NumPy, each decoded chunk copied to the host as it
    finishes) or "latents".
    """
    base.check_output_type(output_type)
    base.check_one_text_input(prompt, prompt_embeds)
    if prompt is not None:                                            # 1.
      y, mask = self.encode_prompt(prompt, aesthetic_score=aesthetic_score,
                                   progress=progress)
    else:
      y, mask = jnp.asarray(prompt_embeds, F32), prompt_mask
    return self.sample_video(                                      # 2.-4.
        (y, mask), height=height, width=width, num_frames=num_frames,
        seed=seed, noise=noise, output_type=output_type, progress=progress,
        fps=fps, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, budget=budget, schedule=schedule,
        selection_config=selection_config)

  def _video_options(self, height: int, width: int, num_frames: int):
    return {"height": height, "width": width, "num_frames": num_frames}

  def _generate_options(self, config: base.GenerateConfig, fps: float):
    del config
    return {"fps": fps}
