"""The lean token state (issue #25): compact update cache, sketched Delta.

The exact state (float32 update and full last input, `selection.EXACT`)
is checked against the NumPy references in test_reference_astraea.py and
test_astraea.py; here the lean encodings are checked against their own
error bounds, and the lean samplers against the dense one and against the
masked simulation the search uses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny_wan as tiny
from _tiny_wan import inputs, split_model  # noqa: F401 (fixtures)

from astraea_jax.astraea import policy_specs
from astraea_jax.astraea import selection
from astraea_jax.astraea import wan_tokenwise as astraea
from astraea_jax.sampling import sampler as dense

CONFIG, STEPS = tiny.CONFIG, tiny.STEPS
LEAN = {"bfloat16": selection.SelectionConfig(),
        "float8": selection.COMPACT}
rel_err = tiny.rel_err


def test_default_is_the_lean_state():
  cfg = selection.SelectionConfig()
  assert (cfg.cache_dtype, cfg.delta_sketch) == ("bfloat16", 64)
  cache = selection.init_cache(3, 2, 10, 256, cfg)
  # per token and block: a bfloat16 update row, a float32 sketch of 64,
  # the float32 LSE and the int32 stale counter.
  assert selection.cache_bytes(3, 2, 10, 256, cfg) == 3 * 2 * 10 * (
      256 * 2 + 64 * 4 + 4 + 4)
  assert sum(a.nbytes for a in jax.tree.leaves(cache)) == (
      selection.cache_bytes(3, 2, 10, 256, cfg))
  # the compact state: one byte per value and a float32 scale per token
  assert selection.cache_bytes(3, 2, 10, 256, selection.COMPACT) == (
      3 * 2 * 10 * (256 + 4 + 64 * 4 + 4 + 4))


@pytest.mark.parametrize("kwargs,names", [
    (dict(cache_dtype="int4"), "bfloat16, float32, float8"),
    (dict(delta_sketch=48), "0, 16, 32, 64, 128, 256"),
])
def test_unknown_state_options_list_the_choices(kwargs, names):
  with pytest.raises(ValueError, match=names):
    selection.SelectionConfig(**kwargs)


def test_sketched_norms_hold_the_johnson_lindenstrauss_bound():
  """||P^T v||^2 / ||v||^2 leaves [1 - eps, 1 + eps] at most as often as
  `sketch_tail` says, for Gaussian, heavy-tailed and one-hot inputs (a
  single massive channel is the worst case of a fixed projection)."""
  dim, r, eps = 512, 64, 0.5
  cfg = selection.SelectionConfig(delta_sketch=r)
  rng = np.random.default_rng(0)
  vectors = np.concatenate([
      rng.standard_normal((2000, dim)),
      rng.standard_t(2, (2000, dim)),
      np.eye(dim)]).astype(np.float32)
  ratio = np.sum(np.asarray(selection.encode_input(vectors, cfg))**2,
                 -1) / np.sum(vectors.astype(np.float64)**2, -1)
  bound = selection.sketch_tail(r, eps)
  assert bound < 0.1
  assert np.mean(np.abs(ratio - 1) > eps) <= bound
  # and the bound is not vacuous: the spread is chi^2_r / r's
  assert 0.5 * np.sqrt(2 / r) < np.std(ratio) < 1.5 * np.sqrt(2 / r)


def test_sketch_is_the_exact_projection():
  """The two bfloat16 matmuls (x's bfloat16 head and tail) give P^T x to
  float32 accuracy: the split leaves 2^-16 of |x|, the float32 sum of 512
  products ~1e-6 (measured 2e-6); a single bfloat16 pass would be 2^-9."""
  cfg = selection.SelectionConfig()
  x = np.random.default_rng(3).standard_normal((2, 50, 512)) * 5
  want = x @ selection.sketch_matrix(512, 64).astype(np.float64)
  got = np.asarray(selection.encode_input(jnp.asarray(x, jnp.float32), cfg))
  assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5


def test_sketched_delta_tracks_the_exact_delta():
  """Relative Delta from the sketch is within the factor (1 + eps) /
  (1 - eps) (both norms within 1 +- eps) of the exact one, except where
  one of the two norms misses: at most 2 x sketch_tail of the tokens."""
  dim, r, eps = 512, 64, 0.5
  rng = np.random.default_rng(1)
  last = rng.standard_normal((1, 3000, dim)).astype(np.float32)
  x = last + rng.uniform(0.01, 1.0, (1, 3000, 1)).astype(
      np.float32) * rng.standard_normal((1, 3000, dim)).astype(np.float32)
  exact = selection.token_delta(x, last, selection.EXACT)
  cfg = selection.SelectionConfig(delta_sketch=r)
  approx = selection.token_delta(x, selection.encode_input(last, cfg), cfg)
  factor = np.sqrt((1 + eps) / (1 - eps))
  off = np.asarray(approx / exact)
  outside = np.mean((off > factor) | (off < 1 / factor))
  assert outside <= 2 * selection.sketch_tail(r, eps)
  # the ranking Astraea uses is kept: rank correlation of the two
  rank = lambda a: np.argsort(np.argsort(np.asarray(a)[0]))
  assert np.corrcoef(rank(exact), rank(approx))[0, 1] > 0.95


@pytest.mark.parametrize("name,rel,floor", [
    # round to nearest: half an ulp of 8 significand bits (bfloat16) ...
    ("bfloat16", 2.0**-8, 0.0),
    # ... 4 (float8 e4m3), and below e4m3's smallest normal (2^-6) a fixed
    # step of 2^-9, i.e. 2^-10 x the per-token scale at most.
    ("float8", 2.0**-4, 2.0**-10),
])
def test_update_encoding_error_bound(name, rel, floor):
  cfg = selection.SelectionConfig(cache_dtype=name)
  rng = np.random.default_rng(2)
  u = (rng.standard_normal((4, 50, 128))
       * np.exp(3 * rng.standard_normal((4, 50, 1)))).astype(np.float32)
  u[0, 0] = 0.0  # an all-zero row must survive (scale 0)
  entries = selection.encode_update(jnp.asarray(u), cfg)
  back = np.asarray(selection.decode_update(entries))
  scale = np.abs(u).max(-1, keepdims=True) / selection.FLOAT8_MAX
  assert np.all(np.abs(back - u) <= rel * np.abs(u) + floor * scale
                + 1e-30)
  assert np.all(back[0, 0] == 0.0)


@pytest.mark.parametrize("name,tol", [
    # The two forms compute the selected rows with different op orders
    # (float32, ~1e-6 apart); rounding that to the cache dtype can land
    # one unit of the last place apart, 2^-8 (bfloat16) or 2^-3 (float8)
    # of a cached update; the bounds allow a few such flips relative to
    # the velocity (measured 4.4e-5 and 3.7e-7: float8 had no flip here).
    ("bfloat16", 4e-4),
    ("float8", 1e-2),
])
def test_lean_sparse_path_equals_masked_simulation(split_model, inputs, name,
                                                   tol):
  budgets = [1.0, 0.3, 0.7, 0.0, 0.5, 1.0 / 32]
  cfg = LEAN[name]
  sparse, cache_s = tiny.run_forward(split_model, inputs, budgets, False,
                                     cfg)
  masked, cache_m = tiny.run_forward(split_model, inputs, budgets, True,
                                     cfg)
  for a, b in zip(sparse, masked):
    assert rel_err(a, b) <= tol
  # the same tokens were chosen at every step and block
  np.testing.assert_array_equal(cache_s["stale"], cache_m["stale"])


def test_compact_state_at_budget_one_equals_dense(split_model, inputs):
  ref = dense.sample(*split_model, *inputs, steps=STEPS, shift=3.0,
                     progress=False)
  out = astraea.sample(*split_model, *inputs, schedule=[1.0] * STEPS,
                       steps=STEPS, shift=3.0, progress=False,
                       selection_config=selection.COMPACT)
  assert rel_err(out, ref) <= 1e-6


def test_the_out_of_memory_hint_names_the_states_that_fit():
  """Wan2.1-1.3B 480p x 81 with the exact state (22.5 GiB of it) needing
  30 GiB on a 12 GiB device: the bfloat16 state (6.1 GiB) would need 13.6
  GiB, the compact one (3.3 GiB) 10.8 GiB: only the compact one is named."""
  cache_args = (30, 2, 32760, 1536)
  hint = selection.state_hint(cache_args, selection.EXACT)
  text = hint(30 * 2**30, 12 * 2**30)
  assert "takes 22.5 GiB" in text
  assert "--cache-dtype float8: about 10.8 GiB" in text
  assert "--cache-dtype bfloat16" not in text
  assert "No lighter state fits" in hint(30 * 2**30, 2 * 2**30)


def test_policy_labels_name_a_non_default_state():
  """eval tells the states apart (it refuses repeated labels)."""
  labels = [policy_specs.parse_policy(f"astraea:budget=0.5{extra}").label()
            for extra in ("", ",cache_dtype=float32,delta_sketch=0",
                          ",cache_dtype=float8", ",delta_sketch=32")]
  assert labels == ["astraea budget=0.5",
                    "astraea (exact-state) budget=0.5",
                    "astraea (float8-state) budget=0.5",
                    "astraea (bfloat16-sketch32) budget=0.5"]


@pytest.mark.parametrize("masked", [False, True])
def test_one_sketch_projection_per_block(split_model, inputs, monkeypatch,
                                         masked):
  """With a sketch, each block projects its input once: the score's
  projection of all N tokens also gives the cache's "input" rows of the
  computed tokens (selection.LayerView); no projection of K rows."""
  shapes = []
  real = selection.encode_input

  def counting(x, config):
    shapes.append(x.shape)
    return real(x, config)

  monkeypatch.setattr(selection, "encode_input", counting)
  cfg = selection.SelectionConfig()
  # budgets 1.0 (every token written) then 0.5 (K = 16 of 32): traced once
  # each, the blocks under one lax.scan body.
  jax.eval_shape(lambda: tiny.run_forward(split_model, inputs, [1.0, 0.5],
                                          masked, cfg))
  assert shapes and all(s[1] == tiny.TOKENS for s in shapes), shapes
  # the full step: one projection; the selecting step: one (not two)
  assert len(shapes) == 2, shapes


def test_the_layer_loop_copies_neither_stream_nor_cache(split_model, inputs):
  """The sparse step's layer loop writes x_next into x's own buffer (the
  loop's carry) and the computed rows into the stacked caches in place:
  its compiled program (caches donated, as the sampler's) copies no
  (B, N, dim) float32 array and no stacked update cache (L, B, N, dim).
  Found on earlier forms: x + update with the computed rows scattered in
  took a new buffer that XLA copied back into the carry at every block;
  scatter(x, rows, x_out - update) + update read the layer's old update
  after its in-place write, and XLA copied the whole stacked cache twice
  at every block (on the H100 too: the 0.4 step 727 ms instead of 481)."""
  graphdef, params = split_model
  noise, ctx, neg = inputs
  x = jnp.concatenate([noise, noise])
  for cfg in (selection.SelectionConfig(),
              selection.SelectionConfig(cache_dtype="float8")):
    cache = selection.init_cache(CONFIG.num_layers, 2, tiny.TOKENS,
                                 CONFIG.dim, cfg)

    def step(params, x, ctx, cache, cfg=cfg):
      model = nnx.merge(graphdef, params)
      return astraea.forward(model, x, jnp.full((2,), 500.0), ctx, cache,
                             num_selected=tiny.TOKENS // 2, config=cfg)

    hlo = jax.jit(step, donate_argnums=3).lower(
        params, x, dense.cfg_context(ctx, neg), cache).compile().as_text()
    update = cache["update"]
    shapes = (f"f32[2,{tiny.TOKENS},{CONFIG.dim}]",
              f"{update.dtype.name.replace('float', 'f').replace('uint', 'u')}"
              f"[{','.join(map(str, update.shape))}]")
    copies = [line for line in hlo.splitlines() if " copy(" in line
              and any(f"= {shape}" in line for shape in shapes)]
    assert not copies, (cfg.cache_dtype, shapes, copies)
