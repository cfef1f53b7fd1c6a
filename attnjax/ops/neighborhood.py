"""Neighborhood attention (NA / GNA) with NATTEN's semantics, 1D/2D/3D.

Per spatial dimension of size L, with kernel K, stride s, dilation d and a causal flag, query
coordinate x sees key coordinate y iff `y % d == x % d` (same dilation group) and, with
`p = x // d`, `r = y // d` the coordinates inside the group of length `Lg = L // d + (x % d < L % d)`:

* non-causal: `leader = min((p // s) * s + s // 2, Lg - 1)`,
  `start = clamp(leader, K // 2, Lg - 1 - (K // 2 + K % 2 - 1)) - K // 2`, visible iff
  `start <= r < start + K` (windows shifted inward at borders: always exactly K keys);
* causal: `leader = min((p // s) * s + s - 1, Lg - 1)`, `start = max(leader - K + 1, 0)`, visible iff
  `start <= r <= p`.

A key is visible iff every dimension passes. This is NATTEN 0.21's reference mask
(`csrc/include/natten/cuda/reference/mask.hpp`, as summarised in the shared notes); NATTEN's
argument checks are reproduced (kernel >= 2, 1 <= stride <= kernel, kernel * dilation <= size).

The fast path permutes tokens so that each dilation group's multi-dimensional tile (default about
64 tokens) is contiguous, then runs `block_sparse_attention` over a `BlockLayout` whose blocks are
tiles: tiles wholly inside every query's neighbourhood are full blocks, border tiles are partial and
use `NARule` (the same formula on permuted indices, pure integer arithmetic, kernel-traceable).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.ops import block_sparse
from attnjax.ops import dispatch
from attnjax.ops import layout as layout_lib
from attnjax.ops.layout import MaskRule, _xp


def _per_dim(value, rank: int, name: str, kind=int) -> tuple:
  if isinstance(value, (tuple, list)):
    if len(value) != rank:
      raise ValueError(f"{name} must be one value or a tuple of {rank} values, got {value!r}")
    vals = tuple(value)
  else:
    vals = (value,) * rank
  for v in vals:
    if kind is bool:
      if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} entries must be bool, got {value!r}")
    elif not isinstance(v, (int, np.integer)) or isinstance(v, bool):
      raise ValueError(f"{name} entries must be int, got {value!r}")
  return tuple(kind(v) for v in vals)


def check_na_args(spatial, kernel_size, stride=1, dilation=1, is_causal=False):
  """Normalises NA arguments to per-dimension tuples; raises ValueError as NATTEN's checks do."""
  rank = len(spatial)
  kernel = _per_dim(kernel_size, rank, "kernel_size")
  stride = _per_dim(stride, rank, "stride")
  dilation = _per_dim(dilation, rank, "dilation")
  causal = _per_dim(is_causal, rank, "is_causal", bool)
  for i in range(rank):
    if kernel[i] < 2:
      raise ValueError(f"kernel_size must be >= 2 in every dimension, got {kernel}")
    if not 1 <= stride[i] <= kernel[i]:
      raise ValueError(f"stride must satisfy 1 <= stride <= kernel_size, got stride {stride}, "
                       f"kernel_size {kernel}")
    if dilation[i] < 1:
      raise ValueError(f"dilation must be >= 1, got {dilation}")
    if kernel[i] * dilation[i] > spatial[i]:
      raise ValueError(f"kernel_size * dilation must be <= input size in every dimension, got "
                       f"kernel_size {kernel}, dilation {dilation}, input {tuple(spatial)}")
  return kernel, stride, dilation, causal


