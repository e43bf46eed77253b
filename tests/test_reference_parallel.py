"""Sequence-parallel Astraea against a NumPy reference of per-shard selection.

DESIGN.md ("Multi-GPU with selection"; parallel/layout.py and
parallel/sequence_parallel.py document the rule): the N tokens are split
over the P sequence shards contiguously, as np.array_split splits them;
at a budget of K tokens (0 < K < N) every shard computes its own
round(K / P) best tokens (half up, at least 1, at most the shortest
shard's count, so shapes agree on every device) by Astraea's score; K = N computes all, K = 0 reuses all.
Attention rows stay exact (keys/values of all N tokens across shards).

The library runs over 4 fake CPU devices in a subprocess
(tests/_reference_parallel_case.py; one process cannot change its device
count), on 27 tokens (shards of 7, 7, 7, 6: one pad row), with Ulysses
pairs and a ring of 2 (2 heads over 4 shards). The reference is
reference_wan's Astraea step with `per_shard_top_k` in place of the global
top-K. Tolerance: <= 1e-5 x max|ref| (float32 vs float64; the
all-to-all and ring merge change the summation order only); selections
and stale counters equal.
"""

import os
import subprocess
import sys

import numpy as np

import _method_adapter as lib
import _reference_parallel_case as case
import reference_wan

TESTS = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-5


def rel(a, b):
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def local_k(k, n, p):
  if k in (0, n):
    return k
  return int(min(max(1, np.floor(k / p + 0.5)), n // p))


def test_sequence_parallel_astraea_equals_per_shard_reference(tmp_path):
  out = tmp_path / "lib.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + f" --xla_force_host_platform_device_count={case.DEVICES}",
             PYTHONPATH=os.pathsep.join([os.path.dirname(TESTS), TESTS,
                                         os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, os.path.join(
      TESTS, "_reference_parallel_case.py"), str(out)], env=env,
                        capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  got = np.load(out)

  split, kw = lib.wan_model(seed=9, **case.WAN)
  ref = reference_wan.WanRef(lib.flat_params(split[1]), **kw)
  latents, timesteps, ctx2b, ks = case.inputs()
  n, p = 27, case.DEVICES
  cache = reference_wan.empty_cache(2, 2, n, case.WAN["dim"])
  sparse_seen = 0
  for i, k in enumerate(ks):
    kl = local_k(k, n, p)
    choose = lambda score, _, kl=kl: reference_wan.per_shard_top_k(score,
                                                                  kl, p)
    want, chosen = reference_wan.astraea_forward(
        ref, latents[i], timesteps[i], ctx2b, cache, k, 16, choose=choose)
    where = f"evaluation {i}, K={k}"
    assert rel(got[f"v{i}"], want) <= TOL, where
    for name in ("update", "input", "lse"):
      assert rel(got[f"{name}{i}"], cache[name]) <= TOL, (where, name)
    np.testing.assert_array_equal(got[f"stale{i}"], cache["stale"],
                                  err_msg=where)
    if 0 < k < n:
      sparse_seen += 1
      for layer in range(2):
        for b in range(2):
          rows = chosen[layer][b]
          assert len(rows) == p * kl
          np.testing.assert_array_equal(
              np.flatnonzero(got[f"stale{i}"][layer, b] == 0), rows, where)
  assert sparse_seen == 3
