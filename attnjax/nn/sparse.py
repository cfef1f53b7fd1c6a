"""Sparse / routed attention layers (catalog S) and their registered sequence mixers.

Registered (all inside `MultiHeadAttention`, so RoPE, GQA and QK-norm options apply):
* `sliding_window_sparse`: causal (or symmetric) sliding window through the block-sparse path.
* `moba`: MoBA top-k chunk attention (per-token gate, causal current chunk).
* `power_attention`: PowerAttention's static log-distance block pattern (causal).
* `s2_attention`: S2-Attention per-head strided shards plus a local band (causal).
* `vmoba`: MoBA with VMoBA's threshold selection (1D chunks on sequences).
* `sink_local_sparse`, `strided_sparse`: sink + local window, Sparse Transformer strided (causal).
2D layer for backbones: `BiLevelRoutingAttention2D` (BiFormer, with LCE).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.layers import dense
from attnjax.ops import block_sparse
from attnjax.ops import layout as L
from attnjax.ops.softmax import dot_product_attention
from attnjax.ops.sparse import patterns, routing
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
    raise NotImplementedError(f"{kind} pattern is causal only")
  if q_segment_ids is not None:
    raise NotImplementedError(f"{kind} pattern: segment_ids are not supported (absolute blocks)")
  lay = _static_layout(kind, q.shape[1], block, q.shape[2], a, b)
  return block_sparse.block_sparse_attention(q, k, v, lay)


@register_mixer("power_attention", "PowerAttention: causal blocks at distance 0, 1, 2^m (+ sink).")
def _build_power(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, block: int = 4,
                 num_sink_blocks: int = 1, **options: Any):
  if not causal:
    raise NotImplementedError("power_attention is causal only")
  fn = functools.partial(static_pattern_fn, kind="power", block=block, a=num_sink_blocks)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


@register_mixer("s2_attention", "S2-Attention: per-head strided block shards + local band (causal).")
def _build_s2(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, block: int = 4,
              local_blocks: int = 1, vert_stride: int = 2, **options: Any):
  if not causal:
    raise NotImplementedError("s2_attention is causal only")
  fn = functools.partial(static_pattern_fn, kind="s2", block=block, a=local_blocks, b=vert_stride)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


@register_mixer("sink_local_sparse", "Attention sinks + causal local window (block-sparse path).")
def _build_sink_local(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                      block: int = 4, num_sink: int = 2, window: int = 8, **options: Any):
  if not causal:
    raise NotImplementedError("sink_local_sparse is causal only")
  fn = functools.partial(static_pattern_fn, kind="sink_local", block=block, a=num_sink, b=window)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


@register_mixer("strided_sparse", "Sparse Transformer strided pattern: local band + every stride-th.")
def _build_strided(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, block: int = 4,
                   stride: int = 4, local: int = 4, **options: Any):
  if not causal:
    raise NotImplementedError("strided_sparse is causal only")
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
