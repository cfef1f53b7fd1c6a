"""Tests for `attnjax.ops.softmax.dot_product_attention` (reference, xla, cudnn dispatch).

Oracles: an independent float64 loop over (b, h, i, j) written from the docstring's definitions
(not the library's masks), `jax.nn.dot_product_attention` where both apply, and the reference's
autodiff for gradients of the xla path.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops import softmax
from attnjax.ops import validation
from attnjax.ops.softmax import dot_product_attention

F32_TOL = dict(atol=2e-5, rtol=2e-5)
# bf16 inputs: both paths accumulate in f32, but xla rounds p and ds to bf16 before the value /
# key matmuls (as FlashAttention does) and outputs are bf16 (8 mantissa bits).
BF16_TOL = dict(atol=3e-2, rtol=3e-2)


def loop_attention(q, k, v, *, bias=None, mask=None, causal=False, q_segment_ids=None,
                   kv_segment_ids=None, window=None, softcap=None, sinks=None, alibi_slopes=None,
                   scale=None):
  """The definition, one (b, h, i) row at a time in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, tq, hq, d = q.shape
  tk, hk, dv = k.shape[1], k.shape[2], v.shape[3]
  scale = d ** -0.5 if scale is None else scale
  full = (b_, hq, tq, tk)
  bias = None if bias is None else np.broadcast_to(np.asarray(bias, np.float64), full)
  mask = None if mask is None else np.broadcast_to(np.asarray(mask), full)
  if q_segment_ids is not None and kv_segment_ids is None:
    kv_segment_ids = q_segment_ids
  out = np.zeros((b_, tq, hq, dv))
  lse = np.full((b_, hq, tq), -np.inf)
  for b in range(b_):
    for h in range(hq):
      kh = h // (hq // hk)
      for i in range(tq):
        pos = i + tk - tq
        logits, values = [], []
        for j in range(tk):
          if causal and j > pos:
            continue
          if window is not None:
            left, right = window
            if left is not None and j < pos - left:
              continue
            if right is not None and j > pos + right:
              continue
          if mask is not None and not mask[b, h, i, j]:
            continue
          if q_segment_ids is not None and q_segment_ids[b, i] != kv_segment_ids[b, j]:
            continue
          x = scale * float(q[b, i, h] @ k[b, j, kh])
          if softcap is not None:
            x = softcap * np.tanh(x / softcap)
          if bias is not None:
            x += bias[b, h, i, j]
          if alibi_slopes is not None:
            x -= float(alibi_slopes[h]) * ((pos - j) if causal else abs(pos - j))
          logits.append(x)
          values.append(v[b, j, kh])
        terms = logits + ([float(sinks[h])] if sinks is not None else [])
        if not terms:
          continue
        mx = max(terms)
        z = sum(np.exp(t - mx) for t in terms)
        lse[b, h, i] = mx + np.log(z)
        for x, val in zip(logits, values):
          out[b, i, h] += np.exp(x - lse[b, h, i]) * val
  return out, lse


def _inputs(seed, b, tq, tk, hq, hk, d, dtype=jnp.float32, dv=None):
  rng = np.random.default_rng(seed)
  dv = d if dv is None else dv
  q = jnp.asarray(rng.normal(size=(b, tq, hq, d)), dtype)
  k = jnp.asarray(rng.normal(size=(b, tk, hk, d)), dtype)
  v = jnp.asarray(rng.normal(size=(b, tk, hk, dv)), dtype)
  return rng, q, k, v


