"""Graph Transformer (Dwivedi & Bresson, 2020, arXiv 2012.09699) against the authors' code.

Oracles, written here from graphdeeplearning/graphtransformer without the implementation's helpers:
* `layers/graph_transformer_edge_layer.py` `MultiHeadAttentionLayer.propagate_attention`: per edge
  j -> i, `score = K_h[j] * Q_h[i] / sqrt(d) * proj_e[ij]` (kept as `e_out`), then
  `exp(clamp(sum(score), -5, 5))`, `h_i = sum_j w V_h[j] / (sum_j w + 1e-6)` — as DGL message
  passing over an edge list (`np.add.at`), not a dense matrix;
* `layers/graph_transformer_layer.py`: the same without edges, `exp(clamp(K.Q / sqrt(d), -5, 5))`;
* the paper's eq. on a complete graph: standard multi-head attention `softmax(Q K^T / sqrt(d)) V`;
* `data/SBMs.py` `laplacian_positional_encoding`: `L = I - D^-1/2 A D^-1/2`, eigenvectors of the
  smallest non-trivial eigenvalues; `train/train_SBMs_node_classification.py`: one random sign per
  PE column per training batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.data import graphs
from attnjax.models.graph_transformer import GraphAttention, GraphTransformer, laplacian_pe

N, D, H = 7, 8, 2


def _adj(seed=0, isolated=(), padded=()):
  rng = np.random.default_rng(seed)
  a = np.triu(rng.random((N, N)) < 0.5, 1)
  a = a | a.T
  for i in (*isolated, *padded):
    a[i, :] = a[:, i] = False
  return a


def _authors_attention(q, k, v, adj, pe=None, clamp=5.0):
  """Edge-list message passing as the authors' DGL code does it; q, k, v [N, H, Dh], pe [N, N, H, Dh]."""
  dst, src = np.nonzero(adj)                       # edge src -> dst: dst attends to src
  dh = q.shape[-1]
  score = k[src] * q[dst] / np.sqrt(dh)            # [E, H, Dh]
  if pe is not None:
    score = score * pe[dst, src]
  e_out = score
  w = np.exp(np.clip(score.sum(-1, keepdims=True), -clamp, clamp))   # [E, H, 1]
  wv = np.zeros_like(q)
  z = np.zeros((*q.shape[:2], 1))
  np.add.at(wv, dst, v[src] * w)
  np.add.at(z, dst, w)
  return wv / (z + 1e-6), (dst, src, e_out)


