"""Block layouts for the flash kernel: which key blocks each query block visits, and which are partial.

A layout holds, per (batch|1, head|1, query block): `kv_counts [Bl, Hl, nQ]`, `kv_indices [Bl, Hl, nQ,
max_kv]` (sorted, padded with 0 past the count), `kv_partial` (int32 1 = apply the element mask rule, 0
= full block, never masked); its transpose over key blocks `q_counts [Bl, Hl, nK]`, `q_indices`,
`q_partial` for the dK/dV kernel; and static `block_q, block_k, tq, tk, mask_rule`. `mask_rule(q_idx,
k_idx) -> bool` takes absolute positions (broadcastable int32 arrays, query i in [0, tq), key j in [0,
tk)) and must be a pure elementwise jnp function, because the kernel evaluates it on each partial tile.

This is the kernel-local builder of the same contract as `attnjax.ops.layout` (written by the
local/sparse helper); the kernel reads layouts by field name only, so either kind works. Layouts here
are built on the host with numpy from a static block mask, which covers causal, sliding windows and any
static block pattern.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Block-sparse layout (see module docstring). Arrays are int32; the rest is static."""
  kv_counts: jax.Array
  kv_indices: jax.Array
  kv_partial: jax.Array
  q_counts: jax.Array
  q_indices: jax.Array
  q_partial: jax.Array
  block_q: int = dataclasses.field(metadata=dict(static=True))
  block_k: int = dataclasses.field(metadata=dict(static=True))
  tq: int = dataclasses.field(metadata=dict(static=True))
  tk: int = dataclasses.field(metadata=dict(static=True))
  mask_rule: Callable | None = dataclasses.field(default=None, metadata=dict(static=True))


def _compress(kind: np.ndarray):
  """`kind [Bl, Hl, nR, nC]` in {0 empty, 1 partial, 2 full} -> counts, sorted indices, partial flags."""
  present = kind > 0
  counts = present.sum(-1).astype(np.int32)
  width = max(int(counts.max(initial=0)), 1)
  # A stable argsort of "not present" puts the present columns first, in increasing order.
  order = np.argsort(~present, axis=-1, kind="stable")[..., :width].astype(np.int32)
  valid = np.arange(width) < counts[..., None]
  indices = np.where(valid, order, 0).astype(np.int32)
  partial = np.where(valid, np.take_along_axis(kind, order, -1) == 1, 0).astype(np.int32)
  return counts, indices, partial


