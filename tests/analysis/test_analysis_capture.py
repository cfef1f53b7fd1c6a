"""Capturing attention from MultiHeadAttention, head scaling and weights transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.analysis import capture as cap
from attnjax.analysis import saliency, sinks
from attnjax import build_mixer
from attnjax.models import DecoderLM
from attnjax.nn.attention import MultiHeadAttention

# Eager NNX calls dispatch op by op (seconds each on the CI CPU); everything runs jitted.
_call = nnx.jit(lambda m, *a: m(*a))
_run = nnx.jit(lambda m, *a: cap.run(m, *a))
_run_res = nnx.jit(lambda m, *a: cap.run(m, *a, residual=True))


def _layer(**kw):
  return MultiHeadAttention(12, 3, head_dim=4, rngs=nnx.Rngs(0), **kw)


def _oracle_weights(layer, x, *, window=None):
  """Numpy transcription for a layer without RoPE / QK-norm: q = x Wq, k = x Wk (GQA repeat),
  causal (sliding-window) softmax of q.k / sqrt(d)."""
  x = np.asarray(x, np.float64)
  b, t, _ = x.shape
  q = (x @ np.asarray(layer.q_proj.kernel[...])).reshape(b, t, layer.num_heads, 4)
  k = (x @ np.asarray(layer.k_proj.kernel[...])).reshape(b, t, layer.num_kv_heads, 4)
  k = np.repeat(k, layer.num_heads // layer.num_kv_heads, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
  i, j = np.arange(t)[:, None], np.arange(t)[None]
  vis = j <= i
  if window is not None:
    vis &= j >= i - window
  s = np.where(vis, s, -np.inf)
  a = np.exp(s - s.max(-1, keepdims=True))
  return a / a.sum(-1, keepdims=True)


def test_captured_weights_match_oracle_and_reproduce_output():
  """GQA sliding window (no RoPE): weights equal the numpy oracle; A @ V through o_proj is the
  layer's output; and the capturing call's output equals the default call's."""
  x = jax.random.normal(jax.random.key(1), (2, 11, 12))
  layer = _layer(num_kv_heads=1, rope=False, window=3)
  base = _call(layer, x)
  with cap.capturing(layer, ("weights", "values", "head_outputs")):
    out, inter = _run(layer, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(base), rtol=1e-4, atol=1e-5)
  w = np.asarray(cap.stack(inter, "weights")[0])
  np.testing.assert_allclose(w, _oracle_weights(layer, x, window=3), rtol=1e-4, atol=1e-6)
  v = np.repeat(np.asarray(cap.stack(inter, "values")[0]), 3, axis=2)
  o = np.einsum("bhqk,bkhd->bqhd", w, v)
  np.testing.assert_allclose(o, np.asarray(cap.stack(inter, "head_outputs")[0]), rtol=1e-4, atol=1e-5)
  kern = np.asarray(layer.o_proj.kernel[...])
  np.testing.assert_allclose(o.reshape(2, 11, -1) @ kern, np.asarray(base), rtol=1e-4, atol=1e-5)


def test_captured_weights_are_softmax_of_scores_with_rope_and_qk_norm():
  x = jax.random.normal(jax.random.key(2), (2, 9, 12))
  layer = _layer(qk_norm=True)
  base = _call(layer, x)
  with cap.capturing(layer, ("weights", "scores", "values")):
    out, inter = _run(layer, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(base), rtol=1e-4, atol=1e-5)
  w = np.asarray(cap.stack(inter, "weights")[0])
  s = cap.stack(inter, "scores")[0]
  assert np.isneginf(np.asarray(s)[..., 0, 1:]).all()
  np.testing.assert_allclose(w, np.asarray(jax.nn.softmax(s, axis=-1)), rtol=1e-5, atol=1e-6)
  o = np.einsum("bhqk,bkhd->bqhd", w, np.asarray(cap.stack(inter, "values")[0])).reshape(2, 9, -1)
  np.testing.assert_allclose(o @ np.asarray(layer.o_proj.kernel[...]), np.asarray(base), rtol=1e-4, atol=1e-5)


def test_streamed_key_mass_equals_column_sums():
  """key_mass streams query chunks of 128 from the kernel's lse (T=300: not a multiple)."""
  t = 300
  x = jax.random.normal(jax.random.key(3), (1, t, 12))
  layer = _layer(rope=False, window=70)
  with cap.capturing(layer, ("key_mass",)):
    _, inter = _run(layer, x)
  km = np.asarray(cap.stack(inter, "key_mass")[0])
  assert km.shape == (1, 3, t)
  np.testing.assert_allclose(km, _oracle_weights(layer, x, window=70).sum(2), rtol=1e-4, atol=1e-4)


