"""Chunked linear attention with decay and gates, and the gated delta rule, as Pallas (Triton
backend) kernels."""

from pallas_kernels.linear.api import chunked_linear_attention
from pallas_kernels.linear.block_sizes import BlockSizes
from pallas_kernels.linear.delta import chunked_delta_rule

__all__ = ["BlockSizes", "chunked_delta_rule", "chunked_linear_attention"]
