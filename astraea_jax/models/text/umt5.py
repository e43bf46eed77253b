"""T5-family text encoders in Flax NNX: umT5 (Wan2.1) and T5 v1.1 (OpenSora).

The encoder half as `transformers.UMT5EncoderModel` / `T5EncoderModel`
compute it (identical to `wan/modules/t5.py` `T5Encoder` with
`shared_pos=False` / `True`):

  x = embed_tokens[ids]
  for each layer:                   # pre-norm residual blocks
    x += SelfAttention(rms_norm(x), mask, position_bias)
    x += wo(act(wi_0(rms_norm(x))) * wi_1(rms_norm(x)))
  out = final_layer_norm(x)

The one difference between the two, `UMT5Config.shared_position_bias`:
umT5 gives EVERY layer its own relative position bias table; T5 v1.1 has
one table, owned by layer 0 and reused by all layers (here it lives at the
top of the encoder and the bias is computed once). Both follow the T5
conventions: RMSNorm without mean subtraction or bias, no 1/sqrt(d)
scaling of the attention logits, no biases in any projection, gated-GELU
(tanh) feed-forward. `T5Config` / `T5Encoder` are the same classes.

Precision. The fp32 islands, whatever `config.dtype` says: the residual
stream, the RMSNorm statistics, the position bias, the attention logits and
softmax, and the FFN output projection `wo` (transformers keeps `wo` in
float32 too: `UMT5PreTrainedModel._keep_in_fp32_modules = ["wo"]`). The
other matmuls take their inputs in `config.dtype` and accumulate in float32.

Attention is implemented here and not through `layers.attention`: it needs
an additive position bias and a padding mask, and it is not on the DiT's
hot path (one call per prompt).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from astraea_jax.configs import ModelConfig
from astraea_jax.models import layers

F32 = jnp.float32

# Gated activations of `feed_forward_proj = "gated-<act>"`. transformers maps
# "gated-gelu" to `gelu_new`, the tanh approximation (the original Wan code
# writes the same formula out in its `GELU` module).
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class UMT5Config(ModelConfig):
  """T5-family encoder sizes, named as transformers' `UMT5Config` /
  `T5Config` name them."""

  MODEL: ClassVar[str] = "umt5"

  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"
  # False: umT5, one relative position bias table per layer. True: T5 (v1.1),
  # one table (layer 0's in transformers) shared by every layer.
  shared_position_bias: bool = False
  # Matmul inputs are cast to `dtype`; parameters are stored in
  # `param_dtype`. The fp32 islands (module docstring) ignore both.
  dtype: str = "float32"
  param_dtype: str = "float32"
  # `jax.lax.scan` unroll factor over the layers (True = fully unrolled).
  scan_unroll: int | bool = 1

  def __post_init__(self):
    kind, _, act = self.feed_forward_proj.partition("-")
    if kind != "gated" or act not in ACTIVATIONS:
      raise ValueError(
          f"{self.feed_forward_proj=} is not supported; expected one of "
          f"{['gated-' + a for a in ACTIVATIONS]} (umT5 and T5 v1.1 use "
          "gated-gelu)")
    if self.relative_attention_num_buckets < 4:
      raise ValueError(f"{self.relative_attention_num_buckets=} must be >= 4")
    half = self.relative_attention_num_buckets // 2
    if self.relative_attention_max_distance <= half // 2:
      raise ValueError(
          f"{self.relative_attention_max_distance=} must exceed the "
          f"{half // 2} exact buckets of each direction")
    self.check_dtypes()

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @property
  def activation(self):
    return ACTIVATIONS[self.feed_forward_proj.partition("-")[2]]

  # Presets ---------------------------------------------------------------

  @classmethod
  def umt5_xxl(cls, **overrides) -> UMT5Config:
    """Wan2.1's text encoder. Reference: `text_encoder/config.json` of
    Wan-AI/Wan2.1-T2V-*-Diffusers (google/umt5-xxl) and `umt5_xxl()` in
    `wan/modules/t5.py`."""
    kw = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240,
              num_layers=24, num_heads=64, relative_attention_num_buckets=32,
              relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
              feed_forward_proj="gated-gelu")
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def t5_v1_1_xxl(cls, **overrides) -> UMT5Config:
    """OpenSora v1.2's text encoder. Reference: `config.json` of
    DeepFloyd/t5-v1_1-xxl (google/t5-v1_1-xxl sizes), loaded by OpenSora's
    `T5Embedder` as a transformers `T5EncoderModel`."""
    kw = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
              num_layers=24, num_heads=64, relative_attention_num_buckets=32,
              relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
              feed_forward_proj="gated-gelu", shared_position_bias=True)
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def tiny(cls, **overrides) -> UMT5Config:
    """A few-kilobyte encoder for tests and the demo checkpoint."""
    kw = dict(vocab_size=512, d_model=32, d_kv=8, d_ff=48, num_layers=2,
              num_heads=4, relative_attention_num_buckets=8,
              relative_attention_max_distance=16)
    kw.update(overrides)
    return cls(**kw)


# Relative position buckets ---------------------------------------------------


def relative_position_buckets(query_len: int, key_len: int, *,
                              num_buckets: int, max_distance: int):
  """(query_len, key_len) int32 bucket of each relative offset (numpy).

  Bidirectional T5 bucketing (Raffel et al. 2020, section 2.1; the
  `_relative_position_bucket` of Mesh TensorFlow): offset r = key - query;
  half the buckets are for r > 0. Within a half of n = num_buckets // 2
  buckets, |r| < n/2 gets its own bucket; larger |r| share log-spaced
  buckets up to max_distance:
    n/2 + floor(log(|r| / (n/2)) / log(max_distance / (n/2)) * (n - n/2)),
  capped at n - 1. The log is taken in float32 as the references do, so
  that offsets on a bucket boundary fall on the same side.
  """
  rel = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  exact = half // 2
  ratio = np.maximum(dist, 1).astype(np.float32) / np.float32(exact)
  scaled = (np.log(ratio) / np.float32(math.log(max_distance / exact))
            * np.float32(half - exact))
  large = np.minimum(exact + scaled.astype(np.int64), half - 1)
  buckets += np.where(dist < exact, dist, large)
  return buckets.astype(np.int32)


# Modules -------------------------------------------------------------------


def _linear(d_in, d_out, *, dtype, param_dtype, rngs):
  """T5 projections: no bias; (in, out) kernel; inputs cast to `dtype`."""
  return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)


def _bias_table(config: UMT5Config, rngs: nnx.Rngs):
  """A random (num_buckets, num_heads) relative position bias table."""
  return nnx.Param(
      jax.random.normal(rngs.params(), (config.relative_attention_num_buckets,
                                        config.num_heads), config.weight_dtype)
      * config.d_model ** -0.5)


def position_bias(table, length: int, config: UMT5Config):
  """(num_heads, length, length) float32 additive logit bias from a
  (num_buckets, num_heads) table."""
  buckets = relative_position_buckets(
      length, length, num_buckets=config.relative_attention_num_buckets,
      max_distance=config.relative_attention_max_distance)
  table = table.astype(F32)
  return jnp.take(table, jnp.asarray(buckets), axis=0).transpose(2, 0, 1)


class SelfAttention(nnx.Module):
  """T5 self-attention with a relative position bias: this layer's own
  table (umT5), or the shared bias handed in by the encoder (T5)."""

  def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    kw = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype, rngs=rngs)
    self.q = _linear(c.d_model, c.inner_dim, **kw)
    self.k = _linear(c.d_model, c.inner_dim, **kw)
    self.v = _linear(c.d_model, c.inner_dim, **kw)
    self.o = _linear(c.inner_dim, c.d_model, **kw)
    self.relative_attention_bias = (None if c.shared_position_bias
                                    else _bias_table(c, rngs))

  def __call__(self, x, key_mask, shared_bias=None):
    """x (B, L, d_model); key_mask (B, L) bool, False = padding key;
    shared_bias (H, L, L) float32, given iff config.shared_position_bias."""
    if (shared_bias is None) != (self.relative_attention_bias is not None):
      raise ValueError(
          f"{self.config.shared_position_bias=}: the shared position bias "
          "must be given exactly when the layers have no table of their own")
    bias = shared_bias
    if bias is None:
      bias = position_bias(self.relative_attention_bias[...], x.shape[1],
                           self.config)
    heads = lambda t: t.reshape(*t.shape[:-1], self.config.num_heads, -1)
    q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
    out = t5_attention(q, k, v, bias, key_mask)
    return self.o(out.reshape(*out.shape[:-2], -1))


def t5_attention(q, k, v, position_bias, key_mask):
  """softmax(q k^T + bias, masked) v, without the 1/sqrt(d) scaling (T5).

  q, k, v: (B, L, H, D); position_bias (H, L, L) float32; key_mask (B, L)
  bool. Logits and softmax in float32; returns (B, L, H, D) in q.dtype.
  Masked keys get the float32 minimum, as transformers' additive mask does
  (so a fully masked row is uniform in both, not NaN).
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=F32)
  logits = logits + position_bias[None]
  logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(F32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                   preferred_element_type=F32)
  return out.astype(q.dtype)


