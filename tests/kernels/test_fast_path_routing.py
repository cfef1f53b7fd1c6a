"""One `implementation=` vocabulary: what each op selects for a CUDA GPU (selection is a pure
function of (backend, call), so it is checked here on the CPU), that `implementation="pallas"`
reaches the kernels from the ops (interpret mode, sizes that are not multiples of the blocks,
values and gradients against the ops' oracles), and `attnjax.fast_path_report` on mixed models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax
from attnjax.models import DecoderLM, ViT
from attnjax.ops import block_sparse as BS
from attnjax.ops import neighborhood as N
from attnjax.ops import softmax
from attnjax.ops.linear import delta as delta_lib
from attnjax.ops.linear import engine
from attnjax.ops.operators import scorefns


def _softmax_call(**kw):
  base = dict(dtype="float32", tq=2048, tk=2048, hq=4, hk=4, d=64, dv=64, causal=True, window=None,
              has_mask=False, has_bias=False, has_segments=False, softcap=None, has_sinks=False,
              has_alibi=False, return_lse=False)
  base.update(kw)
  return softmax._Call(**base)


def test_gpu_selection_of_every_op_family():
  gpu, cpu = "gpu", "cpu"
  # Softmax: a long sliding window cuDNN cannot serve (float32) goes to the flash kernel, one it
  # serves (bf16) to cuDNN.
  win = _softmax_call(window=(255, 0))
  assert softmax.select_implementation(None, win, gpu) == "pallas"
  assert softmax.select_implementation(None, win, cpu) == "xla"
  assert softmax.select_implementation(None, dataclasses.replace(win, dtype="bfloat16"),
                                       gpu) == "cudnn"
  sym = dataclasses.replace(win, dtype="bfloat16", causal=False, window=(255, 255))
  assert softmax.select_implementation(None, sym, gpu) == "pallas"   # cuDNN: left windows only
  with pytest.raises(ValueError, match="cudnn needs a CUDA GPU backend, the backend is 'cpu'"):
    softmax.select_implementation("cudnn", win, cpu)
  # Block-sparse: static layouts with kernel-sized blocks go to the kernel; per-token selections
  # and per-key biases stay on the gather path, and asking for the kernel says why it cannot.
  call = BS.BlockSparseCall(dtype="float32", d=64, dv=64, block_q=64, block_k=64)
  assert BS.select_implementation(None, call, gpu) == "pallas"
  assert BS.select_implementation(None, call, cpu) == "xla"
  for bad, why in ((dataclasses.replace(call, has_query_block_select=True), "query_block_select"),
                   (dataclasses.replace(call, has_bias_k=True), "bias_k"),
                   (dataclasses.replace(call, block_q=4), "block_q is 4"),
                   (dataclasses.replace(call, block_k=48), "block_k is 48")):
    impl, reason = BS.choose_implementation(None, bad, gpu)
    assert impl == "xla" and why in reason, (impl, reason)
    with pytest.raises(ValueError, match=why):
      BS.select_implementation("pallas", bad, gpu)
  with pytest.raises(ValueError, match="implementation must be None or one of"):
    BS.select_implementation("block_sparse", call, gpu)
  # Neighborhood attention: the tile-permuted layout on the kernel (default tiles of 64 tokens).
  x = jnp.zeros((1, 16, 16, 2, 16))
  assert N.choose_implementation(None, x, x, x, backend=gpu)[0] == "pallas"
  assert N.choose_implementation(None, x, x, x, backend=cpu)[0] == "xla"
  assert N.choose_implementation(None, x, x, x, tile_shape=(3, 3), backend=gpu)[0] == "xla"
  # Linear attention and the delta rule: FORM_TABLE's "gpu" row is the kernel for every kind.
  for kind in ("none", "head", "scalar", "vector", "delta"):
    lc = engine.LinearCall(t=4096, tk=4096, decay=kind)
    assert engine.choose_implementation(None, lc, backend=gpu)[0] == "pallas", kind
    impl, forms, _ = engine.choose_implementation(None, lc, backend=cpu)
    assert (impl, forms.primal) == ("xla", "recurrent"), kind
  lc = engine.LinearCall(t=4096, tk=4096, decay="scalar")
  odd = dataclasses.replace(lc, chunk_size=48)
  assert engine.choose_implementation(None, odd, backend=gpu)[:2] == (
      "xla", engine.FormChoice("chunked", "chunked"))
  assert engine.choose_implementation("xla", lc, backend=gpu)[0] == "xla"
  with pytest.raises(ValueError, match="power of two >= 16, got 48"):
    engine.choose_implementation("pallas", odd, backend=gpu)
  with pytest.raises(ValueError, match="Tk=8 != T=4096"):
    engine.choose_implementation("pallas", dataclasses.replace(lc, tk=8, causal=False), backend=gpu)
  with pytest.raises(ValueError, match="chunked kernel"):
    engine.choose_implementation("pallas", lc, "recurrent", backend=gpu)
  # Sigmoid attention: the flash kernel's sigmoid mode takes one constant bias.
  q = jnp.zeros((1, 8, 2, 16))
  choose = scorefns.choose_sigmoid_implementation
  assert choose(None, q, q, q, bias=-2.0, backend=gpu)[0] == "pallas"
  assert scorefns.choose_sigmoid_implementation(None, q, q, q, bias=-2.0, backend=cpu)[0] == (
      "reference")
  assert scorefns.choose_sigmoid_implementation(None, q, q, q, bias="visible",
                                                backend=gpu)[0] == "reference"
  with pytest.raises(ValueError, match="implementation must be None or one of"):
    scorefns.sigmoid_attention(q, q, q, implementation="xla")


def _rand(seed, *shapes):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return [jax.random.normal(kk, s) for kk, s in zip(keys, shapes)]


def _check_values_and_grads(fast, ref, args, atol):
  w = _rand(99, fast(*args).shape)[0]
  loss = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(w * f(*a)),
                                              argnums=tuple(range(len(args)))))
  (lf, gf), (lr, gr) = loss(fast)(*args), loss(ref)(*args)
  np.testing.assert_allclose(fast(*args), ref(*args), atol=atol)
  for a, b in zip(gf, gr):
    np.testing.assert_allclose(a, b, atol=atol)


def test_linear_attention_pallas_equals_the_token_scan():
  """GLA per-key-dim gate, T=21 with chunks of 16, two packed segments and an initial state."""
  b, t, h, d = 1, 21, 2, 16
  q, k, v, gl = _rand(0, (b, t, h, d), (b, t, h, d), (b, t, h, d), (b, t, h, d))
  seg = jnp.asarray([[0] * 9 + [1] * 12])
  s0 = _rand(1, (b, h, d, d))[0]

  def run(impl):
    return lambda q, k, v, gl, s0: engine.linear_attention(
        q, k, v, log_decay=jax.nn.log_sigmoid(gl), segment_ids=seg, initial_state=s0,
        chunk_size=16 if impl == "pallas" else None, implementation=impl)[0]

  _check_values_and_grads(run("pallas"), run("reference"), (q, k, v, gl, s0), 1e-4)


def test_delta_rule_pallas_equals_the_token_scan():
  """Gated DeltaNet's scalar gate, L2-normalised keys, T=21 with chunks of 16."""
  b, t, h, d = 1, 21, 2, 16
  q, k, v, bl, gl = _rand(2, (b, t, h, d), (b, t, h, d), (b, t, h, d), (b, t, h), (b, t, h))

  def run(impl):
    def f(q, k, v, bl, gl):
      kn = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
      return delta_lib.delta_rule(q, kn, v, jax.nn.sigmoid(bl), log_decay=jax.nn.log_sigmoid(gl),
                                  chunk_size=16, implementation=impl)[0]
    return f

  _check_values_and_grads(run("pallas"), run("reference"), (q, k, v, bl, gl), 1e-4)


