"""Gated delta rule (Gated DeltaNet) chunked forward and backward as Pallas (Triton) kernels.

S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,  o_t = scale * q_t S_t, on
`[B, T, H, D]` with `beta [B, T, H]` and a scalar log-gate `g` (None, `[H]` or `[B, T, H]`), state
float32 `[B, H, Dk, Dv]`, `segment_ids` resets, as `attnjax.ops.linear.delta.delta_rule`.

Per chunk (the WY / UT form of DeltaNet and Gated DeltaNet): with b the chunk-relative cumulative
gate, A_ij = beta_i e^{b_i - b_j} k_i . k_j (j < i, same segment) and T = (I + A)^{-1},
  U = T (beta V) - T (beta e^{b} K) S_prev,   o = scale [(q e^{b}) S_prev + (q k^T (.) D) U],
  S_next = e^{b_C} S_prev + (k e^{b_C - b})^T U.
T is computed inside the kernel with tensor-core matmuls as the finite product
(I - A)(I + A^2)(I + A^4)...(I + A^{C/2}) = sum_{n < C} (-A)^n (exact because A is strictly lower
triangular, A^C = 0); fla instead inverts 16x16 diagonal blocks by substitution and merges them.
With L2-normalised keys (as Gated DeltaNet uses) |A_ij| <= 1 and the product stays well scaled.

Backward (custom_vjp), split as fla splits it into a sequential part and a chunk-parallel part:
the forward kernel also stores the state entering every chunk (float32 `[B, H, N, Dv, Dk]`); a
reverse-time kernel carries dS backwards through the chunks,
  dU = K_s dS_next + scale P^T do,  dS_prev = alpha dS_next + scale (q gam)^T do - W^T dU,
storing d loss / d(state leaving chunk n) and returning d initial_state; then a kernel with one
program per (batch, head, chunk) gives every chunk's dq, dk, dv, dbeta and d(cumulative gate)
at once (T = (I + A)^{-1} recomputed; dA = -T^T dT T^T). The gate gradient is the within-chunk
reverse cumsum of the latter. `backward="xla"` swaps the chunk-parallel kernel for the VJP of
`_chunk_local` (the same algebra in plain JAX), which the tests use as a cross-check.
Keys should be L2-normalised.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels import common
from pallas_kernels.linear import forward as fl
from pallas_kernels.linear import kernel_common as kc
from pallas_kernels.linear.api import LOG_DECAY_FLOOR, _chunk_cumsum, _pad_axis, reset_ids
from pallas_kernels.linear.block_sizes import MIN_TILE, next_power_of_2
from pallas_kernels.linear.kernel_common import KernelConfig


def _mm32(cfg, a, b, *, trans_a=False, trans_b=False):
  """float32-operand matmul (the UT transform amplifies bf16 operand rounding)."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dims,
                         precision=cfg.precision, preferred_element_type=jnp.float32)


def unit_lower_inverse(cfg, a):
  """(I + A)^{-1} for strictly lower-triangular `[C, C]` A, as prod_m (I + (-A)^{2^m})."""
  c = a.shape[0]
  eye = (jnp.arange(c)[:, None] == jnp.arange(c)[None, :]).astype(jnp.float32)
  power = -a
  inv = eye + power
  span = 2
  while span < c:
    power = _mm32(cfg, power, power)
    inv = inv + _mm32(cfg, inv, power)
    span *= 2
  return inv


def _chunk_operators(cfg, q, k, beta, b, r, reads_state):
  """The chunk's WY pieces shared by the forward and the reverse-state kernels.

  Returns (decay `[C, C]` = e^{b_i - b_j} on j <= i in one segment, T = (I + A)^{-1},
  gam = e^{b} on the rows that read the incoming state, W = T (beta gam K)).
  """
  c = cfg.chunk
  rows, cols = jnp.arange(c)[:, None], jnp.arange(c)[None, :]
  incl = cols <= rows
  if r is not None:
    incl = incl & kc.same_segment(r, r)
  decay = (jnp.where(incl, 1.0, 0.0) if b is None
           else kc.neg_inf_exp(incl, b[:, None] - b[None, :]))
  strict = incl & (cols < rows)
  a = jnp.where(strict, beta[:, None] * decay * kc.mm(cfg, k, k, trans_b=True), 0.0)
  t_inv = unit_lower_inverse(cfg, a)
  gam = jnp.ones((c,), jnp.float32) if b is None else jnp.exp(b)
  if reads_state is not None:
    gam = jnp.where(reads_state, gam, 0.0)
  w = _mm32(cfg, t_inv, (beta * gam)[:, None] * k.astype(jnp.float32))
  return decay, t_inv, gam, w


