"""Every registered mixer, through the registry, in one contract test per mixer: it builds in the
CAB patterns it defines (an undefined one raises NotImplementedError), has finite gradients,
ignores the future when causal (cut inside a chunk), keeps packed sequences apart, and (where it can decode) decodes
like its full forward.

All calls go through `nnx.jit` with one sequence shape `[2, T, D_MODEL]`, so each mixer compiles
its forward once and reuses it: "the same tokens alone" are read off a causal forward whose first
tokens are those tokens (a causal output at i depends on tokens <= i only, which the causality
check verifies first). Compiles, not arithmetic, are what this CPU spends its time on here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import build_mixer, list_mixers

D_MODEL, HEADS, T = 32, 2, 12
ALL = sorted(list_mixers())
@nnx.jit
def _FWD(m, x, seg=None):
  """The forward's output; state a training forward changes (k-means centroids, running
  statistics) is put back, so every call sees the same module (as the trainer's eval step)."""
  before = nnx.state(m)
  y = m(x, segment_ids=seg)
  nnx.update(m, before)
  return y


_FWD_SEG = _FWD
_STEP = nnx.jit(lambda m, x: m(x, decode=True))


def _build(name, causal):
  try:
    return build_mixer(name, d_model=D_MODEL, num_heads=HEADS, causal=causal, rngs=nnx.Rngs(0))
  except NotImplementedError:  # a CAB pattern the mechanism does not define
    return None


def _check_grads_finite(name, m, x, causal):
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)

  def loss(p, r):   # fresh Variables for r here: a training forward may update buffers in it
    y = nnx.merge(graphdef, p, jax.tree.map(lambda a: a, r))(x)
    return jnp.sum(y ** 2), y

  (val, y), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, rest)
  where = f"{name} (causal={causal})"
  assert y.shape == x.shape, f"{where}: output shape {y.shape} != {x.shape}"
  assert np.isfinite(float(val)), where
  assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(g)), f"{where}: non-finite grads"


@pytest.mark.parametrize("name", ALL)
def test_mixer_contract(name):
  ks = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(ks[0], (2, T, D_MODEL))
  non_causal, m = _build(name, False), _build(name, True)
  assert non_causal is not None or m is not None, f"{name} builds in no pattern"
  if non_causal is not None:
    _check_grads_finite(name, non_causal, x, False)
  if m is None:
    return
  _check_grads_finite(name, m, x, True)

  # Causal: changing tokens 9.. leaves outputs 0..8 unchanged. 9 is inside a block or chunk of
  # every default size (2, 3, 4, 8), so a chunk-routed mixer that reads its own chunk's later keys
  # (e.g. a chunk mean over the whole chunk) fails here; a cut at a chunk boundary cannot see that.
  full = _FWD(m, x)
  x2 = x.at[:, 9:].set(jax.random.normal(ks[1], (2, T - 9, D_MODEL)))
  np.testing.assert_allclose(full[:, :9], _FWD(m, x2)[:, :9], atol=1e-4, err_msg=f"{name}: causal")

  # Packed sequences [a (7 tokens) | b (5 tokens)] equal a and b alone.
  seg = jnp.array([[0] * 7 + [1] * 5] * 2)
  try:
    packed = _FWD_SEG(m, x, seg)
  except NotImplementedError:
    packed = None                      # the mixer does not take segment_ids (it says so)
  if packed is not None:
    b_alone = _FWD(m, jnp.concatenate([x[:, 7:], x[:, :7]], 1))[:, :5]
    np.testing.assert_allclose(packed[:, :7], full[:, :7], atol=1e-4, rtol=1e-3,
                               err_msg=f"{name}: first packed segment")
    np.testing.assert_allclose(packed[:, 7:], b_alone, atol=1e-4, rtol=1e-3,
                               err_msg=f"{name}: second packed segment")

  # Decoding: a 6-token prefill, then one token at a time, equals the full forward.
  try:
    m.init_cache(2, 16)
    outs = [_STEP(m, x[:, :6])] + [_STEP(m, x[:, t:t + 1]) for t in range(6, T)]
  except NotImplementedError:
    return                             # the mixer does not decode (it says so)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-4, rtol=2e-3,
                             err_msg=f"{name}: decode")
