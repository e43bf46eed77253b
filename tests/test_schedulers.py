"""Scheduler parity: diffusers, the original Wan code, OpenSora's fixture.

Error measure: max |ours - reference| / max |reference| over the tensor.
Tolerances:
  * schedules (timesteps, sigmas, dt): bit-identical; both sides evaluate
    the same float32/float64 expressions in the same order.
  * UniPC in float64 against the references run with float64 sigmas and
    samples: 1e-12 (same math; coefficient tables vs inline evaluation).
  * float32 against the stock float32 references: 1e-6. The references
    evaluate the UniPC coefficients in float32, which cancels digits (e.g.
    phi_1/h - 1): over 50 steps the stock reference drifts ~1e-6 from its
    own float64 run, so long runs are held to 1e-6 against the float64
    reference instead (our float32 run stays within ~5e-7 of it).
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from safetensors.numpy import load_file

from astraea_jax import testing
from astraea_jax.sampling import schedulers
from astraea_jax.sampling.sampler import cfg_batch, cfg_combine, denoise
from astraea_jax.sampling.schedulers import FlowEuler, FlowUniPC

SAMPLE_SHAPE = (2, 4, 3, 4, 4)


def rel_err(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return np.abs(ours - ref).max() / np.abs(ref).max()


def load_wan_unipc():
  """wan22's `wan/utils/fm_solvers_unipc.py`, loaded as a lone file.

  Importing the `wan` package runs its __init__, which touches CUDA; the
  solver file itself only needs numpy, torch and diffusers.
  """
  path = testing.wan22_dir() / "utils" / "fm_solvers_unipc.py"
  file_spec = importlib.util.spec_from_file_location("wan_fm_solvers_unipc",
                                                     path)
  module = importlib.util.module_from_spec(file_spec)
  file_spec.loader.exec_module(module)
  return module.FlowUniPCMultistepScheduler


def reference_unipc(schedule, steps, shift):
  if schedule == "diffusers":  # as diffusers' WanPipeline configures it
    ref = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=shift, num_train_timesteps=1000)
    ref.set_timesteps(steps)
  else:  # as wan/text2video.py drives it
    ref = load_wan_unipc()(num_train_timesteps=1000, shift=1,
                           use_dynamic_shifting=False)
    ref.set_timesteps(steps, shift=shift)
  return ref


@jax.jit
def _step(scheduler, state, model_output, sample):
  return scheduler.step(state, model_output, sample)


def random_inputs(steps, seed=0):
  """Initial sample and per-step velocities, float32 values."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(SAMPLE_SHAPE).astype(np.float32)
  return x, rng.standard_normal((steps,) + SAMPLE_SHAPE).astype(np.float32)


def run_reference(ref, x, velocities, dtype):
  """Per-step outputs (num_steps, *SAMPLE_SHAPE) of a torch scheduler."""
  sample, outs = torch.from_numpy(x.astype(dtype)), []
  for t, v in zip(ref.timesteps, velocities):
    sample = ref.step(torch.from_numpy(v.astype(dtype)), t, sample,
                      return_dict=False)[0]
    outs.append(sample.numpy())
  return np.stack(outs)


def run_ours(scheduler, x, velocities, dtype):
  sample = jnp.asarray(x.astype(dtype))
  state, outs = scheduler.init(sample), []
  for v in velocities:
    sample, state = _step(scheduler, state, jnp.asarray(v.astype(dtype)),
                          sample)
    outs.append(np.asarray(sample))
  assert int(state.step) == len(velocities)
  return np.stack(outs)


UNIPC_CASES = [("diffusers", 1, 3.0), ("diffusers", 3, 5.0),
               ("diffusers", 10, 3.0), ("diffusers", 50, 5.0),
               ("wan", 2, 3.0), ("wan", 10, 5.0), ("wan", 50, 3.0),
               ("diffusers", 50, 1.0)]


@pytest.mark.parametrize("schedule,steps,shift", UNIPC_CASES)
def test_unipc_schedule_matches(schedule, steps, shift):
  ref = reference_unipc(schedule, steps, shift)
  ours = FlowUniPC.set_timesteps(steps, shift=shift, schedule=schedule)
  assert ours.num_steps == steps
  np.testing.assert_array_equal(np.asarray(ours.timesteps).astype(np.int64),
                                ref.timesteps.numpy())
  np.testing.assert_array_equal(np.asarray(ours.sigmas), ref.sigmas.numpy())


