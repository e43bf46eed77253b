"""Re-check the COMPILED attention kernels against a float64 reference.

The CPU tests run the Pallas kernels in interpret mode, where the Mosaic
kernel's tensor-core matmuls, layout casts and approximate math are plain
float32 dots; the compiled kernel had been checked only inside one GPU
benchmark run, on an older source. This script runs every backend of
`pallas_kernels.sparse_attention` compiled (mosaic_gpu on Hopper, triton,
cudnn, xla) at several shapes, dtypes and row subsets, compares `out` and
`lse` with a float64 NumPy reference written here, and writes its own JSON
(measured: one run of exactly these checks) with the source's commit, diff
hash and the kernels' source hash, so a kernel change is re-checked on its
final source.

  python benchmarks/kernel_check.py                 # GPU: the full shapes
  python benchmarks/kernel_check.py --small         # CPU: tiny shapes, the
                                                    # Pallas kernels in
                                                    # interpret mode

Tolerances (tests/test_sparse_attention.py): relative L2 error of out
1e-5 (float32), 2e-3 (float16), 1e-2 (bfloat16); LSE absolute 1e-4.
A backend that cannot run a case (wrong GPU, unsupported dtype) records
the error and counts as not run, never as passed. Exit status 1 if any
run case fails its tolerance.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import kinds  # noqa: E402
import pallas_kernels  # noqa: E402
from astraea_jax import provenance  # noqa: E402

TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
LSE_ATOL = 1e-4

# (name, B, Lq, Lk, H, D, rows kept (None = dense), dtype)
FULL_CASES = [
    ("wan1.3b_480p_dense", 1, 32760, 32760, 12, 128, None, "bfloat16"),
    ("wan1.3b_480p_keep0.4", 1, 32760, 32760, 12, 128, 13104, "bfloat16"),
    ("wan1.3b_480p_keep0.1_fp16", 1, 32760, 32760, 12, 128, 3276, "float16"),
    ("cfg2_odd_len", 2, 8191, 8191, 12, 128, 4095, "bfloat16"),
    ("cross_512", 1, 32760, 512, 12, 128, 13104, "bfloat16"),
    ("opensora_spatial_d72", 30, 1590, 1590, 16, 72, 636, "bfloat16"),
    ("opensora_temporal", 3180, 15, 15, 16, 72, None, "bfloat16"),
    ("k1_short_kv", 1, 257, 130, 2, 128, 1, "bfloat16"),
    ("fp32_small", 1, 1000, 1000, 4, 64, 333, "float32"),
]
SMALL_CASES = [
    ("small_dense", 1, 128, 200, 1, 64, None, "bfloat16"),
    ("small_rows_fp16", 1, 300, 203, 1, 64, 77, "float16"),
    ("small_k1_d128", 1, 40, 130, 1, 128, 1, "bfloat16"),
    ("small_fp32_two_heads", 2, 64, 96, 2, 64, 20, "float32"),
]


MAX_CHECKED_ROWS = 512  # per batch element: keeps the float64 reference
MAX_CHECKED_BATCH = 64  # of a 32k x 32k case to ~1 minute on the host


def reference(q, k, v, rows, scale):
  """float64 out (B, R, H, D) and lse (B, H, R) of the given rows (B, R),
  chunked over rows."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b = q.shape[0]
  outs, lses = [], []
  for i in range(b):
    qi = q[i, rows[i]]
    out = np.empty_like(qi)
    lse = np.empty((q.shape[2], len(rows[i])))
    for s in range(0, len(rows[i]), 512):
      logits = np.einsum("qhd,khd->hqk", qi[s:s + 512], k[i]) * scale
      m = logits.max(-1, keepdims=True)
      w = np.exp(logits - m)
      z = w.sum(-1, keepdims=True)
      lse[:, s:s + 512] = (np.log(z) + m)[..., 0]
      out[s:s + 512] = np.einsum("hqk,khd->qhd", w / z, v[i])
    outs.append(out)
    lses.append(lse)
  return np.stack(outs), np.stack(lses)


def inputs(case, seed):
  _, b, lq, lk, h, d, keep, dtype = case
  rng = np.random.default_rng(seed)
  def normal(length):
    return jnp.asarray(rng.standard_normal((b, length, h, d)),
                       jnp.float32).astype(dtype)
  q, k, v = normal(lq), normal(lk), normal(lk)
  rows = None if keep is None else np.stack(
      [np.sort(rng.choice(lq, keep, replace=False)) for _ in range(b)])
  return q, k, v, rows


