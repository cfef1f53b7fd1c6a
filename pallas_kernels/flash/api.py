"""Public API of the block-sparse flash-attention kernel (Pallas Triton backend, custom VJP).

`flash_attention(q, k, v, layout=None, *, causal, window, ...)` computes
`o_i = sum_j w_ij v_j` on `[B, T, H, D]` inputs (keys/values may have fewer heads, GQA), over the key
blocks the layout lists, with `w = softmax_j(s_ij)` (online, float32, plus `lse [B, H, Tq]` float32) or
`w = sigmoid(s_ij + b)` without normalisation (FlashSigmoid (Ramapuram et al. 2024, arXiv:2409.04431), default `b = -log(Tk)`), where
`s_ij = cap(q_i . k_j * scale) - m_h |i' - j| + phi_q,i . phi_k,j` for masked-in pairs: `cap` is the
optional logit soft-cap `c tanh(x / c)`, `m_h` optional ALiBi slopes (bidirectional, the usual causal
form under a causal mask; `i'` is the bottom-right aligned query position), and `phi` optional low-rank
bias factors folded into extra q/k columns (FlashBias (Wu et al. 2025, arXiv:2505.12044); their gradients flow through the same
kernel). Learned `sinks [H]` add `exp(sink_h)` to each softmax denominator (the sink carries no value).
Masking: causal and windows are bottom-right aligned when Tq != Tk, as `attnjax.ops.masks`; an explicit
`layout` (an `attnjax.ops.layout.BlockLayout`) replaces them; segment ids mask pairs of different
segments. A row with no visible key returns zeros (lse = -inf, or the sink). D up to 256 is padded
to a power of two and T to a whole number of blocks inside; float32 / bf16 / fp16 inputs, float32 accumulation; float32 dots use
`HIGHEST` precision so a GPU run matches interpret mode rather than TF32. Gradients (custom VJP,
deterministic kernels) flow to q, k, v, sinks, alibi_slopes and the bias factors, and through the
returned lse (an lse cotangent only shifts `delta = rowsum(dO * O)` by `-dlse`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from attnjax.ops import layout as layout_lib
from pallas_kernels.common import resolve_interpret
from pallas_kernels.flash import backward as bwd_lib
from pallas_kernels.flash import forward as fwd_lib
from pallas_kernels.flash.blocks import default_block_sizes, is_power_of_two, next_power_of_two

MAX_HEAD_DIM = 256
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _pad_axis(x, axis: int, size: int, value=0):
  if x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _padded_layout_arrays(layout, cfg: fwd_lib.KernelConfig):
  """The kv / transposed arrays, with the padded last key block forced partial (keys >= tk masked)."""
  kv = [jnp.asarray(a, jnp.int32) for a in (layout.kv_counts, layout.kv_indices, layout.kv_partial)]
  qt = [jnp.asarray(a, jnp.int32) for a in (layout.q_counts, layout.q_indices, layout.q_partial)]
  if cfg.tk % cfg.block_k:
    last = cfg.tk_pad // cfg.block_k - 1
    kv[2] = jnp.where(kv[1] == last, 1, kv[2])
    rows = jnp.arange(qt[2].shape[-2])[:, None] == last
    qt[2] = jnp.where(rows, 1, qt[2])
  return tuple(kv), tuple(qt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_core(cfg, layout_kv, layout_q, q, k, v, sinks, q_seg, k_seg, slopes):
  return _flash_fwd_impl(cfg, layout_kv, q, k, v, sinks, q_seg, k_seg, slopes)


def _flash_fwd_impl(cfg, layout_kv, q, k, v, sinks, q_seg, k_seg, slopes):
  o, lse = fwd_lib.flash_forward(cfg, layout_kv, q, k, v, q_seg, k_seg, sinks, slopes)
  if lse is None:
    lse = jnp.zeros((cfg.batch, cfg.heads, cfg.tq_pad), jnp.float32)
  return o, lse


def _flash_core_fwd(cfg, layout_kv, layout_q, q, k, v, sinks, q_seg, k_seg, slopes):
  o, lse = _flash_fwd_impl(cfg, layout_kv, q, k, v, sinks, q_seg, k_seg, slopes)
  return (o, lse), (layout_kv, layout_q, q, k, v, sinks, q_seg, k_seg, slopes, o, lse)


def _flash_core_bwd(cfg, res, cotangents):
  layout_kv, layout_q, q, k, v, sinks, q_seg, k_seg, slopes, o, lse = res
  d_o, d_lse = cotangents
  delta = None
  if cfg.mode == "softmax":
    # d lse_i / d s_ij = p_ij, so an lse cotangent only shifts delta: ds = p (dp - (delta - dlse)).
    delta = jnp.einsum("bthd,bthd->bht", d_o.astype(jnp.float32), o.astype(jnp.float32))
    delta = delta - d_lse.astype(jnp.float32)
  extra = (q_seg, k_seg, sinks, slopes)
  dq, d_slope_rows = bwd_lib.flash_backward_dq(cfg, layout_kv, q, k, v, d_o, lse, delta, *extra)
  dk, dv = bwd_lib.flash_backward_dkv(cfg, layout_q, q, k, v, d_o, lse, delta, *extra)
  d_sinks = None
  if cfg.has_sinks:
    # d o_i / d sink = -p_sink,i o_i and d lse_i / d sink = p_sink,i with p_sink,i = exp(sink -
    # lse_i): both fold into -p_sink (delta - dlse). Padded rows have delta = 0.
    p_sink = jnp.exp(sinks[None, :, None] - lse)
    d_sinks = -jnp.sum(p_sink * delta, axis=(0, 2)).astype(sinks.dtype)
  d_slopes = None
  if cfg.has_alibi:
    d_slopes = jnp.sum(d_slope_rows, axis=(0, 2)).astype(slopes.dtype)
  return (None, None, dq, dk, dv, d_sinks, None, None, d_slopes)


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)


def _check_inputs(q, k, v, sinks, alibi_slopes, q_segment_ids, kv_segment_ids, bias_factors):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, T, H, D]; got {q.shape}, {k.shape}, {v.shape}")
  b, _, h, d = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k and v must be [B={b}, Tk, Hkv, D={d}] and equal; got {k.shape}, {v.shape}")
  if h % k.shape[2]:
    raise ValueError(f"kv heads ({k.shape[2]}) must divide query heads ({h})")
  if not 1 <= d <= MAX_HEAD_DIM:
    raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got {d}")
  if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"q, k, v must share a dtype among float32/bfloat16/float16; got "
                     f"{q.dtype}, {k.dtype}, {v.dtype}")
  for name, x in (("sinks", sinks), ("alibi_slopes", alibi_slopes)):
    if x is not None and x.shape != (h,):
      raise ValueError(f"{name} must be [H={h}], got {x.shape}")
  if (q_segment_ids is None) != (kv_segment_ids is None) and kv_segment_ids is not None:
    raise ValueError("kv_segment_ids given without q_segment_ids")
  if q_segment_ids is not None and q_segment_ids.shape != q.shape[:2]:
    raise ValueError(f"q_segment_ids must be [B, Tq]={q.shape[:2]}, got {q_segment_ids.shape}")
  if kv_segment_ids is not None and kv_segment_ids.shape != k.shape[:2]:
    raise ValueError(f"kv_segment_ids must be [B, Tk]={k.shape[:2]}, got {kv_segment_ids.shape}")
  if bias_factors is not None:
    phi_q, phi_k = bias_factors
    if phi_q.ndim != 4 or phi_q.shape[:3] != q.shape[:3]:
      raise ValueError(f"bias_factors[0] must be [B, Tq, H, R] matching q; got {phi_q.shape}")
    if phi_k.shape[:3] != k.shape[:3] or phi_k.shape[3] != phi_q.shape[3]:
      raise ValueError(f"bias_factors[1] must be [B, Tk, Hkv, R={phi_q.shape[3]}]; got "
                       f"{phi_k.shape}")


def flash_attention(q, k, v, layout=None, *, causal: bool = False, window=None,
                    q_segment_ids=None, kv_segment_ids=None, softcap: float | None = None,
                    sinks=None, alibi_slopes=None, bias_factors=None, score_mode: str = "softmax",
                    sigmoid_bias: float | None = None, scale: float | None = None,
                    return_lse: bool = False, block_q: int | None = None,
                    block_k: int | None = None, num_warps: int | None = None,
                    num_stages: int | None = None, interpret: bool | None = None):
  """Block-sparse flash attention on `[B, T, H, D]` (see the module docstring for the formula).

  Args: `layout` an `attnjax.ops.layout.BlockLayout`; when None, `attnjax.ops.layout.band_layout`
  builds one from `causal` / `window=(left, right)` (None on a side = unbounded). `sinks`,
  `alibi_slopes` are `[H]`; `bias_factors=(phi_q [B,Tq,H,R], phi_k [B,Tk,Hkv,R])`; `score_mode` is
  "softmax" or "sigmoid". Block sizes must be powers of two (>= 16 for the GPU's dots) and, with a
  layout, equal the layout's. `interpret=None` runs interpret mode when no GPU is present.
  Returns `o [B, Tq, H, D]` (and `lse [B, H, Tq]` float32 if `return_lse`; zeros in sigmoid mode).
  """
  _check_inputs(q, k, v, sinks, alibi_slopes, q_segment_ids, kv_segment_ids, bias_factors)
  if score_mode not in ("softmax", "sigmoid"):
    raise ValueError(f"score_mode must be 'softmax' or 'sigmoid', got {score_mode!r}")
  if score_mode == "sigmoid" and sinks is not None:
    raise ValueError("sinks only apply to score_mode='softmax'")
  if window is not None and (len(window) != 2 or any(w is not None and w < 0 for w in window)):
    raise ValueError(f"window must be (left, right) with non-negative ints or None, got {window}")
  interpret = resolve_interpret(interpret)
  b, tq, h, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else float(scale)

  if bias_factors is not None:
    # FlashBias: s + phi_q phi_k^T == scale * [q, phi_q / scale] . [k, phi_k].
    phi_q, phi_k = bias_factors
    q = jnp.concatenate([q, (phi_q / scale).astype(q.dtype)], axis=-1)
    k = jnp.concatenate([k, phi_k.astype(k.dtype)], axis=-1)
    v = jnp.concatenate([v, jnp.zeros(k.shape[:3] + (phi_k.shape[3],), v.dtype)], axis=-1)
    if q.shape[-1] > MAX_HEAD_DIM:
      raise ValueError(f"head dim + bias rank must be <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
  dp = max(next_power_of_two(q.shape[-1]), 16)
  defaults = default_block_sizes(dp, interpret=interpret)

  if layout is not None:
    if causal or window is not None:
      raise ValueError("pass either a layout or causal/window, not both (the layout's mask_rule "
                       "already encodes its mask)")
    if (layout.tq, layout.tk) != (tq, tk):
      raise ValueError(f"layout is for (tq, tk)=({layout.tq}, {layout.tk}), inputs are ({tq}, {tk})")
    for name, given, want in (("block_q", block_q, layout.block_q),
                              ("block_k", block_k, layout.block_k)):
      if given is not None and given != want:
        raise ValueError(f"{name}={given} differs from the layout's {want}")
    block_q, block_k = layout.block_q, layout.block_k
  else:
    block_q = block_q or defaults.block_q
    block_k = block_k or defaults.block_k
  for name, blk in (("block_q", block_q), ("block_k", block_k)):
    if not is_power_of_two(blk):
      raise ValueError(f"{name} must be a power of two, got {blk}")
  if layout is None:
    layout = layout_lib.band_layout(tq, tk, block_q, block_k, causal=bool(causal),
                                    window=None if window is None else tuple(window))
  lb, lh = layout.kv_counts.shape[:2]
  if lb not in (1, b) or lh not in (1, h):
    raise ValueError(f"layout.kv_counts must be [1|B, 1|H, nQ]; got {layout.kv_counts.shape}")

  tq_pad = -(-tq // block_q) * block_q
  tk_pad = -(-tk // block_k) * block_k
  if sigmoid_bias is None:
    sigmoid_bias = -math.log(tk)
  precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  cfg = fwd_lib.KernelConfig(
      batch=b, heads=h, kv_heads=hk, tq=tq, tk=tk, tq_pad=tq_pad, tk_pad=tk_pad, head_dim_pad=dp,
      block_q=block_q, block_k=block_k, layout_batch=lb, layout_heads=lh, scale=scale,
      mode=score_mode, sigmoid_bias=float(sigmoid_bias),
      softcap=None if softcap is None else float(softcap), mask_rule=layout.mask_rule,
      has_segments=q_segment_ids is not None, has_sinks=sinks is not None,
      has_alibi=alibi_slopes is not None, num_warps=num_warps or defaults.num_warps,
      num_stages=num_stages or defaults.num_stages, interpret=interpret, precision=precision)
  layout_kv, layout_q = _padded_layout_arrays(layout, cfg)

  d_in = q.shape[-1]
  pad = lambda x, t: _pad_axis(_pad_axis(x, 1, t), 3, dp)
  qp, kp, vp = pad(q, tq_pad), pad(k, tk_pad), pad(v, tk_pad)
  q_seg = k_seg = None
  if q_segment_ids is not None:
    kv_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    # Distinct pad values keep padded queries and keys out of every segment.
    q_seg = _pad_axis(q_segment_ids.astype(jnp.int32), 1, tq_pad, -1)
    k_seg = _pad_axis(kv_ids.astype(jnp.int32), 1, tk_pad, -2)
  sinks_f = None if sinks is None else sinks.astype(jnp.float32)
  slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)
  o, lse = _flash_core(cfg, layout_kv, layout_q, qp, kp, vp, sinks_f, q_seg, k_seg, slopes)
  o = o[:, :tq, :, :d]
  if return_lse:
    return o, lse[:, :, :tq]
  return o


def block_sparse_flash_attention(q, k, v, layout, **kwargs):
  """`flash_attention` over an explicit block layout (any static or dynamic sparse pattern)."""
  if layout is None:
    raise ValueError("layout is required for block_sparse_flash_attention")
  return flash_attention(q, k, v, layout, **kwargs)
