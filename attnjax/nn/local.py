"""Neighborhood / local attention layers and their registered sequence mixers.

Registered: `na1d` (alias `neighborhood`): 1D neighborhood attention inside `MultiHeadAttention`;
`swin`, `halo`, `bra`, `freeswim`, `na2d`, `swin_rmt`: 2D vision patterns over tokens on an image
grid (`grid_attn_fn`; `HaloAttnFn` and `SwinRMTAttnFn` for the two with parameters).
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
from attnjax.ops import dispatch
from attnjax.ops import local as local_ops
from attnjax.ops import neighborhood
from attnjax.ops.operators._common import PatternUndefinedError
from attnjax.ops.sparse import routing as routing_ops
from attnjax.ops.softmax import dot_product_attention
from attnjax.registry import register_mixer


def na1d_attn_fn(q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
                 kernel_size: int = 7, stride: int = 1, dilation: int = 1, implementation=None,
                 **unused):
  """`attn_fn` for `MultiHeadAttention`: NATTEN 1D NA with `is_causal=causal`.

  `implementation` (an `attn_options` entry) goes to `neighborhood.na1d` (None: the flash kernel
  on a CUDA GPU, the gather path elsewhere).

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
  return neighborhood.na1d(q, k, v, kern, min(stride, kern), dil, causal,
                           implementation=implementation)


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
  `[(2M-1)^2, H]` (zero-initialised). (Gated-SwinRMT is the `swin_rmt` mixer, `SwinRMTAttnFn`.)"""

  def __init__(self, dim: int, num_heads: int, *, window: int = 7, shift: int = 0,
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
    self.num_heads, self.head_dim, self.window, self.shift = num_heads, dim // num_heads, window, shift
    self.qkv = dense(dim, 3 * dim, axes=("embed", "heads"), rngs=rngs, use_bias=True)
    self.proj = dense(dim, dim, axes=("heads", "embed"), rngs=rngs, use_bias=True)
    self.rpb = nnx.Param(jnp.zeros(((2 * window - 1) ** 2, num_heads)), logical_axes=(None, "heads"))

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
    o = local_ops.swin_window_attention(q, k, v, self.window, self.shift, bias=self._bias())
    return self.proj(o.reshape(b, sx, sy, c))


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


def _swin_window(gx, gy, window, shift):
  """Window and shift clipped to the map: as Swin does when the map is no larger than the window,
  one window and no shift along that side."""
  wx, wy = min(window, gx), min(window, gy)
  return (wx, wy), ((shift % wx if wx < gx else 0), (shift % wy if wy < gy else 0))


def _plain_jax_only(pattern: str, implementation):
  """Patterns with an "xla" fast path and a "reference" oracle but no kernel."""
  dispatch.check_implementation(implementation, ("reference", "xla"), op=pattern)


def _grid_swin(q, k, v, gx, gy, *, window: int = 7, shift: int = 0, implementation=None):
  _plain_jax_only("swin", implementation)
  (wx, wy), (sx, sy) = _swin_window(gx, gy, window, shift)
  tiles = gx % wx == 0 and gy % wy == 0
  if implementation == "xla" and not tiles:
    raise ValueError(f"swin: implementation='xla' cannot serve a {gx}x{gy} map with {wx}x{wy} "
                     "windows (partial border windows need the dense mask: None or 'reference')")
  if implementation != "reference" and tiles:
    return local_ops.swin_window_attention(q, k, v, (wx, wy), (sx, sy))
  # Partial windows at the far border: Swin pads the map, and padded tokens are hidden here.
  return _dense_grid(q, k, v, local_ops.swin_mask(gx, gy, (wx, wy), (sx, sy)))


def _grid_halo(q, k, v, gx, gy, *, block: int = 8, halo: int = 3, pad_mode: str = "zeros",
               rel_h=None, rel_w=None, implementation=None):
  _plain_jax_only("halo", implementation)
  fn = (local_ops.halo_attention_reference if implementation == "reference"
        else local_ops.halo_attention)
  return fn(q, k, v, block, halo, pad_mode=pad_mode, rel_h=rel_h, rel_w=rel_w)


def _grid_bra(q, k, v, gx, gy, *, regions: int = 7, top_k: int = 4, implementation=None):
  """BRA over an `regions x regions` grid of regions. As the authors' `auto_pad`
  (rayleizhu/BiFormer `ops/bra_legacy.py`), a map that `regions` does not divide is zero-padded
  at the far border (bottom / right) to the next multiple, the padded tokens are ordinary keys
  (the authors pad `x` before the q/k/v projection; `MultiHeadAttention` has no projection bias,
  so zero q / k / v is the same thing) and their outputs are cropped. Token attention is scaled
  by `qk_dim ** -0.5` with `qk_dim = H * D` the full width, as the authors' `self.scale`."""
  if regions < 1:
    raise ValueError(f"bra: regions must be >= 1, got {regions}")
  px, py = -gx % regions, -gy % regions
  if px or py:
    grow = ((0, 0), (0, px), (0, py), (0, 0), (0, 0))
    q, k, v = jnp.pad(q, grow), jnp.pad(k, grow), jnp.pad(v, grow)
  o = routing_ops.bra_attention(q, k, v, regions=regions, top_k=min(top_k, regions * regions),
                                scale=(q.shape[3] * q.shape[4]) ** -0.5,
                                implementation=implementation)
  return o[:, :gx, :gy]


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


