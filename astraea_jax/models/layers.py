"""Pieces shared by the DiTs: norms, RoPE, timestep embedding, attention.

Every attention in the models goes through `attention` below, the one call
site where the kernels of `pallas_kernels` plug in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels

F32 = jnp.float32


# Attention ------------------------------------------------------------------


def take_tokens(x, token_index):
  """x (B, N, ...) rows token_index (B, K) -> (B, K, ...)."""
  idx = token_index.reshape(*token_index.shape, *([1] * (x.ndim - 2)))
  return jnp.take_along_axis(x, idx, axis=1)


def attention(q, k, v, *, q_index=None, scale=None, kv_mask=None):
  """Softmax attention, the single call site of all model attention.

  q: (B, Lq, H, D); k, v: (B, Lk, H, D); q_index: optional (B, K) rows of q;
  kv_mask: optional (B, Lk) bool, False keys get zero weight (OpenSora's
  caption mask; short key sequences, so the masked path is plain XLA).
  Returns (out, lse): out (B, Lq or K, H, D) in q.dtype, lse (B, H, Lq or K)
  float32 (Astraea's token score S_LSE).
  """
  if kv_mask is None:
    return pallas_kernels.sparse_attention(q, k, v, q_index, scale=scale)
  if q_index is not None:
    q = jnp.take_along_axis(q, q_index[:, :, None, None], axis=1)
  return _masked_attention(q, k, v, kv_mask, scale)


def _masked_attention(q, k, v, kv_mask, scale):
  """float32 logits and softmax with the logits of masked keys at -inf.

  A row with no valid key returns 0 (the limit of an empty softmax) and an
  lse of -inf.
  """
  if kv_mask.shape != k.shape[:2]:
    raise ValueError(f"{kv_mask.shape=} must be (B, Lk) = {k.shape[:2]}")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  precision = (jax.lax.Precision.HIGHEST if q.dtype == F32
               else jax.lax.Precision.DEFAULT)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision,
                      preferred_element_type=F32) * scale
  logits = jnp.where(kv_mask[:, None, None, :], logits, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)  # (B, H, Lq)
  probs = jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                   precision=precision, preferred_element_type=F32)
  return out.astype(q.dtype), lse


# Norms (statistics in float32, as the original keeps them) ------------------


def layer_norm(x, eps):
  """LayerNorm without affine parameters, float32 statistics and output."""
  x = x.astype(F32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


class LayerNorm(nnx.Module):
  """Affine LayerNorm; float32 statistics and output."""

  def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

  def __call__(self, x):
    return (layer_norm(x, self.eps) * self.weight[...].astype(F32)
            + self.bias[...].astype(F32))


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) * weight, statistics in float32.

  Output in x.dtype (the original: `norm(x.float()).type_as(x) * weight`).
  """

  def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
    del rngs
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

  def __call__(self, x):
    xf = x.astype(F32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True)
                           + self.eps)
    return y.astype(x.dtype) * self.weight[...].astype(x.dtype)


def linear(in_features, out_features, *, dtype, param_dtype, rngs):
  """nnx.Linear with the (in, out) kernel layout; inputs cast to `dtype`."""
  return nnx.Linear(in_features, out_features, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)


# Timestep embedding ---------------------------------------------------------


def stacked(make, count: int, rngs: nnx.Rngs):
  """`count` modules `make(rngs)` with their parameters stacked on a
  leading axis (one vmapped init): the layers a model scans over."""

  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def build(rngs):
    return make(rngs)

  return build(rngs)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding [cos(t*w), sin(t*w)], w_i = max_period^(-i/half).

  The original computes this in float64. Here the angle t*w_i is formed in
  float32 with a compensated product (t and w_i split into 12-bit high parts
  whose product is exact, plus the small cross terms), then
  cos(a + b) = cos(a)cos(b) - sin(a)sin(b). Error vs float64 ~1e-7 for
  t <= 1000, where a plain float32 product errs by up to ~6e-5 rad.
  """
  half = dim // 2
  freqs = max_period ** (-np.arange(half, dtype=np.float64) / half)
  f_hi = _high_bits(freqs.astype(np.float32))
  f_lo = (freqs - f_hi.astype(np.float64)).astype(np.float32)
  t = t.astype(F32)[:, None]
  t_hi = _high_bits(t)
  t_lo = t - t_hi
  a = t_hi * f_hi                                # exact: 12 x 12 bits
  b = t_hi * f_lo + t_lo * f_hi + t_lo * f_lo   # small correction
  cos = jnp.cos(a) * jnp.cos(b) - jnp.sin(a) * jnp.sin(b)
  sin = jnp.sin(a) * jnp.cos(b) + jnp.cos(a) * jnp.sin(b)
  return jnp.concatenate([cos, sin], axis=-1)


def _high_bits(x):
  """Zero the low 12 mantissa bits of float32 values (exact split)."""
  if isinstance(x, np.ndarray):
    return (x.view(np.uint32) & np.uint32(0xFFFFF000)).view(np.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), F32)


# 3-D rotary position embedding ---------------------------------------------


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
  """Channels per axis (t, h, w): Wan splits d as d-4(d//6), 2(d//6), 2(d//6)."""
  hw = 2 * (head_dim // 6)
  return head_dim - 2 * hw, hw, hw


def rope_3d_angles(grid: tuple[int, int, int], head_dim: int,
                   theta: float = 10000.0):
  """Angles (L, head_dim // 2) for tokens in (f, h, w) row-major order.

  Axis a with n_a channels rotates pair i by pos_a * theta^(-2i / n_a).
  Computed in float64 on the host: the grid is static.
  """
  angles = []
  for size, n in zip(grid, rope_axis_dims(head_dim)):
    inv_freq = theta ** (-np.arange(0, n, 2, dtype=np.float64) / n)
    angles.append(np.outer(np.arange(size, dtype=np.float64), inv_freq))
  f, h, w = grid
  at = np.broadcast_to(angles[0][:, None, None, :], (f, h, w, angles[0].shape[1]))
  ah = np.broadcast_to(angles[1][None, :, None, :], (f, h, w, angles[1].shape[1]))
  aw = np.broadcast_to(angles[2][None, None, :, :], (f, h, w, angles[2].shape[1]))
  return np.concatenate([at, ah, aw], axis=-1).reshape(f * h * w, -1)


def rope_table(grid, head_dim, theta=10000.0):
  """(cos, sin), each (L, head_dim // 2) float32."""
  ang = rope_3d_angles(grid, head_dim, theta)
  return (jnp.asarray(np.cos(ang), F32), jnp.asarray(np.sin(ang), F32))


def apply_rope(x, rope):
  """Rotate interleaved channel pairs (2i, 2i+1) of x (B, L, H, D)."""
  cos, sin = rope  # (L, D/2) each, or already gathered to (B, L, D/2)
  if cos.ndim == 2:
    cos, sin = cos[None], sin[None]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  xf = x.astype(F32).reshape(*x.shape[:-1], -1, 2)
  x0, x1 = xf[..., 0], xf[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)
