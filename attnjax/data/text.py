"""Byte-level language-modelling data from text that ships with Python, or from a local file.

With no path, the corpus is the source of a fixed list of standard-library packages (about
1 MB of real text, the same on every machine with the same Python), so LM experiments need no
download. Give `path=` to train on your own text file instead.
"""

from __future__ import annotations

import importlib
import os

import numpy as np

from attnjax.data.loader import IndexedLoader

STDLIB_PACKAGES = ("json", "email", "http", "logging", "unittest", "xml", "urllib", "asyncio")


def load_corpus(path: str | None = None, max_bytes: int | None = None) -> np.ndarray:
  """Returns the corpus as `uint8 [N]`."""
  if path:
    if not os.path.exists(path):
      raise ValueError(f"data path {path!r} does not exist")
    with open(path, "rb") as f:
      data = f.read()
  else:
    chunks = []
    for name in STDLIB_PACKAGES:
      root = os.path.dirname(importlib.import_module(name).__file__)
      for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        if "test" in dirpath.split(os.sep)[-1]:
          continue
        for fn in sorted(filenames):
          if fn.endswith(".py"):
            with open(os.path.join(dirpath, fn), "rb") as f:
              chunks.append(f.read())
    data = b"\n".join(chunks)
  if max_bytes:
    data = data[:max_bytes]
  return np.frombuffer(data, np.uint8)


class WindowLoader(IndexedLoader):
  """Random `[batch, seq_len + 1]` windows of a byte array; batch i depends only on (seed, i).

  `bos`: None (plain random crops), or a token id put at position 0 of every window, followed by
  `seq_len` bytes of the crop (a fixed first token, as LMs see after a BOS: the attention-sink
  probes need one). `state()` / `restore()` record the batch index, so a resumed run sees the
  same batches.
  """

  def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, seed: int,
               bos: int | None = None):
    if len(data) <= seq_len + 1:
      raise ValueError(f"corpus of {len(data)} bytes is shorter than seq_len + 1 = {seq_len + 1}")
    if bos is not None and not 0 <= bos < 256:
      raise ValueError(f"bos must be None or a byte id in [0, 256), got {bos}")
    self.data, self.batch_size, self.seq_len, self.seed = data, batch_size, seq_len, seed
    self.bos = bos
    self.index = 0

  def __next__(self) -> np.ndarray:
    rng = np.random.default_rng((self.seed, self.index))
    self.index += 1
    starts = rng.integers(0, len(self.data) - self.seq_len - 1, size=self.batch_size)
    out = np.stack([self.data[s:s + self.seq_len + 1] for s in starts]).astype(np.int32)
    if self.bos is not None:
      out = np.concatenate([np.full((self.batch_size, 1), self.bos, np.int32), out[:, :-1]], 1)
    return out
