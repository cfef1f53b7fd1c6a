"""Backward Pallas-Triton kernels of block-sparse flash attention (deterministic, no atomics).

Softmax: with `p = exp(s - lse)`, `dp = dO v^T` and `delta = rowsum(dO * O)` (a plain-JAX
preprocess), `ds = p (dp - delta)`; sigmoid: `p = sigmoid(s + b)`, `ds = dp p (1 - p)`. A soft-cap
multiplies `ds` by `1 - tanh^2`. Then `dq = scale ds k`, `dk = scale ds^T q`, `dv = p^T dO`.

- dQ kernel, grid `(nQ, B * H)`: walks the forward layout, as the forward does.
- dK/dV kernel, grid `(nK, B * Hkv)`: walks the transposed layout (`q_counts/q_indices/q_partial`)
  and, for GQA, every query head of its group in turn, so each dK/dV tile has exactly one writer and
  the sum over heads happens in a fixed order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.flash.forward import (KernelConfig, dot_nn, dot_nt, dot_tn, optional_inputs,
                                          scores, split_refs, whole)


def _probs_and_dscores(cfg: KernelConfig, s, t, lse, delta, d_o, v):
  """`(p, ds, ds_logit)` of one tile from the masked logits `s`; masked entries give zeros.

  `ds_logit` is the gradient w.r.t. the final logit (what ALiBi's slope sees), `ds` the one w.r.t.
  the scaled score `q k^T * scale` (through the soft-cap's chain rule).
  """
  dp = dot_nt(d_o, v, cfg.precision)
  if cfg.mode == "sigmoid":
    p = jax.nn.sigmoid(s + cfg.sigmoid_bias)
    ds = dp * p * (1.0 - p)
  else:
    # Rows with no visible key have lse = -inf and every logit -inf; shifting by 0 keeps p at 0.
    lse_safe = jnp.where(lse == -jnp.inf, 0.0, lse)
    p = jnp.exp(s - lse_safe[:, None])
    ds = p * (dp - delta[:, None])
  ds_logit = ds
  if t is not None:
    ds = ds * (1.0 - t * t)
  return p, ds, ds_logit


def _dq_kernel(*refs, cfg: KernelConfig):
  r, outs = split_refs(cfg, refs, ("counts", "indices", "partial", "q", "k", "v", "do", "lse",
                                   "delta"))
  qi, bh = pl.program_id(0), pl.program_id(1)
  b, h = bh // cfg.heads, bh % cfg.heads
  lb, lh = cfg.layout_pos(b, h)
  bq, bk = cfg.block_q, cfg.block_k
  q, d_o = r["q"][...], r["do"][...]
  lse = r["lse"][...] if cfg.mode == "softmax" else None
  delta = r["delta"][...] if cfg.mode == "softmax" else None
  q_pos = qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_seg = r["q_seg"][...] if cfg.has_segments else None

  def body(t, carry):
    dq, d_slope = carry
    kb = r["indices"][lb, lh, qi, t]
    partial = r["partial"][lb, lh, qi, t]
    start = pl.multiple_of(kb * bk, bk)
    k = r["k"][pl.ds(start, bk), :]
    v = r["v"][pl.ds(start, bk), :]
    k_pos = start + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    k_seg = r["k_seg"][pl.ds(start, bk)] if cfg.has_segments else None
    s, tanh = scores(cfg, q, k, q_pos, k_pos, h, partial, q_seg, k_seg, r.get("slopes"))
    _, ds, ds_logit = _probs_and_dscores(cfg, s, tanh, lse, delta, d_o, v)
    if cfg.has_alibi:
      # The slope's gradient, per query row: d/dm_h of -m_h |rel| summed over this tile's keys.
      rel = (k_pos - (q_pos + (cfg.tk - cfg.tq))).astype(jnp.float32)
      d_slope = d_slope - jnp.sum(ds_logit * jnp.abs(rel), axis=1)
    return dq + dot_nn(ds.astype(k.dtype), k, cfg.precision), d_slope

  dq, d_slope = jax.lax.fori_loop(0, r["counts"][lb, lh, qi], body,
                                  (jnp.zeros((bq, cfg.head_dim_pad), jnp.float32),
                                   jnp.zeros((bq,), jnp.float32)))
  outs[0][...] = (dq * cfg.scale).astype(outs[0].dtype)
  if cfg.has_alibi:
    outs[1][...] = d_slope


def _dkv_kernel(*refs, cfg: KernelConfig):
  r, outs = split_refs(cfg, refs, ("counts", "indices", "partial", "q", "k", "v", "do", "lse",
                                   "delta"))
  dk_ref, dv_ref = outs
  ki, bg = pl.program_id(0), pl.program_id(1)
  b, g = bg // cfg.kv_heads, bg % cfg.kv_heads
  bq, bk = cfg.block_q, cfg.block_k
  k, v = r["k"][...], r["v"][...]
  k_pos = ki * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  k_seg = r["k_seg"][...] if cfg.has_segments else None

  def head_body(j, carry):
    h = g * cfg.rep + j
    lb, lh = cfg.layout_pos(b, h)

    def body(t, carry):
      dk, dv = carry
      qb = r["indices"][lb, lh, ki, t]
      partial = r["partial"][lb, lh, ki, t]
      start = pl.multiple_of(qb * bq, bq)
      q = r["q"][pl.ds(start, bq), j, :]
      d_o = r["do"][pl.ds(start, bq), j, :]
      q_pos = start + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
      q_seg = r["q_seg"][pl.ds(start, bq)] if cfg.has_segments else None
      lse = r["lse"][j, pl.ds(start, bq)] if cfg.mode == "softmax" else None
      delta = r["delta"][j, pl.ds(start, bq)] if cfg.mode == "softmax" else None
      s, tanh = scores(cfg, q, k, q_pos, k_pos, h, partial, q_seg, k_seg, r.get("slopes"))
      p, ds, _ = _probs_and_dscores(cfg, s, tanh, lse, delta, d_o, v)
      dv = dv + dot_tn(p.astype(d_o.dtype), d_o, cfg.precision)
      dk = dk + dot_tn(ds.astype(q.dtype), q, cfg.precision)
      return dk, dv

    return jax.lax.fori_loop(0, r["counts"][lb, lh, ki], body, carry)

  zeros = jnp.zeros((bk, cfg.head_dim_pad), jnp.float32)
  dk, dv = jax.lax.fori_loop(0, cfg.rep, head_body, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _stats_inputs(cfg: KernelConfig, lse, delta):
  """The softmax statistics, or a dummy pair in sigmoid mode (kept so the argument order is fixed)."""
  if cfg.mode == "softmax":
    return lse, delta
  dummy = jnp.zeros((cfg.batch, cfg.heads, cfg.tq_pad), jnp.float32)
  return dummy, dummy


def flash_backward_dq(cfg: KernelConfig, layout_kv, q, k, v, d_o, lse, delta, q_seg=None,
                      k_seg=None, sinks=None, slopes=None):
  """dQ `[B, Tq_pad, H, Dp]` (padded inputs, forward layout), and with ALiBi the per-row slope
  gradient `[B, H, Tq_pad]` float32 (its sum over batch and rows is d slope_h), else None."""
  counts, indices, partial = layout_kv
  bq, dp, heads, rep = cfg.block_q, cfg.head_dim_pad, cfg.heads, cfg.rep
  q_spec = pl.BlockSpec((None, bq, None, dp), lambda i, bh: (bh // heads, i, bh % heads, 0))
  kv_spec = pl.BlockSpec((None, cfg.tk_pad, None, dp),
                         lambda i, bh: (bh // heads, 0, (bh % heads) // rep, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, bh: (bh // heads, bh % heads, i))
  seg_q_spec = pl.BlockSpec((None, bq), lambda i, bh: (bh // heads, i))
  seg_k_spec = pl.BlockSpec((None, cfg.tk_pad), lambda i, bh: (bh // heads, 0))
  extra, extra_specs = optional_inputs(cfg, q_seg, k_seg, sinks, slopes, seg_q_spec, seg_k_spec)
  lse, delta = _stats_inputs(cfg, lse, delta)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  out_specs = [q_spec]
  if cfg.has_alibi:
    out_shape.append(jax.ShapeDtypeStruct((cfg.batch, heads, cfg.tq_pad), jnp.float32))
    out_specs.append(row_spec)
  outs = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(cfg.tq_pad // bq, cfg.batch * heads),
      in_specs=[whole(counts.shape), whole(indices.shape), whole(partial.shape), q_spec, kv_spec,
                kv_spec, q_spec, row_spec, row_spec] + extra_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=cfg.compiler_params(),
      interpret=cfg.interpret,
      name="flash_block_sparse_dq",
  )(counts, indices, partial, q, k, v, d_o, lse, delta, *extra)
  return outs[0], (outs[1] if cfg.has_alibi else None)


def flash_backward_dkv(cfg: KernelConfig, layout_q, q, k, v, d_o, lse, delta, q_seg=None,
                       k_seg=None, sinks=None, slopes=None):
  """(dK, dV) `[B, Tk_pad, Hkv, Dp]` (padded inputs, transposed layout)."""
  counts, indices, partial = layout_q
  bk, dp, kvh, rep = cfg.block_k, cfg.head_dim_pad, cfg.kv_heads, cfg.rep
  # Query-side arrays are handed over whole along time and for the `rep` heads of the group.
  qg_spec = pl.BlockSpec((None, cfg.tq_pad, rep, dp), lambda i, bg: (bg // kvh, 0, bg % kvh, 0))
  kv_spec = pl.BlockSpec((None, bk, None, dp), lambda i, bg: (bg // kvh, i, bg % kvh, 0))
  row_spec = pl.BlockSpec((None, rep, cfg.tq_pad), lambda i, bg: (bg // kvh, bg % kvh, 0))
  seg_q_spec = pl.BlockSpec((None, cfg.tq_pad), lambda i, bg: (bg // kvh, 0))
  seg_k_spec = pl.BlockSpec((None, bk), lambda i, bg: (bg // kvh, i))
  extra, extra_specs = optional_inputs(cfg, q_seg, k_seg, sinks, slopes, seg_q_spec, seg_k_spec)
  lse, delta = _stats_inputs(cfg, lse, delta)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(cfg.tk_pad // bk, cfg.batch * kvh),
      in_specs=[whole(counts.shape), whole(indices.shape), whole(partial.shape), qg_spec, kv_spec,
                kv_spec, qg_spec, row_spec, row_spec] + extra_specs,
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=cfg.compiler_params(),
      interpret=cfg.interpret,
      name="flash_block_sparse_dkv",
  )(counts, indices, partial, q, k, v, d_o, lse, delta, *extra)
