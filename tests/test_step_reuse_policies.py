"""EasyCache and MagCache as policies: no acceleration is the dense sampler,
specs and the 'frontier' sweep, MagCache's calibration inside `astraea
eval`. (Their rules against NumPy references: test_reference_step_reuse.)

The tiny random Wan and shapes of tests/test_policies.py (72 tokens, 4
UniPC steps), so the dense step compiles once for both modules.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astraea_jax import evaluation, testing
from astraea_jax.astraea import policies as P
from astraea_jax.astraea import policy_specs as specs
from astraea_jax.configs import WanConfig
from astraea_jax.sampling import sampler as dense

CONFIG = WanConfig.tiny(num_layers=2, dim=64, ffn_dim=96, num_heads=2,
                        text_dim=24, text_len=8, freq_dim=16)
SHAPE = (1, 16, 2, 12, 12)
STEPS = 4
KW = {"steps": STEPS, "shift": 3.0, "progress": False}


@pytest.fixture(scope="module")
def model():
  return testing.random_wan(CONFIG, seed=5)


@pytest.fixture(scope="module")
def inputs():
  noise = dense.draw_noise(jax.random.key(0), SHAPE)
  ctx = jax.random.normal(jax.random.key(1), (1, 6, CONFIG.text_dim))
  neg = jnp.zeros((1, 1, CONFIG.text_dim))
  return noise, ctx, neg


def rel_err(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def test_no_acceleration_is_the_dense_sampler(model, inputs):
  """tau 0 / delta 0 run every step through the policies' own paths
  (lax.cond, residual cache); the same float32 ops as the dense sampler."""
  reference = dense.sample(*model, *inputs, **KW)
  magcache = P.MagCache(thresh=0.0).calibrate(*model, *inputs, **KW)
  assert len(magcache.ratios) == STEPS and magcache.ratios[0] == 1.0
  assert all(0.2 < r < 5.0 for r in magcache.ratios)
  for policy in (P.EasyCache(tau=0.0), magcache):
    out, stats = P.sample(*model, *inputs, policy=policy, return_stats=True,
                          **KW)
    assert rel_err(out, reference) <= 1e-6, policy.label()
    assert stats.cost_keys == ["dense"] * STEPS
    assert stats.computed_fraction == 1.0
  # A huge tau reuses every step it may: the first computes, the second
  # too (no rate without two computed steps), then the last.
  out, stats = P.sample(*model, *inputs, return_stats=True, policy=P.EasyCache(
      tau=1e9, warmup=0.0), **KW)
  assert stats.cost_keys == ["dense", "dense", "easycache:reused", "dense"]
  assert stats.computed_fraction == 0.75
  assert rel_err(out, reference) > 1e-4


def test_specs_and_the_frontier_sweep():
  assert specs.parse_policy("easycache:tau=0.05") == P.EasyCache(tau=0.05)
  assert specs.parse_policy("easycache:tau=0.1,warmup=0.2") == P.EasyCache(
      0.1, 0.2)
  m = specs.parse_policy("magcache:thresh=0.15,K=1,ratios=1/0.9/1.1")
  assert m == P.MagCache(thresh=0.15, max_skip=1, ratios=(1.0, 0.9, 1.1))
  assert m.label() == "magcache thresh=0.15 K=1"
  # Errors .1, then .1 + |1 - .99| = .11 < .15, but a second skip > K.
  assert m.decisions(3) == [True, False, True]
  assert P.MagCache(0.15, 2, ratios=m.ratios).decisions(3) == [True, False,
                                                              False]
  with pytest.raises(ValueError, match="calibrate it first"):
    P.MagCache().plans(np.zeros(4), 8)
  with pytest.raises(ValueError, match="3 values for 4 steps"):
    m.plans(np.zeros(4), 8)
  with pytest.raises(ValueError, match="no setting 'taux'"):
    specs.parse_policy("easycache:taux=0.1")
  frontier = evaluation.resolve_policies(["frontier"])
  assert {p.family for p in frontier} == {"easycache", "magcache"}
  assert len(frontier) == len(specs.EASYCACHE_TAUS) + len(
      specs.MAGCACHE_SETTINGS)
  labels = [p.label() for p in specs.default_sweep() + frontier]
  assert len(labels) == len(set(labels))


def test_eval_calibrates_magcache_and_prices_reused_steps(model, tmp_path):
  graphdef, params = model
  base = evaluation.random_problem(
      CONFIG, SHAPE, num_prompts=1, seeds=(0,),
      config=evaluation.EvalConfig(steps=STEPS, shift=3.0))
  problem = evaluation.Problem("tiny", graphdef, params, base.samples,
                               config=base.config)
  policies = [P.EasyCache(tau=1e9, warmup=0.0),
              P.MagCache(thresh=1e9, max_skip=1, retention=0.0)]
  speed = tmp_path / "speed.json"
  speed.write_text(json.dumps({"rows": [
      {"kind": "step_config", "cost_key": "dense", "ms_per_step": 100.0},
      {"kind": "step_config", "cost_key": "step_cache:reused",
       "ms_per_step": 4.0}]}))
  rows, _ = evaluation.run(problem, policies, tmp_path / "out",
                           speed_json=speed, progress=False)
  easy, mag = rows
  # EasyCache: dense, dense, reused (priced 0), dense.
  assert easy["speedup_h200"] == pytest.approx(400 / 300)
  # MagCache, K = 1 and one retained step: dense, reused, dense, reused;
  # its reused step priced as step caching's (an upper bound).
  assert mag["speedup_h200"] == pytest.approx(400 / 208)
  assert mag["computed_fraction"] == 0.5
  for r in rows:
    assert np.isfinite(r["psnr"]) and r["family"] in (
        evaluation.BASELINE_FAMILIES)
  # The report keeps the calibrated curve (it fixes MagCache's decisions).
  doc = json.loads((tmp_path / "out" / "eval.json").read_text())
  ratios = [r for r in doc["rows"] if r["family"] == "magcache"][0][
      "settings"]["ratios"]
  assert len(ratios) == STEPS and ratios[0] == 1.0
