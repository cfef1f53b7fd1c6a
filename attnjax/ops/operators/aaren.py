"""Aaren (Feng et al. 2024, arXiv:2405.13956): attention as an RNN. Softmax attention of a learned query, as a prefix scan and as a step."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnjax.ops.operators import _common


class AarenState(NamedTuple):
  """Running `(m, u, w)`: max logit `[B, H]`, normaliser `[B, H]`, weighted value sum `[B, H, Dv]`."""
  m: jax.Array
  u: jax.Array
  w: jax.Array


def _logits(query, k, scale):
  b, t, h, d = k.shape
  if query.shape == (h, d):
    query = jnp.broadcast_to(query, (b, h, d))
  if query.shape != (b, h, d):
    raise ValueError(f"aaren: query must be [H, D] = {(h, d)} or [B, H, D], got {query.shape}")
  scale = d ** -0.5 if scale is None else scale
  return jnp.einsum("bhd,bthd->bth", query, k, preferred_element_type=jnp.float32) * scale


def _combine(a, b):
  # (m, u, w, start): standard log-sum-exp merge; `start` makes the scan segmented (a segment start
  # on the right discards everything on the left), which keeps the operator associative.
  ma, ua, wa, fa = a
  mb, ub, wb, fb = b
  m = jnp.maximum(ma, mb)
  ea, eb = jnp.exp(ma - m), jnp.exp(mb - m)
  u = ua * ea + ub * eb
  w = wa * ea[..., None] + wb * eb[..., None]
  m = jnp.where(fb, mb, m)
  u = jnp.where(fb, ub, u)
  w = jnp.where(fb[..., None], wb, w)
  return m, u, w, fa | fb


def aaren_attention(query, k, v, *, causal=True, segment_ids=None, scale=None,
                    return_state=False):
  """Aaren (Feng et al. (Feng et al. 2024, arXiv:2405.13956)): `o_t = sum_{j<=t} softmax_j(s_j) v_j`, `s_j = query . k_j * scale`.

  `query [H, D]` (learned, one per head) or `[B, H, D]`; `k [B, T, H, D]`, `v [B, T, H, Dv]` ->
  `[B, T, H, Dv]`. Causal: a parallel prefix scan (`jax.lax.associative_scan`) over
  `(m, u, w)` with `m = max(m_a, m_b)`, `u = u_a e^(m_a - m) + u_b e^(m_b - m)`,
  `w = w_a e^(m_a - m) + w_b e^(m_b - m)`, `o = w / u`; equal to causal softmax attention of the
  learned query, in any scan-tree order. Non-causal: every position gets the full softmax over its
  segment. `segment_ids [B, T]` restart the prefix at segment boundaries. Cross attention is not
  defined (the keys are the tokens whose prefix the RNN reads). With `return_state=True` also
  returns the final `AarenState` for `aaren_step` (no segments).
  """
  if k.ndim != 4 or v.ndim != 4 or k.shape[:3] != v.shape[:3]:
    raise ValueError(f"aaren: k, v must be [B, T, H, D] with equal [B, T, H], got {k.shape}, {v.shape}")
  s = _logits(query, k, scale)                                   # [B, T, H]
  b, t, h = s.shape
  vf = v.astype(jnp.float32)
  if not causal:
    valid = jnp.ones((b, 1, t, t), bool) if segment_ids is None else \
        (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    p = _common.masked_softmax(jnp.broadcast_to(jnp.swapaxes(s, 1, 2)[:, :, None, :], (b, h, t, t)),
                               jnp.broadcast_to(valid, (b, h, t, t)))
    return _common.apply_weights(p, v, v.dtype)
  if segment_ids is None:
    start = jnp.zeros((b, t, h), bool).at[:, 0].set(True)
  else:
    if segment_ids.shape != (b, t):
      raise ValueError(f"aaren: segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
    prev = jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :t]
    start = jnp.broadcast_to((prev != segment_ids)[..., None], (b, t, h))
  m, u, w, _ = jax.lax.associative_scan(_combine, (s, jnp.ones_like(s), vf, start), axis=1)
  o = (w / u[..., None]).astype(v.dtype)
  if return_state:
    return o, AarenState(m[:, -1], u[:, -1], w[:, -1])
  return o


def aaren_init_state(batch: int, num_heads: int, value_dim: int) -> AarenState:
  """The empty prefix: `m = -inf, u = 0, w = 0` (the first step then gives `o = v_1`)."""
  return AarenState(jnp.full((batch, num_heads), -jnp.inf, jnp.float32),
                    jnp.zeros((batch, num_heads), jnp.float32),
                    jnp.zeros((batch, num_heads, value_dim), jnp.float32))


def aaren_step(state: AarenState, query, k_t, v_t, *, scale=None):
  """One O(1)-memory RNN step: `k_t [B, H, D]`, `v_t [B, H, Dv]` -> `(new_state, o_t [B, H, Dv])`."""
  s = _logits(query, k_t[:, None], scale)[:, 0]                  # [B, H]
  m = jnp.maximum(state.m, s)
  ea, eb = jnp.exp(state.m - m), jnp.exp(s - m)
  u = state.u * ea + eb
  w = state.w * ea[..., None] + v_t.astype(jnp.float32) * eb[..., None]
  return AarenState(m, u, w), (w / u[..., None]).astype(v_t.dtype)
