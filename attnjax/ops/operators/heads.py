"""Head mixers: differential / grouped differential attention (Lim et al. 2025, arXiv:2510.06949) and mixture-of-head attention (Jin et al. 2024, arXiv:2410.11842)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnjax.ops import softmax as softmax_lib
from attnjax.ops.operators import _common


def diff_lambda_init(layer_index: int) -> float:
  """DIFF Transformer schedule `lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1))`, `layer_index = l - 1 >= 0`."""
  if layer_index < 0:
    raise ValueError(f"layer_index must be >= 0 (0 = first layer), got {layer_index}")
  return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


def diff_lambda(lambda_q1, lambda_k1, lambda_q2, lambda_k2, lambda_init: float):
  """Re-parameterised `lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init` (vectors over the last axis)."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return (jnp.exp(jnp.sum(f32(lambda_q1) * f32(lambda_k1), -1))
          - jnp.exp(jnp.sum(f32(lambda_q2) * f32(lambda_k2), -1)) + lambda_init)


def differential_attention(q_signal, k_signal, q_noise, k_noise, v, lam, **attn_kwargs):
  """(Grouped) differential attention (Ye et al.; GDA (Lim et al. 2025, arXiv:2510.06949)): `o_h = (softmax(S1_h) - lam softmax(S2_g(h))) V_h`.

  `q_signal [B, Tq, Hs, D]`, `k_signal [B, Tk, Hs, D]` (or fewer kv heads, GQA), `q_noise [B, Tq, Hn, D]`,
  `k_noise [B, Tk, Hn, D]`, `v [B, Tk, Hs, Dv]` -> `[B, Tq, Hs, Dv]`. Signal head h uses the noise map
  of group `g(h) = h // (Hs / Hn)` (contiguous groups), so `Hs : Hn = 1 : 1` is the DIFF Transformer
  and `r : 1` is GDA's unbalanced split (3:1, 4:1 in the paper). `lam` is a scalar or `[Hs]`; `lam = 0`
  gives softmax attention and each row's mass is `1 - lam`. The per-head RMSNorm and the
  `(1 - lambda_init)` factor belong to the layer. Each map runs on `dot_product_attention`
  (`attn_kwargs`: masks, causal, segments, window, implementation); the noise map is applied to the
  group's values at once by folding the group's heads into the value dimension, so it costs Hn, not
  Hs, attention maps. Our first spec of (Lim et al. 2025, arXiv:2510.06949) was "from abstract + DIFF definition": the grouping follows the
  abstract (noise heads shared GQA-style by their signal heads).
  """
  name = "differential_attention"
  _common.check_qkv(name, q_signal, k_signal, v, same_v_heads=False)
  _common.check_qkv(name, q_noise, k_noise, k_noise)
  b, tq, hs, _ = q_signal.shape
  hn = q_noise.shape[2]
  if v.shape[2] != hs:
    raise ValueError(f"{name}: v must have Hs={hs} heads (one per signal head), got {v.shape}")
  if hs % hn:
    raise ValueError(f"{name}: signal heads Hs={hs} must be a multiple of noise heads Hn={hn}")
  if q_noise.shape[:2] != (b, tq) or k_noise.shape[:2] != k_signal.shape[:2]:
    raise ValueError(f"{name}: noise q/k {q_noise.shape}/{k_noise.shape} must match signal "
                     f"{q_signal.shape}/{k_signal.shape} in [B, T]")
  lam = jnp.asarray(lam, jnp.float32)
  if lam.ndim not in (0, 1) or (lam.ndim == 1 and lam.shape != (hs,)):
    raise ValueError(f"{name}: lam must be a scalar or [Hs={hs}], got shape {lam.shape}")
  ks = k_signal if k_signal.shape[2] == hs else _common.repeat_kv(k_signal, hs)
  o1 = softmax_lib.dot_product_attention(q_signal, ks, v, **attn_kwargs)
  rep, dv = hs // hn, v.shape[-1]
  v_grouped = v.reshape(*v.shape[:2], hn, rep * dv)
  o2 = softmax_lib.dot_product_attention(q_noise, k_noise, v_grouped, **attn_kwargs)
  o2 = o2.reshape(b, tq, hs, dv)
  lam_b = lam if lam.ndim == 0 else lam[None, None, :, None]
  return (o1.astype(jnp.float32) - lam_b * o2.astype(jnp.float32)).astype(q_signal.dtype)


