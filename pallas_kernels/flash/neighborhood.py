"""Neighborhood attention (NATTEN semantics, 1D/2D/3D, stride, dilation, causal) on the flash kernel.

Per dimension of length L with kernel K, stride s, dilation d: tokens split into d groups by
`x mod d`; inside a group (coordinate x' = x div d, group length L_g) a query's window is the one of
its stride-group leader. Non-causal: `leader = min((x' div s) s + s div 2, L_g - 1)`,
`start = clamp(leader, K div 2, L_g - 1 - (K div 2 + K mod 2 - 1)) - K div 2`, `end = start + K`
(windows shift inward at borders, always K keys). Causal: `leader = min((x' div s) s + s - 1, L_g - 1)`,
`start = max(leader - K + 1, 0)`, `end = x' + 1`. A key is visible iff it is in the query's dilation
group and inside the window in every dimension. Inputs are `[B, *spatial, H, D]`.

Tokens are flattened either in raster order or, with `tile=(t_1, ..., t_n)` dividing the spatial
shape, tile by tile (NATTEN's token permutation): a multi-dimensional tile becomes a contiguous run,
so a query block meets far fewer key blocks. The mask rule decodes flattened indices back to
coordinates inside the kernel, so partial blocks need no stored mask.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash import api
from pallas_kernels.flash import layouts as layouts_lib


def _as_tuple(x, n, name):
  t = (x,) * n if isinstance(x, (int, bool, np.integer)) else tuple(x)
  if len(t) != n:
    raise ValueError(f"{name} must be an int or a tuple of {n}, got {x}")
  return t


def na_window(x, length: int, kernel: int, stride: int, dilation: int, causal: bool):
  """`(group, start, end)` of one dimension: keys y with `y mod d == group` and
  `start <= y div d < end` are visible to the query at coordinate `x` (elementwise, jnp or numpy)."""
  group = x % dilation
  xi = x // dilation
  group_len = (length - group + dilation - 1) // dilation
  if causal:
    leader = jnp.minimum((xi // stride) * stride + stride - 1, group_len - 1)
    start = jnp.maximum(leader - kernel + 1, 0)
    end = xi + 1
  else:
    left = kernel // 2
    right = kernel // 2 + kernel % 2 - 1
    leader = jnp.minimum((xi // stride) * stride + stride // 2, group_len - 1)
    start = jnp.clip(leader, left, group_len - 1 - right) - left
    end = start + kernel
  return group, start, end


def _coords(idx, spatial, tile):
  """Flattened (raster or tile-major) token index -> tuple of spatial coordinates."""
  n = len(spatial)
  if tile is None:
    sizes = spatial
    out = []
    for dim in reversed(range(n)):
      out.append(idx % sizes[dim])
      idx = idx // sizes[dim]
    return tuple(reversed(out))
  tile_count = [s // t for s, t in zip(spatial, tile)]
  inner = idx % math.prod(tile)
  outer = idx // math.prod(tile)
  coords = [None] * n
  for dim in reversed(range(n)):
    coords[dim] = (outer % tile_count[dim]) * tile[dim] + inner % tile[dim]
    outer, inner = outer // tile_count[dim], inner // tile[dim]
  return tuple(coords)


def na_mask_rule(spatial, kernel_size, stride=1, dilation=1, is_causal=False, tile=None):
  """Elementwise rule on flattened token indices (see module docstring)."""
  n = len(spatial)
  kernel_size = _as_tuple(kernel_size, n, "kernel_size")
  stride = _as_tuple(stride, n, "stride")
  dilation = _as_tuple(dilation, n, "dilation")
  is_causal = _as_tuple(is_causal, n, "is_causal")

  def rule(q_idx, k_idx):
    qc, kc = _coords(q_idx, spatial, tile), _coords(k_idx, spatial, tile)
    ok = None
    for dim in range(n):
      group, start, end = na_window(qc[dim], spatial[dim], kernel_size[dim], stride[dim],
                                    dilation[dim], is_causal[dim])
      ky = kc[dim] // dilation[dim]
      c = (kc[dim] % dilation[dim] == group) & (ky >= start) & (ky < end)
      ok = c if ok is None else ok & c
    return ok

  return rule


def check_na_args(spatial, kernel_size, stride, dilation, tile):
  n = len(spatial)
  for name, vals in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
    if any(int(v) < 1 for v in _as_tuple(vals, n, name)):
      raise ValueError(f"{name} must be >= 1, got {vals}")
  for size, k, s, d in zip(spatial, _as_tuple(kernel_size, n, "kernel_size"),
                           _as_tuple(stride, n, "stride"), _as_tuple(dilation, n, "dilation")):
    if k * d > size:
      raise ValueError(f"kernel_size * dilation ({k}*{d}) must be <= the input size {size}")
    if s > k:
      raise ValueError(f"stride ({s}) must be <= kernel_size ({k})")
  if tile is not None and (len(tile) != n or any(s % t for s, t in zip(spatial, tile))):
    raise ValueError(f"tile {tile} must have {n} entries dividing the spatial shape {spatial}")


def na_layout(spatial, kernel_size, stride=1, dilation=1, is_causal=False, *, block_q: int,
              block_k: int, tile=None):
  """Block layout of neighborhood attention over flattened tokens."""
  spatial = tuple(int(s) for s in spatial)
  check_na_args(spatial, kernel_size, stride, dilation, tile)
  rule = na_mask_rule(spatial, kernel_size, stride, dilation, is_causal, tile)
  n = math.prod(spatial)
  return layouts_lib.layout_from_rule(rule, n, n, block_q, block_k)


def flatten_tokens(x, spatial, tile=None):
  """`[B, *spatial, H, D]` -> `[B, N, H, D]` in raster or tile-major order."""
  b, *rest = x.shape
  h, d = rest[-2:]
  if tile is None:
    return x.reshape(b, -1, h, d)
  n = len(spatial)
  shape = [b]
  for s, t in zip(spatial, tile):
    shape += [s // t, t]
  x = x.reshape(shape + [h, d])
  perm = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [2 * n + 1,
                                                                               2 * n + 2]
  return x.transpose(perm).reshape(b, -1, h, d)


def unflatten_tokens(x, spatial, tile=None):
  """Inverse of `flatten_tokens`."""
  b, _, h, d = x.shape
  if tile is None:
    return x.reshape((b,) + tuple(spatial) + (h, d))
  n = len(spatial)
  x = x.reshape([b] + [s // t for s, t in zip(spatial, tile)] + list(tile) + [h, d])
  perm = [0]
  for i in range(n):
    perm += [1 + i, 1 + n + i]
  perm += [2 * n + 1, 2 * n + 2]
  return x.transpose(perm).reshape((b,) + tuple(spatial) + (h, d))


def neighborhood_flash_attention(q, k, v, kernel_size, stride=1, dilation=1, is_causal=False, *,
                                 tile=None, block_q: int | None = None,
                                 block_k: int | None = None, layout=None, **kwargs):
  """NA on `[B, *spatial, H, D]` through the block-sparse flash kernel (kwargs go to it).

  Pass a prebuilt `layout` (from `na_layout` with the same arguments) to avoid rebuilding it per
  call; otherwise it is built here (host-side, so call outside `jit` or with static shapes).
  With `return_lse`, the lse `[B, H, N]` stays in flattened token order.
  """
  spatial = q.shape[1:-2]
  if k.shape[1:-2] != spatial or v.shape[1:-2] != spatial:
    raise ValueError(f"q, k, v must share the spatial shape {spatial}; got {k.shape}, {v.shape}")
  if layout is None:
    bq = block_q or 64
    bk = block_k or 64
    layout = na_layout(spatial, kernel_size, stride, dilation, is_causal, block_q=bq, block_k=bk,
                       tile=tile)
  flat = [flatten_tokens(x, spatial, tile) for x in (q, k, v)]
  out = api.flash_attention(*flat, layout, **kwargs)
  if kwargs.get("return_lse"):
    o, lse = out
    return unflatten_tokens(o, spatial, tile), lse
  return unflatten_tokens(out, spatial, tile)
