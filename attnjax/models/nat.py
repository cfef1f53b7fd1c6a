"""NAT / DiNAT-style hierarchical vision backbone built on 2D neighborhood attention."""

from __future__ import annotations

from typing import Sequence

from flax import nnx

from attnjax.models.hierarchical import HierarchicalBackbone
from attnjax.nn.local import NeighborhoodAttention2D


class NAT(HierarchicalBackbone):
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
    if not len(dims) == len(depths) == len(heads):
      raise ValueError(f"dims, depths and heads must have one entry per stage, got {dims}, "
                       f"{depths}, {heads}")

    def make_attn(s, i):
      return NeighborhoodAttention2D(dims[s], heads[s], kernel_size=kernel_size,
                                     dilation=dilations[i % len(dilations)], rngs=rngs)

    super().__init__(image_size=image_size, patch_size=patch_size, num_classes=num_classes,
                     dims=dims, depths=depths, make_attn=make_attn, mlp_ratio=mlp_ratio,
                     in_channels=in_channels, rngs=rngs)
