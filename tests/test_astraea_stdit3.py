"""OpenSora v1.2 sampling with STDiT3: dense parity, Astraea exactness.

Model: the fixture's tiny STDiT3 (real reference weights, read by
`converters.opensora.read_checkpoint` from a folder laid out as published);
video: the rflow fixture's latents (2, 4, 3, 8, 8) -> 3 frames x 16 tokens.

Tolerances:
* Dense sampling vs OpenSora's 4-step CFG run: max abs error <= 1e-5 x
  max|ref| + 1e-6, the project's float32 parity bound (measured 8.4e-7 x
  max|ref| without, 7.6e-7 with the frame mask).
* Astraea at budget 1.0 vs the dense sampler: <= 1e-6 relative. The
  blocks are the same dense blocks (a forward that does not return the
  cache is bit-identical), but consuming the LSE changes how XLA compiles
  the CPU reference attention, whose output then moves by 1-2 ulp
  (measured 6.9e-7 after the 4 CFG steps; the Wan sampler's test sees the
  same 6.8e-7).
* Sparse rows vs dense rows, sparse path vs masked simulation: <= 1e-5
  relative: the same math on differently shaped matmuls (measured <=
  4e-7).
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.astraea import stdit3_tokenwise as astraea
from astraea_jax.models import stdit3
from astraea_jax.sampling import opensora as opensora_sampling
from astraea_jax.sampling import sampler as dense
from converters import opensora
from converters.safetensors_io import SafetensorsFile

STEPS = 4  # the fixture's sampling run
SELECTION = selection.EXACT


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def split_model(fixtures, tmp_path_factory):
  """(graphdef, params) of the fixture's STDiT3, read as published."""
  source = fixtures / "opensora_stdit3"
  meta = json.loads((source / "meta.json").read_text())
  folder = tmp_path_factory.mktemp("opensora") / "ckpt"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(
      {"architectures": ["STDiT3"], "model_type": "STDiT3",
       **meta["config"]}))
  shutil.copy(source / "weights.safetensors", folder / "model.safetensors")
  return nnx.split(stdit3.model_from_params(
      *opensora.read_checkpoint(folder)))


@pytest.fixture(scope="module")
def io(fixtures):
  return SafetensorsFile(fixtures / "opensora_rflow" / "io.safetensors")


@pytest.fixture(scope="module")
def inputs(io):
  get = lambda k: np.array(io.get(f"sample.{k}"))
  return {"noise": get("z0"), "y": get("y"), "y_mask": get("y_mask"),
          "fps": get("fps"), "height": get("height"), "width": get("width"),
          "num_frames": get("num_frames")}


def run_dense(split_model, inputs, steps=STEPS, **kwargs):
  return opensora_sampling.sample_opensora(*split_model, **inputs, steps=steps,
                                 guidance_scale=7.0, progress=False,
                                 **kwargs)


def run_astraea(split_model, inputs, **kwargs):
  return astraea.sample(*split_model, **inputs, guidance_scale=7.0,
                        progress=False, **kwargs)


@pytest.fixture(scope="module")
def dense_nomask(split_model, inputs):
  return run_dense(split_model, inputs, return_trajectory=True)


# Dense sampling vs OpenSora's RFLOW.sample -----------------------------------


def assert_parity(actual, reference):
  err = np.abs(np.asarray(actual, np.float64) - reference).max()
  tol = 1e-5 * np.abs(reference).max() + 1e-6
  assert err <= tol, f"max abs error {err:.3g} > tolerance {tol:.3g}"


def test_dense_sampling_matches_opensora(dense_nomask, io):
  """Four CFG steps (scale 7, transformed timesteps, caption mask with 6
  and 8 valid tokens shared by the null caption) with the real model."""
  z, trajectory = dense_nomask
  assert_parity(z, io.get("sample.nomask.z_final"))
  for i in range(1, STEPS):  # the latents entering step i
    assert_parity(trajectory[i - 1], io.get(f"sample.nomask.step{i}.z_in")[:2])


def test_dense_sampling_with_frame_mask_matches_opensora(split_model, inputs,
                                                         io):
  """Frame 0 of sample 0 is a conditioning frame: modulated with t0 and
  kept at its starting value."""
  frame_mask = np.array(io.get("sample.mask.frame_mask"))
  z = run_dense(split_model, inputs, frame_mask=frame_mask)
  assert_parity(z, io.get("sample.mask.z_final"))
  np.testing.assert_array_equal(np.asarray(z)[0, :, 0],
                                inputs["noise"][0, :, 0])


