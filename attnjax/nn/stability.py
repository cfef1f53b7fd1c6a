"""Training-stability helpers: sigma-Reparam linear layers (Zhai et al. 2023, arXiv:2303.06296) and the entropy regulariser (Jha & Reagen 2025, arXiv:2501.03489)."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.ops.operators.entropy import entropy_regularizer


class SpectralEstimate(nnx.Variable):
  """Power-iteration vector of a sigma-Reparam layer: state, not a trainable parameter."""


def _normalize(x, eps=1e-12):
  return x / (jnp.linalg.norm(x) + eps)


class SigmaReparamLinear(nnx.Module):
  """sigma-Reparam linear layer (Zhai et al. (Zhai et al. 2023, arXiv:2303.06296)): `y = x (gamma / sigma(W)) W + b`.

  `sigma(W)` is the top singular value estimated by power iteration (one step per training call,
  the vector `u` persists across calls as a `SpectralEstimate`); u and v are constants for the
  gradient, so the gradient flows through `sigma = v^T W u` as in the paper. `gamma` is a learnable
  scalar, init 1, so the spectral norm of the effective weight is `|gamma|`. `update=False` (or
  `deterministic=True` on the module, e.g. via `model.eval()`) uses the stored estimate as is.
  `kernel [in, out]` carries logical axes `axes`. Our first spec of (Zhai et al. 2023, arXiv:2303.06296) was "from memory"; this is the
  paper's Eq. (one step per update, stop-gradient on the singular vectors).
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               axes: Sequence[str | None] = (None, None), power_iterations: int = 1,
               rngs: nnx.Rngs):
    k1, k2 = jax.random.split(rngs.params())
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(k1, (in_features, out_features)), logical_axes=tuple(axes))
    self.bias = (nnx.Param(jnp.zeros((out_features,)), logical_axes=(axes[1],)) if use_bias
                 else nnx.data(None))
    self.gamma = nnx.Param(jnp.ones(()), logical_axes=())
    self.u = SpectralEstimate(_normalize(jax.random.normal(k2, (out_features,))))
    self.power_iterations = power_iterations
    self.deterministic = False

  def sigma(self, update: bool = False) -> jax.Array:
    """Current estimate of the top singular value (and one more power step when `update`)."""
    w = self.kernel[...].astype(jnp.float32)
    u = self.u[...]
    steps = self.power_iterations if update else 0
    for _ in range(steps):
      v = _normalize(w @ u)
      u = _normalize(w.T @ v)
    u = jax.lax.stop_gradient(u)
    v = jax.lax.stop_gradient(_normalize(w @ u))
    if update:
      self.u[...] = u
    return v @ w @ u

  def __call__(self, x: jax.Array, *, update: bool | None = None) -> jax.Array:
    update = (not self.deterministic) if update is None else update
    w_hat = self.kernel[...] * (self.gamma[...] / self.sigma(update=update))
    y = x @ w_hat.astype(x.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    return y


class EntropyRegularizer(nnx.Module):
  """Learnable per-head entropy targets `theta [L, H]` and the band penalty of [34].

  `__call__(head_entropy [L, H]) = lam * mean max(0, |H - theta| - gamma log T)^2` (see
  `attnjax.ops.operators.entropy_regularizer`); head entropies come from
  `attnjax.ops.operators.attention_entropy` on any softmax-family weights. Paper defaults
  `lam = 1e-5`, `gamma = 0.2`; theta starts at `init_fraction * log(T)` (our choice: half the
  maximum entropy).
  """

  def __init__(self, num_layers: int, num_heads: int, seq_len: int, *, lam: float = 1e-5,
               gamma: float = 0.2, init_fraction: float = 0.5, rngs: nnx.Rngs | None = None):
    del rngs
    self.seq_len, self.lam, self.gamma = seq_len, lam, gamma
    self.theta = nnx.Param(jnp.full((num_layers, num_heads), init_fraction * math.log(seq_len)),
                           logical_axes=("layers", None))

  def __call__(self, head_entropy: jax.Array) -> jax.Array:
    return entropy_regularizer(head_entropy, self.theta[...], self.seq_len, lam=self.lam,
                               gamma=self.gamma)
