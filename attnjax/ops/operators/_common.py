"""Shared pieces for the attention operators: input checks, score matrices and visibility masks.

Every operator here works on `q: [B, Tq, H, D]`, `k: [B, Tk, Hk, D]`, `v: [B, Tk, Hk, Dv]` (Hk divides
H, GQA) and builds the same boolean visibility `[B|1, H|1, Tq, Tk]` from `mask`, `causal` (bottom-right
aligned when Tq != Tk, as in `attnjax.ops.masks`), `window` and segment ids, so that the four CAB
patterns (non-causal / causal x self / cross) mean the same thing in every operator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.cab import PatternUndefinedError  # noqa: F401  (re-exported: operators raise it)
from attnjax.ops import masks as masks_lib


def check_qkv(name: str, q, k, v, *, same_v_heads: bool = True) -> None:
  """Raises ValueError unless q, k, v are `[B, Tq, H, D]`, `[B, Tk, Hk, D]`, `[B, Tk, Hk, Dv]`."""
  for arg, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name}: {arg} must be [B, T, H, D], got shape {x.shape}")
  if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0]:
    raise ValueError(f"{name}: k {k.shape} and v {v.shape} must share [B, Tk] with q {q.shape}")
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(f"{name}: q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"{name}: q heads {q.shape[2]} must be a multiple of k heads {k.shape[2]}")
  if same_v_heads and v.shape[2] != k.shape[2]:
    raise ValueError(f"{name}: v heads {v.shape[2]} must equal k heads {k.shape[2]}")


def repeat_kv(x: jax.Array, num_heads: int) -> jax.Array:
  """`[B, T, Hk, D] -> [B, T, H, D]` by repeating each kv head H / Hk times (GQA)."""
  rep = num_heads // x.shape[2]
  return x if rep == 1 else jnp.repeat(x, rep, axis=2)


def scores(q, k, *, scale=None) -> jax.Array:
  """`[B, H, Tq, Tk]` float32 logits `q.k * scale` (scale defaults to D ** -0.5)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  k = repeat_kv(k, q.shape[2])
  return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale


def visibility(tq: int, tk: int, *, mask=None, causal: bool = False, window=None,
               q_segment_ids=None, kv_segment_ids=None) -> jax.Array:
  """Boolean `[B|1, H|1, Tq, Tk]`: True where query i may attend to key j."""
  valid = jnp.ones((1, 1, tq, tk), bool)
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    if mask.ndim == 2:
      mask = mask[None, None]
    elif mask.ndim == 3:
      mask = mask[:, None]
    if mask.shape[-2:] != (tq, tk) and mask.shape[-2:] != (1, tk):
      raise ValueError(f"mask must broadcast to [B, H, Tq={tq}, Tk={tk}], got {mask.shape}")
    valid = valid & mask
  if causal:
    valid = valid & masks_lib.causal_mask(tq, tk)
  if window is not None:
    valid = valid & masks_lib.window_mask(tq, tk, *window)
  if (q_segment_ids is None) != (kv_segment_ids is None) and tq != tk:
    raise ValueError("q_segment_ids and kv_segment_ids must be given together for cross attention")
  if q_segment_ids is not None:
    valid = valid & masks_lib.segment_mask(q_segment_ids, kv_segment_ids)[:, None]
  return valid


def masked_softmax(s: jax.Array, valid: jax.Array, axis: int = -1) -> jax.Array:
  """Softmax of float32 logits over `axis` restricted to `valid`; an all-hidden slice gives zeros."""
  s = jnp.where(valid, s, -jnp.inf)
  m = jnp.max(s, axis=axis, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(valid, jnp.exp(s - m), 0.0)
  denom = jnp.sum(p, axis=axis, keepdims=True)
  return p / jnp.where(denom == 0, 1.0, denom)


def apply_weights(w: jax.Array, v: jax.Array, out_dtype) -> jax.Array:
  """`o[b,q,h] = sum_k w[b,h,q,k] v[b,k,h]` in float32, with GQA repetition of v."""
  v = repeat_kv(v, w.shape[1])
  return jnp.einsum("bhqk,bkhd->bqhd", w, v.astype(jnp.float32)).astype(out_dtype)


def per_head(x, num_heads: int, name: str, arg: str):
  """Broadcasts a scalar or `[H]` parameter to `[1, H, 1, 1]` float32 (ValueError otherwise)."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 0:
    return x.reshape(1, 1, 1, 1)
  if x.shape != (num_heads,):
    raise ValueError(f"{name}: {arg} must be a scalar or [H={num_heads}], got shape {x.shape}")
  return x.reshape(1, num_heads, 1, 1)
