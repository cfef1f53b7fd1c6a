"""Deconstructing Attention's weight-source variants (Xue, Moosavi & Aletras 2025, arXiv
2510.11602): StaticEmbQK, RndEmbQK, FixedSeqQK, against a numpy transcription of the formula
`y = softmax(mask(Q K^T / sqrt(d))) (x W_v) W_o`, with `Q, K` from the variant's source (the
layer-0 embeddings, fixed random embeddings, learned positions) and values from the hidden state.
The oracle (the formula with RoPE, written out here) shares no code with `attnjax.nn.deconstructed`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import build_mixer
from attnjax.models import DecoderLM
from attnjax.nn import deconstructed


def _rope(x, base=10000.0):
  """Rotate-half RoPE on `x [B, T, H, D]` at positions 0..T-1 (pairs (i, i + D/2))."""
  t, d = x.shape[1], x.shape[-1]
  ang = np.arange(t)[:, None] * base ** (-np.arange(d // 2) * 2.0 / d)    # [T, D/2]
  c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
  a, b = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([a * c - b * s, a * s + b * c], -1)


def _attention_oracle(q, k, v, causal):
  """`q, k, v [B, T, H, D]` float64 -> `[B, T, H, D]`."""
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if causal:
    t = q.shape[1]
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def _rms(x, scale, eps=1e-6):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def _oracle(m, x, qk_input, heads):
  """The variant's output from its weights: `Q, K` from the variant's source, `V` from x."""
  w = lambda layer: np.asarray(layer.kernel[...], np.float64)
  x = np.asarray(x, np.float64)
  b, t, d = x.shape
  split = lambda a: a.reshape(a.shape[0], t, heads, d // heads)
  if m.qk_source == "positions":
    q = split(np.asarray(m.pos_q[...], np.float64)[None, :t])
    k = split(np.asarray(m.pos_k[...], np.float64)[None, :t])
    q, k = np.broadcast_to(q, (b,) + q.shape[1:]), np.broadcast_to(k, (b,) + k.shape[1:])
  else:
    e = _rms(np.asarray(qk_input, np.float64), np.asarray(m.qk_norm.scale[...], np.float64))
    q, k = _rope(split(e @ w(m.q))), _rope(split(e @ w(m.k)))
  o = _attention_oracle(q, k, split(x @ w(m.v)), causal=m.causal)
  return o.reshape(b, t, d) @ w(m.o)


@pytest.mark.parametrize("name", ["static_emb_qk", "rnd_emb_qk", "fixed_seq_qk"])
def test_variant_matches_the_formula(name, rand):
  causal = name != "rnd_emb_qk"        # one variant checked non-causal too
  m = build_mixer(name, d_model=16, num_heads=2, causal=causal, rngs=nnx.Rngs(0),
                  **({"max_len": 9} if name == "fixed_seq_qk" else {}))
  if m.qk_norm if name != "fixed_seq_qk" else False:
    m.qk_norm.scale[...] = 1.0 + 0.3 * jnp.sin(jnp.arange(16.0))
  x, e = rand(0, 2, 7, 16), rand(1, 2, 7, 16)
  qk = e if m.needs_qk_input else None
  y = nnx.jit(lambda m, x, qk: m(x, qk_input=qk))(m, x, qk)
  np.testing.assert_allclose(y, _oracle(m, x, e, 2), atol=2e-5, rtol=2e-4)


def test_weights_ignore_the_hidden_state_and_need_their_source(rand):
  """StaticEmbQK's weights read e only: with V = identity-like probes, changing x changes the
  output linearly (x enters only through V), i.e. y(x1 + x2) = y(x1) + y(x2) for a fixed e."""
  m = build_mixer("static_emb_qk", d_model=16, num_heads=2, causal=True, rngs=nnx.Rngs(0))
  x1, x2, e = rand(2, 1, 6, 16), rand(3, 1, 6, 16), rand(4, 1, 6, 16)
  f = nnx.jit(lambda m, x, e: m(x, qk_input=e))
  y = f(m, jnp.concatenate([x1, x2, x1 + x2]), jnp.concatenate([e, e, e]))
  np.testing.assert_allclose(y[2], y[0] + y[1], atol=1e-5)
  with pytest.raises(ValueError, match=r"needs qk_input \[B, T, d_model\]"):
    m(x1)
  fixed = build_mixer("fixed_seq_qk", d_model=16, num_heads=2, causal=True, rngs=nnx.Rngs(0),
                      max_len=4)
  with pytest.raises(ValueError, match="max_len=4"):
    fixed(x1)
  with pytest.raises(ValueError, match="takes no qk_input"):
    fixed(x1[:, :4], qk_input=x1[:, :4])


def test_decoder_hands_layer0_and_fixed_random_embeddings_to_the_variants(monkeypatch):
  """Hybrid [softmax, static_emb_qk, rnd_emb_qk]: the static layer gets `embed(tokens)`, the random
  one `R[tokens]` for the model's fixed table, which is not a Param (never trained)."""
  got = {}
  call = deconstructed.DeconstructedAttention.__call__

  def spy(self, x, *, qk_input=None, **kw):
    got[self.qk_source] = qk_input
    return call(self, x, qk_input=qk_input, **kw)

  monkeypatch.setattr(deconstructed.DeconstructedAttention, "__call__", spy)
  lm = DecoderLM(vocab_size=11, d_model=16, num_layers=3, num_heads=2,
                 mixer=["softmax", "static_emb_qk", "rnd_emb_qk"], pos_emb="learned", max_len=8,
                 rngs=nnx.Rngs(0))
  tokens = jnp.array([[1, 5, 2, 9, 3]])
  # One compile; the spy's captures leave the trace as outputs.
  logits, got = nnx.jit(lambda m, t: (m(t), dict(got)))(lm, tokens)
  assert logits.shape == (1, 5, 11)
  np.testing.assert_allclose(got["static"], lm.embed(tokens), atol=1e-6)   # before the positions
  np.testing.assert_allclose(got["random"], np.asarray(lm.random_qk_embed[...])[np.asarray(tokens)])
  params = nnx.state(lm, nnx.Param)
  assert "random_qk_embed" not in params and "random_qk_embed" in nnx.state(lm)
  assert DecoderLM(vocab_size=11, d_model=16, num_layers=1, num_heads=2, rngs=nnx.Rngs(0)
                   ).random_qk_embed is None
