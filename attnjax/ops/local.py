"""Local attention schemes on 2D maps `[B, X, Y, H, D]`: HaloNet, Swin (shifted) windows,
FreeSwim's inward sliding window and Gated-SwinRMT's decomposed (width- then height-wise) window
retention.

Each has a fast path (window partition / unfold, memory O(T * window)) and a dense-masked
reference (`*_reference`) that states the definition as an explicit `[T, T]` mask (and bias).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.ops import neighborhood
from attnjax.ops.softmax import dot_product_attention


def _check_2d(q, k, v, name="q"):
  if q.ndim != 5 or k.shape[:3] != q.shape[:3] or v.shape[:3] != q.shape[:3] or (
      k.shape[-1] != q.shape[-1]) or v.shape[3] != k.shape[3] or q.shape[3] % k.shape[3]:
    raise ValueError(f"{name}, k, v must be [B, X, Y, H, D], [B, X, Y, Hk, D], [B, X, Y, Hk, Dv] "
                     f"with H % Hk == 0, got {q.shape}, {k.shape}, {v.shape}")


def _flat(x):
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3], x.shape[4])


def _softmax_attend(q, k, v, mask, bias, scale):
  """q [..., n, H, D], k/v [..., m, Hk, D]; mask/bias broadcast to [..., H, n, m]. Zeros if empty."""
  h, hk = q.shape[-2], k.shape[-2]
  if h != hk:
    k = jnp.repeat(k, h // hk, axis=-2)
    v = jnp.repeat(v, h // hk, axis=-2)
  s = jnp.einsum("...nhd,...mhd->...hnm", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    s = s + bias
  s = jnp.where(mask, s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, -1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = jnp.sum(p, -1, keepdims=True)
  p = p / jnp.where(l > 0, l, 1.0)
  return jnp.einsum("...hnm,...mhd->...nhd", p, v.astype(jnp.float32)).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# HaloNet
# ---------------------------------------------------------------------------------------------


def _check_halo(q, k, v, block, halo, pad_mode, rel_h, rel_w):
  _check_2d(q, k, v)
  if block < 1 or halo < 0:
    raise ValueError(f"halo_attention needs block >= 1 and halo >= 0, got block={block}, halo={halo}")
  if pad_mode not in ("zeros", "mask"):
    raise ValueError(f"pad_mode must be 'zeros' or 'mask', got {pad_mode!r}")
  win, d = block + 2 * halo, q.shape[-1]
  if (rel_h is None) != (rel_w is None):
    raise ValueError("halo_attention: give both rel_h and rel_w, or neither")
  if rel_h is not None and (rel_h.shape != (2 * win - 1, d) or rel_w.shape != (2 * win - 1, d)):
    raise ValueError(f"halo_attention: rel_h, rel_w must be [2 (block + 2 halo) - 1, D] = "
                     f"{(2 * win - 1, d)}, got {rel_h.shape}, {rel_w.shape}")
  return win


def halo_attention(q, k, v, block: int, halo: int, *, pad_mode: str = "zeros", rel_h=None,
                   rel_w=None, scale=None):
  """HaloNet blocked local attention (Vaswani et al. 2021, arXiv:2103.12731) on `[B, X, Y, H, D]`, as timm's `HaloAttn`
  (`timm/layers/halo_attn.py`).

  Queries are split into `block x block` blocks; a block attends the `(block + 2 halo)^2` keys of
  its block grown by `halo` on every side. `pad_mode="zeros"` (timm, the default): keys outside the
  map are zero vectors that stay unmasked (score = the relative logit only, value 0), so every
  block sees a full window; `"mask"`: they are hidden. A map that `block` does not divide is
  zero-padded at the far border to a multiple of `block` (those tokens are border keys like the
  halo, and their query outputs are dropped). `rel_h, rel_w [2 win - 1, D]` (`win = block +
  2 halo`, shared by heads) add timm's `PosEmbedRel` logits `q . rel_h[dx + win - 1 - halo] + q .
  rel_w[dy + win - 1 - halo]` for a key at offset `(dx, dy)` from the query, unscaled (timm's default
  `scale_pos_embed=False`): `S = q k^T / sqrt(D) + rel`. Paper default b=8, h=3.
  """
  win = _check_halo(q, k, v, block, halo, pad_mode, rel_h, rel_w)
  b, x, y, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  px, py = -x % block, -y % block
  if px or py:
    grow = ((0, 0), (0, px), (0, py), (0, 0), (0, 0))
    q, k, v = jnp.pad(q, grow), jnp.pad(k, grow), jnp.pad(v, grow)
  xp, yp = x + px, y + py
  nx, ny = xp // block, yp // block
  pad = ((0, 0), (halo, halo), (halo, halo), (0, 0), (0, 0))
  kp, vp = jnp.pad(k, pad), jnp.pad(v, pad)
  inside = np.zeros((xp + 2 * halo, yp + 2 * halo), bool)
  inside[halo:halo + x, halo:halo + y] = True
  # Unfold: window (i, j) starts at padded (i * block, j * block).
  ix = (np.arange(nx) * block)[:, None] + np.arange(win)[None]            # [nx, win]
  iy = (np.arange(ny) * block)[:, None] + np.arange(win)[None]
  def unfold(a):  # [B, X', Y', ...] -> [B, nx, ny, win*win, ...]
    a = a[:, ix]                      # [B, nx, win, Y', ...]
    a = a[:, :, :, iy]                # [B, nx, win, ny, win, ...]
    a = jnp.moveaxis(a, 3, 2)         # [B, nx, ny, win, win, ...]
    return a.reshape(a.shape[:3] + (win * win,) + a.shape[5:])
  kw, vw = unfold(kp), unfold(vp)
  qb = q.reshape(b, nx, block, ny, block, h, d).transpose(0, 1, 3, 2, 4, 5, 6)
  qb = qb.reshape(b, nx, ny, block * block, h, d)
  if pad_mode == "zeros":
    mask = jnp.ones((1, 1, 1, 1, 1, win * win), bool)
  else:
    valid = unfold(jnp.asarray(inside)[None])[0]                           # [nx, ny, win*win]
    mask = valid[None, :, :, None, None, :]
  bias = None
  if rel_h is not None:
    # Block-local query (i, j) and window key (a, c): offset (a - halo - i, c - halo - j).
    qpos, kpos = np.arange(block), np.arange(win)
    idx = kpos[None, :] - qpos[:, None] + win - 1                          # [block, win]
    qg = qb.reshape(b, nx, ny, block, block, h, d).astype(jnp.float32)
    th = jnp.einsum("bxyijhd,rd->bxyhijr", qg, rel_h.astype(jnp.float32))
    tw = jnp.einsum("bxyijhd,rd->bxyhijr", qg, rel_w.astype(jnp.float32))
    # rel_h logit for (i, j, a): th[..., i, j, idx[i, a]]; rel_w for (i, j, c): tw[..., i, j, idx[j, c]].
    gh = jnp.take_along_axis(th, jnp.broadcast_to(jnp.asarray(idx)[:, None, :], th.shape[:-1] + (win,))
                             .astype(jnp.int32), axis=-1)                  # [..., i, j, a]
    gw = jnp.take_along_axis(tw, jnp.broadcast_to(jnp.asarray(idx)[None, :, :], tw.shape[:-1] + (win,))
                             .astype(jnp.int32), axis=-1)                  # [..., i, j, c]
    bias = (gh[..., :, None] + gw[..., None, :]).reshape(b, nx, ny, h, block * block, win * win)
  o = _softmax_attend(qb, kw, vw, mask, bias, scale)
  o = o.reshape(b, nx, ny, block, block, h, v.shape[-1]).transpose(0, 1, 3, 2, 4, 5, 6)
  return o.reshape(b, xp, yp, h, v.shape[-1])[:, :x, :y]


def halo_mask(x: int, y: int, block: int, halo: int, padded: bool = False) -> np.ndarray:
  """Host: `[X*Y, X'*Y']` block-neighbourhood mask; keys on the halo-padded grid if `padded`."""
  qx, qy = np.meshgrid(np.arange(x), np.arange(y), indexing="ij")
  off = halo if padded else 0
  kx, ky = np.meshgrid(np.arange(x + 2 * off), np.arange(y + 2 * off), indexing="ij")
  kx, ky = kx.ravel() - off, ky.ravel() - off
  bx, by = (qx.ravel() // block)[:, None], (qy.ravel() // block)[:, None]
  return ((kx >= bx * block - halo) & (kx < (bx + 1) * block + halo) &
          (ky >= by * block - halo) & (ky < (by + 1) * block + halo))


def halo_attention_reference(q, k, v, block: int, halo: int, *, pad_mode="zeros", rel_h=None,
                             rel_w=None, scale=None):
  """Dense oracle: every query against the whole zero-padded key grid (the map grown to a multiple
  of `block`, then by `halo`), `halo_mask` neighbourhoods, border keys hidden under "mask", and
  the relative logits read off absolute offsets `key - query`."""
  win = _check_halo(q, k, v, block, halo, pad_mode, rel_h, rel_w)
  b, x, y, h, d = q.shape
  xp, yp = x + (-x % block), y + (-y % block)
  pad = ((0, 0), (halo, xp - x + halo), (halo, yp - y + halo), (0, 0), (0, 0))
  k, v = jnp.pad(k, pad), jnp.pad(v, pad)
  qx, qy = np.meshgrid(np.arange(x), np.arange(y), indexing="ij")
  kx, ky = np.meshgrid(np.arange(xp + 2 * halo) - halo, np.arange(yp + 2 * halo) - halo,
                       indexing="ij")
  qx, qy, kx, ky = qx.ravel()[:, None], qy.ravel()[:, None], kx.ravel()[None], ky.ravel()[None]
  bx, by = qx // block, qy // block
  mask = ((kx >= bx * block - halo) & (kx < (bx + 1) * block + halo) &
          (ky >= by * block - halo) & (ky < (by + 1) * block + halo))
  if pad_mode == "mask":
    mask &= (kx >= 0) & (kx < x) & (ky >= 0) & (ky < y)
  bias = None
  if rel_h is not None:
    qf = _flat(q).astype(jnp.float32)                                      # [B, N, H, D]
    ih = np.clip(kx - qx + halo + win - 1, 0, 2 * win - 2)
    iw = np.clip(ky - qy + halo + win - 1, 0, 2 * win - 2)
    th = jnp.einsum("bnhd,rd->bhnr", qf, rel_h.astype(jnp.float32))
    tw = jnp.einsum("bnhd,rd->bhnr", qf, rel_w.astype(jnp.float32))
    bias = (jnp.take_along_axis(th, jnp.broadcast_to(jnp.asarray(ih), th.shape[:2] + ih.shape), -1)
            + jnp.take_along_axis(tw, jnp.broadcast_to(jnp.asarray(iw), tw.shape[:2] + iw.shape), -1))
  o = dot_product_attention(_flat(q), _flat(k), _flat(v), mask=jnp.asarray(mask), bias=bias,
                            scale=scale, implementation="reference")
  return o.reshape(q.shape[:-1] + (v.shape[-1],))


# ---------------------------------------------------------------------------------------------
# Swin windows
# ---------------------------------------------------------------------------------------------


def swin_cells(size: int, window: int, shift: int) -> np.ndarray:
  """Per-coordinate cell ids of (shifted) Swin windows without rolling: `(x + M - s) // M` if s > 0."""
  x = np.arange(size)
  return x // window if shift == 0 else (x + window - shift) // window