class GatedFeedForward(nnx.Module):
  """wo(act(wi_0 x) * wi_1 x); `wo` runs in float32 (module docstring)."""

  def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
    c = config
    self.activation = c.activation
    kw = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype, rngs=rngs)
    self.wi_0 = _linear(c.d_model, c.d_ff, **kw)
    self.wi_1 = _linear(c.d_model, c.d_ff, **kw)
    self.wo = _linear(c.d_ff, c.d_model, dtype=F32,
                      param_dtype=c.weight_dtype, rngs=rngs)

  def __call__(self, x):
    return self.wo(self.activation(self.wi_0(x)) * self.wi_1(x))


class UMT5Layer(nnx.Module):
  """One pre-norm encoder layer (`UMT5Block` of an encoder)."""

  def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
    c = config
    norm = dict(eps=c.layer_norm_epsilon, param_dtype=c.weight_dtype,
                rngs=rngs)
    self.attn_norm = layers.RMSNorm(c.d_model, **norm)
    self.attn = SelfAttention(c, rngs=rngs)
    self.ffn_norm = layers.RMSNorm(c.d_model, **norm)
    self.ffn = GatedFeedForward(c, rngs=rngs)

  def __call__(self, x, key_mask, shared_bias=None):
    """x (B, L, d_model) float32 residual stream -> same."""
    x = x + self.attn(self.attn_norm(x), key_mask, shared_bias).astype(F32)
    return x + self.ffn(self.ffn_norm(x)).astype(F32)


