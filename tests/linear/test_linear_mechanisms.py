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


def _flow_oracle(q, k, v, causal, eps=1e-6):
  """Transcription (numpy float64) of thuml/Flowformer `Flow_Attention.py`, the core of
  `Flow_Attention.forward` / `Flow_Attention_Causal.forward` after the projections, on
  `[B, N, H, D]` (self-attention: L = S, so the allocation's L/S factor is 1)."""
  sig = lambda x: 1.0 / (1.0 + np.exp(-x))
  qs, ks = (sig(np.asarray(a, np.float64)).transpose(0, 2, 1, 3) for a in (q, k))   # n h l d
  vs = np.asarray(v, np.float64).transpose(0, 2, 1, 3)
  dot = lambda a, b_: np.einsum("nhld,nhld->nhl", a, b_)
  if not causal:
    sink_in = 1.0 / np.einsum("nhld,nhd->nhl", qs + eps, ks.sum(2) + eps)
    src_out = 1.0 / np.einsum("nhld,nhd->nhl", ks + eps, qs.sum(2) + eps)
    c_sink = np.einsum("nhld,nhd->nhl", qs + eps, (ks * src_out[..., None]).sum(2) + eps)
    c_src = np.clip(np.einsum("nhld,nhd->nhl", ks + eps, (qs * sink_in[..., None]).sum(2) + eps), -1, 1)
    alloc = sig(c_sink)
    e = np.exp(c_src - c_src.max(-1, keepdims=True))
    comp = e / e.sum(-1, keepdims=True) * ks.shape[2]
    kv = np.einsum("nhld,nhlm->nhdm", ks, vs * comp[..., None])
    x = np.einsum("nhld,nhdm->nhlm", qs * sink_in[..., None], kv) * alloc[..., None]
  else:
    sink_in = 1.0 / dot(qs + eps, ks.cumsum(2) + eps)
    src_out = 1.0 / dot(ks + eps, qs.cumsum(2) + eps)
    normal = (np.arange(qs.shape[2]) + 1.0)[None, None, :]
    sink_in, src_out = sink_in * normal, src_out * normal
    c_sink = dot(qs + eps, (ks * src_out[..., None]).cumsum(2) + eps) / normal
    c_src = np.clip(dot(ks + eps, (qs * sink_in[..., None]).cumsum(2) + eps) / normal, -1, 1)
    alloc = sig(c_sink)
    c_src = np.exp(c_src)
    comp = c_src / c_src.cumsum(-1) * normal
    kv = np.einsum("nhld,nhlm->nhldm", ks, vs * comp[..., None]).cumsum(2)
    x = np.einsum("nhld,nhldm->nhlm", qs * (sink_in / normal)[..., None], kv) * alloc[..., None]
  return x.transpose(0, 2, 1, 3)


def test_flowformer_matches_the_authors_flow_attention():
  """Both forms against `_flow_oracle` (the authors' code), at a scale where the conserved source
  exceeds 1 (so the clamp acts) and with enough tokens that the causal `normal` rescaling shows;
  `flow_step` token by token equals the causal form."""
  t = 13
  q, k, v = _arr(B, t, H, D, scale=2.0), _arr(B, t, H, D, scale=2.0), _arr(B, t, H, 3)
  for causal in (False, True):
    np.testing.assert_allclose(jax.jit(mech.flow_attention, static_argnames="causal")(q, k, v, causal=causal),
                               _flow_oracle(q, k, v, causal), atol=1e-5, rtol=1e-4,
                               err_msg=f"causal={causal}")
  state = mech.flow_init_state(B, H, D, 3)
  step = jax.jit(mech.flow_step)
  outs = []
  for i in range(t):
    o, state = step(q[:, i], k[:, i], v[:, i], state)
    outs.append(o)
  np.testing.assert_allclose(jnp.stack(outs, 1), _flow_oracle(q, k, v, True), atol=1e-5, rtol=1e-4)
