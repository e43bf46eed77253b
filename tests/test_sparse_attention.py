"""pallas_kernels.sparse_attention: reference, kernels, errors, backend choice.

Tolerances (relative L2 error of `out`, ||out - ref|| / ||ref||):
  float32  1e-5   same math in another order (the models' fp32 parity bar);
  float16  2e-3   probabilities are rounded to fp16 (2^-11) before the PV
                  product, in another order than the reference's, and the
                  output is rounded to fp16;
  bfloat16 1e-2   the same with bf16's 2^-8 spacing.
LSE (absolute, natural log): 1e-4. It is accumulated in float32 from logits
that are exact in float32 for every input dtype.

The Pallas kernels run in interpret mode on CPU (the Mosaic GPU kernel in
jax's GPU interpreter, which simulates its warpgroups, barriers and TMA
copies, with the two wgmma products done as float32 dots there; the Triton
kernel in the HLO interpreter). The same classes run compiled on a GPU;
on CPU those skip.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import sparse_attention_mosaic as mosaic
from pallas_kernels import sparse_attention_triton as triton

TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.float16): 2e-3,
             jnp.dtype(jnp.bfloat16): 1e-2}
LSE_ATOL = 1e-4


def _platform_kind():
  device = jax.devices()[0]
  if device.platform != "gpu":
    return "cpu"
  return "hopper" if str(getattr(device, "compute_capability", "")
                         ).startswith("9.") else "gpu"


def make_inputs(batch, q_len, kv_len, heads, head_dim, num_rows, dtype,
                seed):
  """Random q, k, v and sorted unique q_index (None when num_rows is None)."""
  rng = np.random.default_rng(seed)
  def normal(length):
    x = rng.standard_normal((batch, length, heads, head_dim))
    return jnp.asarray(x, jnp.float32).astype(dtype)
  q, k, v = normal(q_len), normal(kv_len), normal(kv_len)
  if num_rows is None:
    return q, k, v, None
  rows = [np.sort(rng.choice(q_len, num_rows, replace=False))
          for _ in range(batch)]
  return q, k, v, jnp.asarray(np.stack(rows), jnp.int32)


def naive_float64(q, k, v, q_index, scale):
  """Softmax attention in float64 numpy: the ground truth."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  if q_index is not None:
    q = np.take_along_axis(q, np.asarray(q_index)[:, :, None, None], axis=1)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  m = s.max(axis=-1, keepdims=True)
  lse = (m + np.log(np.exp(s - m).sum(axis=-1, keepdims=True)))[..., 0]
  out = np.einsum("bhqk,bkhd->bqhd", np.exp(s - lse[..., None]), v)
  return out, lse


def assert_close(out, lse, ref_out, ref_lse, dtype):
  out = np.asarray(out, np.float64)
  ref_out = np.asarray(ref_out, np.float64)
  assert out.shape == ref_out.shape, (out.shape, ref_out.shape)
  assert np.isfinite(out).all()
  rel = np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out)
  assert rel <= TOLERANCE[jnp.dtype(dtype)], f"out rel error {rel:.3g}"
  lse, ref_lse = np.asarray(lse, np.float64), np.asarray(ref_lse, np.float64)
  assert lse.shape == ref_lse.shape, (lse.shape, ref_lse.shape)
  err = np.abs(lse - ref_lse).max()
  assert err <= LSE_ATOL, f"lse max abs error {err:.3g}"


def sample_cases(grid, count, seed):
  """`count` entries of the product of `grid`'s value lists (seeded)."""
  product = list(itertools.product(*grid.values()))
  rng = np.random.default_rng(seed)
  picks = rng.choice(len(product), size=min(count, len(product)),
                     replace=False)
  return [dict(zip(grid, product[i])) for i in sorted(picks)]


# Reference ------------------------------------------------------------------

# (B, Lq, Lk, H, D, K): K=None dense; odd lengths, K=1, K=Lq.
REFERENCE_SHAPES = [(1, 37, 53, 2, 64, None), (2, 50, 33, 3, 72, 17),
                    (1, 29, 64, 1, 128, 1), (2, 24, 41, 2, 72, 24)]


