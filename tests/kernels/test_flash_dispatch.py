"""`dot_product_attention(..., implementation="pallas")` routes to the flash kernel (interpret mode).

Checked against the engine's own "reference" implementation: values, lse, and gradients w.r.t. q, k,
v, sinks, including a loss that reads the lse (so the kernel's lse cotangent path is exercised).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops import dot_product_attention
from attnjax.ops import softmax
from pallas_kernels.flash.testing import TOLERANCES, assert_close, random_qkv


def _loss_and_grads(impl, q, k, v, sinks, w_o, w_lse, **kw):
  """A scalar reading both outputs, so d/dlse is non-zero; returns (o, lse, grads)."""

  def loss(q, k, v, sinks):
    o, lse = dot_product_attention(q, k, v, sinks=sinks, return_lse=True, implementation=impl,
                                   **kw)
    # Rows with no visible key have lse = -inf; they take no lse weight.
    lse_term = jnp.sum(jnp.where(jnp.isfinite(lse), lse * w_lse, 0.0))
    return jnp.sum(o.astype(jnp.float32) * w_o) + lse_term, (o, lse)

  grad_fn = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
  grads, (o, lse) = jax.jit(grad_fn)(q, k, v, sinks)
  return o, lse, grads


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_pallas_matches_reference_with_lse_gradients(dtype):
  """Causal GQA, Tq != Tk, Dv != D, soft-cap, sinks, segment ids (one segment-less query row)."""
  b, tq, tk, h, hk, d, dv = 2, 19, 27, 4, 2, 24, 16
  q, k, _, _ = random_qkv(0, b, tq, tk, h, hk, d, dtype)
  v = jax.random.normal(jax.random.PRNGKey(1), (b, tk, hk, dv)).astype(dtype)
  sinks = jnp.array([0.3, -1.0, 1.5, 0.0])
  w_o = jax.random.normal(jax.random.PRNGKey(2), (b, tq, h, dv))
  w_lse = jax.random.normal(jax.random.PRNGKey(3), (b, h, tq))
  q_seg = np.zeros((b, tq), np.int32)
  q_seg[:, 10:] = 1
  q_seg[1, 4] = 9  # matches no key: zero output, lse = log(exp(sink)) = sink
  kv_seg = np.zeros((b, tk), np.int32)
  kv_seg[:, 15:] = 1
  kw = dict(causal=True, softcap=5.0, q_segment_ids=jnp.asarray(q_seg),
            kv_segment_ids=jnp.asarray(kv_seg))
  o, lse, grads = _loss_and_grads("pallas", q, k, v, sinks, w_o, w_lse, **kw)
  f32 = lambda x: x.astype(jnp.float32)
  ro, rlse, rgrads = _loss_and_grads("reference", f32(q), f32(k), f32(v), sinks, w_o, w_lse, **kw)
  out_tol, grad_tol = TOLERANCES[dtype]
  assert o.dtype == dtype and o.shape == (b, tq, h, dv)
  assert_close("o", o, ro, out_tol)
  assert_close("lse", lse, rlse, 1e-4 if dtype == jnp.float32 else 5e-2)
  np.testing.assert_allclose(np.asarray(lse[1, :, 4]), np.asarray(sinks), atol=1e-6)
  for name, g, rg in zip(("q", "k", "v", "sinks"), grads, rgrads):
    assert_close("d" + name, g, rg, grad_tol)


def test_pallas_window_alibi_softcap_matches_reference():
  """Non-causal window with ALiBi (|rel| form) after a soft-cap: grads include the slopes."""
  q, k, v, do = random_qkv(4, 1, 33, 33, 2, 1, 16)
  slopes = softmax.alibi_slopes(2)
  kw = dict(window=(5, 2), softcap=3.0, scale=0.3)

  def run(impl, q, k, v, slopes):
    fn = lambda q, k, v, s: dot_product_attention(q, k, v, alibi_slopes=s, implementation=impl,
                                                  **kw)
    o, vjp = jax.vjp(fn, q, k, v, slopes)
    return o, vjp(do)

  o, grads = jax.jit(functools.partial(run, "pallas"))(q, k, v, slopes)
  ro, rgrads = run("reference", q, k, v, slopes)
  assert_close("o", o, ro, 1e-4)
  assert float(jnp.max(jnp.abs(rgrads[3]))) > 1e-2  # the slope gradient is not trivially zero
  for name, g, rg in zip(("q", "k", "v", "alibi_slopes"), grads, rgrads):
    assert_close("d" + name, g, rg, 1e-4)


def test_pallas_rejects_what_it_cannot_serve():
  q, k, v, _ = random_qkv(5, 1, 8, 8, 2, 2, 16)
  with pytest.raises(ValueError, match=r"implementation='pallas' cannot serve this call: pallas "
                                       r"takes no dense mask or bias"):
    dot_product_attention(q, k, v, mask=jnp.ones((8, 8), bool), implementation="pallas")
  with pytest.raises(ValueError, match="pallas supports q, k, v of one dtype"):
    dot_product_attention(q, k.astype(jnp.bfloat16), v, implementation="pallas")
  big = jnp.zeros((1, 4, 1, 264))
  with pytest.raises(ValueError, match="pallas needs D, Dv <= 256"):
    dot_product_attention(big, big, big, implementation="pallas")


def test_auto_dispatch_picks_pallas_only_on_gpu(monkeypatch):
  call = functools.partial(softmax._Call, tq=8, hq=2, hk=2, d=64, dv=64, causal=True, window=None,
                           has_mask=False, has_bias=False, has_segments=False, softcap=2.0,
                           has_sinks=False, has_alibi=False, return_lse=False)
  long_call = call(dtype="float32", tk=softmax.AUTO_XLA_MIN_KV_LEN)
  if jax.default_backend() == "cpu":
    assert softmax.select_implementation(None, long_call) == "xla"
  monkeypatch.setattr(softmax, "_on_cuda_gpu", lambda: True)
  assert softmax.select_implementation(None, long_call) == "pallas"
  # cuDNN stays first where it serves the call; short sequences keep the materialised reference.
  no_cap = dataclasses.replace(long_call, dtype="bfloat16", softcap=None, tq=long_call.tk)
  assert softmax.select_implementation(None, no_cap) == "cudnn"
  assert softmax.select_implementation(None, call(dtype="float32", tk=8)) == "reference"
  with_mask = dataclasses.replace(long_call, has_mask=True)
  assert softmax.select_implementation(None, with_mask) == "xla"

