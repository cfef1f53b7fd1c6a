"""`implementation="pallas"` routes block-sparse and neighborhood attention to the flash kernel
(interpret mode on CPU); it must equal the dense-masked oracle in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops import block_sparse as BS
from attnjax.ops import layout as L
from attnjax.ops import neighborhood as N
from attnjax.ops.sparse import patterns as P

pytest.importorskip("pallas_kernels.flash.api")


def _qkv(shape, hk=None):
  ks = jax.random.split(jax.random.key(11), 3)
  kv_shape = shape[:-2] + ((hk or shape[-2]), shape[-1])
  return (jax.random.normal(ks[0], shape), jax.random.normal(ks[1], kv_shape),
          jax.random.normal(ks[2], kv_shape))


def test_block_sparse_pallas_equals_reference_values_and_grads():
  # T = 45 is not a multiple of the 16-token blocks; GQA 2 -> 1 key head; float32 tolerance 1e-5.
  q, k, v = _qkv((1, 45, 2, 16), hk=1)
  lay = P.sink_local_layout(45, num_sink=3, window=10, block=16)
  o, lse = BS.block_sparse_attention(q, k, v, lay, implementation="pallas", return_lse=True)
  ro, rl = BS.reference_attention(q, k, v, lay, return_lse=True)
  np.testing.assert_allclose(o, ro, atol=1e-5)
  np.testing.assert_allclose(lse, rl, atol=1e-5)
  w = jax.random.normal(jax.random.key(3), o.shape)
  loss = lambda impl: lambda q, k, v: jnp.sum(
      w * BS.block_sparse_attention(q, k, v, lay, implementation=impl))
  g = jax.grad(loss("pallas"), argnums=(0, 1, 2))(q, k, v)
  rg = jax.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g, rg):
    np.testing.assert_allclose(a, b, atol=1e-4)
  sel = L.from_block_mask(np.ones((1, 1, 3, 3), bool), block_q=16, block_k=16, tq=45, tk=45,
                          query_block_select=jnp.ones((1, 1, 45, 3), bool))
  with pytest.raises(ValueError, match="query_block_select"):
    BS.block_sparse_attention(q, k, v, sel, implementation="pallas")
  with pytest.raises(ValueError, match="implementation"):
    BS.block_sparse_attention(q, k, v, lay, implementation="triton")


def test_na2d_pallas_equals_reference():
  # Odd 9 x 7 map, dilation 2 in x, causal in y, stride 2: the tile-permuted layout on the kernel.
  q, k, v = _qkv((1, 9, 7, 2, 16))
  args = ((3, 5), (2, 1), (2, 1), (False, True))
  o, lse = N.na2d(q, k, v, *args, implementation="pallas", return_lse=True)
  ro, rl = N.na2d(q, k, v, *args, implementation="reference", return_lse=True)
  np.testing.assert_allclose(o, ro, atol=1e-5)
  np.testing.assert_allclose(lse, rl, atol=1e-5)
