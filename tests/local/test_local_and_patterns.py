"""Static sparse patterns and the 2D local schemes against their dense-mask definitions."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from attnjax.ops import layout as L
from attnjax.ops import block_sparse as bs
from attnjax.ops import local
from attnjax.ops import neighborhood as N
from attnjax.ops.sparse import patterns as P
from attnjax.ops.softmax import dot_product_attention


def _dense(lay):
  return np.asarray(L.dense_mask(lay))


def test_static_patterns_equal_token_definitions():
  t, blk = 37, 8
  i, j = np.arange(t)[:, None], np.arange(t)[None]
  np.testing.assert_array_equal(_dense(P.causal_layout(t, blk))[0, 0], j <= i)
  np.testing.assert_array_equal(_dense(P.sliding_window_layout(t, 5, 0, blk))[0, 0],
                                (j <= i) & (j >= i - 5))
  np.testing.assert_array_equal(_dense(P.sink_local_layout(t, 3, 4, blk))[0, 0],
                                (j <= i) & ((j < 3) | (j > i - 4)))
  np.testing.assert_array_equal(_dense(P.strided_layout(t, 6, 3, blk))[0, 0],
                                (j <= i) & ((i - j < 3) | ((i - j) % 6 == 0)))
  np.testing.assert_array_equal(_dense(P.dilated_layout(t, 4, 3, blk))[0, 0],
                                (j <= i) & (i - j < 12) & ((i - j) % 3 == 0))
  for lay in (P.causal_layout(t, blk), P.strided_layout(t, 6, 3, blk), P.s2_layout(t, 3, blk)):
    L.check_layout(lay)
  # Window covering everything = full causal attention (catalog oracle).
  np.testing.assert_array_equal(_dense(P.sliding_window_layout(t, t, 0, blk))[0, 0], j <= i)
  assert P.sliding_window_layout(t, 5, 0, blk).max_kv == 2


def test_power_attention_pattern_and_receptive_field():
  bm = P.power_attention_block_mask(16, num_sink_blocks=1)
  assert bm[10, 10] and bm[10, 9] and bm[10, 8] and bm[10, 6] and bm[10, 2] and bm[10, 0]
  assert not bm[10, 7] and not bm[10, 11]
  # log-density: row counts grow like log2(i).
  assert bm.sum(1).max() <= 2 + int(np.log2(16)) + 1
  # Two layers reach every earlier block within distance 2^2 ... in fact all earlier blocks here.
  reach = P.reachable_blocks(bm, 2)
  assert all(reach[i, i - dd] for i in range(16) for dd in range(0, min(i, 4) + 1))
  lay = P.power_attention_layout(70, block=8)
  L.check_layout(lay)
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 70, 2, 8))
  o = bs.block_sparse_attention(q, q, q, lay)
  np.testing.assert_allclose(np.asarray(o), np.asarray(bs.reference_attention(q, q, q, lay)),
                             atol=2e-5)


def test_s2_heads_cover_full_causal():
  lay = P.s2_layout(64, num_heads=4, block=8, local_blocks=1, vert_stride=4)
  dm = _dense(lay)[0]
  assert dm.shape[0] == 4
  np.testing.assert_array_equal(dm.any(0), np.tril(np.ones((64, 64), bool)))
  assert all(not (dm[h] == dm[0]).all() for h in range(1, 4))


def _qkv(key, shape, h, d, hk=None):
  ks = jax.random.split(key, 3)
  hk = hk or h
  return (jax.random.normal(ks[0], shape + (h, d)), jax.random.normal(ks[1], shape + (hk, d)),
          jax.random.normal(ks[2], shape + (hk, d)))


@pytest.mark.parametrize("pad_mode", ["zeros", "mask"])
def test_halo_matches_dense_definition(pad_mode):
  q, k, v = _qkv(jax.random.PRNGKey(1), (1, 8, 12), 2, 8, hk=1)
  o = local.halo_attention(q, k, v, block=4, halo=1, pad_mode=pad_mode)
  o_ref = local.halo_attention_reference(q, k, v, block=4, halo=1, pad_mode=pad_mode)
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=2e-5)
  g = jax.grad(lambda k: jnp.sum(local.halo_attention(q, k, v, 4, 1, pad_mode=pad_mode) ** 2))(k)
  g_ref = jax.grad(lambda k: jnp.sum(local.halo_attention_reference(
      q, k, v, 4, 1, pad_mode=pad_mode) ** 2))(k)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-4)


def test_halo_covering_image_is_global_attention_and_errors():
  q, k, v = _qkv(jax.random.PRNGKey(2), (1, 4, 4), 1, 4)
  o = local.halo_attention(q, k, v, block=2, halo=2, pad_mode="mask")
  o_full = dot_product_attention(q.reshape(1, 16, 1, 4), k.reshape(1, 16, 1, 4),
                                 v.reshape(1, 16, 1, 4), implementation="reference")
  np.testing.assert_allclose(np.asarray(o).reshape(1, 16, 1, 4), np.asarray(o_full), atol=2e-5)
  with pytest.raises(ValueError, match="block"):
    local.halo_attention(q, k, v, block=3, halo=1)


@pytest.mark.parametrize("shift", [0, (2, 1)])
def test_swin_roll_equals_cell_mask_with_decay_and_bias(shift):
  q, k, v = _qkv(jax.random.PRNGKey(3), (2, 8, 6), 2, 8)
  rpb = jax.random.normal(jax.random.PRNGKey(4), (2, 12, 12))
  gamma = jnp.array([0.9, 0.6])
  kw = dict(bias=rpb, log_gamma=jnp.log(jnp.stack([gamma, gamma], -1)))
  o = local.swin_window_attention(q, k, v, (4, 3), shift, **kw)
  o_ref = local.swin_window_attention_reference(q, k, v, (4, 3), shift, **kw)
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=2e-5)
  g = jax.grad(lambda q: jnp.sum(local.swin_window_attention(q, k, v, (4, 3), shift, **kw) ** 2))(q)
  g_ref = jax.grad(lambda q: jnp.sum(local.swin_window_attention_reference(
      q, k, v, (4, 3), shift, **kw) ** 2))(q)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-4)


def test_swin_unshifted_equals_blocked_na_and_rmt_gamma_one():
  q, k, v = _qkv(jax.random.PRNGKey(5), (1, 6, 6), 2, 8)
  o = local.swin_window_attention(q, k, v, 3, 0)
  o_na = N.na2d(q, k, v, 3, stride=3, implementation="reference")
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_na), atol=2e-5)
  o_rmt = local.manhattan_window_retention(q, k, v, 3, 1, gamma=jnp.ones(2))
  o_sw = local.swin_window_attention(q, k, v, 3, 1)
  np.testing.assert_allclose(np.asarray(o_rmt), np.asarray(o_sw), atol=2e-5)
  o_dec = local.manhattan_window_retention(q, k, v, 3, 1, gamma=jnp.full((2,), 0.5))
  assert not np.allclose(np.asarray(o_dec), np.asarray(o_sw), atol=1e-3)
  with pytest.raises(ValueError, match="window"):
    local.swin_window_attention(q, k, v, 4, 0)
  with pytest.raises(ValueError, match="shift"):
    local.swin_window_attention(q, k, v, 3, 3)


def test_freeswim_inward_window():
  q, k, v = _qkv(jax.random.PRNGKey(6), (1, 7, 9), 1, 8)
  o = local.freeswim_attention(q, k, v, (3, 4), implementation="reference")
  o_na = N.na2d(q, k, v, (3, 4), implementation="reference")
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_na), atol=1e-6)
  o_full = local.freeswim_attention(q, k, v, (16, 16), implementation="reference")
  o_dense = dot_product_attention(q.reshape(1, 63, 1, 8), k.reshape(1, 63, 1, 8),
                                  v.reshape(1, 63, 1, 8), implementation="reference")
  np.testing.assert_allclose(np.asarray(o_full).reshape(1, 63, 1, 8), np.asarray(o_dense),
                             atol=2e-5)
  assert (N.na_mask((7, 9), (3, 4)).sum(1) == 12).all()
