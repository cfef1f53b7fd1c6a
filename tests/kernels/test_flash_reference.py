"""The flash kernel's dense reference and layouts, against their defining properties and `ops.masks`."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops import dot_product_attention
from attnjax.ops import masks as masks_lib
from attnjax.ops import layout as layouts
from pallas_kernels.flash.reference import flash_reference
from pallas_kernels.flash.testing import random_qkv


def test_softmax_matches_engine_reference():
  q, k, v, _ = random_qkv(0, 2, 9, 13, 4, 2, 8)
  mask = masks_lib.window_mask(9, 13, 3, 1)[None, None]
  o, lse = flash_reference(q, k, v, mask, return_lse=True)
  ro, rlse = dot_product_attention(q, k, v, window=(3, 1), return_lse=True,
                                   implementation="reference")
  np.testing.assert_allclose(o, ro, atol=1e-5)
  np.testing.assert_allclose(lse, rlse, atol=1e-5)


def test_sigmoid_oracle_row_mass():
  """[50]: with zero logits and b = -log n, each row's total weight is n / (n + 1)."""
  n = 12
  q = jnp.zeros((1, 5, 1, 4))
  k = jnp.ones((1, n, 1, 4))
  v = jnp.ones((1, n, 1, 1)).repeat(4, -1)
  o = flash_reference(q, k, v, score_mode="sigmoid")
  np.testing.assert_allclose(o, n / (n + 1), rtol=1e-6)


def test_sigmoid_rows_decouple():
  """[50]: o_i depends only on q_i (no normalisation couples rows)."""
  q, k, v, _ = random_qkv(1, 1, 6, 7, 2, 2, 8)
  o = flash_reference(q, k, v, score_mode="sigmoid")
  o2 = flash_reference(q.at[:, 3].set(5.0), k, v, score_mode="sigmoid")
  np.testing.assert_array_equal(np.delete(np.asarray(o), 3, 1), np.delete(np.asarray(o2), 3, 1))


def test_flashbias_alibi_concat_equals_explicit_bias():
  """[119]: causal ALiBi -m (i - j) is rank 2 ([-m i, m] . [1, j]); both forms agree."""
  t, h = 11, 2
  q, k, v, _ = random_qkv(2, 1, t, t, h, h, 8)
  slopes = jnp.array([0.5, 0.125])
  i = jnp.arange(t, dtype=jnp.float32)
  phi_q = jnp.stack([-slopes[None, :] * i[:, None], jnp.broadcast_to(slopes, (t, h))], -1)[None]
  phi_k = jnp.stack([jnp.ones((t, h)), jnp.broadcast_to(i[:, None], (t, h))], -1)[None]
  mask = masks_lib.causal_mask(t)[None, None]
  explicit = flash_reference(q, k, v, mask, alibi_slopes=slopes)
  concat = flash_reference(q, k, v, mask, bias_factors=(phi_q, phi_k))
  np.testing.assert_allclose(explicit, concat, atol=1e-5)


def test_sinks_take_mass_and_vanish_at_minus_infinity():
  q, k, v, _ = random_qkv(3, 1, 6, 6, 2, 2, 8)
  base = flash_reference(q, k, v)
  np.testing.assert_allclose(flash_reference(q, k, v, sinks=jnp.full((2,), -1e30)), base,
                             atol=1e-6)
  # A sink scales the output by 1 - p_sink = l / (l + e^sink) in every row.
  ones = jnp.ones_like(v)
  o = flash_reference(q, k, ones, sinks=jnp.array([0.0, 3.0]))
  _, lse = flash_reference(q, k, ones, return_lse=True)
  want = 1.0 / (1.0 + jnp.exp(jnp.array([0.0, 3.0])[None, :, None] - lse))
  np.testing.assert_allclose(o[..., 0], jnp.transpose(want, (0, 2, 1)), rtol=1e-5)


@pytest.mark.parametrize("tq,tk,causal,window,bq,bk", [
    (37, 45, True, None, 16, 16), (45, 37, False, (5, 2), 16, 8), (64, 64, True, (20, None), 16, 32),
    (10, 10, False, None, 16, 16)])
def test_band_layout_encodes_the_band_mask(tq, tk, causal, window, bq, bk):
  layout = layouts.band_layout(tq, tk, bq, bk, causal=causal, window=window)
  want = jnp.ones((tq, tk), bool)
  if causal:
    want &= masks_lib.causal_mask(tq, tk)
  if window is not None:
    want &= masks_lib.window_mask(tq, tk, *window)
  got = layouts.broadcast_dense_mask(layout, 1, 1)[0, 0]
  np.testing.assert_array_equal(got, want)
  # Blocks marked full must be entirely visible (they are never masked by the kernel).
  counts, idx, part = (np.asarray(a)[0, 0] for a in (layout.kv_counts, layout.kv_indices,
                                                      layout.kv_partial))
  padded = np.zeros((-(-tq // bq) * bq, -(-tk // bk) * bk), bool)
  padded[:tq, :tk] = np.asarray(want)
  for qb in range(counts.shape[0]):
    for t in range(counts[qb]):
      tile = padded[qb * bq:(qb + 1) * bq, idx[qb, t] * bk:(idx[qb, t] + 1) * bk]
      if part[qb, t] == 0:
        assert tile[:min(bq, tq - qb * bq)].all()


def test_layout_transpose_is_consistent():
  kind = np.random.default_rng(0).choice(3, size=(2, 3, 4, 5))
  layout = layouts.from_block_mask(kind > 0, kind == 1, block_q=16, block_k=16, tq=64, tk=80)
  fwd, tr = set(), set()
  for name, store, (c, i, p) in (("kv", fwd, (layout.kv_counts, layout.kv_indices,
                                              layout.kv_partial)),
                                 ("q", tr, (layout.q_counts, layout.q_indices, layout.q_partial))):
    c, i, p = np.asarray(c), np.asarray(i), np.asarray(p)
    for b, h, r in np.ndindex(*c.shape):
      row = i[b, h, r, :c[b, h, r]]
      assert np.all(np.diff(row) > 0), "indices must be sorted"
      for t, col in enumerate(row):
        key = (b, h, r, col) if name == "kv" else (b, h, col, r)
        store.add(key + (int(p[b, h, r, t]),))
  assert fwd == tr
  assert fwd == {(b, h, r, c, int(kind[b, h, r, c] == 1)) for b, h, r, c in zip(*np.nonzero(kind))}
