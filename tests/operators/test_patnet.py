"""PATNet (Huang et al. 2025, arXiv 2503.03148) parts against numpy transcriptions of the authors'
code, haiduo/PartialNet `models/partialnet.py` (written in NCHW there, channels-last here):
`Partial_conv3.forward_atten` (split `[dim // n_div, rest]`, `partial_conv3` on the first part;
'se': `x2 = norm(attn(x2))`, 'self': `x2 = attn(norm(x2))`), `SRM.forward` (mean and unbiased std
per channel, `cfc1` a (1, 2) conv over all channels, BN, Hardsigmoid, `x * g`),
`partial_spatial_attn_layer_reverse.forward` and `RPEAttention` with iRPE's euclidean buckets
(`models/irpe.py`: `round(sqrt(dy^2 + dx^2))`, a per-head bias per bucket, added to q.k scaled).
BatchNorm in training mode: batch mean and biased variance over (B, H, W)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.models.patnet import PATNet, PartialAttentionConv, PartialSpatialAttention


def _bn(x, scale, bias, eps=1e-5):
  axes = tuple(range(x.ndim - 1))
  return (x - x.mean(axes)) / np.sqrt(x.var(axes) + eps) * scale + bias


def _bn_of(x, m):
  return _bn(x, np.asarray(m.scale[...], np.float64), np.asarray(m.bias[...], np.float64), m.eps)


def _hsig(x):
  return np.clip(x + 3.0, 0.0, 6.0) / 6.0


def _conv(x, kernel):
  """'same' zero-padded cross-correlation, `x [B, H, W, Cin]`, `kernel [k, k, Cin, Cout]`."""
  k = kernel.shape[0]
  p = k // 2
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  h, w = x.shape[1:3]
  return sum(np.einsum("bhwc,cd->bhwd", xp[:, i:i + h, j:j + w], kernel[i, j])
             for i in range(k) for j in range(k))


def _srm(x, cfc, bn):
  b, h, w, c = x.shape
  flat = x.reshape(b, h * w, c)
  u_mean, u_std = flat.mean(1), flat.std(1, ddof=1)               # torch .std: unbiased
  z = u_mean @ cfc[:, 0] + u_std @ cfc[:, 1]                      # cfc1: Conv2d(c, c, (1, 2))
  return x * _hsig(_bn_of(z, bn))[:, None, None, :]


def _np(a):
  return np.asarray(a, np.float64)


def test_partial_conv_with_r1_is_a_full_conv_and_untouched_channels_pass(rand):
  full = PartialAttentionConv(6, n_div=1, attn="channel", rngs=nnx.Rngs(0))
  plain = PartialAttentionConv(6, n_div=3, attn=None, rngs=nnx.Rngs(1))       # FasterNet PConv
  x = rand(0, 2, 5, 7, 6)
  y_full, y_plain = nnx.jit(lambda a, b, x: (a(x), b(x)))(full, plain, x)
  np.testing.assert_allclose(y_full, _conv(_np(x), _np(full.conv.kernel[...])), atol=1e-5)
  np.testing.assert_allclose(y_plain[..., :2], _conv(_np(x[..., :2]), _np(plain.conv.kernel[...])),
                             atol=1e-5)
  np.testing.assert_array_equal(y_plain[..., 2:], x[..., 2:])
  with pytest.raises(ValueError, match="n_div"):
    PartialAttentionConv(6, n_div=7, rngs=nnx.Rngs(0))


def test_pat_ch_and_pat_sp_match_the_authors_code(rand):
  ch = PartialAttentionConv(8, n_div=4, attn="channel", rngs=nnx.Rngs(0))
  sp = PartialSpatialAttention(8, rngs=nnx.Rngs(1))
  for bn in (ch.attn.bn, ch.norm, sp.norm, sp.norm2):               # non-trivial BN affines
    bn.scale[...] = 1.0 + 0.2 * jnp.cos(jnp.arange(bn.scale.shape[0]))
    bn.bias[...] = 0.1 * jnp.sin(jnp.arange(bn.bias.shape[0]))
  x = rand(1, 3, 4, 5, 8)
  y_ch, y_sp, g = nnx.jit(lambda a, b, x: (a(x), b(x), a.attn.gate(x[..., 2:])))(ch, sp, x)
  xd = _np(x)
  want = np.concatenate([_conv(xd[..., :2], _np(ch.conv.kernel[...])),
                         _bn_of(_srm(xd[..., 2:], _np(ch.attn.cfc[...]), ch.attn.bn), ch.norm)], -1)
  np.testing.assert_allclose(y_ch, want, atol=1e-4, rtol=1e-4)
  assert np.all((np.asarray(g) >= 0) & (np.asarray(g) <= 1))
  x1, x2 = xd[..., :4], xd[..., 4:]
  w_a = _np(sp.conv_attn.kernel[...])[0, 0]                         # [4, 1]
  want_sp = np.concatenate([_bn_of(x1 * _hsig(x1 @ w_a), sp.norm),
                            _bn_of(x2, sp.norm2) @ _np(sp.conv.kernel[...])[0, 0]], -1)
  np.testing.assert_allclose(y_sp, want_sp, atol=1e-4, rtol=1e-4)


def test_pat_sf_is_ln_then_rpe_self_attention(rand):
  sf = PartialAttentionConv(12, n_div=4, attn="self", num_heads=3, rngs=nnx.Rngs(0))
  sf.attn.rpe_bias[...] = jax.random.normal(jax.random.key(3), sf.attn.rpe_bias.shape)
  x = rand(2, 2, 3, 4, 12)
  y = nnx.jit(lambda m, x: m(x))(sf, x)
  x2 = _np(x[..., 3:])
  ln = sf.norm
  mu, var = x2.mean(-1, keepdims=True), x2.var(-1, keepdims=True)
  h = (x2 - mu) / np.sqrt(var + 1e-6) * _np(ln.scale[...]) + _np(ln.bias[...])
  b, n, c, heads = 2, 12, 9, 3
  qkv = (h.reshape(b, n, c) @ _np(sf.attn.qkv.kernel[...])).reshape(b, n, 3, heads, c // heads)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  pos = np.array([(i, j) for i in range(3) for j in range(4)], np.float64)
  bucket = np.round(np.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1))).astype(int)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(c // heads) + _np(sf.attn.rpe_bias[...])[:, bucket]
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, n, c)
  o = o @ _np(sf.attn.proj.kernel[...]) + _np(sf.attn.proj.bias[...])
  np.testing.assert_allclose(y[..., 3:], o.reshape(2, 3, 4, 9), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(y[..., :3], _conv(_np(x[..., :3]), _np(sf.conv.kernel[...])), atol=1e-5)


def test_patnet_forward_stages_and_input_checks():
  m = PATNet(image_size=8, in_channels=1, num_classes=10, embed_dim=8, depths=(1, 1),
             num_heads=2, feature_dim=16, rngs=nnx.Rngs(0))
  imgs = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  # Forward only (a training step's gradients run in configs/patnet_digits.py): compile cost.
  assert np.all(np.isfinite(np.asarray(nnx.jit(lambda m, x: m(x))(m, imgs))))
  assert m.stages[1][0].mix.attn_type == "self" and m.stages[0][0].mix.attn_type == "channel"
  with pytest.raises(ValueError, match=r"images must be \[B, 8, 8, 1\]"):
    m(imgs[..., :6, :])
  with pytest.raises(ValueError, match="divisible by 2"):
    PATNet(image_size=6, in_channels=1, num_classes=10, depths=(1, 1), patch_size=2, rngs=nnx.Rngs(0))