def _delta_forward_kernel(*refs, cfg: KernelConfig, save_states: bool = False):
  n_out = 3 if save_states else 2
  q_ref, k_ref, v_ref, b_ref, r_ref, h0_ref, (beta_ref,), outs = fl._unpack(cfg, refs, n_out)
  o_ref, ht_ref = outs[:2]
  kdim = q_ref.shape[-1]
  bv = v_ref.shape[-1]
  c = cfg.chunk
  st0 = (h0_ref[...].astype(jnp.float32) if h0_ref is not None
         else jnp.zeros((bv, kdim), jnp.float32))
  r_prev0 = kc.load_scalar(r_ref, 0) if r_ref is not None else jnp.int32(0)

  def body(n, carry):
    st, r_prev = carry
    base = pl.multiple_of(n * c, c)
    if save_states:
      # The state entering each chunk, for the backward's chunk-parallel gradients.
      outs[2][pl.ds(pl.multiple_of(n * bv, bv), bv), :] = st
    r, r_last, reads_state, feeds_state, keeps_state = fl.chunk_segments(cfg, r_ref, base, r_prev)
    q = kc.load_rows(q_ref, base, c)
    k = kc.load_rows(k_ref, base, c)
    v = kc.load_rows(v_ref, base, c)
    beta = kc.load_rows(beta_ref, base, c).astype(jnp.float32)
    b = kc.load_rows(b_ref, base, c) if b_ref is not None else None
    decay, t_inv, gam, w = _chunk_operators(cfg, q, k, beta, b, r, reads_state)
    u = _mm32(cfg, t_inv, beta[:, None] * v.astype(jnp.float32))
    u = u - _mm32(cfg, w, st, trans_b=True)                       # [C, BV]
    scores = kc.mm(cfg, q, k, trans_b=True) * decay
    o = _mm32(cfg, q.astype(jnp.float32) * gam[:, None], st, trans_b=True) + _mm32(cfg, scores, u)
    o_ref[pl.ds(base, c), :] = (cfg.scale * o).astype(o_ref.dtype)
    b_last = fl.last_gate_row(cfg, b_ref, base)
    k_state = fl.key_to_state(cfg, k, b, b_last, feeds_state)
    dec_all = None if b_last is None else jnp.exp(b_last)
    st = fl.decay_state(st, dec_all, keeps_state) + _mm32(cfg, u, k_state, trans_a=True)
    return st, (r_last if r_ref is not None else r_prev)

  st, _ = lax.fori_loop(0, cfg.num_chunks, body, (st0, r_prev0))
  ht_ref[...] = st


def _delta_state_grad_kernel(*refs, cfg: KernelConfig):
  """Reverse-time pass: the gradient of the loss w.r.t. the state leaving every chunk.

  With S_next = alpha S + K_s^T U, U = U_0 - W S, o = scale [(q gam) S + P U] (P = q k^T (.) decay,
  K_s = k e^{b_C - b} on the rows feeding the outgoing state, alpha = e^{b_C} or 0 at a reset):
    dU = K_s dS_next + scale P^T do,   dS = alpha dS_next + scale (q gam)^T do - W^T dU.
  All value-first (`[BV, K]`), like the forward.
  """
  refs = list(refs)
  q_ref, k_ref = refs[:2]
  i = 2
  b_ref = r_ref = None
  if cfg.gate != "none":
    b_ref = refs[i]; i += 1
  if cfg.has_segments:
    r_ref = refs[i]; i += 1
  beta_ref, do_ref, dht_ref, dsn_ref, dh0_ref = refs[i:i + 5]
  bv = do_ref.shape[-1]
  c = cfg.chunk

  def body(step, dst):
    n = cfg.num_chunks - 1 - step
    base = pl.multiple_of(n * c, c)
    dsn_ref[pl.ds(pl.multiple_of(n * bv, bv), bv), :] = dst
    r_prev = (kc.load_scalar(r_ref, jnp.maximum(base - 1, 0)) if r_ref is not None
              else jnp.int32(0))
    r, _, reads_state, feeds_state, keeps_state = fl.chunk_segments(cfg, r_ref, base, r_prev)
    q = kc.load_rows(q_ref, base, c)
    k = kc.load_rows(k_ref, base, c)
    do = kc.load_rows(do_ref, base, c).astype(jnp.float32)
    beta = kc.load_rows(beta_ref, base, c).astype(jnp.float32)
    b = kc.load_rows(b_ref, base, c) if b_ref is not None else None
    decay, _, gam, w = _chunk_operators(cfg, q, k, beta, b, r, reads_state)
    scores = kc.mm(cfg, q, k, trans_b=True) * decay
    b_last = fl.last_gate_row(cfg, b_ref, base)
    k_state = fl.key_to_state(cfg, k, b, b_last, feeds_state)
    du = (_mm32(cfg, k_state, dst, trans_b=True)
          + cfg.scale * _mm32(cfg, scores, do, trans_a=True))       # [C, BV]
    q_gam = q.astype(jnp.float32) * gam[:, None]
    dec_all = None if b_last is None else jnp.exp(b_last)
    return (fl.decay_state(dst, dec_all, keeps_state)
            + cfg.scale * _mm32(cfg, do, q_gam, trans_a=True) - _mm32(cfg, du, w, trans_a=True))

  dh0_ref[...] = lax.fori_loop(0, cfg.num_chunks, body, dht_ref[...].astype(jnp.float32))


