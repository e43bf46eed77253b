"""Pure-JAX sparse-query attention with LSE, chunked over keys.

The reference every kernel is tested against, and the backend on CPU. It
never forms the (K, Lk) logits matrix: keys are visited in chunks of
`kv_chunk` with the online softmax of FlashAttention-2 (Dao 2023, section
3.1.1; Milakov & Gimelshein 2018): for each chunk j with logits s_j,

  m' = max(m, max s_j),  l' = l e^(m - m') + sum e^(s_j - m'),
  o' = o e^(m - m') + e^(s_j - m') v_j,

and at the end out = o / l, lse = m + log l. Statistics and the output
accumulator are float32. float32 inputs use Precision.HIGHEST, so fp32 model
parity tests see (almost) exact float32 attention; bf16/fp16 probabilities
are rounded to the value dtype before the PV product, as the kernels do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_KV_CHUNK = 512


def gather_rows(q, q_index):
  """q[b, q_index[b, i]] -> (B, K, H, D): the picked query rows."""
  return jnp.take_along_axis(q, q_index[:, :, None, None], axis=1)


def _precision(dtype):
  return (lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32
          else lax.Precision.DEFAULT)


@functools.partial(jax.jit, static_argnames=("scale", "kv_chunk"))
def sparse_attention_reference(q, k, v, q_index=None, *, scale=None,
                               kv_chunk: int = DEFAULT_KV_CHUNK):
  """Softmax attention of the picked rows of q over all of k/v.

  q: (B, Lq, H, D); k, v: (B, Lk, H, D); q_index: (B, K) int or None.
  Returns out (B, K, H, D) in q.dtype (K = Lq if q_index is None) and
  lse (B, H, K) float32, the natural-log log-sum-exp of the scaled logits.
  """
  if scale is None:
    scale = q.shape[-1] ** -0.5
  if q_index is not None:
    q = gather_rows(q, q_index)
  batch, num_q, heads, head_dim = q.shape
  kv_len = k.shape[1]
  precision = _precision(q.dtype)
  p_dtype = jnp.float32 if jnp.dtype(v.dtype) == jnp.float32 else v.dtype

  def logits(k_chunk):  # (B, H, K, C) float32
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k_chunk, precision=precision,
                   preferred_element_type=jnp.float32)
    return s * jnp.float32(scale)

  def pv(p, v_chunk):  # (B, K, H, D) float32
    return jnp.einsum("bhqk,bkhd->bqhd", p.astype(p_dtype), v_chunk,
                      precision=precision, preferred_element_type=jnp.float32)

  if kv_len <= kv_chunk:  # One chunk: plain softmax, no loop.
    s = logits(k)
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - m[..., None])
    l = jnp.sum(p, axis=-1)
    out = pv(p, v) / jnp.transpose(l, (0, 2, 1))[..., None]
    return out.astype(q.dtype), m + jnp.log(l)

  num_chunks = -(-kv_len // kv_chunk)
  pad = num_chunks * kv_chunk - kv_len
  if pad:
    k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  k_chunks = k.reshape(batch, num_chunks, kv_chunk, heads, head_dim)
  v_chunks = v.reshape(batch, num_chunks, kv_chunk, heads, head_dim)

  def step(carry, j):
    m, l, acc = carry
    s = logits(k_chunks[:, j])
    if pad:  # Only the last chunk holds padding; mask it everywhere (cheap).
      valid = j * kv_chunk + jnp.arange(kv_chunk) < kv_len
      s = jnp.where(valid, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[..., None])
    l = l * alpha + jnp.sum(p, axis=-1)
    alpha_q = jnp.transpose(alpha, (0, 2, 1))[..., None]  # (B, K, H, 1)
    acc = acc * alpha_q + pv(p, v_chunks[:, j])
    return (m_new, l, acc), None

  init = (jnp.full((batch, heads, num_q), -jnp.inf, jnp.float32),
          jnp.zeros((batch, heads, num_q), jnp.float32),
          jnp.zeros((batch, num_q, heads, head_dim), jnp.float32))
  (m, l, acc), _ = lax.scan(step, init, jnp.arange(num_chunks))
  out = acc / jnp.transpose(l, (0, 2, 1))[..., None]
  return out.astype(q.dtype), m + jnp.log(l)
