"""The dense CFG sampling loop vs diffusers' WanPipeline, and its contracts.

End to end: a tiny random WanDiT (WanConfig.tiny(), every parameter random)
and the diffusers WanTransformer3DModel with the same weights (through the
converter's `to_checkpoint`), the same noise and prompt embeddings, 3 UniPC
steps with CFG. The pipeline runs with `prompt_embeds` and
`output_type="latent"`, so its text encoder and VAE are never used.
Tolerance: max |ours - reference| / max |reference| <= 1e-4 (two float32
models with different op orders, ~1e-6 per forward, through 3 steps of
CFG scale 5, which amplifies the model error by ~2 * 5 + 1).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from flax import nnx

from astraea_jax import testing
from astraea_jax.configs import WanConfig
from astraea_jax.sampling import memory
from astraea_jax.sampling import sampler
from astraea_jax.sampling.schedulers import FlowEuler, FlowUniPC
from converters import wan as wan_converter

CONFIG = WanConfig.tiny()
LATENT_SHAPE = (1, 16, 3, 8, 8)  # 48 tokens
STEPS, SCALE, SHIFT = 3, 5.0, 3.0


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return np.abs(ours - ref).max() / np.abs(ref).max()


@pytest.fixture(scope="module")
def model():
  return testing.random_wan(CONFIG, seed=0)


@pytest.fixture(scope="module")
def inputs():
  """Noise, a prompt (10 tokens) and a negative prompt (5), zero-padded to
  text_len as Wan's text encoder output is."""
  rng = np.random.default_rng(0)
  noise = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
  context = np.zeros((1, CONFIG.text_len, CONFIG.text_dim), np.float32)
  context[:, :10] = rng.standard_normal((1, 10, CONFIG.text_dim))
  negative = np.zeros_like(context)
  negative[:, :5] = rng.standard_normal((1, 5, CONFIG.text_dim))
  return noise, context, negative


@pytest.fixture(scope="module")
def reference(model, inputs):
  """diffusers WanPipeline's denoising loop: (final latents, per step)."""
  _, params = model
  c = CONFIG
  transformer = WanTransformer3DModel(
      patch_size=c.patch_size, num_attention_heads=c.num_heads,
      attention_head_dim=c.head_dim, in_channels=c.in_dim,
      out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim,
      ffn_dim=c.ffn_dim, num_layers=c.num_layers,
      cross_attn_norm=c.cross_attn_norm, qk_norm="rms_norm_across_heads",
      eps=c.eps, rope_max_seq_len=1024).eval()
  state = wan_converter.to_checkpoint(nnx.to_pure_dict(params), c,
                                      "diffusers")
  transformer.load_state_dict(
      {k: torch.from_numpy(np.array(v)) for k, v in state.items()},
      strict=True)
  scheduler = UniPCMultistepScheduler(
      prediction_type="flow_prediction", use_flow_sigmas=True,
      flow_shift=SHIFT, num_train_timesteps=1000)
  pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None,
                     scheduler=scheduler, transformer=transformer)
  pipe.set_progress_bar_config(disable=True)
  per_step = []

  def record(pipe, i, t, tensors):
    per_step.append(tensors["latents"].numpy().copy())
    return {}

  noise, context, negative = inputs
  _, _, f, h, w = noise.shape
  with torch.no_grad():
    out = pipe(prompt_embeds=torch.from_numpy(context),
               negative_prompt_embeds=torch.from_numpy(negative),
               latents=torch.from_numpy(noise), height=8 * h, width=8 * w,
               num_frames=4 * (f - 1) + 1, num_inference_steps=STEPS,
               guidance_scale=SCALE, output_type="latent",
               callback_on_step_end=record,
               callback_on_step_end_tensor_inputs=["latents"])
  return out.frames.numpy(), np.stack(per_step)


def run_sample(model, inputs, **kw):
  graphdef, params = model
  noise, context, negative = (jnp.asarray(x) for x in inputs)
  kw = {"scheduler": "unipc", "steps": STEPS, "guidance_scale": SCALE,
        "shift": SHIFT, "progress": False} | kw
  return sampler.sample(graphdef, params, noise, context, negative, **kw)


@pytest.fixture(scope="module")
def ours(model, inputs):
  return run_sample(model, inputs, return_trajectory=True)


def test_matches_diffusers_wan_pipeline(model, inputs, ours, reference):
  latents, trajectory = ours
  ref_latents, ref_steps = reference
  assert latents.shape == LATENT_SHAPE and latents.dtype == jnp.float32
  assert trajectory.shape == (STEPS,) + LATENT_SHAPE
  assert rel_err(latents, ref_latents) <= 1e-4
  for i in range(STEPS):
    assert rel_err(trajectory[i], ref_steps[i]) <= 1e-4, f"step {i}"
  # The comparison sees the guidance: another scale lands far away.
  assert rel_err(run_sample(model, inputs, guidance_scale=4.0),
                 ref_latents) > 1e-2


def test_scan_loop_matches_python_loop(model, inputs, ours):
  latents, trajectory = run_sample(model, inputs, loop="scan",
                                   return_trajectory=True)
  # Same step function; XLA may fuse the scanned body differently.
  assert rel_err(latents, ours[0]) <= 1e-6
  assert rel_err(trajectory, ours[1]) <= 1e-6


