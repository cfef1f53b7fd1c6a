"""MosaicBERT (Portes et al., 2023, arXiv 2312.17482) against a transcription of the authors' code.

Oracle: mosaicml/examples, `examples/benchmarks/bert/src/bert_layers.py` — `BertEncoder.forward`
(padded batch: additive `(1 - mask) * -10000` bias plus the ALiBi tensor `slopes * -|j - i|` from
`rebuild_alibi_tensor` / `_get_alibi_head_slopes`), `BertUnpadSelfAttention` (the pytorch branch:
`softmax(q k^T / sqrt(d) + bias) v`), `BertSelfOutput` (`LN(dense(a) + x)`),
`BertGatedLinearUnitMLP` (`LN(wo(gelu(g) * ng) + x)`, gated half first, exact GELU),
`BertEmbeddings` (`LN(word_embeddings)`), `BertPredictionHeadTransform` + tied decoder. Written
here from that code with plain jnp (none of the implementation's helpers), padded and masked; the
implementation's padded path and its unpadded (packed) path must both equal it at real tokens.
MLM masking: `transformers.DataCollatorForLanguageModeling` (80% [MASK] / 10% random / 10% kept)
at `mlm_probability: 0.3` (yamls/main/mosaic-bert-base-uncased.yaml; eval at 0.15).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.data import mlm
from attnjax.models.mosaic_bert import LayerNorm, MosaicBERT

V, D, H, L = 67, 24, 6, 1   # H = 6 is not a power of two: the slopes' workaround branch


def _authors_slopes(n):
  def pow2(n):
    start = 2 ** (-2 ** -(math.log2(n) - 3))
    return [start * start ** i for i in range(n)]
  if math.log2(n).is_integer():
    return pow2(n)
  c = 2 ** math.floor(math.log2(n))
  return pow2(c) + _authors_slopes(2 * c)[0::2][:n - c]


def _ln(x, w, b, eps=1e-12):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


@jax.jit
def _oracle_logits(p, tokens, mask):
  """The authors' padded forward (see the module docstring), from a flat dict of weights."""
  t = tokens.shape[1]
  hd = D // H
  rel = jnp.abs(jnp.arange(t)[None, :] - jnp.arange(t)[:, None])
  alibi = jnp.asarray(_authors_slopes(H))[:, None, None] * -rel               # [H, T, T]
  ext = (1.0 - mask[:, None, None, :].astype(jnp.float32)) * -10000.0         # [B, 1, 1, T]
  bias = ext + alibi[None]
  x = _ln(p["emb"][tokens], p["emb_w"], p["emb_b"])
  for i in range(L):
    q, k, v = (jnp.einsum("btd,de->bte", x, p[f"{n}{i}"]).reshape(*x.shape[:2], H, hd) for n in "qkv")
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + bias
    a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(x.shape)
    x = _ln(a @ p[f"o{i}"] + x, p[f"ln1w{i}"], p[f"ln1b{i}"])
    g = x @ p[f"g{i}"]
    hid = g.shape[-1] // 2
    m = jax.nn.gelu(g[..., :hid], approximate=False) * g[..., hid:]
    x = _ln(m @ p[f"wo{i}"] + p[f"wob{i}"] + x, p[f"ln2w{i}"], p[f"ln2b{i}"])
  h = _ln(jax.nn.gelu(x @ p["hw"] + p["hb"], approximate=False), p["hlw"], p["hlb"])
  return h @ p["emb"].T + p["dec_b"]


