"""Block-sparse flash attention: Pallas-Triton forward + deterministic custom-VJP backward.

Layouts are `attnjax.ops.layout.BlockLayout`s (the one layout type of the library).
"""

from pallas_kernels.flash.api import block_sparse_flash_attention, flash_attention

__all__ = ["flash_attention", "block_sparse_flash_attention"]
