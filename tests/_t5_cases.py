"""References and builders shared by tests/test_t5.py and tests/test_umt5.py.

The one T5-family implementation (`models/text/umt5.py`) is tested against
transformers' `T5EncoderModel` (one position bias table, shared: T5 v1.1,
OpenSora's) and `UMT5EncoderModel` (a table per layer: umT5, Wan's); which
of the two references a config gets is decided by its
`shared_position_bias`. Also the original Wan code's `T5Encoder`
(`wan/modules/t5.py`, package `wan22`), which implements both.

fp32 tolerance: max |ours - ref| <= 1e-5 * max|ref| + 1e-6. Same math in
both, only the summation order differs (float32 eps 1.2e-7, sums of <= 512
terms).
"""

import importlib
import importlib.util
import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax import testing
from astraea_jax.models.text import umt5
from astraea_jax.models.text.umt5 import UMT5Config
from converters import umt5 as converter
from converters.common import Source
from converters.safetensors_io import save_file

torch = importlib.import_module("torch")
transformers = importlib.import_module("transformers")


def assert_fp32_close(out, ref):
  out, ref = np.asarray(out), np.asarray(ref)
  assert out.shape == ref.shape, (out.shape, ref.shape)
  err = np.abs(out.astype(np.float64) - ref).max()
  bound = 1e-5 * np.abs(ref).max() + 1e-6
  assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


def hf_classes(config: UMT5Config):
  """(transformers config class, encoder class) of the reference: T5 for
  the shared position bias table, umT5 for per-layer tables."""
  if config.shared_position_bias:
    return transformers.T5Config, transformers.T5EncoderModel
  return transformers.UMT5Config, transformers.UMT5EncoderModel


def hf_config(config: UMT5Config):
  config_class, _ = hf_classes(config)
  return config_class(
      vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv,
      d_ff=config.d_ff, num_layers=config.num_layers,
      num_heads=config.num_heads,
      relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance,
      layer_norm_epsilon=config.layer_norm_epsilon,
      feed_forward_proj=config.feed_forward_proj, dropout_rate=0.0)


def random_hf_encoder(config: UMT5Config, seed=0):
  """The reference encoder with every parameter random: projections N(0,
  1/fan_in), embeddings and position biases N(0, 1), norm gains 1 + N(0,
  0.2^2) (transformers initialises gains to 1, which would hide a
  misplaced gain)."""
  _, encoder_class = hf_classes(config)
  model = encoder_class(hf_config(config)).eval()
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


def write_folder(folder, config, tensors, **config_changes):
  """A text encoder folder: the reference's config.json (with
  `config_changes`) and `tensors` as model.safetensors."""
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(
      {**hf_config(config).to_dict(), **config_changes}))
  save_file(tensors, folder / "model.safetensors")
  return folder


def run_ours(model, ids, mask, *, wan_text_len=None):
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids, mask):
    encoder = nnx.merge(graphdef, state)
    if wan_text_len is None:
      return encoder(ids, mask)
    return encoder.encode_for_wan(ids, mask, text_len=wan_text_len)

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


def check_original_wan_layout(config: UMT5Config, seed):
  """Random reference weights written in the original Wan layout: they read
  back to the same parameters, and the original `T5Encoder` (shared_pos as
  the config says) on them matches ours at 150 tokens. Returns the
  original-layout tensors."""
  params = converter.load_params(
      Source.from_arrays(hf_tensors(random_hf_encoder(config, seed=seed))),
      config)
  wan_tensors = converter.to_checkpoint(params, config, layout="wan")
  reference = load_wan_t5_module().T5Encoder(
      vocab=config.vocab_size, dim=config.d_model, dim_attn=config.inner_dim,
      dim_ffn=config.d_ff, num_heads=config.num_heads,
      num_layers=config.num_layers,
      num_buckets=config.relative_attention_num_buckets,
      shared_pos=config.shared_position_bias, dropout=0.0).eval()
  reference.load_state_dict({k: torch.from_numpy(v)
                             for k, v in wan_tensors.items()})
  back = converter.load_params(Source.from_arrays(wan_tensors), config,
                               layout="wan")
  jax.tree.map(np.testing.assert_array_equal, back, params)
  ids, mask = random_batch(config, 150, seed=seed)
  with torch.no_grad():
    ref = reference(torch.as_tensor(ids), torch.as_tensor(mask)).numpy()
  assert_fp32_close(run_ours(umt5.from_params(config, params), ids, mask),
                    ref)
  return wan_tensors


def load_wan_t5_module():
  """`wan/modules/t5.py` of the wan22 package, up to its `T5EncoderModel`
  wrapper (whose default argument calls torch.cuda at import) and without
  its tokenizer import; wan/__init__ is not run (it touches CUDA)."""
  path = str(testing.wan22_dir() / "modules" / "t5.py")
  with open(path) as f:
    source = f.read()
  source = source[:source.index("class T5EncoderModel")]
  source = re.sub(r"^from \.tokenizers import .*$", "", source,
                  flags=re.MULTILINE)
  module = types.ModuleType("wan_t5_reference")
  exec(compile(source, path, "exec"), module.__dict__)  # noqa: S102
  return module
