"""Multi-query associative recall (MQAR), as Zoology defines it (Arora et al., 2023).

Each example starts with `num_kv_pairs` key-value pairs `k1 v1 k2 v2 ...`, keys drawn without
repeats from `[1, vocab/2)` and values from `[vocab/2, vocab)`. The rest of the sequence holds each
key once more, as a query, at even offsets whose gaps follow Zoology's power law
`p(gap = i) ∝ a * i^(a - 1)` (a = `power_a`, small a favours long-range queries). The model must
predict the value paired with a queried key *at the query position*; every other position is
unlabelled, so we return only the `num_kv_pairs` query positions and their targets (the trainer
computes logits there alone, which Zoology's -100 labels amount to).

Zoology's inputs are shifted by one (inputs = sequence[:-1]); we reproduce that layout so the query
key sits at `2 * kv + 2 * gap` of the input and its target is the paired value.
Filler positions are 0, as in Zoology's paper configs (`random_non_queries=False`, our default);
with `random_non_queries=True` every filler 0 is replaced by a token drawn uniformly from the whole
vocabulary `[0, vocab)`, as Zoology's `_mqar` does (`inputs[inputs == 0] = randint(vocab_size)`,
HazyResearch/zoology `zoology/data/associative_recall.py`), so a filler may repeat a key, even a
queried one, before its query.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class MQARBatch:
  """`inputs: [N, T] int32`, `query_positions: [N, kv] int32`, `targets: [N, kv] int32`."""
  inputs: np.ndarray
  query_positions: np.ndarray
  targets: np.ndarray

  def __len__(self) -> int:
    return self.inputs.shape[0]

  def slice(self, idx) -> "MQARBatch":
    return MQARBatch(self.inputs[idx], self.query_positions[idx], self.targets[idx])


def _sample_without_replacement(rng: np.random.Generator, n_rows: int, n_choices: int, k: int,
                                log_p: np.ndarray | None = None) -> np.ndarray:
  """`[n_rows, k]` distinct indices in `[0, n_choices)` per row, drawn in order (Gumbel top-k).

  With `log_p`, this has the law of `np.random.choice(n, k, replace=False, p=exp(log_p))`.
  """
  out = np.empty((n_rows, k), np.int64)
  step = max(1, 2_000_000 // max(n_choices, 1))
  for s in range(0, n_rows, step):
    e = min(n_rows, s + step)
    g = rng.gumbel(size=(e - s, n_choices))
    if log_p is not None:
      g = g + log_p
    top = np.argpartition(-g, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(g, top, axis=1), axis=1)
    out[s:e] = np.take_along_axis(top, order, axis=1)
  return out


def multiquery_ar(*, vocab_size: int, num_examples: int, seq_len: int, num_kv_pairs: int,
                  seed: int, power_a: float = 0.01, random_non_queries: bool = False) -> MQARBatch:
  """Generates `num_examples` MQAR sequences of length `seq_len` (see module docstring)."""
  if seq_len % 2:
    raise ValueError(f"seq_len must be even, got {seq_len}")
  if vocab_size <= seq_len:
    raise ValueError(f"vocab_size ({vocab_size}) must exceed seq_len ({seq_len})")
  if 4 * num_kv_pairs > seq_len:
    raise ValueError(f"num_kv_pairs={num_kv_pairs} needs seq_len >= {4 * num_kv_pairs}, got {seq_len}")
  if num_kv_pairs < 1 or num_examples < 1:
    raise ValueError("num_kv_pairs and num_examples must be >= 1")
  if num_kv_pairs > vocab_size // 2 - 1:
    raise ValueError(f"num_kv_pairs={num_kv_pairs} exceeds the {vocab_size // 2 - 1} available keys")
  rng = np.random.default_rng(seed)
  n, kv, half = num_examples, num_kv_pairs, vocab_size // 2
  keys = 1 + _sample_without_replacement(rng, n, half - 1, kv)
  values = half + _sample_without_replacement(rng, n, vocab_size - half, kv)
  context = 2 * kv
  space = (seq_len - context) // 2
  gaps_i = np.arange(1, space + 1, dtype=np.float64)
  log_p = np.log(power_a) + (power_a - 1) * np.log(gaps_i)
  gaps = _sample_without_replacement(rng, n, space, kv, log_p=log_p - np.logaddexp.reduce(log_p))

  seq = np.zeros((n, seq_len + 1), np.int64)
  seq[:, 0:context:2] = keys
  seq[:, 1:context:2] = values
  query_pos = context + 2 * gaps
  np.put_along_axis(seq, query_pos, keys, axis=1)
  inputs = seq[:, :-1]
  if random_non_queries:
    rand = rng.integers(0, vocab_size, size=inputs.shape)
    inputs = np.where(inputs == 0, rand, inputs)
  return MQARBatch(inputs.astype(np.int32), query_pos.astype(np.int32), values.astype(np.int32))


class MQARLoader:
  """Endless shuffled batches over a fixed MQAR training set; its position is checkpointable.

  `state()` / `restore(state)` give the exact position (epoch, index), so a resumed run sees the
  same batches it would have seen.
  """

  def __init__(self, data: MQARBatch, batch_size: int, seed: int):
    if batch_size > len(data):
      raise ValueError(f"batch_size={batch_size} exceeds the {len(data)} training examples")
    self.data, self.batch_size, self.seed = data, batch_size, seed
    self.epoch, self.index = 0, 0
    self._perm = self._permutation(0)

  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng((self.seed, epoch)).permutation(len(self.data))

  def state(self) -> dict:
    return {"epoch": self.epoch, "index": self.index}

  def restore(self, state: dict) -> None:
    self.epoch, self.index = int(state["epoch"]), int(state["index"])
    self._perm = self._permutation(self.epoch)

  def __iter__(self):
    return self

  def __next__(self) -> MQARBatch:
    if self.index + self.batch_size > len(self.data):
      self.epoch, self.index = self.epoch + 1, 0
      self._perm = self._permutation(self.epoch)
    idx = self._perm[self.index:self.index + self.batch_size]
    self.index += self.batch_size
    return self.data.slice(idx)
