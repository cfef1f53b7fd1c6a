"""LightNet, InLine, LinFusion, RALA, SLAB-SLA, LINA and Flowformer against their defining properties."""

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
  # Oracle (Qin et al. 2024, arXiv:2405.21022): o_t = sum_d q_td sum_{s<=t} softmax_{s<=t}(k_{., d})_s v_s.
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


def _inline_oracle(q, k, v):
  """Transcription (numpy float64) of LeapLabTHU/InLine `models/inline_deit.py`
  `InLineAttention.forward`, the attention lines, on `[B, N, H, D]` (identity feature map):
  `kv = (k^T sqrt(scale/n)) @ (v sqrt(scale/n))`, `x = q @ kv + (1 - q @ mean(k)^T scale) mean(v)`."""
  q, k, v = (np.asarray(a, np.float64).transpose(0, 2, 1, 3) for a in (q, k, v))   # b h n d
  n, scale = q.shape[2], q.shape[-1] ** -0.5
  kv = (k.transpose(0, 1, 3, 2) * (scale / n) ** 0.5) @ (v * (scale / n) ** 0.5)
  x = q @ kv + (1 - q @ k.mean(2, keepdims=True).transpose(0, 1, 3, 2) * scale) * v.mean(2, keepdims=True)
  return x.transpose(0, 2, 1, 3)


def test_inline_matches_the_authors_formula_and_weights_sum_to_one():
  q, k, v = _arr(B, T, H, D, scale=2.0), _arr(B, T, H, D, scale=2.0), _arr(B, T, H, 3)
  fn = jax.jit(mech.inline_attention, static_argnames=("causal", "chunk_size"))
  np.testing.assert_allclose(fn(q, k, v, chunk_size=4), _inline_oracle(q, k, v), atol=1e-5, rtol=1e-5)
  # Causal extension (ours): the same weights over the prefix, N_i = i + 1.
  w = np.einsum("bihd,bjhd->bhij", q, k) * D ** -0.5
  mask = np.tril(np.ones((T, T), bool))
  n = mask.sum(-1)[:, None]
  w = np.where(mask, (w - np.where(mask, w, 0).sum(-1, keepdims=True) / n) / n + 1.0 / n, 0.0)
  np.testing.assert_allclose(fn(q, k, v, causal=True, chunk_size=4),
                             np.einsum("bhij,bjhe->bihe", w, v), atol=1e-5, rtol=1e-4)
  const = jnp.broadcast_to(jnp.asarray([0.5, -1.0, 2.0]), (B, T, H, 3))   # weights sum to 1
  np.testing.assert_allclose(fn(q, k, const, causal=True, chunk_size=4), const, atol=1e-4)
  # Injectivity: scaling one query changes its output (normalised LA cannot see it).
  o2 = fn(q.at[:, 0].multiply(2.0), k, v, chunk_size=4)
  assert not np.allclose(fn(q, k, v, chunk_size=4)[:, 0], o2[:, 0], atol=1e-4)


def test_inline_layer_matches_the_authors_block_with_its_predicted_local_residual():
  """`InLineMixer` against a transcription of `InLineAttention.forward` (inline_deit.py): identity
  phi, `res_weight = residual(x.mean(1))` (grouped 1x1 conv, GELU, grouped 1x1 conv to `local`
  taps per channel) applied as a per-sample depth-wise conv of V; the authors' 3x3 grid conv is
  the 1-D `local`-tap conv here (zero padding, cls-token exclusion not applicable)."""
  from flax import nnx
  from attnjax.registry import build_mixer
  dm, h, t, w = 8, 2, 7, 3
  m = build_mixer("inline", d_model=dm, num_heads=h, causal=False, rngs=nnx.Rngs(0))
  for p in (m.res_b1, m.res_b2):
    p[...] = jnp.asarray(RNG.normal(size=p.shape) * 0.3, jnp.float32)
  x = _arr(B, t, dm)
  f64 = lambda a: np.asarray(a, np.float64)
  xs = f64(x)
  q, k, v = (xs @ f64(l.kernel[...]) for l in (m.q_proj, m.k_proj, m.v_proj))
  att = _inline_oracle(*(a.reshape(B, t, h, -1) for a in (q, k, v))).reshape(B, t, dm)
  # torch grouped Conv1d(kernel 1): weight [out, in / groups]; group g maps its dh inputs.
  dh = dm // h
  conv1 = lambda z, wt, bias, out_per: np.concatenate(
      [z[:, g * dh:(g + 1) * dh] @ wt[g] for g in range(h)], -1) + bias
  pooled = xs.mean(1)
  hid = conv1(pooled, f64(m.res_w1[...]), f64(m.res_b1[...]), dh)
  hid = 0.5 * hid * (1 + np.vectorize(__import__("math").erf)(hid / np.sqrt(2)))       # nn.GELU
  res_weight = conv1(hid, f64(m.res_w2[...]), f64(m.res_b2[...]), w * dh).reshape(B, dm, w)
  vp = np.pad(v, ((0, 0), (w // 2, w // 2), (0, 0)))
  residual = sum(vp[:, tap:tap + t] * res_weight[:, None, :, tap] for tap in range(w))   # conv1d
  want = (att + residual) @ f64(m.o_proj.kernel[...])
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(m, x), want, atol=1e-5, rtol=1e-4)


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
