"""How the N tokens of a video are split over P sequence shards.

Shard i holds the contiguous tokens [start_i, start_i + count_i), as
`np.array_split` splits them: with N = q P + r, the first r shards hold
q + 1 tokens and the others q. Every shard has the same number of rows
(`slots` = ceil(N / P), static shapes under shard_map); when r > 0 the
P - r short shards end in ONE pad row. Examples: Wan 480p x 81 (32,760
tokens) and 720p x 81 (75,600) split evenly over 2, 4 or 8 devices (no
padding); 32,760 over 16 gives r = 8, so 8 shards carry a pad row.

Pad rows hold a copy of a real token (no NaNs), are never selected by
Astraea, are excluded from every key set of self-attention (masked), and
their outputs are dropped when the shards are put back together.
Each shard's RoPE rows are the table rows of its own tokens (`shard`
applies to the table as to the tokens).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """N tokens over P contiguous shards of `slots` rows each."""

  num_tokens: int
  num_shards: int

  def __post_init__(self):
    if self.num_shards < 1:
      raise ValueError(f"num_shards={self.num_shards} must be >= 1")
    if self.num_tokens < self.num_shards:
      raise ValueError(
          f"num_tokens={self.num_tokens} tokens cannot be split over "
          f"num_shards={self.num_shards} sequence shards: each needs one "
          "token at least; use fewer devices on the seq axis")

  @property
  def base(self) -> int:
    """Tokens of the shortest shard, q = N // P."""
    return self.num_tokens // self.num_shards

  @property
  def num_long(self) -> int:
    """r = N % P: shards 0..r-1 hold q + 1 tokens."""
    return self.num_tokens % self.num_shards

  @property
  def padded(self) -> bool:
    return self.num_long > 0

  @property
  def slots(self) -> int:
    """Rows per shard, ceil(N / P)."""
    return self.base + int(self.padded)

  def counts(self) -> np.ndarray:
    """(P,) real tokens per shard."""
    return self.base + (np.arange(self.num_shards) < self.num_long)

  def starts(self) -> np.ndarray:
    """(P,) first token of each shard."""
    return np.concatenate([[0], np.cumsum(self.counts())[:-1]])

  def slot_valid(self) -> np.ndarray:
    """(P * slots,) bool: False on pad rows."""
    rows = np.arange(self.slots)[None, :]
    return (rows < self.counts()[:, None]).reshape(-1)

  def slot_tokens(self) -> np.ndarray:
    """(P * slots,) token index of every row; a pad row repeats the
    shard's last token."""
    rows = np.minimum(np.arange(self.slots)[None, :],
                      self.counts()[:, None] - 1)
    return (self.starts()[:, None] + rows).reshape(-1).astype(np.int32)

  def token_slots(self) -> np.ndarray:
    """(N,) row of every token in the sharded layout."""
    return np.flatnonzero(self.slot_valid()).astype(np.int32)

  def shard(self, x, axis: int = 1):
    """(..., N, ...) tokens -> (..., P * slots, ...) in shard-row order."""
    if not self.padded:
      return x
    return jnp.take(x, self.slot_tokens(), axis=axis)

  def unshard(self, x, axis: int = 1):
    """(..., P * slots, ...) -> (..., N, ...): pad rows dropped."""
    if not self.padded:
      return x
    return jnp.take(x, self.token_slots(), axis=axis)

  def local_valid(self, shard_index):
    """(slots,) bool rows of shard `shard_index` (may be traced)."""
    count = self.base + (shard_index < self.num_long).astype(jnp.int32)
    return jnp.arange(self.slots) < count
