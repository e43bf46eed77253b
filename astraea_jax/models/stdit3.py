"""OpenSora v1.2 spatial-temporal DiT (STDiT3) in Flax NNX.

Follows `opensora/models/stdit/stdit3.py` (class `STDiT3`) and
`opensora/models/layers/blocks.py` of hpcaitech/Open-Sora at commit
3552145f847b5171cd2c85982d116b04eb98c5bf. Parameter names keep the
original checkpoint's names (`scale_shift_table`, `attn.qkv`, `cross_attn.
kv_linear`, `mlp.fc1`, ...) so the converter's key map stays short
(converters/opensora.py). Reading order: embeddings -> attention -> block ->
final layer -> STDiT3 -> pure functions at the bottom.

Layout: tokens are in (T, H_p, W_p) row-major order, N = T * S with
S = H_p * W_p. Each depth step runs spatial block i (attention within each
frame: frames folded into the batch) and then temporal block i (attention
across frames at each position: positions folded into the batch).

Precision. The original runs everything in the model dtype except the
softmax and the norm statistics. Here, as in our Wan port, the timestep and
fps embedders, t_block, the modulation tables, norm statistics, softmax,
residual stream and final layer are float32 islands (ours: identical in
float32, more accurate than the original in bfloat16); every other matmul
takes its inputs in `config.dtype`. The timestep sinusoid is formed in
float32 exactly as the original forms it (see `timestep_sinusoid`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.configs import STDiT3Config
from astraea_jax.models import layers
from astraea_jax.models.wan import MLP, gelu_tanh, patchify, unpatchify

F32 = jnp.float32
# Layouts of the sparse temporal attention (STDiT3Block.sparse_self_attention).
TEMPORAL_SPARSE = ("scatter_queries", "gather_keys")


# Embeddings -------------------------------------------------------------------


def timestep_sinusoid(t, dim: int, max_period: float = 10000.0):
  """[cos(t*w), sin(t*w)] (B, dim) float32, w_i = max_period^(-i/half).

  Formed in float32 as the original `TimestepEmbedder.timestep_embedding`
  does, because its rounding is what the model was trained with: w_i is
  float32 exp(float32(-ln max_period) * i / half) (correctly rounded here;
  torch's float32 exp agrees to 1 ulp) and the angle t * w_i is rounded to
  float32 before cos/sin (an error of up to ~3e-5 rad at t = 1000, which an
  exact angle would not reproduce).
  """
  half = dim // 2
  exponent = (np.float32(-math.log(max_period))
              * np.arange(half, dtype=np.float32)) / np.float32(half)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  angles = jnp.asarray(t, F32)[:, None] * jnp.asarray(freqs)[None]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def position_scale(height, width, input_sq_size: int):
  """scale = sqrt(height[0] * width[0]) / input_sq_size (float32 scalar).

  Only the first sample's pixel resolution is used, as in the original.
  """
  h = jnp.asarray(height, F32).reshape(-1)[0]
  w = jnp.asarray(width, F32).reshape(-1)[0]
  return jnp.sqrt(h * w) / input_sq_size


def position_embedding_2d(grid_hw, hidden: int, scale):
  """2-D sin-cos position embedding (S, hidden) float32, S = h * w.

  For the token at row r, column c (row-major), with base_size =
  round(sqrt(h * w)), c' = c / scale * base_size / w and r' = r / scale *
  base_size / h: channels [0, hidden/2) are [sin(c' w), cos(c' w)] and
  [hidden/2, hidden) are [sin(r' w), cos(r' w)], w_i = 10000^(-2i /
  (hidden/2)). The column comes first (`PositionEmbedding2D`: its meshgrid
  puts w first). Positions are formed in float32 like the original.
  """
  h, w = grid_hw
  base_size = round(math.sqrt(h * w))
  half = hidden // 2
  inv_freq = jnp.asarray(
      (1.0 / 10000.0 ** (np.arange(0, half, 2) / half)).astype(np.float32))

  def sincos(n):  # (n, half)
    pos = jnp.arange(n, dtype=F32) / scale * np.float32(base_size / n)
    angles = pos[:, None] * inv_freq[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)

  emb_col = jnp.broadcast_to(sincos(w)[None, :, :], (h, w, half))
  emb_row = jnp.broadcast_to(sincos(h)[:, None, :], (h, w, half))
  return jnp.concatenate([emb_col, emb_row], axis=-1).reshape(h * w, hidden)


def temporal_rope(num_frames: int, head_dim: int, theta: float = 10000.0):
  """(cos, sin), each (T, head_dim // 2) float32, for `layers.apply_rope`.

  Pair (2i, 2i+1) of frame f rotates by f * theta^(-2i / head_dim)
  (rotary_embedding_torch 0.5.3, `freqs_for="lang"`, as the original's
  `rope.freqs`). Computed in float64 on the host: the grid is static.
  """
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64)
                             / head_dim)
  angles = np.outer(np.arange(num_frames, dtype=np.float64), inv_freq)
  return (jnp.asarray(np.cos(angles), F32), jnp.asarray(np.sin(angles), F32))


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> np.ndarray:
  """The original's `rope.freqs` buffer (head_dim // 2,) float32.

  Correctly rounded; the original's float32 pow is up to 1 ulp off.
  """
  return (1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)).astype(
      np.float32)


class CaptionEmbedder(nnx.Module):
  """y_proj: Linear - GELU(tanh) - Linear; y_embedding: the null caption.

  `y_embedding` (model_max_length, caption_channels) is a buffer in the
  original, kept here as a parameter: classifier-free guidance feeds it as
  the unconditional caption (`STDiT3.null_caption`).
  """

  def __init__(self, config: STDiT3Config, *, rngs: nnx.Rngs):
    c = config
    self.y_proj = MLP(c.caption_channels, c.hidden_size, c.hidden_size,
                      activation=gelu_tanh, dtype=c.compute_dtype,
                      param_dtype=c.weight_dtype, rngs=rngs)
    self.y_embedding = nnx.Param(
        jax.random.normal(rngs.params(),
                          (c.model_max_length, c.caption_channels),
                          c.weight_dtype) * c.caption_channels ** -0.5)

  def __call__(self, y):  # (B, L, caption_channels) -> (B, L, hidden)
    return self.y_proj(y)


# Attention --------------------------------------------------------------------


class Attention(nnx.Module):
  """Self-attention: fused qkv, per-head RMSNorm on q and k, optional RoPE.

  The qkv output is [q | k | v], heads contiguous within each.
  """

  def __init__(self, config: STDiT3Config, *, rngs: nnx.Rngs):
    c = config
    self.num_heads = c.num_heads
    kw = {"dtype": c.compute_dtype, "param_dtype": c.weight_dtype, "rngs": rngs}
    self.qkv = layers.linear(c.hidden_size, 3 * c.hidden_size, **kw)
    if c.qk_norm:
      self.q_norm = layers.RMSNorm(c.head_dim, eps=c.eps,
                                   param_dtype=c.weight_dtype, rngs=rngs)
      self.k_norm = layers.RMSNorm(c.head_dim, eps=c.eps,
                                   param_dtype=c.weight_dtype, rngs=rngs)
    else:
      self.q_norm = self.k_norm = None
    self.proj = layers.linear(c.hidden_size, c.hidden_size, **kw)

  def __call__(self, x, rope=None, attention=layers.attention):
    """x (B', L, C) -> (out (B', L, C), lse (B', H, L) float32)."""
    b, length, _ = x.shape
    qkv = self.qkv(x).reshape(b, length, 3, self.num_heads, -1)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B', L, H, D)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:  # after the norm, as the original (not legacy)
      q, k = layers.apply_rope(q, rope), layers.apply_rope(k, rope)
    out, lse = attention(q, k, v)
    return self.proj(out.reshape(b, length, -1)), lse

  # The sparse path (Astraea) projects queries and keys/values of different
  # token sets: the qkv kernel's column blocks [q | k | v], one at a time.

  def query(self, x, rope=None):
    """q (B', L, H, D) of x (B', L, C): qkv's first column block, normed."""
    q = _linear_columns(self.qkv, x, 0, 1, 3)
    q = q.reshape(*x.shape[:-1], self.num_heads, -1)
    if self.q_norm is not None:
      q = self.q_norm(q)
    return q if rope is None else layers.apply_rope(q, rope)

  def key_value(self, x, rope=None):
    """(k, v), each (B', L, H, D), of x (B', L, C); RoPE on k."""
    kv = _linear_columns(self.qkv, x, 1, 3, 3)
    kv = kv.reshape(*x.shape[:-1], 2, self.num_heads, -1)
    k, v = kv[..., 0, :, :], kv[..., 1, :, :]
    if self.k_norm is not None:
      k = self.k_norm(k)
    return (k if rope is None else layers.apply_rope(k, rope)), v

  def output(self, attn_out):  # (..., H, D) -> (..., C)
    return self.proj(attn_out.reshape(*attn_out.shape[:-2], -1))


def _linear_columns(linear, x, first, stop, blocks):
  """Column blocks [first, stop) of `linear(x)`, out of `blocks` equal ones.

  Computes only those output columns, with the dtype promotion and
  dot_general of `nnx.Linear.__call__`.
  """
  width = linear.kernel.shape[1] // blocks
  kernel = linear.kernel[...][:, first * width:stop * width]
  bias = linear.bias[...][first * width:stop * width]
  x, kernel, bias = linear.promote_dtype((x, kernel, bias),
                                         dtype=linear.dtype)
  y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())),
                          precision=linear.precision)
  return y + bias


