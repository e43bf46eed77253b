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

import re

import jax
import numpy as np
import pytest
from _t5_cases import (assert_fp32_close, check_original_wan_layout,
                       hf_tensors, random_batch, random_hf_encoder, run_hf,
                       run_ours, write_folder)

import converters
from astraea_jax.models.text import umt5
from astraea_jax.models.text.umt5 import T5Config, T5Encoder, UMT5Config
from converters import umt5 as converter
from converters.common import CheckpointError, KeyMismatch

CONFIG = T5Config.tiny(shared_position_bias=True)
BIAS_KEY = ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias."
            "weight")


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
  wan_tensors = check_original_wan_layout(config, seed=4)
  assert "pos_embedding.embedding.weight" in wan_tensors
  assert not any(k.startswith("blocks.") and "pos_embedding" in k
                 for k in wan_tensors)
