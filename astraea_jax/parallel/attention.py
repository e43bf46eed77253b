"""Self-attention over a sequence split across devices (inside shard_map).

The P = U * R sequence shards form a (ring R) x (ulysses U) grid; shard
s = r U + u sits on the device with ring index r and Ulysses index u.

Ulysses (DeepSpeed-Ulysses, Jacobs et al. 2023): an all-to-all over the U
devices of a Ulysses group swaps sequence sharding for head sharding:
    q, k, v (B, L_local, H, D) -> (B, U L_local, H/U, D)
each device then holds U shards' tokens (all of them when R = 1) for H/U
heads and attends with a plain attention call; a second all-to-all swaps
back: out (B, U L_local, H/U, D) -> (B, L_local, H, D), and the LSE
(B, H/U, U L_local) -> (B, H, L_local). Needs H % U == 0.

Ring (Liu et al. 2023, "Ring Attention"): the R devices of a ring hold
different key/value chunks for the same heads; R steps pass the chunks
round the ring with `ppermute` (issued before each step's attention, so
the transfer can overlap it) and merge the partial results with their
log-sum-exps (`merge_partials`). Works for any head count.

Hybrid (USP, Fang & Zhao 2024): Ulysses inside each group of U, ring over
the R groups. U = P is pure Ulysses, U = 1 pure ring.

Every attention call goes through `models.layers.attention`; padded key
rows (see layout.py) are excluded exactly: keys that may be padding are
attended separately and their partial result is dropped via LSE = -inf.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from astraea_jax.models import layers
from astraea_jax.parallel.layout import TokenLayout

F32 = jnp.float32
RING, ULYSSES = "seq_ring", "seq_ulysses"
SEQ_AXES = (RING, ULYSSES)  # shard index = ring_index * U + ulysses_index
STRATEGIES = ("auto", "ulysses", "ring", "hybrid")


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
  """Ulysses group size U and ring size R; P = U * R sequence shards."""

  ulysses: int
  ring: int

  def __post_init__(self):
    if self.ulysses < 1 or self.ring < 1:
      raise ValueError(
          f"ulysses={self.ulysses} and ring={self.ring} must be >= 1")

  @property
  def num_shards(self) -> int:
    return self.ulysses * self.ring

  @property
  def name(self) -> str:
    if self.ring == 1:
      return "ulysses"
    return "ring" if self.ulysses == 1 else "hybrid"


def plan_attention(strategy: str, num_heads: int, num_shards: int, *,
                   ulysses: int | None = None) -> AttentionPlan:
  """The (U, R) split of `num_shards` sequence shards for `strategy`.

  "ulysses": U = P; the heads must divide by P (checked here).
  "ring":    R = P (any head count).
  "hybrid":  U = `ulysses` if given, else the largest divisor of P that
             divides the heads; R = P / U.
  "auto":    as "hybrid" without `ulysses`: pure Ulysses when the heads
             divide by P (all-to-all moves less data than a ring), pure
             ring when no divisor > 1 is shared, else the hybrid. E.g. Wan
             1.3B (12 heads): 2, 4 devices -> Ulysses; 8 -> U 4 x R 2.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown {strategy=}; choose from {STRATEGIES}")
  if num_shards < 1:
    raise ValueError(f"{num_shards=} must be >= 1")
  if ulysses is not None and strategy != "hybrid":
    raise ValueError(f"{ulysses=} is only used with strategy='hybrid'")
  if strategy == "ulysses":
    if num_heads % num_shards:
      raise ValueError(
          f"strategy='ulysses' splits the heads over the sequence shards, "
          f"but {num_heads=} is not divisible by {num_shards=}; use "
          "strategy='ring', 'hybrid' or 'auto'")
    return AttentionPlan(ulysses=num_shards, ring=1)
  if strategy == "ring":
    return AttentionPlan(ulysses=1, ring=num_shards)
  if ulysses is None:
    ulysses = max(u for u in range(1, num_shards + 1)
                  if num_shards % u == 0 and num_heads % u == 0)
  if num_shards % ulysses or num_heads % ulysses:
    raise ValueError(
        f"hybrid Ulysses group {ulysses=} must divide both {num_shards=} "
        f"and {num_heads=}")
  return AttentionPlan(ulysses=ulysses, ring=num_shards // ulysses)


# Merging partial attention results -------------------------------------------


def _rows(w):
  """(B, H, Q) weights -> (B, Q, H, 1) to scale (B, Q, H, D) outputs."""
  return jnp.transpose(w, (0, 2, 1))[..., None]


def merge_partials(out_a, lse_a, out_b, lse_b):
  """Softmax attention over keys A u B from its parts over A and over B.

  out_* (B, Q, H, D), lse_* (B, H, Q) (natural log). With
  lse = log(e^lse_a + e^lse_b) (shifted by the max for stability):
      out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b.
  A part with lse = -inf (masked) gets weight 0. Returns float32.
  """
  lse_a, lse_b = lse_a.astype(F32), lse_b.astype(F32)
  m = jnp.maximum(lse_a, lse_b)
  lse = m + jnp.log(jnp.exp(lse_a - m) + jnp.exp(lse_b - m))
  out = (out_a.astype(F32) * _rows(jnp.exp(lse_a - lse))
         + out_b.astype(F32) * _rows(jnp.exp(lse_b - lse)))
  return out, lse


def merge_attention(outs, lses):
  """Many partial results at once: lse = logsumexp_i lse_i,
  out = sum_i exp(lse_i - lse) out_i (the same as folding
  `merge_partials`)."""
  lse_all = jnp.stack([l.astype(F32) for l in lses])  # (n, B, H, Q)
  m = jnp.max(lse_all, axis=0)
  lse = m + jnp.log(jnp.sum(jnp.exp(lse_all - m), axis=0))
  out = sum(o.astype(F32) * _rows(jnp.exp(l - lse))
            for o, l in zip(outs, lse_all))
  return out, lse


# Collectives ---------------------------------------------------------------


def seq_to_heads(x, plan: AttentionPlan):
  """all-to-all: (B, L, H, D) sequence-sharded -> (B, U L, H/U, D).

  Device u sends head block j to device j and receives block u's heads of
  every group member's rows, stacked in member order (= token order).
  """
  if plan.ulysses == 1:
    return x
  return lax.all_to_all(x, ULYSSES, split_axis=2, concat_axis=1, tiled=True)


def heads_to_seq(x, plan: AttentionPlan):
  """all-to-all back: (B, U L, H/U, D) -> (B, L, H, D)."""
  if plan.ulysses == 1:
    return x
  return lax.all_to_all(x, ULYSSES, split_axis=1, concat_axis=2, tiled=True)


def lse_heads_to_seq(lse, plan: AttentionPlan):
  """all-to-all: LSE (B, H/U, U L) -> (B, H, L)."""
  if plan.ulysses == 1:
    return lse
  return lax.all_to_all(lse, ULYSSES, split_axis=2, concat_axis=1,
                        tiled=True)


def shard_index(plan: AttentionPlan):
  """This device's sequence shard s = ring_index * U + ulysses_index."""
  ring = lax.axis_index(RING) if plan.ring > 1 else 0
  uly = lax.axis_index(ULYSSES) if plan.ulysses > 1 else 0
  return jnp.asarray(ring * plan.ulysses + uly, jnp.int32)


def _ring_shift(x, plan: AttentionPlan):
  """Send to the next ring member: after step j a device holds the chunk
  of ring index (r - j) mod R."""
  perm = [(i, (i + 1) % plan.ring) for i in range(plan.ring)]
  return lax.ppermute(x, RING, perm)


# Attention over one key chunk, with padded rows excluded ---------------------


def _key_segments(k, v, chunk, plan: AttentionPlan, layout: TokenLayout):
  """[(k, v, valid)] covering the chunk's real keys exactly.

  k, v (B, U * slots, H', D): the rows of shards chunk*U .. chunk*U + U-1.
  Without padding: one segment. With padding only each shard's last row
  can be a pad row: the other rows form one segment; the last rows are
  added one key each, valid iff their shard is a long one (s < r). With
  one ring chunk (pure Ulysses) that is static and they join the segment.
  """
  if not layout.padded:
    return [(k, v, None)]
  b, _, h, d = k.shape
  k5 = k.reshape(b, plan.ulysses, layout.slots, h, d)
  v5 = v.reshape(b, plan.ulysses, layout.slots, h, d)
  body = layout.slots - 1
  k_body = k5[:, :, :body].reshape(b, plan.ulysses * body, h, d)
  v_body = v5[:, :, :body].reshape(b, plan.ulysses * body, h, d)
  k_last, v_last = k5[:, :, body], v5[:, :, body]  # (B, U, H', D)
  if plan.ring == 1:
    n_long = min(layout.num_long, plan.ulysses)
    return [(jnp.concatenate([k_body, k_last[:, :n_long]], axis=1),
             jnp.concatenate([v_body, v_last[:, :n_long]], axis=1), None)]
  segments = [(k_body, v_body, None)]
  for u in range(plan.ulysses):
    valid = chunk * plan.ulysses + u < layout.num_long
    segments.append((k_last[:, u:u + 1], v_last[:, u:u + 1], valid))
  return segments


def _chunk_attention(q, k, v, chunk, plan, layout, scale, acc):
  """Folds attention of q over one chunk's keys into acc = (out, lse)."""
  for k_seg, v_seg, valid in _key_segments(k, v, chunk, plan, layout):
    out, lse = layers.attention(q, k_seg, v_seg, scale=scale)
    if valid is not None:
      lse = jnp.where(valid, lse, -jnp.inf)
    acc = ((out.astype(F32), lse) if acc is None
           else merge_partials(*acc, out, lse))
  return acc


def sequence_parallel_attention(q, k, v, *, plan: AttentionPlan,
                                layout: TokenLayout, scale=None):
  """Exact softmax attention of local queries over ALL tokens' keys.

  Call inside shard_map over the (.., seq_ring, seq_ulysses) mesh.
  q: (B, Q, H, D) this shard's query rows (all `slots` rows, or Astraea's
  selected rows; Q must be equal on all shards); k, v: (B, slots, H, D)
  this shard's key/value rows. Returns out (B, Q, H, D) in q.dtype and
  lse (B, H, Q) float32, as `layers.attention` would for the full
  sequence. Communication per device: Ulysses 4 all-to-alls (q, k, v,
  out) of its rows times (U-1)/U; ring R-1 shifts of the K/V chunk.
  """
  num_heads = q.shape[2]
  if num_heads % plan.ulysses:
    raise ValueError(
        f"{num_heads=} must be divisible by the Ulysses group "
        f"{plan.ulysses=}")
  q, k, v = (seq_to_heads(t, plan) for t in (q, k, v))         # 1.
  ring_index = lax.axis_index(RING) if plan.ring > 1 else 0
  acc = None
  for step in range(plan.ring):                                # 2.
    if step + 1 < plan.ring:  # start the next transfer before computing
      k_next, v_next = _ring_shift(k, plan), _ring_shift(v, plan)
    chunk = (ring_index - step) % plan.ring
    acc = _chunk_attention(q, k, v, chunk, plan, layout, scale, acc)
    if step + 1 < plan.ring:
      k, v = k_next, v_next
  out, lse = acc
  out = heads_to_seq(out.astype(q.dtype), plan)                # 3.
  return out, lse_heads_to_seq(lse, plan)
