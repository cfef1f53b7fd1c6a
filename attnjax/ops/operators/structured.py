"""Reversed attention (Ding et al. 2023, arXiv:2304.03282), GPSA (d'Ascoli et al. 2021, arXiv:2103.10697), decoupled-head attention (Chen et al. 2024, arXiv:2406.06567), relative-conv scores (Sugiharto et al. 2023, arXiv:2308.03429),
hierarchical (Amizadeh et al. 2025, arXiv:2509.15448) and modality-duplex (Zhang et al. 2025, arXiv:2507.04635) attention, on `[B, T, H, D]`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnjax.ops import softmax as softmax_lib
from attnjax.ops.operators import _common


# ---------------------------------------------------------------------------------------------
# Reversed attention (DependencyViT (Ding et al. 2023, arXiv:2304.03282)).


def reversed_attention_weights(q, k, *, mask=None, q_segment_ids=None, kv_segment_ids=None,
                               scale=None, causal=False):
  """Weights normalised over queries: `A_ij = exp(S_ij) / sum_i' exp(S_i'j)`, `[B, H, Tq, Tk]`."""
  if causal:
    raise _common.PatternUndefinedError("reversed_attention: the causal pattern is undefined: each key's weights are "
                     "normalised over all queries, so causal outputs would depend on later queries")
  _common.check_qkv("reversed_attention", q, k, k)
  s = _common.scores(q, k, scale=scale)
  valid = _common.visibility(q.shape[1], k.shape[1], mask=mask, q_segment_ids=q_segment_ids,
                             kv_segment_ids=kv_segment_ids)
  return _common.masked_softmax(s, jnp.broadcast_to(valid, s.shape), axis=-2)


def reversed_attention(q, k, v, *, message=None, mask=None, q_segment_ids=None,
                       kv_segment_ids=None, scale=None, causal=False):
  """Reversed attention (Ding et al., DependencyViT (Ding et al. 2023, arXiv:2304.03282)): `o_i = sum_j A_ij m_j v_j`.

  `A` is softmax over queries (each child token j distributes itself over parents i; columns sum
  to 1) and `message [B, Tk, H]` in [0, 1] (the message controller `sigmoid(w . x_j)`; default 1)
  scales what token j sends. `q [B, Tq, H, D]`, `k [B, Tk, Hk, D]`, `v [B, Tk, Hk, Dv]` ->
  `[B, Tq, H, Dv]`. With `m = 1` and no mask, `sum_i o_i = sum_j v_j`. Non-causal self and cross
  are defined; causal raises (normalising over queries would read future queries). A fully hidden
  key column sends nothing. Our first spec of (Ding et al. 2023, arXiv:2304.03282) was "from memory": column softmax + message gate.
  """
  w = reversed_attention_weights(q, k, mask=mask, q_segment_ids=q_segment_ids,
                                 kv_segment_ids=kv_segment_ids, scale=scale, causal=causal)
  if message is not None:
    b, tk, h = q.shape[0], k.shape[1], q.shape[2]
    if message.shape != (b, tk, h):
      raise ValueError(f"reversed_attention: message must be [B, Tk, H] = {(b, tk, h)}, got {message.shape}")
    w = w * jnp.swapaxes(message.astype(jnp.float32), 1, 2)[:, :, None, :]
  return _common.apply_weights(w, v, q.dtype)


# ---------------------------------------------------------------------------------------------
# ConViT gated positional self-attention (d'Ascoli et al. 2021, arXiv:2103.10697).


def grid_offsets(grid_h: int, grid_w: int):
  """`r [N, N, 3] = (|delta|^2, delta_x, delta_y)`, `delta = pos_j - pos_i`, row-major N = h * w."""
  ys, xs = jnp.meshgrid(jnp.arange(grid_h), jnp.arange(grid_w), indexing="ij")
  pos = jnp.stack([xs.ravel(), ys.ravel()], -1).astype(jnp.float32)
  delta = pos[None, :, :] - pos[:, None, :]
  return jnp.concatenate([jnp.sum(delta ** 2, -1, keepdims=True), delta], -1)


def gpsa_local_init(num_heads: int, locality_strength: float = 1.0):
  """ConViT's `local_init` (facebookresearch/convit `convit.py`): `v_h = -alpha (1, -2 Delta_hx, -2 Delta_hy)`.

  Then `v_h . r_ij = -alpha |delta - Delta_h|^2 + const`, peaked at offset `Delta_h`. The centres
  sit on a `k x k` grid, `k = floor(sqrt(H))`, around `c = (k - 1) / 2` (half-integer offsets for
  even k, so 4 heads look at the four diagonal half-steps) or `k // 2` (odd k); head
  `h = h1 + k h2` has `Delta_h = (h2 - c, h1 - c)` as `(x, y)`. `[H, 3]` for `grid_offsets`'
  `(|delta|^2, delta_x, delta_y)`. Heads past `k^2` (H not a square) keep the authors' generic
  init there (a small random weight); here they get 0, a uniform positional softmax.
  """
  k = math.isqrt(num_heads)
  c = (k - 1) / 2
  w = [[0.0, 0.0, 0.0] for _ in range(num_heads)]
  for h1 in range(k):
    for h2 in range(k):
      w[h1 + k * h2] = [-1.0, 2.0 * (h2 - c), 2.0 * (h1 - c)]
  return locality_strength * jnp.asarray(w, jnp.float32)


def gpsa_attention(q, k, v, pos_weights, gate_logits, *, grid, mask=None, causal=False, scale=None):
  """Gated positional self-attention (d'Ascoli et al., ConViT (d'Ascoli et al. 2021, arXiv:2103.10697)).

  `A_h = (1 - sigmoid(l_h)) softmax(Q_h K_h^T / sqrt(D)) + sigmoid(l_h) softmax_j(v_h . r_ij)`,
  `r_ij = (|delta|^2, delta_x, delta_y)` on the `grid = (h, w)` token grid (row-major,
  `T = h * w`); `pos_weights [H, 3]` (`gpsa_local_init`), `gate_logits [H]` (ConViT init 1).
  Both parts are row-stochastic, so `A`'s rows sum to 1 (ConViT's renormalisation is then a no-op
  except under masks). Self-attention only: cross attention is undefined (the positional part
  needs queries and keys on one grid) and raises `PatternUndefinedError`. `causal=True` hides later
  tokens in raster order and `mask` may hide keys (both parts renormalise over visible keys).
  ConViT defaults: locality strength 1, gates 1, used in the first 10 of 12 blocks.
  """
  _common.check_qkv("gpsa_attention", q, k, v)
  gh, gw = grid
  b, t, h, _ = q.shape
  if k.shape[1] != t:
    raise _common.PatternUndefinedError(
        f"gpsa_attention: cross attention is undefined for GPSA (positions live on one grid), got "
        f"Tq={t}, Tk={k.shape[1]}")
  if t != gh * gw:
    raise ValueError(f"gpsa_attention: grid {gh}x{gw} needs T={gh * gw} tokens, got T={t}")
  if pos_weights.shape != (h, 3) or gate_logits.shape != (h,):
    raise ValueError(f"gpsa_attention: pos_weights must be [H={h}, 3] and gate_logits [H], got "
                     f"{pos_weights.shape}, {gate_logits.shape}")
  valid = jnp.broadcast_to(_common.visibility(t, t, mask=mask, causal=causal), (b, h, t, t))
  content = _common.masked_softmax(_common.scores(q, k, scale=scale), valid)
  pos_logits = jnp.einsum("qkr,hr->hqk", grid_offsets(gh, gw), pos_weights.astype(jnp.float32))
  positional = _common.masked_softmax(jnp.broadcast_to(pos_logits[None], valid.shape), valid)
  g = jax.nn.sigmoid(gate_logits.astype(jnp.float32))[None, :, None, None]
  return _common.apply_weights((1 - g) * content + g * positional, v, q.dtype)


# ---------------------------------------------------------------------------------------------
# Decoupled-head attention (DHA (Chen et al. 2024, arXiv:2406.06567)).


def dha_attention(q, k, v, k_assign, v_assign, **attn_kwargs):
  """DHA (Chen et al. (Chen et al. 2024, arXiv:2406.06567)): query head h attends with key group `k_assign[h]`, value group `v_assign[h]`.

  `q [B, Tq, H, D]`, `k [B, Tk, gK, D]`, `v [B, Tk, gV, Dv]`, `k_assign, v_assign [H]` int (static
  tuples or arrays). K and V groupings are independent (GQA is the special case where both are
  the same contiguous grouping; the identity grouping is MHA). Runs on `dot_product_attention`
  after gathering each head's key and value group.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"dha_attention: q, k, v must be [B, T, H, D], got {q.shape}, {k.shape}, {v.shape}")
  h = q.shape[2]
  k_assign, v_assign = jnp.asarray(k_assign), jnp.asarray(v_assign)
  if k_assign.shape != (h,) or v_assign.shape != (h,):
    raise ValueError(f"dha_attention: k_assign and v_assign must be [H={h}], got "
                     f"{k_assign.shape}, {v_assign.shape}")
  return softmax_lib.dot_product_attention(q, jnp.take(k, k_assign, axis=2),
                                           jnp.take(v, v_assign, axis=2), **attn_kwargs)


