"""LightNet, InLine, LinFusion, RALA, SLAB-SLA, LINA and Flowformer against catalog oracles."""

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.ops.linear import feature_maps as fm
from attnjax.ops.linear import mechanisms as mech

B, T, H, D = 2, 9, 2, 4
RNG = np.random.default_rng(0)


def _arr(*shape, scale=1.0):
  return jnp.asarray(RNG.normal(size=shape) * scale, jnp.float32)


def test_lightnet_equals_per_dim_prefix_softmax_and_chains_state():
  q, k, v = _arr(B, T, H, D), _arr(B, T, H, D, scale=3.0), _arr(B, T, H, 3)
  o, (s, z) = mech.lightnet_attention(q, k, v, output_final_state=True, chunk_size=4)
  # Oracle [74]: o_t = sum_d q_td sum_{s<=t} softmax_{s<=t}(k_{., d})_s v_s.
  mask = jnp.tril(jnp.ones((T, T), bool))
  logits = jnp.where(mask[None, :, :, None, None], k[:, None], -jnp.inf)   # [B, t, s, H, D]
  p = jax.nn.softmax(logits, axis=2)
  ref = jnp.einsum("bthd,btshd,bshe->bthe", q, p, v)
  np.testing.assert_allclose(o, ref, atol=1e-4, rtol=1e-4)
  # Prefill 5 then the rest from the carried (S, z) equals the full forward.
  o1, st = mech.lightnet_attention(q[:, :5], k[:, :5], v[:, :5], output_final_state=True)
  o2, _ = mech.lightnet_attention(q[:, 5:], k[:, 5:], v[:, 5:], initial_state=st)
  np.testing.assert_allclose(jnp.concatenate([o1, o2], 1), o, atol=1e-4, rtol=1e-4)
  # Packed sequences restart the softmax.
  seg = jnp.asarray([[0] * 4 + [1] * 5] * B)
  op, _ = mech.lightnet_attention(q, k, v, segment_ids=seg)
  o_b, _ = mech.lightnet_attention(q[:, 4:], k[:, 4:], v[:, 4:])
  np.testing.assert_allclose(op[:, 4:], o_b, atol=1e-4, rtol=1e-4)


def _weights_check(fn, causal, **kw):
  """Constant V gives o = v (weights sum to 1) and matches the explicit weight matrix."""
  pq, pk = fm.elu_plus_one(_arr(B, T, H, D)), fm.elu_plus_one(_arr(B, T, H, D))
  const = jnp.broadcast_to(jnp.asarray([0.5, -1.0, 2.0]), (B, T, H, 3))
  np.testing.assert_allclose(fn(pq, pk, const, causal=causal, **kw), const, atol=1e-4, rtol=1e-4)
  return pq, pk


def test_inline_weights_sum_to_one_and_match_quadratic_form():
  for causal in (False, True):
    pq, pk = _weights_check(mech.inline_attention, causal, chunk_size=4)
    v = _arr(B, T, H, 3)
    a = jnp.einsum("bihd,bjhd->bhij", pq, pk)
    mask = jnp.tril(jnp.ones((T, T), bool)) if causal else jnp.ones((T, T), bool)
    n = mask.sum(-1)[:, None]
    a = jnp.where(mask, a, 0.0)
    w = jnp.where(mask, a - a.sum(-1, keepdims=True) / n + 1.0 / n, 0.0)
    ref = jnp.einsum("bhij,bjhe->bihe", w, v)
    np.testing.assert_allclose(mech.inline_attention(pq, pk, v, causal=causal), ref, atol=1e-4, rtol=1e-4)
  # Injectivity: non-parallel queries give different weight rows (unlike normalised LA, q -> 2q
  # is not invisible): scaling a query changes its output.
  o1 = mech.inline_attention(pq, pk, v)
  o2 = mech.inline_attention(pq.at[:, 0].multiply(2.0), pk, v)
  assert not np.allclose(o1[:, 0], o2[:, 0], atol=1e-4)


