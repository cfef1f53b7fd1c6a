"""`PATNet`: partial convolution meets visual attention (Huang et al. 2025, arXiv 2503.03148).

A FasterNet-style hierarchy of channels-last maps `[B, H, W, C]`. Its partial convolution (PConv)
convolves only the first `C / n_div` channels with a dense 3x3 kernel; PATNet gives the other
`C - C / n_div` ("untouched") channels visual attention, in parallel, and concatenates:

* PAT_ch (`PartialAttentionConv(attn="channel")`): the untouched channels get the enhanced Gaussian
  channel attention `x * hardsigmoid(BN(W [mean; std]))`, where `mean, std [C']` are the channel
  statistics over the map and `W` a dense `(1, 2)` convolution mixing all channels' statistics,
  followed by BatchNorm.
* PAT_sf (`attn="self"`, last stage): LayerNorm, then multi-head self-attention over the map's
  positions with an image relative position bias (iRPE, Wu et al. 2021: euclidean method, bias
  mode, on keys; one learned scalar per head and distance bucket), on the untouched channels.
* PAT_sp (`PartialSpatialAttention`, at the end of each block's MLP): half the channels are
  re-weighted by a one-map spatial gate `hardsigmoid(conv1x1(x_1))` then BatchNorm; the other half
  go through BatchNorm and a 1x1 conv.

Blocks: PAT_ch blocks are `x + MLP(PConv_attn(x))`; PAT_sf blocks `x = x + PConv_attn(x)` then
`x + MLP(x)`; MLP = `1x1 conv -> BN -> act -> 1x1 conv [-> PAT_sp]`. Stages are joined by 2x2
stride-2 convolutions (+ BN) that double the width; the head is global average pooling, a 1x1
conv to `feature_dim`, the activation and a linear classifier.

Transcribed from the authors' code (haiduo/PartialNet, `models/partialnet.py`: `SRM`,
`Partial_conv3`, `partial_spatial_attn_layer_reverse`, `MLPBlock`, `PartialNet`; `models/irpe.py`
for the position buckets). Left out: DropPath and the attention dropouts (0.1 in the authors'
PAT_sf), layer scale, and the dynamic partial convolution (DPConv). BatchNorm uses batch
statistics in training and its running statistics after `model.eval()`.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.cnn_attention import _BatchNorm


def hard_sigmoid(x):
  """torch's `nn.Hardsigmoid`: `relu6(x + 3) / 6`."""
  return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def _batch_norm(c: int):
  return _BatchNorm(c, momentum=0.1)           # torch's BatchNorm2d default momentum


def _conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, *, stride: int = 1, padding="SAME"):
  return nnx.Conv(cin, cout, kernel_size=(k, k), strides=(stride, stride), padding=padding,
                  use_bias=False, rngs=rngs)


class GaussianChannelAttention(nnx.Module):
  """PAT_ch's attention (the authors' `SRM`) on `x [B, H, W, C]`: `x * g`, with
  `g = hardsigmoid(BN(sum_c' W[c', :, c] . [mean_c', std_c']))` per sample and channel (`std`
  unbiased, as torch's). The `(1, 2)` convolution is dense over channels (the "enhanced" part)."""

  def __init__(self, c: int, *, rngs: nnx.Rngs):
    self.cfc = nnx.Param(jax.random.normal(rngs.params(), (c, 2, c)) * (2 * c) ** -0.5)
    self.bn = _batch_norm(c)

  def gate(self, x):
    """`g [B, 1, 1, C]` in [0, 1]."""
    b, h, w, c = x.shape
    flat = x.reshape(b, h * w, c).astype(jnp.float32)
    mean = flat.mean(1)
    std = jnp.sqrt(jnp.sum((flat - mean[:, None]) ** 2, 1) / max(h * w - 1, 1))
    z = jnp.einsum("bk,kc->bc", mean, self.cfc[...][:, 0]) + jnp.einsum("bk,kc->bc", std, self.cfc[...][:, 1])
    return hard_sigmoid(self.bn(z))[:, None, None, :]

  def __call__(self, x):
    return (x * self.gate(x)).astype(x.dtype)


def _euclidean_buckets(h: int, w: int, alpha: float, beta: float, gamma: float):
  """`[HW, HW]` int bucket of each position pair (iRPE's euclidean method): `d = round(|p_i - p_j|)`,
  kept if `d <= alpha`, else log-compressed to at most `beta` (`piecewise_index`)."""
  ys, xs = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
  p = jnp.stack([ys.ravel(), xs.ravel()], -1).astype(jnp.float32)
  d = jnp.round(jnp.sqrt(jnp.sum((p[:, None] - p[None]) ** 2, -1)))
  far = jnp.round(alpha + jnp.log(jnp.maximum(d, 1e-6) / alpha) / math.log(gamma / alpha)
                  * (beta - alpha))
  return jnp.where(d <= alpha, d, jnp.minimum(far, beta)).astype(jnp.int32)


