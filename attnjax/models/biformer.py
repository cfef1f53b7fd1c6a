"""BiFormer-style vision backbone: bi-level routing attention blocks (+ LCE) on a 2D map."""

from __future__ import annotations

from typing import Sequence

from flax import nnx

from attnjax.models.hierarchical import HierarchicalBackbone
from attnjax.nn.sparse import BiLevelRoutingAttention2D


class BiFormer(HierarchicalBackbone):
  """Patch embedding, stages of BRA blocks with 2x2 patch merging, mean pool, classifier.

  `__call__(images [B, H, W, C]) -> logits`. `top_ks` per stage (paper: 1, 4, 16, S^2/4 with
  S = 7 regions, "from memory"); a stage map that `regions` does not divide is zero-padded inside
  each BRA layer, as the authors' `auto_pad` (rayleizhu/BiFormer `ops/bra_legacy.py`). The
  paper's depth-wise conv positional embedding before each block is omitted (LCE is kept).
  """

  def __init__(self, *, image_size: int, patch_size: int, num_classes: int,
               dims: Sequence[int] = (32, 64), depths: Sequence[int] = (2, 2),
               heads: Sequence[int] = (2, 4), regions: Sequence[int] = (4, 2),
               top_ks: Sequence[int] = (4, 4), mlp_ratio: float = 3.0, in_channels: int = 3,
               rngs: nnx.Rngs):
    n = len(dims)
    if not (len(depths) == len(heads) == len(regions) == len(top_ks) == n):
      raise ValueError("dims, depths, heads, regions and top_ks need one entry per stage")
    for s in range(n):
      if regions[s] < 1 or top_ks[s] < 1:
        raise ValueError(f"regions[{s}]={regions[s]} and top_ks[{s}]={top_ks[s]} must be >= 1")

    def make_attn(s, i):
      del i
      return BiLevelRoutingAttention2D(dims[s], heads[s], regions=regions[s], top_k=top_ks[s],
                                       rngs=rngs)

    super().__init__(image_size=image_size, patch_size=patch_size, num_classes=num_classes,
                     dims=dims, depths=depths, make_attn=make_attn, mlp_ratio=mlp_ratio,
                     in_channels=in_channels, rngs=rngs)
