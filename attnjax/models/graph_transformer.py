"""`GraphTransformer`: attention restricted to graph neighbours (Dwivedi & Bresson, 2020,
arXiv 2012.09699), with Laplacian positional encodings, BatchNorm and the edge-feature variant.

Following the paper and the authors' code (graphdeeplearning/graphtransformer,
`layers/graph_transformer_layer.py`, `layers/graph_transformer_edge_layer.py`,
`nets/SBMs_node_classification/graph_transformer_net.py`, `data/SBMs.py`):

* per head, `h_i' = sum_{j in N(i)} softmax_j(Q h_i . K h_j / sqrt(d)) V h_j`, heads concatenated,
  then `O_h`; Q, K, V bias-free (the authors' `use_bias=False`);
* layer (post-norm): `h = Norm(h + O_h(attn))`, `h = Norm(h + FFN(h))` with
  `FFN = Linear(d, 2d) -> ReLU -> Linear(2d, d)`; Norm is BatchNorm (the paper's choice) or LN;
* edge variant: `w_ij = (Q h_i * K h_j / sqrt(d)) * E e_ij` (elementwise, `[d]` per head), the
  score is `sum_d w_ij`, and the edge stream is updated from the pre-softmax `w_ij`:
  `e = Norm_e(e + O_e(w))`, `e = Norm_e(e + FFN_e(e))`;
* input: `h = Embed(node type) + Linear(LapPE)`; readout: the authors' MLPReadout
  (`d -> d/2 -> d/4 -> classes`, ReLU).

Softmax: `score_clamp=None` (default) is the paper's exact softmax over neighbours;
`score_clamp=5.0` reproduces the authors' code, which replaces it by
`exp(clamp(s, -5, 5)) / (sum_j exp(clamp(s, -5, 5)) + 1e-6)` (their eps only in the edge layer;
used for both here). A node with no neighbour (isolated, or a padding node) gets a zero attention
output in both modes, never NaN.

Batches are dense and padded: `adj [B, N, N]` (True where node i attends to j, i.e. an edge
j -> i; symmetric for undirected graphs), `node_mask [B, N]`. BatchNorm's statistics are taken over
the real nodes of the batch only (padding nodes carry no weight: the normalisation is what the
authors' DGL batch, which has no padding, computes), and edge BatchNorm's over the real edges
(`adj` True); padding entries are zeroed after every norm. `training` selects batch statistics
(and updates the running ones, momentum 0.1, unbiased variance, as `torch.nn.BatchNorm1d`) or the
running statistics; it may be a traced boolean.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.models.mosaic_bert import LayerNorm
from attnjax.nn.layers import dense
from attnjax.ops.softmax import dot_product_attention

NORMS = ("batch", "layer")


def laplacian_pe(adj: np.ndarray, k: int) -> np.ndarray:
  """The authors' Laplacian PE of one graph: eigenvectors 1..k (ascending eigenvalue, the trivial
  one dropped) of `L = I - D^-1/2 A D^-1/2` (degrees clipped at 1), `adj [n, n] -> [n, k]` float32.
  Graphs with fewer than k + 1 nodes get zero columns. Signs are arbitrary (flip at training)."""
  a = np.asarray(adj, np.float64)
  if a.ndim != 2 or a.shape[0] != a.shape[1]:
    raise ValueError(f"adj must be [n, n], got shape {a.shape}")
  n = a.shape[0]
  dinv = np.clip(a.sum(1), 1, None) ** -0.5
  lap = np.eye(n) - dinv[:, None] * a * dinv[None, :]
  vals, vecs = np.linalg.eigh(lap)
  vecs = vecs[:, np.argsort(vals, kind="stable")][:, 1:k + 1]
  out = np.zeros((n, k), np.float32)
  out[:, :vecs.shape[1]] = vecs
  return out


class MaskedBatchNorm(nnx.Module):
  """BatchNorm over the last axis with statistics over the entries where `mask` is True.

  `__call__(x [..., C], mask [...] bool, training) -> [..., C]`, zeros where `mask` is False.
  """

  def __init__(self, dim: int, *, momentum: float = 0.1, eps: float = 1e-5):
    self.momentum, self.eps = momentum, eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("embed",))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=("embed",))
    self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32))

  def __call__(self, x: jax.Array, mask: jax.Array, training) -> jax.Array:
    w = mask[..., None].astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    n = jnp.sum(w)
    xf = x.astype(jnp.float32)
    mean = jnp.sum(xf * w, axes) / jnp.maximum(n, 1.0)
    var = jnp.sum(jnp.square(xf - mean) * w, axes) / jnp.maximum(n, 1.0)
    training = jnp.asarray(training, bool)
    m = jnp.where(training, mean, self.mean[...])
    v = jnp.where(training, var, self.var[...])
    y = (xf - m) * jax.lax.rsqrt(v + self.eps) * self.scale[...] + self.bias[...]
    unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
    self.mean[...] = jnp.where(training, (1 - self.momentum) * self.mean[...] + self.momentum * mean, self.mean[...])
    self.var[...] = jnp.where(training, (1 - self.momentum) * self.var[...] + self.momentum * unbiased, self.var[...])
    return jnp.where(mask[..., None], y, 0.0).astype(x.dtype)


class _Norm(nnx.Module):
  def __init__(self, dim: int, kind: str):
    self.bn = MaskedBatchNorm(dim) if kind == "batch" else None
    self.ln = LayerNorm(dim, eps=1e-5) if kind == "layer" else None

  def __call__(self, x, mask, training):
    if self.bn is not None:
      return self.bn(x, mask, training)
    return jnp.where(mask[..., None], self.ln(x), 0.0)


def neighbour_softmax(s: jax.Array, adj: jax.Array, score_clamp: float | None) -> jax.Array:
  """Attention weights over neighbours from scores `s [B, N, N, H]` and `adj [B, N, N]`; rows
  without a neighbour are all zeros. `score_clamp`: the authors' `exp(clamp) / (sum + 1e-6)`."""
  vis = adj[..., None]
  if score_clamp is not None:
    p = jnp.where(vis, jnp.exp(jnp.clip(s, -score_clamp, score_clamp)), 0.0)
    return p / (jnp.sum(p, axis=2, keepdims=True) + 1e-6)
  s = jnp.where(vis, s, -jnp.inf)
  m = jnp.max(s, axis=2, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.where(vis, jnp.exp(s - m), 0.0)
  z = jnp.sum(p, axis=2, keepdims=True)
  return p / jnp.where(z > 0, z, 1.0)


class GraphAttention(nnx.Module):
  """Multi-head attention over graph neighbours.

  `__call__(h [B, N, d], adj [B, N, N] bool, e [B, N, N, d] | None) -> (out [B, N, d] (heads
  concatenated, before O_h), w [B, N, N, d] | None)`; `e`/`w` only with `edge_features=True`,
  where `w_ij = (Q h_i * K h_j / sqrt(d_head)) * E e_ij` is the edge stream's input.
  """

  def __init__(self, d_model: int, num_heads: int, *, edge_features: bool = False,
               score_clamp: float | None = None, rngs: nnx.Rngs):
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
    if score_clamp is not None and not score_clamp > 0:
      raise ValueError(f"score_clamp must be None or > 0, got {score_clamp}")
    self.num_heads, self.head_dim, self.score_clamp = num_heads, d_model // num_heads, score_clamp
    self.q = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.k = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.v = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.e = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs) if edge_features else None

  def __call__(self, h, adj, e=None):
    b, n, d = h.shape
    if adj.shape != (b, n, n):
      raise ValueError(f"adj must be [B, N, N] = {(b, n, n)}, got shape {adj.shape}")
    heads = lambda y: y.reshape(*y.shape[:-1], self.num_heads, self.head_dim)  # noqa: E731
    q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
    adj = adj.astype(bool)
    if self.e is None:
      if e is not None:
        raise ValueError("edge features given to a GraphAttention built with edge_features=False")
      if self.score_clamp is None:  # the library's softmax engine, neighbours as the mask
        return dot_product_attention(q, k, v, mask=adj[:, None]).reshape(b, n, d), None
      s = jnp.einsum("bihd,bjhd->bijh", q, k) / math.sqrt(self.head_dim)
      w = None
    else:
      if e is None or e.shape != (b, n, n, d):
        raise ValueError(f"e must be [B, N, N, d] = {(b, n, n, d)}, got {None if e is None else e.shape}")
      w = q[:, :, None] * k[:, None, :] / math.sqrt(self.head_dim) * heads(self.e(e))
      s = jnp.sum(w, axis=-1)
      w = w.reshape(b, n, n, d)
    p = neighbour_softmax(s, adj, self.score_clamp)
    return jnp.einsum("bijh,bjhd->bihd", p, v).reshape(b, n, d), w