def _weights(model):
  """Reads the model's weights into the oracle's names, randomising the ones that start at 0/1."""
  key = iter(jax.random.split(jax.random.key(7), 64))
  def jitter(param, base):
    param[...] = base + 0.3 * jax.random.normal(next(key), param.shape)
    return param[...]
  p = {"emb": model.embedding[...], "emb_w": jitter(model.emb_ln.scale, 1.0),
       "emb_b": jitter(model.emb_ln.bias, 0.0)}
  for i, lay in enumerate(model.layers):
    for n, proj in zip("qkvo", (lay.attn.q_proj, lay.attn.k_proj, lay.attn.v_proj, lay.attn.o_proj)):
      proj.kernel[...] = proj.kernel[...] * 8.0   # sharper attention than BERT's 0.02 init
      p[f"{n}{i}"] = proj.kernel[...]
    p[f"ln1w{i}"], p[f"ln1b{i}"] = jitter(lay.ln1.scale, 1.0), jitter(lay.ln1.bias, 0.0)
    lay.mlp.gated.kernel[...] = lay.mlp.gated.kernel[...] * 30.0   # GELU out of its linear range
    p[f"g{i}"] = lay.mlp.gated.kernel[...]
    p[f"wo{i}"], p[f"wob{i}"] = lay.mlp.out.kernel[...], jitter(lay.mlp.out.bias, 0.0)
    p[f"ln2w{i}"], p[f"ln2b{i}"] = jitter(lay.ln2.scale, 1.0), jitter(lay.ln2.bias, 0.0)
  p["hw"], p["hb"] = model.head.kernel[...], jitter(model.head.bias, 0.0)
  p["hlw"], p["hlb"] = jitter(model.head_ln.scale, 1.0), jitter(model.head_ln.bias, 0.0)
  p["dec_b"] = jitter(model.head_bias, 0.0)
  return p


def _batch(lengths, t, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (len(lengths), t), 0, V)
  mask = jnp.arange(t)[None] < jnp.asarray(lengths)[:, None]
  return tokens, mask


def _logits_fn(model):
  g, state = nnx.split(model)
  return jax.jit(lambda s, tok, m: nnx.merge(g, s)(tok, m))


def test_padded_and_unpadded_equal_the_authors_padded_forward_values_and_gradients():
  model = MosaicBERT(vocab_size=V, d_model=D, num_layers=L, num_heads=H, mlp_ratio=2.0, rngs=nnx.Rngs(0))
  p = _weights(model)
  tokens, mask = _batch([9, 4, 1, 7], 9)        # lengths off any block size; a length-1 row
  want = _oracle_logits(p, tokens, mask)
  g, params, rest = nnx.split(model, nnx.Param, ...)

  def run(packed_len):
    def loss(params):
      mdl = nnx.merge(g, params, rest)
      mdl.packed_len = packed_len
      out = mdl(tokens, mask)
      return jnp.sum(jnp.where(mask[..., None], out, 0.0) ** 2), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, padded), g_pad = run(None)
  (_, unpadded), g_unpad = run(int(mask.sum()) + 3)   # three empty slots in the packed row
  m = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(padded)[m], np.asarray(want)[m], atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(np.asarray(unpadded), np.asarray(padded), atol=2e-5)
  assert not np.asarray(unpadded)[~m].any()     # pads come back as zeros
  for a, b in zip(jax.tree.leaves(g_pad), jax.tree.leaves(g_unpad)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
  # The oracle is sensitive to what it checks: pads left visible break equality.
  assert np.abs(np.asarray(want)[m] - np.asarray(_oracle_logits(p, tokens, jnp.ones_like(mask)))[m]).max() > 1e-2


@pytest.mark.parametrize("mixer", ["linear", "sigmoid"])
def test_any_non_causal_mixer_replaces_attention_and_unpads_exactly(mixer):
  """Two other registered mixers: built non-causal, no ALiBi, packed run == padded run."""
  model = MosaicBERT(vocab_size=V, d_model=D, num_layers=1, num_heads=H, mixer=mixer,
                     mlp_ratio=2.0, rngs=nnx.Rngs(2))
  assert not model.alibi
  tokens, mask = _batch([3, 8, 5], 8, seed=4)
  padded_fn = _logits_fn(model)
  padded = padded_fn(nnx.state(model), tokens, mask)
  model.packed_len = 17
  unpadded = _logits_fn(model)(nnx.state(model), tokens, mask)
  np.testing.assert_allclose(np.asarray(unpadded), np.asarray(padded), atol=2e-5)
  # A padded token must not leak into real ones: changing pads changes nothing.
  other = jnp.where(mask, tokens, (tokens + 5) % V)
  np.testing.assert_allclose(np.asarray(padded_fn(nnx.state(model), other, mask)),
                             np.asarray(padded), atol=2e-5)
  with pytest.raises(ValueError, match="alibi=True needs mixer='softmax'"):
    MosaicBERT(vocab_size=V, d_model=D, num_layers=1, num_heads=H, mixer=mixer, alibi=True, rngs=nnx.Rngs(0))


def test_low_precision_layernorm_rounds_like_pytorch_bf16_layer_norm():
  """Composer's LowPrecisionLayerNorm: `F.layer_norm` on bf16 x / weight / bias with autocast off;
  PyTorch's kernel accumulates the statistics in float32 and writes a bf16 output."""
  ln = LayerNorm(40, compute_dtype="bfloat16")
  ln.scale[...] = 1 + 0.1 * jax.random.normal(jax.random.key(0), (40,))
  ln.bias[...] = 0.1 * jax.random.normal(jax.random.key(1), (40,))
  x = 3 + jax.random.normal(jax.random.key(2), (5, 40))
  bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731
  xb, wb, bb = bf(x), bf(ln.scale[...]), bf(ln.bias[...])
  mu = xb.mean(-1, keepdims=True)
  want = bf((xb - mu) / np.sqrt(((xb - mu) ** 2).mean(-1, keepdims=True) + 1e-12) * wb + bb)
  got = np.asarray(jax.jit(lambda x: ln(x))(x))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1.6e-2)      # one bf16 ulp at |y| < 4
  assert np.mean(got == want.astype(np.float32)) > 0.9
  f32 = LayerNorm(40)
  f32.scale[...], f32.bias[...] = ln.scale[...], ln.bias[...]
  assert np.abs(np.asarray(f32(x)) - got).max() > 1e-3   # the option is live
  with pytest.raises(ValueError, match="ln_dtype must be one of"):
    MosaicBERT(vocab_size=V, d_model=D, num_layers=1, num_heads=H, ln_dtype="fp8", rngs=nnx.Rngs(0))


