"""Wan2.2 pipelines against wan22's own sampling loops, through the
converter from the original (published) layout.

wan22's `generate()` cannot run on CPU (CUDA calls: `torch.cuda.*`,
autocast "cuda", T5 on CUDA), so `reference_sample` drives the reference's
`WanModel` (wan/modules/model.py, exact attention) and its scheduler
(wan/utils/fm_solvers_unipc.py `FlowUniPCMultistepScheduler(shift=1)` +
`set_timesteps(steps, shift=shift)`) through the same steps as
textimage2video.py's t2v / i2v and text2video.py's generate: per-token
timesteps `mask2 * t` (mask 0 on the image's latent frame), CFG
`uncond + g (cond - uncond)`, the image latent put back after every step,
and for A14B the expert and guidance chosen by `t >= boundary * 1000`;
`reference_i2v_sample` follows image2video.py's (the image as the DiT's
`y` channels, one timestep for all tokens).
Our side loads the converted folder with the pipeline and samples from
prompt embeddings (the text encoder has its own parity tests).

Tolerance: max abs error <= 1e-5 * max|reference| + 1e-6
(`testing.assert_close`): float32, the same math in another order. Three
UniPC steps with CFG (and the VAE encode for the image) leave it at
1.4e-6 to 1.8e-6 relative on this machine (I2V-A14B: 1.6e-6; its image
channels 1.2e-7), within the single-forward bound of
tests/test_wan22_dit.py. The one other tolerance, `bicubic_resize`
against torch (atol 2e-6 on values ~1), is stated where it is used.
"""

import ast
import functools
import gc
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from flax import nnx
from safetensors.numpy import load_file, save_file

from _wan22_reference import load_wan22_module, random_reference_dit
from astraea_jax import checkpoint, cli, placement, testing
from astraea_jax.astraea import search, selection, wan_tokenwise
from astraea_jax.commands import generate
from astraea_jax.configs import WanConfig
from astraea_jax.pipelines import wan22_pipeline
from astraea_jax.sampling import sampler
from test_wan22_converter import (
    TEXT,
    VAE21,
    VAE22,
    WORDS,
    random_tensors,
    save_pth,
    vae_tensors,
    write_dit,
)
from converters import umt5 as umt5_converter

SMALL = dict(dim=32, ffn_dim=48, num_heads=2, num_layers=2, text_dim=32,
             text_len=512, freq_dim=16)
TI2V = WanConfig.tiny(in_dim=48, out_dim=48, **SMALL)
T2V = WanConfig.tiny(**SMALL)
STEPS = 3
CONTEXT_LENS = (5, 3)  # prompt, negative prompt


reference_dit = random_reference_dit


def write_folder(root, dits, vae_config, vae_name):
  """An original-layout download: dits {subfolder: (reference model,
  config, model_type)}, the VAE from `vae_tensors(vae_config, seed 10)`."""
  root.mkdir(parents=True)
  for sub, (ref, config, model_type) in dits.items():
    tensors = {k: v.numpy() for k, v in ref.state_dict().items()}
    write_dit(root / sub, config, tensors, "wan", model_type, shards=2)
  save_pth(vae_tensors(vae_config, "original", 10), root / f"{vae_name}.pth")
  save_pth(random_tensors(umt5_converter.expected_checkpoint_shapes(
      TEXT, "wan"), 20), root / "models_t5_umt5-xxl-enc-bf16.pth")
  testing.write_word_tokenizer(root / "google" / "umt5-xxl", WORDS)
  return root


def converted(tmp_path_factory, name, dits, vae_config, vae_name):
  root = tmp_path_factory.mktemp(name)
  write_folder(root / "src", dits, vae_config, vae_name)
  assert cli.main(["convert", str(root / "src"), str(root / "dst"),
                   "--quiet", "--allow-pth"]) == 0
  return root / "dst"


def embeddings(seed):
  """(context, negative) (1, n, text_dim): our prompt embeddings; the
  reference takes the same rows unpadded."""
  rng = np.random.default_rng(seed)
  return tuple(rng.standard_normal((1, n, SMALL["text_dim"])
                                   ).astype(np.float32) for n in CONTEXT_LENS)


