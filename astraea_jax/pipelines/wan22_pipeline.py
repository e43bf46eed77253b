"""Wan2.2 pipelines: TI2V-5B (text- and image-to-video) and T2V-A14B (two
experts), on the Wan2.1 pipeline's text encoder, sampler and decoding.

What differs from Wan2.1 (facts from wan22's textimage2video.py,
text2video.py and configs/):
  * the original Wan UniPC schedule (`FlowUniPC` schedule="wan"), with the
    model's flow shift (TI2V 5.0, A14B 12.0), not Wan2.1's size rule;
  * TI2V-5B: the Wan2.2 VAE (z 48, 16x space); with an image, the image's
    latent is the first latent frame of the initial latents and replaces
    it again after every step (`first_frame_post_step`), and the tokens of
    that frame run at timestep 0 (`first_frame_token_mask`);
  * T2V-A14B: a high-noise expert (transformer/) for the steps with
    t >= boundary_ratio * 1000 and a low-noise expert (transformer_2/)
    after, each with its own CFG scale (low, high) = (3.0, 4.0)
    (`sampling.sampler.expert_plan`). Astraea's token caches belong to
    one expert: the first low-noise step computes every token.
  * I2V-A14B (wan22's image2video.py): the T2V-A14B sampling (boundary
    0.900, shift 5.0, guidance 3.5 for both experts) with the image as
    extra input channels of the DiT (in_dim 36 = 16 noisy latent + 4 mask
    + 16 image latent): the image, resized bicubically to the video size
    (`i2v_size`, `bicubic_resize`), followed by num_frames - 1 black frames
    encoded with the Wan2.1 VAE, and a mask that is 1 on the first latent
    frame (`i2v_mask`); both CFG branches see it (`i2v_condition`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax import checkpoint, parallel
from astraea_jax import placement as placement_lib
from astraea_jax.astraea import search
from astraea_jax.astraea import wan_tokenwise as astraea_sampler
from astraea_jax.pipelines import base, wan_pipeline
from astraea_jax.sampling import sampler as dense_sampler
from astraea_jax.vae import wan_vae

F32 = jnp.float32


# Pure pieces ------------------------------------------------------------------


def first_frame_token_mask(latent_shape, patch_size):
  """(L,) float32 timestep factors of the DiT's tokens: 0 on the first
  latent frame's tokens (the conditioning image), 1 elsewhere. wan22
  builds it as mask2[0][0][:, ::2, ::2] flattened (frame-major, as our
  patch order)."""
  f, h, w = (s // p for s, p in zip(latent_shape[2:], patch_size))
  if patch_size[0] != 1:
    raise ValueError(f"{patch_size=}: the first-frame mask needs a temporal "
                     "patch of 1")
  return jnp.repeat(jnp.where(jnp.arange(f) == 0, 0.0, 1.0), h * w
                    ).astype(F32)


def put_first_frame(latents, image_latent):
  """latents (B, C, F, h, w) with frame 0 replaced by image_latent
  (B, C, 1, h, w): wan22's (1 - mask) * z + mask * latent."""
  return latents.at[:, :, :1].set(image_latent.astype(latents.dtype))


def first_frame_post_step(image_latent):
  """The sampler's post-step hook of TI2V image-to-video (a pytree)."""
  return jax.tree_util.Partial(_post_step, image_latent)


def _post_step(image_latent, latents):
  return put_first_frame(latents, image_latent)


