"""Acceleration policies on one sampler, and the evaluation harness.

Every test samples the same tiny random Wan (72 tokens, 4 UniPC steps) with
the same shapes, so the jitted step functions compile once per distinct
plan for the whole module.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax import evaluation, testing
from astraea_jax.astraea import policies as P
from astraea_jax.astraea import policy_specs as specs
from astraea_jax.astraea import wan_tokenwise as astraea
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import step_plans as plans_lib
from astraea_jax.configs import WanConfig
from astraea_jax.sampling import sampler as dense

CONFIG = WanConfig.tiny(num_layers=2, dim=64, ffn_dim=96, num_heads=2,
                        text_dim=24, text_len=8, freq_dim=16)
SHAPE = (1, 16, 2, 12, 12)   # 2 x 6 x 6 = 72 tokens; 12 px frames for SSIM
N = 72
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


@pytest.fixture(scope="module")
def reference(model, inputs):
  return dense.sample(*model, *inputs, **KW)


def rel_err(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def test_block_forward_is_the_wan_block(model, inputs):
  """The block with its hooks on equals the plain block exactly, sparse or
  dense."""
  graphdef, params = model
  wan = nnx.merge(graphdef, params)
  noise, ctx, neg = inputs
  x2 = jnp.concatenate([noise, noise])
  x, _, e0, c, rope = wan.embed(x2, jnp.full((2,), 700.0),
                                dense.cfg_context(ctx, neg))
  block_def = nnx.graphdef(wan.blocks)
  block_state = jax.tree.map(lambda a: a[1], nnx.state(wan.blocks))
  idx = jnp.asarray([[0, 5, 9, 40, 71], [1, 2, 3, 50, 60]], jnp.int32)

  @jax.jit
  def run(state, x, e0, c, rope, idx):
    block = nnx.merge(block_def, state)
    out = {}
    for name, token_index in (("dense", None), ("sparse", idx)):
      want, want_aux = block(x, e0, c, rope, token_index=token_index)
      got, aux = block(x, e0, c, rope, token_index=token_index,
                       cross_entropy=True, keep_attention_outputs=True)
      out[name] = (want, want_aux["lse"], got, aux)
    aux = out["dense"][3]
    out["reused"], _ = block(
        x, e0, c, rope, self_attn_out=aux["self_attn_out"],
        cross_attn_out=aux["cross_attn_out"])
    return out

  out = run(block_state, x, e0, c, rope, idx)
  for name in ("dense", "sparse"):
    want, want_lse, got, aux = out[name]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(aux["lse"], want_lse)
    # Entropy of a softmax over text_len = 8 keys lies in [0, log 8].
    assert aux["cross_entropy"].shape == want_lse.shape
    assert 0 <= float(aux["cross_entropy"].min())
    assert float(aux["cross_entropy"].max()) <= np.log(8) + 1e-5
  # Reusing the attention outputs it just computed changes nothing.
  np.testing.assert_array_equal(out["reused"], out["dense"][2])


# "No acceleration" settings run the policies' own code paths (caches,
# selection, lax.cond) but compute every token of every block at every step.
NO_ACCELERATION = {
    "dense": P.Dense(),
    "astraea_schedule_1": P.Astraea(schedule=(1.0,) * STEPS),
    "astraea_random_budget_1": P.Astraea(budget=1.0, selector="random"),
    "astraea_fixed_budget_1": P.Astraea(budget=1.0, selector="fixed"),
    "astraea_step_level_budget_1": P.Astraea(budget=1.0,
                                             schedule_kind="step_level"),
    "toca_interval_1": P.ToCa(interval=1),
    "toca_ratio_1": P.ToCa(interval=3, ratio=1.0),
    "pab_ranges_1": P.PAB(self_range=1, cross_range=1, window=(0, 1000)),
    "step_cache_threshold_0": P.StepCache(threshold=0.0),
    "step_cache_threshold_0_velocity": P.StepCache(threshold=0.0,
                                                   reuse="velocity"),
}


@pytest.mark.parametrize("name", list(NO_ACCELERATION))
def test_no_acceleration_equals_the_dense_sampler(name, model, inputs,
                                                  reference):
  # 1e-6 relative: the same float32 ops; only XLA's fusion of the cache
  # writes may reorder them (Astraea's budget-1 path differs by ~7e-7 on
  # CPU, as in tests/test_astraea.py; the others match bit for bit).
  out, stats = P.sample(*model, *inputs, policy=NO_ACCELERATION[name],
                        return_stats=True, **KW)
  assert rel_err(out, reference) <= 1e-6
  assert stats.computed_fraction == 1.0
  assert "step_cache:reused" not in stats.cost_keys


def test_astraea_policy_is_the_astraea_sampler(model, inputs):
  schedule = (1.0, 0.5, 0.5, 0.0)
  want = astraea.sample(*model, *inputs, schedule=schedule, **KW)
  got, stats = P.sample(*model, *inputs, policy=P.Astraea(schedule=schedule),
                        return_stats=True, **KW)
  np.testing.assert_array_equal(got, want)
  assert stats.cost_keys == ["tokens:1.000", "tokens:0.500:score",
                             "tokens:0.500:score", "tokens:0.000"]
  assert stats.computed_fraction == 0.5


def test_fixed_token_set_stays_fixed(model, inputs):
  """Frozen at the first sparse step: those K tokens, and only they, are
  recomputed at every later sparse step; they are Astraea's choice there."""
  schedule = (1.0, 0.5, 0.5, 0.5)
  k = schedule_lib.num_selected(0.5, N)
  _, carry = P.sample(*model, *inputs, return_carry=True, policy=P.Astraea(
      schedule=schedule, selector="fixed"), **KW)
  stale = np.asarray(carry["cache"]["stale"])          # (L, 2B, N)
  assert ((stale == 0).sum(-1) == k).all()
  assert set(np.unique(stale)) == {0, 3}   # never picked after the full step
  _, first = P.sample(*model, *inputs, return_carry=True, policy=P.Astraea(
      schedule=(1.0, 0.5, 0.0, 0.0)), **KW)
  # Astraea's picks at step 1 are the tokens whose counter restarted there.
  np.testing.assert_array_equal(np.asarray(first["cache"]["stale"]) == 2,
                                stale == 0)
  order = np.asarray(carry["order"])
  assert (np.sort(order, -1) == np.arange(N)).all()    # rankings


