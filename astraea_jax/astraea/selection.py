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
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from astraea_jax.models import layers

F32 = jnp.float32


CACHE_DTYPES = ("bfloat16", "float32", "float8")
SKETCH_SIZES = (0, 16, 32, 64, 128, 256)
FLOAT8 = jnp.float8_e4m3fn
FLOAT8_MAX = 448.0   # largest finite float8 e4m3fn value
SKETCH_SEED = 0


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
  """Options of the token score and of the cache; defaults follow
  ../shared/DESIGN.md (the lean token state)."""

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
  # The cached residual update: "bfloat16"; "float32"; "float8" (e4m3 with
  # one float32 scale per token: the compact state of the big settings).
  cache_dtype: str = "bfloat16"
  # Delta_token from r = delta_sketch values per token, a fixed Gaussian
  # projection of the block input (`sketch_matrix`); 0 keeps the exact
  # full-size last input (in float32 with a float32 cache, else bfloat16).
  delta_sketch: int = 64

  def __post_init__(self):
    if self.delta not in ("input_relative", "input_absolute"):
      raise ValueError(f"unknown {self.delta=}")
    if self.head_reduce not in ("mean", "max"):
      raise ValueError(f"unknown {self.head_reduce=}")
    if self.cache_dtype not in CACHE_DTYPES:
      raise ValueError(f"unknown cache dtype {self.cache_dtype!r}: choose "
                       f"one of {', '.join(CACHE_DTYPES)}")
    if self.delta_sketch not in SKETCH_SIZES:
      raise ValueError(
          f"unknown delta sketch size {self.delta_sketch!r}: choose one of "
          f"{', '.join(map(str, SKETCH_SIZES))} (0 = exact last input)")


EXACT = SelectionConfig(cache_dtype="float32", delta_sketch=0)
"""The paper's state: float32 update and full last input (references)."""

COMPACT = SelectionConfig(cache_dtype="float8")
"""The 8-bit update with the default sketch: about the paper's memory."""


def state_name(config: SelectionConfig) -> str:
  """"" for the default token state, else a short name: "exact-state"
  (float32, full last input), "float8-state", "bfloat16-sketch32"..."""
  default = SelectionConfig()
  if (config.cache_dtype, config.delta_sketch) == (default.cache_dtype,
                                                   default.delta_sketch):
    return ""
  if (config.cache_dtype, config.delta_sketch) == ("float32", 0):
    return "exact-state"
  if config.delta_sketch == default.delta_sketch:
    return f"{config.cache_dtype}-state"
  return f"{config.cache_dtype}-sketch{config.delta_sketch}"


def init_cache(num_layers, batch, num_tokens, dim, config: SelectionConfig):
  """Empty per-block cache, stacked on a leading layer axis.

  update: (L, B, N, dim) block output - block input, last computed, in
          the cache dtype (float8: its bits as uint8, and
  update_scale: (L, B, N) float32, the per-token scale);
  input:  (L, B, N, r) sketch of the block input when last computed (for
          Delta), or (L, B, N, dim) the input itself (delta_sketch 0);
  lse:    (L, B, N) head-reduced self-attention LSE, last computed;
  stale:  (L, B, N) int32, consecutive steps not selected.
  """
  shape = (num_layers, batch, num_tokens)
  width = config.delta_sketch or dim
  cache = {"update": jnp.zeros(shape + (dim,), _update_storage(config)),
           "input": jnp.zeros(shape + (width,), _input_dtype(config)),
           "lse": jnp.zeros(shape, F32),
           "stale": jnp.zeros(shape, jnp.int32)}
  if config.cache_dtype == "float8":
    cache["update_scale"] = jnp.zeros(shape, F32)
  return cache


def cache_bytes(num_layers, batch, num_tokens, dim,
                config: SelectionConfig) -> int:
  """Bytes of `init_cache` (without making it)."""
  shapes = jax.eval_shape(
      lambda: init_cache(num_layers, batch, num_tokens, dim, config))
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes))


