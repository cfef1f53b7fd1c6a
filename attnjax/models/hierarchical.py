"""Hierarchical (pyramid) vision backbone shared by NAT / DiNAT and BiFormer.

Patch embedding, stages of pre-norm blocks on a 2D token map `[B, X, Y, C]` with 2x2 patch merging
between stages, mean pool, classifier. A model is this backbone plus the one thing that differs:
the 2D attention module each block gets (`make_attn(stage, layer)`).
"""

from __future__ import annotations

from typing import Callable, Sequence

from flax import nnx

from attnjax.nn.layers import RMSNorm, SwiGLU, dense


class MapBlock(nnx.Module):
  """`x + attn(norm(x))`, then `x + SwiGLU(norm(x))` on `[B, X, Y, C]`."""

  def __init__(self, dim: int, attn: nnx.Module, *, mlp_ratio: float, rngs: nnx.Rngs):
    self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
    self.attn = attn
    self.mlp = SwiGLU(dim, int(dim * mlp_ratio), rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class HierarchicalBackbone(nnx.Module):
  """`__call__(images [B, H, W, C]) -> logits [B, num_classes]`.

  `dims[s]`, `depths[s]`: width and block count of stage s; the map halves (2x2 merge) between
  stages, so the patch grid `image_size / patch_size` must be divisible by `2^(stages - 1)`.
  `make_attn(s, i) -> nnx.Module` builds layer i of stage s's 2D attention (`[B, X, Y, dims[s]]`
  in and out).
  """

  def __init__(self, *, image_size: int, patch_size: int, num_classes: int, dims: Sequence[int],
               depths: Sequence[int], make_attn: Callable[[int, int], nnx.Module],
               mlp_ratio: float, in_channels: int, rngs: nnx.Rngs):
    n = len(dims)
    if len(depths) != n:
      raise ValueError(f"dims and depths need one entry per stage, got {dims}, {depths}")
    if image_size % patch_size:
      raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
    if (image_size // patch_size) % (2 ** (n - 1)):
      raise ValueError(f"patch grid {image_size // patch_size} must be divisible by "
                       f"2^(stages-1) = {2 ** (n - 1)}")
    self.patch_size, self.in_channels, self.image_size = patch_size, in_channels, image_size
    self.embed = dense(patch_size * patch_size * in_channels, dims[0], axes=(None, "embed"),
                       rngs=rngs, use_bias=True)
    self.stages = nnx.List([
        nnx.List([MapBlock(dims[s], make_attn(s, i), mlp_ratio=mlp_ratio, rngs=rngs)
                  for i in range(depths[s])]) for s in range(n)])
    self.merges = nnx.List([dense(4 * dims[s], dims[s + 1], axes=(None, "embed"), rngs=rngs)
                            for s in range(n - 1)])
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