class CrossAttention(nnx.Module):
  """Each sample's tokens attend to its own valid caption tokens.

  The original packs the valid tokens of all samples into one sequence and
  uses a block-diagonal mask (xformers `BlockDiagonalMask`); per-sample
  attention with the invalid keys masked out is the same computation.
  """

  def __init__(self, config: STDiT3Config, *, rngs: nnx.Rngs):
    c = config
    self.num_heads = c.num_heads
    kw = {"dtype": c.compute_dtype, "param_dtype": c.weight_dtype, "rngs": rngs}
    self.q_linear = layers.linear(c.hidden_size, c.hidden_size, **kw)
    self.kv_linear = layers.linear(c.hidden_size, 2 * c.hidden_size, **kw)
    self.proj = layers.linear(c.hidden_size, c.hidden_size, **kw)

  def __call__(self, x, y, y_mask=None):
    """x (B, N, C); y (B, L, C) embedded caption; y_mask (B, L) bool or None.

    Returns (B, N, C) in the compute dtype.
    """
    b, n, _ = x.shape
    q = self.q_linear(x).reshape(b, n, self.num_heads, -1)
    kv = self.kv_linear(y).reshape(b, y.shape[1], 2, self.num_heads, -1)
    k, v = kv[:, :, 0], kv[:, :, 1]
    out, _ = layers.attention(q, k, v, kv_mask=y_mask)
    return self.proj(out.reshape(b, n, -1))


