"""Plain-NumPy (float64) reference of the Wan2.1 DiT and of one Astraea step.

Written from the model description (../shared/DESIGN.md, "The models":
Wan2.1 T2V) and the Astraea paper (arXiv 2506.05096, sec. 3; DESIGN.md
"Astraea, as the paper describes it"), importing nothing from astraea_jax
or pallas_kernels. The only contact with the library is the parameter dict
(`tests/_method_adapter.py` extracts it), whose layout is the library's:
linear kernels are (in, out); the patch embedding is a linear map over a
patch flattened in (pt, ph, pw, C) order (the documented form of Wan's
Conv3d with kernel = stride = patch); per-block parameters are stacked on
a leading layer axis.

Model (DESIGN.md): per block, m = modulation + e0 -> shift1, scale1, gate1,
shift2, scale2, gate2;
  x += gate1 * SelfAttn(LN(x)(1 + scale1) + shift1)       (3-D RoPE on q, k)
  x += CrossAttn(LN_affine(x), text)
  x += gate2 * FFN(LN(x)(1 + scale2) + shift2)              (GELU-tanh)
q/k RMSNorm over the full dim; RoPE on interleaved pairs, head dim split
d - 4(d//6), 2(d//6), 2(d//6) over (t, h, w), theta 1e4; the head uses the
time embedding e; time sinusoid [cos, sin] with w_i = 10000^(-i/half).

Astraea step (paper sec. 3.1, DESIGN.md items 1-3 and "Our choices"):
before block l, token i scores
  S_i = w_alpha * LSE_i * Delta_i + w_beta * exp(n_i)
with LSE_i the head-mean self-attention log-sum-exp of its last
computation, Delta_i = ||x_i - x_last_i|| / (||x_last_i|| + 1e-6) (ours:
relative L2 change of the block input; the 1e-6 guard is the library's
documented choice), n_i the consecutive steps not selected. The K highest
run the block (queries of the K, keys/values of ALL N tokens); the others
take x + cached update (update = block output - block input, ours). K = N
computes all tokens, K = 0 reuses every update. Ties in top-K go to the
lower index (the library's documented `top_k` order). Each sample of the
batch (the CFG halves) selects on its own.
"""

from __future__ import annotations

import math

import numpy as np

F64 = np.float64


# Pieces --------------------------------------------------------------------


def layer_norm(x, eps, weight=None, bias=None):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  y = (x - mean) / np.sqrt(var + eps)
  if weight is not None:
    y = y * weight + bias
  return y


def rms_norm(x, eps, weight):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi)
                                * (x + 0.044715 * x ** 3)))


def silu(x):
  return x / (1 + np.exp(-x))


def linear(p, name, x):
  return x @ p[name + ".kernel"] + p[name + ".bias"]


def attention(q, k, v, key_mask=None):
  """q (Lq, H, D), k/v (Lk, H, D) -> out (Lq, H, D), lse (H, Lq)."""
  logits = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
  if key_mask is not None:
    logits = np.where(key_mask[None, None, :], logits, -np.inf)
  m = logits.max(-1, keepdims=True)
  w = np.exp(logits - m)
  lse = np.log(w.sum(-1)) + m[..., 0]
  p = np.exp(logits - lse[..., None])
  return np.einsum("hqk,khd->qhd", p, v), lse


def entropy(q, k):
  """Softmax entropy (H, Lq) of each query row over all keys."""
  logits = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -(np.exp(logp) * logp).sum(-1)


def rope_rotate(x, angles):
  """x (L, H, D), angles (L, D/2): rotate pairs (2i, 2i+1)."""
  c, s = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
  x0, x1 = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = x0 * c - x1 * s
  out[..., 1::2] = x0 * s + x1 * c
  return out


