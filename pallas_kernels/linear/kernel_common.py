"""Pieces shared by the forward and backward chunked linear-attention kernels.

Conventions inside every kernel (one program = one (batch, head, value block)):
- refs cover the whole padded sequence: q/k `[Tp, K]`, v/o `[Tp, BV]`, chunk-relative cumulative
  log-gates `b` `[Tp]` (scalar kinds) or `[Tp, K]` (per-key-dimension kind), reset ids `[Tp]`;
- the state is kept value-first, `St = S^T` of shape `[BV, K]`, so that per-key-dimension decays
  are row vectors `[1, K]` that broadcast without transposes;
- `b_t = sum_{s <= t, s in chunk} g_s` restarts at every chunk, so all exponents we take are
  differences of cumulative sums that are <= 0 (or masked to -inf) and never overflow, even with
  gate logits of -1e4;
- segment resets are handled with masks on the monotone "reset id" `r_t` (number of segment
  starts before t): query i reads key j iff r_i == r_j, and the state crosses a chunk boundary
  only if the chunk holds no reset.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

GATE_KINDS = ("none", "scalar", "vector")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  gate: str                 # "none" | "scalar" | "vector"
  has_segments: bool
  has_initial_state: bool
  scale: float
  chunk: int
  sub_chunk: int
  num_chunks: int
  mm_dtype: str             # dtype of matmul operands ("float32" | "bfloat16" | "float16")

  @property
  def precision(self):
    # f32 operands: ask for IEEE fp32 on GPU rather than Triton's TF32 default.
    return lax.Precision.HIGHEST if self.mm_dtype == "float32" else None


def mm(cfg: KernelConfig, a, b, *, trans_a=False, trans_b=False):
  """2-D matmul with float32 accumulation; operands are cast to the kernel's matmul dtype."""
  dt = jnp.dtype(cfg.mm_dtype)
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a.astype(dt), b.astype(dt), dims, precision=cfg.precision,
                         preferred_element_type=jnp.float32)


def load_rows(ref, start, size):
  """Rows [start, start+size) of a `[Tp]` or `[Tp, X]` ref."""
  if len(ref.shape) == 1:
    return ref[pl.ds(start, size)]
  return ref[pl.ds(start, size), :]


def load_scalar(ref, idx):
  """One element of a 1-D ref as a 0-d value (a size-1 load keeps Triton's power-of-two rule)."""
  return jnp.max(ref[pl.ds(idx, 1)])


def neg_inf_exp(mask, x):
  """exp(x) where mask, exactly 0 elsewhere, without ever evaluating exp of a positive masked x."""
  return jnp.exp(jnp.where(mask, x, -jnp.inf))


def same_segment(r_rows, r_cols):
  """`[R, C]` mask r_rows[i] == r_cols[j]."""
  return r_rows[:, None] == r_cols[None, :]


def input_specs(cfg, seq_len, kdim, block_v):
  """BlockSpecs of q, k, v[, gate][, reset ids][, initial state] over a `(batch, head, value block)`
  grid: each program sees its head's whole padded sequence and its value block."""
  specs = [
      pl.BlockSpec((None, seq_len, None, kdim), lambda bi, hi, vi: (bi, 0, hi, 0)),
      pl.BlockSpec((None, seq_len, None, kdim), lambda bi, hi, vi: (bi, 0, hi, 0)),
      pl.BlockSpec((None, seq_len, None, block_v), lambda bi, hi, vi: (bi, 0, hi, vi)),
  ]
  if cfg.gate == "scalar":
    specs.append(pl.BlockSpec((None, seq_len, None), lambda bi, hi, vi: (bi, 0, hi)))
  elif cfg.gate == "vector":
    specs.append(pl.BlockSpec((None, seq_len, None, kdim), lambda bi, hi, vi: (bi, 0, hi, 0)))
  if cfg.has_segments:
    specs.append(pl.BlockSpec((None, seq_len), lambda bi, hi, vi: (bi, 0)))
  if cfg.has_initial_state:
    specs.append(pl.BlockSpec((None, None, block_v, kdim), lambda bi, hi, vi: (bi, hi, vi, 0)))
  return specs
