"""EasyCache and MagCache as policies: no acceleration is the dense sampler,
specs and the 'frontier' sweep, MagCache's calibration inside `astraea
eval`. (Their rules against NumPy references: test_reference_step_reuse.)
Astraea composed with EasyCache's rule (`AstraeaAdaptive`): tau 0 is
Astraea, the reused steps are the NumPy rule's, their pricing.

The tiny random Wan and shapes of tests/test_policies.py (72 tokens, 4
UniPC steps), so the dense step compiles once for both modules.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_step_reuse as rr
from astraea_jax import evaluation, testing
from astraea_jax.astraea import policies as P
from astraea_jax.astraea import policy_specs as specs
from astraea_jax.astraea import step_reuse
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


# Astraea composed with EasyCache's rule (AstraeaAdaptive) ---------------------
# tau 0 is plain Astraea; with tau > 0 the steps reused are exactly those a
# NumPy transcription of the rule (reference_step_reuse.AstraeaAdaptiveRule,
# written from docs/baselines.md) reuses on the same inputs and outputs; a
# reused step is Astraea's K = 0 step and is priced as one. 8 Euler steps of
# a schedule with a K = 0 step in it.

TOKENS = 72                                    # SHAPE / patch (1, 2, 2)
A_STEPS, A_SHIFT, A_GUIDANCE = 8, 3.0, 5.0
SCHEDULE = (1.0, 1.0, 0.5, 0.5, 0.0, 0.5, 0.5, 0.5)
A_KW = {"steps": A_STEPS, "shift": A_SHIFT, "guidance_scale": A_GUIDANCE,
        "scheduler": "euler", "progress": False, "return_stats": True,
        "return_carry": True}
# Estimates on this model run ~0.4-0.9 a step: tau 1 mixes decisions.
MIXED_TAU = 1.0


def test_tau_zero_is_astraea(model, inputs):
  """Every decision runs (the sum is >= 0 = tau): the same steps, cost
  keys and latents as Astraea, through the rule's lax.cond (measured
  bit-equal on CPU; the bar is the issue's 1e-6)."""
  plain, plain_stats, _ = P.sample(*model, *inputs, policy=P.Astraea(
      schedule=SCHEDULE), **A_KW)
  out, stats, carry = P.sample(*model, *inputs, policy=P.AstraeaAdaptive(
      schedule=SCHEDULE, tau=0.0), **A_KW)
  assert stats.cost_keys == plain_stats.cost_keys
  assert [bool(c) for c in carry["computed"]] == [b > 0 for b in SCHEDULE]
  assert stats.computed_fraction == plain_stats.computed_fraction == 0.5625
  assert rel_err(out, plain) <= 1e-6


@jax.jit(static_argnames="plan")
def _step(fn, carry, x2b, t2b, *, plan):
  return fn(carry, x2b, t2b, plan=plan)


def _drive(model, inputs, policy):
  """The policy's plans stepped by hand (CFG Euler), recording each step's
  CFG-batch input and output: (inputs, outputs, carry, plans)."""
  graphdef, params = model
  noise, ctx, neg = inputs
  scheduler = dense.make_scheduler("euler", A_STEPS, shift=A_SHIFT)
  ts, dts = np.asarray(scheduler.timesteps), np.asarray(scheduler.dt)
  plans = policy.plans(ts, TOKENS)
  carry = policy.init_carry(CONFIG, 2, TOKENS, SHAPE, A_STEPS)
  fn = P.model_fn(graphdef, params, dense.cfg_context(ctx, neg))
  x, xs, vs = jnp.asarray(noise, jnp.float32), [], []
  for plan, t, dt in zip(plans, ts, dts):
    x2b = jnp.concatenate([x, x])
    v, carry = _step(fn, carry, x2b, jnp.full((2,), t, jnp.float32), plan=plan)
    xs.append(np.asarray(x2b))
    vs.append(np.asarray(v))
    cond, uncond = jnp.split(v, 2)
    x = x + dt * (uncond + A_GUIDANCE * (cond - uncond))
  return xs, vs, carry, plans


