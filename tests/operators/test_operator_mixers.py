"""The catalog-A mixers as registered layers: shapes, causality, decode == forward, segments, cross."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.nn.attention import MultiHeadAttention
from attnjax.ops import dot_product_attention
from attnjax.ops.softmax import alibi_slopes
from attnjax.ops.rope import apply_rope
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
  # padding is exercised (sigmoid's default bias counts visible keys, not the cache length).
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


def test_differential_lambda_zero_layer_matches_softmax_heads():
  m = _build("differential")
  assert m.lambda_init == pytest.approx(0.2)
  assert float(m.lam()) == pytest.approx(0.2 + float(jnp.exp(jnp.sum(m.lambda_q1[...] * m.lambda_k1[...]))
                                                     - jnp.exp(jnp.sum(m.lambda_q2[...] * m.lambda_k2[...]))),
                                         rel=1e-5)


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
  with pytest.raises(ValueError, match="cross attention is"):
    m(x, context=_x(2))


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
