"""Pallas kernels: `flash` (block-sparse flash attention over `attnjax.ops.layout.BlockLayout`) and
`linear` (chunked linear attention and the delta rule). Reached through the ops' `implementation=`
("pallas", or the default on a CUDA backend); each kernel has a `custom_vjp` backward."""