def best_output_size(width: int, height: int, dw: int, dh: int,
                     area: int) -> tuple[int, int]:
  """(ow, oh): the video size of an image of width x height for TI2V
  image-to-video, multiples of (dw, dh) with ow * oh <= area and the
  aspect ratio nearest the image's (wan22 utils.best_output_size: the
  better of rounding the width first or the height first)."""
  ratio = width / height
  ow, oh = (area * ratio) ** 0.5, area / (area * ratio) ** 0.5
  ow1 = int(ow // dw * dw)
  oh1 = int(area / ow1 // dh * dh) if ow1 else 0
  oh2 = int(oh // dh * dh)
  ow2 = int(area / oh2 // dw * dw) if oh2 else 0
  # the height-first size first: wan22 keeps it on a tie
  candidates = [(w, h) for w, h in ((ow2, oh2), (ow1, oh1)) if w and h]
  if not candidates:
    raise ValueError(f"no {dw}x{dh}-multiple video size of area <= {area} "
                     f"fits an image of {width}x{height}")
  off = lambda wh: max(ratio / (wh[0] / wh[1]), (wh[0] / wh[1]) / ratio)
  return min(candidates, key=off)


def resize_crop(image, width: int, height: int) -> np.ndarray:
  """A PIL image -> (3, height, width) float32 in [-1, 1]: scaled (Lanczos)
  to cover width x height, then centre-cropped, as wan22's i2v does."""
  from PIL import Image  # pylint: disable=g-import-not-at-top  (optional)
  scale = max(width / image.width, height / image.height)
  image = image.resize((round(image.width * scale),
                        round(image.height * scale)), Image.LANCZOS)
  x1, y1 = (image.width - width) // 2, (image.height - height) // 2
  image = image.crop((x1, y1, x1 + width, y1 + height))
  pixels = np.asarray(image, np.float32) / 255.0
  return np.moveaxis(pixels * 2.0 - 1.0, -1, 0)


def i2v_size(width: int, height: int, area: int, *, spatial_factor: int = 8,
             patch: int = 2) -> tuple[int, int]:
  """(ow, oh): the I2V-A14B video size of an image of width x height with
  area <= `area`: wan22 image2video.py's lat_h = round(sqrt(area * h / w)
  // 8 // 2 * 2) (and lat_w likewise), times the VAE's 8."""
  aspect = height / width
  lat_h = round(np.sqrt(area * aspect) // spatial_factor // patch * patch)
  lat_w = round(np.sqrt(area / aspect) // spatial_factor // patch * patch)
  if not lat_h or not lat_w:
    raise ValueError(f"an image of {width}x{height} leaves no video of area "
                     f"<= {area} (sides multiples of {spatial_factor * patch})")
  return lat_w * spatial_factor, lat_h * spatial_factor


def _cubic_weights(t, a=-0.75):
  """PyTorch's upsample_bicubic2d kernel (Keys, A = -0.75) at offsets
  1 + t, t, 1 - t, 2 - t of the four taps."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


def _bicubic_taps(size_in: int, size_out: int):
  """(taps (size_out, 4) int, weights (size_out, 4) float32) of
  `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`
  (no antialiasing) along one axis: taps clamped at the borders. Each
  source position is rounded to float32 once, as PyTorch's CPU kernel
  gets it (a fused multiply-add): the weights then agree to ~5e-7, where
  computing the position exactly leaves them 2e-5 apart at 720p."""
  scale = np.float32(size_in) / np.float32(size_out)
  src = ((np.arange(size_out) + 0.5) * np.float64(scale) - 0.5).astype(
      np.float32)
  base = np.floor(src)
  taps = np.clip(base[:, None].astype(int) + np.arange(-1, 3), 0,
                 size_in - 1)
  return taps, _cubic_weights(src - base).astype(np.float32)


def bicubic_resize(pixels, height: int, width: int) -> np.ndarray:
  """(C, H, W) float32 -> (C, height, width) as PyTorch's bicubic
  `interpolate` (align_corners=False, no antialias, no clamping), which
  wan22's image2video.py resizes the image with: along the width, then
  the height, 4 taps each."""
  pixels = np.asarray(pixels, np.float32)
  taps, weights = _bicubic_taps(pixels.shape[2], width)
  x = np.einsum("chwk,wk->chw", pixels[:, :, taps], weights)
  taps, weights = _bicubic_taps(pixels.shape[1], height)
  return np.einsum("chkw,hk->chw", x[:, taps], weights)


def i2v_mask(latent_shape, temporal_factor: int = 4):
  """(B, temporal_factor, F, h, w) float32 mask channels of I2V-A14B for
  latents (B, C, F, h, w): 1 on the first latent frame (the image), 0
  elsewhere. wan22 builds a per-video-frame mask (1 on frame 0), repeats
  frame 0 four times and folds the frames into 4 channels per latent
  frame, which is this."""
  b, _, f, h, w = latent_shape
  frame = jnp.where(jnp.arange(f) == 0, 1.0, 0.0).astype(F32)
  return jnp.broadcast_to(frame[None, None, :, None, None],
                          (b, temporal_factor, f, h, w))


def i2v_condition(image_latents):
  """(B, 16, F, h, w) Wan2.1 VAE latents of the image and its black frames
  -> (B, 20, F, h, w), the DiT's conditioning channels [mask; latents]
  (wan22: y = torch.concat([msk, y]))."""
  return jnp.concatenate([i2v_mask(image_latents.shape),
                          image_latents.astype(F32)], axis=1)


# The pipelines ----------------------------------------------------------------


class Wan22Pipeline(wan_pipeline.WanPipeline):
  """What the Wan2.2 pipelines share: the Wan schedule, the model's shift,
  one or two experts. Not registered (no MODEL): its subclasses are."""

  # Video -> latent factors when no VAE is loaded.
  FACTORS = (4, 8)
  # UniPC's timesteps: wan22's own schedule (`FlowUniPC` schedule="wan").
  TIMESTEPS = "wan"

  def __init__(self, transformer, vae=None, text_encoder=None,
               tokenizer=None, *, text_len: int | None = None,
               transformer_2=None, boundary_ratio: float | None = None,
               expert_placement: str = "both"):
    super().__init__(transformer, vae, text_encoder, tokenizer,
                     text_len=text_len)
    self.transformer_2 = nnx.data(transformer_2)  # a module, or None
    self.boundary_ratio = boundary_ratio
    # Two experts: both on the accelerator for the whole denoising, or
    # "one" at a time (see `denoise`).
    self.expert_placement = dense_sampler.check_expert_placement(
        expert_placement)

  def one_expert_at_a_time(self) -> bool:
    """Two experts, placed one at a time (`expert_placement` "one")."""
    return self.transformer_2 is not None and self.expert_placement == "one"

  def stage_module(self, component: str):
    if component == "transformer" and self.one_expert_at_a_time():
      return None  # `denoise` places each expert for its own steps
    return super().stage_module(component)

  def latent_shape(self, height: int, width: int, num_frames: int,
                   batch: int = 1):
    t, s = ((self.vae.config.temporal_factor, self.vae.config.spatial_factor)
            if self.vae is not None else self.FACTORS)
    return wan_pipeline.latent_shape(
        height, width, num_frames, patch_size=self.transformer.config
        .patch_size, batch=batch, channels=self.transformer.config.out_dim,
        temporal_factor=t, spatial_factor=s)

  def split_experts(self):
    """(graphdef, params or the experts' pair, boundary_ratio)."""
    graphdef, params = nnx.split(self.transformer)
    if self.transformer_2 is None:
      return graphdef, params, None
    return graphdef, (params, nnx.state(self.transformer_2)), \
        self.boundary_ratio

  def search_model(self, image=None) -> search.SearchModel:
    """What `astraea search` samples: the DiT (or both experts and the
    boundary), this model's latents and, with `image` (3, H, W) in [-1, 1]
    at the video's size, the image-to-video problem
    (`image_conditioning`, `image_hooks`)."""
    graphdef, params, boundary = self.split_experts()
    image_input = None if image is None else functools.partial(
        self.image_conditioning, jnp.asarray(image)[None])
    return search.SearchModel(graphdef, params,
                              self.transformer.config.text_dim, boundary,
                              self.latent_shape, image_input,
                              self.image_hooks)

  def image_conditioning(self, image, num_frames: int):
    """image (B, 3, H, W) in [-1, 1] at the video's size -> the denoiser's
    image input (`denoise`'s fourth); a ValueError for a text-to-video
    model."""
    del image, num_frames
    raise ValueError(f"image: {self.MODEL} is text-to-video only")

  def image_hooks(self, noise, image_latent):
    """(noise, sampler keyword arguments) for `denoise`'s image input
    (None: text to video): TI2V puts the image's latent in frame 0 and
    gives its tokens timestep 0 (`first_frame_token_mask`,
    `first_frame_post_step`)."""
    if image_latent is None:
      return noise, {}
    return put_first_frame(noise, image_latent), {
        "token_mask": first_frame_token_mask(
            noise.shape, self.transformer.config.patch_size),
        "post_step": first_frame_post_step(image_latent)}

  @base.stage("transformer")
  def denoise(self, noise, context, negative_context, image_latent=None, *,
              num_inference_steps: int | None = None, guidance_scale=None,
              shift: float | None = None, scheduler="unipc", budget=None,
              schedule=None, selection_config=None, loop: str = "python",
              progress: bool = False, return_stats: bool = False,
              step_seconds: list | None = None, devices: int | None = None,
              refresh_experts: bool = astraea_sampler.REFRESH_EXPERTS):
    """CFG sampling from `noise` (B, C, F, h, w) -> latents, dense or
    Astraea (`budget` / `schedule`) as `WanPipeline.denoise`.

    Defaults (None) are the model's (`DEFAULTS`). image_latent: the image
    input of `image_conditioning` (TI2V: (B, C, 1, h, w), the VAE latent
    of the first frame; I2V-A14B: (B, 20, F, h, w) mask and latents),
    applied by `image_hooks`.
    refresh_experts (two experts, Astraea): the first low-noise step
    computes every token, or (False) keeps the schedule's K there (see
    `wan_tokenwise.sample`; default `wan_tokenwise.EXPERT_SWITCH`). devices: sample on
    N devices (`parallel.samplers`, one expert or two).

    Two experts with `expert_placement` "both": both on the accelerator
    for the whole run; "one" (offloaded experts, from_pretrained's
    default): the high-noise expert's parameters on the accelerator for
    its steps, freed, then the low-noise expert's for the rest
    (`sampler.run_by_expert`), the same numbers with one expert's memory
    (a 14B expert is ~26.6 GiB in bfloat16). With `devices` both are
    placed (the mesh samplers shard them).
    """
    d = self.DEFAULTS
    steps = num_inference_steps or d["steps"]
    guidance_scale = d["guidance"] if guidance_scale is None else \
        guidance_scale
    shift = d["shift"] if shift is None else shift
    if isinstance(scheduler, str):
      scheduler = dense_sampler.make_scheduler(scheduler, steps, shift=shift,
                                               schedule=self.TIMESTEPS)
    noise, hooks = self.image_hooks(noise, image_latent)
    common = {"scheduler": scheduler, "steps": None,
              "guidance_scale": guidance_scale, "progress": progress,
              **hooks}
    dense_sample, astraea_sample = dense_sampler.sample, astraea_sampler.sample
    if devices is not None:
      dense_sample, astraea_sample = parallel.samplers(
          devices, batch=2 * noise.shape[0])
    one = self.one_expert_at_a_time() and devices is None
    # "both": both experts on the accelerator for the whole run (nested
    # `placed` do nothing where the stage placed one already); "one": the
    # experts stay offloaded and the sampler places each for its steps.
    with placement_lib.placed(None if one else self.transformer), \
        placement_lib.placed(None if one else self.transformer_2):
      graphdef, params, boundary = self.split_experts()
      experts = {} if boundary is None else {
          "boundary_ratio": boundary, "refresh_experts": refresh_experts}
      if one:
        experts["expert_placement"] = "one"
      if budget is None and schedule is None:
        if return_stats:
          raise ValueError("return_stats needs Astraea (budget or schedule)")
        experts.pop("refresh_experts", None)
        return dense_sample(graphdef, params, noise, context,
                            negative_context, loop=loop,
                            step_seconds=step_seconds, **experts, **common)
      extra = {} if selection_config is None else {
          "selection_config": selection_config}
      return astraea_sample(
          graphdef, params, noise, context, negative_context, budget=budget,
          schedule=schedule, return_stats=return_stats, **experts, **extra,
          **common)

  def __call__(self, prompt=None, negative_prompt="", *, image=None,
               height: int | None = None, width: int | None = None,
               num_frames: int | None = None,
               num_inference_steps: int | None = None, guidance_scale=None,
               shift: float | None = None, scheduler="unipc", seed: int = 0,
               noise=None, prompt_embeds=None, negative_prompt_embeds=None,
               budget=None, schedule=None, selection_config=None,
               output_type: str = "video", progress: bool = True):
    """Text (and with `image`, (B, 3, height, width) in [-1, 1]: TI2V's
    image) -> video (B, 3, num_frames, height, width) in [-1, 1]; None =
    the model's defaults (`DEFAULTS`). Otherwise as
    `WanPipeline.__call__`."""
    d = self.DEFAULTS
    height, width = height or d["height"], width or d["width"]
    num_frames = num_frames or d["frames"]
    base.check_output_type(output_type)
    conditioning = self.text_conditioning(                            # 1.
        prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
        progress=progress)
    if image is not None:
      if tuple(np.shape(image)[2:]) != (height, width):
        raise ValueError(f"image {np.shape(image)} must be (B, 3, {height}, "
                         f"{width}), the video's size")
      conditioning += (self.image_conditioning(image, num_frames),)
    return self.sample_video(                                      # 2.-4.
        conditioning, height=height, width=width, num_frames=num_frames,
        seed=seed, noise=noise, output_type=output_type, progress=progress,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, shift=shift, scheduler=scheduler,
        budget=budget, schedule=schedule, selection_config=selection_config)

  def _generate_options(self, config: base.GenerateConfig, fps: float):
    del fps  # no frame-rate condition
    switch = {} if config.expert_switch is None else {
        "refresh_experts": astraea_sampler.EXPERT_SWITCHES[
            config.expert_switch]}
    return {"shift": config.shift, "devices": config.devices,
            "scheduler": config.scheduler or self.DEFAULTS["scheduler"],
            **switch}


class Wan22TI2VPipeline(Wan22Pipeline):
  """Wan2.2 TI2V-5B: text-to-video, and image-to-video with an image
  latent (`encode_image`) as the denoiser's fourth conditioning input."""

  MODEL = "wan2.2-ti2v-5b"
  # wan22 configs/wan_ti2v_5B.py and SUPPORTED_SIZES['ti2v-5B'] (1280*704).
  DEFAULTS = {"height": 704, "width": 1280, "frames": 121, "steps": 50,
              "guidance": 5.0, "shift": 5.0, "fps": 24.0,
              "scheduler": "unipc"}
  FACTORS = (4, 16)

  def image_conditioning(self, image, num_frames: int):
    del num_frames  # the image is the first frame alone
    return self.encode_image(image)

  @base.stage("vae")
  def encode_image(self, image):
    """image (B, 3, H, W) in [-1, 1] -> its latent (B, z, 1, h, w), the
    Wan2.2 VAE's normalised mean (wan22: `vae.encode([img])`)."""
    if self.vae is None:
      raise ValueError("this pipeline has no VAE to encode the image with")
    image = jnp.asarray(image, F32)
    if image.ndim != 4 or image.shape[1] != 3:
      raise ValueError(f"image must be (B, 3, H, W); got {image.shape}")
    return wan_vae.encode_jit(self.vae, image[:, :, None])

class Wan22A14BPipeline(Wan22Pipeline):
  """What T2V-A14B and I2V-A14B share: two experts (high noise:
  transformer/, low noise: transformer_2/) switching at the manifest's
  boundary_ratio. Not registered (no MODEL)."""

  @classmethod
  def from_pretrained(cls, path, *, dtype: str | None = None,
                      offload: bool = True,
                      expert_placement: str | None = None, **kwargs):
    """`Pipeline.from_pretrained` plus the low-noise expert and the
    boundary from the manifest. expert_placement (see `denoise`): "one"
    expert on the accelerator at a time (the default with offload: the
    other waits in host memory), or "both" (the default without)."""
    if expert_placement is None:
      expert_placement = "one" if offload else "both"
    dense_sampler.check_expert_placement(expert_placement)
    if expert_placement == "one" and not offload:
      raise ValueError("expert_placement='one' keeps the idle expert in "
                       "host memory: it needs offload=True")
    pipe = super().from_pretrained(path, dtype=dtype, offload=offload,
                                   **kwargs)
    pipe.expert_placement = expert_placement
    manifest = cls.read_manifest(path)
    experts = manifest["experts"]
    if experts.get("high_noise") != "transformer":
      raise ValueError(f"{path}: manifest experts {experts} must name "
                       "transformer as the high-noise expert")
    pipe.transformer_2 = checkpoint.load_model(
        checkpoint.component_path(path, manifest, experts["low_noise"]),
        dtype=dtype, placement="offload" if offload else "accelerator")
    pipe.boundary_ratio = float(manifest["boundary_ratio"])
    return pipe

  def split_experts(self):
    if self.transformer_2 is None or self.boundary_ratio is None:
      raise ValueError(f"{self.MODEL} needs both experts and boundary_ratio "
                       "(load the folder with from_pretrained)")
    return super().split_experts()


class Wan22T2VA14BPipeline(Wan22A14BPipeline):
  """Wan2.2 T2V-A14B: text to video with two experts."""

  MODEL = "wan2.2-t2v-a14b"
  # wan22 configs/wan_t2v_A14B.py: guidance (low noise, high noise);
  # 16 fps and 81 frames from shared_config; 1280*720 as wan22's generate.
  DEFAULTS = {"height": 720, "width": 1280, "frames": 81, "steps": 40,
              "guidance": (3.0, 4.0), "shift": 12.0, "fps": 16.0,
              "scheduler": "unipc"}


class Wan22I2VA14BPipeline(Wan22A14BPipeline):
  """Wan2.2 I2V-A14B: image (and text) to video with two experts; the
  image enters as 20 extra input channels of the DiT (`encode_image`)."""

  MODEL = "wan2.2-i2v-a14b"
  # wan22 configs/wan_i2v_A14B.py (boundary 0.900 is the converter's:
  # converters/model_folder.py BOUNDARY_RATIOS); max area 1280*720, 81
  # frames at 16 fps as wan22's generate for i2v-A14B.
  DEFAULTS = {"height": 720, "width": 1280, "frames": 81, "steps": 40,
              "guidance": (3.5, 3.5), "shift": 5.0, "fps": 16.0,
              "scheduler": "unipc"}

  def _check_components(self):
    super()._check_components()
    c = self.transformer.config
    if c.in_dim != c.out_dim + 20:
      raise ValueError(f"I2V-A14B's DiT takes its {c.out_dim} latent "
                       "channels + 4 mask + the image latent's "
                       f"{c.out_dim}; got {c.in_dim=}")

  def image_conditioning(self, image, num_frames: int):
    return self.encode_image(image, num_frames)

  @base.stage("vae")
  def encode_image(self, image, num_frames: int):
    """image (B, 3, H, W) in [-1, 1] -> (B, 20, F, h, w): the mask and the
    Wan2.1 VAE latents of the image followed by num_frames - 1 black
    (zero) frames (wan22 image2video.py: y = [msk; vae.encode(...)])."""
    if self.vae is None:
      raise ValueError("this pipeline has no VAE to encode the image with")
    image = jnp.asarray(image, F32)
    if image.ndim != 4 or image.shape[1] != 3:
      raise ValueError(f"image must be (B, 3, H, W); got {image.shape}")
    b, _, h, w = image.shape
    video = jnp.concatenate(
        [image[:, :, None], jnp.zeros((b, 3, num_frames - 1, h, w), F32)],
        axis=2)
    return i2v_condition(wan_vae.encode_jit(self.vae, video))

  def image_hooks(self, noise, image_latent):
    """I2V-A14B: the image's channels (`encode_image`) as the DiT's
    `condition`; it samples nothing without them."""
    if image_latent is None:
      raise ValueError(f"{self.MODEL} is image-to-video: give an image "
                       "(--image PATH; image= or the image conditioning "
                       "of encode_image)")
    expected = (noise.shape[0], self.transformer.config.in_dim
                - noise.shape[1], *noise.shape[2:])
    if tuple(image_latent.shape) != expected:
      raise ValueError(f"image conditioning {tuple(image_latent.shape)} "
                       f"must be {expected} (encode_image of the video's "
                       "size and frames)")
    return noise, {"condition": image_latent}