def _options(rng, name_list, b, tq, tk, hq):
  """Random values for the named options (shapes chosen to exercise broadcasting)."""
  opts = {}
  for name in name_list:
    if name == "mask":
      opts["mask"] = jnp.asarray(rng.uniform(size=(b, 1, tq, tk)) > 0.3)
    elif name == "mask_heads":
      opts["mask"] = jnp.asarray(rng.uniform(size=(hq, 1, tk)) > 0.3)
    elif name == "bias":
      opts["bias"] = jnp.asarray(rng.normal(size=(b, hq, tq, tk)), jnp.float32)
    elif name == "bias_2d":
      opts["bias"] = jnp.asarray(rng.normal(size=(tq, tk)), jnp.float32)
    elif name == "bias_per_query":
      opts["bias"] = jnp.asarray(rng.normal(size=(1, hq, tq, 1)), jnp.float32)
    elif name == "segments":
      opts["q_segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, size=(b, tq)), axis=1))
      opts["kv_segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, size=(b, tk)), axis=1))
    elif name == "sinks":
      opts["sinks"] = jnp.asarray(rng.normal(size=(hq,)), jnp.float32)
    elif name == "alibi":
      opts["alibi_slopes"] = softmax.alibi_slopes(hq)
    elif name == "causal":
      opts["causal"] = True
    elif name == "softcap":
      opts["softcap"] = 1.5
    elif name.startswith("window"):
      opts["window"] = {"window": (3, 1), "window_left": (4, None), "window_right": (None, 2),
                        "window_0": (0, 0)}[name]
    elif name == "scale":
      opts["scale"] = 0.3
    else:
      raise KeyError(name)
  return opts


ORACLE_CASES = [
    # (b, tq, tk, hq, hk, d, options)
    (2, 5, 5, 2, 2, 4, ()),
    (1, 4, 9, 4, 2, 3, ("causal",)),
    (1, 9, 4, 2, 1, 3, ("causal",)),  # Tq > Tk: the first 5 queries see no key.
    (2, 6, 8, 4, 2, 4, ("window",)),
    (1, 6, 6, 2, 2, 4, ("window_left", "causal", "alibi")),
    (1, 5, 7, 2, 2, 4, ("window_right", "alibi", "scale")),
    (2, 6, 7, 4, 1, 4, ("mask", "bias", "segments")),
    (2, 5, 6, 4, 2, 4, ("mask_heads", "bias_2d", "softcap", "sinks")),
    (1, 7, 7, 2, 2, 4, ("causal", "sinks", "window_0")),
]


@pytest.mark.parametrize("b,tq,tk,hq,hk,d,names", ORACLE_CASES)
def test_reference_matches_loop_definition(b, tq, tk, hq, hk, d, names):
  rng, q, k, v = _inputs(0, b, tq, tk, hq, hk, d, dv=d + 1)
  opts = _options(rng, names, b, tq, tk, hq)
  o, lse = dot_product_attention(q, k, v, return_lse=True, implementation="reference", **opts)
  o_ref, lse_ref = loop_attention(q, k, v, **opts)
  assert lse.shape == (b, hq, tq) and lse.dtype == jnp.float32
  np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(lse_ref))
  finite = np.isfinite(lse_ref)
  np.testing.assert_allclose(np.asarray(lse)[finite], lse_ref[finite], atol=1e-5, rtol=1e-5)


def test_sinks_match_their_definition_explicitly():
  """p_ij = exp(s_ij) / (exp(sink_h) + sum_j exp(s_ij)), written out once by hand."""
  _, q, k, v = _inputs(1, 1, 1, 3, 1, 1, 2)
  sinks = jnp.asarray([0.7], jnp.float32)
  o = dot_product_attention(q, k, v, sinks=sinks, implementation="reference")
  s = np.asarray(q[0, 0, 0] @ k[0, :, 0].T) / np.sqrt(2)
  p = np.exp(s) / (np.exp(0.7) + np.exp(s).sum())
  np.testing.assert_allclose(o[0, 0, 0], p @ np.asarray(v[0, :, 0]), atol=1e-6)


def _loss_and_grads(impl, q, k, v, opts, diff_names, block_size, query_block_size=None, seed=7):
  """Random projections of o and of the finite lse; grads w.r.t. q, k, v and `diff_names`.

  The query block defaults to `block_size + 1` so that query and key tiles never line up.
  """
  query_block_size = block_size + 1 if query_block_size is None else query_block_size
  o_shape = q.shape[:3] + (v.shape[3],)
  rng = np.random.default_rng(seed)
  w_o = jnp.asarray(rng.normal(size=o_shape), jnp.float32)
  w_l = jnp.asarray(rng.normal(size=(q.shape[0], q.shape[2], q.shape[1])), jnp.float32)
  static = {n: x for n, x in opts.items() if n not in diff_names}

  def loss(q, k, v, diff):
    o, lse = dot_product_attention(q, k, v, return_lse=True, implementation=impl,
                                   block_size=block_size, query_block_size=query_block_size,
                                   **static, **diff)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(lse * w_l), (o, lse)

  diff = {n: opts[n] for n in diff_names}
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
  (_, (o, lse)), grads = fn(q, k, v, diff)
  return o, lse, grads


XLA_CASES = [
    # (dtype, b, tq, tk, hq, hk, d, block, options)
    pytest.param(jnp.float32, 1, 1, 1, 2, 2, 4, 16, (), id="f32-T1"),
    pytest.param(jnp.float32, 2, 7, 7, 4, 2, 5, 3, ("bias_per_query",), id="f32-T7-gqa"),
    pytest.param(jnp.float32, 1, 129, 129, 2, 1, 8, 32, ("causal", "sinks"), id="f32-T129-mqa",
                 marks=pytest.mark.slow),
    pytest.param(jnp.float32, 1, 5, 129, 2, 2, 4, 16, ("causal", "window", "alibi", "bias_2d"),
                 id="f32-cross-decode"),
    pytest.param(jnp.float32, 1, 33, 9, 2, 2, 4, 4, ("causal", "softcap"), id="f32-Tq>Tk"),
    pytest.param(jnp.float32, 2, 13, 23, 4, 2, 4, 8, ("mask", "bias", "segments", "sinks"),
                 id="f32-mask-bias-seg"),
    pytest.param(jnp.float32, 1, 11, 11, 2, 2, 4, 4, ("window_left", "alibi", "mask_heads"),
                 id="f32-alibi-noncausal"),
    pytest.param(jnp.float32, 1, 19, 13, 2, 2, 4, 4, ("window_right", "bias_per_query"),
                 id="f32-right-window-Tq>Tk"),
    pytest.param(jnp.bfloat16, 1, 7, 7, 2, 1, 8, 3, ("causal",), id="bf16-T7"),
    pytest.param(jnp.bfloat16, 1, 129, 129, 2, 2, 8, 32, ("window", "sinks", "bias"),
                 id="bf16-T129", marks=pytest.mark.slow),
    pytest.param(jnp.bfloat16, 2, 6, 17, 4, 2, 8, 8, ("segments", "softcap", "alibi"),
                 id="bf16-cross"),
]


@pytest.mark.parametrize("dtype,b,tq,tk,hq,hk,d,block,names", XLA_CASES)
def test_xla_matches_reference_values_and_grads(dtype, b, tq, tk, hq, hk, d, block, names):
  rng, q, k, v = _inputs(2, b, tq, tk, hq, hk, d, dtype)
  opts = _options(rng, names, b, tq, tk, hq)
  diff_names = tuple(n for n in ("bias", "sinks", "alibi_slopes") if n in opts)
  o_r, lse_r, g_r = _loss_and_grads("reference", q, k, v, opts, diff_names, block)
  o_x, lse_x, g_x = _loss_and_grads("xla", q, k, v, opts, diff_names, block)
  tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
  assert o_x.dtype == dtype and o_x.shape == o_r.shape
  np.testing.assert_allclose(np.asarray(o_x, np.float32), np.asarray(o_r, np.float32), **tol)
  np.testing.assert_allclose(lse_x, lse_r, **tol)
  for gx, gr in zip(jax.tree.leaves(g_x), jax.tree.leaves(g_r)):
    assert gx.dtype == gr.dtype and gx.shape == gr.shape
    assert np.all(np.isfinite(np.asarray(gx, np.float32)))
    # Gradients are sums over up to Tq*Tk terms; compare relative to their scale.
    scale = max(1.0, float(np.max(np.abs(np.asarray(gr, np.float32)))))
    np.testing.assert_allclose(np.asarray(gx, np.float32) / scale,
                               np.asarray(gr, np.float32) / scale, **tol)


@pytest.mark.slow
def test_xla_default_block_sizes_with_partial_last_blocks():
  assert softmax.DEFAULT_BLOCK_SIZE == softmax.DEFAULT_QUERY_BLOCK_SIZE == 512
  rng, q, k, v = _inputs(3, 1, 520, 600, 1, 1, 4)
  opts = _options(rng, ("causal", "sinks"), 1, 520, 600, 1)
  blocks = (softmax.DEFAULT_BLOCK_SIZE, softmax.DEFAULT_QUERY_BLOCK_SIZE)
  r = _loss_and_grads("reference", q, k, v, opts, ("sinks",), *blocks)
  x = _loss_and_grads("xla", q, k, v, opts, ("sinks",), *blocks)
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(r)):
    np.testing.assert_allclose(a, b, **F32_TOL)


