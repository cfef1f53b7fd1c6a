"""SeqBoat (Ren et al. 2023, arXiv:2306.11197) (routed local attention on the compressed sequence + EMA backbone) and STILL (Meng et al. 2026, arXiv:2602.02180)
(salient tokens keep softmax in the shared-normaliser window + linear hybrid)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.linear import SeqBoatMixer, StillMixer
from attnjax.ops.linear import feature_maps as fm
from attnjax.ops.linear import hybrid as hy
from attnjax.ops.softmax import dot_product_attention

B, T, H, D, DV = 2, 13, 2, 4, 3
RNG = np.random.default_rng(1)
SEG = jnp.asarray([[0] * 6 + [1] * 7, [0] * 13])


def _arr(*shape, scale=1.0):
  return jnp.asarray(RNG.normal(size=shape) * scale, jnp.float32)


Q, K, V = _arr(B, T, H, D), _arr(B, T, H, D), _arr(B, T, H, DV)
PQ, PK = fm.elu_plus_one(_arr(B, T, H, D)), fm.elu_plus_one(_arr(B, T, H, D))
ROUTE = jnp.asarray(RNG.random((B, T)) < 0.6)
SAL = jnp.asarray(RNG.random((B, T, H)) < 0.3)
WF = jnp.asarray([0.3, 0.8])
W = 3


def _ref(q, k, v, causal_window=None, seg=None):
  return dot_product_attention(q, k, v, causal=True, window=causal_window, q_segment_ids=seg,
                               kv_segment_ids=seg, implementation="reference")


# ---------------------------------------------------------------------------------------- SeqBoat

_sb = jax.jit(lambda form, act, q, k, v, r, seg: hy.seqboat_attention(
    q, k, v, r, window=W, activation=act, segment_ids=seg, form=form, chunk_size=4),
    static_argnums=(0, 1))


def _seqboat_loop(q, k, v, route, seg, window, act):
  """Numpy oracle: per row and segment, compress the routed tokens, local attention over the last
  `window` of them, scatter back."""
  q, k, v, route, seg = (np.asarray(a, np.float64) for a in (q, k, v, route, seg))
  out = np.zeros(v.shape)
  scale = q.shape[-1] ** -0.5 if act == "softmax" else 1.0 / window
  for b in range(q.shape[0]):
    for s in np.unique(seg[b]):
      idx = [i for i in range(q.shape[1]) if seg[b, i] == s and route[b, i]]
      for ci, i in enumerate(idx):
        keys = idx[max(0, ci - window + 1):ci + 1]
        for h in range(q.shape[2]):
          sc = np.array([q[b, i, h] @ k[b, j, h] * scale for j in keys])
          a = np.exp(sc - sc.max()) / np.exp(sc - sc.max()).sum() if act == "softmax" else np.maximum(sc, 0) ** 2
          out[b, i, h] = sum(aj * v[b, j, h] for aj, j in zip(a, keys))
  return out


@pytest.mark.parametrize("act", ["softmax", "relu2"])
def test_seqboat_forms_match_loop_oracle_values_and_grads(act):
  ref = _seqboat_loop(Q, K, V, ROUTE, SEG, W, act)
  for form in ("parallel", "chunked"):
    np.testing.assert_allclose(_sb(form, act, Q, K, V, ROUTE, SEG), ref, atol=1e-5, rtol=1e-5, err_msg=form)
  loss = lambda form, q, k, v: jnp.sum(_sb(form, act, q, k, v, ROUTE, SEG) * jnp.cos(jnp.arange(DV)))
  g_ref = jax.grad(lambda *a: loss("parallel", *a), argnums=(0, 1, 2))(Q, K, V)
  g = jax.grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2))(Q, K, V)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  assert np.abs(np.asarray(g[0])).sum() > 0


def test_seqboat_oracles_all_routed_is_local_attention_none_routed_is_zero():
  ones = jnp.ones((B, T), bool)
  np.testing.assert_allclose(_sb("chunked", "softmax", Q, K, V, ones, SEG), _ref(Q, K, V, (W - 1, 0), SEG),
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(_sb("chunked", "softmax", Q, K, V, ~ones, SEG), 0.0)
  with pytest.raises(ValueError, match="route"):
    hy.seqboat_attention(Q, K, V, jnp.ones((B, T, H)), window=W)
  with pytest.raises(ValueError, match="activation"):
    hy.seqboat_attention(Q, K, V, ones, window=W, activation="gelu")


@pytest.mark.parametrize("act", ["softmax", "relu2"])
@pytest.mark.parametrize("splits", [(6, 1, 1, 1, 1, 1, 1, 1), (1, 4, 2, 6), (13,)])
def test_seqboat_decode_equals_full_forward(act, splits):
  """Any split into prefill and later calls gives the full forward; the cache stays `window` long
  (the ring wraps: rows route 6-9 tokens through a 3-slot ring)."""
  full = _sb("parallel", act, Q, K, V, ROUTE, None)
  cache = hy.seqboat_init_cache(B, W, H, D, DV)
  step = jax.jit(lambda q, k, v, r, c: hy.seqboat_decode(q, k, v, r, c, window=W, activation=act))
  outs, start = [], 0
  for n in splits:
    sl = slice(start, start + n)
    ot, cache = step(Q[:, sl], K[:, sl], V[:, sl], ROUTE[:, sl], cache)
    outs.append(ot)
    start += n
  assert start == T and cache["k"].shape == (B, W, H, D) and cache["v"].shape == (B, W, H, DV)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(cache["count"], jnp.sum(ROUTE, axis=1))
  with pytest.raises(ValueError, match="window"):
    hy.seqboat_decode(Q[:, :1], K[:, :1], V[:, :1], ROUTE[:, :1], hy.seqboat_init_cache(B, 5, H, D, DV),
                      window=W)


@pytest.mark.slow
def test_seqboat_layer_none_routed_is_the_backbone_and_the_router_learns():
  m = SeqBoatMixer(16, 2, window=3, ndim=2, chunk_size=4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 9, 16))
  _, hx, _ = nnx.jit(lambda m, x: m.backbone(x))(m, x)
  m.h_proj_in.bias[...] = m.h_proj_in.bias[...].at[0].set(1e4)     # every token "off"
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(m, x), hx, atol=1e-6)
  m.h_proj_in.bias[...] = m.h_proj_in.bias[...].at[0].set(0.0)
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  g = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x) ** 2)))(params)
  assert float(jnp.abs(g["log_tau"][...])) > 0                      # through the gate p_max


def test_seqboat_layer_decodes_like_the_full_forward_through_its_ring():
  """Window 3 and a router biased to "on": the 3-slot ring wraps several times while decoding."""
  m = SeqBoatMixer(16, 2, window=3, ndim=2, chunk_size=4, router_bias=3.0, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(1), (2, 11, 16))
  full = nnx.jit(lambda m, x: m(x))(m, x)
  m.init_cache(2, 64)
  step = nnx.jit(lambda m, x: m(x, decode=True))
  outs = [step(m, x[:, :4])] + [step(m, x[:, t:t + 1]) for t in range(4, 11)]
  assert m.state.get_value()["attn"]["k"].shape[1] == 3
  assert int(jnp.min(m.state.get_value()["attn"]["count"])) > 3       # the ring did wrap
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-4, rtol=2e-3)


# ------------------------------------------------------------------------------------------ STILL

_st = jax.jit(lambda form, q, k, v, pq, pk, sal, seg, ns: hy.still_attention(
    q, k, v, pq, pk, sal, window=W, window_factor=WF, segment_ids=seg, form=form, chunk_size=4,
    max_salient=ns), static_argnums=(0, 8))


def test_still_oracles_no_salient_is_window_linear_all_salient_is_softmax():
  none, every = jnp.zeros((B, T, H), bool), jnp.ones((B, T, H), bool)
  wl = hy.window_linear_attention(Q, K, V, PQ, PK, window=W, window_factor=WF, segment_ids=SEG,
                                  form="parallel")
  for form in ("parallel", "chunked"):
    np.testing.assert_allclose(_st(form, Q, K, V, PQ, PK, none, SEG, None), wl, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(_st(form, Q, K, V, PQ, PK, every, SEG, None), _ref(Q, K, V, None, SEG),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_still_chunked_equals_dense_values_and_grads():
  def loss(form, q, k, v, pq, pk):
    return jnp.sum(_st(form, q, k, v, pq, pk, SAL, SEG, None) * jnp.sin(jnp.arange(DV) + 1.0))
  vr, gr = jax.value_and_grad(lambda *a: loss("parallel", *a), argnums=(0, 1, 2, 3, 4))(Q, K, V, PQ, PK)
  vc, gc = jax.value_and_grad(lambda *a: loss("chunked", *a), argnums=(0, 1, 2, 3, 4))(Q, K, V, PQ, PK)
  np.testing.assert_allclose(vc, vr, rtol=1e-5)
  for a, b in zip(gc, gr):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  # The salient keys differ from the window+linear hybrid (the test can fail).
  assert not np.allclose(_st("parallel", Q, K, V, PQ, PK, SAL, SEG, None),
                         _st("parallel", Q, K, V, PQ, PK, SAL & False, SEG, None), atol=1e-3)
  # A static bound on the salient count that holds changes nothing.
  ns = int(jnp.max(jnp.sum(SAL, axis=1)))
  np.testing.assert_allclose(_st("chunked", Q, K, V, PQ, PK, SAL, SEG, ns),
                             _st("parallel", Q, K, V, PQ, PK, SAL, SEG, None), atol=1e-5, rtol=1e-5)


def test_still_saliency_and_selection_against_brute_force():
  score = hy.still_saliency(Q, K, window=W, segment_ids=SEG, chunk_size=4)
  q, k, seg = np.asarray(Q, np.float64), np.asarray(K, np.float64), np.asarray(SEG)
  for b in range(B):
    for j in range(T):
      win = [l for l in range(max(0, j - W + 1), j + 1) if seg[b, l] == seg[b, j]]
      s = np.array([(q[b, j] * k[b, l]).sum(-1) for l in win]).T / np.sqrt(D)   # [H, |win|]
      ref = (q[b, j] * k[b, j]).sum(-1) / np.sqrt(D) - np.log(np.exp(s).sum(-1))
      np.testing.assert_allclose(score[b, j], ref, atol=1e-5)
  sal = np.asarray(hy.still_select(score, top_k=1, chunk=2, segment_ids=SEG))
  sc = np.asarray(score)
  for b in range(B):
    starts = [0] + [i for i in range(1, T) if seg[b, i] != seg[b, i - 1]] + [T]
    for s0, s1 in zip(starts[:-1], starts[1:]):
      for c0 in range(s0, s1, 2):
        grp = list(range(c0, min(c0 + 2, s1)))
        for h in range(H):
          best = grp[int(np.argmax(sc[b, grp, h]))]
          assert [bool(sal[b, i, h]) for i in grp] == [i == best for i in grp]


@pytest.mark.slow
def test_still_layer_is_causal_and_decodes_like_the_full_forward():
  m = StillMixer(16, 2, window=3, top_k=1, select_chunk=2, chunk_size=4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 10, 16))
  fwd = nnx.jit(lambda m, x: m(x))
  full = fwd(m, x)
  x2 = x.at[:, 7:].set(1.0)
  np.testing.assert_allclose(fwd(m, x2)[:, :7], full[:, :7], atol=1e-5)
  m.init_cache(2, 16)
  step = nnx.jit(lambda m, x: m(x, decode=True))
  outs = [step(m, x[:, :5])] + [step(m, x[:, t:t + 1]) for t in range(5, 10)]
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="select_chunk"):
    StillMixer(16, 2, window=3, select_chunk=4, rngs=nnx.Rngs(0))



def _still_np(seed=1, **kw):
  m = StillMixer(16, 2, window=3, top_k=1, select_chunk=2, chunk_size=4, rngs=nnx.Rngs(seed), **kw)
  # Move the learned direction maps off the identity so psi is a generic Hedgehog map.
  m.fm_q[...] = m.fm_q[...] + 0.5 * jax.random.normal(jax.random.key(3), m.fm_q.shape)
  m.fm_k[...] = m.fm_k[...] + 0.5 * jax.random.normal(jax.random.key(5), m.fm_k.shape)
  return m


def test_still_np_map_reinjects_the_norm():
  m = _still_np()
  assert m.np_map
  w = m.fm_q[...]
  x = _arr(B, T, H, 8)
  feat = jax.jit(m.feature)
  phi = feat(x, w)
  # phi(c x) = c phi(x) for c > 0; phi(x) = ||x|| hedgehog(x / ||x||); phi(0) = 0.
  for c in (0.25, 3.0):
    np.testing.assert_allclose(feat(c * x, w), c * phi, rtol=1e-5, atol=1e-6)
  n = jnp.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(phi, n * fm.hedgehog(x / n, w), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jnp.sum(phi, -1, keepdims=True), 2 * n, rtol=1e-5)   # two softmaxes
  np.testing.assert_array_equal(feat(jnp.zeros_like(x), w), 0.0)
  g = jax.jit(jax.grad(lambda x: jnp.sum(m.feature(x, w) ** 2)))(x.at[0, 0].set(0.0))
  assert np.isfinite(np.asarray(g)).all()
  # The plain Hedgehog map has no such homogeneity; np_map=False is exactly it.
  assert not np.allclose(feat(3.0 * x, w), 3.0 * fm.hedgehog(x, w), atol=1e-3)
  plain = StillMixer(16, 2, window=3, top_k=1, select_chunk=2, np_map=False, rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(plain.feature(x, w), fm.hedgehog(x, w))
  with pytest.raises(ValueError, match="np_map"):
    StillMixer(16, 2, window=3, np_map="yes", rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_still_np_map_layer_is_causal_and_decodes_like_the_full_forward():
  m = _still_np()
  fwd = nnx.jit(lambda m, x: m(x))
  step = nnx.jit(lambda m, x: m(x, decode=True))
  x = jax.random.normal(jax.random.key(4), (2, 9, 16))
  full = fwd(m, x)
  np.testing.assert_allclose(fwd(m, x.at[:, 6:].set(1.0))[:, :6], full[:, :6], atol=1e-5)
  m.init_cache(2, 12)
  outs = [step(m, x[:, :5])] + [step(m, x[:, t:t + 1]) for t in range(5, 9)]
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4, rtol=1e-4)
