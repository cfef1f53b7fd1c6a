"""Block-size defaults for the flash kernel, per backend.

Pallas-Triton needs power-of-two tiles and `tl.dot` dimensions >= 16. On a GPU the defaults follow the
usual FlashAttention-2 Triton choices for Hopper/Ampere (128 x 64 tiles, 4 warps for D <= 64 and 8
above, 2 pipeline stages); they are starting points to be re-tuned by `experiments/bench_flash.py`, not
measured optima. In interpret mode (CPU) the tile size only changes how many Python-level loop steps
the interpreter runs, so smaller tiles keep tests fast on tiny inputs.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FlashBlockSizes:
  block_q: int
  block_k: int
  num_warps: int
  num_stages: int


def is_power_of_two(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


def next_power_of_two(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def default_block_sizes(head_dim: int, *, interpret: bool) -> FlashBlockSizes:
  """Defaults for the Triton-backend kernel (`head_dim` is the padded power-of-two size)."""
  if interpret:
    return FlashBlockSizes(block_q=32, block_k=32, num_warps=4, num_stages=2)
  if head_dim <= 64:
    return FlashBlockSizes(block_q=128, block_k=64, num_warps=4, num_stages=2)
  if head_dim <= 128:
    return FlashBlockSizes(block_q=128, block_k=64, num_warps=8, num_stages=2)
  # D = 256: smaller key tiles keep K, V and the accumulator within shared memory / registers.
  return FlashBlockSizes(block_q=64, block_k=32, num_warps=8, num_stages=2)
