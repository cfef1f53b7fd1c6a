"""Feature maps phi for linear attention, `phi(q) . phi(k)` standing in for a similarity kernel.

All act on the last axis of `[..., D]` and return `[..., F]`; learnable ones take their parameters
as arguments (the NNX layers own them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def elu_plus_one(x: jax.Array) -> jax.Array:
  """`elu(x) + 1 > 0` (Katharopoulos et al.; MALA, RALA, LinFusion use it)."""
  return jax.nn.elu(x) + 1.0


def relu(x: jax.Array) -> jax.Array:
  """`max(x, 0)` (SLAB, TransNormer variants). Can be all-zero: pair with a guarded normaliser."""
  return jax.nn.relu(x)


def identity(x: jax.Array) -> jax.Array:
  return x


def taylor(x: jax.Array) -> jax.Array:
  """Based's 2nd-order Taylor map `[1, x / d^{1/4}, vec(x x^T) / (sqrt(2) sqrt(d))]`, F = 1 + d + d^2.

  Then `phi(q) . phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d)`, the Taylor expansion of
  `exp(q.k / sqrt(d))` (the full, non-compacted form of Zoology's `TaylorExp`).
  """
  d = x.shape[-1]
  xf = x.astype(jnp.float32)
  outer = (xf[..., :, None] * xf[..., None, :]).reshape(*x.shape[:-1], d * d)
  ones = jnp.ones((*x.shape[:-1], 1), jnp.float32)
  return jnp.concatenate([ones, xf / d ** 0.25, outer / (2.0 ** 0.5 * d ** 0.5)], axis=-1).astype(x.dtype)


def performer_features(x: jax.Array, projection: jax.Array, *, is_query: bool) -> jax.Array:
  """FAVOR+ positive random features (Choromanski et al.) for the softmax kernel `exp(q.k/sqrt(d))`.

  `x [..., H, D]`, `projection [H, D, M]` (rows ~ N(0, I), ideally orthogonal blocks):
  `phi(x) = exp(w^T x' - |x'|^2 / 2 - c) / sqrt(M)` with `x' = x / d^{1/4}`, so that
  `E[phi(q) . phi(k)] = exp(q.k / sqrt(d)) * exp(-c_q - c_k)`. The stabiliser `c` is the per-token
  max over features for queries (it cancels in a normalised attention row) and 0 for keys
  (a per-key constant would reweight keys; Performer's global key max would leak the future
  into causal attention). Key exponents are clipped at 60 to stay finite.
  """
  d = x.shape[-1]
  xs = x.astype(jnp.float32) / d ** 0.25
  proj = jnp.einsum("...hd,hdm->...hm", xs, projection.astype(jnp.float32))
  expo = proj - 0.5 * jnp.sum(xs * xs, axis=-1, keepdims=True)
  if is_query:
    expo = expo - jax.lax.stop_gradient(jnp.max(expo, axis=-1, keepdims=True))
  else:
    expo = jnp.minimum(expo, 60.0)
  m = projection.shape[-1]
  return (jnp.exp(expo) / m ** 0.5).astype(x.dtype)


def orthogonal_projection(key: jax.Array, num_heads: int, dim: int, num_features: int) -> jax.Array:
  """`[H, D, M]` Gaussian projection with orthogonal blocks and chi-distributed row norms (FAVOR+)."""
  blocks = -(-num_features // dim)
  keys = jax.random.split(key, num_heads * blocks + 1)
  g = jax.vmap(lambda k: jax.random.normal(k, (dim, dim)))(keys[:-1])
  qmat, r = jnp.linalg.qr(g)
  # Fix QR's sign convention so that the orthogonal blocks are Haar-distributed (unbiased).
  qmat = qmat * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]
  norms = jnp.linalg.norm(jax.random.normal(keys[-1], (num_heads * blocks, dim, dim)), axis=-1)
  rows = qmat.transpose(0, 2, 1) * norms[..., None]          # rows of each block
  rows = rows.reshape(num_heads, blocks * dim, dim)[:, :num_features]
  return jnp.transpose(rows, (0, 2, 1))


def hedgehog(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """Hedgehog (Zhang et al. 2024, arXiv:2402.04347): `phi(x) = [softmax(x W + b), softmax(-(x W + b))]` per head, F = 2 f.

  `x [..., H, D]`, `weight [H, D, f]` (identity-initialised in the paper), `bias [H, f]`. Two
  separate softmaxes over the feature axis (the paper / LoLCATs "fullspace" map; fla's single
  softmax over `[2y, -2y]` is a different normalisation).
  """
  y = jnp.einsum("...hd,hdf->...hf", x.astype(jnp.float32), weight.astype(jnp.float32))
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return jnp.concatenate([jax.nn.softmax(y, axis=-1), jax.nn.softmax(-y, axis=-1)], axis=-1).astype(x.dtype)


def linear_attention_weights(phi_q: jax.Array, phi_k: jax.Array, *, causal: bool = True,
                             eps: float = 1e-6) -> jax.Array:
  """Normalised linear-attention weights `A_ij = phi(q_i).phi(k_j) / sum_j phi(q_i).phi(k_j)`,
  `[B, T, H, F] -> [B, H, T, T]` (quadratic; for distillation losses and tests)."""
  s = jnp.einsum("bihf,bjhf->bhij", phi_q.astype(jnp.float32), phi_k.astype(jnp.float32))
  if causal:
    t = s.shape[-1]
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, 0.0)
  return s / (jnp.sum(s, axis=-1, keepdims=True) + eps)


def hedgehog_distillation_loss(q: jax.Array, k: jax.Array, phi_q: jax.Array, phi_k: jax.Array, *,
                               causal: bool = True, scale: float | None = None,
                               segment_ids: jax.Array | None = None) -> jax.Array:
  """Hedgehog's softmax-mimicry loss (Zhang et al. 2024, arXiv:2402.04347): `-mean_i sum_j A_ij log Ahat_ij` (soft cross-entropy).

  `A = softmax(q k^T * scale)` (teacher, gradient stopped, causal/segment-masked), `Ahat` the
  normalised linear-attention weights of the feature maps. `q, k [B, T, H, D]`,
  `phi_q, phi_k [B, T, H, F]`. Quadratic in T: a training-time loss only.
  """
  d = q.shape[-1]
  scale = d ** -0.5 if scale is None else scale
  t = q.shape[1]
  logits = jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  valid = jnp.ones((1, 1, t, t), bool)
  if causal:
    valid = valid & jnp.tril(jnp.ones((t, t), bool))
  if segment_ids is not None:
    valid = valid & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  teacher = jax.lax.stop_gradient(jax.nn.softmax(jnp.where(valid, logits, -jnp.inf), axis=-1))
  s = jnp.einsum("bihf,bjhf->bhij", phi_q.astype(jnp.float32), phi_k.astype(jnp.float32))
  s = jnp.where(valid, s, 0.0)
  log_student = jnp.log(s + 1e-12) - jnp.log(jnp.sum(s, axis=-1, keepdims=True) + 1e-12)
  return -jnp.mean(jnp.sum(jnp.where(valid, teacher * log_student, 0.0), axis=-1))