# Conditioning shared by all blocks --------------------------------------------


class Conditioning(NamedTuple):
  """What every block reads besides the tokens (built by `STDiT3.embed`).

  t: (B, C) timestep + fps embedding; t_mlp: (B, 6C) = t_block(t);
  t0, t0_mlp: the same at timestep 0 (only with x_mask, else None);
  x_mask: (B, T) bool, False frames use the t0 modulation, or None;
  y: (B, L, C) embedded caption; y_mask: (B, L) bool valid tokens or None
  (all valid); rope: temporal (cos, sin), each (T, head_dim // 2).
  """

  t: jax.Array
  t_mlp: jax.Array
  t0: jax.Array | None
  t0_mlp: jax.Array | None
  x_mask: jax.Array | None
  y: jax.Array
  y_mask: jax.Array | None
  rope: tuple[jax.Array, jax.Array]


def modulation_tables(table, emb, emb0, x_mask):
  """Per-frame modulation: n tables, each (B, T or 1, 1, C) float32.

  table (n, C); emb, emb0 (B, n or 1, C) from the timestep and from
  timestep 0. With x_mask (B, T), frame f of sample b takes table + emb0
  where x_mask[b, f] is False (the original's `t_mask_select`, which selects
  between the two modulated results; selecting the tables first gives the
  same values).
  """
  m = table[...].astype(F32)[None] + emb  # (B, n, C)
  m = m[:, None, :, None, :]  # (B, 1, n, 1, C)
  if x_mask is not None:
    m0 = (table[...].astype(F32)[None] + emb0)[:, None, :, None, :]
    m = jnp.where(x_mask[:, :, None, None, None], m, m0)  # (B, T, n, 1, C)
  return tuple(m[:, :, i] for i in range(table.shape[0]))