@pytest.mark.parametrize("schedule,steps,shift", UNIPC_CASES)
def test_unipc_steps(schedule, steps, shift):
  x, velocities = random_inputs(steps)
  ref64 = reference_unipc(schedule, steps, shift)
  ref64.sigmas = ref64.sigmas.double()  # the same float32 values, f64 math
  expected64 = run_reference(ref64, x, velocities, np.float64)
  with jax.enable_x64(True):
    ours64 = FlowUniPC.set_timesteps(steps, shift=shift, schedule=schedule,
                                     dtype=jnp.float64)
    got64 = run_ours(ours64, x, velocities, np.float64)
  assert got64.dtype == np.float64
  assert rel_err(got64, expected64) <= 1e-12

  ours = FlowUniPC.set_timesteps(steps, shift=shift, schedule=schedule)
  got = run_ours(ours, x, velocities, np.float32)
  assert got.dtype == np.float32
  if steps <= 10:  # see the module docstring for longer runs
    expected = run_reference(reference_unipc(schedule, steps, shift), x,
                             velocities, np.float32)
    assert rel_err(got, expected) <= 1e-6
  assert rel_err(got, expected64) <= 1e-6


def test_unipc_last_step_returns_data_prediction():
  """The last step lands on sigma = 0 with order 1: x_n = x - sigma v."""
  ours = FlowUniPC.set_timesteps(4, shift=3.0)
  np.testing.assert_array_equal(ours.predictor[-1], [0.0, 1.0, 0.0])
  x, velocities = random_inputs(4, seed=1)
  sample = jnp.asarray(x)
  state = ours.init(sample)
  for v in velocities[:3]:
    sample, state = _step(ours, state, jnp.asarray(v), sample)
  out, _ = _step(ours, state, jnp.asarray(velocities[3]), sample)
  assert rel_err(out, sample - ours.sigmas[3] * velocities[3]) <= 1e-6


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (4, 3.0), (50, 5.0)])
def test_flow_euler_matches_diffusers(steps, shift):
  ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
  ref.set_timesteps(steps)
  ours = FlowEuler.set_timesteps(steps, shift=shift)
  np.testing.assert_array_equal(np.asarray(ours.timesteps),
                                ref.timesteps.numpy())
  np.testing.assert_array_equal(np.asarray(ours.dt),
                                np.diff(ref.sigmas.numpy()))
  x, velocities = random_inputs(steps)
  assert rel_err(run_ours(ours, x, velocities, np.float32),
                 run_reference(ref, x, velocities, np.float32)) <= 1e-6


def test_shift_helpers():
  assert schedulers.wan_flow_shift(480, 832) == 3.0
  assert schedulers.wan_flow_shift(832, 480) == 3.0
  assert schedulers.wan_flow_shift(720, 1280) == 5.0
  s = np.linspace(0.0, 1.0, 11)
  np.testing.assert_allclose(schedulers.shift_sigmas(s, 1.0), s)
  shifted = schedulers.shift_sigmas(s, 5.0)
  assert shifted[0] == 0.0 and shifted[-1] == 1.0
  assert np.all(shifted[1:-1] > s[1:-1])  # more time at high noise
  with pytest.raises(ValueError, match="schedule="):
    FlowUniPC.set_timesteps(4, shift=3.0, schedule="karras")
  with pytest.raises(ValueError, match="num_steps=0"):
    FlowEuler.set_timesteps(0, shift=3.0)


# OpenSora v1.2 rectified flow (../shared/fixtures/opensora_rflow) -------------


@pytest.fixture(scope="module")
def rflow(fixtures):
  return load_file(fixtures / "opensora_rflow" / "io.safetensors")


def _combo(io, j):
  return {"height": float(io["tt.height"][j]),
          "width": float(io["tt.width"][j]),
          "num_frames": int(io["tt.num_frames"][j])}


def test_opensora_timestep_transform(rflow):
  for j in range(rflow["tt.height"].shape[0]):
    out = schedulers.opensora_timestep_transform(rflow["tt.t"],
                                                 **_combo(rflow, j))
    assert out.dtype == np.float32
    assert rel_err(out, rflow["tt.out"][j]) <= 1e-6
  # The fixture's frame counts are multiples of 17; OpenSora floors
  # num_frames // 17 (times 5), so 34 and 50 frames transform alike.
  t = rflow["tt.t"]
  np.testing.assert_array_equal(
      schedulers.opensora_timestep_transform(t, height=240, width=426,
                                             num_frames=34),
      schedulers.opensora_timestep_transform(t, height=240, width=426,
                                             num_frames=50))


