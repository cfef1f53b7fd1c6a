"""Backward Pallas (Triton backend) kernels of chunked linear attention with decay.

Two kernels, as in Lightning Attention-2's backward (no chunk states are stored by the forward):

- `dq`: re-runs the forward chunk loop to rebuild the incoming state S_prev of every chunk, and
  computes dq = scale * [ e^{b} (.) (do S_prev^T) + (dA (.) decay) k ], dA = do v^T (intra part).
- `dkv`: runs the chunk loop backwards in time carrying dS (the cotangent of the state leaving the
  chunk), starting from d(final state):
    dv      = A^T do + (k e^{b_C - b}) dS
    dk      = e^{b_C - b} (.) (v dS^T) + scale * (dA (.) decay)^T q
    dS_prev = e^{b_C} (.) dS + (scale q e^{b})^T do
  and returns the last dS_prev as d(initial state).
Per-key-dimension gates use the same sub-chunk split as the forward (matmuls left of the diagonal
re-centred on the sub-chunk boundary, exact float32 diagonal blocks). dq and dk are partial sums
over value blocks (`[NV, ...]`), reduced by the caller; gate gradients are derived by the caller
from dq and dk (see `api.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.linear import forward as fl
from pallas_kernels.linear import kernel_common as kc
from pallas_kernels.linear.kernel_common import KernelConfig


def _initial_state(h0_ref, bv, kdim):
  if h0_ref is not None:
    return h0_ref[...].astype(jnp.float32)
  return jnp.zeros((bv, kdim), jnp.float32)


# ------------------------------------------------------------------------------------------ dq


def _dq_kernel(*refs, cfg: KernelConfig):
  q_ref, k_ref, v_ref, b_ref, r_ref, h0_ref, extra, outs = fl._unpack(cfg, refs, 2)
  do_ref, ds_ref = extra
  dq_ref, u_ref = outs
  kdim = q_ref.shape[-1]
  bv = v_ref.shape[-1]
  c = cfg.chunk
  r_prev0 = kc.load_scalar(r_ref, 0) if r_ref is not None else jnp.int32(0)

  def body(n, carry):
    st, r_prev = carry
    base = pl.multiple_of(n * c, c)
    r, r_last, reads_state, feeds_state, keeps_state = fl.chunk_segments(cfg, r_ref, base, r_prev)
    k = kc.load_rows(k_ref, base, c)
    v = kc.load_rows(v_ref, base, c)
    b = kc.load_rows(b_ref, base, c) if b_ref is not None else None
    if cfg.gate == "vector":
      _vector_dq(cfg, k_ref, v_ref, b_ref, r_ref, do_ref, dq_ref, base, st, r, r_prev)
    else:
      do = kc.load_rows(do_ref, base, c)
      from_state = kc.mm(cfg, do, st)                             # [C, K]
      if b is not None:
        from_state = from_state * jnp.exp(b)[:, None]
      from_state = fl._mask_rows(from_state, reads_state)
      da = fl.scalar_intra_weights(cfg, kc.mm(cfg, do, v, trans_b=True), b, r)
      dq = cfg.scale * (from_state + kc.mm(cfg, da, k))
      dq_ref[pl.ds(base, c), :] = dq.astype(dq_ref.dtype)
    b_last = fl.last_gate_row(cfg, b_ref, base)
    k_state = fl.key_to_state(cfg, k, b, b_last, feeds_state)
    decay = None if b_last is None else jnp.exp(b_last)
    st = fl.decay_state(st, decay, keeps_state) + kc.mm(cfg, v, k_state, trans_a=True)
    # <dS_n, S_n> summed over values: d loss / d(a virtual log-gate on the chunk boundary).
    u = jnp.sum(ds_ref[n].astype(jnp.float32) * st, axis=0, keepdims=True)
    u_ref[pl.ds(n, 1), :] = u
    return st, (r_last if r_ref is not None else r_prev)

  lax.fori_loop(0, cfg.num_chunks, body, (_initial_state(h0_ref, bv, kdim), r_prev0))


def _vector_dq(cfg, k_ref, v_ref, b_ref, r_ref, do_ref, dq_ref, base, st, r, r_prev):
  c, sc = cfg.chunk, cfg.sub_chunk
  kf = kc.load_rows(k_ref, base, c).astype(jnp.float32)
  b = kc.load_rows(b_ref, base, c)
  v = kc.load_rows(v_ref, base, c)
  for blk in range(c // sc):
    row0 = base + blk * sc
    do_i = kc.load_rows(do_ref, row0, sc)
    b_i = kc.load_rows(b_ref, row0, sc)
    r_i = kc.load_rows(r_ref, row0, sc) if r_ref is not None else None
    dq_i = fl._mask_rows(kc.mm(cfg, do_i, st) * jnp.exp(b_i),
                         None if r_i is None else r_i == r_prev)
    if blk > 0:
      gn = kc.load_rows(b_ref, row0 - 1, 1)
      k_t = kf * jnp.exp(jnp.minimum(gn - b, 0.0))
      mask = jnp.broadcast_to(jnp.arange(c)[None, :] < blk * sc, (sc, c))
      if r_i is not None:
        mask = mask & kc.same_segment(r_i, r)
      da = jnp.where(mask, kc.mm(cfg, do_i, v, trans_b=True), 0.0)
      dq_i = dq_i + jnp.exp(b_i - gn) * kc.mm(cfg, da, k_t)
    do_f = do_i.astype(jnp.float32)

    def diag(jj, acc):
      j = row0 + jj
      k_j = kc.load_rows(k_ref, j, 1).astype(jnp.float32)
      b_j = kc.load_rows(b_ref, j, 1)
      v_j = kc.load_rows(v_ref, j, 1).astype(jnp.float32)
      rows = jnp.arange(sc) >= jj
      if r_i is not None:
        rows = rows & (r_i == kc.load_scalar(r_ref, j))
      e = kc.neg_inf_exp(rows[:, None], b_i - b_j)
      da_col = jnp.sum(do_f * v_j, axis=1)
      return acc + da_col[:, None] * k_j * e

    dq_i = lax.fori_loop(0, sc, diag, dq_i)
    dq_ref[pl.ds(row0, sc), :] = (cfg.scale * dq_i).astype(dq_ref.dtype)


# ------------------------------------------------------------------------------------------ dk, dv


def _dkv_kernel(*refs, cfg: KernelConfig):
  (q_ref, k_ref, v_ref, b_ref, r_ref, _, (do_ref, dht_ref),
   (dk_ref, dv_ref, dh0_ref, ds_ref)) = fl._unpack(cfg, refs, 4)
  c = cfg.chunk

  def body(i, dst):
    n = cfg.num_chunks - 1 - i
    base = pl.multiple_of(n * c, c)
    ds_ref[n] = dst.astype(ds_ref.dtype)         # d(state leaving chunk n), for the gate grads
    r_prev = (kc.load_scalar(r_ref, jnp.maximum(base - 1, 0)) if r_ref is not None
              else jnp.int32(0))
    r, _, reads_state, feeds_state, keeps_state = fl.chunk_segments(cfg, r_ref, base, r_prev)
    q = kc.load_rows(q_ref, base, c)
    do = kc.load_rows(do_ref, base, c)
    b = kc.load_rows(b_ref, base, c) if b_ref is not None else None
    b_last = fl.last_gate_row(cfg, b_ref, base)
    if cfg.gate == "vector":
      _vector_dkv(cfg, q, do, b, b_last, r, feeds_state, q_ref, k_ref, v_ref, b_ref, r_ref,
                  do_ref, dk_ref, dv_ref, base, dst)
    else:
      k = kc.load_rows(k_ref, base, c)
      v = kc.load_rows(v_ref, base, c)
      k_state = fl.key_to_state(cfg, k, b, b_last, feeds_state)
      a = fl.scalar_intra_weights(cfg, kc.mm(cfg, q.astype(jnp.float32) * cfg.scale, k,
                                             trans_b=True), b, r)
      dv = kc.mm(cfg, k_state, dst, trans_b=True) + kc.mm(cfg, a, do, trans_a=True)
      dk_state = kc.mm(cfg, v, dst)
      if b is not None:
        dk_state = dk_state * jnp.exp(b_last - b)[:, None]
      dk_state = fl._mask_rows(dk_state, feeds_state)
      da = fl.scalar_intra_weights(cfg, kc.mm(cfg, do, v, trans_b=True), b, r)
      dk = dk_state + cfg.scale * kc.mm(cfg, da, q, trans_a=True)
      dk_ref[pl.ds(base, c), :] = dk.astype(dk_ref.dtype)
      dv_ref[pl.ds(base, c), :] = dv.astype(dv_ref.dtype)
    q_state = fl.query_from_state(cfg, q, b, reads_state)
    decay = None if b_last is None else jnp.exp(b_last)
    return fl.decay_state(dst, decay, keeps_state) + kc.mm(cfg, do, q_state, trans_a=True)

  dst = lax.fori_loop(0, cfg.num_chunks, body, dht_ref[...].astype(jnp.float32))
  dh0_ref[...] = dst.astype(dh0_ref.dtype)


def _vector_dkv(cfg, q, do, b, b_last, r, feeds_state, q_ref, k_ref, v_ref, b_ref, r_ref,
                do_ref, dk_ref, dv_ref, base, dst):
  c, sc = cfg.chunk, cfg.sub_chunk
  nblk = c // sc
  qf = q.astype(jnp.float32) * cfg.scale
  for blk in range(nblk):
    row0 = base + blk * sc
    k_j = kc.load_rows(k_ref, row0, sc).astype(jnp.float32)
    b_j = kc.load_rows(b_ref, row0, sc)
    v_j = kc.load_rows(v_ref, row0, sc)
    r_j = kc.load_rows(r_ref, row0, sc) if r_ref is not None else None
    feeds_j = None
    if r_j is not None:
      feeds_j = r_j == kc.load_scalar(r_ref, base + c - 1)
    to_state = jnp.exp(b_last - b_j)
    dv_j = kc.mm(cfg, fl._mask_rows(k_j * to_state, feeds_j), dst, trans_b=True)
    dk_j = fl._mask_rows(kc.mm(cfg, v_j, dst) * to_state, feeds_j)
    if blk < nblk - 1:
      # Right of the diagonal block column (later query rows): re-centre on gn = b at the block's
      # last row, so e^{b_i - gn} <= 1 for the later rows and e^{gn - b_j} <= 1 for the block.
      gn = kc.load_rows(b_ref, row0 + sc - 1, 1)
      q_h = qf * jnp.exp(jnp.minimum(b - gn, 0.0))
      k_h = k_j * jnp.exp(gn - b_j)
      mask = jnp.broadcast_to(jnp.arange(c)[None, :] >= (blk + 1) * sc, (sc, c))
      if r_j is not None:
        mask = mask & kc.same_segment(r_j, r)
      a_t = jnp.where(mask, kc.mm(cfg, k_h, q_h, trans_b=True), 0.0)     # A[:, J]^T [sc, c]
      dv_j = dv_j + kc.mm(cfg, a_t, do)
      da_t = jnp.where(mask, kc.mm(cfg, v_j, do, trans_b=True), 0.0)
      dk_j = dk_j + jnp.exp(gn - b_j) * kc.mm(cfg, da_t, q_h)
    v_jf = v_j.astype(jnp.float32)

    def diag(ii, carry, row0=row0, k_j=k_j, b_j=b_j, v_jf=v_jf, r_j=r_j):
      dk_acc, dv_acc = carry
      i = row0 + ii
      q_i = kc.load_rows(q_ref, i, 1).astype(jnp.float32) * cfg.scale
      b_i = kc.load_rows(b_ref, i, 1)
      do_i = kc.load_rows(do_ref, i, 1).astype(jnp.float32)
      rows = jnp.arange(sc) <= ii
      if r_j is not None:
        rows = rows & (r_j == kc.load_scalar(r_ref, i))
      e = kc.neg_inf_exp(rows[:, None], b_i - b_j)
      a_row = jnp.sum(k_j * q_i * e, axis=1)
      da_row = jnp.sum(v_jf * do_i, axis=1)
      return dk_acc + da_row[:, None] * q_i * e, dv_acc + a_row[:, None] * do_i

    dk_j, dv_j = lax.fori_loop(0, sc, diag, (dk_j, dv_j))
    dk_ref[pl.ds(row0, sc), :] = dk_j.astype(dk_ref.dtype)
    dv_ref[pl.ds(row0, sc), :] = dv_j.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------ calls


def _partial_spec(seq_len, kdim):
  return pl.BlockSpec((None, None, seq_len, None, kdim), lambda bi, hi, vi: (vi, bi, 0, hi, 0))


def _chunk_states_spec(cfg, kdim, block_v):
  return pl.BlockSpec((None, None, cfg.num_chunks, block_v, kdim),
                      lambda bi, hi, vi: (bi, hi, 0, vi, 0))


def dq_call(cfg: KernelConfig, *, inputs, do, ds, batch, heads, kdim, dv, block_v, seq_len,
            num_warps, num_stages, interpret):
  """(dq `[B, Tp, H, K]`, u `[B, H, N, K]`), float32, summed over value blocks.

  ds `[B, H, N, Dv, K]` holds d(state leaving chunk n) from `dkv_call`; u_n = sum_v dS_n S_n.
  """
  nv = dv // block_v
  specs = kc.input_specs(cfg, seq_len, kdim, block_v)
  specs.append(pl.BlockSpec((None, seq_len, None, block_v), lambda bi, hi, vi: (bi, 0, hi, vi)))
  specs.append(_chunk_states_spec(cfg, kdim, block_v))
  dq, u = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(batch, heads, nv),
      in_specs=specs,
      out_specs=(_partial_spec(seq_len, kdim),
                 pl.BlockSpec((None, None, None, cfg.num_chunks, kdim),
                              lambda bi, hi, vi: (vi, bi, hi, 0, 0))),
      out_shape=(jax.ShapeDtypeStruct((nv, batch, seq_len, heads, kdim), jnp.float32),
                 jax.ShapeDtypeStruct((nv, batch, heads, cfg.num_chunks, kdim), jnp.float32)),
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"linear_attention_bwd_dq_{cfg.gate}",
  )(*inputs, do, ds)
  return jnp.sum(dq, axis=0), jnp.sum(u, axis=0)


def dkv_call(cfg: KernelConfig, *, inputs, do, dht, batch, heads, kdim, dv, block_v, seq_len,
             num_warps, num_stages, interpret):
  """dk `[B, Tp, H, K]` f32 (summed over value blocks), dv `[B, Tp, H, Dv]` f32, dh0 value-first
  `[B, H, Dv, K]` f32, and ds `[B, H, N, Dv, K]` (matmul dtype): d(state leaving chunk n)."""
  nv = dv // block_v
  specs = kc.input_specs(cfg, seq_len, kdim, block_v)
  specs.append(pl.BlockSpec((None, seq_len, None, block_v), lambda bi, hi, vi: (bi, 0, hi, vi)))
  specs.append(pl.BlockSpec((None, None, block_v, kdim), lambda bi, hi, vi: (bi, hi, vi, 0)))
  out_shape = (jax.ShapeDtypeStruct((nv, batch, seq_len, heads, kdim), jnp.float32),
               jax.ShapeDtypeStruct((batch, seq_len, heads, dv), jnp.float32),
               jax.ShapeDtypeStruct((batch, heads, dv, kdim), jnp.float32),
               jax.ShapeDtypeStruct((batch, heads, cfg.num_chunks, dv, kdim),
                                    jnp.dtype(cfg.mm_dtype)))
  out_specs = (_partial_spec(seq_len, kdim),
               pl.BlockSpec((None, seq_len, None, block_v), lambda bi, hi, vi: (bi, 0, hi, vi)),
               pl.BlockSpec((None, None, block_v, kdim), lambda bi, hi, vi: (bi, hi, vi, 0)),
               _chunk_states_spec(cfg, kdim, block_v))
  dk, dv_out, dh0, ds = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(batch, heads, nv),
      in_specs=specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name=f"linear_attention_bwd_dkv_{cfg.gate}",
  )(*inputs, do, dht)
  return jnp.sum(dk, axis=0), dv_out, dh0, ds