def test_default_path_unchanged_and_sows_nothing():
  x = jax.random.normal(jax.random.key(4), (2, 9, 12))
  layer = _layer()
  ref = _call(layer, x)
  out, inter = _run(layer, x)
  assert not nnx.to_flat_state(inter)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))

  def jx(m):
    gd, st = nnx.split(m)
    return str(jax.make_jaxpr(lambda st, x: nnx.merge(gd, st)(x))(st, x))
  # The default program is the one a layer without the probing attributes would trace.
  assert jx(layer) == jx(_layer())
  n_state = len(nnx.to_flat_state(nnx.state(layer)))
  with cap.capturing(layer, ("weights",)):
    assert jx(layer) != jx(_layer())
    _call(layer, x)                      # outside nnx.capture: sow is a no-op, no state added
  assert len(nnx.to_flat_state(nnx.state(layer))) == n_state
  assert layer.capture == ()
  with pytest.raises(ValueError, match="kinds"):
    cap.set_capture(layer, ("attention",))
  # A mixer whose attn_fn is not plain softmax refuses weights instead of returning wrong ones.
  moba = build_mixer("moba", d_model=12, num_heads=3, causal=True, rngs=nnx.Rngs(0))
  with cap.capturing(moba, ("weights",)), pytest.raises(ValueError, match="attn_fn"):
    _run(moba, x)


@pytest.fixture(scope="module")
def lm():
  return DecoderLM(vocab_size=20, d_model=12, num_layers=2, num_heads=3, mlp_ratio=0,
                   rngs=nnx.Rngs(0))


_TOK = jax.random.randint(jax.random.key(5), (2, 10), 0, 20)


def test_head_scale_zero_equals_zeroing_output_projection_rows(lm):
  base = _call(lm, _TOK)
  scales = np.ones((2, 3), np.float32); scales[1, 2] = 0.0
  cap.set_head_scale(lm, scales)
  masked = _call(lm, _TOK)
  cap.set_head_scale(lm, None)
  np.testing.assert_array_equal(np.asarray(_call(lm, _TOK)), np.asarray(base))
  assert not np.allclose(np.asarray(masked), np.asarray(base))
  kern = lm.blocks[1].mixer.o_proj.kernel
  saved = kern[...]
  kern[...] = saved.at[2 * 4:3 * 4].set(0.0)
  try:
    np.testing.assert_allclose(np.asarray(masked), np.asarray(_call(lm, _TOK)), rtol=1e-5, atol=1e-6)
  finally:
    kern[...] = saved
  with pytest.raises(ValueError, match="scales"):
    cap.set_head_scale(lm, np.ones((3, 3)))


def test_weights_transform_noop_and_act_calibration_in_model(lm):
  """ACT with beta=1 and LocoRE with gamma=0 (no-ops) leave the logits; ACT beta=0.4 on layer 2
  changes them."""
  base = _call(lm, _TOK)
  act = lambda beta: (lambda a: sinks.act_calibrate(a, sinks.act_sink_mask(a, threshold=0.05), beta=beta))
  cap.set_weights_transform(lm, act(1.0))
  try:
    np.testing.assert_allclose(np.asarray(_call(lm, _TOK)), np.asarray(base), rtol=1e-4, atol=1e-5)
    cap.set_weights_transform(lm, lambda a: saliency.locore(a, window=3, gamma=0.0))  # LocoRE no-op
    np.testing.assert_allclose(np.asarray(_call(lm, _TOK)), np.asarray(base), rtol=1e-4, atol=1e-5)
    cap.set_weights_transform(lm, [None, act(0.4)])
    changed = _call(lm, _TOK)
  finally:
    cap.set_weights_transform(lm, None)
  assert not np.allclose(np.asarray(changed), np.asarray(base), atol=1e-4)


def test_weight_grads_match_oracle():
  """dL/dA from the perturbation equals the gradient of an oracle that recomputes the layer
  output o_proj(A V) from A (GQA layer with RoPE)."""
  x = jax.random.normal(jax.random.key(6), (2, 7, 12))
  layer = _layer(num_kv_heads=1)
  loss = lambda o: jnp.sum(jnp.sin(o))
  w, g = cap.weights_and_grads(layer, loss, x)
  assert w.shape == g.shape == (1, 2, 3, 7, 7)
  with cap.capturing(layer, ("values",)):
    _, inter = _run(layer, x)
  v = jnp.repeat(cap.stack(inter, "values")[0], 3, axis=2)
  wo = layer.o_proj.kernel[...]
  tail = lambda a: loss(jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(2, 7, 12) @ wo)
  val, grad = jax.jit(jax.value_and_grad(tail))(w[0])
  np.testing.assert_allclose(float(val), float(loss(_call(layer, x))), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(g[0]), np.asarray(grad), rtol=1e-3, atol=1e-5)
  assert np.abs(np.asarray(g[0])).max() > 0


def test_residual_states_are_block_outputs(lm):
  _, inter = _run_res(lm, _TOK)
  res = cap.residual_states(inter)
  assert res.shape == (2, 2, 10, 12)
  head = nnx.jit(lambda m, h: m.logits(m.final_norm(h)))(lm, res[-1])
  np.testing.assert_allclose(np.asarray(head), np.asarray(_call(lm, _TOK)), rtol=1e-5, atol=1e-5)


