"""Neighborhood attention on the flash kernel: NATTEN window semantics and kernel vs reference."""

import functools
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash import layouts
from pallas_kernels.flash import neighborhood as na
from pallas_kernels.flash.reference import flash_reference
from pallas_kernels.flash.testing import check_values_and_grads, random_qkv
from pallas_kernels.common import interpret_in_tests

INTERPRET = interpret_in_tests()  # False on a GPU with ATTNJAX_KERNEL_TESTS_ON_GPU=1


def natten_windows_1d(length, kernel, stride=1, dilation=1, causal=False):
  """Independent per-query loop of NATTEN's reference mask (`mask.hpp` form), as key index sets."""
  out = []
  for x in range(length):
    g, xi = x % dilation, x // dilation
    members = list(range(g, length, dilation))
    n = len(members)
    left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
    if causal:
      leader = min((xi // stride) * stride + stride - 1, n - 1)
      start, end = max(leader - (kernel - 1), 0), xi + 1
    else:
      leader = min((xi // stride) * stride + stride // 2, n - 1)
      start = max(leader - left, 0) + (leader + right >= n) * (n - right - leader - 1)
      end = start + kernel
    out.append({members[j] for j in range(start, end)})
  return out


def natten_mask(spatial, kernel, stride, dilation, causal):
  per_dim = [natten_windows_1d(*args) for args in zip(spatial, kernel, stride, dilation, causal)]
  coords = list(itertools.product(*[range(s) for s in spatial]))
  mask = np.zeros((len(coords), len(coords)), bool)
  for i, qc in enumerate(coords):
    for j, kc in enumerate(coords):
      mask[i, j] = all(kc[d] in per_dim[d][qc[d]] for d in range(len(spatial)))
  return mask


def test_windows_match_natten_tables():
  """Tables from the NATTEN notes: L=8 (K,s) cases and the L=10, K=4, s=4 blocked case."""
  as_ranges = lambda ws: [(min(w), max(w) + 1) for w in ws]
  assert as_ranges(natten_windows_1d(8, 3)) == [(0, 3), (0, 3), (1, 4), (2, 5), (3, 6), (4, 7),
                                                (5, 8), (5, 8)]
  assert as_ranges(natten_windows_1d(8, 4, 2)) == [(0, 4), (0, 4), (1, 5), (1, 5), (3, 7), (3, 7),
                                                   (4, 8), (4, 8)]
  assert as_ranges(natten_windows_1d(8, 3, causal=True)) == [(0, 1), (0, 2), (0, 3), (1, 4),
                                                             (2, 5), (3, 6), (4, 7), (5, 8)]
  assert as_ranges(natten_windows_1d(10, 4, 4)) == [(0, 4)] * 4 + [(4, 8)] * 4 + [(6, 10)] * 2


@pytest.mark.parametrize("spatial,kernel,stride,dilation,causal,tile", [
    ((23,), (5,), (1,), (1,), (False,), None),
    ((30,), (6,), (3,), (2,), (False,), None),
    ((19,), (4,), (2,), (1,), (True,), None),
    ((6, 7), (3, 4), (2, 1), (1, 1), (False, True), None),
    ((8, 8), (5, 3), (1, 2), (1, 2), (False, False), (4, 4)),
    ((4, 4, 6), (2, 3, 3), (1, 1, 2), (1, 1, 1), (False, False, True), (2, 2, 2)),
], ids=["1d", "1d_stride_dil", "1d_causal", "2d_mixed_causal", "2d_tiled_dil", "3d_tiled"])
def test_mask_rule_matches_natten(spatial, kernel, stride, dilation, causal, tile):
  n = int(np.prod(spatial))
  rule = na.na_mask_rule(spatial, kernel, stride, dilation, causal, tile)
  got = np.asarray(rule(jnp.arange(n)[:, None], jnp.arange(n)[None, :]))
  want = natten_mask(spatial, kernel, stride, dilation, causal)
  if tile is not None:
    # Map flattened tile-major positions back to raster order through the permutation itself.
    order = np.asarray(na.flatten_tokens(jnp.arange(n).reshape((1,) + spatial + (1, 1)), spatial,
                                         tile))[0, :, 0, 0]
    want = want[np.ix_(order, order)]
  np.testing.assert_array_equal(got, want)
  layout = na.na_layout(spatial, kernel, stride, dilation, causal, block_q=16, block_k=16,
                        tile=tile)
  np.testing.assert_array_equal(layouts.dense_mask_from_layout(layout, 1, 1)[0, 0], got)


def test_flatten_roundtrip():
  x = jnp.arange(2 * 4 * 6 * 3 * 2, dtype=jnp.float32).reshape(2, 4, 6, 3, 2)
  for tile in (None, (2, 3)):
    y = na.flatten_tokens(x, (4, 6), tile)
    np.testing.assert_array_equal(na.unflatten_tokens(y, (4, 6), tile), x)


@pytest.mark.parametrize("spatial,kernel,stride,dilation,causal,tile", [
    ((37,), 7, 3, 2, False, None),
    ((6, 10), (3, 5), (1, 2), 1, (True, False), (2, 5)),
    ((4, 4, 4), (3, 2, 3), 1, (1, 2, 1), False, (2, 2, 2)),
], ids=["1d", "2d", "3d"])
def test_kernel_matches_reference(spatial, kernel, stride, dilation, causal, tile):
  n = int(np.prod(spatial))
  q, k, v, do = random_qkv(11, 1, n, n, 2, 1, 16)
  shape = lambda x: x.reshape((1,) + spatial + x.shape[2:])
  q, k, v, do = map(shape, (q, k, v, do))
  layout = na.na_layout(spatial, kernel, stride, dilation, causal, block_q=16, block_k=16,
                        tile=tile)
  fast = functools.partial(na.neighborhood_flash_attention, kernel_size=kernel, stride=stride,
                           dilation=dilation, is_causal=causal, tile=tile, layout=layout,
                           interpret=INTERPRET)
  mask = jnp.asarray(natten_mask(spatial, *(na._as_tuple(a, len(spatial), "")
                                            for a in (kernel, stride, dilation, causal))))

  def ref(q, k, v):
    flat = [x.reshape((1, n) + x.shape[-2:]) for x in (q, k, v)]
    return flash_reference(*flat, mask[None, None]).reshape(q.shape)

  check_values_and_grads(fast, ref, (q, k, v), do, jnp.float32)


def test_full_window_equals_dense():
  q, k, v, _ = random_qkv(12, 1, 20, 20, 2, 2, 16)
  o = na.neighborhood_flash_attention(q, k, v, 20, block_q=16, block_k=16, interpret=INTERPRET)
  np.testing.assert_allclose(o, flash_reference(q, k, v), atol=1e-5)


def test_bad_na_args_raise():
  q = jnp.zeros((1, 10, 1, 16))
  with pytest.raises(ValueError, match="kernel_size"):
    na.neighborhood_flash_attention(q, q, q, 11)
  with pytest.raises(ValueError, match="stride"):
    na.neighborhood_flash_attention(q, q, q, 3, stride=4)
  with pytest.raises(ValueError, match="tile"):
    na.na_layout((10,), 3, block_q=16, block_k=16, tile=(3,))