def _grid_freeswim(q, k, v, gx, gy, *, window: int = 7, implementation=None):
  return _on_sides_above_one(q, k, v, gx, gy, lambda q, k, v: local_ops.freeswim_attention(
      q, k, v, window, implementation=implementation))


def _grid_na2d(q, k, v, gx, gy, *, kernel_size: int = 7, dilation: int = 1,
               implementation=None):
  def attend(q, k, v):
    spatial = q.shape[1:-2]
    kern = tuple(max(2, min(kernel_size, s)) for s in spatial)
    # As NAT/DiNAT do at small resolutions: no dilation where kernel * dilation exceeds the map.
    dil = tuple(dilation if kk * dilation <= s else 1 for kk, s in zip(kern, spatial))
    return neighborhood.neighborhood_attention(q, k, v, kern, 1, dil,
                                               implementation=implementation)

  return _on_sides_above_one(q, k, v, gx, gy, attend)


def _dense_grid(q, k, v, mask, bias=None):
  b, gx, gy = q.shape[:3]
  flat = lambda a: a.reshape(b, gx * gy, *a.shape[3:])
  o = dot_product_attention(flat(q), flat(k), flat(v), mask=jnp.asarray(mask), bias=bias,
                            implementation="reference")
  return o.reshape(b, gx, gy, *o.shape[2:])


_GRID_PATTERNS = {"swin": _grid_swin, "halo": _grid_halo, "bra": _grid_bra,
                  "freeswim": _grid_freeswim, "na2d": _grid_na2d}


def _grid_apply(q, k, v, *, causal, mask, q_segment_ids, pattern: str, grid, num_prefix,
                image_fn):
  """Shared CAB checks and token layout of the grid mixers: `image_fn(q, k, v, gx, gy)` on the
  `[B, X, Y, H, D]` image tokens; prefix tokens (a class token) attend to every token."""
  if causal or mask is not None:
    raise PatternUndefinedError(f"{pattern}: causal attention and decoding are undefined for a 2D "
                                "vision pattern; build it with causal=False")
  if q_segment_ids is not None:
    raise PatternUndefinedError(f"{pattern}: packed sequences (segment_ids) are undefined on a grid")
  if q.shape[1] != k.shape[1]:
    raise PatternUndefinedError(f"{pattern}: cross attention is undefined (keys live on the query "
                                f"grid), got Tq={q.shape[1]}, Tk={k.shape[1]}")
  b, t = q.shape[:2]
  p, (gx, gy) = grid_layout(t, grid, num_prefix)
  img = lambda a: a[:, p:].reshape(b, gx, gy, *a.shape[2:])
  o = image_fn(img(q), img(k), img(v), gx, gy)
  o = o.reshape(b, gx * gy, *o.shape[3:]).astype(q.dtype)
  if p:
    o_prefix = dot_product_attention(q[:, :p], k, v, implementation="reference").astype(q.dtype)
    o = jnp.concatenate([o_prefix, o], axis=1)
  return o


