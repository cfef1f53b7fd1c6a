"""experiments/probe_repro.py: the needle generator, the recomputed sigmoid weights, sigmaReparam
surgery, the BOS window option, and each reproduction's entry at its tiny preset."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.analysis import capture as cap
from attnjax.data import text
from attnjax.models import DecoderLM
from attnjax.nn.stability import SigmaReparamLinear
from experiments import probe_repro as pr


def test_needle_batch_layout():
  """Hand-checked layout: needle block at `start - 1`, QUERY at T - k, answers are the needle."""
  rng = np.random.default_rng(3)
  t, k, vocab, hay = 20, 3, 30, 12
  batch, starts = pr.needle_batch(rng, 5, t, k, vocab, hay)
  x, qpos, y = batch.inputs, batch.query_positions, batch.targets
  assert x.shape == (5, t) and qpos.shape == (5, k) and y.shape == (5, k)
  for i in range(5):
    s = int(starts[i])
    assert x[i, s - 1] == pr.NEEDLE
    np.testing.assert_array_equal(x[i, s:s + k], y[i])            # the needle in the haystack
    assert len(set(y[i].tolist())) == k and y[i].min() >= hay and y[i].max() < vocab
    assert x[i, t - k] == pr.QUERY
    np.testing.assert_array_equal(qpos[i], np.arange(t - k, t))
    np.testing.assert_array_equal(x[i, t - k + 1:], y[i, :-1])    # teacher-forced answer prefix
    hay_pos = np.setdiff1d(np.arange(t - k), np.arange(s - 1, s + k))
    assert np.all((x[i, hay_pos] >= pr.FIRST_HAY) & (x[i, hay_pos] < hay))   # needle ids occur once
  with pytest.raises(ValueError, match="hay_vocab"):
    pr.needle_batch(rng, 1, t, k, 13, 12)


def test_first_token_share_oracle():
  a = np.zeros((1, 1, 1, 2, 2), np.float32)
  a[..., 0, 0] = 0.5                       # row 0: all its (unnormalised) mass on token 0
  a[..., 1, :] = [0.1, 0.3]                # row 1: a quarter on token 0
  np.testing.assert_allclose(pr.first_token_share(a), (1.0 + 0.25) / 2, rtol=1e-6)


def test_attention_weights_sigmoid_layers_reproduce_the_layer_output():
  """The recomputed sigmoid weights times the captured values give the layer's head outputs."""
  lm = DecoderLM(vocab_size=11, d_model=16, num_layers=2, num_heads=2, mixer="sigmoid",
                 mixer_options={"seq_len": 16}, mlp_ratio=0.0, rngs=nnx.Rngs(0))  # b = -log 16 != -log T
  x = jax.random.randint(jax.random.key(1), (2, 7), 0, 11)

  @nnx.jit
  def both(m, x):
    a = pr.attention_weights(m, x)
    with cap.capturing(m, ("values", "head_outputs")):
      _, inter = cap.run(m, x)
    return a, cap.stack(inter, "values"), cap.stack(inter, "head_outputs")

  a, v, o = both(lm, x)
  assert a.shape == (2, 2, 2, 7, 7)
  np.testing.assert_allclose(np.triu(np.asarray(a), 1), 0.0)            # causal
  assert not np.allclose(np.asarray(a).sum(-1), 1.0)                     # not normalised
  np.testing.assert_allclose(jnp.einsum("lbhqk,lbkhd->lbqhd", a, v), o, rtol=1e-4, atol=1e-5)


def test_sigma_reparam_surgery_swaps_only_q_and_k():
  lm = DecoderLM(vocab_size=11, d_model=16, num_layers=1, num_heads=2, mixer="softmax",
                 mlp_ratio=0.0, rngs=nnx.Rngs(0))
  v_before = np.asarray(cap.attention_layers(lm)[0][1].v_proj.kernel[...])
  pr.sigma_reparam_qk(lm, seed=0)
  layer = cap.attention_layers(lm)[0][1]
  assert isinstance(layer.q_proj, SigmaReparamLinear) and isinstance(layer.k_proj, SigmaReparamLinear)
  assert layer.q_proj.kernel.shape == (16, 16) and layer.q_proj.bias is None   # dense had no bias
  assert not isinstance(layer.v_proj, SigmaReparamLinear)
  np.testing.assert_array_equal(layer.v_proj.kernel[...], v_before)
  assert len(nnx.to_flat_state(nnx.state(lm, nnx.Param))) > 0


def test_window_loader_bos():
  data = np.arange(100, dtype=np.uint8)
  plain = next(text.WindowLoader(data, 3, 8, seed=0))
  bos = next(text.WindowLoader(data, 3, 8, seed=0, bos=0))
  assert bos.shape == plain.shape == (3, 9)
  np.testing.assert_array_equal(bos[:, 0], 0)
  np.testing.assert_array_equal(bos[:, 1:], plain[:, :-1])   # same crop, shifted behind the BOS
  with pytest.raises(ValueError, match="bos"):
    text.WindowLoader(data, 3, 8, seed=0, bos=256)


def _finite(tree):
  leaves = [v for v in jax.tree.leaves(tree) if isinstance(v, (int, float))]   # None: no loss yet
  return leaves and all(math.isfinite(v) for v in leaves if not isinstance(v, bool))


@pytest.mark.slow
@pytest.mark.parametrize("mode", pr.MODES)
def test_entry_tiny_preset_writes_finite_json(mode, tmp_path):
  import importlib
  c = importlib.import_module(f"configs.probe_{mode}").get_config("tiny")
  if mode == "sinks":
    c.repro.mixers = "sigmoid"        # the softmax-engine path is covered by the other modes
  res = pr.run(c, str(tmp_path))
  saved = json.load(open(tmp_path / f"{mode}.json"))
  assert _finite(saved)
  assert isinstance(pr.summarize(mode, res), str)
  pr.record(mode, res, f"tiny {mode}", root=str(tmp_path))
  assert mode in json.load(open(tmp_path / f"{pr.BENCH}.json"))