def reference_scheduler(steps, shift):
  module = load_wan22_module_from("utils", "fm_solvers_unipc")
  sched = module.FlowUniPCMultistepScheduler(
      num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
  sched.set_timesteps(steps, device="cpu", shift=shift)
  return sched


@functools.cache
def load_wan22_module_from(package, name):
  """wan.<package>.<name> by file (wan/utils/__init__ imports more)."""
  root = testing.wan22_dir()
  spec = importlib.util.spec_from_file_location(
      f"wan.{package}.{name}", f"{root}/{package}/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def wan22_function(path, name):
  """One function of a wan22 file, compiled alone (wan/utils/utils.py
  imports torchvision, which the test environment lacks)."""
  source = (testing.wan22_dir() / path).read_text()
  tree = ast.parse(source)
  node = next(n for n in tree.body
              if isinstance(n, ast.FunctionDef) and n.name == name)
  namespace = {}
  code = compile(ast.Module([node], []), path, "exec")
  exec(code, namespace)  # pylint: disable=exec-used
  return namespace[name]


def reference_sample(pick, noise, context, negative, *, shift,
                     image_latent=None):
  """wan22's sampling loop. pick(t) -> (model, guidance scale) (A14B:
  `_prepare_model_for_timestep` and its guide_scale choice); noise
  (C, F, H, W); image_latent (C, 1, H, W) or None (t2v)."""
  sched = reference_scheduler(STEPS, shift)
  latent = torch.from_numpy(noise)
  mask2 = torch.ones_like(latent)
  if image_latent is not None:
    z = torch.from_numpy(image_latent)
    mask2[:, 0] = 0  # masks_like(zero=True)
    latent = (1. - mask2) * z + mask2 * latent
  seq_len = latent.shape[1] * latent.shape[2] * latent.shape[3] // 4
  ctx = [torch.from_numpy(context[0])]
  neg = [torch.from_numpy(negative[0])]
  with torch.no_grad():
    for t in sched.timesteps:
      model, scale = pick(t)
      timestep = (mask2[0][:, ::2, ::2] * t).flatten().unsqueeze(0)
      cond = model([latent], t=timestep, context=ctx, seq_len=seq_len)[0]
      uncond = model([latent], t=timestep, context=neg, seq_len=seq_len)[0]
      pred = uncond + scale * (cond - uncond)
      latent = sched.step(pred.unsqueeze(0), t, latent.unsqueeze(0),
                          return_dict=False)[0].squeeze(0)
      if image_latent is not None:
        latent = (1. - mask2) * z + mask2 * latent
  return latent.numpy()


# TI2V-5B ----------------------------------------------------------------------

HEIGHT, WIDTH, FRAMES = 64, 64, 9  # latents (48, 3, 4, 4): 12 tokens


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
  ref = reference_dit(TI2V, "ti2v", seed=5)
  folder = converted(tmp_path_factory, "ti2v", {".": (ref, TI2V, "ti2v")},
                     VAE22, "Wan2.2_VAE")
  pipe = wan22_pipeline.Wan22TI2VPipeline.from_pretrained(
      folder, load_text_encoder=False)
  return ref, pipe, folder


def ti2v_noise(pipe, seed=1):
  shape = pipe.latent_shape(HEIGHT, WIDTH, FRAMES)
  assert shape == (1, 48, 3, 4, 4)
  return np.random.default_rng(seed).standard_normal(shape).astype(
      np.float32)


def run_ours(pipe, noise, context, negative, **kwargs):
  return np.asarray(pipe(
      prompt_embeds=context, negative_prompt_embeds=negative,
      height=HEIGHT, width=WIDTH, num_frames=FRAMES,
      num_inference_steps=STEPS, noise=jnp.asarray(noise),
      output_type="latents", progress=False, **kwargs))


def test_ti2v_text_to_video_matches_wan22(ti2v):
  ref, pipe, _ = ti2v
  noise = ti2v_noise(pipe)
  context, negative = embeddings(2)
  expected = reference_sample(lambda t: (ref, 5.0), noise[0], context,
                              negative, shift=5.0)
  ours = run_ours(pipe, noise, context, negative)
  testing.assert_close(ours[0], expected)


def reference_vae():
  module = load_wan22_module("vae2_2")
  vae = module.WanVAE_(dim=8, dec_dim=12, z_dim=48, dim_mult=[1, 2, 4, 4],
                       num_res_blocks=1,
                       temperal_downsample=[False, True, True]).eval()
  tensors = vae_tensors(VAE22, "original", 10)
  vae.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
  return vae


def test_ti2v_image_to_video_matches_wan22(ti2v):
  """The image's latent is frame 0 throughout, its tokens at t = 0: the
  reference encodes the image with its own VAE from the same tensors."""
  ref, pipe, _ = ti2v
  noise = ti2v_noise(pipe)
  context, negative = embeddings(3)
  image = np.random.default_rng(4).uniform(
      -1, 1, (1, 3, HEIGHT, WIDTH)).astype(np.float32)
  scale = [torch.tensor(VAE22.latents_mean),
           1 / torch.tensor(VAE22.latents_std)]
  with torch.no_grad():
    z = reference_vae().encode(torch.from_numpy(image[:, :, None]),
                               scale).numpy()
  assert z.shape == (1, 48, 1, 4, 4)
  testing.assert_close(pipe.encode_image(image), z)
  expected = reference_sample(lambda t: (ref, 5.0), noise[0], context,
                              negative, shift=5.0, image_latent=z[0])
  ours = run_ours(pipe, noise, context, negative, image=image)
  testing.assert_close(ours[0], expected)
  np.testing.assert_array_equal(ours[:, :, :1], np.asarray(
      pipe.encode_image(image)))
  # a negative control: without the image the sample differs
  text_only = run_ours(pipe, noise, context, negative)
  assert np.abs(text_only - ours).max() > 1e-2


def test_first_frame_mask_and_output_size_follow_wan22():
  mask = wan22_pipeline.first_frame_token_mask((1, 48, 3, 4, 6), (1, 2, 2))
  np.testing.assert_array_equal(mask, [0] * 6 + [1] * 12)
  best = wan22_function("utils/utils.py", "best_output_size")
  for w, h in ((1920, 1080), (1080, 1920), (1000, 1000), (640, 480),
               (1234, 567)):
    assert wan22_pipeline.best_output_size(w, h, 32, 32, 704 * 1280) == \
        best(w, h, 32, 32, 704 * 1280), (w, h)


# T2V-A14B ---------------------------------------------------------------------

A14B_SHIFT, A14B_GUIDANCE = 12.0, (3.0, 4.0)  # wan22 configs/wan_t2v_A14B.py


def two_experts(tmp_path_factory, name, config, kind, seeds, pipeline):
  """Random high- and low-noise reference experts written as a published
  A14B folder (Wan2.1 VAE), converted, loaded as `pipeline`:
  (high, low, pipe, folder)."""
  high, low = (reference_dit(config, kind, seed=s) for s in seeds)
  folder = converted(
      tmp_path_factory, name,
      {"high_noise_model": (high, config, kind),
       "low_noise_model": (low, config, kind)}, VAE21, "Wan2.1_VAE")
  return high, low, pipeline.from_pretrained(
      folder, load_text_encoder=False), folder


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
  return two_experts(tmp_path_factory, "a14b", T2V, "t2v", (6, 7),
                     wan22_pipeline.Wan22T2VA14BPipeline)


def a14b_noise(pipe):
  shape = pipe.latent_shape(32, 48, 5)
  assert shape == (1, 16, 2, 4, 6)
  return np.random.default_rng(8).standard_normal(shape).astype(np.float32)


def test_a14b_switches_experts_at_the_boundary_like_wan22(a14b):
  """3 steps at shift 12: t = 999, 960, 857; the boundary 0.875 * 1000
  puts the last step on the low-noise expert (guidance 3.0)."""
  high, low, pipe, _ = a14b
  assert pipe.boundary_ratio == 0.875
  scheduler = sampler.make_scheduler("unipc", STEPS, shift=A14B_SHIFT,
                                     schedule="wan")
  np.testing.assert_array_equal(
      reference_scheduler(STEPS, A14B_SHIFT).timesteps.numpy(),
      np.asarray(scheduler.timesteps))
  assert sampler.expert_plan(scheduler.timesteps, 0.875) == [0, 0, 1]
  boundary = 0.875 * 1000

  def pick(t):  # text2video.py: t.item() >= boundary -> high noise
    is_high = t.item() >= boundary
    return (high if is_high else low,
            A14B_GUIDANCE[1] if is_high else A14B_GUIDANCE[0])

  noise = a14b_noise(pipe)
  context, negative = embeddings(9)
  expected = reference_sample(pick, noise[0], context, negative,
                              shift=A14B_SHIFT)
  ours = np.asarray(pipe(
      prompt_embeds=context, negative_prompt_embeds=negative, height=32,
      width=48, num_frames=5, num_inference_steps=STEPS,
      noise=jnp.asarray(noise), output_type="latents", progress=False))
  testing.assert_close(ours[0], expected)
  # a negative control: the high-noise expert throughout differs
  only_high = reference_sample(lambda t: (high, 4.0), noise[0], context,
                               negative, shift=A14B_SHIFT)
  assert np.abs(only_high - expected).max() > 1e-3 * np.abs(expected).max()


# Astraea across the expert switch -------------------------------------------


def test_expert_switch_refreshes_astraea_caches():
  """The first low-noise step computes every token (the caches hold the
  other expert's updates); refresh_experts=False keeps the schedule."""
  assert wan_tokenwise.refresh_at_switch([12, 4, 4, 4], [0, 0, 1, 1], 12) == \
      [12, 4, 12, 4]
  assert wan_tokenwise.refresh_at_switch([12, 4, 4], [0, 0, 0], 12) == \
      [12, 4, 4]


def test_expert_switch_refresh_and_keep_part_at_the_switch_step(a14b):
  """Budget 1 through the token-wise engine = the dense two-expert run,
  with either switch setting. At [1, 0.5, 0.5] refresh and keep run the
  same two high-noise steps (bit for bit) and part at step 2, the first
  low-noise one, which refresh computes in full."""
  _, _, pipe, _ = a14b
  graphdef, params, boundary = pipe.split_experts()
  noise = jnp.asarray(a14b_noise(pipe))
  context, negative = (jnp.asarray(x) for x in embeddings(9))
  dense = pipe.denoise(noise, context, negative, num_inference_steps=STEPS)
  run = functools.partial(
      wan_tokenwise.sample, graphdef, params, noise, context, negative,
      scheduler=sampler.make_scheduler("unipc", STEPS, shift=A14B_SHIFT,
                                       schedule="wan"),
      steps=None, guidance_scale=A14B_GUIDANCE, boundary_ratio=boundary,
      progress=False, return_trajectory=True, return_stats=True)
  for refresh in (True, False):
    testing.assert_close(run(schedule=[1.0] * STEPS,
                             refresh_experts=refresh)[0], dense)
  _, refreshed, stats = run(schedule=[1.0, 0.5, 0.5], refresh_experts=True)
  assert stats.num_selected == [12, 6, 12]  # 2 x 2 x 3 = 12 tokens
  assert list(stats.budgets) == [1.0, 0.5, 1.0]
  _, kept, stats = run(schedule=[1.0, 0.5, 0.5], refresh_experts=False)
  assert stats.num_selected == [12, 6, 6]
  np.testing.assert_array_equal(np.asarray(refreshed[:2]),
                                np.asarray(kept[:2]))
  assert np.abs(np.asarray(refreshed[2] - kept[2])).max() > 1e-4


def test_one_expert_at_a_time_samples_as_both_resident(a14b, monkeypatch):
  """expert_placement "one" (from_pretrained's default with offload): the
  run in two parts, and while the low-noise steps run the high-noise
  expert's parameters are not on the accelerator (the modules stay NumPy,
  the step gets the running expert's params alone, and the live device
  bytes hold one expert, where "both" holds two); the latents equal those
  of both experts resident bit for bit, dense and Astraea across the
  switch (the token caches carried from one part to the next)."""
  _, _, pipe, _ = a14b
  assert pipe.expert_placement == "one"
  noise = jnp.asarray(a14b_noise(pipe))
  context, negative = (jnp.asarray(x) for x in embeddings(9))
  expert = sum(x.nbytes for x in jax.tree.leaves(nnx.state(pipe.transformer)))
  live = lambda: sum(x.nbytes for x in jax.live_arrays())
  call_step, seen = sampler._call_step, []

  def watched(step, executable, args, plan):
    params = args[0].args[1]  # model_fn = Partial(velocity, graphdef, params)
    seen.append((getattr(plan, "expert", plan), [p is None for p in params],
                 placement.is_on_host(pipe.transformer)
                 and placement.is_on_host(pipe.transformer_2),
                 live() - baseline))
    return call_step(step, executable, args, plan)

  monkeypatch.setattr(sampler, "_call_step", watched)
  runs = {}
  for where in ("both", "one"):
    monkeypatch.setattr(pipe, "expert_placement", where)
    seen.clear()
    gc.collect()
    baseline = live()
    dense = pipe.denoise(noise, context, negative, num_inference_steps=STEPS)
    astraea = pipe.denoise(noise, context, negative,
                           num_inference_steps=STEPS,
                           schedule=[1.0, 0.5, 0.5], return_stats=True)
    runs[where] = (dense, *astraea, list(seen))
  dense, astraea, stats, seen = runs["one"]
  assert [s[:3] for s in seen] == 2 * [(0, [False, True], True),
                                       (0, [False, True], True),
                                       (1, [True, False], True)]
  assert max(s[3] for s in seen) < 1.5 * expert
  # the control: both experts resident for every step
  assert min(s[3] for s in runs["both"][3]) >= 2 * expert
  assert stats.num_selected == runs["both"][2].num_selected == [12, 6, 12]
  # the memory check before sampling counts one expert (both: two)
  assert (runs["both"][2].estimated_peak_bytes
          >= stats.estimated_peak_bytes + 0.75 * expert)
  np.testing.assert_array_equal(np.asarray(dense), np.asarray(runs["both"][0]))
  np.testing.assert_array_equal(np.asarray(astraea),
                                np.asarray(runs["both"][1]))


# `astraea generate` -----------------------------------------------------------


def test_generate_defaults_are_the_models(ti2v, a14b):
  ti2v_defaults = generate.defaults_for(ti2v[2])
  assert (ti2v_defaults["height"], ti2v_defaults["width"],
          ti2v_defaults["frames"], ti2v_defaults["fps"],
          ti2v_defaults["steps"], ti2v_defaults["guidance"],
          ti2v_defaults["shift"]) == (704, 1280, 121, 24.0, 50, 5.0, 5.0)
  a14b_defaults = wan22_pipeline.Wan22T2VA14BPipeline.DEFAULTS
  assert (a14b_defaults["steps"], a14b_defaults["guidance"],
          a14b_defaults["shift"], a14b_defaults["fps"]) == (
              40, (3.0, 4.0), 12.0, 16.0)
  assert checkpoint.manifest_model(ti2v[2]) == "wan2.2-ti2v-5b"


def write_image(path, size, mode="RGB"):
  rng = np.random.default_rng(0)
  channels = len(Image.new(mode, (1, 1)).getbands())
  pixels = rng.integers(0, 256, (size[1], size[0], channels), np.uint8)
  Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels,
                  mode).save(path)
  return path


def test_generate_image_to_video(ti2v, tmp_path, capsys):
  """--image: the video takes the size of area <= --size nearest the
  image's aspect (100 x 60 in 64 x 64 -> 64 x 64), frame 0 is the
  image's latent."""
  image = write_image(tmp_path / "cat.png", (100, 60))
  out = tmp_path / "out"
  assert cli.main(["generate", str(ti2v[2]), "--prompt", "a cat",
                   "--image", str(image), "--size", "64x64", "--frames",
                   "5", "--steps", "2", "--out", str(out)]) == 0, \
      capsys.readouterr().err
  report = json.loads((out / "report.json").read_text())
  assert (report["height"], report["width"]) == (64, 64)
  assert report["image_to_video"]
  latents = load_file(out / "outputs.safetensors")[
      "latents_full"]
  pixels, _ = generate.read_image(image, area=64 * 64)
  np.testing.assert_allclose(latents[:, :, :1],
                             np.asarray(ti2v[1].encode_image(pixels[None])),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_text("not an image") or p,
     "cannot read it as an image"),
    (lambda p: write_image(p, (40, 40), "RGBA"),
     "has 4 channel(s) (RGBA); give an RGB image"),
    (lambda p: write_image(p, (40, 40), "L"),
     "has 1 channel(s) (L); give an RGB image"),
])
@pytest.mark.parametrize("model", ["ti2v", "i2v"])
def test_bad_images_are_refused_naming_the_flag(request, model, tmp_path,
                                                capsys, make, message):
  folder = request.getfixturevalue(model)[-1]
  image = make(tmp_path / "bad.png")
  out = tmp_path / "v.mp4"
  assert cli.main(["generate", str(folder), "--prompt", "a cat",
                   "--image", str(image), "--out", str(out)]) == 1
  err = capsys.readouterr().err
  assert "--image" in err and message in err
  assert not out.exists()