def state_hint(cache_args, config: SelectionConfig):
  """`memory.check_fits`'s hint for a run whose token state is
  init_cache(*cache_args, config): the lighter states that would fit."""

  def hint(needed, limit):
    now = cache_bytes(*cache_args, config)
    fits = []
    for option in (SelectionConfig(cache_dtype="bfloat16"), COMPACT):
      after = needed - now + cache_bytes(*cache_args, option)
      if after < needed and after <= limit:
        fits.append(f"cache_dtype={option.cache_dtype!r} with "
                    f"delta_sketch={option.delta_sketch} (--cache-dtype "
                    f"{option.cache_dtype}: about {after / 2**30:.1f} GiB)")
    state = (f"Astraea's token state takes {now / 2**30:.1f} GiB of it. ")
    if fits:
      return state + "It would fit with " + " or ".join(fits) + "."
    return state + ("No lighter state fits: use a smaller video (--size/"
                    "--frames) or more devices (--devices).")

  return hint


def _update_storage(config):
  return jnp.uint8 if config.cache_dtype == "float8" else jnp.dtype(
      config.cache_dtype)


def _input_dtype(config):
  if config.delta_sketch or config.cache_dtype == "float32":
    return F32
  return jnp.bfloat16


@functools.lru_cache(maxsize=None)
def sketch_matrix(dim: int, size: int) -> np.ndarray:
  """P (dim, r): i.i.d. N(0, 1/r) entries, fixed (seed SKETCH_SEED).

  For any v, ||P^T v||^2 / ||v||^2 ~ chi^2_r / r over the draw of P
  (Johnson-Lindenstrauss), so the sketched norm is within a factor
  (1 +- eps) of the true one except with probability `sketch_tail(r,
  eps)`.
  """
  rng = np.random.default_rng(SKETCH_SEED)
  p = rng.standard_normal((dim, size)) / np.sqrt(size)
  # bfloat16 values (a fixed Gaussian matrix all the same), so that the
  # projection runs as bfloat16 matmuls (`encode_input`).
  p = p.astype(ml_dtypes.bfloat16).astype(np.float32)
  p.flags.writeable = False
  return p


def sketch_tail(size: int, eps: float) -> float:
  """Upper bound on P(| ||P^T v||^2 / ||v||^2 - 1 | > eps), 0 < eps < 1.

  Chernoff bounds on chi^2_r / r (Dasgupta & Gupta 2003, eqs. 2.1-2.2):
  upper tail <= exp(-r/2 (eps^2/2 - eps^3/3)), lower <= exp(-r eps^2/4).
  """
  r = float(size)
  return float(np.exp(-r / 2 * (eps**2 / 2 - eps**3 / 3))
               + np.exp(-r * eps**2 / 4))


def encode_input(x, config: SelectionConfig):
  """What the cache keeps of block inputs x (..., dim) for Delta."""
  if not config.delta_sketch:
    return x.astype(_input_dtype(config))
  # x = head + tail, both bfloat16 (the tail is x's rounding error), each
  # times P in bfloat16 with float32 accumulation: P^T x to ~2^-16 of |x|.
  # (A float32 GEMM at HIGHEST precision: step programs compiled in 8-9 s
  # on the H100 against 2-3 s for the exact state; with these two matmuls
  # a cold Astraea 0.4 run came out 2.4 s faster, not the whole gap.)
  p = jnp.asarray(sketch_matrix(x.shape[-1], config.delta_sketch),
                  jnp.bfloat16)
  x = x.astype(F32)
  head = x.astype(jnp.bfloat16)
  tail = (x - head.astype(F32)).astype(jnp.bfloat16)
  return (jnp.matmul(head, p, preferred_element_type=F32)
          + jnp.matmul(tail, p, preferred_element_type=F32))


