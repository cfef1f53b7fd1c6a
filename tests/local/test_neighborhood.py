"""Neighborhood attention: NATTEN's exact neighbour sets, the tile-permuted fast path vs the oracle."""

import functools
import itertools
import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from attnjax.ops import layout as L
from attnjax.ops import neighborhood as N
from attnjax.ops.softmax import dot_product_attention


def _windows(mask):
  return [(int(np.nonzero(r)[0].min()), int(np.nonzero(r)[0].max()) + 1) for r in mask]


# NATTEN's windows [start, end) for L=8 (shared notes §1.2, from mask.hpp) and the GNA L=10 case.
@pytest.mark.parametrize("size,k,s,causal,expected", [
    (8, 3, 1, False, [(0, 3), (0, 3), (1, 4), (2, 5), (3, 6), (4, 7), (5, 8), (5, 8)]),
    (8, 4, 1, False, [(0, 4), (0, 4), (0, 4), (1, 5), (2, 6), (3, 7), (4, 8), (4, 8)]),
    (8, 4, 2, False, [(0, 4), (0, 4), (1, 5), (1, 5), (3, 7), (3, 7), (4, 8), (4, 8)]),
    (8, 3, 1, True, [(0, 1), (0, 2), (0, 3), (1, 4), (2, 5), (3, 6), (4, 7), (5, 8)]),
    (10, 4, 4, False, [(0, 4)] * 4 + [(4, 8)] * 4 + [(6, 10)] * 2),
])
def test_exact_neighbour_windows_at_borders(size, k, s, causal, expected):
  m = N.na_mask((size,), k, s, 1, causal)
  assert _windows(m) == expected
  # Windows are contiguous (no holes).
  assert [int(r.sum()) for r in m] == [e - b for b, e in expected]


def test_dilation_groups_and_counts_2d():
  spatial, kernel, dil = (11, 9), (3, 2), (3, 2)
  m = N.na_mask(spatial, kernel, 1, dil, False)
  # Non-causal: every query sees exactly prod(kernel) keys, all in its dilation group.
  assert (m.sum(1) == math.prod(kernel)).all()
  xs = np.stack(np.unravel_index(np.arange(m.shape[0]), spatial), -1)
  qi, ki = np.nonzero(m)
  assert ((xs[qi] % dil) == (xs[ki] % dil)).all()
  # 1D dilated: group 0 of L=11, d=3 is coords 0,3,6,9; kernel 3 at coord 0 sees 0,3,6.
  m1 = N.na_mask((11,), 3, 1, 3, False)
  assert list(np.nonzero(m1[0])[0]) == [0, 3, 6]
  assert list(np.nonzero(m1[9])[0]) == [3, 6, 9]


def test_kernel_equal_input_is_full_attention_and_stride_equal_kernel_is_blocked():
  assert N.na_mask((5, 7), (5, 7)).all()
  blocked = N.na_mask((6, 4), (3, 2), (3, 2))
  cells = np.stack(np.unravel_index(np.arange(24), (6, 4)), -1) // np.array([3, 2])
  expect = (cells[:, None] == cells[None]).all(-1)
  np.testing.assert_array_equal(blocked, expect)


def _qkv(key, shape, h, hk, d, dtype=jnp.float32, dv=None):
  k1, k2, k3 = jax.random.split(key, 3)
  q = jax.random.normal(k1, shape[:1] + shape[1:] + (h, d), dtype)
  k = jax.random.normal(k2, shape + (hk, d), dtype)
  v = jax.random.normal(k3, shape + (hk, dv or d), dtype)
  return q, k, v


# Jitted entry points (Python options static): eager op-by-op dispatch dominates on this CPU.
_NA_STATIC = ("kernel_size", "stride", "dilation", "is_causal", "return_lse", "implementation",
              "tile_shape")
_na = jax.jit(N.neighborhood_attention, static_argnames=_NA_STATIC)
_na1d = jax.jit(N.na1d, static_argnums=(3, 4, 5, 6), static_argnames=_NA_STATIC)
_na2d = jax.jit(N.na2d, static_argnums=(3, 4, 5, 6), static_argnames=_NA_STATIC)


@functools.partial(jax.jit, static_argnames=_NA_STATIC)
def _na_out_lse_and_grads(q, k, v, dout, **kw):
  """`(o, lse)` and the gradient of `sum(o * dout)` w.r.t. (q, k, v), in one compiled call."""
  def loss(q, k, v):
    o, lse = N.neighborhood_attention(q, k, v, return_lse=True, **kw)
    return jnp.sum(o * dout), (o, lse)
  (_, (o, lse)), g = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
  return o, lse, g


