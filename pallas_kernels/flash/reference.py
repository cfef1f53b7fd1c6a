"""Dense plain-JAX reference for every score mode of the flash kernel (the tests' oracle).

`o = sum_j w_ij v_j` on `[B, T, H, D]` with an explicit boolean `mask [B|1, H|1, Tq, Tk]`,
`s = cap(q k^T * scale) - m_h |i' - j| + phi_q phi_k^T` (i' = i + Tk - Tq, bottom-right aligned),
`w = softmax` over the visible keys plus optional sinks (`exp(sink_h)` in the denominator), or
`w = sigmoid(s + b)` (FlashSigmoid, no normalisation, default `b = -log Tk`). Everything is computed in
float32; a row with no visible key gives zeros. Keys/values may have fewer heads (GQA, repeated).
The ALiBi bias is written explicitly here (not as extra columns) so that the kernel's in-tile ALiBi
and the FlashBias column trick are both checked against the plain definition.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def flash_reference(q, k, v, mask=None, *, softcap=None, sinks=None, alibi_slopes=None,
                    bias_factors=None, score_mode="softmax", sigmoid_bias=None, scale=None,
                    return_lse=False):
  b, tq, h, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  k = jnp.repeat(k, h // hk, axis=2).astype(jnp.float32)
  v = jnp.repeat(v, h // hk, axis=2).astype(jnp.float32)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k) * scale
  if softcap is not None:
    s = softcap * jnp.tanh(s / softcap)
  if alibi_slopes is not None:
    rel = jnp.arange(tk)[None, :] - (jnp.arange(tq)[:, None] + tk - tq)
    s = s - alibi_slopes[None, :, None, None] * jnp.abs(rel)[None, None]
  if bias_factors is not None:
    phi_q, phi_k = bias_factors
    phi_k = jnp.repeat(phi_k, h // hk, axis=2)
    s = s + jnp.einsum("bqhr,bkhr->bhqk", phi_q.astype(jnp.float32), phi_k.astype(jnp.float32))
  valid = jnp.ones((1, 1, tq, tk), bool) if mask is None else mask
  s = jnp.where(valid, s, -jnp.inf)
  if score_mode == "sigmoid":
    bias = -math.log(tk) if sigmoid_bias is None else sigmoid_bias
    w = jnp.where(valid, jax.nn.sigmoid(s + bias), 0.0)
    o = jnp.einsum("bhqk,bkhd->bqhd", w, v).astype(q.dtype)
    return (o, jnp.zeros((b, h, tq), jnp.float32)) if return_lse else o
  m = jnp.max(s, axis=-1, keepdims=True)
  if sinks is not None:
    m = jnp.maximum(m, sinks.astype(jnp.float32)[None, :, None, None])
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(valid, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  if sinks is not None:
    l = l + jnp.exp(sinks.astype(jnp.float32)[None, :, None, None] - m)
  o = jnp.einsum("bhqk,bkhd->bqhd", p / jnp.where(l == 0, 1.0, l), v).astype(q.dtype)
  if return_lse:
    lse = jnp.where(l == 0, -jnp.inf, jnp.log(jnp.where(l == 0, 1.0, l)) + m)[..., 0]
    return o, lse
  return o
