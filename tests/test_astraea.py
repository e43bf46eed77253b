"""Astraea token-wise sampling: exactness, selection, cache, compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny_wan as tiny
from _tiny_wan import inputs, split_model  # noqa: F401 (fixtures)

from astraea_jax.astraea import wan_tokenwise as astraea
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.sampling import sampler as dense

CONFIG, STEPS = tiny.CONFIG, tiny.STEPS
rel_err = tiny.rel_err


def test_budget_one_reproduces_dense_sampler(split_model, inputs):
  ref = dense.sample(*split_model, *inputs, steps=STEPS, shift=3.0,
                     progress=False)
  out = astraea.sample(*split_model, *inputs, schedule=[1.0] * STEPS,
                       steps=STEPS, shift=3.0, progress=False)
  assert rel_err(out, ref) <= 1e-6


def test_low_budget_changes_the_result(split_model, inputs):
  ref = dense.sample(*split_model, *inputs, steps=STEPS, shift=3.0,
                     progress=False)
  out = astraea.sample(*split_model, *inputs, budget=0.5, steps=STEPS,
                       shift=3.0, progress=False)
  assert rel_err(out, ref) > 1e-3


def run_forward(split_model, inputs, budgets, masked):
  return tiny.run_forward(split_model, inputs, budgets, masked,
                          selection.EXACT)


def test_sparse_path_equals_masked_dense_simulation(split_model, inputs):
  """The search evaluates candidates with the masked simulation."""
  budgets = [1.0, 0.3, 0.7, 0.0, 0.5, 1.0 / 32]
  sparse, cache_s = run_forward(split_model, inputs, budgets, masked=False)
  masked, cache_m = run_forward(split_model, inputs, budgets, masked=True)
  for a, b in zip(sparse, masked):
    assert rel_err(a, b) <= 1e-5
  np.testing.assert_array_equal(cache_s["stale"], cache_m["stale"])
  for key in ("update", "input", "lse"):
    assert rel_err(cache_s[key], cache_m[key]) <= 1e-5, key


def test_cache_holds_last_computed_lse_and_update(split_model, inputs):
  """After a full step the cache holds the dense block's LSE and update."""
  graphdef, state = split_model
  model = nnx.merge(graphdef, state)
  noise, ctx, neg = inputs
  ctx2 = dense.cfg_context(ctx, neg)
  x2 = jnp.concatenate([noise, noise])
  t = jnp.full((2,), 500.0)
  cfg = selection.EXACT
  cache = selection.init_cache(CONFIG.num_layers, 2, 32, CONFIG.dim, cfg)
  _, cache = astraea.forward(model, x2, t, ctx2, cache, num_selected=32,
                             config=cfg)
  x, e, e0, c, rope = model.embed(x2, t, ctx2)
  h, aux = model.run_blocks(x, e0, c, rope)
  np.testing.assert_allclose(cache["lse"], aux["lse"].mean(axis=2),
                             rtol=1e-6)
  assert int(cache["stale"].max()) == 0
  # layer 0's update is (block output - block input)
  block0 = jax.tree.map(lambda a: a[0], nnx.state(model.blocks))
  out0, _ = nnx.merge(nnx.graphdef(model.blocks), block0)(x, e0, c, rope)
  np.testing.assert_allclose(cache["update"][0], out0 - x, atol=1e-6)


def test_scores_read_previous_lse_delta_and_penalty():
  cfg = selection.SelectionConfig(w_alpha=1.0, w_beta=0.5, delta_sketch=0)
  x = jnp.ones((1, 4, 3))
  layer_cache = {"lse": jnp.array([[1.0, 5.0, 2.0, 1.0]]),
                 "input": jnp.array([[[1.0] * 3, [0.5] * 3, [1.0] * 3,
                                      [2.0] * 3]]),
                 "stale": jnp.array([[0, 0, 3, 0]], jnp.int32),
                 "update": jnp.zeros((1, 4, 3))}
  scores = selection.token_scores(x, layer_cache, cfg)
  # delta = |1 - x_last| / |x_last| per token: 0, 1, 0, 0.5
  expected = np.array([[1 * 0 + .5, 5 * 1 + .5, 2 * 0 + .5 * np.exp(3),
                        1 * .5 + .5]])
  # rtol 1e-5: delta divides by |x_last| + 1e-6 (a guard against 0 / 0).
  np.testing.assert_allclose(scores, expected, rtol=1e-5)
  np.testing.assert_array_equal(selection.select_tokens(scores, 2), [[1, 2]])


def _sorted_top_k(scores, k):
  """The sort-based reference: jax.lax.top_k (ties to lower indices),
  indices sorted ascending."""
  return np.sort(np.asarray(jax.lax.top_k(scores, k)[1]), axis=-1)


@pytest.mark.parametrize("kind", ["normal", "ties", "wide", "signed_zero",
                                  "infinite"])
