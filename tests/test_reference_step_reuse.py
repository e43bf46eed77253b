"""EasyCache and MagCache against NumPy references written from their papers.

tests/reference_step_reuse.py states both rules and cites the papers
(EasyCache: Zhou et al. 2025, arXiv 2507.02860, transformation rate and
accumulated estimate against tau; MagCache: Ma et al. 2025, arXiv
2506.09045, accumulated magnitude-ratio error against delta with at most K
skips). First each decision rule alone, driven by the same per-step
measurements (EasyCache: given inputs and model outputs per step; MagCache:
given ratio curves); then a tiny random Wan sampled 8 CFG Euler steps by the
library's policy and by a reference loop driven by the reference's own
decisions: the decisions must agree exactly and the latents to <= 1e-5 x
max|ref| (float32 against float64, the same math; measured ~1e-6).
"""

import numpy as np
import pytest

import _method_adapter as lib
import reference_step_reuse as rr

TOL = 1e-5
RUN = dict(steps=8, shift=3.0, guidance=5.0)


rel = lib.rel


@pytest.fixture(scope="module")
def setup():
  return lib.policy_case()


# Decision rules on given measurements ----------------------------------------


def test_magcache_rule_on_a_worked_curve():
  """delta 0.3, K 2, one retained step, worked by hand: errors .1, .29
  (skip twice), .561 (compute at 3); .1, .18 (skip 4, 5); 6 would be the
  third skip (compute); 7: error 0 (skip)."""
  ratios = [1.0, 0.9, 0.9, 0.9, 0.9, 1.2, 1.0, 1.0]
  want = [True, False, False, True, False, False, True, False]
  assert rr.magcache_skips(ratios, 0.3, 2, 1) == want
  assert lib.magcache_decisions(ratios, 0.3, 2, 0.1) == want  # floor(.8)->1


@pytest.mark.parametrize("seed", range(4))
def test_magcache_rule_matches_the_reference(seed):
  rng = np.random.default_rng(seed)
  steps = 20
  ratios = [1.0] + list(1.0 + 0.08 * rng.standard_normal(steps - 1))
  mixed = 0
  for delta in (0.02, 0.1, 0.3):
    for k in (1, 2, 4):
      for retention in (0.0, 0.2):
        retained = max(1, int(np.floor(retention * steps)))
        want = rr.magcache_skips(ratios, delta, k, retained)
        assert lib.magcache_decisions(ratios, delta, k, retention) == want
        mixed += 0 < sum(want) < steps
  assert mixed >= 10   # the rule is exercised, not all-compute


def test_easycache_rule_on_given_measurements():
  """The library's plans, run on given per-step inputs with a stand-in
  model whose outputs are given, against the reference rule."""
  rng = np.random.default_rng(0)
  steps, shape = 10, (4, 3, 5)
  x = np.cumsum(0.3 * rng.standard_normal((steps,) + shape), axis=0)
  inputs = np.stack([x, x], axis=1)                      # (S, 2B, ...)
  outputs = np.cumsum(rng.standard_normal((steps, 2) + shape), axis=0)
  # Estimates run ~0.3-0.8 a step here: every tau below mixes decisions.
  for tau, warmup in ((1.0, 0.2), (2.0, 0.2), (3.0, 0.3)):
    got, computed, eps = lib.easycache_drive(inputs, outputs, tau, warmup)
    rule = rr.EasyCacheRule(steps=steps, tau=tau,
                            warmup=int(np.floor(warmup * steps)))
    want = [rule.step(i, inputs[i], lambda i=i: outputs[i])
            for i in range(steps)]
    assert computed == [w[1] for w in want], tau
    assert 0 < steps - sum(computed) < steps - 3, (tau, computed)  # mixed
    np.testing.assert_allclose(eps, [w[2] for w in want], rtol=1e-5,
                               atol=1e-7)
    assert rel(got, np.stack([w[0] for w in want])) <= TOL


# Sampling --------------------------------------------------------------------


def test_easycache_sampling(setup):
  split, ref, noise, ctx, neg, ctx2b = setup
  tau, warmup = 0.8, 0.25                                # warm-up: 2 steps
  got, carry, stats = lib.policy_sample(split, noise, ctx, neg,
                                        lib.easycache(tau, warmup), **RUN)
  want, computed, eps = rr.easycache_sample(
      ref, noise, ctx2b, tau=tau, warmup=2, out_channels=16, **RUN)
  assert [bool(c) for c in carry["computed"]] == computed
  assert 0 < RUN["steps"] - sum(computed) < RUN["steps"] - 3, computed
  np.testing.assert_allclose(carry["estimates"], eps, rtol=1e-4, atol=1e-7)
  # The host-side statement of the rule replays the in-graph decisions.
  assert lib.easycache_decisions(carry["estimates"], tau, 2) == computed
  assert rel(got, want) <= TOL
  assert stats.cost_keys == ["dense" if c else "easycache:reused"
                             for c in computed]


def test_magcache_calibration_and_sampling(setup):
  split, ref, noise, ctx, neg, ctx2b = setup
  thresh, k, retention = 0.25, 2, 0.25                   # retained: 2 steps
  ratios, policy = lib.magcache_calibrate(
      split, noise, ctx, neg, lib.magcache(thresh, k, retention), **RUN)
  want_ratios = rr.magcache_calibrate(ref, noise, ctx2b, out_channels=16,
                                      **RUN)
  np.testing.assert_allclose(ratios, want_ratios, rtol=1e-5)
  computed = rr.magcache_skips(want_ratios, thresh, k, 2)
  assert 0 < RUN["steps"] - sum(computed) < RUN["steps"] - 2, computed
  got, _, stats = lib.policy_sample(split, noise, ctx, neg, policy, **RUN)
  assert stats.cost_keys == ["dense" if c else "magcache:reused"
                             for c in computed]
  want = rr.magcache_sample(ref, noise, ctx2b, computed=computed,
                            out_channels=16, **RUN)
  assert rel(got, want) <= TOL
