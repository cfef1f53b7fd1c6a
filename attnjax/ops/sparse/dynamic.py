"""Content-routed sparse attention and corrections on top of a sparse pass.

* Routing Transformer (Roy et al. 2020, arXiv:2003.05997): k-means routing with balanced clusters (each centroid takes its top-w
  tokens), online EMA centroids.
* Trainable Dynamic Mask attention (DMA) (Shi et al. 2025, arXiv:2508.02124): query-agnostic per-key bias from V, top-w keys.
* Re-ttention (Chen et al. 2025, arXiv:2505.22918): statistical reshape of an ultra-sparse pass (mass ratio + cached residual).
* Top-k key reuse (Recycled Attention (Xu et al. 2024, arXiv:2411.05787), HyLRA (Ai et al. 2026, arXiv:2602.00777)): a full pass records the top-k keys per
  GQA group; later steps / reuse layers attend only to them.
Each comes with a dense-masked reference (`*_reference` or `implementation="reference"`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.cab import PatternUndefinedError
from attnjax.ops import block_sparse
from attnjax.ops import dispatch
from attnjax.ops import layout as L
from attnjax.ops.softmax import dot_product_attention


def _check_bthd(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or v.shape[:3] != k.shape[:3] or q.shape[0] != k.shape[0] or (
      q.shape[-1] != k.shape[-1]) or q.shape[2] % k.shape[2]:
    raise ValueError(f"q, k, v must be [B, Tq, H, D], [B, Tk, Hk, D], [B, Tk, Hk, Dv] with "
                     f"H % Hk == 0, got {q.shape}, {k.shape}, {v.shape}")


def _masked_softmax_attend(s, ok, vg):
  """s, ok [..., n]; vg [..., n, Dv] -> [..., Dv]; rows without a visible key give zeros."""
  s = jnp.where(ok, s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, -1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = jnp.sum(p, -1, keepdims=True)
  return jnp.einsum("...n,...nd->...d", p / jnp.where(l > 0, l, 1.0), vg.astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# Routing Transformer
# ---------------------------------------------------------------------------------------------


def _unit(x):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)


def _routing_scores(q, k, centroids):
  """Detached similarities of the unit queries / keys to the stored centroids (not re-normalised:
  lucidrains' `dists_and_buckets` scores against the EMA means as they are, and so does
  `update_centroids`): `(q [B, H, Tq, C], k [B, H, C, Tk])`."""
  h = centroids.shape[0]
  if q.shape[2] != h:
    raise ValueError(f"centroids must be [H={q.shape[2]}, C, D], got {centroids.shape}")
  g = q.shape[2] // k.shape[2]
  mu = jax.lax.stop_gradient(centroids).astype(jnp.float32)
  qs = jnp.einsum("bthd,hcd->bhtc", _unit(jax.lax.stop_gradient(q)), mu)
  ks = jnp.einsum("bthd,hcd->bhct", _unit(jnp.repeat(jax.lax.stop_gradient(k), g, axis=2)), mu)
  return qs, ks


def _check_window(window, tk):
  if window < 1 or window > tk:
    raise ValueError(f"window must be in [1, Tk={tk}], got {window}")


def routing_clusters(q, k, centroids, window: int):
  """k-means routing: `(query_cluster [B, H, Tq], members [B, H, C, w])`.

  `centroids [H, C, D]`. A query joins its nearest centroid (`argmax_c q^_i . mu_c`, unit vectors);
  centroid c's key members are its `w = window` nearest keys over the whole sequence (balanced
  clusters: every cluster has exactly w keys, the Routing Transformer's top-w assignment), sorted
  by position. Detached. Non-causal membership: see `routing_attention` for the causal reading.
  """
  _check_window(window, k.shape[1])
  qs, ks = _routing_scores(q, k, centroids)
  _, members = jax.lax.top_k(ks, window)
  return jnp.argmax(qs, -1).astype(jnp.int32), jnp.sort(members, -1).astype(jnp.int32)


def _causal_members(q, k, centroids, window):
  """Per query i: the `window` keys j <= i nearest to i's centroid, `(idx, ok)` `[B, H, Tq, w]`."""
  qs, ks = _routing_scores(q, k, centroids)
  qc = jnp.argmax(qs, -1)
  s = jnp.take_along_axis(ks, qc[..., None], axis=2)                # [B, H, Tq, Tk]
  tq = q.shape[1]
  future = jnp.arange(k.shape[1])[None, :] > jnp.arange(tq)[:, None]
  _, idx = jax.lax.top_k(jnp.where(future, -jnp.inf, s), window)
  return idx.astype(jnp.int32), idx <= jnp.arange(tq)[None, None, :, None]


