"""T5 v1.1 text encoder (OpenSora v1.2's), the shared-position-bias side of
the one T5-family implementation in `models/text/umt5.py`.

References, run here on the same random weights (every parameter random,
layer norm gains and the position bias table included):
* `transformers.T5EncoderModel`, loaded by transformers from the same folder
  our converter reads (OpenSora's `T5Embedder` runs this class);
* the original Wan code's `T5Encoder(shared_pos=True)` (`wan/modules/t5.py`,
  package `wan22`), for the original-layout names of the shared table.

fp32 tolerance: max |ours - ref| <= 1e-5 * max|ref| + 1e-6 (same math, only
the summation order differs; float32 eps 1.2e-7, sums of <= 512 terms).
"""

import importlib
import importlib.util
import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import converters
from astraea_jax.models.text import umt5
from astraea_jax.models.text.umt5 import T5Config, T5Encoder, UMT5Config
from converters import umt5 as converter
from converters.common import CheckpointError, KeyMismatch, Source
from converters.safetensors_io import save_file

torch = importlib.import_module("torch")
transformers = importlib.import_module("transformers")

CONFIG = T5Config.tiny(shared_position_bias=True)
BIAS_KEY = ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias."
            "weight")


def assert_fp32_close(out, ref):
  out, ref = np.asarray(out), np.asarray(ref)
  assert out.shape == ref.shape, (out.shape, ref.shape)
  err = np.abs(out.astype(np.float64) - ref).max()
  bound = 1e-5 * np.abs(ref).max() + 1e-6
  assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


def hf_config(config: UMT5Config):
  return transformers.T5Config(
      vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv,
      d_ff=config.d_ff, num_layers=config.num_layers,
      num_heads=config.num_heads,
      relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance,
      layer_norm_epsilon=config.layer_norm_epsilon,
      feed_forward_proj=config.feed_forward_proj, dropout_rate=0.0)


def random_hf_encoder(config: UMT5Config, seed=0):
  """T5EncoderModel with every parameter random: projections N(0, 1/fan_in),
  embeddings and the position bias N(0, 1), norm gains 1 + N(0, 0.2^2)."""
  model = transformers.T5EncoderModel(hf_config(config)).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "layer_norm" in name:
        p.copy_(1 + 0.2 * noise)
      elif name.endswith(("shared.weight", "relative_attention_bias.weight")):
        p.copy_(noise)
      else:
        p.copy_(noise / p.shape[1] ** 0.5)
  return model


def hf_tensors(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def run_ours(model, ids, mask):
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)

  return np.asarray(run(state, jnp.asarray(ids, jnp.int32),
                        jnp.asarray(mask, jnp.int32)))


def run_hf(model, ids, mask):
  with torch.no_grad():
    return model(torch.as_tensor(ids, dtype=torch.long),
                 torch.as_tensor(mask, dtype=torch.long)
                 ).last_hidden_state.numpy()


