"""WanDiT vs the outputs of the original Wan2.1 code (../shared/fixtures).

Tolerance: max abs error <= 1e-5 * max|reference| + 1e-6 (float32, same
math in a different order; the fixture README expects 1e-5..1e-4 abs).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from astraea_jax import checkpoint, testing
from astraea_jax.configs import WanConfig
from converters import wan as wan_converter
from converters.common import Source
from converters.safetensors_io import SafetensorsFile


def fixture_config():
  return WanConfig.tiny()


@pytest.fixture(scope="module", params=["wan", "diffusers"])
def model(request, fixtures, tmp_path_factory):
  """The fixture weights through the converter and an orbax round trip."""
  layout = request.param
  name = ("weights.safetensors" if layout == "wan"
          else "weights_diffusers.safetensors")
  source = Source([SafetensorsFile(fixtures / "wan21_t2v" / name)])
  config = fixture_config()
  params = wan_converter.load_params(source, layout, config)
  dst = tmp_path_factory.mktemp(layout) / "ckpt"
  checkpoint.save(dst, config, params)
  return checkpoint.load_model(dst)


@pytest.fixture(scope="module")
def io(fixtures):
  return SafetensorsFile(fixtures / "wan21_t2v" / "io.safetensors")


@pytest.mark.parametrize("case,batch", [("a", 2), ("b", 2), ("c", 1)])
def test_outputs_match_original(model, io, case, batch):
  t = io.get(f"{case}.t")
  for b in range(batch):  # samples of a case may differ in shape
    out = model(jnp.asarray(io.get(f"{case}.x.{b}")[None]),
                jnp.asarray(t[b:b + 1]),
                jnp.asarray(io.get(f"{case}.context.{b}")[None]))
    testing.assert_close(out[0], io.get(f"{case}.out.{b}"))


def test_batched_call_and_intermediates(model, io):
  """Case a as one batch of 2 (contexts padded to text_len), and the
  intermediate activations the fixture stores."""
  text_len = model.config.text_len
  x = jnp.stack([io.get("a.x.0"), io.get("a.x.1")])
  ctx = np.zeros((2, text_len, 48), np.float32)
  for b in range(2):
    c = io.get(f"a.context.{b}")
    ctx[b, :len(c)] = c
  t = jnp.asarray(io.get("a.t"))
  emb, e, e0, ctx_emb, rope = model.embed(x, t, jnp.asarray(ctx))
  testing.assert_close(e, io.get("a.inter.time_embedding"))
  testing.assert_close(e0.reshape(2, -1), io.get("a.inter.time_projection"))
  testing.assert_close(ctx_emb, io.get("a.inter.text_embedding"))
  h, _ = model.run_blocks(emb, e0, ctx_emb, rope)
  testing.assert_close(h, io.get("a.inter.blocks.1"))
  testing.assert_close(model.head(h, e), io.get("a.inter.head"))
  out = model(x, t, jnp.asarray(ctx))
  for b in range(2):
    testing.assert_close(out[b], io.get(f"a.out.{b}"))