def dha_fuse_heads(kernel, fusion, head_dim: int):
  """Linear head fusion: `kernel [d_model, H * d]` (an MHA K or V projection), `fusion [g, H]` ->
  `[d_model, g * d]` with group g's projection `sum_h fusion[g, h] W_h` (one-hot rows select heads)."""
  d_model = kernel.shape[0]
  h = kernel.shape[1] // head_dim
  if kernel.shape[1] != h * head_dim or fusion.ndim != 2 or fusion.shape[1] != h:
    raise ValueError(f"dha_fuse_heads: kernel [d_model, H*d] with H={h} and fusion [g, H] needed, "
                     f"got {kernel.shape}, {fusion.shape}")
  w = kernel.reshape(d_model, h, head_dim)
  return jnp.einsum("mhd,gh->mgd", w, fusion).reshape(d_model, -1)


# ---------------------------------------------------------------------------------------------
# Relative positional scores (Transformer-XL style, used by RCMHA (Sugiharto et al. 2023, arXiv:2308.03429)).


def sinusoid(positions, dim: int):
  """`[..., dim]` sinusoidal embedding of (possibly negative) relative distances."""
  half = max(dim // 2, 1)
  freqs = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
  ang = positions.astype(jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], -1)
  return emb[..., :dim] if emb.shape[-1] >= dim else jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, dim - emb.shape[-1])])


