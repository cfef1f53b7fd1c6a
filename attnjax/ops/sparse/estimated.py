"""Estimated sparse attention: HyperAttention (Han et al. 2023, arXiv:2310.05869) and SEA (Lee et al. 2023, arXiv:2310.01777).

Both estimate where the heavy attention entries are from cheap sketches of Q and K, then run exact
softmax attention only there, through the block-sparse path (`attnjax.ops.block_sparse`):

* HyperAttention: sortLSH buckets queries and keys (angular LSH, Gray-code order), attention is
  block-diagonal in the sorted order, and `sample_size` uniformly sampled key columns estimate the
  rest (weight `Tk / sample_size`), merged through the log-sum-exp. Causal attention by recursive
  halving. Read from the authors' code (insuhan/hyper-attn `models/attention/hyper_attn.py`,
  `angular_lsh.py`).
* SEA: a kernel (Performer positive random features) linear-attention estimate of the attention
  matrix compressed to one column per key chunk, a top-k selection of chunks per query row, then
  sparse softmax attention over the selected chunks ("from abstract + summary", see `sea_attention`).

Each has a dense reference (`*_reference`) that states the definition as a dense mask / bias.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.cab import PatternUndefinedError
from attnjax.ops import block_sparse
from attnjax.ops import dispatch
from attnjax.ops import layout as L
from attnjax.ops.operators._common import PatternUndefinedError
from attnjax.ops.softmax import dot_product_attention
from attnjax.ops.sparse.routing import chunk_selection_layout


def _check_bthd(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or v.shape[:3] != k.shape[:3] or (
      q.shape[0] != k.shape[0]) or q.shape[-1] != k.shape[-1] or q.shape[2] % k.shape[2]:
    raise ValueError(f"q, k, v must be [B, Tq, H, D], [B, Tk, Hk, D], [B, Tk, Hk, Dv] with "
                     f"H % Hk == 0, got {q.shape}, {k.shape}, {v.shape}")


# ---------------------------------------------------------------------------------------------
# HyperAttention
# ---------------------------------------------------------------------------------------------


def angular_lsh_hash(x, proj):
  """Angular LSH bucket of each token: `[B, T, H, D] -> [B, H, T]` int32.

  `proj [D, r]` random directions; the sign pattern of `x . proj` is a bin id `b in [0, 2^r)`, and
  the bucket is its Gray code `b ^ (b >> 1)` (the authors' `AngularLSH.hash`: sorting by it puts
  bins one bit-flip apart next to each other). Not differentiable (sorting key only).
  """
  if proj.ndim != 2 or proj.shape[0] != x.shape[-1]:
    raise ValueError(f"proj must be [D={x.shape[-1]}, r], got {proj.shape}")
  bits = jnp.einsum("bthd,dr->bhtr", jax.lax.stop_gradient(x).astype(jnp.float32),
                    proj.astype(jnp.float32)) > 0
  b = jnp.sum(bits.astype(jnp.int32) << jnp.arange(proj.shape[1], dtype=jnp.int32), -1)
  return b ^ (b >> 1)


def _ranks(order):
  """Inverse permutation along the last axis: `ranks[..., order[..., p]] = p`."""
  return jnp.argsort(order, axis=-1).astype(jnp.int32)


def _hyper_plan(q, k, proj, block_size: int, sample_size: int, key):
  """Shared by the fast path and the reference: sort orders, block sizes and sampled columns."""
  tq, tk = q.shape[1], k.shape[1]
  q_order = jnp.argsort(angular_lsh_hash(q, proj), axis=-1, stable=True).astype(jnp.int32)
  k_order = jnp.argsort(angular_lsh_hash(k, proj), axis=-1, stable=True).astype(jnp.int32)
  n_blocks = -(-tk // block_size)
  # The authors pad the sorted queries to a multiple of block_size and split them into n_blocks
  # equal blocks (so q_block == block_size when Tq == Tk); the short last key block is kept short
  # here (their zero-padded keys would take softmax mass with score 0).
  q_block = -(-(-(-tq // block_size) * block_size) // n_blocks)
  samples = None
  if sample_size > 0 and key is not None and n_blocks > 1 and tq > q_block:
    # Sampled positions in the *sorted* key order (uniform over keys either way).
    samples = jax.random.randint(key, (k.shape[0], k.shape[2], sample_size), 0, tk)
  return q_order, k_order, q_block, samples


def _bucket_key_block(q, k, proj, k_order, block_size):
  """`[B, H, Tq]`: the sorted key block where each query's own LSH bucket would be inserted
  among the sorted key buckets (stable, clipped to the last block). Depends on the query and the
  keys only, never on the other queries."""
  h, hk = q.shape[2], k.shape[2]
  k_hash = jnp.take_along_axis(angular_lsh_hash(k, proj), k_order, axis=-1)   # sorted [B, Hk, Tk]
  k_hash = jnp.repeat(k_hash, h // hk, axis=1)
  pos = jax.vmap(jax.vmap(jnp.searchsorted))(k_hash, angular_lsh_hash(q, proj))
  return jnp.minimum(pos // block_size, -(-k.shape[1] // block_size) - 1).astype(jnp.int32)


def _hyper_noncausal(q, k, v, proj, *, block_size, sample_size, key, scale, query_blocks="rank"):
  """Non-causal HyperAttention -> (o [B, Tq, H, Dv], lse [B, H, Tq])."""
  b, tq, h, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  g = h // hk
  q_order, k_order, q_block, samples = _hyper_plan(q, k, proj, block_size, sample_size, key)
  ks = jnp.take_along_axis(k, k_order.transpose(0, 2, 1)[..., None], axis=1)
  vs = jnp.take_along_axis(v, k_order.transpose(0, 2, 1)[..., None], axis=1)
  nk = -(-tk // block_size)
  if query_blocks == "bucket":
    # Queries stay in place; each sees the one sorted key block its bucket falls in.
    qs = q
    q_blk = _bucket_key_block(q, k, proj, k_order, block_size)              # [B, H, Tq]
    lay = L.from_block_mask(q_blk[..., None] == jnp.arange(nk), None, block_q=1,
                            block_k=block_size, tq=tq, tk=tk, max_kv=1)
  else:
    # Block-diagonal in the sorted orders: query rank p sees key ranks r with p // qb == r // bs.
    qs = jnp.take_along_axis(q, q_order.transpose(0, 2, 1)[..., None], axis=1)
    nq = -(-tq // q_block)
    q_blk = (jnp.arange(tq) // q_block)[None, None]                          # sorted rank -> block
    lay = L.from_block_mask(np.eye(nq, nk, dtype=bool)[None, None], None, block_q=q_block,
                            block_k=block_size, tq=tq, tk=tk)
  o, lse = block_sparse.block_sparse_attention(qs, ks, vs, lay, scale=scale, return_lse=True)
  if samples is not None:
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(hk)[None, :, None]
    k_sub = ks[bi, samples, hi]                                     # [B, Hk, m, D]
    v_sub = vs[bi, samples, hi]
    s_blk = jnp.repeat(samples // block_size, g, axis=1)             # [B, H, m]
    keep = q_blk[..., :, None] != s_blk[:, :, None, :]               # hide the block-diagonal part
    o_res, lse_res = dot_product_attention(qs, k_sub.transpose(0, 2, 1, 3),
                                           v_sub.transpose(0, 2, 1, 3), mask=keep, scale=scale,
                                           return_lse=True, implementation="reference")
    lse_res = lse_res + math.log(tk / sample_size)                  # unbiased column estimate
    o, lse = block_sparse.merge_attentions([o, o_res], [lse, lse_res])
  if query_blocks == "bucket":
    return o, lse
  q_rank = _ranks(q_order)                                           # [B, H, Tq]
  o = jnp.take_along_axis(o, q_rank.transpose(0, 2, 1)[..., None], axis=1)
  lse = jnp.take_along_axis(lse, q_rank, axis=-1)
  return o, lse


def _hyper_counts_noncausal(q, k, proj, *, block_size, sample_size, key, query_blocks="rank"):
  """Dense definition: `C [B, H, Tq, Tk]`, the weight of key j in query i's estimated softmax."""
  h, hk = q.shape[2], k.shape[2]
  tk = k.shape[1]
  q_order, k_order, q_block, samples = _hyper_plan(q, k, proj, block_size, sample_size, key)
  if query_blocks == "bucket":
    q_blk = _bucket_key_block(q, k, proj, k_order, block_size)
  else:
    q_blk = _ranks(q_order) // q_block                               # [B, H, Tq]
  k_rank = jnp.repeat(_ranks(k_order), h // hk, axis=1)              # [B, H, Tk]
  same = q_blk[..., :, None] == (k_rank // block_size)[..., None, :]
  counts = same.astype(jnp.float32)
  if samples is not None:
    hits = jax.nn.one_hot(samples, tk, dtype=jnp.float32).sum(2)     # [B, Hk, Tk] by sorted rank
    hits = jnp.take_along_axis(jnp.repeat(hits, h // hk, axis=1), k_rank, axis=-1)
    counts = counts + jnp.where(same, 0.0, (tk / sample_size) * hits[..., None, :])
  return counts


def _hyper_recurse(q, k, v, *, key, causal, min_seq_len, noncausal_fn, exact_fn, combine, trim):
  """HyperAttention's causal recursion (insuhan/hyper-attn `hyper_attn.py`, `forward`): exact
  causal attention when `T <= min_seq_len`; else an odd T gets one all-zero row of q, k, v (only
  the padded query can see the padded key, and its row is dropped by `trim(result, T)`), the two
  diagonal halves recurse, and the lower-left quarter is non-causal, itself exact when its
  `T/2 < min_seq_len` queries are fewer than `min_seq_len` (`forward_no_causal_mask`).
  `combine(top, diag, off)` assembles the parts (outputs merged by lse, or count matrices)."""
  t = q.shape[1]
  if not causal:
    return exact_fn(q, k, v, False) if t < min_seq_len else noncausal_fn(q, k, v, key)
  if t <= min_seq_len:
    return exact_fn(q, k, v, True)
  odd = t % 2
  if odd:
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 1), (0, 0), (0, 0)))
    q, k, v = pad(q), pad(k), pad(v)
  half = (t + odd) // 2
  keys = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))
  rec = lambda a, b_, c, kk: _hyper_recurse(a, b_, c, key=kk, causal=True, min_seq_len=min_seq_len,
                                            noncausal_fn=noncausal_fn, exact_fn=exact_fn,
                                            combine=combine, trim=trim)
  top = rec(q[:, :half], k[:, :half], v[:, :half], keys[0])
  diag = rec(q[:, half:], k[:, half:], v[:, half:], keys[1])
  if half < min_seq_len:
    off = exact_fn(q[:, half:], k[:, :half], v[:, :half], False)
  else:
    off = noncausal_fn(q[:, half:], k[:, :half], v[:, :half], keys[2])
  out = combine(top, diag, off)
  return trim(out, t) if odd else out


