"""Saliency, explanation and rhythm probes over attention maps.

* (Zhang et al. 2026, arXiv:2601.20279) Hallucination Begins Where Saliency Drops: `attention_saliency`, `token_saliency`,
  `sgrs_accept`, `locore` (intervention).
* (Papi et al. 2025, arXiv:2509.18010) Cross-Attention is Half Explanation (S2T): `aggregate_cross_attention`, `pearson`,
  `spearman`, `explained_fraction`.
* (Li et al. 2025, arXiv:2510.13554) Attention Illuminates LLM Reasoning: `waad`, `fai`.
* (Ozgur et al. 2026, arXiv:2604.22841) ATTN-FIQA: `fiqa_score`, `fiqa_patch_map`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from attnjax.analysis._checks import check_attention, check_ndim, check_range


# --- (Zhang et al. 2026, arXiv:2601.20279) saliency ------------------------------------------------------------------------


def attention_saliency(loss_fn: Callable[[jax.Array], jax.Array], attn):
  """`|A * dL/dA|` (elementwise), same shape as `attn`.

  `loss_fn(attn) -> scalar`: the loss as a function of the attention weights (e.g. a model call
  whose layers take these weights: `attnjax.analysis.capture` perturbs captured weights so
  `nnx.grad` gives `dL/dA` in one backward). From the abstract.
  """
  a = jnp.asarray(attn, jnp.float32)
  return jnp.abs(a * jax.grad(loss_fn)(a))


def token_saliency(saliency, *, query: int = -1):
  """Saliency of each prior token for the output at `query`: `[L, B, H, Tq, Tk] -> [B, Tk]`.

  Sums over layers and heads (`[B, H, Tq, Tk]` for one layer works too).
  """
  s = check_attention(saliency, "saliency", shape_doc="[L, B, H, Tq, Tk] or [B, H, Tq, Tk]")
  if s.ndim == 4:
    s = s[None]
  return jnp.sum(s[..., query, :], axis=(0, 2))


def sgrs_accept(candidate_saliency, context_saliency, *, ratio: float = 0.5):
  """Saliency-guided rejection: accept a candidate when its saliency is >= an adaptive threshold.

  `candidate_saliency`: `[...]` a score per candidate token (e.g. its summed saliency to the
  context); `context_saliency`: `[N]` the scores of the tokens generated so far. Threshold =
  `ratio * mean(context_saliency)`. From the abstract ("adaptive threshold"): the paper's exact
  statistic is not pinned down; this is the simplest reading.
  """
  thr = ratio * jnp.mean(jnp.asarray(context_saliency, jnp.float32))
  return jnp.asarray(candidate_saliency) >= thr


def locore(attn, *, window: int, gamma: float):
  """LocoRE: boost attention to the last `window` tokens before each query, rows renormalised.

  `attn`: `[..., Tq, Tk]` (queries bottom-right aligned with keys). `A'_ij ∝ A_ij (1 + gamma)`
  for `i - window <= j < i`, `A_ij` otherwise, rows rescaled to their original sums.
  `gamma = 0` (or `window = 0`) is a no-op. From the abstract: the boost form is a reading.
  """
  a = check_attention(attn, "attn", min_ndim=2, shape_doc="[..., Tq, Tk]")
  if window < 0 or gamma < -1:
    raise ValueError(f"window must be >= 0 and gamma >= -1, got window={window}, gamma={gamma}")
  tq, tk = a.shape[-2:]
  pos = jnp.arange(tq)[:, None] + (tk - tq)
  j = jnp.arange(tk)[None]
  recent = (j < pos) & (j >= pos - window)
  b = a * jnp.where(recent, 1.0 + gamma, 1.0)
  s0 = jnp.sum(a, -1, keepdims=True)
  s1 = jnp.sum(b, -1, keepdims=True)
  return jnp.where(s1 > 0, b * s0 / jnp.where(s1 > 0, s1, 1.0), a)


# --- (Papi et al. 2025, arXiv:2509.18010) cross-attention explanation -----------------------------------------------------------


def aggregate_cross_attention(attn):
  """`A_bar = mean_{l,h} A^{l,h}`: `[L, B, H, Tq, S] -> [B, Tq, S]` (target token x encoder frame)."""
  a = check_ndim(attn, 5, "attn", "[L, B, H, Tq, S]")
  return jnp.mean(a, axis=(0, 2))


def pearson(x, y, *, axis=-1):
  """Pearson correlation along `axis` (e.g. per target token between two `[..., S]` maps)."""
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  xc = x - jnp.mean(x, axis, keepdims=True)
  yc = y - jnp.mean(y, axis, keepdims=True)
  num = jnp.sum(xc * yc, axis)
  den = jnp.sqrt(jnp.sum(xc * xc, axis) * jnp.sum(yc * yc, axis))
  return num / jnp.maximum(den, 1e-30)


def _ranks(x, axis):
  # Average ranks for ties, so a constant map has zero variance rather than arbitrary ranks.
  x = jnp.moveaxis(jnp.asarray(x, jnp.float32), axis, -1)
  less = jnp.sum(x[..., None, :] < x[..., :, None], -1)
  equal = jnp.sum(x[..., None, :] == x[..., :, None], -1)
  return jnp.moveaxis(less + (equal - 1) / 2.0, -1, axis)


def spearman(x, y, *, axis=-1):
  """Spearman rank correlation along `axis` (average ranks for ties)."""
  return pearson(_ranks(x, axis), _ranks(y, axis), axis=axis)


def explained_fraction(attn_map, saliency_map, *, axis=-1):
  """Fraction of the saliency map's variance explained by the attention map: `pearson^2`.

  From the abstract ("explained fraction"): read as the squared Pearson correlation.
  """
  return pearson(attn_map, saliency_map, axis=axis) ** 2


# --- (Li et al. 2025, arXiv:2510.13554) WAAD / FAI ----------------------------------------------------------------------


def waad(attn, *, window: int):
  """Windowed average attention distance: `WAAD_t = sum_{j<=t} A_tj min(t - j, W)`.

  `attn`: `[..., T, T]` causal weights -> `[..., T]`. A previous-token head gives 1 for t >= 1.
  """
  a = check_attention(attn, "attn", min_ndim=2, shape_doc="[..., T, T]")
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  t = a.shape[-1]
  dist = jnp.arange(t)[:, None] - jnp.arange(t)[None]
  w = jnp.where(dist >= 0, jnp.minimum(dist, window), 0)
  return jnp.sum(a * w, -1)


def fai(attn):
  """Future attention influence: `FAI_j = mean_{i>j} A_ij`; `[..., T, T] -> [..., T]` (last = 0)."""
  a = check_attention(attn, "attn", min_ndim=2, shape_doc="[..., T, T]")
  t = a.shape[-1]
  later = jnp.arange(t)[:, None] > jnp.arange(t)[None]
  count = jnp.sum(later, 0)
  return jnp.sum(jnp.where(later, a, 0.0), -2) / jnp.maximum(count, 1)


# --- (Ozgur et al. 2026, arXiv:2604.22841) ATTN-FIQA --------------------------------------------------------------------------


def fiqa_score(scores, *, drop_cls: bool = False):
  """Face-image quality from pre-softmax scores `S = QK^T / sqrt(d)` of the final block.

  `scores`: `[B, H, N, N]` -> `[B]`: the mean over heads and all patch pairs (drop the class
  token row and column with `drop_cls=True`). From the abstract: "mean over heads and patches".
  Invariant to patch permutations; scaling `W_Q` by `c` scales it by `c`.
  """
  s = check_ndim(scores, 4, "scores", "[B, H, N, N]").astype(jnp.float32)
  if drop_cls:
    s = s[..., 1:, 1:]
  return jnp.mean(s, axis=(1, 2, 3))


def fiqa_patch_map(scores, *, drop_cls: bool = False):
  """Per-patch quality map: mean over heads and queries of the scores each patch receives, `[B, N]`."""
  s = check_ndim(scores, 4, "scores", "[B, H, N, N]").astype(jnp.float32)
  if drop_cls:
    s = s[..., 1:, 1:]
  return jnp.mean(s, axis=(1, 2))