def grid_attn_fn(q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
                 pattern: str, grid=None, num_prefix: int | None = None, implementation=None,
                 pattern_options: dict | None = None, **unused):
  """`attn_fn` for `MultiHeadAttention`: a 2D vision pattern over `[B, T, H, D]` tokens laid out
  by `grid_layout` (prefix tokens, then a row-major `X x Y` grid).

  Image tokens attend to image tokens through `pattern` (`swin`, `bra`, `freeswim`, `na2d`; `halo`
  and `swin_rmt` have parameters and run through `HaloAttnFn` / `SwinRMTAttnFn`); prefix tokens (a
  class token) attend to every token, as global tokens do. Sides of one token drop out for
  `freeswim` / `na2d` (a `(1, T)` grid is their 1D form). Grids the fast op cannot tile (a window
  that does not divide the map) use the pattern's dense mask (O(T^2)). `implementation`
  (`attnjax.ops.dispatch`; an `attn_options` entry): None (the fast path), "xla", "pallas" (`bra`,
  `freeswim`, `na2d`: the flash kernel) or "reference" (the pattern's dense mask, the oracle).
  CAB patterns: non-causal self-attention is defined. Non-causal cross attention is defined when the
  context is a map on the same grid (same token count: keys at the same positions); any other
  context raises `PatternUndefinedError`, as do causal attention, decoding and packed sequences.
  """
  fn = lambda q, k, v, gx, gy: _GRID_PATTERNS[pattern](
      q, k, v, gx, gy, implementation=implementation, **(pattern_options or {}))
  return _grid_apply(q, k, v, causal=causal, mask=mask, q_segment_ids=q_segment_ids,
                     pattern=pattern, grid=grid, num_prefix=num_prefix, image_fn=fn)


def _grid_builder(pattern: str, option_names: tuple[str, ...]):
  def build(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, grid=None,
            num_prefix: int | None = None, **options: Any):
    _no_causal(pattern, causal)
    if pattern == "swin" and "gamma" in options:
      raise ValueError("swin: the gamma option is gone: Gated-SwinRMT's decomposed window "
                       "retention is the swin_rmt mixer")
    pattern_options = {n: options.pop(n) for n in option_names if n in options}
    fn = functools.partial(grid_attn_fn, pattern=pattern, grid=grid, num_prefix=num_prefix,
                           pattern_options=pattern_options)
    # Positions come from the grid pattern (and the ViT's position embedding), not from RoPE.
    options.setdefault("rope", False)
    return MultiHeadAttention(d_model, num_heads, causal=False, attn_fn=fn, rngs=rngs, **options)
  build.__doc__ = (f"`{pattern}` over tokens on an image grid (`grid=(X, Y)`, `num_prefix`; default: "
                   f"inferred by `grid_layout`); pattern options: {', '.join(option_names)}.")
  return build


