"""Attention over a chosen subset of query rows, returning the LSE.

`sparse_attention(q, k, v, q_index)` computes, for each picked query row,
exact softmax attention over ALL keys (Astraea section 3.2: queries are
pruned, keys/values never are) and the natural-log log-sum-exp of that row's
scaled logits, which the next denoising step uses to score tokens
(S_LSE in Astraea's equation for S_sig).

Backends (`backend=`):
  "mosaic_gpu"  Pallas Mosaic GPU kernel, Hopper (H100/H200): wgmma + TMA,
                warp-specialised; bf16/fp16, head dims 64 and 128.
  "triton"      Pallas Triton kernel, any NVIDIA GPU; bf16/fp16/fp32, head
                dims 16..256 (72 padded to 128 in registers).
  "cudnn"       cuDNN flash attention through XLA, with cuDNN's softmax
                statistics as the LSE; sparse = gather q, then dense (a
                materialised gathered copy of q). bf16/fp16, D % 8 == 0.
  "xla"         the pure-JAX reference below, chunked over keys (also
                "reference"); runs everywhere.
`backend="auto"` tries `select_backends(...)` in order: a backend that
cannot take the inputs raises NotImplementedError at trace time and the next
one is tried (as tokamax's attention API does); the list always ends with
"xla". The order encodes measurements on one H200 (see `select_backends` and
benchmarks/results/attention_h200.json): Mosaic GPU for Wan's long
self-attention, cuDNN for 512-key cross-attention and head dim 72, Triton
for very short sequences, the reference on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import sparse_attention_mosaic as mosaic
from pallas_kernels import sparse_attention_triton as triton
from pallas_kernels.sparse_attention_reference import gather_rows
from pallas_kernels.sparse_attention_reference import (
    sparse_attention_reference)

BACKENDS = ("mosaic_gpu", "triton", "cudnn", "xla")
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                    jnp.dtype(jnp.float32))
MAX_HEAD_DIM = 256
# "auto" thresholds (see `select_backends`): keys up to SHORT_KV_LEN are
# "short" (OpenSora's temporal attention over 15-30 frames); up to
# CUDNN_KV_LEN cuDNN beats the Mosaic kernel (measured at 512 text keys).
SHORT_KV_LEN = 64
CUDNN_KV_LEN = 512

__all__ = ["BACKENDS", "select_backends", "sparse_attention",
           "sparse_attention_reference"]


def _check_inputs(q, k, v, q_index):
  """Shapes, dtypes and (when concrete) index values; ValueError if wrong."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        f"q, k, v must be (B, L, H, D); got {q.shape=} {k.shape=} {v.shape=}")
  if k.shape != v.shape:
    raise ValueError(f"k and v shapes differ: {k.shape=} {v.shape=}")
  if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(
        f"q and k disagree on batch/heads/head_dim: {q.shape=} {k.shape=}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(
        f"q, k, v must share a dtype; got {q.dtype=} {k.dtype=} {v.dtype=}")
  if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
    raise ValueError(
        f"{q.dtype=} is not supported; use bfloat16, float16 or float32")
  head_dim = q.shape[-1]
  if not (8 <= head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0):
    raise ValueError(
        f"{head_dim=} must be a multiple of 8 in [8, {MAX_HEAD_DIM}]")
  if min(q.shape[1], k.shape[1]) < 1:
    raise ValueError(f"empty sequence: {q.shape=} {k.shape=}")
  if q_index is None:
    return
  if q_index.ndim != 2 or q_index.shape[0] != q.shape[0]:
    raise ValueError(
        f"q_index must be (B, K) with B={q.shape[0]}; got {q_index.shape=}")
  if not jnp.issubdtype(q_index.dtype, jnp.integer):
    raise ValueError(f"q_index must be integer; got {q_index.dtype=}")
  if q_index.shape[1] < 1:
    raise ValueError(f"q_index selects no rows: {q_index.shape=}")
  try:
    idx = np.asarray(q_index)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return  # Values unknown under jit: the caller guarantees them.
  bad = (idx < 0) | (idx >= q.shape[1])
  if bad.any():
    b, i = np.argwhere(bad)[0]
    raise ValueError(
        f"q_index out of range [0, {q.shape[1]}): q_index[{b}, {i}]="
        f"{idx[b, i]}")
  not_increasing = np.diff(idx, axis=1) <= 0
  if not_increasing.any():
    b, i = np.argwhere(not_increasing)[0]
    raise ValueError(
        "q_index rows must be sorted and unique: "
        f"q_index[{b}, {i}:{i + 2}]={idx[b, i:i + 2].tolist()}")


def _device_kind():
  """('cpu' | 'hopper' | 'gpu', description) of the default device."""
  device = jax.devices()[0]
  if device.platform != "gpu":
    return device.platform, device.device_kind
  capability = getattr(device, "compute_capability", "")
  if str(capability).startswith("9."):
    return "hopper", device.device_kind
  return "gpu", device.device_kind


