"""Selective copying (Gu & Dao 2023, Mamba, arXiv:2312.00752, section 3.1 and appendix E.1).

Each example is `seq_len` tokens: the first `seq_len - num_tokens` positions hold `num_tokens`
data tokens at random (sorted, distinct) positions among noise tokens, and the last `num_tokens`
positions hold a marker token. At the j-th marker the model must output the j-th data token: the
data tokens in their order of appearance, with the noise between them skipped. Unlike the plain
copying task the spacing varies per example, so a fixed time-invariant kernel cannot solve it;
the model has to select by content.

Token ids (the layout of the copying generator of the S4/Mamba authors, `torch_copying_data` in
state-spaces/s4 `src/dataloaders/datasets/copying.py`, with `variable=True`): 0 is noise, data
tokens are drawn uniformly from `[1, vocab_size - 1)`, `vocab_size - 1` is the marker.

Returned as an `MQARBatch` (`inputs [N, T]`, `query_positions [N, num_tokens]` = the marker
positions, `targets [N, num_tokens]`), so the MQAR loss (cross-entropy at the queried positions
only) and loader serve it unchanged.
"""

from __future__ import annotations

import numpy as np

from attnjax.data.mqar import MQARBatch, _sample_without_replacement

NOISE = 0


def marker_token(vocab_size: int) -> int:
  """The id of the marker (copy-prompt) token: `vocab_size - 1`."""
  return vocab_size - 1


def selective_copy(*, vocab_size: int, num_examples: int, seq_len: int, num_tokens: int,
                   seed: int) -> MQARBatch:
  """`num_examples` selective-copying sequences of length `seq_len` (see the module docstring).

  Needs `vocab_size >= 3` (noise, at least one data token, the marker) and
  `seq_len >= 2 * num_tokens` (room for the data tokens and their markers)."""
  if vocab_size < 3:
    raise ValueError(f"vocab_size must be >= 3 (noise, data tokens, marker), got {vocab_size}")
  if num_tokens < 1 or num_examples < 1:
    raise ValueError(f"num_tokens and num_examples must be >= 1, got {num_tokens}, {num_examples}")
  if seq_len < 2 * num_tokens:
    raise ValueError(f"seq_len must be >= 2 * num_tokens = {2 * num_tokens}, got {seq_len}")
  rng = np.random.default_rng(seed)
  n, k = num_examples, num_tokens
  context = seq_len - k
  positions = np.sort(_sample_without_replacement(rng, n, context, k), axis=1)
  tokens = rng.integers(1, vocab_size - 1, size=(n, k))
  inputs = np.full((n, seq_len), NOISE, np.int64)
  np.put_along_axis(inputs, positions, tokens, axis=1)
  inputs[:, context:] = marker_token(vocab_size)
  query_positions = np.broadcast_to(np.arange(context, seq_len), (n, k))
  return MQARBatch(inputs.astype(np.int32), query_positions.astype(np.int32), tokens.astype(np.int32))