def moh_router(shared_logits, routed_logits, branch_logits, top_k: int):
  """MoH gates from router logits (Jin et al. (Jin et al. 2024, arXiv:2410.11842)); returns `(gates [.., Hsh + Hr], topk_idx, aux_loss)`.

  `shared_logits [..., Hsh]` (`W_s x`), `routed_logits [..., Hr]` (`W_r x`), `branch_logits [..., 2]`
  (`W_h x`). `[a1, a2] = 2 softmax(W_h x)`; shared gates `a1 * Hsh * softmax(W_s x)`; routed gates
  `a2 * k * renorm_topk(softmax(W_r x))` (top-k of the routed softmax, renormalised over the k picked,
  zero elsewhere). The `2`, `Hsh` and `k` factors make every gate 1 on average at init, so all heads
  on with uniform routers is standard MHA. Load balance (switch style) over routed heads:
  `Hr * sum_i f_i P_i`, `f_i` = fraction of tokens picking head i, `P_i` = mean routed probability.
  Reading: Our first spec of (Jin et al. 2024, arXiv:2410.11842) was "from memory"; checked against the authors' code (SkyworkAI/MoH,
  `MoH-DiT/models.py`, `MoHAttention`): the gates (`2 softmax` branch weights, `Hsh softmax` shared,
  top-k of the routed softmax renormalised times k) are theirs. Their loss is
  `Hr^2 mean_i(P_i c_i)` with `c_i` the fraction of tokens picking head i, which is `top_k` times
  ours (we divide `c_i` by k so that balanced routing gives 1 whatever k; `aux_weight` absorbs it).
  """
  hr = routed_logits.shape[-1]
  hsh = shared_logits.shape[-1]
  if not 1 <= top_k <= hr:
    raise ValueError(f"moh_router: top_k must be in [1, {hr}] (routed heads), got {top_k}")
  if branch_logits.shape[-1] != 2:
    raise ValueError(f"moh_router: branch_logits must be [..., 2], got {branch_logits.shape}")
  f32 = lambda a: a.astype(jnp.float32)
  alpha = 2.0 * jax.nn.softmax(f32(branch_logits), axis=-1)
  p = jax.nn.softmax(f32(routed_logits), axis=-1)
  top_p, idx = jax.lax.top_k(p, top_k)
  picked = jnp.sum(jax.nn.one_hot(idx, hr, dtype=jnp.float32), axis=-2)        # [..., Hr]
  routed = picked * p
  routed = routed / jnp.maximum(jnp.sum(routed, -1, keepdims=True), 1e-9) * top_k
  routed = alpha[..., 1:2] * routed
  parts = [routed]
  if hsh:
    parts.insert(0, alpha[..., 0:1] * hsh * jax.nn.softmax(f32(shared_logits), axis=-1))
  gates = jnp.concatenate(parts, axis=-1)
  frac = jnp.mean(picked.reshape(-1, hr), axis=0) / top_k
  prob = jnp.mean(p.reshape(-1, hr), axis=0)
  aux = hr * jnp.sum(frac * prob)
  return gates, idx, aux


def mixture_of_heads_attention(q, k, v, gates, **attn_kwargs):
  """Dense MoH reference: `o_h = g_h * attn_h(q, k, v)`, `gates [B, Tq, H]`, returns `[B, Tq, H, Dv]`.

  Every head is computed (this is the oracle for `routed_heads_attention`); a zero gate zeroes the
  head's output and its gradient. `sum_h o_h W_O^h` is then the MoH output `sum_h g_h H_h W_O^h`.
  """
  _common.check_qkv("mixture_of_heads_attention", q, k, v)
  if gates.shape != q.shape[:3]:
    raise ValueError(f"mixture_of_heads_attention: gates must be [B, Tq, H] = {q.shape[:3]}, got {gates.shape}")
  o = softmax_lib.dot_product_attention(q, k, v, **attn_kwargs)
  return (o.astype(jnp.float32) * gates.astype(jnp.float32)[..., None]).astype(o.dtype)


def routed_heads_attention(q_sel, head_idx, k, v, *, mask=None, causal=False, window=None,
                           q_segment_ids=None, kv_segment_ids=None, scale=None):
  """Softmax attention for the selected heads only: `q_sel [B, Tq, K, D]`, `head_idx [B, Tq, K]` int.

  Slot j of token t attends with its query `q_sel[:, t, j]` over head `head_idx[:, t, j]`'s keys and
  values (`k, v [B, Tk, H, D]`, all heads: any later token may pick any head). Returns the selected
  heads' outputs `[B, Tq, K, Dv]`; the quadratic part costs K / H of dense MHA (heads a token did not
  pick are never scored). Keys are gathered per (token, slot): memory `B Tq K Tk D`, fine for the
  sizes we train here; a capacity-based dispatch would bound it at scale.
  """
  b, tq, kk, d = q_sel.shape
  if head_idx.shape != (b, tq, kk):
    raise ValueError(f"routed_heads_attention: head_idx must be [B, Tq, K] = {(b, tq, kk)}, got {head_idx.shape}")
  if k.ndim != 4 or k.shape[-1] != d or v.shape[:3] != k.shape[:3]:
    raise ValueError(f"routed_heads_attention: k, v must be [B, Tk, H, D], got {k.shape}, {v.shape}")
  tk = k.shape[1]
  scale = d ** -0.5 if scale is None else scale
  bi = jnp.arange(b)[:, None, None]
  kh = jnp.swapaxes(k, 1, 2)[bi, head_idx]                       # [B, Tq, K, Tk, D]
  vh = jnp.swapaxes(v, 1, 2)[bi, head_idx]
  s = jnp.einsum("bqjd,bqjkd->bjqk", q_sel, kh, preferred_element_type=jnp.float32) * scale
  valid = _common.visibility(tq, tk, mask=mask, causal=causal, window=window,
                             q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
  p = _common.masked_softmax(s, jnp.broadcast_to(valid[:, :1], s.shape))
  o = jnp.einsum("bjqk,bqjkd->bqjd", p, vh.astype(jnp.float32))
  return o.astype(q_sel.dtype)
