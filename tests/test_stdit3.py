"""STDiT3 vs the outputs of the original OpenSora v1.2 code, and its converter.

Parity: the fixture's weights (original key names) go through
`converters.opensora.read_checkpoint` on a folder laid out as published
(config.json + model.safetensors), then the outputs of all three cases and
the case-a intermediates are compared with the reference's.
Tolerance: max abs error <= 1e-5 * max|reference| + 1e-6 (float32, same
math in a different order). Measured: outputs 1.4e-6 .. 2.3e-6 relative,
intermediates <= 2.5e-6 (the timestep embedder: torch's float32 exp is up
to 1 ulp off the correctly rounded frequencies used here).
"""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from astraea_jax.configs import STDiT3Config
from astraea_jax.models import stdit3, wan
from converters import opensora
from converters.common import CheckpointError, KeyMismatch, Source
from converters.safetensors_io import SafetensorsFile, save_file


def assert_close(actual, reference, rel=1e-5):
  actual, reference = np.asarray(actual), np.asarray(reference)
  assert actual.shape == reference.shape, (actual.shape, reference.shape)
  tol = rel * np.abs(reference).max() + 1e-6
  err = np.abs(actual.astype(np.float64) - reference).max()
  assert err <= tol, f"max abs error {err:.3g} > tolerance {tol:.3g}"


def published_config_json(config_fields):
  """config.json as `STDiT3.save_pretrained` writes it (transformers)."""
  return {"architectures": ["STDiT3"], "model_type": "STDiT3",
          "input_size": [None, None, None], "only_train_temporal": False,
          "freeze_y_embedder": True, "torch_dtype": "float32",
          "transformers_version": "4.46.3", **config_fields}


def write_folder(folder, config_json, tensors=None, weights_file=None):
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(config_json))
  if weights_file is not None:
    shutil.copy(weights_file, folder / "model.safetensors")
  else:
    save_file(tensors, folder / "model.safetensors")
  return folder


@pytest.fixture(scope="module")
def fixture_dir(fixtures):
  return fixtures / "opensora_stdit3"


@pytest.fixture(scope="module")
def meta(fixture_dir):
  return json.loads((fixture_dir / "meta.json").read_text())


@pytest.fixture(scope="module")
def io(fixture_dir):
  return SafetensorsFile(fixture_dir / "io.safetensors")


@pytest.fixture(scope="module")
def original_tensors(fixture_dir):
  weights = SafetensorsFile(fixture_dir / "weights.safetensors")
  names = weights.keys()  # a list (SafetensorsFile is not a mapping)
  return {k: np.array(weights.get(k)) for k in names}


@pytest.fixture(scope="module")
def converted(fixture_dir, meta, tmp_path_factory):
  """(config, params) read from a folder laid out as published."""
  folder = write_folder(tmp_path_factory.mktemp("stdit3") / "ckpt",
                        published_config_json(meta["config"]),
                        weights_file=fixture_dir / "weights.safetensors")
  return opensora.read_checkpoint(folder)


@pytest.fixture(scope="module")
def model(converted):
  return stdit3.model_from_params(*converted)


def jitted(model):
  """The jitted forward pass (params as arguments, as a sampler uses it)."""
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames="return_aux")
  def run(state, x, timestep, y, mask, x_mask, fps, height, width,
          return_aux=False):
    return nnx.merge(graphdef, state)(x, timestep, y, mask, x_mask, fps,
                                      height, width, return_aux=return_aux)

  return functools.partial(run, state)


@pytest.fixture(scope="module")
def forward(model):
  return jitted(model)


def case_inputs(io, case):
  get = lambda k: jnp.asarray(io.get(f"{case}.{k}"))
  return {"x": get("x"), "timestep": get("timestep"), "y": get("y"),
          "mask": get("mask") if case != "c" else None,
          "x_mask": get("x_mask") if case == "b" else None,
          "fps": get("fps"), "height": get("height"), "width": get("width")}


# Parity -----------------------------------------------------------------------


def test_converted_config_is_the_fixture_config(converted):
  assert converted[0] == STDiT3Config.tiny()


@pytest.mark.parametrize("case", ["a", "b", "c"])
def test_outputs_match_original(forward, io, case):
  """a: caption mask (8 and 5 valid tokens); b: a plus a frame mask (t0
  modulation); c: H, W not patch multiples (padded, cropped), no mask."""
  out = forward(**case_inputs(io, case))
  assert out.dtype == jnp.float32
  assert_close(out, io.get(f"{case}.out"))


