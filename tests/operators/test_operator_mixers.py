"""The attention-operator mixers as registered layers: shapes, causality, decode == forward, segments, cross."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.attention import MultiHeadAttention
from attnjax.ops import dot_product_attention
from attnjax.ops.softmax import alibi_slopes
from attnjax.ops.rope import apply_rope
from attnjax.ops.operators._common import PatternUndefinedError
from attnjax.registry import build_mixer

D_MODEL, HEADS, B, T = 24, 4, 2, 7
MIXERS = ["sigmoid", "lssa", "lssar", "gated_attention", "affine_scaled", "differential",
          "grouped_differential", "moh", "aaren", "dha", "rcmha", "flashbias_alibi", "moda"]
CROSS = {"sigmoid", "lssa", "lssar", "gated_attention", "affine_scaled", "differential",
         "grouped_differential", "moh", "dha", "rcmha", "reversed"}
NO_DECODE = {"gaam": {}, "gpsa": {"grid": (7, 1)}}


def _build(name, causal=True, seed=0, **options):
  options = {**NO_DECODE.get(name, {}), **options}
  if name == "moda":
    options.setdefault("modality_lengths", (2,))
  m = build_mixer(name, d_model=D_MODEL, num_heads=HEADS, causal=causal,
                  rngs=nnx.Rngs(seed), **options)
  if name == "moda":  # away from its softmax init: a random duplex basis and pair bias
    fn = m.attn_fn
    fn.basis[...] = jax.random.normal(jax.random.key(seed + 1), fn.basis[...].shape) * 0.5
    fn.pair_bias[...] = jax.random.normal(jax.random.key(seed + 2), fn.pair_bias[...].shape)
  return m


def _x(seed, t=T):
  return jax.random.normal(jax.random.PRNGKey(seed), (B, t, D_MODEL))


@pytest.mark.parametrize("name", MIXERS)
def test_mixer_causal_decode_and_segments(name):
  m = _build(name)
  x = _x(1)
  fwd = nnx.jit(lambda m, x: m(x))
  y = fwd(m, x)
  assert y.shape == x.shape and np.all(np.isfinite(y))
  # Causal: perturbing token 4 leaves outputs 0..3 unchanged.
  y2 = fwd(m, x.at[:, 4].add(3.0))
  np.testing.assert_allclose(y2[:, :4], y[:, :4], atol=1e-5)
  assert not np.allclose(y2[:, 4:], y[:, 4:], atol=1e-4)
  # Packed segments: the second segment's output equals running it alone.
  seg = jnp.array([[0] * 3 + [1] * 4] * B)
  ys = nnx.jit(lambda m, x, seg: m(x, segment_ids=seg))(m, x, seg)
  alone = fwd(m, x[:, 3:])
  np.testing.assert_allclose(ys[:, 3:], alone, atol=2e-5, rtol=2e-5)
  # Prefill 4 tokens, then single-token steps == full causal forward; max_len > T so cache
  # padding is exercised (sigmoid's default bias is the fixed -log n, not the cache length).
  m.init_cache(B, T + 3)
  step = nnx.jit(lambda m, x: m(x, decode=True))
  outs = [step(m, x[:, :4])] + [step(m, x[:, i:i + 1]) for i in range(4, T)]
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), y, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", sorted(CROSS))
def test_mixer_cross_attention_patterns(name):
  ctx = _x(2, t=9)
  for causal in ((False,) if name == "reversed" else (False, True)):
    m = _build(name, causal=causal)
    y = m(_x(1), context=ctx)
    assert y.shape == (B, T, D_MODEL) and np.all(np.isfinite(y))
    # Bottom-right aligned causal cross: query 0 sees context keys 0..2 (Tk - Tq = 2).
    y2 = m(_x(1), context=ctx.at[:, 3].add(3.0))
    np.testing.assert_allclose(y2[:, 0], y[:, 0], atol=1e-5) if causal else \
        np.testing.assert_raises(AssertionError, np.testing.assert_allclose, y2[:, 0], y[:, 0],
                                 atol=1e-5)


def test_aaren_cross_is_undefined_and_noncausal_summary():
  m = _build("aaren", causal=False)
  y = m(_x(1))
  np.testing.assert_allclose(y, jnp.broadcast_to(y[:, -1:], y.shape), atol=1e-5)
  with pytest.raises(ValueError, match="aaren: the .cross. pattern is undefined"):
    m(_x(1), context=_x(2))


def test_moh_all_heads_uniform_router_is_mha_and_aux_loss_sown():
  m = _build("moh", num_shared=0, top_k=HEADS)
  for r in (m.routed_router, m.branch_router):
    r.kernel[...] = jnp.zeros_like(r.kernel[...])
  x = _x(3)
  y, aux = nnx.capture(m, nnx.Intermediate)(x)
  hd = (HEADS, D_MODEL // HEADS)
  q = apply_rope(m.q_proj(x).reshape(B, T, *hd), jnp.arange(T))
  k = apply_rope(m.k_proj(x).reshape(B, T, *hd), jnp.arange(T))
  v = m.v_proj(x).reshape(B, T, *hd)
  want = m.o_proj(dot_product_attention(q, k, v, causal=True).reshape(B, T, -1))
  np.testing.assert_allclose(y, want, atol=1e-5)
  leaves = jax.tree.leaves(aux)
  assert len(leaves) == 1 and float(leaves[0]) == pytest.approx(0.01)   # balanced: 0.01 * 1


def test_moh_dense_routing_matches_gather():
  x = _x(8)
  a, b = _build("moh", num_shared=1, top_k=2), _build("moh", num_shared=1, top_k=2, routing="dense")
  np.testing.assert_allclose(a(x), b(x), atol=1e-5)


def test_moh_unselected_heads_get_no_gradient():
  m = _build("moh", num_shared=0, top_k=1)
  x = _x(4, t=1)[:1]                               # one token: it picks exactly one head

  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)
  g = grads["v_proj"]["kernel"][...].reshape(D_MODEL, HEADS, -1)   # 1 token: o = v of its head
  used = np.abs(np.asarray(g)).sum(axis=(0, 2)) > 0
  assert used.sum() == 1


def _diff_transformer_oracle(x, wq, wk, wv, wo, lq1, lk1, lq2, lk2, subln_w, depth, num_heads):
  """Transcription (numpy, float64) of microsoft/unilm `Diff-Transformer/multihead_diffattn.py`
  `MultiheadDiffAttn.forward` with MHA (num_kv_heads = num_heads), the causal mask, no RoPE:
  q/k viewed as 2H heads of size d (pair (2h, 2h+1) = head h's two maps), v as H heads of 2d,
  `lambda_full = exp(lq1.lk1) - exp(lq2.lk2) + lambda_init(depth)`, subln RMSNorm(2d, eps 1e-5),
  times `1 - lambda_init`, out_proj."""
  bsz, t, _ = x.shape
  d = wq.shape[1] // num_heads // 2
  q = (x @ wq).reshape(bsz, t, 2 * num_heads, d).transpose(0, 2, 1, 3) * d ** -0.5
  k = (x @ wk).reshape(bsz, t, 2 * num_heads, d).transpose(0, 2, 1, 3)
  v = (x @ wv).reshape(bsz, t, num_heads, 2 * d).transpose(0, 2, 1, 3)
  w = q @ k.transpose(0, 1, 3, 2) + np.triu(np.full((t, t), -np.inf), 1)
  w = np.exp(w - w.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  lambda_init = 0.8 - 0.6 * np.exp(-0.3 * depth)
  lam = np.exp(np.sum(lq1 * lk1)) - np.exp(np.sum(lq2 * lk2)) + lambda_init
  w = w.reshape(bsz, num_heads, 2, t, t)
  a = (w[:, :, 0] - lam * w[:, :, 1]) @ v
  a = a / np.sqrt(np.mean(a * a, -1, keepdims=True) + 1e-5) * subln_w
  a = a * (1 - lambda_init)
  return a.transpose(0, 2, 1, 3).reshape(bsz, t, -1) @ wo


def test_differential_layer_matches_the_authors_diff_transformer():
  """The mixer of block 3 of a DecoderLM against the DIFF Transformer authors' layer (see
  `_diff_transformer_oracle`), with random lambda vectors and RMSNorm scale so every factor shows;
  the depth-3 `lambda_init` must reach the mixer through the backbone."""
  from attnjax.models.decoder import DecoderLM
  lm = DecoderLM(vocab_size=8, d_model=D_MODEL, num_layers=4, num_heads=HEADS, mlp_ratio=0,
                 mixer="differential", mixer_options={"rope": False}, rngs=nnx.Rngs(0))
  m = lm.blocks[3].mixer
  rng = np.random.default_rng(0)
  for p in (m.lambda_q1, m.lambda_k1, m.lambda_q2, m.lambda_k2):
    p[...] = jnp.asarray(rng.normal(0, 0.5, p.shape), jnp.float32)
  m.head_norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, m.head_norm.scale.shape), jnp.float32)
  x = _x(5)
  kern = lambda l: np.asarray(l.kernel[...], np.float64)
  d = m.head_dim
  # The authors' q/k projections interleave each head's two maps: [q1_h | q2_h] per head.
  inter = lambda a, b_: np.concatenate([a.reshape(D_MODEL, HEADS, d), b_.reshape(D_MODEL, HEADS, d)],
                                       -1).reshape(D_MODEL, -1)
  lam_vecs = [np.asarray(p[...], np.float64) for p in (m.lambda_q1, m.lambda_k1, m.lambda_q2, m.lambda_k2)]
  want = _diff_transformer_oracle(np.asarray(x, np.float64), inter(kern(m.q1), kern(m.q2)),
                                  inter(kern(m.k1), kern(m.k2)), kern(m.v), kern(m.o_proj), *lam_vecs,
                                  np.asarray(m.head_norm.scale[...], np.float64), 3, HEADS)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(m, x), want, atol=2e-5, rtol=1e-4)


def test_affine_fresh_layer_is_softmax_attention():
  m = _build("affine_scaled")
  x = _x(5)
  hd = (HEADS, D_MODEL // HEADS)
  q = apply_rope(m.q_proj(x).reshape(B, T, *hd), jnp.arange(T))
  k = apply_rope(m.k_proj(x).reshape(B, T, *hd), jnp.arange(T))
  v = m.v_proj(x).reshape(B, T, *hd)
  want = m.o_proj(dot_product_attention(q, k, v, causal=True).reshape(B, T, -1))
  np.testing.assert_allclose(m(x), want, atol=1e-5)


def test_bad_options_raise():
  with pytest.raises(ValueError, match="signal_noise_ratio"):
    _build("differential", signal_noise_ratio=3)
  with pytest.raises(ValueError, match="top_k"):
    _build("moh", num_shared=1, top_k=4)
  with pytest.raises(ValueError, match="gate"):
    _build("gated_attention", gate="sideways")
  with pytest.raises(ValueError, match="x must be"):
    _build("aaren")(jnp.zeros((2, 3)))


@pytest.mark.parametrize("name", sorted(NO_DECODE))
def test_causal_mixers_without_decode(name):
  m = _build(name)
  x = _x(1)
  y = m(x)
  y2 = m(x.at[:, 4].add(3.0))
  np.testing.assert_allclose(y2[:, :4], y[:, :4], atol=1e-5)
  assert not np.allclose(y2[:, 4:], y[:, 4:], atol=1e-4)
  with pytest.raises(NotImplementedError, match="decod"):
    m.init_cache(B, T)
  # CAB: causal and non-causal cross attention are undefined (GAAM has no keys, GPSA one grid).
  for mm in (m, _build(name, causal=False)):
    with pytest.raises(PatternUndefinedError, match="cross attention is"):
      mm(x, context=_x(2))


@pytest.mark.parametrize("name", ["reversed", "hierarchical"])
def test_noncausal_only_mixers(name):
  with pytest.raises(ValueError, match="causal pattern is undefined"):
    _build(name, causal=True)
  m = _build(name, causal=False)
  x = _x(1)
  y = m(x)
  assert y.shape == x.shape and np.all(np.isfinite(y))
  # Bidirectional: the first output reads the last token.
  assert not np.allclose(m(x.at[:, -1].add(3.0))[:, 0], y[:, 0], atol=1e-5)
  with pytest.raises(NotImplementedError):
    m(x, decode=True)


def test_gpsa_square_grid_inferred_and_dha_fusion_from_mha():
  m = _build("gpsa", causal=False, grid=None)
  assert m(_x(1, t=9)).shape == (B, 9, D_MODEL)
  # The authors' local_init (facebookresearch/convit convit.py) sets V to the identity.
  np.testing.assert_array_equal(m.v_proj.kernel[...], np.eye(D_MODEL))
  # A non-square T is read as one row of tokens.
  np.testing.assert_allclose(m(_x(1)), _build("gpsa", causal=False, grid=(1, T))(_x(1)), atol=1e-6)
  assert not np.allclose(m(_x(1)), _build("gpsa", causal=False, grid=(T, 1))(_x(1)), atol=1e-4)
  mha = _build("softmax", rope=True)
  dha = _build("dha", num_k_groups=HEADS, num_v_groups=HEADS)
  eye = jnp.eye(HEADS)
  dha.fuse_from(mha, eye, eye)                    # identity fusion and grouping == the MHA
  np.testing.assert_allclose(dha(_x(6)), mha(_x(6)), atol=1e-5)


def test_rcmha_zero_relative_terms_is_conv_then_mha():
  m = _build("rcmha")
  m.r_proj.kernel[...] = jnp.zeros_like(m.r_proj.kernel[...])
  x = _x(7)
  hd = (HEADS, D_MODEL // HEADS)
  q = m.q_conv(m.q_proj(x)).reshape(B, T, *hd)
  k = m.k_conv(m.k_proj(x)).reshape(B, T, *hd)
  v = m.v_conv(m.v_proj(x)).reshape(B, T, *hd)
  want = m.o_proj(dot_product_attention(q, k, v, causal=True).reshape(B, T, -1))
  np.testing.assert_allclose(m(x), want, atol=1e-5)


def test_flashbias_alibi_mixer_equals_the_engines_alibi():
  m = _build("flashbias_alibi")
  ref_fn = lambda q, k, v, **kw: dot_product_attention(q, k, v, alibi_slopes=alibi_slopes(HEADS), **kw)
  ref = MultiHeadAttention(D_MODEL, HEADS, causal=True, rope=False, attn_fn=ref_fn, rngs=nnx.Rngs(0))
  x, ctx = _x(1), _x(2, t=9)
  np.testing.assert_allclose(m(x), ref(x), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(m(x, context=ctx), ref(x, context=ctx), atol=2e-5, rtol=2e-5)
  g = nnx.grad(lambda mod: jnp.sum(mod(x) ** 2))(m)
  g_ref = nnx.grad(lambda mod: jnp.sum(mod(x) ** 2))(ref)
  np.testing.assert_allclose(g["q_proj"]["kernel"][...], g_ref["q_proj"]["kernel"][...],
                             atol=1e-4, rtol=1e-4)
  with pytest.raises(NotImplementedError, match="non-causal pattern is undefined"):
    _build("flashbias_alibi", causal=False)


def test_moda_mixer_layout_oracles():
  """Untrained (identity basis, zero pair bias) MODA is the softmax mixer; a `-inf` inter-modal
  bias makes the modalities blind to each other; the token layout maps positions to modalities."""
  from attnjax.nn.operators import modality_of_positions
  np.testing.assert_array_equal(modality_of_positions(jnp.arange(8), (3, 2)),
                                [0, 0, 0, 1, 1, 2, 2, 2])
  x = jax.random.normal(jax.random.key(0), (2, 9, 16))
  moda = build_mixer("moda", d_model=16, num_heads=2, causal=True, rngs=nnx.Rngs(0),
                     modality_lengths=(4,))
  soft = build_mixer("softmax", d_model=16, num_heads=2, causal=True, rngs=nnx.Rngs(0))
  fwd = nnx.jit(lambda m, x: m(x))
  np.testing.assert_allclose(fwd(moda, x), fwd(soft, x), atol=1e-5)
  fn = moda.attn_fn
  fn.basis[...] = jax.random.normal(jax.random.key(1), fn.basis[...].shape)
  fn.pair_bias[...] = jnp.array([[0.0, -jnp.inf], [-jnp.inf, 0.0]])
  x2 = x.at[:, :4].set(jax.random.normal(jax.random.key(2), (2, 4, 16)))
  y, y2 = fwd(moda, x), fwd(moda, x2)
  np.testing.assert_allclose(y[:, 4:], y2[:, 4:], atol=1e-5)     # text never reads the image
  assert float(jnp.max(jnp.abs(y[:, :4] - y2[:, :4]))) > 1e-3
  with pytest.raises(ValueError, match="modality_lengths"):
    build_mixer("moda", d_model=16, num_heads=2, causal=True, rngs=nnx.Rngs(0),
                modality_lengths=(3, 0))


def test_sigmoid_mixer_default_bias_is_the_papers_fixed_minus_log_n():
  """The paper's fixed `b = -log n` (apple/ml-sigmoid-attention; "Theory, Analysis, and Best
  Practices for Sigmoid Self-Attention"), one constant for all rows, with `n = seq_len` (default
  2048): the mixer equals the same MHA with a naive `sigmoid(q k / sqrt(d) - log n)` engine."""
  import math

  def naive(n):
    def attn(q, k, v, *, causal, mask=None, **kw):
      s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
      vis = jnp.tril(jnp.ones(s.shape[-2:], bool)) if causal else jnp.ones(s.shape[-2:], bool)
      if mask is not None:
        vis = vis & mask
      return jnp.einsum("bhqk,bkhd->bqhd", jnp.where(vis, jax.nn.sigmoid(s - math.log(n)), 0.0), v)
    return attn

  x = _x(1)
  for causal in (True, False):
    for opts, n in (({}, 2048), ({"seq_len": 64}, 64)):
      got = _build("sigmoid", causal=causal, **opts)(x)
      want = MultiHeadAttention(D_MODEL, HEADS, causal=causal, qk_norm=True, rngs=nnx.Rngs(0),
                                attn_fn=naive(n))(x)
      np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
