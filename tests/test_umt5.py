"""umT5 text encoder, its converter and tokenizer, against the references.

References (all run here on the same random weights, every parameter
randomised, layer norms included):
* `transformers.UMT5EncoderModel`, loaded by transformers from the same
  `text_encoder/` folder our converter reads;
* diffusers `WanPipeline._get_t5_prompt_embeds` (prompt cleaning, tokenizer,
  encoder, truncation to each prompt's length and zero padding to 512);
* the original Wan code, `wan/modules/t5.py` `T5Encoder` (package `wan22`);
* `transformers.AutoTokenizer` / `PreTrainedTokenizerFast` on the same
  tokenizer files (a tiny SentencePiece Unigram model trained here, turned
  into tokenizer.json by transformers, as the published umT5 files were).

fp32 tolerance: max |ours - ref| <= 1e-5 * max|ref| + 1e-6. Same math in
both, only the summation order differs (float32 eps 1.2e-7, sums of <= 512
terms).
"""

import importlib
import io
import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _t5_cases import (assert_fp32_close, check_original_wan_layout,
                       hf_tensors, random_batch, random_hf_encoder, run_hf,
                       run_ours, write_folder)

from astraea_jax.models.text import umt5
from astraea_jax.models.text.tokenizer import (TokenizerFilesError,
                                               UMT5Tokenizer, clean_prompt)
from astraea_jax.models.text.umt5 import UMT5Config
from converters import umt5 as converter
from converters.common import CheckpointError, KeyMismatch

torch = importlib.import_module("torch")
transformers = importlib.import_module("transformers")

CONFIG = UMT5Config.tiny()

PROMPTS = [
    "A cat and a dog baking a cake together in a kitchen.",
    "  Bright tones,\toverexposed,\n\nstatic &amp;amp; blurred\u3000details ",
    "Ein Hund läuft über die Wiese; 猫がキッチンでケーキを焼いている。",
    "schÃ¶n wooden spoon",  # mojibake that ftfy repairs
    "worst quality, low quality, " * 12,  # longer than short max_lengths
    "",
]


# References and builders ------------------------------------------------------


def save_hf(model, folder, **kwargs):
  """The diffusers `text_encoder/` folder, written by transformers."""
  model.save_pretrained(folder, **kwargs)
  return folder


def ours_from_folder(folder, dtype="float32"):
  config, params = converter.read_checkpoint(folder, dtype=dtype)
  return umt5.from_params(config, params)


# Relative position buckets ----------------------------------------------------


@pytest.mark.parametrize("num_buckets,max_distance",
                         [(32, 128), (8, 16), (6, 10), (64, 300)])
def test_position_buckets_match_transformers(num_buckets, max_distance):
  """Every offset in (-1100, 1100): the umT5-XXL setting (32, 128) and
  others whose log-spaced bucket edges fall elsewhere."""
  attn = transformers.models.umt5.modeling_umt5.UMT5Attention(
      transformers.UMT5Config(
          relative_attention_num_buckets=num_buckets,
          relative_attention_max_distance=max_distance),
      has_relative_attention_bias=True)
  n = 1100
  rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
  ref = attn._relative_position_bucket(rel).numpy()
  ours = umt5.relative_position_buckets(
      n, n, num_buckets=num_buckets, max_distance=max_distance)
  np.testing.assert_array_equal(ours, ref)
  # Every bucket is exercised but "offset +0" (offset 0 counts as negative).
  assert len(np.unique(ref)) == num_buckets - 1


# Encoder parity ---------------------------------------------------------------