def test_case_a_intermediates(model, io):
  c = model.config
  inp = case_inputs(io, "a")
  tokens = model.x_embedder(wan.patchify(inp["x"], c.patch_size))
  assert_close(tokens, io.get("a.inter.x_embedder"))
  scale = stdit3.position_scale(inp["height"], inp["width"], c.input_sq_size)
  pos = stdit3.position_embedding_2d((4, 4), c.hidden_size, scale)
  assert_close(pos[None], io.get("a.inter.pos_embed"))
  t_emb = model.t_embedder(stdit3.timestep_sinusoid(inp["timestep"], 256))
  assert_close(t_emb, io.get("a.inter.t_embedder"))
  fps_emb = model.fps_embedder(stdit3.timestep_sinusoid(inp["fps"], 256))
  assert_close(fps_emb, io.get("a.inter.fps_embedder"))
  assert_close(model.y_embedder(inp["y"][:, 0])[:, None],
               io.get("a.inter.y_embedder"))

  x, cond = model.embed(**inp)
  assert_close(cond.t_mlp, io.get("a.inter.t_block"))
  lse = {"spatial": [], "temporal": []}
  run_block = jax.jit(lambda graphdef, state, x, cond: nnx.merge(
      graphdef, state)(x, cond, (3, 16)), static_argnums=0)
  for i in range(c.depth):
    for kind in ("spatial", "temporal"):
      block = stdit3.layer(getattr(model, f"{kind}_blocks"), i)
      x, aux = run_block(*nnx.split(block), x, cond)
      assert_close(x, io.get(f"a.inter.{kind}_blocks.{i}"))
      lse[kind].append(aux["lse"])
  assert_close(model.final_layer(x, cond, (3, 16)),
               io.get("a.inter.final_layer"))

  # The scanned forward returns the same per-layer LSE (B, H, N).
  out, aux = jitted(model)(**inp, return_aux=True)
  assert_close(out, io.get("a.out"))
  for kind in ("spatial", "temporal"):
    assert aux[kind]["lse"].shape == (c.depth, 2, c.num_heads, 48)
    assert_close(aux[kind]["lse"], np.stack(lse[kind]))


def test_full_caption_mask_equals_no_mask(forward, io):
  """The masked cross-attention path equals the unmasked one when every
  token is valid, and a (1, L) mask is tiled over the batch."""
  inp = case_inputs(io, "a")
  no_mask = forward(**{**inp, "mask": None})
  ones = forward(**{**inp, "mask": jnp.ones((1, 8), jnp.int32)})
  assert_close(ones, no_mask, rel=1e-6)
  tiled = forward(**{**inp, "mask": inp["mask"][:1]})
  assert_close(tiled, forward(**{**inp, "mask": jnp.tile(inp["mask"][:1],
                                                          (2, 1))}), rel=0)


def test_all_true_frame_mask_equals_no_frame_mask(forward, io):
  inp = case_inputs(io, "a")
  masked = forward(**{**inp, "x_mask": jnp.ones((2, 3), bool)})
  assert_close(masked, io.get("a.out"))


def test_bfloat16_compute_stays_close(converted, io):
  """bfloat16 matmul inputs (8-bit mantissa, rounding 2^-9 relative) keep
  the output within 2% of the float32 reference (measured 0.4%)."""
  config, params = converted
  model = stdit3.model_from_params(config.replace(dtype="bfloat16"), params)
  out = jitted(model)(**case_inputs(io, "c"))
  assert out.dtype == jnp.float32
  assert_close(out, io.get("c.out"), rel=2e-2)


def test_input_errors_name_the_problem(model, io):
  inp = case_inputs(io, "a")
  with pytest.raises(ValueError, match=r"x must be \(B, 4, T, H, W\)"):
    model(**{**inp, "x": inp["x"][:, :3]})
  with pytest.raises(ValueError, match=r"x_mask must be bool \(2, 3\)"):
    model(**{**inp, "x_mask": jnp.ones((2, 4), bool)})
  with pytest.raises(ValueError, match="fps is required"):
    model(**{**inp, "fps": None})
  with pytest.raises(ValueError, match=r"mask must be \(b, 8\)"):
    model(**{**inp, "mask": jnp.ones((3, 8), jnp.int32)})


# Converter --------------------------------------------------------------------