def kernel_source_sha256():
  digest = hashlib.sha256()
  for path in sorted((REPO / "pallas_kernels").glob("*.py")):
    digest.update(path.read_bytes())
  return digest.hexdigest()


_REFERENCES = {}


def check(backend, case, interpret, seed=0):
  name, *_, dtype = case
  q, k, v, rows = inputs(case, seed)
  scale = q.shape[-1] ** -0.5
  row = {"case": name, "backend": backend, "dtype": dtype,
         "shape": list(case[1:7]), "interpret": interpret}
  try:
    t0 = time.perf_counter()
    out, lse = pallas_kernels.sparse_attention(
        q, k, v, None if rows is None else jnp.asarray(rows, jnp.int32),
        scale=scale, backend=backend, interpret=interpret)
    out, lse = jax.block_until_ready((out, lse))
    row["first_call_s"] = time.perf_counter() - t0
  except Exception as e:  # noqa: BLE001  (recorded, counted as not run)
    row.update(status="not_run", error=repr(e)[:500])
    return row
  # Compare on a deterministic sample of the computed rows (all of them
  # for the small cases): batch elements up to MAX_CHECKED_BATCH, rows up
  # to MAX_CHECKED_ROWS of each.
  computed = (np.broadcast_to(np.arange(q.shape[1]), (q.shape[0], q.shape[1]))
              if rows is None else rows)
  pick_rng = np.random.default_rng(1)
  nb = min(q.shape[0], MAX_CHECKED_BATCH)
  batches = np.sort(pick_rng.choice(q.shape[0], nb, replace=False))
  nr = computed.shape[1]
  pos = (np.arange(nr) if nr <= MAX_CHECKED_ROWS else
         np.sort(pick_rng.choice(nr, MAX_CHECKED_ROWS, replace=False)))
  key = (name, seed)  # the same inputs for every backend: one reference
  if key not in _REFERENCES:
    _REFERENCES[key] = reference(q[batches], k[batches], v[batches],
                                 computed[batches][:, pos], scale)
  want_out, want_lse = _REFERENCES[key]
  got = np.asarray(out, np.float64)[batches][:, pos]
  lse = np.asarray(lse, np.float64)[batches][:, :, pos]
  row["rows_checked"] = [int(nb), int(len(pos))]
  err = float(np.linalg.norm(got - want_out) / np.linalg.norm(want_out))
  lse_err = float(np.abs(lse - want_lse).max())
  ok = err <= TOL[dtype] and lse_err <= LSE_ATOL and np.isfinite(got).all()
  row.update(status="pass" if ok else "FAIL", rel_l2_err_out=err,
             max_abs_err_lse=lse_err, tolerance_out=TOL[dtype],
             tolerance_lse=LSE_ATOL)
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="tiny shapes; on CPU the Pallas kernels run in "
                           "interpret mode; writes to a temp folder unless "
                           "--out is given")
  parser.add_argument("--backends", nargs="+",
                      default=list(pallas_kernels.BACKENDS))
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  on_gpu = jax.devices()[0].platform == "gpu"
  interpret = not on_gpu
  cases = SMALL_CASES if args.small else FULL_CASES
  if not on_gpu and not args.small:
    parser.error("the full shapes need a GPU; use --small on CPU")
  rows = []
  for case in cases:
    for backend in args.backends:
      kernel = backend in ("mosaic_gpu", "triton")
      row = check(backend, case, interpret=interpret and kernel)
      rows.append(row)
      print(json.dumps(row), flush=True)
  env = provenance.environment()
  tag = env["device"].lower().replace(" ", "_")
  out = pathlib.Path(args.out) if args.out else (
      pathlib.Path(tempfile.mkdtemp(prefix="kernel_check_")) / "check.json"
      if args.small else REPO / "benchmarks" / "results"
      / f"kernel_check_{tag}.json")
  failed = [r for r in rows if r["status"] == "FAIL"]
  ran = [r for r in rows if r["status"] != "not_run"]
  doc = {"benchmark": "kernel_check", **env,
         "kernel_source_sha256": kernel_source_sha256(),
         "settings": {"small": args.small, "backends": args.backends,
                      "tolerance_out_rel_l2": TOL,
                      "tolerance_lse_abs": LSE_ATOL},
         "rows": rows,
         "targets": [{"name": "compiled_kernel_cases_failing",
                      "value": len(failed), "op": "==", "target": 0,
                      "cases_run": len(ran)}]}
  doc = kinds.label(doc)  # the one rule per benchmark (benchmarks/kinds.py)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(doc, indent=2) + "\n")
  print(f"wrote {out}: {len(ran)} cases run, {len(failed)} failed, "
        f"{len(rows) - len(ran)} not run")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
