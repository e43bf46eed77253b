"""The baselines' rules against NumPy references written from their papers.

tests/reference_policies.py states each rule and cites its paper: ToCa's
token score and reuse (Zou et al. 2024, arXiv 2410.05317: importance +
weighted cache frequency), PAB's broadcast ranges (Zhao et al. 2024, arXiv
2408.12588) and TeaCache-style step caching's skip rule (Liu et al. 2024,
arXiv 2411.19108: accumulated relative L1 change of the timestep-modulated
input against a threshold). Equation numbers are not quoted: the papers'
text is not in ../shared/seeds, so each docstring names the section's rule
instead. Each test samples 6 CFG Euler steps of a tiny random Wan with the
library's policy and with the reference, and compares the final latents
(<= 1e-5 x max|ref|, float32 vs float64 over 6 steps; measured ~1e-6)
and the rule's decisions exactly.
"""

import numpy as np
import pytest

import _method_adapter as lib
import reference_policies as rp
import reference_wan

TOL = 1e-5
RUN = dict(steps=6, shift=3.0, guidance=5.0)


rel = lib.rel


@pytest.fixture(scope="module")
def setup():
  return lib.policy_case()


def test_euler_schedule_is_diffusers_flow_match():
  """The samplers below share this schedule; it must be the library's."""
  ts, dt = reference_wan.euler_schedule(6, 3.0)
  lib_ts, lib_dt = lib.euler_timesteps(6, 3.0)
  np.testing.assert_allclose(lib_ts, ts, rtol=1e-6)
  np.testing.assert_allclose(lib_dt, dt, rtol=1e-6)


def test_toca_reuse_rule(setup):
  split, ref, noise, ctx, neg, ctx2b = setup
  got, carry, stats = lib.policy_sample(split, noise, ctx, neg,
                                        lib.toca(3, 0.5), **RUN)
  want, cache = rp.toca_sample(ref, noise, ctx2b, interval=3, ratio=0.5,
                               out_channels=16, **RUN)
  assert rel(got, want) <= TOL
  for name in ("update", "lse"):  # lse slot: cross-attention entropy
    assert rel(carry["cache"][name], cache[name]) <= TOL, name
  np.testing.assert_array_equal(carry["cache"]["stale"], cache["stale"])
  # The last step (5) is sparse: 16 of 32 tokens per block were computed.
  assert (cache["stale"] == 0).sum(-1).tolist() == [[16, 16]] * 2


def test_pab_broadcast_ranges(setup):
  split, ref, noise, ctx, neg, ctx2b = setup
  policy = lib.pab(2, 3, (100.0, 950.0))
  got, _, _ = lib.policy_sample(split, noise, ctx, neg, policy, **RUN)
  want, plan = rp.pab_sample(ref, noise, ctx2b, self_range=2, cross_range=3,
                             window=(100.0, 950.0), out_channels=16, **RUN)
  ts, _ = reference_wan.euler_schedule(RUN["steps"], RUN["shift"])
  assert lib.pab_plans(policy, ts) == plan
  # Window = steps 1..4 (t = 923 .. 432): self reused at 2 and 4, cross
  # at 2 and 3; the rule is exercised on both attentions.
  assert plan == [(False, False), (False, False), (True, True),
                  (False, True), (True, False), (False, False)]
  assert rel(got, want) <= TOL


def test_step_cache_skip_rule(setup):
  split, ref, noise, ctx, neg, ctx2b = setup
  threshold = 0.5
  got, carry, stats = lib.policy_sample(split, noise, ctx, neg,
                                        lib.step_cache(threshold), **RUN)
  want, computed, changes = rp.step_cache_sample(
      ref, noise, ctx2b, threshold=threshold, out_channels=16, **RUN)
  np.testing.assert_array_equal(carry["computed"], computed)
  assert 0 < sum(computed[1:-1]) < RUN["steps"] - 2, computed  # mixed
  np.testing.assert_allclose(carry["changes"][1:], changes[1:], rtol=1e-5)
  assert rel(got, want) <= TOL
