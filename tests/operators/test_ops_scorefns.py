"""Sigmoid (Ramapuram et al. 2024, arXiv:2409.04431), LSSA/LSSAR (Gao et al. 2025, arXiv:2501.13428), affine-scaled (Bae et al. 2026, arXiv:2602.23057) and gated (Qiu et al. 2025, arXiv:2505.06708) attention: oracles, grads, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops import dot_product_attention
from attnjax.ops import operators as ops

# Odd sizes on purpose: nothing here is a multiple of a block size.
B, TQ, TK, H, HK, D, DV = 2, 7, 9, 4, 2, 5, 3
F32_TOL = 1e-5
BF16_TOL = 3e-2   # bf16 inputs, float32 accumulation: ~2^-8 relative error per input.


def _causal_cross(tq, tk):
  return np.tril(np.ones((tq, tk), bool), k=tk - tq)


def _naive(weight_fn, q, k, v, valid, scale):
  """Reference: explicit loops-free dense form with GQA repeat, independent of the ops' helpers."""
  k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
  v = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  w = weight_fn(s, valid)
  return jnp.einsum("bhqk,bkhd->bqhd", w, v.astype(jnp.float32))


def _qkv(rand, dtype=jnp.float32, tq=TQ, tk=TK):
  return (rand(1, B, tq, H, D, dtype=dtype), rand(2, B, tk, HK, D, dtype=dtype),
          rand(3, B, tk, HK, DV, dtype=dtype))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, F32_TOL), (jnp.bfloat16, BF16_TOL)])
def test_sigmoid_matches_naive_cross_and_self(rand, causal, dtype, tol):
  q, k, v = _qkv(rand, dtype)
  valid = _causal_cross(TQ, TK) if causal else np.ones((TQ, TK), bool)
  want = _naive(lambda s, m: jnp.where(m, jax.nn.sigmoid(s - math.log(TK)), 0.0), q, k, v, valid,
                D ** -0.5)
  got = ops.sigmoid_attention(q, k, v, causal=causal)
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol, rtol=tol)


def test_sigmoid_zero_logits_row_mass_and_row_decoupling(rand):
  q = jnp.zeros((1, 6, 2, 4))
  k = rand(4, 1, 6, 2, 4)
  w = ops.sigmoid_attention_weights(q, k)
  np.testing.assert_allclose(w.sum(-1), 6 / 7, rtol=1e-6)   # n * sigmoid(-log n) = n / (n + 1)
  # Rows decouple: changing query 0 changes only output row 0.
  q2, k2, v2 = _qkv(rand)
  o1 = ops.sigmoid_attention(q2, k2, v2)
  o2 = ops.sigmoid_attention(q2.at[:, 0].add(1.0), k2, v2)
  np.testing.assert_array_equal(o1[:, 1:], o2[:, 1:])
  assert not np.allclose(o1[:, 0], o2[:, 0])


def test_sigmoid_visible_bias_counts_each_rows_keys(rand):
  q = jnp.zeros((1, 5, 2, 4))
  k = rand(4, 1, 5, 2, 4)
  w = ops.sigmoid_attention_weights(q, k, causal=True, bias="visible")
  n = np.arange(1, 6, dtype=np.float32)
  np.testing.assert_allclose(w.sum(-1), np.broadcast_to(n / (n + 1), (1, 2, 5)), rtol=1e-6)
  # Non-causal it is the paper's -log(Tk).
  np.testing.assert_allclose(ops.sigmoid_attention_weights(q, k, bias="visible"),
                             ops.sigmoid_attention_weights(q, k), rtol=1e-6)
  with pytest.raises(ValueError, match="bias"):
    ops.sigmoid_attention_weights(q, k, bias="keys")