def encode_update(update, config: SelectionConfig):
  """{"update"[, "update_scale"]} entries of updates (..., dim) float32."""
  if config.cache_dtype != "float8":
    return {"update": update.astype(config.cache_dtype)}
  # One scale per token maps its largest |value| to float8's largest.
  scale = jnp.max(jnp.abs(update), axis=-1) / FLOAT8_MAX
  safe = jnp.where(scale > 0, scale, 1.0)
  code = (update / safe[..., None]).astype(FLOAT8)
  return {"update": jax.lax.bitcast_convert_type(code, jnp.uint8),
          "update_scale": scale}


def decode_update(entries):
  """float32 updates from `encode_update`'s entries (any leading axes)."""
  update = entries["update"]
  if "update_scale" not in entries:
    return update.astype(F32)
  code = jax.lax.bitcast_convert_type(update, FLOAT8).astype(F32)
  return code * entries["update_scale"][..., None]


def _layer_update(cache, layer):
  return decode_update({k: cache[k][layer] for k in _UPDATE_KEYS
                        if k in cache})


_UPDATE_KEYS = ("update", "update_scale")


def reduce_heads(lse, config: SelectionConfig):
  """(B, H, K) -> (B, K)."""
  return jnp.mean(lse, axis=1) if config.head_reduce == "mean" else jnp.max(
      lse, axis=1)


def token_delta(x, last_input, config: SelectionConfig, current=None):
  """Delta_token (B, N): change of the block input since last computed.

  last_input: the cache's "input" entry (`encode_input`); with a sketch
  both norms are of the projections, ||P^T (x - x_last)|| (linear in x).
  current: encode_input(x, config) where already made.
  """
  last = last_input.astype(F32)
  if current is None:
    current = encode_input(x, config) if config.delta_sketch else x
  diff = jnp.linalg.norm(current.astype(F32) - last, axis=-1)
  if config.delta == "input_absolute":
    return diff
  return diff / (jnp.linalg.norm(last, axis=-1) + 1e-6)


def token_scores(x, layer_cache, config: SelectionConfig):
  """Astraea's score S (B, N) for every token before one block."""
  significance = jnp.ones(x.shape[:2], F32)
  if config.use_lse:
    significance = significance * layer_cache["lse"]
  if config.use_delta:
    current = None
    if isinstance(layer_cache, LayerView) and config.delta_sketch:
      current = layer_cache.current_input(x, config)
    significance = significance * token_delta(x, layer_cache["input"], config,
                                              current)
  score = config.w_alpha * significance
  if config.use_penalty:
    score = score + config.w_beta * jnp.exp(
        layer_cache["stale"].astype(F32))
  return score


