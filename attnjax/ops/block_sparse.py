"""Plain-JAX block-sparse attention that consumes a `BlockLayout`.

For query block i of head h, only the key blocks listed in `layout.kv_indices[b, h, i, :count]` are
gathered (`[B, H, nQ, max_kv * block_k, D]`), scored and softmaxed, so memory and work grow with
the number of listed blocks, not with Tq * Tk. The dense-masked reference
(`dot_product_attention(..., mask=layout.dense_mask(layout), implementation="reference")`) is the
oracle. Gradients come from autodiff of this gather formulation (the gathers transpose to
scatter-adds onto the key blocks; the Pallas kernel walks the transposed layout instead).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attnjax.ops import dispatch
from attnjax.ops import layout as layout_lib
from attnjax.ops import validation
from attnjax.ops.layout import BlockLayout

PALLAS_MAX_HEAD_DIM = 256
PALLAS_MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class BlockSparseCall:
  """Static description of one `block_sparse_attention` call, used to choose an implementation."""
  dtype: str
  d: int
  dv: int
  block_q: int
  block_k: int
  has_bias_k: bool = False
  has_query_block_select: bool = False


def describe_call(q, k, v, layout: BlockLayout, *, bias_k=None) -> BlockSparseCall:
  same = jnp.result_type(q) == jnp.result_type(k) == jnp.result_type(v)
  return BlockSparseCall(dtype=str(jnp.result_type(q)) if same else "mixed q/k/v dtypes",
                         d=q.shape[-1], dv=v.shape[-1], block_q=layout.block_q,
                         block_k=layout.block_k, has_bias_k=bias_k is not None,
                         has_query_block_select=layout.query_block_select is not None)


def pallas_unsupported_reason(call: BlockSparseCall) -> str | None:
  """Why the flash kernel cannot serve `call` (None if it can)."""
  if call.has_bias_k:
    return "the flash kernel takes no per-key bias bias_k"
  if call.has_query_block_select:
    return ("the flash kernel takes no per-token query_block_select (per-token routers); use "
            "layouts whose selection is shared by a query block")
  if call.dtype not in dispatch.PALLAS_DTYPES:
    return (f"the flash kernel takes q, k, v of one dtype among {dispatch.PALLAS_DTYPES}, got "
            f"{call.dtype}")
  if max(call.d, call.dv) > PALLAS_MAX_HEAD_DIM:
    return f"the flash kernel needs D, Dv <= {PALLAS_MAX_HEAD_DIM}, got D={call.d}, Dv={call.dv}"
  for name, blk in (("block_q", call.block_q), ("block_k", call.block_k)):
    if not dispatch.is_power_of_two(blk) or blk < PALLAS_MIN_BLOCK:
      return (f"the flash kernel needs power-of-two blocks >= {PALLAS_MIN_BLOCK} (the GPU's dot "
              f"tiles), the layout's {name} is {blk}")
  return None


def choose_implementation(implementation: str | None, call: BlockSparseCall,
                          backend: str | None = None) -> tuple[str, str]:
  """`(implementation, reason)` for `call` on `backend` (default: the current one); pure.

  None picks "pallas" on a CUDA GPU when the flash kernel serves the call, else "xla" (the gather
  formulation). An explicit choice that cannot serve the call raises ValueError saying why.
  """
  dispatch.check_implementation(implementation, op="block_sparse_attention")
  backend = dispatch.resolve_backend(backend)
  reason = pallas_unsupported_reason(call)
  if implementation == "pallas" and reason is not None:
    raise ValueError(f"implementation='pallas' cannot serve this call: {reason}")
  if implementation is not None:
    return implementation, "explicit choice"
  if backend == "gpu" and reason is None:
    return "pallas", "flash kernel on the layout's blocks"
  why = reason if backend == "gpu" else f"no GPU kernel on {backend!r}"
  return "xla", f"gather over the layout's blocks ({why})"


def select_implementation(implementation: str | None, call: BlockSparseCall,
                          backend: str | None = None) -> str:
  return choose_implementation(implementation, call, backend)[0]


def _pad_to(x, length, axis=1, value=0):
  pad = length - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _broadcast_layout_array(a, b, h):
  return jnp.broadcast_to(a, (b, h) + a.shape[2:])


@dispatch.dispatching_op
def block_sparse_attention(q, k, v, layout: BlockLayout, *, scale=None, q_segment_ids=None,
                           kv_segment_ids=None, bias_k=None, return_lse=False,
                           query_chunk: int | None = None, implementation: str | None = None):
  """Softmax attention restricted to `layout`: `q [B, Tq, H, D], k [B, Tk, Hk, D], v [B, Tk, Hk, Dv]`.

  `o_i = sum_{j in S(i)} softmax_j(scale q_i.k_j + bias_k[j]) v_j` where `S(i)` is the union of the
  listed key blocks of i's query block, filtered by `layout.mask_rule` on partial blocks, by
  `layout.query_block_select` when present, by segment ids (`[B, Tq]`, `[B, Tk]`) and by `j < Tk`.
  Query head h reads key head `h // (H // Hk)` (GQA). `bias_k [B, Hk|H, Tk]` is an optional per-key
  additive score (Dynamic Mask Attention). Rows with no visible key give zeros and lse = -inf.
  `scale` defaults to `D ** -0.5`. `query_chunk` (query blocks per step, default all) bounds peak
  memory further by mapping over groups of query blocks. `implementation` (`attnjax.ops.dispatch`):
  "xla" (this gather formulation), "pallas" (the flash kernel `pallas_kernels.flash.api`, which
  needs power-of-two blocks and takes neither `bias_k` nor `query_block_select`; interpret mode
  without a GPU), "reference" (the dense-masked oracle), or None: pallas on a CUDA GPU when it
  serves the call, else xla (`choose_implementation`). Returns `o` in q's dtype, or
  `(o, lse [B, H, Tq] float32)`.
  """
  dispatch.check_implementation(implementation, op="block_sparse_attention")
  if not isinstance(layout, BlockLayout):
    raise ValueError(f"layout must be a BlockLayout, got {type(layout).__name__}")
  call = describe_call(q, k, v, layout, bias_k=bias_k)
  dispatch.note("block_sparse_attention",
                lambda be: choose_implementation(implementation, call, be))
  impl = select_implementation(implementation, call)
  if impl == "pallas":
    return _pallas_block_sparse(q, k, v, layout, scale=scale, q_segment_ids=q_segment_ids,
                                kv_segment_ids=kv_segment_ids, return_lse=return_lse)
  if impl == "reference":
    return reference_attention(q, k, v, layout, scale=scale, q_segment_ids=q_segment_ids,
                               kv_segment_ids=kv_segment_ids, bias_k=bias_k, return_lse=return_lse)
  b, tq, hq, d, tk, hk, dv = validation.check_qkv(q, k, v)
  if (layout.tq, layout.tk) != (tq, tk):
    raise ValueError(f"layout is for (Tq, Tk) = ({layout.tq}, {layout.tk}), got q {q.shape}, "
                     f"k {k.shape}")
  for name, arr in (("kv_counts", layout.kv_counts), ("kv_indices", layout.kv_indices)):
    if arr.shape[0] not in (1, b) or arr.shape[1] not in (1, hq):
      raise ValueError(f"layout.{name} leading dims must be [B|1, H|1] = [{b}|1, {hq}|1], got "
                       f"{arr.shape}")
  if kv_segment_ids is not None and q_segment_ids is None:
    raise ValueError("kv_segment_ids given without q_segment_ids")
  if q_segment_ids is not None:
    if kv_segment_ids is None:
      if tq != tk:
        raise ValueError("kv_segment_ids is required when Tq != Tk")
      kv_segment_ids = q_segment_ids
    validation.check_segment_ids(q_segment_ids, b, tq, "q_segment_ids")
    validation.check_segment_ids(kv_segment_ids, b, tk, "kv_segment_ids")
  if bias_k is not None and (bias_k.ndim != 3 or bias_k.shape[0] != b or bias_k.shape[1] not in (
      hk, hq) or bias_k.shape[2] != tk):
    raise ValueError(f"bias_k must be [B, Hk|H, Tk] = [{b}, {hk}|{hq}, {tk}], got {bias_k.shape}")
  scale = d ** -0.5 if scale is None else float(scale)

  bq, bk = layout.block_q, layout.block_k
  nq, nk, max_kv = layout.num_q_blocks, layout.num_k_blocks, layout.max_kv
  group = hq // hk
  out_dtype = q.dtype

  # Blocked views: q [B, H, nQ, bq, D]; k, v [B, Hk, nK, bk, D].
  qb = _pad_to(q, nq * bq).reshape(b, nq, bq, hq, d).transpose(0, 3, 1, 2, 4)
  kb = _pad_to(k, nk * bk).reshape(b, nk, bk, hk, d).transpose(0, 3, 1, 2, 4)
  vb = _pad_to(v, nk * bk).reshape(b, nk, bk, hk, dv).transpose(0, 3, 1, 2, 4)
  counts = _broadcast_layout_array(layout.kv_counts, b, hq)
  indices = _broadcast_layout_array(layout.kv_indices, b, hq)
  partial = _broadcast_layout_array(layout.kv_partial, b, hq)
  kv_head = jnp.arange(hq) // group

  q_pos_all = jnp.arange(nq * bq, dtype=jnp.int32).reshape(nq, bq)
  if q_segment_ids is not None:
    qseg = _pad_to(q_segment_ids, nq * bq, value=-1).reshape(b, nq, bq)
    kseg = _pad_to(kv_segment_ids, nk * bk, value=-2).reshape(b, nk, bk)
  if bias_k is not None:
    bias_heads = bias_k if bias_k.shape[1] == hq else bias_k[:, kv_head]
    biasb = _pad_to(bias_heads.astype(jnp.float32), nk * bk, axis=2).reshape(b, hq, nk, bk)
  qsel = layout.query_block_select
  if qsel is not None:
    qsel = jnp.broadcast_to(qsel, (b, hq) + qsel.shape[2:])
    qsel = _pad_to(qsel, nq * bq, axis=2).reshape(b, hq, nq, bq, nk)

  def one_chunk(qi):
    """Attention for query blocks `qi` ([C] int32); returns o [B, H, C, bq, Dv], lse [B, H, C, bq]."""
    idx = indices[:, :, qi]                                 # [B, H, C, M]
    cnt = counts[:, :, qi]
    par = partial[:, :, qi]
    c = qi.shape[0]
    bidx = jnp.arange(b)[:, None, None, None]
    hidx = kv_head[None, :, None, None]
    kg = kb[bidx, hidx, idx]                                # [B, H, C, M, bk, D]
    vg = vb[bidx, hidx, idx]
    qc = qb[:, :, qi]                                       # [B, H, C, bq, D]
    s = jnp.einsum("bhcqd,bhcmkd->bhcqmk", qc, kg,
                   preferred_element_type=jnp.float32) * scale
    k_pos = idx[..., None] * bk + jnp.arange(bk, dtype=jnp.int32)   # [B, H, C, M, bk]
    q_pos = q_pos_all[qi]                                   # [C, bq]
    slot_ok = jnp.arange(max_kv) < cnt[..., None]           # [B, H, C, M]
    ok = slot_ok[:, :, :, None, :, None] & (k_pos < tk)[:, :, :, None]
    if layout.mask_rule is not None:
      rule = layout.mask_rule(q_pos[None, None, :, :, None, None], k_pos[:, :, :, None])
      ok = ok & (rule | (par == 0)[:, :, :, None, :, None])
    if qsel is not None:
      sel = jnp.take_along_axis(qsel[:, :, qi], idx[:, :, :, None, :], axis=-1)  # [B,H,C,bq,M]
      ok = ok & sel[..., None]
    if q_segment_ids is not None:
      qs = qseg[:, qi]                                      # [B, C, bq]
      ks = kseg[jnp.arange(b)[:, None, None, None], idx]    # [B, H, C, M, bk]
      ok = ok & (qs[:, None, :, :, None, None] == ks[:, :, :, None])
    if bias_k is not None:
      bg = biasb[jnp.arange(b)[:, None, None, None], jnp.arange(hq)[None, :, None, None], idx]
      s = s + bg[:, :, :, None]
    s = jnp.where(ok, s, -jnp.inf)
    s = s.reshape(s.shape[:4] + (max_kv * bk,))
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    vflat = vg.reshape(b, hq, c, max_kv * bk, dv)
    o = jnp.einsum("bhcqj,bhcjd->bhcqd", p, vflat.astype(jnp.float32))
    o = o / jnp.where(l > 0, l, 1.0)
    lse = jnp.where(l[..., 0] > 0, jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)) + m[..., 0],
                    -jnp.inf)
    return o, lse

  if query_chunk is None or query_chunk >= nq:
    o, lse = one_chunk(jnp.arange(nq))
  else:
    if query_chunk <= 0:
      raise ValueError(f"query_chunk must be > 0, got {query_chunk}")
    n_chunks = -(-nq // query_chunk)
    ids = jnp.minimum(jnp.arange(n_chunks * query_chunk).reshape(n_chunks, query_chunk), nq - 1)
    oc, lc = jax.lax.map(one_chunk, ids)                    # [n, B, H, C, bq, ...]
    o = jnp.moveaxis(oc, 0, 2).reshape(b, hq, n_chunks * query_chunk, bq, dv)[:, :, :nq]
    lse = jnp.moveaxis(lc, 0, 2).reshape(b, hq, n_chunks * query_chunk, bq)[:, :, :nq]
  o = o.reshape(b, hq, nq * bq, dv)[:, :, :tq].transpose(0, 2, 1, 3).astype(out_dtype)
  lse = lse.reshape(b, hq, nq * bq)[:, :, :tq]
  return (o, lse) if return_lse else o


def _pallas_block_sparse(q, k, v, layout, *, scale, q_segment_ids, kv_segment_ids, return_lse):
  """Routes to the Pallas flash kernel (imported lazily: it is heavy to import)."""
  from pallas_kernels.flash.api import block_sparse_flash_attention
  d, dv = q.shape[-1], v.shape[-1]
  if d != dv:
    # The kernel wants one head dim: zero columns change neither q.k nor the kept output columns.
    width = max(d, dv)
    pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])
    q, k, v = pad(q), pad(k), pad(v)
  scale = d ** -0.5 if scale is None else float(scale)
  out = block_sparse_flash_attention(q, k, v, layout, scale=scale, q_segment_ids=q_segment_ids,
                                     kv_segment_ids=kv_segment_ids, return_lse=return_lse)
  if return_lse:
    return out[0][..., :dv], out[1]
  return out[..., :dv]


def reference_attention(q, k, v, layout: BlockLayout, *, scale=None, q_segment_ids=None,
                        kv_segment_ids=None, bias_k=None, return_lse=False):
  """The oracle: dense attention with `mask = dense_mask(layout)` (materialises [B, H, Tq, Tk])."""
  from attnjax.ops.softmax import dot_product_attention
  mask = layout_lib.dense_mask(layout)
  bias = None
  if bias_k is not None:
    hq, hk = q.shape[2], k.shape[2]
    bh = bias_k if bias_k.shape[1] == hq else jnp.repeat(bias_k, hq // hk, axis=1)
    bias = bh[:, :, None, :].astype(jnp.float32)
  return dot_product_attention(q, k, v, mask=mask, bias=bias, scale=scale,
                               q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                               return_lse=return_lse, implementation="reference")


def merge_attentions(outputs, lses):
  """Merges partial attentions over disjoint key sets by their log-sum-exp.

  `outputs[i] [B, T, H, Dv]`, `lses[i] [B, H, T]` -> `(o, lse)` with `lse = logsumexp_i lse_i` and
  `o = sum_i exp(lse_i - lse) o_i`. Parts with lse = -inf contribute nothing; all -inf gives zeros.
  """
  lse_all = jnp.stack([l.astype(jnp.float32) for l in lses])          # [n, B, H, T]
  m = jax.lax.stop_gradient(jnp.max(lse_all, axis=0))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(lse_all - m)
  tot = jnp.sum(w, axis=0)
  lse = jnp.where(tot > 0, jnp.log(jnp.where(tot > 0, tot, 1.0)) + m, -jnp.inf)
  wn = w / jnp.where(tot > 0, tot, 1.0)                               # [n, B, H, T]
  o = sum(wn[i].transpose(0, 2, 1)[..., None] * outputs[i].astype(jnp.float32)
          for i in range(len(outputs)))
  return o.astype(outputs[0].dtype), lse
