"""AttnRes / Block AttnRes / Delta AttnRes (Kimi Team 2026, arXiv:2603.15031; Luo et al. 2026, arXiv:2605.18855), sigma-Reparam (Zhai et al. 2023, arXiv:2303.06296), entropy regulariser (Jha & Reagen 2025, arXiv:2501.03489)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.depth import DepthAttention, deltas, group_sources
from attnjax.nn.stability import EntropyRegularizer, SigmaReparamLinear

B, T, D = 2, 5, 6


def _vals(n, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), n)
  return [jax.random.normal(k, (B, T, D)) for k in keys]


def _explicit(query, sources):
  norm = lambda v: v / jnp.sqrt(jnp.mean(v * v, -1, keepdims=True) + 1e-6)
  logits = jnp.stack([norm(v) @ query for v in sources])
  a = jax.nn.softmax(logits, axis=0)
  return sum(ai[..., None] * v for ai, v in zip(a, sources)), a


def test_zero_query_is_uniform_mean():
  dep = DepthAttention(D, num_layers=4)
  vals = _vals(4)
  np.testing.assert_allclose(dep(vals, 3), sum(vals) / 4, atol=1e-6)


def test_matches_explicit_formula_and_scale_invariance():
  dep = DepthAttention(D, num_layers=4)
  dep.queries[...] = jax.random.normal(jax.random.PRNGKey(1), (5, D))
  vals = _vals(4)
  want, a = _explicit(dep.queries[...][3], vals)
  np.testing.assert_allclose(dep(vals, 3), want, atol=1e-5)
  np.testing.assert_allclose(dep.weights(vals, 3).sum(0), 1.0, rtol=1e-6)
  scaled = [v * c for v, c in zip(vals, (0.1, 3.0, 7.0, 0.5))]
  np.testing.assert_allclose(dep.weights(scaled, 3), a, atol=1e-4)   # up to the RMSNorm eps
  # Gradient against autodiff of the explicit formula.
  g1 = jax.grad(lambda q: jnp.sum(_explicit(q, vals)[0] ** 2))(dep.queries[...][3])
  g2 = nnx.grad(lambda m: jnp.sum(m(vals, 3) ** 2))(dep)["queries"][...][3]
  np.testing.assert_allclose(g2, g1, atol=1e-4, rtol=1e-4)


def test_block_grouping_and_block_size_one_is_full():
  vals = _vals(6)
  assert len(group_sources(vals, 1)) == 6
  blocks = group_sources(vals, 2)            # [v0, v1+v2, v3+v4, v5 (partial)]
  assert len(blocks) == 4
  np.testing.assert_allclose(blocks[1], vals[1] + vals[2])
  np.testing.assert_allclose(blocks[3], vals[5])
  q = jax.random.normal(jax.random.PRNGKey(2), (7, D))
  full, block1, block2 = (DepthAttention(D, 6, block_size=s) for s in (1, 1, 2))
  for m in (full, block1, block2):
    m.queries[...] = q
  np.testing.assert_allclose(block1(vals, 5), _explicit(q[5], vals)[0], atol=1e-5)
  np.testing.assert_allclose(block2(vals, 5), _explicit(q[5], blocks)[0], atol=1e-5)
  with pytest.raises(ValueError, match="block_size"):
    DepthAttention(D, 3, block_size=0)


def test_delta_sources_telescope_and_add_to_the_stream():
  states = _vals(4)
  d = deltas(states)
  np.testing.assert_allclose(sum(d), states[-1], atol=1e-5)   # all weights 1 -> standard residual
  dep = DepthAttention(D, 4, delta=True)
  assert dep.queries.shape == (4, D)                           # no readout query for delta
  dep.queries[...] = jax.random.normal(jax.random.PRNGKey(3), (4, D))
  # Authors' code: the input is the current state plus the softmax selection of the deltas.
  np.testing.assert_allclose(dep(states, 2), states[-1] + _explicit(dep.queries[...][2], d)[0],
                             atol=1e-5)
  np.testing.assert_allclose(dep(states[:1], 0), states[0])   # no increment yet
  np.testing.assert_allclose(dep.readout(states), states[-1])
  with pytest.raises(ValueError, match="layer"):
    dep(states, 4)


def test_sigma_reparam_power_iteration_and_spectral_norm():
  lin = SigmaReparamLinear(7, 5, rngs=nnx.Rngs(0))
  for _ in range(60):
    sigma = lin.sigma(update=True)
  top = np.linalg.svd(np.asarray(lin.kernel[...]), compute_uv=False)[0]
  np.testing.assert_allclose(sigma, top, rtol=1e-4)
  lin.gamma[...] = jnp.asarray(-2.5)
  w_hat = lin.kernel[...] * lin.gamma[...] / lin.sigma()
  np.testing.assert_allclose(np.linalg.svd(np.asarray(w_hat), compute_uv=False)[0], 2.5, rtol=1e-4)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 7))
  np.testing.assert_allclose(lin(x, update=False), x @ w_hat + lin.bias[...], atol=1e-5)
  # Training calls update u; deterministic calls do not.
  u0 = lin.u[...]
  lin.deterministic = True
  lin(x)
  np.testing.assert_array_equal(lin.u[...], u0)
  g = nnx.grad(lambda m: jnp.sum(m(x, update=False) ** 2))(lin)
  assert np.all(np.isfinite(g["kernel"][...])) and float(jnp.abs(g["gamma"][...])) > 0


def test_entropy_regularizer_module():
  reg = EntropyRegularizer(2, 3, seq_len=16)
  np.testing.assert_allclose(reg.theta[...], 0.5 * math.log(16))
  assert float(reg(reg.theta[...] + 0.1)) == 0.0
  assert float(reg(jnp.zeros((2, 3)))) > 0.0
  g = nnx.grad(lambda m: m(jnp.zeros((2, 3))))(reg)
  assert np.all(np.asarray(g["theta"][...]) > 0)   # pulls theta down toward the entropy