def routing_attention(q, k, v, centroids, *, window: int, causal: bool = True, scale=None):
  """Routing Transformer attention (Roy et al. 2020, arXiv:2003.05997) on `[B, T, H, D]` -> `[B, Tq, H, Dv]`.

  Query i attends the `window` keys of its cluster. Paper: C ~ sqrt(T) clusters, w = T / C, shared
  QK (pass k = q's projection to share). Reading ("from memory"): hard argmax query assignment, so
  every query has exactly one cluster.

  * Non-causal: the cluster's members are its `window` nearest keys over the whole sequence
    (`routing_clusters`); memory O(T * w) per head (the cluster's keys are gathered per query).
  * Causal (Tq == Tk): the members are the `window` keys `j <= i` nearest to the centroid. Taking
    the balanced top-w over the whole sequence and masking `j > i` afterwards, as a literal reading
    would, lets future keys push past keys out of a cluster, so future tokens would change past
    outputs. The per-query selection costs O(T^2) detached scalars per head (no D factor).
    Rows with fewer than `window` visible keys attend to all of them.
  """
  _check_bthd(q, k, v)
  b, tq, h, d = q.shape
  if causal and tq != k.shape[1]:
    raise PatternUndefinedError("routing_attention: the 'causal_cross' pattern is undefined (causal "
                                "routing attention needs Tq == Tk)")
  _check_window(window, k.shape[1])
  scale = d ** -0.5 if scale is None else scale
  g = h // k.shape[2]
  if causal:
    idx, ok = _causal_members(q, k, centroids, window)
  else:
    qc, members = routing_clusters(q, k, centroids, window)
    idx = jnp.take_along_axis(members, qc[..., None], axis=2)        # [B, H, Tq, w]
  bi = jnp.arange(b)[:, None, None, None]
  hi = (jnp.arange(h) // g)[None, :, None, None]
  kg, vg = k[bi, idx, hi], v[bi, idx, hi]                            # [B, H, Tq, w, D]
  s = jnp.einsum("bthd,bhtwd->bhtw", q, kg, preferred_element_type=jnp.float32) * scale
  if not causal:
    ok = jnp.ones(s.shape, bool)
  o = _masked_softmax_attend(s, ok, vg)                              # [B, H, Tq, Dv]
  return o.transpose(0, 2, 1, 3).astype(q.dtype)


def routing_mask(q, k, centroids, *, window: int, causal: bool = True, balanced: bool = True):
  """`[B, H, Tq, Tk]` bool: the Routing Transformer's pattern as a dense mask (the oracle).

  `balanced=True` is `routing_attention`'s pattern, computed by ranking (a stable sort) rather than
  by top-k: non-causal, key j is visible to query i when j is among the `window` best-ranked keys
  of i's centroid; causal, when `j <= i` and j is among the `window` best-ranked keys `<= i`.
  `balanced=False`: key j belongs to its nearest centroid (argmax, clusters of any size), and query
  i sees the keys of its own cluster (`j <= i + Tk - Tq` when causal)."""
  tq, tk = q.shape[1], k.shape[1]
  qs, ks = _routing_scores(q, k, centroids)
  qc = jnp.argmax(qs, -1)
  if not balanced:
    kc = jnp.argmax(ks, -2)                                          # [B, H, Tk]
    mask = qc[..., :, None] == kc[..., None, :]
    if causal:
      mask = mask & (jnp.arange(tk)[None, :] <= jnp.arange(tq)[:, None] + tk - tq)
    return mask
  _check_window(window, tk)
  s = jnp.take_along_axis(ks, qc[..., None], axis=2)                # [B, H, Tq, Tk]
  visible = jnp.ones((tq, tk), bool)
  if causal:
    visible = jnp.arange(tk)[None, :] <= jnp.arange(tq)[:, None]
  order = jnp.argsort(jnp.where(visible, -s, jnp.inf), axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)
  return (rank < window) & visible


def _kmeans_buckets(xu, centroids):
  """Nearest stored centroid (as stored: the EMA leaves them slightly shorter than unit) of unit
  vectors `xu [B, T, H, D]` -> `[B, H, T]` (lucidrains' `dists_and_buckets`)."""
  return jnp.argmax(jnp.einsum("bthd,hcd->bhtc", xu, centroids.astype(jnp.float32)), -1)


def update_centroids(centroids, x, decay: float = 0.999):
  """The Routing Transformer's k-means EMA step as lucidrains/routing-transformer's `Kmeans`
  (`kmeans_iter` then `update`/`ema_inplace`): every unit `x^_i` joins its nearest centroid; a
  cluster's new mean is the re-normalised sum of its members over the batch (`kmeans_iter`),
  an empty cluster keeps its centroid; then `mu <- decay mu + (1 - decay) new` (not re-normalised,
  as the authors' EMA). `centroids [H, C, D]`, `x [B, T, H, D]` (detached)."""
  h, c, _ = centroids.shape
  if x.ndim != 4 or x.shape[2] != h or x.shape[3] != centroids.shape[2]:
    raise ValueError(f"x must be [B, T, H={h}, D={centroids.shape[2]}], got {x.shape}")
  cent = jax.lax.stop_gradient(centroids).astype(jnp.float32)
  xu = _unit(jax.lax.stop_gradient(x))
  onehot = jax.nn.one_hot(_kmeans_buckets(xu, cent), c, dtype=jnp.float32)      # [B, H, T, C]
  sums = jnp.einsum("bhtc,bthd->hcd", onehot, xu)
  counts = onehot.sum((0, 2))[..., None]                                        # [H, C, 1]
  new = jnp.where(counts > 0, _unit(sums), cent)
  return (decay * cent + (1 - decay) * new).astype(centroids.dtype)


def commitment_loss(x, centroids):
  """lucidrains' `Kmeans.forward` loss: `mean((x^ - mu_{nearest(x^)})^2)` over all elements, with
  gradient into x only (the centroids are buffers). `x [B, T, H, D]` (times `commitment` = 1e-4
  there)."""
  xu = _unit(x)
  cent = jax.lax.stop_gradient(centroids).astype(jnp.float32)
  bucket = _kmeans_buckets(jax.lax.stop_gradient(xu), cent)                    # [B, H, T]
  routed = cent[jnp.arange(cent.shape[0])[None, :, None], bucket]               # [B, H, T, D]
  return jnp.mean((xu - routed.transpose(0, 2, 1, 3)) ** 2)


def balanced_routing_attention(q, k, v, centroids, *, window: int, shared_qk: bool = False,
                               scale=None):
  """Non-causal Routing Transformer attention as lucidrains/routing-transformer `KmeansAttention`
  on `[B, T, H, D]` (GQA: kv heads repeated) -> `[B, Tq, H, Dv]`.

  Balanced membership both ways (`distribution`): centroid c takes its `w = min(window, Tq)`
  most similar queries and its `min(window, Tk)` most similar keys (unit vectors against the
  stored centroids), each sorted by position; every cluster is one softmax window of w queries
  over its keys; a token's output is the mean over the windows it is in (`scatter_mean`, eps
  1e-5), zero if it is in none. `shared_qk=True` (the paper's shared projection; pass k = q):
  clusters come from the keys alone, queries = keys, keys unit-normalised, and a token's logit on
  itself is -5e4 (attended only when nothing else is). Detached routing; O(C * w^2) per head.
  """
  _check_bthd(q, k, v)
  b, tq, h, d = q.shape
  tk = k.shape[1]
  if centroids.ndim != 3 or centroids.shape[0] != h or centroids.shape[2] != d:
    raise ValueError(f"centroids must be [H={h}, C, D={d}], got {centroids.shape}")
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  if shared_qk and tq != tk:
    raise ValueError(f"shared_qk needs Tq == Tk (k is q), got {tq}, {tk}")
  scale = d ** -0.5 if scale is None else scale
  g = h // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  cent = jax.lax.stop_gradient(centroids).astype(jnp.float32)

  def members(x, w):   # [B, H, C, w] sorted token indices: each centroid's w nearest tokens
    dist = jnp.einsum("bthd,hcd->bhct", _unit(jax.lax.stop_gradient(x)), cent)
    return jnp.sort(jax.lax.top_k(dist, w)[1], -1)

  kidx = members(k, min(window, tk))
  qidx = kidx if shared_qk else members(q, min(window, tq))
  if shared_qk:
    k = _unit(k).astype(q.dtype)
  take = lambda a, idx: jnp.take_along_axis(a.transpose(0, 2, 1, 3)[:, :, None],
                                            idx[..., None], axis=3)         # [B, H, C, w, D]
  qw, kw, vw = take(q, qidx), take(k, kidx), take(v, kidx)
  s = jnp.einsum("bhcid,bhcjd->bhcij", qw, kw, preferred_element_type=jnp.float32) * scale
  if shared_qk:
    s = jnp.where(qidx[..., :, None] == kidx[..., None, :], -5e4, s)
  o = jnp.einsum("bhcij,bhcjd->bhcid", jax.nn.softmax(s, -1), vw.astype(jnp.float32))
  onehot = jax.nn.one_hot(qidx, tq, dtype=jnp.float32)                      # [B, H, C, w, Tq]
  num = jnp.einsum("bhcit,bhcid->bhtd", onehot, o)
  den = onehot.sum((2, 3))[..., None]
  return (num / (den + 1e-5)).transpose(0, 2, 1, 3).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# Dynamic Mask Attention
# ---------------------------------------------------------------------------------------------


def dma_key_bias(v, dt_weight, a_log):
  """DMA (Shi et al. 2025, arXiv:2508.02124) per-key bias `b [B, H, T] = exp(A_h * softplus(flatten_heads(V) W_dt))`.

  `v [B, T, Hk, Dv]`, `dt_weight [Hk * Dv, H]`, `a_log`-named `A [H]` (flash-dmattn's `A`, used as
  is: negative A gives biases in (0, 1], zero A gives 1 for every key)."""
  b, t = v.shape[:2]
  dt = v.reshape(b, t, -1).astype(jnp.float32) @ dt_weight.astype(jnp.float32)  # [B, T, H]
  return jnp.exp(a_log.astype(jnp.float32) * jax.nn.softplus(dt)).transpose(0, 2, 1)


def dma_mask(bias, tq: int, *, keep_window: int, causal: bool = True):
  """`[B, H, Tq, Tk]` bool: per query, the `keep_window` visible keys with the largest bias (all
  visible keys when fewer): Doge's `prepare_dynamic_mask` (top-k over the causally masked bias)."""
  b, h, tk = bias.shape
  s = jnp.broadcast_to(bias[:, :, None, :], (b, h, tq, tk))
  if causal:
    vis = jnp.arange(tk)[None, :] <= jnp.arange(tq)[:, None] + (tk - tq)
    s = jnp.where(vis, s, -jnp.inf)
  kk = min(keep_window, tk)
  vals, idx = jax.lax.top_k(jax.lax.stop_gradient(s), kk)
  sel = jnp.zeros(s.shape, bool).at[
      jnp.arange(b)[:, None, None, None], jnp.arange(h)[None, :, None, None],
      jnp.arange(tq)[None, None, :, None], idx].set(vals > -jnp.inf)
  return sel


def _dma_choice(implementation, causal):
  if causal and implementation in ("xla", "pallas"):
    raise ValueError(f"dma_attention: implementation={implementation!r} cannot serve causal=True: "
                     "the causal selection is per query prefix, which only the dense "
                     "implementation='reference' (or None) computes")
  if implementation == "pallas":
    raise ValueError("dma_attention: implementation='pallas' cannot serve this call: the flash "
                     "kernel takes no per-key bias (bias_k)")
  if implementation is not None:
    return implementation, "explicit choice"
  if causal:
    return "reference", "causal selection is per query prefix: dense mask"
  return "xla", "gather over the selected key blocks (the flash kernel takes no per-key bias)"


@dispatch.dispatching_op
def dma_attention(q, k, v, bias, *, keep_window: int, causal: bool = True, scale=None,
                  block: int = 64, implementation: str | None = None):
  """DMA (Shi et al. 2025, arXiv:2508.02124) on `[B, T, H, D]`: `softmax_j(scale q_i.k_j + b_{h,j})` over the top-`keep_window`
  keys by `b` (`bias [B, H, Tk]`, `dma_key_bias`) among the visible ones. Paper: keep_window 2048.

  Non-causal the selection is query-agnostic, so the block-sparse path lists only key blocks holding
  a selected key (`max_kv <= keep_window`) and hides the rest of their keys through the additive
  per-key bias ("xla"; the flash kernel takes no per-key bias, so "pallas" raises). Causal selection
  depends on the query's prefix; that case (and `implementation="reference"`) uses the dense mask
  (O(T^2) memory: the exact per-query prefix top-w), so explicit "xla" / "pallas" raise there.
  With `keep_window >= Tk` every visible key is kept: dense attention with a per-key bias (oracle).
  """
  _check_bthd(q, k, v)
  b, tq, h, _ = q.shape
  tk = k.shape[1]
  if bias.shape != (b, h, tk):
    raise ValueError(f"bias must be [B, H, Tk] = [{b}, {h}, {tk}], got {bias.shape}")
  if keep_window < 1:
    raise ValueError(f"keep_window must be >= 1, got {keep_window}")
  dispatch.check_implementation(implementation, op="dma_attention")
  dispatch.note("dma_attention", lambda be: _dma_choice(implementation, causal))
  _dma_choice(implementation, causal)  # raises for a choice that cannot serve the call
  if causal or implementation == "reference":
    mask = dma_mask(bias, tq, keep_window=keep_window, causal=causal)
    return dot_product_attention(q, k, v, mask=mask, bias=bias[:, :, None, :], scale=scale,
                                 implementation="reference")
  kk = min(keep_window, tk)
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(bias), kk)                       # [B, H, kk]
  sel = jnp.zeros(bias.shape, bool).at[jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None],
                                       idx].set(True)
  nk, nq = -(-tk // block), -(-tq // block)
  selp = jnp.pad(sel, ((0, 0), (0, 0), (0, nk * block - tk)))
  blocks = jnp.broadcast_to(selp.reshape(b, h, nk, block).any(-1)[:, :, None, :], (b, h, nq, nk))
  lay = L.from_block_mask(blocks, None, block_q=block, block_k=block, tq=tq, tk=tk,
                          max_kv=min(nk, kk), max_q=nq)
  bias_k = jnp.where(sel, bias, -jnp.inf)
  return block_sparse.block_sparse_attention(q, k, v, lay, scale=scale, bias_k=bias_k,
                                             implementation=implementation)


# ---------------------------------------------------------------------------------------------
# Re-ttention
# ---------------------------------------------------------------------------------------------


def rettention_statistics(q, k, v, layout: L.BlockLayout, *, scale=None):
  """At a full step: `(rho [B, H, Tq], residual [B, Tq, H, Dv])` with `rho_i = sum_{j in S} e^{s_ij}
  / sum_j e^{s_ij} = exp(lse_sparse - lse_full)` and `residual = O_full - rho O_sparse`.

  Reading ("from abstract + summary"): the residual is taken after the mass rescale, so that the
  reconstruction `rho O_sparse + residual` is exactly the full attention at the calibration step.
  """
  of, lf = dot_product_attention(q, k, v, scale=scale, return_lse=True, implementation="reference")
  os_, ls = block_sparse.block_sparse_attention(q, k, v, layout, scale=scale, return_lse=True)
  rho = jnp.where(jnp.isfinite(ls), jnp.exp(ls - lf), 0.0)
  residual = of.astype(jnp.float32) - rho.transpose(0, 2, 1)[..., None] * os_.astype(jnp.float32)
  return rho, residual


def rettention_attention(q, k, v, layout: L.BlockLayout, rho, residual, *, scale=None):
  """Re-ttention (Chen et al. 2025, arXiv:2505.22918) sparse step: `rho_i O_sparse,i + residual_i` with cached statistics."""
  o = block_sparse.block_sparse_attention(q, k, v, layout, scale=scale)
  out = rho.transpose(0, 2, 1)[..., None] * o.astype(jnp.float32) + residual
  return out.astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# Top-k key reuse: Recycled Attention, HyLRA
# ---------------------------------------------------------------------------------------------


def topk_key_indices(q, k, top_k: int, *, causal: bool = False, scale=None):
  """From a full pass: `[B, Hk, top_k]` key indices (sorted) with the largest attention mass summed
  over the GQA group's query heads and the given queries (Recycled Attention records them per group
  at a full step; HyLRA's full layers pass them to reuse layers). `top_k >= Tk` keeps all keys."""
  _check_bthd(q, k, k)
  b, tq, h, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  kr = jnp.repeat(k, h // hk, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kr, preferred_element_type=jnp.float32) * scale
  if causal:
    s = jnp.where(jnp.arange(tk)[None, :] <= jnp.arange(tq)[:, None] + (tk - tq), s, -jnp.inf)
  p = jax.nn.softmax(s, -1)
  p = jnp.where(jnp.isfinite(p), p, 0.0)
  mass = p.sum(2).reshape(b, hk, h // hk, tk).sum(2)                  # [B, Hk, Tk]
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(mass), min(top_k, tk))
  return jnp.sort(idx, -1).astype(jnp.int32)


def attend_to_indices(q, k, v, indices, *, scale=None, recent_from: int | None = None,
                      causal: bool = False):
  """Attention of `q [B, Tq, H, D]` over the keys `indices [B, Hk, K]` of its GQA group (gathered:
  memory O(K)), plus, if `recent_from` is given, every key at position >= recent_from (the tokens
  generated since the last full step, Recycled Attention). `causal` additionally hides keys after
  each query (bottom-right aligned). Keys listed twice count once."""
  _check_bthd(q, k, v)
  b, tq, h, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  g = h // hk
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(hk)[None, :, None]
  ok_idx = jnp.ones(indices.shape, bool)
  if recent_from is not None:
    ok_idx = indices < recent_from               # the recent tail is attended densely below
    tail = jnp.arange(recent_from, tk)
    indices = jnp.concatenate([indices, jnp.broadcast_to(tail, (b, hk, tail.shape[0]))], -1)
    ok_idx = jnp.concatenate([ok_idx, jnp.ones((b, hk, tail.shape[0]), bool)], -1)
  kg, vg = k[bi, indices, hi], v[bi, indices, hi]                     # [B, Hk, K', D]
  qg = q.reshape(b, tq, hk, g, d)
  s = jnp.einsum("bqhgd,bhkd->bhgqk", qg, kg, preferred_element_type=jnp.float32) * scale
  ok = ok_idx[:, :, None, None, :]
  if causal:
    ok = ok & (indices[:, :, None, None, :] <= (jnp.arange(tq) + tk - tq)[:, None])
  ok = jnp.broadcast_to(ok, s.shape)
  o = _masked_softmax_attend(s, ok, vg[:, :, None, None])              # [B, Hk, g, Tq, Dv]
  return o.transpose(0, 3, 1, 2, 4).reshape(b, tq, h, v.shape[-1]).astype(q.dtype)


def indices_mask(indices, tq: int, tk: int, num_heads: int, *, recent_from: int | None = None,
                 causal: bool = False):
  """`[B, H, Tq, Tk]` bool: the dense mask of `attend_to_indices` (the oracle)."""
  b, hk, _ = indices.shape
  m = jnp.zeros((b, hk, tk), bool).at[jnp.arange(b)[:, None, None], jnp.arange(hk)[None, :, None],
                                      indices].set(True)
  if recent_from is not None:
    m = m | (jnp.arange(tk) >= recent_from)
  m = jnp.repeat(m, num_heads // hk, axis=1)[:, :, None, :]
  m = jnp.broadcast_to(m, (b, num_heads, tq, tk))
  if causal:
    m = m & (jnp.arange(tk)[None, :] <= jnp.arange(tq)[:, None] + (tk - tq))
  return m


# ---------------------------------------------------------------------------------------------
# Landmark attention
# ---------------------------------------------------------------------------------------------


def landmark_positions(t: int, block: int):
  """`(is_landmark [T], p [T])` for a sequence with a landmark after every `block` tokens: position
  j is a landmark iff `j % (block + 1) == block`; `p_j` is the landmark of j's block (j itself for a
  landmark, T when j's block is the incomplete last one)."""
  j = np.arange(t)
  is_lm = j % (block + 1) == block
  p = np.where(is_lm, j, (j // (block + 1)) * (block + 1) + block)
  return is_lm, np.where(p >= t, t, p)


def landmark_weights(q, k, block: int, *, top_k: int | None = None, scale=None, q_pos=None,
                     key_mask=None):
  """Landmark attention's causal weights `[B, H, Tq, Tk]` (grouped softmax, Mohtashami & Jaggi 2023).

  Groups for query i and key j <= i: `G_ij = p_j` for a normal key, `-1` for i's own landmark, `p_i`
  for other landmarks (they compete with i's block). `S = softmax of the scores inside each group`;
  the weight is 0 on landmarks, `S_ij` when `G_ij = G_ii`, else `S_ij * S_{i, p_j}` (a block's tokens
  are gated by its landmark), so normal rows sum to 1. `top_k` (inference retrieval) keeps, per
  query, only the k other blocks whose landmarks score highest; the rest leave the softmax; top_k >=
  #blocks is the training-time grouped softmax (the defining property). Dense O(Tq * Tk): a reference,
  checked against the paper's equations (read via a public summary of the paper's Section 3.1).

  Decoding: `q_pos [Tq]` (int, may be traced) are the queries' positions in the key sequence
  (default: bottom-right aligned, `Tk - Tq + arange(Tq)`) and `key_mask [..., Tq, Tk]` (bool) hides
  the cache slots not yet written; a query then retrieves blocks through their landmarks exactly
  as in the full forward (its own block's landmark, still in the future, plays no part).
  """
  b, tq, h, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  is_lm_np, p_np = landmark_positions(tk, block)
  is_lm, p = jnp.asarray(is_lm_np), jnp.asarray(p_np)
  i = (jnp.arange(tq) + (tk - tq) if q_pos is None else jnp.asarray(q_pos))[:, None]
  j = jnp.arange(tk)[None, :]
  p_i = jnp.where(i % (block + 1) == block, i, (i // (block + 1)) * (block + 1) + block)
  p_i = jnp.minimum(p_i, tk)                       # the same clip as p: one group per row
  group = jnp.where(~is_lm[None, :], p[None, :], jnp.where(p_i == j, -1, p_i))    # [Tq, Tk]
  vis = j <= i
  kr = jnp.repeat(k, h // hk, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kr, preferred_element_type=jnp.float32) * scale
  vis = jnp.broadcast_to(vis, s.shape)
  if key_mask is not None:
    vis = vis & key_mask
  if top_k is not None:
    # Keep the top-k other-block landmarks per query; the others, and their blocks' tokens, leave
    # the grouped softmax (retrieval).
    other_lm = is_lm[None, :] & (p_i != j) & vis
    ls = jnp.where(other_lm, jax.lax.stop_gradient(s), -jnp.inf)
    thr = jax.lax.top_k(ls, min(top_k, tk))[0][..., -1:]
    dropped_lm = other_lm & (ls < thr)                                   # [B, H, Tq, Tk]
    lm_of_j = jnp.minimum(p, tk - 1)
    other_block_tok = ~is_lm[None, :] & (p[None, :] != p_i) & (p[None, :] < tk)
    vis = vis & ~dropped_lm & ~(other_block_tok & dropped_lm[..., lm_of_j])
  s = jnp.where(vis, s, -jnp.inf)
  row = jnp.arange(tq)[:, None]
  gid = jnp.where(group < 0, tk + 1, group) + (tk + 2) * row           # [Tq, Tk] row-unique ids
  nseg = tq * (tk + 2)
  per_row = lambda f: jax.vmap(jax.vmap(lambda x: f(x.ravel(), gid.ravel(), nseg)))
  # Per-group max (not per-row): a group far below the row max must not underflow to zero.
  gmax = jax.lax.stop_gradient(per_row(jax.ops.segment_max)(s))[..., gid]
  e = jnp.where(vis, jnp.exp(jnp.where(vis, s - gmax, 0.0)), 0.0)
  den = per_row(jax.ops.segment_sum)(e)[..., gid]                       # [B, H, Tq, Tk]
  sm = jnp.where(vis, e / jnp.where(den > 0, den, 1.0), 0.0)
  own = jnp.where(i[:, 0] % (block + 1) == block, -1, p_i[:, 0])   # G_ii
  same = group == own[:, None]
  gate = jnp.take_along_axis(sm, jnp.broadcast_to(jnp.minimum(p, tk - 1)[None, None, None, :],
                                                  sm.shape), axis=-1)
  w = jnp.where(same, sm, sm * gate)
  return jnp.where(is_lm[None, :], 0.0, w)


def landmark_attention(q, k, v, block: int, *, top_k: int | None = None, scale=None, q_pos=None,
                       key_mask=None):
  """Landmark attention (Mohtashami & Jaggi 2023, arXiv:2305.16300) on `[B, T, H, D]` whose tokens include a landmark after every `block`
  tokens (`landmark_positions`; `attnjax.data.landmark.insert_landmarks` puts them there):
  `o_i = sum_j w_ij v_j` with `landmark_weights` (`q_pos`, `key_mask`: decoding against a cache).
  Paper: block 50, k = 4 retrieved blocks at inference."""
  _check_bthd(q, k, v)
  if block < 1:
    raise ValueError(f"block must be >= 1, got {block}")
  w = landmark_weights(q, k, block, top_k=top_k, scale=scale, q_pos=q_pos, key_mask=key_mask)
  vr = jnp.repeat(v, q.shape[2] // k.shape[2], axis=2).astype(jnp.float32)
  return jnp.einsum("bhqk,bkhd->bqhd", w, vr).astype(q.dtype)
