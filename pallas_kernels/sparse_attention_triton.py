"""Sparse-query attention with LSE as a Pallas Triton kernel (any NVIDIA GPU).

One program computes `block_q` output rows of one (batch, head): it loads
the picked query rows with a gather (pointer arithmetic on q_index, no
gathered copy of q in memory), then streams all keys in `block_k` tiles with
the online softmax of FlashAttention-2 (Dao 2023, section 3.1.1) in base 2,
the softmax scale folded into the exponent.

Tails: every access stays in bounds, so the kernel behaves the same
compiled and in interpret mode (where out-of-range slices would be clamped).
The last query tile starts at K - block_q (it recomputes a few rows of its
neighbour and writes the same values); the last key tile starts at
Lk - block_k and masks the columns the previous tile covered. Head dims that
are not a power of two (72) are padded to the next one inside the kernel
with masked loads. Sequences shorter than the smallest tile (16) are padded
in the wrapper.

jax 0.11 deprecated the Pallas Triton backend in favour of Mosaic GPU, so it
sits behind the Mosaic kernel in `backend="auto"`, for GPUs without wgmma.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

try:
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - depends on the installed jaxlib
  pl = None
  pltriton = None

LOG2E = math.log2(math.e)
MIN_BLOCK = 16  # Smallest tile tl.dot accepts.
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                    jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class TritonTuning:
  """Block sizes and launch parameters of the Triton kernel."""

  block_q: int = 128
  block_k: int = 64
  num_warps: int = 8
  num_stages: int = 3

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      size = getattr(self, name)
      if size < MIN_BLOCK or size & (size - 1):
        raise ValueError(f"{name}={size} must be a power of two >= 16")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"{self.num_warps=} must be a power of two <= 16")
    if self.num_stages < 1:
      raise ValueError(f"{self.num_stages=} must be >= 1")

  @classmethod
  def get_default(cls, head_dim: int, dtype) -> "TritonTuning":
    if jnp.dtype(dtype) == jnp.float32 or head_dim > 128:
      return cls(block_q=64, block_k=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
      return cls(block_q=128, block_k=64, num_warps=4, num_stages=3)
    return cls()


def supports(q, scale) -> str | None:
  """Why the kernel cannot run these inputs, or None if it can."""
  if pltriton is None:
    return "jax.experimental.pallas.triton is not importable"
  if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
    return f"{q.dtype=} is not bfloat16/float16/float32"
  if not 16 <= q.shape[-1] <= MAX_HEAD_DIM:
    return f"head_dim={q.shape[-1]} is outside [16, {MAX_HEAD_DIM}]"
  if not scale > 0:
    return f"{scale=} must be positive (the running max is taken unscaled)"
  return None


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def _prev_pow2(x: int) -> int:
  return 1 << (x.bit_length() - 1)


def _attention_kernel(q_ref, k_ref, v_ref, idx_ref, out_ref, lse_ref, *,
                      num_rows: int, kv_valid: int, head_dim: int,
                      block_q: int, block_k: int, scale: float):
  """Rows [base, base + block_q) of one (batch, head).

  q_ref: [Lq, Dp]; k_ref, v_ref: [Lk, Dp]; idx_ref: [num_rows] int32 or
  None (dense); out_ref: [num_rows, Dp]; lse_ref: [num_rows] float32.
  Dp is head_dim padded to a power of two; columns >= head_dim are masked.
  """
  head_dim_padded = q_ref.shape[-1]
  kv_len = k_ref.shape[0]
  base = jnp.minimum(pl.program_id(0) * block_q, num_rows - block_q)
  d_ok = (jnp.arange(head_dim_padded) < head_dim)[None, :]
  d_mask = None if head_dim == head_dim_padded else d_ok
  other = None if d_mask is None else 0.0

  if idx_ref is None:
    q_rows = q_ref.at[pl.ds(base, block_q), :]
  else:
    # Gathered rows: two broadcast integer indexers (the interpreter cannot
    # mix an integer-array index with a slice).
    rows = idx_ref[pl.ds(base, block_q)]
    q_rows = q_ref.at[rows[:, None], jnp.arange(head_dim_padded)[None, :]]
  q = pltriton.load(q_rows, mask=d_mask, other=other)
  exact = jnp.dtype(q.dtype) == jnp.float32
  dot = functools.partial(
      pltriton.dot, precision=lax.Precision.HIGHEST if exact else None)

  num_steps = pl.cdiv(kv_len, block_k)
  last_start = kv_len - block_k
  mask_lo = (num_steps - 1) * block_k - last_start
  mask_hi = kv_valid - last_start
  masked_tail = mask_lo > 0 or mask_hi < block_k
  c = scale * LOG2E

  def step(j, carry, masked=False):
    acc, m_i, l_i = carry
    rows = pl.ds(jnp.minimum(j * block_k, last_start), block_k)
    k = pltriton.load(k_ref.at[rows, :], mask=d_mask, other=other)
    s = dot(q, k, trans_b=True)  # [block_q, block_k] float32
    if masked:
      cols = jnp.arange(block_k)[None, :]
      s = jnp.where((cols >= mask_lo) & (cols < mask_hi), s, -jnp.inf)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=1) * c)
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(s * c - m_new[:, None])
    l_i = l_i * alpha + jnp.sum(p, axis=1)
    v = pltriton.load(v_ref.at[rows, :], mask=d_mask, other=other)
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
    return acc, m_new, l_i

  carry = (jnp.zeros((block_q, head_dim_padded), jnp.float32),
           jnp.full((block_q,), -jnp.inf, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  num_plain = num_steps - 1 if masked_tail else num_steps
  carry = lax.fori_loop(0, num_plain, step, carry)
  if masked_tail:
    carry = step(num_plain, carry, masked=True)
  acc, m_i, l_i = carry
  out = acc / l_i[:, None]
  pltriton.store(out_ref.at[pl.ds(base, block_q), :],
                 out.astype(out_ref.dtype), mask=d_mask)
  lse_ref[pl.ds(base, block_q)] = (m_i + jnp.log2(l_i)) / LOG2E


def sparse_attention_triton(q, k, v, q_index=None, *, scale: float,
                            tuning: TritonTuning | None = None,
                            interpret: bool = False):
  """out (B, K, H, D) q.dtype and lse (B, H, K) float32; see module doc.

  Raises NotImplementedError for inputs the kernel does not handle.
  """
  if (why := supports(q, scale)) is not None:
    raise NotImplementedError(f"Triton sparse attention: {why}")
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  tuning = tuning or TritonTuning.get_default(head_dim, q.dtype)

  if kv_len < MIN_BLOCK:  # Pad keys to one minimal tile; masked inside.
    pad = ((0, 0), (0, MIN_BLOCK - kv_len), (0, 0), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
  block_k = min(tuning.block_k, _prev_pow2(k.shape[1]))

  num_out = q_len if q_index is None else q_index.shape[1]
  if num_out < MIN_BLOCK:  # Gather path with the last row repeated.
    if q_index is None:
      q_index = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32),
                                 (batch, q_len))
    q_index = jnp.pad(q_index, ((0, 0), (0, MIN_BLOCK - num_out)),
                      mode="edge")
  num_rows = max(num_out, MIN_BLOCK)
  block_q = min(tuning.block_q, _prev_pow2(num_rows))
  head_dim_padded = _next_pow2(head_dim)

  grid = (pl.cdiv(num_rows, block_q), batch, heads)
  full_q = pl.BlockSpec((None, q_len, None, head_dim_padded),
                        lambda i, b, h: (b, 0, h, 0))
  full_kv = pl.BlockSpec((None, k.shape[1], None, head_dim_padded),
                         lambda i, b, h: (b, 0, h, 0))
  in_specs = [full_q, full_kv, full_kv]
  operands = [q, k, v]
  if q_index is not None:
    in_specs.append(pl.BlockSpec((None, num_rows), lambda i, b, h: (b, 0)))
    operands.append(q_index.astype(jnp.int32))
  out_specs = [
      pl.BlockSpec((None, num_rows, None, head_dim_padded),
                   lambda i, b, h: (b, 0, h, 0)),
      pl.BlockSpec((None, None, num_rows), lambda i, b, h: (b, h, 0)),
  ]
  out_shape = [
      jax.ShapeDtypeStruct((batch, num_rows, heads, head_dim), q.dtype),
      jax.ShapeDtypeStruct((batch, heads, num_rows), jnp.float32),
  ]
  body = functools.partial(
      _attention_kernel, num_rows=num_rows, kv_valid=kv_len,
      head_dim=head_dim, block_q=block_q, block_k=block_k,
      scale=float(scale))
  if q_index is None:
    kernel = lambda q, k, v, o, l: body(q, k, v, None, o, l)  # noqa: E731
  else:
    kernel = body
  out, lse = pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=interpret,
      compiler_params=pltriton.CompilerParams(
          num_warps=tuning.num_warps, num_stages=tuning.num_stages),
      name="sparse_attention_triton",
  )(*operands)
  if num_rows != num_out:
    out, lse = out[:, :num_out], lse[:, :, :num_out]
  return out, lse
