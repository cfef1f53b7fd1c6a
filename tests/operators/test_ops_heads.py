"""Differential / grouped differential (Lim et al. 2025, arXiv:2510.06949) and MoH (Jin et al. 2024, arXiv:2410.11842) head mixers: oracles, grads, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops import dot_product_attention
from attnjax.ops import operators as ops

B, TQ, TK, D, DV = 2, 7, 9, 5, 3


def _diff_inputs(rand, hs, hn, dtype=jnp.float32, tq=TQ, tk=TK):
  return (rand(1, B, tq, hs, D, dtype=dtype), rand(2, B, tk, hs, D, dtype=dtype),
          rand(3, B, tq, hn, D, dtype=dtype), rand(4, B, tk, hn, D, dtype=dtype),
          rand(5, B, tk, hs, DV, dtype=dtype))


def _diff_naive(q1, k1, q2, k2, v, lam, causal):
  hs, hn = q1.shape[2], q2.shape[2]
  w1 = ops.softmax_attention_weights(q1, k1, causal=causal)
  w2 = ops.softmax_attention_weights(jnp.repeat(q2, hs // hn, 2), jnp.repeat(k2, hs // hn, 2),
                                     causal=causal)
  lam = jnp.asarray(lam).reshape(1, -1, 1, 1) if jnp.ndim(lam) else lam
  return jnp.einsum("bhqk,bkhd->bqhd", w1 - lam * w2, v.astype(jnp.float32))


def test_lambda_init_schedule_and_reparam():
  assert ops.diff_lambda_init(0) == pytest.approx(0.2)
  assert ops.diff_lambda_init(1) == pytest.approx(0.8 - 0.6 * math.exp(-0.3))
  assert ops.diff_lambda_init(100) == pytest.approx(0.8, abs=1e-6)
  z = jnp.zeros(4)
  assert float(ops.diff_lambda(z, z, z, z, 0.3)) == pytest.approx(0.3)   # e^0 - e^0 + init
  with pytest.raises(ValueError, match="layer_index"):
    ops.diff_lambda_init(-1)


@pytest.mark.parametrize("hs,hn", [(2, 2), (6, 2)])   # DIFF (1:1) and GDA 3:1
@pytest.mark.parametrize("causal", [False, True])
def test_differential_matches_naive(rand, hs, hn, causal):
  args = _diff_inputs(rand, hs, hn)
  lam = jnp.linspace(0.1, 0.9, hs)
  got = ops.differential_attention(*args, lam, causal=causal)
  np.testing.assert_allclose(got, _diff_naive(*args, lam, causal), atol=1e-5, rtol=1e-5)


def test_differential_oracles(rand):
  q1, k1, q2, k2, v = _diff_inputs(rand, 4, 1)
  np.testing.assert_allclose(ops.differential_attention(q1, k1, q2, k2, v, 0.0, causal=True),
                             dot_product_attention(q1, k1, v, causal=True), atol=1e-6)
  ones = jnp.ones((B, TK, 4, 1))
  mass = ops.differential_attention(q1, k1, q2, k2, ones, 0.37, causal=True)
  np.testing.assert_allclose(mass, 1 - 0.37, atol=1e-6)   # rows sum to 1 - lambda


def test_differential_bf16(rand):
  args = _diff_inputs(rand, 4, 2, dtype=jnp.bfloat16)
  got = ops.differential_attention(*args, 0.5, causal=True)
  assert got.dtype == jnp.bfloat16
  want = _diff_naive(*[a.astype(jnp.float32) for a in args], 0.5, True)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2, rtol=5e-2)


def test_differential_grads(rand):
  args = _diff_inputs(rand, 4, 2)
  ct = rand(9, B, TQ, 4, DV)
  f = lambda *a: jnp.sum(ops.differential_attention(*a[:5], a[5], causal=True) * ct)
  r = lambda *a: jnp.sum(_diff_naive(*a[:5], a[5], True) * ct)
  lam = jnp.array([0.2, 0.4, 0.6, 0.8])
  g1 = jax.grad(f, argnums=tuple(range(6)))(*args, lam)
  g2 = jax.grad(r, argnums=tuple(range(6)))(*args, lam)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_differential_bad_inputs(rand):
  q1, k1, q2, k2, v = _diff_inputs(rand, 4, 3)
  with pytest.raises(ValueError, match="multiple of noise heads"):
    ops.differential_attention(q1, k1, q2, k2, v, 0.1)
  q1, k1, q2, k2, v = _diff_inputs(rand, 4, 2)
  with pytest.raises(ValueError, match="lam"):
    ops.differential_attention(q1, k1, q2, k2, v, jnp.zeros(3))
  with pytest.raises(ValueError, match="v must have"):
    ops.differential_attention(q1, k1, q2, k2, v[:, :, :2], 0.1)


def test_moh_router_properties(rand):
  x_s, x_r, x_b = rand(1, B, TQ, 2), rand(2, B, TQ, 6), rand(3, B, TQ, 2)
  gates, idx, aux = ops.moh_router(x_s, x_r, x_b, top_k=2)
  assert gates.shape == (B, TQ, 8) and idx.shape == (B, TQ, 2)
  routed = np.asarray(gates[..., 2:])
  assert np.all((routed > 0).sum(-1) == 2)                        # exactly k routed heads on
  np.testing.assert_array_equal(np.sort(np.argsort(-routed, -1)[..., :2], -1), np.sort(idx, -1))
  # Uniform routers: every gate is 1 (MoH with all heads on == MHA).
  g1, _, aux1 = ops.moh_router(jnp.zeros((1, 3, 2)), jnp.zeros((1, 3, 4)), jnp.zeros((1, 3, 2)),
                               top_k=4)
  np.testing.assert_allclose(g1, 1.0, rtol=1e-6)
  assert float(aux1) == pytest.approx(1.0)                         # balanced: Hr * sum f P = 1
  assert float(aux) >= 1.0 - 1e-6
  with pytest.raises(ValueError, match="top_k"):
    ops.moh_router(x_s, x_r, x_b, top_k=7)


def test_moh_dense_all_ones_is_mha_and_zero_gate_zero_grad(rand):
  q, k, v = rand(1, B, TQ, 4, D), rand(2, B, TK, 4, D), rand(3, B, TK, 4, DV)
  np.testing.assert_allclose(
      ops.mixture_of_heads_attention(q, k, v, jnp.ones((B, TQ, 4)), causal=True),
      dot_product_attention(q, k, v, causal=True), atol=1e-6)
  gates = jnp.ones((B, TQ, 4)).at[:, :, 1].set(0.0)
  out = ops.mixture_of_heads_attention(q, k, v, gates, causal=True)
  np.testing.assert_array_equal(out[:, :, 1], 0.0)
  gq = jax.grad(lambda q: jnp.sum(ops.mixture_of_heads_attention(q, k, v, gates, causal=True)))(q)
  np.testing.assert_array_equal(gq[:, :, 1], 0.0)


@pytest.mark.parametrize("causal", [False, True])
def test_routed_heads_match_dense(rand, causal):
  h, kk = 5, 2
  q, k, v = rand(1, B, TQ, h, D), rand(2, B, TK, h, D), rand(3, B, TK, h, DV)
  idx = jax.lax.top_k(rand(4, B, TQ, h), kk)[1]
  q_sel = jnp.take_along_axis(q, idx[..., None], axis=2)
  got = ops.routed_heads_attention(q_sel, idx, k, v, causal=causal)
  dense = dot_product_attention(q, k, v, causal=causal)
  np.testing.assert_allclose(got, jnp.take_along_axis(dense, idx[..., None], axis=2), atol=1e-5)
  ct = rand(5, B, TQ, kk, DV)
  g1 = jax.grad(lambda q, k, v: jnp.sum(ops.routed_heads_attention(
      jnp.take_along_axis(q, idx[..., None], 2), idx, k, v, causal=causal) * ct), (0, 1, 2))(q, k, v)
  g2 = jax.grad(lambda q, k, v: jnp.sum(jnp.take_along_axis(
      dot_product_attention(q, k, v, causal=causal), idx[..., None], 2) * ct), (0, 1, 2))(q, k, v)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="head_idx"):
    ops.routed_heads_attention(q_sel, idx[..., :1], k, v)