def test_image_is_refused_for_text_to_video_models(a14b, tmp_path, capsys):
  image = write_image(tmp_path / "cat.png", (40, 40))
  out = tmp_path / "v.mp4"
  assert cli.main(["generate", str(a14b[3]), "--prompt", "a cat",
                   "--image", str(image), "--out", str(out)]) == 1
  assert ("--image: " in capsys.readouterr().err)
  assert not out.exists()


def test_generate_runs_the_two_experts(a14b, tmp_path, capsys):
  """`astraea generate` on the converted A14B folder: both experts load,
  the pair of guidance scales is the default and is reported;
  --expert-switch keep runs the schedule's budget at the switch step (the
  default schedule of 0.5 over 3 steps: 1.0, 0.3, 0.2)."""
  out = tmp_path / "out"
  assert cli.main(["generate", str(a14b[3]), "--prompt", "a cat",
                   "--size", "48x32", "--frames", "5", "--steps", "3",
                   "--budget", "0.5", "--compare", "--expert-switch",
                   "keep", "--out", str(out)]) == 0, capsys.readouterr().err
  report = json.loads((out / "report.json").read_text())
  assert report["model"] == "wan2.2-t2v-a14b"
  assert report["guidance_scale"] == [3.0, 4.0]
  assert report["expert_switch"] == "keep"
  assert report["expert_placement"] == "one"  # the CLI offloads
  assert report["astraea"]["schedule"] == [1.0, 0.3, 0.2]
  assert load_file(out / "outputs.safetensors")["video_full"].shape == (
      1, 3, 5, 32, 48)