def test_round_trip_is_bit_exact(converted, original_tensors):
  config, params = converted
  back = opensora.to_checkpoint(params, config)
  assert sorted(back) == sorted(original_tensors)
  for k, v in original_tensors.items():
    if k == "rope.freqs":  # not stored: recomputed, torch's pow is 1 ulp off
      np.testing.assert_allclose(back[k], v, rtol=3e-7)
    else:
      np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_bfloat16_conversion_is_the_rounded_float32(fixture_dir, meta,
                                                    converted, tmp_path):
  folder = write_folder(tmp_path / "ckpt",
                        published_config_json(meta["config"]),
                        weights_file=fixture_dir / "weights.safetensors")
  config, params = opensora.read_checkpoint(folder, dtype="bfloat16")
  assert config.param_dtype == config.dtype == "bfloat16"
  kernel = params["temporal_blocks"]["attn"]["qkv"]["kernel"]
  assert kernel.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(
      kernel, converted[1]["temporal_blocks"]["attn"]["qkv"]["kernel"]
      .astype(ml_dtypes.bfloat16))


def test_v13_condition_embedders_are_ignored(converted, original_tensors):
  extra = {f"x_embedder_cond{s}.proj.{w}": np.zeros(shape, np.float32)
           for s in ("", "_mask")
           for w, shape in (("weight", (64, 4, 1, 2, 2)), ("bias", (64,)))}
  params = opensora.load_params(
      Source.from_arrays({**original_tensors, **extra}), converted[0])
  for path, value in opensora.flatten_dict(params).items():
    np.testing.assert_array_equal(
        value, opensora.flatten_dict(converted[1])[path])


def test_key_mismatches_are_all_named(converted, original_tensors):
  tensors = dict(original_tensors)
  del tensors["temporal_blocks.1.attn.k_norm.weight"]
  del tensors["fps_embedder.mlp.2.bias"]
  tensors["spatial_blocks.2.mlp.fc1.weight"] = np.zeros((256, 64),
                                                        np.float32)
  tensors["pos_embed.inv_freq"] = np.zeros((16,), np.float32)
  tensors["y_embedder.y_embedding"] = np.zeros((9, 32), np.float32)
  with pytest.raises(KeyMismatch) as info:
    opensora.load_params(Source.from_arrays(tensors), converted[0])
  e, msg = info.value, str(info.value)
  assert e.missing == ["fps_embedder.mlp.2.bias",
                       "temporal_blocks.1.attn.k_norm.weight"]
  assert e.unexpected == ["pos_embed.inv_freq",
                          "spatial_blocks.2.mlp.fc1.weight"]
  assert e.misshapen == [("y_embedder.y_embedding: checkpoint (9, 32), "
                         "expected (8, 32)")]
  for name in e.missing + e.unexpected + e.misshapen:
    assert name in msg


def test_wrong_rope_frequencies_are_rejected(converted, original_tensors):
  tensors = {**original_tensors,
             "rope.freqs": original_tensors["rope.freqs"] * 1.1}
  with pytest.raises(CheckpointError, match="rope.freqs differs"):
    opensora.load_params(Source.from_arrays(tensors), converted[0])


@pytest.mark.parametrize("change,message", [
    ({"kernel_size": [8, 8, -1]}, "kernel_size=.* is not supported"),
    ({"skip_y_embedder": True}, "skip_y_embedder=True is not supported"),
    ({"skip_temporal": True}, "skip_temporal=True is not supported"),
    ({"use_spatial_rope": True}, "use_spatial_rope=True is not supported"),
    ({"model_type": "PixArt"}, "not an STDiT3 checkpoint"),
    ({"num_heads": 5}, "hidden_size=64 must be divisible by self.num_heads=5"),
])
def test_unsupported_configs_are_rejected(meta, change, message):
  with pytest.raises(CheckpointError, match=message):
    opensora.config_from_checkpoint(
        published_config_json({**meta["config"], **change}))


def test_folder_errors(meta, tmp_path, original_tensors):
  with pytest.raises(CheckpointError, match="no config.json"):
    opensora.read_checkpoint(tmp_path)
  cfg = published_config_json(meta["config"])
  del cfg["hidden_size"]
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match=r"lacks \['hidden_size'\]"):
    opensora.read_checkpoint(tmp_path)
  (tmp_path / "config.json").write_text(
      json.dumps(published_config_json(meta["config"])))
  with pytest.raises(CheckpointError, match="no model.safetensors"):
    opensora.read_checkpoint(tmp_path)


def test_sharded_checkpoint_loads_the_same(meta, converted, original_tensors,
                                           tmp_path):
  keys = sorted(original_tensors)
  halves = {"model-00001-of-00002.safetensors": keys[:40],
            "model-00002-of-00002.safetensors": keys[40:]}
  tmp_path.joinpath("config.json").write_text(
      json.dumps(published_config_json(meta["config"])))
  for name, names in halves.items():
    save_file({k: original_tensors[k] for k in names}, tmp_path / name)
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {k: n for n, ks in halves.items()
                                      for k in ks}}))
  _, params = opensora.read_checkpoint(tmp_path)
  flat = opensora.flatten_dict(converted[1])
  for path, value in opensora.flatten_dict(params).items():
    np.testing.assert_array_equal(value, flat[path])


