"""The block layout: one data structure for every local and sparse attention pattern.

A `BlockLayout` lists, per batch b, head h and query block i (of `block_q` tokens), the key blocks
(of `block_k` tokens) that the block attends to: `kv_counts[b, h, i]` of them, at
`kv_indices[b, h, i, :count]` (sorted ascending), each flagged `kv_partial` (1 = apply the element
mask, 0 = every pair in the block is visible). The transpose (`q_counts`, `q_indices`, `q_partial`)
lists, per key block, the query blocks that read it (the key-side backward walks it). Leading dims
broadcast: `[B|1, H|1, ...]`. The element mask of partial blocks is `mask_rule(q_idx, k_idx)`, a
static pure function of absolute token indices in the layout's token order, made of jnp elementwise
ops only so that a kernel can evaluate it on a tile. Optionally `query_block_select [B|1, H|1, Tq,
nK]` (bool) restricts each query token to a subset of the listed key blocks: per-token routers
(MoBA, DMA thresholds) need O(T * nK) memory instead of an O(T^2) element mask.

Conventions (the Pallas kernel relies on them):
* `nQ = ceil(tq / block_q)`, `nK = ceil(tk / block_k)`; tokens past `tq` / `tk` are padding. The last
  key block is always flagged partial when `tk % block_k != 0`, and kernels must hide keys `>= tk`.
* Entries of `kv_indices` past the count repeat the last valid index (0 when the count is 0), so a
  pipelined kernel re-requests the block it already holds.
* A flagged-full block must be all-visible under the rule (checked by `check_layout`); a partial flag
  on an all-visible block is allowed (only slower).
* Segment ids are not part of the layout; they are passed to the attention call as arrays.

Static layouts are built on the host with numpy (`from_block_mask` with numpy arrays computes the
exact maxima); dynamic ones are built on device under jit with a static `max_kv` (the router's top-k)
and `max_q` (default nQ), so shapes stay static.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _xp(*arrays):
  """numpy for concrete host arrays and Python ints (host builders), jnp otherwise (kernels, jit)."""
  if all(isinstance(a, (np.ndarray, np.generic, int)) for a in arrays):
    return np
  return jnp


# ----------------------------------------------------------------------------------------------
# Mask rules
# ----------------------------------------------------------------------------------------------


class MaskRule:
  """Base: `rule(q_idx, k_idx) -> bool` on broadcastable int32 token indices (layout order)."""

  def __call__(self, q_idx, k_idx):
    raise NotImplementedError

  def __and__(self, other: "MaskRule") -> "MaskRule":
    return ComposedRule((self, other))


@dataclasses.dataclass(frozen=True)
class CausalRule(MaskRule):
  """`k <= q + offset` (offset = tk - tq gives bottom-right alignment)."""
  offset: int = 0

  def __call__(self, q_idx, k_idx):
    return k_idx <= q_idx + self.offset


@dataclasses.dataclass(frozen=True)
class WindowRule(MaskRule):
  """`q + offset - left <= k <= q + offset + right`; None = unbounded side."""
  left: int | None
  right: int | None
  offset: int = 0

  def __call__(self, q_idx, k_idx):
    xp = _xp(q_idx, k_idx)
    pos = q_idx + self.offset
    ok = xp.ones(np.broadcast_shapes(np.shape(q_idx), np.shape(k_idx)), bool)
    if self.left is not None:
      ok = ok & (k_idx >= pos - self.left)
    if self.right is not None:
      ok = ok & (k_idx <= pos + self.right)
    return ok


@dataclasses.dataclass(frozen=True)
class SinkRule(MaskRule):
  """`k < num_sink` (attention-sink columns); composed with OR through `AnyRule`."""
  num_sink: int

  def __call__(self, q_idx, k_idx):
    return (k_idx < self.num_sink) & (q_idx >= 0)


@dataclasses.dataclass(frozen=True)
class ComposedRule(MaskRule):
  """Logical AND of rules."""
  rules: tuple

  def __call__(self, q_idx, k_idx):
    out = None
    for r in self.rules:
      m = r(q_idx, k_idx)
      out = m if out is None else out & m
    return out


@dataclasses.dataclass(frozen=True)
class AnyRule(MaskRule):
  """Logical OR of rules (sink + local, strided + local, ...)."""
  rules: tuple

  def __call__(self, q_idx, k_idx):
    out = None
    for r in self.rules:
      m = r(q_idx, k_idx)
      out = m if out is None else out | m
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class DenseMaskRule(MaskRule):
  """An explicit element mask `[Tq, Tk]` (numpy bool, host-side, static).

  Hashed and compared by content so that layouts using it stay valid jit static arguments. A kernel
  loads the `[block_q, block_k]` tile of `mask` for partial blocks.
  """
  mask: np.ndarray

  def __post_init__(self):
    m = np.asarray(self.mask)
    if m.ndim != 2 or m.dtype != np.bool_:
      raise ValueError(f"DenseMaskRule mask must be a bool [Tq, Tk] numpy array, got {m.dtype} "
                       f"{m.shape}")
    object.__setattr__(self, "mask", m)

  def __hash__(self):
    return hash((self.mask.shape, self.mask.tobytes()))

  def __eq__(self, other):
    return isinstance(other, DenseMaskRule) and self.mask.shape == other.mask.shape and bool(
        np.array_equal(self.mask, other.mask))

  def __call__(self, q_idx, k_idx):
    xp = _xp(q_idx, k_idx)
    tq, tk = self.mask.shape
    inside = (q_idx >= 0) & (q_idx < tq) & (k_idx >= 0) & (k_idx < tk)
    m = xp.asarray(self.mask)
    val = m[xp.clip(q_idx, 0, tq - 1), xp.clip(k_idx, 0, tk - 1)]
    return inside & val


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Block-sparse pattern; see the module docstring for the fields' meaning and conventions."""
  kv_counts: Any
  kv_indices: Any
  kv_partial: Any
  q_counts: Any
  q_indices: Any
  q_partial: Any
  query_block_select: Any = None
  block_q: int = 128
  block_k: int = 128
  tq: int = 0
  tk: int = 0
  mask_rule: MaskRule | None = None

  @property
  def num_q_blocks(self) -> int:
    return -(-self.tq // self.block_q)

  @property
  def num_k_blocks(self) -> int:
    return -(-self.tk // self.block_k)

  @property
  def max_kv(self) -> int:
    return self.kv_indices.shape[-1]

  @property
  def max_q(self) -> int:
    return self.q_indices.shape[-1]


jax.tree_util.register_dataclass(
    BlockLayout,
    data_fields=["kv_counts", "kv_indices", "kv_partial", "q_counts", "q_indices", "q_partial",
                 "query_block_select"],
    meta_fields=["block_q", "block_k", "tq", "tk", "mask_rule"])


def _check_blocks(block_q, block_k, tq, tk):
  for name, v in (("block_q", block_q), ("block_k", block_k), ("tq", tq), ("tk", tk)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"{name} must be an int > 0, got {v!r}")


def _compact(sel, partial, max_count, xp):
  """Block matrix `[..., nR, nC]` -> (counts, indices sorted asc, partial flags), padded per contract."""
  n_cols = sel.shape[-1]
  sel = sel.astype(bool)
  counts = sel.sum(-1).astype(np.int32)
  cols = xp.arange(n_cols, dtype=np.int32)
  # Selected columns first, in ascending order: sort key = col for selected, n_cols + col otherwise.
  key = xp.where(sel, cols, n_cols + cols)
  order = xp.argsort(key, axis=-1)[..., :max_count].astype(np.int32)
  if max_count > n_cols:
    pad = xp.zeros(order.shape[:-1] + (max_count - n_cols,), np.int32)
    order = xp.concatenate([order, pad], -1)
  slot = xp.arange(max_count, dtype=np.int32)
  valid = slot < counts[..., None]
  last = xp.take_along_axis(order, xp.maximum(counts - 1, 0)[..., None], axis=-1)
  last = xp.where(counts[..., None] > 0, last, 0)
  indices = xp.where(valid, order, last).astype(np.int32)
  flags = xp.take_along_axis(partial.astype(np.int32), xp.minimum(indices, n_cols - 1), axis=-1)
  flags = xp.where(valid, flags, 0).astype(np.int32)
  return counts, indices, flags


def from_block_mask(block_mask, block_partial=None, *, block_q: int, block_k: int, tq: int, tk: int,
                    mask_rule: MaskRule | None = None, max_kv: int | None = None,
                    max_q: int | None = None, query_block_select=None,
                    numpy_arrays: bool = False) -> BlockLayout:
  """Builds a layout from a block matrix `block_mask [B|1, H|1, nQ, nK]` (bool, True = listed).

  `block_partial` (same shape, bool) flags blocks that need the element mask; default: every listed
  block is partial when a rule is given, none otherwise. The last key block is flagged partial when
  `tk % block_k != 0`. With numpy inputs `max_kv`/`max_q` default to the exact maxima (host build);
  with traced inputs they default to nK / nQ (static shapes under jit; pass the router's top-k).
  `numpy_arrays=True` (host builds only) keeps the index arrays as numpy: consumers index them with
  `jnp`, and no eager device op runs while tracing (which fails when cross-lowering for a device
  that is not present).
  """
  _check_blocks(block_q, block_k, tq, tk)
  nq, nk = -(-tq // block_q), -(-tk // block_k)
  xp = _xp(block_mask) if block_partial is None else _xp(block_mask, block_partial)
  block_mask = xp.asarray(block_mask).astype(bool)
  while block_mask.ndim < 4:
    block_mask = block_mask[None]
  if block_mask.ndim != 4 or block_mask.shape[-2:] != (nq, nk):
    raise ValueError(f"block_mask must be [B|1, H|1, nQ={nq}, nK={nk}], got {block_mask.shape}")
  if block_partial is None:
    block_partial = xp.full(block_mask.shape, mask_rule is not None)
  block_partial = xp.broadcast_to(xp.asarray(block_partial).astype(bool), block_mask.shape)
  if tk % block_k:
    edge = xp.arange(nk) == nk - 1
    block_partial = block_partial | edge
  block_partial = block_partial & block_mask
  if xp is np:
    max_kv = max(1, int(block_mask.sum(-1).max())) if max_kv is None else max_kv
    max_q = max(1, int(block_mask.sum(-2).max())) if max_q is None else max_q
  else:
    max_kv = nk if max_kv is None else max_kv
    max_q = nq if max_q is None else max_q
  kc, ki, kp = _compact(block_mask, block_partial, max_kv, xp)
  t_mask = xp.swapaxes(block_mask, -1, -2)
  t_partial = xp.swapaxes(block_partial, -1, -2)
  qc, qi, qp = _compact(t_mask, t_partial, max_q, xp)
  if query_block_select is not None:
    query_block_select = jnp.asarray(query_block_select).astype(bool)
    if query_block_select.ndim != 4 or query_block_select.shape[-2:] != (tq, nk):
      raise ValueError(f"query_block_select must be [B|1, H|1, Tq={tq}, nK={nk}], got "
                       f"{query_block_select.shape}")
  # Host layouts become concrete device arrays even when built inside a trace: they are cached
  # (`functools.lru_cache` on the callers), and a cached tracer would leak into the next trace.
  def conv(a):
    if xp is not np or numpy_arrays:
      return a
    with jax.ensure_compile_time_eval():
      return jnp.asarray(a)
  return BlockLayout(conv(kc), conv(ki), conv(kp), conv(qc), conv(qi), conv(qp),
                     query_block_select, block_q=int(block_q), block_k=int(block_k), tq=int(tq),
                     tk=int(tk), mask_rule=mask_rule)


def block_matrix(layout: BlockLayout):
  """`[B|1, H|1, nQ, nK]` int32: 0 = not listed, 1 = partial, 2 = full (splash's convention)."""
  nk = layout.num_k_blocks
  slot = jnp.arange(layout.max_kv)
  valid = slot < layout.kv_counts[..., None]
  onehot = (layout.kv_indices[..., None] == jnp.arange(nk)) & valid[..., None]
  listed = onehot.any(-2)
  partial = (onehot & (layout.kv_partial[..., None] > 0)).any(-2)
  return jnp.where(listed, jnp.where(partial, 1, 2), 0).astype(jnp.int32)


def transpose(layout: BlockLayout, max_q: int | None = None) -> BlockLayout:
  """Rebuilds the q-side view (`q_counts`, `q_indices`, `q_partial`) from the kv-side one."""
  bm = block_matrix(layout)
  max_q = layout.num_q_blocks if max_q is None else max_q
  qc, qi, qp = _compact(jnp.swapaxes(bm > 0, -1, -2), jnp.swapaxes(bm == 1, -1, -2), max_q, jnp)
  return dataclasses.replace(layout, q_counts=qc, q_indices=qi, q_partial=qp)


@functools.partial(jax.jit, static_argnames=("rule_everywhere",))
def dense_mask(layout: BlockLayout, *, rule_everywhere: bool = False):
  """`[B|1, H|1, Tq, Tk]` bool: the oracle's mask (listed blocks AND rule on partial blocks).

  `rule_everywhere=True` applies the rule to full blocks too (equal iff the full flags are honest).
  Jitted (the layout's static fields are the cache key): eagerly its many small ops took seconds.
  """
  bm = block_matrix(layout)
  q_idx = jnp.arange(layout.tq, dtype=jnp.int32)
  k_idx = jnp.arange(layout.tk, dtype=jnp.int32)
  per = bm[..., q_idx // layout.block_q, :][..., k_idx // layout.block_k]
  listed = per > 0
  if layout.mask_rule is not None:
    rule = jnp.asarray(layout.mask_rule(q_idx[:, None], k_idx[None, :]))
    listed = listed & (rule | ((per == 2) & (not rule_everywhere)))
  if layout.query_block_select is not None:
    listed = listed & layout.query_block_select[..., k_idx // layout.block_k]
  return listed


def check_layout(layout: BlockLayout) -> None:
  """Raises ValueError if a block flagged full is not all-visible under the rule, or counts overflow."""
  if layout.mask_rule is not None:
    honest = dense_mask(layout)
    strict = dense_mask(layout, rule_everywhere=True)
    if not bool(jnp.all(honest == strict)):
      raise ValueError("layout flags a block as full although its rule hides some of its pairs")
  if int(jnp.max(layout.kv_counts)) > layout.max_kv:
    raise ValueError("kv_counts exceed max_kv")


def density(layout: BlockLayout, level: str = "block") -> float:
  """Fraction of listed `(q block, k block)` pairs (`level="block"`) or visible pairs ("element")."""
  if level == "block":
    return float(jnp.mean(layout.kv_counts) / layout.num_k_blocks)
  if level == "element":
    return float(jnp.mean(dense_mask(layout)))
  raise ValueError(f"level must be 'block' or 'element', got {level!r}")


def plot_layout(layout: BlockLayout, path: str, *, batch: int = 0, head: int = 0,
                title: str | None = None) -> str:
  """Writes a PNG of the block matrix of (batch, head): white empty, grey partial, black full."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  bm = np.asarray(block_matrix(layout))
  bm = bm[min(batch, bm.shape[0] - 1), min(head, bm.shape[1] - 1)]
  fig, ax = plt.subplots(figsize=(4, 4))
  ax.imshow(bm, cmap="Greys", vmin=0, vmax=2, interpolation="nearest")
  ax.set_xlabel(f"key block ({layout.block_k})")
  ax.set_ylabel(f"query block ({layout.block_q})")
  ax.set_title(title or f"density {density(layout):.3f}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------------
# Building layouts from rules (host)
# ----------------------------------------------------------------------------------------------


def classify_blocks(rule: MaskRule, *, block_q: int, block_k: int, tq: int, tk: int,
                    num_heads: int | None = None):
  """Host: evaluates `rule` one query block at a time -> (any, all) `[nQ, nK]` numpy block matrices.

  Memory is O(block_q * Tk) at a time. Padding tokens (>= tq / >= tk) are ignored.
  """
  _check_blocks(block_q, block_k, tq, tk)
  nq, nk = -(-tq // block_q), -(-tk // block_k)
  k_idx = np.arange(nk * block_k, dtype=np.int64)[None, :]
  k_valid = k_idx < tk
  any_m = np.zeros((nq, nk), bool)
  all_m = np.zeros((nq, nk), bool)
  for i in range(nq):
    q_idx = np.arange(i * block_q, (i + 1) * block_q, dtype=np.int64)[:, None]
    q_valid = q_idx < tq
    m = np.asarray(rule(q_idx, k_idx)) & k_valid & q_valid
    ignore = ~(k_valid & q_valid)
    m3 = m.reshape(block_q, nk, block_k)
    any_m[i] = m3.any(axis=(0, 2))
    all_m[i] = (m | ignore).reshape(block_q, nk, block_k).all(axis=(0, 2))
  return any_m, all_m


def from_rule(rule: MaskRule, *, block_q: int, block_k: int, tq: int, tk: int) -> BlockLayout:
  """Host: the tightest layout for `rule` (a block is listed iff some pair is visible)."""
  any_m, all_m = classify_blocks(rule, block_q=block_q, block_k=block_k, tq=tq, tk=tk)
  return from_block_mask(any_m[None, None], (any_m & ~all_m)[None, None], block_q=block_q,
                         block_k=block_k, tq=tq, tk=tk, mask_rule=rule)


def from_dense_mask(mask, *, block_q: int, block_k: int) -> BlockLayout:
  """Host: layout of an explicit bool mask `[Tq, Tk]` (rule = `DenseMaskRule`)."""
  mask = np.asarray(mask).astype(bool)
  if mask.ndim != 2:
    raise ValueError(f"mask must be [Tq, Tk], got {mask.shape}")
  return from_rule(DenseMaskRule(mask), block_q=block_q, block_k=block_k, tq=mask.shape[0],
                   tk=mask.shape[1])


def stack_heads(layouts: Sequence[BlockLayout]) -> BlockLayout:
  """Host: concatenates single-head layouts (same blocks, sizes and rule) along the head axis."""
  base = layouts[0]
  for lay in layouts:
    if (lay.block_q, lay.block_k, lay.tq, lay.tk) != (base.block_q, base.block_k, base.tq, base.tk):
      raise ValueError("stack_heads needs layouts with equal block sizes and lengths")
  bms = [np.asarray(block_matrix(l)) for l in layouts]
  bm = np.concatenate(bms, axis=1)
  return from_block_mask(bm > 0, bm == 1, block_q=base.block_q, block_k=base.block_k, tq=base.tq,
                         tk=base.tk, mask_rule=base.mask_rule)


def num_blocks(t: int, block: int) -> int:
  return math.ceil(t / block)


# ----------------------------------------------------------------------------------------------
# Band layouts (dense / causal / sliding window), shared by the tiled XLA softmax and the kernel
# ----------------------------------------------------------------------------------------------


def band_rule(tq: int, tk: int, causal: bool = False, window=None) -> MaskRule | None:
  """The causal / sliding-window rule, bottom-right aligned as `ops.masks` (None: no mask).

  A key is visible iff `-left <= k - (q + tk - tq) <= right`; `causal` caps `right` at 0.
  """
  left, right = (None, None) if window is None else tuple(window)
  if causal:
    right = 0 if right is None else min(right, 0)
  if left is None and right is None:
    return None
  return WindowRule(left, right, offset=tk - tq)


@functools.lru_cache(maxsize=256)
def band_layout(tq: int, tk: int, block_q: int, block_k: int, *, causal: bool = False,
                window=None) -> BlockLayout:
  """Host (cached): the layout of dense / causal / sliding-window attention, classified exactly.

  With `rel = k - (q + tk - tq)` a key is visible iff `-left <= rel <= right`; a block spans `rel`
  in `[k0 - q1 - off, k1 - q0 - off]` (real tokens only), so interval tests say whether it is
  empty, full or partial. Leading dims are `[1, 1]`; the index arrays stay numpy (it is built while
  tracing, also when cross-lowering). The rule is `band_rule(...)`.
  """
  _check_blocks(block_q, block_k, tq, tk)
  window = None if window is None else tuple(window)
  rule = band_rule(tq, tk, causal, window)
  left, right = (None, None) if rule is None else (rule.left, rule.right)
  nq, nk = -(-tq // block_q), -(-tk // block_k)
  q0 = np.arange(nq)[:, None] * block_q
  q1 = np.minimum(q0 + block_q, tq) - 1
  k0 = np.arange(nk)[None, :] * block_k
  k1 = np.minimum(k0 + block_k, tk) - 1
  off = tk - tq
  lo, hi = k0 - q1 - off, k1 - q0 - off
  yes = np.ones(lo.shape, bool)
  listed = (yes if left is None else hi >= -left) & (yes if right is None else lo <= right)
  full = (yes if left is None else lo >= -left) & (yes if right is None else hi <= right)
  return from_block_mask(listed[None, None], (listed & ~full)[None, None], block_q=block_q,
                         block_k=block_k, tq=tq, tk=tk, mask_rule=rule, numpy_arrays=True)


def broadcast_dense_mask(layout: BlockLayout, batch: int, heads: int):
  """`dense_mask(layout)` broadcast to `[B, H, Tq, Tk]` (for references and tests)."""
  return jnp.broadcast_to(dense_mask(layout), (batch, heads, layout.tq, layout.tk))
