"""Small image-classification data that ships inside an installed package (no download).

`load_digits()` reads scikit-learn's bundled handwritten digits (1,797 grey 8x8 images, 10
classes; UCI optical digits) and splits them reproducibly. scikit-learn is in the `test` and
`data` extras; without it the loader says how to install it.
"""

from __future__ import annotations

import numpy as np

from attnjax.data.loader import IndexedLoader


def load_digits(split: str = "train", *, test_fraction: float = 0.2, seed: int = 0,
                image_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Returns `(images float32 [N, S, S, 1] in [0, 1], labels int32 [N])`, `S = image_size`.

  The split is a fixed permutation from `seed`: `split="train"` takes the first
  `1 - test_fraction` of it, `"test"` the rest, so the two never overlap. `image_size` a
  multiple of 8 upsamples by pixel repetition (so a patch size above 1 still gives a grid).
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  if image_size % 8:
    raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
  try:
    from sklearn import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - the test extra installs it
    raise ImportError("load_digits needs scikit-learn: pip install 'attnjax[data]'") from e
  bunch = datasets.load_digits()
  images = (bunch.images.astype(np.float32) / 16.0)[..., None]
  labels = bunch.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(labels))
  n_test = int(round(len(labels) * test_fraction))
  idx = order[n_test:] if split == "train" else order[:n_test]
  images, labels = images[idx], labels[idx]
  r = image_size // 8
  if r > 1:
    images = images.repeat(r, axis=1).repeat(r, axis=2)
  return images, labels


class ArrayLoader(IndexedLoader):
  """Random batches of `(x, y)` arrays; batch i depends only on (seed, i).

  `state()` / `restore()` record the batch index, so a resumed run sees the same batches.
  """

  def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
    if len(x) != len(y):
      raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    if not 0 < batch_size:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
    self.index = 0

  def __next__(self) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng((self.seed, self.index))
    self.index += 1
    idx = rng.integers(0, len(self.x), size=self.batch_size)
    return self.x[idx], self.y[idx]


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """The whole set in order, as `[(x, y), ...]` of at most `batch_size` each."""
  return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
