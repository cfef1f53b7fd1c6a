"""Feature maps and MALA against their defining properties."""

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.ops.linear import feature_maps as fm
from attnjax.ops.linear.engine import linear_attention
from attnjax.ops.linear.mechanisms import mala_attention, mala_step

RNG = np.random.default_rng(0)


def test_taylor_kernel_is_second_order_exp_expansion():
  q, k = RNG.normal(size=(2, 5, 6)).astype(np.float32)
  got = np.einsum("nf,nf->n", fm.taylor(jnp.asarray(q)), fm.taylor(jnp.asarray(k)))
  dot = np.einsum("nd,nd->n", q, k)
  np.testing.assert_allclose(got, 1 + dot / 6 ** 0.5 + dot ** 2 / 12, rtol=1e-5, atol=1e-5)


def test_hedgehog_weights_rows_sum_to_one_and_linear_form_equals_weights():
  """Oracle (Zhang et al. 2024, arXiv:2402.04347): Ahat rows >= 0 sum to 1; the O(T) normalised form equals Ahat V."""
  b, t, h, d = 1, 9, 2, 4
  q, k, v = (jnp.asarray(RNG.normal(size=(b, t, h, d)), jnp.float32) for _ in range(3))
  w = jnp.asarray(RNG.normal(size=(h, d, d)), jnp.float32)
  pq, pk = fm.hedgehog(q, w), fm.hedgehog(k, w)
  a = fm.linear_attention_weights(pq, pk, eps=0.0)
  assert np.all(np.asarray(a) >= 0)
  np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-5)
  o, _ = linear_attention(pq, pk, v, normalize=True, chunk_size=4)
  np.testing.assert_allclose(o, jnp.einsum("bhij,bjhe->bihe", a, v), atol=1e-4, rtol=1e-4)
  # The distillation loss is the soft cross-entropy, minimised (= teacher entropy) iff Ahat = A.
  loss = fm.hedgehog_distillation_loss(q, k, pq, pk)
  teacher = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)),
                                     jnp.einsum("bihd,bjhd->bhij", q, k) * d ** -0.5, -jnp.inf), -1)
  entropy = -jnp.mean(jnp.sum(jnp.where(teacher > 0, teacher * jnp.log(teacher), 0.0), -1))
  assert float(loss) > float(entropy)


def test_performer_features_approximate_softmax_kernel():
  h, d, m = 1, 4, 4096
  q, k = (jnp.asarray(RNG.normal(size=(3, h, d)) * 0.5, jnp.float32) for _ in range(2))
  proj = fm.orthogonal_projection(jax.random.key(0), h, d, m)
  pq, pk = fm.performer_features(q, proj, is_query=False), fm.performer_features(k, proj, is_query=False)
  approx = np.einsum("nhm,nhm->nh", pq, pk)
  exact = np.exp(np.einsum("nhd,nhd->nh", q, k) / d ** 0.5)
  np.testing.assert_allclose(approx, exact, rtol=0.1)   # Monte-Carlo error ~ 1/sqrt(m)


