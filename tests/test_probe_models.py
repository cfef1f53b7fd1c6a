"""The probe models and their generated data: `EncoderDecoder` (reversal), `ImageTextLM` (digit +
prompt arithmetic)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.data import synthetic
from attnjax.models.image_text import ImageTextLM
from attnjax.models.seq2seq import EncoderDecoder

_call = nnx.jit(lambda m, *a: m(*a))


def test_generated_data_follow_their_rules():
  src, tgt = synthetic.reversal(50, 7, 9, seed=0)
  assert src.min() >= 1 and src.max() <= 8 and src.shape == (50, 7)
  for s, t in zip(src, tgt):
    assert list(t) == list(reversed(list(s)))
  labels = np.arange(10, dtype=np.int32)
  imgs = np.arange(10, dtype=np.float32)[:, None, None, None] * np.ones((10, 8, 8, 1), np.float32)
  x, tok = synthetic.digit_arithmetic(imgs, labels, prompts_per_image=3, seed=1)
  assert x.shape == (30, 8, 8, 1) and tok.shape == (30, 4)
  for row, img in zip(tok, x):
    label = int(img[0, 0, 0])                     # the image of label l is filled with l
    op, k, eq, ans = (int(v) for v in row)
    assert eq == synthetic.EQUALS and 0 <= k <= 9
    assert ans == ((label + k) % 10 if op == synthetic.PLUS else (label - k) % 10)
  assert {int(v) for v in tok[:, 0]} == {synthetic.PLUS, synthetic.MINUS}


def test_encoder_decoder_is_causal_in_the_target_and_sees_the_whole_source():
  m = EncoderDecoder(vocab_size=11, d_model=16, num_layers=1, num_heads=2, mlp_ratio=1.0,
                     rngs=nnx.Rngs(0))
  src = jax.random.randint(jax.random.key(0), (2, 9), 1, 11)
  tgt = jax.random.randint(jax.random.key(1), (2, 6), 0, 11)
  base = np.asarray(_call(m, src, tgt))
  # A target token inside the sequence (position 3) changes positions >= 3 only.
  out = np.asarray(_call(m, src, tgt.at[:, 3].set((tgt[:, 3] + 1) % 11)))
  np.testing.assert_allclose(out[:, :3], base[:, :3], rtol=1e-5, atol=1e-6)
  assert np.abs(out[:, 3:] - base[:, 3:]).max() > 1e-4
  # Without encoder layers (memory token j depends on source token j only), the last source
  # token still reaches the first target position: cross-attention is not causal.
  m0 = EncoderDecoder(vocab_size=11, d_model=16, num_layers=1, num_heads=2, mlp_ratio=1.0,
                      num_encoder_layers=0, rngs=nnx.Rngs(0))
  base = np.asarray(_call(m0, src, tgt))
  out = np.asarray(_call(m0, src.at[:, -1].set(src[:, -1] % 10 + 1), tgt))
  assert np.abs(out[:, 0] - base[:, 0]).max() > 1e-4


def test_image_text_lm_reads_the_image_before_the_text_causally():
  m = ImageTextLM(image_size=8, patch_size=2, in_channels=1, vocab_size=13, d_model=16,
                  num_layers=1, num_heads=2, mlp_ratio=1.0, max_text_len=3, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
  tok = jnp.array([[10, 3, 12], [11, 7, 12]])
  base = np.asarray(_call(m, x, tok))
  assert base.shape == (2, 16 + 3, 13)
  out = np.asarray(_call(m, x, tok.at[:, 1].set(5)))        # text never reaches image positions
  np.testing.assert_allclose(out[:, :17], base[:, :17], rtol=1e-5, atol=1e-6)
  assert np.abs(out[:, 17:] - base[:, 17:]).max() > 1e-4
  out = np.asarray(_call(m, x.at[:, 6:, 6:].set(0.0), tok))  # the last patch reaches the answer
  np.testing.assert_allclose(out[:, :15], base[:, :15], rtol=1e-5, atol=1e-6)
  assert np.abs(out[:, -1] - base[:, -1]).max() > 1e-4
