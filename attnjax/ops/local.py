"""Local attention schemes on 2D maps `[B, X, Y, H, D]`: HaloNet, Swin (shifted) windows,
FreeSwim's inward sliding window and Gated-SwinRMT's Manhattan-decayed window retention.

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


def halo_attention(q, k, v, block: int, halo: int, *, pad_mode: str = "zeros", scale=None):
  """HaloNet blocked local attention [20] on `[B, X, Y, H, D]` (X, Y divisible by `block`).

  Queries are split into `block x block` blocks; a block attends the `(block + 2 halo)^2` keys of
  its block grown by `halo` on every side. `pad_mode="zeros"` (HaloNet/timm): keys outside the map
  are zero vectors that stay unmasked (score 0, value 0), so every block sees the same window;
  `"mask"`: they are hidden. Relative position logits are left to the layer. Paper default b=8, h=3.
  """
  _check_2d(q, k, v)
  b, x, y, h, d = q.shape
  if block < 1 or halo < 0 or x % block or y % block:
    raise ValueError(f"halo_attention needs block >= 1 dividing X={x}, Y={y} and halo >= 0, got "
                     f"block={block}, halo={halo}")
  if pad_mode not in ("zeros", "mask"):
    raise ValueError(f"pad_mode must be 'zeros' or 'mask', got {pad_mode!r}")
  scale = d ** -0.5 if scale is None else scale
  win = block + 2 * halo
  nx, ny = x // block, y // block
  pad = ((0, 0), (halo, halo), (halo, halo), (0, 0), (0, 0))
  kp, vp = jnp.pad(k, pad), jnp.pad(v, pad)
  inside = jnp.pad(jnp.ones((x, y), bool), ((halo, halo), (halo, halo)))
  # Unfold: window (i, j) starts at padded (i * block, j * block).
  ix = (jnp.arange(nx) * block)[:, None] + jnp.arange(win)[None]          # [nx, win]
  iy = (jnp.arange(ny) * block)[:, None] + jnp.arange(win)[None]
  def unfold(a):  # [B, X', Y', ...] -> [B, nx, ny, win*win, ...]
    a = a[:, ix]                      # [B, nx, win, Y', ...]
    a = a[:, :, :, iy]                # [B, nx, win, ny, win, ...]
    a = jnp.moveaxis(a, 3, 2)         # [B, nx, ny, win, win, ...]
    return a.reshape(a.shape[:3] + (win * win,) + a.shape[5:])
  kw, vw = unfold(kp), unfold(vp)
  valid = unfold(inside[None])[0]                                          # [nx, ny, win*win]
  qb = q.reshape(b, nx, block, ny, block, h, d).transpose(0, 1, 3, 2, 4, 5, 6)
  qb = qb.reshape(b, nx, ny, block * block, h, d)
  mask = jnp.ones_like(valid) if pad_mode == "zeros" else valid
  o = _softmax_attend(qb, kw, vw, mask[None, :, :, None, None, :], None, scale)
  o = o.reshape(b, nx, ny, block, block, h, v.shape[-1]).transpose(0, 1, 3, 2, 4, 5, 6)
  return o.reshape(b, x, y, h, v.shape[-1])


def halo_mask(x: int, y: int, block: int, halo: int, padded: bool = False) -> np.ndarray:
  """Host: `[X*Y, X'*Y']` block-neighbourhood mask; keys on the halo-padded grid if `padded`."""
  qx, qy = np.meshgrid(np.arange(x), np.arange(y), indexing="ij")
  off = halo if padded else 0
  kx, ky = np.meshgrid(np.arange(x + 2 * off), np.arange(y + 2 * off), indexing="ij")
  kx, ky = kx.ravel() - off, ky.ravel() - off
  bx, by = (qx.ravel() // block)[:, None], (qy.ravel() // block)[:, None]
  return ((kx >= bx * block - halo) & (kx < (bx + 1) * block + halo) &
          (ky >= by * block - halo) & (ky < (by + 1) * block + halo))


def halo_attention_reference(q, k, v, block: int, halo: int, *, pad_mode="zeros", scale=None):
  """Dense oracle: attention over the (zero-padded if "zeros") key grid with `halo_mask`."""
  b, x, y, h, d = q.shape
  if pad_mode == "zeros":
    pad = ((0, 0), (halo, halo), (halo, halo), (0, 0), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
  mask = halo_mask(x, y, block, halo, padded=pad_mode == "zeros")
  o = dot_product_attention(_flat(q), _flat(k), _flat(v), mask=jnp.asarray(mask), scale=scale,
                            implementation="reference")
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


def _window_coords(wx, wy):
  cx, cy = np.meshgrid(np.arange(wx), np.arange(wy), indexing="ij")
  return cx.ravel(), cy.ravel()


def manhattan_bias(cx, cy, log_gamma):
  """`[H, n, n]` bias `|dx| log g_x + |dy| log g_y` between the `n` tokens at integer coordinates
  `cx, cy [n]` (numpy), with `log_gamma [H, 2]`: Gated-SwinRMT's Manhattan decay in log space."""
  dx = np.abs(cx[:, None] - cx[None]).astype(np.float32)
  dy = np.abs(cy[:, None] - cy[None]).astype(np.float32)
  lg = jnp.asarray(log_gamma, jnp.float32)
  return lg[:, 0, None, None] * dx + lg[:, 1, None, None] * dy


