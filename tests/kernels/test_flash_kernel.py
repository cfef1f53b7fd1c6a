"""Flash kernel (interpret mode) against the dense reference: values and all gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops import masks as masks_lib
from attnjax.ops import layout as layouts
from pallas_kernels.flash import api
from pallas_kernels.flash import forward as fwd_lib
from pallas_kernels.flash.reference import flash_reference
from pallas_kernels.flash.testing import assert_close, check_values_and_grads, random_qkv
from pallas_kernels.common import interpret_in_tests

INTERPRET = interpret_in_tests()  # False on a GPU with ATTNJAX_KERNEL_TESTS_ON_GPU=1

# Odd sizes on purpose: neither T nor D is a multiple of the 16-wide tiles, Tq != Tk, and GQA.
B, TQ, TK, H, HK, D = 2, 37, 45, 4, 2, 24
BLK = dict(block_q=16, block_k=16, interpret=INTERPRET)


def band_mask(tq, tk, causal, window):
  m = jnp.ones((tq, tk), bool)
  if causal:
    m &= masks_lib.causal_mask(tq, tk)
  if window is not None:
    m &= masks_lib.window_mask(tq, tk, *window)
  return m[None, None]


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, (6, 3)),
                                           (True, (9, None))],
                         ids=["dense", "causal", "window", "causal_window"])
def test_band_patterns_fp32(causal, window):
  q, k, v, do = random_qkv(0, B, TQ, TK, H, HK, D)
  fast = functools.partial(api.flash_attention, causal=causal, window=window, **BLK)
  ref = functools.partial(flash_reference, mask=band_mask(TQ, TK, causal, window))
  check_values_and_grads(fast, ref, (q, k, v), do, jnp.float32)


def test_lse_matches_softmax_engine():
  q, k, v, _ = random_qkv(1, B, TQ, TK, H, HK, D)
  o, lse = api.flash_attention(q, k, v, causal=True, return_lse=True, **BLK)
  from attnjax.ops import dot_product_attention
  ro, rlse = dot_product_attention(q, k, v, causal=True, return_lse=True,
                                   implementation="reference")
  assert_close("o", o, ro, 1e-4)
  assert_close("lse", lse, rlse, 1e-4)


def random_layout(seed, b, h, tq, tk, bq, bk):
  """Per-(batch, head) random block kinds with an elementwise rule on the partial blocks."""
  rng = np.random.default_rng(seed)
  kind = rng.choice(3, size=(b, h, -(-tq // bq), -(-tk // bk)), p=[0.4, 0.3, 0.3])
  kind[0, 0, 0, :] = 0  # one query block with no key block at all: its rows must come out 0
  rule = lambda qi, ki: (qi + 2 * ki) % 3 != 0
  return layouts.from_block_mask(kind > 0, kind == 1, block_q=bq, block_k=bk, tq=tq, tk=tk,
                                         mask_rule=rule)


def test_random_block_layout_fp32():
  q, k, v, do = random_qkv(2, B, TQ, TK, H, HK, D)
  layout = random_layout(0, B, H, TQ, TK, 16, 16)
  mask = layouts.broadcast_dense_mask(layout, B, H)
  fast = functools.partial(api.block_sparse_flash_attention, layout=layout, interpret=INTERPRET)
  ref = functools.partial(flash_reference, mask=mask)
  check_values_and_grads(fast, ref, (q, k, v), do, jnp.float32)
  o = fast(q, k, v)
  assert np.all(np.asarray(o[0, :16, 0]) == 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_causal_low_precision(dtype):
  q, k, v, do = random_qkv(3, 1, 40, 40, 2, 1, 32, dtype)
  fast = functools.partial(api.flash_attention, causal=True, **BLK)
  ref = functools.partial(flash_reference, mask=band_mask(40, 40, True, None))
  check_values_and_grads(fast, ref, (q, k, v), do, dtype)


MODE_CASES = {
    "softcap": dict(softcap=2.0),
    "alibi": dict(alibi_slopes=jnp.array([0.5, 0.25, 0.125, 0.0625])),
    "sigmoid": dict(score_mode="sigmoid"),
    "sigmoid_softcap": dict(score_mode="sigmoid", softcap=3.0, sigmoid_bias=-1.0),
}


@pytest.mark.parametrize("mode", list(MODE_CASES))
def test_score_modes_fp32(mode):
  q, k, v, do = random_qkv(4, 1, 21, 29, 4, 2, 16)
  kw = MODE_CASES[mode]
  fast = functools.partial(api.flash_attention, causal=True, **kw, **BLK)
  ref = functools.partial(flash_reference, mask=band_mask(21, 29, True, None), **kw)
  check_values_and_grads(fast, ref, (q, k, v), do, jnp.float32)


def test_sinks_values_and_grads():
  q, k, v, do = random_qkv(5, 1, 21, 21, 4, 2, 16)
  sinks = jnp.array([0.5, -1.0, 2.0, 0.0])
  mask = band_mask(21, 21, False, (4, 4))
  fast = lambda q, k, v, s: api.flash_attention(q, k, v, window=(4, 4), sinks=s, **BLK)
  ref = lambda q, k, v, s: flash_reference(q, k, v, mask, sinks=s)
  check_values_and_grads(fast, ref, (q, k, v, sinks), do, jnp.float32,
                         argnames=("q", "k", "v", "sinks"))


def test_low_rank_bias_factors_grads():
  """FlashBias columns: values and gradients w.r.t. q, k, v and both factors."""
  q, k, v, do = random_qkv(6, 1, 19, 19, 2, 1, 16)
  ks = jax.random.split(jax.random.PRNGKey(7), 2)
  phi_q = jax.random.normal(ks[0], (1, 19, 2, 3))
  phi_k = jax.random.normal(ks[1], (1, 19, 1, 3))
  fast = lambda q, k, v, a, b: api.flash_attention(q, k, v, bias_factors=(a, b), **BLK)
  ref = lambda q, k, v, a, b: flash_reference(q, k, v, bias_factors=(a, b))
  check_values_and_grads(fast, ref, (q, k, v, phi_q, phi_k), do, jnp.float32,
                         argnames=("q", "k", "v", "phi_q", "phi_k"))


def test_segment_ids_and_fully_masked_rows():
  """Query segment 7 matches no key: those rows are exactly 0, lse -inf, gradients finite."""
  q, k, v, do = random_qkv(8, 2, 27, 27, 2, 2, 16)
  seg = np.zeros((2, 27), np.int32)
  seg[:, 10:20] = 1
  seg[1, 20:] = 2
  q_seg = seg.copy()
  q_seg[0, 3:6] = 7
  q_seg, kv_seg = jnp.asarray(q_seg), jnp.asarray(seg)
  mask = masks_lib.segment_mask(q_seg, kv_seg)[:, None] & band_mask(27, 27, True, None)
  fast = lambda q, k, v: api.flash_attention(q, k, v, causal=True, q_segment_ids=q_seg,
                                             kv_segment_ids=kv_seg, **BLK)
  ref = functools.partial(flash_reference, mask=mask)
  check_values_and_grads(fast, ref, (q, k, v), do, jnp.float32)
  o, lse = api.flash_attention(q, k, v, causal=True, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                               return_lse=True, **BLK)
  assert np.all(np.asarray(o[0, 3:6]) == 0.0)
  assert np.all(np.isneginf(np.asarray(lse[0, :, 3:6])))


@pytest.mark.parametrize("tq,tk", [(1, 1), (1, 20)], ids=["T1", "decode"])
def test_single_query(tq, tk):
  q, k, v, do = random_qkv(9, 2, tq, tk, 2, 1, 16)
  fast = functools.partial(api.flash_attention, causal=True, **BLK)
  ref = functools.partial(flash_reference, mask=band_mask(tq, tk, True, None))
  check_values_and_grads(fast, ref, (q, k, v), do, jnp.float32)


def test_padded_outputs_fully_written():
  """Interpret mode poisons outputs with NaN; every padded tile of every kernel must be written."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plt

  unwritten = pl.pallas_call(lambda o_ref: None, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                             interpret=True, compiler_params=plt.CompilerParams())()
  assert np.all(np.isnan(np.asarray(unwritten))), "interpret mode no longer poisons outputs"

  q, k, v, do = random_qkv(10, 1, 37, 45, 2, 1, 24)
  layout = random_layout(3, 1, 2, 37, 45, 16, 16)
  fast = functools.partial(api.block_sparse_flash_attention, layout=layout, interpret=INTERPRET,
                           return_lse=True)
  calls = []
  orig = fwd_lib.flash_forward

  def spy(cfg, *args):
    outs = orig(cfg, *args)
    calls.append(outs)
    return outs

  fwd_lib.flash_forward = spy
  try:
    (o, lse), vjp = jax.vjp(fast, q, k, v)
  finally:
    fwd_lib.flash_forward = orig
  o_pad, lse_pad = calls[0]
  assert o_pad.shape == (1, 48, 2, 32) and np.all(np.isfinite(np.asarray(o_pad)))
  assert not np.any(np.isnan(np.asarray(lse_pad)))
  for g in vjp((do, jnp.zeros_like(lse))):
    assert np.all(np.isfinite(np.asarray(g)))


def test_bad_inputs_raise():
  q, k, v, _ = random_qkv(0, 1, 8, 8, 2, 1, 16)
  with pytest.raises(ValueError, match="kv heads"):
    api.flash_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2))
  with pytest.raises(ValueError, match="block_q"):
    api.flash_attention(q, k, v, block_q=24, interpret=INTERPRET)
  with pytest.raises(ValueError, match="sinks"):
    api.flash_attention(q, k, v, sinks=jnp.zeros(3), interpret=INTERPRET)
  with pytest.raises(ValueError, match="head dim"):
    api.flash_attention(jnp.zeros((1, 8, 1, 300)), jnp.zeros((1, 8, 1, 300)),
                        jnp.zeros((1, 8, 1, 300)))
  with pytest.raises(ValueError, match="layout or causal"):
    api.flash_attention(q, k, v, layouts.band_layout(8, 8, 16, 16), causal=True)
  with pytest.raises(ValueError, match="score_mode"):
    api.flash_attention(q, k, v, score_mode="relu")
