"""Plain-NumPy (float64) reference of OpenSora v1.2's STDiT3 with Astraea.

Written from the model description (../shared/DESIGN.md, "The models":
OpenSora v1.2 STDiT3) and OpenSora's published architecture, importing
nothing from astraea_jax or pallas_kernels; parameters come in the
library's layout (linear kernels (in, out); the fused qkv's columns are
[q | k | v] with heads contiguous, kv_linear's [k | v]; the patch
embedding is a linear map over patches flattened in (pt, ph, pw, C) order;
blocks stacked on a leading axis).

Model: tokens = x_embedder(patches) + 2-D sin-cos position embedding
(columns first, positions scaled by base_size / (scale * size) with
scale = sqrt(height width) / input_sq_size, base_size = round(sqrt(S)));
t = t_embedder(sinusoid(t)) + fps_embedder(sinusoid(fps)) (Linear-SiLU-
Linear each), t_mlp = t_block(SiLU(t)). Spatial block i then temporal
block i:
  shift1, scale1, gate1, shift2, scale2, gate2 = table + t_mlp
  x += gate1 * Attn(LN(x)(1 + scale1) + shift1)    (per-head RMSNorm q, k)
  x += CrossAttn(x, y)                              (caption mask, no gate)
  x += gate2 * MLP(LN(x)(1 + scale2) + shift2)      (GELU-tanh)
spatial attention within a frame, temporal attention across frames at one
position with RoPE over the frame index (interleaved pairs,
theta^(-2i/head_dim)). Final layer: LN(x)(1 + scale) + shift with table +
t, linear, unpatchify. CFG: captions [y; null caption], one mask shared by
both halves. No frame mask (x_mask) here.

Astraea on STDiT3 follows the library's documented choice
(docs/astraea_stdit3.md, "balanced per-frame top-K"): every block (each
spatial and each temporal one, with its own cache) selects in EVERY frame
its K_f = round(theta S) best tokens by the paper's score, so the paper's
single top-K over N becomes a top-K_f per frame; K_f = S computes all,
K_f = 0 reuses all. Everything else (score, sparse rows with all keys of
the attention's own key set, cache update, reuse) is reference_wan's.
"""

from __future__ import annotations

import math

import numpy as np

from reference_wan import (F64, attention, astraea_score, gelu_tanh,
                           layer_norm, linear, rms_norm, rope_rotate, silu,
                           top_k)

KINDS = ("spatial", "temporal")


def sinusoid(t, dim, max_period=10000.0):
  half = dim // 2
  w = np.exp(-math.log(max_period) * np.arange(half) / half)
  a = np.outer(np.asarray(t, F64), w)
  return np.concatenate([np.cos(a), np.sin(a)], -1)


def pos_embed_2d(h, w, hidden, scale):
  base = round(math.sqrt(h * w))
  half = hidden // 2
  inv = 1.0 / 10000.0 ** (np.arange(0, half, 2) / half)

  def sincos(n):
    pos = np.arange(n) / scale * (base / n)
    a = np.outer(pos, inv)
    return np.concatenate([np.sin(a), np.cos(a)], -1)

  col, row = sincos(w), sincos(h)
  out = np.zeros((h, w, hidden))
  for r in range(h):
    for c in range(w):
      out[r, c] = np.concatenate([col[c], row[r]])
  return out.reshape(h * w, hidden)


