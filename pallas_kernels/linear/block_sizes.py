"""Tile sizes for the chunked linear-attention kernels.

The defaults follow flash-linear-attention's choices (chunk 64, GLA sub-chunk 16) and Lightning
Attention-2's value-dimension split; they are untuned on GPU here (no GPU was available when this
was written), so treat them as starting points for `experiments/bench_linear_kernel.py`.
"""

from __future__ import annotations

import dataclasses

# Triton's dot needs every operand dimension >= 16 and every tile a power of two.
MIN_TILE = 16


def next_power_of_2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Static tile sizes.

  chunk: rows per chunk (intra-chunk quadratic part, inter-chunk state passing).
  sub_chunk: rows per diagonal block of the per-key-dimension (GLA) gate path, where the
    intra-chunk matrix is built element-wise in float32; off-diagonal blocks use matmuls.
  block_v: columns of V (and of the state) handled by one program; the grid runs over
    `Dv / block_v` value blocks in parallel, dq/dk partial sums are reduced outside.
  """
  chunk: int = 64
  sub_chunk: int = 16
  block_v: int = 64
  num_warps: int = 4
  num_stages: int = 2

  def resolve(self, seq_len: int, dv_padded: int) -> "BlockSizes":
    """Clamps the tiles to the problem: chunk <= next_pow2(T), all >= 16, powers of two."""
    for name in ("chunk", "sub_chunk", "block_v"):
      val = getattr(self, name)
      if val < MIN_TILE or next_power_of_2(val) != val:
        raise ValueError(f"{name} must be a power of two >= {MIN_TILE}, got {val}")
    chunk = min(self.chunk, max(MIN_TILE, next_power_of_2(seq_len)))
    sub_chunk = min(self.sub_chunk, chunk)
    block_v = min(self.block_v, dv_padded)
    return dataclasses.replace(self, chunk=chunk, sub_chunk=sub_chunk, block_v=block_v)


DEFAULT = BlockSizes()
