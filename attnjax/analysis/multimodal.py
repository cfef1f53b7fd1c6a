"""Multimodal probes and interventions (image tokens + text tokens in one sequence).

* (Kang et al. 2025, arXiv:2503.03321) See What You Are Told (VAR): `massive_activation_sinks`, `image_centric_heads`,
  `var_redistribute` (intervention).
* (Wu et al. 2025, arXiv:2508.10552) When Language Overrules (text dominance): `modality_aei`, `modality_dominance`.
* (Ge et al. 2025, arXiv:2509.06461) CARVE (contrastive attention): `contrastive_attention`, `attention_map_entropy`.
* (He et al. 2024, arXiv:2412.13949) Vision-aware Head Divergence: `vhd`, `vhr_head_scale` (intervention, through head scales).
* (Zhao et al. 2024, arXiv:2412.03324) SGL (small-VLM guidance): `visual_token_importance`, `sgl_keep_indices`,
  `sgl_prune` (intervention on the large model's input).

Modality membership is a `[T]` (or `[B, T]`) bool mask over key positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.analysis._checks import check_attention, check_ndim, check_range, xlogx


def _key_mask(mask, a, name):
  m = jnp.asarray(mask, bool)
  if m.ndim == 1:
    m = m[None]
  if m.ndim != 2 or m.shape[-1] != a.shape[-1]:
    raise ValueError(f"{name} must be [Tk] or [B, Tk] bool with Tk={a.shape[-1]}, got {jnp.shape(mask)}")
  return m[:, None, None, :]                                   # [B|1, 1, 1, Tk]


# --- (Kang et al. 2025, arXiv:2503.03321) VAR -------------------------------------------------------------------------------


def massive_activation_sinks(hidden, sink_dims, *, tau: float = 20.0):
  """Visual sink tokens: `phi_j = max_{d in D_sink} |x_j[d]| / RMS(x_j) > tau`; `[B, T, D] -> [B, T]`.

  `sink_dims`: the model's massive-activation dimensions (found offline). tau=20 as in the
  paper; RMS with eps 1e-6 as in the reference re-implementation (Bostoncake/VisAttnSink,
  var_logic.py `DimProspector`).
  """
  h = check_ndim(hidden, 3, "hidden", "[B, T, D]").astype(jnp.float32)
  dims = jnp.asarray(sink_dims, jnp.int32)
  rms = jnp.sqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)
  phi = jnp.max(jnp.abs(h[..., dims]) / rms, axis=-1)
  return phi > tau


def image_centric_heads(attn, sink_mask, image_mask, *, rho: float = 0.5, min_visual: float = 0.2):
  """Image-centric (head, query) pairs: `[B, H, Tq, Tk] -> [B, H, Tq]` bool.

  Selected when the query's attention to image tokens is at least `min_visual` and the non-sink
  share of that visual attention is at least `rho`
  (`sum_{j in img, not sink} A_ij / sum_{j in img} A_ij >= rho`); read from the paper with the
  thresholds of the reference re-implementation (rho=0.5, summ=0.2; there phrased as sink
  share <= rho, the same test at rho=0.5).
  """
  a = check_ndim(attn, 4, "attn", "[B, H, Tq, Tk]")
  img = _key_mask(image_mask, a, "image_mask")
  sink = _key_mask(sink_mask, a, "sink_mask")
  vis = jnp.sum(jnp.where(img, a, 0.0), -1)
  vis_ns = jnp.sum(jnp.where(img & ~sink, a, 0.0), -1)
  share = vis_ns / jnp.maximum(vis, 1e-30)
  return (vis >= min_visual) & (share >= rho)


def var_redistribute(attn, sink_mask, image_mask, selected, *, p: float = 0.6):
  """VAR: move a fraction `p` of the sink attention to the non-sink image tokens, pro rata.

  `attn`: `[B, H, Tq, Tk]`; `sink_mask`: `[Tk]`/`[B, Tk]` (sinks anywhere: image or text);
  `image_mask`: `[Tk]`/`[B, Tk]`; `selected`: `[B, H, Tq]` bool (`image_centric_heads`).
  For selected rows: `A'_sink = (1 - p) A_sink` and the budget `p * sum_sink A` is added to the
  non-sink image tokens in proportion to their weights; rows keep their sums; rows without
  non-sink image mass are unchanged. `p = 0` is a no-op. (Convention: `p` is the moved
  fraction; the reference re-implementation's `p` is the kept fraction, i.e. `1 - p` here.)
  """
  a = check_ndim(attn, 4, "attn", "[B, H, Tq, Tk]")
  check_range(p, 0.0, 1.0, "p")
  img = _key_mask(image_mask, a, "image_mask")
  sink = _key_mask(sink_mask, a, "sink_mask")
  sel = jnp.asarray(selected, bool)
  if sel.shape != a.shape[:-1]:
    raise ValueError(f"selected must be {a.shape[:-1]} ([B, H, Tq]) bool, got {sel.shape}")
  target = jnp.where(img & ~sink, a, 0.0)
  tsum = jnp.sum(target, -1, keepdims=True)
  budget = p * jnp.sum(jnp.where(sink, a, 0.0), -1, keepdims=True)
  out = jnp.where(sink, (1.0 - p) * a, a) + budget * target / jnp.where(tsum > 0, tsum, 1.0)
  ok = sel[..., None] & (tsum > 0)
  return jnp.where(ok, out, a)


# --- (Wu et al. 2025, arXiv:2508.10552) modality dominance ----------------------------------------------------------------


def modality_aei(attn, modality_mask, *, query_mask=None, causal: bool = True):
  """Attention efficiency index `AEI_m = (attention share of m) / (token share of m)`: `-> [B]`.

  `attn`: `[B, H, Tq, Tk]`; `modality_mask`: `[Tk]`/`[B, Tk]`; `query_mask`: `[Tq]` bool, the
  queries to average over (e.g. the generated text tokens; default all). The attention share of
  a query is `sum_{j in m} A_ij`; its token share is the fraction of the keys it can see (the
  causal prefix when `causal`, else all keys) that belong to `m`. Both are averaged over heads
  and the chosen queries, then divided. From the abstract: the normalisation is a reading;
  uniform attention over the visible keys gives AEI = 1.
  """
  a = check_ndim(attn, 4, "attn", "[B, H, Tq, Tk]")
  return _aei(a, _key_mask(modality_mask, a, "modality_mask"), query_mask, causal=causal)


def _aei(a, m, query_mask, *, causal):
  tq, tk = a.shape[-2:]
  visible = (jnp.arange(tk)[None] <= jnp.arange(tq)[:, None] + (tk - tq)) if causal else \
      jnp.ones((tq, tk), bool)
  att_share = jnp.sum(jnp.where(m, a, 0.0), -1)              # [B, H, Tq]
  tok_share = jnp.sum(m & visible, -1) / jnp.sum(visible, -1)  # [B|1, 1, Tq]
  qm = jnp.ones((tq,), bool) if query_mask is None else jnp.asarray(query_mask, bool)
  if qm.shape != (tq,):
    raise ValueError(f"query_mask must be [Tq]=({tq},) bool, got {qm.shape}")
  n = jnp.sum(qm) * a.shape[1]
  att = jnp.sum(jnp.where(qm, att_share, 0.0), (1, 2)) / n
  tok = jnp.sum(jnp.where(qm, jnp.broadcast_to(tok_share, att_share.shape), 0.0), (1, 2)) / n
  return att / jnp.maximum(tok, 1e-30)


def modality_dominance(attn, text_mask, *, query_mask=None, causal: bool = True):
  """`MDI = AEI_text / AEI_non-text` per example (`[B]`; 1 = balanced, > 1 text dominates).

  `attn`: `[B, H, Tq, Tk]`; `text_mask`: `[Tk]`/`[B, Tk]` bool; the token share of each
  modality counts the keys a query can see (causal prefix when `causal`, else all keys).
  """
  a = check_ndim(attn, 4, "attn", "[B, H, Tq, Tk]")
  tm = _key_mask(text_mask, a, "text_mask")
  return _aei(a, tm, query_mask, causal=causal) / _aei(a, ~tm, query_mask, causal=causal)


# --- (Ge et al. 2025, arXiv:2509.06461) CARVE -----------------------------------------------------------------------------


def contrastive_attention(task_attn, generic_attn, *, mode: str = "ratio", eps: float = 1e-8):
  """Contrast of the task query's visual attention map with a generic query's: `[..., N]`.

  Both maps are normalised to sum 1 over the `N` visual tokens, then `mode="ratio"` gives
  `A_t / (A_g + eps)` renormalised to sum 1, `"difference"` gives `A_t - A_g`. Identical maps give
  a flat map (uniform for ratio, zero for difference). From the abstract: the contrast form is
  not pinned down; both readings are offered.
  """
  t = jnp.asarray(task_attn, jnp.float32)
  g = jnp.asarray(generic_attn, jnp.float32)
  if t.shape != g.shape:
    raise ValueError(f"task_attn and generic_attn must have one shape [..., N], got {t.shape}, {g.shape}")
  t = t / jnp.maximum(jnp.sum(t, -1, keepdims=True), 1e-30)
  g = g / jnp.maximum(jnp.sum(g, -1, keepdims=True), 1e-30)
  if mode == "ratio":
    r = t / (g + eps)
    return r / jnp.sum(r, -1, keepdims=True)
  if mode == "difference":
    return t - g
  raise ValueError(f"mode must be 'ratio' or 'difference', got {mode!r}")


def attention_map_entropy(attn_map):
  """Entropy of a visual attention map normalised over its last axis (high = complex image)."""
  m = jnp.asarray(attn_map, jnp.float32)
  m = m / jnp.maximum(jnp.sum(m, -1, keepdims=True), 1e-30)
  return -jnp.sum(xlogx(m), -1)


# --- (He et al. 2024, arXiv:2412.13949) VHD / VHR -----------------------------------------------------------------------


def vhd(head_out_with_image, head_out_without_image):
  """`VHD^{l,h} = ||o^{l,h}(with image) - o^{l,h}(without image)||_2` at the generating token.

  Inputs: per-head outputs `[..., H, D]` (e.g. `[L, B, H, D]` at the last position, from
  capture's `head_outputs`); returns `[..., H]`. Identical inputs give 0.
  """
  a = jnp.asarray(head_out_with_image, jnp.float32)
  b = jnp.asarray(head_out_without_image, jnp.float32)
  if a.shape != b.shape or a.ndim < 2:
    raise ValueError(f"head outputs must share one shape [..., H, D], got {a.shape}, {b.shape}")
  return jnp.linalg.norm(a - b, axis=-1)


def vhr_head_scale(vhd_scores, *, top_k: int, alpha: float):
  """VHR head scales: `alpha` for the `top_k` heads by VHD (over all layers), 1 elsewhere.

  `vhd_scores`: `[L, H]`; returns `[L, H]` multipliers for per-head outputs (set them with
  `attnjax.analysis.capture.set_head_scale`). `alpha = 1` or `top_k = 0` is a no-op. From the
  abstract and memory: the paper picks top heads per layer by VHD; here over all heads.
  """
  s = check_ndim(vhd_scores, 2, "vhd_scores", "[L, H]")
  if not 0 <= top_k <= s.size:
    raise ValueError(f"top_k must be in [0, {s.size}], got {top_k}")
  flat = s.reshape(-1)
  order = jnp.argsort(-flat)
  top = jnp.zeros(flat.shape, bool).at[order[:top_k]].set(True)
  return jnp.where(top, alpha, 1.0).reshape(s.shape).astype(jnp.float32)


# --- (Zhao et al. 2024, arXiv:2412.03324) SGL --------------------------------------------------------------------------------


def visual_token_importance(attn, visual_mask, query_mask):
  """Importance of each key from the small model's attention: `[L, B, H, Tq, Tk] -> [B, Tk]`.

  Sum over layers, heads and the guiding queries (`query_mask`: `[Tq]` bool, the text /
  generated tokens) of the attention they pay each key; non-visual keys (`visual_mask`
  `[Tk]` bool false) get -inf so they rank last. Permutation-equivariant in the keys.
  """
  a = check_ndim(attn, 5, "attn", "[L, B, H, Tq, Tk]")
  qm = jnp.asarray(query_mask, bool)
  vm = jnp.asarray(visual_mask, bool)
  if qm.shape != a.shape[-2:-1] or vm.shape != a.shape[-1:]:
    raise ValueError(f"query_mask must be [Tq]={a.shape[-2:-1]} and visual_mask [Tk]={a.shape[-1:]},"
                     f" got {qm.shape}, {vm.shape}")
  imp = jnp.sum(jnp.where(qm[:, None], a, 0.0), axis=(0, 2, 3))
  return jnp.where(vm, imp, -jnp.inf)


def sgl_keep_indices(importance, visual_mask, *, keep_ratio: float):
  """Positions kept in the large model: all non-visual tokens and the top `keep_ratio` visual ones.

  `importance`: `[B, T]`; returns `[B, T - n_drop]` int32 positions in their original order.
  `keep_ratio = 1` keeps everything.
  """
  check_range(keep_ratio, 0.0, 1.0, "keep_ratio")
  imp = check_ndim(importance, 2, "importance", "[B, T]")
  vm = jnp.asarray(visual_mask, bool)
  n_vis = int(jnp.sum(vm))
  n_keep = int(round(keep_ratio * n_vis))
  t = imp.shape[1]
  # Non-visual tokens always kept (rank +inf), then visual by importance; ties by position.
  key = jnp.where(vm[None], imp, jnp.inf)
  order = jnp.argsort(-key, axis=1, stable=True)
  kept = jnp.sort(order[:, : t - (n_vis - n_keep)], axis=1)
  return kept.astype(jnp.int32)


def sgl_prune(x, keep_indices):
  """Gathers the kept tokens: `x [B, T, ...]`, `keep_indices [B, K] -> [B, K, ...]`."""
  x = jnp.asarray(x)
  idx = jnp.asarray(keep_indices)
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