JAX_NN_CASES = [
    # (b, tq, tk, hq, hk, jax.nn kwargs, our kwargs)
    (2, 9, 13, 4, 2, {}, {}),
    (1, 11, 11, 2, 1, {"is_causal": True}, {"causal": True}),
    (1, 10, 10, 2, 2, {"local_window_size": (3, 2)}, {"window": (3, 2)}),
]


@pytest.mark.parametrize("b,tq,tk,hq,hk,theirs,ours", JAX_NN_CASES)
def test_xla_matches_jax_nn_dot_product_attention(b, tq, tk, hq, hk, theirs, ours):
  rng, q, k, v = _inputs(4, b, tq, tk, hq, hk, 8)
  bias = jnp.asarray(rng.normal(size=(1, hq, tq, tk)), jnp.float32)
  # Every row keeps its diagonal so that no row is fully masked (jax.nn averages those).
  mask = jnp.asarray((rng.uniform(size=(b, 1, tq, tk)) > 0.4) | np.eye(tq, tk, dtype=bool))

  def ours_fn(q, k, v):
    return dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="xla",
                                 block_size=4, query_block_size=3, **ours)

  def theirs_fn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="xla",
                                        **theirs)

  o, vjp = jax.vjp(jax.jit(ours_fn), q, k, v)
  o_ref, vjp_ref = jax.vjp(jax.jit(theirs_fn), q, k, v)
  np.testing.assert_allclose(o, o_ref, **F32_TOL)
  ct = jnp.asarray(rng.normal(size=o.shape), jnp.float32)
  for a, b in zip(vjp(ct), vjp_ref(ct)):
    np.testing.assert_allclose(a, b, **F32_TOL)


