"""Forward Pallas-Triton kernel of block-sparse flash attention.

Grid `(nQ, B * H)`: one program per query block and (batch, query head). It walks the key blocks its
layout row lists (`fori_loop` over a data-dependent count; the block table is an ordinary input since
Triton has no scalar prefetch), computes `s = q k^T * scale` (+ soft-cap, + ALiBi), masks only the
partial blocks (layout rule, key padding), always applies segment ids when given, and accumulates
either an online softmax in float32 (with the log-sum-exp as a second output) or sigmoid weights
without normalisation (FlashSigmoid). Inputs arrive padded by the wrapper to whole tiles (sequence to a
multiple of the block, head dim to a power of two), so every load and store is an exact tile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static description of one kernel call (hashable: it is a `custom_vjp` nondiff argument)."""
  batch: int
  heads: int
  kv_heads: int
  tq: int               # true lengths; arrays are padded to tq_pad / tk_pad
  tk: int
  tq_pad: int
  tk_pad: int
  head_dim_pad: int
  block_q: int
  block_k: int
  layout_batch: int     # 1 or batch
  layout_heads: int     # 1 or heads
  scale: float
  mode: str = "softmax"  # "softmax" | "sigmoid"
  sigmoid_bias: float = 0.0
  softcap: float | None = None
  mask_rule: Callable | None = None
  has_segments: bool = False
  has_sinks: bool = False
  has_alibi: bool = False
  num_warps: int = 4
  num_stages: int = 2
  interpret: bool = False
  precision: jax.lax.Precision | None = None

  @property
  def rep(self) -> int:
    return self.heads // self.kv_heads

  def layout_pos(self, b, h):
    """Layout row for (batch b, query head h), following its broadcast dimensions."""
    return (b if self.layout_batch > 1 else 0), (h if self.layout_heads > 1 else 0)

  def compiler_params(self):
    return plt.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def dot_nt(a, b, precision):
  """`a @ b.T` with float32 accumulation."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def dot_nn(a, b, precision):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def dot_tn(a, b, precision):
  """`a.T @ b` with float32 accumulation."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)


def scores(cfg: KernelConfig, q, k, q_pos, k_pos, h, partial, q_seg, k_seg, slopes_ref):
  """Masked logits of one tile. Returns `(s, tanh_or_None)`; masked entries are -inf.

  The tanh of the soft-cap is returned for the backward chain rule `d cap(x)/dx = 1 - tanh^2`.
  """
  s = dot_nt(q, k, cfg.precision) * cfg.scale
  t = None
  if cfg.softcap is not None:
    t = jnp.tanh(s / cfg.softcap)
    s = cfg.softcap * t
  if cfg.has_alibi:
    # Bidirectional ALiBi -m_h |q - k| at bottom-right aligned positions; for causal rows this is
    # the usual -m_h (q - k). Computed in float32 here rather than as bf16 extra columns.
    rel = (k_pos - (q_pos + (cfg.tk - cfg.tq))).astype(jnp.float32)
    s = s - slopes_ref[h] * jnp.abs(rel)
  if cfg.has_segments:
    s = jnp.where(q_seg[:, None] == k_seg[None, :], s, -jnp.inf)

  def apply_rule(s):
    ok = k_pos < cfg.tk
    if cfg.mask_rule is not None:
      ok = ok & cfg.mask_rule(q_pos, k_pos)
    return jnp.where(ok, s, -jnp.inf)

  # Full blocks skip the element mask entirely; only partial ones evaluate the rule.
  s = jax.lax.cond(partial != 0, apply_rule, lambda s: s, s)
  return s, t


def split_refs(cfg: KernelConfig, refs, names):
  """Unpacks the optional inputs in the fixed order the wrapper passes them."""
  refs = list(refs)
  out = {}
  for name in names:
    out[name] = refs.pop(0)
  if cfg.has_segments:
    out["q_seg"], out["k_seg"] = refs.pop(0), refs.pop(0)
  if cfg.has_sinks:
    out["sinks"] = refs.pop(0)
  if cfg.has_alibi:
    out["slopes"] = refs.pop(0)
  return out, refs