def _heads(x):
  return np.asarray(x, np.float64).reshape(*x.shape[:-1], H, D // H)


@pytest.mark.parametrize("edges", [False, True])
def test_attention_matches_the_authors_message_passing(edges):
  layer = GraphAttention(D, H, edge_features=edges, score_clamp=5.0, rngs=nnx.Rngs(0))
  for proj in (layer.q, layer.k) + ((layer.e,) if edges else ()):
    proj.kernel[...] = proj.kernel[...] * 3.0      # scores beyond +-5: the clamp is exercised
  h = jax.random.normal(jax.random.key(1), (1, N, D))
  e = jax.random.normal(jax.random.key(2), (1, N, N, D)) if edges else None
  adj = _adj(0, isolated=(3,))
  out, w = jax.jit(lambda h, e: layer(h, jnp.asarray(adj)[None], e))(h, e)
  q, k, v = (_heads(p(h)[0]) for p in (layer.q, layer.k, layer.v))
  pe = _heads(layer.e(e)[0]) if edges else None
  want, (dst, src, e_out) = _authors_attention(q, k, v, adj, pe)
  s = (k[src] * q[dst]).sum(-1) / np.sqrt(D // H)
  assert edges or np.abs(s).max() > 5
  np.testing.assert_allclose(np.asarray(out[0]).reshape(N, H, -1), want, atol=1e-5, rtol=1e-5)
  assert not np.asarray(out[0, 3]).any()             # the isolated node: zeros
  if edges:
    np.testing.assert_allclose(np.asarray(w[0]).reshape(N, N, H, -1)[dst, src], e_out, atol=1e-5, rtol=1e-5)


def test_complete_graph_equals_standard_multi_head_attention_and_sparse_graphs_the_paper_softmax():
  layer = GraphAttention(D, H, rngs=nnx.Rngs(3))
  h = jax.random.normal(jax.random.key(4), (2, N, D))
  adj = np.stack([np.ones((N, N), bool), _adj(2, isolated=(1,))])
  out, _ = jax.jit(lambda h, a: layer(h, a))(h, jnp.asarray(adj))
  q, k, v = (np.asarray(p(h), np.float64).reshape(2, N, H, -1) for p in (layer.q, layer.k, layer.v))
  s = np.einsum("bihd,bjhd->bhij", q[:1], k[:1]) / math.sqrt(D // H)
  a = np.exp(s - s.max(-1, keepdims=True))
  want = np.einsum("bhij,bjhd->bihd", a / a.sum(-1, keepdims=True), v[:1]).reshape(1, N, D)
  np.testing.assert_allclose(np.asarray(out[:1]), want, atol=1e-5, rtol=1e-5)
  # A sparse graph: the paper's softmax over neighbours = the authors' message passing unclamped.
  sparse, _ = _authors_attention(q[1], k[1], v[1], adj[1], clamp=np.inf)
  np.testing.assert_allclose(np.asarray(out[1]).reshape(N, H, -1), sparse, atol=1e-5, rtol=1e-5)
  assert not np.asarray(out[1, 1]).any()


def _model(edges=True, norm="batch", pe_dim=3, seed=0):
  return GraphTransformer(num_node_types=4, num_classes=3, d_model=D, num_layers=2, num_heads=H,
                          pe_dim=pe_dim, norm=norm, edge_features=edges, rngs=nnx.Rngs(seed))


def _graph_batch(seed=0):
  rng = np.random.default_rng(seed)
  adj = np.stack([_adj(seed, isolated=(2,), padded=(5, 6)), _adj(seed + 1, padded=(6,))])
  mask = np.ones((2, N), bool)
  mask[0, 5:] = mask[1, 6:] = False
  types = rng.integers(0, 4, (2, N)).astype(np.int32)
  pe = rng.normal(size=(2, N, 3)).astype(np.float32)
  return types, adj, mask, pe


def _forward(model):
  g, state = nnx.split(model)

  @jax.jit
  def f(state, types, adj, mask, pe, training):
    m = nnx.merge(g, state)
    out = m(types, adj, mask, lap_pe=pe, training=training)
    return out, nnx.state(m, nnx.BatchStat)
  return lambda *a: f(state, *a)


def test_permutation_equivariance_with_padding_nodes_and_edge_stream():
  model = _model()
  f = _forward(model)
  types, adj, mask, pe = _graph_batch()
  out, _ = f(types, adj, mask, pe, True)
  perm = np.random.default_rng(5).permutation(N)
  p_out, _ = f(types[:, perm], adj[:, perm][:, :, perm], mask[:, perm], pe[:, perm], True)
  np.testing.assert_allclose(np.asarray(p_out), np.asarray(out)[:, perm], atol=1e-5)
  # Not trivially equivariant: the output depends on the graph.
  out2, _ = f(types, adj ^ np.eye(N, k=1, dtype=bool)[None], mask, pe, True)
  assert np.abs(np.asarray(out2) - np.asarray(out))[mask].max() > 1e-3


def test_padding_nodes_take_no_part_and_isolated_nodes_stay_finite():
  """Batch statistics come from real nodes only: changing what sits in padding slots changes
  nothing, and the running mean moves towards the mean over real nodes."""
  model = _model()
  f = _forward(model)
  types, adj, mask, pe = _graph_batch(1)
  out, stats = f(types, adj, mask, pe, True)
  assert np.isfinite(np.asarray(out)).all() and not np.asarray(out)[~mask].any()
  junk_pe = np.where(mask[..., None], pe, 1e3).astype(np.float32)
  junk_types = np.where(mask, types, 3).astype(np.int32)
  junk_adj = adj | (~mask[:, :, None] & ~mask[:, None, :])          # pads linked to each other
  out_j, stats_j = f(junk_types, junk_adj, mask, junk_pe, True)
  np.testing.assert_allclose(np.asarray(out_j), np.asarray(out), atol=1e-5)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_j)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # First BatchNorm's running mean: 0.9 * 0 + 0.1 * mean over the real nodes of its input.
  lay = model.layers[0]
  h0 = model.embed_h(types) + model.embed_pe(pe)
  a, _ = lay.attn(jnp.where(mask[..., None], h0, 0.0), adj & mask[:, :, None] & mask[:, None, :],
                  jnp.where((adj & mask[:, :, None] & mask[:, None, :])[..., None], model.embed_e(jnp.ones((2, N, N), jnp.int32)), 0.0))
  x = np.asarray(h0 + lay.o_h(a))
  want = 0.1 * x[mask].mean(0)
  got = np.asarray(stats["layers"][0]["norm1_h"]["bn"]["mean"].get_value())
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Eval mode uses the running statistics, so the output differs from training mode.
  out_eval, stats_eval = f(types, adj, mask, pe, False)
  assert np.isfinite(np.asarray(out_eval)).all() and np.abs(np.asarray(out_eval - out)).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(stats_eval["layers"][0]["norm1_h"]["bn"]["mean"].get_value()), 0.0)
  # Gradients through isolated / fully masked rows are finite.
  g, params, rest = nnx.split(model, nnx.Param, ...)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(g, p, jax.tree.map(lambda a: a, rest))(types, adj, mask, lap_pe=pe, training=True) ** 2)))(params)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))


