"""Dynamic routers and corrections: Routing Transformer, DMA, VMoBA, Re-ttention, top-k reuse.

Each fast path equals its dense-masked definition (values; gradients where the path is
differentiable in q, k, v) on random inputs with T not a multiple of the block / chunk sizes, and
meets its defining property. float32, atol 2e-5 (values) / 1e-4 (gradients).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops import layout as L
from attnjax.ops.softmax import dot_product_attention
from attnjax.ops.sparse import dynamic as D
from attnjax.ops.sparse import routing as R


def _qkv(shape, h=4, hk=2, d=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], shape + (h, d)), jax.random.normal(ks[1], shape + (hk, d)),
          jax.random.normal(ks[2], shape + (hk, d)))


@jax.jit
def _dense(q, k, v, mask, bias=None):
  return dot_product_attention(q, k, v, mask=mask, bias=bias, implementation="reference")


_full = jax.jit(dot_product_attention, static_argnames=("causal", "implementation"))


def _values_and_grads_match(fast, ref, args):
  """One jitted value-and-grad per path (two compiles: this CPU is slow and shared)."""
  w = jax.random.normal(jax.random.key(7), jax.eval_shape(fast, *args).shape)

  def vg(fn):
    def loss(*a):
      o = fn(*a)
      return jnp.sum(w * o), o
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

  ((_, o), g), ((_, o_ref), gr) = vg(fast)(*args), vg(ref)(*args)
  np.testing.assert_allclose(o, o_ref, atol=2e-5)
  for a, b in zip(g, gr):
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_routing_transformer_equals_mask_definition_and_oracles():
  q, k, v = _qkv((2, 21))
  cent = jax.random.normal(jax.random.key(3), (4, 3, 8))
  for causal in (True, False):
    fast = lambda q, k, v: D.routing_attention(q, k, v, cent, window=7, causal=causal)
    ref = lambda q, k, v: _dense(q, k, v, D.routing_mask(q, k, cent, window=7, causal=causal))
    _values_and_grads_match(fast, ref, (q, k, v))
  qc, members = jax.jit(D.routing_clusters, static_argnums=3)(q, k, cent, 7)
  assert members.shape == (2, 4, 3, 7)             # balanced: every cluster has w = T / C keys
  assert int(qc.max()) < 3
  # One cluster with w = T: full causal attention.
  np.testing.assert_allclose(
      jax.jit(D.routing_attention, static_argnames="window")(q, k, v, cent[:, :1], window=21),
      _full(q, k, v, causal=True, implementation="reference"), atol=2e-5)
  with pytest.raises(ValueError, match="window"):
    D.routing_attention(q, k, v, cent, window=0)


def _np_unit(x):
  return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)


def _kmeans_ema_oracle(means, x, decay):
  """lucidrains/routing-transformer `routing_transformer.py`: `kmeans_iter` (buckets = argmax of
  unit x against the stored means, per-cluster sum over the batch, re-normalised; empty clusters
  keep their mean) then `ema_inplace` (means * decay + new * (1 - decay)). x [B, T, H, D]."""
  xu = _np_unit(np.asarray(x, np.float64)).transpose(0, 2, 1, 3)            # [B, H, T, D]
  means = np.asarray(means, np.float64)
  buckets = np.einsum("bhtd,hcd->bhtc", xu, means).argmax(-1)
  new = means.copy()
  for h in range(means.shape[0]):
    for c in range(means.shape[1]):
      sel = xu[:, h][buckets[:, h] == c]
      if len(sel):
        tot = sel.sum(0)
        new[h, c] = tot / max(np.linalg.norm(tot), 1e-12)
  routed = np.take_along_axis(means[None], buckets[..., None], axis=2)       # [B, H, T, D]
  return means * decay + new * (1 - decay), np.mean((xu - routed) ** 2)


def _kmeans_attention_oracle(q, k, v, means, w, shared_qk):
  """lucidrains `KmeansAttention.forward` (non-causal), numpy: per cluster its w most similar
  queries / keys (`distribution`, sorted), a softmax window each, outputs `scatter_mean`-ed."""
  q, k, v, means = (np.asarray(a, np.float64).transpose(0, 2, 1, 3) if a.ndim == 4 else
                    np.asarray(a, np.float64) for a in (q, k, v, means))
  b, h, t, d = q.shape
  if shared_qk:
    k = q
  dists = lambda x: np.einsum("bhtd,hcd->bhtc", _np_unit(x), means)
  top = lambda dd: np.sort(np.argsort(-dd, axis=2, kind="stable")[:, :, :w], axis=2)  # [B,H,w,C]
  kidx = top(dists(k))
  qidx = kidx if shared_qk else top(dists(q))
  if shared_qk:
    k = _np_unit(k)
  num, den = np.zeros_like(q), np.zeros(q.shape[:3])
  for bi in range(b):
    for hi in range(h):
      for c in range(means.shape[1]):
        qi, ki = qidx[bi, hi, :, c], kidx[bi, hi, :, c]
        dots = q[bi, hi, qi] @ k[bi, hi, ki].T * d ** -0.5
        if shared_qk:
          dots[qi[:, None] == ki[None, :]] = -5e4
        p = np.exp(dots - dots.max(-1, keepdims=True))
        num[bi, hi, qi] += (p / p.sum(-1, keepdims=True)) @ v[bi, hi, ki]
        den[bi, hi, qi] += 1
  return (num / (den[..., None] + 1e-5)).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("shared_qk", [False, True])
def test_routing_balanced_attention_and_kmeans_training_match_lucidrains(shared_qk):
  from flax import nnx
  from attnjax.nn.sparse import RoutingAttnFn
  q, k, v = _qkv((2, 13), h=2, hk=2)
  fn = RoutingAttnFn(2, 8, 3, 5, nnx.Rngs(1), shared_qk=shared_qk, ema_decay=0.9,
                     commitment=1e-2)
  cent = np.asarray(fn.centroids[...])
  o_ref = _kmeans_attention_oracle(q, k, v, cent, 5, shared_qk)
  # One training forward under the trainer's protocol: merge, capture the sown aux loss, return
  # the non-Param state.
  gd, params, rest = nnx.split(fn, nnx.Param, ...)

  @jax.jit
  def train_forward(rest, q, k, v):
    m = nnx.merge(gd, params, rest)
    o, inter = nnx.capture(lambda m: m(q, k, v, causal=False), nnx.Intermediate)(m)
    return o, inter, nnx.state(m, nnx.Not(nnx.Param))

  o, inter, new_rest = train_forward(rest, q, k, v)
  np.testing.assert_allclose(o, o_ref, atol=2e-5)
  x = q if shared_qk else jnp.concatenate([q, k], 1)       # shared QK: the keys are the queries
  want, mse = _kmeans_ema_oracle(cent, x, 0.9)
  np.testing.assert_allclose(new_rest["centroids"][...], want, atol=1e-5)
  aux = [l for p, l in jax.tree_util.tree_leaves_with_path(inter) if "aux_loss" in str(p)]
  np.testing.assert_allclose(sum(jnp.sum(a) for a in aux), 1e-2 * mse, rtol=1e-4)
  # Every centroid moved towards its members (the EMA target is the mean direction).
  assert np.abs(want - cent).max() > 1e-3
  # Eval mode (model.eval()): the same forward leaves the centroids where they were.
  fn.eval()
  gd, params, rest = nnx.split(fn, nnx.Param, ...)
  m = nnx.merge(gd, params, rest)
  m(q, k, v, causal=False)
  np.testing.assert_array_equal(m.centroids[...], cent)


def test_routing_centroids_move_in_a_train_step_and_not_in_eval():
  """experiments/trainer.py `make_steps`: the train step returns the centroids one EMA step on;
  the eval step reports metrics only (its state is dropped)."""
  import optax
  from flax import nnx
  from configs import mqar as mqar_config
  from experiments import tasks as tasks_lib, trainer
  cfg = mqar_config.get_config("tiny")
  with cfg.unlocked():
    cfg.model.mixer = "routing"
    cfg.model.num_layers = 1
  task = tasks_lib.make_task(cfg)
  gd, params, rest = nnx.split(task.build_model(cfg, nnx.Rngs(0)), nnx.Param, ...)
  before = [np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(rest)
            if "centroids" in str(p)]
  tx = optax.sgd(0.0)
  train_step, eval_step = trainer.make_steps(gd, task, tx)
  _, new_rest, _, metrics, _ = train_step(params, rest, tx.init(params), next(task.train_loader),
                                          trainer.init_guard(0))
  after = [np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(new_rest)
           if "centroids" in str(p)]
  assert before and all(np.abs(a - b).max() > 1e-6 for a, b in zip(after, before))
  assert float(metrics["aux_loss"]) > 0                     # the commitment loss is counted


def test_causal_routing_does_not_see_the_future():
  """Changing tokens after position t leaves outputs at <= t unchanged (causal routing selects
  each query's top-w among its visible keys); the literal reading (whole-sequence top-w, then a
  causal mask) does change them, so the check can fail."""
  q, k, v = _qkv((1, 24), h=2, hk=2)
  cent = jax.random.normal(jax.random.key(3), (2, 3, 8))
  t = 11
  q2, k2, v2 = (x.at[:, t + 1:].set(jax.random.normal(jax.random.key(9), x[:, t + 1:].shape))
                for x in (q, k, v))
  out = jax.jit(lambda *a: D.routing_attention(*a, cent, window=4, causal=True))
  np.testing.assert_allclose(out(q, k, v)[:, :t + 1], out(q2, k2, v2)[:, :t + 1], atol=1e-6)

  @jax.jit
  def literal(q, k, v):
    vis = (D.routing_mask(q, k, cent, window=4, causal=False)
           & (jnp.arange(24)[None, :] <= jnp.arange(24)[:, None]))
    return _dense(q, k, v, vis)
  assert float(jnp.max(jnp.abs(literal(q, k, v)[:, :t + 1] - literal(q2, k2, v2)[:, :t + 1]))) > 1e-3


def test_dma_block_path_and_mask_definition():
  q, k, v = _qkv((1, 21))
  bias = jax.jit(D.dma_key_bias)(v, jax.random.normal(jax.random.key(4), (16, 4)), -jnp.ones(4))
  assert bias.shape == (1, 4, 21) and bool(jnp.all((bias > 0) & (bias <= 1)))
  fast = lambda q, k, v: D.dma_attention(q, k, v, bias, keep_window=5, causal=False, block=4)
  ref = lambda q, k, v: D.dma_attention(q, k, v, bias, keep_window=5, causal=False,
                                        implementation="reference")
  _values_and_grads_match(fast, ref, (q, k, v))
  # Causal: each query keeps min(i + 1, w) keys, the largest-bias ones of its prefix.
  dma_mask = jax.jit(D.dma_mask, static_argnums=1, static_argnames=("keep_window", "causal"))
  m = np.asarray(dma_mask(bias, 21, keep_window=5, causal=True))
  np.testing.assert_array_equal(m.sum(-1)[0, 0], np.minimum(np.arange(21) + 1, 5))
  b = np.asarray(bias)[0, 0]
  for i in (4, 12, 20):
    np.testing.assert_array_equal(np.nonzero(m[0, 0, i])[0], np.sort(np.argsort(-b[:i + 1])[:5]))
  # Non-causal selection is query-agnostic; keep_window >= T is dense attention with the key bias.
  mn = np.asarray(dma_mask(bias, 21, keep_window=5, causal=False))
  assert (mn == mn[:, :, :1]).all()
  np.testing.assert_allclose(
      jax.jit(lambda q, k, v, bias: D.dma_attention(q, k, v, bias, keep_window=64, causal=False,
                                                    block=4))(q, k, v, bias),
      _dense(q, k, v, None, bias[:, :, None, :]), atol=2e-5)
  with pytest.raises(ValueError, match="bias"):
    D.dma_attention(q, k, v, bias[:, :2], keep_window=5)


def _vmoba_threshold_oracle(q, k, chunk, thr, causal, cap=None):
  """Numpy transcription of KwaiVGI/VMoBA `src/vmoba.py` `_select_threshold_query_head` for one
  (query, head) row at a time: min-max normalise the valid gates, the self chunk's share first,
  then the sorted other chunks up to the first cumulative share >= the remaining threshold.
  Causal extension: only chunks <= own are valid and the own gate uses the keys <= the query.
  `cap` (not in the authors' code): at most `cap` chunks, self included."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, t, h, _ = q.shape
  g = h // k.shape[2]
  nc = -(-t // chunk)
  out = np.zeros((b, h, t, nc), bool)
  for bi in range(b):
    for hi in range(h):
      kh = k[bi, :, hi // g]
      for i in range(t):
        own = i // chunk
        means = [kh[c * chunk:(c + 1) * chunk].mean(0) for c in range(nc)]
        if causal:
          means[own] = kh[own * chunk:i + 1].mean(0)
        gate = np.array([m @ q[bi, i, hi] for m in means])
        valid = np.arange(nc) <= own if causal else np.ones(nc, bool)
        lo, hi_ = gate[valid].min(), gate[valid].max()
        den = hi_ - lo if hi_ - lo > 1e-6 else 1.0
        norm = np.where(valid, (gate - lo) / den, 0.0)
        total = norm.sum()
        remain = max(thr - norm[own] / (total + 1e-6), 0.0)
        others = [c for c in np.argsort(-norm, kind="stable") if c != own and valid[c]]
        chosen = [own]
        csum = 0.0
        for c in others:
          if cap is not None and len(chosen) >= cap:
            break
          chosen.append(c)
          csum += norm[c]
          if csum / (total + 1e-6) >= remain:
            break
        out[bi, hi, i, chosen] = True
  return out


def test_vmoba_threshold_matches_authors_selection_and_is_causal():
  q, k, v = _qkv((1, 21))
  sel = jax.jit(R.moba_selection, static_argnames=("chunk_size", "top_k", "causal", "threshold"))
  for causal, thr, top_k in ((False, 0.0, 6), (True, 0.6, 6), (True, 0.9, 3)):
    np.testing.assert_array_equal(
        np.asarray(sel(q, k, chunk_size=4, top_k=top_k, causal=causal, threshold=thr)),
        _vmoba_threshold_oracle(q, k, 4, thr, causal, cap=top_k), err_msg=f"{causal} {thr}")
  # Causal: a key inside the query's own chunk, after the query, never changes its selection.
  k2 = k.at[:, 10:].set(jax.random.normal(jax.random.key(5), k[:, 10:].shape) * 3)
  a = sel(q, k, chunk_size=4, top_k=6, causal=True, threshold=0.6)
  np.testing.assert_array_equal(a[:, :, :10], sel(q, k2, chunk_size=4, top_k=6, causal=True,
                                                  threshold=0.6)[:, :, :10])

  @jax.jit
  def layout_and_out(q, k, v):
    return (R.moba_layout(q, k, chunk_size=4, top_k=3, threshold=0.5),
            R.moba_attention(q, k, v, chunk_size=4, top_k=3, threshold=0.5))

  lay, o = layout_and_out(q, k, v)
  L.check_layout(lay)
  np.testing.assert_allclose(o, _dense(q, k, v, L.dense_mask(lay)), atol=2e-5)
  # 3D blocks (2 frames x 1 x 3) of a 4 x 2 x 6 video; all 8 blocks selected = full attention.
  qv, kv, vv = _qkv((1, 4, 2, 6), h=2, hk=2)
  flat = lambda a: a.reshape(1, 48, 2, 8)
  full = _dense(flat(qv), flat(kv), flat(vv), None).reshape(qv.shape)
  vmoba = jax.jit(R.vmoba_attention, static_argnums=3, static_argnames="top_k")
  np.testing.assert_allclose(vmoba(qv, kv, vv, (2, 1, 3), top_k=8), full, atol=2e-5)
  part = vmoba(qv, kv, vv, (4, 1, 6), top_k=1)
  assert part.shape == qv.shape and not np.allclose(part, full, atol=1e-3)
  with pytest.raises(ValueError, match="block_shape"):
    R.vmoba_attention(qv, kv, vv, (3, 3, 3), top_k=2)
  with pytest.raises(ValueError, match="threshold"):
    R.moba_selection(q, k, chunk_size=4, top_k=2, threshold=1.5)


def test_rettention_reconstructs_full_step_and_full_layout_is_identity():
  q, k, v = _qkv((1, 21))
  full = _full(q, k, v, implementation="reference")
  stats, attend = jax.jit(D.rettention_statistics), jax.jit(D.rettention_attention)
  lay = L.from_rule(L.WindowRule(2, 2), block_q=4, block_k=4, tq=21, tk=21)
  rho, res = stats(q, k, v, lay)
  assert bool(jnp.all((rho > 0) & (rho < 1)))
  np.testing.assert_allclose(attend(q, k, v, lay, rho, res), full, atol=2e-5)
  every = L.from_rule(L.WindowRule(None, None), block_q=4, block_k=4, tq=21, tk=21)
  rho, res = stats(q, k, v, every)
  np.testing.assert_allclose(rho, 1.0, atol=1e-5)
  np.testing.assert_allclose(res, 0.0, atol=2e-5)


def test_topk_reuse_equals_mask_definition_and_all_keys_is_full():
  q, k, v = _qkv((1, 21))
  topk = jax.jit(D.topk_key_indices, static_argnums=2, static_argnames="causal")
  idx = topk(q, k, 6, causal=True)
  assert idx.shape == (1, 2, 6)
  fast = lambda q, k, v: D.attend_to_indices(q, k, v, idx, recent_from=17, causal=True)
  ref = lambda q, k, v: _dense(q, k, v, D.indices_mask(idx, 21, 21, 4, recent_from=17,
                                                       causal=True))
  _values_and_grads_match(fast, ref, (q, k, v))
  everything = topk(q, k, 64)
  np.testing.assert_allclose(jax.jit(D.attend_to_indices)(q, k, v, everything),
                             _full(q, k, v, implementation="reference"), atol=2e-5)
