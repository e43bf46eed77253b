"""Multi-device parity cases; run by tests/test_parallel.py in a subprocess.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
      python -m pytest -q tests/_parallel_cases.py

Needs 4 (fake CPU) devices before JAX starts, which is why it is not
collected with the rest of the suite. Meshes over 2, 3 and 4 of them.
Tolerance: 1e-5 relative (max abs error / max abs value) in float32: the
sharded model does the same maths in another summation order (attention
merged from chunks, matmuls over fewer rows); observed errors are ~1e-6.
"""

import functools

import _parallel_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from astraea_jax import parallel, testing
from astraea_jax.astraea import schedule as schedule_lib
from astraea_jax.astraea import selection
from astraea_jax.astraea import wan_tokenwise
from astraea_jax.models import wan
from astraea_jax.pipelines import wan22_pipeline
from astraea_jax.sampling import sampler as dense

TOL = 1e-5
STEPS = 4


def setup_module():
  if len(jax.devices()) < 4:
    raise RuntimeError(
        f"these cases need 4 devices, found {len(jax.devices())}: set "
        "XLA_FLAGS=--xla_force_host_platform_device_count=4")


@pytest.fixture(scope="module")
def split_model():
  return ref.random_model()


@pytest.fixture(scope="module")
def model(split_model):
  return nnx.merge(*split_model)


def _model_inputs(shape):
  noise, ctx, _ = ref.inputs(shape)
  latents = jnp.concatenate([noise, 0.5 * noise])  # a batch of 2
  timestep = jnp.array([900.0, 400.0])
  context = jnp.concatenate([ctx, -ctx])
  return latents, timestep, context


@jax.jit
def _single_device(model, latents, timestep, context):
  return model(latents, timestep, context, return_aux=True)


# (devices, data, strategy, latent shape, expected (ulysses, ring))
FORWARD_CASES = [
    (4, 1, "auto", ref.SHAPE_35, (2, 2)),     # hybrid, pad rows in the ring
    (4, 1, "ring", ref.SHAPE_36, (1, 4)),     # ring, even split
    (3, 1, "ulysses", ref.SHAPE_35, (3, 1)),  # odd count, pad rows
    (4, 2, "auto", ref.SHAPE_36, (2, 1)),     # data x seq = 2 x 2
]


@pytest.mark.parametrize("devices,data,strategy,shape,split", FORWARD_CASES)
def test_forward_matches_single_device(model, devices, data, strategy, shape,
                                       split):
  latents, timestep, context = _model_inputs(shape)
  want, want_aux = _single_device(model, latents, timestep, context)
  sp = parallel.SequenceParallel(parallel.make_mesh(devices, data=data),
                                 strategy)
  plan = sp.plan(ref.CONFIG.num_heads)
  assert (plan.ulysses, plan.ring) == split
  got, aux = jax.jit(
      lambda m, *a: parallel.forward(m, *a, sp=sp, return_aux=True))(
          model, latents, timestep, context)
  assert ref.rel_err(got, want) <= TOL
  assert ref.rel_err(aux["lse"], want_aux["lse"]) <= TOL


def test_forced_ulysses_needs_divisible_heads(model):
  latents, timestep, context = _model_inputs(ref.SHAPE_36)
  sp = parallel.SequenceParallel(parallel.make_mesh(4), "ulysses")
  with pytest.raises(ValueError, match=r"num_heads=6 .* num_shards=4"):
    parallel.forward(model, latents, timestep, context, sp=sp)


def test_astraea_forward_matches_per_shard_reference(model):
  """A dense step fills the caches, then a sparse step: velocity and cache
  equal the one-device reference; every shard computed exactly K/P."""
  latents, timestep, context = _model_inputs(ref.SHAPE_35)
  n, shards = 35, 4
  sp = parallel.SequenceParallel(parallel.make_mesh(shards), "auto")
  layout = parallel.TokenLayout(n, shards)
  cfg = ref.SELECTION
  cache_sp = parallel.init_cache(ref.CONFIG, 2, n, sp, cfg)
  cache_ref = selection.init_cache(ref.CONFIG.num_layers, 2, n,
                                   ref.CONFIG.dim, cfg)
  k = schedule_lib.num_selected(0.5, n)
  k_local = parallel.local_num_selected(k, layout)
  assert (k, k_local) == (18, 5)  # round(4.5) up; shortest shard: 8

  sp_fn = jax.jit(lambda m, x, t, c, cache, k: parallel.astraea_forward(
      m, x, t, c, cache, sp=sp, num_selected=k, config=cfg),
                  static_argnums=5)
  ref_fn = jax.jit(lambda m, x, t, c, cache, k: ref.reference_forward(
      m, x, t, c, cache, num_selected=k, num_shards=shards),
                   static_argnums=5)
  for step, num in enumerate([n, k]):
    t = timestep - 300.0 * step
    x = latents * (1.0 - 0.2 * step)
    got, cache_sp = sp_fn(model, x, t, context, cache_sp, num)
    want, cache_ref = ref_fn(model, x, t, context, cache_ref, num)
    assert ref.rel_err(got, want) <= TOL, step
    unsharded = jax.tree.map(lambda c: layout.unshard(c, axis=2), cache_sp)
    np.testing.assert_array_equal(unsharded["stale"], cache_ref["stale"])
    for key in ("update", "input", "lse"):
      assert ref.rel_err(unsharded[key], cache_ref[key]) <= TOL, (step, key)
  # Balanced: every layer, batch row and shard computed k_local tokens.
  fresh = (np.asarray(cache_sp["stale"]) == 0).reshape(
      ref.CONFIG.num_layers, 2, shards, layout.slots).sum(-1)
  np.testing.assert_array_equal(fresh, k_local)