def _delta_forward_call(cfg, *, inputs, batch, heads, kdim, dv, seq_len, out_dtype, interpret,
                        save_states=False, num_warps=4, num_stages=2):
  specs = kc.input_specs(cfg, seq_len, kdim, dv)
  specs.append(pl.BlockSpec((None, seq_len, None), lambda bi, hi, vi: (bi, 0, hi)))   # beta
  out_shape = [jax.ShapeDtypeStruct((batch, seq_len, heads, dv), out_dtype),
               jax.ShapeDtypeStruct((batch, heads, dv, kdim), jnp.float32)]
  out_specs = [pl.BlockSpec((None, seq_len, None, dv), lambda bi, hi, vi: (bi, 0, hi, vi)),
               pl.BlockSpec((None, None, dv, kdim), lambda bi, hi, vi: (bi, hi, vi, 0))]
  if save_states:
    out_shape.append(_chunk_states_shape(cfg, batch, heads, dv, kdim))
    out_specs.append(_chunk_states_spec(cfg, dv, kdim))
  return pl.pallas_call(
      functools.partial(_delta_forward_kernel, cfg=cfg, save_states=save_states),
      grid=(batch, heads, 1),      # the UT transform needs all of V's columns: one value block
      in_specs=specs, out_specs=tuple(out_specs), out_shape=tuple(out_shape),
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="delta_rule_fwd",
  )(*inputs)


def _chunk_states_shape(cfg, batch, heads, dv, kdim):
  # One value-first state per chunk, stacked along rows so kernels store 2-D power-of-two tiles.
  return jax.ShapeDtypeStruct((batch, heads, cfg.num_chunks * dv, kdim), jnp.float32)


def _chunk_states_spec(cfg, dv, kdim):
  return pl.BlockSpec((None, None, cfg.num_chunks * dv, kdim), lambda bi, hi, vi: (bi, hi, 0, 0))


def _state_grad_call(cfg, *, q, k, b, r, beta, do, dht, batch, heads, kdim, dv, seq_len,
                     interpret, num_warps=4, num_stages=2):
  """(`[B, H, N * Dv, K]` d loss / d(value-first state leaving chunk n), n = 0..N-1;
  `[B, H, Dv, K]` d loss / d(initial state))."""
  row = lambda width: pl.BlockSpec((None, seq_len, None, width),
                                   lambda bi, hi, vi: (bi, 0, hi, 0))
  per_step = pl.BlockSpec((None, seq_len, None), lambda bi, hi, vi: (bi, 0, hi))
  specs, inputs = [row(kdim), row(kdim)], [q, k]
  if b is not None:
    specs.append(per_step); inputs.append(b)
  if r is not None:
    specs.append(pl.BlockSpec((None, seq_len), lambda bi, hi, vi: (bi, 0))); inputs.append(r)
  specs += [per_step, row(dv), pl.BlockSpec((None, None, dv, kdim),
                                            lambda bi, hi, vi: (bi, hi, 0, 0))]
  inputs += [beta, do, dht]
  return pl.pallas_call(
      functools.partial(_delta_state_grad_kernel, cfg=cfg),
      grid=(batch, heads, 1),
      in_specs=specs,
      out_specs=(_chunk_states_spec(cfg, dv, kdim),
                 pl.BlockSpec((None, None, dv, kdim), lambda bi, hi, vi: (bi, hi, 0, 0))),
      out_shape=(_chunk_states_shape(cfg, batch, heads, dv, kdim),
                 jax.ShapeDtypeStruct((batch, heads, dv, kdim), jnp.float32)),
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="delta_rule_bwd_dstate",
  )(*inputs)