def _ordered_bits(scores):
  """uint32 keys whose unsigned order is the float32 order of `scores`
  (the sign bit flipped for positives, every bit for negatives)."""
  scores = scores.astype(F32)
  scores = jnp.where(scores == 0, 0.0, scores)  # -0.0 ties +0.0, as top_k
  bits = jax.lax.bitcast_convert_type(scores, jnp.uint32)
  negative = (bits >> 31).astype(bool)
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def top_k_mask(scores, k):
  """(..., N) bool: the k highest scores of each row (k may be traced).

  Ties go to lower indices, as `jax.lax.top_k` breaks them. A radix
  select instead of a sort: four passes over 8-bit digits of the ordered
  float bits, each a 256-bin histogram of the rows still tied with the
  k-th largest key, find that key T exactly; the row keeps every key > T
  and the first (lowest-index) ones equal to T. (Wan2.1-1.3B 480p, all 30
  blocks' scores + top-K on one H100: 16.7 ms, against 18.5 ms with
  lax.top_k and a sort of the indices; benchmarks/astraea_step_profile.)
  """
  keys = _ordered_bits(scores)
  n = scores.shape[-1]
  need = jnp.minimum(jnp.asarray(k, jnp.int32), n)
  need = jnp.broadcast_to(need, scores.shape[:-1])
  prefix = jnp.zeros(scores.shape[:-1], jnp.uint32)
  bins = jnp.arange(256, dtype=jnp.uint32)
  for shift in (24, 16, 8, 0):
    active = jnp.ones(keys.shape, bool) if shift == 24 else (
        (keys >> (shift + 8)) == (prefix >> (shift + 8))[..., None])
    digit = (keys >> shift) & jnp.uint32(255)
    hist = jnp.sum((digit[..., None] == bins) & active[..., None], axis=-2,
                   dtype=jnp.int32)                       # (..., 256)
    at_or_above = jnp.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]
    # The k-th largest key's digit: the highest bin j with >= need keys in
    # bins j..255 (at_or_above is non-increasing in j).
    j = jnp.sum(at_or_above >= need[..., None], axis=-1) - 1
    j = jnp.clip(j, 0, 255)
    above = jnp.take_along_axis(at_or_above, j[..., None], axis=-1)[..., 0]
    above = above - jnp.take_along_axis(hist, j[..., None], axis=-1)[..., 0]
    need = need - above
    prefix = prefix | (j.astype(jnp.uint32) << shift)
  threshold = prefix[..., None]
  tied = keys == threshold
  first_tied = jnp.cumsum(tied, axis=-1, dtype=jnp.int32) <= need[..., None]
  keep = (keys > threshold) | (tied & first_tied)
  return jnp.where(jnp.asarray(k) >= n, True, keep)


def select_tokens(scores, k: int):
  """Indices (B, k) of the k highest scores, sorted ascending (kernel
  order); ties to lower indices (`top_k_mask`, as `jax.lax.top_k`)."""
  keep = top_k_mask(scores, k)
  flat = keep.reshape(-1, keep.shape[-1])
  idx = jax.vmap(lambda row: jnp.nonzero(row, size=k)[0])(flat)
  return idx.reshape(keep.shape[:-1] + (k,)).astype(jnp.int32)


# Token indices are sorted and unique (`select_tokens`); XLA is told so,
# so that its GPU scatters need not order or combine colliding rows. Before,
# the update-cache and x_next scatters of Wan2.1-1.3B 480p took ~18 ms of a
# 481 ms Astraea 0.4 step (H100 profile, benchmarks/astraea_step_profile.py;
# not re-timed since).
_SORTED_UNIQUE = {"indices_are_sorted": True, "unique_indices": True}


def scatter_tokens(x, token_index, values):
  """x (B, N, ...) with rows token_index (B, K) (sorted, unique) replaced
  by values."""
  return jax.vmap(lambda xb, ib, vb: xb.at[ib].set(vb, **_SORTED_UNIQUE))(
      x, token_index, values)


def _rows(x_in, x_out, lse, config, input_code=None):
  """The cache entries of computed rows: inputs x_in, outputs x_out
  (input_code: encode_input(x_in) where already made)."""
  if input_code is None:
    input_code = encode_input(x_in, config)
  return {**encode_update(x_out - x_in, config), "input": input_code,
          "lse": reduce_heads(lse, config)}


class LayerView(dict):
  """One block's cache entries (`layer_cache`) as the select hooks see
  them, plus the block input's code, made at most once per block: the
  score's Delta needs encode_input(x) of every token, the cache write the
  rows of the computed ones; with a sketch, one (B, N, dim) x (dim, r)
  projection serves both (`current_input`, memoised while tracing)."""

  def current_input(self, x, config: SelectionConfig):
    made = getattr(self, "_made", {})
    key = (id(x), config.delta_sketch)
    if key not in made:
      made[key] = (x, encode_input(x, config))  # x held: its id stays unique
      self._made = made  # pylint: disable=attribute-defined-outside-init
    return made[key][1]

  def made_input(self, x, config: SelectionConfig):
    """encode_input(x, config) if a hook made it for this very x (a sketch
    of the same size), else None."""
    if not config.delta_sketch:
      return None
    made = getattr(self, "_made", {}).get((id(x), config.delta_sketch))
    return None if made is None else made[1]