@pytest.fixture(scope="module")
def dense_reference(split_model):
  return dense.sample(*split_model, *ref.inputs(), steps=STEPS, shift=3.0,
                      progress=False)


def test_dense_sampler_matches_single_device(split_model, dense_reference):
  got = parallel.sample(*split_model, *ref.inputs(), steps=STEPS, shift=3.0,
                        progress=False, mesh=parallel.make_mesh(4),
                        strategy="hybrid")
  assert ref.rel_err(got, dense_reference) <= TOL


def test_astraea_budget_one_equals_dense_sampler(split_model,
                                                 dense_reference):
  got = parallel.astraea_sample(*split_model, *ref.inputs(),
                                schedule=[1.0] * STEPS, steps=STEPS,
                                shift=3.0, progress=False,
                                mesh=parallel.make_mesh(3), strategy="ring")
  assert ref.rel_err(got, dense_reference) <= TOL


@pytest.mark.parametrize("config", [ref.SELECTION, selection.COMPACT],
                         ids=["exact", "compact"])
def test_astraea_sampler_matches_per_shard_reference(split_model,
                                                     dense_reference, config):
  """The exact state, and the compact one (float8 update, its scale and
  the Delta sketch, each sharded over the rows like the update)."""
  schedule = [1.0, 0.5, 0.0, 0.5]
  got, stats = parallel.astraea_sample(
      *split_model, *ref.inputs(), schedule=schedule, steps=STEPS, shift=3.0,
      progress=False, return_stats=True, mesh=parallel.make_mesh(3),
      strategy="ulysses", selection_config=config)
  want = ref.reference_astraea_sample(*split_model, *ref.inputs(),
                                      schedule=schedule, num_shards=3,
                                      config=config)
  # float8 keeps 4 significant bits: sharded and single-device float32
  # results ~1e-6 apart can round a cached update one float8 step (2^-3
  # of it) apart; measured 1.2e-4 (the exact state: within TOL).
  assert ref.rel_err(got, want) <= (TOL if config is ref.SELECTION
                                    else 1e-3)
  assert ref.rel_err(got, dense_reference) > 1e-3  # selection did act
  assert stats.selected_per_shard == [12, 6, 0, 6]  # 35 tokens: 12, 12, 11
  assert stats.num_selected == [35, 18, 0, 18]


def test_generate_devices_matches_one_device(tmp_path):
  """`astraea generate --devices 4` (mesh data 2 x seq 2) runs Astraea and
  the full model sharded; at budget 1.0 both equal one device's sampler."""
  # pylint: disable=g-import-not-at-top
  from astraea_jax import cli
  from converters.safetensors_io import SafetensorsFile, save_file
  src = testing.write_wan_checkpoint(tmp_path / "src", ref.CONFIG, seed=1)
  assert cli.main(["convert", str(src), str(tmp_path / "ckpt"),
                   "--quiet"]) == 0
  _, ctx, _ = ref.inputs()
  save_file({"context": np.asarray(ctx[0])}, tmp_path / "emb.safetensors")
  out = tmp_path / "out"
  assert cli.main([
      "generate", str(tmp_path / "ckpt"), "--text-embeddings",
      str(tmp_path / "emb.safetensors"), "--out", str(out), "--height", "32",
      "--width", "48", "--frames", "5", "--steps", "2", "--budget", "1.0",
      "--compare", "--devices", "4"]) == 0
  f = SafetensorsFile(out / "outputs.safetensors")
  noise = dense.draw_noise(jax.random.key(0), (1, 16, 2, 4, 6))
  model = checkpoint_model(tmp_path / "ckpt")
  want = dense.sample(*model, noise, ctx, jnp.zeros((1, 1, 24)), steps=2,
                      progress=False)
  for name in ("latents_full", "latents_astraea"):
    assert ref.rel_err(f.get(name), want) <= TOL, name


