"""CNN attention modules on `[B, H, W, C]` feature maps: ELA [36] and ULSAM [106]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _group_norm_1d(x, num_groups, scale, bias, eps=1e-5):
  """GroupNorm over `[B, L, C]` (statistics per sample and channel group over L and the group)."""
  b, l, c = x.shape
  xg = x.reshape(b, l, num_groups, c // num_groups).astype(jnp.float32)
  mu = jnp.mean(xg, axis=(1, 3), keepdims=True)
  var = jnp.var(xg, axis=(1, 3), keepdims=True)
  y = ((xg - mu) * jax.lax.rsqrt(var + eps)).reshape(b, l, c)
  return y * scale + bias


class ELA(nnx.Module):
  """Efficient Local Attention (Xu & Wan, ELA [36]) on `x [B, H, W, C]`.

  `z_h = mean_W x` `[B, H, C]`, `z_w = mean_H x` `[B, W, C]`; one shared depth-wise Conv1d of width
  `kernel_size` (no channel reduction), GroupNorm with `num_groups`, sigmoid:
  `a_h = sigmoid(GN(conv(z_h)))`, `a_w = sigmoid(GN(conv(z_w)))`, `y = x * a_h * a_w`.
  Variants: ELA-T/B (kernel 5, 16 or 32 groups), ELA-S/L (kernel 7, 16 groups); defaults kernel 7,
  16 groups (reduced to a divisor of C if needed). Catalog [36] is "from memory".
  """

  def __init__(self, channels: int, *, kernel_size: int = 7, num_groups: int = 16,
               rngs: nnx.Rngs):
    while channels % num_groups:
      num_groups -= 1
    self.num_groups = num_groups
    self.conv = nnx.Conv(channels, channels, kernel_size=(kernel_size,), padding="SAME",
                         feature_group_count=channels, use_bias=False, rngs=rngs)
    self.gn_scale = nnx.Param(jnp.ones((channels,)), logical_axes=("embed",))
    self.gn_bias = nnx.Param(jnp.zeros((channels,)), logical_axes=("embed",))

  def gates(self, x):
    """`(a_h [B, H, 1, C], a_w [B, 1, W, C])`, each in (0, 1)."""
    if x.ndim != 4:
      raise ValueError(f"ELA: x must be [B, H, W, C], got shape {x.shape}")
    gate = lambda z: jax.nn.sigmoid(_group_norm_1d(self.conv(z), self.num_groups,
                                                   self.gn_scale[...], self.gn_bias[...]))
    a_h = gate(jnp.mean(x, axis=2))
    a_w = gate(jnp.mean(x, axis=1))
    return a_h[:, :, None, :], a_w[:, None, :, :]

  def __call__(self, x):
    a_h, a_w = self.gates(x)
    return (x.astype(jnp.float32) * a_h * a_w).astype(x.dtype)


class ULSAM(nnx.Module):
  """Ultra-lightweight subspace attention (Saini et al., ULSAM [106]) on `x [B, H, W, C]`.

  Channels split into `num_groups` subspaces F_i; per subspace: depth-wise 1x1 conv, 3x3 max-pool
  (stride 1, same padding), point-wise conv to one map, softmax over all H*W positions:
  `A_i`; output `F_i * A_i + F_i`, concatenated. `num_groups = 1` gives one spatial map shared
  by all channels. Paper: g in {1, 4, 8, 16}. Catalog [106] is "from memory".
  """

  def __init__(self, channels: int, *, num_groups: int = 4, rngs: nnx.Rngs):
    if num_groups < 1 or channels % num_groups:
      raise ValueError(f"ULSAM: channels={channels} must be divisible by num_groups={num_groups}")
    self.num_groups = num_groups
    cg = channels // num_groups
    self.dw_scale = nnx.Param(jnp.ones((num_groups, cg)), logical_axes=(None, None))
    self.dw_bias = nnx.Param(jnp.zeros((num_groups, cg)), logical_axes=(None, None))
    init = nnx.initializers.lecun_normal()
    self.pw = nnx.Param(init(rngs.params(), (num_groups, cg)), logical_axes=(None, None))
    self.pw_bias = nnx.Param(jnp.zeros((num_groups,)), logical_axes=(None,))

  def maps(self, x):
    """Attention maps `[B, H, W, num_groups]`, each summing to 1 over H*W."""
    if x.ndim != 4:
      raise ValueError(f"ULSAM: x must be [B, H, W, C], got shape {x.shape}")
    b, h, w, c = x.shape
    f = x.reshape(b, h, w, self.num_groups, c // self.num_groups).astype(jnp.float32)
    f = f * self.dw_scale[...] + self.dw_bias[...]
    f = jax.lax.reduce_window(f, -jnp.inf, jax.lax.max, (1, 3, 3, 1, 1), (1, 1, 1, 1, 1), "SAME")
    logits = jnp.einsum("bhwgc,gc->bhwg", f, self.pw[...]) + self.pw_bias[...]
    return jax.nn.softmax(logits.reshape(b, h * w, -1), axis=1).reshape(b, h, w, -1)

  def __call__(self, x):
    b, h, w, c = x.shape
    a = self.maps(x)
    f = x.reshape(b, h, w, self.num_groups, c // self.num_groups).astype(jnp.float32)
    return (f * a[..., None] + f).reshape(b, h, w, c).astype(x.dtype)
