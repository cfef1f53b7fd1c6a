"""ELA [36] and ULSAM [106] on [B, H, W, C]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.cnn_attention import ELA, ULSAM


def test_ela_gates_bound_output_and_constant_along_w():
  ela = ELA(12, kernel_size=5, num_groups=16, rngs=nnx.Rngs(0))
  assert ela.num_groups == 12 or 12 % ela.num_groups == 0
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 12))
  y = ela(x)
  assert y.shape == x.shape and np.all(np.abs(y) <= np.abs(x) + 1e-7)
  # Input constant along W: z_w is constant over W, hence a_w too, away from the conv's zero
  # padding (the catalog oracle ignores the borders; the paper's Conv1d pads with zeros).
  xc = jnp.broadcast_to(x[:, :, :1], (2, 5, 9, 12))
  _, a_w = ela.gates(xc)
  inner = np.asarray(a_w[:, :, 2:7])
  np.testing.assert_allclose(inner, np.broadcast_to(inner[:, :, :1], inner.shape), atol=1e-6)
  g = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(ela)
  assert np.all(np.isfinite(g["conv"]["kernel"][...]))
  with pytest.raises(ValueError, match="B, H, W, C"):
    ela(x[0])


@pytest.mark.parametrize("groups", [1, 4])
def test_ulsam_maps_sum_to_one(groups):
  m = ULSAM(8, num_groups=groups, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 6, 8))
  a = m.maps(x)
  assert a.shape == (2, 5, 6, groups)
  np.testing.assert_allclose(a.sum(axis=(1, 2)), 1.0, rtol=1e-5)
  y = m(x)
  f = x.reshape(2, 5, 6, groups, 8 // groups)
  np.testing.assert_allclose(y, (f * a[..., None] + f).reshape(x.shape), atol=1e-6)
  with pytest.raises(ValueError, match="divisible"):
    ULSAM(8, num_groups=3, rngs=nnx.Rngs(0))