@pytest.mark.parametrize("case", sample_cases(
    {"shape": REFERENCE_SHAPES, "dtype": ["float32", "bfloat16", "float16"],
     "kv_chunk": [8, 512]}, count=12, seed=0), ids=str)
def test_reference_matches_float64(case):
  batch, q_len, kv_len, heads, head_dim, num_rows = case["shape"]
  dtype = jnp.dtype(case["dtype"])
  q, k, v, q_index = make_inputs(batch, q_len, kv_len, heads, head_dim,
                                 num_rows, dtype, seed=1)
  scale = head_dim ** -0.5
  out, lse = pallas_kernels.sparse_attention_reference(
      q, k, v, q_index, scale=scale, kv_chunk=case["kv_chunk"])
  assert out.dtype == dtype and lse.dtype == jnp.float32
  assert_close(out, lse, *naive_float64(q, k, v, q_index, scale), dtype)


def test_reference_chunking_is_exact_in_float32():
  """Online softmax over 9-key chunks (with a padded tail) = one chunk."""
  q, k, v, q_index = make_inputs(2, 40, 61, 2, 64, 13, jnp.float32, seed=2)
  chunked = pallas_kernels.sparse_attention_reference(q, k, v, q_index,
                                                      kv_chunk=9)
  whole = pallas_kernels.sparse_attention_reference(q, k, v, q_index,
                                                    kv_chunk=64)
  for a, b in zip(chunked, whole):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)


def test_sparse_rows_are_the_dense_rows():
  q, k, v, q_index = make_inputs(2, 45, 30, 2, 64, 11, jnp.float32, seed=3)
  out, lse = pallas_kernels.sparse_attention(q, k, v, q_index)
  dense_out, dense_lse = pallas_kernels.sparse_attention(q, k, v)
  rows = np.asarray(q_index)
  np.testing.assert_allclose(
      out, np.take_along_axis(np.asarray(dense_out),
                              rows[:, :, None, None], axis=1),
      rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
      lse, np.take_along_axis(np.asarray(dense_lse), rows[:, None, :],
                              axis=2), rtol=1e-6, atol=1e-6)


def test_traced_index_under_jit():
  """Under jit q_index is not checked (unknown values) and still used."""
  q, k, v, q_index = make_inputs(1, 30, 20, 2, 64, 7, jnp.float32, seed=4)
  out, lse = jax.jit(pallas_kernels.sparse_attention)(q, k, v, q_index)
  assert_close(out, lse, *naive_float64(q, k, v, q_index, 64 ** -0.5),
               jnp.float32)


def test_custom_scale():
  q, k, v, q_index = make_inputs(1, 20, 24, 1, 64, 5, jnp.float32, seed=5)
  out, lse = pallas_kernels.sparse_attention(q, k, v, q_index, scale=0.3)
  assert_close(out, lse, *naive_float64(q, k, v, q_index, 0.3), jnp.float32)


# Kernels (interpret on CPU; compiled on a GPU) ------------------------------


class TritonKernelTest:
  """The Triton kernel against the float64 truth, through the public API."""

  BACKEND = "triton"
  INTERPRET = True
  CASES = sample_cases(
      {"shape": [(2, 50, 70, 2, 64, 21), (1, 33, 47, 2, 72, None),
                 (1, 40, 5, 1, 64, 1), (1, 150, 300, 1, 128, 150),
                 (2, 20, 129, 1, 72, 9)],
       "dtype": ["bfloat16", "float16", "float32"]}, count=7, seed=1)

  @pytest.fixture(autouse=True)
  def _needs_device(self):
    if not self.INTERPRET and _platform_kind() == "cpu":
      pytest.skip("compiled Triton kernels need a CUDA GPU")

  def run(self, q, k, v, q_index, scale):
    return pallas_kernels.sparse_attention(
        q, k, v, q_index, scale=scale, backend=self.BACKEND,
        interpret=self.INTERPRET)

  @pytest.mark.parametrize("case", CASES, ids=str)
  def test_matches_float64(self, case):
    batch, q_len, kv_len, heads, head_dim, num_rows = case["shape"]
    dtype = jnp.dtype(case["dtype"])
    q, k, v, q_index = make_inputs(batch, q_len, kv_len, heads, head_dim,
                                   num_rows, dtype, seed=6)
    scale = head_dim ** -0.5
    out, lse = self.run(q, k, v, q_index, scale)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert_close(out, lse, *naive_float64(q, k, v, q_index, scale), dtype)


