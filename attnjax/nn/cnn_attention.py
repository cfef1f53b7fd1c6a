"""CNN attention modules on `[B, H, W, C]` feature maps: ELA (Xu & Wan 2024, arXiv:2403.01123) and ULSAM (Saini et al. 2020, arXiv:2006.15102)."""

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
  """Efficient Local Attention (Xu & Wan, ELA (Xu & Wan 2024, arXiv:2403.01123)) on `x [B, H, W, C]`.

  `z_h = mean_W x` `[B, H, C]`, `z_w = mean_H x` `[B, W, C]`; one shared depth-wise Conv1d of width
  `kernel_size` (no channel reduction), GroupNorm with `num_groups`, sigmoid:
  `a_h = sigmoid(GN(conv(z_h)))`, `a_w = sigmoid(GN(conv(z_w)))`, `y = x * a_h * a_w`.
  Variants: ELA-T/B (kernel 5, 16 or 32 groups), ELA-S/L (kernel 7, 16 groups); defaults kernel 7,
  16 groups (reduced to a divisor of C if needed). Our first spec of (Xu & Wan 2024, arXiv:2403.01123) was "from memory".
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


class _BatchNorm(nnx.Module):
  """BatchNorm over the last axis of `[..., C]` with PyTorch's semantics (ULSAM's `BatchNorm2d`).

  Training (`use_running_average=False`, the default; `module.eval()` flips it): normalise with
  the batch statistics over all but the last axis (biased variance) and update the running
  statistics `r <- (1 - m) r + m stat` with the unbiased batch variance, as torch does; `m` is
  torch's `momentum` (ULSAM uses 0.9). Evaluation: normalise with the running statistics.
  """

  def __init__(self, channels: int, *, momentum: float = 0.9, eps: float = 1e-5):
    self.momentum, self.eps, self.use_running_average = momentum, eps, False
    self.scale = nnx.Param(jnp.ones((channels,)), logical_axes=(None,))
    self.bias = nnx.Param(jnp.zeros((channels,)), logical_axes=(None,))
    self.mean = nnx.BatchStat(jnp.zeros((channels,)))
    self.var = nnx.BatchStat(jnp.ones((channels,)))

  def __call__(self, x):
    if self.use_running_average:
      mu, var = self.mean[...], self.var[...]
    else:
      axes = tuple(range(x.ndim - 1))
      mu, var = jnp.mean(x, axis=axes), jnp.var(x, axis=axes)
      n = x.size // x.shape[-1]
      m = self.momentum
      self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mu)
      self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(var * n / max(n - 1, 1))
    return (x - mu) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class ULSAM(nnx.Module):
  """Ultra-lightweight subspace attention (Saini et al., ULSAM (Saini et al. 2020, arXiv:2006.15102)) on `x [B, H, W, C]`.

  Channels split into `num_groups` subspaces F_i; per subspace, as the authors' `SubSpace`
  (Nandan91/ULSAM `ulsam.py`): depth-wise 1x1 conv, BatchNorm, ReLU, 3x3 max-pool (stride 1,
  padding 1), point-wise conv to one map, BatchNorm, ReLU, softmax over all H*W positions: `A_i`;
  output `F_i * A_i + F_i`, concatenated. `num_groups = 1` gives one spatial map shared by all
  channels. Paper: g in {1, 4, 8, 16}. The BatchNorms use batch statistics in training and their
  running statistics after `module.eval()` (torch momentum 0.9, as the authors').
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
    # Per-channel statistics: one BatchNorm over all C channels is the subspaces' BatchNorms side
    # by side; the point-wise maps have one channel per subspace.
    self.bn_dw = _BatchNorm(channels)
    self.bn_pw = _BatchNorm(num_groups)

  def maps(self, x):
    """Attention maps `[B, H, W, num_groups]`, each summing to 1 over H*W."""
    if x.ndim != 4:
      raise ValueError(f"ULSAM: x must be [B, H, W, C], got shape {x.shape}")
    b, h, w, c = x.shape
    g = self.num_groups
    f = x.reshape(b, h, w, g, c // g).astype(jnp.float32)
    f = f * self.dw_scale[...] + self.dw_bias[...]
    f = jax.nn.relu(self.bn_dw(f.reshape(b, h, w, c))).reshape(b, h, w, g, c // g)
    f = jax.lax.reduce_window(f, -jnp.inf, jax.lax.max, (1, 3, 3, 1, 1), (1, 1, 1, 1, 1), "SAME")
    logits = jnp.einsum("bhwgc,gc->bhwg", f, self.pw[...]) + self.pw_bias[...]
    logits = jax.nn.relu(self.bn_pw(logits))
    return jax.nn.softmax(logits.reshape(b, h * w, -1), axis=1).reshape(b, h, w, -1)

  def __call__(self, x):
    b, h, w, c = x.shape
    a = self.maps(x)
    f = x.reshape(b, h, w, self.num_groups, c // self.num_groups).astype(jnp.float32)
    return (f * a[..., None] + f).reshape(b, h, w, c).astype(x.dtype)