def test_laplacian_pe_is_eigenvectors_and_training_batches_flip_signs():
  adj = _adj(7, isolated=(4,))
  k = 3
  pe = laplacian_pe(adj, k)
  deg = adj.sum(1)
  dinv = np.clip(deg, 1, None) ** -0.5
  lap = np.eye(N) - dinv[:, None] * adj * dinv[None]
  lam_all = np.linalg.eigvalsh(lap)
  for c in range(k):
    v = pe[:, c]
    lam = v @ lap @ v
    np.testing.assert_allclose(lap @ v, lam * v, atol=1e-5)          # L v = lambda v
    np.testing.assert_allclose(lam, lam_all[c + 1], atol=1e-5)       # the (c+1)-th smallest
  np.testing.assert_allclose(pe.T @ pe, np.eye(k), atol=1e-5)
  assert laplacian_pe(adj[:3, :3], 5)[:, 2:].tolist() == [[0.0] * 3] * 3   # too few nodes: zeros
  data = graphs.sbm_graphs(12, min_nodes=6, max_nodes=9, num_classes=3, p_in=0.6, p_out=0.1, pe_dim=4, seed=0)
  loader = graphs.GraphLoader(data, 4, seed=0)
  signs = []
  for _ in range(6):
    rng = np.random.default_rng((0, loader.index))
    idx = rng.choice(12, 4, replace=False)
    b = next(loader)
    orig = data["lap_pe"][idx]
    ratio = np.where(np.abs(orig) > 1e-6, b["lap_pe"] / np.where(orig == 0, 1, orig), np.nan)
    col = np.nanmean(ratio, axis=(0, 1))
    np.testing.assert_allclose(np.abs(col), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.nan_to_num(ratio, nan=0) * (np.abs(orig) > 1e-6),
                               col * (np.abs(orig) > 1e-6), atol=1e-6)    # one sign per column
    signs.append(col)
  assert (np.array(signs) > 0).any() and (np.array(signs) < 0).any()
  ev = graphs.eval_batches(data, 5)
  np.testing.assert_array_equal(ev[0]["lap_pe"], data["lap_pe"][:5])
  assert not ev[0]["train"].any() and b["train"].all()


def test_graph_task_runs_through_the_trainer_and_updates_running_statistics(tmp_path):
  from configs import graph_sbm
  from experiments import trainer
  cfg = graph_sbm.get_config("tiny")
  with cfg.unlocked():
    cfg.model.edge_features = True
  s = trainer.train_and_evaluate(cfg, str(tmp_path))
  assert 0.0 <= s["final_eval"]["accuracy"] <= 1.0 and math.isfinite(s["final_eval"]["loss"])
  bn = s["model"].layers[0].norm1_e.bn
  assert np.abs(np.asarray(bn.mean[...])).max() > 0 and np.all(np.asarray(bn.var[...]) != 1.0)
