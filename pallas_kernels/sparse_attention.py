"""Attention over a chosen subset of query rows, returning the LSE.

`sparse_attention(q, k, v, q_index)` computes, for each picked query row,
exact softmax attention over ALL keys (Astraea section 3.2: queries are
pruned, keys/values never are) and the natural-log log-sum-exp of that row's
scaled logits, which the next denoising step uses to score tokens.

Only the pure-JAX reference lives here for now; the Pallas backends plug in
behind `backend=`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _check_inputs(q, k, v, q_index):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        f"q, k, v must be (B, L, H, D); got {q.shape=} {k.shape=} {v.shape=}")
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: {k.shape=} {v.shape=}")
  if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(
        f"q and k disagree on batch/heads/head_dim: {q.shape=} {k.shape=}")
  if q_index is not None:
    if q_index.ndim != 2 or q_index.shape[0] != q.shape[0]:
      raise ValueError(
          f"q_index must be (B, K) with B={q.shape[0]}; got {q_index.shape=}")
    if not jnp.issubdtype(q_index.dtype, jnp.integer):
      raise ValueError(f"q_index must be integer; got {q_index.dtype=}")


@functools.partial(jax.jit, static_argnames=("scale",))
def sparse_attention_reference(q, k, v, q_index=None, *, scale=None):
  """Pure-JAX reference: gather the rows, then softmax in float32.

  Returns out (B, K, H, D) in q.dtype and lse (B, H, K) float32.
  """
  _check_inputs(q, k, v, q_index)
  if scale is None:
    scale = q.shape[-1] ** -0.5
  if q_index is not None:
    q = jnp.take_along_axis(q, q_index[:, :, None, None], axis=1)
  precision = (jax.lax.Precision.HIGHEST if q.dtype == jnp.float32
               else jax.lax.Precision.DEFAULT)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision,
                      preferred_element_type=jnp.float32) * scale
  lse = jax.nn.logsumexp(logits, axis=-1)  # (B, H, K)
  probs = jnp.exp(logits - lse[..., None])
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype) if
                   v.dtype != jnp.float32 else probs, v, precision=precision,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype), lse


def sparse_attention(q, k, v, q_index=None, *, scale=None, backend="auto"):
  """Attention of the picked query rows of q against all of k/v.

  Args:
    q: (B, Lq, H, D) queries.
    k, v: (B, Lk, H, D) keys and values.
    q_index: (B, K) int32 rows of q to compute (sorted, unique), or None for
      all rows (dense attention with LSE).
    scale: logit scale; default D**-0.5.
    backend: "auto" or "reference".

  Returns:
    out (B, K, H, D) in q.dtype, lse (B, H, K) float32.
  """
  if backend not in ("auto", "reference"):
    raise ValueError(f"unknown {backend=}")
  return sparse_attention_reference(q, k, v, q_index, scale=scale)