def swin_window_attention(q, k, v, window, shift=0, *, scale=None, bias=None, log_gamma=None):
  """Swin W-MSA / SW-MSA on `[B, X, Y, H, D]`: `torch.roll` by `-shift`, attention inside each
  `window` (X, Y divisible), Swin's region mask between wrapped slices, roll back.

  `bias [H, n, n]` (n = window area) is an optional relative-position bias per window (Swin's RPB
  table gathered by the layer); `log_gamma [H, 2]` adds Gated-SwinRMT's Manhattan decay
  `|dx| log gamma_x + |dy| log gamma_y` (in-window coordinates). Paper default M=7, shift=M//2.
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
  full_bias = None
  if bias is not None:
    full_bias = jnp.asarray(bias, jnp.float32)
  if log_gamma is not None:
    mb = manhattan_bias(*_window_coords(wx, wy), log_gamma)
    full_bias = mb if full_bias is None else full_bias + mb
  o = _softmax_attend(part(qr), part(kr), part(vr), mask, full_bias, scale)
  o = o.reshape(b, nx, ny, wx, wy, h, v.shape[-1]).transpose(0, 1, 3, 2, 4, 5, 6)
  o = o.reshape(b, x, y, h, v.shape[-1])
  return jnp.roll(o, (sx, sy), axis=(1, 2))


def swin_window_attention_reference(q, k, v, window, shift=0, *, scale=None, bias=None,
                                    log_gamma=None):
  """Dense oracle: cell-rule mask (`swin_mask`) and, for the decay, the Manhattan distance of the
  two tokens in rolled (window-local) coordinates, which equals their in-window distance."""
  (wx, wy), (sx, sy) = _check_swin(q, window, shift)
  b, x, y, h, d = q.shape
  mask = swin_mask(x, y, (wx, wy), (sx, sy))
  dense_bias = None
  gx, gy = np.meshgrid((np.arange(x) - sx) % x, (np.arange(y) - sy) % y, indexing="ij")
  lx, ly = (gx % wx).ravel(), (gy % wy).ravel()
  if bias is not None:
    li = lx * wy + ly
    dense_bias = jnp.asarray(bias, jnp.float32)[:, li][:, :, li][None]
  if log_gamma is not None:
    mb = manhattan_bias(lx, ly, log_gamma)[None]
    dense_bias = mb if dense_bias is None else dense_bias + mb
  o = dot_product_attention(_flat(q), _flat(k), _flat(v), mask=jnp.asarray(mask), bias=dense_bias,
                            scale=scale, implementation="reference")
  return o.reshape(q.shape[:-1] + (v.shape[-1],))


def manhattan_window_retention(q, k, v, window, shift=0, *, gamma, scale=None):
  """Gated-SwinRMT [88] retention branch: `softmax(S + log D) V` inside (shifted) Swin windows with
  `D = gamma_x^|dx| * gamma_y^|dy|` (Manhattan decay). `gamma` is `[H]` (shared by both axes) or
  `[H, 2]`, in (0, 1]; gamma = 1 is undecayed window attention (catalog oracle).

  Reading ("from abstract"): the decomposed width-then-height pass is computed jointly, which is
  the same as a product of per-axis decays; the SWAT variant (sigmoid scores) and the input gate
  G1 belong to the layer (`attnjax.nn.local.GatedSwinRMT`).
  """
  g = jnp.asarray(gamma, jnp.float32)
  h = q.shape[3]
  if g.ndim == 1:
    g = jnp.stack([g, g], -1)
  if g.shape != (h, 2):
    raise ValueError(f"gamma must be [H] or [H, 2] with H={h}, got {jnp.shape(gamma)}")
  return swin_window_attention(q, k, v, window, shift, scale=scale, log_gamma=jnp.log(g))


# ---------------------------------------------------------------------------------------------
# FreeSwim
# ---------------------------------------------------------------------------------------------


def freeswim_attention(q, k, v, window, *, scale=None, implementation="block_sparse",
                       return_lse=False):
  """FreeSwim's inward sliding window [113] on `[B, *spatial, H, D]` (1 to 3 spatial dims).

  Each query attends the `window` (training-resolution receptive field) shifted inward at the
  borders, so every query sees exactly `prod(min(window, size))` keys: NATTEN NA with kernel =
  window, clipped to the input size (window >= input gives full attention in that dimension).
  Reading ("from abstract"): the dual-path cross-attention override is out of scope of this op.
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