@pytest.mark.parametrize("model,args,message,code", [
    ("a14b", ["--budget", "0.5", "--expert-switch", "off"],
     "argument --expert-switch: invalid choice: 'off'", 2),
    ("a14b", ["--expert-switch", "keep"], "--expert-switch keep sets what "
     "Astraea's token caches do at the expert switch: give --budget", 1),
    ("ti2v", ["--budget", "0.5", "--expert-switch", "keep"],
     "holds wan2.2-ti2v-5b, one model with no expert switch", 1),
    ("a14b", ["--expert-placement", "all"],
     "argument --expert-placement: invalid choice: 'all'", 2),
    ("ti2v", ["--expert-placement", "one"],
     "--expert-placement one: ", 1),
    ("a14b", ["--expert-placement", "one", "--devices", "2"],
     "with --devices 2 both experts are sharded", 1),
])
def test_bad_expert_switch_is_refused_before_anything_loads(
    request, tmp_path, capsys, monkeypatch, model, args, message, code):
  folder = request.getfixturevalue(model)[-1]

  def no_loading(*args, **kwargs):
    raise AssertionError("a model was loaded")

  monkeypatch.setattr(checkpoint, "load_model", no_loading)
  try:
    status = cli.main(["generate", str(folder), "--prompt", "a cat",
                       "--out", str(tmp_path / "v.mp4"), *args])
  except SystemExit as e:  # argparse's own refusals
    status = e.code
  assert status == code
  assert message in capsys.readouterr().err


