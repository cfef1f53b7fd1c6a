"""FlashBias (Wu et al. 2025, arXiv:2505.12044), Aaren (Feng et al. 2024, arXiv:2405.13956) and the attention-entropy helpers (Jha & Reagen 2025, arXiv:2501.03489)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops import dot_product_attention
from attnjax.ops import operators as ops

B, TQ, TK, H, D, DV = 2, 7, 11, 3, 5, 4


def _alibi_bias(slopes, tq, tk):
  i = np.arange(tq)[:, None] + tk - tq
  j = np.arange(tk)[None, :]
  return -np.asarray(slopes)[:, None, None] * (i - j)[None]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_flashbias_alibi_is_exact(rand, dtype, tol):
  q, k, v = rand(1, B, TQ, H, D, dtype=dtype), rand(2, B, TK, 1, D, dtype=dtype), \
      rand(3, B, TK, 1, DV, dtype=dtype)
  slopes = jnp.array([0.5, 0.25, 0.125])
  phi_q, phi_k = ops.alibi_factors(slopes, TQ, TK)
  flashbias = jax.jit(lambda q, k, v: ops.flashbias_attention(q, k, v, phi_q, phi_k, causal=True))
  got = flashbias(q, k, v)
  assert got.dtype == dtype
  bias = jnp.asarray(_alibi_bias(slopes, TQ, TK))[None]
  dense = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, causal=True, bias=bias))
  want = dense(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol, rtol=tol)
  ct = rand(4, B, TQ, H, DV)
  g1 = jax.jit(jax.grad(lambda q, k, v: jnp.sum(flashbias(q, k, v) * ct), (0, 1, 2)))(
      *(a.astype(jnp.float32) for a in (q, k, v)))
  g2 = jax.jit(jax.grad(lambda q, k, v: jnp.sum(dense(q, jnp.repeat(k, H, 2), jnp.repeat(v, H, 2))
                                                * ct), (0, 1, 2)))(
      *(a.astype(jnp.float32) for a in (q, k, v)))
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_flashbias_svd_error_vanishes_at_full_rank(rand):
  bias = jnp.abs(jnp.arange(TQ)[:, None] - jnp.arange(TK)[None, :] - 2.0) * -0.3   # symmetric ALiBi
  factors = jax.jit(ops.lowrank_bias_factors, static_argnums=1)
  errs = [float(factors(bias, r)[2][0]) for r in (1, 3, TQ)]
  assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5
  q, k, v = rand(1, B, TQ, H, D), rand(2, B, TK, H, D), rand(3, B, TK, H, DV)
  phi_q, phi_k, _ = factors(jnp.broadcast_to(bias, (H, TQ, TK)), TQ)
  np.testing.assert_allclose(jax.jit(ops.flashbias_attention)(q, k, v, phi_q, phi_k),
                             jax.jit(dot_product_attention)(q, k, v, bias=bias[None, None]),
                             atol=1e-4)
  lowrank = bias[None] * 0 + rand(5, TQ, 2) @ rand(6, 2, TK)           # exactly rank 2
  assert float(factors(lowrank, 2)[2][0]) < 1e-5
  with pytest.raises(ValueError, match="rank"):
    ops.lowrank_bias_factors(bias, 0)
  with pytest.raises(ValueError, match="phi_q"):
    ops.flashbias_attention(q, k, v, phi_q[:, :2], phi_k)


def _aaren_ref(query, k, v, segment_ids=None):
  s = jnp.einsum("hd,bthd->bht", query, k) * k.shape[-1] ** -0.5
  t = k.shape[1]
  valid = jnp.tril(jnp.ones((t, t), bool))[None, None]
  if segment_ids is not None:
    valid = valid & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  logits = jnp.where(valid, s[:, :, None, :], -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def test_aaren_scan_equals_causal_softmax_and_steps(rand):
  t = 13
  query, k, v = rand(1, H, D), rand(2, B, t, H, D), rand(3, B, t, H, DV)
  aaren = jax.jit(ops.aaren_attention, static_argnames=("causal", "return_state"))
  ref = jax.jit(_aaren_ref)
  o, state = aaren(query, k, v, return_state=True)
  np.testing.assert_allclose(o, ref(query, k, v), atol=1e-6, rtol=1e-5)
  st = ops.aaren_init_state(B, H, DV)
  step = jax.jit(ops.aaren_step)  # one compile for all t steps
  for i in range(t):
    st, o_t = step(st, query, k[:, i], v[:, i])
    np.testing.assert_allclose(o_t, o[:, i], atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(st.w / st.u[..., None], state.w / state.u[..., None], rtol=1e-5)
  # Any scan-tree order: a sequential left fold over the combine equals the parallel scan.
  seg = jnp.array([[0] * 5 + [1] * 8, [0] * 13])
  np.testing.assert_allclose(aaren(query, k, v, segment_ids=seg),
                             ref(query, k, v, seg), atol=1e-6, rtol=1e-5)
  full = aaren(query, k, v, causal=False)
  np.testing.assert_allclose(full, jnp.broadcast_to(o[:, -1:], o.shape), atol=1e-6, rtol=1e-5)


def test_aaren_grads_and_bf16(rand):
  t = 9
  query, k, v = rand(1, H, D), rand(2, B, t, H, D), rand(3, B, t, H, DV)
  ct = rand(4, B, t, H, DV)
  g1 = jax.jit(jax.grad(lambda *a: jnp.sum(ops.aaren_attention(*a) * ct), (0, 1, 2)))(query, k, v)
  g2 = jax.jit(jax.grad(lambda *a: jnp.sum(_aaren_ref(*a) * ct), (0, 1, 2)))(query, k, v)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  o16 = jax.jit(ops.aaren_attention)(query.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                     v.astype(jnp.bfloat16))
  np.testing.assert_allclose(np.asarray(o16, np.float32), jax.jit(_aaren_ref)(query, k, v),
                             atol=5e-2)
  with pytest.raises(ValueError, match="query"):
    ops.aaren_attention(query[:, :2], k, v)


def test_entropy_oracles(rand):
  uniform = jnp.ones((1, 2, 3, 8)) / 8
  np.testing.assert_allclose(ops.attention_entropy(uniform), math.log(8), rtol=1e-6)
  onehot = jax.nn.one_hot(jnp.zeros((1, 2, 3), int), 8)
  np.testing.assert_allclose(ops.attention_entropy(onehot), 0.0, atol=1e-7)
  q, k = rand(1, B, TQ, H, D), rand(2, B, TK, H, D)
  w = jax.jit(ops.softmax_attention_weights, static_argnames="causal")(q, k, causal=True)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  e = jax.jit(ops.attention_entropy)(w)
  assert e.shape == (H,) and np.all((e > 0) & (e < math.log(TK)))
  ent = jnp.array([1.0, 2.0])
  assert float(ops.entropy_regularizer(ent, ent + 0.1, 64)) == 0.0       # inside the band
  far = float(ops.entropy_regularizer(ent, ent + 3.0, 64, lam=1.0))
  np.testing.assert_allclose(far, (3.0 - 0.2 * math.log(64)) ** 2, rtol=1e-5)
  with pytest.raises(ValueError, match="theta"):
    ops.entropy_regularizer(ent, jnp.zeros(3), 64)
