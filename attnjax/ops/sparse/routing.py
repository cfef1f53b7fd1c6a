"""Dynamic block routers that build a `BlockLayout` on device (static `top_k`, jit-safe).

* MoBA (Wu et al. 2025, arXiv:2506.23858): per-token top-k key chunks by `q . mean(K_chunk)`; causal mode forces the current
  chunk and forbids future ones (MoonshotAI/MoBA's gate as summarised in the shared notes).
* BiFormer bi-level routing attention (Zhu et al. 2023, arXiv:2303.08810): region-mean affinity, top-k regions per region,
  routing shared by all heads and detached, token attention over the routed regions.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.ops import block_sparse
from attnjax.ops import dispatch
from attnjax.ops import layout as L


def _chunk_means(k, chunk):
  """`k [B, T, Hk, D]` -> `[B, Hk, nC, D]` float32 means of each chunk (last chunk may be short)."""
  b, t, hk, d = k.shape
  nc = -(-t // chunk)
  kp = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, nc * chunk - t), (0, 0), (0, 0)))
  sums = kp.reshape(b, nc, chunk, hk, d).sum(2)
  sizes = jnp.minimum(chunk, t - jnp.arange(nc) * chunk).astype(jnp.float32)
  return (sums / sizes[None, :, None, None]).transpose(0, 2, 1, 3)


def _own_chunk_prefix_gate(q, k, chunk_size, h):
  """`[B, H, Tq]` float32: `q_i . mean(k_j, chunk_start(i) <= j <= i)`, the causal gate of each
  query's own chunk over the keys it may see (Tq == Tk aligned bottom-right)."""
  b, tq, _, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  pos = jnp.arange(tq) + (tk - tq)
  kf = jax.lax.stop_gradient(k).astype(jnp.float32)
  csum = jnp.cumsum(kf, axis=1)                                             # [B, Tk, Hk, D]
  start = (pos // chunk_size) * chunk_size
  before = jnp.where((start > 0)[None, :, None, None],
                     jnp.take(csum, jnp.maximum(start - 1, 0), axis=1), 0.0)
  mean = (jnp.take(csum, pos, axis=1) - before) / (pos - start + 1).astype(jnp.float32)[
      None, :, None, None]                                                  # [B, Tq, Hk, D]
  mean = jnp.repeat(mean, h // hk, axis=2)
  return jnp.einsum("bthd,bthd->bht", jax.lax.stop_gradient(q).astype(jnp.float32), mean)


def _vmoba_threshold_select(gate, valid, own_mask, threshold: float, cap: int):
  """VMoBA's per-(query, head) threshold selection (KwaiVGI/VMoBA `src/vmoba.py`,
  `_select_threshold_query_head`) on `gate [..., nC]`: gates min-max normalised over the valid
  chunks; the own chunk's share of the normalised mass counts first, then the other chunks are
  added in decreasing order up to and including the first one at which the cumulative share
  reaches `threshold` (so at least one other chunk whenever one is valid, as in the authors' code);
  at most `cap` chunks in all (a static cap for static shapes; the authors' code has none)."""
  eps = 1e-6
  nc = gate.shape[-1]
  gmin = jnp.min(jnp.where(valid, gate, jnp.inf), -1, keepdims=True)
  gmax = jnp.max(jnp.where(valid, gate, -jnp.inf), -1, keepdims=True)
  denom = gmax - gmin
  denom = jnp.where(denom <= eps, 1.0, denom)
  norm = jnp.where(valid, (gate - gmin) / denom, 0.0)
  total = norm.sum(-1, keepdims=True)
  has_own = (own_mask & valid).any(-1, keepdims=True)
  remain = jnp.maximum(threshold - (norm * own_mask).sum(-1, keepdims=True) / (total + eps), 0.0)
  others = valid & ~own_mask
  # Invalid chunks sort last (the authors' zeros tie with them and are dropped by `valid` after).
  vals, idx = jax.lax.top_k(jnp.where(others, norm, -1.0), nc)
  ratio = jnp.cumsum(jnp.maximum(vals, 0.0), -1) / (total + eps)
  cond = ratio >= remain
  cutoff = jnp.where(cond.any(-1, keepdims=True), jnp.argmax(cond, -1)[..., None], nc - 1)
  rank = jnp.arange(nc)
  take = (rank <= cutoff) & (rank < cap - has_own.astype(jnp.int32)) & (vals >= 0)
  chosen = ((idx[..., None] == rank) & take[..., None]).any(-2)
  return (chosen | own_mask) & valid


def moba_selection(q, k, *, chunk_size: int, top_k: int, causal: bool = True,
                   threshold: float | None = None):
  """MoBA gate: `[B, H, Tq, nC]` bool, the top-k chunks of every query token (Tq == Tk assumed
  aligned bottom-right when causal). Causal: the query's own chunk is always selected, future
  chunks never; fewer than k chunks are selected when fewer are visible. Not differentiable.

  `threshold` (VMoBA's threshold selection, `_vmoba_threshold_select`): the own chunk plus other
  chunks in decreasing gate order until their min-max-normalised gate mass reaches `threshold`,
  at most `top_k` chunks. The own chunk is the one holding the query's (aligned) position; when
  `Tq != Tk` and not causal there is none. Causal (an extension: VMoBA is non-causal): only
  visible chunks compete, and the own chunk's gate is `q . mean` of its keys up to the query, so
  no selection reads a later key.
  """
  if threshold is not None and not 0.0 <= threshold <= 1.0:
    raise ValueError(f"threshold must be in [0, 1], got {threshold}")
  b, tq, h, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  nc = -(-tk // chunk_size)
  kk = min(top_k, nc)
  means = _chunk_means(jax.lax.stop_gradient(k), chunk_size)               # [B, Hk, nC, D]
  means = jnp.repeat(means, h // hk, axis=1)
  gate = jnp.einsum("bthd,bhcd->bhtc", jax.lax.stop_gradient(q).astype(jnp.float32), means)
  c = jnp.arange(nc)[None]
  own = ((jnp.arange(tq) + (tk - tq)) // chunk_size)[:, None]
  if threshold is not None:
    own_mask = (c == own) if (causal or tq == tk) else jnp.zeros((tq, nc), bool)
    valid = (c <= own) if causal else jnp.ones((tq, nc), bool)
    if causal:
      gate = jnp.where(own_mask, _own_chunk_prefix_gate(q, k, chunk_size, h)[..., None], gate)
    return _vmoba_threshold_select(gate, jnp.broadcast_to(valid, gate.shape),
                                   jnp.broadcast_to(own_mask, gate.shape), threshold, kk)
  if causal:
    gate = jnp.where(c > own, -jnp.inf, jnp.where(c == own, jnp.inf, gate))
  vals, idx = jax.lax.top_k(gate, kk)
  onehot = (idx[..., None] == jnp.arange(nc)) & (vals > -jnp.inf)[..., None]
  return onehot.any(-2)


def moba_layout(q, k, *, chunk_size: int, top_k: int, causal: bool = True,
                block_q: int = 1, threshold: float | None = None) -> L.BlockLayout:
  """Device-built MoBA layout: key blocks = chunks; a query block lists the union of its tokens'
  chunks (`max_kv = min(nC, block_q * top_k)`), and `query_block_select` keeps each token to its
  own chunks. `block_q=1` lists exactly each token's chunks (the plain-JAX default)."""
  if chunk_size < 1 or top_k < 1 or block_q < 1:
    raise ValueError(f"chunk_size, top_k and block_q must be >= 1, got {chunk_size}, {top_k}, "
                     f"{block_q}")
  sel = moba_selection(q, k, chunk_size=chunk_size, top_k=top_k, causal=causal,
                       threshold=threshold)
  return chunk_selection_layout(sel, q.shape[1], k.shape[1], chunk_size=chunk_size, top_k=top_k,
                                causal=causal, block_q=block_q)


def chunk_selection_layout(sel, tq: int, tk: int, *, chunk_size: int, top_k: int,
                           causal: bool = True, block_q: int = 1) -> L.BlockLayout:
  """Layout of a per-token chunk selection `sel [B, H, Tq, nC]` (bool, at most `top_k` per row):
  key blocks = chunks, a query block lists the union of its tokens' chunks, `query_block_select`
  keeps each token to its own chunks (`block_q > 1`), causal rule on partial chunks. Shared by MoBA
  and SEA (any router that picks whole key chunks per query token)."""
  nc, nq = -(-tk // chunk_size), -(-tq // block_q)
  if sel.ndim != 4 or sel.shape[-2:] != (tq, nc):
    raise ValueError(f"sel must be [B, H, Tq={tq}, nC={nc}], got {sel.shape}")
  selp = jnp.pad(sel, ((0, 0), (0, 0), (0, nq * block_q - tq), (0, 0)))
  blocks = selp.reshape(sel.shape[0], sel.shape[1], nq, block_q, nc).any(3)
  max_kv = min(nc, block_q * min(top_k, nc))
  rule = L.CausalRule(tk - tq) if causal else None
  partial = None
  if causal:
    # A chunk is full for a query block iff it ends at or before the block's first query position.
    first_q = jnp.arange(nq) * block_q + (tk - tq)
    chunk_end = jnp.arange(nc) * chunk_size + chunk_size - 1
    partial = blocks & (chunk_end[None, :] > first_q[:, None])
  return L.from_block_mask(blocks, partial, block_q=block_q, block_k=chunk_size,
                           tq=tq, tk=tk, mask_rule=rule, max_kv=max_kv,
                           query_block_select=None if block_q == 1 else sel)


def moba_attention(q, k, v, *, chunk_size: int, top_k: int, causal: bool = True, scale=None,
                   q_segment_ids=None, kv_segment_ids=None, block_q: int = 1, return_lse=False,
                   implementation: str | None = None, threshold: float | None = None):
  """MoBA (Wu et al. 2025, arXiv:2506.23858) on `[B, T, H, D]`: softmax over the union of each query's top-k chunks of
  `chunk_size` keys (causal inside the current chunk). Paper: chunk 512, k 3 (8K context).
  `implementation` goes to `block_sparse_attention` (None, "xla", "pallas" or "reference": the same
  selection as a dense mask, the oracle); "pallas" needs `block_q > 1` (a selection shared by the
  queries of a block) and power-of-two blocks."""
  lay = moba_layout(q, k, chunk_size=chunk_size, top_k=top_k, causal=causal, block_q=block_q,
                    threshold=threshold)
  dispatch.check_implementation(implementation, op="moba_attention")
  fn = functools.partial(block_sparse.block_sparse_attention, implementation=implementation)
  return fn(q, k, v, lay, scale=scale, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
            return_lse=return_lse)


def vmoba_attention(q, k, v, block_shape, *, top_k: int, threshold: float | None = None,
                    scale=None, implementation: str | None = None):
  """VMoBA (Wu et al. 2025, arXiv:2506.23858) on video-like `[B, *spatial, H, D]` (1 to 3 spatial dims, e.g. `(F, X, Y)`).

  Keys are partitioned into `block_shape` blocks (a 1D temporal, 2D spatial or 3D partition: VMoBA
  cycles 1D -> 2D -> 3D by layer, which is the model's choice of `block_shape`); tokens are permuted
  block-major so every block is one MoBA chunk, and each query attends its top-k (or threshold-
  selected) blocks by `q . mean(K_block)`, non-causally (diffusion). `block_shape` must divide the
  spatial shape (an entry equal to the size means "whole dimension").
  """
  rank = q.ndim - 3
  spatial = q.shape[1:1 + rank]
  if len(block_shape) != rank or any(b < 1 or s % b for s, b in zip(spatial, block_shape)):
    raise ValueError(f"block_shape {block_shape} must have {rank} entries dividing {spatial}")
  b, h = q.shape[0], q.shape[-2]
  nblk = tuple(s // bs for s, bs in zip(spatial, block_shape))
  # Row-major flat index of each token in block-major order.
  grids = np.meshgrid(*[np.arange(n) for n in nblk], *[np.arange(bs) for bs in block_shape],
                      indexing="ij")
  flat = np.zeros(grids[0].shape, np.int64)
  for i in range(rank):
    flat = flat * spatial[i] + grids[i] * block_shape[i] + grids[rank + i]
  perm = jnp.asarray(flat.ravel())
  inv = jnp.argsort(perm)
  t = math.prod(spatial)
  qp, kp, vp = (jnp.take(a.reshape(b, t, a.shape[-2], a.shape[-1]), perm, axis=1) for a in (q, k, v))
  o = moba_attention(qp, kp, vp, chunk_size=math.prod(block_shape), top_k=top_k, causal=False,
                     scale=scale, threshold=threshold, implementation=implementation)
  return jnp.take(o, inv, axis=1).reshape(q.shape[:-1] + (v.shape[-1],))


# ---------------------------------------------------------------------------------------------
# BiFormer bi-level routing attention
# ---------------------------------------------------------------------------------------------


def _region_permutation(x: int, y: int, regions: int):
  """Row-major flat index of each token in region-major order (regions row-major, then inside)."""
  rx, ry = x // regions, y // regions
  gx, gy, ix, iy = np.meshgrid(np.arange(regions), np.arange(regions), np.arange(rx),
                               np.arange(ry), indexing="ij")
  return ((gx * rx + ix) * y + (gy * ry + iy)).ravel()


def bra_routing(q, k, *, regions: int, top_k: int):
  """`[B, S^2, k]` routed region indices (sorted) from region-mean affinity `Q^r K^r^T` (all heads'
  channels together, detached as in BiFormer). `q, k: [B, X, Y, H, D]`."""
  b, x, y = q.shape[:3]
  rx, ry = x // regions, y // regions

  def means(a):
    a = jax.lax.stop_gradient(a).astype(jnp.float32).reshape(b, regions, rx, regions, ry, -1)
    return a.mean((2, 4)).reshape(b, regions * regions, -1)

  qr, kr = means(q), means(k)
  if qr.shape[-1] != kr.shape[-1]:  # GQA: compare per kv head using the grouped query mean
    h, hk = q.shape[3], k.shape[3]
    qr = qr.reshape(b, -1, hk, h // hk, q.shape[4]).mean(3).reshape(b, regions * regions, -1)
  aff = jnp.einsum("brc,bsc->brs", qr, kr)
  _, idx = jax.lax.top_k(aff, min(top_k, regions * regions))
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


def bra_attention(q, k, v, *, regions: int = 7, top_k: int = 4, scale=None,
                  implementation: str | None = None):
  """BiFormer BRA (Zhu et al. 2023, arXiv:2303.08810) on `[B, X, Y, H, D]` (X, Y divisible by `regions`): the S x S region grid,
  top-k routed regions per query region (shared by heads), softmax over their tokens. The local
  context enhancement (depth-wise conv on V) belongs to the layer. Paper: S=7, k=(1, 4, 16, S^2/4)
  per stage (a reading from memory, checked where code was available). Tokens are permuted region-major so that every region is
  one block and every routed block is full; `implementation` goes to `block_sparse_attention`
  ("reference" uses the dense mask)."""
  if q.ndim != 5:
    raise ValueError(f"q must be [B, X, Y, H, D], got {q.shape}")
  b, x, y, h, d = q.shape
  if regions < 1 or x % regions or y % regions:
    raise ValueError(f"regions={regions} must divide X={x} and Y={y}")
  if top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  idx = bra_routing(q, k, regions=regions, top_k=top_k)                   # [B, R, k]
  nr, rsize = regions * regions, (x // regions) * (y // regions)
  blocks = jnp.zeros((b, nr, nr), bool).at[jnp.arange(b)[:, None, None],
                                           jnp.arange(nr)[None, :, None], idx].set(True)
  lay = L.from_block_mask(blocks[:, None], None, block_q=rsize, block_k=rsize, tq=x * y, tk=x * y,
                          max_kv=idx.shape[-1], max_q=nr)
  perm = jnp.asarray(_region_permutation(x, y, regions))
  inv = jnp.argsort(perm)
  flat = lambda a: a.reshape(b, x * y, a.shape[3], a.shape[4])
  qp, kp, vp = (jnp.take(flat(a), perm, axis=1) for a in (q, k, v))
  dispatch.check_implementation(implementation, op="bra_attention")
  o = block_sparse.block_sparse_attention(qp, kp, vp, lay, scale=scale,
                                          implementation=implementation)
  return jnp.take(o, inv, axis=1).reshape(q.shape[:-1] + (v.shape[-1],))
