"""ELA (Xu & Wan 2024, arXiv:2403.01123) and ULSAM (Saini et al. 2020, arXiv:2006.15102) on [B, H, W, C]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.cnn_attention import ELA, ULSAM


def _ela_oracle(x, kernel, num_groups, scale, bias, eps=1e-5):
  """ELA (Xu & Wan 2024, arXiv:2403.01123) in numpy, per the paper's code (Xu & Wan, `EfficientLocalizationAttention.forward`,
  read from memory): `x_h = mean over W`, `x_w = mean over H`; each goes
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
  # padding (the oracle ignores the borders; the paper's Conv1d pads with zeros).
  xc = jnp.broadcast_to(x[:, :, :1], (2, 5, 9, 12))
  _, a_w = nnx.jit(lambda m, x: m.gates(x))(ela, xc)
  inner = np.asarray(a_w[:, :, 2:7])
  np.testing.assert_allclose(inner, np.broadcast_to(inner[:, :, :1], inner.shape), atol=1e-6)
  g = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(ela)
  assert np.all(np.isfinite(g["conv"]["kernel"][...]))
  with pytest.raises(ValueError, match="B, H, W, C"):
    ela(x[0])


def _ulsam_subspace_ref(x, dw_w, dw_b, bn1, pw_w, pw_b, bn2):
  """Transcription of `SubSpace.forward` (Nandan91/ULSAM `ulsam.py`) in NCHW numpy, training-mode
  BatchNorm2d (batch statistics, biased variance, eps 1e-5). `x [B, c, H, W]`; `bn = (gamma, beta)`."""
  def bn(z, gamma, beta):
    mu = z.mean(axis=(0, 2, 3), keepdims=True)
    var = z.var(axis=(0, 2, 3), keepdims=True)
    return (z - mu) / np.sqrt(var + 1e-5) * gamma[None, :, None, None] + beta[None, :, None, None]
  out = x * dw_w[None, :, None, None] + dw_b[None, :, None, None]      # conv_dws (1x1, groups=nin)
  out = np.maximum(bn(out, *bn1), 0)                                     # bn_dws, relu_dws
  m, n, p, q = out.shape
  pad = np.pad(out, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  out = np.max(np.stack([pad[:, :, i:i + p, j:j + q] for i in range(3) for j in range(3)]), 0)
  out = np.einsum("bchw,c->bhw", out, pw_w)[:, None] + pw_b              # conv_point (nin -> 1)
  out = np.maximum(bn(out, *bn2), 0)                                     # bn_point, relu_point
  flat = out.reshape(m, 1, -1)
  e = np.exp(flat - flat.max(-1, keepdims=True))
  out = (e / e.sum(-1, keepdims=True)).reshape(m, 1, p, q)               # softmax over H*W
  return out * x + x


@pytest.mark.parametrize("groups", [1, 4])
def test_ulsam_matches_authors_subspace(groups):
  c = 8
  m = ULSAM(c, num_groups=groups, rngs=nnx.Rngs(0))
  ks = jax.random.split(jax.random.PRNGKey(2), 6)
  # Away from the identity init, so every parameter shows in the output.
  m.dw_scale[...] = jax.random.normal(ks[0], m.dw_scale[...].shape)
  m.dw_bias[...] = jax.random.normal(ks[1], m.dw_bias[...].shape)
  m.bn_dw.scale[...] = 1 + 0.3 * jax.random.normal(ks[2], (c,))
  m.bn_dw.bias[...] = 0.3 * jax.random.normal(ks[3], (c,))
  m.bn_pw.bias[...] = 0.5 + 0.1 * jax.random.normal(ks[4], (groups,))
  x = jax.random.normal(ks[5], (3, 5, 6, c))
  y = nnx.jit(lambda m, x: m(x))(m, x)
  xn = np.asarray(x).transpose(0, 3, 1, 2)
  cg = c // groups
  sl = lambda a, i: np.asarray(a)[i * cg:(i + 1) * cg]
  ref = np.concatenate([_ulsam_subspace_ref(
      xn[:, i * cg:(i + 1) * cg], np.asarray(m.dw_scale[...][i]), np.asarray(m.dw_bias[...][i]),
      (sl(m.bn_dw.scale[...], i), sl(m.bn_dw.bias[...], i)), np.asarray(m.pw[...][i]),
      np.asarray(m.pw_bias[...][i]), (np.asarray(m.bn_pw.scale[...][i:i + 1]),
                                      np.asarray(m.bn_pw.bias[...][i:i + 1])))
      for i in range(groups)], axis=1)
  np.testing.assert_allclose(y, ref.transpose(0, 2, 3, 1), atol=1e-5, rtol=1e-5)
  # Running statistics as torch (momentum 0.9, unbiased variance); eval mode normalises with them.
  f = np.asarray(x).reshape(3, 5, 6, groups, cg) * np.asarray(m.dw_scale[...]) + np.asarray(m.dw_bias[...])
  f = f.reshape(-1, c)
  np.testing.assert_allclose(m.bn_dw.mean[...], 0.9 * f.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m.bn_dw.var[...], 0.1 + 0.9 * f.var(0, ddof=1), rtol=1e-5)
  m.eval()
  ye = m(x)
  assert ye.shape == x.shape and not np.allclose(ye, y, atol=1e-3)
  a = m.maps(x)
  np.testing.assert_allclose(a.sum(axis=(1, 2)), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="divisible"):
    ULSAM(8, num_groups=3, rngs=nnx.Rngs(0))