def checkpoint_model(path):
  from astraea_jax import checkpoint  # pylint: disable=g-import-not-at-top
  return nnx.split(checkpoint.load_model(path))


def test_sequence_parallel_runs_the_one_block(model, monkeypatch):
  """2-device sequence parallelism (dense and Astraea) runs the model's own
  WanBlock, with the sequence-parallel attention as its attention hook
  (tests/test_one_block.py checks the one-device paths)."""
  calls = []
  call = wan.WanBlock.__call__

  def recorded(self, *args, **kwargs):
    calls.append((kwargs.get("token_index") is not None,
                  kwargs.get("attention") is not None))
    return call(self, *args, **kwargs)

  monkeypatch.setattr(wan.WanBlock, "__call__", recorded)
  latents, timestep, context = _model_inputs(ref.SHAPE_36)
  sp = parallel.SequenceParallel(parallel.make_mesh(2), "auto")
  jax.make_jaxpr(lambda *a: parallel.forward(model, *a, sp=sp))(
      latents, timestep, context)
  assert calls and all(c == (False, True) for c in calls)
  calls.clear()
  cache = parallel.init_cache(ref.CONFIG, 2, 36, sp, ref.SELECTION)
  jax.make_jaxpr(lambda *a: parallel.astraea_forward(
      model, *a, sp=sp, num_selected=18, config=ref.SELECTION))(
          latents, timestep, context, cache)
  assert calls and all(c == (True, True) for c in calls)


# Wan2.2: per-token timesteps (TI2V image) and condition channels (I2V) ------


def _ti2v_hooks(noise):
  """TI2V image-to-video's sampler hooks for `noise`: the first latent
  frame is an image latent, its tokens at t = 0, put back every step."""
  image_latent = 0.7 * jax.random.normal(jax.random.key(5),
                                         noise.shape[:2] + (1,)
                                         + noise.shape[3:])
  return {"token_mask": wan22_pipeline.first_frame_token_mask(
      noise.shape, ref.CONFIG.patch_size),
          "post_step": wan22_pipeline.first_frame_post_step(image_latent)}


def test_forward_with_token_timesteps_and_condition_matches_single_device():
  """Per-token timesteps (B, N) are sharded with the tokens (pad rows
  included: 35 tokens on a 2 x 2 hybrid) and condition channels are
  patchified with the latents, on the I2V-A14B layout (in_dim 16 + 20)."""
  config = ref.CONFIG.replace(in_dim=36)
  model = nnx.merge(*ref.random_model(seed=2, config=config))
  latents, timestep, context = _model_inputs(ref.SHAPE_35)
  mask = wan22_pipeline.first_frame_token_mask(latents.shape,
                                               config.patch_size)
  per_token = dense.token_timesteps(timestep, mask)
  assert per_token.shape == (2, 35) and (per_token[:, :7] == 0).all()
  condition = jax.random.normal(jax.random.key(6), (2, 20)
                                + latents.shape[2:])
  want = jax.jit(lambda m, *a: m(*a[:3], condition=a[3]))(
      model, latents, per_token, context, condition)
  sp = parallel.SequenceParallel(parallel.make_mesh(4), "auto")
  got = jax.jit(lambda m, *a: parallel.forward(m, *a[:3], sp=sp,
                                               condition=a[3]))(
      model, latents, per_token, context, condition)
  assert ref.rel_err(got, want) <= TOL
  scalar = model(latents, timestep, context, condition=condition)
  assert ref.rel_err(scalar, want) > 1e-3  # the mask changes the output


def test_ti2v_image_sampling_matches_single_device(split_model):
  """TI2V image-to-video over meshes: the dense sampler (data 2 x seq 2)
  against one device's, and Astraea with per-shard selection (3 Ulysses
  shards, pad rows) against the one-device per-shard reference with the
  same hooks (that the token mask acts: the forward case above)."""
  noise, ctx, neg = ref.inputs()
  hooks = _ti2v_hooks(noise)
  common = {"steps": STEPS, "shift": 3.0, "progress": False}
  want = dense.sample(*split_model, noise, ctx, neg, **hooks, **common)
  got = parallel.sample(*split_model, noise, ctx, neg, **hooks, **common,
                        mesh=parallel.make_mesh(4, data=2))
  assert ref.rel_err(got, want) <= TOL
  np.testing.assert_array_equal(got[:, :, :1], hooks["post_step"].args[0])
  schedule = [1.0, 0.5, 0.0, 0.5]
  got = parallel.astraea_sample(
      *split_model, noise, ctx, neg, schedule=schedule, **hooks, **common,
      mesh=parallel.make_mesh(3), strategy="ulysses",
      selection_config=ref.SELECTION)
  want_sparse = ref.reference_astraea_sample(
      *split_model, noise, ctx, neg, schedule=schedule, num_shards=3,
      **hooks)
  assert ref.rel_err(got, want_sparse) <= TOL
  assert ref.rel_err(got, want) > 1e-3  # selection acted