def _delta_chunk_grad_kernel(*refs, cfg: KernelConfig):
  """One program per (batch, head, chunk): every local gradient of one chunk, given the state St
  entering it and dSt, the cotangent of the state leaving it (both value-first `[V, K]`).

  Forward (see `_chunk_local`): A = strict (.) beta_i decay_ij k_i.k_j, T = (I + A)^{-1},
  U = T (beta v) - T (beta gam k) S, o = scale [(q gam) S + P U], S' = alpha S + K_s^T U.
  Reverse: dU = K_s dS' + scale P^T do; dP = scale do U^T; dW = -dU S^T;
  dT = dU (beta v)^T + dW (beta gam k)^T; dA = -T^T dT T^T (strict); then the products' rules.
  `db` is the gradient w.r.t. the chunk-relative cumulative gate b (reverse-cumsummed outside).
  """
  refs = list(refs)
  q_ref, k_ref, v_ref = refs[:3]
  i = 3
  b_ref = r_ref = None
  if cfg.gate != "none":
    b_ref = refs[i]; i += 1
  if cfg.has_segments:
    r_ref = refs[i]; i += 1
  beta_ref, do_ref, st_ref, dst_ref = refs[i:i + 4]
  outs = refs[i + 4:]
  dq_ref, dk_ref, dv_ref, dbeta_ref = outs[:4]
  db_ref = outs[4] if b_ref is not None else None
  c = cfg.chunk
  n = pl.program_id(2)
  base = pl.multiple_of(n * c, c)
  f32 = lambda x: x.astype(jnp.float32)
  q, k, v = f32(q_ref[...]), f32(k_ref[...]), f32(v_ref[...])
  do, beta = f32(do_ref[...]), f32(beta_ref[...])
  st, dst = st_ref[...], dst_ref[...]
  b = b_ref[...] if b_ref is not None else None
  r = reads = feeds = None
  keeps = True
  if r_ref is not None:
    r_prev = kc.load_scalar(r_ref, jnp.maximum(base - 1, 0))
    r, _, reads, feeds, keeps = fl.chunk_segments(cfg, r_ref, base, r_prev)
  rows, cols = jnp.arange(c)[:, None], jnp.arange(c)[None, :]
  incl = cols <= rows
  if r is not None:
    incl = incl & kc.same_segment(r, r)
  strict = incl & (cols < rows)
  decay = (jnp.where(incl, 1.0, 0.0) if b is None
           else kc.neg_inf_exp(incl, b[:, None] - b[None, :]))
  kk = _mm32(cfg, k, k, trans_b=True)
  g_mat = jnp.where(strict, decay * kk, 0.0)
  t_inv = unit_lower_inverse(cfg, beta[:, None] * g_mat)
  gam = jnp.ones((c,), jnp.float32) if b is None else jnp.exp(b)
  if reads is not None:
    gam = jnp.where(reads, gam, 0.0)
  x_u = beta[:, None] * v
  x_w = (beta * gam)[:, None] * k
  w = _mm32(cfg, t_inv, x_w)
  u = _mm32(cfg, t_inv, x_u) - _mm32(cfg, w, st, trans_b=True)          # [C, V]
  qk = _mm32(cfg, q, k, trans_b=True)
  p = qk * decay
  b_last = None if b is None else jnp.max(jnp.where(jnp.arange(c) == c - 1, b, -jnp.inf))
  k_fac = jnp.ones((c,), jnp.float32) if b is None else jnp.exp(b_last - b)
  if feeds is not None:
    k_fac = jnp.where(feeds, k_fac, 0.0)
  k_state = k * k_fac[:, None]

  du = _mm32(cfg, k_state, dst, trans_b=True) + cfg.scale * _mm32(cfg, p, do, trans_a=True)
  dp = jnp.where(incl, cfg.scale * _mm32(cfg, do, u, trans_b=True), 0.0)
  dqk = dp * decay
  do_s = _mm32(cfg, do, st)                                               # do S^T  [C, K]
  dq = cfg.scale * do_s * gam[:, None] + _mm32(cfg, dqk, k)
  dgam = cfg.scale * jnp.sum(q * do_s, axis=1)
  dk_state = _mm32(cfg, u, dst)                                          # [C, K]
  dw = -_mm32(cfg, du, st)
  dx_u = _mm32(cfg, t_inv, du, trans_a=True)
  dx_w = _mm32(cfg, t_inv, dw, trans_a=True)
  dt = _mm32(cfg, du, x_u, trans_b=True) + _mm32(cfg, dw, x_w, trans_b=True)
  da = jnp.where(strict, -_mm32(cfg, _mm32(cfg, t_inv, dt, trans_a=True), t_inv, trans_b=True),
                 0.0)
  dg_mat = da * beta[:, None]
  dkk = dg_mat * decay
  xw_k = jnp.sum(dx_w * k, axis=1)
  dbeta = jnp.sum(da * g_mat, axis=1) + jnp.sum(dx_u * v, axis=1) + gam * xw_k
  dgam = dgam + beta * xw_k
  dk = (_mm32(cfg, dqk, q, trans_a=True) + _mm32(cfg, dkk, k) + _mm32(cfg, dkk, k, trans_a=True)
        + (beta * gam)[:, None] * dx_w + dk_state * k_fac[:, None])
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = (beta[:, None] * dx_u).astype(dv_ref.dtype)
  dbeta_ref[...] = dbeta
  if db_ref is not None:
    ddiff = (dp * qk + dg_mat * kk) * decay                               # d / d(b_i - b_j)
    e_state = jnp.sum(dk_state * k_state, axis=1)                         # d / d(b_C - b_t)
    alpha = jnp.exp(b_last)
    if keeps is not True:
      alpha = jnp.where(keeps, alpha, 0.0)
    # Two one-axis sums: Triton's lowering of a 2-D -> 0-D reduce fails under an abstract mesh.
    d_last = jnp.sum(e_state) + alpha * jnp.sum(jnp.sum(st * dst, axis=1))
    db = (jnp.sum(ddiff, axis=1) - jnp.sum(ddiff, axis=0) + dgam * gam - e_state
          + jnp.where(jnp.arange(c) == c - 1, d_last, 0.0))
    db_ref[...] = db