class HaloAttnFn(nnx.Module):
  """`attn_fn` for `MultiHeadAttention`: HaloNet (Vaswani et al. 2021, arXiv:2103.12731) over the image grid, as timm's `HaloAttn`
  (`timm/layers/halo_attn.py`): blocks of `block x block` queries attend their block grown by
  `halo`, border keys zero-padded and unmasked (`pad_mode="zeros"`; `"mask"` hides them), plus
  timm's relative-position logits (`PosEmbedRel`: one height and one width table
  `[2 (block + 2 halo) - 1, head_dim]` shared by heads, trunc-normal init with std
  `head_dim ** -0.5`; `rel_pos=False` drops them). A map `block` does not divide is zero-padded
  (`ops.local.halo_attention`). CAB patterns as `grid_attn_fn`."""

  def __init__(self, head_dim: int, *, block: int = 8, halo: int = 3, pad_mode: str = "zeros",
               rel_pos: bool = True, grid=None, num_prefix: int | None = None, rngs: nnx.Rngs):
    if block < 1 or halo < 0 or pad_mode not in ("zeros", "mask"):
      raise ValueError(f"halo: need block >= 1, halo >= 0 and pad_mode 'zeros' or 'mask', got "
                       f"block={block}, halo={halo}, pad_mode={pad_mode!r}")
    self.block, self.halo, self.pad_mode = block, halo, pad_mode
    self.grid, self.num_prefix = None if grid is None else tuple(grid), num_prefix
    win = block + 2 * halo
    init = nnx.initializers.truncated_normal(stddev=head_dim ** -0.5)
    self.rel_h = nnx.Param(init(rngs.params(), (2 * win - 1, head_dim))) if rel_pos else None
    self.rel_w = nnx.Param(init(rngs.params(), (2 * win - 1, head_dim))) if rel_pos else None

  def __call__(self, q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
               implementation=None, **unused):
    opts = dict(block=self.block, halo=self.halo, pad_mode=self.pad_mode)
    if self.rel_h is not None:
      opts.update(rel_h=self.rel_h[...], rel_w=self.rel_w[...])
    return grid_attn_fn(q, k, v, causal=causal, mask=mask, q_segment_ids=q_segment_ids,
                        pattern="halo", grid=self.grid, num_prefix=self.num_prefix,
                        implementation=implementation, pattern_options=opts)