def select_backends(q_shape, kv_len, num_rows, dtype,
                    device: str | None = None) -> tuple[str, ...]:
  """Backends `backend="auto"` tries, in order, for one call.

  q_shape: (B, Lq, H, D); kv_len: Lk; num_rows: K (Lq when dense); device:
  "cpu", "gpu" (no wgmma) or "hopper"; default: the default device's.

  The order follows measurements on one H200 (bf16, random inputs; rows of
  benchmarks/results/attention_h200.json):
  * CPU: the pure-JAX reference ("xla") only.
  * Short keys (Lk <= SHORT_KV_LEN; OpenSora's temporal attention, 15
    frames): Triton, then XLA (0.51 vs 0.59 ms for B=3180, H=16, D=72).
  * Hopper, bf16/fp16, D in {64, 128}, Lk > CUDNN_KV_LEN: the Mosaic GPU
    kernel (Wan self-attention: 1.08-1.09x cuDNN's throughput, with LSE).
  * Hopper, bf16/fp16, otherwise: cuDNN with its LSE. Text cross-attention
    (512 keys): cuDNN 0.221 ms vs ours 0.240 at K = Lq; OpenSora spatial
    (D=72, which the Mosaic kernel does not take): cuDNN 1.27 ms vs Triton
    1.80. (Sparse cuDNN gathers q into a copy first; at 512 keys the copy
    is cheap next to the attention.)
  * float32: Triton (exact dots), then XLA.
  * Other NVIDIA GPUs (not measured): Triton, then cuDNN, then XLA.
  """
  del num_rows  # The measured order does not depend on it.
  device = device or _device_kind()[0]
  if device not in ("gpu", "hopper"):
    return ("xla",)
  if kv_len <= SHORT_KV_LEN or jnp.dtype(dtype) == jnp.float32:
    return ("triton", "xla")
  if device != "hopper":
    return ("triton", "cudnn", "xla")
  mosaic_fits = q_shape[-1] in mosaic.SUPPORTED_HEAD_DIMS
  if mosaic_fits and kv_len > CUDNN_KV_LEN:
    return ("mosaic_gpu", "cudnn", "triton", "xla")
  return ("cudnn",) + (("mosaic_gpu",) if mosaic_fits else ()) + (
      "triton", "xla")


def _run_cudnn(q, k, v, q_index, scale):
  """cuDNN flash attention with its softmax statistics as the LSE."""
  if jax.devices()[0].platform != "gpu":
    raise NotImplementedError("cuDNN attention needs a CUDA GPU")
  if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16),
                                jnp.dtype(jnp.float16)):
    raise NotImplementedError(f"cuDNN attention: {q.dtype=} is not bf16/fp16")
  try:  # Private API: jax.nn.dot_product_attention does not return the LSE.
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
    cudnn_attention.check_cudnn_version()
  except Exception as e:  # noqa: BLE001 - any failure means "not available"
    raise NotImplementedError(f"cuDNN attention unavailable: {e}") from e
  if q_index is not None:
    q = gather_rows(q, q_index)
  out, lse = cudnn_attention.dot_product_attention(
      q, k, v, scale=float(scale), qkv_layout="BTNH", return_residual=True)
  return out, lse.astype(jnp.float32)  # (B, H, K)


def _run(backend, q, k, v, q_index, scale, interpret):
  if backend == "mosaic_gpu":
    if not interpret and _device_kind()[0] != "hopper":
      raise NotImplementedError(
          f"Mosaic GPU kernel needs a Hopper GPU; have {_device_kind()[1]}")
    return mosaic.sparse_attention_mosaic(q, k, v, q_index, scale=scale,
                                          interpret=interpret)
  if backend == "triton":
    if not interpret and _device_kind()[0] not in ("gpu", "hopper"):
      raise NotImplementedError(
          f"Triton kernel needs a CUDA GPU; have {_device_kind()[1]}")
    return triton.sparse_attention_triton(q, k, v, q_index, scale=scale,
                                          interpret=interpret)
  if backend == "cudnn":
    return _run_cudnn(q, k, v, q_index, scale)
  return sparse_attention_reference(q, k, v, q_index, scale=scale)


@functools.partial(jax.jit,
                   static_argnames=("scale", "backend", "interpret"))
def _sparse_attention(q, k, v, q_index, *, scale, backend, interpret):
  if backend != "auto":
    return _run(backend, q, k, v, q_index, scale, interpret)
  num_rows = q.shape[1] if q_index is None else q_index.shape[1]
  order = select_backends(q.shape, k.shape[1], num_rows, q.dtype)
  reasons = []
  for name in order:
    try:
      return _run(name, q, k, v, q_index, scale, interpret)
    except NotImplementedError as e:
      reasons.append(f"{name}: {e}")
  raise NotImplementedError("no backend could run: " + "; ".join(reasons))


def sparse_attention(q, k, v, q_index=None, *, scale=None, backend="auto",
                     interpret: bool = False):
  """Attention of the picked query rows of q against all of k/v.

  Args:
    q: (B, Lq, H, D) queries.
    k, v: (B, Lk, H, D) keys and values (same dtype as q: bf16/fp16/fp32).
    q_index: (B, K) int rows of q to compute (sorted, unique; checked when
      concrete), or None for all rows (dense attention with LSE).
    scale: logit scale; default D**-0.5.
    backend: "auto", one of BACKENDS, or "reference" (= "xla").
    interpret: run the Pallas kernels in interpret mode (CPU tests).

  Returns:
    out (B, K, H, D) in q.dtype, lse (B, H, K) float32 (natural log).
  """
  if backend == "reference":
    backend = "xla"
  if backend not in ("auto", *BACKENDS):
    raise ValueError(f"unknown {backend=}; use 'auto' or one of {BACKENDS}")
  _check_inputs(q, k, v, q_index)
  if scale is None:
    scale = q.shape[-1] ** -0.5
  scale = float(scale)
  if not np.isfinite(scale):
    raise ValueError(f"{scale=} must be finite")
  return _sparse_attention(q, k, v, q_index, scale=scale, backend=backend,
                           interpret=interpret)