def rope_angles_3d(grid, head_dim, theta=1e4):
  """(f*h*w, head_dim/2) angles, tokens in (f, h, w) row-major order."""
  dh = 2 * (head_dim // 6)
  dims = (head_dim - 2 * dh, dh, dh)
  f, h, w = grid
  rows = []
  for fi in range(f):
    for hi in range(h):
      for wi in range(w):
        parts = []
        for pos, n in zip((fi, hi, wi), dims):
          parts.append(pos * theta ** (-np.arange(0, n, 2) / n))
        rows.append(np.concatenate(parts))
  return np.asarray(rows, F64)


def time_sinusoid(t, dim):
  half = dim // 2
  w = 10000.0 ** (-np.arange(half) / half)
  a = np.outer(np.asarray(t, F64), w)
  return np.concatenate([np.cos(a), np.sin(a)], -1)


# The model ---------------------------------------------------------------------


class WanRef:
  """The DiT in float64. params: flat {name: array} (adapter.params)."""

  def __init__(self, params, *, num_heads, patch_size, text_len, freq_dim,
               eps=1e-6, rope_theta=1e4):
    self.p = {k: np.asarray(v, F64) for k, v in params.items()}
    self.heads = num_heads
    self.patch = tuple(patch_size)
    self.text_len = text_len
    self.freq_dim = freq_dim
    self.eps = eps
    self.theta = rope_theta
    self.num_layers = self.p["blocks.modulation"].shape[0]
    self.dim = self.p["patch_embedding.kernel"].shape[1]

  def blk(self, layer):
    return {k[len("blocks."):]: v[layer] for k, v in self.p.items()
            if k.startswith("blocks.")}

  # Embedding and head (whole batch) ------------------------------------------

  def embed(self, latents, t, context):
    """-> x (B, N, dim), e (B, dim), e0 (B, 6, dim), ctx (B, Lt, dim),
    angles (N, head_dim/2), grid."""
    p = self.p
    latents = np.asarray(latents, F64)
    b, c, f, h, w = latents.shape
    pt, ph, pw = self.patch
    grid = (f // pt, h // ph, w // pw)
    tokens = []
    for bi in range(b):
      rows = []
      for fi in range(grid[0]):
        for hi in range(grid[1]):
          for wi in range(grid[2]):
            patch = latents[bi, :, fi * pt:(fi + 1) * pt,
                            hi * ph:(hi + 1) * ph, wi * pw:(wi + 1) * pw]
            rows.append(patch.transpose(1, 2, 3, 0).reshape(-1))
      tokens.append(rows)
    x = linear(p, "patch_embedding", np.asarray(tokens, F64))
    e = linear(p, "time_embedding.fc2", silu(linear(
        p, "time_embedding.fc1", time_sinusoid(t, self.freq_dim))))
    e0 = linear(p, "time_projection", silu(e)).reshape(b, 6, self.dim)
    ctx = np.zeros((b, self.text_len, context.shape[-1]), F64)
    ctx[:, :context.shape[1]] = context
    ctx = linear(p, "text_embedding.fc2", gelu_tanh(linear(
        p, "text_embedding.fc1", ctx)))
    angles = rope_angles_3d(grid, self.dim // self.heads, self.theta)
    return x, e, e0, ctx, angles, grid

  def unembed(self, x, e, grid, out_channels):
    p = self.p
    m = p["head.modulation"] + e[:, None]  # (B, 2, dim)
    shift, scale = m[:, 0:1], m[:, 1:2]
    out = linear(p, "head.head", layer_norm(x, self.eps) * (1 + scale)
                 + shift)
    b = x.shape[0]
    pt, ph, pw = self.patch
    f, h, w = grid
    out = out.reshape(b, f, h, w, pt, ph, pw, out_channels)
    return out.transpose(0, 7, 1, 4, 2, 5, 3, 6).reshape(
        b, out_channels, f * pt, h * ph, w * pw)

  # One block, one sample -------------------------------------------------------

  def heads_of(self, x):
    return x.reshape(x.shape[0], self.heads, -1)

  def block(self, layer, x, e0, ctx, angles, rows=None, self_out=None,
            cross_out=None):
    """Block `layer` on one sample: x (N, dim), e0 (6, dim), ctx (Lt, dim).

    rows: computed tokens (None = all); keys/values always from all N.
    self_out / cross_out: attention outputs (after the output projection)
    to use instead of computing them (PAB's broadcast).
    Returns (x_out (len(rows), dim), aux) with aux "lse" (H, rows) when
    self-attention ran, "cross_entropy" (H, rows), "self_out", "cross_out".
    """
    q = self.blk(layer)
    eps = self.eps
    rows = np.arange(x.shape[0]) if rows is None else np.asarray(rows)
    m = q["modulation"][0] + e0  # (6, dim)
    shift1, scale1, gate1, shift2, scale2, gate2 = m
    aux = {}
    xr = x[rows]
    if self_out is None:
      hmod = layer_norm(x, eps) * (1 + scale1) + shift1
      qq = rms_norm(linear(q, "self_attn.q", hmod[rows]), eps,
                    q["self_attn.norm_q.weight"])
      kk = rms_norm(linear(q, "self_attn.k", hmod), eps,
                    q["self_attn.norm_k.weight"])
      vv = linear(q, "self_attn.v", hmod)
      qq = rope_rotate(self.heads_of(qq), angles[rows])
      kk = rope_rotate(self.heads_of(kk), angles)
      out, aux["lse"] = attention(qq, kk, self.heads_of(vv))
      self_out = linear(q, "self_attn.o", out.reshape(len(rows), -1))
    aux["self_out"] = self_out
    xr = xr + gate1 * self_out
    if cross_out is None:
      hn = layer_norm(xr, eps, q["norm3.weight"], q["norm3.bias"])
      qq = self.heads_of(rms_norm(linear(q, "cross_attn.q", hn), eps,
                                  q["cross_attn.norm_q.weight"]))
      kk = self.heads_of(rms_norm(linear(q, "cross_attn.k", ctx), eps,
                                  q["cross_attn.norm_k.weight"]))
      vv = self.heads_of(linear(q, "cross_attn.v", ctx))
      out, _ = attention(qq, kk, vv)
      aux["cross_entropy"] = entropy(qq, kk)
      cross_out = linear(q, "cross_attn.o", out.reshape(len(rows), -1))
    aux["cross_out"] = cross_out
    xr = xr + cross_out
    hmod = layer_norm(xr, eps) * (1 + scale2) + shift2
    ffn = linear(q, "ffn.fc2", gelu_tanh(linear(q, "ffn.fc1", hmod)))
    return xr + gate2 * ffn, aux

  def forward(self, latents, t, context, out_channels):
    """The dense model: velocity (B, C, F, H, W)."""
    x, e, e0, ctx, ang, grid = self.embed(latents, t, context)
    for layer in range(self.num_layers):
      x = np.stack([self.block(layer, x[b], e0[b], ctx[b], ang)[0]
                    for b in range(x.shape[0])])
    return self.unembed(x, e, grid, out_channels)


# Astraea ----------------------------------------------------------------------


def empty_cache(num_layers, batch, num_tokens, dim):
  return {"update": np.zeros((num_layers, batch, num_tokens, dim), F64),
          "input": np.zeros((num_layers, batch, num_tokens, dim), F64),
          "lse": np.zeros((num_layers, batch, num_tokens), F64),
          "stale": np.zeros((num_layers, batch, num_tokens), np.int64)}


def astraea_score(x, last_input, lse, stale, w_alpha=1.0, w_beta=0.5):
  """S (N,) of one sample before one block (paper sec. 3.1)."""
  score = np.empty(x.shape[0], F64)
  for i in range(x.shape[0]):
    change = np.sqrt(((x[i] - last_input[i]) ** 2).sum())
    delta = change / (np.sqrt((last_input[i] ** 2).sum()) + 1e-6)
    score[i] = w_alpha * lse[i] * delta + w_beta * math.exp(stale[i])
  return score


def top_k(score, k):
  """The k highest, ties to the lower index; returned sorted."""
  order = sorted(range(len(score)), key=lambda i: (-score[i], i))
  return np.asarray(sorted(order[:k]), np.int64)


def per_shard_top_k(score, k_local, num_shards):
  """Sequence-parallel rule: the tokens split into contiguous shards as
  np.array_split does; each shard keeps its own k_local best."""
  chosen = []
  bounds = np.cumsum([0] + [len(a) for a in np.array_split(
      np.arange(len(score)), num_shards)])
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    chosen += [lo + i for i in top_k(score[lo:hi], k_local)]
  return np.asarray(sorted(chosen), np.int64)


def astraea_blocks(model: WanRef, x, e0, ctx, angles, cache, k, *,
                   score_fn=astraea_score, choose=top_k, statistic="lse"):
  """All blocks with token selection; x (B, N, dim); cache updated in place.

  k: tokens per block (0..N), or for `choose` other than top_k its second
  argument. statistic: what the cache keeps in its LSE slot ("lse", or
  "cross_entropy" for ToCa). Returns (x, selected rows per layer and
  sample).
  """
  b, n, _ = x.shape
  chosen = []
  for layer in range(model.num_layers):
    c = {name: arr[layer] for name, arr in cache.items()}
    x_next = np.empty_like(x)
    chosen.append([])
    for s in range(b):
      if k == 0:
        x_next[s] = x[s] + c["update"][s]
        c["stale"][s] += 1
        chosen[-1].append(np.zeros(0, np.int64))
        continue
      if k == n:
        rows = np.arange(n)
      else:
        rows = choose(score_fn(x[s], c["input"][s], c["lse"][s],
                               c["stale"][s]), k)
      out, aux = model.block(layer, x[s], e0[s], ctx[s], angles, rows)
      x_next[s] = x[s] + c["update"][s]
      x_next[s, rows] = out
      c["stale"][s] += 1
      c["stale"][s, rows] = 0
      c["update"][s, rows] = out - x[s, rows]
      c["input"][s, rows] = x[s, rows]
      c["lse"][s, rows] = aux[statistic].mean(0)
      chosen[-1].append(rows)
    x = x_next
  return x, chosen


def astraea_forward(model, latents, t, context, cache, k, out_channels,
                    **kw):
  """One model evaluation with Astraea's selection -> (velocity, chosen)."""
  x, e, e0, ctx, ang, grid = model.embed(latents, t, context)
  x, chosen = astraea_blocks(model, x, e0, ctx, ang, cache, k, **kw)
  return model.unembed(x, e, grid, out_channels), chosen


# Sampling: flow-matching Euler with CFG ---------------------------------------


def euler_schedule(steps, shift, train_steps=1000):
  """diffusers `FlowMatchEulerDiscreteScheduler(shift)`: (timesteps, dt).

  The training sigmas k/T are shifted (sigma' = s sigma / (1 + (s-1)
  sigma)), their range bounds a linspace of timesteps that is shifted
  again; dt_i = sigma_{i+1} - sigma_i with sigma_n = 0. float32 where
  diffusers computes in float32.
  """
  f32 = np.float32
  train = np.array([train_steps, 1], f32) / f32(train_steps)
  smax, smin = f32(shift) * train / (f32(1) + f32(shift - 1) * train)
  t = np.linspace(float(smax) * train_steps, float(smin) * train_steps, steps)
  sig = t / train_steps
  sig = (shift * sig / (1 + (shift - 1) * sig)).astype(f32)
  sig = np.append(sig, f32(0))
  return sig[:-1] * f32(train_steps), (sig[1:] - sig[:-1])


def cfg_sample(velocity_fn, noise, timesteps, dt, guidance):
  """x_{i+1} = x_i + dt_i (v_u + g (v_c - v_u)); velocity_fn(i, x_2b,
  t_2b) -> (2B, ...) for the batch [cond; uncond]."""
  x = np.asarray(noise, F64)
  for i, (t, d) in enumerate(zip(timesteps, dt)):
    v = velocity_fn(i, np.concatenate([x, x]), np.full(2 * x.shape[0],
                                                        float(t)))
    cond, uncond = np.split(v, 2)
    x = x + float(d) * (uncond + guidance * (cond - uncond))
  return x
