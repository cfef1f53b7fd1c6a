"""Intra- and inter-layer hybrids: LoLCATs window + linear (shared normaliser), NAtS-L routing,
layer patterns ((Wang et al. 2025, arXiv:2507.06457), LayerBoost) in DecoderLM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.models import DecoderLM
from attnjax.nn.linear import hybrid_layer_pattern, layerboost_pattern
from attnjax.ops.linear import feature_maps as fm
from attnjax.ops.linear import hybrid as hy
from attnjax.ops.linear.delta import delta_rule
from attnjax.ops.softmax import dot_product_attention

B, T, H, D, DV = 2, 13, 2, 4, 3
RNG = np.random.default_rng(0)
SEG = jnp.asarray([[0] * 6 + [1] * 7, [0] * 13])


def _arr(*shape, scale=1.0):
  return jnp.asarray(RNG.normal(size=shape) * scale, jnp.float32)


Q, K, V = _arr(B, T, H, D), _arr(B, T, H, D), _arr(B, T, H, DV)
PQ, PK = fm.elu_plus_one(_arr(B, T, H, D)), fm.elu_plus_one(_arr(B, T, H, D))
WF = jnp.asarray([0.1, 0.7])


def _window_brute(q, k, v, pq, pk, window, wf):
  """Loop oracle of the shared-normaliser formula (numpy, float64)."""
  q, k, v, pq, pk = (np.asarray(a, np.float64) for a in (q, k, v, pq, pk))
  out = np.zeros(v.shape)
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      for i in range(q.shape[1]):
        win = [j for j in range(max(0, i - window + 1), i + 1)]
        s = np.array([q[b, i, h] @ k[b, j, h] / np.sqrt(q.shape[-1]) for j in win])
        e = wf[h] * np.exp(s - s.max())
        lin = [pq[b, i, h] @ pk[b, j, h] for j in range(0, i - window + 1)]
        num = sum(ei * v[b, j, h] for ei, j in zip(e, win)) + sum(a * v[b, j, h] for a, j in zip(lin, range(len(lin))))
        out[b, i, h] = num / (e.sum() + sum(lin))
  return out


def test_window_linear_matches_loop_oracle_and_is_softmax_for_a_full_window():
  o = hy.window_linear_attention(Q, K, V, PQ, PK, window=4, window_factor=WF, form="chunked", chunk_size=3)
  np.testing.assert_allclose(o, _window_brute(Q, K, V, PQ, PK, 4, np.asarray(WF)), atol=1e-5, rtol=1e-5)
  # Defining property: window >= T is exact softmax attention (whatever the factors).
  o = hy.window_linear_attention(Q, K, V, PQ, PK, window=T, window_factor=WF, form="chunked", chunk_size=4)
  np.testing.assert_allclose(o, dot_product_attention(Q, K, V, causal=True, implementation="reference"),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 5])
def test_window_linear_forms_agree_values_and_grads_with_packing(window):
  def loss(form, args):
    o = hy.window_linear_attention(*args, window=window, window_factor=WF, segment_ids=SEG, form=form,
                                   chunk_size=4)
    return jnp.sum(o * jnp.cos(jnp.arange(DV)))
  args = (Q, K, V, PQ, PK)
  vg = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
  ref_v, ref_g = vg("parallel", args)
  for form in ("chunked", "recurrent"):
    val, g = vg(form, args)
    np.testing.assert_allclose(val, ref_v, rtol=1e-5, err_msg=form)
    for a, b in zip(g, ref_g):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=form)
  # Packed: the second sequence alone gives the same outputs.
  o = hy.window_linear_attention(*args, window=window, window_factor=WF, segment_ids=SEG, chunk_size=4)
  alone = hy.window_linear_attention(*(a[:, 6:] for a in args), window=window, window_factor=WF, chunk_size=4)
  np.testing.assert_allclose(o[0, 6:], alone[0], atol=1e-5, rtol=1e-5)


def test_window_linear_step_by_step_equals_full_forward():
  o = hy.window_linear_attention(Q, K, V, PQ, PK, window=3, window_factor=WF, form="parallel")
  cache = hy.window_linear_init_cache(B, 3, H, D, D, DV)
  outs = []
  for t in range(T):
    ot, cache = hy.window_linear_step(Q[:, t], K[:, t], V[:, t], PQ[:, t], PK[:, t], cache, window_factor=WF)
    outs.append(ot)
  np.testing.assert_allclose(jnp.stack(outs, 1), o, atol=1e-5, rtol=1e-5)
  assert int(cache["pos"][0]) == T and bool(cache["valid"].all())


def test_window_linear_bad_inputs():
  with pytest.raises(ValueError, match="window"):
    hy.window_linear_attention(Q, K, V, PQ, PK, window=0)
  with pytest.raises(ValueError, match="phi_q"):
    hy.window_linear_attention(Q, K, V, PQ[:, :5], PK, window=2)
  with pytest.raises(ValueError, match="window_factor"):
    hy.window_linear_attention(Q, K, V, PQ, PK, window=2, window_factor=jnp.ones(3))
  with pytest.raises(ValueError, match="form"):
    hy.window_linear_attention(Q, K, V, PQ, PK, window=2, form="fused")


BETA = jax.nn.sigmoid(_arr(B, T, H))
LD = -jax.nn.softplus(_arr(B, T, H))
QL = Q / jnp.linalg.norm(Q, axis=-1, keepdims=True)
KL = K / jnp.linalg.norm(K, axis=-1, keepdims=True)


def test_nats_forms_agree_values_and_grads_including_the_router():
  p = jax.nn.sigmoid(_arr(B, T, scale=2.0))

  def loss(form, q, k, v, p):
    r = hy.straight_through(p)
    o = hy.nats_attention(q, k, v, BETA, r, route_chunk=4, q_lin=QL, k_lin=KL, log_decay=LD,
                          segment_ids=SEG, form=form)
    return jnp.sum(o * jnp.sin(jnp.arange(DV) + 1.0))
  grad = lambda form: jax.jit(jax.value_and_grad(lambda *a: loss(form, *a), argnums=(0, 1, 2, 3)))(Q, K, V, p)
  ref_v, ref_g = grad("parallel")
  val, g = grad("chunked")
  np.testing.assert_allclose(val, ref_v, rtol=1e-5)
  for a, b in zip(g, ref_g):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  assert np.abs(np.asarray(g[3])).sum() > 0          # the router learns through the straight-through


def _nats_oracle(chunk_routes, c):
  """NAtS-L by chunks (numpy float64), as the authors' layer with its default incomplete-chunk
  handling (automl/NeuralAttentionSearchLinear `layers/natsl_attn_gdn.py`,
  `ops_for_incomplete_chunks='gated_delta_net'`, `incomplete_block_start_with_ht`,
  `decay_for_non_gdn_blocks`): chunk n starts from state S_n; its queries read S_n updated by the
  chunk's own tokens (the gated delta rule `S <- e^g S; S += beta k (v - k S)^T`, `o = q S / sqrt(D)`);
  S_{n+1} = S_n decayed over the chunk if the chunk goes to softmax, else the updated state. The
  softmax branch sees keys of earlier softmax chunks only. One sequence, no segments."""
  ql, kl, q, k, v, beta, ld = (np.asarray(a, np.float64) for a in (QL, KL, Q, K, V, BETA, LD))
  out = np.zeros((B, T, H, DV))
  s = np.zeros((B, H, D, DV))
  for n in range(-(-T // c)):
    cur, commit = s.copy(), s.copy()
    for i in range(n * c, min((n + 1) * c, T)):
      g = np.exp(ld[:, i])[..., None, None]
      cur, commit = cur * g, commit * g
      u = beta[:, i][..., None] * (v[:, i] - np.einsum("bhd,bhde->bhe", kl[:, i], cur))
      cur = cur + kl[:, i][..., :, None] * u[..., None, :]
      out[:, i] = np.einsum("bhd,bhde->bhe", ql[:, i], cur) * D ** -0.5
      keys = [j for m in range(n) if chunk_routes[m] for j in range(m * c, (m + 1) * c)]
      if keys:
        sc = np.einsum("bhd,bjhd->bhj", q[:, i], k[:, keys]) * D ** -0.5
        w = np.exp(sc - sc.max(-1, keepdims=True))
        out[:, i] += np.einsum("bhj,bjhe->bhe", w / w.sum(-1, keepdims=True), v[:, keys])
    s = commit if chunk_routes[n] else cur
  return out


def test_nats_one_decision_per_chunk_matches_the_chunkwise_oracle():
  """The decision is the route at a chunk's last token (other tokens' values are ignored: set
  to the opposite here); all-linear is Gated DeltaNet, all-softmax attends to earlier chunks
  only and reads its own chunk through GDN; a mixed pattern."""
  c = 4
  fn = jax.jit(lambda r: hy.nats_attention(Q, K, V, BETA, r, route_chunk=c, q_lin=QL, k_lin=KL,
                                           log_decay=LD))
  for chunk_routes in [(1, 1, 1, 1), (0, 0, 0, 0), (1, 0, 1, 1)]:
    r = np.zeros((B, T), np.float32)
    for n, dec in enumerate(chunk_routes):
      r[:, n * c:(n + 1) * c] = 1 - dec                # noise inside the chunk ...
      if (n + 1) * c <= T:
        r[:, (n + 1) * c - 1] = dec                    # ... the decision at its last token
    np.testing.assert_allclose(fn(jnp.asarray(r)), _nats_oracle(chunk_routes, c), atol=2e-5,
                               rtol=1e-4, err_msg=str(chunk_routes))
    if chunk_routes == (0, 0, 0, 0):
      ref, _ = delta_rule(QL, KL, V, BETA, log_decay=LD, form="recurrent")
      np.testing.assert_allclose(fn(jnp.asarray(r)), ref, atol=2e-5, rtol=1e-4)
  with pytest.raises(ValueError, match="route"):
    hy.nats_attention(Q, K, V, BETA, jnp.ones((B, T, H)), route_chunk=c)


def test_chunk_prefix_mean_and_its_decode_carry():
  x = _arr(B, 11, 5)
  mean, tail = hy.chunk_prefix_mean(x, 4)
  xs = np.asarray(x)
  ref = np.stack([xs[:, (t // 4) * 4:t + 1].mean(1) for t in range(11)], 1)
  np.testing.assert_allclose(mean, ref, atol=1e-6)
  np.testing.assert_allclose(tail, xs[:, 8:].sum(1), atol=1e-5)
  # Resuming at position 6 with the carried partial sum gives the same means.
  _, carry = hy.chunk_prefix_mean(x[:, :6], 4)
  m2, _ = hy.chunk_prefix_mean(x[:, 6:], 4, start_pos=jnp.full((B,), 6), carry=carry)
  np.testing.assert_allclose(m2, ref[:, 6:], atol=1e-6)
  # Segments restart the chunks.
  seg = jnp.asarray([[0] * 3 + [1] * 8] * B)
  ms, _ = hy.chunk_prefix_mean(x, 4, segment_ids=seg)
  np.testing.assert_allclose(ms[:, 3:], hy.chunk_prefix_mean(x[:, 3:], 4)[0], atol=1e-6)


@pytest.mark.slow
def test_layer_patterns_and_decoder_lm_builds_and_runs():
  assert hybrid_layer_pattern(8, "3:1") == ["gated_deltanet"] * 3 + ["softmax"] + ["gated_deltanet"] * 3 + ["softmax"]
  assert hybrid_layer_pattern(5, "1:1", linear="gla") == ["gla", "softmax", "gla", "softmax", "gla"]
  assert hybrid_layer_pattern(3, (1, 0)) == ["gated_deltanet"] * 3
  for bad in ("3-1", "0:0", "a:1"):
    with pytest.raises(ValueError, match="ratio"):
      hybrid_layer_pattern(4, bad)
  lb = layerboost_pattern([0.5, 3.0, 0.1, 1.0], num_full=1, num_removed=1)
  assert lb == ["lolcats_window", "softmax", "skip", "lolcats_window"]
  with pytest.raises(ValueError, match="num_full"):
    layerboost_pattern([1.0, 2.0], num_full=2, num_removed=1)
  mixers = ["nats", "lolcats_window", "softmax", "skip"]
  opts = [{"chunk_size": 4, "route_chunk": 4}, {"window": 4, "chunk_size": 4}, {}, {}]
  lm = DecoderLM(vocab_size=32, d_model=16, num_layers=4, num_heads=2, mixer=mixers,
                 mixer_options=opts, rngs=nnx.Rngs(0))
  tok = jax.random.randint(jax.random.key(0), (1, 9), 0, 32)
  logits = nnx.jit(lambda m, t: m(t))(lm, tok)
  assert logits.shape == (1, 9, 32) and np.all(np.isfinite(logits))
  lm.init_cache(1, 16)
  step = nnx.jit(lambda m, t: m(t, decode=True))
  steps = [step(lm, tok[:, :5])] + [step(lm, tok[:, t:t + 1]) for t in range(5, 9)]
  np.testing.assert_allclose(jnp.concatenate(steps, 1), logits, atol=1e-4, rtol=1e-4)
  # The removed layer's block passes the residual through its mixer unchanged.
  h = jax.random.normal(jax.random.key(1), (1, 9, 16))
  np.testing.assert_array_equal(lm.blocks[3].mix(h), jnp.zeros_like(h))
