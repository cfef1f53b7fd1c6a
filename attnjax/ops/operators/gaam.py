"""Gaussian adaptive attention, GAAM (Ioannides et al. 2024, arXiv:2401.11143)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def gaam_weights(x, offsets, scales, *, axis: int = 1, eps: float = 1e-8, causal: bool = False,
                 segment_ids=None):
  """GAAM weights (Ioannides et al. (Ioannides et al. 2024, arXiv:2401.11143), from the authors' code), normalised along `axis`.

  With `mu = mean(x)`, `sigma^2 = var(x) + eps` along `axis` (the unbiased variance, `/(n - 1)`, as
  the authors' `x.var(dim)` is torch's default; one sample has variance 0 here, where torch gives
  NaN; its weight is 1 either way), and G Gaussians (`offsets [G]` = delta,
  init 0; `scales [G]` = c): `log G(x) = sum_g -(x - (mu + delta_g))^2 / (2 sigma^2 c_g^2) -
  log sqrt(2 pi c_g^2)`; `w = G / sum_axis G` (computed as a softmax of log G, so large deviations
  do not underflow to 0/0). `causal=True` (axis 1 only): position t uses the prefix's mean and
  variance and normalises over the prefix, so w_t never reads later positions. Weights sum to 1
  along `axis`; constant x with zero offsets gives uniform weights. `segment_ids [B, T]` (axis 1
  only; packed sequences): statistics and normalisation are taken within each token's segment.
  """
  xf = x.astype(jnp.float32)
  offsets = jnp.asarray(offsets, jnp.float32)
  scales = jnp.asarray(scales, jnp.float32)
  if offsets.ndim != 1 or scales.shape != offsets.shape:
    raise ValueError(f"gaam_weights: offsets and scales must both be [G], got {offsets.shape}, {scales.shape}")

  # sum_g a_g (z - mu - delta_g)^2 = A (z - mu)^2 - 2 (z - mu) S1 + S2 with a_g = 1 / (2 c_g^2),
  # A = sum a_g, S1 = sum a_g delta_g, S2 = sum a_g delta_g^2: the G Gaussians collapse to one
  # quadratic, so nothing of size [..., G] is formed (the causal form is [B, T, T, D] already).
  a = 1.0 / (2.0 * scales ** 2)
  big_a, s1, s2 = jnp.sum(a), jnp.sum(a * offsets), jnp.sum(a * offsets ** 2)
  log_norm = jnp.sum(0.5 * jnp.log(2 * math.pi * scales ** 2))

  def log_g(z, mu, var):
    d = z - mu
    return -(big_a * d * d - 2.0 * s1 * d + s2) / var - log_norm

  if segment_ids is not None:
    return _masked_weights(xf, log_g, eps, causal, segment_ids)
  if not causal:
    mu = jnp.mean(xf, axis=axis, keepdims=True)
    var = jnp.var(xf, axis=axis, keepdims=True, ddof=1 if x.shape[axis] > 1 else 0) + eps
    return jax.nn.softmax(log_g(xf, mu, var), axis=axis)
  if axis != 1 or x.ndim < 2:
    raise ValueError("gaam_weights: causal=True needs the time axis at axis=1")
  t = x.shape[1]
  cnt = jnp.arange(1, t + 1, dtype=jnp.float32).reshape((1, t) + (1,) * (x.ndim - 2))
  mu = jnp.cumsum(xf, axis=1) / cnt
  var = _unbiased(jnp.cumsum(xf * xf, axis=1) / cnt - mu ** 2, cnt) + eps
  # lg[:, t, s] = log G of x_s under the stats of prefix t; normalise over s <= t, keep s = t.
  lg = log_g(xf[:, None], mu[:, :, None], var[:, :, None])                 # [B, T, T, ...]
  tri = jnp.tril(jnp.ones((t, t), bool)).reshape((1, t, t) + (1,) * (x.ndim - 2))
  lse = jax.nn.logsumexp(jnp.where(tri, lg, -jnp.inf), axis=2)
  own = jnp.diagonal(lg, axis1=1, axis2=2)
  return jnp.exp(jnp.moveaxis(own, -1, 1) - lse)


def _unbiased(biased_var, cnt):
  """`var * n / (n - 1)` from the biased variance over `n = cnt` samples (0 where n = 1)."""
  return jnp.maximum(biased_var, 0.0) * cnt / jnp.maximum(cnt - 1.0, 1.0)


def _masked_weights(xf, log_g, eps, causal, segment_ids):
  """GAAM weights where position t's statistics and normaliser range over a visible set of s."""
  if xf.ndim < 2 or segment_ids.shape != xf.shape[:2]:
    raise ValueError(f"gaam_weights: segment_ids must be [B, T] = {xf.shape[:2]} with the time axis "
                     f"at axis=1, got {segment_ids.shape}")
  t = xf.shape[1]
  vis = segment_ids[:, :, None] == segment_ids[:, None, :]                 # [B, T(t), T(s)]
  if causal:
    vis &= jnp.tril(jnp.ones((t, t), bool))[None]
  vis = vis.reshape(vis.shape + (1,) * (xf.ndim - 2))
  m = vis.astype(jnp.float32)
  cnt = jnp.sum(m, axis=2)
  mu = jnp.sum(m * xf[:, None], axis=2) / cnt
  var = _unbiased(jnp.sum(m * (xf * xf)[:, None], axis=2) / cnt - mu ** 2, cnt) + eps
  lg = log_g(xf[:, None], mu[:, :, None], var[:, :, None])                 # [B, T, T, ...]
  lse = jax.nn.logsumexp(jnp.where(vis, lg, -jnp.inf), axis=2)
  own = jnp.diagonal(lg, axis1=1, axis2=2)
  return jnp.exp(jnp.moveaxis(own, -1, 1) - lse)


def gaussian_adaptive_attention(x, offsets, scales, *, axis: int = 1, eps: float = 1e-8,
                                causal: bool = False, segment_ids=None):
  """GAAM output `x * w` with `w = gaam_weights(x, ...)`; same shape and dtype as `x`."""
  return (x.astype(jnp.float32) * gaam_weights(x, offsets, scales, axis=axis, eps=eps,
                                               causal=causal, segment_ids=segment_ids)).astype(x.dtype)