def random_batch(config, length, seed=0):
  """3 sequences: no padding, padded after length//2, a single real token."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, config.vocab_size, (3, length))
  mask = np.ones((3, length), np.int64)
  mask[1, length // 2:] = 0
  mask[2, 1:] = 0
  return ids, mask


@pytest.mark.parametrize("config,length", [
    (CONFIG, 9),
    (CONFIG, 57),  # offsets beyond max_distance 16 share the last bucket
    (T5Config.tiny(relative_attention_num_buckets=32,
                   relative_attention_max_distance=128, num_layers=3,
                   shared_position_bias=True),
     300),  # T5-v1.1-XXL's bucketing at OpenSora's 300 tokens
])
def test_encoder_matches_transformers_t5(tmp_path, config, length):
  reference = random_hf_encoder(config, seed=length)
  reference.save_pretrained(tmp_path / "t5")
  read_config, params = converter.read_checkpoint(tmp_path / "t5")
  assert read_config == config and read_config.shared_position_bias
  ours = umt5.from_params(read_config, params)
  assert isinstance(ours, T5Encoder)
  ids, mask = random_batch(config, length, seed=length)
  out = run_ours(ours, ids, mask)
  assert_fp32_close(out, run_hf(reference, ids, mask))
  # The one table really drives every layer: giving layer 1 and up a
  # different bias (as a per-layer umT5 would) changes the output.
  other = jax.tree.map(np.copy, params)
  other["relative_attention_bias"] = -params["relative_attention_bias"]
  changed = run_ours(umt5.from_params(config, other), ids, mask)
  assert np.abs(changed - out).max() > 1e-2


def test_shared_table_lives_at_the_top_and_nowhere_else():
  t5 = umt5.abstract_model(CONFIG)
  assert t5.relative_attention_bias.shape == (
      CONFIG.relative_attention_num_buckets, CONFIG.num_heads)
  assert t5.blocks.attn.relative_attention_bias is None
  per_layer = umt5.abstract_model(CONFIG.replace(shared_position_bias=False))
  assert per_layer.relative_attention_bias is None
  assert per_layer.blocks.attn.relative_attention_bias.shape == (
      CONFIG.num_layers, CONFIG.relative_attention_num_buckets,
      CONFIG.num_heads)


def test_expected_shapes_of_the_t5_v1_1_xxl_preset():
  """DeepFloyd/t5-v1_1-xxl: 24 blocks x 9 tensors + the block-0 position
  bias + embedding + final norm (its config.json: d_model 4096, d_ff 10240,
  64 heads x 64, vocab 32128)."""
  config = T5Config.t5_v1_1_xxl()
  shapes = converter.expected_checkpoint_shapes(config)
  assert len(shapes) == 24 * 9 + 3
  assert shapes["shared.weight"] == (32128, 4096)
  assert shapes[BIAS_KEY] == (32, 64)
  assert not any("block.1.layer.0.SelfAttention.relative" in k
                 for k in shapes)
  assert shapes["encoder.block.23.layer.1.DenseReluDense.wi_1.weight"] == (
      10240, 4096)
  assert shapes["encoder.block.23.layer.0.SelfAttention.o.weight"] == (
      4096, 4096)


def write_folder(folder, config, tensors, **config_changes):
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(
      {**hf_config(config).to_dict(), **config_changes}))
  save_file(tensors, folder / "model.safetensors")
  return folder


def test_t5_weights_labelled_umt5_are_refused_by_name(tmp_path):
  tensors = hf_tensors(random_hf_encoder(CONFIG, seed=1))
  folder = write_folder(tmp_path / "te", CONFIG, tensors, model_type="umt5")
  with pytest.raises(CheckpointError, match=re.escape(
      "position bias in block 0 only: is it a T5 encoder (model_type 't5')")):
    converter.read_checkpoint(folder)


def test_key_mismatch_names_the_shared_table(tmp_path):
  tensors = hf_tensors(random_hf_encoder(CONFIG, seed=2))
  del tensors[BIAS_KEY]
  folder = write_folder(tmp_path / "te", CONFIG, tensors)
  with pytest.raises(KeyMismatch, match="T5 diffusers layout") as e:
    converter.read_checkpoint(folder)
  assert e.value.missing == [BIAS_KEY] and not e.value.unexpected


def test_format_detection_convert_and_load(tmp_path):
  """A T5EncoderModel folder, and a model root holding it as text_encoder/,
  are format "t5"; `astraea convert` + load_model give the same encoder."""
  from astraea_jax import checkpoint, cli
  reference = random_hf_encoder(CONFIG, seed=3)
  reference.save_pretrained(tmp_path / "t5")
  reference.save_pretrained(tmp_path / "root" / "text_encoder")
  assert converters.detect_format(tmp_path / "t5") == "t5"
  assert converters.detect_format(tmp_path / "root") == "t5"
  config, params, fmt = converters.read_checkpoint(tmp_path / "root")
  assert fmt == "t5" and config == CONFIG
  assert cli.main(["convert", str(tmp_path / "t5"), str(tmp_path / "out"),
                   "--quiet"]) == 0
  model = checkpoint.load_model(tmp_path / "out")
  assert isinstance(model, T5Encoder) and model.config == CONFIG
  jax.tree.map(np.testing.assert_array_equal, checkpoint.params_of(model),
               params)
  assert UMT5Config.from_dict(CONFIG.to_dict()) == CONFIG


def test_original_wan_layout_with_shared_position_bias():
  """`T5Encoder(shared_pos=True)` of the original code stores the one table
  as top-level `pos_embedding.embedding.weight`; max_dist is 128 there."""
  config = CONFIG.replace(relative_attention_max_distance=128)
  params = converter.load_params(
      Source.from_arrays(hf_tensors(random_hf_encoder(config, seed=4))),
      config)
  wan_tensors = converter.to_checkpoint(params, config, layout="wan")
  assert "pos_embedding.embedding.weight" in wan_tensors
  assert not any(k.startswith("blocks.") and "pos_embedding" in k
                 for k in wan_tensors)
  reference = load_wan_t5_module().T5Encoder(
      vocab=config.vocab_size, dim=config.d_model, dim_attn=config.inner_dim,
      dim_ffn=config.d_ff, num_heads=config.num_heads,
      num_layers=config.num_layers,
      num_buckets=config.relative_attention_num_buckets, shared_pos=True,
      dropout=0.0).eval()
  reference.load_state_dict({k: torch.from_numpy(v)
                             for k, v in wan_tensors.items()})
  back = converter.load_params(Source.from_arrays(wan_tensors), config,
                               layout="wan")
  jax.tree.map(np.testing.assert_array_equal, back, params)
  ids, mask = random_batch(config, 150, seed=4)
  with torch.no_grad():
    ref = reference(torch.as_tensor(ids), torch.as_tensor(mask)).numpy()
  assert_fp32_close(run_ours(umt5.from_params(config, params), ids, mask),
                    ref)


def load_wan_t5_module():
  """`wan/modules/t5.py` of wan22 up to its CUDA-touching `T5EncoderModel`
  wrapper, without its tokenizer import; wan/__init__ is not run."""
  spec = importlib.util.find_spec("wan")
  if spec is None:
    raise ImportError("wan22 is not installed (pip install --no-deps wan22)")
  path = spec.submodule_search_locations[0] + "/modules/t5.py"
  with open(path) as f:
    source = f.read()
  source = source[:source.index("class T5EncoderModel")]
  source = re.sub(r"^from \.tokenizers import .*$", "", source,
                  flags=re.MULTILINE)
  module = types.ModuleType("wan_t5_reference")
  exec(compile(source, path, "exec"), module.__dict__)  # noqa: S102
  return module