class _FFN(nnx.Module):
  def __init__(self, d: int, rngs: nnx.Rngs):
    self.l1 = dense(d, 2 * d, axes=("embed", "mlp"), rngs=rngs, use_bias=True)
    self.l2 = dense(2 * d, d, axes=("mlp", "embed"), rngs=rngs, use_bias=True)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


class GraphTransformerLayer(nnx.Module):
  """One post-norm Graph Transformer layer (node stream, and the edge stream when built with
  `edge_features=True`). `__call__(h, adj, node_mask, training, e=None) -> (h, e)`."""

  def __init__(self, d_model: int, num_heads: int, *, norm: str = "batch", edge_features: bool = False,
               score_clamp: float | None = None, rngs: nnx.Rngs):
    if norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    self.attn = GraphAttention(d_model, num_heads, edge_features=edge_features, score_clamp=score_clamp,
                               rngs=rngs)
    self.o_h = dense(d_model, d_model, axes=("heads", "embed"), rngs=rngs, use_bias=True)
    self.norm1_h, self.ffn_h, self.norm2_h = _Norm(d_model, norm), _FFN(d_model, rngs), _Norm(d_model, norm)
    if edge_features:
      self.o_e = dense(d_model, d_model, axes=("heads", "embed"), rngs=rngs, use_bias=True)
      self.norm1_e, self.ffn_e, self.norm2_e = _Norm(d_model, norm), _FFN(d_model, rngs), _Norm(d_model, norm)
    else:
      self.o_e = self.norm1_e = self.ffn_e = self.norm2_e = None

  def __call__(self, h, adj, node_mask, training, e=None):
    a, w = self.attn(h, adj, e)
    h = self.norm1_h(h + self.o_h(a), node_mask, training)
    h = self.norm2_h(h + self.ffn_h(h), node_mask, training)
    if self.o_e is not None:
      edge_mask = adj.astype(bool)
      e = self.norm1_e(e + self.o_e(w), edge_mask, training)
      e = self.norm2_e(e + self.ffn_e(e), edge_mask, training)
    return h, e


