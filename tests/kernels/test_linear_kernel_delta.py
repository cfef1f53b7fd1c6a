"""Gated delta rule chunked forward kernel (interpret mode) vs the linear family's recurrence.

Relative RMS tolerances: float32 1e-5 (values, final state, gradients); bfloat16 inputs 6e-3
(the kernel keeps the UT transform in float32). Gradients go through the custom_vjp (forward
kernel saving the chunk-entry states, reverse-time state-gradient kernel, chunk-parallel gradient
kernel) and are compared with autodiff of the linear family's recurrent form, for every input
(q, k, v, beta, gate, initial state). Keys are L2-normalised, as Gated DeltaNet uses them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import interpret_in_tests, lower_for_h100
from pallas_kernels.linear.delta import chunked_delta_rule, unit_lower_inverse
from pallas_kernels.linear.kernel_common import KernelConfig

INTERPRET = interpret_in_tests()  # False on a GPU with ATTNJAX_KERNEL_TESTS_ON_GPU=1


def rel_rms(x, ref):
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  assert np.all(np.isfinite(x))
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def make_case(seed, b, t, h, dk, dv, dtype, gate):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(ks[0], (b, t, h, dk)).astype(dtype)
  k = jax.random.normal(ks[1], (b, t, h, dk))
  k = (k / jnp.linalg.norm(k, axis=-1, keepdims=True)).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, dv)).astype(dtype)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
  g = {"none": None, "head": -jax.nn.softplus(jax.random.normal(ks[4], (h,))),
       "scalar": jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, h)) + 2.0)}[gate]
  h0 = jax.random.normal(ks[5], (b, h, dk, dv))
  do = jax.random.normal(ks[6], (b, t, h, dv))
  ds = jax.random.normal(ks[7], (b, h, dk, dv))
  return q, k, v, beta, g, h0, do, ds


def test_unit_lower_inverse():
  a = jnp.tril(jax.random.normal(jax.random.PRNGKey(0), (32, 32)) * 0.3, -1)
  cfg = KernelConfig(gate="none", has_segments=False, has_initial_state=False, scale=1.0,
                     chunk=32, sub_chunk=32, num_chunks=1, mm_dtype="float32")
  inv = unit_lower_inverse(cfg, a)
  np.testing.assert_allclose(inv @ (jnp.eye(32) + a), jnp.eye(32), atol=1e-5)


@pytest.mark.parametrize("gate,dtype,segments,t,chunk", [
    ("scalar", "float32", True, 40, 32), ("none", "bfloat16", False, 17, 32),
    ("head", "float32", True, 70, 16), ("scalar", "bfloat16", False, 50, 16)])
def test_delta_matches_recurrence(gate, dtype, segments, t, chunk):
  """Segments: row 0 has an empty segment (id 1) and a length-1 one; row 1 restarts across
  chunk edges in the T=70 case."""
  from attnjax.ops.linear.delta import delta_rule
  q, k, v, beta, g, h0, do, ds = make_case(t, 2, t, 2, 24, 20, jnp.dtype(dtype), gate)
  seg = None
  if segments:
    row1 = np.zeros(t, int) if t < 64 else np.repeat([0, 1, 2], [15, 1, t - 16])
    seg = jnp.asarray(np.stack([np.repeat([0, 2, 3], [5, 1, t - 6]), row1]), jnp.int32)

  def loss(fn, q, k, v, beta, g, h0):
    o, s = fn(q, k, v, beta, log_decay=g, initial_state=h0, output_final_state=True,
              segment_ids=seg)
    return (o.astype(jnp.float32) * do).sum() + (s * ds).sum(), (o, s)

  fast = functools.partial(chunked_delta_rule, chunk_size=chunk, interpret=INTERPRET)
  ref = functools.partial(delta_rule, form="recurrent")
  argnums = (0, 1, 2, 3, 5) if g is None else (0, 1, 2, 3, 4, 5)
  # Jitted: one compile of the interpreted kernels is much cheaper than eager dispatch.
  (_, out), grads = jax.jit(jax.value_and_grad(functools.partial(loss, fast), argnums,
                                               has_aux=True))(q, k, v, beta, g, h0)
  (_, out_ref), grads_ref = jax.jit(jax.value_and_grad(functools.partial(loss, ref), argnums,
                                                       has_aux=True))(q, k, v, beta, g, h0)
  tol = 1e-5 if dtype == "float32" else 6e-3
  for x, r in zip(out + grads, out_ref + grads_ref):
    assert rel_rms(x, r) < tol


@pytest.mark.parametrize("segments", [False, True])
def test_delta_lowers_for_h100(segments):
  sds = jax.ShapeDtypeStruct
  b, t, h, d = 2, 200, 2, 128
  args = [sds((b, t, h, d), jnp.bfloat16)] * 3 + [sds((b, t, h), jnp.float32),
                                                 sds((b, t, h), jnp.float32),
                                                 sds((b, h, d, d), jnp.float32),
                                                 sds((b, t), jnp.int32) if segments else None]

  def fwd(q, k, v, beta, g, h0, seg):
    return chunked_delta_rule(q, k, v, beta, log_decay=g, initial_state=h0, segment_ids=seg,
                              output_final_state=True, interpret=False)

  assert "delta_rule_fwd" in lower_for_h100(fwd, *args).as_text()


@pytest.mark.parametrize("gate", ["none", "scalar"])
def test_delta_backward_lowers_for_h100(gate):
  """Forward (saving chunk states), the reverse-time state-gradient kernel and the chunk-parallel
  gradient kernel, D = 100 padded."""
  sds = jax.ShapeDtypeStruct
  b, t, h, d = 2, 200, 2, 100
  args = [sds((b, t, h, d), jnp.bfloat16)] * 3 + [
      sds((b, t, h), jnp.float32), sds((b, t, h), jnp.float32) if gate == "scalar" else None,
      sds((b, h, d, d), jnp.float32), sds((b, t), jnp.int32)]

  def loss(q, k, v, beta, g, h0, seg):
    o, s = chunked_delta_rule(q, k, v, beta, log_decay=g, initial_state=h0, segment_ids=seg,
                              output_final_state=True, interpret=False)
    return o.astype(jnp.float32).sum() + s.sum()

  argnums = (0, 1, 2, 3, 5) if gate == "none" else (0, 1, 2, 3, 4, 5)
  text = lower_for_h100(jax.grad(loss, argnums), *args).as_text()
  for name in ("delta_rule_fwd", "delta_rule_bwd_dstate", "delta_rule_bwd_chunk"):
    assert name in text


def test_delta_backward_kernel_matches_xla_cross_check():
  """The chunk-gradient kernel against the VJP of the same chunk algebra in plain JAX
  (`backward="xla"`), both fed by the same forward states and reverse-state kernel."""
  q, k, v, beta, g, h0, do, ds = make_case(3, 1, 45, 2, 20, 24, jnp.float32, "scalar")
  seg = jnp.asarray(np.repeat([0, 1, 3], [16, 1, 28])[None], jnp.int32)

  def grads(backward):
    def loss(q, k, v, beta, g, h0):
      o, s = chunked_delta_rule(q, k, v, beta, log_decay=g, initial_state=h0, segment_ids=seg,
                                output_final_state=True, chunk_size=16, interpret=INTERPRET,
                                backward=backward)
      return (o * do).sum() + (s * ds).sum()
    return jax.jit(jax.grad(loss, (0, 1, 2, 3, 4, 5)))(q, k, v, beta, g, h0)

  for x, ref in zip(grads("pallas"), grads("xla")):
    assert rel_rms(x, ref) < 1e-5


@pytest.mark.parametrize("bad", ["beta", "log_decay", "initial_state", "chunk_size", "backward"])
def test_delta_bad_inputs_raise(bad):
  q = jnp.zeros((1, 8, 2, 16))
  kw = dict(beta=jnp.zeros((1, 8, 2)))
  wrong = {"beta": dict(beta=jnp.zeros((1, 8))), "log_decay": dict(log_decay=jnp.zeros((1, 8))),
           "initial_state": dict(initial_state=jnp.zeros((1, 2, 16, 15))),
           "chunk_size": dict(chunk_size=24), "backward": dict(backward="cuda")}[bad]
  kw.update(wrong)
  beta = kw.pop("beta")
  with pytest.raises(ValueError, match=bad):
    chunked_delta_rule(q, q, q, beta, interpret=INTERPRET, **kw)
