"""Wan2.1 / Wan2.2 diffusion transformer (WanDiT) in Flax NNX.

Follows `wan/modules/model.py` of Wan-Video/Wan2.1 (class `WanModel`, t2v)
and of the `wan22` package, which adds two inputs that the Wan2.2 models
use (every Wan2.2 DiT has Wan2.1's block and parameters):
  * per-token timesteps, timestep (B, L): TI2V-5B gives the tokens of the
    conditioning first frame t = 0 and the others the step's t, so the
    time embedding and the modulation tables become per token;
  * conditioning channels (I2V-A14B: in_dim 36 = 16 noisy latent channels
    + 4 mask + 16 image latent channels), concatenated to the latents
    before the patch embedding (`condition=`).
Parameter names keep the original checkpoint's names so the converter's key
map stays short (converters/wan.py). Reading order: embeddings -> attention
-> block -> WanDiT -> pure functions over parameters at the bottom.

Precision (the original's fp32 islands, `amp.autocast(dtype=float32)`): the
time MLP, the modulation tables, LayerNorm/RMSNorm statistics, the residual
stream and the output head run in float32; every other matmul takes its
inputs in `config.dtype` (float32 or bfloat16).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from astraea_jax.configs import WanConfig
from astraea_jax.models import layers

F32 = jnp.float32


class MLP(nnx.Module):
  """fc1 -> activation -> fc2 (the original's nn.Sequential(0, 1, 2))."""

  def __init__(self, d_in, d_hidden, d_out, *, activation, dtype, param_dtype,
               rngs):
    self.activation = activation
    self.fc1 = layers.linear(d_in, d_hidden, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)
    self.fc2 = layers.linear(d_hidden, d_out, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(self.activation(self.fc1(x)))


def gelu_tanh(x):
  """GELU, tanh approximation, evaluated in float32, returned in x.dtype.

  PyTorch's `F.gelu(x, approximate="tanh")` (original Wan, diffusers, timm's
  Mlp in OpenSora) computes in float32 for bf16 inputs. Evaluated in bf16,
  even the polynomial's constants round (0.044715 -> 0.04468, sqrt(2/pi)
  -> 0.7969) and tanh's argument loses 8 bits. The op is memory-bound and
  fused with its neighbours, so float32 inside costs no time.
  """
  return jax.nn.gelu(x.astype(F32), approximate=True).astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head attention with RMSNorm on q and k over the full dim.

  Self-attention applies 3-D RoPE; cross-attention (`rope=None`) does not.
  """

  def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
    c = config
    self.num_heads = c.num_heads
    kw = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype, rngs=rngs)
    self.q = layers.linear(c.dim, c.dim, **kw)
    self.k = layers.linear(c.dim, c.dim, **kw)
    self.v = layers.linear(c.dim, c.dim, **kw)
    self.o = layers.linear(c.dim, c.dim, **kw)
    self.norm_q = layers.RMSNorm(c.dim, eps=c.eps, param_dtype=c.weight_dtype,
                                 rngs=rngs)
    self.norm_k = layers.RMSNorm(c.dim, eps=c.eps, param_dtype=c.weight_dtype,
                                 rngs=rngs)

  def _heads(self, x):  # (B, L, dim) -> (B, L, H, D)
    return x.reshape(*x.shape[:-1], self.num_heads, -1)

  def query(self, x, rope=None):
    q = self._heads(self.norm_q(self.q(x)))
    return q if rope is None else layers.apply_rope(q, rope)

  def key_value(self, x, rope=None):
    k = self._heads(self.norm_k(self.k(x)))
    v = self._heads(self.v(x))
    return (k if rope is None else layers.apply_rope(k, rope)), v

  def output(self, attn_out):  # (B, L, H, D) -> (B, L, dim)
    return self.o(attn_out.reshape(*attn_out.shape[:-2], -1))

  def __call__(self, x, context=None, rope=None):
    """Returns (out (B, L, dim), lse (B, H, L))."""
    kv_src = x if context is None else context
    q = self.query(x, rope)
    k, v = self.key_value(kv_src, rope)
    out, lse = layers.attention(q, k, v)
    return self.output(out), lse


class WanBlock(nnx.Module):
  """One transformer block (`WanAttentionBlock`).

    m = modulation + e0      # shift1, scale1, gate1, shift2, scale2, gate2
    x += gate1 * SelfAttn(LN(x) * (1 + scale1) + shift1)
    x += CrossAttn(norm3(x), context)
    x += gate2 * FFN(LN(x) * (1 + scale2) + shift2)
  """

  def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
    c = config
    self.eps = c.eps
    self.modulation = nnx.Param(
        jax.random.normal(rngs.params(), (1, 6, c.dim), c.weight_dtype)
        * c.dim ** -0.5)
    self.self_attn = Attention(c, rngs=rngs)
    self.norm3 = layers.LayerNorm(c.dim, eps=c.eps,
                                  param_dtype=c.weight_dtype, rngs=rngs)
    self.cross_attn = Attention(c, rngs=rngs)
    self.ffn = MLP(c.dim, c.ffn_dim, c.dim, activation=gelu_tanh,
                   dtype=c.compute_dtype, param_dtype=c.weight_dtype,
                   rngs=rngs)

  def modulate(self, e0):
    """e0 (B, 6, dim), or per token (B, L, 6, dim), float32 -> six
    (B, 1 or L, dim) float32 tables."""
    m = self.modulation[...].astype(F32) + e0
    m = m[:, None] if m.ndim == 3 else m
    return tuple(m[:, :, i] for i in range(6))

  def self_attn_input(self, x, e0):
    """The self-attention's input LN(x)(1 + scale1) + shift1 (B, N, dim)
    (what StepCache watches at block 0)."""
    shift1, scale1 = self.modulate(e0)[:2]
    return self._modulated(x, shift1, scale1)

  def _modulated(self, x, shift, scale):
    return layers.layer_norm(x, self.eps) * (1 + scale) + shift

  def __call__(self, x, e0, context, rope, token_index=None, *,
               attention=None, self_attn_out=None,
               cross_attn_out=None, keep_attention_outputs: bool = False,
               cross_entropy: bool = False):
    """x (B, N, dim) f32; e0 (B, 6, dim) f32; context (B, text_len, dim).

    The one Wan block forward: the dense model, Astraea, every baseline
    policy and sequence parallelism run it, each through its hooks.

    token_index: optional (B, K) sorted rows of x to compute (Astraea's
      token selection). Keys/values always come from ALL N tokens, so every
      computed attention row is exact; queries, cross-attention and the FFN
      run on the K selected tokens only.
    attention: the self-attention function `(q, k, v) -> (out, lse)`;
      None = `layers.attention` (sequence parallelism passes its own).
    self_attn_out / cross_attn_out: (B, N, dim) attention outputs (after
      the output projection, before the gate) to reuse instead of computing
      them (PAB's broadcast); they do not combine with token_index.
    keep_attention_outputs: also return the attention outputs computed
      here (not those given).
    cross_entropy: also return the cross-attention entropy (ToCa's score).

    Returns (x_out, aux): x_out (B, K or N, dim) f32 for the computed tokens;
    aux["lse"] (B, H, K or N) is the self-attention log-sum-exp that
    Astraea's token scores read (when self-attention ran);
    aux["self_attn_out"], aux["cross_attn_out"] when computed and kept;
    aux["cross_entropy"] (B, H, K or N) when asked.
    """
    if token_index is not None and (self_attn_out is not None
                                    or cross_attn_out is not None):
      raise ValueError("token selection and attention reuse do not combine")
    shift1, scale1, gate1, shift2, scale2, gate2 = self.modulate(e0)
    aux, computed = {}, {}
    if self_attn_out is None:
      # In the projections' dtype at once (they cast to it anyway): with
      # token selection the K chosen rows are gathered from h, which XLA
      # otherwise writes out in float32 and converts again.
      h = self._modulated(x, shift1, scale1).astype(self.self_attn.q.dtype)
      k, v = self.self_attn.key_value(h, rope)
      rope_q = rope
      if token_index is not None:
        x, h = (layers.take_tokens(x, token_index),
                layers.take_tokens(h, token_index))
        rope_q = tuple(jnp.take(r, token_index, axis=0) for r in rope)
        gate1, shift2, scale2, gate2 = (
            take_table(t, token_index) for t in (gate1, shift2, scale2,
                                                  gate2))
      attention = attention or layers.attention
      out, aux["lse"] = attention(self.self_attn.query(h, rope_q), k, v)
      self_attn_out = computed["self_attn_out"] = self.self_attn.output(out)
    x = x + self_attn_out.astype(F32) * gate1
    if cross_attn_out is None:
      q = self.cross_attn.query(self.norm3(x))
      k, v = self.cross_attn.key_value(context)
      out, _ = layers.attention(q, k, v)
      cross_attn_out = computed["cross_attn_out"] = self.cross_attn.output(
          out)
      if cross_entropy:
        aux["cross_entropy"] = attention_entropy(q, k)
    x = x + cross_attn_out.astype(F32)
    x = x + self.ffn(self._modulated(x, shift2, scale2)).astype(F32) * gate2
    if keep_attention_outputs:
      aux.update(computed)
    return x, aux


def attention_entropy(q, k):
  """Entropy (B, H, Lq) float32 of each query row's softmax over all keys.

  q (B, Lq, H, D), k (B, Lk, H, D); logits scaled by D**-0.5 as the model's
  attention. ToCa's video score (cross-attention over Lk text tokens).
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                      preferred_element_type=F32) * q.shape[-1] ** -0.5
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def take_table(table, token_index):
  """A modulation table (B, 1, dim) as is; per token (B, N, dim) -> the
  rows token_index (B, K) -> (B, K, dim)."""
  return table if table.shape[1] == 1 else layers.take_tokens(
      table, token_index)


class Head(nnx.Module):
  """Output head, all in float32: head(LN(x) * (1 + scale) + shift)."""

  def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
    c = config
    self.eps = c.eps
    out = c.out_dim * c.patch_size[0] * c.patch_size[1] * c.patch_size[2]
    self.modulation = nnx.Param(
        jax.random.normal(rngs.params(), (1, 2, c.dim), c.weight_dtype)
        * c.dim ** -0.5)
    self.head = layers.linear(c.dim, out, dtype=F32,
                              param_dtype=c.weight_dtype, rngs=rngs)

  def __call__(self, x, e):
    """x (B, L, dim); e (B, dim), or per token (B, L, dim)."""
    e = e[:, None] if e.ndim == 2 else e  # (B, 1 or L, dim)
    m = self.modulation[...].astype(F32)[None] + e[:, :, None]
    shift, scale = m[:, :, 0], m[:, :, 1]  # (B, 1 or L, dim) each
    return self.head(layers.layer_norm(x, self.eps) * (1 + scale) + shift)


class WanDiT(nnx.Module):
  """Wan DiT: `model(latents, timestep, context) -> velocity`.

  latents (B, C, F, H, W); timestep (B,) in [0, 1000], or per token
  (B, f*h*w) on the patch grid in (f, h, w) order (Wan2.2 TI2V); context
  (B, L, text_dim) with L <= text_len, zero-padded to text_len as the
  original does; condition: optional (B, in_dim - C, F, H, W) channels
  concatenated after the latents' (Wan2.2 I2V: mask and image latents);
  without it C = in_dim. Returns (B, out_dim, F, H, W) float32.
  """

  def __init__(self, config: WanConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    pt, ph, pw = c.patch_size
    kw = dict(dtype=c.compute_dtype, param_dtype=c.weight_dtype, rngs=rngs)
    # Conv3d with kernel == stride == patch, as a matmul over flattened
    # patches in (pt, ph, pw, C) order.
    self.patch_embedding = layers.linear(pt * ph * pw * c.in_dim, c.dim, **kw)
    self.text_embedding = MLP(c.text_dim, c.dim, c.dim, activation=gelu_tanh,
                              **kw)
    f32 = dict(dtype=F32, param_dtype=c.weight_dtype, rngs=rngs)
    self.time_embedding = MLP(c.freq_dim, c.dim, c.dim, activation=jax.nn.silu,
                              **f32)
    self.time_projection = layers.linear(c.dim, 6 * c.dim, **f32)
    self.blocks = layers.stacked(lambda r: WanBlock(c, rngs=r),
                                 c.num_layers, rngs)
    self.head = Head(c, rngs=rngs)

  # Pieces, public so that token-wise samplers can reuse them. -------------

  def check_inputs(self, latents, timestep, context, condition=None):
    c = self.config
    if condition is None:
      if latents.ndim != 5 or latents.shape[1] != c.in_dim:
        raise ValueError(
            f"latents must be (B, {c.in_dim}, F, H, W); got {latents.shape}")
    elif (latents.ndim != 5 or condition.shape[0] != latents.shape[0]
          or condition.shape[2:] != latents.shape[2:]
          or latents.shape[1] + condition.shape[1] != c.in_dim):
      raise ValueError(
          f"latents {latents.shape} and condition {condition.shape} must be "
          f"(B, C, F, H, W) and (B, C', F, H, W) with C + C' = {c.in_dim=}")
    for name, size, p in zip("FHW", latents.shape[2:], c.patch_size):
      if size % p:
        raise ValueError(
            f"latent {name}={size} is not divisible by patch size {p} "
            f"({c.patch_size=})")
    b = latents.shape[0]
    tokens = math.prod(self.grid(latents.shape))
    if timestep.shape not in ((b,), (b, tokens)):
      raise ValueError(f"timestep must be ({b},) or per token ({b}, "
                       f"{tokens}); got {timestep.shape}")
    if context.ndim != 3 or context.shape[0] != b or context.shape[2] != c.text_dim:
      raise ValueError(
          f"context must be ({b}, L, {c.text_dim}); got {context.shape}")
    if context.shape[1] > c.text_len:
      raise ValueError(
          f"context length {context.shape[1]} exceeds {c.text_len=}")

  def grid(self, latents_shape):
    """Token grid (f, h, w) for a latent shape (B, C, F, H, W)."""
    return tuple(s // p for s, p in zip(latents_shape[2:],
                                        self.config.patch_size))

  def embed(self, latents, timestep, context, condition=None):
    """Inputs -> (x (B, L, dim) f32, e (B, dim), e0 (B, 6, dim), ctx, rope);
    with per-token timesteps e (B, L, dim) and e0 (B, L, 6, dim)."""
    c = self.config
    self.check_inputs(latents, timestep, context, condition)
    if condition is not None:
      latents = jnp.concatenate(
          [latents, condition.astype(latents.dtype)], axis=1)
    x = self.embed_tokens(patchify(latents, c.patch_size))
    e, e0, ctx = self.embed_conditions(timestep, context)
    rope = layers.rope_table(self.grid(latents.shape), c.head_dim,
                             c.rope_theta)
    return x, e, e0, ctx, rope

  def embed_tokens(self, patches):
    """Patchified latents (B, L, patch_dim) -> tokens (B, L, dim) f32."""
    return self.patch_embedding(patches).astype(F32)

  def embed_conditions(self, timestep, context):
    """(e (B, dim), e0 (B, 6, dim), ctx (B, text_len, dim)); the context is
    zero-padded to text_len first, as the original does. Per-token
    timesteps (B, L) give e (B, L, dim) and e0 (B, L, 6, dim)."""
    c = self.config
    freqs = layers.timestep_embedding(timestep.reshape(-1), c.freq_dim)
    e = self.time_embedding(freqs.reshape(*timestep.shape, c.freq_dim))
    e0 = self.time_projection(jax.nn.silu(e)).reshape(*e.shape[:-1], 6,
                                                      c.dim)
    pad = c.text_len - context.shape[1]
    ctx = jnp.pad(context, ((0, 0), (0, pad), (0, 0)))
    return e, e0, self.text_embedding(ctx)

  def run_blocks(self, x, e0, ctx, rope, *, per_layer=None, **hooks):
    """All blocks under `jax.lax.scan`; returns (x, aux stacked by layer).

    hooks: keyword arguments of every `WanBlock.__call__` (attention,
    keep_attention_outputs, ...); per_layer: a dict of (num_layers, ...)
    block arguments, one slice per block (PAB's reused attention outputs).
    """
    graphdef, state = nnx.split(self.blocks)

    def body(x, layer):
      layer_state, layer_hooks = layer
      block = nnx.merge(graphdef, layer_state)
      return block(x, e0, ctx, rope, **hooks, **layer_hooks)

    return jax.lax.scan(body, x, (state, per_layer or {}),
                        unroll=self.config.scan_unroll)

  def unembed(self, x, e, latents_shape):
    c = self.config
    out = self.head(x, e)
    return unpatchify(out, self.grid(latents_shape), c.patch_size, c.out_dim)

  def __call__(self, latents, timestep, context, *, condition=None,
               return_aux=False):
    x, e, e0, ctx, rope = self.embed(latents, timestep, context, condition)
    x, aux = self.run_blocks(x, e0, ctx, rope)
    out = self.unembed(x, e, latents.shape)
    return (out, aux) if return_aux else out


# Pure functions over arrays --------------------------------------------------


def patchify(latents, patch_size):
  """(B, C, F, H, W) -> (B, f*h*w, pt*ph*pw*C), tokens in (f, h, w) order."""
  b, c, f, h, w = latents.shape
  pt, ph, pw = patch_size
  x = latents.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
  x = x.transpose(0, 2, 4, 6, 3, 5, 7, 1)  # b f h w pt ph pw c
  return x.reshape(b, (f // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def unpatchify(x, grid, patch_size, out_dim):
  """(B, f*h*w, pt*ph*pw*C) -> (B, C, f*pt, h*ph, w*pw)."""
  b = x.shape[0]
  f, h, w = grid
  pt, ph, pw = patch_size
  x = x.reshape(b, f, h, w, pt, ph, pw, out_dim)
  x = x.transpose(0, 7, 1, 4, 2, 5, 3, 6)  # b c f pt h ph w pw
  return x.reshape(b, out_dim, f * pt, h * ph, w * pw)


def abstract_model(config: WanConfig) -> WanDiT:
  """The model with ShapeDtypeStruct leaves: shapes without memory."""
  return nnx.eval_shape(lambda: WanDiT(config, rngs=nnx.Rngs(0)))


def model_from_params(config: WanConfig, params: dict) -> WanDiT:
  """A WanDiT whose parameters are the nested dict `params` (our layout,
  what `converters.wan.load_params` returns)."""
  graphdef, state = nnx.split(abstract_model(config))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return nnx.merge(graphdef, state)