# I2V-A14B ---------------------------------------------------------------------

# wan22 configs/wan_i2v_A14B.py: (low noise, high noise) guidance, shift,
# boundary. 3 steps at shift 5: t = 999, 909, 714; the boundary 0.9 * 1000
# puts the last step on the low-noise expert.
I2V_SHIFT, I2V_GUIDANCE, I2V_BOUNDARY = 5.0, (3.5, 3.5), 0.9
I2V_CONFIG = WanConfig.tiny(in_dim=36, out_dim=16, **SMALL)
# An image of 60 x 40 in an area of 48 x 32: wan22 sizes the video 48 x 32
# (latents 4 x 6, 12 tokens over 2 latent frames of 5 video frames).
I2V_IMAGE, I2V_AREA, I2V_FRAMES = (60, 40), 48 * 32, 5


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
  return two_experts(tmp_path_factory, "i2v", I2V_CONFIG, "i2v", (11, 12),
                     wan22_pipeline.Wan22I2VA14BPipeline)


def reference_wan21_vae():
  module = load_wan22_module("vae2_1")
  vae = module.WanVAE_(dim=VAE21.base_dim, z_dim=16, dim_mult=[1, 2, 4, 4],
                       num_res_blocks=2,
                       temperal_downsample=[False, True, True]).eval()
  tensors = vae_tensors(VAE21, "original", 10)
  vae.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
  return vae


