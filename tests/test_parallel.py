"""Sequence parallelism: layout, plans, LSE merging; multi-device parity.

The multi-device cases need fake CPU devices, which must be configured
before JAX starts; this pytest process has already started JAX with one
device, so they run in subprocesses:
  * tests/_parallel_cases.py under pytest with 4 devices (meshes over 2, 3
    and 4 of them): sharded forward and samplers vs one device;
  * tests/_parallel_worker.py twice: a 2-process runtime (localhost
    coordinator on a free port, loopback only), compared here with the
    single-process result.
"""

import os
import pathlib
import socket
import subprocess
import sys

import _parallel_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astraea_jax import parallel, testing
from astraea_jax.models import layers
from astraea_jax.sampling import sampler as dense

TESTS = pathlib.Path(__file__).resolve().parent
TIMEOUT_S = 600


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + f" --xla_force_host_platform_device_count={devices}")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(testing.REPO_ROOT), str(TESTS), env.get("PYTHONPATH", "")])
  return env


# Layout ----------------------------------------------------------------------


@pytest.mark.parametrize("n,p", [(35, 4), (36, 4), (35, 3), (7, 7), (32760, 8),
                                 (32760, 16)])
def test_layout_splits_contiguously_like_array_split(n, p):
  layout = parallel.TokenLayout(n, p)
  parts = np.array_split(np.arange(n), p)
  np.testing.assert_array_equal(layout.counts(), [len(x) for x in parts])
  np.testing.assert_array_equal(layout.starts(), [x[0] for x in parts])
  rows = layout.slot_tokens().reshape(p, layout.slots)
  valid = layout.slot_valid().reshape(p, layout.slots)
  for i, part in enumerate(parts):
    np.testing.assert_array_equal(rows[i][valid[i]], part)
    assert valid[i].sum() == len(part)
    assert valid[i][:len(part)].all()  # a pad row only at the end
  assert layout.slots == -(-n // p)
  assert layout.padded == bool(n % p)
  x = jnp.arange(3 * n).reshape(1, n, 3)
  np.testing.assert_array_equal(layout.unshard(layout.shard(x)), x)


def test_layout_local_valid_marks_the_pad_row():
  layout = parallel.TokenLayout(35, 4)  # 9, 9, 9, 8 tokens in 9 rows
  assert [bool(layout.local_valid(jnp.int32(s))[-1]) for s in range(4)] == [
      True, True, True, False]


def test_layout_needs_a_token_per_shard():
  with pytest.raises(ValueError, match="num_tokens=3 .* num_shards=4"):
    parallel.TokenLayout(3, 4)


# Plans ----------------------------------------------------------------------


@pytest.mark.parametrize("heads,shards,want", [
    (12, 2, (2, 1)), (12, 4, (4, 1)), (12, 8, (4, 2)), (40, 8, (8, 1)),
    (12, 5, (1, 5)), (6, 4, (2, 2)), (16, 1, (1, 1))])
def test_auto_plan_takes_the_largest_ulysses_group(heads, shards, want):
  plan = parallel.plan_attention("auto", heads, shards)
  assert (plan.ulysses, plan.ring) == want


def test_forced_plans():
  assert parallel.plan_attention("ring", 12, 8) == parallel.AttentionPlan(1, 8)
  assert parallel.plan_attention("ulysses", 12, 6) == parallel.AttentionPlan(
      6, 1)
  assert parallel.plan_attention("hybrid", 12, 8, ulysses=2).ring == 4
  with pytest.raises(ValueError, match="num_heads=12 .* num_shards=8"):
    parallel.plan_attention("ulysses", 12, 8)
  with pytest.raises(ValueError, match="ulysses=3"):
    parallel.plan_attention("hybrid", 12, 8, ulysses=3)
  with pytest.raises(ValueError, match="unknown strategy"):
    parallel.plan_attention("tree", 12, 8)


# LSE merging -----------------------------------------------------------------


def test_merging_chunks_equals_attention_over_all_keys():
  """out = sum_i e^(lse_i - lse) out_i, lse = logsumexp_i lse_i, with a
  masked part (lse = -inf) contributing nothing."""
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (2, 5, 3, 8))
  k = 2.0 * jax.random.normal(kk, (2, 23, 3, 8))
  v = jax.random.normal(kv, (2, 23, 3, 8))
  want, want_lse = layers.attention(q, k, v)
  parts = [layers.attention(q, k[:, a:b], v[:, a:b])
           for a, b in [(0, 7), (7, 8), (8, 23)]]
  out, lse = parallel.merge_attention([p[0] for p in parts],
                                      [p[1] for p in parts])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-6)
  acc = parts[0]
  for o, l in parts[1:]:
    acc = parallel.merge_partials(*acc, o, l)
  np.testing.assert_allclose(acc[0], want, rtol=1e-5, atol=1e-6)
  garbage = layers.attention(q, 3.0 * k[:, :4], v[:, :4] + 9.0)
  masked = parallel.merge_partials(*acc, garbage[0],
                                   jnp.full_like(garbage[1], -jnp.inf))
  np.testing.assert_allclose(masked[0], acc[0], rtol=1e-6)
  np.testing.assert_allclose(masked[1], acc[1], rtol=1e-6)