class UMT5Encoder(nnx.Module):
  """`encoder(token_ids, attention_mask) -> (B, L, d_model) float32`.

  token_ids (B, L) integers in [0, vocab_size); attention_mask (B, L), 1 for
  real tokens and 0 for padding (None = no padding). Padded keys are
  ignored by every query; rows of padded queries are computed anyway and
  are not meaningful (Wan zeroes them: `wan_prompt_embeds`).
  """

  def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.embed_tokens = nnx.Embed(c.vocab_size, c.d_model,
                                  param_dtype=c.weight_dtype, rngs=rngs)
    self.blocks = layers.stacked(lambda r: UMT5Layer(c, rngs=r),
                                 c.num_layers, rngs)
    # T5: the one position bias table of all layers (transformers keeps it
    # in layer 0: `encoder.block.0.layer.0.SelfAttention.
    # relative_attention_bias`). umT5: None, each layer has its own.
    self.relative_attention_bias = (_bias_table(c, rngs)
                                    if c.shared_position_bias else None)
    self.final_layer_norm = layers.RMSNorm(
        c.d_model, eps=c.layer_norm_epsilon, param_dtype=c.weight_dtype,
        rngs=rngs)

  def embed(self, token_ids):
    """Gathers rows first and casts them after: the table can be 4 GB."""
    table = self.embed_tokens.embedding[...]
    return jnp.take(table, token_ids, axis=0).astype(F32)

  def run_blocks(self, x, key_mask):
    """All layers under `jax.lax.scan` over the stacked parameters."""
    graphdef, state = nnx.split(self.blocks)
    shared_bias = None
    if self.relative_attention_bias is not None:  # computed once (T5)
      shared_bias = position_bias(self.relative_attention_bias[...],
                                  x.shape[1], self.config)

    def body(x, layer_state):
      layer = nnx.merge(graphdef, layer_state)
      return layer(x, key_mask, shared_bias), None

    x, _ = jax.lax.scan(body, x, state, unroll=self.config.scan_unroll)
    return x

  def encode(self, token_ids, attention_mask=None):
    if token_ids.ndim != 2:
      raise ValueError(f"token_ids must be (B, L); got {token_ids.shape}")
    if attention_mask is None:
      attention_mask = jnp.ones(token_ids.shape, jnp.int32)
    if attention_mask.shape != token_ids.shape:
      raise ValueError(f"{attention_mask.shape=} must equal "
                       f"{token_ids.shape=}")
    key_mask = attention_mask != 0
    x = self.run_blocks(self.embed(token_ids), key_mask)
    return self.final_layer_norm(x).astype(F32)

  __call__ = encode

  def encode_for_wan(self, token_ids, attention_mask, *, text_len=512):
    """Wan's text context: `wan_prompt_embeds(encode(...), mask)`."""
    return wan_prompt_embeds(self.encode(token_ids, attention_mask),
                             attention_mask, text_len=text_len)


