"""LoLCATs linearisation: copied frozen weights, attention transfer trains only the feature maps
(and lowers the MSE), LoRA trains only the adapters, the converted model runs and decodes."""

import importlib.util
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import linearize as lz
from attnjax.models import DecoderLM

VOCAB, T = 32, 12


def _teacher():
  return DecoderLM(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2,
                   mixer=["softmax", "sliding_window"], mlp_ratio=2.0, rngs=nnx.Rngs(0))


def _batches(seed=0):
  key = jax.random.key(seed)
  while True:
    key, sub = jax.random.split(key)
    yield jax.random.randint(sub, (2, T), 0, VOCAB)


def _leaves(model, kind):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, kind))}


def _changed(before, after):
  return {k for k in before if not np.array_equal(before[k], after[k])}


def test_transfer_then_lora_train_only_their_parameters():
  teacher = _teacher()
  teacher_before = _leaves(teacher, nnx.Param)
  student = lz.convert_decoder(teacher)
  assert lz.linearized_layers(student) == [0]          # the sliding-window layer is kept as is
  mixer, tmixer = student.blocks[0].mixer, teacher.blocks[0].mixer
  for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
    np.testing.assert_array_equal(getattr(mixer, name).kernel[...], getattr(tmixer, name).kernel[...])

  before = _leaves(student, nnx.Param)
  fmap = set(_leaves(student, lz.FeatureMapParam))
  fixed = next(_batches(5))                            # one batch: the MSE must go down on it
  losses = lz.attention_transfer(student, teacher, itertools.repeat(fixed), steps=8, learning_rate=3e-2)
  assert losses[-1] < 0.8 * losses[0], losses
  batches = _batches()
  after = _leaves(student, nnx.Param)
  changed = _changed(before, after)
  assert changed and changed <= fmap, changed - fmap

  lz.add_lora(student, rank=2, alpha=4.0)
  before = _leaves(student, nnx.Param)
  lora = set(_leaves(student, lz.LoraParam))
  assert len(lora) == 8                                # A and B on q, k, v, o
  lz.lora_finetune(student, batches, steps=3, learning_rate=1e-2)
  changed = _changed(before, _leaves(student, nnx.Param))
  assert changed and changed <= lora, changed - lora
  # The wrapped base projections are still the teacher's; the teacher is untouched.
  np.testing.assert_array_equal(student.blocks[0].mixer.q_proj.base.kernel[...], tmixer.q_proj.kernel[...])
  assert not _changed(teacher_before, _leaves(teacher, nnx.Param))

  # The converted model runs and decodes like its full forward.
  tokens = next(batches)
  full = nnx.jit(lambda m, t: m(t))(student, tokens)
  assert np.isfinite(np.asarray(full)).all()
  student.init_cache(2, T)
  step = nnx.jit(lambda m, t: m(t, decode=True))
  outs = [step(student, tokens[:, :5])] + [step(student, tokens[:, t:t + 1]) for t in range(5, T)]
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-4, rtol=2e-3)


@pytest.mark.slow
def test_linearize_decoder_end_to_end():
  teacher = _teacher()
  student, hist = lz.linearize_decoder(teacher, _batches(1), transfer_steps=2, lora_rank=2,
                                       lora_steps=2)
  assert len(hist["transfer"]) == 2 and len(hist["lora"]) == 2
  assert isinstance(student.blocks[0].mixer, lz.LinearizedAttention)
  assert student(next(_batches(2))).shape == (2, T, VOCAB)


def test_bad_inputs_raise():
  only_window = DecoderLM(vocab_size=VOCAB, d_model=16, num_layers=1, num_heads=2,
                          mixer="sliding_window", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no plain softmax"):
    lz.convert_decoder(only_window)
  with pytest.raises(ValueError, match="DecoderLM"):
    lz.convert_decoder(object())
  with pytest.raises(ValueError, match="attention must be"):
    lz.convert_decoder(_teacher(), attention="cosine")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("attnjax.ops.linear.hybrid") is None,
                    reason="the sliding-window + linear hybrid op is not available")
def test_window_hybrid_student_with_a_window_over_the_sequence_is_the_teacher():
  """LoLCATs oracle: window >= T leaves no linear term, so the student equals softmax attention."""
  teacher = _teacher()
  student = lz.convert_decoder(teacher, attention="window", window=T)
  tokens = next(_batches(3))
  fwd = nnx.jit(lambda m, t: m(t))
  np.testing.assert_allclose(fwd(student, tokens), fwd(teacher, tokens), atol=2e-5, rtol=2e-5)
  small = lz.convert_decoder(teacher, attention="window", window=4)
  full = fwd(small, tokens)
  small.init_cache(2, T)
  step = nnx.jit(lambda m, t: m(t, decode=True))
  outs = [step(small, tokens[:, :5])] + [step(small, tokens[:, t:t + 1]) for t in range(5, T)]
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-4, rtol=2e-3)