# Block ------------------------------------------------------------------------


class STDiT3Block(nnx.Module):
  """One spatial or temporal block (`STDiT3Block`).

    shift1, scale1, gate1, shift2, scale2, gate2 = scale_shift_table + t_mlp
    x += gate1 * Attn(LN(x) * (1 + scale1) + shift1)   # spatial or temporal
    x += CrossAttn(x, y)                              # no norm, no gate
    x += gate2 * MLP(LN(x) * (1 + scale2) + shift2)
  """

  def __init__(self, config: STDiT3Config, *, temporal: bool,
               rngs: nnx.Rngs):
    c = config
    self.temporal = temporal
    self.num_heads = c.num_heads
    self.eps = c.eps
    self.scale_shift_table = nnx.Param(
        jax.random.normal(rngs.params(), (6, c.hidden_size), c.weight_dtype)
        * c.hidden_size ** -0.5)
    self.attn = Attention(c, rngs=rngs)
    self.cross_attn = CrossAttention(c, rngs=rngs)
    self.mlp = MLP(c.hidden_size, c.mlp_hidden, c.hidden_size,
                   activation=gelu_tanh, dtype=c.compute_dtype,
                   param_dtype=c.weight_dtype, rngs=rngs)

  def self_attention(self, h, rope, attention=layers.attention):
    """h (B, T, S, C) -> (out (B, T, S, C), lse (B, H, T*S) float32).

    Spatial: frames folded into the batch, (B*T, S, C). Temporal: positions
    folded into the batch, (B*S, T, C), with RoPE over the frame index.
    """
    b, t, s, c = h.shape
    if self.temporal:
      out, lse = self.attn(h.transpose(0, 2, 1, 3).reshape(b * s, t, c), rope,
                           attention)
      out = out.reshape(b, s, t, c).transpose(0, 2, 1, 3)
      lse = lse.reshape(b, s, self.num_heads, t).transpose(0, 2, 3, 1)
    else:
      out, lse = self.attn(h.reshape(b * t, s, c), None, attention)
      out = out.reshape(b, t, s, c)
      lse = lse.reshape(b, t, self.num_heads, s).transpose(0, 2, 1, 3)
    return out, lse.reshape(b, self.num_heads, t * s)

  def sparse_self_attention(self, h, token_index, rope,
                            temporal_sparse="scatter_queries",
                            attention=layers.attention):
    """Self-attention rows of the selected tokens only (Astraea).

    h (B, T, S, C): the modulated input of ALL tokens (keys and values
    always come from all of them, so every computed row is exact);
    token_index (B, T, K_f): sorted positions within each frame, K_f per
    frame. Returns (out (B, T, K_f, C), lse (B, H, T*K_f) float32).

    Spatial: frame f's K_f queries against the S keys of frame f, frames
    folded into the batch. Temporal: the query of token (f, p) against the
    T keys at position p, with the frame index as its RoPE angle, in one of
    two layouts (docs/astraea_stdit3.md compares them):
      "scatter_queries": the selected queries are scattered into the dense
        (position, frame) layout, zeros elsewhere; the dense temporal
        attention runs and the selected rows are gathered back. Extra work:
        the T x T attention of unselected rows (~4 T C flops per token).
      "gather_keys": the key/value columns of the selected positions are
        gathered, (B*T*K_f, T, H, D), and each selected token is a
        length-1 query in the batch. Extra memory traffic: T times the
        selected tokens' keys and values.
    """
    b, t, s, c = h.shape
    heads = self.num_heads
    k_f = token_index.shape[-1]
    h_sel = jnp.take_along_axis(h, token_index[..., None], axis=2)
    if not self.temporal:
      k, v = self.attn.key_value(h.reshape(b * t, s, c))
      q = self.attn.query(h_sel.reshape(b * t, k_f, c))
      out, lse = attention(q, k, v)  # lse (B*T, H, K_f)
      lse = lse.reshape(b, t, heads, k_f).transpose(0, 2, 1, 3)
      out = self.attn.output(out).reshape(b, t, k_f, c)
      return out, lse.reshape(b, heads, t * k_f)

    # Query rows in frame-major order: row f*K_f + j is frame f.
    rope_q = tuple(jnp.repeat(r, k_f, axis=0) for r in rope)
    q = self.attn.query(h_sel.reshape(b, t * k_f, c), rope_q)
    q = q.reshape(b, t, k_f, heads, -1)
    frames = jnp.arange(t)[:, None]  # (T, 1), broadcast against (T, K_f)
    if temporal_sparse == "scatter_queries":
      # Keys, values and the attention in the dense layout (B*S, T, ...).
      k, v = self.attn.key_value(
          h.transpose(0, 2, 1, 3).reshape(b * s, t, c), rope)
      q_dense = jax.vmap(lambda z, i, u: z.at[i, frames].set(
          u, unique_indices=True))(
              jnp.zeros((b, s, t) + q.shape[3:], q.dtype), token_index, q)
      out, lse = attention(q_dense.reshape(b * s, t, heads, -1), k, v)
      pick = jax.vmap(lambda a, i: a[i, frames])  # (S, T, ...) -> (T, K_f)
      out = pick(out.reshape(b, s, t, heads, -1), token_index)
      lse = pick(lse.reshape(b, s, heads, t).transpose(0, 1, 3, 2),
                 token_index)  # (B, T, K_f, H)
    elif temporal_sparse == "gather_keys":
      # Keys (B, T, S*H, D): apply_rope's length axis is the frame axis.
      k, v = self.attn.key_value(h.reshape(b, t * s, c))
      k = layers.apply_rope(k.reshape(b, t, s * heads, -1), rope)
      columns = lambda a: jnp.take_along_axis(  # -> (B, T*K_f, T, H, D)
          a.reshape(b, t, s, heads, -1).transpose(0, 2, 1, 3, 4),
          token_index.reshape(b, t * k_f)[:, :, None, None, None], axis=1)
      k, v = columns(k), columns(v)
      out, lse = attention(q.reshape(b * t * k_f, 1, heads, -1),
                           k.reshape(b * t * k_f, t, heads, -1),
                           v.reshape(b * t * k_f, t, heads, -1))
      out = out.reshape(b, t, k_f, heads, -1)
      lse = lse.reshape(b, t, k_f, heads)
    else:
      raise ValueError(f"unknown {temporal_sparse=}; expected "
                       f"one of {TEMPORAL_SPARSE}")
    out = self.attn.output(out)  # (B, T, K_f, C)
    return out, lse.transpose(0, 3, 1, 2).reshape(b, heads, t * k_f)

  def __call__(self, x, cond: Conditioning, grid, token_index=None, *,
               temporal_sparse: str = "scatter_queries", attention=None):
    """x (B, N, C) float32; grid (T, S) with N = T * S (static).

    The one STDiT3 block forward, dense and token-wise.
    token_index: optional (B, T, K_f) int, sorted positions in [0, S) of
    the tokens to compute in each frame, the same count K_f in every frame
    (Astraea's token selection). Queries, cross-attention and the MLP run
    on those T*K_f tokens; keys/values come from all N, so every computed
    attention row equals the dense one.

    Returns (x_out, aux): x_out (B, N or T*K_f, C) float32 for the computed
    tokens, in token order (token (f, token_index[b, f, j]) at row
    f*K_f + j); aux["lse"] (B, H, N or T*K_f), the self-attention
    log-sum-exp of each computed token. temporal_sparse: the layout of the
    sparse temporal attention (`sparse_self_attention`); attention: the
    self-attention function `(q, k, v) -> (out, lse)`, None =
    `layers.attention`.
    """
    b, n, c = x.shape
    t, s = grid
    emb = cond.t_mlp.reshape(b, 6, c)
    emb0 = None if cond.t0_mlp is None else cond.t0_mlp.reshape(b, 6, c)
    shift1, scale1, gate1, shift2, scale2, gate2 = modulation_tables(
        self.scale_shift_table, emb, emb0, cond.x_mask)
    x = x.reshape(b, t, s, c)
    h = layers.layer_norm(x, self.eps) * (1 + scale1) + shift1
    attention = attention or layers.attention
    if token_index is None:
      out, lse = self.self_attention(h, cond.rope, attention)
    else:
      out, lse = self.sparse_self_attention(h, token_index, cond.rope,
                                            temporal_sparse, attention)
      x = jnp.take_along_axis(x, token_index[..., None], axis=2)
    k = x.shape[2]  # S, or K_f computed tokens per frame
    # Per-frame tables (B, T or 1, 1, C) broadcast over (B, T, k, C).
    x = x + out.astype(F32) * gate1
    y = self.cross_attn(x.reshape(b, t * k, c), cond.y, cond.y_mask)
    x = x + y.astype(F32).reshape(b, t, k, c)
    h = layers.layer_norm(x, self.eps) * (1 + scale2) + shift2
    x = x + self.mlp(h).astype(F32) * gate2
    return x.reshape(b, t * k, c), {"lse": lse}