class SwinRMTAttnFn(nnx.Module):
  """`attn_fn` for `MultiHeadAttention`: Gated-SwinRMT-Retention's token mixing (Maity et al. 2026, arXiv:2604.06014) over the
  image grid, before the G1 gate and `W_O` (which the mixer's `MultiHeadAttention` applies:
  `output_gate="elementwise"`, `sigmoid(x W_g)` from the block input).

  `O = DecomposedRetention(Q, K, V) + LCE(V)`: the width- then height-wise window retention
  (`ops.local.decomposed_window_retention`, (shifted) Swin windows of `window`, `shift`) with the
  per-head RMT decay `log gamma_h = log(1 - 2^(-initial_value - heads_range h / H))`
  (`rmt_log_decay`, a fixed schedule, no learned positional bias), and the local context
  enhancement `LCE` = a depth-wise `lce_kernel x lce_kernel` convolution of V (RMT's `lepe`,
  kernel 5). Readings: RMT's theta-shift rotation of q / k and its projection biases are not used
  (`MultiHeadAttention` has neither); the SWAT variant is not implemented. Window and shift are
  clipped to small maps as Swin does. CAB patterns as `grid_attn_fn`.
  """

  def __init__(self, num_heads: int, head_dim: int, *, window: int = 7, shift: int = 0,
               initial_value: float = 2.0, heads_range: float = 4.0, lce_kernel: int = 5,
               grid=None, num_prefix: int | None = None, rngs: nnx.Rngs):
    if window < 1 or shift < 0 or lce_kernel < 1:
      raise ValueError(f"swin_rmt: need window >= 1, shift >= 0 and lce_kernel >= 1, got "
                       f"window={window}, shift={shift}, lce_kernel={lce_kernel}")
    self.num_heads, self.head_dim, self.window, self.shift = num_heads, head_dim, window, shift
    self.initial_value, self.heads_range = initial_value, heads_range
    self.grid, self.num_prefix = None if grid is None else tuple(grid), num_prefix
    dim = num_heads * head_dim
    self.lce = nnx.Conv(dim, dim, kernel_size=(lce_kernel, lce_kernel), feature_group_count=dim,
                        padding="SAME", use_bias=True, rngs=rngs)

  def log_decay(self):
    return local_ops.rmt_log_decay(self.num_heads, self.initial_value, self.heads_range)

  def __call__(self, q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
               **unused):
    h = q.shape[2]

    def image(q, k, v, gx, gy):
      window, shift = _swin_window(gx, gy, self.window, self.shift)
      o = local_ops.decomposed_window_retention(q, k, v, window, shift, log_decay=self.log_decay())
      vr = jnp.repeat(v, h // v.shape[3], axis=3)
      b = q.shape[0]
      lce = self.lce(vr.reshape(b, gx, gy, -1)).reshape(b, gx, gy, h, v.shape[-1])
      return o + lce.astype(o.dtype)

    return _grid_apply(q, k, v, causal=causal, mask=mask, q_segment_ids=q_segment_ids,
                       pattern="swin_rmt", grid=self.grid, num_prefix=self.num_prefix,
                       image_fn=image)


def _no_causal(pattern, causal):
  if causal:
    raise PatternUndefinedError(f"{pattern}: the causal pattern is undefined for this 2D vision "
                                "pattern; use causal=False (ViT builds its mixers that way)")


register_mixer("swin", "Swin W-MSA / SW-MSA (Liu et al. 2021, arXiv:2103.14030) window attention on an image grid (window, shift; "
               "non-causal).")(_grid_builder("swin", ("window", "shift")))


@register_mixer("halo", "HaloNet blocked local attention (Vaswani et al. 2021, arXiv:2103.12731) on an image grid, as timm's HaloAttn "
                "(block, halo, pad_mode, rel_pos; non-causal).")
def _build_halo(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, grid=None,
                num_prefix: int | None = None, block: int = 8, halo: int = 3,
                pad_mode: str = "zeros", rel_pos: bool = True, **options: Any):
  _no_causal("halo", causal)
  options.setdefault("rope", False)
  fn = HaloAttnFn(d_model // num_heads, block=block, halo=halo, pad_mode=pad_mode, rel_pos=rel_pos,
                  grid=grid, num_prefix=num_prefix, rngs=rngs)
  return MultiHeadAttention(d_model, num_heads, causal=False, attn_fn=fn, rngs=rngs, **options)


@register_mixer("swin_rmt", "Gated-SwinRMT-Retention (Maity et al. 2026, arXiv:2604.06014): width- then height-wise decayed window "
                "retention + LCE, G1 sigmoid gate before W_O (window, shift, initial_value, "
                "heads_range, lce_kernel; non-causal).")
def _build_swin_rmt(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, grid=None,
                    num_prefix: int | None = None, window: int = 7, shift: int = 0,
                    initial_value: float = 2.0, heads_range: float = 4.0, lce_kernel: int = 5,
                    **options: Any):
  _no_causal("swin_rmt", causal)
  for bad in ("rope", "output_gate", "attn_fn", "num_kv_heads"):
    if bad in options:
      raise ValueError(f"swin_rmt: option {bad!r} is fixed by Gated-SwinRMT")
  fn = SwinRMTAttnFn(num_heads, d_model // num_heads, window=window, shift=shift,
                     initial_value=initial_value, heads_range=heads_range, lce_kernel=lce_kernel,
                     grid=grid, num_prefix=num_prefix, rngs=rngs)
  return MultiHeadAttention(d_model, num_heads, causal=False, rope=False, attn_fn=fn,
                            output_gate="elementwise", rngs=rngs, **options)


register_mixer("bra", "BiFormer bi-level routing attention (Zhu et al. 2023, arXiv:2303.08810) on an image grid (regions, top_k; "
               "non-causal).")(_grid_builder("bra", ("regions", "top_k")))
register_mixer("na2d", "2D neighborhood attention (NATTEN semantics; kernel_size, dilation) on an "
               "image grid (non-causal).")(_grid_builder("na2d", ("kernel_size", "dilation")))
register_mixer("freeswim", "FreeSwim inward sliding window (Wu et al. 2025, arXiv:2511.14712) on an image grid (window; "
               "non-causal).")(_grid_builder("freeswim", ("window",)))
