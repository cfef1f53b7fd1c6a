"""Forward Pallas (Triton backend) kernel of chunked linear attention with decay.

Per chunk of C rows (Lightning Attention-2 / GLA tiling), with the state St = S^T `[BV, K]` kept
on chip across the sequential chunk loop:

  o      = (q * e^{b}) S_prev  +  A v                      (inter-chunk + intra-chunk)
  S_next = e^{b_C} (.) S_prev  +  (k * e^{b_C - b})^T v     (state passing)

with A_ij = scale * sum_d q_id k_jd e^{b_id - b_jd} for j <= i in the same segment. For scalar
gates A = (q k^T) (.) e^{b_i - b_j} in one matmul. For per-key-dimension gates A cannot be one
stable matmul; as in GLA's secondary chunking it is split into sub-chunks of c rows: blocks left of
the diagonal are matmuls re-centred on the sub-chunk boundary (both exponent factors <= 0),
diagonal blocks are built column by column in float32 with exact log-space differences.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.linear import kernel_common as kc
from pallas_kernels.linear.kernel_common import KernelConfig


def _unpack(cfg: KernelConfig, refs, n_out):
  refs = list(refs)
  q_ref, k_ref, v_ref = refs[:3]
  i = 3
  b_ref = r_ref = h0_ref = None
  if cfg.gate != "none":
    b_ref = refs[i]; i += 1
  if cfg.has_segments:
    r_ref = refs[i]; i += 1
  if cfg.has_initial_state:
    h0_ref = refs[i]; i += 1
  extra = refs[i:len(refs) - n_out]
  outs = refs[len(refs) - n_out:]
  return q_ref, k_ref, v_ref, b_ref, r_ref, h0_ref, extra, outs


def chunk_segments(cfg, r_ref, base, r_prev):
  """Reset ids of the chunk and the masks derived from them (None when unsegmented)."""
  if r_ref is None:
    return None, None, None, None, True
  r = kc.load_rows(r_ref, base, cfg.chunk)
  r_last = kc.load_scalar(r_ref, base + cfg.chunk - 1)
  reads_state = r == r_prev           # query rows that still see the incoming state
  feeds_state = r == r_last           # key rows that reach the outgoing state
  keeps_state = r_last == r_prev      # incoming state survives the chunk
  return r, r_last, reads_state, feeds_state, keeps_state


def _mask_rows(x, rows_mask):
  return x if rows_mask is None else jnp.where(rows_mask[:, None], x, 0.0)


def scalar_intra_weights(cfg, scores, b, r):
  """`[C, C]` intra-chunk weights: scores * e^{b_i - b_j} on j <= i, same segment; 0 elsewhere."""
  c = cfg.chunk
  mask = jnp.arange(c)[None, :] <= jnp.arange(c)[:, None]
  if r is not None:
    mask = mask & kc.same_segment(r, r)
  if b is None:
    return jnp.where(mask, scores, 0.0)
  return scores * kc.neg_inf_exp(mask, b[:, None] - b[None, :])


def state_decay(cfg, b_ref, base):
  """e^{b_C}: the whole chunk's decay; None (no gate), a scalar, or a `[1, K]` row."""
  if b_ref is None:
    return None
  last = base + cfg.chunk - 1
  if cfg.gate == "scalar":
    return jnp.exp(kc.load_scalar(b_ref, last))
  return jnp.exp(kc.load_rows(b_ref, last, 1))


def decay_state(st, decay, keeps_state):
  if decay is not None:
    st = st * decay
  if keeps_state is not True:
    st = jnp.where(keeps_state, st, 0.0)
  return st


def key_to_state(cfg, k, b, b_last_row, feeds_state):
  """k * e^{b_C - b} restricted to the rows that reach the outgoing state (float32)."""
  kf = k.astype(jnp.float32)
  if b is not None:
    if cfg.gate == "scalar":
      kf = kf * jnp.exp(b_last_row - b)[:, None]
    else:
      kf = kf * jnp.exp(b_last_row - b)
  return _mask_rows(kf, feeds_state)


def query_from_state(cfg, q, b, reads_state):
  """scale * q * e^{b} restricted to rows that see the incoming state (float32)."""
  qf = q.astype(jnp.float32) * cfg.scale
  if b is not None:
    qf = qf * (jnp.exp(b)[:, None] if cfg.gate == "scalar" else jnp.exp(b))
  return _mask_rows(qf, reads_state)


def last_gate_row(cfg, b_ref, base):
  if b_ref is None:
    return None
  last = base + cfg.chunk - 1
  if cfg.gate == "scalar":
    return kc.load_scalar(b_ref, last)
  return kc.load_rows(b_ref, last, 1)


