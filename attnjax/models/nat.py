"""NAT / DiNAT-style hierarchical vision backbone built on 2D neighborhood attention."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.layers import RMSNorm, SwiGLU, dense
from attnjax.nn.local import NeighborhoodAttention2D


class NABlock(nnx.Module):
  """`x + NA2D(norm(x))`, then `x + SwiGLU(norm(x))` on `[B, X, Y, C]`."""

  def __init__(self, dim, num_heads, *, kernel_size, dilation, mlp_ratio, rngs):
    self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
    self.attn = NeighborhoodAttention2D(dim, num_heads, kernel_size=kernel_size, dilation=dilation,
                                        rngs=rngs)
    self.mlp = SwiGLU(dim, int(dim * mlp_ratio), rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class NAT(nnx.Module):
  """Patch embedding, stages of NA blocks separated by 2x2 patch merging, mean pool, classifier.

  `__call__(images [B, H, W, C]) -> logits [B, num_classes]`. `depths`/`dims`/`heads` per stage;
  `dilations` cycles through the layers of a stage: `(1,)` is NAT, `(1, 2)` DiNAT's alternation
  (DiNAT uses larger dilations at high resolution; each layer clips its dilation to the map).
  NAT defaults: kernel 7, patch 4, depths (3, 4, 18, 5) for NAT-S; tests use tiny sizes.
  """

  def __init__(self, *, image_size: int, patch_size: int, num_classes: int,
               dims: Sequence[int] = (32, 64), depths: Sequence[int] = (2, 2),
               heads: Sequence[int] = (2, 4), kernel_size: int = 7,
               dilations: Sequence[int] = (1, 2), mlp_ratio: float = 3.0, in_channels: int = 3,
               rngs: nnx.Rngs):
    if image_size % patch_size:
      raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
    if not len(dims) == len(depths) == len(heads):
      raise ValueError(f"dims, depths and heads must have one entry per stage, got {dims}, "
                       f"{depths}, {heads}")
    grid = image_size // patch_size
    if grid % (2 ** (len(dims) - 1)):
      raise ValueError(f"patch grid {grid} must be divisible by 2^(stages-1)")
    self.patch_size, self.in_channels, self.image_size = patch_size, in_channels, image_size
    self.embed = dense(patch_size * patch_size * in_channels, dims[0], axes=(None, "embed"),
                       rngs=rngs, use_bias=True)
    self.stages = nnx.List([
        nnx.List([NABlock(dims[s], heads[s], kernel_size=kernel_size,
                          dilation=dilations[i % len(dilations)], mlp_ratio=mlp_ratio, rngs=rngs)
                  for i in range(depths[s])]) for s in range(len(dims))])
    self.merges = nnx.List([dense(4 * dims[s], dims[s + 1], axes=(None, "embed"), rngs=rngs)
                            for s in range(len(dims) - 1)])
    self.norm = RMSNorm(dims[-1])
    self.head = dense(dims[-1], num_classes, axes=("embed", None), rngs=rngs, use_bias=True)

  def __call__(self, images):
    b, h, w, c = images.shape
    if (h, w, c) != (self.image_size, self.image_size, self.in_channels):
      raise ValueError(f"images must be [B, {self.image_size}, {self.image_size}, "
                       f"{self.in_channels}], got {images.shape}")
    p = self.patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = self.embed(x.reshape(b, h // p, w // p, p * p * c))
    for s, blocks in enumerate(self.stages):
      for blk in blocks:
        x = blk(x)
      if s < len(self.merges):
        bx, gx, gy, cx = x.shape
        x = x.reshape(bx, gx // 2, 2, gy // 2, 2, cx).transpose(0, 1, 3, 2, 4, 5)
        x = self.merges[s](x.reshape(bx, gx // 2, gy // 2, 4 * cx))
    return self.head(self.norm(x).mean((1, 2)))