def _forward_kernel(*refs, cfg: KernelConfig):
  r, outs = split_refs(cfg, refs, ("counts", "indices", "partial", "q", "k", "v"))
  o_ref = outs[0]
  qi, bh = pl.program_id(0), pl.program_id(1)
  b, h = bh // cfg.heads, bh % cfg.heads
  lb, lh = cfg.layout_pos(b, h)
  bq, bk = cfg.block_q, cfg.block_k

  q = r["q"][...]
  q_pos = qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_seg = r["q_seg"][...] if cfg.has_segments else None
  count = r["counts"][lb, lh, qi]

  def body(t, carry):
    kb = r["indices"][lb, lh, qi, t]
    partial = r["partial"][lb, lh, qi, t]
    start = pl.multiple_of(kb * bk, bk)
    k = r["k"][pl.ds(start, bk), :]
    v = r["v"][pl.ds(start, bk), :]
    k_pos = start + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    k_seg = r["k_seg"][pl.ds(start, bk)] if cfg.has_segments else None
    s, _ = scores(cfg, q, k, q_pos, k_pos, h, partial, q_seg, k_seg, r.get("slopes"))
    if cfg.mode == "sigmoid":
      (acc,) = carry
      p = jax.nn.sigmoid(s + cfg.sigmoid_bias)
      return (acc + dot_nn(p.astype(v.dtype), v, cfg.precision),)
    acc, m_prev, l_prev = carry
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    # A row with no visible key so far keeps m = -inf; shift by 0 there so exp gives 0, not NaN.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    l_new = l_prev * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot_nn(p.astype(v.dtype), v, cfg.precision)
    return acc, m_new, l_new

  acc0 = jnp.zeros((bq, cfg.head_dim_pad), jnp.float32)
  if cfg.mode == "sigmoid":
    (acc,) = jax.lax.fori_loop(0, count, body, (acc0,))
    o_ref[...] = acc.astype(o_ref.dtype)
    return
  if cfg.has_sinks:
    # The sink is one extra logit in the denominator: start the running max at it, with mass 1.
    m0 = jnp.full((bq,), r["sinks"][h], jnp.float32)
    l0 = jnp.ones((bq,), jnp.float32)
  else:
    m0 = jnp.full((bq,), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((bq,), jnp.float32)
  acc, m, l = jax.lax.fori_loop(0, count, body, (acc0, m0, l0))
  l_safe = jnp.where(l == 0.0, 1.0, l)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  outs[1][...] = jnp.where(l == 0.0, -jnp.inf, m_safe + jnp.log(l_safe))


def whole(shape):
  """BlockSpec handing the kernel the whole (small) array, indexed inside the kernel."""
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def optional_inputs(cfg: KernelConfig, q_seg, k_seg, sinks, slopes, seg_q_spec, seg_k_spec):
  args, specs = [], []
  if cfg.has_segments:
    args += [q_seg, k_seg]
    specs += [seg_q_spec, seg_k_spec]
  if cfg.has_sinks:
    args.append(sinks)
    specs.append(whole(sinks.shape))
  if cfg.has_alibi:
    args.append(slopes)
    specs.append(whole(slopes.shape))
  return args, specs


def flash_forward(cfg: KernelConfig, layout_kv, q, k, v, q_seg=None, k_seg=None, sinks=None,
                  slopes=None):
  """Runs the forward kernel on padded inputs. Returns `(o [B,Tq_pad,H,Dp], lse [B,H,Tq_pad] | None)`.

  `layout_kv = (counts, indices, partial)`; `q_seg [B, Tq_pad]`, `k_seg [B, Tk_pad]` int32;
  `sinks [H]`, `slopes [H]` float32.
  """
  counts, indices, partial = layout_kv
  bq, dp = cfg.block_q, cfg.head_dim_pad
  nq = cfg.tq_pad // bq
  heads, rep = cfg.heads, cfg.rep

  q_spec = pl.BlockSpec((None, bq, None, dp), lambda i, bh: (bh // heads, i, bh % heads, 0))
  kv_spec = pl.BlockSpec((None, cfg.tk_pad, None, dp),
                         lambda i, bh: (bh // heads, 0, (bh % heads) // rep, 0))
  seg_q_spec = pl.BlockSpec((None, bq), lambda i, bh: (bh // heads, i))
  seg_k_spec = pl.BlockSpec((None, cfg.tk_pad), lambda i, bh: (bh // heads, 0))
  extra, extra_specs = optional_inputs(cfg, q_seg, k_seg, sinks, slopes, seg_q_spec, seg_k_spec)

  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  out_specs = [q_spec]
  if cfg.mode == "softmax":
    out_shape.append(jax.ShapeDtypeStruct((cfg.batch, heads, cfg.tq_pad), jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, bq), lambda i, bh: (bh // heads, bh % heads, i)))

  outs = pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg),
      grid=(nq, cfg.batch * heads),
      in_specs=[whole(counts.shape), whole(indices.shape), whole(partial.shape), q_spec, kv_spec,
                kv_spec] + extra_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=cfg.compiler_params(),
      interpret=cfg.interpret,
      name="flash_block_sparse_fwd",
  )(counts, indices, partial, q, k, v, *extra)
  if cfg.mode == "softmax":
    return outs[0], outs[1]
  return outs[0], None
