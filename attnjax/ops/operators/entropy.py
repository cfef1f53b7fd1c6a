"""Attention entropy per head, and the entropy regulariser of Entropy-Guided Attention (Jha & Reagen 2025, arXiv:2501.03489).

Per-head entropy of ANY softmax-family operator: `head_entropy(attn_fn, q, k, **kw)` reads the
operator's weights with `probe_attention_weights` (values = one-hot key indicators, so the output
is the weight matrix itself) and reduces them with `attention_entropy`. This covers every operator
that is linear in V, `o_i = sum_j A_ij v_j`: the softmax engine (`dot_product_attention`, any
implementation, with ALiBi / bias / sinks / windows), sigmoid, LSSA / LSSAR, affine-scaled,
head-wise gated, differential, MoH, FlashBias, DHA, relative, GPSA, MODA, reversed, hierarchical.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from attnjax.ops.operators import _common


def softmax_attention_weights(q, k, *, mask=None, causal=False, window=None, q_segment_ids=None,
                              kv_segment_ids=None, scale=None, bias=None):
  """Dense softmax weights `[B, H, Tq, Tk]` float32 (fully hidden rows are zeros)."""
  _common.check_qkv("softmax_attention_weights", q, k, k)
  s = _common.scores(q, k, scale=scale)
  if bias is not None:
    s = s + bias
  valid = _common.visibility(q.shape[1], k.shape[1], mask=mask, causal=causal, window=window,
                             q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
  return _common.masked_softmax(s, jnp.broadcast_to(valid, s.shape))


def probe_attention_weights(attn_fn, q, k, *, num_v_heads: int | None = None, **attn_kwargs):
  """The weights `A [B, H, Tq, Tk]` float32 of an operator that is linear in its values.

  Calls `attn_fn(q, k, v, **attn_kwargs)` with `v [B, Tk, Hv, Tk]` = the identity over keys
  (`v_j = e_j`, `Hv = num_v_heads`, default `k`'s head count), so output row i of head h is
  `sum_j A_hij e_j = A_hi`. Exact (no sampling), in float32 when q and k are float32; costs one
  call with `Dv = Tk`, i.e. the memory of the dense weights. For operators whose value argument
  is not the third positional one, wrap them (`lambda q, k, v, **kw: op(q, k, q2, k2, v, lam)`).
  """
  if q.ndim != 4 or k.ndim != 4:
    raise ValueError(f"probe_attention_weights: q and k must be [B, T, H, D], got {q.shape}, {k.shape}")
  b, tk = k.shape[0], k.shape[1]
  hv = k.shape[2] if num_v_heads is None else num_v_heads
  eye = jnp.eye(tk, dtype=jnp.result_type(q.dtype, jnp.float32))
  v = jnp.broadcast_to(eye[None, :, None, :], (b, tk, hv, tk))
  out = attn_fn(q, k, v, **attn_kwargs)
  if out.ndim != 4 or out.shape[0] != b or out.shape[-1] != tk:
    raise ValueError(f"probe_attention_weights: attn_fn returned {out.shape}; expected [B={b}, Tq, H, "
                     f"Tk={tk}] (is the operator linear in v, with v as its third argument?)")
  return jnp.transpose(out.astype(jnp.float32), (0, 2, 1, 3))


def head_entropy(attn_fn, q, k, *, reduce: bool = True, num_v_heads: int | None = None,
                 **attn_kwargs):
  """Per-head attention entropy of any operator linear in V (see `probe_attention_weights`).

  `attention_entropy(probe_attention_weights(attn_fn, q, k, **attn_kwargs), reduce=reduce)`:
  `[H]` (mean over batch and visible query rows) or `[B, H, Tq]`. For operators with signed
  weights (differential attention) the entropy of `|A|` renormalised is reported.
  """
  w = probe_attention_weights(attn_fn, q, k, num_v_heads=num_v_heads, **attn_kwargs)
  return attention_entropy(jnp.abs(w), reduce=reduce)


def attention_entropy(weights, *, reduce: bool = True):
  """Shannon entropy of attention rows, `H_i = -sum_j A_ij log A_ij` (nats).

  `weights [B, H, Tq, Tk]` from any weight function (`softmax_attention_weights`,
  `sigmoid_attention_weights`, `lssa_weights`, ...). Rows are renormalised first, so unnormalised
  families (sigmoid, affine) get the entropy of their weight distribution; all-zero rows (fully
  masked) count as entropy 0 and are left out of the mean. `reduce=True` returns the per-head mean
  over batch and queries `[H]` (the head entropy of [34]); otherwise `[B, H, Tq]`.
  """
  if weights.ndim != 4:
    raise ValueError(f"attention_entropy: weights must be [B, H, Tq, Tk], got {weights.shape}")
  w = weights.astype(jnp.float32)
  mass = jnp.sum(w, axis=-1, keepdims=True)
  p = w / jnp.where(mass > 0, mass, 1.0)
  ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
  if not reduce:
    return ent
  live = (mass[..., 0] > 0).astype(jnp.float32)
  return jnp.sum(ent * live, axis=(0, 2)) / jnp.maximum(jnp.sum(live, axis=(0, 2)), 1.0)


def entropy_regularizer(head_entropy, theta, seq_len: int, *, lam: float = 1e-5,
                        gamma: float = 0.2):
  """Entropy-band regulariser (Jha & Reagen (Jha & Reagen 2025, arXiv:2501.03489)): `lam * mean_{l,h} max(0, |H_lh - theta_lh| - gamma H_max)^2`.

  `head_entropy` and `theta` (learnable per-head targets) have the same shape (`[H]` or `[L, H]`);
  `H_max = log(seq_len)`. Zero while every head's entropy stays within `gamma H_max` of its target.
  Paper defaults `lam = 1e-5`, `gamma = 0.2`. Reading: our first spec of (Jha & Reagen 2025, arXiv:2501.03489) was "partly from code, formula verify";
  we follow the formula as we transcribed it.
  """
  head_entropy = jnp.asarray(head_entropy, jnp.float32)
  theta = jnp.asarray(theta, jnp.float32)
  if head_entropy.shape != theta.shape:
    raise ValueError(f"entropy_regularizer: theta must have the entropy's shape {head_entropy.shape}, "
                     f"got {theta.shape}")
  if seq_len < 2:
    raise ValueError(f"entropy_regularizer: seq_len must be >= 2, got {seq_len}")
  excess = jnp.maximum(jnp.abs(head_entropy - theta) - gamma * math.log(seq_len), 0.0)
  return lam * jnp.mean(excess ** 2)