def _check_hyper_args(q, k, block_size, sample_size, min_seq_len, causal, query_blocks="rank"):
  if query_blocks not in ("rank", "bucket"):
    raise ValueError(f"query_blocks must be 'rank' or 'bucket', got {query_blocks!r}")
  if block_size < 1 or sample_size < 0 or min_seq_len < 1:
    raise ValueError(f"block_size >= 1, sample_size >= 0 and min_seq_len >= 1 required, got "
                     f"{block_size}, {sample_size}, {min_seq_len}")
  if causal and q.shape[1] != k.shape[1]:
    raise PatternUndefinedError(f"hyper_attention: causal cross attention is undefined (the causal "
                                f"recursion halves one sequence); got Tq={q.shape[1]}, "
                                f"Tk={k.shape[1]}")


def hyper_attention(q, k, v, proj, *, block_size: int = 256, sample_size: int = 256, key=None,
                    causal: bool = False, min_seq_len: int = 4096, scale=None,
                    return_lse: bool = False, query_blocks: str = "rank"):
  """HyperAttention (Han et al. 2023, arXiv:2310.05869) on `[B, T, H, D]` (GQA: keys sorted per kv head).

  Non-causal: queries and keys are sorted by `angular_lsh_hash(., proj)`; query rank p attends the
  key ranks r with `p // qb == r // block_size` (`qb = ceil(Tq / ceil(Tk / block_size))`), a
  block-diagonal `BlockLayout` on the sorted tokens; plus `sample_size` key columns drawn uniformly
  (with replacement) from `key`, outside the query's block, weighted `Tk / sample_size`, merged
  through the log-sum-exp (the estimated normaliser is unbiased). `key=None` or `sample_size=0`:
  block-diagonal part only. Queries with `Tq < min_seq_len` use exact attention, as in the authors'
  code. Causal (Tq == Tk): exact when `T <= min_seq_len`, else recursive halving as the authors'
  `forward` (odd T padded by one zero row; the two diagonal halves recurse, the lower-left block is
  non-causal and exact below `min_seq_len` queries). Paper/code defaults: 7 LSH projections,
  block 256, 256 samples, min_seq_len 4096. Memory: O(T * (block_size + sample_size)).
  Returns `o`, or `(o, lse [B, H, Tq])`.

  `query_blocks="rank"` is the authors' partition: the p-th query in sorted order takes block
  `p // qb`, so which keys a query sees depends on the other queries' buckets, and in the causal
  recursion's lower-left blocks on *later* queries (the authors' causal mode is not causal in the
  routing: changing a later token can change an earlier output). `"bucket"` (a deviation, for
  causal language models): a query sees the sorted key block its own bucket falls in
  (`_bucket_key_block`), so an output depends only on its query and the keys it may see.
  """
  _check_bthd(q, k, v)
  _check_hyper_args(q, k, block_size, sample_size, min_seq_len, causal, query_blocks)

  def noncausal(q_, k_, v_, kk):
    return _hyper_noncausal(q_, k_, v_, proj, block_size=block_size, sample_size=sample_size,
                            key=kk, scale=scale, query_blocks=query_blocks)

  def exact(q_, k_, v_, c):
    return dot_product_attention(q_, k_, v_, causal=c, scale=scale, return_lse=True,
                                 implementation="reference")

  def combine(top, diag, off):
    ob, lb = block_sparse.merge_attentions([diag[0], off[0]], [diag[1], off[1]])
    return jnp.concatenate([top[0], ob], 1), jnp.concatenate([top[1], lb], -1)

  o, lse = _hyper_recurse(q, k, v, key=key, causal=causal, min_seq_len=min_seq_len,
                          noncausal_fn=noncausal, exact_fn=exact, combine=combine,
                          trim=lambda r, t: (r[0][:, :t], r[1][..., :t]))
  return (o, lse) if return_lse else o