def test_sigmoid_grads_match_naive(rand):
  q, k, v = _qkv(rand)
  valid = _causal_cross(TQ, TK)
  ref = lambda q, k, v: _naive(lambda s, m: jnp.where(m, jax.nn.sigmoid(s - 0.3), 0.0), q, k, v,
                               valid, D ** -0.5)
  got = lambda q, k, v: ops.sigmoid_attention(q, k, v, causal=True, bias=-0.3)
  ct = rand(9, B, TQ, H, DV)
  g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * ct), argnums=(0, 1, 2))(q, k, v)
  g_got = jax.grad(lambda *a: jnp.sum(got(*a) * ct), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_got, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_masked_rows_are_zero_not_nan(rand):
  q, k, v = _qkv(rand)
  mask = np.ones((TQ, TK), bool)
  mask[2] = False
  for fn in (ops.sigmoid_attention, ops.lssa_attention,
             lambda *a, **kw: ops.lssa_attention(*a, reweight_power=2.0, **kw)):
    o = fn(q, k, v, mask=mask)
    assert np.all(np.isfinite(o))
    np.testing.assert_array_equal(o[:, 2], 0.0)
  seg = jnp.array([[0] * TQ, [1] * TQ])
  kseg = jnp.array([[1] * TK, [1] * TK])
  o = ops.affine_scaled_attention(q, k, v, jnp.ones((B, TQ, H)), jnp.ones((B, TQ, H)),
                                  q_segment_ids=seg, kv_segment_ids=kseg)
  np.testing.assert_array_equal(o[0], 0.0)
  assert np.all(np.isfinite(o))


def test_lssa_rows_sum_to_one_and_no_overflow(rand):
  q, k, _ = _qkv(rand)
  w = ops.lssa_weights(q * 1e4, k * 1e4, causal=True)
  assert np.all(np.isfinite(w))
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
  wr = ops.lssa_weights(q, k, causal=True, reweight_power=3.0)
  np.testing.assert_allclose(wr.sum(-1), 1.0, rtol=1e-5)


def test_lssa_matches_naive_and_lssar_reduces_to_lssa(rand):
  q, k, v = _qkv(rand)

  def lssa(s, m):
    n = m.sum(-1, keepdims=True)
    f = jnp.where(m, jax.nn.softplus(jnp.log(n) * s), 0.0)
    return f / f.sum(-1, keepdims=True)

  want = _naive(lssa, q, k, v, np.ones((TQ, TK), bool), D ** -0.5)
  np.testing.assert_allclose(ops.lssa_attention(q, k, v), want, atol=F32_TOL, rtol=F32_TOL)
  np.testing.assert_allclose(ops.lssa_attention(q, k, v, reweight_power=1.0, reweight_threshold=0.0),
                             want, atol=F32_TOL, rtol=F32_TOL)
  # Re-weighting sharpens: lower entropy than LSSA, and weak (below-average) weights become zero.
  w = ops.lssa_weights(q, k)
  wr = ops.lssa_weights(q, k, reweight_power=2.0)
  assert np.all(ops.attention_entropy(wr) < ops.attention_entropy(w))
  assert np.all(np.asarray(wr)[np.asarray(w) < 1.0 / TK] == 0.0)


def test_lssa_grads_match_autodiff_of_naive(rand):
  q, k, v = _qkv(rand)
  valid = _causal_cross(TQ, TK)

  def lssa(s, m):
    n = m.sum(-1, keepdims=True)
    f = jnp.where(m, jax.nn.softplus(jnp.log(n) * s), 0.0)
    return f / f.sum(-1, keepdims=True)

  ct = rand(9, B, TQ, H, DV)
  g_ref = jax.grad(lambda q, k, v: jnp.sum(_naive(lssa, q, k, v, valid, D ** -0.5) * ct),
                   argnums=(0, 1, 2))(q, k, v)
  g_got = jax.grad(lambda q, k, v: jnp.sum(ops.lssa_attention(q, k, v, causal=True) * ct),
                   argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_got, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, F32_TOL), (jnp.bfloat16, BF16_TOL)])
