"""The (gated) delta rule: recurrent / chunked (UT transform) / parallel vs a float64 loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.linear.delta import delta_rule as _delta_rule, delta_rule_step

delta_rule = jax.jit(_delta_rule, static_argnames=("form", "chunk_size", "output_final_state", "scale"))

B, T, H, DK, DV = 2, 23, 2, 4, 3
SEG = np.array([[0] * 9 + [1] * 14, [3] * 23])


def _inputs(seed, t=T, gated=True, strength=1.0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, t, H, DK)).astype(np.float32)
  k = rng.normal(size=(B, t, H, DK)).astype(np.float32)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  v = rng.normal(size=(B, t, H, DV)).astype(np.float32)
  beta = rng.uniform(0, 1, size=(B, t, H)).astype(np.float32)
  ld = -rng.uniform(0, strength, size=(B, t, H)).astype(np.float32) if gated else None
  s0 = rng.normal(size=(B, H, DK, DV)).astype(np.float32)
  return q, k, v, beta, ld, s0


def _naive(q, k, v, beta, ld, s0, seg):
  b, t, h, dk = q.shape
  o = np.zeros(v.shape)
  fin = np.zeros(s0.shape)
  for bi in range(b):
    s = s0[bi].astype(np.float64)
    for ti in range(t):
      if seg is not None and ti > 0 and seg[bi, ti] != seg[bi, ti - 1]:
        s = np.zeros_like(s)
      for hi in range(h):
        kt = k[bi, ti, hi].astype(np.float64)
        a = 1.0 if ld is None else np.exp(float(ld[bi, ti, hi]))
        s[hi] = a * (np.eye(dk) - beta[bi, ti, hi] * np.outer(kt, kt)) @ s[hi] + \
            beta[bi, ti, hi] * np.outer(kt, v[bi, ti, hi])
        o[bi, ti, hi] = q[bi, ti, hi] @ s[hi] * dk ** -0.5
    fin[bi] = s
  return o, fin


def test_forms_match_naive_loop():
  q, k, v, beta, ld, s0 = _inputs(0)
  ref, ref_s = _naive(q, k, v, beta, ld, s0, SEG)
  for form, cs in (("recurrent", 64), ("chunked", 5), ("chunked", 16), ("parallel", 64), (None, 5)):
    o, s = delta_rule(*map(jnp.asarray, (q, k, v, beta)), log_decay=jnp.asarray(ld),
                      initial_state=jnp.asarray(s0), output_final_state=True,
                      segment_ids=jnp.asarray(SEG), form=form, chunk_size=cs)
    np.testing.assert_allclose(o, ref, atol=3e-5, rtol=3e-5, err_msg=f"{form} {cs}")
    np.testing.assert_allclose(s, ref_s, atol=3e-5, rtol=3e-5, err_msg=f"{form} {cs}")


def test_extreme_gates_and_deltanet():
  q, k, v, beta, ld, s0 = _inputs(1, strength=1e-4)   # gates near 1
  ld[:, ::4] = -1e4                                     # and fully-forgetting steps
  for gate in (ld, None):
    ref, _ = _naive(q, k, v, beta, gate, s0, None)
    o, _ = delta_rule(*map(jnp.asarray, (q, k, v, beta)), log_decay=gate,
                      initial_state=jnp.asarray(s0), chunk_size=8)
    assert np.all(np.isfinite(o))
    np.testing.assert_allclose(o, ref, atol=3e-5, rtol=3e-5)


def test_gradients_chunked_equal_recurrent():
  q, k, v, beta, ld, s0 = _inputs(2, t=13)
  seg = jnp.asarray(SEG[:, :13] * 0 + (np.arange(13) >= 6))
  ct = np.random.default_rng(3).normal(size=v.shape).astype(np.float32)

  def grads(form):
    f = lambda *a: jnp.sum(_delta_rule(*a[:4], log_decay=a[4], initial_state=a[5], segment_ids=seg,
                                      form=form, chunk_size=4)[0] * ct)
    return jax.jit(jax.grad(f, argnums=tuple(range(6))))(*map(jnp.asarray, (q, k, v, beta, ld, s0)))

  ref = grads("recurrent")
  for form in ("chunked", None):   # None: the default, the chunked form's autodiff on the CPU
    for name, a, r in zip("q k v beta log_decay s0".split(), grads(form), ref):
      assert np.all(np.isfinite(a))
      np.testing.assert_allclose(a, r, atol=5e-5, rtol=5e-5, err_msg=f"{form} d{name}")


def test_exact_recall_with_orthonormal_keys():
  """Oracle (Wang et al. 2025, arXiv:2507.06457): orthonormal keys and beta = 1 store v exactly; q = k_j reads v_j back."""
  dk = 4
  keys = np.linalg.qr(np.random.default_rng(4).normal(size=(dk, dk)))[0].T.astype(np.float32)
  v = np.random.default_rng(5).normal(size=(1, dk, 1, 3)).astype(np.float32)
  k = keys[None, :, None, :]
  o, s = delta_rule(jnp.asarray(k), jnp.asarray(k), jnp.asarray(v), jnp.ones((1, dk, 1)),
                    scale=1.0, output_final_state=True, chunk_size=3)
  read = np.einsum("jd,de->je", keys, np.asarray(s[0, 0]))
  np.testing.assert_allclose(read, v[0, :, 0], atol=1e-5)


def test_decode_steps_equal_forward():
  q, k, v, beta, ld, _ = _inputs(6, t=9)
  full, fin = delta_rule(*map(jnp.asarray, (q, k, v, beta)), log_decay=jnp.asarray(ld),
                         output_final_state=True, chunk_size=4)
  s = jnp.zeros((B, H, DK, DV))
  for t in range(9):
    o_t, s = delta_rule_step(q[:, t], k[:, t], v[:, t], jnp.asarray(beta[:, t]), s,
                             log_decay_t=jnp.asarray(ld[:, t]))
    np.testing.assert_allclose(o_t, full[:, t], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(s, fin, atol=2e-5, rtol=2e-5)


def test_bad_inputs_raise():
  q, k, v, beta, ld, _ = _inputs(7, t=4)
  args = tuple(map(jnp.asarray, (q, k, v)))
  with pytest.raises(ValueError, match="beta must lie"):
    _delta_rule(*args, jnp.asarray(beta) + 3.0)
  with pytest.raises(ValueError, match="beta must be"):
    _delta_rule(*args, jnp.asarray(beta)[..., None])
  with pytest.raises(ValueError, match="per-key-dim"):
    _delta_rule(*args, jnp.asarray(beta), log_decay=jnp.zeros((B, 4, H, DK)))
  with pytest.raises(ValueError, match="log-space gate"):
    _delta_rule(*args, jnp.asarray(beta), log_decay=-jnp.asarray(ld))
  with pytest.raises(ValueError, match="float32"):
    _delta_rule(*args, jnp.asarray(beta), initial_state=jnp.zeros((B, H, DK, DV), jnp.float16))
