"""Oracles for saliency, cross-attention, WAAD/FAI and ATTN-FIQA (Zhang et al. 2026, arXiv:2601.20279), (Papi et al. 2025, arXiv:2509.18010), (Li et al. 2025, arXiv:2510.13554), (Ozgur et al. 2026, arXiv:2604.22841)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.analysis import saliency


def test_attention_saliency_matches_finite_differences():
  """[76]: |A * dL/dA| with dL/dA from central differences; a loss independent of A gives 0."""
  rng = np.random.default_rng(0)
  a = rng.uniform(size=(1, 2, 3, 4)).astype(np.float32)
  v = rng.normal(size=(1, 2, 4, 5)).astype(np.float32)
  loss = lambda x: jnp.sum(jnp.tanh(jnp.einsum("bhqk,bhkd->bhqd", x, v)) ** 2)
  got = np.asarray(jax.jit(lambda x: saliency.attention_saliency(loss, x))(a))
  eps = 1e-3
  fd = np.zeros_like(a, dtype=np.float64)
  for idx in np.ndindex(a.shape):
    hi = a.copy(); hi[idx] += eps
    lo = a.copy(); lo[idx] -= eps
    fd[idx] = (float(loss(hi)) - float(loss(lo))) / (2 * eps)
  np.testing.assert_allclose(got, np.abs(a * fd), rtol=2e-2, atol=1e-4)
  assert np.asarray(saliency.attention_saliency(lambda x: jnp.sum(v) * 0.0, a)).max() == 0.0
  tok = np.asarray(saliency.token_saliency(got))
  np.testing.assert_allclose(tok, got[:, :, -1].sum(1), rtol=1e-6)


def test_sgrs_and_locore():
  """[76]: SGRS accepts at or above ratio * mean history; LocoRE gamma=0 is a no-op, keeps
  row sums and raises exactly the last `window` keys before each query."""
  assert np.asarray(saliency.sgrs_accept(np.array([0.4, 0.6]), np.array([1.0, 1.0]), ratio=0.5)).tolist() \
      == [False, True]
  t = 6
  a = np.tril(np.ones((t, t))); a /= a.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(saliency.locore(a, window=2, gamma=0.0)), a, atol=1e-7)
  out = np.asarray(saliency.locore(a, window=2, gamma=1.0))
  np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-6)
  i = 4  # keys 2, 3 doubled, keys 0, 1, 4 not: weights 1,1,2,2,1 over 7
  np.testing.assert_allclose(out[i, :5], np.array([1, 1, 2, 2, 1]) / 7, rtol=1e-6)


def test_cross_attention_correlations():
  """[10]: corr(map, map) = 1; invariant to positive scaling of either map; Spearman of a
  monotone transform is 1 while Pearson is not."""
  rng = np.random.default_rng(1)
  att = rng.uniform(size=(2, 1, 3, 4, 7))
  agg = np.asarray(saliency.aggregate_cross_attention(att))
  np.testing.assert_allclose(agg, att.mean((0, 2)), rtol=1e-6)
  sal = rng.uniform(size=agg.shape)
  np.testing.assert_allclose(np.asarray(saliency.pearson(agg, agg)), 1.0, rtol=1e-5)
  r = np.asarray(saliency.pearson(agg, sal))
  np.testing.assert_allclose(np.asarray(saliency.pearson(3.0 * agg, 0.2 * sal)), r, rtol=1e-4)
  ref = np.array([[np.corrcoef(agg[b, q], sal[b, q])[0, 1] for q in range(4)] for b in range(1)])
  np.testing.assert_allclose(r, ref, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(saliency.spearman(agg, np.exp(5 * agg))), 1.0, rtol=1e-5)
  assert float(np.asarray(saliency.pearson(agg, np.exp(5 * agg))).min()) < 0.999
  np.testing.assert_allclose(np.asarray(saliency.explained_fraction(agg, sal)), r ** 2, rtol=1e-4)


def test_waad_fai():
  """[155]: a previous-token head gives WAAD = 1 (t >= 1); uniform causal attention gives
  FAI_j = mean_{i>j} 1/(i+1); window caps the distance."""
  t = 7
  prev = np.zeros((t, t)); prev[0, 0] = 1
  for i in range(1, t):
    prev[i, i - 1] = 1
  np.testing.assert_allclose(np.asarray(saliency.waad(prev, window=3))[1:], 1.0)
  first = np.zeros((t, t)); first[:, 0] = 1
  np.testing.assert_allclose(np.asarray(saliency.waad(first, window=3)), np.minimum(np.arange(t), 3))
  uni = np.tril(np.ones((t, t))); uni /= uni.sum(-1, keepdims=True)
  ref = [np.mean([1 / (i + 1) for i in range(j + 1, t)]) if j < t - 1 else 0.0 for j in range(t)]
  np.testing.assert_allclose(np.asarray(saliency.fai(uni)), ref, rtol=1e-6)


def test_fiqa_permutation_and_query_scaling():
  """[0]: the score is invariant to a patch permutation; scaling W_Q by c scales it by c."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(1, 6, 8)); wq = rng.normal(size=(8, 2, 4)); wk = rng.normal(size=(8, 2, 4))
  def scores(x, wq):
    q = np.einsum("bnd,dhe->bhne", x, wq); k = np.einsum("bnd,dhe->bhne", x, wk)
    return np.einsum("bhne,bhme->bhnm", q, k) / 2.0
  s = scores(x, wq)
  perm = rng.permutation(6)
  np.testing.assert_allclose(np.asarray(saliency.fiqa_score(scores(x[:, perm], wq))),
                             np.asarray(saliency.fiqa_score(s)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(saliency.fiqa_score(scores(x, 2.5 * wq))),
                             2.5 * np.asarray(saliency.fiqa_score(s)), rtol=1e-5)
  pm = np.asarray(saliency.fiqa_patch_map(s))
  np.testing.assert_allclose(np.asarray(saliency.fiqa_patch_map(scores(x[:, perm], wq))), pm[:, perm], rtol=1e-5)
