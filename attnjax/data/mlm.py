"""Byte-level masked-language-model batches from the packaged text corpus (`attnjax.data.text`).

Each row is a window of the corpus of random length in `[min_len, seq_len]`, right-padded with
`PAD`; the row lengths of a batch add up to at most `packed_tokens`, so an unpadding encoder can
run the batch in a packed row of that many slots. Masking follows BERT as the MosaicBERT authors
run it (`transformers.DataCollatorForLanguageModeling`): each real token is chosen with
probability `mask_prob` (0.3 for MosaicBERT pre-training, 0.15 for its evaluation); a chosen token
becomes `MASK` with probability 0.8, a random byte with 0.1, and stays itself with 0.1.
"""

from __future__ import annotations

import numpy as np

from attnjax.data.loader import IndexedLoader

PAD, MASK = 256, 257
VOCAB_SIZE = 320  # 258 symbols, rounded up to a multiple of 64 as MosaicBERT pads its vocabulary


class MLMLoader(IndexedLoader):
  """Batches `{"inputs", "attention_mask", "targets", "weights"}`, each `[batch, seq_len]`.

  `targets` hold the original bytes, `weights` are 1.0 at the chosen (loss) positions and 0
  elsewhere. Batch i depends only on (seed, i); `state()` / `restore()` record i.
  """

  def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, *, min_len: int | None = None,
               mask_prob: float = 0.3, packed_tokens: int | None = None, seed: int = 0):
    min_len = seq_len if min_len is None else min_len
    packed_tokens = batch_size * seq_len if packed_tokens is None else packed_tokens
    if not 1 <= min_len <= seq_len:
      raise ValueError(f"min_len must be in [1, seq_len={seq_len}], got {min_len}")
    if not 0 < mask_prob < 1:
      raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
    if packed_tokens < batch_size * min_len:
      raise ValueError(f"packed_tokens={packed_tokens} must be >= batch_size * min_len = {batch_size * min_len}")
    if len(data) <= seq_len:
      raise ValueError(f"corpus of {len(data)} bytes is shorter than seq_len + 1 = {seq_len + 1}")
    self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
    self.min_len, self.mask_prob, self.packed_tokens, self.seed = min_len, mask_prob, packed_tokens, seed
    self.index = 0

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((self.seed, self.index))
    self.index += 1
    b, t, lo = self.batch_size, self.seq_len, self.min_len
    lengths = rng.integers(lo, t + 1, size=b)
    if lengths.sum() > self.packed_tokens:  # shrink the extra length above min_len to fit the budget
      extra = lengths - lo
      lengths = lo + (extra * (self.packed_tokens - b * lo) // extra.sum())
    starts = rng.integers(0, len(self.data) - t, size=b)
    targets = np.stack([self.data[s:s + t] for s in starts]).astype(np.int32)
    real = np.arange(t)[None] < lengths[:, None]
    targets = np.where(real, targets, PAD)
    chosen = real & (rng.random((b, t)) < self.mask_prob)
    to_mask = chosen & (rng.random((b, t)) < 0.8)
    to_random = chosen & ~to_mask & (rng.random((b, t)) < 0.5)
    inputs = np.where(to_mask, MASK, targets)
    inputs = np.where(to_random, rng.integers(0, 256, size=(b, t)), inputs).astype(np.int32)
    return {"inputs": inputs, "attention_mask": real, "targets": targets,
            "weights": chosen.astype(np.float32)}