def _chunk_grad_call(cfg, *, q, k, v, b, r, beta, do, st, dst, batch, heads, kdim, dv, seq_len,
                     interpret, num_warps=4, num_stages=2):
  """Chunk-parallel local gradients: (dq, dk, dv, dbeta[, db]) on the padded layout."""
  c = cfg.chunk
  rows = lambda width: pl.BlockSpec((None, c, None, width), lambda bi, hi, ni: (bi, ni, hi, 0))
  per_step = pl.BlockSpec((None, c, None), lambda bi, hi, ni: (bi, ni, hi))
  state = pl.BlockSpec((None, None, dv, kdim), lambda bi, hi, ni: (bi, hi, ni, 0))
  specs, inputs = [rows(kdim), rows(kdim), rows(dv)], [q, k, v]
  if b is not None:
    specs.append(per_step); inputs.append(b)
  if r is not None:
    specs.append(pl.BlockSpec((None, seq_len), lambda bi, hi, ni: (bi, 0))); inputs.append(r)
  specs += [per_step, rows(dv), state, state]
  inputs += [beta, do, st, dst]
  out_specs = [rows(kdim), rows(kdim), rows(dv), per_step]
  out_shape = [jax.ShapeDtypeStruct((batch, seq_len, heads, kdim), jnp.float32),
               jax.ShapeDtypeStruct((batch, seq_len, heads, kdim), jnp.float32),
               jax.ShapeDtypeStruct((batch, seq_len, heads, dv), jnp.float32),
               jax.ShapeDtypeStruct((batch, seq_len, heads), jnp.float32)]
  if b is not None:
    out_specs.append(per_step)
    out_shape.append(jax.ShapeDtypeStruct((batch, seq_len, heads), jnp.float32))
  return pl.pallas_call(
      functools.partial(_delta_chunk_grad_kernel, cfg=cfg),
      grid=(batch, heads, cfg.num_chunks),
      in_specs=specs, out_specs=tuple(out_specs), out_shape=tuple(out_shape),
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="delta_rule_bwd_chunk",
  )(*inputs)


@dataclasses.dataclass(frozen=True)
class _Prepared:
  cfg: KernelConfig
  inputs: tuple           # q, k, v[, b][, r][, h0t], beta: padded kernel inputs
  kp: int
  dvp: int
  tp: int