def hyper_attention_counts(q, k, proj, *, block_size: int = 256, sample_size: int = 256, key=None,
                           causal: bool = False, min_seq_len: int = 4096,
                           query_blocks: str = "rank"):
  """`C [B, H, Tq, Tk]` float: the dense definition of `hyper_attention`'s estimate, which equals
  `softmax_j(s_ij + log C_ij)` over `C_ij > 0` (the same sort orders, samples and recursion)."""
  _check_hyper_args(q, k, block_size, sample_size, min_seq_len, causal, query_blocks)
  h = q.shape[2]

  def noncausal(q_, k_, v_, kk):
    return _hyper_counts_noncausal(q_, k_, proj, block_size=block_size, sample_size=sample_size,
                                   key=kk, query_blocks=query_blocks)

  def exact(q_, k_, v_, c):
    ones = jnp.ones((q_.shape[0], h, q_.shape[1], k_.shape[1]), jnp.float32)
    return jnp.tril(ones) if c else ones

  def combine(top, diag, off):
    upper = jnp.concatenate([top, jnp.zeros(top.shape[:3] + (diag.shape[-1],), jnp.float32)], -1)
    return jnp.concatenate([upper, jnp.concatenate([off, diag], -1)], -2)

  return _hyper_recurse(q, k, k, key=key, causal=causal, min_seq_len=min_seq_len,
                        noncausal_fn=noncausal, exact_fn=exact, combine=combine,
                        trim=lambda c, t: c[..., :t, :t])