def test_mala_constant_values_and_weights_sum_to_one():
  b, t, h, d = 2, 10, 2, 4
  pq, pk = (fm.elu_plus_one(jnp.asarray(RNG.normal(size=(b, t, h, d)), jnp.float32)) for _ in range(2))
  const = jnp.broadcast_to(jnp.asarray([1.5, -2.0, 0.25]), (b, t, h, 3))
  for causal in (True, False):
    o, _ = mala_attention(pq, pk, const, causal=causal, chunk_size=3)
    np.testing.assert_allclose(o, const, atol=1e-4, rtol=1e-4)
  # Non-causal vs the paper's explicit formula.
  v = jnp.asarray(RNG.normal(size=(b, t, h, 3)), jnp.float32)
  o, _ = mala_attention(pq, pk, v, causal=False)
  s = d ** -0.5
  z = s * jnp.einsum("bihd,bhd->bih", pq, pk.mean(1))[..., None]
  att = jnp.einsum("bihd,bjhd->bhij", pq, pk)
  ref = (1 + 1 / z) * s * jnp.einsum("bhij,bjhe->bihe", att, v) / t - z * v.mean(1)[:, None]
  np.testing.assert_allclose(o, ref, atol=1e-4, rtol=1e-4)
  # Scaling q changes the output (magnitude is not neglected), unlike normalised linear attention.
  o2, _ = mala_attention(pq * 3.0, pk, v, causal=False)
  assert not np.allclose(o, o2, atol=1e-3)
  n1, _ = linear_attention(pq, pk, v, causal=False, normalize=True)
  n2, _ = linear_attention(pq * 3.0, pk, v, causal=False, normalize=True)
  np.testing.assert_allclose(n1, n2, atol=1e-4, rtol=1e-4)


def test_mala_step_equals_causal_forward():
  b, t, h, d = 1, 6, 2, 4
  pq, pk = (fm.elu_plus_one(jnp.asarray(RNG.normal(size=(b, t, h, d)), jnp.float32)) for _ in range(2))
  v = jnp.asarray(RNG.normal(size=(b, t, h, 3)), jnp.float32)
  full, _ = mala_attention(pq, pk, v)
  state = (jnp.zeros((b, h, d, 4)), jnp.zeros((b, h, 1, 4)))
  for i in range(t):
    o, state = mala_step(pq[:, i], pk[:, i], v[:, i], state)
  np.testing.assert_allclose(o, full[:, -1], atol=1e-5, rtol=1e-5)


def test_transnormer_layer_is_normed_linear_attention_and_ignores_query_scale():
  """The `transnormer` mixer (relu kernel) against the NormAttention formula (Qin et al. 2022, arXiv:2210.10340)
  (TransNormer, Qin et al. 2022: `O = RMSNorm(phi(Q) (phi(K)^T V))`, causal, no denominator),
  transcribed in numpy with the layer's weights and a random norm scale; then the property that
  makes it a *norm* attention: Q -> 3Q (here: W_q -> 3 W_q) leaves the output unchanged."""
  from flax import nnx
  from attnjax.registry import build_mixer
  dm, h, t = 8, 2, 7
  m = build_mixer("transnormer", d_model=dm, num_heads=h, causal=True, rngs=nnx.Rngs(0),
                  feature_map="relu", chunk_size=4)
  m.out_norm.scale[...] = jnp.asarray(RNG.uniform(0.5, 1.5, m.out_norm.scale.shape), jnp.float32)
  x = jnp.asarray(RNG.normal(size=(2, t, dm)), jnp.float32)
  f = lambda a: np.asarray(a, np.float64)
  xs = f(x)
  q, k, v = (np.maximum(xs @ f(l.kernel[...]), 0) if i < 2 else xs @ f(l.kernel[...])
             for i, l in enumerate((m.q_proj, m.k_proj, m.v_proj)))
  q, k, v = (a.reshape(2, t, h, -1) for a in (q, k, v))
  att = np.einsum("bihd,bjhd->bhij", q, k) * np.tril(np.ones((t, t)))
  o = np.einsum("bhij,bjhe->bihe", att, v) * (dm // h) ** -0.5
  o = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + 1e-6) * f(m.out_norm.scale[...])
  want = o.reshape(2, t, dm) @ f(m.o_proj.kernel[...])
  fwd = nnx.jit(lambda m, x: m(x))
  y = fwd(m, x)
  np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-4)
  # Invariance up to the norm's eps (1e-6 against mean(o^2) ~ 1e-4 in the smallest rows: < 1%);
  # without the norm the output would triple.
  m.q_proj.kernel[...] = 3.0 * m.q_proj.kernel[...]
  np.testing.assert_allclose(fwd(m, x), y, atol=1e-3, rtol=2e-2)
