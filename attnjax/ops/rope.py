"""Rotary position embeddings (RoPE, Su et al.), in the two layouts found in the wild.

A pair of channels `(x_a, x_b)` at position `p` is rotated by the angle `p * theta_i`, with
`theta_i = base ** (-2 i / rotary_dim)`, `i = 0 .. rotary_dim / 2 - 1`:
`(x_a, x_b) -> (x_a cos - x_b sin, x_a sin + x_b cos)`. The layouts differ only in which channels
form pair `i`:

* `style="half"` (GPT-NeoX / LLaMA "rotate-half"): channels `i` and `i + rotary_dim / 2`;
* `style="interleaved"` (GPT-J / the original RoFormer): channels `2 i` and `2 i + 1`.

The two are the same map up to a fixed permutation of the first `rotary_dim` channels (tested).
Because every pair is rotated by an angle linear in the position, `<rope(q, m), rope(k, n)>`
depends on `m - n` only (tested).
"""

from __future__ import annotations

import jax.numpy as jnp

from attnjax.ops import validation

ROPE_STYLES = ("half", "interleaved")


def rope_frequencies(rotary_dim: int, base: float = 10000.0) -> jnp.ndarray:
  """`[rotary_dim // 2]` float32 inverse frequencies `theta_i = base ** (-2 i / rotary_dim)`."""
  if rotary_dim <= 0 or rotary_dim % 2:
    raise ValueError(f"rotary_dim must be a positive even integer, got {rotary_dim}")
  if base <= 0:
    raise ValueError(f"base must be > 0, got {base}")
  return base ** (-jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)


def rope_angles(positions, rotary_dim: int, base: float = 10000.0) -> jnp.ndarray:
  """`positions [..., T]` (int or float) -> angles `[..., T, rotary_dim // 2]` in float32."""
  positions = jnp.asarray(positions, jnp.float32)
  return positions[..., None] * rope_frequencies(rotary_dim, base)


def apply_rope(x, positions, *, base: float = 10000.0, style: str = "half",
               rotary_dim: int | None = None, inv_freq=None):
  """Rotate `x [B, T, H, D]` by positions `[T]` or `[B, T]`; returns `x`'s shape and dtype.

  `rotary_dim` (even, <= D; default D) channels are rotated and the rest pass through unchanged
  (partial rotary, as in GPT-NeoX / GPT-J). `style` is `"half"` (rotate-half: pairs `(i, i + r/2)`)
  or `"interleaved"` (pairs `(2i, 2i + 1)`). Angles and the rotation are computed in float32
  and cast back, so bf16 inputs lose no position resolution in the angle. `inv_freq`
  (`[rotary_dim // 2]`, default `rope_frequencies(rotary_dim, base)`) replaces the frequencies,
  for rescaled RoPE variants (position interpolation, Llama 3's frequency-dependent scaling).
  """
  validation.check_rank(x, 4, "x", "[B, T, H, D]")
  b, t, _, d = x.shape
  rotary_dim = d if rotary_dim is None else rotary_dim
  if style not in ROPE_STYLES:
    raise ValueError(f"style must be one of {ROPE_STYLES}, got {style!r}")
  if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > d:
    raise ValueError(f"rotary_dim must be even and in [2, D={d}], got {rotary_dim}")
  positions = jnp.asarray(positions)
  if positions.shape not in ((t,), (b, t)):
    raise ValueError(f"positions must have shape [T]=({t},) or [B, T]=({b}, {t}), "
                     f"got {positions.shape}")
  if inv_freq is None:
    angles = rope_angles(positions, rotary_dim, base)
  else:
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    if inv_freq.shape != (rotary_dim // 2,):
      raise ValueError(f"inv_freq must have shape [rotary_dim // 2]=({rotary_dim // 2},), "
                       f"got {inv_freq.shape}")
    angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
  if angles.ndim == 2:
    angles = angles[None]
  cos = jnp.cos(angles)[:, :, None, :]  # [B|1, T, 1, r/2]: shared by every head.
  sin = jnp.sin(angles)[:, :, None, :]
  rot, rest = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
  if style == "half":
    a, bb = rot[..., :rotary_dim // 2], rot[..., rotary_dim // 2:]
    out = jnp.concatenate([a * cos - bb * sin, a * sin + bb * cos], axis=-1)
  else:
    a, bb = rot[..., 0::2], rot[..., 1::2]
    out = jnp.stack([a * cos - bb * sin, a * sin + bb * cos], axis=-1).reshape(rot.shape)
  return jnp.concatenate([out.astype(x.dtype), rest], axis=-1)
