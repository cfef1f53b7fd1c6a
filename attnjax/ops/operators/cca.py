"""Concentric causal attention, CCA (Xing et al. 2024, arXiv:2410.15926): ring positions and the ring-causal mask for image tokens.

Token layout `[prefix text (num_prefix), visual (grid_h * grid_w, row-major), text ...]`, as in an
LVLM prompt. Visual cell (i, j) lies on ring `r = min(i, j, h - 1 - i, w - 1 - j)` (0 = outer ring).
Positions (for RoPE): prefix `0 .. P-1`; visual `P + r` (outer ring first, centre last, so the
centre is closest to the instruction); text after the image continues at `P + num_rings`. Mask:
a visual query on ring r sees the visual keys on rings <= r (its own ring included, in both
directions); every other pair is ordinary causal in token order (visual tokens see the prefix,
never later text; later text sees everything before it). Reading: checked against the authors'
code (xing0047/cca-llava, `llava/cca_utils/cca.py`: `concentric_pos` counts 11 .. 0 from the centre
of the 24 x 24 grid outwards, text resumes at `img_pos + H // 2`, and the visual block of the
causal mask is replaced by `ring(k) <= ring(q)`). CCA is a causal (decoder) scheme; the
non-causal use keeps only the positions.
"""

from __future__ import annotations

import jax.numpy as jnp


def cca_ring_index(grid_h: int, grid_w: int):
  """`[h * w]` ring of each grid cell (row-major): `min(i, j, h - 1 - i, w - 1 - j)`, 0 = outer ring."""
  if grid_h < 1 or grid_w < 1:
    raise ValueError(f"cca: grid must be positive (grid_h, grid_w), got ({grid_h}, {grid_w})")
  i, j = jnp.meshgrid(jnp.arange(grid_h), jnp.arange(grid_w), indexing="ij")
  return jnp.minimum(jnp.minimum(i, j), jnp.minimum(grid_h - 1 - i, grid_w - 1 - j)).ravel()


def _num_rings(grid_h: int, grid_w: int) -> int:
  return (min(grid_h, grid_w) + 1) // 2


def _ring_of(idx, grid_h: int, grid_w: int, num_prefix: int):
  """`(is_visual, ring)` for token indices `idx` (any shape, may be traced)."""
  nv = grid_h * grid_w
  rel = idx - num_prefix
  is_visual = (rel >= 0) & (rel < nv)
  ring = cca_ring_index(grid_h, grid_w)[jnp.clip(rel, 0, nv - 1)]
  return is_visual, ring


def cca_token_positions(idx, grid_h: int, grid_w: int, num_prefix: int = 0):
  """RoPE position of each token index `idx` (int array, any shape) in the CCA layout."""
  idx = jnp.asarray(idx)
  nv = grid_h * grid_w
  is_visual, ring = _ring_of(idx, grid_h, grid_w, num_prefix)
  after = idx - nv + _num_rings(grid_h, grid_w)          # text after the image
  pos = jnp.where(idx < num_prefix, idx, jnp.where(is_visual, num_prefix + ring, after))
  return pos.astype(jnp.int32)


def cca_visibility(q_idx, k_idx, grid_h: int, grid_w: int, num_prefix: int = 0):
  """Boolean `[Tq, Tk]`: may token `q_idx[i]` attend to token `k_idx[j]` under CCA."""
  q_idx, k_idx = jnp.asarray(q_idx), jnp.asarray(k_idx)
  qv, qr = _ring_of(q_idx, grid_h, grid_w, num_prefix)
  kv, kr = _ring_of(k_idx, grid_h, grid_w, num_prefix)
  both = qv[:, None] & kv[None, :]
  return jnp.where(both, kr[None, :] <= qr[:, None], k_idx[None, :] <= q_idx[:, None])


def cca_positions(grid_h: int, grid_w: int, num_text: int = 0, start: int = 0,
                  num_prefix: int = 0):
  """RoPE positions `[P + h w + num_text]` for `[prefix, visual (row-major), text]`, plus `start`.

  Visual `start + P + ring`; text continues after the largest ring (`cca_token_positions`)."""
  t = num_prefix + grid_h * grid_w + num_text
  return start + cca_token_positions(jnp.arange(t), grid_h, grid_w, num_prefix)


def cca_mask(grid_h: int, grid_w: int, num_text: int = 0, num_prefix: int = 0):
  """Boolean `[T, T]`, `T = P + h w + num_text`: visual query on ring r sees visual keys on rings
  <= r (never later text); all other pairs are causal in token order (`cca_visibility`)."""
  idx = jnp.arange(num_prefix + grid_h * grid_w + num_text)
  return cca_visibility(idx, idx, grid_h, grid_w, num_prefix)
