"""Neighborhood attention on the flash kernel: the ops' NA rule and layout (the only NA rule) against
an independent transcription of NATTEN's reference mask, and the kernel against the dense reference.

Oracle: NATTEN's `csrc/include/natten/cuda/reference/mask.hpp` (SHI-Labs/NATTEN), written per query
as key index sets below, independently of `attnjax.ops.neighborhood`.
"""

import functools
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops import layout as L
from attnjax.ops import neighborhood as N
from pallas_kernels.flash.reference import flash_reference
from pallas_kernels.flash.testing import check_values_and_grads, random_qkv



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


def _per_dim(x, n):
  return tuple(x) if isinstance(x, (tuple, list)) else (x,) * n


@pytest.mark.parametrize("spatial,kernel,stride,dilation,causal,tile", [
    ((23,), (5,), (1,), (1,), (False,), (8,)),
    ((30,), (6,), (3,), (2,), (False,), (4,)),
    ((19,), (4,), (2,), (1,), (True,), (16,)),
    ((6, 7), (3, 4), (2, 1), (1, 1), (False, True), (4, 4)),
    ((8, 8), (5, 3), (1, 2), (1, 2), (False, False), (4, 4)),
    ((4, 4, 6), (2, 3, 3), (1, 1, 2), (1, 1, 1), (False, False, True), (2, 2, 2)),
], ids=["1d", "1d_stride_dil", "1d_causal", "2d_mixed_causal", "2d_tiled_dil", "3d_tiled"])
def test_ops_na_rule_and_layout_match_natten(spatial, kernel, stride, dilation, causal, tile):
  want = natten_mask(spatial, kernel, stride, dilation, causal)
  np.testing.assert_array_equal(N.na_mask(spatial, kernel, stride, dilation, causal), want)
  # The tile-permuted layout the kernel runs on encodes the same mask in its token order.
  lay, perm, _ = N.na_layout(spatial, kernel, stride, dilation, causal, tile)
  got = np.asarray(L.dense_mask(lay)[0, 0])
  valid = perm >= 0
  p = np.maximum(perm, 0)
  want_perm = want[np.ix_(p, p)] & valid[:, None] & valid[None, :]
  np.testing.assert_array_equal(got, want_perm)


@pytest.mark.parametrize("spatial,kernel,stride,dilation,causal,tile", [
    ((37,), 7, 3, 2, False, None),
    ((6, 10), (3, 5), (1, 2), 1, (True, False), (2, 8)),
    ((4, 4, 4), (3, 2, 3), 1, (1, 2, 1), False, (2, 2, 4)),
], ids=["1d", "2d", "3d"])
def test_kernel_matches_reference(spatial, kernel, stride, dilation, causal, tile):
  n = int(np.prod(spatial))
  q, k, v, do = random_qkv(11, 1, n, n, 2, 1, 16)
  shape = lambda x: x.reshape((1,) + spatial + x.shape[2:])
  q, k, v, do = map(shape, (q, k, v, do))
  fast = functools.partial(N.neighborhood_attention, kernel_size=kernel, stride=stride,
                           dilation=dilation, is_causal=causal, tile_shape=tile,
                           implementation="pallas")
  mask = jnp.asarray(natten_mask(spatial, *(_per_dim(a, len(spatial))
                                            for a in (kernel, stride, dilation, causal))))

  def ref(q, k, v):
    flat = [x.reshape((1, n) + x.shape[-2:]) for x in (q, k, v)]
    return flash_reference(*flat, mask[None, None]).reshape(q.shape)

  check_values_and_grads(fast, ref, (q, k, v), do, jnp.float32)


def test_full_window_equals_dense():
  q, k, v, _ = random_qkv(12, 1, 20, 20, 2, 2, 16)
  o = N.na1d(q, k, v, 20, implementation="pallas")
  np.testing.assert_allclose(o, flash_reference(q, k, v), atol=1e-5)


def test_bad_na_args_raise():
  q = jnp.zeros((1, 10, 1, 16))
  with pytest.raises(ValueError, match="kernel_size"):
    N.na1d(q, q, q, 11, implementation="pallas")
  with pytest.raises(ValueError, match="stride"):
    N.na1d(q, q, q, 3, stride=4, implementation="pallas")
  with pytest.raises(ValueError, match="power-of-two blocks >= 16"):
    N.na1d(q, q, q, 3, tile_shape=(3,), implementation="pallas")
