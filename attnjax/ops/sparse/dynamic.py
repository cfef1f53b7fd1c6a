"""Content-routed sparse attention and corrections on top of a sparse pass (catalog S).

* Routing Transformer [29]: k-means routing with balanced clusters (each centroid takes its top-w
  tokens), online EMA centroids.
* Trainable Dynamic Mask attention (DMA) [110]: query-agnostic per-key bias from V, top-w keys.
* Re-ttention [38]: statistical reshape of an ultra-sparse pass (mass ratio + cached residual).
* Top-k key reuse (Recycled Attention [68], HyLRA [79]): a full pass records the top-k keys per
  GQA group; later steps / reuse layers attend only to them.
Each comes with a dense-masked reference (`*_reference` or `implementation="reference"`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.cab import PatternUndefinedError
from attnjax.ops import block_sparse
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
  """Detached unit-vector similarities to the centroids: `(q [B, H, Tq, C], k [B, H, C, Tk])`."""
  h = centroids.shape[0]
  if q.shape[2] != h:
    raise ValueError(f"centroids must be [H={q.shape[2]}, C, D], got {centroids.shape}")
  g = q.shape[2] // k.shape[2]
  mu = _unit(jax.lax.stop_gradient(centroids))
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
  """Routing Transformer attention [29] on `[B, T, H, D]` -> `[B, Tq, H, Dv]`.

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


def update_centroids(centroids, x, decay: float = 0.999):
  """Online k-means step: `mu_c <- decay mu_c + (1 - decay) mean{x^_i : argmax_c' x^_i.mu_c' = c}`,
  then re-normalised; clusters with no member keep their centroid. `x [B, T, H, D]`."""
  h, c, _ = centroids.shape
  xu = _unit(jax.lax.stop_gradient(x))
  assign = jnp.argmax(jnp.einsum("bthd,hcd->bhtc", xu, _unit(centroids)), -1)     # [B, H, T]
  onehot = jax.nn.one_hot(assign, c, dtype=jnp.float32)                           # [B, H, T, C]
  sums = jnp.einsum("bhtc,bthd->hcd", onehot, xu)
  counts = onehot.sum((0, 2))[..., None]                                           # [H, C, 1]
  new = decay * centroids + (1 - decay) * sums / jnp.maximum(counts, 1.0)
  return jnp.where(counts > 0, _unit(new), centroids)


# ---------------------------------------------------------------------------------------------
# Dynamic Mask Attention
# ---------------------------------------------------------------------------------------------