def layout_from_block_kinds(kind, *, block_q: int, block_k: int, tq: int, tk: int,
                            mask_rule: Callable | None = None) -> BlockLayout:
  """Builds a layout (and its transpose) from `kind [Bl, Hl, nQ, nK]` in {0 empty, 1 partial, 2 full}.

  The key block that runs past `tk` is always marked partial: the kernel masks padded keys only there.
  """
  kind = np.asarray(kind, np.int32)
  if kind.ndim != 4:
    raise ValueError(f"kind must be [Bl, Hl, nQ, nK], got shape {kind.shape}")
  nq, nk = -(-tq // block_q), -(-tk // block_k)
  if kind.shape[2:] != (nq, nk):
    raise ValueError(f"kind must have nQ={nq}, nK={nk} blocks for tq={tq}, tk={tk}; got {kind.shape}")
  kind = kind.copy()
  if tk % block_k:
    kind[..., -1] = np.where(kind[..., -1] > 0, 1, 0)
  kv = _compress(kind)
  qt = _compress(np.swapaxes(kind, -1, -2))
  return BlockLayout(*(jnp.asarray(a) for a in kv + qt), block_q=block_q, block_k=block_k, tq=tq,
                     tk=tk, mask_rule=mask_rule)


def band_rule(tq: int, tk: int, causal: bool, window):
  """Elementwise rule for causal / sliding-window masks (bottom-right aligned, as `ops.masks`)."""
  left, right = (None, None) if window is None else window
  if causal:
    right = 0 if right is None else min(right, 0)
  offset = tk - tq

  def rule(q_idx, k_idx):
    rel = k_idx - (q_idx + offset)
    ok = rel == rel  # all-True of the broadcast shape
    if left is not None:
      ok = ok & (rel >= -left)
    if right is not None:
      ok = ok & (rel <= right)
    return ok

  return rule, left, right


def band_layout(tq: int, tk: int, block_q: int, block_k: int, *, causal: bool = False,
                window=None) -> BlockLayout:
  """Layout for dense / causal / sliding-window attention: classifies each block analytically.

  With relative offset `rel = k - (q + tk - tq)` a key is visible iff `-left <= rel <= right`; a block
  spans `rel` in `[k0 - q1 - off, k1 - q0 - off]`, so it is empty, full or partial by interval tests.
  """
  rule, left, right = band_rule(tq, tk, causal, window)
  nq, nk = -(-tq // block_q), -(-tk // block_k)
  q0 = np.arange(nq)[:, None] * block_q
  q1 = np.minimum(q0 + block_q, tq) - 1
  k0 = np.arange(nk)[None, :] * block_k
  k1 = np.minimum(k0 + block_k, tk) - 1
  off = tk - tq
  lo, hi = k0 - q1 - off, k1 - q0 - off
  lo_ok = np.full(lo.shape, True) if left is None else hi >= -left
  hi_ok = np.full(lo.shape, True) if right is None else lo <= right
  full = (np.full(lo.shape, True) if left is None else lo >= -left) & (
      np.full(lo.shape, True) if right is None else hi <= right)
  kind = np.where(lo_ok & hi_ok, np.where(full, 2, 1), 0)[None, None]
  has_rule = left is not None or right is not None
  return layout_from_block_kinds(kind, block_q=block_q, block_k=block_k, tq=tq, tk=tk,
                                 mask_rule=rule if has_rule else None)


def dense_mask_from_layout(layout, batch: int, heads: int) -> jax.Array:
  """The `[B, H, Tq, Tk]` boolean mask a layout encodes (for references and tests)."""
  bq, bk, tq, tk = layout.block_q, layout.block_k, layout.tq, layout.tk
  counts, idx, part = (np.asarray(a) for a in (layout.kv_counts, layout.kv_indices,
                                               layout.kv_partial))
  nq, nk = counts.shape[-1], -(-tk // bk)
  kind = np.zeros(counts.shape + (nk,), np.int32)
  valid = np.arange(idx.shape[-1]) < counts[..., None]
  bl, hl, qi, t = np.nonzero(valid)
  kind[bl, hl, qi, idx[bl, hl, qi, t]] = np.where(part[bl, hl, qi, t] == 1, 1, 2)
  kind = np.broadcast_to(kind, (batch, heads, nq, nk))
  elem = np.repeat(np.repeat(kind, bq, axis=2), bk, axis=3)[:, :, :tq, :tk]
  mask = jnp.asarray(elem > 0)
  if layout.mask_rule is not None:
    rule = layout.mask_rule(jnp.arange(tq)[:, None], jnp.arange(tk)[None, :])
    mask = mask & ((jnp.asarray(elem) == 2) | rule)
  return mask


def layout_from_rule(mask_rule: Callable, tq: int, tk: int, block_q: int,
                     block_k: int) -> BlockLayout:
  """Layout of an arbitrary elementwise rule, classifying blocks on device one query block at a time.

  Evaluates `mask_rule` on `[block_q, Tk]` per query block (O(Tq Tk) work, O(block_q Tk) memory), so
  it also serves sizes where a dense mask would not fit; use analytic builders where they exist.
  """
  nq, nk = -(-tq // block_q), -(-tk // block_k)
  k_idx = jnp.arange(nk * block_k)[None, :]

  def classify(qb):
    q_idx = qb * block_q + jnp.arange(block_q)[:, None]
    valid = (q_idx < tq) & (k_idx < tk)
    ok = mask_rule(q_idx, k_idx) & valid
    ok = ok.reshape(block_q, nk, block_k)
    inside = valid.reshape(block_q, nk, block_k)
    any_ok = ok.any(axis=(0, 2))
    all_ok = (ok | ~inside).all(axis=(0, 2))
    return jnp.where(any_ok, jnp.where(all_ok, 2, 1), 0)

  kind = jax.lax.map(classify, jnp.arange(nq))
  return layout_from_block_kinds(np.asarray(kind)[None, None], block_q=block_q, block_k=block_k,
                                 tq=tq, tk=tk, mask_rule=mask_rule)