def relative_attention(q, k, v, rel, u, w, *, mask=None, causal=False, q_segment_ids=None,
                       kv_segment_ids=None, scale=None, q_offset=None):
  """Transformer-XL scores `((q_i + u) . k_j + (q_i + w) . R_{i-j}) / sqrt(D)`, softmax, times V.

  `rel [2 Tk - 1, H, D]` holds `R` for distances `Tk - 1 .. -(Tk - 1)` (row `r` is distance
  `Tk - 1 - r`, the distance counted with bottom-right aligned query positions `i + Tk - Tq`);
  `u, w [H, D]` are the content and position biases. `R = 0, u = w = 0` is plain softmax attention.
  `q_offset` (default `Tk - Tq`, may be traced) is the absolute position of query 0, for decoding
  against a cache whose tail is still empty (pass the mask too).
  """
  _common.check_qkv("relative_attention", q, k, v)
  b, tq, h, d = q.shape
  tk = k.shape[1]
  if rel.shape != (2 * tk - 1, h, d) or u.shape != (h, d) or w.shape != (h, d):
    raise ValueError(f"relative_attention: rel must be [2Tk-1={2 * tk - 1}, H={h}, D={d}] and u, w "
                     f"[H, D], got {rel.shape}, {u.shape}, {w.shape}")
  scale = d ** -0.5 if scale is None else scale
  kr = _common.repeat_kv(k, h)
  content = jnp.einsum("bqhd,bkhd->bhqk", (q + u).astype(jnp.float32), kr.astype(jnp.float32))
  pos_all = jnp.einsum("bqhd,rhd->bhqr", (q + w).astype(jnp.float32), rel.astype(jnp.float32))
  q_offset = tk - tq if q_offset is None else q_offset
  dist = (jnp.arange(tq)[:, None] + q_offset) - jnp.arange(tk)[None, :]
  idx = jnp.clip(tk - 1 - dist, 0, 2 * tk - 2)
  pos = jnp.take_along_axis(pos_all, jnp.broadcast_to(idx, (b, h, tq, tk)), axis=-1)
  s = (content + pos) * scale
  valid = _common.visibility(tq, tk, mask=mask, causal=causal, q_segment_ids=q_segment_ids,
                             kv_segment_ids=kv_segment_ids)
  p = _common.masked_softmax(s, jnp.broadcast_to(valid, s.shape))
  return _common.apply_weights(p, v, q.dtype)


