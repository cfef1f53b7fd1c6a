"""Block-sparse flash attention: Pallas-Triton forward + deterministic custom-VJP backward."""

from pallas_kernels.flash.api import block_sparse_flash_attention, flash_attention
from pallas_kernels.flash.layouts import (BlockLayout, band_layout, dense_mask_from_layout,
                                          layout_from_block_kinds)

__all__ = ["flash_attention", "block_sparse_flash_attention", "BlockLayout", "band_layout",
           "dense_mask_from_layout", "layout_from_block_kinds"]
