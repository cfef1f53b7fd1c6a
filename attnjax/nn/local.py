"""Neighborhood / local attention layers (catalog N) and their registered sequence mixers.

Registered: `na1d` (alias `neighborhood`): 1D neighborhood attention inside `MultiHeadAttention`.
2D layers for vision backbones: `NeighborhoodAttention2D` (NAT/DiNAT), `SwinAttention2D`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.layers import dense
from attnjax.ops import local as local_ops
from attnjax.ops import neighborhood
from attnjax.ops.softmax import dot_product_attention
from attnjax.registry import register_mixer


def na1d_attn_fn(q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
                 kernel_size: int = 7, stride: int = 1, dilation: int = 1, **unused):
  """`attn_fn` for `MultiHeadAttention`: NATTEN 1D NA with `is_causal=causal`.

  Sequences shorter than `kernel_size * dilation` use the largest kernel that fits (the whole
  group: full attention), so short prompts work. Decoding (`mask` given by the cache) is defined for
  causal stride-1 NA, where the window is the last `kernel_size` keys of the query's dilation group.
  Packed sequences are not supported: NA windows depend on absolute positions and borders.
  """
  if q_segment_ids is not None:
    raise NotImplementedError("na1d: segment_ids are not supported (windows depend on borders)")
  if mask is not None:
    # MultiHeadAttention decodes causally and passes the cache mask with causal=False.
    if stride != 1:
      raise NotImplementedError("na1d decodes only causal, stride-1 neighborhoods")
    q_pos = jnp.sum(mask, axis=-1, keepdims=True) - 1        # cache mask: k <= q_pos
    k_pos = jnp.arange(k.shape[1])
    diff = q_pos - k_pos
    nb = mask & (diff % dilation == 0) & (diff < kernel_size * dilation)
    return dot_product_attention(q, k, v, mask=nb, implementation="reference")
  t = q.shape[1]
  kern = max(2, min(kernel_size, t // dilation))
  dil = dilation if kern * dilation <= t else 1
  kern = min(kern, t)
  if t < 2:
    return dot_product_attention(q, k, v, causal=causal, implementation="reference")
  return neighborhood.na1d(q, k, v, kern, min(stride, kern), dil, causal)


@register_mixer("na1d", "1D neighborhood attention (NATTEN semantics; kernel_size/stride/dilation).")
def _build_na1d(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                kernel_size: int = 7, stride: int = 1, dilation: int = 1, **options: Any):
  fn = functools.partial(na1d_attn_fn, kernel_size=kernel_size, stride=stride, dilation=dilation)
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, **options)


@register_mixer("neighborhood", "Alias of na1d: 1D neighborhood attention.")
def _build_neighborhood(**kwargs):
  return _build_na1d(**kwargs)


class NeighborhoodAttention2D(nnx.Module):
  """NA2D layer on `x [B, X, Y, C]` (NAT / DiNAT): q/k/v/o projections around `na2d`.

  `kernel_size` 7, `dilation` 1 (NAT) or alternating (DiNAT); the dilation is reduced to 1 where
  `kernel * dilation` exceeds the map (as DiNAT does at small resolutions).
  """

  def __init__(self, dim: int, num_heads: int, *, kernel_size=7, dilation=1, is_causal=False,
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
    self.num_heads, self.head_dim = num_heads, dim // num_heads
    self.kernel_size, self.dilation, self.is_causal = kernel_size, dilation, is_causal
    self.qkv = dense(dim, 3 * dim, axes=("embed", "heads"), rngs=rngs, use_bias=True)
    self.proj = dense(dim, dim, axes=("heads", "embed"), rngs=rngs, use_bias=True)

  def __call__(self, x):
    if x.ndim != 4:
      raise ValueError(f"x must be [B, X, Y, C], got {x.shape}")
    b, sx, sy, c = x.shape
    qkv = self.qkv(x).reshape(b, sx, sy, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    kern = tuple(min(self.kernel_size, s) for s in (sx, sy))
    dil = tuple(self.dilation if kk * self.dilation <= s else 1 for kk, s in zip(kern, (sx, sy)))
    o = neighborhood.na2d(q, k, v, kern, 1, dil, self.is_causal)
    return self.proj(o.reshape(b, sx, sy, c))


class SwinAttention2D(nnx.Module):
  """Swin W-MSA / SW-MSA layer on `x [B, X, Y, C]` with a relative position bias table
  `[(2M-1)^2, H]` (zero-initialised) and, if `gamma` is given, Gated-SwinRMT's Manhattan decay
  and sigmoid input gate `sigma(x W_g)` applied before the output projection."""

  def __init__(self, dim: int, num_heads: int, *, window: int = 7, shift: int = 0,
               gamma: float | None = None, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
    self.num_heads, self.head_dim, self.window, self.shift = num_heads, dim // num_heads, window, shift
    self.gamma = gamma
    self.qkv = dense(dim, 3 * dim, axes=("embed", "heads"), rngs=rngs, use_bias=True)
    self.proj = dense(dim, dim, axes=("heads", "embed"), rngs=rngs, use_bias=True)
    self.rpb = nnx.Param(jnp.zeros(((2 * window - 1) ** 2, num_heads)), logical_axes=(None, "heads"))
    self.gate = dense(dim, dim, axes=("embed", "heads"), rngs=rngs, use_bias=True) if gamma else None

  def _bias(self):
    m = self.window
    c = jnp.stack(jnp.meshgrid(jnp.arange(m), jnp.arange(m), indexing="ij"), -1).reshape(-1, 2)
    rel = c[:, None] - c[None] + (m - 1)
    idx = rel[..., 0] * (2 * m - 1) + rel[..., 1]
    return jnp.moveaxis(self.rpb[...][idx], -1, 0)      # [H, n, n]

  def __call__(self, x):
    b, sx, sy, c = x.shape
    qkv = self.qkv(x).reshape(b, sx, sy, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    log_gamma = None
    if self.gamma is not None:
      log_gamma = jnp.full((self.num_heads, 2), jnp.log(self.gamma))
    o = local_ops.swin_window_attention(q, k, v, self.window, self.shift, bias=self._bias(),
                                        log_gamma=log_gamma).reshape(b, sx, sy, c)
    if self.gate is not None:
      o = o * jax.nn.sigmoid(self.gate(x))
    return self.proj(o)