def swin_mask(x: int, y: int, window, shift) -> np.ndarray:
  """Host: `[X*Y, X*Y]` mask of W-MSA (shift 0) / SW-MSA: same cell in both dimensions."""
  (wx, wy), (sx, sy) = _pair(window), _pair(shift)
  cx, cy = np.meshgrid(swin_cells(x, wx, sx), swin_cells(y, wy, sy), indexing="ij")
  cx, cy = cx.ravel(), cy.ravel()
  return (cx[:, None] == cx[None]) & (cy[:, None] == cy[None])


def _pair(v):
  return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _check_swin(q, window, shift):
  (wx, wy), (sx, sy) = _pair(window), _pair(shift)
  x, y = q.shape[1:3]
  if wx < 1 or wy < 1 or x % wx or y % wy:
    raise ValueError(f"window {window} must divide the map size ({x}, {y})")
  if not (0 <= sx < wx and 0 <= sy < wy):
    raise ValueError(f"shift must satisfy 0 <= shift < window, got shift {shift}, window {window}")
  return (wx, wy), (sx, sy)


def swin_window_attention(q, k, v, window, shift=0, *, scale=None, bias=None):
  """Swin W-MSA / SW-MSA on `[B, X, Y, H, D]`: `torch.roll` by `-shift`, attention inside each
  `window` (X, Y divisible), Swin's region mask between wrapped slices, roll back.

  `bias [H, n, n]` (n = window area) is an optional relative-position bias per window (Swin's RPB
  table gathered by the layer). Paper default M=7, shift=M//2.
  """
  _check_2d(q, k, v)
  (wx, wy), (sx, sy) = _check_swin(q, window, shift)
  b, x, y, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  roll = lambda a, s: jnp.roll(a, (-s[0], -s[1]), axis=(1, 2))
  qr, kr, vr = roll(q, (sx, sy)), roll(k, (sx, sy)), roll(v, (sx, sy))
  nx, ny = x // wx, y // wy

  def part(a):
    a = a.reshape(a.shape[0], nx, wx, ny, wy, a.shape[3], a.shape[4]).transpose(0, 1, 3, 2, 4, 5, 6)
    return a.reshape(a.shape[0], nx, ny, wx * wy, a.shape[5], a.shape[6])

  # Region ids in rolled coordinates, as Swin's h_slices/w_slices: [0, L-M), [L-M, L-s), [L-s, L).
  def regions(size, w, s):
    r = np.zeros(size, np.int32)
    if s:
      r[size - w:size - s] = 1
      r[size - s:] = 2
    return r
  rx, ry = regions(x, wx, sx), regions(y, wy, sy)
  reg = (rx[:, None] * 3 + ry[None]).reshape(nx, wx, ny, wy).transpose(0, 2, 1, 3)
  reg = reg.reshape(nx, ny, wx * wy)
  mask = jnp.asarray(reg[:, :, :, None] == reg[:, :, None, :])[None, :, :, None]  # [1,nx,ny,1,n,n]
  full_bias = None if bias is None else jnp.asarray(bias, jnp.float32)
  o = _softmax_attend(part(qr), part(kr), part(vr), mask, full_bias, scale)
  o = o.reshape(b, nx, ny, wx, wy, h, v.shape[-1]).transpose(0, 1, 3, 2, 4, 5, 6)
  o = o.reshape(b, x, y, h, v.shape[-1])
  return jnp.roll(o, (sx, sy), axis=(1, 2))