class STDiT3Ref:

  def __init__(self, params, *, num_heads, patch_size, eps, freq_dim,
               input_sq_size, rope_theta, out_channels):
    self.p = {k: np.asarray(v, F64) for k, v in params.items()}
    self.heads = num_heads
    self.patch = tuple(patch_size)
    self.eps = eps
    self.freq_dim = freq_dim
    self.sq = input_sq_size
    self.theta = rope_theta
    self.out_channels = out_channels
    self.depth = self.p["spatial_blocks.scale_shift_table"].shape[0]
    self.dim = self.p["x_embedder.kernel"].shape[1]

  def blk(self, kind, layer):
    pre = f"{kind}_blocks."
    return {k[len(pre):]: v[layer] for k, v in self.p.items()
            if k.startswith(pre)}

  def embed(self, latents, t, y, y_mask, fps, height, width):
    """CFG batch latents (2B, C, T, H, W) -> x (2B, T, S, C), t (2B, C),
    t_mlp (2B, 6, C), ctx (2B, L, C), ctx mask (2B, L), grid."""
    p = self.p
    latents = np.asarray(latents, F64)
    b2, c, tf, h, w = latents.shape
    pt, ph, pw = self.patch
    grid = (tf // pt, h // ph, w // pw)
    x = np.zeros((b2, grid[0], grid[1] * grid[2], pt * ph * pw * c))
    for bi in range(b2):
      for f in range(grid[0]):
        for r in range(grid[1]):
          for q in range(grid[2]):
            patch = latents[bi, :, f * pt:(f + 1) * pt, r * ph:(r + 1) * ph,
                            q * pw:(q + 1) * pw]
            x[bi, f, r * grid[2] + q] = patch.transpose(1, 2, 3, 0).reshape(
                -1)
    scale = math.sqrt(height * width) / self.sq
    x = linear(p, "x_embedder", x) + pos_embed_2d(grid[1], grid[2],
                                                   self.dim, scale)
    mlp = lambda name, z: linear(p, f"{name}.fc2", silu(linear(
        p, f"{name}.fc1", z)))
    temb = (mlp("t_embedder", sinusoid(t, self.freq_dim))
            + mlp("fps_embedder", sinusoid(np.full(b2, fps), self.freq_dim)))
    t_mlp = linear(p, "t_block", silu(temb)).reshape(b2, 6, self.dim)
    b = b2 // 2
    null = np.broadcast_to(p["y_embedder.y_embedding"], (b,) + p[
        "y_embedder.y_embedding"].shape)
    caps = np.concatenate([np.asarray(y, F64)[:, 0], null])
    ctx = linear(p, "y_embedder.y_proj.fc2", gelu_tanh(linear(
        p, "y_embedder.y_proj.fc1", caps)))
    mask = (np.ones(caps.shape[:2], bool) if y_mask is None
            else np.tile(np.asarray(y_mask) != 0, (2, 1)))
    return x, temb, t_mlp, ctx, mask, grid

  def unembed(self, x, temb, grid):
    p = self.p
    m = p["final_layer.scale_shift_table"][None] + temb[:, None]
    b2 = x.shape[0]
    xs = x.reshape(b2, -1, self.dim)
    out = linear(p, "final_layer.linear",
                 layer_norm(xs, self.eps) * (1 + m[:, 1:2]) + m[:, 0:1])
    pt, ph, pw = self.patch
    f, h, w = grid
    c = self.out_channels
    out = out.reshape(b2, f, h, w, pt, ph, pw, c)
    return out.transpose(0, 7, 1, 4, 2, 5, 3, 6).reshape(
        b2, c, f * pt, h * ph, w * pw)

  def qkv(self, q, hmod):
    """-> q, k, v, each (..., H, D), q and k RMS-normed per head."""
    z = linear(q, "attn.qkv", hmod)
    c = self.dim
    split = lambda a: a.reshape(*a.shape[:-1], self.heads, -1)
    qq = rms_norm(split(z[..., :c]), self.eps, q["attn.q_norm.weight"])
    kk = rms_norm(split(z[..., c:2 * c]), self.eps, q["attn.k_norm.weight"])
    return qq, kk, split(z[..., 2 * c:])

  def block(self, kind, layer, x, t_mlp, ctx, mask, rows):
    """One sample: x (T, S, C); rows: (T,) lists of positions per frame.

    Returns (out (sum(len(rows_f)), C) in frame-major order, lse (H, same)).
    """
    q = self.blk(kind, layer)
    tf, s, c = x.shape
    m = q["scale_shift_table"] + t_mlp  # (6, C)
    shift1, scale1, gate1, shift2, scale2, gate2 = m
    hmod = layer_norm(x, self.eps) * (1 + scale1) + shift1
    qq, kk, vv = self.qkv(q, hmod)  # (T, S, H, D)
    head_dim = c // self.heads
    inv = self.theta ** (-np.arange(0, head_dim, 2) / head_dim)
    outs, lses = [], []
    for f in range(tf):
      for pos in rows[f]:
        if kind == "spatial":
          o, l = attention(qq[f, pos][None], kk[f], vv[f])
        else:
          frames = np.arange(tf)
          qr = rope_rotate(qq[f, pos][None], (f * inv)[None])
          kr = rope_rotate(kk[:, pos], np.outer(frames, inv))
          o, l = attention(qr, kr, vv[:, pos])
        outs.append(o[0].reshape(-1))
        lses.append(l[:, 0])
    attn = linear(q, "attn.proj", np.asarray(outs))
    xs = np.concatenate([x[f, rows[f]] for f in range(tf)]) + gate1 * attn
    cq = linear(q, "cross_attn.q_linear", xs).reshape(len(xs), self.heads, -1)
    kv = linear(q, "cross_attn.kv_linear", ctx)
    ck = kv[:, :c].reshape(len(ctx), self.heads, -1)
    cv = kv[:, c:].reshape(len(ctx), self.heads, -1)
    co, _ = attention(cq, ck, cv, key_mask=mask)
    xs = xs + linear(q, "cross_attn.proj", co.reshape(len(xs), -1))
    hmod = layer_norm(xs, self.eps) * (1 + scale2) + shift2
    xs = xs + gate2 * linear(q, "mlp.fc2", gelu_tanh(linear(q, "mlp.fc1",
                                                            hmod)))
    return xs, np.asarray(lses).T


def empty_cache(model, batch, num_tokens):
  def one():
    shape = (model.depth, batch, num_tokens)
    return {"update": np.zeros(shape + (model.dim,)),
            "input": np.zeros(shape + (model.dim,)),
            "lse": np.zeros(shape), "stale": np.zeros(shape, np.int64)}
  return {kind: one() for kind in KINDS}


def astraea_forward(model: STDiT3Ref, latents, t, y, y_mask, fps, height,
                    width, cache, k_f):
  """One CFG-batch evaluation with per-frame selection -> (out, chosen);
  cache updated in place. chosen[kind][layer][b]: sorted token rows."""
  x, temb, t_mlp, ctx, mask, grid = model.embed(latents, t, y, y_mask, fps,
                                                height, width)
  b2, tf, s, c = x.shape
  n = tf * s
  x = x.reshape(b2, n, c)
  chosen = {kind: [] for kind in KINDS}
  for layer in range(model.depth):
    for kind in KINDS:
      cc = {name: a[layer] for name, a in cache[kind].items()}
      chosen[kind].append([])
      x_next = np.empty_like(x)
      for b in range(b2):
        if k_f == 0:
          x_next[b] = x[b] + cc["update"][b]
          cc["stale"][b] += 1
          chosen[kind][-1].append(np.zeros(0, np.int64))
          continue
        if k_f == s:
          per_frame = [np.arange(s)] * tf
        else:
          score = astraea_score(x[b], cc["input"][b], cc["lse"][b],
                                cc["stale"][b]).reshape(tf, s)
          per_frame = [top_k(score[f], k_f) for f in range(tf)]
        rows = np.concatenate([f * s + per_frame[f] for f in range(tf)])
        out, lse = model.block(kind, layer, x[b].reshape(tf, s, c),
                               t_mlp[b], ctx[b], mask[b], per_frame)
        x_next[b] = x[b] + cc["update"][b]
        x_next[b, rows] = out
        cc["stale"][b] += 1
        cc["stale"][b, rows] = 0
        cc["update"][b, rows] = out - x[b, rows]
        cc["input"][b, rows] = x[b, rows]
        cc["lse"][b, rows] = lse.mean(0)
        chosen[kind][-1].append(rows)
      x = x_next
  return model.unembed(x, temb, grid), chosen