def test_bad_inputs_name_the_problem(split_model, inputs):
  with pytest.raises(ValueError, match="frame_mask values must be 0"):
    run_dense(split_model, inputs, frame_mask=np.full((2, 3), 0.5))
  with pytest.raises(ValueError, match="needs 1 or >= 17 frames"):
    run_dense(split_model, {**inputs, "num_frames": 9})
  with pytest.raises(ValueError, match="height must be one value"):
    run_dense(split_model, {**inputs, "height": np.array([240.0, 480.0])})
  with pytest.raises(ValueError, match=r"y must be \(B, 1, L, 32\)"):
    run_dense(split_model, {**inputs, "y": inputs["y"][:, 0]})
  with pytest.raises(ValueError, match=r"noise must be \(B, 4, T, H, W\)"):
    run_dense(split_model, {**inputs, "noise": inputs["noise"][:, :3]})


# Astraea: the sparse block ----------------------------------------------------


def block_inputs(split_model, inputs, frame_mask=True):
  """Tokens and Conditioning of the CFG batch, with a frame mask (x_mask)
  so that per-frame modulation is exercised."""
  model = nnx.merge(*split_model)
  conditions = opensora_sampling.cfg_conditions(
      model, inputs["y"], inputs["y_mask"], fps=inputs["fps"],
      height=inputs["height"], width=inputs["width"],
      frame_mask=np.array([[0.0, 1, 1], [1, 1, 0]]) if frame_mask else None)
  x = jnp.concatenate([inputs["noise"]] * 2)
  t = jnp.array([700.0, 300.0, 700.0, 300.0])
  return model, conditions, x, t


@pytest.mark.parametrize("temporal_sparse", stdit3.TEMPORAL_SPARSE)
def test_sparse_block_rows_equal_dense_rows(split_model, inputs,
                                            temporal_sparse):
  """Each computed token's output and LSE equal the dense block's."""
  model, conditions, x, t = block_inputs(split_model, inputs)
  b, grid, k_f = 4, (3, 16), 5
  rng = np.random.default_rng(0)
  positions = jnp.asarray(np.sort(
      [[rng.choice(grid[1], k_f, replace=False) for _ in range(grid[0])]
       for _ in range(b)], axis=-1), jnp.int32)
  rows = (positions + grid[1] * jnp.arange(grid[0])[:, None]).reshape(b, -1)

  @jax.jit
  def dense_and_sparse(x, t, positions):
    tokens, cond = model.embed(x, t, **opensora_sampling.model_inputs(conditions, t))
    out = {}
    for kind in astraea.BLOCK_KINDS:
      block = stdit3.layer(getattr(model, f"{kind}_blocks"), 1)
      out[kind] = (block(tokens, cond, grid),
                   block(tokens, cond, grid, token_index=positions,
                         temporal_sparse=temporal_sparse))
    return out

  for (dense, dense_aux), (sparse, aux) in dense_and_sparse(
      x, t, positions).values():
    assert sparse.shape == (b, grid[0] * k_f, 64)
    assert rel_err(sparse, jnp.take_along_axis(dense, rows[..., None],
                                               axis=1)) <= 1e-5
    assert rel_err(aux["lse"], jnp.take_along_axis(
        dense_aux["lse"], rows[:, None, :], axis=2)) <= 1e-5


def test_per_frame_selection_is_balanced_top_k():
  scores = jnp.asarray(np.random.default_rng(1).standard_normal((2, 12)))
  positions, token_index = astraea.select_per_frame(scores, (3, 4), 2)
  assert positions.shape == (2, 3, 2) and token_index.shape == (2, 6)
  by_frame = np.asarray(scores).reshape(2, 3, 4)
  for b in range(2):
    for f in range(3):
      best = np.sort(np.argsort(-by_frame[b, f])[:2])
      np.testing.assert_array_equal(positions[b, f], best)
      np.testing.assert_array_equal(token_index[b, 2 * f:2 * f + 2],
                                    4 * f + best)
  assert (np.diff(np.asarray(token_index), axis=1) > 0).all()  # sorted


# Astraea: sampling ------------------------------------------------------------


def test_budget_one_reproduces_dense_sampler(split_model, inputs,
                                             dense_nomask):
  out = run_astraea(split_model, inputs, schedule=[1.0] * STEPS,
                    steps=STEPS)
  assert rel_err(out, dense_nomask[0]) <= 1e-6


def run_forwards(split_model, inputs, budgets, masked):
  """Model evaluations along a made-up trajectory, one budget each."""
  model, conditions, x, _ = block_inputs(split_model, inputs)
  cache = astraea.init_cache(model.config, 4, 48, SELECTION)
  if masked:
    fn = jax.jit(lambda x, t, cache, k: astraea.forward_masked(
        model, x, t, conditions, cache, k, config=SELECTION))
  else:
    fn = jax.jit(lambda x, t, cache, k: astraea.forward(
        model, x, t, conditions, cache, tokens_per_frame=k, config=SELECTION),
                 static_argnums=3)
  outs = []
  for i, theta in enumerate(budgets):
    t = jnp.full((4,), 900.0 - 150 * i)
    out, cache = fn(x, t, cache, schedule_lib.num_selected(theta, 16))
    outs.append(out)
    x = x + 0.2 * out[:, :4]
  return outs, cache