def _fully_masked_setups():
  b, tq, tk, h = 2, 6, 5, 2
  mask = np.ones((b, 1, tq, tk), bool)
  mask[0, 0, 2] = False
  mask[1, 0, 5] = False
  seg_q = np.array([[0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 3]])
  seg_k = np.array([[0, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
  return [
      ("mask", dict(mask=jnp.asarray(mask)), [(0, 2), (1, 5)]),
      ("causal", dict(causal=True), [(bb, 0) for bb in range(b)]),  # Tq > Tk: query 0 at pos -1.
      ("segments", dict(q_segment_ids=jnp.asarray(seg_q), kv_segment_ids=jnp.asarray(seg_k)),
       [(0, 4), (0, 5), (1, 5)]),
      ("window", dict(window=(0, 0), mask=jnp.asarray(mask)), [(0, 2), (1, 5), (0, 0), (1, 0)]),
  ]


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("name,opts,empty_rows", _fully_masked_setups(),
                         ids=lambda x: x if isinstance(x, str) else None)
def test_fully_masked_rows_give_zeros_and_finite_zero_grads(impl, name, opts, empty_rows):
  del name
  _, q, k, v = _inputs(5, 2, 6, 5, 2, 2, 4)

  def loss(q, k, v):
    o, lse = dot_product_attention(q, k, v, return_lse=True, implementation=impl, block_size=2,
                                   query_block_size=3, **opts)
    return jnp.sum(o * o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (o, lse)

  (_, (o, lse)), (dq, dk, dv) = jax.jit(jax.value_and_grad(
      loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  for g in (o, dq, dk, dv):
    assert np.all(np.isfinite(g))
  for bb, i in empty_rows:
    np.testing.assert_array_equal(o[bb, i], 0.0)
    np.testing.assert_array_equal(dq[bb, i], 0.0)
    assert np.all(np.isneginf(lse[bb, :, i]))
  # Every other row has at least one key, hence a finite lse.
  n_empty = len(set(empty_rows))
  assert np.sum(np.isneginf(np.asarray(lse[:, 0]))) == n_empty


def test_sinks_keep_lse_finite_on_fully_masked_rows():
  _, q, k, v = _inputs(6, 1, 3, 3, 2, 2, 4)
  mask = jnp.zeros((1, 1, 3, 3), bool)
  sinks = jnp.asarray([0.5, -1.0], jnp.float32)
  for impl in ("reference", "xla"):
    o, lse = dot_product_attention(q, k, v, mask=mask, sinks=sinks, return_lse=True,
                                   implementation=impl)
    np.testing.assert_array_equal(o, 0.0)
    np.testing.assert_allclose(lse, jnp.broadcast_to(sinks[None, :, None], (1, 2, 3)))


_Q = jnp.zeros((2, 5, 4, 8))
_K = jnp.zeros((2, 7, 2, 8))


@pytest.mark.parametrize("args,kwargs,match", [
    ((jnp.zeros((5, 4, 8)), _K, _K), {}, r"q must have rank 4 \[B, T, H, D\], got shape \(5, 4, 8\)"),
    ((_Q, _K, jnp.zeros((2, 7, 8))), {}, r"v must have rank 4"),
    ((_Q, jnp.zeros((2, 7, 3, 8)), jnp.zeros((2, 7, 3, 8))), {},
     r"query heads must be a multiple of key/value heads: q \(2, 5, 4, 8\) has 4, k \(2, 7, 3, 8\) has 3"),
    ((_Q, jnp.zeros((2, 7, 2, 6)), _K), {}, r"head dim D differs: q \(2, 5, 4, 8\) vs k \(2, 7, 2, 6\)"),
    ((_Q, _K, jnp.zeros((2, 6, 2, 8))), {}, r"k \(2, 7, 2, 8\) and v \(2, 6, 2, 8\) must agree"),
    ((_Q, jnp.zeros((3, 7, 2, 8)), jnp.zeros((3, 7, 2, 8))), {}, r"batch sizes differ"),
    ((_Q.astype(jnp.int32), _K, _K), {}, r"q must have a floating dtype, got int32"),
    ((_Q, _K, _K), {"window": (-1, 0)}, r"window left size must be None or an int >= 0"),
    ((_Q, _K, _K), {"window": (2, -3)}, r"window right size"),
    ((_Q, _K, _K), {"window": 3}, r"window must be None or a pair"),
    ((_Q, _K, _K), {"mask": jnp.ones((2, 4, 5, 6), bool)},
     r"mask of shape \(2, 4, 5, 6\) is not broadcastable to \(2, 4, 5, 7\)"),
    ((_Q, _K, _K), {"mask": jnp.ones((3, 1, 5, 7), bool)}, r"mask of shape \(3, 1, 5, 7\)"),
    ((_Q, _K, _K), {"mask": jnp.ones((5, 7))}, r"mask must be boolean"),
    ((_Q, _K, _K), {"bias": jnp.ones((1, 2, 1, 1))}, r"bias of shape \(1, 2, 1, 1\) is not"),
    ((_Q, _K, _K), {"sinks": jnp.ones((2,))}, r"sinks must have shape \[H\]=\(4,\), got \(2,\)"),
    ((_Q, _K, _K), {"alibi_slopes": jnp.ones((4, 1))}, r"alibi_slopes must have shape \[H\]"),
    ((_Q, _K, _K), {"softcap": 0.0}, r"softcap must be a python number > 0"),
    ((_Q, _K, _K), {"q_segment_ids": jnp.zeros((2, 5), jnp.int32)}, r"kv_segment_ids is required"),
    ((_Q, _K, _K), {"q_segment_ids": jnp.zeros((2, 4), jnp.int32),
                    "kv_segment_ids": jnp.zeros((2, 7), jnp.int32)},
     r"q_segment_ids must have shape \[B, T\]=\(2, 5\), got \(2, 4\)"),
    ((_Q, _K, _K), {"kv_segment_ids": jnp.zeros((2, 7), jnp.int32)}, r"without q_segment_ids"),
    ((_Q, _K, _K), {"block_size": 0}, r"block_size must be an int > 0"),
    ((_Q, _K, _K), {"query_block_size": 2.5}, r"query_block_size must be an int > 0"),
    ((_Q, _K, _K), {"implementation": "flash"}, r"unknown implementation 'flash'"),
    ((_Q, jnp.zeros((2, 0, 2, 8)), jnp.zeros((2, 0, 2, 8))), {}, r"at least one key"),
])
def test_bad_input_raises_value_error_naming_argument(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    dot_product_attention(*args, **kwargs)


def test_validation_helpers_return_useful_values():
  assert validation.check_qkv(_Q, _K, jnp.zeros((2, 7, 2, 3))) == (2, 5, 4, 8, 7, 2, 3)
  assert validation.check_broadcastable(jnp.ones((5, 7)), (2, 4, 5, 7), "m") == (1, 1, 5, 7)
  assert validation.check_window([None, 3]) == (None, 3)
  with pytest.raises(ValueError, match=r"cross_k must have rank 4"):
    validation.check_qkv(_Q, jnp.zeros((7, 2, 8)), _K, name_prefix="cross_")


def _call(**kw):
  base = dict(dtype="float32", tq=8, tk=8, hq=2, hk=2, d=64, dv=64, causal=False, window=None,
              has_mask=False, has_bias=False, has_segments=False, softcap=None, has_sinks=False,
              has_alibi=False, return_lse=False)
  base.update(kw)
  return softmax._Call(**base)


def test_dispatch_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("CPU dispatch rules")
  assert softmax.available_implementations() == ("reference", "xla")
  assert softmax.select_implementation(None, _call()) == "reference"
  long_call = _call(tq=1, tk=softmax.AUTO_XLA_MIN_KV_LEN)
  assert softmax.select_implementation(None, long_call) == "xla"
  assert softmax.select_implementation("xla", _call()) == "xla"
  with pytest.raises(ValueError, match=r"implementation='cudnn' cannot serve this call: cudnn "
                                       r"needs a CUDA GPU backend"):
    dot_product_attention(_Q, _K, _K, implementation="cudnn")


def test_cudnn_support_rules(monkeypatch):
  monkeypatch.setattr(softmax, "_on_cuda_gpu", lambda: True)
  ok = _call(dtype="bfloat16", causal=True)
  assert softmax.select_implementation(None, ok) == "cudnn"
  for bad in (_call(), _call(dtype="bfloat16", softcap=2.0), _call(dtype="bfloat16", has_sinks=True),
              _call(dtype="bfloat16", causal=True, tq=3), _call(dtype="bfloat16", d=60, dv=60),
              _call(dtype="bfloat16", return_lse=True),
              _call(dtype="bfloat16", window=(4, 4)),
              _call(dtype="bfloat16", has_mask=True, tq=7, tk=7)):
    assert softmax.unsupported_reason("cudnn", bad) is not None
    assert softmax.select_implementation(None, bad) == "reference"


def test_alibi_slopes_follow_the_paper():
  np.testing.assert_allclose(softmax.alibi_slopes(8), [2.0 ** -i for i in range(1, 9)])
  # Non power of two: 4 geometric slopes of n=4, then the odd-indexed slopes of n=8.
  np.testing.assert_allclose(softmax.alibi_slopes(6),
                             [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cudnn needs a CUDA GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_matches_reference_on_gpu(causal):
  rng, q, k, v = _inputs(8, 2, 128, 128, 4, 2, 64, jnp.bfloat16)
  mask = jnp.asarray(rng.uniform(size=(2, 1, 128, 128)) > 0.2)
  mask = mask.at[0, 0, 3].set(False)
  ref = functools.partial(dot_product_attention, implementation="reference", causal=causal,
                          mask=mask)
  cud = functools.partial(dot_product_attention, implementation="cudnn", causal=causal, mask=mask)
  o_r, vjp_r = jax.vjp(ref, q, k, v)
  o_c, vjp_c = jax.vjp(cud, q, k, v)
  np.testing.assert_allclose(np.asarray(o_c, np.float32), np.asarray(o_r, np.float32), **BF16_TOL)
  np.testing.assert_array_equal(np.asarray(o_c[0, 3], np.float32), 0.0)
  ct = jnp.asarray(rng.normal(size=o_r.shape), jnp.bfloat16)
  for a, b in zip(vjp_c(ct), vjp_r(ct)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=6e-2,
                               rtol=6e-2)


def test_xla_band_layout_lists_exactly_the_blocks_with_visible_pairs():
  """The xla path's band layout (walked by its forward over key blocks and by its backward over
  query blocks) lists exactly the block pairs holding a visible pair, and flags a block full only
  when every real pair in it is visible (brute force over small shapes)."""
  for tq, tk, bq, bk in [(1, 7, 3, 4), (7, 7, 3, 4), (10, 7, 4, 3), (7, 10, 3, 3), (9, 4, 4, 3)]:
    for causal in (False, True):
      for window in (None, (0, 0), (2, None), (None, 1), (3, 1)):
        cfg = softmax._XlaConfig(tq=tq, tk=tk, bq=bq, bk=bk, scale=1.0, causal=causal,
                                 window=window, softcap=None)
        band = softmax._band(cfg)
        vis = np.ones((tq, tk), bool)
        pos = np.arange(tq)[:, None] + tk - tq
        j = np.arange(tk)[None, :]
        if causal:
          vis &= j <= pos
        if window is not None and window[0] is not None:
          vis &= j >= pos - window[0]
        if window is not None and window[1] is not None:
          vis &= j <= pos + window[1]
        nq, nk = -(-tq // bq), -(-tk // bk)
        tile = lambda qi, ki: vis[qi * bq:(qi + 1) * bq, ki * bk:(ki + 1) * bk]
        pairs = {(qi, ki) for qi in range(nq) for ki in range(nk) if tile(qi, ki).any()}
        kc, ki_, kp = (np.asarray(a)[0, 0] for a in (band.kv_counts, band.kv_indices,
                                                      band.kv_partial))
        qc, qi_ = np.asarray(band.q_counts)[0, 0], np.asarray(band.q_indices)[0, 0]
        by_q = {(qi, int(ki_[qi, t])) for qi in range(nq) for t in range(kc[qi])}
        by_k = {(int(qi_[ki, t]), ki) for ki in range(nk) for t in range(qc[ki])}
        assert by_q == pairs == by_k, (tq, tk, bq, bk, causal, window)
        for qi in range(nq):
          for t in range(kc[qi]):
            if kp[qi, t] == 0:
              assert tile(qi, int(ki_[qi, t])).all(), (tq, tk, bq, bk, causal, window, qi)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="memory analysis checked on CPU")
def test_xla_forward_and_backward_never_hold_a_full_score_matrix():
  """Compiled temp memory of xla fwd+bwd stays far below one [H, T, T] f32 score matrix."""
  t, h, d = 2048, 1, 16
  x = jax.ShapeDtypeStruct((1, t, h, d), jnp.float32)

  def temp_bytes(impl):
    def loss(q, k, v):
      return jnp.sum(dot_product_attention(q, k, v, causal=True, implementation=impl,
                                           block_size=128, query_block_size=128))
    ma = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile().memory_analysis()
    return ma.temp_size_in_bytes

  score_bytes = h * t * t * 4
  assert temp_bytes("reference") >= score_bytes  # The check below can fail.
  assert temp_bytes("xla") < score_bytes / 8


def test_xla_value_head_dim_may_differ_from_query_head_dim():
  rng, q, k, v = _inputs(9, 2, 9, 10, 4, 2, 4, dv=6)
  opts = _options(rng, ("causal",), 2, 9, 10, 4)
  r = _loss_and_grads("reference", q, k, v, opts, (), 4)
  x = _loss_and_grads("xla", q, k, v, opts, (), 4)
  assert x[0].shape == (2, 9, 4, 6)
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(r)):
    np.testing.assert_allclose(a, b, **F32_TOL)


def test_cudnn_wrapper_logic_with_jax_nn_xla_standing_in(monkeypatch):
  """The cudnn path's argument mapping (segments -> mask, broadcasting, window, zeroed empty rows)
  checked on CPU by routing its jax.nn call to jax.nn's xla implementation."""
  original = jax.nn.dot_product_attention
  calls = []

  def stand_in(*args, implementation=None, **kwargs):
    calls.append(implementation)
    return original(*args, implementation="xla", **kwargs)

  monkeypatch.setattr(softmax, "_on_cuda_gpu", lambda: True)
  monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
  rng, q, k, v = _inputs(10, 2, 8, 8, 4, 2, 8, jnp.bfloat16)
  mask = np.asarray(rng.uniform(size=(8, 8)) > 0.3)
  mask[5] = False
  opts = dict(causal=True, window=(3, 0), mask=jnp.asarray(mask),
              bias=jnp.asarray(rng.normal(size=(4, 1, 8)), jnp.float32),
              q_segment_ids=jnp.asarray([[0] * 4 + [1] * 4, [0] * 8]))
  o = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, **opts))(q, k, v)  # Auto: cudnn.
  assert calls == ["cudnn"]
  o_ref = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation="reference",
                                                        **opts))(q, k, v)
  np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_ref, np.float32), **BF16_TOL)
  np.testing.assert_array_equal(np.asarray(o[:, 5], np.float32), 0.0)
