"""Astraea token selection: scores, top-K, and the per-block cache.

Before block l at denoising step t, token i gets the score (Astraea, sec. 3.1)

    S_i = w_alpha * S_LSE_i(t-1) * Delta_i(t) + w_beta * exp(n_i)

S_LSE: the token's self-attention log-sum-exp from the last step that
computed it (free from the softmax; aggregated over heads by mean),
Delta: how much the token's block input changed since it was last computed,
n: consecutive steps the token was not selected (no token starves).
The K = round(theta_t * N) best tokens run the block; every other token
reuses its cached residual update: x_out = x + cached_update (ours: the
skip path stays current).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
  """Options of the token score; defaults follow ../shared/DESIGN.md."""

  w_alpha: float = 1.0
  w_beta: float = 0.5
  # "input_relative": ||x - x_last|| / ||x_last|| at the block input;
  # "input_absolute": ||x - x_last||.
  delta: str = "input_relative"
  # How per-head LSE is reduced to one number per token: "mean" | "max".
  head_reduce: str = "mean"
  use_lse: bool = True
  use_delta: bool = True
  use_penalty: bool = True
  # dtype of the cached update and last input ("float32" | "bfloat16").
  cache_dtype: str = "float32"

  def __post_init__(self):
    if self.delta not in ("input_relative", "input_absolute"):
      raise ValueError(f"unknown {self.delta=}")
    if self.head_reduce not in ("mean", "max"):
      raise ValueError(f"unknown {self.head_reduce=}")
    if self.cache_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"unknown {self.cache_dtype=}")


def init_cache(num_layers, batch, num_tokens, dim, config: SelectionConfig):
  """Empty per-block cache, stacked on a leading layer axis.

  update: (L, B, N, dim) block output - block input, last computed.
  input:  (L, B, N, dim) block input when last computed (for Delta).
  lse:    (L, B, N) head-reduced self-attention LSE, last computed.
  stale:  (L, B, N) int32, consecutive steps not selected.
  """
  dtype = jnp.dtype(config.cache_dtype)
  shape = (num_layers, batch, num_tokens)
  return {"update": jnp.zeros(shape + (dim,), dtype),
          "input": jnp.zeros(shape + (dim,), dtype),
          "lse": jnp.zeros(shape, F32),
          "stale": jnp.zeros(shape, jnp.int32)}


def reduce_heads(lse, config: SelectionConfig):
  """(B, H, K) -> (B, K)."""
  return jnp.mean(lse, axis=1) if config.head_reduce == "mean" else jnp.max(
      lse, axis=1)


def token_delta(x, last_input, config: SelectionConfig):
  """Delta_token (B, N): change of the block input since last computed."""
  diff = jnp.linalg.norm(x - last_input.astype(F32), axis=-1)
  if config.delta == "input_absolute":
    return diff
  return diff / (jnp.linalg.norm(last_input.astype(F32), axis=-1) + 1e-6)


def token_scores(x, layer_cache, config: SelectionConfig):
  """Astraea's score S (B, N) for every token before one block."""
  significance = jnp.ones(x.shape[:2], F32)
  if config.use_lse:
    significance = significance * layer_cache["lse"]
  if config.use_delta:
    significance = significance * token_delta(x, layer_cache["input"], config)
  score = config.w_alpha * significance
  if config.use_penalty:
    score = score + config.w_beta * jnp.exp(
        layer_cache["stale"].astype(F32))
  return score


def select_tokens(scores, k: int):
  """Indices (B, k) of the k highest scores, sorted ascending (kernel order)."""
  _, idx = jax.lax.top_k(scores, k)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


def scatter_tokens(x, token_index, values):
  """x (B, N, ...) with rows token_index (B, K) replaced by values."""
  return jax.vmap(lambda xb, ib, vb: xb.at[ib].set(vb))(x, token_index, values)


