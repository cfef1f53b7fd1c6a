"""BlockLayout builders and the plain-JAX block-sparse attention against the dense-masked oracle."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from attnjax.ops import layout as L
from attnjax.ops import block_sparse as bs


def _qkv(key, b, tq, tk, hq, hk, d, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(key, 3)
  q = jax.random.normal(k1, (b, tq, hq, d), dtype)
  k = jax.random.normal(k2, (b, tk, hk, d), dtype)
  v = jax.random.normal(k3, (b, tk, hk, d), dtype)
  return q, k, v


def test_from_rule_causal_flags_and_padding():
  lay = L.from_rule(L.CausalRule(0), block_q=4, block_k=4, tq=10, tk=10)
  bm = np.asarray(L.block_matrix(lay))[0, 0]
  # Diagonal blocks partial, below full, above empty; last key block (10 % 4 != 0) partial.
  np.testing.assert_array_equal(bm, [[1, 0, 0], [2, 1, 0], [2, 2, 1]])
  np.testing.assert_array_equal(np.asarray(lay.kv_counts)[0, 0], [1, 2, 3])
  # Padding repeats the last valid index.
  np.testing.assert_array_equal(np.asarray(lay.kv_indices)[0, 0], [[0, 0, 0], [0, 1, 1], [0, 1, 2]])
  np.testing.assert_array_equal(np.asarray(lay.q_counts)[0, 0], [3, 2, 1])
  np.testing.assert_array_equal(np.asarray(lay.q_indices)[0, 0], [[0, 1, 2], [1, 2, 2], [2, 2, 2]])
  L.check_layout(lay)
  dm = np.asarray(L.dense_mask(lay))[0, 0]
  np.testing.assert_array_equal(dm, np.tril(np.ones((10, 10), bool)))


def test_transpose_matches_host_build_and_check_layout_catches_lies():
  rng = np.random.default_rng(0)
  bm = rng.random((2, 3, 5, 4)) < 0.5
  lay = L.from_block_mask(bm, bm & (rng.random(bm.shape) < 0.5), block_q=3, block_k=4, tq=14,
                          tk=16, mask_rule=L.CausalRule(2))
  t = L.transpose(lay, max_q=lay.max_q)
  np.testing.assert_array_equal(np.asarray(t.q_counts), np.asarray(lay.q_counts))
  np.testing.assert_array_equal(np.asarray(t.q_indices), np.asarray(lay.q_indices))
  np.testing.assert_array_equal(np.asarray(t.q_partial), np.asarray(lay.q_partial))
  liar = L.from_block_mask(np.ones((1, 1, 2, 2), bool), np.zeros((1, 1, 2, 2), bool), block_q=4,
                           block_k=4, tq=8, tk=8, mask_rule=L.CausalRule(0))
  with pytest.raises(ValueError, match="full"):
    L.check_layout(liar)


def test_dense_mask_rule_and_density_and_png(tmp_path):
  rng = np.random.default_rng(1)
  m = rng.random((13, 11)) < 0.3
  lay = L.from_dense_mask(m, block_q=4, block_k=4)
  np.testing.assert_array_equal(np.asarray(L.dense_mask(lay))[0, 0], m)
  assert L.density(lay, "element") == pytest.approx(m.mean())
  full = L.from_block_mask(np.ones((1, 1, 4, 3), bool), block_q=4, block_k=4, tq=13, tk=11)
  assert L.density(full) == 1.0
  path = L.plot_layout(lay, str(tmp_path / "m.png"))
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="block_mask"):
    L.from_block_mask(np.ones((1, 1, 2, 2), bool), block_q=4, block_k=4, tq=13, tk=11)


def _random_layout(seed, b, h, tq, tk, bq, bk, rule):
  rng = np.random.default_rng(seed)
  nq, nk = -(-tq // bq), -(-tk // bk)
  bm = rng.random((b, h, nq, nk)) < 0.5
  bm[0, 0, 0] = False  # one query block with no key at all
  return L.from_block_mask(bm, bm & (rng.random(bm.shape) < 0.7), block_q=bq, block_k=bk, tq=tq,
                           tk=tk, mask_rule=rule)


@pytest.mark.parametrize("dtype,atol,gtol", [(jnp.float32, 2e-5, 1e-4), (jnp.bfloat16, 3e-2, 5e-2)])
def test_block_sparse_matches_dense_reference_values_and_grads(dtype, atol, gtol):
  b, tq, tk, hq, hk, d, bq, bk = 2, 21, 27, 4, 2, 8, 8, 8
  q, k, v = _qkv(jax.random.PRNGKey(0), b, tq, tk, hq, hk, d, dtype)
  lay = _random_layout(0, b, hq, tq, tk, bq, bk, L.WindowRule(9, 3, 6))
  seg_q = jnp.asarray(np.repeat(np.array([[0] * 12 + [1] * 9]), b, 0))
  seg_k = jnp.asarray(np.repeat(np.array([[0] * 15 + [1] * 12]), b, 0))
  kw = dict(q_segment_ids=seg_q, kv_segment_ids=seg_k, return_lse=True)
  o, lse = bs.block_sparse_attention(q, k, v, lay, **kw)
  o_ref, lse_ref = bs.reference_attention(q, k, v, lay, **kw)
  assert not np.isnan(np.asarray(o, np.float32)).any()
  np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_ref, np.float32), atol=atol)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_ref), atol=atol * 10)
  # Query block 0 of (b=0, h=0) lists no key: zeros and lse = -inf.
  assert np.all(np.asarray(o[0, :bq, 0], np.float32) == 0)
  assert np.all(np.isneginf(np.asarray(lse[0, 0, :bq])))
  dout = jax.random.normal(jax.random.PRNGKey(5), o.shape, dtype)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v, lay, q_segment_ids=seg_q,
                                      kv_segment_ids=seg_k).astype(jnp.float32) * dout)

  g = jax.grad(loss(bs.block_sparse_attention), (0, 1, 2))(q, k, v)
  g_ref = jax.grad(loss(bs.reference_attention), (0, 1, 2))(q, k, v)
  for a, r in zip(g, g_ref):
    assert not np.isnan(np.asarray(a, np.float32)).any()
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r, np.float32), atol=gtol,
                               rtol=gtol)


def test_block_sparse_query_chunk_bias_and_select():
  b, t, h, d, bq = 1, 19, 2, 8, 4
  q, k, v = _qkv(jax.random.PRNGKey(1), b, t, t, h, h, d)
  nk = -(-t // bq)
  sel = jax.random.bernoulli(jax.random.PRNGKey(2), 0.6, (b, h, t, nk))
  bm = np.ones((1, 1, nk, nk), bool)
  lay = L.from_block_mask(bm, bm, block_q=bq, block_k=bq, tq=t, tk=t, mask_rule=L.CausalRule(0),
                          query_block_select=sel)
  bias = jax.random.normal(jax.random.PRNGKey(3), (b, h, t))
  o = bs.block_sparse_attention(q, k, v, lay, bias_k=bias, query_chunk=2)
  o_ref = bs.reference_attention(q, k, v, lay, bias_k=bias)
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=2e-5)


def test_full_layout_is_full_attention_and_merge():
  from attnjax.ops.softmax import dot_product_attention
  q, k, v = _qkv(jax.random.PRNGKey(4), 1, 10, 13, 2, 1, 8)
  lay = L.from_block_mask(np.ones((1, 1, 3, 4), bool), block_q=4, block_k=4, tq=10, tk=13)
  o, lse = bs.block_sparse_attention(q, k, v, lay, return_lse=True)
  o_ref, lse_ref = dot_product_attention(q, k, v, return_lse=True, implementation="reference")
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=2e-5)
  # Splitting the keys in two and merging by lse gives the same.
  o1, l1 = dot_product_attention(q, k[:, :6], v[:, :6], return_lse=True, implementation="reference")
  o2, l2 = dot_product_attention(q, k[:, 6:], v[:, 6:], return_lse=True, implementation="reference")
  om, lm = bs.merge_attentions([o1, o2], [l1, l2])
  np.testing.assert_allclose(np.asarray(om), np.asarray(o_ref), atol=2e-5)
  np.testing.assert_allclose(np.asarray(lm), np.asarray(lse_ref), atol=2e-5)


def test_bad_inputs_raise():
  q, k, v = _qkv(jax.random.PRNGKey(0), 1, 8, 8, 2, 2, 4)
  lay = L.from_rule(L.CausalRule(0), block_q=4, block_k=4, tq=9, tk=9)
  with pytest.raises(ValueError, match="Tq, Tk"):
    bs.block_sparse_attention(q, k, v, lay)
  with pytest.raises(ValueError, match="block_q"):
    L.from_rule(L.CausalRule(0), block_q=0, block_k=4, tq=9, tk=9)
  with pytest.raises(ValueError, match="bias_k"):
    lay8 = L.from_rule(L.CausalRule(0), block_q=4, block_k=4, tq=8, tk=8)
    bs.block_sparse_attention(q, k, v, lay8, bias_k=jnp.zeros((1, 2, 7)))


def test_layout_is_a_pytree_under_jit():
  lay = L.from_rule(L.CausalRule(0), block_q=4, block_k=4, tq=12, tk=12)
  q, k, v = _qkv(jax.random.PRNGKey(0), 1, 12, 12, 1, 1, 4)
  o = jax.jit(bs.block_sparse_attention)(q, k, v, lay)
  o_ref = bs.reference_attention(q, k, v, lay)
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=2e-5)
