"""Sparse-query attention with LSE as a Mosaic GPU kernel (Hopper: wgmma, TMA).

The structure is FlashAttention-3's forward pass (Shah et al. 2024, sections
3.1-3.2): each CTA runs three warpgroups. Two compute warpgroups own
`block_q` query rows each; the third (the producer) streams K/V tiles into a
ring of `max_concurrent_steps` shared-memory slots with TMA and waits on
"consumed" barriers before refilling a slot. The two compute warpgroups
ping-pong through a schedule barrier so that one runs its softmax while the
other's wgmma holds the tensor cores.

What this kernel adds for Astraea (section 3.2 of the paper: queries are
pruned, keys/values never are):
  * Query gather in the kernel. With `q_index`, each compute warpgroup copies
    its `block_q` index entries to shared memory, issues one single-row TMA
    per picked query row into an unswizzled staging tile, then moves the tile
    through registers into the swizzled layout that wgmma reads. No gathered
    copy of q is ever written to global memory.
  * Any lengths. A CTA owns rows [base, base + 2 block_q) of the output with
    base = min(tile * 2 block_q, K - 2 block_q): the last tile is shifted back
    instead of running past the end, so it recomputes (and rewrites with the
    same values) a few rows of its neighbour. Keys use the same trick: the
    last K/V tile starts at Lk - block_kv and masks the columns that the
    previous tile already covered. Every TMA stays in bounds.
  * Softmax scale and the natural-log LSE. Logits are kept in base 2
    (exp2 is one instruction): m is tracked as max(s) * scale * log2(e), and
    lse = ln(2) * (m + log2(l)).

Block metadata (per CTA, grid axes "q_tiles", "heads", "batch"):
  tile_base: first output row of the CTA, int32 scalar, computed as above.
  idx_smem:  (2, block_q) int32, rows of q picked by each compute warpgroup.
  stage:     (2, block_q, D) q.dtype, gathered rows before swizzling.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax

try:  # Mosaic GPU ships with jaxlib; its API moves between jax releases.
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - depends on the installed jaxlib
  pl = None
  plgpu = None

_LOAD_TAKES_INDEX = plgpu is not None and (
    inspect.signature(plgpu.load).parameters["idx"].default
    is inspect.Parameter.empty)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
NUM_COMPUTE_WGS = 2
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class MosaicTuning:
  """Block sizes of the Mosaic GPU kernel.

  block_q: query rows per compute warpgroup (a CTA computes 2 * block_q).
  block_kv: keys per pipeline step.
  max_concurrent_steps: K/V shared-memory slots (pipeline depth).
  q_tiles_first: grid order; True puts consecutive CTAs on consecutive query
    tiles of one head (all resident CTAs stream the same K/V), False on
    different heads of one query tile (measured 4% faster on an H200).
  kv_splits: CTAs per query tile, each over a contiguous share of the keys
    (flash-decoding style); partial results are merged by their LSE. More
    CTAs for small K: fewer idle multiprocessors in the last wave. None:
    chosen by `choose_kv_splits`.
  lowering_semantics: Mosaic GPU's "Lane" (per-thread) or "Warpgroup"
    (layout inference) lowering; jax 0.10 defaults to the first, 0.11 to
    the second. Pinned so that both versions compile the same way.
  """

  block_q: int = 64
  block_kv: int = 128
  max_concurrent_steps: int = 2
  q_tiles_first: bool = False
  kv_splits: int | None = None
  lowering_semantics: str = "Lane"

  def __post_init__(self):
    if self.block_q != 64:
      raise ValueError(f"{self.block_q=} must be 64 (one wgmma M tile)")
    if self.block_kv % 64 or not 64 <= self.block_kv <= 256:
      raise ValueError(f"{self.block_kv=} must be 64, 128, 192 or 256")
    if self.max_concurrent_steps < 2:
      raise ValueError(f"{self.max_concurrent_steps=} must be at least 2")
    if self.lowering_semantics not in ("Lane", "Warpgroup"):
      raise ValueError(
          f"{self.lowering_semantics=} must be 'Lane' or 'Warpgroup'")
    if self.kv_splits is not None and self.kv_splits < 1:
      raise ValueError(f"{self.kv_splits=} must be at least 1")

  @classmethod
  def get_default(cls, head_dim: int) -> "MosaicTuning":
    """Measured on an H200 at D=128 (Wan2.1 480p, bf16): 128 keys per step
    (64: -16%), two K/V slots (three exceed shared memory by 136 bytes),
    heads-first grid order (+4% over query-tiles-first), Lane and
    Warpgroup lowering within 1%. D=64 reuses it (not tuned separately).
    """
    del head_dim
    return cls()

  @property
  def rows_per_cta(self) -> int:
    return NUM_COMPUTE_WGS * self.block_q


def supports(q, k, q_index, scale, tuning: MosaicTuning) -> str | None:
  """Why the kernel cannot run these inputs, or None if it can."""
  if plgpu is None:
    return "jax.experimental.pallas.mosaic_gpu is not importable"
  if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
    return f"{q.dtype=} is not bfloat16/float16"
  if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
    return f"head_dim={q.shape[-1]} is not one of {SUPPORTED_HEAD_DIMS}"
  if _round_up(k.shape[1], 8) < tuning.block_kv:
    return f"Lk={k.shape[1]} is shorter than {tuning.block_kv=}"
  if not scale > 0:
    return f"{scale=} must be positive (the running max is taken unscaled)"
  del q_index
  return None


def num_multiprocessors() -> int:
  """Streaming multiprocessors of the default GPU (132 on an H100/H200)."""
  return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def choose_kv_splits(num_ctas: int, num_steps: int, num_sms: int,
                     max_splits: int = 4, min_gain: float = 0.1) -> int:
  """Key splits that shorten the last-wave tail of a launch.

  One CTA per SM (the kernel needs ~200 KB of shared memory), so a launch
  of n equal CTAs takes ceil(n / sms) "waves"; splitting keys S ways gives
  n S CTAs of 1/S the work: ceil(n S / sms) / S. A split is taken only when
  it saves `min_gain` of the time, since the merge costs a pass over S
  partial outputs. Each split needs at least 2 key steps.
  """
  def waves(splits):
    return -(-num_ctas * splits // num_sms) / splits
  best = 1
  for splits in range(2, max_splits + 1):
    if num_steps // splits < 2:
      break
    if waves(splits) < (1 - min_gain) * waves(best):
      best = splits
  return best


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _with_layout(x, layout, interpret):
  """plgpu.layout_cast, or x itself in the interpreter (it has no rule)."""
  return x if interpret else plgpu.layout_cast(x, layout)


def _iota(shape, dimension, interpret):
  if interpret:
    return lax.broadcasted_iota(jnp.int32, shape, dimension)
  return plgpu.broadcasted_iota(jnp.int32, shape, dimension,
                                layout=plgpu.Layout.WGMMA)


def _load_wgmma(ref, interpret):
  """An unswizzled (rows, D) shared-memory tile in the wgmma register layout.

  No bank-conflict-free plan exists for this layout from an unswizzled tile
  (Mosaic refuses with optimized=True); the tile is read once per CTA, so
  the conflicts cost little. The interpreter has no `plgpu.load`.
  """
  if interpret:
    return ref[...]
  if _LOAD_TAKES_INDEX:  # jax 0.10 requires the index; jax 0.11 deprecates it.
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA, optimized=False)
  return plgpu.load(ref, layout=plgpu.Layout.WGMMA, optimized=False)


def _qk(q_tile, k_tile, after_issue, interpret):
  """q_tile @ k_tile.T in float32 on the tensor cores (wgmma).

  `after_issue` runs while the wgmma is in flight. The GPU interpreter of
  jax 0.10 cannot run wgmma with a transposed operand, so there the product
  is a plain float32 dot of the shared-memory tiles (same math).
  """
  if interpret:
    s = jnp.dot(q_tile[...], k_tile[...].T,
                preferred_element_type=jnp.float32)
    after_issue()
    return s

  def compute(acc_ref):
    plgpu.wgmma(acc_ref, q_tile, plgpu.transpose_ref(k_tile, (1, 0)))
    after_issue()
    return acc_ref[...]
  shape = (q_tile.shape[0], k_tile.shape[0])
  return pl.run_scoped(compute, plgpu.ACC(shape, jnp.float32))


def _pv_accumulate(acc, p, v_tile, after_issue, interpret):
  """acc + p @ v_tile in float32; `after_issue` runs while it is in flight.

  Compiled, wgmma accumulates into the registers of `acc` (run_state). The
  interpreter (no run_state there) adds a plain float32 dot.
  """
  if interpret:
    acc = acc + jnp.dot(p, v_tile[...], preferred_element_type=jnp.float32)
    after_issue()
    return acc

  def compute(acc_ref):
    plgpu.wgmma(acc_ref, p, v_tile)
    after_issue()
  return pl.run_state(compute)(plgpu.ACC.init(acc))


def _attention_kernel(q_ref, k_ref, v_ref, idx_ref, out_ref, lse_ref,
                      scoped, *, tuning: MosaicTuning, num_rows: int,
                      kv_valid: int, scale: float, interpret: bool):
  """One CTA: 2 * block_q output rows of one (batch, head).

  q_ref: [B, Lq, H, D] (GMEM); k_ref, v_ref: [B, Lk8, H, D] (GMEM), Lk8 a
  multiple of 8 whose first `kv_valid` keys are real; idx_ref: [B, num_rows]
  int32, or None for dense; out_ref: [B * S, num_rows, H, D]; lse_ref:
  [B * S, H, num_rows] float32, S = kv_splits (row b * S + split).
  """
  smem, q_barriers, consumed_barriers, schedule_barrier = scoped
  qo_smem2, stage2, idx_smem2, k_smem, v_smem, lse_smem2 = smem
  k_barriers, v_barriers, q_bars, idx_bars = q_barriers
  k_consumed, v_consumed = consumed_barriers
  block_q, block_kv = tuning.block_q, tuning.block_kv
  dtype = q_ref.dtype
  head_dim = q_ref.shape[-1]
  gather = idx_ref is not None

  batch = lax.axis_index("batch")
  head = lax.axis_index("heads")
  wg = lax.axis_index("wg")
  num_splits = tuning.kv_splits
  tile = lax.axis_index("q_tiles")
  if num_splits > 1:
    tile, split = lax.div(tile, num_splits), lax.rem(tile, num_splits)
  tile_base = jnp.minimum(tile * tuning.rows_per_cta,
                          num_rows - tuning.rows_per_cta)

  kv_len = k_ref.shape[1]
  num_steps = pl.cdiv(kv_len, block_kv)
  max_steps = min(tuning.max_concurrent_steps, num_steps // num_splits)
  # This CTA's steps: [first, end). Static without splits.
  if num_splits > 1:
    first = split * num_steps // num_splits
    end = (split + 1) * num_steps // num_splits
    out_batch = batch * num_splits + split
  else:
    first, end, out_batch = 0, num_steps, batch
  # The last K/V tile starts at kv_len - block_kv: its columns below
  # `mask_lo` were covered by the tile before it, those from `mask_hi` on are
  # zero padding.
  last_start = kv_len - block_kv
  mask_lo = (num_steps - 1) * block_kv - last_start
  mask_hi = kv_valid - last_start
  masked_tail = mask_lo > 0 or mask_hi < block_kv

  def kv_start(step):
    return jnp.minimum(step * block_kv, kv_len - block_kv)

  def schedule_barrier_sync():
    plgpu.barrier_arrive(schedule_barrier)
    plgpu.barrier_wait(schedule_barrier)

  @pl.when(wg < NUM_COMPUTE_WGS)
  def _compute_wg():
    plgpu.set_max_registers(232, action="increase")
    qo_smem = qo_smem2.at[wg]
    lse_smem = lse_smem2.at[wg]
    row_base = tile_base + wg * block_q

    if gather:
      idx_smem = idx_smem2.at[wg]
      stage = stage2.at[wg]
      plgpu.copy_gmem_to_smem(idx_ref.at[batch, pl.ds(row_base, block_q)],
                              idx_smem, idx_bars.at[wg])
      plgpu.barrier_wait(idx_bars.at[wg])

      # One TMA per picked row; all block_q of them arrive on one barrier.
      @pl.loop(0, block_q)
      def _gather_row(r):
        row = idx_smem[r]
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(row, 1), head],
                                stage.at[pl.ds(r, 1)], q_bars.at[wg])

      plgpu.barrier_wait(q_bars.at[wg])
      qo_smem[...] = _load_wgmma(stage, interpret)
      plgpu.commit_smem()
    else:
      plgpu.copy_gmem_to_smem(
          q_ref.at[batch, pl.ds(row_base, block_q), head], qo_smem,
          q_bars.at[wg])
      plgpu.barrier_wait(q_bars.at[wg])

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    m_i = _with_layout(jnp.full((block_q,), -jnp.inf, jnp.float32),
                       row_layout, interpret)
    l_i = _with_layout(jnp.full((block_q,), 0, jnp.float32), row_layout,
                       interpret)
    acc = _with_layout(jnp.full((block_q, head_dim), 0, jnp.float32),
                       plgpu.Layout.WGMMA, interpret)

    plgpu.barrier_wait(k_barriers.at[0])
    pl.when(wg == 1)(schedule_barrier_sync)

    def slot_of(step):
      return lax.rem(step - first, jnp.array(max_steps, step.dtype))

    def kv_step(step, carry, masked=False):
      acc, m_i, l_i = carry
      slot = slot_of(step)

      s = _qk(qo_smem, k_smem.at[slot], schedule_barrier_sync, interpret)
      plgpu.barrier_arrive(k_consumed.at[slot])
      if masked:
        cols = _iota((block_q, block_kv), 1, interpret)
        s = jnp.where((cols >= mask_lo) & (cols < mask_hi), s, -jnp.inf)

      # Online softmax in base 2 (FlashAttention-2, section 3.1.1), with the
      # softmax scale folded into the exponent's multiplier.
      c = scale * LOG2E
      m_new = jnp.maximum(m_i, s.max(axis=1) * c)
      alpha = jnp.exp2(m_i - m_new)
      p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
      acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
      l_i = l_i * alpha + p.sum(axis=1)
      p_lo = p.astype(dtype)
      acc, l_i, m_new, p_lo = lax.optimization_barrier((acc, l_i, m_new, p_lo))
      plgpu.barrier_arrive(schedule_barrier)
      plgpu.barrier_wait(v_barriers.at[slot])
      plgpu.barrier_wait(schedule_barrier)

      def wait_next_k():
        @pl.when(step + 1 < end)
        def _():
          plgpu.barrier_wait(k_barriers.at[slot_of(step + 1)])

      acc = _pv_accumulate(acc, p_lo, v_smem.at[slot], wait_next_k,
                           interpret)
      plgpu.barrier_arrive(v_consumed.at[slot])
      return acc, m_new, l_i

    # Unmasked steps, then the masked last step (if any) as a loop of one
    # iteration: only the last split's range [min(end, num_plain), end) is
    # not empty. (A loop keeps the step index a run-time value; Mosaic GPU
    # in jax 0.11 rejects a constant one.)
    carry = (acc, m_i, l_i)
    num_plain = num_steps - 1 if masked_tail else num_steps
    plain_end = num_plain if num_splits == 1 else jnp.minimum(end, num_plain)
    carry = lax.fori_loop(first, plain_end, kv_step, carry)
    if masked_tail:
      carry = lax.fori_loop(plain_end, end,
                            functools.partial(kv_step, masked=True), carry)
    acc, m_i, l_i = carry
    pl.when(wg == 0)(schedule_barrier_sync)

    l_inv = 1.0 / l_i
    acc *= lax.broadcast_in_dim(l_inv, acc.shape, [0])
    qo_smem[...] = acc.astype(dtype)
    lse_smem[...] = (m_i + jnp.log2(l_i)) * LN2
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(
        qo_smem, out_ref.at[out_batch, pl.ds(row_base, block_q), head])
    plgpu.copy_smem_to_gmem(
        lse_smem, lse_ref.at[out_batch, head, pl.ds(row_base, block_q)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == NUM_COMPUTE_WGS)
  def _producer_wg():
    plgpu.set_max_registers(40, action="decrease")

    def load(step, slot):
      rows = (batch, pl.ds(kv_start(step), block_kv), head)
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot],
                              k_barriers.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot],
                              v_barriers.at[slot])

    for i in range(max_steps):
      load(first + i, i)

    @pl.loop(0, end - first - max_steps)
    def _refill(i):
      step = first + i + max_steps
      slot = lax.rem(i, jnp.array(max_steps, i.dtype))
      rows = (batch, pl.ds(kv_start(step), block_kv), head)
      plgpu.barrier_wait(k_consumed.at[slot])
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot],
                              k_barriers.at[slot])
      plgpu.barrier_wait(v_consumed.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot],
                              v_barriers.at[slot])

    # Observe the last release of every slot, so that no barrier phase goes
    # unawaited when the CTA exits (the GPU interpreter checks this; on the
    # GPU the producer is idle by then).
    for slot in range(max_steps):
      plgpu.barrier_wait(k_consumed.at[slot])
      plgpu.barrier_wait(v_consumed.at[slot])


def _merge_splits(out, lse, num_splits):
  """Combine partial attention over disjoint key ranges.

  With lse_s and out_s (normalised) of split s: lse = log sum_s e^lse_s and
  out = sum_s e^(lse_s - lse) out_s (the LSE-weighted merge of
  flash-decoding). out: [B * S, R, H, D]; lse: [B * S, H, R].
  """
  batch_splits, rows, heads, head_dim = out.shape
  batch = batch_splits // num_splits
  out = out.reshape(batch, num_splits, rows, heads, head_dim)
  lse = lse.reshape(batch, num_splits, heads, -1)
  total = jax.nn.logsumexp(lse, axis=1)
  weights = jnp.exp(lse - total[:, None])[..., :rows]  # [B, S, H, R]
  merged = jnp.einsum("bshr,bsrhd->brhd", weights, out.astype(jnp.float32))
  return merged.astype(out.dtype), total


def sparse_attention_mosaic(q, k, v, q_index=None, *, scale: float,
                            tuning: MosaicTuning | None = None,
                            interpret: bool = False):
  """out (B, K, H, D) q.dtype and lse (B, H, K) float32; see module doc.

  Raises NotImplementedError for inputs the kernel does not handle (the
  caller falls back to another backend).
  """
  head_dim = q.shape[-1]
  tuning = tuning or MosaicTuning.get_default(head_dim)
  if (why := supports(q, k, q_index, scale, tuning)) is not None:
    raise NotImplementedError(f"Mosaic GPU sparse attention: {why}")
  batch, q_len, heads, _ = q.shape
  kv_len = k.shape[1]
  rows = tuning.rows_per_cta

  # TMA with the swizzled (8, 64) tiling needs row counts that are multiples
  # of 8 in GMEM. Keys: pad to a multiple of 8 (a copy only when Lk is not
  # one already) and mask the padding. Queries: a dense q of such a length is
  # read in 64-row tiles; any other q goes through the row gather with
  # q_index = arange(Lq), which has no alignment needs.
  kv_len8 = _round_up(kv_len, 8)
  if kv_len8 != kv_len:
    pad = ((0, 0), (0, kv_len8 - kv_len), (0, 0), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
  if q_index is None and (q_len % 8 or q_len < rows):
    q_index = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32),
                               (batch, q_len))
  num_out = q_len if q_index is None else q_index.shape[1]
  # Output rows: at least one CTA's worth, a multiple of 8 (sliced after).
  num_rows = _round_up(max(num_out, rows), 8)
  if q_index is not None:
    # Repeat the last index up to num_rows: extra rows are computed, dropped.
    q_index = q_index.astype(jnp.int32)
    if num_rows != num_out:
      q_index = jnp.pad(q_index, ((0, 0), (0, num_rows - num_out)),
                        mode="edge")
  lse_len = num_rows  # A multiple of 8: 16-byte aligned rows for the TMA.

  num_steps = pl.cdiv(kv_len8, tuning.block_kv)
  num_splits = tuning.kv_splits
  if num_splits is None:
    num_ctas = pl.cdiv(num_rows, rows) * heads * batch
    num_splits = choose_kv_splits(num_ctas, num_steps, num_multiprocessors())
  num_splits = min(num_splits, num_steps)
  if num_splits != tuning.kv_splits:
    tuning = dataclasses.replace(tuning, kv_splits=num_splits)
  max_steps = min(tuning.max_concurrent_steps, num_steps // num_splits)
  num_tiles = pl.cdiv(num_rows, rows) * num_splits
  grid = (num_tiles, heads, batch)
  grid_names = ("q_tiles", "heads", "batch")
  if not tuning.q_tiles_first:
    grid = (heads, num_tiles, batch)
    grid_names = ("heads", "q_tiles", "batch")

  tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  dtype = q.dtype
  smem = (
      plgpu.SMEM((NUM_COMPUTE_WGS, tuning.block_q, head_dim), dtype,
                 transforms=tiled),
      plgpu.SMEM((NUM_COMPUTE_WGS, tuning.block_q, head_dim), dtype)
      if q_index is not None else None,
      plgpu.SMEM((NUM_COMPUTE_WGS, tuning.block_q), jnp.int32)
      if q_index is not None else None,
      plgpu.SMEM((max_steps, tuning.block_kv, head_dim), dtype,
                 transforms=tiled),
      plgpu.SMEM((max_steps, tuning.block_kv, head_dim), dtype,
                 transforms=tiled),
      plgpu.SMEM((NUM_COMPUTE_WGS, tuning.block_q), jnp.float32),
  )
  q_row_arrivals = tuning.block_q if q_index is not None else 1
  barriers = (
      plgpu.Barrier(num_barriers=max_steps),
      plgpu.Barrier(num_barriers=max_steps),
      plgpu.Barrier(num_arrivals=q_row_arrivals,
                    num_barriers=NUM_COMPUTE_WGS),
      plgpu.Barrier(num_barriers=NUM_COMPUTE_WGS),
  )
  consumed = (plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS,
                            num_barriers=max_steps),) * 2
  schedule = plgpu.Barrier(num_arrivals=NUM_COMPUTE_WGS)
  body = functools.partial(_attention_kernel, tuning=tuning,
                           num_rows=num_rows, kv_valid=kv_len,
                           scale=float(scale), interpret=bool(interpret))

  def entry(*refs):
    if q_index is None:
      q_ref, k_ref, v_ref, out_ref, lse_ref = refs
      idx_ref = None
    else:
      q_ref, k_ref, v_ref, idx_ref, out_ref, lse_ref = refs
    pl.run_scoped(
        lambda *scoped: body(q_ref, k_ref, v_ref, idx_ref, out_ref, lse_ref,
                             scoped),
        smem, barriers, consumed, schedule, collective_axes="wg")

  out_type = (
      jax.ShapeDtypeStruct((batch * num_splits, num_rows, heads, head_dim),
                           dtype),
      jax.ShapeDtypeStruct((batch * num_splits, heads, lse_len), jnp.float32),
  )
  kernel_kwargs = {}
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret import params as interp_params
    kernel_kwargs["interpret"] = interp_params.InterpretGPUParams()
  call = plgpu.kernel(
      entry, out_type=out_type, grid=grid, grid_names=grid_names,
      num_threads=NUM_COMPUTE_WGS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          approx_math=True,
          lowering_semantics=getattr(plgpu.LoweringSemantics,
                                     tuning.lowering_semantics)),
      **kernel_kwargs)
  operands = (q, k, v) if q_index is None else (q, k, v, q_index)
  out, lse = call(*operands)
  if num_splits > 1:
    out, lse = _merge_splits(out, lse, num_splits)
  if num_rows != num_out:
    out = out[:, :num_out]
  if lse_len != num_out:
    lse = lse[:, :, :num_out]
  return out, lse