def dma_key_bias(v, dt_weight, a_log):
  """DMA [110] per-key bias `b [B, H, T] = exp(A_h * softplus(flatten_heads(V) W_dt))`.

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


def dma_attention(q, k, v, bias, *, keep_window: int, causal: bool = True, scale=None,
                  block: int = 64, implementation: str = "block_sparse"):
  """DMA [110] on `[B, T, H, D]`: `softmax_j(scale q_i.k_j + b_{h,j})` over the top-`keep_window`
  keys by `b` (`bias [B, H, Tk]`, `dma_key_bias`) among the visible ones. Paper: keep_window 2048.

  Non-causal the selection is query-agnostic, so the block-sparse path lists only key blocks holding
  a selected key (`max_kv <= keep_window`) and hides the rest of their keys through the additive
  per-key bias. Causal selection depends on the query's prefix; that case (and
  `implementation="reference"`) uses the dense mask (O(T^2) memory: the exact per-query prefix top-w).
  With `keep_window >= Tk` every visible key is kept: dense attention with a per-key bias (oracle).
  """
  _check_bthd(q, k, v)
  b, tq, h, _ = q.shape
  tk = k.shape[1]
  if bias.shape != (b, h, tk):
    raise ValueError(f"bias must be [B, H, Tk] = [{b}, {h}, {tk}], got {bias.shape}")
  if keep_window < 1:
    raise ValueError(f"keep_window must be >= 1, got {keep_window}")
  if implementation not in ("block_sparse", "reference"):
    raise ValueError(f"implementation must be 'block_sparse' or 'reference', got {implementation!r}")
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
  return block_sparse.block_sparse_attention(q, k, v, lay, scale=scale, bias_k=bias_k)


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
  """Re-ttention [38] sparse step: `rho_i O_sparse,i + residual_i` with cached statistics."""
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


def landmark_weights(q, k, block: int, *, top_k: int | None = None, scale=None):
  """Landmark attention's causal weights `[B, H, T, T]` (grouped softmax, Mohtashami & Jaggi 2023).

  Groups for query i and key j <= i: `G_ij = p_j` for a normal key, `-1` for i's own landmark, `p_i`
  for other landmarks (they compete with i's block). `S = softmax of the scores inside each group`;
  the weight is 0 on landmarks, `S_ij` when `G_ij = G_ii`, else `S_ij * S_{i, p_j}` (a block's tokens
  are gated by its landmark), so normal rows sum to 1. `top_k` (inference retrieval) keeps, per
  query, only the k other blocks whose landmarks score highest; the rest leave the softmax; top_k >=
  #blocks is the training-time grouped softmax (catalog oracle). Dense O(T^2): a reference, checked
  against the paper's equations (read via a public summary of the paper's Section 3.1).
  """
  b, t, h, d = q.shape
  hk = k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  is_lm, p = landmark_positions(t, block)
  i = np.arange(t)[:, None]
  j = np.arange(t)[None, :]
  group = np.where(~is_lm[None, :], p[None, :], np.where(p[:, None] == j, -1, p[:, None]))
  vis = j <= i
  kr = jnp.repeat(k, h // hk, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kr, preferred_element_type=jnp.float32) * scale
  vis = jnp.broadcast_to(jnp.asarray(vis), s.shape)
  if top_k is not None:
    # Keep the top-k other-block landmarks per query; the others, and their blocks' tokens, leave
    # the grouped softmax (retrieval).
    other_lm = jnp.asarray(is_lm[None, :] & (p[:, None] != j) & (j <= i))
    ls = jnp.where(other_lm, jax.lax.stop_gradient(s), -jnp.inf)
    thr = jax.lax.top_k(ls, min(top_k, t))[0][..., -1:]
    dropped_lm = other_lm & (ls < thr)                                   # [B, H, T, T]
    lm_of_j = np.minimum(p, t - 1)
    other_block_tok = jnp.asarray(~is_lm[None, :] & (p[None, :] != p[:, None]) & (p[None, :] < t))
    vis = vis & ~dropped_lm & ~(other_block_tok & dropped_lm[..., lm_of_j])
  vis = jnp.broadcast_to(jnp.asarray(vis), s.shape)
  s = jnp.where(vis, s, -jnp.inf)
  gid = jnp.asarray(np.where(group < 0, t + 1, group) + (t + 2) * i)    # [T, T] row-unique ids
  nseg = t * (t + 2)
  per_row = lambda f: jax.vmap(jax.vmap(lambda x: f(x.ravel(), gid.ravel(), nseg)))
  # Per-group max (not per-row): a group far below the row max must not underflow to zero.
  gmax = jax.lax.stop_gradient(per_row(jax.ops.segment_max)(s))[..., gid]
  e = jnp.where(vis, jnp.exp(jnp.where(vis, s - gmax, 0.0)), 0.0)
  den = per_row(jax.ops.segment_sum)(e)[..., gid]                       # [B, H, T, T]
  sm = jnp.where(vis, e / jnp.where(den > 0, den, 1.0), 0.0)
  same = jnp.asarray(group == np.diagonal(group)[:, None])
  gate = jnp.take_along_axis(sm, jnp.broadcast_to(jnp.asarray(np.minimum(p, t - 1))[None, None,
                                                                                   None, :],
                                                  sm.shape), axis=-1)
  w = jnp.where(same, sm, sm * gate)
  return jnp.where(jnp.asarray(is_lm)[None, :], 0.0, w)


def landmark_attention(q, k, v, block: int, *, top_k: int | None = None, scale=None):
  """Landmark attention [53] on `[B, T, H, D]` whose tokens include a landmark after every `block`
  tokens (`landmark_positions`): `o_i = sum_j w_ij v_j` with `landmark_weights`. Paper: block 50,
  k = 4 retrieved blocks at inference."""
  _check_bthd(q, k, v)
  if block < 1:
    raise ValueError(f"block must be >= 1, got {block}")
  w = landmark_weights(q, k, block, top_k=top_k, scale=scale)
  vr = jnp.repeat(v, q.shape[2] // k.shape[2], axis=2).astype(jnp.float32)
  return jnp.einsum("bhqk,bkhd->bqhd", w, vr).astype(q.dtype)