CASES = [
    # spatial, kernel, stride, dilation, causal, tile, check gradients (compiles are slow on CPU:
    # gradients on the 1D and 3D cases, which between them cover stride, dilation and causal)
    ((13,), 5, 2, 2, False, (4,), True),
    ((7, 9), (3, 4), (1, 2), (2, 1), (True, False), (4, 4), False),
    ((7, 9), (7, 9), 1, 1, False, (4, 4), False),          # kernel = input: full attention
    ((6, 5, 7), (3, 2, 4), (3, 2, 1), (1, 2, 1), (False, True, True), (2, 2, 4), True),
]


@pytest.mark.parametrize("spatial,kernel,stride,dilation,causal,tile,grads", CASES)
def test_block_sparse_path_matches_reference_values_and_grads(spatial, kernel, stride, dilation,
                                                             causal, tile, grads):
  q, k, v = _qkv(jax.random.PRNGKey(len(spatial)), (2,) + spatial, 4, 2, 8, dv=6)
  kw = dict(kernel_size=kernel, stride=stride, dilation=dilation, is_causal=causal, tile_shape=tile)
  if grads:  # values, lse and gradients from one compile per path
    dout = jax.random.normal(jax.random.PRNGKey(9), (2,) + spatial + (4, 6))
    o, lse, g = _na_out_lse_and_grads(q, k, v, dout, **kw)
    o_ref, lse_ref, g_ref = _na_out_lse_and_grads(q, k, v, dout, **kw, implementation="reference")
  else:
    o, lse = _na(q, k, v, **kw, return_lse=True)
    o_ref, lse_ref = _na(q, k, v, **kw, implementation="reference", return_lse=True)
  assert o.shape == (2,) + spatial + (4, 6)
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=2e-5)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_ref), atol=2e-5)
  if not grads:
    return
  for a, r in zip(g, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-4, rtol=1e-4)


def test_every_causal_combination_2d_and_full_blocks_exist():
  spatial, kernel = (9, 10), (4, 5)
  q, k, v = _qkv(jax.random.PRNGKey(3), (1,) + spatial, 2, 1, 8)
  for causal in itertools.product([False, True], repeat=2):
    o = _na2d(q, k, v, kernel, 1, 1, causal, tile_shape=(3, 3))
    o_ref = _na2d(q, k, v, kernel, 1, 1, causal, implementation="reference")
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=2e-5, err_msg=str(causal))
  lay, _, _ = N.na_layout((16, 16), (8, 8), (1, 1), (1, 1), (False, False), (4, 4))
  L.check_layout(lay)
  bm = np.asarray(L.block_matrix(lay))
  assert (bm == 2).any() and (bm == 1).any()
  assert L.density(lay) < 0.6


def test_bf16_matches_reference():
  q, k, v = _qkv(jax.random.PRNGKey(5), (1, 10, 6), 2, 2, 16, jnp.bfloat16)
  o = _na2d(q, k, v, 3, tile_shape=(4, 4))
  o_ref = _na2d(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), 3,
                implementation="reference")
  np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_ref), atol=3e-2)


def test_additional_kv_merge_equals_concat_attention():
  q, k, v = _qkv(jax.random.PRNGKey(6), (1, 11), 2, 1, 8)
  ek = jax.random.normal(jax.random.PRNGKey(7), (1, 3, 1, 8))
  ev = jax.random.normal(jax.random.PRNGKey(8), (1, 3, 1, 8))
  kw = dict(additional_keys=ek, additional_values=ev, return_lse=True)
  o, lse = _na1d(q, k, v, 3, **kw)
  o_ref, lse_ref = _na1d(q, k, v, 3, implementation="reference", **kw)
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=2e-5)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_ref), atol=2e-5)
  # Kernel = length and extra keys: plain attention over the concatenation.
  o_full = _na1d(q, k, v, 11, additional_keys=ek, additional_values=ev)
  o_cat = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation="reference"))(
      q, jnp.concatenate([k, ek], 1), jnp.concatenate([v, ev], 1))
  np.testing.assert_allclose(np.asarray(o_full), np.asarray(o_cat), atol=2e-5)


def test_validation_errors():
  q, k, v = _qkv(jax.random.PRNGKey(0), (1, 8), 2, 2, 4)
  with pytest.raises(ValueError, match="kernel_size must be >= 2"):
    N.na1d(q, k, v, 1)
  with pytest.raises(ValueError, match="stride"):
    N.na1d(q, k, v, 3, stride=4)
  with pytest.raises(ValueError, match="kernel_size \\* dilation"):
    N.na1d(q, k, v, 3, dilation=3)
  with pytest.raises(ValueError, match="na2d expects"):
    N.na2d(q, k, v, 3)
  with pytest.raises(ValueError, match="kernel_size must be one value or a tuple of 1"):
    N.na1d(q, k, v, (3, 3))
  with pytest.raises(ValueError, match="additional_keys"):
    N.na1d(q, k, v, 3, additional_keys=k)