@pytest.mark.parametrize("config,length", [
    (CONFIG, 9),
    (CONFIG, 57),  # offsets beyond max_distance 16 share the last bucket
    (UMT5Config.tiny(relative_attention_num_buckets=32,
                     relative_attention_max_distance=128, num_layers=3),
     300),  # umT5-XXL's bucketing, offsets past 128
])
def test_encoder_matches_transformers(tmp_path, config, length):
  reference = random_hf_encoder(config, seed=length)
  ours = ours_from_folder(save_hf(reference, tmp_path / "text_encoder"))
  ids, mask = random_batch(config, length, seed=length)
  ref = run_hf(reference, ids, mask)
  out = run_ours(ours, ids, mask)
  assert_fp32_close(out, ref)
  # The padding mask matters: the same ids unmasked give other outputs.
  unmasked = run_ours(ours, ids, np.ones_like(mask))
  assert np.abs(unmasked[1, :length // 2] - out[1, :length // 2]).max() > 1e-2


def test_bfloat16_is_as_close_as_the_references_bfloat16(tmp_path):
  """bf16 weights and matmul inputs (float32 residual stream, norms,
  softmax, `wo`) vs the float32 reference, measured against transformers'
  own bf16 run of the same weights (`torch_dtype=torch.bfloat16`, which
  also keeps `wo` in float32): ours may be at most 1.5x as far from float32
  (measured over 3 seeds: 0.67x-1.02x; both ~1.5e-2 of max|ref|, the
  random N(0, 1) embeddings and biases make bf16 rounding show). It must
  also exceed fp32 rounding, so the bf16 path really ran."""
  reference = random_hf_encoder(CONFIG, seed=5)
  folder = save_hf(reference, tmp_path / "text_encoder")
  ours = ours_from_folder(folder, dtype="bfloat16")
  assert ours.blocks.attn.q.kernel[...].dtype == jnp.bfloat16
  reference_bf16 = transformers.UMT5EncoderModel.from_pretrained(
      folder, torch_dtype=torch.bfloat16).eval()
  ids, mask = random_batch(CONFIG, 33, seed=5)
  ref = run_hf(reference, ids, mask)
  with torch.no_grad():
    ref_bf16 = reference_bf16(torch.as_tensor(ids), torch.as_tensor(mask)
                              ).last_hidden_state.float().numpy()
  err = np.abs(run_ours(ours, ids, mask) - ref).max()
  err_reference = np.abs(ref_bf16 - ref).max()
  assert 1e-4 * np.abs(ref).max() < err <= 1.5 * err_reference, (
      err, err_reference)


def test_original_wan_layout_matches_original_code():
  """The original T5Encoder hard-codes max_dist=128; 150 tokens reach it."""
  check_original_wan_layout(
      CONFIG.replace(relative_attention_max_distance=128), seed=7)


# Converter: layouts, tied embeddings, errors ---------------------------------


def test_sharded_folder_and_model_root(tmp_path):
  """model-0000k-of-0000n.safetensors + index give the same parameters, and
  the model root (holding text_encoder/) is accepted."""
  reference = random_hf_encoder(CONFIG, seed=1)
  save_hf(reference, tmp_path / "single")
  save_hf(reference, tmp_path / "root" / "text_encoder",
          max_shard_size="20KB")
  shards = sorted(p.name
                  for p in (tmp_path / "root" / "text_encoder").iterdir())
  assert "model.safetensors.index.json" in shards and len(shards) > 3, shards
  config, single = converter.read_checkpoint(tmp_path / "single")
  config_sharded, sharded = converter.read_checkpoint(tmp_path / "root")
  assert config == config_sharded == CONFIG
  jax.tree.map(np.testing.assert_array_equal, sharded, single)


@pytest.mark.parametrize("present", ["both, different", "embed_tokens only"])
def test_embedding_names(tmp_path, present):
  """`encoder.embed_tokens.weight` is what the encoder reads: transformers
  unties it from `shared.weight` when they differ."""
  reference = random_hf_encoder(CONFIG, seed=2)
  tensors = hf_tensors(reference)
  other = np.random.default_rng(2).standard_normal(
      tensors["shared.weight"].shape).astype(np.float32)
  if present == "both, different":
    tensors["shared.weight"] = other
  else:
    del tensors["shared.weight"]
  folder = write_folder(tmp_path / "te", CONFIG, tensors)
  ids, mask = random_batch(CONFIG, 12, seed=2)
  ref = run_hf(transformers.UMT5EncoderModel.from_pretrained(folder).eval(),
               ids, mask)
  assert_fp32_close(run_ours(ours_from_folder(folder), ids, mask), ref)
  assert_fp32_close(run_hf(reference, ids, mask), ref)


def test_key_mismatch_names_every_offending_key(tmp_path):
  tensors = hf_tensors(random_hf_encoder(CONFIG, seed=3))
  del tensors["encoder.embed_tokens.weight"]
  del tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
  tensors["encoder.block.2.layer.0.SelfAttention.q.weight"] = np.zeros(
      (CONFIG.inner_dim, CONFIG.d_model), np.float32)
  tensors["encoder.final_layer_norm.weight"] = np.ones(
      CONFIG.d_model + 1, np.float32)
  folder = write_folder(tmp_path / "te", CONFIG, tensors)
  with pytest.raises(KeyMismatch) as e:
    converter.read_checkpoint(folder)
  assert e.value.missing == [
      "encoder.block.1.layer.1.DenseReluDense.wo.weight"]
  assert e.value.unexpected == [
      "encoder.block.2.layer.0.SelfAttention.q.weight"]
  assert e.value.misshapen == [
      (f"encoder.final_layer_norm.weight: checkpoint ({CONFIG.d_model + 1},),"
       f" expected ({CONFIG.d_model},)")]
  for name in ("DenseReluDense.wo.weight", "block.2.layer.0",
               "final_layer_norm"):
    assert name in str(e.value)


def test_missing_embedding_is_named(tmp_path):
  tensors = hf_tensors(random_hf_encoder(CONFIG, seed=3))
  del tensors["encoder.embed_tokens.weight"], tensors["shared.weight"]
  folder = write_folder(tmp_path / "te", CONFIG, tensors)
  with pytest.raises(KeyMismatch, match=r"shared\.weight \(or encoder\."
                     r"embed_tokens\.weight\)"):
    converter.read_checkpoint(folder)


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "t5"}, "per-layer position bias"),
    ({"feed_forward_proj": "relu"}, "feed_forward_proj='relu'"),
])
def test_unsupported_configs_are_refused(tmp_path, changes, message):
  tensors = hf_tensors(random_hf_encoder(CONFIG, seed=4))
  folder = write_folder(tmp_path / "te", CONFIG, tensors, **changes)
  with pytest.raises(CheckpointError, match=re.escape(message)):
    converter.read_checkpoint(folder)


