"""Sparse / routed attention layers (catalog S) and their registered sequence mixers.

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


@functools.lru_cache(maxsize=64)
def _window_layout(t, left, right, block):
  return L.from_rule(L.WindowRule(left, right), block_q=block, block_k=block, tq=t, tk=t)


def sliding_window_sparse_fn(q, k, v, *, causal, mask=None, q_segment_ids=None,
                             kv_segment_ids=None, window: int = 16, block: int = 16, **unused):
  """Keys `i - window <= j <= i` (causal) or `|i - j| <= window`, via `block_sparse_attention`.
  Decoding (cache `mask` given) uses the dense path with the same window."""
  if mask is not None:
    q_pos = jnp.sum(mask, axis=-1, keepdims=True) - 1
    nb = mask & (jnp.arange(k.shape[1]) >= q_pos - window)
    return dot_product_attention(q, k, v, mask=nb, implementation="reference")
  lay = _window_layout(q.shape[1], window, 0 if causal else window, block)
  return block_sparse.block_sparse_attention(q, k, v, lay, q_segment_ids=q_segment_ids,
                                             kv_segment_ids=kv_segment_ids)


@register_mixer("sliding_window_sparse", "Sliding-window softmax via the block-sparse layout path.")
def _build_sws(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, window: int = 16,
               block: int = 16, **options: Any):
  fn = functools.partial(sliding_window_sparse_fn, window=window, block=block)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


def moba_fn(q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
            chunk_size: int = 8, top_k: int = 2, threshold: float | None = None, **unused):
  """MoBA as an `attn_fn`. Packed sequences and decoding are not supported (chunk gates are over
  absolute chunks, and a partially filled cache would pollute the chunk means)."""
  if mask is not None:
    raise NotImplementedError("moba: decode is not implemented")
  if q_segment_ids is not None:
    raise NotImplementedError("moba: segment_ids are not supported (chunks are absolute)")
  return routing.moba_attention(q, k, v, chunk_size=chunk_size, top_k=top_k, causal=causal,
                                threshold=threshold)


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
                      kind: str = "power", block: int = 4, a: int = 1, b: int = 4, **unused):
  """Causal static block pattern (`kind` "power", "s2", "sink_local" or "strided") as an
  `attn_fn`; `a`, `b` are the pattern's two integer options (see `_static_layout`)."""
  if mask is not None:
    raise NotImplementedError(f"{kind} pattern: decode is not implemented")
  if not causal:
    raise PatternUndefinedError(f"{kind} pattern is causal only")
  if q_segment_ids is not None:
    raise NotImplementedError(f"{kind} pattern: segment_ids are not supported (absolute blocks)")
  lay = _static_layout(kind, q.shape[1], block, q.shape[2], a, b)
  return block_sparse.block_sparse_attention(q, k, v, lay)


@register_mixer("power_attention", "PowerAttention: causal blocks at distance 0, 1, 2^m (+ sink).")
def _build_power(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, block: int = 4,
                 num_sink_blocks: int = 1, **options: Any):
  if not causal:
    raise PatternUndefinedError("power_attention is causal only")
  fn = functools.partial(static_pattern_fn, kind="power", block=block, a=num_sink_blocks)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


@register_mixer("s2_attention", "S2-Attention: per-head strided block shards + local band (causal).")
def _build_s2(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, block: int = 4,
              local_blocks: int = 1, vert_stride: int = 2, **options: Any):
  if not causal:
    raise PatternUndefinedError("s2_attention is causal only")
  fn = functools.partial(static_pattern_fn, kind="s2", block=block, a=local_blocks, b=vert_stride)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


@register_mixer("sink_local_sparse", "Attention sinks + causal local window (block-sparse path).")
def _build_sink_local(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                      block: int = 4, num_sink: int = 2, window: int = 8, **options: Any):
  if not causal:
    raise PatternUndefinedError("sink_local_sparse is causal only")
  fn = functools.partial(static_pattern_fn, kind="sink_local", block=block, a=num_sink, b=window)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


@register_mixer("strided_sparse", "Sparse Transformer strided pattern: local band + every stride-th.")
def _build_strided(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, block: int = 4,
                   stride: int = 4, local: int = 4, **options: Any):
  if not causal:
    raise PatternUndefinedError("strided_sparse is causal only")
  fn = functools.partial(static_pattern_fn, kind="strided", block=block, a=stride, b=local)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