# Astraea's per-shard budget --------------------------------------------------


def test_local_budget_and_per_shard_selection():
  layout = parallel.TokenLayout(35, 4)  # shards of 9, 9, 9, 8 tokens
  assert parallel.local_num_selected(35, layout) == layout.slots
  assert parallel.local_num_selected(0, layout) == 0
  assert parallel.local_num_selected(14, layout) == 4  # round(3.5) up
  assert parallel.local_num_selected(1, layout) == 1
  assert parallel.local_num_selected(34, layout) == 8  # shortest shard
  with pytest.raises(ValueError, match="num_selected=36"):
    parallel.local_num_selected(36, layout)
  scores = jax.random.normal(jax.random.key(3), (2, 35))
  idx = np.asarray(parallel.select_tokens_per_shard(scores, 3, layout))
  for b in range(2):
    want = []
    for start, count in zip(layout.starts(), layout.counts()):
      local = np.asarray(scores[b, start:start + count])
      want += list(start + np.argsort(-local, kind="stable")[:3])
    np.testing.assert_array_equal(idx[b], sorted(want))


# Meshes ---------------------------------------------------------------------


def test_make_mesh_shapes_and_errors():
  mesh = parallel.make_mesh(1)
  assert tuple(mesh.axis_names) == ("data", "seq")
  assert mesh.devices.shape == (1, 1)
  with pytest.raises(ValueError, match="num_devices=64 devices asked for"):
    parallel.make_mesh(64)
  with pytest.raises(ValueError, match="num_devices = seq \\* data"):
    parallel.make_mesh(4, seq=3)
  assert parallel.default_mesh_shape(8, 2) == (2, 4)
  assert parallel.default_mesh_shape(3, 2) == (1, 3)


# Multi-device and multi-process runs (subprocesses) --------------------------


def test_multi_device_cases():
  """tests/_parallel_cases.py with 4 fake CPU devices (see its docstring)."""
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       str(TESTS / "_parallel_cases.py")],
      env=_env(4), cwd=testing.REPO_ROOT, capture_output=True, text=True,
      timeout=TIMEOUT_S, check=False)
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  assert " passed" in proc.stdout and "skipped" not in proc.stdout


def _free_loopback_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
  port = _free_loopback_port()
  procs = [subprocess.Popen(
      [sys.executable, str(TESTS / "_parallel_worker.py"), str(i), str(port),
       str(tmp_path)], env=_env(2), cwd=testing.REPO_ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-6000:]
  got = [np.load(tmp_path / f"process_{i}.npz")["latents"] for i in range(2)]
  np.testing.assert_array_equal(got[0], got[1])  # replicated on both
  split_model = ref.random_model()
  schedule = list(ref.MULTIPROCESS_SCHEDULE)
  want = ref.reference_astraea_sample(*split_model, *ref.inputs(),
                                      schedule=schedule, num_shards=4)
  assert ref.rel_err(got[0], want) <= 1e-5
  dense_want = dense.sample(*split_model, *ref.inputs(), steps=len(schedule),
                            shift=3.0, progress=False)
  assert ref.rel_err(got[0], dense_want) > 1e-3  # the sparse step acted