def reference_i2v_inputs(image_path, frame_num, max_area):
  """wan22 image2video.py `generate` up to the loop: the image to [-1, 1]
  (TF.to_tensor(img).sub_(0.5).div_(0.5); torchvision is not installed
  here), the video size, the mask and y = [msk; vae.encode(...)]."""
  img = np.array(Image.open(image_path).convert("RGB"))
  img = torch.from_numpy(img).permute(2, 0, 1).float().div(255)
  img = img.sub_(0.5).div_(0.5)
  vae_stride, patch_size = (4, 8, 8), (1, 2, 2)
  F = frame_num  # pylint: disable=invalid-name
  h, w = img.shape[1:]
  aspect_ratio = h / w
  lat_h = round(np.sqrt(max_area * aspect_ratio) // vae_stride[1]
                // patch_size[1] * patch_size[1])
  lat_w = round(np.sqrt(max_area / aspect_ratio) // vae_stride[2]
                // patch_size[2] * patch_size[2])
  h, w = lat_h * vae_stride[1], lat_w * vae_stride[2]
  msk = torch.ones(1, F, lat_h, lat_w)
  msk[:, 1:] = 0
  msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1),
                      msk[:, 1:]], dim=1)
  msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
  msk = msk.transpose(1, 2)[0]
  video = torch.concat([torch.nn.functional.interpolate(
      img[None], size=(h, w), mode="bicubic").transpose(0, 1),
                        torch.zeros(3, F - 1, h, w)], dim=1)
  scale = [torch.tensor(VAE21.latents_mean),
           1 / torch.tensor(VAE21.latents_std)]
  with torch.no_grad():
    y = reference_wan21_vae().encode(video[None], scale)[0]
  return (h, w), torch.concat([msk, y]).numpy()


def reference_i2v_sample(high, low, noise, context, negative, y, *,
                         guidance=I2V_GUIDANCE):
  """wan22 image2video.py's loop (CFG, as with lightning=False: the
  package's default lightning=True skips the unconditional branch and
  loads other weights): both branches take y, t is one timestep for all
  tokens, the expert and its scale by t >= boundary * 1000."""
  sched = reference_scheduler(STEPS, I2V_SHIFT)
  latent = torch.from_numpy(noise)
  y = [torch.from_numpy(y)]
  seq_len = latent.shape[1] * latent.shape[2] * latent.shape[3] // 4
  ctx = [torch.from_numpy(context[0])]
  neg = [torch.from_numpy(negative[0])]
  boundary = I2V_BOUNDARY * 1000
  with torch.no_grad():
    for t in sched.timesteps:
      is_high = t.item() >= boundary
      model = high if is_high else low
      scale = guidance[1] if is_high else guidance[0]
      timestep = torch.stack([t])
      cond = model([latent], t=timestep, context=ctx, seq_len=seq_len,
                   y=y)[0]
      uncond = model([latent], t=timestep, context=neg, seq_len=seq_len,
                     y=y)[0]
      pred = uncond + scale * (cond - uncond)
      latent = sched.step(pred.unsqueeze(0), t, latent.unsqueeze(0),
                          return_dict=False)[0].squeeze(0)
  return latent.numpy()


def test_i2v_a14b_matches_wan22_across_the_boundary(i2v, tmp_path):
  """The image read, sized and resized as wan22 does (`read_image`), its
  mask + Wan2.1 VAE channels, then 3 CFG steps with the expert switch,
  all from the converted original-layout folder."""
  high, low, pipe, _ = i2v
  assert pipe.boundary_ratio == I2V_BOUNDARY
  scheduler = sampler.make_scheduler("unipc", STEPS, shift=I2V_SHIFT,
                                     schedule="wan")
  assert sampler.expert_plan(scheduler.timesteps, I2V_BOUNDARY) == [0, 0, 1]
  image_path = write_image(tmp_path / "cat.png", I2V_IMAGE)
  (h, w), y = reference_i2v_inputs(image_path, I2V_FRAMES, I2V_AREA)
  pixels, size = generate.read_image(image_path, area=I2V_AREA,
                                     model=generate.I2V_A14B)
  assert size == (h, w) == (32, 48)
  condition = pipe.encode_image(pixels[None], I2V_FRAMES)
  assert condition.shape == (1, 20, 2, 4, 6)
  testing.assert_close(condition[0], y)
  shape = pipe.latent_shape(h, w, I2V_FRAMES)
  assert shape == (1, 16, 2, 4, 6)  # the DiT's out_dim, not its in_dim 36
  noise = np.random.default_rng(13).standard_normal(shape).astype(
      np.float32)
  context, negative = embeddings(14)
  expected = reference_i2v_sample(high, low, noise[0], context, negative, y)
  ours = np.asarray(pipe(
      prompt_embeds=context, negative_prompt_embeds=negative,
      image=pixels[None], height=h, width=w, num_frames=I2V_FRAMES,
      num_inference_steps=STEPS, noise=jnp.asarray(noise),
      output_type="latents", progress=False))
  testing.assert_close(ours[0], expected)
  # negative controls: another guidance pair (the switch step's scale
  # counts) and a black image give other samples
  other = reference_i2v_sample(high, low, noise[0], context, negative, y,
                               guidance=(1.0, 3.5))
  assert np.abs(other - expected).max() > 1e-3 * np.abs(expected).max()
  black = np.asarray(pipe(
      prompt_embeds=context, negative_prompt_embeds=negative,
      image=np.zeros_like(pixels[None]), height=h, width=w,
      num_frames=I2V_FRAMES, num_inference_steps=STEPS,
      noise=jnp.asarray(noise), output_type="latents", progress=False))
  assert np.abs(black - ours).max() > 1e-3 * np.abs(ours).max()