def test_folder_without_config_is_refused(tmp_path):
  (tmp_path / "vae").mkdir()
  with pytest.raises(CheckpointError, match="text_encoder/config.json"):
    converter.read_checkpoint(tmp_path)


def test_expected_shapes_of_the_umt5_xxl_preset():
  """The published text_encoder: 24 layers x 10 tensors + embedding + final
  norm; sizes from Wan-AI/Wan2.1-T2V-*-Diffusers text_encoder/config.json."""
  shapes = converter.expected_checkpoint_shapes(UMT5Config.umt5_xxl())
  assert len(shapes) == 24 * 10 + 2
  assert shapes["shared.weight"] == (256384, 4096)
  assert shapes["encoder.block.23.layer.0.SelfAttention."
                "relative_attention_bias.weight"] == (32, 64)
  assert shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"] == (
      10240, 4096)
  assert shapes["encoder.block.0.layer.1.DenseReluDense.wo.weight"] == (
      4096, 10240)


# Tokenizer --------------------------------------------------------------------

CORPUS = [
    "A cat and a dog baking a cake together in a kitchen.",
    ("The cat is carefully measuring flour, while the dog is stirring the "
     "batter with a wooden spoon."),
    "Bright tones, overexposed, static, blurred details, subtitles, style.",
    "Ein Hund läuft über die Wiese; 猫がキッチンでケーキを焼いている。",
    "worst quality, low quality, JPEG compression residue, ugly, schön 123",
]


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
  """{"spm": folder with only spiece.model, "json": a diffusers model root
  whose tokenizer/ has tokenizer.json (+ spiece.model), "json_left": the
  same with padding_side left}. T5 ids: <pad> 0, </s> 1, <unk> 2."""
  import sentencepiece
  root = tmp_path_factory.mktemp("tokenizers")
  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS * 20), model_writer=model,
      vocab_size=96, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
      bos_id=-1, character_coverage=1.0, minloglevel=2)
  folders = {"spm": root / "spm", "json": root / "model",
             "json_left": root / "left"}
  settings = {"tokenizer_class": "T5Tokenizer", "extra_ids": 4,
              "pad_token": "<pad>", "eos_token": "</s>",
              "unk_token": "<unk>"}
  folders["spm"].mkdir()
  (folders["spm"] / "spiece.model").write_bytes(model.getvalue())
  (folders["spm"] / "tokenizer_config.json").write_text(json.dumps(settings))
  converted = transformers.AutoTokenizer.from_pretrained(folders["spm"])
  for name, side in (("json", "right"), ("json_left", "left")):
    converted.padding_side = side
    converted.save_pretrained(folders[name] / "tokenizer")
    (folders[name] / "tokenizer" / "spiece.model").write_bytes(
        model.getvalue())
  return folders


def test_clean_prompt_matches_diffusers():
  pipeline_wan = importlib.import_module("diffusers.pipelines.wan.pipeline_wan")
  odd_spaces = "".join(chr(c) for c in (*range(0x1c, 0x20), 0x85, 0xa0,
                                        0x2028, 0x3000, 0x200b, 0xfeff))
  texts = PROMPTS + [f"a{odd_spaces}b {odd_spaces}", "&lt;b&gt; &amp;amp;",
                     "\u00c3\u00a9t\u00c3\u00a9  \n"]
  for text in texts:
    assert clean_prompt(text) == pipeline_wan.prompt_clean(text), repr(text)
  assert clean_prompt(PROMPTS[3]) == "schön wooden spoon"  # ftfy ran