def hyper_attention_reference(q, k, v, proj, *, scale=None, return_lse=False, **kw):
  """Dense oracle: attention with bias `log C` and mask `C > 0` (`hyper_attention_counts`)."""
  _check_bthd(q, k, v)
  c = hyper_attention_counts(q, k, proj, **kw)
  return dot_product_attention(q, k, v, mask=c > 0, bias=jnp.log(jnp.where(c > 0, c, 1.0)),
                               scale=scale, return_lse=return_lse, implementation="reference")


# ---------------------------------------------------------------------------------------------
# SEA
# ---------------------------------------------------------------------------------------------


def performer_features(x, proj, *, stabilizer=None):
  """Positive random features `phi(x) = exp(w^T x' - |x'|^2 / 2 - c) / sqrt(r)`, `x' = x D^-1/4`,
  so that `E[phi(q) . phi(k)] = exp(q.k / sqrt(D)) e^{-2c}` (FAVOR+). `x [B, T, H, D]`,
  `proj [D, r]` -> `[B, H, T, r]` float32. `stabilizer` c defaults to the max exponent over the
  whole tensor (a constant factor: it cancels in any per-row normalisation)."""
  d = x.shape[-1]
  xs = x.astype(jnp.float32) * d ** -0.25
  wx = jnp.einsum("bthd,dr->bhtr", xs, proj.astype(jnp.float32))
  expo = wx - 0.5 * jnp.sum(xs * xs, -1).transpose(0, 2, 1)[..., None]
  c = jax.lax.stop_gradient(jnp.max(expo)) if stabilizer is None else stabilizer
  return jnp.exp(expo - c) / math.sqrt(proj.shape[1])