def write_selected(cache, layer, x, token_index, x_out_sel, lse_sel,
                   config: SelectionConfig):
  """Block `layer` computed the tokens `token_index`; in-place cache update.

  cache: the stacked cache (init_cache); x: (B, N, dim) block input;
  x_out_sel: (B, K, dim) block output of the computed tokens; lse_sel:
  (B, H, K). Only the K rows of layer `layer` are written (a scatter into
  the stacked buffers, which XLA performs in place on loop-carried state).
  Returns (x_next (B, N, dim), cache): computed tokens take their new
  output, the others x + their cached update.
  """
  dtype = cache["update"].dtype
  b = jnp.arange(x.shape[0])[:, None]
  x_sel = jnp.take_along_axis(x, token_index[..., None], axis=1)
  x_next = scatter_tokens(x + cache["update"][layer].astype(F32),
                          token_index, x_out_sel)
  return x_next, {
      "update": cache["update"].at[layer, b, token_index].set(
          (x_out_sel - x_sel).astype(dtype)),
      "input": cache["input"].at[layer, b, token_index].set(
          x_sel.astype(dtype)),
      "lse": cache["lse"].at[layer, b, token_index].set(
          reduce_heads(lse_sel, config)),
      "stale": cache["stale"].at[layer].add(1).at[layer, b, token_index].set(
          0),
  }


def write_all(cache, layer, x, x_out, lse, config: SelectionConfig):
  """Block `layer` computed ALL tokens (budget 1.0); x_next = x_out."""
  dtype = cache["update"].dtype
  return x_out, {
      "update": cache["update"].at[layer].set((x_out - x).astype(dtype)),
      "input": cache["input"].at[layer].set(x.astype(dtype)),
      "lse": cache["lse"].at[layer].set(reduce_heads(lse, config)),
      "stale": cache["stale"].at[layer].set(0),
  }


def write_masked(cache, layer, x, x_out, lse, keep, config: SelectionConfig):
  """The masked form: block `layer` computed ALL tokens; the `keep` ones
  (B, N) bool take their output and refresh their cache, the others add
  their cached update (the same numbers as `write_selected` on the kept
  rows). Returns (x_next, cache)."""
  c = layer_cache(cache, layer)
  dtype = c["update"].dtype
  k3 = keep[..., None]
  update = jnp.where(k3, (x_out - x).astype(dtype), c["update"])
  x_next = jnp.where(k3, x_out, x + update.astype(F32))
  new = {"update": update,
         "input": jnp.where(k3, x.astype(dtype), c["input"]),
         "lse": jnp.where(keep, reduce_heads(lse, config), c["lse"]),
         "stale": jnp.where(keep, 0, c["stale"] + 1)}
  return x_next, jax.tree.map(lambda a, u: a.at[layer].set(u), cache, new)


def keep_top(scores, k):
  """(B, ..., N) bool: the k best scores of each row (k may be traced).

  Ties go to lower indices, as `jax.lax.top_k` breaks them, so the masked
  form keeps exactly the tokens `select_tokens` picks.
  """
  order = jnp.argsort(-scores, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  return jnp.where(k >= scores.shape[-1], True, rank < k)


def reuse_all(cache, layer, x):
  """Budget 0: every token of block `layer` reuses its cached update."""
  return x + cache["update"][layer].astype(F32), {
      **cache, "stale": cache["stale"].at[layer].add(1)}


def layer_cache(cache, layer):
  """The per-block view {update, input, lse, stale} of block `layer`."""
  return jax.tree.map(lambda c: c[layer], cache)


# Per-block forms of the three updates, on one block's cache (the stacked
# forms above with a layer axis of 1).


def _one_layer(fn, block_cache, *args):
  x_next, stacked = fn(jax.tree.map(lambda c: c[None], block_cache), 0,
                       *args)
  return x_next, jax.tree.map(lambda c: c[0], stacked)


def update_layer_cache(block_cache, x, x_out_sel, lse_sel, token_index,
                       config: SelectionConfig):
  return _one_layer(write_selected, block_cache, x, token_index, x_out_sel,
                    lse_sel, config)


def refresh_layer_cache(block_cache, x, x_out, lse, config: SelectionConfig):
  return _one_layer(write_all, block_cache, x, x_out, lse, config)


def reuse_layer_cache(block_cache, x):
  return _one_layer(reuse_all, block_cache, x)