@pytest.mark.parametrize("folder", ["json", "json_left", "spm"])
@pytest.mark.parametrize("max_length", [8, 64])
def test_tokenizer_matches_transformers(tokenizer_folders, folder,
                                        max_length):
  """As the Wan pipeline calls its tokenizer (cleaned prompts, padded to
  max_length, truncated keeping </s>)."""
  pipeline_wan = importlib.import_module("diffusers.pipelines.wan.pipeline_wan")
  path = tokenizer_folders[folder]
  tok_path = path if folder == "spm" else path / "tokenizer"
  references = [transformers.AutoTokenizer.from_pretrained(tok_path)]
  if folder == "json":
    references.append(transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tok_path / "tokenizer.json"), pad_token="<pad>",
        eos_token="</s>"))
  ours = UMT5Tokenizer.from_folder(path)
  assert ours.source.endswith("spiece.model" if folder == "spm"
                              else "tokenizer.json")
  ids, mask = ours(PROMPTS, max_length)
  assert ids.dtype == mask.dtype == np.int32
  assert ids.shape == mask.shape == (len(PROMPTS), max_length)
  cleaned = [pipeline_wan.prompt_clean(p) for p in PROMPTS]
  for reference in references:
    ref = reference(cleaned, padding="max_length", max_length=max_length,
                    truncation=True, add_special_tokens=True,
                    return_attention_mask=True, return_tensors="np")
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
  lengths = mask.sum(1)
  assert lengths.max() == max_length and lengths.min() == 1  # cut and ""


def test_tokenizer_errors(tmp_path, tokenizer_folders):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text("{}")
  with pytest.raises(TokenizerFilesError, match=r"no tokenizer\.json or "
                     r"spiece\.model.*found \['config\.json'\]"):
    UMT5Tokenizer.from_folder(tmp_path / "empty")
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "tokenizer.json").write_bytes(
      (tokenizer_folders["json"] / "tokenizer" / "tokenizer.json"
       ).read_bytes())
  (bad / "tokenizer_config.json").write_text(
      json.dumps({"pad_token": "<nope>"}))
  with pytest.raises(TokenizerFilesError, match="pad_token '<nope>'"):
    UMT5Tokenizer.from_folder(bad)


# Wan's text context -----------------------------------------------------------


def test_wan_prompt_embeds_match_the_diffusers_pipeline(tmp_path,
                                                        tokenizer_folders):
  """`WanPipeline._get_t5_prompt_embeds` itself (the pipeline object is
  stood in for by the three attributes the method reads) against tokenizer
  + encoder + `wan_prompt_embeds`, at Wan's 512 tokens."""
  pipeline_wan = importlib.import_module("diffusers.pipelines.wan.pipeline_wan")
  root = tokenizer_folders["json"]
  reference = random_hf_encoder(CONFIG, seed=6)
  save_hf(reference, tmp_path / "text_encoder")
  pipe = types.SimpleNamespace(
      tokenizer=transformers.AutoTokenizer.from_pretrained(root / "tokenizer"),
      text_encoder=reference, _execution_device=torch.device("cpu"))
  with torch.no_grad():
    ref = pipeline_wan.WanPipeline._get_t5_prompt_embeds(
        pipe, prompt=PROMPTS, max_sequence_length=512).numpy()

  ids, mask = UMT5Tokenizer.from_folder(root)(PROMPTS, 512)
  out = run_ours(ours_from_folder(tmp_path), ids, mask, wan_text_len=512)
  assert_fp32_close(out, ref)
  lengths = mask.sum(1)
  for row, n in enumerate(lengths):
    assert np.all(out[row, n:] == 0) and np.all(ref[row, n:] == 0)
    assert np.all(np.abs(out[row, :n]).max(-1) > 0)


def test_wan_prompt_embeds_pads_and_checks_lengths():
  rng = np.random.default_rng(0)
  emb = jnp.asarray(rng.standard_normal((2, 5, 3)), jnp.float32)
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  out = np.asarray(umt5.wan_prompt_embeds(emb, mask, text_len=8))
  expected = np.zeros((2, 8, 3), np.float32)
  expected[0, :3], expected[1, :5] = emb[0, :3], emb[1]
  np.testing.assert_array_equal(out, expected)
  with pytest.raises(ValueError, match="exceeds text_len=4"):
    umt5.wan_prompt_embeds(emb, mask, text_len=4)


def test_cli_convert_and_load_model(tmp_path):
  """`astraea convert` detects a text encoder folder; load_model returns
  the encoder with the same parameters."""
  from astraea_jax import checkpoint, cli
  reference = random_hf_encoder(CONFIG, seed=2)
  save_hf(reference, tmp_path / "root" / "text_encoder")
  assert cli.main(["convert", str(tmp_path / "root"), str(tmp_path / "out"),
                   "--quiet"]) == 0
  model = checkpoint.load_model(tmp_path / "out")
  assert isinstance(model, umt5.UMT5Encoder) and model.config == CONFIG
  _, params = converter.read_checkpoint(tmp_path / "root")
  jax.tree.map(np.testing.assert_array_equal, checkpoint.params_of(model),
               params)
