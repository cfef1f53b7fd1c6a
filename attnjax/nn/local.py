"""Neighborhood / local attention layers (catalog N) and their registered sequence mixers.

Registered: `na1d` (alias `neighborhood`): 1D neighborhood attention inside `MultiHeadAttention`;
`swin`, `halo`, `bra`, `freeswim`, `na2d`: 2D vision patterns over tokens on an image grid
(`grid_attn_fn`).
2D layers for vision backbones: `NeighborhoodAttention2D` (NAT/DiNAT), `SwinAttention2D`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.layers import dense
from attnjax.ops import local as local_ops
from attnjax.ops import neighborhood
from attnjax.ops.operators._common import PatternUndefinedError
from attnjax.ops.sparse import routing as routing_ops
from attnjax.ops.softmax import dot_product_attention
from attnjax.registry import register_mixer


def na1d_attn_fn(q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
                 kernel_size: int = 7, stride: int = 1, dilation: int = 1, **unused):
  """`attn_fn` for `MultiHeadAttention`: NATTEN 1D NA with `is_causal=causal`.

  Sequences shorter than `kernel_size * dilation` use the largest kernel that fits (the whole
  group: full attention), so short prompts work. Decoding (`mask` given by the cache) is defined for
  causal stride-1 NA, where the window is the last `kernel_size` keys of the query's dilation group.
  Packed sequences are not supported: NA windows depend on absolute positions and borders.
  """
  if q_segment_ids is not None:
    raise NotImplementedError("na1d: segment_ids are not supported (windows depend on borders)")
  if mask is None and q.shape[1] != k.shape[1]:
    raise PatternUndefinedError(f"na1d: cross attention is undefined (neighbourhoods live on one token "
                                f"axis); got Tq={q.shape[1]}, Tk={k.shape[1]}")
  if mask is not None:
    # MultiHeadAttention decodes causally and passes the cache mask with causal=False.
    if stride != 1:
      raise NotImplementedError("na1d decodes only causal, stride-1 neighborhoods")
    q_pos = jnp.sum(mask, axis=-1, keepdims=True) - 1        # cache mask: k <= q_pos
    k_pos = jnp.arange(k.shape[1])
    diff = q_pos - k_pos
    nb = mask & (diff % dilation == 0) & (diff < kernel_size * dilation)
    return dot_product_attention(q, k, v, mask=nb, implementation="reference")
  t = q.shape[1]
  kern = max(2, min(kernel_size, t // dilation))
  dil = dilation if kern * dilation <= t else 1
  kern = min(kern, t)
  if t < 2:
    return dot_product_attention(q, k, v, causal=causal, implementation="reference")
  return neighborhood.na1d(q, k, v, kern, min(stride, kern), dil, causal)


@register_mixer("na1d", "1D neighborhood attention (NATTEN semantics; kernel_size/stride/dilation).")
def _build_na1d(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                kernel_size: int = 7, stride: int = 1, dilation: int = 1, **options: Any):
  fn = functools.partial(na1d_attn_fn, kernel_size=kernel_size, stride=stride, dilation=dilation)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


@register_mixer("neighborhood", "Alias of na1d: 1D neighborhood attention.")
def _build_neighborhood(**kwargs):
  return _build_na1d(**kwargs)


class NeighborhoodAttention2D(nnx.Module):
  """NA2D layer on `x [B, X, Y, C]` (NAT / DiNAT): q/k/v/o projections around `na2d`.

  `kernel_size` 7, `dilation` 1 (NAT) or alternating (DiNAT); the dilation is reduced to 1 where
  `kernel * dilation` exceeds the map (as DiNAT does at small resolutions).
  """

  def __init__(self, dim: int, num_heads: int, *, kernel_size=7, dilation=1, is_causal=False,
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
    self.num_heads, self.head_dim = num_heads, dim // num_heads
    self.kernel_size, self.dilation, self.is_causal = kernel_size, dilation, is_causal
    self.qkv = dense(dim, 3 * dim, axes=("embed", "heads"), rngs=rngs, use_bias=True)
    self.proj = dense(dim, dim, axes=("heads", "embed"), rngs=rngs, use_bias=True)

  def __call__(self, x):
    if x.ndim != 4:
      raise ValueError(f"x must be [B, X, Y, C], got {x.shape}")
    b, sx, sy, c = x.shape
    qkv = self.qkv(x).reshape(b, sx, sy, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    kern = tuple(min(self.kernel_size, s) for s in (sx, sy))
    dil = tuple(self.dilation if kk * self.dilation <= s else 1 for kk, s in zip(kern, (sx, sy)))
    o = neighborhood.na2d(q, k, v, kern, 1, dil, self.is_causal)
    return self.proj(o.reshape(b, sx, sy, c))


class SwinAttention2D(nnx.Module):
  """Swin W-MSA / SW-MSA layer on `x [B, X, Y, C]` with a relative position bias table
  `[(2M-1)^2, H]` (zero-initialised) and, if `gamma` is given, Gated-SwinRMT's Manhattan decay
  and sigmoid input gate `sigma(x W_g)` applied before the output projection."""

  def __init__(self, dim: int, num_heads: int, *, window: int = 7, shift: int = 0,
               gamma: float | None = None, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
    self.num_heads, self.head_dim, self.window, self.shift = num_heads, dim // num_heads, window, shift
    self.gamma = gamma
    self.qkv = dense(dim, 3 * dim, axes=("embed", "heads"), rngs=rngs, use_bias=True)
    self.proj = dense(dim, dim, axes=("heads", "embed"), rngs=rngs, use_bias=True)
    self.rpb = nnx.Param(jnp.zeros(((2 * window - 1) ** 2, num_heads)), logical_axes=(None, "heads"))
    self.gate = dense(dim, dim, axes=("embed", "heads"), rngs=rngs, use_bias=True) if gamma else None

  def _bias(self):
    m = self.window
    c = jnp.stack(jnp.meshgrid(jnp.arange(m), jnp.arange(m), indexing="ij"), -1).reshape(-1, 2)
    rel = c[:, None] - c[None] + (m - 1)
    idx = rel[..., 0] * (2 * m - 1) + rel[..., 1]
    return jnp.moveaxis(self.rpb[...][idx], -1, 0)      # [H, n, n]

  def __call__(self, x):
    b, sx, sy, c = x.shape
    qkv = self.qkv(x).reshape(b, sx, sy, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    log_gamma = None
    if self.gamma is not None:
      log_gamma = jnp.full((self.num_heads, 2), jnp.log(self.gamma))
    o = local_ops.swin_window_attention(q, k, v, self.window, self.shift, bias=self._bias(),
                                        log_gamma=log_gamma).reshape(b, sx, sy, c)
    if self.gate is not None:
      o = o * jax.nn.sigmoid(self.gate(x))
    return self.proj(o)


# ---------------------------------------------------------------------------------------------
# 2D vision patterns as sequence mixers (tokens on an image grid, row-major)
# ---------------------------------------------------------------------------------------------


def grid_layout(t: int, grid=None, num_prefix: int | None = None):
  """`(num_prefix, (X, Y))` of a token sequence of length `t`: `num_prefix` leading tokens (a ViT
  class token) followed by an `X x Y` row-major image grid.

  Without `grid`: a square `t` is a square grid; `t - 1` square reads one class token; any other
  `t` is read as one row `(1, t)`, so the mixer also runs on plain sequences."""
  if grid is not None:
    gx, gy = (int(a) for a in grid)
    p = t - gx * gy if num_prefix is None else num_prefix
    if gx < 1 or gy < 1 or p < 0 or p + gx * gy != t:
      raise ValueError(f"grid={tuple(grid)} with num_prefix={num_prefix} does not fit T={t} tokens")
    return p, (gx, gy)
  for p in ((0, 1) if num_prefix is None else (num_prefix,)):
    side = math.isqrt(max(t - p, 0))
    if side > 0 and side * side == t - p:
      return p, (side, side)
  p = num_prefix or 0
  if t - p < 1:
    raise ValueError(f"num_prefix={p} leaves no image tokens in T={t}")
  return p, (1, t - p)


def _largest_divisor_at_most(n: int, cap: int) -> int:
  return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _grid_swin(q, k, v, gx, gy, *, window: int = 7, shift: int = 0, gamma: float | None = None,
               force_dense: bool = False):
  wx, wy = min(window, gx), min(window, gy)
  # As Swin does when the map is no larger than the window: one window, no shift.
  sx, sy = (shift % wx if wx < gx else 0), (shift % wy if wy < gy else 0)
  log_gamma = None
  if gamma is not None:
    # Gated-SwinRMT's retention branch [88]: Manhattan decay gamma^(|dx| + |dy|) inside windows.
    if not 0.0 < gamma <= 1.0:
      raise ValueError(f"swin: gamma must be in (0, 1], got {gamma}")
    log_gamma = jnp.full((q.shape[3], 2), math.log(gamma), jnp.float32)
  if not force_dense and gx % wx == 0 and gy % wy == 0:
    return local_ops.swin_window_attention(q, k, v, (wx, wy), (sx, sy), log_gamma=log_gamma)
  # Partial windows at the far border: Swin pads the map, and padded tokens are hidden here.
  bias = None
  if gamma is not None:
    cx, cy = np.meshgrid(np.arange(gx), np.arange(gy), indexing="ij")
    bias = local_ops.manhattan_bias(cx.ravel(), cy.ravel(), log_gamma)[None]
  return _dense_grid(q, k, v, local_ops.swin_mask(gx, gy, (wx, wy), (sx, sy)), bias)


def _grid_halo(q, k, v, gx, gy, *, block: int = 8, halo: int = 3, force_dense: bool = False):
  if not force_dense and gx % block == 0 and gy % block == 0:
    return local_ops.halo_attention(q, k, v, block, halo, pad_mode="mask")
  return _dense_grid(q, k, v, local_ops.halo_mask(gx, gy, block, halo))


def _grid_bra(q, k, v, gx, gy, *, regions: int = 7, top_k: int = 4, force_dense: bool = False):
  r = _largest_divisor_at_most(math.gcd(gx, gy), regions)
  return routing_ops.bra_attention(q, k, v, regions=r, top_k=min(top_k, r * r),
                                   implementation="reference" if force_dense else "block_sparse")


def _on_sides_above_one(q, k, v, gx, gy, attend):
  """`attend(q, k, v)` on `[B, *sides, H, D]` with the grid's sides of one token dropped (these
  patterns need >= 2 tokens per dimension, so a `(1, T)` grid is their 1D form) -> `[B, X, Y, H, Dv]`.
  A single image token sees only itself."""
  spatial = tuple(s for s in (gx, gy) if s > 1)
  if not spatial:
    return jnp.repeat(v, q.shape[3] // v.shape[3], axis=3)
  b, h = q.shape[0], q.shape[3]
  shape = lambda a: a.reshape((b,) + spatial + a.shape[3:])
  return attend(shape(q), shape(k), shape(v)).reshape(b, gx, gy, h, v.shape[-1])


def _grid_freeswim(q, k, v, gx, gy, *, window: int = 7, force_dense: bool = False):
  impl = "reference" if force_dense else "block_sparse"
  return _on_sides_above_one(q, k, v, gx, gy, lambda q, k, v: local_ops.freeswim_attention(
      q, k, v, window, implementation=impl))


def _grid_na2d(q, k, v, gx, gy, *, kernel_size: int = 7, dilation: int = 1,
               force_dense: bool = False):
  impl = "reference" if force_dense else "block_sparse"

  def attend(q, k, v):
    spatial = q.shape[1:-2]
    kern = tuple(max(2, min(kernel_size, s)) for s in spatial)
    # As NAT/DiNAT do at small resolutions: no dilation where kernel * dilation exceeds the map.
    dil = tuple(dilation if kk * dilation <= s else 1 for kk, s in zip(kern, spatial))
    return neighborhood.neighborhood_attention(q, k, v, kern, 1, dil, implementation=impl)

  return _on_sides_above_one(q, k, v, gx, gy, attend)


def _dense_grid(q, k, v, mask, bias=None):
  b, gx, gy = q.shape[:3]
  flat = lambda a: a.reshape(b, gx * gy, *a.shape[3:])
  o = dot_product_attention(flat(q), flat(k), flat(v), mask=jnp.asarray(mask), bias=bias,
                            implementation="reference")
  return o.reshape(b, gx, gy, *o.shape[2:])


_GRID_PATTERNS = {"swin": _grid_swin, "halo": _grid_halo, "bra": _grid_bra,
                  "freeswim": _grid_freeswim, "na2d": _grid_na2d}


def grid_attn_fn(q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
                 pattern: str, grid=None, num_prefix: int | None = None, force_dense: bool = False,
                 pattern_options: dict | None = None, **unused):
  """`attn_fn` for `MultiHeadAttention`: a 2D vision pattern over `[B, T, H, D]` tokens laid out
  by `grid_layout` (prefix tokens, then a row-major `X x Y` grid).

  Image tokens attend to image tokens through `pattern` (`swin`, `halo`, `bra`, `freeswim`,
  `na2d`); prefix tokens (a class token) attend to every token, as global tokens do. Sides of one
  token drop out for `freeswim` / `na2d` (a `(1, T)` grid is their 1D form). Grids the fast op cannot tile
  (a window or block that does not divide the map) use the pattern's dense mask (O(T^2)).
  Self-attention only; causal, decoding and packed sequences are undefined for these patterns.
  """
  if causal or mask is not None:
    raise PatternUndefinedError(f"{pattern}: causal attention and decoding are undefined for a 2D "
                                "vision pattern; build it with causal=False")
  if q_segment_ids is not None:
    raise PatternUndefinedError(f"{pattern}: packed sequences (segment_ids) are undefined on a grid")
  if q.shape[1] != k.shape[1]:
    raise PatternUndefinedError(f"{pattern}: cross attention is undefined (keys live on the query grid)")
  b, t = q.shape[:2]
  p, (gx, gy) = grid_layout(t, grid, num_prefix)
  img = lambda a: a[:, p:].reshape(b, gx, gy, *a.shape[2:])
  o = _GRID_PATTERNS[pattern](img(q), img(k), img(v), gx, gy, force_dense=force_dense,
                              **(pattern_options or {}))
  o = o.reshape(b, gx * gy, *o.shape[3:]).astype(q.dtype)
  if p:
    o_prefix = dot_product_attention(q[:, :p], k, v, implementation="reference").astype(q.dtype)
    o = jnp.concatenate([o_prefix, o], axis=1)
  return o


def _grid_builder(pattern: str, option_names: tuple[str, ...]):
  def build(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, grid=None,
            num_prefix: int | None = None, **options: Any):
    if causal:
      raise PatternUndefinedError(f"{pattern}: the causal pattern is undefined for this 2D vision "
                                  "pattern; use causal=False (ViT builds its mixers that way)")
    pattern_options = {n: options.pop(n) for n in option_names if n in options}
    fn = functools.partial(grid_attn_fn, pattern=pattern, grid=grid, num_prefix=num_prefix,
                           pattern_options=pattern_options)
    # Positions come from the grid pattern (and the ViT's position embedding), not from RoPE.
    options.setdefault("rope", False)
    return MultiHeadAttention(d_model, num_heads, causal=False, attn_fn=fn, rngs=rngs, **options)
  build.__doc__ = (f"`{pattern}` over tokens on an image grid (`grid=(X, Y)`, `num_prefix`; default: "
                   f"inferred by `grid_layout`); pattern options: {', '.join(option_names)}.")
  return build


register_mixer("swin", "Swin W-MSA / SW-MSA [18] window attention on an image grid (window, shift; "
               "gamma: Gated-SwinRMT's Manhattan decay [88]; non-causal).")(
                   _grid_builder("swin", ("window", "shift", "gamma")))
register_mixer("halo", "HaloNet blocked local attention [20] on an image grid (block, halo; "
               "non-causal).")(_grid_builder("halo", ("block", "halo")))
register_mixer("bra", "BiFormer bi-level routing attention [112] on an image grid (regions, top_k; "
               "non-causal).")(_grid_builder("bra", ("regions", "top_k")))
register_mixer("na2d", "2D neighborhood attention (NATTEN semantics; kernel_size, dilation) on an "
               "image grid (non-causal).")(_grid_builder("na2d", ("kernel_size", "dilation")))
register_mixer("freeswim", "FreeSwim inward sliding window [113] on an image grid (window; "
               "non-causal).")(_grid_builder("freeswim", ("window",)))