@pytest.mark.parametrize("tau", [MIXED_TAU, 1e9])
def test_reused_steps_are_the_rules(model, inputs, tau):
  policy = P.AstraeaAdaptive(schedule=SCHEDULE, tau=tau)
  xs, vs, carry, plans = _drive(model, inputs, policy)
  rule = rr.AstraeaAdaptiveRule(budgets=SCHEDULE, tau=tau)
  want = [rule.step(i, xs[i], lambda i=i: vs[i]) for i in range(A_STEPS)]
  computed = [bool(c) for c in carry["computed"]]
  assert computed == [w[0] for w in want]
  np.testing.assert_allclose(carry["estimates"], [w[1] for w in want],
                             rtol=1e-4, atol=1e-7)
  # The host-side statement of the rule replays the in-graph decisions.
  assert step_reuse.adaptive_decisions(
      carry["estimates"], tau, [p.mode for p in plans]) == computed
  reused = [i for i, c in enumerate(computed) if not c]
  if tau == MIXED_TAU:
    assert 4 in reused and 1 <= len(reused) - 1 <= 3, computed  # mixed
  else:   # every sparse step but the last: two full steps give the rate
    assert computed == [True, True] + [False] * 5 + [True]


def test_a_reused_step_is_astraeas_k0_step(model, inputs):
  """The composed run equals Astraea with budget 0 at the steps it
  reused (Astraea's own K = 0: every token adds its cached update)."""
  out, stats, carry = P.sample(*model, *inputs, policy=P.AstraeaAdaptive(
      schedule=SCHEDULE, tau=MIXED_TAU), **A_KW)
  computed = np.asarray(carry["computed"])
  zeroed = tuple(b if c else 0.0 for b, c in zip(SCHEDULE, computed))
  assert zeroed != SCHEDULE
  plain, plain_stats, _ = P.sample(*model, *inputs, policy=P.Astraea(
      schedule=zeroed), **A_KW)
  assert rel_err(out, plain) <= 1e-6
  # Speed accounting: a reused step costs Astraea's K = 0 step.
  assert stats.cost_keys == plain_stats.cost_keys
  assert stats.cost_keys == [
      ("tokens:1.000" if b == 1 else f"tokens:{b:.3f}:score") if b else
      "tokens:0.000" for b in zeroed]
  assert stats.computed_fraction == pytest.approx(np.mean(zeroed))
  table = {"dense": 100.0, "tokens:1.000": 100.0, "tokens:0.000": 2.0,
           "tokens:0.500:score": 60.0}
  assert evaluation.projected_speedup(stats.cost_keys, table) == (
      pytest.approx(800.0 / sum(table[k] for k in stats.cost_keys)))


def test_astraea_adaptive_specs():
  p = specs.parse_policy("astraea_adaptive:budget=0.4,tau=0.05")
  assert p == P.AstraeaAdaptive(budget=0.4, tau=0.05)
  assert p.label() == "astraea+easycache budget=0.4 tau=0.05"
  assert p.budgets(20).tolist() == P.Astraea(budget=0.4).budgets(20).tolist()
  r = specs.parse_policy("astraea_adaptive:budget=0.5,ablation=random,tau=1")
  assert (r.selector, r.tau, r.method) == ("random", 1.0,
                                           "astraea+easycache (random)")
  for bad, match in (("budget=0.4,tau=-0.1", "tau"), ("budget=0.4,tau=abc", "tau"),
                     ("budget=0.4,tau=nan", "tau"), ("budget=0.4,tau=inf", "tau"),
                     ("tau=0.1", "exactly one of budget and schedule"),
                     ("budget=0.4,taux=1", "no setting 'taux'")):
    with pytest.raises(ValueError, match=match):
      specs.parse_policy(f"astraea_adaptive:{bad}")
