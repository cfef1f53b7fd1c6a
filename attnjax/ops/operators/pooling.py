"""Attention pooling: efficient attentive probing, EP (Psomas et al. 2025, arXiv:2506.10178), and low-rank factorised MHSA, LAMA (Mehta et al. 2019, arXiv:1912.00835).

Both are poolers, not sequence mixers: they map a set of tokens `[B, N, C]` to ONE vector per
example (`[B, C']`), with queries that are learned constants (EP) or the sequence's global context
(LAMA), so there is no `[B, T, d_model] -> [B, T, d_model]` mixer to register, and the CAB patterns
do not apply (no per-token queries: causal and cross are undefined). Use them as a classification
head on the tokens of any backbone (`attnjax.nn.operators.EfficientProbe`, `LowRankAttentionPooling`),
e.g. on `ViT` patch tokens for attentive probing of a frozen encoder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.ops.operators import _common


def _token_valid(mask, b, n):
  if mask is None:
    return jnp.ones((b, n), bool)
  if mask.shape != (b, n):
    raise ValueError(f"mask must be [B, N] = {(b, n)}, got {mask.shape}")
  return mask.astype(bool)


def efficient_probe(x, queries, w_v, *, mask=None):
  """Efficient probing (Psomas et al., EP (Psomas et al. 2025, arXiv:2506.10178)): M learnable queries over raw tokens, one value chunk each.

  `x [B, N, C]` tokens (keys are the tokens themselves, no K projection), `queries [M, C]`,
  `w_v [C, C']` (C' = C / d_out, divisible by M). `A = softmax_N(Q x^T / sqrt(C))` `[B, M, N]`,
  `V = x W_v` split into M chunks of C'/M channels; output `concat_m A_m V^(m)` `[B, C']`.
  Permutation-invariant over tokens; if all tokens are equal the output is `x W_v`. `mask [B, N]`
  hides padding tokens (a fully masked example gives zeros). Defaults in the paper: M = 32,
  d_out = 1, no qkv bias, queries init N(0, 0.02). Checked against the authors' code
  (billpsomas/efficient-probing, `poolings/ep.py`, one head): keys are the raw tokens scaled by
  `C ** -0.5`, value chunk m (channels `m C'/M .. (m+1) C'/M`) is read by query m only.
  """
  if x.ndim != 3:
    raise ValueError(f"efficient_probe: x must be [B, N, C], got {x.shape}")
  b, n, c = x.shape
  m = queries.shape[0]
  if queries.shape != (m, c) or w_v.ndim != 2 or w_v.shape[0] != c or w_v.shape[1] % m:
    raise ValueError(f"efficient_probe: queries must be [M, C={c}] and w_v [C, C'] with C' % M == 0, "
                     f"got {queries.shape}, {w_v.shape}")
  s = jnp.einsum("mc,bnc->bmn", queries, x, preferred_element_type=jnp.float32) * c ** -0.5
  valid = _token_valid(mask, b, n)[:, None, :]
  a = _common.masked_softmax(s, jnp.broadcast_to(valid, s.shape))
  vals = (x @ w_v).reshape(b, n, m, -1).astype(jnp.float32)
  return jnp.einsum("bmn,bnmc->bmc", a, vals).reshape(b, -1).astype(x.dtype)


def lama_pool(h, u, v, p, *, mask=None):
  """LAMA (Mehta et al. (Mehta et al. 2019, arXiv:1912.00835)) pooling: K heads of low-rank bilinear attention against the global context.

  `h [B, N, D]` (token states; the paper's BiGRU outputs, computed by the caller), `u, v [D, r]`
  shared by the heads, `p [K, r]` per-head vectors. `c = mean_i h_i` (over unmasked tokens),
  `s_ki = p_k . (U^T h_i * V^T c)`, `a_k = softmax_i(s_k)`, `m_k = sum_i a_ki h_i`; returns
  `(concat_k m_k [B, K * D], a [B, K, N])`. Each `a_k` sums to 1 and the output is invariant to
  permuting tokens; `mask [B, N]` hides padding (from the context mean and the softmax). Our first spec of (Mehta et al. 2019, arXiv:1912.00835)
  was "from abstract + memory": the abstract confirms the two ingredients (a low-rank factorised
  affinity giving all heads' distributions from shared U, V, and scores that query a global
  context vector instead of every word); the exact bilinear form is our reading.
  """
  if h.ndim != 3:
    raise ValueError(f"lama_pool: h must be [B, N, D], got {h.shape}")
  b, n, d = h.shape
  r = u.shape[-1]
  if u.shape != (d, r) or v.shape != (d, r) or p.ndim != 2 or p.shape[1] != r:
    raise ValueError(f"lama_pool: u, v must be [D={d}, r] and p [K, r], got {u.shape}, {v.shape}, {p.shape}")
  valid = _token_valid(mask, b, n)
  hf = h.astype(jnp.float32)
  cnt = jnp.maximum(jnp.sum(valid, -1, keepdims=True), 1).astype(jnp.float32)
  c = jnp.sum(jnp.where(valid[..., None], hf, 0.0), axis=1) / cnt            # [B, D]
  feat = (hf @ u) * (c @ v)[:, None, :]                                     # [B, N, r]
  s = jnp.einsum("bnr,kr->bkn", feat, p.astype(jnp.float32))
  a = _common.masked_softmax(s, jnp.broadcast_to(valid[:, None, :], s.shape))
  pooled = jnp.einsum("bkn,bnd->bkd", a, hf)
  return pooled.reshape(b, -1).astype(h.dtype), a
