"""BiFormer-style vision backbone: bi-level routing attention blocks (+ LCE) on a 2D map."""

from __future__ import annotations

from typing import Sequence

from flax import nnx

from attnjax.nn.layers import RMSNorm, SwiGLU, dense
from attnjax.nn.sparse import BiLevelRoutingAttention2D


class BRABlock(nnx.Module):
  """`x + BRA(norm(x))`, then `x + SwiGLU(norm(x))` on `[B, X, Y, C]`."""

  def __init__(self, dim, num_heads, *, regions, top_k, mlp_ratio, rngs):
    self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
    self.attn = BiLevelRoutingAttention2D(dim, num_heads, regions=regions, top_k=top_k, rngs=rngs)
    self.mlp = SwiGLU(dim, int(dim * mlp_ratio), rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class BiFormer(nnx.Module):
  """Patch embedding, stages of BRA blocks with 2x2 patch merging, mean pool, classifier.

  `__call__(images [B, H, W, C]) -> logits`. `top_ks` per stage (paper: 1, 4, 16, S^2/4 with
  S = 7 regions, "from memory"); `regions` per stage must divide that stage's map. The paper's
  depth-wise conv positional embedding before each block is omitted (LCE is kept).
  """

  def __init__(self, *, image_size: int, patch_size: int, num_classes: int,
               dims: Sequence[int] = (32, 64), depths: Sequence[int] = (2, 2),
               heads: Sequence[int] = (2, 4), regions: Sequence[int] = (4, 2),
               top_ks: Sequence[int] = (4, 4), mlp_ratio: float = 3.0, in_channels: int = 3,
               rngs: nnx.Rngs):
    n = len(dims)
    if not (len(depths) == len(heads) == len(regions) == len(top_ks) == n):
      raise ValueError("dims, depths, heads, regions and top_ks need one entry per stage")
    grid = image_size // patch_size
    if image_size % patch_size or grid % (2 ** (n - 1)):
      raise ValueError(f"image_size={image_size}/patch_size={patch_size} must give a grid divisible "
                       f"by 2^(stages-1)")
    for s in range(n):
      if (grid // 2 ** s) % regions[s]:
        raise ValueError(f"regions[{s}]={regions[s]} must divide the stage map {grid // 2 ** s}")
    self.patch_size, self.in_channels, self.image_size = patch_size, in_channels, image_size
    self.embed = dense(patch_size * patch_size * in_channels, dims[0], axes=(None, "embed"),
                       rngs=rngs, use_bias=True)
    self.stages = nnx.List([
        nnx.List([BRABlock(dims[s], heads[s], regions=regions[s], top_k=top_ks[s],
                           mlp_ratio=mlp_ratio, rngs=rngs) for _ in range(depths[s])])
        for s in range(n)])
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