def test_i2v_resize_and_mask_follow_wan22():
  """`bicubic_resize` = torch's bicubic interpolate (down and up);
  `i2v_size` = image2video.py's rounding for a few aspect ratios."""
  pixels = np.random.default_rng(0).uniform(-1, 1, (3, 37, 53)).astype(
      np.float32)
  for size in ((16, 32), (64, 80), (37, 53), (100, 20)):
    want = torch.nn.functional.interpolate(
        torch.from_numpy(pixels)[None], size=size, mode="bicubic")[0]
    # float32 weights evaluated in another order: ~1e-7 of values ~1
    np.testing.assert_allclose(wan22_pipeline.bicubic_resize(pixels, *size),
                               want.numpy(), rtol=0, atol=2e-6)
  for w, h in ((1920, 1080), (1080, 1920), (1000, 1000), (640, 480)):
    aspect = h / w
    want_h = round(np.sqrt(1280 * 720 * aspect) // 8 // 2 * 2) * 8
    want_w = round(np.sqrt(1280 * 720 / aspect) // 8 // 2 * 2) * 8
    assert wan22_pipeline.i2v_size(w, h, 1280 * 720) == (want_w, want_h)
  mask = np.asarray(wan22_pipeline.i2v_mask((1, 16, 3, 2, 2)))
  assert mask.shape == (1, 4, 3, 2, 2)
  np.testing.assert_array_equal(mask[0, :, 0], 1)
  np.testing.assert_array_equal(mask[0, :, 1:], 0)


def test_astraea_on_i2v_a14b(i2v):
  """Budget 1 through the token-wise engine = the dense two-expert I2V
  run; at 0.5 the tokens are selected and the switch step runs them all."""
  _, _, pipe, _ = i2v
  noise = jnp.asarray(np.random.default_rng(15).standard_normal(
      (1, 16, 2, 4, 6)).astype(np.float32))
  context, negative = (jnp.asarray(x) for x in embeddings(16))
  image = np.random.default_rng(17).uniform(-1, 1, (1, 3, 32, 48)).astype(
      np.float32)
  condition = pipe.image_conditioning(image, I2V_FRAMES)
  run = functools.partial(pipe.denoise, noise, context, negative, condition,
                          num_inference_steps=STEPS)
  dense = run()
  testing.assert_close(run(schedule=[1.0] * STEPS), dense)
  half, stats = run(schedule=[1.0, 0.5, 0.5], return_stats=True)
  assert stats.num_selected == [12, 6, 12]
  kept, stats = run(schedule=[1.0, 0.5, 0.5], return_stats=True,
                    refresh_experts=False)
  assert stats.num_selected == [12, 6, 6]
  assert np.abs(np.asarray(half) - np.asarray(dense)).max() > 1e-4
  assert np.abs(np.asarray(kept) - np.asarray(half)).max() > 1e-4
  with pytest.raises(ValueError, match="is image-to-video: give an image"):
    pipe.denoise(noise, context, negative, num_inference_steps=STEPS)


def test_generate_i2v_a14b(i2v, tmp_path, capsys):
  """`astraea generate` with --image: the video's size from the image
  (60 x 40 in 48 x 32 -> 48 x 32), the model's guidance pair reported,
  the video decoded."""
  image = write_image(tmp_path / "cat.png", I2V_IMAGE)
  out = tmp_path / "out"
  assert cli.main(["generate", str(i2v[3]), "--prompt", "a cat",
                   "--image", str(image), "--size", "48x32", "--frames",
                   "5", "--steps", "3", "--out", str(out)]) == 0, \
      capsys.readouterr().err
  report = json.loads((out / "report.json").read_text())
  assert report["model"] == "wan2.2-i2v-a14b"
  assert (report["height"], report["width"]) == (32, 48)
  assert report["guidance_scale"] == [3.5, 3.5] and report["image_to_video"]
  assert load_file(out / "outputs.safetensors")["video_full"].shape == (
      1, 3, 5, 32, 48)


def test_i2v_a14b_needs_an_image_before_anything_loads(i2v, tmp_path,
                                                       capsys, monkeypatch):
  def no_loading(*args, **kwargs):
    raise AssertionError("a model was loaded")

  monkeypatch.setattr(checkpoint, "load_model", no_loading)
  out = tmp_path / "v.mp4"
  assert cli.main(["generate", str(i2v[3]), "--prompt", "a cat",
                   "--out", str(out)]) == 1
  err = capsys.readouterr().err
  assert ("error: the following arguments are required for "
          "wan2.2-i2v-a14b") in err and "--image PATH" in err
  assert not out.exists()


# `astraea search` on the Wan2.2 folders ---------------------------------------

SEARCH_STEPS, SEARCH_SAMPLES = 4, 2
# At 4 steps the switch is step 3 (T2V-A14B) / step 2 (I2V-A14B); gene 2 there.
SEARCH_GENOME = [10, 5, 2, 2]


def write_embeddings(folder, count):
  paths = []
  for i in range(count):
    context, negative = embeddings(20 + i)
    paths.append(folder / f"p{i}.safetensors")
    save_file({"context": context[0], "negative_context": negative[0]},
              paths[-1])
  return paths


@pytest.mark.parametrize("model,size,switch", [
    ("a14b", (32, 48, 5), "keep"),
    ("i2v", (32, 48, 5), "refresh"),
    ("ti2v", (HEIGHT, WIDTH, FRAMES), None),
])
def test_search_fitness_is_the_samplers_mse(request, tmp_path, model, size,
                                            switch):
  """The search's fitness of a genome (`problem_fitness` of the pipeline's
  `search_model`: the experts switched at the boundary with their guidance,
  I2V's image channels, TI2V's image frame) = the MSE of the library's own
  Astraea sampler against the dense one, both with the pipeline's image
  hooks (rel 1e-5, float32). With refresh the switch step's gene does not
  count; with keep it does."""
  pipe = request.getfixturevalue(model)[-2]
  height, width, frames = size
  image = None if model == "a14b" else np.random.default_rng(21).uniform(
      -1, 1, (3, height, width)).astype(np.float32)
  problem = search.Problem(height=height, width=width, frames=frames,
                           samples=SEARCH_SAMPLES)
  files = write_embeddings(tmp_path, SEARCH_SAMPLES)
  d = pipe.DEFAULTS
  eval_config = search.EvalConfig(
      timesteps="wan", guidance_scale=d["guidance"], shift=d["shift"],
      selection=selection.EXACT, batch_nodes=2,
      refresh_experts=switch != "keep")
  fitness = search.problem_fitness(pipe.search_model(image), files, problem,
                                   steps=SEARCH_STEPS,
                                   eval_config=eval_config)
  noise, context, negative = search.load_samples(
      files, SMALL["text_dim"], problem, pipe.latent_shape)
  noise, hooks = pipe.image_hooks(noise, None if image is None else
                                  pipe.image_conditioning(np.stack(
                                      [image] * SEARCH_SAMPLES), frames))
  graphdef, params, boundary = pipe.split_experts()
  args = (graphdef, params, noise, context, negative)
  options = dict(scheduler=sampler.make_scheduler(
      "unipc", SEARCH_STEPS, shift=d["shift"], schedule="wan"), steps=None,
                 guidance_scale=d["guidance"], boundary_ratio=boundary,
                 progress=False, **hooks)
  full = sampler.sample(*args, **options)
  testing.assert_close(fitness.reference[:, 0], full)
  fast = wan_tokenwise.sample(*args, schedule=np.asarray(SEARCH_GENOME) / 10,
                              selection_config=selection.EXACT,
                              refresh_experts=switch != "keep", **options)
  mse = float(np.mean(np.square(np.asarray(fast, np.float64) - full)))
  got = fitness(np.asarray([SEARCH_GENOME]))[0]
  assert mse > 0 and abs(got - mse) <= 1e-5 * mse
  if switch is not None:
    experts = sampler.expert_plan(fitness.scheduler.timesteps, boundary)
    at_switch = list(SEARCH_GENOME)
    at_switch[experts.index(1)] = 10
    other = fitness(np.asarray([at_switch]))[0]
    assert (other == got) == (switch == "refresh")


def search_command(folder, out, files, *extra):
  return ["search", "--model", str(folder), "--target-budget", "0.5",
          "--text-embeddings", *map(str, files), "--out", str(out),
          "--steps", str(SEARCH_STEPS), "--samples", str(SEARCH_SAMPLES),
          "--population", "4", "--children", "2", "--generations", "1",
          "--quiet", *extra]


def test_search_command_on_the_a14b_folder(a14b, tmp_path, capsys):
  """`astraea search --model <A14B folder>`: the model's guidance pair,
  shift and timesteps, both experts at the boundary, the default switch
  (refresh)."""
  out = tmp_path / "out"
  files = write_embeddings(tmp_path, SEARCH_SAMPLES)
  assert cli.main(search_command(a14b[3], out, files, "--height", "32",
                                 "--width", "48", "--frames", "5")) == 0, \
      capsys.readouterr().err
  report = json.loads((out / "report.json").read_text())
  assert report["boundary_ratio"] == 0.875 and not report["image_to_video"]
  assert report["eval_config"]["guidance_scale"] == [3.0, 4.0]
  assert (report["eval_config"]["shift"], report["eval_config"]["timesteps"],
          report["eval_config"]["refresh_experts"]) == (12.0, "wan", True)
  assert report["fitness"] > 0


@pytest.mark.parametrize("model,image,message", [
    ("a14b", True, "holds wan2.2-t2v-a14b; only wan2.2-ti2v-5b and "
     "wan2.2-i2v-a14b take an image"),
    ("i2v", False, "the following arguments are required for "
     "wan2.2-i2v-a14b"),
])
def test_search_refuses_a_bad_image_before_anything_loads(
    request, tmp_path, capsys, monkeypatch, model, image, message):
  folder = request.getfixturevalue(model)[-1]

  def no_loading(*args, **kwargs):
    raise AssertionError("a model was loaded")

  monkeypatch.setattr(checkpoint, "load_model", no_loading)
  extra = ["--image", str(write_image(tmp_path / "cat.png", (40, 40)))
           ] if image else []
  assert cli.main(search_command(folder, tmp_path / "out",
                                 [tmp_path / "p.safetensors"], *extra)) == 1
  err = capsys.readouterr().err
  assert message in err and "--image" in err
  assert not (tmp_path / "out").exists()
