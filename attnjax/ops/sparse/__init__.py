"""Sparse attention patterns (static layout builders) and dynamic routers."""

from attnjax.ops.sparse import patterns

__all__ = ["patterns"]