def test_sigmoid_attention_pallas_equals_reference():
  """Causal sliding window, GQA 2 -> 1, T=37 (the kernel's tiles are 32 in interpret mode)."""
  q, k, v = _rand(3, (1, 37, 2, 16), (1, 37, 1, 16), (1, 37, 1, 16))

  def run(impl):
    return lambda q, k, v: scorefns.sigmoid_attention(q, k, v, bias=-1.5, causal=True,
                                                      window=(9, None), implementation=impl)

  _check_values_and_grads(run("pallas"), run("reference"), (q, k, v), 1e-5)


def test_fast_path_report_on_mixed_models():
  mixers = ["softmax", "sliding_window", "sigmoid", "gla", "gated_deltanet", "na1d",
            "sink_local_sparse", "moba", "transnormer_diag"]
  opts = [{}, {}, {}, {}, {}, {}, {"block": 16}, {}, {}]
  lm = DecoderLM(vocab_size=32, d_model=16, num_layers=len(mixers), num_heads=2, mixer=mixers,
                 mixer_options=opts, rngs=nnx.Rngs(0))
  rows = attnjax.fast_path_report(lm, backend="gpu", seq_len=1024, print_table=False)
  got = [(r.path, r.mixer, r.implementation) for r in rows]
  want_gpu = ["pallas", "pallas", "pallas", "pallas", "pallas", "pallas", "pallas", "xla"]
  assert [g[2] for g in got[:8]] == want_gpu, got
  assert [g[1] for g in got[:8]] == mixers[:8]
  assert got[0][0] == "blocks/0" and "block_q is 1" in rows[7].reason   # MoBA's per-token queries
  assert rows[-1].mixer == "transnormer_diag"
  rows_cpu = attnjax.fast_path_report(lm, backend="cpu", seq_len=1024, print_table=False)
  assert [r.implementation for r in rows_cpu[:8]] == ["xla", "xla", "reference", "xla", "xla",
                                                      "xla", "xla", "xla"]
  assert "FORM_TABLE['cpu']" in rows_cpu[3].reason
  vit = ViT(image_size=16, patch_size=2, num_classes=3, d_model=16, num_layers=2, num_heads=2,
            mixer=["na2d", "softmax"], rngs=nnx.Rngs(0))
  rows = attnjax.fast_path_report(vit, backend="gpu", print_table=False)
  # The class token attends to every token (dense): every op call of a layer is a row.
  assert [(r.mixer, r.implementation) for r in rows] == [
      ("na2d", "pallas"), ("na2d", "reference"), ("softmax", "reference")], rows
  text = attnjax.fast_path.format_report(rows, "gpu")
  assert "| blocks/0 | na2d | pallas |" in text
