"""Small building blocks shared by every layer and backbone.

Parameters carry *logical axis names* as variable metadata (`logical_axes`), e.g. a query
projection kernel is `("embed", "heads")`. `attnjax.distributed` maps logical names to mesh axes
with a rules table. We keep names as plain metadata (rather than `nnx.with_partitioning`) so that
building a model needs no mesh; sharding is applied when a mesh is chosen.

Logical names in use: "embed" (d_model), "heads" (num_heads * head_dim, query side),
"kv_heads" (num_kv_heads * head_dim), "mlp" (MLP hidden), "vocab", "conv" (short-conv taps),
"head_dim", "layers", None (replicated).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def dense(in_features: int, out_features: int, *, axes: Sequence[str | None], rngs: nnx.Rngs,
          use_bias: bool = False, kernel_init=None, dtype=None, param_dtype=jnp.float32) -> nnx.Linear:
  """`nnx.Linear` whose kernel (and bias) carry logical axis names `axes = (in_axis, out_axis)`."""
  kwargs = {}
  if kernel_init is not None:
    kwargs["kernel_init"] = kernel_init
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs,
                    kernel_metadata={"logical_axes": tuple(axes)},
                    bias_metadata={"logical_axes": (axes[1],)}, **kwargs)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis: `x / sqrt(mean(x^2) + eps) * scale`, computed in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, axis_name: str | None = "embed",
               rngs: nnx.Rngs | None = None):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=(axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis: `(x - mean) / sqrt(var + eps) * scale + bias`, in float32.

  `var` is the biased (population) variance, as `torch.nn.LayerNorm` computes it.
  """

  def __init__(self, dim: int, *, eps: float = 1e-6, use_bias: bool = True,
               axis_name: str | None = "embed", rngs: nnx.Rngs | None = None):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=(axis_name,))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=(axis_name,)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + self.eps) * self.scale[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(x.dtype)


NORM_KINDS = ("rmsnorm", "layernorm")


def make_norm(kind: str, dim: int, *, eps: float = 1e-6) -> RMSNorm | LayerNorm:
  """`RMSNorm` (`kind="rmsnorm"`) or `LayerNorm` with bias (`"layernorm"`) over `dim` channels."""
  if kind == "rmsnorm":
    return RMSNorm(dim, eps=eps)
  if kind == "layernorm":
    return LayerNorm(dim, eps=eps)
  raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}")


class GeluMLP(nnx.Module):
  """`fc2(gelu(fc1 x))` with biases (the ViT / BERT MLP); `x: [..., d_model] -> [..., d_model]`.

  `approximate=False` is the exact erf GELU (`torch.nn.GELU()`, Hugging Face's `"gelu"`);
  `True` the tanh approximation (`"gelu_new"`, `"gelu_pytorch_tanh"`).
  """

  def __init__(self, d_model: int, hidden: int, *, approximate: bool = False, rngs: nnx.Rngs):
    self.approximate = approximate
    self.fc1 = dense(d_model, hidden, axes=("embed", "mlp"), rngs=rngs, use_bias=True)
    self.fc2 = dense(hidden, d_model, axes=("mlp", "embed"), rngs=rngs, use_bias=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=self.approximate))


MLP_KINDS = ("swiglu", "gelu")


class SwiGLU(nnx.Module):
  """`W_down(silu(W_gate x) * W_up x)`; `x: [..., d_model] -> [..., d_model]`."""

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
    self.gate = dense(d_model, hidden, axes=("embed", "mlp"), rngs=rngs)
    self.up = dense(d_model, hidden, axes=("embed", "mlp"), rngs=rngs)
    self.down = dense(hidden, d_model, axes=("mlp", "embed"), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class ShortConv(nnx.Module):
  """Causal depth-wise convolution along time, as Zoology/Based put before each mixer.

  `y_t = sum_{i<width} w_i * x_{t-i}` per channel, `x: [B, T, C]`. With `decode=True` it keeps the
  last `width - 1` inputs in a cache, so prefill + one-token steps equal the full forward.
  Segment ids (packed sequences) stop the convolution from reading across a boundary.
  """

  def __init__(self, channels: int, width: int = 3, *, rngs: nnx.Rngs):
    if width < 1:
      raise ValueError(f"ShortConv width must be >= 1, got {width}")
    self.width = width
    init = jax.random.normal(rngs.params(), (width, channels)) * (1.0 / width) ** 0.5
    # Tap 0 (the current token) starts near identity so a fresh model passes tokens through.
    init = init.at[0].add(1.0)
    self.kernel = nnx.Param(init, logical_axes=("conv", "embed"))
    self.bias = nnx.Param(jnp.zeros((channels,)), logical_axes=("embed",))
    self.cache = nnx.data(None)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> None:
    del max_len
    c = self.kernel.shape[1]
    self.cache = nnx.Cache(jnp.zeros((batch_size, self.width - 1, c), dtype))

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               decode: bool = False) -> jax.Array:
    b, t, c = x.shape
    w = self.kernel[...].astype(x.dtype)
    if decode:
      if self.cache is None:
        raise ValueError("ShortConv: call init_cache(batch_size, max_len) before decode=True")
      hist = jnp.concatenate([self.cache[...].astype(x.dtype), x], axis=1)
      self.cache[...] = hist[:, -(self.width - 1):] if self.width > 1 else self.cache[...]
      start = self.width - 1
    else:
      hist = jnp.pad(x, ((0, 0), (self.width - 1, 0), (0, 0)))
      start = self.width - 1
    y = jnp.zeros_like(x)
    for i in range(self.width):
      shifted = jax.lax.dynamic_slice_in_dim(hist, start - i, t, axis=1)
      if segment_ids is not None and i > 0 and not decode:
        prev = jnp.pad(segment_ids, ((0, 0), (i, 0)), constant_values=-1)[:, :t]
        shifted = jnp.where((prev == segment_ids)[..., None], shifted, 0)
      y = y + shifted * w[i]
    return y + self.bias[...].astype(x.dtype)


class Embed(nnx.Module):
  """Token embedding `[B, T] int -> [B, T, d_model]`, with `attend` for tied output logits."""

  def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs):
    self.embedding = nnx.Param(
        jax.random.normal(rngs.params(), (vocab_size, d_model)) * d_model ** -0.5,
        logical_axes=("vocab", "embed"))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0)

  def attend(self, x: jax.Array) -> jax.Array:
    return x @ self.embedding[...].T