def swin_window_attention_reference(q, k, v, window, shift=0, *, scale=None, bias=None):
  """Dense oracle: cell-rule mask (`swin_mask`) and, for the bias, the two tokens' in-window
  coordinates read in rolled coordinates."""
  (wx, wy), (sx, sy) = _check_swin(q, window, shift)
  b, x, y, h, d = q.shape
  mask = swin_mask(x, y, (wx, wy), (sx, sy))
  dense_bias = None
  gx, gy = np.meshgrid((np.arange(x) - sx) % x, (np.arange(y) - sy) % y, indexing="ij")
  lx, ly = (gx % wx).ravel(), (gy % wy).ravel()
  if bias is not None:
    li = lx * wy + ly
    dense_bias = jnp.asarray(bias, jnp.float32)[:, li][:, :, li][None]
  o = dot_product_attention(_flat(q), _flat(k), _flat(v), mask=jnp.asarray(mask), bias=dense_bias,
                            scale=scale, implementation="reference")
  return o.reshape(q.shape[:-1] + (v.shape[-1],))


# ---------------------------------------------------------------------------------------------
# Gated-SwinRMT: decomposed window retention
# ---------------------------------------------------------------------------------------------


def rmt_log_decay(num_heads: int, initial_value: float = 2.0, heads_range: float = 4.0):
  """`[H]` per-head log decay `log gamma_h = log(1 - 2^(-initial_value - heads_range h / H))`,
  RMT's schedule (qhfan/RMT `RetNetRelPos2d`; its RMT-T/S early stages use 2 and 4): head 0
  forgets fastest (gamma = 0.75 at the defaults), later heads see farther."""
  h = np.arange(num_heads, dtype=np.float64)
  return jnp.asarray(np.log(1 - 2.0 ** (-initial_value - heads_range * h / num_heads)), jnp.float32)


