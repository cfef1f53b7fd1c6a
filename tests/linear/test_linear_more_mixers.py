"""LightNet, InLine, LinFusion, RALA, SLAB (+ PRepBN), LINA, Flowformer mixers and the new
segment / state support of their pure functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.linear import PRepBN
from attnjax.ops.linear import feature_maps as fm
from attnjax.ops.linear import mechanisms as mech
from attnjax.registry import build_mixer

B, T, H, D = 2, 9, 2, 4
RNG = np.random.default_rng(1)
SEG = jnp.asarray([[0] * 4 + [1] * 5] * B)


def _arr(*shape):
  return jnp.asarray(RNG.normal(size=shape), jnp.float32)


Q, K, V = _arr(B, T, H, D), _arr(B, T, H, D), _arr(B, T, H, 3)


def test_prepbn_schedule_and_eval_reparameterisation():
  m = PRepBN(6, total_steps=4, warmup=2)
  x = _arr(3, 5, 6) * 2.0 + 1.0
  gammas = []
  for _ in range(8):
    gammas.append(float(m.gamma()))
    y = m(x, train=True)
  # Authors' schedule: LN only during warm-up, then r0 * remaining / total down to 0.
  np.testing.assert_allclose(gammas, [1, 1, 1, 0.75, 0.5, 0.25, 0, 0])
  # gamma = 0: the trained form is RepBN with batch statistics, BN(x) + eta x.
  mu, var = x.reshape(-1, 6).mean(0), x.reshape(-1, 6).var(0)
  np.testing.assert_allclose(y, (x - mu) / np.sqrt(var + 1e-5) + x, atol=1e-5)
  m.eta[...] = jnp.asarray(0.3)
  m.bn_scale[...] = jnp.linspace(0.5, 2.0, 6)
  # Eval: the folded affine equals RepBN with running statistics, unfolded.
  ye = m(x, train=False)
  ref = (x - m.mean[...]) / jnp.sqrt(m.var[...] + 1e-5) * m.bn_scale[...] + m.bn_bias[...] + 0.3 * x
  np.testing.assert_allclose(ye, ref, atol=1e-5)
  n = 15
  np.testing.assert_allclose(m.mean[...], mu * (1 - 0.9 ** 8), atol=1e-5)
  np.testing.assert_allclose(m.var[...], 0.9 ** 8 + var * n / (n - 1) * (1 - 0.9 ** 8), atol=1e-4)
  with pytest.raises(ValueError, match="C=6"):
    m(_arr(2, 5))


@pytest.mark.parametrize("name", ["inline", "linfusion", "rala", "lina"])
def test_noncausal_only_mixers_refuse_causal_and_decode_and_see_the_future(name):
  with pytest.raises(NotImplementedError, match=name):
    build_mixer(name, d_model=8, num_heads=2, causal=True, rngs=nnx.Rngs(0))
  m = build_mixer(name, d_model=8, num_heads=2, causal=False, rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match=name):
    m.init_cache(1, 8)
  x = _arr(1, 7, 8)
  assert not np.allclose(m(x)[:, 0], m(x.at[:, -1].add(1.0))[:, 0])


def test_causal_only_mixers_refuse_noncausal_and_bad_options():
  for name in ("lightnet", "lolcats_window", "nats"):
    with pytest.raises(NotImplementedError, match=name):
      build_mixer(name, d_model=8, num_heads=2, causal=False, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="local"):
    build_mixer("inline", d_model=8, num_heads=2, causal=False, rngs=nnx.Rngs(0), local=2)
  m = build_mixer("lina", d_model=8, num_heads=2, causal=False, rngs=nnx.Rngs(0), max_len=4)
  with pytest.raises(ValueError, match="max_len"):
    m(_arr(1, 6, 8))
  with pytest.raises(ValueError, match="window"):
    build_mixer("lolcats_window", d_model=8, num_heads=2, causal=True, rngs=nnx.Rngs(0), window=0)


@pytest.mark.slow
def test_rala_and_flowformer_segments_equal_separate_runs():
  pq, pk = fm.elu_plus_one(Q), fm.elu_plus_one(K)
  rala = jax.jit(mech.rala_attention)
  flow = jax.jit(mech.flow_attention, static_argnames="causal")
  o = rala(pq, pk, V, segment_ids=SEG)
  np.testing.assert_allclose(o[:, :4], rala(pq[:, :4], pk[:, :4], V[:, :4]), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(o[:, 4:], rala(pq[:, 4:], pk[:, 4:], V[:, 4:]), atol=1e-5, rtol=1e-5)
  for causal in (False, True):
    o = flow(Q, K, V, causal=causal, segment_ids=SEG)
    np.testing.assert_allclose(o[:, 4:], flow(Q[:, 4:], K[:, 4:], V[:, 4:], causal=causal),
                               atol=1e-5, rtol=1e-5, err_msg=f"causal={causal}")


def test_flow_and_sla_steps_equal_the_causal_forward():
  full = mech.flow_attention(Q, K, V, causal=True)
  st = mech.flow_init_state(B, H, D, 3)
  outs = []
  for t in range(T):
    o, st = mech.flow_step(Q[:, t], K[:, t], V[:, t], st)
    outs.append(o)
  np.testing.assert_allclose(jnp.stack(outs, 1), full, atol=1e-5, rtol=1e-4)
  full, s_fin = mech.sla_attention(Q, K, V, causal=True, output_final_state=True, chunk_size=4)
  o1, s = mech.sla_attention(Q[:, :5], K[:, :5], V[:, :5], causal=True, output_final_state=True)
  outs = [o1]
  for t in range(5, T):
    o, s = mech.sla_step(Q[:, t], K[:, t], V[:, t], s)
    outs.append(o[:, None])
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(s, s_fin, atol=1e-5)


@pytest.mark.slow
def test_mixer_forms_agree_in_values_and_grads():
  """Chunked vs parallel engine forms through the layers (chunk 4, T = 9)."""
  x = _arr(2, T, 8)
  for name, causal in (("slab", True), ("lightnet", True), ("inline", False), ("lolcats_window", True)):
    extra = {"window": 3} if name == "lolcats_window" else {}
    vals = []
    for form in ("chunked", "parallel"):
      m = build_mixer(name, d_model=8, num_heads=2, causal=causal, rngs=nnx.Rngs(0), form=form,
                      chunk_size=4, **extra)
      g, p, rest = nnx.split(m, nnx.Param, ...)
      vals.append(jax.jit(jax.value_and_grad(lambda p: jnp.sum(nnx.merge(g, p, rest)(x) ** 2)))(p))
    np.testing.assert_allclose(vals[0][0], vals[1][0], rtol=1e-5, err_msg=name)
    for a, b in zip(jax.tree.leaves(vals[0][1]), jax.tree.leaves(vals[1][1])):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=name)


def test_slab_layer_matches_the_authors_attention():
  """Non-causal `slab` against a transcription (numpy float64) of xinghaochen/SLAB
  `classification/models/slab_deit.py` `Attention.forward`: `k = k + positional_encoding`, ReLU
  kernels, `z = 1 / (q . sum k + 1e-6)`, `x = q (k^T v) z`, plus `dwc(v)`: a depth-wise
  kernel-5 conv with bias over the head_dim channels, shared by the heads (the authors' 5x5 on the
  grid is its 1-D 5-tap form here), then `proj`. Random positional encoding, conv taps and bias."""
  dm, h, t = 8, 2, 9
  m = build_mixer("slab", d_model=dm, num_heads=h, causal=False, rngs=nnx.Rngs(0), max_len=16)
  m.k_pos[...] = _arr(16, dm)
  m.local_bias[...] = _arr(dm // h)
  x = _arr(B, t, dm)
  f = lambda a: np.asarray(a, np.float64)
  xs = f(x)
  q, k, v = (xs @ f(l.kernel[...]) for l in (m.q_proj, m.k_proj, m.v_proj))
  k = k + f(m.k_pos[...])[:t]
  q, k = np.maximum(q, 0), np.maximum(k, 0)
  heads = lambda a: a.reshape(B, t, h, -1).transpose(0, 2, 1, 3).reshape(B * h, t, -1)   # (b h) n c
  q, k, v = heads(q), heads(k), heads(v)
  z = 1 / (np.einsum("bic,bc->bi", q, k.sum(1)) + 1e-6)
  out = np.einsum("bic,bcd,bi->bid", q, np.einsum("bjc,bjd->bcd", k, v), z)
  w = m.local.shape[0]
  assert w == 5
  vp = np.pad(v, ((0, 0), (w // 2, w // 2), (0, 0)))
  out = out + sum(vp[:, i:i + t] * f(m.local[...])[i] for i in range(w)) + f(m.local_bias[...])
  out = out.reshape(B, h, t, -1).transpose(0, 2, 1, 3).reshape(B, t, dm)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(m, x), out @ f(m.o_proj.kernel[...]),
                             atol=1e-5, rtol=1e-4)
