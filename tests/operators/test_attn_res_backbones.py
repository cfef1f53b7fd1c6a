"""AttnRes / Block AttnRes / Delta AttnRes (Kimi Team 2026, arXiv:2603.15031; Luo et al. 2026, arXiv:2605.18855) wired through `DecoderLM` and `ViT`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.models import DecoderLM, ViT

V, D, L, H = 31, 16, 2, 2


def _lm(attn_res=None, block_size=1, **kw):
  return DecoderLM(vocab_size=V, d_model=D, num_layers=L, num_heads=H, mixer="softmax",
                   attn_res=attn_res, attn_res_block_size=block_size, max_len=16,
                   rngs=nnx.Rngs(0), **kw)


def _set_queries(model, seed=1):
  q = model.depth.queries
  q[...] = jax.random.normal(jax.random.key(seed), q.shape)


def _tokens(t=9):
  return jax.random.randint(jax.random.key(2), (2, t), 0, V)


def test_zero_queries_average_the_sublayer_outputs():
  # One block without MLP: sublayer input = embedding, readout = mean(embedding, mixer output).
  lm1 = DecoderLM(vocab_size=V, d_model=D, num_layers=1, num_heads=H, attn_res="full",
                  mlp_ratio=0.0, rngs=nnx.Rngs(0))
  assert lm1.depth.queries.shape == (2, D)   # one sublayer (no MLP), plus the readout
  tok = _tokens()
  e = lm1.embed(tok)
  want = lm1.logits(lm1.final_norm((e + lm1.blocks[0].mix(e)) / 2))
  np.testing.assert_allclose(lm1(tok), want, atol=1e-5)


def test_block_size_one_is_full_and_block_two_differs():
  tok = _tokens()
  full, block1, block2 = _lm("full"), _lm("block", 1), _lm("block", 2)
  assert full.depth.queries.shape == (2 * L + 1, D)   # mixer + MLP per block, plus the readout
  for m in (full, block1, block2):
    _set_queries(m)
  np.testing.assert_allclose(block1(tok), full(tok), atol=1e-5)
  assert float(jnp.max(jnp.abs(block2(tok) - full(tok)))) > 1e-3


def test_delta_adds_the_selection_to_the_residual_stream():
  lm, base = _lm("delta"), _lm(None)
  assert lm.depth.queries.shape == (2 * L, D)
  tok = _tokens()
  # Zero queries: the selection is the mean of the deltas, h_l / (l + 1), and the pre-norm
  # sublayers are scale-invariant, so a fresh Delta AttnRes model IS the plain residual model.
  np.testing.assert_allclose(lm(tok), base(tok), atol=1e-4)
  _set_queries(lm)
  # Explicit Delta AttnRes over the same blocks.
  h = lm.embed(tok)
  states = [h]
  q = lm.depth.queries[...]
  norm = lambda v: v / jnp.sqrt(jnp.mean(v * v, -1, keepdims=True) + 1e-6)
  fns = [f for blk in lm.blocks for f in (blk.mix, blk.ffn)]
  for l, f in enumerate(fns):
    src = [states[0]] + [b - a for a, b in zip(states[:-1], states[1:])]
    if len(states) == 1:
      x = states[-1]
    else:
      a = jax.nn.softmax(jnp.stack([norm(v) @ q[l] for v in src]), axis=0)
      x = states[-1] + sum(ai[..., None] * v for ai, v in zip(a, src))
    states.append(states[-1] + f(x))
  np.testing.assert_allclose(lm(tok), lm.logits(lm.final_norm(states[-1])), atol=1e-4)
  assert float(jnp.max(jnp.abs(lm(tok) - base(tok)))) > 1e-3   # it is not the plain residual


@pytest.mark.parametrize("attn_res", ["block", "delta"])
def test_decoding_equals_full_forward(attn_res):
  lm = _lm(attn_res, 2, short_conv=3)
  _set_queries(lm)
  tok = _tokens(11)
  full = nnx.jit(lambda m, t: m(t))(lm, tok)
  lm.init_cache(2, 16)
  step = nnx.jit(lambda m, t: m(t, decode=True))
  outs = [step(lm, tok[:, :6])] + [step(lm, tok[:, t:t + 1]) for t in range(6, 11)]
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4)


def test_default_has_no_depth_module_and_gradients_reach_the_queries():
  assert _lm().depth is None
  lm = _lm("block", 3)
  tok = _tokens()
  g = nnx.jit(nnx.grad(lambda m: jnp.mean(m(tok) ** 2)))(lm)
  gq = np.asarray(g["depth"]["queries"][...])
  assert np.all(np.isfinite(gq)) and np.abs(gq).max() > 0


def test_vit_block_size_one_is_full():
  kw = dict(image_size=8, patch_size=4, num_classes=3, d_model=D, num_layers=L, num_heads=H)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  full = ViT(attn_res="full", rngs=nnx.Rngs(0), **kw)
  block1 = ViT(attn_res="block", attn_res_block_size=1, rngs=nnx.Rngs(0), **kw)
  for m in (full, block1):
    _set_queries(m)
  np.testing.assert_allclose(block1(x), full(x), atol=1e-5)
  assert ViT(attn_res="delta", rngs=nnx.Rngs(0), **kw)(x).shape == (2, 3)


def test_bad_attn_res_options_raise():
  with pytest.raises(ValueError, match="attn_res must be one of"):
    _lm("blocks")
  with pytest.raises(ValueError, match="attn_res_block_size"):
    _lm("block", 0)
