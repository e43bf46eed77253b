"""The demo model's text encoder: caption tokens -> (B, L, dim) embeddings.

A small pre-norm transformer encoder over the demo vocabulary
(`data.VOCAB`, index 0 = padding), trained jointly with the DiT:

  h = word_embedding[tokens] + position_embedding
  per layer: h += SelfAttn(LN(h)) (padding keys masked); h += MLP(LN(h))
  out = LN_final(h), with padded positions set to zero

Padded positions are zeroed as Wan zero-pads its umT5 context, so the empty
caption (all padding) encodes to all zeros: the unconditional context of
classifier-free guidance. Everything runs in float32 (the encoder is tiny
next to the DiT). Layers are stacked on a leading axis and run under
`jax.lax.scan`, as WanDiT's blocks are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from astraea_jax.models import layers

F32 = jnp.float32
# Logit added to masked (padding) keys. Finite, so that a caption of only
# padding (CFG's empty caption) gives finite values forward and backward;
# those rows are zeroed at the output anyway.
MASKED_LOGIT = -1e9


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Caption encoder sizes (the demo preset: 128 wide, 4 heads, 2 layers)."""

  vocab_size: int
  text_len: int = 16
  dim: int = 128
  num_heads: int = 4
  mlp_dim: int = 512
  num_layers: int = 2
  eps: float = 1e-6

  def __post_init__(self):
    if self.dim % self.num_heads:
      raise ValueError(f"{self.dim=} must be divisible by {self.num_heads=}")
    if min(self.vocab_size, self.text_len, self.num_layers) < 1:
      raise ValueError(f"vocab_size, text_len and num_layers must be >= 1: "
                       f"{self}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> TextConfig:
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"unknown TextConfig fields: {unknown}")
    return cls(**d)


class TextLayer(nnx.Module):
  """Pre-norm transformer encoder layer with a padding mask."""

  def __init__(self, config: TextConfig, *, rngs: nnx.Rngs):
    c = config
    self.num_heads = c.num_heads
    kw = dict(dtype=F32, param_dtype=F32, rngs=rngs)
    self.norm1 = layers.LayerNorm(c.dim, eps=c.eps, param_dtype=F32,
                                  rngs=rngs)
    self.qkv = layers.linear(c.dim, 3 * c.dim, **kw)
    self.out = layers.linear(c.dim, c.dim, **kw)
    self.norm2 = layers.LayerNorm(c.dim, eps=c.eps, param_dtype=F32,
                                  rngs=rngs)
    self.fc1 = layers.linear(c.dim, c.mlp_dim, **kw)
    self.fc2 = layers.linear(c.mlp_dim, c.dim, **kw)

  def __call__(self, h, valid):
    """h (B, L, dim) f32; valid (B, L) bool (False = padding)."""
    b, length, dim = h.shape
    qkv = self.qkv(self.norm1(h)).reshape(b, length, 3, self.num_heads, -1)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, L, H, D)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                        precision=jax.lax.Precision.HIGHEST)
    logits = logits * q.shape[-1] ** -0.5
    logits = jnp.where(valid[:, None, None, :], logits, MASKED_LOGIT)
    probs = jax.nn.softmax(logits, axis=-1)
    attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v,
                      precision=jax.lax.Precision.HIGHEST)
    h = h + self.out(attn.reshape(b, length, dim))
    return h + self.fc2(jax.nn.gelu(self.fc1(self.norm2(h)),
                                    approximate=True))


class TextEncoder(nnx.Module):
  """`encoder(tokens (B, L) int) -> (B, text_len, dim) float32`."""

  def __init__(self, config: TextConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.word_embedding = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (c.vocab_size, c.dim), F32))
    self.position_embedding = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (c.text_len, c.dim), F32))

    self.layers = layers.stacked(lambda r: TextLayer(c, rngs=r), c.num_layers,
                                 rngs)
    self.final_norm = layers.LayerNorm(c.dim, eps=c.eps, param_dtype=F32,
                                       rngs=rngs)

  def __call__(self, tokens):
    c = self.config
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] > c.text_len:
      raise ValueError(
          f"tokens must be (B, L <= {c.text_len}); got {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integer ids; got {tokens.dtype}")
    tokens = jnp.pad(tokens, ((0, 0), (0, c.text_len - tokens.shape[1])))
    valid = tokens != 0
    h = (jnp.take(self.word_embedding[...], tokens, axis=0)
         + self.position_embedding[...][None])
    graphdef, state = nnx.split(self.layers)

    def body(h, layer_state):
      return nnx.merge(graphdef, layer_state)(h, valid), None

    h, _ = jax.lax.scan(body, h, state)
    return jnp.where(valid[..., None], self.final_norm(h), 0.0)