# ---------------------------------------------------------------------------------------------
# Hierarchical self-attention (Amizadeh et al. 2025, arXiv:2509.15448) (two-level reading).


def hierarchical_attention_weights(q, k, group_ids, *, scale=None, causal=False):
  """Two-level HSA weights `[B, H, T, T]`: softmax inside the query's group, block-constant across groups.

  For query i in group g and key j in another group G: `A_ij = exp(b_gG) / (|G| Z_i)` with the
  block score `b_gG = log mean_{i' in g} sum_{j' in G} exp(S_i'j')` (log-sum-exp aggregation of the
  member scores, averaged over the query group), and `Z_i = sum_{j in g} exp(S_ij) + sum_G exp(b_gG)`.
  Every query in g gives block G the same total mass, spread evenly over its keys. Rows sum to 1;
  one token per group is exactly softmax attention. Self-attention, non-causal only (the group
  average reads the whole query group). Our first spec of (Amizadeh et al. 2025, arXiv:2509.15448) was "from abstract + summary": the paper's
  DP over a full tree is reduced here to one level of nesting; this is our reading of the
  block-constant KL projection.
  """
  if causal:
    raise _common.PatternUndefinedError("hierarchical_attention: the causal pattern is undefined (block scores average "
                     "over the whole query group, including later tokens)")
  _common.check_qkv("hierarchical_attention", q, k, k)
  b, t, h, _ = q.shape
  if k.shape[1] != t:
    raise _common.PatternUndefinedError("hierarchical_attention: cross attention is undefined (one token tree), "
                     f"got Tq={t}, Tk={k.shape[1]}")
  if group_ids.shape != (b, t):
    raise ValueError(f"hierarchical_attention: group_ids must be [B, T] = {(b, t)}, got {group_ids.shape}")
  s = _common.scores(q, k, scale=scale)                                  # [B, H, T, T]
  same = (group_ids[:, :, None] == group_ids[:, None, :])[:, None]         # [B, 1, T, T]
  m = jax.lax.stop_gradient(jnp.max(s, axis=(-1, -2), keepdims=True))
  e = jnp.exp(s - m)
  # block mass per (query group g, key group G), seen from each query: mean over i' in g of sum_j' in G.
  qsum = jnp.einsum("bgi,bhij->bhgj", same[:, 0].astype(jnp.float32), e)  # sum over i' in group(i)
  qcount = jnp.sum(same[:, 0], axis=-1).astype(jnp.float32)[:, None, :, None]
  kblock = jnp.einsum("bhij,bjk->bhik", qsum, same[:, 0].astype(jnp.float32))  # sum over j' in group(j)
  kcount = jnp.sum(same[:, 0], axis=-1).astype(jnp.float32)[:, None, None, :]
  cross = kblock / qcount / kcount                                         # exp(b_gG) / |G|
  num = jnp.where(same, e, cross)
  return num / jnp.sum(num, axis=-1, keepdims=True)


