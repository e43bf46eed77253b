"""Single-device references for the multi-device tests (not collected).

`reference_forward` is `astraea.wan_tokenwise.forward` (the model's own sparse
block, WanBlock(token_index=...)) with the selection that sequence
parallelism makes: the top round(K / P) tokens of each of the P shards
(`parallel.select_tokens_per_shard`) instead of the global top K. It shares
no attention, layout or collective code with the sharded path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax import parallel, testing
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.configs import WanConfig
from astraea_jax.models import wan
from astraea_jax.sampling import sampler as dense

# 6 heads: Ulysses on 2 and 3 devices, a 2 x 2 hybrid on 4 (like Wan
# 1.3B's 12 heads on 8 GPUs), forced ring anywhere.
CONFIG = WanConfig.tiny(num_layers=2, dim=48, ffn_dim=64, num_heads=6,
                        text_dim=24, text_len=8, freq_dim=16)
# Latent grids: 5 x 14 x 2 -> 35 tokens (uneven over 2, 3, 4 shards: pad
# rows), 3 x 6 x 8 -> 36 tokens (even over 2, 3, 4).
SHAPE_35 = (1, 16, 5, 14, 2)
SHAPE_36 = (1, 16, 3, 6, 8)
SELECTION = selection.EXACT
# Astraea schedule of the 2-process test (tests/_parallel_worker.py).
MULTIPROCESS_SCHEDULE = (1.0, 0.5)


def random_model(seed=1, config=CONFIG):
  """(graphdef, params) of `config`, drawn with numpy on the host.

  The rules of `testing.random_params`, without its one big jit (which
  takes ~15 s to compile on a CPU, in every process that needs a model).
  """
  graphdef, abstract = nnx.split(wan.abstract_model(config))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    x = testing.scaled_like_init(jax.tree_util.keystr(path),
                                 rng.standard_normal(leaf.shape), leaf.shape)
    return jnp.asarray(x, leaf.dtype)

  return graphdef, jax.tree_util.tree_map_with_path(draw, abstract)


def inputs(shape=SHAPE_35):
  noise = dense.draw_noise(jax.random.key(0), shape)
  ctx = jax.random.normal(jax.random.key(1), (shape[0], 5, CONFIG.text_dim))
  neg = jax.random.normal(jax.random.key(2), (1, 3, CONFIG.text_dim))
  return noise, ctx, neg


def rel_err(a, b):
  return float(jnp.abs(jnp.asarray(a) - jnp.asarray(b)).max()
               / jnp.abs(jnp.asarray(b)).max())


def _layer(tree, i):
  return jax.tree.map(lambda c: c[i], tree)


def _set_layer(tree, i, new):
  return jax.tree.map(
      lambda c, u: jax.lax.dynamic_update_index_in_dim(c, u.astype(c.dtype),
                                                       i, 0), tree, new)


def reference_forward(model, latents, timestep, context, cache, *,
                      num_selected, num_shards, config=SELECTION,
                      condition=None):
  """One Astraea model call on one device with per-shard selection."""
  x, e, e0, ctx, rope = model.embed(latents, timestep, context, condition)
  n = x.shape[1]
  layout = parallel.TokenLayout(n, num_shards)
  k_local = parallel.local_num_selected(num_selected, layout)
  graphdef, blocks = nnx.split(model.blocks)

  def body(carry, block_state):
    x, cache, i = carry
    c = _layer(cache, i)
    block = nnx.merge(graphdef, block_state)
    if num_selected == 0:
      x_next, new = selection.reuse_layer_cache(c, x)
    elif num_selected == n:
      x_out, aux = block(x, e0, ctx, rope)
      x_next, new = selection.refresh_layer_cache(c, x, x_out, aux["lse"],
                                                  config)
    else:
      scores = selection.token_scores(x, c, config)
      idx = parallel.select_tokens_per_shard(scores, k_local, layout)
      x_sel, aux = block(x, e0, ctx, rope, token_index=idx)
      x_next, new = selection.update_layer_cache(c, x, x_sel, aux["lse"],
                                                 idx, config)
    return (x_next, _set_layer(cache, i, new), i + 1), None

  (x, cache, _), _ = jax.lax.scan(body, (x, cache, 0), blocks)
  return model.unembed(x, e, latents.shape), cache


@functools.partial(jax.jit,
                   static_argnames=("num_selected", "num_shards", "config"))
def _reference_step(graphdef, params, context_2b, scheduler, sched_state,
                    cache, latents, token_mask, post_step, guidance,
                    condition_2b, *, num_selected, num_shards, config):
  def model_fn(cache, latents_2b, timesteps_2b):
    model = nnx.merge(graphdef, params)
    return reference_forward(
        model, latents_2b, dense.token_timesteps(timesteps_2b, token_mask),
        context_2b, cache, num_selected=num_selected, num_shards=num_shards,
        config=config, condition=condition_2b)

  return dense.guided_step(model_fn, scheduler, guidance, latents,
                           sched_state, cache, post_step)


def reference_astraea_sample(graphdef, params, noise, context, negative, *,
                             schedule, num_shards, shift=3.0,
                             config=SELECTION, token_mask=None,
                             post_step=None, experts=None, guidance=None,
                             condition=None):
  """Astraea CFG sampling (UniPC, guidance 5) with per-shard selection;
  token_mask, post_step, condition: Wan2.2's hooks (`sampling.sample`).
  Two experts (A14B): params the pair, experts the expert of each step
  and guidance its CFG scale; the schedule is taken as it is (a switch
  step's budget 1.0 is the caller's)."""
  experts = [0] * len(schedule) if experts is None else experts
  guidance = [5.0] * len(schedule) if guidance is None else guidance
  condition_2b = dense.cfg_condition(condition)
  model_config = nnx.merge(graphdef, dense.pick_expert(params, 0)).config
  scheduler = dense.make_scheduler("unipc", len(schedule), shift=shift)
  n = 1
  for s, p in zip(noise.shape[2:], model_config.patch_size):
    n *= s // p
  cache = selection.init_cache(model_config.num_layers, 2 * noise.shape[0],
                               n, model_config.dim, config)
  latents = jnp.asarray(noise)
  state = scheduler.init(latents)
  context_2b = dense.cfg_context(context, negative)
  for theta, expert, scale in zip(schedule, experts, guidance):
    latents, state, cache = _reference_step(
        graphdef, dense.pick_expert(params, expert), context_2b, scheduler,
        state, cache, latents, token_mask, post_step, jnp.float32(scale),
        condition_2b, num_selected=schedule_lib.num_selected(theta, n),
        num_shards=num_shards, config=config)
  return latents
