"""ELA [36] and ULSAM [106] on [B, H, W, C]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.cnn_attention import ELA, ULSAM


def _ela_oracle(x, kernel, num_groups, scale, bias, eps=1e-5):
  """ELA [36] in numpy, per the paper's code (Xu & Wan, `EfficientLocalizationAttention.forward`,
  read "from memory" as the catalog says): `x_h = mean over W`, `x_w = mean over H`; each goes
  through one shared depth-wise Conv1d (zero padding k // 2, no bias), GroupNorm(num_groups) and
  a sigmoid; `y = x * x_h * x_w`. `kernel [k, C]`; x `[B, H, W, C]` (channels last)."""
  x = np.asarray(x, np.float64)
  k, c = kernel.shape
  pad = k // 2

  def gate(z):                                      # z [B, L, C]
    zp = np.pad(z, ((0, 0), (pad, pad), (0, 0)))
    conv = sum(zp[:, t:t + z.shape[1]] * kernel[t] for t in range(k))
    g = conv.reshape(z.shape[0], z.shape[1], num_groups, c // num_groups)
    mu = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    gn = ((g - mu) / np.sqrt(var + eps)).reshape(conv.shape) * scale + bias
    return 1.0 / (1.0 + np.exp(-gn))

  a_h, a_w = gate(x.mean(axis=2)), gate(x.mean(axis=1))
  return x * a_h[:, :, None] * a_w[:, None]


def test_ela_matches_the_formula_and_gates_are_constant_along_w():
  # 16 groups do not divide C = 12: the layer takes the largest divisor below, 12.
  ela = ELA(12, kernel_size=5, num_groups=16, rngs=nnx.Rngs(0))
  assert ela.num_groups == 12
  ela = ELA(12, kernel_size=5, num_groups=4, rngs=nnx.Rngs(0))
  ela.gn_scale[...] = 1.0 + 0.3 * jnp.sin(jnp.arange(12.0))   # non-trivial affine GroupNorm
  ela.gn_bias[...] = 0.2 * jnp.cos(jnp.arange(12.0))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 12))
  y = nnx.jit(lambda m, x: m(x))(ela, x)
  want = _ela_oracle(x, np.asarray(ela.conv.kernel[...])[:, 0, :], 4, np.asarray(ela.gn_scale[...]),
                     np.asarray(ela.gn_bias[...]))
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=1e-5)
  assert y.shape == x.shape and np.all(np.abs(y) <= np.abs(x) + 1e-7)
  # Input constant along W: z_w is constant over W, hence a_w too, away from the conv's zero
  # padding (the catalog oracle ignores the borders; the paper's Conv1d pads with zeros).
  xc = jnp.broadcast_to(x[:, :, :1], (2, 5, 9, 12))
  _, a_w = nnx.jit(lambda m, x: m.gates(x))(ela, xc)
  inner = np.asarray(a_w[:, :, 2:7])
  np.testing.assert_allclose(inner, np.broadcast_to(inner[:, :, :1], inner.shape), atol=1e-6)
  g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(ela)
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