def hierarchical_attention(q, k, v, group_ids, *, scale=None, causal=False):
  """`o = A V` with `hierarchical_attention_weights` (see there); `[B, T, H, D] -> [B, T, H, Dv]`."""
  w = hierarchical_attention_weights(q, k, group_ids, scale=scale, causal=causal)
  return _common.apply_weights(w, v, q.dtype)


# ---------------------------------------------------------------------------------------------
# Modular duplex attention (MODA (Zhang et al. 2025, arXiv:2507.04635)).


def moda_attention(q, k, v, modality_ids, *, pair_bias, basis=None, kv_modality_ids=None,
                   causal=False, mask=None, scale=None):
  """MODA (as far as (Zhang et al. 2025, arXiv:2507.04635)'s abstract pins it): one softmax with duplex alignment and modality masks.

  Scores `S_ij = q_i . k_j` within a modality and `(q_i B_{m_i}^T) . k_j` across modalities
  (`basis [M, D, D]`: the query modality's learned basis maps the other modality's keys into its
  space; `None` = identity), plus the adaptive mask `pair_bias [M, M]` at `(m_i, m_j)` (`-inf`
  blocks a pair). `modality_ids [B, Tq]` (and `kv_modality_ids [B, Tk]` for cross) in `[0, M)`.
  Oracles: inter-modal bias `-inf` gives block-diagonal per-modality attention; identity basis and
  zero bias give standard attention. Reading ("from abstract, mechanism underspecified"): the
  inner-modal self-attention and the inter-modal cross-attention share one normaliser, so their
  outputs sum.
  """
  _common.check_qkv("moda_attention", q, k, v)
  b, tq, h, d = q.shape
  tk = k.shape[1]
  kv_modality_ids = modality_ids if kv_modality_ids is None else kv_modality_ids
  if modality_ids.shape != (b, tq) or kv_modality_ids.shape != (b, tk):
    raise ValueError(f"moda_attention: modality_ids must be [B, Tq] and kv_modality_ids [B, Tk], "
                     f"got {modality_ids.shape}, {kv_modality_ids.shape}")
  nm = pair_bias.shape[0]
  if pair_bias.shape != (nm, nm) or (basis is not None and basis.shape != (nm, d, d)):
    raise ValueError(f"moda_attention: pair_bias must be [M, M] and basis [M, D={d}, D], got "
                     f"{pair_bias.shape}, {None if basis is None else basis.shape}")
  s_intra = _common.scores(q, k, scale=scale)
  if basis is None:
    s_inter = s_intra
  else:
    qb = jnp.einsum("bqhd,bqed->bqhe", q.astype(jnp.float32), basis.astype(jnp.float32)[modality_ids])
    s_inter = _common.scores(qb, k.astype(jnp.float32), scale=d ** -0.5 if scale is None else scale)
  same = (modality_ids[:, :, None] == kv_modality_ids[:, None, :])[:, None]
  bias = pair_bias.astype(jnp.float32)[modality_ids[:, :, None], kv_modality_ids[:, None, :]][:, None]
  s = jnp.where(same, s_intra, s_inter) + jnp.where(jnp.isfinite(bias), bias, 0.0)
  valid = _common.visibility(tq, tk, mask=mask, causal=causal) & jnp.isfinite(bias)
  p = _common.masked_softmax(s, jnp.broadcast_to(valid, s.shape))
  return _common.apply_weights(p, v, q.dtype)
