"""Sparse / routed attention layers and their registered sequence mixers.

Registered (all inside `MultiHeadAttention`, so RoPE, GQA and QK-norm options apply):
* `sliding_window_sparse`: causal (or symmetric) sliding window through the block-sparse path.
* `moba`: MoBA top-k chunk attention (per-token gate, causal current chunk).
* `power_attention`: PowerAttention's static log-distance block pattern (causal).
* `s2_attention`: S2-Attention per-head strided shards plus a local band (causal).
* `vmoba`: MoBA with VMoBA's threshold selection (1D chunks on sequences).
* `sink_local_sparse`, `strided_sparse`: sink + local window, Sparse Transformer strided (causal).
* `routing` (Routing Transformer), `dynamic_mask` (DMA), `landmark`, `hyper_attention`, `sea`,
  `radial` (non-causal), `flux_attention` (router between full and sliding-window attention).
2D layer for backbones: `BiLevelRoutingAttention2D` (BiFormer, with LCE).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.cab import PatternUndefinedError
from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.layers import dense
from attnjax.ops import block_sparse
from attnjax.ops import layout as L
from attnjax.ops.softmax import dot_product_attention
from attnjax.ops.sparse import corrections, dynamic, estimated, patterns, routing
from attnjax.registry import register_mixer


def _self_only(name, q, k, mask, why="one token sequence"):
  """Raises `PatternUndefinedError` on a cross call (`Tk != Tq` outside decoding): the mechanism
  is defined on one sequence (`why`)."""
  if mask is None and q.shape[1] != k.shape[1]:
    raise PatternUndefinedError(f"{name}: cross attention is undefined ({why}); got Tq={q.shape[1]}, "
                                f"Tk={k.shape[1]}")


def _causal_only(name, causal):
  if not causal:
    raise PatternUndefinedError(f"{name}: the non-causal pattern is undefined (causal only)")


@functools.lru_cache(maxsize=64)
def _window_layout(t, left, right, block):
  return L.from_rule(L.WindowRule(left, right), block_q=block, block_k=block, tq=t, tk=t)


def sliding_window_sparse_fn(q, k, v, *, causal, mask=None, q_segment_ids=None,
                             kv_segment_ids=None, window: int = 16, block: int = 16,
                             implementation=None, **unused):
  """Keys `i - window <= j <= i` (causal) or `|i - j| <= window`, via `block_sparse_attention`
  (`implementation`, an `attn_options` entry, goes to it; None: the flash kernel on a CUDA GPU when
  `block` is a power of two >= 16). Decoding (cache `mask` given) uses the dense path."""
  if mask is not None:
    q_pos = jnp.sum(mask, axis=-1, keepdims=True) - 1
    nb = mask & (jnp.arange(k.shape[1]) >= q_pos - window)
    return dot_product_attention(q, k, v, mask=nb, implementation="reference")
  _self_only("sliding_window_sparse", q, k, mask, "the window is on one token axis")
  lay = _window_layout(q.shape[1], window, 0 if causal else window, block)
  return block_sparse.block_sparse_attention(q, k, v, lay, q_segment_ids=q_segment_ids,
                                             kv_segment_ids=kv_segment_ids,
                                             implementation=implementation)


@register_mixer("sliding_window_sparse", "Sliding-window softmax via the block-sparse layout path.")
def _build_sws(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, window: int = 16,
               block: int = 16, **options: Any):
  fn = functools.partial(sliding_window_sparse_fn, window=window, block=block)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


def moba_fn(q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
            chunk_size: int = 8, top_k: int = 2, threshold: float | None = None,
            implementation=None, **unused):
  """MoBA as an `attn_fn`. Packed sequences and decoding are not supported (chunk gates are over
  absolute chunks, and a partially filled cache would pollute the chunk means)."""
  if mask is not None:
    raise NotImplementedError("moba: decode is not implemented")
  if q_segment_ids is not None:
    raise NotImplementedError("moba: segment_ids are not supported (chunks are absolute)")
  return routing.moba_attention(q, k, v, chunk_size=chunk_size, top_k=top_k, causal=causal,
                                threshold=threshold, implementation=implementation)


@register_mixer("moba", "MoBA: per-token top-k key chunks by q . mean(K_chunk) (block-sparse path).")
def _build_moba(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, chunk_size: int = 8,
                top_k: int = 2, **options: Any):
  fn = functools.partial(moba_fn, chunk_size=chunk_size, top_k=top_k)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


@register_mixer("vmoba", "VMoBA on sequences: MoBA chunks chosen by cumulative gate mass >= threshold.")
def _build_vmoba(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, chunk_size: int = 8,
                 top_k: int = 3, threshold: float = 0.5, **options: Any):
  fn = functools.partial(moba_fn, chunk_size=chunk_size, top_k=top_k, threshold=threshold)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


@functools.lru_cache(maxsize=64)
def _static_layout(kind, t, block, num_heads, a, b):
  if kind == "power":
    return patterns.power_attention_layout(t, block, num_sink_blocks=a)
  if kind == "sink_local":
    return patterns.sink_local_layout(t, num_sink=a, window=b, block=block)
  if kind == "strided":
    return patterns.strided_layout(t, stride=a, local=b, block=block)
  return patterns.s2_layout(t, num_heads, block, local_blocks=a, vert_stride=b)


def static_pattern_fn(q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
                      kind: str = "power", block: int = 4, a: int = 1, b: int = 4,
                      implementation=None, **unused):
  """Causal static block pattern (`kind` "power", "s2", "sink_local" or "strided") as an
  `attn_fn`; `a`, `b` are the pattern's two integer options (see `_static_layout`).
  `implementation` (an `attn_options` entry) goes to `block_sparse_attention` (None: the flash
  kernel on a CUDA GPU when `block` is a power of two >= 16)."""
  if mask is not None:
    raise NotImplementedError(f"{kind} pattern: decode is not implemented")
  _causal_only(f"{kind} pattern", causal)
  _self_only(f"{kind} pattern", q, k, mask, "a static block pattern on one token axis")
  if q_segment_ids is not None:
    raise NotImplementedError(f"{kind} pattern: segment_ids are not supported (absolute blocks)")
  lay = _static_layout(kind, q.shape[1], block, q.shape[2], a, b)
  return block_sparse.block_sparse_attention(q, k, v, lay, implementation=implementation)


@register_mixer("power_attention", "PowerAttention: causal blocks at distance 0, 1, 2^m (+ sink).")
def _build_power(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, block: int = 4,
                 num_sink_blocks: int = 1, **options: Any):
  _causal_only("power_attention", causal)
  fn = functools.partial(static_pattern_fn, kind="power", block=block, a=num_sink_blocks)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


@register_mixer("s2_attention", "S2-Attention: per-head strided block shards + local band (causal).")
def _build_s2(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, block: int = 4,
              local_blocks: int = 1, vert_stride: int = 2, **options: Any):
  _causal_only("s2_attention", causal)
  fn = functools.partial(static_pattern_fn, kind="s2", block=block, a=local_blocks, b=vert_stride)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


@register_mixer("sink_local_sparse", "Attention sinks + causal local window (block-sparse path).")
def _build_sink_local(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                      block: int = 4, num_sink: int = 2, window: int = 8, **options: Any):
  _causal_only("sink_local_sparse", causal)
  fn = functools.partial(static_pattern_fn, kind="sink_local", block=block, a=num_sink, b=window)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


@register_mixer("strided_sparse", "Sparse Transformer strided pattern: local band + every stride-th.")
def _build_strided(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, block: int = 4,
                   stride: int = 4, local: int = 4, **options: Any):
  _causal_only("strided_sparse", causal)
  fn = functools.partial(static_pattern_fn, kind="strided", block=block, a=stride, b=local)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


class BiLevelRoutingAttention2D(nnx.Module):
  """BiFormer BRA layer on `x [B, X, Y, C]`: q/k/v projections, `bra_attention` over an S x S
  region grid with `top_k` routed regions, plus LCE (a depth-wise 5x5 convolution of V) added to
  the output before the output projection. As the authors' `BiLevelRoutingAttention`
  (rayleizhu/BiFormer `ops/bra_legacy.py`): token attention scaled by `C ** -0.5` (their `qk_dim`
  is the full width), and a map S does not divide is zero-padded at the bottom / right before the
  projections (`auto_pad`) and the output cropped."""

  def __init__(self, dim: int, num_heads: int, *, regions: int = 7, top_k: int = 4,
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
    self.num_heads, self.head_dim, self.regions, self.top_k = num_heads, dim // num_heads, regions, top_k
    self.qkv = dense(dim, 3 * dim, axes=("embed", "heads"), rngs=rngs, use_bias=True)
    self.proj = dense(dim, dim, axes=("heads", "embed"), rngs=rngs, use_bias=True)
    self.lce = nnx.Conv(dim, dim, kernel_size=(5, 5), feature_group_count=dim, padding="SAME",
                        rngs=rngs)

  def __call__(self, x):
    if x.ndim != 4:
      raise ValueError(f"x must be [B, X, Y, C], got {x.shape}")
    b, h_in, w_in, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, -h_in % self.regions), (0, -w_in % self.regions), (0, 0)))
    _, sx, sy, _ = x.shape
    qkv = self.qkv(x).reshape(b, sx, sy, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    o = routing.bra_attention(q, k, v, regions=self.regions, top_k=self.top_k, scale=c ** -0.5)
    o = o.reshape(b, sx, sy, c) + self.lce(v.reshape(b, sx, sy, c))
    return self.proj(o)[:, :h_in, :w_in]


# ---------------------------------------------------------------------------------------------
# Dynamic patterns as mixers. The attention function is an `nnx.Module` (its parameters and
# buffers live in the mixer's graph) passed to `MultiHeadAttention` as `attn_fn`.
# ---------------------------------------------------------------------------------------------


class _Buffer(nnx.Variable):
  """A non-trainable array owned by an attention function (centroids, LSH / feature projections)."""


def _visibility(q, k, *, causal, mask, q_segment_ids, kv_segment_ids):
  """`[B|1, 1, Tq, Tk]` bool: cache mask (decode), causal (bottom-right) and segment ids."""
  tq, tk = q.shape[1], k.shape[1]
  vis = jnp.ones((1, 1, tq, tk), bool)
  if mask is not None:
    vis = vis & mask
  if causal:
    vis = vis & (jnp.arange(tk)[None, :] <= jnp.arange(tq)[:, None] + (tk - tq))
  if q_segment_ids is not None:
    kv = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    vis = vis & (q_segment_ids[:, None, :, None] == kv[:, None, None, :])
  return vis


class RoutingAttnFn(nnx.Module):
  """Routing Transformer (Roy et al. 2020, arXiv:2003.05997) attention function with `num_clusters` centroids per head (a
  non-Param buffer), trained as lucidrains/routing-transformer trains them.

  Training (`deterministic=False`, the default; `model.eval()` sets it True, as for BatchNorm):
  every full forward (not a decode step) moves the centroids one k-means EMA step
  (`dynamic.update_centroids`, decay `ema_decay`) towards the unit queries and keys (keys only
  with `shared_qk`) assigned to them, and sows the commitment loss `commitment *
  dynamic.commitment_loss` as "aux_loss" (the trainer adds every sown aux loss and returns the
  changed buffers from its step). Routing uses the centroids from before the step.

  Non-causal self attention without packing: `dynamic.balanced_routing_attention` (balanced top-w
  query and key membership per cluster, lucidrains' `KmeansAttention`). Causal, decoding, cross
  and packed sequences: a query and a key each join their nearest centroid (argmax), so a token's
  cluster never depends on other tokens and a decode step sees exactly what the full forward saw
  (the balanced top-w over the whole sequence would let later tokens push earlier ones out of a
  cluster); a dense mask (O(T^2) memory). `shared_qk=True` routes with k = q (the paper's shared
  projection: keys unit-normalised, a token sees itself only when nothing else is visible); its
  decode is not implemented (the cache holds k-projections)."""

  def __init__(self, num_heads, head_dim, num_clusters, window, rngs, *, shared_qk=False,
               ema_decay=0.999, commitment=1e-4):
    if not 0.0 <= ema_decay <= 1.0:
      raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
    c = jax.random.normal(rngs.params(), (num_heads, num_clusters, head_dim))
    self.centroids = _Buffer(c / jnp.linalg.norm(c, axis=-1, keepdims=True))
    self.window, self.shared_qk = window, shared_qk
    self.ema_decay, self.commitment = ema_decay, commitment
    self.deterministic = False

  def update(self, x, decay: float | None = None):
    """One k-means EMA step on `x [B, T, H, D]` (what a training forward does)."""
    decay = self.ema_decay if decay is None else decay
    self.centroids[...] = dynamic.update_centroids(self.centroids[...], x, decay)

  def __call__(self, q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
               **unused):
    cent = self.centroids[...]
    if self.shared_qk:
      if mask is not None:
        raise NotImplementedError("routing(shared_qk=True): decode is not implemented (the cache "
                                  "holds the k projection, not q)")
      if q.shape[1] != k.shape[1] or q.shape[2] != k.shape[2]:
        raise PatternUndefinedError("routing(shared_qk=True): cross attention is undefined (keys "
                                    "are the queries)")
      k = q
    if not self.deterministic and mask is None:
      kr = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
      x = kr if self.shared_qk else jnp.concatenate([q, kr], axis=1)
      self.sow(nnx.Intermediate, "aux_loss", self.commitment * dynamic.commitment_loss(x, cent))
      self.centroids[...] = dynamic.update_centroids(cent, x, self.ema_decay)
    if not causal and mask is None and q_segment_ids is None and q.shape[1] == k.shape[1]:
      return dynamic.balanced_routing_attention(q, k, v, cent, window=self.window,
                                                shared_qk=self.shared_qk)
    same = dynamic.routing_mask(q, k, cent, window=min(self.window, k.shape[1]), causal=False,
                                balanced=False)
    vis = same & _visibility(q, k, causal=causal, mask=mask, q_segment_ids=q_segment_ids,
                             kv_segment_ids=kv_segment_ids)
    if self.shared_qk:
      k = dynamic._unit(k).astype(q.dtype)
      eye = jnp.eye(q.shape[1], dtype=bool)
      others = vis & ~eye
      vis = jnp.where(others.any(-1, keepdims=True), others, vis)
    return dot_product_attention(q, k, v, mask=vis, implementation="reference")


@register_mixer("routing", "Routing Transformer: k-means routed attention (online centroids).")
def _build_routing(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                   num_clusters: int = 3, window: int = 8, shared_qk: bool = False,
                   ema_decay: float = 0.999, commitment: float = 1e-4, **options: Any):
  fn = RoutingAttnFn(num_heads, d_model // num_heads, num_clusters, window, rngs,
                     shared_qk=shared_qk, ema_decay=ema_decay, commitment=commitment)
  # No RoPE by default: clusters of rotated vectors would depend on absolute positions, so a packed
  # sequence would route differently from the same sequence alone.
  options.setdefault("rope", False)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


class DynamicMaskAttnFn(nnx.Module):
  """Trainable Dynamic Mask attention (Shi et al. 2025, arXiv:2508.02124): per-key bias `exp(A softplus(V W_dt))` added to the
  scores, each query keeps its `keep_window` visible keys with the largest bias. Non-causal without
  segments uses the block-sparse path (`dynamic.dma_attention`); otherwise the per-query top-w over
  the visible keys (causal prefix, cache, segment) as a dense mask, which also decodes exactly."""

  def __init__(self, num_heads, num_kv_heads, head_dim, keep_window, rngs):
    self.dt_weight = nnx.Param(jax.random.normal(rngs.params(), (num_kv_heads * head_dim, num_heads))
                               * (num_kv_heads * head_dim) ** -0.5)
    self.a = nnx.Param(-jnp.ones((num_heads,)))
    self.keep_window = keep_window

  def __call__(self, q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
               implementation=None, **unused):
    bias = dynamic.dma_key_bias(v, self.dt_weight[...], self.a[...])          # [B, H, Tk]
    if not causal and mask is None and q_segment_ids is None:
      return dynamic.dma_attention(q, k, v, bias, keep_window=self.keep_window, causal=False,
                                   block=8, implementation=implementation)
    if implementation not in (None, "reference"):
      raise ValueError(f"dynamic_mask: implementation={implementation!r} cannot serve causal, "
                       "masked or packed calls (per-query top-w over the visible keys: dense "
                       "mask only; use None or 'reference')")
    vis = _visibility(q, k, causal=causal, mask=mask, q_segment_ids=q_segment_ids,
                      kv_segment_ids=kv_segment_ids)
    s = jnp.where(vis, jax.lax.stop_gradient(bias)[:, :, None, :], -jnp.inf)
    kk = min(self.keep_window, k.shape[1])
    thr = jax.lax.top_k(s, kk)[0][..., -1:]
    keep = vis & (s >= thr)
    return dot_product_attention(q, k, v, mask=keep, bias=bias[:, :, None, :],
                                 implementation="reference")


@register_mixer("dynamic_mask", "Trainable Dynamic Mask attention: per-key bias from V, top-w keys.")
def _build_dynamic_mask(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                        keep_window: int = 6, num_kv_heads: int | None = None, **options: Any):
  hk = num_heads if num_kv_heads is None else num_kv_heads
  fn = DynamicMaskAttnFn(num_heads, hk, d_model // num_heads, keep_window, rngs)
  return MultiHeadAttention(d_model, num_heads, num_kv_heads=hk, causal=causal, attn_fn=fn,
                            rngs=rngs, **options)


def landmark_fn(q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
                block: int = 4, top_k: int | None = None, **unused):
  """Landmark attention (Mohtashami & Jaggi 2023, arXiv:2305.16300) as an `attn_fn`: every `(block + 1)`-th position acts as the landmark
  of the `block` tokens before it (`attnjax.data.landmark.insert_landmarks` places the landmark
  tokens there). Causal only; dense O(T^2) grouped softmax; no packed sequences. Decoding (cache
  `mask` given) retrieves blocks through their landmarks as the full forward does (`top_k` other
  blocks at most when set, the paper's inference retrieval)."""
  if q_segment_ids is not None:
    raise NotImplementedError("landmark: segment_ids are not supported (absolute landmark slots)")
  if mask is not None:
    m = jnp.broadcast_to(mask, mask.shape[:-2] + (q.shape[1], k.shape[1]))
    q_pos = jnp.sum(m[(0,) * (m.ndim - 2)], axis=-1) - 1                  # cache mask: k <= q_pos
    return dynamic.landmark_attention(q, k, v, block, top_k=top_k, q_pos=q_pos, key_mask=m)
  _self_only("landmark", q, k, mask, "landmarks are tokens of the sequence itself")
  return dynamic.landmark_attention(q, k, v, block, top_k=top_k)


@register_mixer("landmark", "Landmark attention: grouped softmax gated by a landmark per block.")
def _build_landmark(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, block: int = 4,
                    top_k: int | None = None, **options: Any):
  _causal_only("landmark", causal)
  fn = functools.partial(landmark_fn, block=block, top_k=top_k)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


class HyperAttnFn(nnx.Module):
  """HyperAttention (Han et al. 2023, arXiv:2310.05869) attention function: fixed random LSH directions (a buffer) and a fixed
  sampling seed, so a call is deterministic (the paper redraws samples at every call). Causal
  calls use `query_blocks="bucket"` by default (a query's key block from its own LSH bucket): the
  authors' rank partition lets later tokens change earlier outputs (see `hyper_attention`)."""

  def __init__(self, head_dim, num_projs, block_size, sample_size, min_seq_len, seed, rngs,
               causal_query_blocks="bucket"):
    self.proj = _Buffer(jax.random.normal(rngs.params(), (head_dim, num_projs)))
    self.block_size, self.sample_size, self.min_seq_len, self.seed = (block_size, sample_size,
                                                                      min_seq_len, seed)
    self.causal_query_blocks = causal_query_blocks

  def __call__(self, q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
               **unused):
    if mask is not None:
      raise NotImplementedError("hyper_attention: decode is not implemented")
    if q_segment_ids is not None:
      raise NotImplementedError("hyper_attention: segment_ids are not supported (LSH buckets mix "
                                "segments)")
    return estimated.hyper_attention(q, k, v, self.proj[...], block_size=self.block_size,
                                     sample_size=self.sample_size, key=jax.random.key(self.seed),
                                     causal=causal, min_seq_len=self.min_seq_len,
                                     query_blocks=self.causal_query_blocks if causal else "rank")


@register_mixer("hyper_attention", "HyperAttention: sortLSH block-diagonal + sampled columns.")
def _build_hyper(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, num_projs: int = 3,
                 block_size: int = 4, sample_size: int = 4, min_seq_len: int = 4, seed: int = 0,
                 causal_query_blocks: str = "bucket", **options: Any):
  fn = HyperAttnFn(d_model // num_heads, num_projs, block_size, sample_size, min_seq_len, seed,
                   rngs, causal_query_blocks)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


class SEAAttnFn(nnx.Module):
  """SEA (Lee et al. 2023, arXiv:2310.01777) attention function: a Performer random-feature estimator (`proj`, a trained Param)
  estimates the chunk-level attention; each query attends its top-k chunks (own chunk forced when
  causal). The selection is detached, so the estimator learns only from SEA's distillation loss:
  in training (`deterministic=False`; `model.eval()` sets it True) every full forward sows
  `distill_weight * sea_distillation_loss` on detached q, k as "aux_loss" (KL from the exact
  attention compressed to chunks to the estimate), which the trainer adds to the task loss."""

  def __init__(self, head_dim, num_features, chunk_size, top_k, rngs, *, distill_weight=1.0):
    self.proj = nnx.Param(jax.random.normal(rngs.params(), (head_dim, num_features)))
    self.chunk_size, self.top_k, self.distill_weight = chunk_size, top_k, distill_weight
    self.deterministic = False

  def __call__(self, q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
               implementation=None, **unused):
    if mask is not None:
      raise NotImplementedError("sea: decode is not implemented")
    if q_segment_ids is not None:
      raise NotImplementedError("sea: segment_ids are not supported (chunks are absolute)")
    proj = self.proj[...]
    if not self.deterministic and self.distill_weight:
      loss = estimated.sea_distillation_loss(jax.lax.stop_gradient(q), jax.lax.stop_gradient(k),
                                             proj, chunk_size=self.chunk_size, causal=causal)
      self.sow(nnx.Intermediate, "aux_loss", self.distill_weight * loss)
    return estimated.sea_attention(q, k, v, jax.lax.stop_gradient(proj),
                                   chunk_size=self.chunk_size, top_k=self.top_k, causal=causal,
                                   implementation=implementation)


@register_mixer("sea", "SEA: kernel-estimated chunk attention, top-k chunks per query (sparse).")
def _build_sea(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, chunk_size: int = 4,
               top_k: int = 2, num_features: int = 32, distill_weight: float = 1.0,
               **options: Any):
  fn = SEAAttnFn(d_model // num_heads, num_features, chunk_size, top_k, rngs,
                 distill_weight=distill_weight)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


@functools.lru_cache(maxsize=64)
def _radial_layout(t, frame_tokens, block, decay_factor, model_type):
  if t % frame_tokens:
    raise ValueError(f"radial: T={t} must be a multiple of frame_tokens={frame_tokens} (whole "
                     f"frames)")
  return patterns.radial_layout(t // frame_tokens, frame_tokens, block, decay_factor=decay_factor,
                                model_type=model_type)


def radial_fn(q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
              frame_tokens: int = 4, block: int = 4, decay_factor: float = 1.0,
              model_type: str = "hunyuan", implementation=None, **unused):
  """Radial attention (Li et al. 2025, arXiv:2506.19852) as an `attn_fn` over tokens in frame-major order (`frame_tokens` per
  frame, whole frames): the authors' static block mask (`patterns.radial_block_mask`), block-sparse
  path."""
  if mask is not None:
    raise NotImplementedError("radial attention: decode is not implemented (non-causal)")
  if causal:
    raise PatternUndefinedError("radial: the causal pattern is undefined (video diffusion)")
  _self_only("radial", q, k, mask, "frames of one video")
  lay = _radial_layout(q.shape[1], frame_tokens, block, decay_factor, model_type)
  return block_sparse.block_sparse_attention(q, k, v, lay, q_segment_ids=q_segment_ids,
                                             kv_segment_ids=kv_segment_ids,
                                             implementation=implementation)


@register_mixer("radial", "Radial attention: band halves as frame distance doubles (non-causal).")
def _build_radial(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                  frame_tokens: int = 4, block: int = 4, decay_factor: float = 1.0,
                  model_type: str = "hunyuan", **options: Any):
  if causal:
    raise PatternUndefinedError("radial: the causal pattern is undefined (video diffusion)")
  fn = functools.partial(radial_fn, frame_tokens=frame_tokens, block=block,
                         decay_factor=decay_factor, model_type=model_type)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


class FluxAttnFn(nnx.Module):
  """Flux Attention (Qiu et al. 2026, arXiv:2604.07394) attention function: a linear router on the pooled keys (running mean when
  causal) gives the probability of the full branch; the sparse branch is a sliding window of
  `window` keys. `hard=True` (inference) routes with a 0/1 gate (straight-through gradient)."""

  def __init__(self, num_kv_heads, head_dim, window, hard, rngs):
    self.router = nnx.Param(jnp.zeros((num_kv_heads * head_dim,)))
    self.router_bias = nnx.Param(jnp.zeros(()))
    self.window, self.hard = window, hard

  def __call__(self, q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
               **unused):
    if q_segment_ids is not None:
      raise NotImplementedError("flux_attention: segment_ids are not supported (pooled router)")
    _self_only("flux_attention", q, k, mask, "the router pools the query's own prefix")
    if mask is not None:
      # Decoding: the router sees the mean of the visible cached keys; window from the cache mask.
      vis = mask[0, 0].astype(jnp.float32)                                   # [Tq, Tk]
      ctx = jnp.einsum("qk,bkf->bqf", vis, k.reshape(k.shape[0], k.shape[1], -1)) / jnp.maximum(
          vis.sum(-1), 1.0)[None, :, None]
      q_pos = jnp.sum(mask, axis=-1, keepdims=True) - 1
      win = mask & (jnp.arange(k.shape[1]) >= q_pos - self.window)
      full = dot_product_attention(q, k, v, mask=mask, implementation="reference")
      sparse = dot_product_attention(q, k, v, mask=win, implementation="reference")
    else:
      ctx = corrections.pooled_context(k, causal=causal)
      full = dot_product_attention(q, k, v, causal=causal, implementation="reference")
      sparse = dot_product_attention(q, k, v, causal=causal, implementation="reference",
                                     window=(self.window, 0 if causal else self.window))
    logits = ctx.astype(jnp.float32) @ self.router[...] + self.router_bias[...]   # [B, Tq]
    g = corrections.flux_gate(logits, hard=self.hard)[:, :, None, None]
    return (g * full.astype(jnp.float32) + (1 - g) * sparse.astype(jnp.float32)).astype(q.dtype)


@register_mixer("flux_attention", "Flux Attention: pooled-context router mixes full / sliding window.")
def _build_flux(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, window: int = 4,
                hard: bool = False, num_kv_heads: int | None = None, **options: Any):
  hk = num_heads if num_kv_heads is None else num_kv_heads
  fn = FluxAttnFn(hk, d_model // num_heads, window, hard, rngs)
  return MultiHeadAttention(d_model, num_heads, num_kv_heads=hk, causal=causal, attn_fn=fn,
                            rngs=rngs, **options)