def test_random_selection_picks_exactly_k_distinct_tokens(model, inputs):
  k = schedule_lib.num_selected(0.5, N)
  plan = plans_lib.TokenPlan(budget=0.5, num_selected=k, selector="random", seed=3)
  x = jnp.zeros((2, N, 4))
  sets = []
  for step, layer in ((0, 0), (0, 1), (1, 0)):
    idx, _ = plans_lib._select(plan, x, None, layer, step, None)
    idx = np.asarray(idx)
    assert idx.shape == (2, k)
    for row in idx:
      assert len(set(row)) == k and row.min() >= 0 and row.max() < N
      assert (np.diff(row) > 0).all()                  # sorted (kernel order)
    sets.append(idx)
  assert not np.array_equal(sets[0], sets[1])          # per layer
  assert not np.array_equal(sets[0], sets[2])          # per step
  assert not np.array_equal(sets[0][0], sets[0][1])    # per CFG half
  _, carry = P.sample(*model, *inputs, return_carry=True, policy=P.Astraea(
      schedule=(1.0, 0.5, 0.5, 0.5), selector="random"), **KW)
  assert ((np.asarray(carry["cache"]["stale"]) == 0).sum(-1) == k).all()


def test_step_cache_rule():
  changes = [9.0, 0.05, 0.05, 0.05, 0.3, 0.01, 0.01, 0.0]
  assert plans_lib.step_cache_decisions(changes, 0.1) == [
      True, False, True, False, True, False, False, True]
  assert all(plans_lib.step_cache_decisions(changes, 0.0))
  assert plans_lib.step_cache_decisions(changes, 1e9) == [True] + [False] * 6 + [True]