def na_dim_mask(xq, xk, size: int, kernel: int, stride: int, dilation: int, causal: bool):
  """One dimension of the NA rule on broadcastable coordinates (see module docstring)."""
  xp = _xp(xq, xk)
  d = dilation
  g = xq % d
  p, r = xq // d, xk // d
  lg = size // d + xp.where(g < size % d, 1, 0)
  same_group = (xk % d) == g
  if causal:
    leader = xp.minimum((p // stride) * stride + stride - 1, lg - 1)
    start = xp.maximum(leader - (kernel - 1), 0)
    ok = (r >= start) & (r <= p)
  else:
    left = kernel // 2
    right = kernel // 2 + kernel % 2 - 1
    leader = xp.minimum((p // stride) * stride + stride // 2, lg - 1)
    start = xp.minimum(xp.maximum(leader, left), lg - 1 - right) - left
    ok = (r >= start) & (r < start + kernel)
  return same_group & ok


@dataclasses.dataclass(frozen=True)
class NARule(MaskRule):
  """NA mask on token indices in identity (row-major) order, or in the tile-permuted order.

  Tile order (`tile` given): tokens are ordered by dilation group (row-major over the dilation
  dims), then by tile within the group's grid padded to `ceil(ceil(L / d) / tile) * tile` per dim,
  then row-major inside the tile. Padding tokens are never visible.
  """
  spatial: tuple
  kernel: tuple
  stride: tuple
  dilation: tuple
  causal: tuple
  tile: tuple | None = None

  def coords(self, idx):
    """Token index -> (tuple of spatial coordinates, valid flag)."""
    rank = len(self.spatial)
    if self.tile is None:
      total = math.prod(self.spatial)
      coords, rem = [], idx
      for i in reversed(range(rank)):
        coords.append(rem % self.spatial[i])
        rem = rem // self.spatial[i]
      return tuple(reversed(coords)), (idx >= 0) & (idx < total)
    grid = _group_grid(self.spatial, self.dilation, self.tile)
    per_group = math.prod(grid)
    tile_n = math.prod(self.tile)
    ntile = tuple(grid[i] // self.tile[i] for i in range(rank))
    grp, r = idx // per_group, idx % per_group
    tid, intra = r // tile_n, r % tile_n
    gc, tc, ic = [None] * rank, [None] * rank, [None] * rank
    for i in reversed(range(rank)):
      gc[i] = grp % self.dilation[i]
      grp = grp // self.dilation[i]
      tc[i] = tid % ntile[i]
      tid = tid // ntile[i]
      ic[i] = intra % self.tile[i]
      intra = intra // self.tile[i]
    valid = (idx >= 0) & (grp == 0)
    coords = []
    for i in range(rank):
      x = (tc[i] * self.tile[i] + ic[i]) * self.dilation[i] + gc[i]
      valid = valid & (x < self.spatial[i])
      coords.append(x)
    return tuple(coords), valid

  def __call__(self, q_idx, k_idx):
    cq, vq = self.coords(q_idx)
    ck, vk = self.coords(k_idx)
    ok = vq & vk
    for i in range(len(self.spatial)):
      ok = ok & na_dim_mask(cq[i], ck[i], self.spatial[i], self.kernel[i], self.stride[i],
                            self.dilation[i], self.causal[i])
    return ok


def _group_grid(spatial, dilation, tile):
  return tuple(-(-(-(-spatial[i] // dilation[i])) // tile[i]) * tile[i] for i in range(len(spatial)))


def default_tile_shape(spatial, dilation, target: int = 64) -> tuple:
  """Per-dim tile sizes with a product near `target` (powers of two, clipped to the group size)."""
  rank = len(spatial)
  per = max(1, int(round(target ** (1.0 / rank))))
  per = 1 << max(0, per.bit_length() - 1)
  return tuple(min(per, -(-spatial[i] // dilation[i])) for i in range(rank))


def token_permutation(rule: NARule) -> np.ndarray:
  """`perm [Tp]`: original row-major flat index of each permuted position (-1 for padding)."""
  rank = len(rule.spatial)
  tp = math.prod(rule.dilation) * math.prod(_group_grid(rule.spatial, rule.dilation, rule.tile))
  coords, valid = rule.coords(np.arange(tp, dtype=np.int64))
  flat = np.zeros(tp, np.int64)
  for i in range(rank):
    flat = flat * rule.spatial[i] + coords[i]
  return np.where(valid, flat, -1)


def na_mask(spatial, kernel_size, stride=1, dilation=1, is_causal=False):
  """Host: the dense NA mask `[T, T]` (numpy bool, row-major token order)."""
  kernel, stride, dilation, causal = check_na_args(spatial, kernel_size, stride, dilation, is_causal)
  rule = NARule(tuple(spatial), kernel, stride, dilation, causal)
  t = math.prod(spatial)
  idx = np.arange(t, dtype=np.int64)
  return np.asarray(rule(idx[:, None], idx[None, :]))


@functools.lru_cache(maxsize=64)
def na_layout(spatial, kernel, stride, dilation, causal, tile):
  """Host (cached): (layout over the tile-permuted order, perm [Tp], inverse [T])."""
  rule = NARule(spatial, kernel, stride, dilation, causal, tile)
  perm = token_permutation(rule)
  tp, block = perm.shape[0], math.prod(tile)
  lay = layout_lib.from_rule(rule, block_q=block, block_k=block, tq=tp, tk=tp)
  inv = np.zeros(math.prod(spatial), np.int64)
  inv[perm[perm >= 0]] = np.nonzero(perm >= 0)[0]
  return lay, perm, inv


def _check_inputs(q, k, v, rank, additional_keys, additional_values):
  if q.ndim != rank + 3:
    raise ValueError(f"q must be [B, *spatial ({rank} dims), H, D], got {q.shape}")
  if k.shape[:-2] != q.shape[:-2] or v.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1] or (
      v.shape[-2] != k.shape[-2]):
    raise ValueError(f"k and v must be [B, *spatial, Hk, D] / [B, *spatial, Hk, Dv] matching q "
                     f"{q.shape}, got k {k.shape}, v {v.shape}")
  if q.shape[-2] % k.shape[-2]:
    raise ValueError(f"query heads {q.shape[-2]} must be a multiple of key heads {k.shape[-2]}")
  if (additional_keys is None) != (additional_values is None):
    raise ValueError("additional_keys and additional_values must be given together")
  if additional_keys is not None:
    b, hk = k.shape[0], k.shape[-2]
    if (additional_keys.ndim != 4 or additional_keys.shape[0] != b or additional_keys.shape[2] != hk
        or additional_keys.shape[3] != k.shape[-1] or additional_values.shape[:3] !=
        additional_keys.shape[:3] or additional_values.shape[3] != v.shape[-1]):
      raise ValueError(f"additional_keys/values must be [B, S, Hk, D] / [B, S, Hk, Dv] with B={b}, "
                       f"Hk={hk}, got {additional_keys.shape}, {additional_values.shape}")


def _tile_for(implementation, spatial, dilation, tile_shape, rank):
  """The tile (one layout block) for `implementation`: the kernel's blocks are powers of two."""
  if tile_shape is None:
    tile = default_tile_shape(spatial, dilation)
    if implementation == "pallas":
      tile = tuple(1 << (x.bit_length() - 1) for x in tile)
    return tile
  tile = _per_dim(tile_shape, rank, "tile_shape")
  if any(x < 1 for x in tile):
    raise ValueError(f"tile_shape entries must be >= 1, got {tile}")
  return tile


def choose_implementation(implementation, q, k, v, *, dilation=1, tile_shape=None,
                          backend: str | None = None) -> tuple[str, str]:
  """`(implementation, reason)` of `neighborhood_attention` for these inputs on `backend` (pure).

  None picks "pallas" (the flash kernel over the tile-permuted layout) on a CUDA GPU when it serves
  the call, else "xla" (the gather path over the same layout). Explicit "pallas" that cannot serve
  the call raises ValueError saying why.
  """
  dispatch.check_implementation(implementation, op="neighborhood_attention")
  if implementation in ("reference", "xla"):
    return implementation, "explicit choice"
  rank = q.ndim - 3
  spatial = tuple(q.shape[1:1 + rank])
  dil = _per_dim(dilation, rank, "dilation")
  block = math.prod(_tile_for("pallas", spatial, dil, tile_shape, rank))
  call = block_sparse.describe_call(q, k, v, _BlockSizes(block, block))
  impl, reason = block_sparse.choose_implementation(implementation, call, backend)
  return impl, reason


@dataclasses.dataclass(frozen=True)
class _BlockSizes:
  block_q: int
  block_k: int
  query_block_select: None = None


@dispatch.dispatching_op
def neighborhood_attention(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, *,
                           scale=None, additional_keys=None, additional_values=None,
                           return_lse=False, implementation: str | None = None,
                           tile_shape=None):
  """NA/GNA on `q [B, *spatial, H, D]`, `k, v [B, *spatial, Hk, D|Dv]` -> `[B, *spatial, H, Dv]`.

  `o_x = softmax_{y in N(x)}(scale q_x.k_y) v_y` with the neighbourhood `N(x)` of the module
  docstring; `kernel_size`, `stride`, `dilation`, `is_causal` are an int/bool or one per dimension.
  GQA when `H % Hk == 0`. `additional_keys/values [B, S, Hk, D|Dv]` are visible to every query; they
  are merged with the neighbourhood result through the log-sum-exp, as NATTEN's fast backends do.
  `return_lse` also returns lse `[B, *spatial, H]` (NATTEN's layout). `implementation`
  (`attnjax.ops.dispatch`): "xla" (tile-permuted layout, plain-JAX gather), "pallas" (the same
  layout through the Pallas flash kernel, default tiles rounded down to powers of two; interpret
  mode without a GPU), "reference" (dense mask, the oracle), or None: pallas on a CUDA GPU when it
  serves the call, else xla (`choose_implementation`).
  """
  rank = q.ndim - 3
  if rank not in (1, 2, 3):
    raise ValueError(f"q must be [B, *spatial, H, D] with 1 to 3 spatial dims, got {q.shape}")
  dispatch.check_implementation(implementation, op="neighborhood_attention")
  _check_inputs(q, k, v, rank, additional_keys, additional_values)
  spatial = tuple(q.shape[1:1 + rank])
  kernel, stride, dilation, causal = check_na_args(spatial, kernel_size, stride, dilation,
                                                   is_causal)
  b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
  hk, dv = k.shape[-2], v.shape[-1]
  t = math.prod(spatial)
  qf, kf, vf = q.reshape(b, t, h, d), k.reshape(b, t, hk, d), v.reshape(b, t, hk, dv)
  choose = functools.partial(choose_implementation, implementation, q, k, v, dilation=dilation,
                             tile_shape=tile_shape)
  dispatch.note("neighborhood_attention", lambda be: choose(backend=be))
  impl = choose()[0]
  if impl == "reference":
    o, lse = _na_reference(qf, kf, vf, spatial, kernel, stride, dilation, causal, scale,
                           additional_keys, additional_values)
  else:
    tile = _tile_for(impl, spatial, dilation, tile_shape, rank)
    lay, perm, inv = na_layout(spatial, kernel, stride, dilation, causal, tile)
    valid = jnp.asarray(perm >= 0)
    pidx = jnp.asarray(np.maximum(perm, 0))

    def permute(x):
      return jnp.where(valid[None, :, None, None], jnp.take(x, pidx, axis=1), 0).astype(x.dtype)

    op, lp = block_sparse.block_sparse_attention(
        permute(qf), permute(kf), permute(vf), lay, scale=scale, return_lse=True,
        implementation=impl)
    inv = jnp.asarray(inv)
    o, lse = jnp.take(op, inv, axis=1), jnp.take(lp, inv, axis=2)
    if additional_keys is not None:
      from attnjax.ops.softmax import dot_product_attention
      oe, le = dot_product_attention(qf, additional_keys, additional_values, scale=scale,
                                     return_lse=True, implementation="reference")
      o, lse = block_sparse.merge_attentions([o, oe], [lse, le])
  o = o.reshape(q.shape[:-1] + (dv,))
  if return_lse:
    return o, jnp.moveaxis(lse, 1, 2).reshape(q.shape[:-1])
  return o


def _na_reference(qf, kf, vf, spatial, kernel, stride, dilation, causal, scale, extra_k, extra_v):
  from attnjax.ops.softmax import dot_product_attention
  mask = na_mask(spatial, kernel, stride, dilation, causal)
  if extra_k is not None:
    mask = np.concatenate([mask, np.ones((mask.shape[0], extra_k.shape[1]), bool)], axis=1)
    kf = jnp.concatenate([kf, extra_k.astype(kf.dtype)], axis=1)
    vf = jnp.concatenate([vf, extra_v.astype(vf.dtype)], axis=1)
  return dot_product_attention(qf, kf, vf, mask=jnp.asarray(mask), scale=scale, return_lse=True,
                               implementation="reference")


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, **kwargs):
  """1D neighborhood attention on `[B, L, H, D]`; see `neighborhood_attention`."""
  if query.ndim != 4:
    raise ValueError(f"na1d expects query [B, L, H, D], got {query.shape}")
  return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal,
                                **kwargs)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, **kwargs):
  """2D neighborhood attention on `[B, X, Y, H, D]`; see `neighborhood_attention`."""
  if query.ndim != 5:
    raise ValueError(f"na2d expects query [B, X, Y, H, D], got {query.shape}")
  return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal,
                                **kwargs)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, **kwargs):
  """3D neighborhood attention on `[B, X, Y, Z, H, D]`; see `neighborhood_attention`."""
  if query.ndim != 6:
    raise ValueError(f"na3d expects query [B, X, Y, Z, H, D], got {query.shape}")
  return neighborhood_attention(query, key, value, kernel_size, stride, dilation, is_causal,
                                **kwargs)
