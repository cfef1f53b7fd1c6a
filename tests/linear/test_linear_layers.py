"""Linear-family mixers: registry build, decode == full forward, packed sequences, aux losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.registry import build_mixer

NAMES = ("linear", "based", "hedgehog", "gla", "retnet", "lightning", "deltanet",
         "gated_deltanet", "mala", "transnormer", "transnormer_diag")
D, H, T = 16, 2, 11


def _x(seed, t=T, b=2):
  return jax.random.normal(jax.random.key(seed), (b, t, D))


@pytest.mark.parametrize("name", NAMES)
def test_decode_prefill_then_steps_equals_forward_and_packing(name):
  opts = {"chunk_size": 4} if name not in ("transnormer_diag",) else {"block": 4}
  if name == "based":
    opts["window"] = 3
  m = build_mixer(name, d_model=D, num_heads=H, causal=True, rngs=nnx.Rngs(0), **opts)
  x = _x(1)
  fwd = nnx.jit(lambda m, x, seg: m(x, segment_ids=seg))
  step = nnx.jit(lambda m, x: m(x, decode=True))   # compiled twice: prefill and 1-token shapes
  full = fwd(m, x, None)
  assert full.shape == x.shape and np.all(np.isfinite(full))
  m.init_cache(2, T)
  outs = [step(m, x[:, :6])]
  for t in range(6, T):
    outs.append(step(m, x[:, t:t + 1]))
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-4)
  # Packed: two sequences in one row give the same outputs as run separately.
  if name == "transnormer_diag":
    return   # block boundaries are absolute positions; packing is tested through the softmax op
  seg = jnp.asarray([[0] * 5 + [1] * (T - 5)] * 2)
  packed = fwd(m, x, seg)
  np.testing.assert_allclose(packed[:, :5], full[:, :5], atol=2e-5, rtol=2e-4)
  np.testing.assert_allclose(packed[:, 5:], fwd(m, x[:, 5:], None), atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("name", ("linear", "mala"))
def test_noncausal_builds_and_sees_the_future(name):
  m = build_mixer(name, d_model=D, num_heads=H, causal=False, rngs=nnx.Rngs(0))
  x = _x(2)
  y = m(x)
  y2 = m(x.at[:, -1].add(1.0))
  assert not np.allclose(y[:, 0], y2[:, 0])   # the first token reads the last one


def test_hedgehog_distillation_loss_is_sown_and_trains_only_feature_map():
  m = build_mixer("hedgehog", d_model=D, num_heads=H, causal=True, rngs=nnx.Rngs(0), distill=True)
  x = _x(3)

  def loss(m):
    _, sown = nnx.capture(m, nnx.Intermediate)(x)
    return sum(jax.tree.leaves(sown))

  val, grads = nnx.value_and_grad(loss)(m)
  assert np.isfinite(val) and val > 0
  assert np.any(np.asarray(grads["hh_weight"][...]) != 0)
  assert np.all(np.asarray(grads["v_proj"]["kernel"][...]) == 0)   # v does not enter the loss


def test_unknown_option_and_bad_values_raise():
  with pytest.raises(TypeError):
    build_mixer("gla", d_model=D, num_heads=H, causal=True, rngs=nnx.Rngs(0), no_such_option=1)
  with pytest.raises(ValueError, match="feature_map"):
    build_mixer("linear", d_model=D, num_heads=H, causal=True, rngs=nnx.Rngs(0), feature_map="cos")
  with pytest.raises(NotImplementedError, match="causal"):
    build_mixer("gla", d_model=D, num_heads=H, causal=False, rngs=nnx.Rngs(0))
  m = build_mixer("gla", d_model=D, num_heads=H, causal=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="init_cache"):
    m(_x(4), decode=True)
