"""Public entry point: chunked linear attention with decay as Pallas (Triton) kernels.

`chunked_linear_attention(q, k, v, ...)` computes, on `[B, T, H, D]` inputs,

  S_t = exp(g_t) (.) S_{t-1} + k_t^T v_t ,   o_t = scale * q_t S_t ,

with the state S `[B, H, Dk, Dv]` in float32 and log-space gates g_t <= 0 given as `log_decay`:
None (plain linear attention), `[H]` (fixed per-head decay, Lightning / RetNet), `[B, T, H]`
(data-dependent scalar per head and step, Mamba-2 / simple GLA) or `[B, T, H, Dk]`
(per-key-dimension, GLA). `segment_ids [B, T]` packs several sequences per row: the state resets
where the id changes (the reading of the linear-family engine; ids need not be sorted, an id that
does not occur is an empty segment). `initial_state` feeds the first segment of each row and the
returned final state is the state after the last token, i.e. of the last segment.

`normalize=True` adds the normaliser state z_t = exp(g_t) (.) z_{t-1} + k_t and returns
o_t / (scale * q_t . z_t + eps) (eps = 1e-10, the linear-family engine's); it is computed by the
same kernel with a column of ones appended to v (so z is carried exactly like S), and the returned
state is then the pair (S, z). `causal=False` gives every query the whole state of its segment (one full state per
segment, the non-causal/vision reading), with no decay allowed.

Gradients go through `jax.custom_vjp`: one kernel re-runs the forward chunk loop for dq, one runs
the chunk loop backwards in time for dk, dv and d(initial state); the gate gradient uses the
identity dG_t = q_t (.) dq_t - k_t (.) dk_t (G the cumulative log-gate, plus the final-state term
at the last step), reverse-cumulated over time, so the kernels never differentiate through exp.
Inputs D not powers of two (or < 16) are zero-padded; T is padded to a multiple of the chunk.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common
from pallas_kernels.linear import backward as bwd_lib
from pallas_kernels.linear import forward as fwd_lib
from pallas_kernels.linear.block_sizes import DEFAULT, MIN_TILE, BlockSizes, next_power_of_2
from pallas_kernels.linear.kernel_common import KernelConfig

NORMALIZE_EPS = 1e-10  # = attnjax.ops.linear.engine.NORMALIZE_EPS, so both paths agree
# Log-gates below this are clamped: exp(-40) = 4e-18 is below float32 resolution next to any O(1)
# update, so the result is unchanged, while the chunk-relative cumulative sums stay <= 40 * chunk in
# magnitude and their differences keep ~1e-4 absolute accuracy (a -1e4 logit would otherwise make
# every later difference in the chunk lose ~1e-3).
LOG_DECAY_FLOOR = -40.0


@dataclasses.dataclass(frozen=True)
class _Static:
  cfg: KernelConfig
  block_v: int
  num_warps: int
  num_stages: int
  interpret: bool
  out_dtype: str


def _pad_axis(x, axis, size, mode="constant"):
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, mode=mode)


def _chunk_cumsum(g, chunk):
  """Cumulative sum of g over time restarting at every chunk (float32), g: [B, Tp, H(, K)]."""
  b, tp = g.shape[:2]
  gc = g.reshape((b, tp // chunk, chunk) + g.shape[2:])
  return jnp.cumsum(gc, axis=2).reshape(g.shape)


def reset_ids(segment_ids):
  """`[B, T]` int32: number of segment starts strictly after position 0 up to t (monotone)."""
  starts = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros_like(starts[:, :1], jnp.int32),
                          jnp.cumsum(starts, axis=1, dtype=jnp.int32)], axis=1)


# ------------------------------------------------------------------------------------------
# The differentiable core on padded arrays.
#   q, k: [B, Tp, H, Kp]; v: [B, Tp, H, Dvp]; g: None | [B, Tp, H] | [B, Tp, H, Kp] float32;
#   h0t: None | [B, H, Dvp, Kp] float32 (value-first); r: None | [B, Tp] int32.
# Returns o [B, Tp, H, Dvp] (q.dtype) and the final state, value-first, float32.
# ------------------------------------------------------------------------------------------


def _kernel_inputs(st: _Static, q, k, v, g, r, h0t):
  inputs = [q, k, v]
  if g is not None:
    inputs.append(_chunk_cumsum(g, st.cfg.chunk))
  if r is not None:
    inputs.append(r)
  if h0t is not None:
    inputs.append(h0t)
  return inputs


def _forward(st: _Static, q, k, v, g, r, h0t):
  batch, tp, heads, kdim = q.shape
  return fwd_lib.forward_call(
      st.cfg, batch=batch, heads=heads, kdim=kdim, dv=v.shape[-1], block_v=st.block_v,
      seq_len=tp, out_dtype=jnp.dtype(st.out_dtype), num_warps=st.num_warps,
      num_stages=st.num_stages, interpret=st.interpret,
      inputs=_kernel_inputs(st, q, k, v, g, r, h0t))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st: _Static, q, k, v, g, r, h0t):
  return _forward(st, q, k, v, g, r, h0t)


def _core_fwd(st: _Static, q, k, v, g, r, h0t):
  o, ht = _forward(st, q, k, v, g, r, h0t)
  return (o, ht), (q, k, v, g, r, h0t)


def _core_bwd(st: _Static, res, cts):
  q, k, v, g, r, h0t = res
  do, dht = cts
  batch, tp, heads, kdim = q.shape
  inputs = _kernel_inputs(st, q, k, v, g, r, h0t)
  common = dict(batch=batch, heads=heads, kdim=kdim, dv=v.shape[-1], block_v=st.block_v,
                seq_len=tp, num_warps=st.num_warps, num_stages=st.num_stages,
                interpret=st.interpret)
  do = do.astype(q.dtype)
  dk, dv, dh0t, ds = bwd_lib.dkv_call(st.cfg, inputs=inputs, do=do,
                                      dht=dht.astype(jnp.float32), **common)
  dq, u = bwd_lib.dq_call(st.cfg, inputs=inputs, do=do, ds=ds, **common)
  dg = None
  if g is not None:
    dg = _gate_grad(st.cfg, q, k, dq, dk, u)
  dh0 = dh0t if h0t is not None else None
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dg, None, dh0)


_core.defvjp(_core_fwd, _core_bwd)


def _gate_grad(cfg: KernelConfig, q, k, dq, dk, u):
  """d loss / d g from dq, dk and the chunk-boundary terms u `[B, H, N, K]`.

  Inside chunk n, with b the chunk-relative cumulative gate, d loss / d b_t = q_t dq_t - k_t dk_t
  (+ u_n at the chunk's last row, u_n = sum_v dS_n S_n for the state leaving the chunk), and
  dg_t = sum_{t <= s in chunk} d loss / d b_s. Taking the cross-chunk part from u_n instead of a
  reverse cumsum over the whole sequence keeps bf16 rounding of far-apart terms from piling up.
  """
  batch, tp, heads, kdim = q.shape
  c, n = cfg.chunk, cfg.num_chunks
  db = q.astype(jnp.float32) * dq - k.astype(jnp.float32) * dk          # [B, Tp, H, K]
  db = db.reshape(batch, n, c, heads, kdim)
  db = db.at[:, :, c - 1].add(u.transpose(0, 2, 1, 3))
  if cfg.gate == "scalar":
    db = jnp.sum(db, axis=-1)
  dg = jnp.flip(jnp.cumsum(jnp.flip(db, axis=2), axis=2), axis=2)
  return dg.reshape((batch, tp, heads) + db.shape[4:])


# ------------------------------------------------------------------------------------------
# Public API.
# ------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, log_decay, initial_state, segment_ids, normalize):
  if q.ndim != 4:
    raise ValueError(f"q must be [B, T, H, Dk], got shape {q.shape}")
  b, t, h, dk = q.shape
  if k.shape != q.shape:
    raise ValueError(f"k must have q's shape [B, T, H, Dk] = {q.shape}, got {k.shape}")
  if v.ndim != 4 or v.shape[:3] != (b, t, h):
    raise ValueError(f"v must be [B, T, H, Dv] with [B, T, H] = {(b, t, h)}, got {v.shape}")
  if log_decay is not None and log_decay.shape not in ((h,), (b, t, h), (b, t, h, dk)):
    raise ValueError("log_decay must be None, [H], [B, T, H] or [B, T, H, Dk] = "
                     f"{(h,)}, {(b, t, h)}, {(b, t, h, dk)}; got {log_decay.shape}")
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
  if initial_state is not None:
    s = initial_state[0] if normalize else initial_state
    if s.shape != (b, h, dk, v.shape[-1]):
      raise ValueError(f"initial_state must be [B, H, Dk, Dv] = {(b, h, dk, v.shape[-1])}, "
                       f"got {s.shape}")
    if normalize and initial_state[1].shape != (b, h, dk):
      raise ValueError(f"the normaliser initial state must be [B, H, Dk] = {(b, h, dk)}, "
                       f"got {initial_state[1].shape}")


def chunked_linear_attention(q, k, v, *, log_decay=None, scale=None, normalize=False,
                             causal=True, initial_state=None, output_final_state=False,
                             segment_ids=None, chunk_size=64, interpret=None,
                             block_sizes: BlockSizes | None = None):
  """Chunked linear attention with decay and gates on `[B, T, H, D]` (see the module docstring).

  Returns `(o [B, T, H, Dv] in q.dtype, final_state or None)`; the final state is float32
  `[B, H, Dk, Dv]` (a pair with the normaliser `[B, H, Dk]` when normalize=True).
  `block_sizes` overrides `chunk_size` and the other tiles (see `block_sizes.BlockSizes`).
  """
  _check_inputs(q, k, v, log_decay, initial_state, segment_ids, normalize)
  if not causal and log_decay is not None:
    raise ValueError("log_decay must be None when causal=False: a decay has no direction in the "
                     "non-causal (one full state per segment) form")
  dk, dv = q.shape[-1], v.shape[-1]
  scale = float(dk ** -0.5 if scale is None else scale)
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
  q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
  h0 = initial_state
  if normalize:
    v = jnp.concatenate([v, jnp.ones(v.shape[:3] + (1,), dtype)], axis=-1)
    if initial_state is not None:
      h0 = jnp.concatenate([initial_state[0], initial_state[1][..., None]], axis=-1)
  sizes = block_sizes or dataclasses.replace(DEFAULT, chunk=chunk_size)
  # Outputs that are combined afterwards (normaliser division, two non-causal passes) stay f32.
  out_dtype = jnp.float32 if (normalize or not causal) else dtype
  run = functools.partial(_causal_pass, scale=scale, sizes=sizes, out_dtype=out_dtype,
                          interpret=common.resolve_interpret(interpret))
  o, state = run(q, k, v, log_decay, h0, segment_ids)
  if not causal:
    # Whole segment = keys <= t (forward pass) + keys >= t (pass on the time-reversed sequence)
    # - the key t counted twice. The initial state feeds the first segment once, via the forward.
    flip = lambda x: None if x is None else jnp.flip(x, axis=1)
    o_rev, _ = run(flip(q), flip(k), flip(v), None, None, flip(segment_ids))
    self_term = scale * jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), axis=-1)
    o = o + flip(o_rev) - self_term[..., None] * v.astype(jnp.float32)
  if normalize:
    o = o[..., :dv] / (o[..., dv:] + NORMALIZE_EPS)
    state = (state[..., :dv], state[..., dv])
  return o.astype(q.dtype), (state if output_final_state else None)


def _causal_pass(q, k, v, log_decay, h0, segment_ids, *, scale, sizes, out_dtype, interpret):
  """Pads to kernel shapes, runs the custom_vjp core, un-pads: (o, final state [B,H,Dk,Dv])."""
  batch, seq_len, heads, dk = q.shape
  dv = v.shape[-1]
  kp = max(MIN_TILE, next_power_of_2(dk))
  dvp = max(MIN_TILE, next_power_of_2(dv))
  sizes = sizes.resolve(seq_len, dvp)
  c = sizes.chunk
  tp = -(-seq_len // c) * c

  gate = "none"
  g = None
  if log_decay is not None:
    g = jnp.maximum(log_decay.astype(jnp.float32), LOG_DECAY_FLOOR)
    if g.ndim == 1:
      g = jnp.broadcast_to(g, (batch, seq_len, heads))
    gate = "scalar" if g.ndim == 3 else "vector"
    g = _pad_axis(g, 1, tp)
    if gate == "vector":
      g = _pad_axis(g, 3, kp)
  r = None
  if segment_ids is not None:
    r = _pad_axis(reset_ids(segment_ids), 1, tp, mode="edge")

  qp = _pad_axis(_pad_axis(q, 1, tp), 3, kp)
  kp_arr = _pad_axis(_pad_axis(k, 1, tp), 3, kp)
  vp = _pad_axis(_pad_axis(v, 1, tp), 3, dvp)
  h0t = None
  if h0 is not None:
    h0t = _pad_axis(_pad_axis(h0.astype(jnp.float32), 2, kp), 3, dvp).swapaxes(2, 3)

  cfg = KernelConfig(gate=gate, has_segments=r is not None, has_initial_state=h0t is not None,
                     scale=scale, chunk=c, sub_chunk=sizes.sub_chunk, num_chunks=tp // c,
                     mm_dtype=jnp.dtype(q.dtype).name)
  st = _Static(cfg=cfg, block_v=sizes.block_v, num_warps=sizes.num_warps,
               num_stages=sizes.num_stages, interpret=interpret,
               out_dtype=jnp.dtype(out_dtype).name)
  o, ht = _core(st, qp, kp_arr, vp, g, r, h0t)
  return o[:, :seq_len, :, :dv], ht.swapaxes(2, 3)[:, :, :dk, :dv]