def write_selected(cache, layer, x, token_index, x_out_sel, lse_sel,
                   config: SelectionConfig, input_code=None):
  """Block `layer` computed the tokens `token_index`; in-place cache update.

  cache: the stacked cache (init_cache); x: (B, N, dim) block input;
  x_out_sel: (B, K, dim) block output of the computed tokens; lse_sel:
  (B, H, K). Only the K rows of layer `layer` are written (a scatter into
  the stacked buffers, which XLA performs in place on loop-carried state).
  input_code: encode_input(x) of every token (B, N, r) where the score
  made it (`LayerView`); its rows are the cache's new "input" entries.
  Returns (x_next (B, N, dim), cache): computed tokens take their new
  output, the others x + their cached update.
  """
  b = jnp.arange(x.shape[0])[:, None]
  x_sel = layers.take_tokens(x, token_index)
  if input_code is not None:
    input_code = layers.take_tokens(input_code, token_index)
  rows = _rows(x_sel, x_out_sel, lse_sel, config, input_code)
  new = {k: cache[k].at[layer, b, token_index].set(v, **_SORTED_UNIQUE)
         for k, v in rows.items()}
  # x_next = x + update, the computed rows x_out (exactly). The update is
  # read from the cache AFTER this block's rows are written (their values
  # are then overwritten by x_out): a read of the old layer after the
  # in-place write made XLA copy the whole stacked cache (L x B x N x dim)
  # twice at every block (seen in the H100 program: 2 x 6 GB a block at
  # Wan2.1-1.3B 480p; test_lean_state finds such copies).
  x_next = scatter_tokens(x + _layer_update(new, layer), token_index,
                          x_out_sel)
  new["stale"] = cache["stale"].at[layer].add(1).at[
      layer, b, token_index].set(0, **_SORTED_UNIQUE)
  return x_next, new


def write_all(cache, layer, x, x_out, lse, config: SelectionConfig):
  """Block `layer` computed ALL tokens (budget 1.0); x_next = x_out."""
  new = {k: cache[k].at[layer].set(v)
         for k, v in _rows(x, x_out, lse, config).items()}
  new["stale"] = cache["stale"].at[layer].set(0)
  return x_out, new


def write_masked(cache, layer, x, x_out, lse, keep, config: SelectionConfig,
                 input_code=None):
  """The masked form: block `layer` computed ALL tokens; the `keep` ones
  (B, N) bool take their output and refresh their cache, the others add
  their cached update (the same numbers as `write_selected` on the kept
  rows). Returns (x_next, cache)."""
  old = layer_cache(cache, layer)
  rows = _rows(x, x_out, lse, config, input_code)
  new = {k: jnp.where(keep.reshape(keep.shape + (1,) * (v.ndim - 2)), v,
                      old[k])
         for k, v in rows.items()}
  new["stale"] = jnp.where(keep, 0, old["stale"] + 1)
  x_next = jnp.where(keep[..., None], x_out, x + decode_update(new))
  return x_next, jax.tree.map(lambda a, u: a.at[layer].set(u), cache, new)


def keep_top(scores, k):
  """(B, ..., N) bool: the k best scores of each row (k may be traced).

  Ties go to lower indices, as `jax.lax.top_k` breaks them, so the masked
  form keeps exactly the tokens `select_tokens` picks.
  """
  return top_k_mask(scores, k)


def reuse_all(cache, layer, x):
  """Budget 0: every token of block `layer` reuses its cached update."""
  return x + _layer_update(cache, layer), {
      **cache, "stale": cache["stale"].at[layer].add(1)}


def layer_cache(cache, layer):
  """The per-block view (the same entries) of block `layer`."""
  return jax.tree.map(lambda c: c[layer], cache)


def layer_view(cache, layer) -> LayerView:
  """`layer_cache` as the layer loop hands it to a select hook."""
  return LayerView(layer_cache(cache, layer))


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