def _forward_kernel(*refs, cfg: KernelConfig):
  q_ref, k_ref, v_ref, b_ref, r_ref, h0_ref, _, (o_ref, ht_ref) = _unpack(cfg, refs, 2)
  kdim = q_ref.shape[-1]
  bv = v_ref.shape[-1]
  c = cfg.chunk
  if h0_ref is not None:
    st0 = h0_ref[...].astype(jnp.float32)
  else:
    st0 = jnp.zeros((bv, kdim), jnp.float32)
  r_prev0 = kc.load_scalar(r_ref, 0) if r_ref is not None else jnp.int32(0)

  def body(n, carry):
    st, r_prev = carry
    base = pl.multiple_of(n * c, c)
    r, r_last, reads_state, feeds_state, keeps_state = chunk_segments(cfg, r_ref, base, r_prev)
    k = kc.load_rows(k_ref, base, c)
    v = kc.load_rows(v_ref, base, c)
    b = kc.load_rows(b_ref, base, c) if b_ref is not None else None
    if cfg.gate == "vector":
      _vector_chunk_output(cfg, q_ref, k_ref, v_ref, b_ref, r_ref, o_ref, base, st, r, r_prev)
    else:
      q = kc.load_rows(q_ref, base, c)
      scores = kc.mm(cfg, q.astype(jnp.float32) * cfg.scale, k, trans_b=True)
      a = scalar_intra_weights(cfg, scores, b, r)
      o = kc.mm(cfg, query_from_state(cfg, q, b, reads_state), st, trans_b=True)
      o = o + kc.mm(cfg, a, v)
      o_ref[pl.ds(base, c), :] = o.astype(o_ref.dtype)
    b_last = last_gate_row(cfg, b_ref, base)
    k_state = key_to_state(cfg, k, b, b_last, feeds_state)
    decay = None if b_last is None else jnp.exp(b_last)
    st = decay_state(st, decay, keeps_state) + kc.mm(cfg, v, k_state, trans_a=True)
    return st, (r_last if r_ref is not None else r_prev)

  st, _ = lax.fori_loop(0, cfg.num_chunks, body, (st0, r_prev0))
  ht_ref[...] = st.astype(ht_ref.dtype)


def _vector_chunk_output(cfg, q_ref, k_ref, v_ref, b_ref, r_ref, o_ref, base, st, r, r_prev):
  """Writes o for one chunk with per-key-dimension gates, one sub-chunk of rows at a time."""
  c, sc = cfg.chunk, cfg.sub_chunk
  kf = kc.load_rows(k_ref, base, c).astype(jnp.float32)
  b = kc.load_rows(b_ref, base, c)
  v = kc.load_rows(v_ref, base, c)
  for blk in range(c // sc):
    row0 = base + blk * sc
    q_i = kc.load_rows(q_ref, row0, sc).astype(jnp.float32) * cfg.scale
    b_i = kc.load_rows(b_ref, row0, sc)
    r_i = kc.load_rows(r_ref, row0, sc) if r_ref is not None else None
    reads_i = None if r_i is None else r_i == r_prev
    q_state = q_i * jnp.exp(b_i)
    q_state = _mask_rows(q_state, reads_i)
    o_i = kc.mm(cfg, q_state, st, trans_b=True)
    if blk > 0:
      # Left of the diagonal: re-centre both sides on gn = b at the last row before the block.
      gn = kc.load_rows(b_ref, row0 - 1, 1)
      q_t = q_i * jnp.exp(b_i - gn)
      k_t = kf * jnp.exp(jnp.minimum(gn - b, 0.0))
      a = kc.mm(cfg, q_t, k_t, trans_b=True)                       # [sc, c]
      mask = jnp.broadcast_to(jnp.arange(c)[None, :] < blk * sc, (sc, c))
      if r_i is not None:
        mask = mask & kc.same_segment(r_i, r)
      o_i = o_i + kc.mm(cfg, jnp.where(mask, a, 0.0), v)
    o_i = lax.fori_loop(
        0, sc, functools.partial(_vector_diag_column, cfg, q_i, b_i, r_i, k_ref, v_ref, b_ref,
                                 r_ref, row0), o_i)
    o_ref[pl.ds(row0, sc), :] = o_i.astype(o_ref.dtype)


def _vector_diag_column(cfg, q_i, b_i, r_i, k_ref, v_ref, b_ref, r_ref, row0, jj, o_i):
  """o_i += A[:, j] v_j for key row j = row0 + jj of the diagonal sub-chunk, exact in float32."""
  j = row0 + jj
  k_j = kc.load_rows(k_ref, j, 1).astype(jnp.float32)
  b_j = kc.load_rows(b_ref, j, 1)
  v_j = kc.load_rows(v_ref, j, 1).astype(jnp.float32)
  rows = jnp.arange(cfg.sub_chunk) >= jj
  if r_i is not None:
    rows = rows & (r_i == kc.load_scalar(r_ref, j))
  e = kc.neg_inf_exp(rows[:, None], b_i - b_j)
  a_col = jnp.sum(q_i * k_j * e, axis=1)
  return o_i + a_col[:, None] * v_j


def forward_call(cfg: KernelConfig, *, batch, heads, kdim, dv, block_v, seq_len, out_dtype,
                 num_warps, num_stages, interpret, inputs):
  """Builds and calls the forward pallas_call. inputs: q, k, v[, b][, r][, h0t]."""
  nv = dv // block_v
  in_specs = kc.input_specs(cfg, seq_len, kdim, block_v)
  out_shape = (jax.ShapeDtypeStruct((batch, seq_len, heads, dv), out_dtype),
               jax.ShapeDtypeStruct((batch, heads, dv, kdim), jnp.float32))
  out_specs = (pl.BlockSpec((None, seq_len, None, block_v), lambda bi, hi, vi: (bi, 0, hi, vi)),
               pl.BlockSpec((None, None, block_v, kdim), lambda bi, hi, vi: (bi, hi, vi, 0)))
  return pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg),
      grid=(batch, heads, nv),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"linear_attention_fwd_{cfg.gate}",
  )(*inputs)