class TestTritonInterpret(TritonKernelTest):
  INTERPRET = True


class TestTritonCompiled(TritonKernelTest):
  INTERPRET = False


class MosaicKernelTest:
  """The Mosaic GPU kernel against the float64 truth.

  Each case exercises one path: dense 64-row TMA tiles with a masked
  (overlapping + padded) last key tile; the row gather with odd K and Lk,
  keys split over two CTAs and merged by LSE; K=1 at D=128 (with Lk=130
  the last key tile is mostly overlap and padding).
  """

  INTERPRET = True
  CASES = (
      # (B, Lq, Lk, H, D, K, dtype, tuning)
      (1, 128, 200, 1, 64, None, "bfloat16", None),
      (1, 300, 203, 1, 64, 77, "float16",
       mosaic.MosaicTuning(block_kv=64, kv_splits=2)),
      (1, 40, 130, 1, 128, 1, "bfloat16", None),
  )

  @pytest.fixture(autouse=True)
  def _needs_device(self):
    if not self.INTERPRET and _platform_kind() != "hopper":
      pytest.skip("compiled Mosaic GPU kernels need a Hopper GPU")

  @pytest.mark.parametrize("case", CASES, ids=str)
  def test_matches_float64(self, case):
    batch, q_len, kv_len, heads, head_dim, num_rows, dtype, tuning = case
    dtype = jnp.dtype(dtype)
    q, k, v, q_index = make_inputs(batch, q_len, kv_len, heads, head_dim,
                                   num_rows, dtype, seed=7)
    scale = head_dim ** -0.5
    if tuning is None:
      out, lse = pallas_kernels.sparse_attention(
          q, k, v, q_index, scale=scale, backend="mosaic_gpu",
          interpret=self.INTERPRET)
    else:
      out, lse = mosaic.sparse_attention_mosaic(
          q, k, v, q_index, scale=scale, tuning=tuning,
          interpret=self.INTERPRET)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert_close(out, lse, *naive_float64(q, k, v, q_index, scale), dtype)


class TestMosaicInterpret(MosaicKernelTest):
  INTERPRET = True


class TestMosaicCompiled(MosaicKernelTest):
  INTERPRET = False


def test_mosaic_refuses_what_it_cannot_run():
  """NotImplementedError (auto falls through) with the reason."""
  q, k, v, _ = make_inputs(1, 130, 130, 1, 72, None, jnp.bfloat16, seed=8)
  with pytest.raises(NotImplementedError, match="head_dim=72"):
    pallas_kernels.sparse_attention(q, k, v, backend="mosaic_gpu",
                                    interpret=True)
  q, k, v, _ = make_inputs(1, 130, 130, 1, 64, None, jnp.float32, seed=8)
  with pytest.raises(NotImplementedError, match="float32"):
    pallas_kernels.sparse_attention(q, k, v, backend="mosaic_gpu",
                                    interpret=True)
  q, k, v, _ = make_inputs(1, 130, 100, 1, 64, None, jnp.bfloat16, seed=8)
  with pytest.raises(NotImplementedError, match="shorter"):
    pallas_kernels.sparse_attention(q, k, v, backend="mosaic_gpu",
                                    interpret=True)
  with pytest.raises(NotImplementedError, match="positive"):
    triton.sparse_attention_triton(q, k, v, scale=-1.0, interpret=True)


def test_kv_splits_heuristic():
  # 312 CTAs on 132 SMs: 3 waves unsplit, 2.5 with 2 splits (Wan 480p, 10%).
  assert mosaic.choose_kv_splits(312, 256, 132) == 2
  # 3072 CTAs (dense): 24 waves vs 23.5 -- not worth a merge pass.
  assert mosaic.choose_kv_splits(3072, 256, 132) == 1
  # Too few key steps to split.
  assert mosaic.choose_kv_splits(12, 3, 132) == 1