def test_step_cache_computes_the_steps_its_rule_says(model, inputs):
  """In-graph decisions = the rule applied to the recorded changes; a
  higher threshold computes fewer steps; first and last always."""
  counts = []
  for threshold in (0.0, 0.05, 0.5, 1e9):
    out, stats, carry = P.sample(*model, *inputs, return_stats=True,
                                 return_carry=True,
                                 policy=P.StepCache(threshold=threshold),
                                 **KW)
    computed = [bool(c) for c in np.asarray(carry["computed"])]
    assert computed == plans_lib.step_cache_decisions(
        np.asarray(carry["changes"]), threshold)
    assert computed[0] and computed[-1]
    assert stats.cost_keys[1:-1] == [
        "step_cache:computed" if c else "step_cache:reused"
        for c in computed[1:-1]]
    counts.append(sum(computed))
    assert np.isfinite(np.asarray(out)).all()
  assert counts[0] == STEPS and counts[-1] == 2
  assert counts == sorted(counts, reverse=True)


def test_toca_interval_pattern():
  plans = P.ToCa(interval=3, ratio=0.3).plans(np.zeros(8), 100)
  assert [p.budget for p in plans] == [1, .3, .3, 1, .3, .3, 1, .3]
  assert [p.num_selected for p in plans] == [100, 30, 30, 100, 30, 30, 100,
                                             30]
  assert {p.selector for p in plans} == {"toca"}


def test_toca_scores_prefer_stale_and_uncertain_tokens():
  score = plans_lib.TocaScore(importance="cross_entropy", frequency_weight=0.25,
                      interval=3)
  cache = {"lse": jnp.asarray([[0.5, 2.0, 0.5, 0.5]]),
           "stale": jnp.asarray([[0, 0, 2, 0]], jnp.int32)}
  s = np.asarray(plans_lib.toca_scores(cache, score, jax.random.key(0)))[0]
  norm = np.linalg.norm([1.5, 3.0, 1.5, 1.5])
  np.testing.assert_allclose(s, np.array([1.5, 3.0, 1.5, 1.5]) / norm
                             + [0, 0, 0.25 * 2 / 3, 0], rtol=1e-6)
  assert list(np.argsort(-s)[:2]) == [1, 2]


def test_pab_broadcast_ranges():
  timesteps = np.array([999, 900, 750, 600, 450, 300, 150, 50])
  plans = P.PAB(self_range=2, cross_range=3,
                window=(100, 800)).plans(timesteps, 10)
  # In the window: steps 2..6; counting from step 2.
  assert [p.reuse_self for p in plans] == [False, False, False, True, False,
                                           True, False, False]
  assert [p.reuse_cross for p in plans] == [False, False, False, True, True,
                                            False, True, False]


def test_pab_reuse_changes_the_result_but_not_the_computed_steps(
    model, inputs, reference):
  out, stats = P.sample(*model, *inputs, return_stats=True, policy=P.PAB(
      self_range=2, cross_range=2, window=(0, 1000)), **KW)
  assert stats.cost_keys == ["pab:self=compute,cross=compute",
                             "pab:self=reuse,cross=reuse"] * 2
  assert rel_err(out, reference) > 1e-4


@pytest.mark.parametrize("budget", [0.2, 0.3, 0.4, 0.5, 0.7, 1.0])
def test_step_level_pattern_matches_the_mean_budget(budget):
  s = P.step_level_schedule(budget, 50)
  assert set(s) <= {0.0, 1.0} and s[0] == 1.0
  assert s.sum() == round(budget * 50)
  gaps = np.diff(np.nonzero(s)[0])
  assert gaps.size == 0 or gaps.max() - gaps.min() <= 1   # evenly spread


