"""FlashBias (Wu et al. 2025, arXiv:2505.12044): an additive attention bias given as low-rank factors, folded into extra q/k columns."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.ops import softmax as softmax_lib
from attnjax.ops.operators import _common


def alibi_factors(slopes, tq: int, tk: int | None = None):
  """Exact rank-2 factors of the causal ALiBi bias `b_hij = -m_h (i' - j)`, `i' = i + Tk - Tq`.

  Returns `phi_q [Tq, H, 2] = [i', 1]` and `phi_k [Tk, H, 2] = [-m_h, m_h j]`, so that
  `phi_q[i] . phi_k[j] = -m_h (i' - j)` (bottom-right aligned like the causal mask). Under a causal
  mask this is ALiBi; the symmetric non-causal form `-m |i - j|` is not low rank (use
  `lowrank_bias_factors`).
  """
  tk = tq if tk is None else tk
  slopes = jnp.asarray(slopes, jnp.float32)
  if slopes.ndim != 1:
    raise ValueError(f"alibi_factors: slopes must be [H], got shape {slopes.shape}")
  h = slopes.shape[0]
  qi = (jnp.arange(tq) + (tk - tq)).astype(jnp.float32)
  kj = jnp.arange(tk, dtype=jnp.float32)
  phi_q = jnp.stack([jnp.broadcast_to(qi[:, None], (tq, h)), jnp.ones((tq, h))], axis=-1)
  phi_k = jnp.stack([jnp.broadcast_to(-slopes, (tk, h)), slopes[None, :] * kj[:, None]], axis=-1)
  return phi_q, phi_k


def alibi_key_factors(slopes, tq: int, tk: int | None = None):
  """Rank-1 factors of causal ALiBi up to a per-row constant: `phi_q [Tq, H, 1] = 1`, `phi_k [Tk, H, 1] = m_h j`.

  `-m_h (i' - j) = -m_h i' + m_h j`; the first term is the same for every key of row i, and softmax
  ignores per-row constants, so attention with these factors equals ALiBi exactly (in exact
  arithmetic) without knowing the query positions: it stays right under KV-cache padding and
  packed sequences, where `alibi_factors`' bottom-right `i'` would not. Logits grow like `m_h Tk`
  (float32 keeps ~1e-4 absolute accuracy at Tk ~ 2k); for long contexts prefer `alibi_factors`.
  """
  tk = tq if tk is None else tk
  slopes = jnp.asarray(slopes, jnp.float32)
  if slopes.ndim != 1:
    raise ValueError(f"alibi_key_factors: slopes must be [H], got shape {slopes.shape}")
  h = slopes.shape[0]
  phi_q = jnp.ones((tq, h, 1), jnp.float32)
  phi_k = (jnp.arange(tk, dtype=jnp.float32)[:, None] * slopes[None, :])[..., None]
  return phi_q, phi_k


def lowrank_bias_factors(bias, rank: int):
  """Truncated-SVD factors of a dense bias: `bias [Tq, Tk]` or `[H, Tq, Tk]` -> `(phi_q, phi_k, rel_err)`.

  `phi_q [Tq, H, R] = U_R sqrt(S_R)`, `phi_k [Tk, H, R] = V_R sqrt(S_R)` (per head), and `rel_err [H]`
  `= ||B - phi_q phi_k^T||_F / ||B||_F` (0 when R >= rank(B); the Eckart-Young optimum otherwise),
  which callers should report next to any result that uses the approximation.
  """
  bias = jnp.asarray(bias, jnp.float32)
  if bias.ndim == 2:
    bias = bias[None]
  if bias.ndim != 3:
    raise ValueError(f"lowrank_bias_factors: bias must be [Tq, Tk] or [H, Tq, Tk], got {bias.shape}")
  if not 1 <= rank <= min(bias.shape[1:]):
    raise ValueError(f"lowrank_bias_factors: rank must be in [1, {min(bias.shape[1:])}], got {rank}")
  u, s, vt = jnp.linalg.svd(bias, full_matrices=False)
  root = jnp.sqrt(s[:, :rank])
  phi_q = u[:, :, :rank] * root[:, None, :]                   # [H, Tq, R]
  phi_k = jnp.swapaxes(vt[:, :rank, :], 1, 2) * root[:, None, :]
  approx = jnp.einsum("hqr,hkr->hqk", phi_q, phi_k)
  norm = jnp.sqrt(jnp.sum(bias ** 2, axis=(1, 2)))
  rel_err = jnp.sqrt(jnp.sum((bias - approx) ** 2, axis=(1, 2))) / jnp.where(norm == 0, 1.0, norm)
  return jnp.swapaxes(phi_q, 0, 1), jnp.swapaxes(phi_k, 0, 1), rel_err


def _batch(phi, b, name, arg, t, h):
  if phi.ndim == 3:
    phi = jnp.broadcast_to(phi[None], (b, *phi.shape))
  if phi.ndim != 4 or phi.shape[:3] != (b, t, h):
    raise ValueError(f"{name}: {arg} must be [T={t}, H={h}, R] or [B={b}, T, H, R], got {phi.shape}")
  return phi


def flashbias_attention(q, k, v, phi_q, phi_k, *, scale=None, **attn_kwargs):
  """Softmax attention with bias `B = phi_q phi_k^T`, computed as plain attention on `[q, phi_q/s] . [k, phi_k]`.

  FlashBias (Wu et al. (Wu et al. 2025, arXiv:2505.12044)): `softmax(q.k s + phi_q[i] . phi_k[j]) V` equals the plain engine on
  the concatenated features, with the original scale `s = D ** -0.5` passed explicitly (so the extra
  R columns carry the bias with weight exactly 1). `q [B, Tq, H, D]`, `k, v [B, Tk, Hk, .]` (GQA kv is
  repeated, since the bias is per query head), `phi_q [Tq|B,Tq, H, R]`, `phi_k [Tk|B,Tk, H, R]`.
  Exact for low-rank biases (causal ALiBi: `alibi_factors`); a dense bias goes through
  `lowrank_bias_factors` with its reported error. Features are concatenated in the promoted dtype of
  q and the factors: keep factors in float32 when q is bf16, because position-sized entries lose
  bits in bf16. `attn_kwargs` (masks, causal, implementation, ...) go to `dot_product_attention`.
  """
  name = "flashbias_attention"
  _common.check_qkv(name, q, k, v)
  b, tq, h, d = q.shape
  tk = k.shape[1]
  phi_q = _batch(jnp.asarray(phi_q), b, name, "phi_q", tq, h)
  phi_k = _batch(jnp.asarray(phi_k), b, name, "phi_k", tk, h)
  if phi_q.shape[-1] != phi_k.shape[-1]:
    raise ValueError(f"{name}: phi_q and phi_k ranks differ: {phi_q.shape[-1]} vs {phi_k.shape[-1]}")
  scale = d ** -0.5 if scale is None else scale
  ct = jnp.result_type(q.dtype, phi_q.dtype)
  q2 = jnp.concatenate([q.astype(ct), (phi_q / scale).astype(ct)], axis=-1)
  k2 = jnp.concatenate([_common.repeat_kv(k, h).astype(ct), phi_k.astype(ct)], axis=-1)
  o = softmax_lib.dot_product_attention(q2, k2, _common.repeat_kv(v, h), scale=scale, **attn_kwargs)
  return o.astype(q.dtype)