def test_head_scaling_context_matches_masked_model(lm):
  """The compiled loss_fn(scales) of `head_scaling` equals setting the scales by hand; the
  scales are removed on exit."""
  loss = lambda m: jnp.sum(m(_TOK) ** 2)
  scales = np.ones((2, 3), np.float32); scales[0, 1] = 0.0; scales[1, 0] = 2.0
  cap.set_head_scale(lm, scales)
  ref = float(loss_call(lm))
  cap.set_head_scale(lm, None)
  with cap.head_scaling(lm, loss) as loss_fn:
    np.testing.assert_allclose(float(loss_fn(scales)), ref, rtol=1e-5)
    np.testing.assert_allclose(float(loss_fn(np.ones((2, 3)))), float(loss_call(lm)), rtol=1e-5)
  assert all(layer.head_scale is None for _, layer in cap.attention_layers(lm))


loss_call = nnx.jit(lambda m: jnp.sum(m(_TOK) ** 2))


def test_explicit_path_segments_and_decode_match_default():
  """The explicit-weights path honours segment ids (no cross-segment weight, same output) and
  the decode mask (a cached step's weights are the full forward's last row)."""
  x = jax.random.normal(jax.random.key(8), (1, 8, 12))
  seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 2]])
  layer = _layer(num_kv_heads=1)
  seg_call = nnx.jit(lambda m, x, s: cap.run(m, x, segment_ids=s))
  base, _ = seg_call(layer, x, seg)
  with cap.capturing(layer, ("weights",)):
    out, inter = seg_call(layer, x, seg)
    full, inter_full = _run(layer, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(base), rtol=1e-4, atol=1e-5)
  w = np.asarray(cap.stack(inter, "weights")[0])
  cross = np.asarray(seg)[0][:, None] != np.asarray(seg)[0][None]
  assert np.all(w[..., cross] == 0) and np.allclose(w.sum(-1), 1, rtol=1e-5)

  decode = nnx.jit(lambda m, x: cap.run(m, x, decode=True))
  layer.init_cache(1, 10)                # two unwritten slots the decode mask must hide
  decode(layer, x[:, :7])
  with cap.capturing(layer, ("weights",)):
    step, inter_step = decode(layer, x[:, 7:])
  np.testing.assert_allclose(np.asarray(step)[:, 0], np.asarray(full)[:, 7], rtol=1e-4, atol=1e-5)
  ws = np.asarray(cap.stack(inter_step, "weights")[0])[:, :, 0]
  assert ws.shape[-1] == 10 and np.all(ws[..., 8:] == 0)
  np.testing.assert_allclose(ws[..., :8], np.asarray(cap.stack(inter_full, "weights")[0])[:, :, 7],
                             rtol=1e-4, atol=1e-6)


def test_cross_attention_capture_selects_layers_and_matches_oracle():
  """EncoderDecoder: `select="cross"` captures only the decoder's cross-attention, `[L, B, H, T, S]`
  with T != S; the weights equal a numpy transcription (softmax of (x Wq).(memory Wk) / sqrt(d),
  no mask, no RoPE) on the layer's own input and the encoder memory; `select="encoder"` gives the
  encoder's square self-attention."""
  from attnjax.models.seq2seq import EncoderDecoder
  m = EncoderDecoder(vocab_size=11, d_model=12, num_layers=2, num_heads=3, mlp_ratio=1.0,
                     rngs=nnx.Rngs(0))
  src = jax.random.randint(jax.random.key(0), (2, 7), 1, 11)
  tgt = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
  assert [p for p, _ in cap.attention_layers(m, "cross")] == [("decoder", 0, "cross"), ("decoder", 1, "cross")]
  with cap.capturing(m, ("weights", "inputs"), select="cross"):
    _, inter = _run(m, src, tgt)
  a = np.asarray(cap.stack(inter, "weights", select="cross"))
  assert a.shape == (2, 2, 3, 5, 7)
  layer = m.decoder[0].cross
  x = np.asarray(cap.stack(inter, "inputs", select="cross")[0], np.float64)
  mem = np.asarray(nnx.jit(lambda mm, s: mm.encode(s))(m, src), np.float64)
  q = (x @ np.asarray(layer.q_proj.kernel[...])).reshape(2, 5, 3, 4)
  k = (mem @ np.asarray(layer.k_proj.kernel[...])).reshape(2, 7, 3, 4)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
  w = np.exp(s - s.max(-1, keepdims=True))
  np.testing.assert_allclose(a[0], w / w.sum(-1, keepdims=True), rtol=1e-4, atol=1e-6)
  with cap.capturing(m, ("weights",), select="encoder"):
    _, inter = _run(m, src, tgt)
  assert cap.stack(inter, "weights", select="encoder").shape == (2, 2, 3, 7, 7)
  with pytest.raises(ValueError, match="selected by 'cross'"):
    cap.stack(inter, "weights", select="cross")