class FinalLayer(nnx.Module):
  """`T2IFinalLayer`, all in float32: linear(LN(x) * (1 + scale) + shift).

  shift, scale = scale_shift_table + t (the embedding, not t_mlp). With
  x_mask, the frames where it is False take LN(h) * (1 + scale0) + shift0
  of the ALREADY modulated h = LN(x) * (1 + scale) + shift, with scale0,
  shift0 from t0: the original normalises its modulated x a second time
  there (`T2IFinalLayer.forward`); kept for parity.
  """

  def __init__(self, config: STDiT3Config, *, rngs: nnx.Rngs):
    c = config
    self.eps = c.eps
    out = int(np.prod(c.patch_size)) * c.out_channels
    self.scale_shift_table = nnx.Param(
        jax.random.normal(rngs.params(), (2, c.hidden_size), c.weight_dtype)
        * c.hidden_size ** -0.5)
    self.linear = layers.linear(c.hidden_size, out, dtype=F32,
                                param_dtype=c.weight_dtype, rngs=rngs)

  def __call__(self, x, cond: Conditioning, grid):
    """x (B, N, C) float32 -> (B, N, prod(patch) * out_channels) float32."""
    b, n, c = x.shape
    shift, scale = modulation_tables(self.scale_shift_table, cond.t[:, None],
                                     None, None)
    h = layers.layer_norm(x, self.eps).reshape(b, *grid, c)
    h = h * (1 + scale) + shift
    if cond.x_mask is not None:
      shift0, scale0 = modulation_tables(self.scale_shift_table,
                                         cond.t0[:, None], None, None)
      h0 = layers.layer_norm(h, self.eps) * (1 + scale0) + shift0
      h = jnp.where(cond.x_mask[:, :, None, None], h, h0)
    return self.linear(h.reshape(b, n, c))