def test_mlm_masking_is_30_percent_with_80_10_10_and_pads_untouched():
  corpus = np.frombuffer(bytes(range(256)) * 200, np.uint8)
  loader = mlm.MLMLoader(corpus, batch_size=64, seq_len=32, min_len=8, mask_prob=0.3, seed=0)
  b = next(loader)
  real, chosen = b["attention_mask"], b["weights"] > 0
  orig = b["targets"]
  assert not (chosen & ~real).any() and (b["inputs"][~real] == mlm.PAD).all()
  assert abs(chosen.sum() / real.sum() - 0.3) < 0.03
  as_mask = (b["inputs"] == mlm.MASK) & chosen
  kept = (b["inputs"] == orig) & chosen
  assert abs(as_mask.sum() / chosen.sum() - 0.8) < 0.04 and abs(kept.sum() / chosen.sum() - 0.1) < 0.04
  assert ((b["inputs"] == orig) | chosen).all()          # only chosen tokens change
  assert real.sum(1).min() >= 8 and real.sum() <= loader.packed_tokens
  # Batch i depends only on (seed, i): a restored loader repeats it.
  again = mlm.MLMLoader(corpus, batch_size=64, seq_len=32, min_len=8, mask_prob=0.3, seed=0)
  np.testing.assert_array_equal(next(again)["inputs"], b["inputs"])


def test_mlm_task_trains_an_encoder_with_another_mixer_through_the_trainer(tmp_path):
  """The generic "mlm" task: a non-softmax mixer (no ALiBi), unpadded, through the trainer."""
  from configs import mlm_mosaic_bert
  from experiments import trainer
  cfg = mlm_mosaic_bert.get_config("tiny")
  with cfg.unlocked():
    cfg.model.mixer = "linear"
  s = trainer.train_and_evaluate(cfg, str(tmp_path))
  model = s["model"]
  assert isinstance(model, MosaicBERT) and not model.alibi and model.packed_len == cfg.data.packed_tokens
  assert s["history"][-1]["loss"] < math.log(mlm.VOCAB_SIZE) - 0.1   # below uniform over the vocabulary
