"""Landmark tokens in the data pipeline (Landmark attention, Mohtashami & Jaggi 2023).

Landmark attention needs a landmark token after every `block_size` tokens of the input; the
attention (`attnjax.ops.sparse.dynamic.landmark_attention`, mixer "landmark" with `block =
block_size`) treats every `(block_size + 1)`-th position as the landmark of the block before it.
As epfml/landmark-attention's `data/utils.py` (`apply_add_mem_tokens`: a `mem_id` is appended after
each token whose index `% freq == freq - 1`), a landmark also follows the last full block, and a
trailing partial block has none.
"""

from __future__ import annotations

import numpy as np


def landmark_slots(length: int, block_size: int) -> np.ndarray:
  """`[length]` bool: which positions of a landmark-interleaved sequence hold landmarks."""
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}")
  return np.arange(length) % (block_size + 1) == block_size


def insert_landmarks(tokens, block_size: int, landmark_id: int) -> np.ndarray:
  """`tokens [..., T]` int -> `[..., T + T // block_size]` with `landmark_id` after every
  `block_size` tokens (the layout `landmark_slots` describes)."""
  tokens = np.asarray(tokens)
  if tokens.ndim < 1:
    raise ValueError(f"tokens must be [..., T], got shape {tokens.shape}")
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}")
  t = tokens.shape[-1]
  return np.insert(tokens, np.arange(block_size, t + 1, block_size), landmark_id, axis=-1)


def remove_landmarks(tokens, block_size: int) -> np.ndarray:
  """Inverse of `insert_landmarks` along the last axis."""
  tokens = np.asarray(tokens)
  return tokens[..., ~landmark_slots(tokens.shape[-1], block_size)]
