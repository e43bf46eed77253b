"""`astraea convert`: both published layouts, sharding, dtypes, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from astraea_jax import checkpoint, cli, testing
from astraea_jax.configs import WanConfig
from converters import wan as wan_converter
from converters.safetensors_io import save_file

CONFIG = WanConfig.tiny(num_layers=2, dim=64, ffn_dim=96, num_heads=2,
                        text_len=8, text_dim=24, freq_dim=16)


def convert(src, dst, *extra):
  return cli.main(["convert", str(src), str(dst), "--quiet", *extra])


def run_model(path):
  model = checkpoint.load_model(path)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((1, 16, 2, 4, 6)), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((1, 5, CONFIG.text_dim)), jnp.float32)
  return np.asarray(model(x, jnp.array([321.0]), ctx))


@pytest.fixture(scope="module")
def tensors():
  return testing.random_wan_tensors(CONFIG, seed=3)


def to_layout(tensors, layout):
  return {wan_converter.from_original_key(k, layout): v
          for k, v in tensors.items()}


def test_layouts_and_shards_give_identical_outputs(tmp_path, tensors):
  outs = {}
  for layout, shards in (("wan", 1), ("wan", 3), ("diffusers", 1),
                         ("diffusers", 2)):
    src = testing.write_wan_checkpoint(
        tmp_path / f"src-{layout}-{shards}", CONFIG,
        to_layout(tensors, layout), layout=layout, shards=shards)
    dst = tmp_path / f"dst-{layout}-{shards}"
    extra = ["--text-len", str(CONFIG.text_len)] if layout == "diffusers" else []
    assert convert(src, dst, *extra) == 0
    assert json.loads((dst / "config.json").read_text())["text_len"] == 8
    outs[(layout, shards)] = run_model(dst)
  ref = outs[("wan", 1)]
  assert np.isfinite(ref).all() and np.abs(ref).max() > 0.1
  for key, out in outs.items():
    np.testing.assert_array_equal(out, ref, err_msg=str(key))


def test_params_land_where_the_key_map_says(tmp_path, tensors):
  src = testing.write_wan_checkpoint(tmp_path / "src", CONFIG, tensors)
  assert convert(src, tmp_path / "dst") == 0
  params = checkpoint.params_of(checkpoint.load_model(tmp_path / "dst"))
  np.testing.assert_array_equal(
      params["blocks"]["self_attn"]["q"]["kernel"][1],
      tensors["blocks.1.self_attn.q.weight"].T)
  np.testing.assert_array_equal(params["blocks"]["modulation"][0],
                                tensors["blocks.0.modulation"])
  back = wan_converter.to_checkpoint(params, CONFIG, "wan")
  assert back.keys() == tensors.keys()
  for k in tensors:
    np.testing.assert_array_equal(back[k], tensors[k], err_msg=k)


def test_bfloat16_is_bit_exact(tmp_path, tensors):
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  src = testing.write_wan_checkpoint(tmp_path / "src", CONFIG, bf16)
  assert convert(src, tmp_path / "dst", "--dtype", "bfloat16") == 0
  model = checkpoint.load_model(tmp_path / "dst")
  assert model.config.param_dtype == "bfloat16"
  # on the device, not NumPy: a jitted step would copy NumPy parameters
  # host -> device at every call
  leaves = jax.tree.leaves(nnx.state(model))
  assert all(isinstance(a, jax.Array) and a.is_fully_addressable
             and a.devices() == {jax.devices()[0]} for a in leaves)
  params = checkpoint.params_of(model)
  kernel = params["blocks"]["ffn"]["fc1"]["kernel"][0]
  assert kernel.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(kernel.view(np.uint16),
                                bf16["blocks.0.ffn.0.weight"].T.view(np.uint16))


# Bad input: a clear message, a non-zero exit, and nothing written. ----------


def assert_fails_cleanly(tmp_path, src, capsys, *needles, extra=()):
  dst = tmp_path / "dst"
  assert convert(src, dst, *extra) == 1
  err = capsys.readouterr().err
  for needle in needles:
    assert needle in err, f"{needle!r} not in error:\n{err}"
  assert not dst.exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".dst")]


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path, tensors,
                                                          capsys):
  bad = dict(tensors)
  del bad["blocks.1.cross_attn.norm_k.weight"]
  bad["blocks.0.self_attn.extra.weight"] = np.zeros((2,), np.float32)
  bad["head.head.weight"] = np.zeros((3, 3), np.float32)
  src = testing.write_wan_checkpoint(tmp_path / "src", CONFIG, bad)
  assert_fails_cleanly(tmp_path, src, capsys, "1 missing keys",
                       "blocks.1.cross_attn.norm_k.weight", "1 unexpected keys",
                       "blocks.0.self_attn.extra.weight", "1 wrong shapes",
                       "head.head.weight: checkpoint (3, 3), expected (64, 64)")


def test_extra_layers_are_unexpected(tmp_path, tensors, capsys):
  bad = dict(tensors)
  bad["blocks.2.modulation"] = tensors["blocks.0.modulation"]
  src = testing.write_wan_checkpoint(tmp_path / "src", CONFIG, bad)
  assert_fails_cleanly(tmp_path, src, capsys, "blocks.2.modulation")


def test_unknown_layout(tmp_path, capsys):
  src = tmp_path / "src"
  src.mkdir()
  (src / "config.json").write_text(json.dumps({"hidden_size": 3}))
  assert_fails_cleanly(tmp_path, src, capsys, "unknown layout", "hidden_size")


def test_format_mismatch(tmp_path, tensors, capsys):
  src = testing.write_wan_checkpoint(tmp_path / "src", CONFIG, tensors)
  assert_fails_cleanly(tmp_path, src, capsys, "--format diffusers requested",
                       extra=["--format", "diffusers"])


def test_missing_weights_file(tmp_path, tensors, capsys):
  src = testing.write_wan_checkpoint(tmp_path / "src", CONFIG, tensors)
  (src / "diffusion_pytorch_model.safetensors").unlink()
  assert_fails_cleanly(tmp_path, src, capsys,
                       "no diffusion_pytorch_model.safetensors")


def test_corrupt_header(tmp_path, tensors, capsys):
  src = testing.write_wan_checkpoint(tmp_path / "src", CONFIG, tensors)
  path = src / "diffusion_pytorch_model.safetensors"
  data = bytearray(path.read_bytes())
  data[8:20] = b"\xff" * 12
  path.write_bytes(bytes(data))
  assert_fails_cleanly(tmp_path, src, capsys, "corrupt header")


def test_not_safetensors(tmp_path, tensors, capsys):
  src = testing.write_wan_checkpoint(tmp_path / "src", CONFIG, tensors)
  (src / "diffusion_pytorch_model.safetensors").write_bytes(b"PK\x03\x04" * 64)
  assert_fails_cleanly(tmp_path, src, capsys, "exceeds the file size")


def test_truncated_file(tmp_path, tensors, capsys):
  src = testing.write_wan_checkpoint(tmp_path / "src", CONFIG, tensors)
  path = src / "diffusion_pytorch_model.safetensors"
  path.write_bytes(path.read_bytes()[:-1000])
  assert_fails_cleanly(tmp_path, src, capsys, "truncated")


def test_shard_index_lists_absent_file(tmp_path, tensors, capsys):
  src = testing.write_wan_checkpoint(tmp_path / "src", CONFIG, tensors,
                                     shards=2)
  (src / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
  assert_fails_cleanly(tmp_path, src, capsys, "shards that are absent",
                       "00002-of-00002")


def test_destination_exists_needs_overwrite(tmp_path, tensors, capsys):
  """--overwrite replaces an earlier conversion, never a folder of the
  user's (issue #20: it used to delete it)."""
  src = testing.write_wan_checkpoint(tmp_path / "src", CONFIG, tensors)
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  for extra in ((), ("--overwrite",)):
    assert convert(src, dst, *extra) == 1
    assert "is not an astraea-jax output" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "mine"
  ours = tmp_path / "ours"
  assert convert(src, ours) == 0
  assert convert(src, ours) == 1
  assert "already exists (an earlier astraea-jax output); pass --overwrite" \
      in capsys.readouterr().err
  (ours / "stale.txt").write_text("from the earlier run")
  assert convert(src, ours, "--overwrite") == 0
  assert not (ours / "stale.txt").exists()
  assert run_model(ours).shape == (1, 16, 2, 4, 6)


def test_load_model_on_a_plain_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a converted astraea-jax"):
    checkpoint.load_model(tmp_path)


def test_safetensors_writer_round_trip(tmp_path):
  from converters.safetensors_io import SafetensorsFile
  arrays = {"a": np.arange(6, dtype=np.int64).reshape(2, 3),
            "b": np.ones((4,), ml_dtypes.bfloat16)}
  save_file(arrays, tmp_path / "x.safetensors")
  f = SafetensorsFile(tmp_path / "x.safetensors")
  for k, v in arrays.items():
    np.testing.assert_array_equal(f.get(k), v)
    assert f.get(k).dtype == v.dtype