def test_parse_policy_specs(tmp_path):
  assert specs.parse_policy("dense") == P.Dense()
  assert specs.parse_policy("toca:interval=4,ratio=0.2") == P.ToCa(4, 0.2)
  assert specs.parse_policy("pab:self=3,cross=6,window=50/900") == P.PAB(
      3, 6, (50.0, 900.0))
  a = specs.parse_policy("astraea:budget=0.5,ablation=no_lse")
  assert a.budget == 0.5 and not a.selection.use_lse
  assert a.method == "astraea (no-lse)"
  assert specs.parse_policy("astraea:budget=0.4,ablation=random").selector == (
      "random")
  path = tmp_path / "schedule.json"
  schedule_lib.save(path, [1.0, 0.5, 0.5, 0.0], fitness_mse=0.1,
                    target_budget=0.5)
  s = specs.parse_policy(f"astraea:schedule={path}")
  assert s.schedule == (1.0, 0.5, 0.5, 0.0) and s.method == (
      "astraea (searched)")
  with pytest.raises(ValueError, match="no setting 'ratoi'"):
    specs.parse_policy("toca:ratoi=0.3")
  with pytest.raises(ValueError, match="unknown policy"):
    specs.parse_policy("teacache")
  labels = [p.label() for p in specs.default_sweep()]
  assert len(labels) == len(set(labels))


def test_speed_composition():
  table = {"dense": 100.0, "tokens:1.000": 102.0, "tokens:0.000": 4.0,
           "tokens:0.500:score": 60.0, "step_cache:reused": 5.0}
  keys = ["tokens:1.000", "tokens:0.500:score", "tokens:0.000",
          "step_cache:reused"]
  assert evaluation.projected_speedup(keys, table) == pytest.approx(
      400.0 / (102 + 60 + 4 + 5))
  # An unmeasured budget interpolates between its selector's neighbours.
  assert evaluation.cost_ms("tokens:0.250:score", table) == pytest.approx(
      (4.0 + 60.0) / 2)
  with pytest.raises(KeyError):
    evaluation.cost_ms("pab:self=reuse,cross=reuse", table)


def test_pareto_front_and_targets():
  pts = [(1.0, 30.0), (2.0, 25.0), (1.5, 20.0), (3.0, 25.0)]
  assert evaluation.pareto_front(pts) == [0, 3]
  rows = [
      {"method": "astraea", "family": "astraea", "speedup_cpu": 2.0,
       "psnr": 30.0, "settings": {"budget": 0.5}},
      {"method": "astraea (random)", "family": "astraea", "speedup_cpu": 2.0,
       "psnr": 20.0, "settings": {"budget": 0.5}},
      {"method": "toca", "family": "toca", "speedup_cpu": 1.95,
       "psnr": 22.0, "settings": {}},
      {"method": "pab", "family": "pab", "speedup_cpu": 1.2, "psnr": 35.0,
       "settings": {}}]
  goals = {g["name"]: g["value"] for g in evaluation.targets(rows)}
  assert goals["astraea_psnr_margin_at_1.9x_cpu"] == pytest.approx(8.0)
  assert goals["baseline_settings_dominated_by_astraea"] == 0.5
  assert goals["score_vs_random_psnr_margin_budget_0.5"] == 10.0