class GraphTransformer(nnx.Module):
  """Graph Transformer for node classification on padded dense batches.

  `__call__(node_types [B, N] int, adj [B, N, N] bool, node_mask [B, N] bool, *, lap_pe
  [B, N, pe_dim] | None, edge_types [B, N, N] int | None, training=False) -> logits [B, N, classes]`
  (zeros at padding nodes). `pe_dim=0`: no Laplacian PE. `edge_features=True`: the edge variant,
  `edge_types` embedded to `d_model` (default: every edge type 1). See the module docstring.
  """

  def __init__(self, *, num_node_types: int, num_classes: int, d_model: int, num_layers: int,
               num_heads: int, pe_dim: int = 0, norm: str = "batch", edge_features: bool = False,
               num_edge_types: int = 2, score_clamp: float | None = None, rngs: nnx.Rngs):
    if pe_dim < 0:
      raise ValueError(f"pe_dim must be >= 0, got {pe_dim}")
    if d_model % 4:
      raise ValueError(f"d_model must be a multiple of 4 (the readout halves it twice), got {d_model}")
    self.pe_dim, self.edge_features = pe_dim, edge_features
    self.embed_h = nnx.Embed(num_node_types, d_model, rngs=rngs)
    self.embed_pe = dense(pe_dim, d_model, axes=(None, "embed"), rngs=rngs, use_bias=True) if pe_dim else None
    self.embed_e = nnx.Embed(num_edge_types, d_model, rngs=rngs) if edge_features else None
    self.layers = nnx.List([GraphTransformerLayer(d_model, num_heads, norm=norm, edge_features=edge_features,
                                                  score_clamp=score_clamp, rngs=rngs)
                            for _ in range(num_layers)])
    self.readout = nnx.List([dense(d_model // 2 ** i, d_model // 2 ** (i + 1), axes=(None, None), rngs=rngs,
                                   use_bias=True) for i in range(2)])
    self.classifier = dense(d_model // 4, num_classes, axes=(None, None), rngs=rngs, use_bias=True)

  def __call__(self, node_types, adj, node_mask, *, lap_pe=None, edge_types=None, training=False):
    b, n = node_types.shape
    if node_mask.shape != (b, n):
      raise ValueError(f"node_mask must be [B, N] = {(b, n)}, got shape {node_mask.shape}")
    node_mask = node_mask.astype(bool)
    adj = adj.astype(bool) & node_mask[:, :, None] & node_mask[:, None, :]
    h = self.embed_h(node_types)
    if self.embed_pe is not None:
      if lap_pe is None or lap_pe.shape != (b, n, self.pe_dim):
        raise ValueError(f"lap_pe must be [B, N, pe_dim] = {(b, n, self.pe_dim)}, got "
                         f"{None if lap_pe is None else lap_pe.shape}")
      h = h + self.embed_pe(lap_pe)
    h = jnp.where(node_mask[..., None], h, 0.0)
    e = None
    if self.embed_e is not None:
      e = self.embed_e(jnp.ones((b, n, n), jnp.int32) if edge_types is None else edge_types)
      e = jnp.where(adj[..., None], e, 0.0)
    for layer in self.layers:
      h, e = layer(h, adj, node_mask, training, e)
    for lin in self.readout:
      h = jax.nn.relu(lin(h))
    return jnp.where(node_mask[..., None], self.classifier(h), 0.0)