# Errors ---------------------------------------------------------------------


def _valid(dtype=jnp.bfloat16):
  return make_inputs(2, 20, 18, 2, 64, 5, dtype, seed=9)


@pytest.mark.parametrize("mutate, message", [
    (lambda q, k, v, i: (q[0], k, v, i), "must be"),
    (lambda q, k, v, i: (q, k, v[:, :-1], i), "k and v shapes differ"),
    (lambda q, k, v, i: (q[:, :, :1], k, v, i), "disagree"),
    (lambda q, k, v, i: (q[..., :32], k, v, i), "disagree"),
    (lambda q, k, v, i: (q, k.astype(jnp.float16), v.astype(jnp.float16), i),
     "share a dtype"),
    (lambda q, k, v, i: tuple(x.astype(jnp.int32) for x in (q, k, v)) + (i,),
     "not supported"),
    (lambda q, k, v, i: (q[..., :12], k[..., :12], v[..., :12], i),
     "head_dim"),
    (lambda q, k, v, i: (q, k, v, i[:1]), "q_index must be"),
    (lambda q, k, v, i: (q, k, v, i[:, :0]), "selects no rows"),
    (lambda q, k, v, i: (q, k, v, i.astype(jnp.float32)), "integer"),
    (lambda q, k, v, i: (q, k, v, i.at[1, 4].set(20)), "out of range"),
    (lambda q, k, v, i: (q, k, v, i.at[0, 0].set(-1)), "out of range"),
    (lambda q, k, v, i: (q, k, v, i[:, ::-1]), "sorted and unique"),
    (lambda q, k, v, i: (q, k, v, i.at[1, 1].set(i[1, 0])),
     "sorted and unique"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_invalid_input_raises(mutate, message):
  args = mutate(*_valid())
  with pytest.raises(ValueError, match=message):
    pallas_kernels.sparse_attention(*args)


def test_unknown_backend_and_bad_scale():
  q, k, v, i = _valid()
  with pytest.raises(ValueError, match="unknown backend"):
    pallas_kernels.sparse_attention(q, k, v, i, backend="flash")
  with pytest.raises(ValueError, match="finite"):
    pallas_kernels.sparse_attention(q, k, v, i, scale=float("nan"))


# Backend choice -------------------------------------------------------------


def test_backend_order():
  select = pallas_kernels.select_backends
  wan = (1, 32760, 12, 128)
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert select(wan, 32760, 3276, bf16, device="cpu") == ("xla",)
  assert select(wan, 32760, 3276, bf16, device="hopper") == (
      "mosaic_gpu", "cudnn", "triton", "xla")
  # Text cross-attention (512 keys): cuDNN first on Hopper.
  assert select(wan, 512, 3276, bf16, device="hopper")[0] == "cudnn"
  # OpenSora: D=72 spatial -> cuDNN; 15-frame temporal -> Triton.
  assert select((30, 1590, 16, 72), 1590, 1590, bf16, device="hopper") == (
      "cudnn", "triton", "xla")
  assert select((3180, 15, 16, 72), 15, 15, bf16, device="hopper") == (
      "triton", "xla")
  assert select(wan, 32760, 3276, f32, device="hopper") == ("triton", "xla")
  assert select(wan, 32760, 3276, bf16, device="gpu") == (
      "triton", "cudnn", "xla")
  for device in ("cpu", "gpu", "hopper"):
    assert select(wan, 32760, 100, bf16, device=device)[-1] == "xla"


def test_auto_on_cpu_is_the_reference():
  q, k, v, i = _valid(jnp.float32)
  auto = pallas_kernels.sparse_attention(q, k, v, i)
  ref = pallas_kernels.sparse_attention_reference(q, k, v, i)
  for a, b in zip(auto, ref):
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(_platform_kind() != "cpu", reason="checks the CPU path")
def test_gpu_backends_refuse_on_cpu():
  q, k, v, i = _valid()
  for backend in ("mosaic_gpu", "triton", "cudnn"):
    with pytest.raises(NotImplementedError):
      pallas_kernels.sparse_attention(q, k, v, i, backend=backend)