def _axis_retention(q, k, v, cells, log_g, scale):
  """One retention pass along axis 2 of `[B, A, n, H, D]`: softmax over the keys of the query's
  row that share its cell, with the additive decay `|i - j| log g_h` (`log_g [H]`)."""
  h = q.shape[3]
  if k.shape[3] != h:
    k = jnp.repeat(k, h // k.shape[3], axis=3)
  if v.shape[3] != h:
    v = jnp.repeat(v, h // v.shape[3], axis=3)
  n = q.shape[2]
  pos = np.arange(n)
  dist = jnp.asarray(np.abs(pos[:, None] - pos[None]), jnp.float32)
  same = jnp.asarray(cells[:, None] == cells[None])
  s = jnp.einsum("baihd,bajhd->bahij", q, k, preferred_element_type=jnp.float32)
  s = s * scale + log_g[:, None, None] * dist
  p = jax.nn.softmax(jnp.where(same, s, -jnp.inf), axis=-1)     # every query sees itself
  return jnp.einsum("bahij,bajhd->baihd", p, v.astype(jnp.float32))


def decomposed_window_retention(q, k, v, window, shift=0, *, log_decay, scale=None):
  """Gated-SwinRMT-Retention's window retention (Maity et al. 2026, arXiv:2604.06014) on `[B, X, Y, H, D]` (X = height, Y = width).

  Inside each (shifted) Swin window, RMT's decomposed Manhattan self-attention (qhfan/RMT
  `VisionRetentionChunk`): a width-wise pass `V' = softmax_W(Q K^T / sqrt(D) + log D^W) V` along
  each window row, then a height-wise pass `O = softmax_H(Q K^T / sqrt(D) + log D^H) V'` along each
  window column, with `log D_ij = |i - j| log gamma_h` (`log_decay [H]`, e.g. `rmt_log_decay`, or
  `[H, 2]` for (height, width)). This is not a 2-D softmax with a Manhattan bias: each pass
  normalises over one axis. Windows follow Swin's cell rule (`swin_cells`; a shifted map's wrapped
  slices do not mix), and need not divide the map: a partial window at the far border is a smaller
  cell (padding hidden). `window`/`shift` are ints or (x, y) pairs, `0 <= shift < window`.
  Reading: the paper's SWAT variant (sigmoid scores, SwiGLU on V) is not implemented; the G1 gate
  and LCE belong to the layer (`attnjax.nn.local.SwinRMTAttnFn`, mixer `swin_rmt`).
  """
  _check_2d(q, k, v)
  b, x, y, h, d = q.shape
  (wx, wy), (sx, sy) = _pair(window), _pair(shift)
  if wx < 1 or wy < 1 or not (0 <= sx < wx and 0 <= sy < wy):
    raise ValueError(f"window must be >= 1 and 0 <= shift < window, got window {window}, shift {shift}")
  lg = jnp.asarray(log_decay, jnp.float32)
  if lg.shape == (h,):
    lg = jnp.stack([lg, lg], -1)
  if lg.shape != (h, 2):
    raise ValueError(f"log_decay must be [H] or [H, 2] with H={h}, got {jnp.shape(log_decay)}")
  scale = d ** -0.5 if scale is None else scale
  # Width-wise pass along Y (rows of the window), then height-wise along X on its output.
  vw = _axis_retention(q, k, v, swin_cells(y, wy, sy), lg[:, 1], scale)
  t = lambda a: jnp.swapaxes(a, 1, 2)
  o = t(_axis_retention(t(q), t(k), t(vw), swin_cells(x, wx, sx), lg[:, 0], scale))
  return o.astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# FreeSwim
# ---------------------------------------------------------------------------------------------


def freeswim_attention(q, k, v, window, *, scale=None, implementation=None,
                       return_lse=False):
  """FreeSwim's inward sliding window (Wu et al. 2025, arXiv:2511.14712) on `[B, *spatial, H, D]` (1 to 3 spatial dims).

  Each query attends the `window` (training-resolution receptive field) shifted inward at the
  borders, so every query sees exactly `prod(min(window, size))` keys: NATTEN NA with kernel =
  window, clipped to the input size (window >= input gives full attention in that dimension).
  Reading ("from abstract"): the dual-path cross-attention override is out of scope of this op.
  `implementation` goes to `neighborhood_attention`.
  """
  rank = q.ndim - 3
  spatial = q.shape[1:1 + rank]
  win = window if isinstance(window, (tuple, list)) else (window,) * rank
  if len(win) != rank or any(w < 1 for w in win):
    raise ValueError(f"window must be an int >= 1 or a tuple of {rank}, got {window!r}")
  kernel = tuple(max(2, min(w, s)) if s >= 2 else 1 for w, s in zip(win, spatial))
  if any(s < 2 for s in spatial):
    raise ValueError(f"freeswim_attention needs every spatial size >= 2, got {spatial}")
  return neighborhood.neighborhood_attention(q, k, v, kernel, scale=scale,
                                             implementation=implementation, return_lse=return_lse)