# Pure functions ---------------------------------------------------------------


def wan_prompt_embeds(embeddings, attention_mask, *, text_len=512):
  """Encoder outputs -> Wan's context: (B, text_len, d), zero past each prompt.

  As diffusers `WanPipeline._get_t5_prompt_embeds` and the original
  `T5EncoderModel.__call__` do: seq_len = number of nonzero mask entries;
  keep rows [0, seq_len) of each prompt, zero the rest, and zero-pad the
  length to `text_len` (the tokenizer pads to 512 already in Wan).
  """
  b, length = embeddings.shape[:2]
  if length > text_len:
    raise ValueError(f"embeddings length {length} exceeds {text_len=}")
  if attention_mask.shape != (b, length):
    raise ValueError(f"{attention_mask.shape=} must be {(b, length)}")
  seq_lens = jnp.sum(attention_mask != 0, axis=1)
  keep = jnp.arange(length)[None, :] < seq_lens[:, None]
  out = jnp.where(keep[..., None], embeddings, 0)
  return jnp.pad(out, ((0, 0), (0, text_len - length), (0, 0)))


# The same classes under the T5 names (T5 v1.1 = `shared_position_bias=True`,
# see `UMT5Config.t5_v1_1_xxl`).
T5Config = UMT5Config
T5Encoder = UMT5Encoder


def abstract_model(config: UMT5Config) -> UMT5Encoder:
  """The encoder with ShapeDtypeStruct leaves: shapes without memory."""
  return nnx.eval_shape(lambda: UMT5Encoder(config, rngs=nnx.Rngs(0)))


def from_params(config: UMT5Config, params: dict) -> UMT5Encoder:
  """The encoder holding `params` (a nested dict as `converters.umt5`
  returns), without initialising random weights first."""
  graphdef, state = nnx.split(abstract_model(config))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)