def test_radix_top_k_picks_exactly_what_lax_top_k_picks(kind):
  """select_tokens / keep_top (radix select over the float bits) choose the
  same set as jax.lax.top_k, ties to lower indices, for k from 0 to N
  (traced k in the masked form): exact equality, no tolerance."""
  rng = np.random.default_rng(len(kind))
  b, n = 3, 97
  scores = {"normal": rng.standard_normal((b, n)),
            "ties": rng.integers(-2, 3, (b, n)).astype(float),
            "wide": rng.standard_normal((b, n)) * 10.0 ** rng.integers(
                -30, 30, (b, n)),
            "signed_zero": np.where(rng.random((b, n)) < .5, -0.0, 0.0)
                           + rng.integers(0, 2, (b, n)),
            "infinite": np.where(rng.random((b, n)) < .3, -np.inf,
                                 rng.standard_normal((b, n)))}[kind]
  scores = jnp.asarray(scores, jnp.float32)
  keep = jax.jit(selection.keep_top)
  for k in (0, 1, 2, 31, 48, 49, 96, 97):
    want = np.zeros((b, n), bool)
    if k:
      reference = _sorted_top_k(scores, k)
      np.testing.assert_array_equal(selection.select_tokens(scores, k),
                                    reference, err_msg=f"{k=}")
      np.put_along_axis(want, reference, True, axis=-1)
    np.testing.assert_array_equal(keep(scores, k), want, err_msg=f"{k=}")


@pytest.mark.parametrize("penalty", [True, False])
def test_penalty_bounds_how_long_a_token_waits(penalty):
  """With the penalty every token is recomputed within N/K + 4 steps; with
  it switched off, tokens with low scores starve."""
  cfg = selection.SelectionConfig(use_penalty=penalty)
  n, k, dim = 64, 8, 4
  rng = np.random.default_rng(0)
  importance = jnp.asarray(np.exp(rng.standard_normal((1, n))) * 3)
  cache = jax.tree.map(lambda c: c[0],
                       selection.init_cache(1, 1, n, dim, cfg))
  x = jnp.asarray(rng.standard_normal((1, n, dim)), jnp.float32)
  longest = 0
  for _ in range(40):
    x = x + 0.1 * jnp.asarray(rng.standard_normal((1, n, dim)), jnp.float32)
    idx = selection.select_tokens(selection.token_scores(x, cache, cfg), k)
    x_out = jnp.take_along_axis(x, idx[..., None], axis=1) + 1.0
    lse = jnp.take_along_axis(importance, idx, axis=1)[:, None, :]
    x_next, cache = selection.update_layer_cache(cache, x, x_out, lse, idx,
                                                 cfg)
    longest = max(longest, int(cache["stale"].max()))
  if penalty:
    assert longest <= n // k + 4
  else:
    assert longest >= 20


def test_budget_sets_k_and_compiles_once_per_k(split_model, inputs):
  sched = [1.0, 0.5, 0.25, 0.5, 0.25, 0.0]
  before = dense.compiled_count()
  _, stats = astraea.sample(*split_model, *inputs, schedule=sched,
                            steps=STEPS, shift=3.0, progress=False,
                            return_stats=True)
  assert stats.num_selected == [32, 16, 8, 16, 8, 0]
  assert stats.compiled_k == [32, 16, 8, 0]
  assert dense.compiled_count() - before <= 4
  _, stats = astraea.sample(*split_model, *inputs, schedule=sched,
                            steps=STEPS, shift=3.0, progress=False,
                            return_stats=True)
  assert dense.compiled_count() - before <= 4  # no new compiles


def test_default_schedule_has_warmup_and_mean():
  s = schedule_lib.default_schedule(0.4, 50)
  assert s.shape == (50,) and (s[:5] == 1.0).all()
  assert abs(s.mean() - 0.4) < 1e-9
  assert set(np.round(s * 10) / 10) <= set(schedule_lib.GRID)
  assert abs(schedule_lib.default_schedule(0.3, 7).mean() - 0.3) < 0.015


@pytest.mark.parametrize("kwargs,message", [
    (dict(schedule=[1.0] * 5), "has (5,) entries but sampling runs 6"),
    (dict(schedule=[1.0, 0.5, 1.2, 0.5, 0.5, 0.5]), "must lie in [0, 1]"),
    (dict(schedule=[1.0, -0.1, 0.5, 0.5, 0.5, 0.5]), "must lie in [0, 1]"),
    (dict(schedule=[0.5] * 6), "must be 1.0"),
    (dict(budget=1.5), "must lie in (0, 1]"),
    (dict(budget=0.5, schedule=[1.0] * 6), "exactly one of"),
])
def test_bad_budgets_are_rejected(split_model, inputs, kwargs, message):
  with pytest.raises(ValueError) as e:
    astraea.sample(*split_model, *inputs, steps=STEPS, shift=3.0,
                   progress=False, **kwargs)
  assert message in str(e.value)
