"""The resumable-loader contract the trainer checkpoints: batch i depends only on (seed, i)."""

from __future__ import annotations


class IndexedLoader:
  """Base for loaders whose batch `i` is a pure function of `(seed, i)`: `state()` / `restore()`
  record the batch index, so a resumed run sees the same batches. Subclasses set `self.index = 0`
  and implement `__next__` (incrementing `self.index`)."""

  index: int = 0

  def state(self) -> dict:
    return {"index": self.index}

  def restore(self, state: dict) -> None:
    self.index = int(state["index"])

  def __iter__(self):
    return self
