"""Stochastic-block-model node classification, generated (no download), as dense padded batches.

In the spirit of the SBM CLUSTER benchmark the Graph Transformer authors train on (Dwivedi et al.,
2020, arXiv 2003.00982; graphdeeplearning/graphtransformer `data/SBMs.py`): each graph has
`n ~ U[min_nodes, max_nodes]` nodes split among `num_classes` communities (every community
non-empty), an edge between two nodes of one community with probability `p_in` and of two
communities with `p_out` (undirected, no self-loops); every node has type 0 except one random node
per community, whose type is its community + 1. The task: each node's community. Each graph carries
its Laplacian PE (`laplacian_pe`) of `pe_dim` columns.
"""

from __future__ import annotations

import numpy as np

from attnjax.models.graph_transformer import laplacian_pe
from attnjax.data.loader import IndexedLoader


def sbm_graphs(num_graphs: int, *, min_nodes: int, max_nodes: int, num_classes: int, p_in: float,
               p_out: float, pe_dim: int, seed: int) -> dict[str, np.ndarray]:
  """`{"node_types" [G, N] int32, "adj" [G, N, N] bool, "node_mask" [G, N] bool, "lap_pe"
  [G, N, pe_dim] float32, "labels" [G, N] int32}` with N = max_nodes (padding nodes: mask False,
  no edges, zeros)."""
  if not num_classes <= min_nodes <= max_nodes:
    raise ValueError(f"need num_classes <= min_nodes <= max_nodes, got {num_classes}, {min_nodes}, {max_nodes}")
  rng = np.random.default_rng(seed)
  g, nmax = num_graphs, max_nodes
  out = {"node_types": np.zeros((g, nmax), np.int32), "adj": np.zeros((g, nmax, nmax), bool),
         "node_mask": np.zeros((g, nmax), bool), "lap_pe": np.zeros((g, nmax, pe_dim), np.float32),
         "labels": np.zeros((g, nmax), np.int32)}
  for i in range(g):
    n = int(rng.integers(min_nodes, max_nodes + 1))
    labels = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, n - num_classes)])
    rng.shuffle(labels)
    same = labels[:, None] == labels[None, :]
    upper = np.triu(rng.random((n, n)) < np.where(same, p_in, p_out), 1)
    adj = upper | upper.T
    types = np.zeros(n, np.int32)
    for c in range(num_classes):
      types[rng.choice(np.flatnonzero(labels == c))] = c + 1
    out["node_types"][i, :n], out["adj"][i, :n, :n], out["node_mask"][i, :n] = types, adj, True
    out["labels"][i, :n] = labels
    if pe_dim:
      out["lap_pe"][i, :n] = laplacian_pe(adj, pe_dim)
  return out


class GraphLoader(IndexedLoader):
  """Random batches of a `sbm_graphs` dataset plus `"train" [B]` (True) with the authors' random
  Laplacian-PE sign flip: one sign per PE column per batch (`train_SBMs_node_classification.py`).
  Batch i depends only on (seed, i); `state()` / `restore()` record i."""

  def __init__(self, data: dict[str, np.ndarray], batch_size: int, *, seed: int, sign_flip: bool = True):
    self.data, self.batch_size, self.seed, self.sign_flip = data, batch_size, seed, sign_flip
    self.num = len(data["labels"])
    if batch_size > self.num:
      raise ValueError(f"batch_size={batch_size} exceeds the {self.num} graphs")
    self.index = 0

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng((self.seed, self.index))
    self.index += 1
    idx = rng.choice(self.num, self.batch_size, replace=False)
    batch = {k: v[idx] for k, v in self.data.items()}
    if self.sign_flip:
      sign = np.where(rng.random(batch["lap_pe"].shape[-1]) >= 0.5, 1.0, -1.0).astype(np.float32)
      batch["lap_pe"] = batch["lap_pe"] * sign
    batch["train"] = np.ones(self.batch_size, bool)
    return batch


def eval_batches(data: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
  """The whole set in order, no sign flip, `"train"` False (running BatchNorm statistics)."""
  out = []
  for s in range(0, len(data["labels"]), batch_size):
    b = {k: v[s:s + batch_size] for k, v in data.items()}
    b["train"] = np.zeros(len(b["labels"]), bool)
    out.append(b)
  return out