def test_eval_harness_end_to_end(model, tmp_path):
  graphdef, params = model
  base = evaluation.random_problem(
      CONFIG, SHAPE, num_prompts=1, seeds=(0, 1),
      config=evaluation.EvalConfig(steps=STEPS, shift=3.0))
  problem = evaluation.Problem("tiny", graphdef, params, base.samples,
                               config=base.config)
  policies = [P.Astraea(schedule=(1.0, 0.5, 0.5, 0.0)),
              P.Astraea(schedule=(1.0, 0.5, 0.5, 0.5), selector="random"),
              P.StepCache(threshold=1e9),   # computes the first and last
              P.PAB(self_range=2, cross_range=2, window=(0, 1000))]
  speed = tmp_path / "speed.json"
  table = [{"kind": "step_config", "cost_key": k, "ms_per_step": v}
           for k, v in {"dense": 100.0, "tokens:1.000": 101.0,
                        "tokens:0.000": 3.0, "tokens:0.500:score": 55.0,
                        "tokens:0.500:random": 53.0,
                        "step_cache:full": 100.0,
                        "step_cache:computed": 101.0,
                        "step_cache:reused": 3.0,
                        "pab:self=compute,cross=compute": 102.0,
                        "pab:self=reuse,cross=reuse": 40.0}.items()]
  speed.write_text(json.dumps({"rows": table}))
  rows, paths = evaluation.run(problem, policies, tmp_path / "out",
                               speed_json=speed, progress=False)
  assert [r["label"] for r in rows] == [p.label() for p in policies]
  for r in rows:
    assert r["samples"] == 2
    for m in ("speedup_cpu", "speedup_h200", "psnr", "ssim"):
      assert np.isfinite(r[m]) and np.isfinite(r[f"{m}_std"]), (r, m)
  assert rows[0]["speedup_h200"] == pytest.approx(400 / (101 + 55 * 2 + 3))
  assert rows[2]["speedup_h200"] == pytest.approx(400 / (100 + 3 + 3 + 100))
  assert rows[3]["speedup_h200"] == pytest.approx(400 / (102 + 40) / 2)
  # Astraea's score beats random selection at the same tokens per step.
  assert rows[0]["psnr"] > rows[1]["psnr"]
  csv_lines = (tmp_path / "out" / "eval.csv").read_text().splitlines()
  assert len(csv_lines) == 1 + len(policies)
  assert csv_lines[0].startswith("method,label,samples,speedup_h200")
  runs = (tmp_path / "out" / "eval_runs.csv").read_text().splitlines()
  assert len(runs) == 1 + 2 * len(policies)
  md = (tmp_path / "out" / "eval.md").read_text()
  assert f"| {rows[1]['method']} |" in md and "PSNR (dB)" in md
  doc = json.loads((tmp_path / "out" / "eval.json").read_text())
  assert doc["benchmark"] == "eval" and len(doc["rows"]) == len(policies)
  assert doc["settings"]["speedup_used"] == "speedup_h200"
  assert set(paths) >= {"csv", "runs_csv", "md", "json"}


def test_quality_reports_lpips_only_with_weights():
  """LPIPS (random AlexNet weights here) is the lpips module's mean over
  the frames; without weights it is left out (None)."""
  from astraea_jax import lpips
  rng = np.random.default_rng(0)
  weights = {"convs": [(jnp.asarray(0.05 * rng.standard_normal(s),
                                    jnp.float32), jnp.zeros(s[0]))
                       for _, s, *_ in lpips.ALEXNET_CONVS],
             "heads": [jnp.asarray(np.abs(rng.standard_normal(c)),
                                   jnp.float32)
                       for c in lpips.HEAD_CHANNELS]}
  video = jnp.asarray(rng.uniform(-1, 1, (1, 3, 2, 32, 32)), jnp.float32)
  ref = jnp.clip(video + 0.1 * rng.standard_normal(video.shape), -1, 1)
  without = evaluation.quality(video, ref, data_range=2.0)
  assert without["lpips"] is None and np.isfinite(without["ssim"])
  got = evaluation.quality(video, ref, data_range=2.0, lpips_weights=weights)
  want = lpips.lpips(jnp.moveaxis(video, 1, 2), jnp.moveaxis(ref, 1, 2),
                     weights)
  np.testing.assert_allclose(got["lpips"], want, rtol=1e-5)
  assert got["psnr"] == without["psnr"] > 0
