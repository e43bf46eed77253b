"""Wan2.2 DiT variants against the `wan22` package's `WanModel`.

Tiny random configs, every parameter random (`randomise_`), the weights
read through the converter's key map (`converters.wan.load_params`):
  * TI2V (48 latent channels in and out) with per-token timesteps: the
    TI2V pipeline's form (the first latent frame at t = 0) and one t per
    token drawn at random;
  * I2V (in_dim 36 = 16 latent + 20 condition channels, out_dim 16): the
    mask and image latents enter as `condition=`;
  * T2V-A14B experts are the Wan2.1 DiT (tests/test_reference_parity.py).

Tolerance: max abs error <= 1e-5 * max|reference| + 1e-6 (float32, the
same math in a different order; `testing.assert_close`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from _wan22_reference import random_reference_dit
from astraea_jax import testing
from astraea_jax.configs import WanConfig
from astraea_jax.models import layers, wan
from converters import wan as wan_converter
from converters.common import Source

SMALL = dict(dim=96, ffn_dim=160, num_heads=4, num_layers=2, text_dim=40,
             text_len=12, freq_dim=32)
TI2V = WanConfig.tiny(in_dim=48, out_dim=48, **SMALL)
I2V = WanConfig.tiny(in_dim=36, out_dim=16, **SMALL)
GRID = (3, 8, 10)  # latent frames, height, width -> 3 x 4 x 5 = 60 tokens
TOKENS = 60
CONTEXT_LENS = (9, 4)


reference_model = random_reference_dit


def converted(ref, config):
  """Our model from the reference's state dict, through the converter."""
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  params = wan_converter.load_params(Source.from_arrays(sd), "wan", config)
  return wan.model_from_params(config, params)


def contexts(rng, config):
  ctx = np.zeros((2, config.text_len, config.text_dim), np.float32)
  for i, n in enumerate(CONTEXT_LENS):
    ctx[i, :n] = rng.standard_normal((n, config.text_dim))
  return ctx


def run_reference(ref, x, t, ctx, y=None):
  with torch.no_grad():
    out = ref([torch.from_numpy(u) for u in x], t=torch.from_numpy(t),
              context=[torch.from_numpy(c[:n])
                       for c, n in zip(ctx, CONTEXT_LENS)],
              seq_len=TOKENS,
              y=None if y is None else [torch.from_numpy(u) for u in y])
  return np.stack([o.numpy() for o in out])


def run_ours(model, x, t, ctx, condition=None):
  """The batch at once: `ctx` is zero past each sample's length, as the
  reference pads each unpadded context to text_len."""
  cond = None if condition is None else jnp.asarray(condition)
  return np.asarray(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx),
                          condition=cond))


def first_frame_timesteps(t, grid):
  """The TI2V pipeline's per-token timesteps: its mask is 0 on the first
  latent frame, so those tokens get t = 0 and the others t. (B,) ->
  (B, f*h*w) in the patch grid's (f, h, w) order."""
  f, h, w = grid
  frame_t = np.where(np.arange(f) == 0, 0.0, 1.0)[None] * t[:, None]
  return np.repeat(frame_t, h * w, axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def ti2v():
  ref = reference_model(TI2V, "ti2v", seed=21)
  return ref, converted(ref, TI2V)


@pytest.mark.parametrize("timesteps", ["first_frame", "random"])
def test_ti2v_per_token_timesteps_match_wan22(ti2v, timesteps):
  ref, model = ti2v
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 48, *GRID)).astype(np.float32)
  ctx = contexts(rng, TI2V)
  if timesteps == "first_frame":
    t = first_frame_timesteps(np.array([937.5, 212.25], np.float32),
                              (3, 4, 5))
  else:
    t = rng.uniform(0, 1000, (2, TOKENS)).astype(np.float32)
  expected = run_reference(ref, x, t, ctx)
  testing.assert_close(run_ours(model, x, t, ctx), expected)
  # the timesteps matter: one t for all tokens gives another output
  flat = run_ours(model, x, t[:, -1:].repeat(TOKENS, 1), ctx)
  assert np.abs(flat - expected).max() > 0.01 * np.abs(expected).max()


def test_i2v_condition_channels_match_wan22():
  ref = reference_model(I2V, "i2v", seed=22)
  model = converted(ref, I2V)
  rng = np.random.default_rng(6)
  x = rng.standard_normal((2, 16, *GRID)).astype(np.float32)
  y = rng.standard_normal((2, 20, *GRID)).astype(np.float32)
  ctx = contexts(rng, I2V)
  t = np.array([981.25, 37.5], np.float32)
  expected = run_reference(ref, x, t[:, None].repeat(TOKENS, 1), ctx, y)
  testing.assert_close(run_ours(model, x, t, ctx, condition=y), expected)


def test_per_token_timesteps_equal_to_one_t_match_the_batch_form(ti2v):
  _, model = ti2v
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 48, *GRID)), jnp.float32)
  ctx = jnp.asarray(contexts(rng, TI2V))
  t = jnp.array([500.0, 20.5])
  per_token = model(x, jnp.repeat(t[:, None], TOKENS, axis=1), ctx)
  testing.assert_close(per_token, model(x, t, ctx))


def test_token_selection_takes_per_token_modulation(ti2v):
  """A block run on K selected tokens with per-token tables gives the
  dense block's rows for those tokens (exact attention rows)."""
  _, model = ti2v
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.standard_normal((2, 48, *GRID)), jnp.float32)
  t = jnp.asarray(rng.uniform(0, 1000, (2, TOKENS)), jnp.float32)
  ctx = jnp.asarray(contexts(rng, TI2V))
  h, _, e0, c, rope = model.embed(x, t, ctx)
  assert e0.shape == (2, TOKENS, 6, TI2V.dim)
  first = nnx.merge(nnx.graphdef(model.blocks),
                    jax.tree.map(lambda a: a[0], nnx.state(model.blocks)))
  dense, _ = first(h, e0, c, rope)
  index = jnp.sort(jnp.asarray(
      np.stack([rng.choice(TOKENS, 17, replace=False) for _ in range(2)])),
      axis=1)
  sparse, _ = first(h, e0, c, rope, token_index=index)
  testing.assert_close(sparse, layers.take_tokens(dense, index))


def test_bad_timestep_and_condition_shapes_are_refused(ti2v):
  _, model = ti2v
  x = jnp.zeros((1, 48, *GRID))
  ctx = jnp.zeros((1, 3, TI2V.text_dim))
  with pytest.raises(ValueError, match=r"per token \(1, 60\)"):
    model(x, jnp.zeros((1, 59)), ctx)
  with pytest.raises(ValueError, match="C \\+ C' = c.in_dim=48"):
    model(x[:, :16], jnp.zeros((1,)), ctx, condition=x[:, :20])