def _prepare(q, k, v, beta, log_decay, h0, segment_ids, *, scale, chunk_size):
  batch, seq_len, heads, dk = q.shape
  dv = v.shape[-1]
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
  kp = max(MIN_TILE, next_power_of_2(dk))
  dvp = max(MIN_TILE, next_power_of_2(dv))
  c = min(chunk_size, max(MIN_TILE, next_power_of_2(seq_len)))
  tp = -(-seq_len // c) * c
  pad_t = lambda x: _pad_axis(x, 1, tp)
  inputs = [_pad_axis(pad_t(q.astype(dtype)), 3, kp), _pad_axis(pad_t(k.astype(dtype)), 3, kp),
            _pad_axis(pad_t(v.astype(dtype)), 3, dvp)]
  gate = "none"
  if log_decay is not None:
    inputs.append(_chunk_cumsum(pad_t(_clamped_gate(log_decay, batch, seq_len)), c))
    gate = "scalar"
  if segment_ids is not None:
    inputs.append(_pad_axis(reset_ids(segment_ids), 1, tp, mode="edge"))
  if h0 is not None:
    inputs.append(_pad_axis(_pad_axis(h0.astype(jnp.float32), 2, kp), 3, dvp).swapaxes(2, 3))
  inputs.append(pad_t(beta.astype(jnp.float32)))
  cfg = KernelConfig(gate=gate, has_segments=segment_ids is not None,
                     has_initial_state=h0 is not None, scale=scale, chunk=c, sub_chunk=c,
                     num_chunks=tp // c, mm_dtype=jnp.dtype(dtype).name)
  return _Prepared(cfg=cfg, inputs=tuple(inputs), kp=kp, dvp=dvp, tp=tp)


def _clamped_gate(log_decay, batch, seq_len):
  g = jnp.maximum(log_decay.astype(jnp.float32), LOG_DECAY_FLOOR)
  if g.ndim == 1:
    g = jnp.broadcast_to(g, (batch, seq_len) + g.shape)
  return g


def _kernel_forward(q, k, v, beta, log_decay, h0, segment_ids, *, scale, chunk_size, interpret,
                    save_states=False):
  """(o, final state[, padded value-first states entering each chunk `[B, H, N * Dvp, Kp]`])."""
  batch, seq_len, heads, dk = q.shape
  dv = v.shape[-1]
  prep = _prepare(q, k, v, beta, log_decay, h0, segment_ids, scale=scale, chunk_size=chunk_size)
  out = _delta_forward_call(prep.cfg, inputs=prep.inputs, batch=batch, heads=heads, kdim=prep.kp,
                            dv=prep.dvp, seq_len=prep.tp, out_dtype=prep.inputs[0].dtype,
                            interpret=interpret, save_states=save_states)
  o, ht = out[0][:, :seq_len, :, :dv], out[1].swapaxes(2, 3)[:, :, :dk, :dv]
  if not save_states:
    return o, ht
  return o, ht, out[2]


def _to_chunks(x, tp, c):
  """[B, T, H, ...] -> [B, H, N, C, ...] float32, zero-padded to Tp rows."""
  x = _pad_axis(x.astype(jnp.float32), 1, tp)
  b, _, h = x.shape[:3]
  x = x.reshape((b, tp // c, c, h) + x.shape[3:])
  return jnp.moveaxis(x, 3, 1)


def _chunk_local(q, k, v, beta, log_decay, s_prev, *, segment_ids, scale, c):
  """Every chunk at once, given the states entering them: (o `[B, T, H, Dv]`, the states
  leaving them `[B, H, N, Dk, Dv]`). The same algebra and masks as `_delta_forward_kernel`, in
  plain JAX, so its VJP (with the leaving-state cotangents from the reverse-time kernel) gives
  every chunk's dq, dk, dv, dbeta, dgate and d(entering state) in parallel over chunks."""
  batch, seq_len, heads, _ = q.shape
  n = s_prev.shape[2]
  tp = n * c
  qc, kc_, vc = (_to_chunks(x, tp, c) for x in (q, k, v))       # [B, H, N, C, D]
  bt = _to_chunks(beta, tp, c)                                    # [B, H, N, C]
  incl = jnp.tril(jnp.ones((c, c), bool))
  reads = feeds = keeps = None
  if segment_ids is not None:
    r = _pad_axis(reset_ids(segment_ids), 1, tp, mode="edge").reshape(batch, 1, n, c)
    r_prev = jnp.concatenate([r[:, :, :1, 0], r[:, :, :-1, -1]], axis=2)[..., None]
    incl = incl & (r[..., :, None] == r[..., None, :])
    reads, feeds = r == r_prev, r == r[..., -1:]
    keeps = (r[..., -1] == r_prev[..., 0])[..., None, None]
  strict = incl & ~jnp.eye(c, dtype=bool)
  if log_decay is None:
    decay = jnp.where(incl, 1.0, 0.0)
    gam = jnp.ones(bt.shape)
    k_state, alpha = kc_, 1.0
  else:
    bcum = jnp.cumsum(_to_chunks(_clamped_gate(log_decay, batch, seq_len), tp, c), axis=-1)
    decay = jnp.exp(jnp.where(incl, bcum[..., :, None] - bcum[..., None, :], -jnp.inf))
    gam = jnp.exp(bcum)
    k_state = kc_ * jnp.exp(bcum[..., -1:] - bcum)[..., None]
    alpha = jnp.exp(bcum[..., -1])[..., None, None]
  if reads is not None:
    gam = jnp.where(reads, gam, 0.0)
    k_state = jnp.where(feeds[..., None], k_state, 0.0)
    alpha = jnp.where(keeps, alpha, 0.0)
  mm = functools.partial(jnp.einsum, precision=lax.Precision.HIGHEST)
  a = jnp.where(strict, bt[..., None] * decay * mm("...id,...jd->...ij", kc_, kc_), 0.0)
  eye = jnp.broadcast_to(jnp.eye(c), a.shape)
  t_inv = jax.scipy.linalg.solve_triangular(eye + a, eye, lower=True, unit_diagonal=True)
  w = mm("...ij,...jd->...id", t_inv, (bt * gam)[..., None] * kc_)
  u = mm("...ij,...jd->...id", t_inv, bt[..., None] * vc) - mm("...ck,...kv->...cv", w, s_prev)
  scores = mm("...id,...jd->...ij", qc, kc_) * decay
  o = scale * (mm("...ck,...kv->...cv", qc * gam[..., None], s_prev)
               + mm("...ij,...jv->...iv", scores, u))
  s_next = alpha * s_prev + mm("...ck,...cv->...kv", k_state, u)
  o = jnp.moveaxis(o, 1, 3).reshape(batch, tp, heads, -1)[:, :seq_len]
  return o, s_next


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _delta(q, k, v, beta, log_decay, h0, segment_ids, scale, chunk_size, interpret, backward):
  return _kernel_forward(q, k, v, beta, log_decay, h0, segment_ids, scale=scale,
                         chunk_size=chunk_size, interpret=interpret)


def _delta_fwd(q, k, v, beta, log_decay, h0, segment_ids, scale, chunk_size, interpret, backward):
  o, ht, hs = _kernel_forward(q, k, v, beta, log_decay, h0, segment_ids, scale=scale,
                              chunk_size=chunk_size, interpret=interpret, save_states=True)
  return (o, ht), (q, k, v, beta, log_decay, h0, segment_ids, hs)


def _delta_bwd(scale, chunk_size, interpret, backward, res, cts):
  q, k, v, beta, log_decay, h0, segment_ids, hs = res
  do, dht = cts
  batch, seq_len, heads, dk = q.shape
  dv = v.shape[-1]
  prep = _prepare(q, k, v, beta, log_decay, h0, segment_ids, scale=scale, chunk_size=chunk_size)
  cfg = prep.cfg
  q_p, k_p, v_p = prep.inputs[:3]
  b_p = prep.inputs[3] if cfg.gate != "none" else None
  r_p = prep.inputs[3 + (cfg.gate != "none")] if cfg.has_segments else None
  do_p = _pad_axis(_pad_axis(do.astype(q_p.dtype), 1, prep.tp), 3, prep.dvp)
  dht_p = _pad_axis(_pad_axis(dht.astype(jnp.float32), 2, prep.kp), 3, prep.dvp).swapaxes(2, 3)
  dims = dict(batch=batch, heads=heads, kdim=prep.kp, dv=prep.dvp, seq_len=prep.tp,
              interpret=interpret)
  dsn, dh0t = _state_grad_call(cfg, q=q_p, k=k_p, b=b_p, r=r_p, beta=prep.inputs[-1], do=do_p,
                               dht=dht_p, **dims)
  dh0 = None if h0 is None else dh0t.swapaxes(2, 3)[:, :, :dk, :dv].astype(h0.dtype)
  if backward == "xla":
    grads = _local_grads_xla(q, k, v, beta, log_decay, segment_ids, hs, dsn, do, scale=scale,
                             cfg=cfg, prep=prep)
  else:
    outs = _chunk_grad_call(cfg, q=q_p, k=k_p, v=v_p, b=b_p, r=r_p, beta=prep.inputs[-1],
                            do=do_p, st=hs, dst=dsn, **dims)
    dq, dk_, dv_, dbeta = (outs[0][:, :seq_len, :, :dk], outs[1][:, :seq_len, :, :dk],
                           outs[2][:, :seq_len, :, :dv], outs[3][:, :seq_len])
    dg = None
    if log_decay is not None:
      # d/db -> d/dg: b is the within-chunk cumulative sum of the clamped, padded gate.
      db = outs[4].reshape(batch, cfg.num_chunks, cfg.chunk, heads)
      dg_p = jnp.flip(jnp.cumsum(jnp.flip(db, axis=2), axis=2), axis=2).reshape(outs[4].shape)
      _, gate_vjp = jax.vjp(
          lambda ld: _pad_axis(_clamped_gate(ld, batch, seq_len), 1, prep.tp), log_decay)
      (dg,) = gate_vjp(dg_p)
    grads = (dq, dk_, dv_, dbeta, dg)
  dq, dk_, dv_, dbeta, dg = grads
  return (dq.astype(q.dtype), dk_.astype(k.dtype), dv_.astype(v.dtype), dbeta.astype(beta.dtype),
          None if log_decay is None else dg.astype(log_decay.dtype), dh0, None)


def _local_grads_xla(q, k, v, beta, log_decay, segment_ids, hs, dsn, do, *, scale, cfg, prep):
  """The chunk-parallel gradients as the VJP of `_chunk_local` (the `backward="xla"` path)."""
  batch, _, heads, dk = q.shape
  dv = v.shape[-1]
  unpad = lambda x: x.reshape(batch, heads, cfg.num_chunks, prep.dvp, prep.kp)[
      ..., :dv, :dk].swapaxes(3, 4)
  local = functools.partial(_chunk_local, segment_ids=segment_ids, scale=scale, c=cfg.chunk)
  _, vjp = jax.vjp(local, q, k, v, beta, log_decay, unpad(hs))
  dq, dk_, dv_, dbeta, dg, _ = vjp((do.astype(jnp.float32), unpad(dsn)))
  return dq, dk_, dv_, dbeta, dg


_delta.defvjp(_delta_fwd, _delta_bwd)


def chunked_delta_rule(q, k, v, beta, *, log_decay=None, scale=None, initial_state=None,
                       output_final_state=False, segment_ids=None, chunk_size=64,
                       interpret=None, backward="pallas"):
  """Gated delta rule, chunked: `(o [B, T, H, Dv] in q.dtype, final state or None)`.

  See the module docstring; same contract as `attnjax.ops.linear.delta.delta_rule`.
  `backward`: "pallas" (reverse-state kernel + chunk-parallel gradient kernel) or "xla" (the
  same reverse-state kernel + the VJP of the plain-JAX chunk algebra, a cross-check).
  """
  if backward not in ("pallas", "xla"):
    raise ValueError(f"backward must be 'pallas' or 'xla', got {backward!r}")
  if q.ndim != 4 or k.shape != q.shape:
    raise ValueError(f"q, k must be [B, T, H, Dk] of the same shape, got {q.shape}, {k.shape}")
  b, t, h, dk = q.shape
  if v.ndim != 4 or v.shape[:3] != (b, t, h):
    raise ValueError(f"v must be [B, T, H, Dv] with [B, T, H] = {(b, t, h)}, got {v.shape}")
  if beta.shape != (b, t, h):
    raise ValueError(f"beta must be [B, T, H] = {(b, t, h)}, got {beta.shape}")
  if log_decay is not None and log_decay.shape not in ((h,), (b, t, h)):
    raise ValueError(f"log_decay must be None, [H] or [B, T, H] = {(h,)}, {(b, t, h)} for the "
                     f"delta rule, got {log_decay.shape}")
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
  if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
    raise ValueError(f"initial_state must be [B, H, Dk, Dv] = {(b, h, dk, v.shape[-1])}, "
                     f"got {initial_state.shape}")
  if chunk_size < MIN_TILE or next_power_of_2(chunk_size) != chunk_size:
    raise ValueError(f"chunk_size must be a power of two >= {MIN_TILE}, got {chunk_size}")
  scale = float(dk ** -0.5 if scale is None else scale)
  h0 = None if initial_state is None else initial_state.astype(jnp.float32)
  o, s = _delta(q, k, v, beta, log_decay, h0, segment_ids, scale, chunk_size,
                common.resolve_interpret(interpret), backward)
  return o.astype(q.dtype), (s if output_final_state else None)