# STDiT3-XL/2 preset (abstract evaluation, no weights) -------------------------


def xl_param_count(c, d=28):
  """Parameters of STDiT3-XL/2, counted layer by layer from the original."""
  lin = lambda i, o: i * o + o
  block = (6 * c + lin(c, 3 * c) + 2 * (c // 16) + lin(c, c)  # self-attn
           + lin(c, c) + lin(c, 2 * c) + lin(c, c)  # cross-attn
           + lin(c, 4 * c) + lin(4 * c, c))  # mlp
  top = (lin(4 * 4, c) + 2 * (lin(256, c) + lin(c, c)) + lin(c, 6 * c)
         + 300 * 4096 + lin(4096, c) + lin(c, c) + 2 * c + lin(c, 4 * 8))
  return 2 * d * block + top


def test_xl2_preset_shapes():
  config = STDiT3Config.opensora_v1_2()
  assert (config.head_dim, config.mlp_hidden, config.out_channels) == (
      72, 4608, 8)
  shapes = opensora.expected_checkpoint_shapes(config)
  assert len(shapes) == 21 + 2 * 28 * 17
  assert shapes["x_embedder.proj.weight"] == (1152, 4, 1, 2, 2)
  assert shapes["y_embedder.y_embedding"] == (300, 4096)
  assert shapes["y_embedder.y_proj.fc1.weight"] == (1152, 4096)
  assert shapes["t_block.1.weight"] == (6912, 1152)
  assert shapes["temporal_blocks.27.attn.qkv.weight"] == (3456, 1152)
  assert shapes["spatial_blocks.0.attn.q_norm.weight"] == (72,)
  assert shapes["spatial_blocks.0.cross_attn.kv_linear.weight"] == (2304,
                                                                    1152)
  assert shapes["spatial_blocks.0.mlp.fc1.weight"] == (4608, 1152)
  assert shapes["final_layer.linear.weight"] == (32, 1152)
  assert shapes["rope.freqs"] == (36,)

  model = stdit3.abstract_model(config)
  graphdef, state = nnx.split(model)
  count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state))
  assert count == xl_param_count(1152) == 1_208_872_736

  # A 480p-class latent: 51 frames of 480x848 -> (4, 15, 60, 106).
  spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype)
  out = jax.eval_shape(
      lambda s, *a: nnx.merge(graphdef, s)(*a), state,
      spec((2, 4, 15, 60, 106)), spec((2,)), spec((2, 1, 300, 4096)),
      spec((2, 300), jnp.int32), None, spec((2,)), spec((2,)), spec((2,)))
  assert out.shape == (2, 8, 15, 60, 106) and out.dtype == jnp.float32


def test_qk_norm_off_drops_the_norm_keys():
  config = STDiT3Config.tiny(qk_norm=False)
  shapes = opensora.expected_checkpoint_shapes(config)
  assert len(shapes) == 89 - 2 * 2 * 2
  assert not [k for k in shapes if "_norm" in k]
  assert opensora.config_from_checkpoint(
      published_config_json({"hidden_size": 64, "depth": 2, "num_heads": 4,
                             "caption_channels": 32, "model_max_length": 8,
                             "qk_norm": False})) == config


def test_cli_convert_and_load_model(fixture_dir, meta, io, tmp_path):
  """`astraea convert` detects the OpenSora folder; load_model returns an
  STDiT3 that reproduces case c."""
  from astraea_jax import checkpoint, cli
  folder = write_folder(tmp_path / "ckpt",
                        published_config_json(meta["config"]),
                        weights_file=fixture_dir / "weights.safetensors")
  assert cli.main(["convert", str(folder), str(tmp_path / "out"),
                   "--quiet"]) == 0
  model = checkpoint.load_model(tmp_path / "out")
  assert isinstance(model, stdit3.STDiT3)
  out = model(jnp.asarray(io.get("c.x")), jnp.asarray(io.get("c.timestep")),
              jnp.asarray(io.get("c.y")), fps=jnp.asarray(io.get("c.fps")),
              height=jnp.asarray(io.get("c.height")),
              width=jnp.asarray(io.get("c.width")))
  ref = io.get("c.out")
  assert np.abs(np.asarray(out) - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6