def sea_estimate(q, k, proj, *, chunk_size: int):
  """SEA's compressed attention estimate `A^ [B, H, Tq, nC]`: row i, column c is the kernel
  estimate of the attention mass of key chunk c, `phi(q_i) . sum_{j in c} phi(k_j)` normalised over
  the chunks. Linear in T: `O(T * nC * r)` (the chunk sums are computed once). Detached."""
  b, tk, hk, d = k.shape
  h = q.shape[2]
  nc = -(-tk // chunk_size)
  fq = performer_features(jax.lax.stop_gradient(q), proj)                  # [B, H, Tq, r]
  fk = performer_features(jax.lax.stop_gradient(k), proj)                  # [B, Hk, Tk, r]
  fk = jnp.pad(fk, ((0, 0), (0, 0), (0, nc * chunk_size - tk), (0, 0)))
  sums = fk.reshape(b, hk, nc, chunk_size, -1).sum(3)                      # [B, Hk, nC, r]
  sums = jnp.repeat(sums, h // hk, axis=1)
  est = jnp.einsum("bhtr,bhcr->bhtc", fq, sums)
  return est / jnp.maximum(est.sum(-1, keepdims=True), 1e-30)


def sea_selection(est, *, chunk_size: int, top_k: int, tk: int, causal: bool = False):
  """`[B, H, Tq, nC]` bool: the `top_k` chunks with the largest estimate per query row (exactly
  `min(top_k, visible chunks)`). Causal (bottom-right aligned): future chunks never, the query's
  own chunk always (so no row is empty), as MoBA does."""
  tq, nc = est.shape[2], est.shape[3]
  kk = min(top_k, nc)
  score = est
  if causal:
    own = ((jnp.arange(tq) + tk - tq) // chunk_size)[:, None]
    c = jnp.arange(nc)[None]
    score = jnp.where(c > own, -jnp.inf, jnp.where(c == own, jnp.inf, est))
  vals, idx = jax.lax.top_k(score, kk)
  onehot = (idx[..., None] == jnp.arange(nc)) & (vals > -jnp.inf)[..., None]
  return onehot.any(-2)


def sea_attention(q, k, v, proj, *, chunk_size: int, top_k: int, causal: bool = False, scale=None,
                  implementation: str | None = None, return_lse: bool = False):
  """SEA (Lee et al. 2023, arXiv:2310.01777) on `[B, T, H, D]`: softmax attention over each query's `top_k` key chunks of
  `chunk_size` tokens, chosen by the kernel estimate `sea_estimate` (Performer features `proj
  [D, r]`). `top_k >= nC` is exact attention. The selection is detached, so gradients flow through
  the sparse softmax only (the paper trains its estimator by distilling the teacher's attention:
  `sea_distillation_loss`).

  Reading ("from abstract + summary": the paper's learned CNN decoder that sharpens the compressed
  estimate, and its FlatCSR kernel, are not reproduced): the compressed matrix has one column per
  contiguous key chunk, the grouped top-k is taken per query row over those columns, and
  interpolating back to tokens gives every key of a selected chunk, so a row has exactly `top_k`
  chunks. `implementation` goes to `block_sparse_attention` ("reference": the same selection as a
  dense mask, the oracle).
  """
  _check_bthd(q, k, v)
  if chunk_size < 1 or top_k < 1:
    raise ValueError(f"chunk_size and top_k must be >= 1, got {chunk_size}, {top_k}")
  if proj.ndim != 2 or proj.shape[0] != q.shape[-1]:
    raise ValueError(f"proj must be [D={q.shape[-1]}, r], got {proj.shape}")
  tq, tk = q.shape[1], k.shape[1]
  est = sea_estimate(q, k, proj, chunk_size=chunk_size)
  sel = sea_selection(est, chunk_size=chunk_size, top_k=top_k, tk=tk, causal=causal)
  lay = chunk_selection_layout(sel, tq, tk, chunk_size=chunk_size, top_k=top_k, causal=causal)
  dispatch.check_implementation(implementation, op="sea_attention")
  fn = functools.partial(block_sparse.block_sparse_attention, implementation=implementation)
  return fn(q, k, v, lay, scale=scale, return_lse=return_lse)


def sea_distillation_loss(q, k, proj, *, chunk_size: int, scale=None, causal: bool = False):
  """KL(teacher || estimate) per row, averaged: the teacher is the exact attention compressed to
  chunks (`sum_{j in c} softmax_j(s_ij)`), the student `sea_estimate` (differentiable in `proj` and,
  through the features, in q and k when not detached by the caller). `causal` (bottom-right
  aligned): the teacher is causal attention and the estimate is normalised over the chunks that
  hold a visible key (the selection never takes another). O(T^2): a training loss."""
  b, tk, hk, d = k.shape
  tq, h = q.shape[1], q.shape[2]
  nc = -(-tk // chunk_size)
  scale = d ** -0.5 if scale is None else scale
  kr = jnp.repeat(k, h // hk, axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q, kr).astype(jnp.float32) * scale
  pos = jnp.arange(tq) + (tk - tq)
  if causal:
    s = jnp.where(jnp.arange(tk)[None, :] <= pos[:, None], s, -jnp.inf)
  p = jax.nn.softmax(s, -1)
  p = jnp.pad(p, ((0, 0), (0, 0), (0, 0), (0, nc * chunk_size - tk)))
  teacher = p.reshape(p.shape[:3] + (nc, chunk_size)).sum(-1)
  fq = performer_features(q, proj)
  fk = jnp.pad(performer_features(k, proj), ((0, 0), (0, 0), (0, nc * chunk_size - tk), (0, 0)))
  sums = jnp.repeat(fk.reshape(b, hk, nc, chunk_size, -1).sum(3), h // hk, axis=1)
  est = jnp.einsum("bhtr,bhcr->bhtc", fq, sums)
  if causal:
    est = jnp.where(jnp.arange(nc)[None, :] * chunk_size <= pos[:, None], est, 0.0)
  est = est / jnp.maximum(est.sum(-1, keepdims=True), 1e-30)
  kl = teacher * (jnp.log(jnp.maximum(teacher, 1e-30)) - jnp.log(jnp.maximum(est, 1e-30)))
  return jnp.mean(jnp.sum(kl, -1))