def test_linfusion_and_sla_and_lina_weights_sum_to_one():
  for causal in (False, True):
    _weights_check(mech.linfusion_attention, causal, eps=0.0)
    _weights_check(mech.sla_attention, causal, eps=0.0)
  pq, pk = fm.elu_plus_one(_arr(B, T, H, D)), fm.elu_plus_one(_arr(B, T, H, D))
  v = _arr(B, T, H, 3)
  gate = jnp.asarray(RNG.uniform(0.1, 2.0, size=(T,)), jnp.float32)
  o = mech.lina_attention(pq, pk, v, gate, eps=0.0)
  a = jnp.einsum("bihd,bjhd->bhij", pq, pk) * gate
  np.testing.assert_allclose(o, jnp.einsum("bhij,bjhe->bihe", a / a.sum(-1, keepdims=True), v),
                             atol=1e-4, rtol=1e-4)
  plain = mech.lina_attention(pq, pk, v, jnp.ones((T,)), eps=0.0)
  ref = jnp.einsum("bhij,bjhe->bihe", jnp.einsum("bihd,bjhd->bhij", pq, pk) /
                   jnp.einsum("bihd,bjhd->bhi", pq, pk)[..., None], v)
  np.testing.assert_allclose(plain, ref, atol=1e-4, rtol=1e-4)


def test_rala_weights_sum_to_one_and_uniform_eff_is_plain_la():
  pq, pk = fm.elu_plus_one(_arr(B, T, H, D)), fm.elu_plus_one(_arr(B, T, H, D))
  const = jnp.broadcast_to(jnp.asarray([0.5, -1.0, 2.0]), (B, T, H, 3))
  np.testing.assert_allclose(mech.rala_attention(pq, pk, const), const, atol=1e-4, rtol=1e-4)
  v = _arr(B, T, H, 3)
  # scale = 0 makes eff uniform: plain normalised linear attention.
  o = mech.rala_attention(pq, pk, v, scale=0.0)
  a = jnp.einsum("bihd,bjhd->bhij", pq, pk)
  np.testing.assert_allclose(o, jnp.einsum("bhij,bjhe->bihe", a / a.sum(-1, keepdims=True), v),
                             atol=1e-4, rtol=1e-4)


def test_flowformer_linear_forms_equal_explicit_quadratic():
  q, k, v = _arr(B, T, H, D), _arr(B, T, H, D), _arr(B, T, H, 3)
  eps = 1e-6
  pq, pk = jax.nn.sigmoid(q), jax.nn.sigmoid(k)
  for causal in (False, True):
    m = jnp.tril(jnp.ones((T, T))) if causal else jnp.ones((T, T))   # m[i, j]: j visible to i
    qk = jnp.einsum("bihd,bjhd->bhij", pq + eps, pk + eps)           # pairwise (eps on both sides)
    incoming = jnp.einsum("bihd,bjhd,ij->bhi", pq + eps, pk, m) + eps * jnp.sum(pq + eps, -1).transpose(0, 2, 1) * 0
    incoming = jnp.einsum("bihd,bhid->bhi", pq + eps, jnp.einsum("ij,bjhd->bhid", m, pk) + eps)
    # Key j's outgoing flow sums the queries that reach it: i <= j when causal (m[j, i]).
    outgoing = jnp.einsum("bjhd,bhjd->bhj", pk + eps, jnp.einsum("ji,bihd->bhjd", m, pq) + eps)
    cons_in = jnp.einsum("bihd,bhid->bhi", pq + eps,
                         jnp.einsum("ij,bjhd->bhid", m, pk / outgoing.transpose(0, 2, 1)[..., None]) + eps)
    cons_out = jnp.einsum("bjhd,bhjd->bhj", pk + eps,
                          jnp.einsum("ji,bihd->bhjd", m, pq / incoming.transpose(0, 2, 1)[..., None]) + eps)
    if causal:
      e = jnp.exp(cons_out)
      comp = jnp.arange(1, T + 1) * e / jnp.cumsum(e, -1)
    else:
      comp = T * jax.nn.softmax(cons_out, -1)
    vhat = v * comp.transpose(0, 2, 1)[..., None]
    att = jnp.einsum("bihd,bjhd->bhij", pq, pk) * m
    r = jnp.einsum("bhij,bjhe->bihe", att, vhat) / incoming.transpose(0, 2, 1)[..., None]
    ref = jax.nn.sigmoid(cons_in).transpose(0, 2, 1)[..., None] * r
    np.testing.assert_allclose(mech.flow_attention(q, k, v, causal=causal, eps=eps), ref,
                               atol=1e-4, rtol=1e-4, err_msg=f"causal={causal}")
    del qk
