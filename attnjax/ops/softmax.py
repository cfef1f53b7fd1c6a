"""The softmax attention engine: one signature, four implementations.

`dot_product_attention` computes, per batch b, query head h and query i,

  s_ij = score_mod(scale * q_i . k_j) + bias_ij - alibi_h * rel_ij,   j visible to i,
  o_i  = sum_j exp(s_ij) v_j / (exp(sink_h) + sum_j exp(s_ij)),  lse_i = log(exp(sink_h) + sum_j exp(s_ij)),

with `score_mod` the optional soft-cap `c * tanh(x / c)`. Implementations:

* `"reference"`: materialises the `[B, H, Tq, Tk]` scores in float32; the oracle for the others,
  differentiable in every floating argument by plain autodiff.
* `"xla"`: FlashAttention's tiled online softmax written in `jnp` (query blocks x key blocks,
  visiting only the block pairs that `attnjax.ops.layout.band_layout` lists for causal / window),
  with a `jax.custom_vjp` backward that
  recomputes each block from `(q, k, v, o, lse)`. Scores live one `[bq, bk]` tile at a time, so
  memory is O(T) (plus any dense mask / bias the caller passes) instead of O(Tq * Tk). Supports
  every option; gradients flow to q, k, v, bias, sinks and alibi_slopes. Reverse-mode only (no
  `jax.jvp`); use "reference" for forward-mode or higher-order derivatives.
* `"cudnn"`: `jax.nn.dot_product_attention(implementation="cudnn")` on a CUDA GPU, for the calls it
  can serve (see `unsupported_reason`).
* `"pallas"`: the block-sparse flash kernel `pallas_kernels.flash.api.flash_attention` (Pallas
  Triton, custom-VJP backward), for calls without a dense `mask`/`bias` and with float32 / bf16 / fp16
  inputs of one dtype, D, Dv <= 256. Compiled on a GPU; in interpret mode (slow, for tests) elsewhere.
  Gradients flow to q, k, v, sinks and alibi_slopes, and through the returned lse.

`implementation=None` picks cudnn when it can serve the call on a CUDA GPU (its fused kernels are
the faster path where they apply); else, for long key sequences (Tk >= `AUTO_XLA_MIN_KV_LEN`),
pallas on a CUDA GPU when it can serve the call (sliding windows included), else xla; else
reference (`choose_implementation(None, call, backend)` says which and
why, for any backend). Pallas is never picked on CPU, where it would run in the interpreter. An
explicit choice that cannot serve the call raises `ValueError` with the reason; nothing falls back
silently. The vocabulary is shared by every op (`attnjax.ops.dispatch`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.ops import dispatch
from attnjax.ops import layout as layout_lib
from attnjax.ops import masks as masks_lib
from attnjax.ops import validation

IMPLEMENTATIONS = ("reference", "xla", "cudnn", "pallas")
PALLAS_DTYPES = dispatch.PALLAS_DTYPES
PALLAS_MAX_HEAD_DIM = 256
DEFAULT_BLOCK_SIZE = 512
DEFAULT_QUERY_BLOCK_SIZE = 512
# From benchmarks/softmax_cpu.md (B=1, H=4, D=64): at T=512 the materialised reference is as fast
# as the tiled path (faster for fwd+bwd); from T=1024 the tiled path is faster and far leaner.
AUTO_XLA_MIN_KV_LEN = 1024


def alibi_slopes(num_heads: int) -> jnp.ndarray:
  """ALiBi's geometric per-head slopes `[H]` (Press et al.): `2 ** (-8 i / n)`, i = 1..n.

  For H not a power of two, the paper's recipe: the slopes of the largest power of two n <= H,
  then every other slope of 2n until H slopes are listed.
  """
  if num_heads <= 0:
    raise ValueError(f"num_heads must be > 0, got {num_heads}")

  def geometric(n):
    return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

  n = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = geometric(n)
  if n < num_heads:
    slopes += geometric(2 * n)[0::2][: num_heads - n]
  return jnp.asarray(slopes, jnp.float32)


def available_implementations() -> tuple[str, ...]:
  """Implementations that run natively on the default backend (cudnn and pallas on a CUDA GPU).

  "pallas" also runs elsewhere when asked for explicitly, in interpret mode (for tests only).
  """
  impls = ("reference", "xla")
  if _on_cuda_gpu():
    impls += ("cudnn", "pallas")
  return impls


_on_cuda_gpu = dispatch.on_cuda_gpu


def _backend(backend: str | None) -> str:
  """`backend`, or the current one ("gpu" on a CUDA GPU; looked up here so tests can patch it)."""
  if backend is None:
    return "gpu" if _on_cuda_gpu() else dispatch.current_backend()
  return dispatch.resolve_backend(backend)


@dataclasses.dataclass(frozen=True)
class _Call:
  """Static description of one call, used to choose an implementation."""
  dtype: str
  tq: int
  tk: int
  hq: int
  hk: int
  d: int
  dv: int
  causal: bool
  window: tuple | None
  has_mask: bool
  has_bias: bool
  has_segments: bool
  softcap: float | None
  has_sinks: bool
  has_alibi: bool
  return_lse: bool


def unsupported_reason(implementation: str, call: _Call, backend: str | None = None) -> str | None:
  """Why `implementation` cannot serve `call` on `backend` (default: the current one), or None."""
  if implementation in ("reference", "xla"):
    return None
  if implementation == "pallas":
    return _pallas_unsupported_reason(call)
  if implementation != "cudnn":
    return f"unknown implementation {implementation!r}; choose from {IMPLEMENTATIONS} or None"
  backend = _backend(backend)
  if backend != "gpu":
    return f"cudnn needs a CUDA GPU backend, the backend is {backend!r}"
  if call.dtype not in ("bfloat16", "float16"):
    return f"cudnn supports bfloat16/float16 inputs, got {call.dtype}"
  if call.d != call.dv or call.d % 8 or call.d > 128:
    return f"cudnn needs D == Dv, a multiple of 8 and <= 128, got D={call.d}, Dv={call.dv}"
  if call.softcap is not None or call.has_sinks or call.has_alibi:
    return "cudnn path does not support softcap, sinks or alibi_slopes"
  if call.return_lse:
    # jax returns cudnn's log-sum-exp in the output dtype; the contract here is float32.
    return "cudnn path does not return a float32 log-sum-exp (return_lse=True)"
  if (call.has_bias or call.has_mask or call.has_segments) and (call.tq % 2 or call.tk % 2):
    # jax's cuDNN path turns masks into a bias, and its bias backward needs even lengths.
    return f"cudnn with a bias or mask needs even Tq and Tk, got Tq={call.tq}, Tk={call.tk}"
  if call.causal and call.tq != call.tk:
    return "cudnn's causal mask is top-left aligned; bottom-right (Tq != Tk) is not supported"
  if call.window is not None:
    if not call.causal or call.window[0] is None:
      return "cudnn supports only causal sliding windows with a finite left size"
  return None


def _pallas_unsupported_reason(call: _Call) -> str | None:
  if call.dtype not in PALLAS_DTYPES:
    return f"pallas supports q, k, v of one dtype among {PALLAS_DTYPES}, got {call.dtype}"
  if max(call.d, call.dv) > PALLAS_MAX_HEAD_DIM:
    return f"pallas needs D, Dv <= {PALLAS_MAX_HEAD_DIM}, got D={call.d}, Dv={call.dv}"
  if call.has_mask or call.has_bias:
    return ("pallas takes no dense mask or bias (use causal / window / segment ids, or a block "
            "layout with attnjax.ops.block_sparse)")
  return None


def _describe_call(q, k, v, *, bias, mask, causal, q_segment_ids, window, softcap, sinks,
                   alibi_slopes, return_lse) -> _Call:
  same = jnp.result_type(q) == jnp.result_type(k) == jnp.result_type(v)
  return _Call(dtype=str(jnp.result_type(q)) if same else "mixed q/k/v dtypes", tq=q.shape[1], tk=k.shape[1], hq=q.shape[2],
               hk=k.shape[2], d=q.shape[3], dv=v.shape[3], causal=bool(causal), window=window,
               has_mask=mask is not None, has_bias=bias is not None,
               has_segments=q_segment_ids is not None, softcap=softcap,
               has_sinks=sinks is not None, has_alibi=alibi_slopes is not None,
               return_lse=bool(return_lse))


def choose_implementation(implementation: str | None, call: _Call,
                          backend: str | None = None) -> tuple[str, str]:
  """`(implementation, reason)` for `call` on `backend` (default: the current one).

  A pure function of its arguments. `None` picks, in order: cudnn on a CUDA GPU when it serves
  the call (measured 1.6-2x faster than the flash kernel on dense bf16 on an H200); for long key
  sequences (Tk >= `AUTO_XLA_MIN_KV_LEN`) pallas on a CUDA GPU when it serves the call (sliding
  windows included: the flash kernel walks only the band's blocks of `layout.band_layout`), else
  xla; else reference. Raises ValueError if an explicit choice cannot serve the call.
  """
  backend = _backend(backend)
  if implementation is not None:
    reason = unsupported_reason(implementation, call, backend)
    if reason is not None:
      raise ValueError(f"implementation={implementation!r} cannot serve this call: {reason}")
    return implementation, "explicit choice"
  cudnn_reason = unsupported_reason("cudnn", call, backend)
  if cudnn_reason is None:
    return "cudnn", "cuDNN's fused kernel serves this call"
  pallas_reason = _pallas_unsupported_reason(call)
  if call.tk >= AUTO_XLA_MIN_KV_LEN:
    if backend == "gpu" and pallas_reason is None:
      return "pallas", f"flash kernel on the GPU, long keys (cudnn: {cudnn_reason})"
    why = f"pallas: {pallas_reason}" if backend == "gpu" else f"no GPU kernel on {backend!r}"
    return "xla", f"tiled online softmax, Tk >= {AUTO_XLA_MIN_KV_LEN} ({why})"
  return "reference", f"short keys (Tk < {AUTO_XLA_MIN_KV_LEN}): materialised scores are fastest"


def select_implementation(implementation: str | None, call: _Call,
                          backend: str | None = None) -> str:
  """Resolves `implementation` for `call`; raises ValueError if an explicit choice cannot serve it."""
  return choose_implementation(implementation, call, backend)[0]


@dispatch.dispatching_op
def dot_product_attention(q, k, v, *, bias=None, mask=None, causal=False, q_segment_ids=None,
                          kv_segment_ids=None, window=None, softcap=None, sinks=None,
                          alibi_slopes=None, scale=None, return_lse=False, implementation=None,
                          block_size=DEFAULT_BLOCK_SIZE,
                          query_block_size=DEFAULT_QUERY_BLOCK_SIZE):
  """Softmax attention `q [B, Tq, Hq, D], k [B, Tk, Hk, D], v [B, Tk, Hk, Dv] -> [B, Tq, Hq, Dv]`.

  `s_ij = softcap(scale * q_i.k_j) + bias_ij - slope_h * rel_ij`, `o_i = sum_j p_ij v_j` with
  `p_ij = exp(s_ij) / (exp(sink_h) + sum_j' exp(s_ij'))` over the visible keys. Query head h reads
  key/value head `h // (Hq // Hk)` (GQA/MQA, K/V never repeated in the xla path). Positions are
  aligned bottom-right, as in FlashAttention 2 and KV-cache decoding: query i sits at position
  `i + Tk - Tq`, so `causal` lets query i see keys `j <= i + Tk - Tq`, and `window=(left, right)`
  lets it see `i + Tk - Tq - left <= j <= i + Tk - Tq + right` (None = unbounded side).
  `mask` (bool, True = visible) and `bias` (float, added after the soft-cap) broadcast to
  `[B, Hq, Tq, Tk]`; `q_segment_ids [B, Tq]`, `kv_segment_ids [B, Tk]` (defaults to the query
  ids for self-attention) hide keys of another segment. `softcap=c` applies `c tanh(x / c)` to the
  scaled scores (Gemma 2) before bias and ALiBi. `sinks [Hq]` are learned logits that join the
  denominator without a value (gpt-oss style). `alibi_slopes [Hq]` add `-slope_h * rel_ij` where
  `rel_ij = pos(i) - j` when causal (ALiBi's definition) and `|pos(i) - j|` otherwise (the
  symmetric reading, since the paper only defines the causal case). `scale` defaults to D**-0.5.
  A query with no visible key returns zeros (and zero gradients), and its lse is -inf; with sinks
  the lse includes the sink term (it is the softmax's log-normaliser). Returns `o` in q's dtype, or
  `(o, lse [B, Hq, Tq] float32)` with `return_lse=True`. `implementation`: None (auto), "reference",
  "xla" (tiles of `query_block_size` x `block_size`, default 512 x 512), "cudnn" or "pallas" (the
  kernel's own tuned tiles; block sizes here are ignored) (see module docstring). `scale`, `softcap`, `causal`, `window` and block sizes are static python values.
  """
  b, tq, hq, d, tk, hk, dv = validation.check_qkv(q, k, v)
  if tk == 0:
    raise ValueError(f"k must have at least one key, got k {k.shape}")
  window = validation.check_window(window)
  full = (b, hq, tq, tk)
  if mask is not None:
    validation.check_mask(mask, full, "mask")
  if bias is not None:
    validation.check_floating(bias, "bias")
    validation.check_broadcastable(bias, full, "bias", "[B, H, Tq, Tk]")
  if kv_segment_ids is not None and q_segment_ids is None:
    raise ValueError("kv_segment_ids given without q_segment_ids")
  if q_segment_ids is not None:
    if kv_segment_ids is None:
      if tq != tk:
        raise ValueError(f"kv_segment_ids is required when Tq != Tk (q {q.shape}, k {k.shape})")
      kv_segment_ids = q_segment_ids
    validation.check_segment_ids(q_segment_ids, b, tq, "q_segment_ids")
    validation.check_segment_ids(kv_segment_ids, b, tk, "kv_segment_ids")
  if sinks is not None:
    validation.check_per_head(sinks, hq, "sinks")
  if alibi_slopes is not None:
    validation.check_per_head(alibi_slopes, hq, "alibi_slopes")
  if softcap is not None:
    if not isinstance(softcap, (int, float)) or softcap <= 0:
      raise ValueError(f"softcap must be a python number > 0, got {softcap!r}")
    softcap = float(softcap)
  for name, size in (("block_size", block_size), ("query_block_size", query_block_size)):
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0:
      raise ValueError(f"{name} must be an int > 0, got {size!r}")
  scale = d ** -0.5 if scale is None else scale
  if not isinstance(scale, (int, float, np.number)):
    raise ValueError(f"scale must be a python number (static), got {type(scale).__name__}")
  scale = float(scale)

  call = _describe_call(q, k, v, bias=bias, mask=mask, causal=causal, q_segment_ids=q_segment_ids,
                        window=window, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
                        return_lse=return_lse)
  dispatch.note("dot_product_attention",
                lambda be: choose_implementation(implementation, call, be))
  impl = select_implementation(implementation, call)
  kwargs = dict(bias=bias, mask=mask, causal=bool(causal), q_segment_ids=q_segment_ids,
                kv_segment_ids=kv_segment_ids, window=window, softcap=softcap, sinks=sinks,
                alibi_slopes=alibi_slopes, scale=scale)
  if impl == "reference":
    o, lse = reference_attention(q, k, v, **kwargs)
  elif impl == "xla":
    o, lse = xla_attention(q, k, v, block_size=int(block_size),
                           query_block_size=int(query_block_size), **kwargs)
  elif impl == "pallas":
    o, lse = _pallas_attention(q, k, v, **kwargs)
  else:
    o, lse = _cudnn_attention(q, k, v, **kwargs), None
  return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------------------------
# Reference.


def _relative_positions(tq: int, tk: int) -> jnp.ndarray:
  """`[Tq, Tk]` int32: pos(i) - j with bottom-right aligned query positions."""
  return (jnp.arange(tq)[:, None] + (tk - tq)) - jnp.arange(tk)[None, :]


def _visible(tq, tk, *, mask, causal, window, q_segment_ids, kv_segment_ids):
  """Boolean `[B|1, H|1, Tq, Tk]`: every visibility rule combined."""
  valid = jnp.ones((1, 1, tq, tk), bool)
  if mask is not None:
    valid = valid & mask
  if causal:
    valid = valid & masks_lib.causal_mask(tq, tk)
  if window is not None:
    valid = valid & masks_lib.window_mask(tq, tk, *window)
  if q_segment_ids is not None:
    valid = valid & masks_lib.segment_mask(q_segment_ids, kv_segment_ids)[:, None]
  return valid


def reference_attention(q, k, v, *, bias=None, mask=None, causal=False, q_segment_ids=None,
                        kv_segment_ids=None, window=None, softcap=None, sinks=None,
                        alibi_slopes=None, scale=None):
  """Materialised float32 softmax attention; returns `(o [B,Tq,Hq,Dv] in q.dtype, lse [B,Hq,Tq])`.

  Inputs are assumed validated (call `dot_product_attention`). Differentiable in q, k, v, bias,
  sinks and alibi_slopes; rows without a visible key give o = 0, lse = -inf, zero gradients.
  """
  tq, hq, d = q.shape[1:]
  tk, hk = k.shape[1:3]
  scale = d ** -0.5 if scale is None else scale
  hi = jax.lax.Precision.HIGHEST
  kf = jnp.repeat(k.astype(jnp.float32), hq // hk, axis=2)
  vf = jnp.repeat(v.astype(jnp.float32), hq // hk, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kf, precision=hi) * scale
  if softcap is not None:
    s = softcap * jnp.tanh(s / softcap)
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  if alibi_slopes is not None:
    rel = _relative_positions(tq, tk)
    rel = rel if causal else jnp.abs(rel)
    s = s - alibi_slopes.astype(jnp.float32)[:, None, None] * rel
  valid = _visible(tq, tk, mask=mask, causal=causal, window=window,
                   q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
  s = jnp.where(valid, s, -jnp.inf)
  m = jnp.max(s, axis=-1)
  if sinks is not None:
    sink = jnp.broadcast_to(sinks.astype(jnp.float32)[:, None], m.shape[1:])
    m = jnp.maximum(m, sink)
  # The shift cancels mathematically; stop_gradient keeps the -inf/where logic out of autodiff.
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.where(valid, jnp.exp(s - m[..., None]), 0.0)
  l = jnp.sum(p, axis=-1)
  if sinks is not None:
    l = l + jnp.exp(sink - m)
  has_mass = l > 0
  l_safe = jnp.where(has_mass, l, 1.0)
  o = jnp.einsum("bhqk,bkhd->bqhd", p / l_safe[..., None], vf, precision=hi)
  lse = jnp.where(has_mass, jnp.log(l_safe) + m, -jnp.inf)
  return o.astype(q.dtype), lse


# ----------------------------------------------------------------------------------------------
# XLA: tiled online softmax with a block-recomputing custom_vjp.
#
# Queries are tiled in blocks of `bq`, keys in blocks of `bk`. The forward maps over query blocks
# and loops over the key blocks that causal / window rules leave visible (so a causal call does
# about half the work and a sliding window O(T * window)); the backward scans key blocks (emitting
# dk, dv) and loops over the query blocks that can see each one, adding into a full dq carry.
# Both directions hold O(bq * bk) scores at a time; residuals are q, k, v, o, lse.


@dataclasses.dataclass(frozen=True)
class _XlaConfig:
  tq: int
  tk: int
  bq: int
  bk: int
  scale: float
  causal: bool
  window: tuple | None
  softcap: float | None


def _pad_axis(x, axis: int, size: int, pad_value):
  pad = size - x.shape[axis]
  if pad <= 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=pad_value)


def _slice_qk(x, cfg: _XlaConfig, qi, ki):
  """Block `(qi, ki)` of a `[B|1, H|1, Tq|1, Tk|1]` array; size-1 (broadcast) axes stay whole."""
  q_keyed, k_keyed = x.shape[2] != 1, x.shape[3] != 1
  starts = (0, 0, qi * cfg.bq if q_keyed else 0, ki * cfg.bk if k_keyed else 0)
  sizes = x.shape[:2] + (cfg.bq if q_keyed else 1, cfg.bk if k_keyed else 1)
  return jax.lax.dynamic_slice(x, starts, sizes)


def _add_qk(x, block, cfg: _XlaConfig, qi, ki):
  """Adds `block` into the `(qi, ki)` block of `x` (the transpose of `_slice_qk`)."""
  starts = (0, 0, qi * cfg.bq if x.shape[2] != 1 else 0, ki * cfg.bk if x.shape[3] != 1 else 0)
  cur = jax.lax.dynamic_slice(x, starts, block.shape)
  return jax.lax.dynamic_update_slice(x, cur + block.astype(x.dtype), starts)


def _to_groups(x, hk: int, g: int):
  """`[B|1, Hq|1, ...]` -> `[B|1, Hk|1, G|1, ...]`, matching q's `[.., Hk, G, ..]` head split."""
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape((x.shape[0], hk, g) + x.shape[2:])


def _band(cfg: _XlaConfig):
  """The block layout of the causal / window band at the xla path's tiles (host, cached).

  The forward walks each query block's listed key blocks, the backward each key block's listed
  query blocks (the transpose); block pairs the band hides entirely are never visited.
  """
  return layout_lib.band_layout(cfg.tq, cfg.tk, cfg.bq, cfg.bk, causal=cfg.causal,
                                window=cfg.window)


def _over_listed(counts, indices, row, body, init):
  """`body(block, carry)` over the blocks `indices[0, 0, row, :counts[0, 0, row]]` of a layout."""
  counts, indices = jnp.asarray(counts), jnp.asarray(indices)
  return jax.lax.fori_loop(0, counts[0, 0, row], lambda t, c: body(indices[0, 0, row, t], c),
                           init)


def _block_logits(cfg: _XlaConfig, q_blk, k_blk, qi, ki, mask_blk, bias_blk, qseg_blk, kvseg_blk,
                  alibi):
  """Scores of one (query block, key block) pair.

  Returns `(s [B, Hk, G, bq, bk] f32, tanh or None, valid (broadcastable), rel [bq, bk])`.
  """
  hk, g = q_blk.shape[2], q_blk.shape[3]
  s = jnp.einsum("bqhgd,bkhd->bhgqk", q_blk, k_blk, preferred_element_type=jnp.float32) * cfg.scale
  t = None
  if cfg.softcap is not None:
    t = jnp.tanh(s / cfg.softcap)
    s = cfg.softcap * t
  if bias_blk is not None:
    s = s + _to_groups(bias_blk.astype(jnp.float32), hk, g)
  q_idx = qi * cfg.bq + jnp.arange(cfg.bq)
  k_pos = ki * cfg.bk + jnp.arange(cfg.bk)
  rel = (q_idx[:, None] + (cfg.tk - cfg.tq)) - k_pos[None, :]
  if alibi is not None:
    s = s - alibi[None, :, :, None, None] * (rel if cfg.causal else jnp.abs(rel))
  # Padding of the last query / key block is never visible.
  valid = (q_idx[:, None] < cfg.tq) & (k_pos[None, :] < cfg.tk)
  if cfg.causal:
    valid &= rel >= 0
  if cfg.window is not None:
    left, right = cfg.window
    if left is not None:
      valid &= rel <= left
    if right is not None:
      valid &= -rel <= right
  valid = valid[None, None, None]
  if mask_blk is not None:
    valid = valid & _to_groups(mask_blk, hk, g)
  if qseg_blk is not None:
    valid = valid & (qseg_blk[:, :, None] == kvseg_blk[:, None, :])[:, None, None]
  return s, t, valid, rel


def _blocks_of(cfg: _XlaConfig, qi, ki, q, k, v, mask, bias, qseg, kvseg):
  """The (qi, ki) slices of every per-position input (None stays None)."""
  sl = jax.lax.dynamic_slice_in_dim
  return (sl(q, qi * cfg.bq, cfg.bq, 1), sl(k, ki * cfg.bk, cfg.bk, 1),
          sl(v, ki * cfg.bk, cfg.bk, 1),
          None if mask is None else _slice_qk(mask, cfg, qi, ki),
          None if bias is None else _slice_qk(bias, cfg, qi, ki),
          None if qseg is None else sl(qseg, qi * cfg.bq, cfg.bq, 1),
          None if kvseg is None else sl(kvseg, ki * cfg.bk, cfg.bk, 1))


def _xla_forward(cfg, q, k, v, mask, bias, qseg, kvseg, sinks, alibi):
  """`q [B, Tq', Hk, G, D]`, `k, v [B, Tk', Hk, D|Dv]` padded to block multiples.

  Returns `o [B, Hk, G, Tq', Dv] f32` and `lse [B, Hk, G, Tq']` (padded rows: 0 and -inf).
  """
  b, tq_pad, hk, g, _ = q.shape
  dv = v.shape[-1]
  nq = tq_pad // cfg.bq

  def query_block(qi):
    if sinks is None:
      m0 = jnp.full((b, hk, g, cfg.bq), -jnp.inf, jnp.float32)
      l0 = jnp.zeros((b, hk, g, cfg.bq), jnp.float32)
    else:
      # The sink is a key with logit sink_h and no value: the running max starts there, mass 1.
      m0 = jnp.broadcast_to(sinks[None, :, :, None], (b, hk, g, cfg.bq))
      l0 = jnp.ones((b, hk, g, cfg.bq), jnp.float32)
    acc0 = jnp.zeros((b, hk, g, cfg.bq, dv), jnp.float32)

    def body(ki, carry):
      m, l, acc = carry
      q_b, k_b, v_b, mask_b, bias_b, qseg_b, kvseg_b = _blocks_of(
          cfg, qi, ki, q, k, v, mask, bias, qseg, kvseg)
      s, _, valid, _ = _block_logits(cfg, q_b, k_b, qi, ki, mask_b, bias_b, qseg_b, kvseg_b, alibi)
      m_new = jnp.maximum(m, jnp.max(jnp.where(valid, s, -jnp.inf), axis=-1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      alpha = jnp.exp(m - m_safe)
      p = jnp.where(valid, jnp.exp(s - m_safe[..., None]), 0.0)
      pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v_b.dtype), v_b,
                      preferred_element_type=jnp.float32)
      return m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv

    band = _band(cfg)
    m, l, acc = _over_listed(band.kv_counts, band.kv_indices, qi, body, (m0, l0, acc0))
    has_mass = l > 0
    l_safe = jnp.where(has_mass, l, 1.0)
    return acc / l_safe[..., None], jnp.where(has_mass, m + jnp.log(l_safe), -jnp.inf)

  o, lse = jax.lax.map(query_block, jnp.arange(nq))  # [nq, B, Hk, G, bq, ...]
  o = jnp.moveaxis(o, 0, 3).reshape(b, hk, g, tq_pad, dv)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, hk, g, tq_pad)
  return o, lse


def _reduce_to(x, shape):
  """Sums `x` over the axes where `shape` (same rank) has size 1: the transpose of broadcasting."""
  axes = tuple(i for i, (n, s) in enumerate(zip(shape, x.shape)) if n == 1 and s != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _xla_core(cfg, q, k, v, mask, bias, qseg, kvseg, sinks, alibi):
  return _xla_forward(cfg, q, k, v, mask, bias, qseg, kvseg, sinks, alibi)


def _xla_core_fwd(cfg, q, k, v, mask, bias, qseg, kvseg, sinks, alibi):
  o, lse = _xla_forward(cfg, q, k, v, mask, bias, qseg, kvseg, sinks, alibi)
  return (o, lse), (q, k, v, mask, bias, qseg, kvseg, sinks, alibi, o, lse)


def _xla_core_bwd(cfg, res, cotangents):
  q, k, v, mask, bias, qseg, kvseg, sinks, alibi, o, lse = res
  do, dlse = cotangents
  b, tq_pad, hk, g, d = q.shape
  tk_pad, dv = k.shape[1], v.shape[-1]
  nk = tk_pad // cfg.bk
  do = do.astype(jnp.float32)
  # d lse_i / d s_ij = p_ij and d o_i / d s_ij = p_ij (v_j - o_i), so ds = p (dp - delta) with
  # dp_ij = do_i . v_j and delta_i = do_i . o_i - dlse_i.
  delta = jnp.sum(do * o, axis=-1) - dlse.astype(jnp.float32)
  lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  do = do.astype(v.dtype)
  sl = jax.lax.dynamic_slice_in_dim

  def key_block(carry, ki):
    dq, dbias, dalibi = carry

    def body(qi, c):
      dk, dvv, dq, dbias, dalibi = c
      q_b, k_b, v_b, mask_b, bias_b, qseg_b, kvseg_b = _blocks_of(
          cfg, qi, ki, q, k, v, mask, bias, qseg, kvseg)
      s, t, valid, rel = _block_logits(cfg, q_b, k_b, qi, ki, mask_b, bias_b, qseg_b, kvseg_b,
                                       alibi)
      do_b = sl(do, qi * cfg.bq, cfg.bq, 3)
      p = jnp.where(valid, jnp.exp(s - sl(lse_safe, qi * cfg.bq, cfg.bq, 3)[..., None]), 0.0)
      dvv = dvv + jnp.einsum("bhgqk,bhgqd->bkhd", p.astype(v.dtype), do_b,
                             preferred_element_type=jnp.float32)
      dp = jnp.einsum("bhgqd,bkhd->bhgqk", do_b, v_b, preferred_element_type=jnp.float32)
      ds = p * (dp - sl(delta, qi * cfg.bq, cfg.bq, 3)[..., None])
      if bias is not None:
        ds_h = ds.reshape((b, hk * g) + ds.shape[3:])
        dbias = _add_qk(dbias, _reduce_to(ds_h, bias_b.shape), cfg, qi, ki)
      if alibi is not None:
        dalibi = dalibi - jnp.sum(ds * (rel if cfg.causal else jnp.abs(rel)), axis=(0, 3, 4))
      if t is not None:
        ds = ds * (1.0 - t * t)
      ds = ds * cfg.scale
      dq_b = sl(dq, qi * cfg.bq, cfg.bq, 1) + jnp.einsum(
          "bhgqk,bkhd->bqhgd", ds.astype(k.dtype), k_b, preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_b, qi * cfg.bq, 1)
      dk = dk + jnp.einsum("bhgqk,bqhgd->bkhd", ds.astype(q.dtype), q_b,
                           preferred_element_type=jnp.float32)
      return dk, dvv, dq, dbias, dalibi

    band = _band(cfg)
    init = (jnp.zeros((b, cfg.bk, hk, d), jnp.float32), jnp.zeros((b, cfg.bk, hk, dv), jnp.float32),
            dq, dbias, dalibi)
    dk, dvv, dq, dbias, dalibi = _over_listed(band.q_counts, band.q_indices, ki, body, init)
    return (dq, dbias, dalibi), (dk, dvv)

  init = (jnp.zeros((b, tq_pad, hk, g, d), jnp.float32),
          None if bias is None else jnp.zeros(bias.shape, jnp.float32),
          None if alibi is None else jnp.zeros(alibi.shape, jnp.float32))
  (dq, dbias, dalibi), (dk, dvv) = jax.lax.scan(key_block, init, jnp.arange(nk))
  dk = jnp.moveaxis(dk, 0, 1).reshape(b, tk_pad, hk, d)
  dvv = jnp.moveaxis(dvv, 0, 1).reshape(b, tk_pad, hk, dv)

  dsinks = None
  if sinks is not None:
    # The sink's probability is exp(sink - lse); it has no value, so its dp is 0.
    p_sink = jnp.exp(sinks[None, :, :, None] - lse)
    dsinks = -jnp.sum(p_sink * delta, axis=(0, 3)).astype(sinks.dtype)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dvv.astype(v.dtype), None,
          None if bias is None else dbias.astype(bias.dtype), None, None, dsinks,
          None if alibi is None else dalibi.astype(alibi.dtype))


_xla_core.defvjp(_xla_core_fwd, _xla_core_bwd)


def xla_attention(q, k, v, *, bias=None, mask=None, causal=False, q_segment_ids=None,
                  kv_segment_ids=None, window=None, softcap=None, sinks=None, alibi_slopes=None,
                  scale=None, block_size=DEFAULT_BLOCK_SIZE,
                  query_block_size=DEFAULT_QUERY_BLOCK_SIZE):
  """Tiled online-softmax attention; same math and return as `reference_attention`.

  Queries go in blocks of `min(query_block_size, Tq)`, keys in blocks of `min(block_size, Tk)`;
  neither length need be a multiple (the last block is padded and its padding never visible).
  Block pairs that causal / window rules hide entirely are skipped in both directions. Reverse-mode
  differentiable (custom_vjp), not forward-mode. Inputs are assumed validated.
  """
  b, tq, hq, d = q.shape
  tk, hk = k.shape[1:3]
  g = hq // hk
  scale = d ** -0.5 if scale is None else scale
  bq, bk = min(query_block_size, tq), min(block_size, tk)
  tq_pad, tk_pad = -(-tq // bq) * bq, -(-tk // bk) * bk
  full = (b, hq, tq, tk)

  def pad_qk(x, pad_value):
    if x is None:
      return None
    x = x.reshape(validation.check_broadcastable(x, full, "x"))
    if x.shape[2] != 1:
      x = _pad_axis(x, 2, tq_pad, pad_value)
    if x.shape[3] != 1:
      x = _pad_axis(x, 3, tk_pad, pad_value)
    return x

  cfg = _XlaConfig(tq=tq, tk=tk, bq=bq, bk=bk, scale=float(scale), causal=bool(causal),
                   window=window, softcap=softcap)
  qg = _pad_axis(q.reshape(b, tq, hk, g, d), 1, tq_pad, 0)
  qseg = kvseg = None
  if q_segment_ids is not None:
    qseg = _pad_axis(q_segment_ids, 1, tq_pad, 0)
    kvseg = _pad_axis(kv_segment_ids, 1, tk_pad, 0)
  sinks_g = None if sinks is None else sinks.astype(jnp.float32).reshape(hk, g)
  alibi_g = None if alibi_slopes is None else alibi_slopes.astype(jnp.float32).reshape(hk, g)
  o, lse = _xla_core(cfg, qg, _pad_axis(k, 1, tk_pad, 0), _pad_axis(v, 1, tk_pad, 0),
                     pad_qk(mask, False), pad_qk(bias, 0.0), qseg, kvseg, sinks_g, alibi_g)
  o = jnp.transpose(o[:, :, :, :tq], (0, 3, 1, 2, 4)).reshape(b, tq, hq, v.shape[-1])
  return o.astype(q.dtype), lse[:, :, :, :tq].reshape(b, hq, tq)


# ----------------------------------------------------------------------------------------------
# cuDNN (CUDA GPUs), through jax.nn.dot_product_attention.


def _cudnn_attention(q, k, v, *, bias=None, mask=None, causal=False, q_segment_ids=None,
                     kv_segment_ids=None, window=None, softcap=None, sinks=None,
                     alibi_slopes=None, scale=None):
  del softcap, sinks, alibi_slopes  # Excluded by unsupported_reason.
  tq, tk = q.shape[1], k.shape[1]
  full_mask = mask
  if q_segment_ids is not None:
    seg = masks_lib.segment_mask(q_segment_ids, kv_segment_ids)[:, None]
    full_mask = seg if full_mask is None else full_mask & seg
  def full_lengths(x):
    # cuDNN broadcasts a bias over batch and heads but wants both sequence axes in full.
    shape = validation.check_broadcastable(x, (q.shape[0], q.shape[2], tq, tk), "mask/bias")
    return jnp.broadcast_to(jnp.reshape(x, shape), shape[:2] + (tq, tk))

  if full_mask is not None:
    full_mask = full_lengths(full_mask)
  if bias is not None:
    bias = full_lengths(bias).astype(q.dtype)
  local = None if window is None else (window[0], 0)
  o = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=full_mask, scale=scale,
                                   is_causal=causal, local_window_size=local,
                                   implementation="cudnn")
  if full_mask is not None:
    # cuDNN masks with a large negative logit, so a row without visible keys would average all
    # values; the contract here is zeros.
    row_ok = jnp.any(_visible(tq, tk, mask=full_mask, causal=causal, window=window,
                              q_segment_ids=None, kv_segment_ids=None), axis=-1)
    o = jnp.where(jnp.transpose(row_ok, (0, 2, 1))[..., None], o, jnp.zeros((), o.dtype))
  return o


# ----------------------------------------------------------------------------------------------
# Pallas flash kernel (Triton backend; interpret mode without a GPU).


def _pallas_attention(q, k, v, *, bias=None, mask=None, causal=False, q_segment_ids=None,
                      kv_segment_ids=None, window=None, softcap=None, sinks=None,
                      alibi_slopes=None, scale=None):
  del bias, mask  # Excluded by unsupported_reason.
  # Imported lazily: the kernel package is optional for the engine and heavy to import.
  from pallas_kernels.flash.api import flash_attention
  d, dv = q.shape[-1], v.shape[-1]
  if d != dv:
    # The kernel wants one head dim: zero columns change neither q.k nor the kept output columns.
    width = max(d, dv)
    pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])
    q, k, v = pad(q), pad(k), pad(v)
  o, lse = flash_attention(q, k, v, causal=causal, window=window, q_segment_ids=q_segment_ids,
                           kv_segment_ids=kv_segment_ids, softcap=softcap, sinks=sinks,
                           alibi_slopes=alibi_slopes, scale=scale, return_lse=True)
  return o[..., :dv], lse