def test_sparse_path_equals_masked_dense_simulation(split_model, inputs):
  """K_f = 16 (dense), 5, 0 (all cached), 5 tokens per frame of 16, with a
  frame mask. (Both temporal layouts compute the same rows:
  test_sparse_block_rows_equal_dense_rows.)"""
  budgets = [1.0, 0.3, 0.0, 0.3]
  sparse, cache_s = run_forwards(split_model, inputs, budgets, False)
  masked, cache_m = run_forwards(split_model, inputs, budgets, True)
  for a, b in zip(sparse, masked):
    assert rel_err(a, b) <= 1e-5
  for kind in astraea.BLOCK_KINDS:
    np.testing.assert_array_equal(cache_s[kind]["stale"],
                                  cache_m[kind]["stale"])
    for key in ("update", "input", "lse"):
      assert rel_err(cache_s[kind][key], cache_m[kind][key]) <= 1e-5, key
    # The last step computed K_f = 5 tokens in every frame of every block.
    stale = np.asarray(cache_s[kind]["stale"]).reshape(2, 4, 3, 16)
    np.testing.assert_array_equal((stale == 0).sum(-1), 5)
    # 0: selected last; 2: at step 1, not 3; 3: not since the full step.
    assert set(np.unique(stale)) == {0, 2, 3}


def test_cache_after_full_step_holds_the_dense_lse_and_update(split_model,
                                                              inputs):
  model, conditions, x, t = block_inputs(split_model, inputs,
                                         frame_mask=False)

  @jax.jit
  def run(x, t):
    cache = astraea.init_cache(model.config, 4, 48, SELECTION)
    out, cache = astraea.forward(model, x, t, conditions, cache,
                                 tokens_per_frame=16, config=SELECTION)
    kwargs = opensora_sampling.model_inputs(conditions, t)
    tokens, cond = model.embed(x, t, **kwargs)
    first, _ = stdit3.layer(model.spatial_blocks, 0)(tokens, cond, (3, 16))
    return out, cache, model(x, t, **kwargs, return_aux=True), first - tokens

  out, cache, (dense, aux), first_update = run(x, t)
  assert rel_err(out, dense) <= 1e-6
  assert rel_err(cache["spatial"]["update"][0], first_update) <= 1e-6
  for kind in astraea.BLOCK_KINDS:
    assert rel_err(cache[kind]["lse"], aux[kind]["lse"].mean(axis=2)) <= 1e-6
    assert int(cache[kind]["stale"].max()) == 0


def test_budget_sets_k_per_frame_and_compiles_once_per_k(split_model,
                                                         inputs,
                                                         dense_nomask):
  """Budgets 1.0/0.5/0.0 -> K_f 16/8/0 of 16 tokens per frame (x 3
  frames); one compile per K (at most 3: the budget-1.0 test may have
  compiled K_f = 16 already), none on a second run."""
  sched = [1.0, 0.5, 0.0, 0.5]
  before = dense.compiled_count()
  z, stats = run_astraea(split_model, inputs, schedule=sched, steps=STEPS,
                         return_stats=True)
  assert stats.num_tokens == 48
  assert stats.num_selected == [48, 24, 0, 24]
  assert stats.compiled_k == [48, 24, 0]
  assert dense.compiled_count() - before <= 3
  compiled = dense.compiled_count()
  assert rel_err(z, dense_nomask[0]) > 1e-3  # the budget changed the result
  run_astraea(split_model, inputs, schedule=sched, steps=STEPS)
  assert dense.compiled_count() == compiled  # no new compiles


@pytest.mark.parametrize("kwargs,message", [
    ({"schedule": [1.0] * 3}, "has (3,) entries but sampling runs 4"),
    ({"schedule": [1.0, 0.5, 1.2, 0.5]}, "must lie in [0, 1]"),
    ({"schedule": [0.5] * 4}, "must be 1.0"),
    ({"budget": 0.0}, "must lie in (0, 1]"),
    ({"budget": 0.5, "schedule": [1.0] * 4}, "exactly one of"),
    ({"budget": 0.5, "temporal_sparse": "dense"}, "unknown temporal_sparse"),
])
def test_bad_budgets_are_rejected(split_model, inputs, kwargs, message):
  with pytest.raises(ValueError) as e:
    run_astraea(split_model, inputs, steps=STEPS, **kwargs)
  assert message in str(e.value)