def test_deterministic_given_key(model, inputs):
  key = jax.random.key(42)
  noise = sampler.draw_noise(key, LATENT_SHAPE)
  np.testing.assert_array_equal(noise, sampler.draw_noise(key, LATENT_SHAPE))
  assert not np.array_equal(noise, sampler.draw_noise(jax.random.key(43),
                                                      LATENT_SHAPE))
  _, context, negative = inputs
  first = run_sample(model, (noise, context, negative), scheduler="euler")
  second = run_sample(model, (noise, context, negative), scheduler="euler")
  np.testing.assert_array_equal(first, second)
  assert np.isfinite(np.asarray(first)).all()


def test_scheduler_object_and_negative_broadcast(model, inputs):
  """A scheduler pytree works like its name; a negative context of batch
  1 and shorter length is broadcast and zero-padded."""
  noise, context, negative = inputs
  noise2 = np.concatenate([noise, noise[:, :, ::-1]])
  context2 = np.concatenate([context, context[:, ::-1]])
  by_name = run_sample(model, (noise2, context2, negative))
  by_object = run_sample(
      model, (noise2, context2, negative[:, :5]), steps=None,
      scheduler=FlowUniPC.set_timesteps(STEPS, shift=SHIFT))
  assert rel_err(by_object, by_name) <= 1e-6
  with pytest.raises(ValueError, match="disagrees"):
    run_sample(model, inputs, steps=4,
               scheduler=FlowEuler.set_timesteps(3, shift=SHIFT))


def test_cfg_pieces():
  rng = np.random.default_rng(0)
  cond, uncond = rng.standard_normal((2, 3, 4)).astype(np.float32)
  guided = sampler.cfg_combine(jnp.asarray(np.stack([cond, uncond])), 5.0)
  np.testing.assert_allclose(guided[0], uncond + 5.0 * (cond - uncond),
                             rtol=1e-6, atol=1e-6)
  latents_2b, t_2b = sampler.cfg_batch(jnp.ones((2, 16, 1, 2, 2)), 999.0)
  assert latents_2b.shape == (4, 16, 1, 2, 2)
  np.testing.assert_array_equal(t_2b, [999.0] * 4)
  ctx = sampler.cfg_context(jnp.ones((2, 7, 8)), jnp.full((1, 4, 8), 2.0))
  assert ctx.shape == (4, 7, 8)
  np.testing.assert_array_equal(ctx[2:, :4], 2.0)
  np.testing.assert_array_equal(ctx[2:, 4:], 0.0)
  with pytest.raises(ValueError, match="batch 3"):
    sampler.cfg_context(jnp.ones((2, 7, 8)), jnp.ones((3, 7, 8)))


def test_wan_latent_shape():
  assert sampler.wan_latent_shape(480, 832, 81) == (1, 16, 21, 60, 104)
  assert sampler.wan_latent_shape(720, 1280, 81, batch=2) == (
      2, 16, 21, 90, 160)
  with pytest.raises(ValueError, match="num_frames=80"):
    sampler.wan_latent_shape(480, 832, 80)


def _plan_model(carry, latents, timesteps, *, plan):
  """A model whose plan "big" makes 32 MiB of temporaries, "small" none."""
  del timesteps
  if plan == "big":  # a matmul's operand and result: 2 x 16 MiB buffers
    t = jax.random.normal(jax.random.key(0), (2048, 2048)) * latents.mean()
    latents = latents + (t @ t).mean() * 1e-12
  return latents * 0.5, carry


def _plan_run(plans, made):
  def make_carry():
    made.append(True)
    return jnp.zeros((8,), jnp.float32)

  return sampler.run(jax.tree_util.Partial(_plan_model),
                     jnp.ones((1, 4, 2, 2, 2), jnp.float32),
                     scheduler=FlowEuler.set_timesteps(len(plans)),
                     guidance_scale=1.0, plans=plans, make_carry=make_carry,
                     progress=False)


def test_memory_check_takes_the_largest_step_program(monkeypatch):
  """Every plan is compiled before the carry is made, and the run is
  refused when ANY plan's program would not fit, here the second one (a
  check of the first plan alone, as before, lets it run)."""
  made = []
  small = _plan_run(["small", "small"], made)[3].estimated_peak_bytes
  big = _plan_run(["big", "big"], made)[3].estimated_peak_bytes
  assert big > small + 30 * 2**20, (small, big)  # the 32 MiB temporaries
  made.clear()
  monkeypatch.setenv(memory.ENV_LIMIT, str((small + big) // 2))
  with pytest.raises(memory.DoesNotFitError, match="nothing was sampled"):
    _plan_run(["small", "big"], made)
  # make_carry ran once, abstractly (jax.eval_shape: the carry's shapes for
  # the compiles); the refusal came before the real call that allocates it.
  assert len(made) == 1
  made.clear()
  stats = _plan_run(["small", "small"], made)[3]
  assert len(made) == 2 and stats.estimated_peak_bytes == small
