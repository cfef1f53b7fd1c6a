"""Concentric causal attention, CCA [83]: ring positions and the ring-causal mask for image tokens."""

from __future__ import annotations

import jax.numpy as jnp


def cca_ring_index(grid_h: int, grid_w: int):
  """`[h * w]` ring of each grid cell (row-major): `min(i, j, h - 1 - i, w - 1 - j)`, 0 = outer ring."""
  i, j = jnp.meshgrid(jnp.arange(grid_h), jnp.arange(grid_w), indexing="ij")
  return jnp.minimum(jnp.minimum(i, j), jnp.minimum(grid_h - 1 - i, grid_w - 1 - j)).ravel()


def cca_positions(grid_h: int, grid_w: int, num_text: int = 0, start: int = 0):
  """RoPE positions for `[visual (row-major), text]`: visual `start + ring` (outer ring first,
  centre last, so the centre is closest to the text); text continues after the largest ring."""
  ring = cca_ring_index(grid_h, grid_w)
  text = start + int(ring.max()) + 1 + jnp.arange(num_text)
  return jnp.concatenate([start + ring, text]).astype(jnp.int32)


def cca_mask(grid_h: int, grid_w: int, num_text: int = 0):
  """Boolean `[T, T]`, `T = h w + num_text`: visual query on ring r sees visual keys on rings <= r
  (never text); text queries see every visual token and the text up to themselves."""
  ring = cca_ring_index(grid_h, grid_w)
  nv = ring.shape[0]
  t = nv + num_text
  vis = ring[None, :] <= ring[:, None]
  top = jnp.concatenate([vis, jnp.zeros((nv, num_text), bool)], axis=1)
  bottom = jnp.concatenate([jnp.ones((num_text, nv), bool),
                            jnp.tril(jnp.ones((num_text, num_text), bool))], axis=1)
  return jnp.concatenate([top, bottom], axis=0).reshape(t, t)
