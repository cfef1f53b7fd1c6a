"""Small generated tasks for the probe models: image + text arithmetic, sequence reversal.

* `digit_arithmetic`: an 8x8 digit image (`images.load_digits`) and the prompt `[op, k, =]`;
  the answer is `(label op k) mod 10` (op `+` or `-`), so the model must read both modalities.
* `reversal`: a random source sequence; the target is the source reversed (target position `i`
  aligns with source position `S - 1 - i`, the reference alignment for cross-attention maps).
"""

from __future__ import annotations

import numpy as np

# digit_arithmetic vocabulary: the digits 0-9 are their own tokens.
PLUS, MINUS, EQUALS = 10, 11, 12
ARITH_VOCAB = 13
BOS = 0  # reversal: the decoder's start token (source symbols are 1 .. vocab_size - 1)


def digit_arithmetic(images: np.ndarray, labels: np.ndarray, *, prompts_per_image: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`(images [N*P, S, S, 1], tokens int32 [N*P, 4])`, `P = prompts_per_image`.

  `tokens[:, :3]` is the prompt `[op, k, EQUALS]` (`op` in {PLUS, MINUS}, `k` in 0..9) and
  `tokens[:, 3]` the answer `(label + k) % 10` or `(label - k) % 10`.
  """
  if prompts_per_image < 1:
    raise ValueError(f"prompts_per_image must be >= 1, got {prompts_per_image}")
  if len(images) != len(labels):
    raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
  rng = np.random.default_rng(seed)
  n = len(labels) * prompts_per_image
  lab = np.repeat(labels.astype(np.int64), prompts_per_image)
  op = rng.integers(0, 2, size=n)
  k = rng.integers(0, 10, size=n)
  ans = np.where(op == 0, lab + k, lab - k) % 10
  tokens = np.stack([np.where(op == 0, PLUS, MINUS), k, np.full(n, EQUALS), ans], -1).astype(np.int32)
  return np.repeat(images, prompts_per_image, axis=0), tokens


def reversal(num_examples: int, seq_len: int, vocab_size: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`(src int32 [N, S], tgt int32 [N, S])` with `tgt = src[:, ::-1]`, symbols in `1 .. vocab_size - 1`."""
  if vocab_size < 3 or seq_len < 1 or num_examples < 1:
    raise ValueError(f"need vocab_size >= 3, seq_len >= 1, num_examples >= 1; got {vocab_size}, "
                     f"{seq_len}, {num_examples}")
  src = np.random.default_rng(seed).integers(1, vocab_size, size=(num_examples, seq_len)).astype(np.int32)
  return src, np.ascontiguousarray(src[:, ::-1])
