"""The tiny Wan2.1 model, inputs and forward loop of the Astraea tests
(test_astraea.py: the exact state; test_lean_state.py: the lean ones).
`split_model` and `inputs` are module-scoped fixtures: import them."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from astraea_jax import testing
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.astraea import wan_tokenwise as astraea
from astraea_jax.configs import WanConfig
from astraea_jax.sampling import sampler as dense

CONFIG = WanConfig.tiny(num_layers=2, dim=64, ffn_dim=96, num_heads=2,
                        text_dim=24, text_len=8, freq_dim=16)
STEPS = 6
TOKENS = 32


@pytest.fixture(scope="module")
def split_model():
  return testing.random_wan(CONFIG, seed=5)


@pytest.fixture(scope="module")
def inputs():
  noise = dense.draw_noise(jax.random.key(0), (1, 16, 2, 8, 8))  # N = 32
  ctx = jax.random.normal(jax.random.key(1), (1, 6, CONFIG.text_dim))
  neg = jax.random.normal(jax.random.key(2), (1, 3, CONFIG.text_dim))
  return noise, ctx, neg


def rel_err(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def run_forward(split, sample_inputs, budgets, masked, config):
  """One model call per budget (sparse or masked form), a crude Euler
  update in between; returns (velocities, final cache)."""
  model = nnx.merge(*split)
  noise, ctx, neg = sample_inputs
  ctx2 = dense.cfg_context(ctx, neg)
  x = jnp.concatenate([noise, noise])
  cache = selection.init_cache(CONFIG.num_layers, 2, TOKENS, CONFIG.dim,
                               config)
  outs = []
  for i, theta in enumerate(budgets):
    t = jnp.full((2,), 900.0 - 100 * i)
    k = schedule_lib.num_selected(theta, TOKENS)
    if masked:
      v, cache = astraea.forward_masked(model, x, t, ctx2, cache, k,
                                        config=config)
    else:
      v, cache = astraea.forward(model, x, t, ctx2, cache, num_selected=k,
                                 config=config)
    outs.append(v)
    x = x - 0.1 * v
  return outs, cache
