"""Linear-family mixers: registry build, decode == full forward, packed sequences, aux losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.registry import build_mixer

NAMES = ("linear", "based", "hedgehog", "gla", "retnet", "lightning", "deltanet",
         "gated_deltanet", "mala", "transnormer", "transnormer_diag")
D, H, T = 16, 2, 11


def _x(seed, t=T, b=2):
  return jax.random.normal(jax.random.key(seed), (b, t, D))


@pytest.mark.parametrize("name", NAMES)
def test_decode_prefill_then_steps_equals_forward_and_packing(name):
  opts = {"chunk_size": 4} if name not in ("transnormer_diag",) else {"block": 4}
  if name == "based":
    opts["window"] = 3
  m = build_mixer(name, d_model=D, num_heads=H, causal=True, rngs=nnx.Rngs(0), **opts)
  x = _x(1)
  fwd = nnx.jit(lambda m, x, seg: m(x, segment_ids=seg))
  step = nnx.jit(lambda m, x: m(x, decode=True))   # compiled twice: prefill and 1-token shapes
  full = fwd(m, x, None)
  assert full.shape == x.shape and np.all(np.isfinite(full))
  m.init_cache(2, T)
  outs = [step(m, x[:, :6])]
  for t in range(6, T):
    outs.append(step(m, x[:, t:t + 1]))
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-4)
  # Packed: two sequences in one row give the same outputs as run separately.
  if name == "transnormer_diag":
    return   # block boundaries are absolute positions; packing is tested through the softmax op
  seg = jnp.asarray([[0] * 5 + [1] * (T - 5)] * 2)
  packed = fwd(m, x, seg)
  np.testing.assert_allclose(packed[:, :5], full[:, :5], atol=2e-5, rtol=2e-4)
  np.testing.assert_allclose(packed[:, 5:], fwd(m, x[:, 5:], None), atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("name", ("linear", "mala"))
def test_noncausal_builds_and_sees_the_future(name):
  m = build_mixer(name, d_model=D, num_heads=H, causal=False, rngs=nnx.Rngs(0))
  x = _x(2)
  y = m(x)
  y2 = m(x.at[:, -1].add(1.0))
  assert not np.allclose(y[:, 0], y2[:, 0])   # the first token reads the last one


def test_hedgehog_distillation_loss_is_sown_and_trains_only_feature_map():
  m = build_mixer("hedgehog", d_model=D, num_heads=H, causal=True, rngs=nnx.Rngs(0), distill=True)
  x = _x(3)

  def loss(m):
    _, sown = nnx.capture(m, nnx.Intermediate)(x)
    return sum(jax.tree.leaves(sown))

  val, grads = nnx.value_and_grad(loss)(m)
  assert np.isfinite(val) and val > 0
  assert np.any(np.asarray(grads["hh_weight"][...]) != 0)
  assert np.all(np.asarray(grads["v_proj"]["kernel"][...]) == 0)   # v does not enter the loss


def test_unknown_option_and_bad_values_raise():
  with pytest.raises(TypeError):
    build_mixer("gla", d_model=D, num_heads=H, causal=True, rngs=nnx.Rngs(0), no_such_option=1)
  with pytest.raises(ValueError, match="feature_map"):
    build_mixer("linear", d_model=D, num_heads=H, causal=True, rngs=nnx.Rngs(0), feature_map="cos")
  with pytest.raises(NotImplementedError, match="causal"):
    build_mixer("gla", d_model=D, num_heads=H, causal=False, rngs=nnx.Rngs(0))
  m = build_mixer("gla", d_model=D, num_heads=H, causal=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="init_cache"):
    m(_x(4), decode=True)


def _tnl_slopes(n):
  """Transcription of OpenNLPLab/lightning-attention `lightning_attn/utils/utils.py`
  `_build_slope_tensor` (ALiBi slopes, with the non-power-of-two interleave)."""
  import math

  def pow2(n):
    start = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return [start * start ** i for i in range(n)]

  if math.log2(n).is_integer():
    return pow2(n)
  c = 2 ** math.floor(math.log2(n))
  return pow2(c) + _tnl_slopes(2 * c)[0::2][:n - c]


@pytest.mark.parametrize("heads", (4, 6))
def test_lightning_decay_follows_the_tnl_schedule_per_layer(heads):
  """Oracle: OpenNLPLab/lightning-attention `examples/module/tnl_attn.py`: `slope_rate =
  slopes * (1 - layer_idx / (num_layers - 1) + 1e-5)`, used by `lightning_attn_func` as the decay
  `exp(-slope)` per step (`ops/torch/linear_attention.py` `get_mask`). Every block of a DecoderLM
  must get its own layer index."""
  from attnjax.models.decoder import DecoderLM
  num_layers = 5
  lm = DecoderLM(vocab_size=8, d_model=12 * heads // 2, num_layers=num_layers, num_heads=heads,
                 mixer="lightning", mlp_ratio=0, rngs=nnx.Rngs(0))
  for l, blk in enumerate(lm.blocks):
    want = np.log(np.exp(-np.asarray(_tnl_slopes(heads)) * (1 - l / (num_layers - 1) + 1e-5)))
    np.testing.assert_allclose(blk.mixer.fixed_log_decay[...], want, rtol=1e-5, atol=1e-12,
                               err_msg=f"layer {l}")
  # A lone layer (no depth given) is the first layer of the schedule.
  lone = build_mixer("lightning", d_model=D, num_heads=4, causal=True, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(lone.fixed_log_decay[...], -np.asarray(_tnl_slopes(4)) * (1 + 1e-5), rtol=1e-6)


def test_decoder_passes_layer_index_only_to_depth_aware_mixers():
  """Block i of a DecoderLM builds its mixer with `layer_index=i`, `num_layers=L` when the builder
  names them (DIFF's `lambda_init = 0.8 - 0.6 exp(-0.3 i)`, microsoft/unilm Diff-Transformer
  `multihead_diffattn.py` `lambda_init_fn(depth)`); other mixers never receive them."""
  from attnjax.models.decoder import DecoderLM
  from attnjax.registry import mixer_depth_args
  lm = DecoderLM(vocab_size=8, d_model=D, num_layers=5, num_heads=H, mlp_ratio=0,
                 mixer=["gla", "retnet", "softmax", "differential", "grouped_differential"],
                 rngs=nnx.Rngs(0))
  assert lm.blocks[3].mixer.lambda_init == pytest.approx(0.8 - 0.6 * np.exp(-0.3 * 3))
  assert lm.blocks[4].mixer.lambda_init == pytest.approx(0.8 - 0.6 * np.exp(-0.3 * 4))
  from attnjax.models.vit import ViT
  vit = ViT(image_size=4, patch_size=2, num_classes=3, d_model=D, num_layers=4, num_heads=H,
            mixer="differential", mlp_ratio=0, rngs=nnx.Rngs(0))
  assert vit.blocks[3].mixer.lambda_init == pytest.approx(0.8 - 0.6 * np.exp(-0.3 * 3))
  assert mixer_depth_args("gla") == frozenset() and mixer_depth_args("softmax") == frozenset()
  assert mixer_depth_args("lightning") == {"layer_index", "num_layers"}
  # An explicit option wins over the backbone's index.
  lm2 = DecoderLM(vocab_size=8, d_model=D, num_layers=4, num_heads=H, mlp_ratio=0,
                  mixer="differential", mixer_options={"layer_index": 0}, rngs=nnx.Rngs(0))
  assert lm2.blocks[3].mixer.lambda_init == pytest.approx(0.2)
  with pytest.raises(ValueError, match="layer_index"):
    build_mixer("lightning", d_model=D, num_heads=H, causal=True, rngs=nnx.Rngs(0),
                layer_index=4, num_layers=4)


def test_linear_family_cross_calls_raise_pattern_undefined():
  """CAB contract: the linear-family layers answer a cross call (`context=`) with
  `PatternUndefinedError`, not a TypeError or a shape error. Every layer class of
  `attnjax.nn.linear` is checked on a bare instance (the check is its first statement, so no
  parameters are needed); a few registry builds (shapes only) confirm the wiring."""
  import inspect
  from attnjax.ops.operators._common import PatternUndefinedError
  import attnjax.nn.linear as lin
  x, ctx = _x(0, t=5), _x(1, t=4)
  classes = [c for c in vars(lin).values() if isinstance(c, type) and issubclass(c, nnx.Module)
             and c.__module__ == lin.__name__ and c is not lin.PRepBN and "__call__" in vars(c)]
  assert len(classes) >= 16
  for cls in classes:
    assert "context" in inspect.signature(cls.__call__).parameters, cls.__name__
    with pytest.raises(PatternUndefinedError, match="cross"):
      cls.__call__(object.__new__(cls), x, context=ctx)
  for name, causal in (("linear", False), ("transnormer_diag", True), ("skip", True)):
    m = nnx.eval_shape(lambda: build_mixer(name, d_model=D, num_heads=H, causal=causal,
                                           rngs=nnx.Rngs(0)))
    with pytest.raises(PatternUndefinedError, match="cross"):
      m(x, context=ctx)
