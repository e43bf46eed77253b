"""benchmarks/dense_wan.py on the CPU: its FLOP formula, its in-memory
conversion of a diffusers model, and a small end-to-end run."""

import importlib.util
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax import testing
from astraea_jax.configs import WanConfig
from astraea_jax.models import wan
from converters import wan as wan_converter

# The test extra has both; missing, the parity tests must fail, not skip.
import torch  # noqa: E402
import diffusers  # noqa: E402,F401

_spec = importlib.util.spec_from_file_location(
    "dense_wan", testing.REPO_ROOT / "benchmarks" / "dense_wan.py")
dense_wan = importlib.util.module_from_spec(_spec)
sys.modules["dense_wan"] = dense_wan  # dataclasses look their module up
_spec.loader.exec_module(dense_wan)

CONFIG = WanConfig.tiny(dim=64, ffn_dim=96, num_heads=2, num_layers=2,
                        text_dim=40, text_len=12, freq_dim=32)


def dot_flops(jaxpr, multiplier=1):
  """2 x multiply-adds of every dot_general in a jaxpr, sub-jaxprs included
  (a scan body counts `length` times)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += multiplier * 2 * math.prod(out) * math.prod(
          lhs[i] for i in contract)
    inner = multiplier * eqn.params.get("length", 1) if (
        eqn.primitive.name == "scan") else multiplier
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += dot_flops(sub.jaxpr, inner)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += dot_flops(sub, inner)
  return total


def test_forward_flops_equals_the_matmuls_of_the_model():
  """The analytic count equals the dot_general FLOPs in the traced forward
  (tokens <= 512: the reference attention is one pair of einsums)."""
  graphdef, params = nnx.split(wan.abstract_model(CONFIG))  # shapes only
  latents = jax.ShapeDtypeStruct((2, 16, 2, 8, 6), jnp.float32)
  timestep = jax.ShapeDtypeStruct((2,), jnp.float32)
  context = jax.ShapeDtypeStruct((2, CONFIG.text_len, CONFIG.text_dim),
                                 jnp.float32)
  jaxpr = jax.make_jaxpr(
      lambda p, *x: nnx.merge(graphdef, p)(*x))(params, latents, timestep,
                                                context)
  tokens = 2 * 4 * 3
  assert dense_wan.forward_flops(CONFIG, 2, tokens, CONFIG.text_len) == (
      dot_flops(jaxpr.jaxpr))


def test_converting_a_bf16_diffusers_model_in_memory_is_exact():
  """bf16 diffusers weights (fp32 where diffusers keeps them) -> ours ->
  back to the diffusers layout: every tensor bit for bit."""
  model = dense_wan.build_diffusers(CONFIG, device="cpu",
                                    dtype=torch.bfloat16, seed=3)
  assert model.scale_shift_table.dtype == torch.float32  # kept in fp32
  assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
  config, params = dense_wan.convert(model, dtype="bfloat16", progress=False)
  assert config.replace(text_len=CONFIG.text_len) == CONFIG.replace(
      dtype="bfloat16", param_dtype="bfloat16")
  back = wan_converter.to_checkpoint(params, config, layout="diffusers")
  state = model.state_dict()
  assert sorted(back) == sorted(state)
  for key, value in back.items():
    expected = state[key].to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(value.view(np.int16), expected, key)


def test_converted_fp32_model_matches_diffusers():
  """Same weights through the in-memory source: float32 outputs agree to
  float32 rounding (same math, another order; 1e-5 relative)."""
  model = dense_wan.build_diffusers(CONFIG, device="cpu",
                                    dtype=torch.float32, seed=4)
  config, params = dense_wan.convert(model, dtype="float32", progress=False)
  config = config.replace(text_len=CONFIG.text_len)
  graphdef, state = dense_wan.to_device_state(config, params)
  inputs = dense_wan.make_inputs(config, (16, 3, 4, 6), seed=5)
  ours = nnx.merge(graphdef, state)(*map(jnp.asarray, inputs))
  api = dense_wan.Torch("cpu", "float32")
  ref = api.forward(model, api.tensors(inputs), eager=True).numpy()
  assert dense_wan.rel_err(ours, ref) <= 1e-5


def test_small_run_writes_the_results_format(tmp_path):
  out = tmp_path / "dense_wan.json"
  dense_wan.main(["--small", "--shapes", "tiny_a", "--repeats", "1",
                  "--warmup", "0", "--unroll-models", "none",
                  "--out", str(out)])
  doc = json.loads(out.read_text())
  assert doc["benchmark"] == "dense_wan"
  methods = {r["method"]: r for r in doc["rows"]}
  assert {"ours", "ours_profile", "diffusers_eager"} <= set(methods)
  assert methods["ours"]["tflops"] > 0
  assert methods["ours_profile"]["device_busy_ms"] > 0
  # bf16 ours vs float32 diffusers: bf16 noise, not a wrong model.
  assert methods["diffusers_eager"]["rel_err_ours"] < 2e-2
  numerics = doc["settings"]["numerics"]["tiny"]
  assert numerics["ours_fp32_vs_fp32"] <= 1e-5
  names = {t["name"] for t in doc["targets"]}
  assert "ours_time_over_fastest_diffusers[tiny_a]" in names
  assert "fp32_rel_err_converted_weights[tiny]" in names
