"""MultiHeadAttention, DecoderLM and ViT: shapes, KV-cache decoding, training on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnjax import build_mixer, list_mixers
from attnjax.models import DecoderLM, ViT
from attnjax.nn.attention import MultiHeadAttention
from attnjax.ops import dot_product_attention


def test_registry_has_foundation_mixers_and_rejects_unknown():
  names = list_mixers()
  assert "softmax" in names and "sliding_window" in names
  with pytest.raises(ValueError, match="unknown mixer 'nope'"):
    build_mixer("nope", d_model=8, num_heads=2, causal=True, rngs=nnx.Rngs(0))


def test_mha_matches_manual_projection_and_attention():
  mha = MultiHeadAttention(16, 4, num_kv_heads=2, rope=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 7, 16))
  q = (x @ mha.q_proj.kernel[...]).reshape(2, 7, 4, 4)
  k = (x @ mha.k_proj.kernel[...]).reshape(2, 7, 2, 4)
  v = (x @ mha.v_proj.kernel[...]).reshape(2, 7, 2, 4)
  o = dot_product_attention(q, k, v, causal=True, implementation="reference")
  want = o.reshape(2, 7, 16) @ mha.o_proj.kernel[...]
  np.testing.assert_allclose(mha(x), want, atol=1e-5)


@pytest.mark.parametrize("opts", [dict(), dict(num_kv_heads=1, qk_norm=True), dict(window=3),
                                  dict(output_gate="headwise"), dict(output_gate="elementwise")])
def test_kv_cache_decoding_equals_full_forward(opts):
  mha = MultiHeadAttention(16, 4, rngs=nnx.Rngs(0), **opts)
  x = jax.random.normal(jax.random.key(2), (2, 9, 16))
  full = mha(x)
  mha.init_cache(2, 12)
  outs = [mha(x[:, :5], decode=True)]  # prefill
  for t in range(5, 9):
    outs.append(mha(x[:, t:t + 1], decode=True))
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5)


def test_cross_attention_and_errors():
  mha = MultiHeadAttention(16, 2, causal=False, rngs=nnx.Rngs(0))
  x, ctx = jnp.ones((1, 3, 16)), jax.random.normal(jax.random.key(0), (1, 5, 16))
  assert mha(x, context=ctx).shape == (1, 3, 16)
  with pytest.raises(ValueError, match="num_kv_heads"):
    MultiHeadAttention(16, 4, num_kv_heads=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"x must be \[B, T, d_model\]"):
    mha(jnp.ones((3, 16)))
  with pytest.raises(ValueError, match="init_cache"):
    MultiHeadAttention(16, 2, rngs=nnx.Rngs(0))(x, decode=True)


def test_decoder_lm_decoding_equals_full_forward():
  lm = DecoderLM(vocab_size=50, d_model=32, num_layers=2, num_heads=4, short_conv=3,
                 mixer=["softmax", "sliding_window"], mixer_options=[{}, {"window": 4}],
                 pos_emb="learned", max_len=16, rngs=nnx.Rngs(0))
  tok = jax.random.randint(jax.random.key(0), (2, 11), 0, 50)
  full = lm(tok)
  assert full.shape == (2, 11, 50)
  lm.init_cache(2, 16)
  outs = [lm(tok[:, :6], decode=True)] + [lm(tok[:, t:t + 1], decode=True) for t in range(6, 11)]
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4)


def test_decoder_lm_segment_ids_isolate_packed_sequences():
  lm = DecoderLM(vocab_size=30, d_model=16, num_layers=1, num_heads=2, short_conv=3, rngs=nnx.Rngs(0))
  a = jax.random.randint(jax.random.key(1), (1, 5), 0, 30)
  b = jax.random.randint(jax.random.key(2), (1, 4), 0, 30)
  packed = jnp.concatenate([a, b], 1)
  seg = jnp.array([[0] * 5 + [1] * 4])
  out = lm(packed, segment_ids=seg)
  np.testing.assert_allclose(out[:, 5:], lm(b), atol=1e-5)
  np.testing.assert_allclose(out[:, :5], lm(a), atol=1e-5)


def _train(model, loss_fn, batch, steps=15, lr=3e-3):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(lr)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    loss, g = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch))(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, loss

  losses = []
  for _ in range(steps):
    params, opt, loss = step(params, opt)
    losses.append(float(loss))
  return losses


def test_decoder_lm_trains():
  lm = DecoderLM(vocab_size=32, d_model=32, num_layers=2, num_heads=2, rngs=nnx.Rngs(0))
  tok = jax.random.randint(jax.random.key(0), (4, 16), 0, 32)

  def loss_fn(m, tok):
    logits = m(tok[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()

  losses = _train(lm, loss_fn, tok)
  assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("pool", ["cls", "mean", "ep", "lama"])
def test_vit_shapes_and_training(pool):
  """`ep` / `lama`: the EP attentive probe (Psomas et al. 2025, arXiv:2506.10178) and LAMA pooling (Mehta et al. 2019, arXiv:1912.00835) as the ViT's pooling."""
  vit = ViT(image_size=8, patch_size=4, num_classes=3, d_model=16, num_layers=1, num_heads=2,
            pool=pool, rngs=nnx.Rngs(0),
            pool_options={"ep": {"num_queries": 2}, "lama": {"rank": 4}}.get(pool))
  imgs = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
  labels = jnp.arange(6) % 3
  assert vit(imgs).shape == (6, 3)
  with pytest.raises(ValueError, match="images must be"):
    vit(jnp.ones((6, 8, 8, 1)))
  with pytest.raises(ValueError, match="pool must be"):
    ViT(image_size=8, patch_size=4, num_classes=3, d_model=16, num_layers=1, num_heads=2,
        pool="max", rngs=nnx.Rngs(0))

  def loss_fn(m, _):
    return optax.softmax_cross_entropy_with_integer_labels(m(imgs), labels).mean()

  losses = _train(vit, loss_fn, None)
  assert losses[-1] < 0.8 * losses[0]