class RPESelfAttention(nnx.Module):
  """PAT_sf's attention on `x [B, H, W, C]`: `softmax(q k^T / sqrt(d) + b_h[bucket(i, j)]) v`, then
  a linear projection (qkv without bias, projection with bias, as the authors'). `ratio` sets the
  iRPE buckets (alpha, beta, gamma = ratio * (1, 2, 8); the authors use 20)."""

  def __init__(self, c: int, num_heads: int, *, rngs: nnx.Rngs, ratio: float = 20.0):
    if c % num_heads:
      raise ValueError(f"PAT_sf: {c} untouched channels are not divisible by num_heads={num_heads}")
    self.h, self.ratio = num_heads, ratio
    self.qkv = nnx.Linear(c, 3 * c, use_bias=False, rngs=rngs)
    self.proj = nnx.Linear(c, c, rngs=rngs)
    self.rpe_bias = nnx.Param(jnp.zeros((num_heads, int(2 * ratio) + 1)))

  def __call__(self, x):
    b, hh, ww, c = x.shape
    n, d = hh * ww, c // self.h
    qkv = self.qkv(x.reshape(b, n, c)).reshape(b, n, 3, self.h, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    bucket = _euclidean_buckets(hh, ww, self.ratio, 2 * self.ratio, 8 * self.ratio)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * d ** -0.5 + self.rpe_bias[...][:, bucket][None]
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
    return self.proj(o.reshape(b, n, c)).reshape(b, hh, ww, c)


class PartialAttentionConv(nnx.Module):
  """PConv with visual attention on the untouched channels (the authors' `Partial_conv3`).

  `x [B, H, W, C] -> [B, H, W, C]`: channels `[:C // n_div]` through a dense 3x3 conv (no bias),
  the rest through `attn`: `"channel"` (PAT_ch: Gaussian channel attention, then BatchNorm),
  `"self"` (PAT_sf: LayerNorm, then RPE self-attention) or `None` (FasterNet's PConv: untouched).
  `n_div=1` convolves every channel: a full 3x3 convolution.
  """

  def __init__(self, dim: int, *, n_div: int = 4, attn: str | None = "channel", num_heads: int = 4,
               rngs: nnx.Rngs):
    if n_div < 1 or dim // n_div < 1:
      raise ValueError(f"n_div must be in [1, dim={dim}], got {n_div}")
    if attn not in (None, "channel", "self"):
      raise ValueError(f"attn must be None, 'channel' or 'self', got {attn!r}")
    self.dim_conv = dim // n_div
    self.dim_untouched = dim - self.dim_conv
    self.attn_type = attn if self.dim_untouched else None
    self.conv = _conv(self.dim_conv, self.dim_conv, 3, rngs)
    attn_mod = norm = None
    if self.attn_type == "channel":
      attn_mod = GaussianChannelAttention(self.dim_untouched, rngs=rngs)
      norm = _batch_norm(self.dim_untouched)
    elif self.attn_type == "self":
      attn_mod = RPESelfAttention(self.dim_untouched, num_heads, rngs=rngs)
      norm = nnx.LayerNorm(self.dim_untouched, epsilon=1e-6, rngs=rngs)   # timm LayerNorm2d
    self.attn, self.norm = nnx.data(attn_mod), nnx.data(norm)

  def __call__(self, x):
    x1, x2 = x[..., :self.dim_conv], x[..., self.dim_conv:]
    x1 = self.conv(x1)
    if self.attn_type == "channel":
      x2 = self.norm(self.attn(x2))         # attention, then BN (the authors' order)
    elif self.attn_type == "self":
      x2 = self.attn(self.norm(x2))         # LN, then attention
    return jnp.concatenate([x1, x2], axis=-1)


class PartialSpatialAttention(nnx.Module):
  """PAT_sp (the authors' `partial_spatial_attn_layer_reverse`, one head) on `[B, H, W, C]`:
  `x_1 = x[..., :C - C//2]`, `x_2 = x[..., C - C//2:]`;
  `[BN(x_1 * hardsigmoid(x_1 w_a)), conv1x1(BN(x_2))]` with `w_a [C - C//2, 1]`."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.dim_conv = dim // 2
    self.dim_untouched = dim - self.dim_conv
    self.conv = _conv(self.dim_conv, self.dim_conv, 1, rngs)
    self.conv_attn = _conv(self.dim_untouched, 1, 1, rngs)
    self.norm = _batch_norm(self.dim_untouched)
    self.norm2 = _batch_norm(self.dim_conv)

  def gate(self, x):
    """The spatial map `[B, H, W, 1]` in [0, 1] (from the first channel group)."""
    return hard_sigmoid(self.conv_attn(x[..., :self.dim_untouched]))

  def __call__(self, x):
    x1, x2 = x[..., :self.dim_untouched], x[..., self.dim_untouched:]
    x1 = self.norm(x1 * self.gate(x))
    return jnp.concatenate([x1, self.conv(self.norm2(x2))], axis=-1)


_ACTS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "relu": jax.nn.relu}


class PATBlock(nnx.Module):
  """One PATNet block (the authors' `MLPBlock`; see the module docstring)."""

  def __init__(self, dim: int, *, attn: str | None, n_div: int, mlp_ratio: float,
               spatial: bool, num_heads: int, act: str, rngs: nnx.Rngs):
    self.split_shortcut = attn == "self"
    self.mix = PartialAttentionConv(dim, n_div=n_div, attn=attn, num_heads=num_heads, rngs=rngs)
    hidden = int(dim * mlp_ratio)
    self.fc1, self.bn = _conv(dim, hidden, 1, rngs), _batch_norm(hidden)
    self.fc2 = _conv(hidden, dim, 1, rngs)
    self.sp = nnx.data(PartialSpatialAttention(dim, rngs=rngs) if spatial else None)
    self.act = act

  def mlp(self, x):
    y = self.fc2(_ACTS[self.act](self.bn(self.fc1(x))))
    return y if self.sp is None else self.sp(y)

  def __call__(self, x):
    if self.split_shortcut:
      x = x + self.mix(x)
      return x + self.mlp(x)
    return x + self.mlp(self.mix(x))


class PATNet(nnx.Module):
  """`__call__(images [B, H, W, C]) -> logits [B, num_classes]`.

  `depths[s]` blocks in stage s, width `embed_dim * 2^s`; patch embedding `patch_size` (conv,
  stride = kernel, + BN); the map halves between stages, so `image_size / patch_size` must be
  divisible by `2^(stages - 1)`. `n_div`: the partial ratio r (C / r channels convolved).
  `channel_attn` (PAT_ch in every stage but, with `self_attn_last`, the last, which gets PAT_sf),
  `spatial_attn` (PAT_sp in every MLP); both off is FasterNet. `num_heads`: PAT_sf heads (4 in the
  authors' T0). `feature_dim`: the width of the head's 1x1 conv (1280 in the authors' models).
  """

  def __init__(self, *, image_size: int, in_channels: int, num_classes: int,
               embed_dim: int = 32, depths: Sequence[int] = (1, 2, 2), patch_size: int = 2,
               mlp_ratio: float = 2.0, n_div: int = 4, channel_attn: bool = True,
               spatial_attn: bool = True, self_attn_last: bool = True, num_heads: int = 4,
               feature_dim: int = 128, act: str = "gelu", rngs: nnx.Rngs):
    depths = tuple(int(d) for d in depths)
    if not depths or min(depths) < 1:
      raise ValueError(f"depths must list >= 1 blocks per stage, got {depths}")
    if image_size % patch_size or (image_size // patch_size) % (2 ** (len(depths) - 1)):
      raise ValueError(f"image_size={image_size} / patch_size={patch_size} must be divisible by "
                       f"2^(stages-1) = {2 ** (len(depths) - 1)}")
    if act not in _ACTS:
      raise ValueError(f"act must be one of {sorted(_ACTS)}, got {act!r}")
    self.image_size, self.in_channels, self.act = image_size, in_channels, act
    self.embed = _conv(in_channels, embed_dim, patch_size, rngs, stride=patch_size, padding="VALID")
    self.embed_norm = _batch_norm(embed_dim)
    n = len(depths)
    stages, merges = [], []
    for s, depth in enumerate(depths):
      dim = embed_dim * 2 ** s
      attn = ("self" if self_attn_last and s == n - 1 else "channel") if channel_attn else None
      stages.append(nnx.List([PATBlock(dim, attn=attn, n_div=n_div, mlp_ratio=mlp_ratio,
                                       spatial=spatial_attn, num_heads=num_heads, act=act, rngs=rngs)
                              for _ in range(depth)]))
      if s < n - 1:
        merges.append(nnx.List([_conv(dim, 2 * dim, 2, rngs, stride=2, padding="VALID"),
                                _batch_norm(2 * dim)]))
    self.stages, self.merges = nnx.List(stages), nnx.List(merges)
    self.pre_head = _conv(embed_dim * 2 ** (n - 1), feature_dim, 1, rngs)
    self.head = nnx.Linear(feature_dim, num_classes, rngs=rngs)

  def __call__(self, images):
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, self.in_channels):
      raise ValueError(f"images must be [B, {self.image_size}, {self.image_size}, "
                       f"{self.in_channels}], got shape {images.shape}")
    x = self.embed_norm(self.embed(images))
    for s, blocks in enumerate(self.stages):
      for blk in blocks:
        x = blk(x)
      if s < len(self.merges):
        conv, bn = self.merges[s]
        x = bn(conv(x))
    x = _ACTS[self.act](self.pre_head(x.mean((1, 2), keepdims=True)))[:, 0, 0]
    return self.head(x)