# Model ------------------------------------------------------------------------


class STDiT3(nnx.Module):
  """OpenSora v1.2 STDiT3.

  `model(x, timestep, y, mask, x_mask, fps=, height=, width=) -> out`:
  x (B, in_channels, T, H, W) latents (T/H/W need not be patch multiples:
  they are zero-padded at the end and the output cropped back);
  timestep (B,) in [0, 1000]; y (B, 1, L, caption_channels) caption
  embeddings; mask (b, L) int/bool, nonzero = valid token, b dividing B
  (tiled to B as the original does), or None = all valid; x_mask (B, T)
  bool or None, False frames are modulated with timestep 0; fps (B,) or
  (1,); height, width (B,) pixel resolution (element 0 sets the position
  embedding scale). Returns (B, out_channels, T, H, W) float32: channels
  [:in_channels] are the velocity, the rest the sigma prediction.
  """

  def __init__(self, config: STDiT3Config, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    kw = {"dtype": c.compute_dtype, "param_dtype": c.weight_dtype, "rngs": rngs}
    f32 = {"dtype": F32, "param_dtype": c.weight_dtype, "rngs": rngs}
    # Conv3d with kernel == stride == patch, as a matmul over flattened
    # patches in (pt, ph, pw, C) order (`wan.patchify`).
    self.x_embedder = layers.linear(
        int(np.prod(c.patch_size)) * c.in_channels, c.hidden_size, **kw)
    self.t_embedder = MLP(c.freq_dim, c.hidden_size, c.hidden_size,
                          activation=jax.nn.silu, **f32)
    self.fps_embedder = MLP(c.freq_dim, c.hidden_size, c.hidden_size,
                            activation=jax.nn.silu, **f32)
    self.t_block = layers.linear(c.hidden_size, 6 * c.hidden_size, **f32)
    self.y_embedder = CaptionEmbedder(c, rngs=rngs)
    self.spatial_blocks = layers.stacked(
        lambda r: STDiT3Block(c, temporal=False, rngs=r), c.depth, rngs)
    self.temporal_blocks = layers.stacked(
        lambda r: STDiT3Block(c, temporal=True, rngs=r), c.depth, rngs)
    self.final_layer = FinalLayer(c, rngs=rngs)

  # Pieces, public so that token-wise samplers can reuse them. -------------

  def check_inputs(self, x, timestep, y, mask, x_mask, fps, height, width):
    c = self.config
    if x.ndim != 5 or x.shape[1] != c.in_channels:
      raise ValueError(
          f"x must be (B, {c.in_channels}, T, H, W); got {x.shape}")
    b = x.shape[0]
    if timestep.shape != (b,):
      raise ValueError(f"timestep must be ({b},); got {timestep.shape}")
    if (y.ndim != 4 or y.shape[0] != b or y.shape[1] != 1
        or y.shape[3] != c.caption_channels):
      raise ValueError(
          f"y must be ({b}, 1, L, {c.caption_channels}); got {y.shape}")
    if mask is not None and (mask.ndim != 2 or mask.shape[1] != y.shape[2]
                             or b % mask.shape[0]):
      raise ValueError(f"mask must be (b, {y.shape[2]}) with b dividing "
                       f"{b}; got {mask.shape}")
    if x_mask is not None:
      t = self.grid(x.shape)[0]
      if x_mask.shape != (b, t) or x_mask.dtype != jnp.bool_:
        raise ValueError(f"x_mask must be bool ({b}, {t}); got "
                         f"{x_mask.shape} {x_mask.dtype}")
    for name, v in (("fps", fps), ("height", height), ("width", width)):
      if v is None:
        raise ValueError(f"{name} is required (a (B,) array)")
    if fps.ndim != 1 or b % fps.shape[0]:
      raise ValueError(f"fps must be (b,) with b dividing {b}; got "
                       f"{fps.shape}")

  def grid(self, x_shape):
    """Token grid (T, H_p, W_p) for x (B, C, T, H, W), after padding."""
    return tuple(-(-s // p) for s, p in zip(x_shape[2:],
                                            self.config.patch_size))

  def null_caption(self, batch: int):
    """The unconditional caption (batch, 1, model_max_length, channels)."""
    y = self.y_embedder.y_embedding[...]
    return jnp.broadcast_to(y[None, None], (batch, 1, *y.shape))

  def embed(self, x, timestep, y, mask=None, x_mask=None, fps=None,
            height=None, width=None):
    """Inputs -> (tokens (B, N, C) float32, Conditioning)."""
    c = self.config
    x, timestep, y = jnp.asarray(x), jnp.asarray(timestep), jnp.asarray(y)
    fps = None if fps is None else jnp.asarray(fps)
    self.check_inputs(x, timestep, y, mask, x_mask, fps, height, width)
    b = x.shape[0]
    t, hp, wp = grid = self.grid(x.shape)
    pad = [(0, 0), (0, 0)] + [(0, g * p - s) for g, p, s in
                              zip(grid, c.patch_size, x.shape[2:])]
    tokens = self.x_embedder(patchify(jnp.pad(x, pad), c.patch_size))
    pos = position_embedding_2d(
        (hp, wp), c.hidden_size,
        position_scale(height, width, c.input_sq_size))
    tokens = (tokens.astype(F32).reshape(b, t, hp * wp, -1) + pos).reshape(
        b, t * hp * wp, -1)

    fps_emb = self.fps_embedder(
        timestep_sinusoid(jnp.tile(fps, b // fps.shape[0]), c.freq_dim))
    t_emb = self.t_embedder(timestep_sinusoid(timestep, c.freq_dim)) + fps_emb
    t_mlp = self.t_block(jax.nn.silu(t_emb))
    t0_emb = t0_mlp = None
    if x_mask is not None:
      t0_emb = self.t_embedder(
          timestep_sinusoid(jnp.zeros_like(timestep), c.freq_dim)) + fps_emb
      t0_mlp = self.t_block(jax.nn.silu(t0_emb))
    y_mask = None
    if mask is not None:
      y_mask = jnp.tile(jnp.asarray(mask) != 0, (b // mask.shape[0], 1))
    cond = Conditioning(
        t=t_emb, t_mlp=t_mlp, t0=t0_emb, t0_mlp=t0_mlp, x_mask=x_mask,
        y=self.y_embedder(y[:, 0]), y_mask=y_mask,
        rope=temporal_rope(t, c.head_dim, c.rope_theta))
    return tokens, cond

  def run_blocks(self, x, cond: Conditioning, grid):
    """Spatial block i then temporal block i, i = 0..depth-1, under scan.

    grid: (T, H_p, W_p). Returns (x, aux) with aux {"spatial": {"lse"},
    "temporal": {"lse"}}, each lse (depth, B, H, N).
    """
    frames_positions = (grid[0], grid[1] * grid[2])  # (T, S)
    spatial_def, spatial_state = nnx.split(self.spatial_blocks)
    temporal_def, temporal_state = nnx.split(self.temporal_blocks)

    def body(x, states):
      spatial = nnx.merge(spatial_def, states[0])
      temporal = nnx.merge(temporal_def, states[1])
      x, spatial_aux = spatial(x, cond, frames_positions)
      x, temporal_aux = temporal(x, cond, frames_positions)
      return x, {"spatial": spatial_aux, "temporal": temporal_aux}

    return jax.lax.scan(body, x, (spatial_state, temporal_state),
                        unroll=self.config.scan_unroll)

  def unembed(self, x, cond: Conditioning, x_shape):
    """Tokens -> (B, out_channels, T, H, W) float32, cropped to x_shape."""
    c = self.config
    grid = self.grid(x_shape)
    out = self.final_layer(x, cond, (grid[0], grid[1] * grid[2]))
    out = unpatchify(out, grid, c.patch_size, c.out_channels)
    t, h, w = x_shape[2:]
    return out[:, :, :t, :h, :w]

  def __call__(self, x, timestep, y, mask=None, x_mask=None, fps=None,
               height=None, width=None, *, return_aux=False):
    tokens, cond = self.embed(x, timestep, y, mask, x_mask, fps, height,
                              width)
    tokens, aux = self.run_blocks(tokens, cond, self.grid(x.shape))
    out = self.unembed(tokens, cond, x.shape)
    return (out, aux) if return_aux else out


# Pure functions ---------------------------------------------------------------


def layer(stacked_blocks, index: int):
  """Block `index` of a stacked block module, as a plain module."""
  graphdef, state = nnx.split(stacked_blocks)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))


def abstract_model(config: STDiT3Config) -> STDiT3:
  """The model with ShapeDtypeStruct leaves: shapes without memory."""
  return nnx.eval_shape(lambda: STDiT3(config, rngs=nnx.Rngs(0)))


def model_from_params(config: STDiT3Config, params: dict) -> STDiT3:
  """The model with `params` (nested dict of arrays, our layout) as weights."""
  graphdef, state = nnx.split(abstract_model(config))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)