def test_ti2v_pipeline_on_devices_matches_one_device(split_model):
  """`Wan22TI2VPipeline.denoise(devices=4)` (what `astraea generate
  --devices 4` runs: data 2 x seq 2) with an image latent = one device."""
  pipe = wan22_pipeline.Wan22TI2VPipeline(nnx.merge(*split_model))
  noise, ctx, neg = ref.inputs()
  image_latent = _ti2v_hooks(noise)["post_step"].args[0]
  want = pipe.denoise(noise, ctx, neg, image_latent,
                      num_inference_steps=STEPS, shift=3.0)
  got = pipe.denoise(noise, ctx, neg, image_latent,
                     num_inference_steps=STEPS, shift=3.0, devices=4)
  assert ref.rel_err(got, want) <= TOL
  np.testing.assert_array_equal(got[:, :, :1], image_latent)


# Wan2.2 A14B: two experts switched by the step plan ------------------------

BOUNDARY = 0.875  # T2V-A14B's: timesteps 999, 900 | 750, 500 (shift 3)
GUIDANCE = (3.0, 4.0)  # (low-noise expert, high-noise expert)


def _experts(seeds, config=ref.CONFIG):
  """(graphdef, (high-noise params, low-noise params)) of two random
  models of `config`."""
  (graphdef, high), (_, low) = (ref.random_model(seed=s, config=config)
                                for s in seeds)
  return graphdef, (high, low)


def test_two_expert_i2v_sampling_matches_single_device():
  """I2V-A14B over meshes across the expert boundary (the mask and image
  channels as `condition`, a guidance scale per expert): the dense
  sampler (data 2 x seq 2) against one device's; Astraea (3 Ulysses
  shards, pad rows) against the one-device per-shard reference with the
  same experts, scales and condition; the switch step computes every
  token (refresh_at_switch)."""
  config = ref.CONFIG.replace(in_dim=36)
  graphdef, experts = _experts((3, 4), config)
  noise, ctx, neg = ref.inputs()
  condition = jax.random.normal(jax.random.key(7), (1, 20) + noise.shape[2:])
  common = {"steps": STEPS, "shift": 3.0, "progress": False,
            "boundary_ratio": BOUNDARY, "guidance_scale": GUIDANCE,
            "condition": condition}
  plan = dense.expert_plan(dense.make_scheduler(
      "unipc", STEPS, shift=3.0).timesteps, BOUNDARY)
  assert plan == [0, 0, 1, 1]  # the run crosses the boundary
  want = dense.sample(graphdef, experts, noise, ctx, neg, **common)
  got = parallel.sample(graphdef, experts, noise, ctx, neg, **common,
                        mesh=parallel.make_mesh(4, data=2))
  assert ref.rel_err(got, want) <= TOL
  got, stats = parallel.astraea_sample(
      graphdef, experts, noise, ctx, neg, schedule=[1.0, 1.0, 0.5, 0.5],
      **common, mesh=parallel.make_mesh(3), strategy="ulysses",
      selection_config=ref.SELECTION, return_stats=True)
  assert stats.num_selected == [35, 35, 35, 18]  # the switch step: all
  want_sparse = ref.reference_astraea_sample(
      graphdef, experts, noise, ctx, neg, schedule=[1.0, 1.0, 1.0, 0.5],
      num_shards=3, experts=plan, guidance=[4.0, 4.0, 3.0, 3.0],
      condition=condition)
  assert ref.rel_err(got, want_sparse) <= TOL
  assert ref.rel_err(got, want) > 1e-3  # selection acted


def test_a14b_pipeline_on_devices_matches_one_device(split_model):
  """`Wan22T2VA14BPipeline.denoise(devices=4)` (what `astraea generate
  --devices 4` runs: data 2 x seq 2) with Astraea = one device: the
  schedule computes all tokens or none (per-shard selection is then the
  global one, so one device's sampler is the reference), and the switch
  step computes all where the schedule says none. The dense mesh sampler
  with two experts: the case above."""
  graphdef, (_, low) = _experts((1, 5))
  pipe = wan22_pipeline.Wan22T2VA14BPipeline(
      nnx.merge(*split_model), transformer_2=nnx.merge(graphdef, low),
      boundary_ratio=BOUNDARY)
  noise, ctx, neg = ref.inputs()
  run = functools.partial(pipe.denoise, noise, ctx, neg,
                          num_inference_steps=STEPS, shift=3.0,
                          schedule=[1.0, 1.0, 0.0, 0.0], return_stats=True,
                          selection_config=ref.SELECTION)
  want, want_stats = run()
  got, stats = run(devices=4)
  assert stats.num_selected == want_stats.num_selected == [35, 35, 35, 0]
  assert ref.rel_err(got, want) <= TOL
