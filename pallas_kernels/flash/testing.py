"""Test helpers for the flash kernel (random inputs, value + gradient comparison with tolerances)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Absolute tolerances per dtype (outputs, gradients). fp32 / bf16 outputs follow NATTEN's bar
# (1e-4, 5e-2); gradients of O(1) cotangents through bf16 tiles get 1e-1 (NATTEN scales dO by 0.05
# for its 1e-2).
TOLERANCES = {
    jnp.float32: (1e-4, 1e-4),
    jnp.bfloat16: (5e-2, 1e-1),
    jnp.float16: (1e-2, 2e-2),
}


def random_qkv(seed, b, tq, tk, h, hk, d, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (b, tq, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, tk, hk, d), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, tk, hk, d), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], (b, tq, h, d), jnp.float32).astype(dtype)
  return q, k, v, do


def assert_close(name, got, want, atol):
  got = np.asarray(jnp.asarray(got, jnp.float32))
  want = np.asarray(jnp.asarray(want, jnp.float32))
  assert got.shape == want.shape, (name, got.shape, want.shape)
  assert np.all(np.isfinite(got)), f"{name}: non-finite values"
  err = float(np.max(np.abs(got - want))) if got.size else 0.0
  assert err <= atol, f"{name}: max abs err {err:.3g} > {atol:.3g}"


def check_values_and_grads(fast, ref, args, do, dtype, argnames=("q", "k", "v")):
  """Compares `fast(*args)` and `ref(*args_f32)` values and the VJP for every argument."""
  out_tol, grad_tol = TOLERANCES[dtype]
  def fwd_bwd(fn, args, do):
    o, vjp = jax.vjp(fn, *args)
    return o, vjp(do.astype(o.dtype))

  # One jitted program per case compiles faster than eager interpret mode runs op by op.
  o, grads = jax.jit(functools.partial(fwd_bwd, fast))(args, do)
  args32 = [a.astype(jnp.float32) for a in args]
  ro, rgrads = jax.jit(functools.partial(fwd_bwd, ref))(args32, do.astype(jnp.float32))
  assert o.dtype == args[0].dtype
  assert_close("o", o, ro, out_tol)
  for name, g, rg in zip(argnames, grads, rgrads):
    assert g.dtype == dtype, (name, g.dtype)
    assert_close("d" + name, g, rg, grad_tol)