def test_opensora_timesteps_30(rflow):
  for j in range(rflow["ts30.transform"].shape[0]):
    ours = FlowEuler.set_timesteps_rflow(30, **_combo(rflow, j))
    assert rel_err(ours.timesteps, rflow["ts30.transform"][j]) <= 1e-6
  plain = FlowEuler.set_timesteps_rflow(30, height=240, width=426,
                                        num_frames=17,
                                        use_timestep_transform=False)
  assert rel_err(plain.timesteps, rflow["ts30.plain"][0]) <= 1e-6


def test_opensora_add_noise(rflow):
  out = schedulers.add_noise(jnp.asarray(rflow["add_noise.x0"]),
                             jnp.asarray(rflow["add_noise.noise"]),
                             jnp.asarray(rflow["add_noise.t"]))
  assert rel_err(out, rflow["add_noise.out"]) <= 1e-6


def _rflow_sample_scheduler(io):
  return FlowEuler.set_timesteps_rflow(
      4, height=float(io["sample.height"][0]),
      width=float(io["sample.width"][0]),
      num_frames=int(io["sample.num_frames"][0]))


def _replay_model_fn(model_outs, channels):
  """A model_fn that returns OpenSora's stored per-step outputs (velocity
  channels) and records its inputs in the carry: (step, z_in, t)."""

  def fn(model_outs, carry, latents_2b, timesteps_2b):
    i, z_ins, ts = carry
    velocity = jax.lax.dynamic_index_in_dim(model_outs, i, keepdims=False)
    carry = (i + 1, z_ins.at[i].set(latents_2b), ts.at[i].set(timesteps_2b))
    return velocity[:, :channels], carry

  return jax.tree_util.Partial(fn, model_outs)


@pytest.mark.parametrize("loop", ["python", "scan"])
def test_opensora_cfg_euler_sampling(rflow, loop):
  """Four CFG steps of RFLOW.sample through `denoise`, with the fixture's
  per-step model outputs standing in for the STDiT3 model."""
  io, steps, scale = rflow, 4, 7.0
  z0 = io["sample.z0"]
  model_outs = np.stack([io[f"sample.nomask.step{i}.model_out"]
                         for i in range(steps)])
  carry = (jnp.int32(0), jnp.zeros((steps, 2 * z0.shape[0]) + z0.shape[1:]),
           jnp.zeros((steps, 2 * z0.shape[0])))
  z, (n, z_ins, ts), trajectory = denoise(
      _replay_model_fn(jnp.asarray(model_outs), z0.shape[1]), jnp.asarray(z0),
      scheduler=_rflow_sample_scheduler(io), guidance_scale=scale,
      carry=carry, loop=loop, return_trajectory=True, progress=False)
  assert int(n) == steps
  for i in range(steps):
    assert rel_err(ts[i], io[f"sample.nomask.step{i}.t"]) <= 1e-6
    assert rel_err(z_ins[i], io[f"sample.nomask.step{i}.z_in"]) <= 1e-6
  assert rel_err(z, io["sample.nomask.z_final"]) <= 1e-6
  assert rel_err(trajectory[-1], z) == 0
  assert rel_err(trajectory[0], io["sample.nomask.step1.z_in"][:2]) <= 1e-6


def test_opensora_cfg_euler_sampling_frame_mask(rflow):
  """The masked variant: conditioning frames (mask 0) stay at z0."""
  io, steps, scale = rflow, 4, 7.0
  z0 = jnp.asarray(io["sample.z0"])
  frame_mask = jnp.asarray(io["sample.mask.frame_mask"])
  scheduler = _rflow_sample_scheduler(io)
  state = scheduler.init(z0)
  z = z0
  for i in range(steps):
    t = scheduler.timesteps[i]
    keep = schedulers.rflow_frame_keep(frame_mask, t)
    np.testing.assert_array_equal(np.tile(np.asarray(keep), (2, 1)),
                                  io[f"sample.mask.step{i}.x_mask"])
    z_in, t_in = cfg_batch(z, t)
    assert rel_err(z_in, io[f"sample.mask.step{i}.z_in"]) <= 1e-6
    assert rel_err(t_in, io[f"sample.mask.step{i}.t"]) <= 1e-6
    v = cfg_combine(jnp.asarray(io[f"sample.mask.step{i}.model_out"])[:, :4],
                    scale)
    z, state = scheduler.step(state, v, z)
    z = schedulers.rflow_condition_frames(z, z0, keep)
  assert rel_err(z, io["sample.mask.z_final"]) <= 1e-6
  np.testing.assert_array_equal(np.asarray(z)[0, :, 0],
                                io["sample.z0"][0, :, 0])