def test_affine_identity_is_softmax_and_row_mass(rand, dtype, tol):
  q, k, v = _qkv(rand, dtype)
  ones, zeros = jnp.ones((B, TQ, H)), jnp.zeros((B, TQ, H))
  got = ops.affine_scaled_attention(q, k, v, ones, zeros, causal=True)
  want = dot_product_attention(q, k, v, causal=True)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol,
                             rtol=tol)
  # Row mass alpha + n_i beta: with v = 1 the output is exactly the row mass.
  alpha, beta = 0.5 + jax.random.uniform(jax.random.PRNGKey(5), (B, TQ, H)), rand(6, B, TQ, H)
  vone = jnp.ones((B, TK, HK, 1), dtype)
  n_i = _causal_cross(TQ, TK).sum(-1)[None, :, None]
  mass = ops.affine_scaled_attention(q, k, vone, alpha, beta, causal=True)[..., 0]
  np.testing.assert_allclose(np.asarray(mass, np.float32), alpha + n_i * beta, atol=tol * 10,
                             rtol=tol)
  mass_n = ops.affine_scaled_attention(q, k, vone, alpha, beta, causal=True, normalize_beta=True)
  np.testing.assert_allclose(np.asarray(mass_n[..., 0], np.float32), alpha + beta, atol=tol * 5,
                             rtol=tol)


def test_affine_grads_match_explicit_weights(rand):
  q, k, v = _qkv(rand)
  alpha, beta = rand(7, B, TQ, H), rand(8, B, TQ, H)
  valid = _causal_cross(TQ, TK)

  def ref(q, k, v, alpha, beta):
    def w(s, m):
      p = jnp.where(m, jnp.exp(s - jnp.max(jnp.where(m, s, -1e30), -1, keepdims=True)), 0.0)
      p = p / p.sum(-1, keepdims=True)
      a, b_ = alpha.transpose(0, 2, 1)[..., None], beta.transpose(0, 2, 1)[..., None]
      return jnp.where(m, a * p + b_, 0.0)
    return _naive(w, q, k, v, valid, D ** -0.5)

  ct = rand(9, B, TQ, H, DV)
  args = (q, k, v, alpha, beta)
  g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * ct), argnums=tuple(range(5)))(*args)
  g_got = jax.grad(lambda *a: jnp.sum(ops.affine_scaled_attention(*a, causal=True) * ct),
                   argnums=tuple(range(5)))(*args)
  for a, b in zip(g_got, g_ref):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("elementwise", [False, True])
def test_gated_oracles(rand, elementwise):
  q, k, v = _qkv(rand)
  shape = (B, TQ, H, DV) if elementwise else (B, TQ, H)
  plain = dot_product_attention(q, k, v, causal=True)
  # A gate of 1: sigmoid(large) == 1 in float32.
  np.testing.assert_allclose(ops.gated_attention(q, k, v, jnp.full(shape, 50.0), causal=True), plain,
                             atol=1e-6)
  g = rand(4, *shape)
  out = ops.gated_attention(q, k, v, g, causal=True)
  assert np.all(np.abs(out) <= np.abs(plain) + 1e-7)
  gate = jax.nn.sigmoid(g) if elementwise else jax.nn.sigmoid(g)[..., None]
  np.testing.assert_allclose(out, plain * gate, atol=1e-6)
  ggot = jax.grad(lambda g: jnp.sum(ops.gated_attention(q, k, v, g, causal=True) ** 2))(g)
  gref = jax.grad(lambda g: jnp.sum((plain * (jax.nn.sigmoid(g) if elementwise
                                              else jax.nn.sigmoid(g)[..., None])) ** 2))(g)
  np.testing.assert_allclose(ggot, gref, atol=1e-5)


def test_bad_inputs_raise(rand):
  q, k, v = _qkv(rand)
  with pytest.raises(ValueError, match="q must be"):
    ops.sigmoid_attention(q[0], k, v)
  with pytest.raises(ValueError, match="head dims"):
    ops.lssa_attention(q[..., :3], k, v)
  with pytest.raises(ValueError, match="bias"):
    ops.sigmoid_attention(q, k, v, bias=jnp.zeros(3))
  with pytest.raises(ValueError, match="alpha"):
    ops.affine_scaled_attention(q, k, v, jnp.ones((B, TQ)), jnp.zeros((B, TQ, H)))
  with pytest.raises(ValueError, match="gate_logits"):
    ops.gated_attention(q, k, v, jnp.ones((B, TQ, H + 1)))
  with pytest.raises(ValueError, match="reweight_power"):
    ops.lssa_attention(q, k, v, reweight_power=0.0)
  with pytest.raises(ValueError, match="mask"):
    ops.sigmoid_attention(q, k, v, mask=np.ones((TQ + 1, TK), bool))
