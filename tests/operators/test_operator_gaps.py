"""Per-head entropy of any softmax-family op, MoH compute skipping, DHA fusion from an MHA checkpoint,
CCA (ops and the `cca` mixer), EP / LAMA poolers, FlashBias SVD error, and the gradients of DHA,
MODA and hierarchical attention against explicit references."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.operators import EfficientProbe, LowRankAttentionPooling
from attnjax.ops import dot_product_attention
from attnjax.ops import operators as ops
from attnjax.ops.operators._common import PatternUndefinedError
from attnjax.registry import build_mixer

B, TQ, TK, H, HK, D, DV = 2, 5, 7, 4, 2, 5, 3


def _rnd(seed, *shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _grads_close(f, g, args, out_shape, atol=1e-5):
  """Outputs (atol), losses and gradients of `f` against the reference `g` (both jitted: one
  compile each is far cheaper than op-by-op dispatch of a Python-loop reference)."""
  ct = _rnd(99, *out_shape)
  n = tuple(range(len(args)))

  def vg(fn):
    def loss(*a):
      o = fn(*a)
      return jnp.sum(o * ct), o
    return jax.jit(jax.value_and_grad(loss, n, has_aux=True))

  (v1, o1), g1 = vg(f)(*args)
  (v2, o2), g2 = vg(g)(*args)
  np.testing.assert_allclose(o1, o2, atol=atol)
  np.testing.assert_allclose(v1, v2, atol=atol, rtol=1e-4)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=atol, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Per-head entropy from any softmax-family op.


def test_probe_weights_equal_each_ops_explicit_weights():
  q, k = _rnd(1, B, TQ, H, D), _rnd(2, B, TK, HK, D)
  # Each probe and its explicit weights in one compiled call (eager dispatch dominates here).
  both = lambda probe, explicit: jax.jit(lambda q, k: (probe(q, k), explicit(q, k)))
  for impl in ("reference", "xla"):
    got, want = both(lambda q, k: ops.probe_attention_weights(
        dot_product_attention, q, k, causal=True, implementation=impl),
        lambda q, k: ops.softmax_attention_weights(q, k, causal=True))(q, k)
    np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(*both(
      lambda q, k: ops.probe_attention_weights(ops.sigmoid_attention, q, k, causal=True),
      lambda q, k: ops.sigmoid_attention_weights(q, k, causal=True))(q, k), atol=1e-6)
  np.testing.assert_allclose(*both(
      lambda q, k: ops.probe_attention_weights(ops.lssa_attention, q, k, reweight_power=2.0),
      lambda q, k: ops.lssa_weights(q, k, reweight_power=2.0))(q, k), atol=1e-6)
  np.testing.assert_allclose(*both(
      lambda q, k: ops.probe_attention_weights(ops.reversed_attention, q, k),
      ops.reversed_attention_weights)(q, k), atol=1e-6)
  qs, ks = _rnd(1, B, TK, H, D), _rnd(2, B, TK, H, D)
  groups = jnp.broadcast_to(jnp.arange(TK) // 3, (B, TK))
  np.testing.assert_allclose(*both(
      lambda q, k: ops.probe_attention_weights(
          functools.partial(ops.hierarchical_attention, group_ids=groups), q, k),
      lambda q, k: ops.hierarchical_attention_weights(q, k, groups))(qs, ks), atol=1e-6)
  with pytest.raises(ValueError, match="linear in v"):
    ops.probe_attention_weights(lambda q, k, v, **kw: q, q, k)


def test_head_entropy_oracles_across_the_family():
  # q = 0: every softmax-family op is uniform over the visible keys, so row i has entropy log n_i
  # (causal cross, bottom-right aligned: n_i = i + Tk - Tq + 1), and the head entropy is their mean.
  q, k = jnp.zeros((B, TQ, H, D)), _rnd(2, B, TK, HK, D)
  n = np.arange(TQ) + TK - TQ + 1
  want = np.full(H, np.mean(np.log(n)))
  family = {
      "softmax": dot_product_attention,
      "sigmoid": ops.sigmoid_attention,
      "lssa": ops.lssa_attention,
      "dha": functools.partial(ops.dha_attention, k_assign=(1, 0, 0, 1), v_assign=(0, 1, 1, 0)),
      "gated": lambda q, k, v, **kw: ops.gated_attention(q, k, v, _rnd(5, B, TQ, H), **kw),
      "moh": lambda q, k, v, **kw: ops.mixture_of_heads_attention(q, k, v, jnp.full((B, TQ, H), 0.3), **kw),
      "flashbias": lambda q, k, v, **kw: ops.flashbias_attention(
          q, k, v, jnp.zeros((TQ, H, 2)), _rnd(6, TK, H, 2), **kw),
  }
  for name, fn in family.items():
    ent = ops.head_entropy(fn, q, k, causal=True)
    np.testing.assert_allclose(ent, want, rtol=1e-5, err_msg=name)
    rows = ops.head_entropy(fn, q, k, causal=True, reduce=False)
    np.testing.assert_allclose(rows, np.broadcast_to(np.log(n), (B, H, TQ)), rtol=1e-5, atol=1e-6,
                               err_msg=name)
  # Sharp logits: the entropy falls well below uniform, and stays >= 0.
  qk = _rnd(1, B, TQ, H, D) * 20.0
  sharp = ops.head_entropy(dot_product_attention, qk, k, causal=True)
  assert np.all(sharp >= 0) and np.all(sharp < 0.5 * want)
  # Differential attention (signed weights): entropy of |A| renormalised, finite.
  diff = lambda q, k, v, **kw: ops.differential_attention(q, k, q[:, :, :2], k, jnp.repeat(v, 2, 2),
                                                          0.4, **kw)
  ent = ops.head_entropy(diff, _rnd(1, B, TQ, H, D), k, causal=True, num_v_heads=HK)
  assert ent.shape == (H,) and np.all(np.isfinite(ent)) and np.all(ent > 0)


# ---------------------------------------------------------------------------------------------
# MoH: unselected heads cost no compute.


def _flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def test_moh_routed_heads_skip_the_unselected_heads_compute():
  h, t, d = 8, 48, 16
  q, k, v = _rnd(1, 1, t, h, d), _rnd(2, 1, t, h, d), _rnd(3, 1, t, h, d)

  def routed(kk):
    idx = jax.lax.top_k(_rnd(4, 1, t, h), kk)[1]
    return lambda q, k, v: ops.routed_heads_attention(
        jnp.take_along_axis(q, idx[..., None], 2), idx, k, v, causal=True)

  dense = _flops(lambda q, k, v: ops.mixture_of_heads_attention(q, k, v, jnp.ones((1, t, h)),
                                                                causal=True,
                                                                implementation="reference"),
                 q, k, v)
  f2, f4 = _flops(routed(2), q, k, v), _flops(routed(4), q, k, v)
  # The quadratic part scales with the k heads a token picked, not with all H heads.
  assert f2 < 0.4 * dense, (f2, dense)
  assert 1.6 < f4 / f2 < 2.4, (f2, f4)


def test_moh_layer_gather_routing_costs_less_than_dense():
  t = 48
  x = _rnd(1, 1, t, 32)
  counts = {}
  for routing in ("gather", "dense"):
    m = build_mixer("moh", d_model=32, num_heads=8, causal=True, rngs=nnx.Rngs(0), num_shared=0,
                    top_k=2, routing=routing)
    graphdef, state = nnx.split(m)
    counts[routing] = _flops(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
  assert counts["gather"] < 0.75 * counts["dense"], counts


# ---------------------------------------------------------------------------------------------
# DHA: fusion from an MHA checkpoint.


def test_dha_fusion_from_mha_with_shared_heads_is_exact():
  d_model, heads = 24, 4
  hd = d_model // heads
  mha = build_mixer("softmax", d_model=d_model, num_heads=heads, causal=True, rngs=nnx.Rngs(0))
  wk = mha.k_proj.kernel[...].reshape(d_model, heads, hd)
  wv = mha.v_proj.kernel[...].reshape(d_model, heads, hd)
  # An MHA whose K heads come in pairs (0=1, 2=3) and whose V heads pair differently (0=2, 1=3):
  # DHA with 2 key groups, 2 value groups and averaging fusion reproduces it exactly.
  mha.k_proj.kernel[...] = wk[:, [0, 0, 2, 2]].reshape(d_model, -1)
  mha.v_proj.kernel[...] = wv[:, [0, 1, 0, 1]].reshape(d_model, -1)
  dha = build_mixer("dha", d_model=d_model, num_heads=heads, causal=True, rngs=nnx.Rngs(1),
                    num_k_groups=2, num_v_groups=2, k_assign=(0, 0, 1, 1), v_assign=(0, 1, 0, 1))
  dha.fuse_from(mha, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]], [[0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5]])
  x = _rnd(2, B, 9, d_model)
  fwd = nnx.jit(lambda m, x: m(x))
  np.testing.assert_allclose(fwd(dha, x), fwd(mha, x), atol=1e-5)
  assert dha.k_proj.kernel.shape == (d_model, 2 * hd)
  # One-hot fusion selects heads.
  dha.fuse_from(mha, [[0, 0, 1, 0], [1, 0, 0, 0]], [[0, 1, 0, 0], [1, 0, 0, 0]])
  np.testing.assert_allclose(dha.k_proj.kernel[...].reshape(d_model, 2, hd),
                             mha.k_proj.kernel[...].reshape(d_model, heads, hd)[:, [2, 0]])
  with pytest.raises(ValueError, match="k_fusion"):
    dha.fuse_from(mha, jnp.ones((3, 4)), jnp.ones((2, 4)))
  normed = build_mixer("softmax", d_model=d_model, num_heads=heads, causal=True, rngs=nnx.Rngs(0),
                       qk_norm=True)
  with pytest.raises(ValueError, match="qk_norm"):
    dha.fuse_from(normed, jnp.ones((2, 4)), jnp.ones((2, 4)))


@pytest.mark.slow
def test_moda_hierarchical_values_and_grads_match_explicit_references():
  # (DHA is a head gather in front of the softmax engine: its values are checked against the
  # engine in test_cab_patterns, its gradients are the engine's.)
  q, k, v = _rnd(1, B, TQ, H, D), _rnd(2, B, TK, HK, D), _rnd(3, B, TK, HK, DV)
  # MODA: explicit per-pair scores.
  mq = jnp.broadcast_to(jnp.arange(TQ) % 2, (B, TQ))
  mk = jnp.broadcast_to(jnp.arange(TK) % 2, (B, TK))
  bias = jnp.array([[0.0, -0.7], [0.4, 0.0]])

  def moda_ref(q, k, v, basis):
    kr, vr = jnp.repeat(k, H // HK, 2), jnp.repeat(v, H // HK, 2)
    qb = jnp.einsum("bqhd,bqed->bqhe", q, basis[mq])
    same = (mq[:, :, None] == mk[:, None, :])[:, None]
    s = jnp.where(same, jnp.einsum("bqhd,bkhd->bhqk", q, kr), jnp.einsum("bqhd,bkhd->bhqk", qb, kr))
    s = s / math.sqrt(D) + bias[mq[:, :, None], mk[:, None, :]][:, None]
    s = jnp.where(jnp.tril(jnp.ones((TQ, TK), bool), TK - TQ), s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), vr)

  basis = jnp.eye(D) + 0.3 * _rnd(4, 2, D, D)
  moda = lambda q, k, v, basis: ops.moda_attention(q, k, v, mq, kv_modality_ids=mk, pair_bias=bias,
                                                   basis=basis, causal=True)
  _grads_close(moda, moda_ref, (q, k, v, basis), (B, TQ, H, DV))   # outputs, losses, grads
  # Hierarchical: block-constant weights from the definition, via a one-hot group matrix G:
  # block mass M = G^T exp(S) G / (|g| |G|), entry (i, j) = exp(S_ij) in the own group, M[g(i), g(j)]
  # elsewhere, then row normalisation.
  t, hh = 6, 2
  qs, ks, vs = _rnd(5, 1, t, hh, D), _rnd(6, 1, t, hh, D), _rnd(7, 1, t, hh, DV)
  gid_np = np.array([0, 0, 0, 1, 2, 2])
  gid = jnp.asarray(gid_np)[None]
  onehot = np.eye(3, dtype=np.float32)[gid_np]                 # [T, 3]
  counts = onehot.sum(0)

  def hier_ref(q, k, v):
    e = jnp.exp(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D))
    mass = jnp.einsum("ig,bhij,jG->bhgG", onehot, e, onehot) / np.outer(counts, counts)
    cross = mass[:, :, gid_np][:, :, :, gid_np]
    w = jnp.where(gid_np[:, None] == gid_np[None, :], e, cross)
    return jnp.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)

  hier = lambda q, k, v: ops.hierarchical_attention(q, k, v, gid)
  _grads_close(hier, hier_ref, (qs, ks, vs), (1, t, hh, DV))   # outputs, losses, grads


# ---------------------------------------------------------------------------------------------
# Concentric causal attention: prefix layout, token-level visibility, and the `cca` mixer.


def test_cca_layout_with_prefix_matches_the_authors_construction():
  gh, gw, p, nt = 4, 6, 2, 3
  pos = np.asarray(ops.cca_positions(gh, gw, num_text=nt, num_prefix=p))
  ring = np.asarray(ops.cca_ring_index(gh, gw))
  # Authors' code: prefix 0..P-1, image P + ring (outer 0 .. centre), text resumes at P + #rings.
  np.testing.assert_array_equal(pos[:p], [0, 1])
  np.testing.assert_array_equal(pos[p:p + gh * gw], p + ring)
  np.testing.assert_array_equal(pos[-nt:], p + 2 + np.arange(nt))
  assert ring.reshape(gh, gw)[0].max() == 0 and ring.max() == 1
  m = np.asarray(ops.cca_mask(gh, gw, num_text=nt, num_prefix=p))
  t = p + gh * gw + nt
  causal = np.tril(np.ones((t, t), bool))
  vis = np.zeros((t, t), bool)
  vis[p:p + gh * gw, p:p + gh * gw] = True
  want = np.where(vis, ring[np.clip(np.arange(t) - p, 0, gh * gw - 1)][None, :]
                  <= ring[np.clip(np.arange(t) - p, 0, gh * gw - 1)][:, None], causal)
  np.testing.assert_array_equal(m, want)
  assert m[p:p + gh * gw, :p].all()                          # the image sees the prefix
  # Token-level visibility for arbitrary query subsets (decoding) equals the rows of the mask.
  rows = np.array([3, 20, t - 1])
  np.testing.assert_array_equal(ops.cca_visibility(rows, np.arange(t), gh, gw, p), m[rows])
  with pytest.raises(ValueError, match="grid"):
    ops.cca_ring_index(0, 3)


@pytest.mark.slow
def test_cca_mixer_equals_softmax_with_cca_positions_and_mask_and_decodes():
  d_model, heads, gh, gw, p, nt = 16, 2, 3, 4, 1, 3
  t = p + gh * gw + nt
  m = build_mixer("cca", d_model=d_model, num_heads=heads, causal=True, rngs=nnx.Rngs(0),
                  grid=(gh, gw), num_prefix=p)
  x = _rnd(1, B, t, d_model)
  fwd = nnx.jit(lambda m, x: m(x))
  y = fwd(m, x)
  hd = (heads, d_model // heads)
  pos = ops.cca_positions(gh, gw, num_text=nt, num_prefix=p)
  from attnjax.ops.rope import apply_rope
  mask = ops.cca_mask(gh, gw, num_text=nt, num_prefix=p)[None, None]

  @nnx.jit
  def explicit(m, x, mask):   # the mixer written out: projections, CCA rope, masked softmax
    qh = apply_rope(m.q_proj(x).reshape(B, t, *hd), pos)
    kh = apply_rope(m.k_proj(x).reshape(B, t, *hd), pos)
    vh = m.v_proj(x).reshape(B, t, *hd)
    return m.o_proj(dot_product_attention(qh, kh, vh, mask=mask).reshape(B, t, -1))

  np.testing.assert_allclose(y, explicit(m, x, mask), atol=1e-5)
  # Prefill with the whole image, then text token by token == the full forward.
  m.init_cache(B, t + 2)
  n0 = p + gh * gw + 1
  decode = nnx.jit(lambda m, x: m(x, decode=True))  # the one-token steps share one compile
  outs = [decode(m, x[:, :n0])] + [decode(m, x[:, i:i + 1]) for i in range(n0, t)]
  np.testing.assert_allclose(jnp.concatenate(outs, 1), y, atol=2e-5, rtol=2e-5)
  # Non-causal: positions only (every token sees every token): the explicit form without mask.
  mb = build_mixer("cca", d_model=d_model, num_heads=heads, causal=False, rngs=nnx.Rngs(0),
                   grid=(gh, gw), num_prefix=p)
  np.testing.assert_allclose(fwd(mb, x), explicit(mb, x, None), atol=1e-5)
  with pytest.raises(PatternUndefinedError, match="cross attention is undefined"):
    m(x, context=_rnd(2, B, t + 1, d_model))
  with pytest.raises(ValueError, match="rope"):
    build_mixer("cca", d_model=d_model, num_heads=heads, causal=True, rngs=nnx.Rngs(0),
                grid=(gh, gw), rope=True)


# ---------------------------------------------------------------------------------------------
# Poolers: EP and LAMA against explicit per-query / per-head references, masks, grads.


def test_efficient_probe_matches_per_query_reference_masks_and_grads():
  b, n, c, m_q = 2, 7, 8, 4
  x, qs, wv = _rnd(1, b, n, c), _rnd(2, m_q, c), _rnd(3, c, c)

  def ref(x, qs, wv):
    chunk = wv.shape[1] // m_q
    outs = []
    for m in range(m_q):   # query m attends over the raw tokens and reads its value chunk only
      a = jax.nn.softmax(x @ qs[m] / math.sqrt(c), axis=-1)
      outs.append(jnp.einsum("bn,bnc->bc", a, x @ wv[:, m * chunk:(m + 1) * chunk]))
    return jnp.concatenate(outs, -1)

  _grads_close(ops.efficient_probe, ref, (x, qs, wv), (b, c))   # outputs, losses, grads
  mask = jnp.array([[True] * 5 + [False] * 2, [True] * 7])
  probe_fn = jax.jit(ops.efficient_probe)
  np.testing.assert_allclose(probe_fn(x, qs, wv, mask=mask)[0],
                             probe_fn(x[:1, :5], qs, wv)[0], atol=1e-5)
  with pytest.raises(ValueError, match="mask"):
    ops.efficient_probe(x, qs, wv, mask=mask[:, :3])
  probe = EfficientProbe(c, num_queries=m_q, d_out=2, rngs=nnx.Rngs(0))
  assert nnx.jit(lambda m, x: m(x))(probe, x).shape == (b, c // 2)
  with pytest.raises(ValueError, match="divisible"):
    EfficientProbe(c, num_queries=3, rngs=nnx.Rngs(0))


def test_lama_matches_per_head_reference_masks_and_grads():
  b, n, d, r, heads = 2, 6, 5, 3, 2
  h, u, v, p = _rnd(1, b, n, d), _rnd(2, d, r), _rnd(3, d, r), _rnd(4, heads, r)

  def ref(h, u, v, p):
    c = h.mean(1)                                              # global context
    outs = []
    for kk in range(heads):
      s = jnp.einsum("bnr,r->bn", (h @ u) * (c @ v)[:, None], p[kk])
      outs.append(jnp.einsum("bn,bnd->bd", jax.nn.softmax(s, -1), h))
    return jnp.concatenate(outs, -1)

  _grads_close(lambda *a: ops.lama_pool(*a)[0], ref, (h, u, v, p), (b, heads * d))  # outputs too
  mask = jnp.array([[True] * 4 + [False] * 2, [True] * 6])
  lama = jax.jit(ops.lama_pool)
  np.testing.assert_allclose(lama(h, u, v, p, mask=mask)[0][0],
                             lama(h[:1, :4], u, v, p)[0][0], atol=1e-5)
  with pytest.raises(ValueError, match="u, v"):
    ops.lama_pool(h, u[:3], v, p)
  pool = LowRankAttentionPooling(d, rank=r, num_heads=heads, rngs=nnx.Rngs(0))
  assert nnx.jit(lambda m, h: m(h))(pool, h).shape == (b, heads * d)


# ---------------------------------------------------------------------------------------------
# FlashBias: the reported SVD error is the Eckart-Young optimum, and bounds nothing silently.


def test_flashbias_reported_error_is_the_svd_tail():
  bias = -0.2 * jnp.abs(jnp.arange(TQ)[:, None] - jnp.arange(TK)[None, :]).astype(jnp.float32)
  s = np.linalg.svd(np.asarray(bias), compute_uv=False)
  for rank in (1, 2, 4):
    phi_q, phi_k, err = ops.lowrank_bias_factors(bias, rank)
    want = np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s ** 2))
    np.testing.assert_allclose(err, [want], rtol=1e-4, atol=1e-6)
    approx = np.einsum("qhr,khr->hqk", phi_q, phi_k)[0]
    np.testing.assert_allclose(np.linalg.norm(np.asarray(bias) - approx) / np.linalg.norm(bias), want,
                               rtol=1e-4, atol=1e-6)