class BiLevelRoutingAttention2D(nnx.Module):
  """BiFormer BRA layer on `x [B, X, Y, C]`: q/k/v projections, `bra_attention` over an S x S
  region grid with `top_k` routed regions, plus LCE (a depth-wise 5x5 convolution of V) added to
  the output before the output projection."""

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
    b, sx, sy, c = x.shape
    qkv = self.qkv(x).reshape(b, sx, sy, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    o = routing.bra_attention(q, k, v, regions=self.regions, top_k=self.top_k)
    o = o.reshape(b, sx, sy, c) + self.lce(v.reshape(b, sx, sy, c))
    return self.proj(o)


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
  """Routing Transformer [29] attention function with `num_clusters` centroids per head (a buffer,
  updated by `update(x)` with the online k-means EMA, not inside the forward pass, so that a call
  is a pure function of its input).

  Non-causal: balanced clusters (`dynamic.routing_attention`, each centroid takes its `window`
  nearest keys). Causal, decoding and packed sequences: a key joins its nearest centroid (argmax),
  so that a token's cluster never depends on other tokens and a cached decode step sees exactly
  what the full forward saw; computed as a dense mask (O(T^2) memory). (`dynamic.routing_attention
  (causal=True)` offers the balanced causal reading: per-query top-w among visible keys.)"""

  def __init__(self, num_heads, head_dim, num_clusters, window, rngs):
    c = jax.random.normal(rngs.params(), (num_heads, num_clusters, head_dim))
    self.centroids = _Buffer(c / jnp.linalg.norm(c, axis=-1, keepdims=True))
    self.window = window

  def update(self, x, decay: float = 0.999):
    self.centroids[...] = dynamic.update_centroids(self.centroids[...], x, decay)

  def __call__(self, q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
               **unused):
    cent = self.centroids[...]
    if not causal and mask is None and q_segment_ids is None:
      return dynamic.routing_attention(q, k, v, cent, window=min(self.window, k.shape[1]),
                                       causal=False)
    same = dynamic.routing_mask(q, k, cent, window=min(self.window, k.shape[1]), causal=False,
                                balanced=False)
    vis = same & _visibility(q, k, causal=causal, mask=mask, q_segment_ids=q_segment_ids,
                             kv_segment_ids=kv_segment_ids)
    return dot_product_attention(q, k, v, mask=vis, implementation="reference")


@register_mixer("routing", "Routing Transformer: k-means routed attention (online centroids).")
def _build_routing(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                   num_clusters: int = 3, window: int = 8, **options: Any):
  fn = RoutingAttnFn(num_heads, d_model // num_heads, num_clusters, window, rngs)
  # No RoPE by default: clusters of rotated vectors would depend on absolute positions, so a packed
  # sequence would route differently from the same sequence alone.
  options.setdefault("rope", False)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


class DynamicMaskAttnFn(nnx.Module):
  """Trainable Dynamic Mask attention [110]: per-key bias `exp(A softplus(V W_dt))` added to the
  scores, each query keeps its `keep_window` visible keys with the largest bias. Non-causal without
  segments uses the block-sparse path (`dynamic.dma_attention`); otherwise the per-query top-w over
  the visible keys (causal prefix, cache, segment) as a dense mask, which also decodes exactly."""

  def __init__(self, num_heads, num_kv_heads, head_dim, keep_window, rngs):
    self.dt_weight = nnx.Param(jax.random.normal(rngs.params(), (num_kv_heads * head_dim, num_heads))
                               * (num_kv_heads * head_dim) ** -0.5)
    self.a = nnx.Param(-jnp.ones((num_heads,)))
    self.keep_window = keep_window

  def __call__(self, q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
               **unused):
    bias = dynamic.dma_key_bias(v, self.dt_weight[...], self.a[...])          # [B, H, Tk]
    if not causal and mask is None and q_segment_ids is None:
      return dynamic.dma_attention(q, k, v, bias, keep_window=self.keep_window, causal=False,
                                   block=8)
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
  """Landmark attention [53] as an `attn_fn`: every `(block + 1)`-th position acts as the landmark
  of the `block` tokens before it (the data pipeline places landmark tokens there). Causal only;
  dense O(T^2) grouped softmax; no decoding or packed sequences."""
  if mask is not None:
    raise NotImplementedError("landmark: decode is not implemented")
  if q_segment_ids is not None:
    raise NotImplementedError("landmark: segment_ids are not supported (absolute landmark slots)")
  return dynamic.landmark_attention(q, k, v, block, top_k=top_k)


@register_mixer("landmark", "Landmark attention: grouped softmax gated by a landmark per block.")
def _build_landmark(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, block: int = 4,
                    top_k: int | None = None, **options: Any):
  if not causal:
    raise PatternUndefinedError("landmark attention is causal only")
  fn = functools.partial(landmark_fn, block=block, top_k=top_k)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


class HyperAttnFn(nnx.Module):
  """HyperAttention [51] attention function: fixed random LSH directions (a buffer) and a fixed
  sampling seed, so a call is deterministic (the paper redraws samples at every call)."""

  def __init__(self, head_dim, num_projs, block_size, sample_size, min_seq_len, seed, rngs):
    self.proj = _Buffer(jax.random.normal(rngs.params(), (head_dim, num_projs)))
    self.block_size, self.sample_size, self.min_seq_len, self.seed = (block_size, sample_size,
                                                                      min_seq_len, seed)

  def __call__(self, q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
               **unused):
    if mask is not None:
      raise NotImplementedError("hyper_attention: decode is not implemented")
    if q_segment_ids is not None:
      raise NotImplementedError("hyper_attention: segment_ids are not supported (LSH buckets mix "
                                "segments)")
    return estimated.hyper_attention(q, k, v, self.proj[...], block_size=self.block_size,
                                     sample_size=self.sample_size, key=jax.random.key(self.seed),
                                     causal=causal, min_seq_len=self.min_seq_len)


@register_mixer("hyper_attention", "HyperAttention: sortLSH block-diagonal + sampled columns.")
def _build_hyper(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, num_projs: int = 3,
                 block_size: int = 4, sample_size: int = 4, min_seq_len: int = 4, seed: int = 0,
                 **options: Any):
  fn = HyperAttnFn(d_model // num_heads, num_projs, block_size, sample_size, min_seq_len, seed,
                   rngs)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


class SEAAttnFn(nnx.Module):
  """SEA [67] attention function: Performer random features (a buffer) estimate the chunk-level
  attention; each query attends its top-k chunks (own chunk forced when causal)."""

  def __init__(self, head_dim, num_features, chunk_size, top_k, rngs):
    self.proj = _Buffer(jax.random.normal(rngs.params(), (head_dim, num_features)))
    self.chunk_size, self.top_k = chunk_size, top_k

  def __call__(self, q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
               **unused):
    if mask is not None:
      raise NotImplementedError("sea: decode is not implemented")
    if q_segment_ids is not None:
      raise NotImplementedError("sea: segment_ids are not supported (chunks are absolute)")
    return estimated.sea_attention(q, k, v, self.proj[...], chunk_size=self.chunk_size,
                                   top_k=self.top_k, causal=causal)


@register_mixer("sea", "SEA: kernel-estimated chunk attention, top-k chunks per query (sparse).")
def _build_sea(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, chunk_size: int = 4,
               top_k: int = 2, num_features: int = 32, **options: Any):
  fn = SEAAttnFn(d_model // num_heads, num_features, chunk_size, top_k, rngs)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


@functools.lru_cache(maxsize=64)
def _radial_layout(t, frame_tokens, window, block):
  frames = -(-t // frame_tokens)
  return L.from_rule(patterns.RadialRule(frames, frame_tokens, window), block_q=block,
                     block_k=block, tq=t, tk=t)


def radial_fn(q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
              frame_tokens: int = 4, window: int = 4, block: int = 4, **unused):
  """Radial attention [102] as an `attn_fn` over tokens in frame-major order (`frame_tokens` per
  frame; a short last frame is allowed): static symmetric layout, block-sparse path."""
  if mask is not None or causal:
    raise NotImplementedError("radial attention is non-causal (video diffusion); no decode")
  lay = _radial_layout(q.shape[1], frame_tokens, window, block)
  return block_sparse.block_sparse_attention(q, k, v, lay, q_segment_ids=q_segment_ids,
                                             kv_segment_ids=kv_segment_ids)


@register_mixer("radial", "Radial attention: band halves as frame distance doubles (non-causal).")
def _build_radial(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                  frame_tokens: int = 4, window: int = 4, block: int = 4, **options: Any):
  if causal:
    raise PatternUndefinedError("radial attention is non-causal")
  fn = functools.partial(radial_fn, frame_tokens=frame_tokens, window=window, block=block)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


class FluxAttnFn(nnx.Module):
  """Flux Attention [81] attention function: a linear router on the pooled keys (running mean when
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
