"""Chunked linear-attention Pallas kernels (interpret mode) against a float32 token recurrence.

Every case compares values and every gradient (q, k, v, log-decay, initial state) of the loss
`(o * do).sum() + (S_T * dS).sum()` with random `do`, `dS`, as flash-linear-attention's tests do.
Metric: relative RMS error ||x - ref|| / ||ref||. Tolerances (stated per dtype below): float32
1e-5 for values and q/k/v/state gradients; gate gradients 2e-4 (they are a within-chunk reverse
cumsum of q dq - k dk, whose terms cancel when the decay is strong, which amplifies rounding);
bfloat16 inputs (matmuls on bf16 operands, float32 accumulation, reference in float32 on the same
bf16 values) 6e-3, gate gradients 2e-2.
Interpret mode fills every output buffer with NaN before the kernel runs
(`test_interpret_mode_poisons_outputs`), so a row the kernel forgets to store fails the
comparisons (they also assert that everything is finite).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.linear import BlockSizes, chunked_linear_attention
from pallas_kernels.common import interpret_in_tests

INTERPRET = interpret_in_tests()  # False on a GPU with ATTNJAX_KERNEL_TESTS_ON_GPU=1

TOL = {
    "float32": dict(value=1e-5, gate=2e-4),
    "bfloat16": dict(value=6e-3, gate=2e-2),
}


# ------------------------------------------------------------------------------------ reference


def recurrent_reference(q, k, v, *, log_decay=None, scale=None, normalize=False,
                        initial_state=None, segment_ids=None, eps=1e-10):
  """Token-by-token float32 recurrence; the state resets where segment_ids changes."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  scale = dk ** -0.5 if scale is None else scale
  f32 = lambda x: x.astype(jnp.float32)
  q, k, v = f32(q), f32(k), f32(v)
  g = jnp.zeros((b, t, h, dk)) if log_decay is None else f32(log_decay)
  if g.ndim == 1:
    g = jnp.broadcast_to(g, (b, t, h))
  if g.ndim == 3:
    g = jnp.broadcast_to(g[..., None], (b, t, h, dk))
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  starts = jnp.concatenate([jnp.zeros((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  if normalize:
    v = jnp.concatenate([v, jnp.ones((b, t, h, 1))], axis=-1)
    if initial_state is not None:
      initial_state = jnp.concatenate([initial_state[0], initial_state[1][..., None]], -1)
  s0 = jnp.zeros((b, h, dk, v.shape[-1])) if initial_state is None else f32(initial_state)

  def step(s, x):
    qt, kt, vt, gt, st = x
    s = jnp.where(st[:, None, None, None], 0.0, jnp.exp(gt)[..., None] * s)
    s = s + kt[..., :, None] * vt[..., None, :]
    return s, scale * jnp.einsum("bhk,bhkv->bhv", qt, s)

  xs = tuple(x.swapaxes(0, 1) for x in (q, k, v, g, starts))
  s, o = jax.lax.scan(step, s0, xs)
  o = o.swapaxes(0, 1)
  if normalize:
    o = o[..., :dv] / (o[..., dv:] + eps)
    return o, (s[..., :dv], s[..., dv])
  return o, s


def rel_rms(x, ref):
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  assert np.all(np.isfinite(x)), "non-finite values in the kernel's result"
  assert np.all(np.isfinite(ref)), "non-finite values in the reference"
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


# ------------------------------------------------------------------------------------ inputs


def make_gates(key, kind, b, t, h, dk, normalizer):
  """flash-linear-attention's recipe: logsigmoid(uniform) / normalizer (small -> strong decay)."""
  shape = {"none": None, "head": (h,), "scalar": (b, t, h), "vector": (b, t, h, dk)}[kind]
  if shape is None:
    return None
  return jax.nn.log_sigmoid(jax.random.uniform(key, shape)) / normalizer


def make_case(seed, b, t, h, dk, dv, kind, normalizer, dtype):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(ks[0], (b, t, h, dk)).astype(dtype)
  k = jax.random.normal(ks[1], (b, t, h, dk)).astype(dtype)
  v = jax.random.normal(ks[2], (b, t, h, dv)).astype(dtype)
  g = make_gates(ks[3], kind, b, t, h, dk, normalizer)
  h0 = jax.random.normal(ks[4], (b, h, dk, dv))
  do = jax.random.normal(ks[5], (b, t, h, dv))
  ds = jax.random.normal(ks[6], (b, h, dk, dv))
  return q, k, v, g, h0, do, ds


def check_against_reference(q, k, v, g, h0, do, ds, *, tol, gate_tol=None, segment_ids=None,
                            block_sizes=None, **kw):
  """Values and all gradients of (o*do).sum() + (S_T*dS).sum() vs the recurrence."""
  gate_tol = tol if gate_tol is None else gate_tol

  def loss(fn, q, k, v, g, h0):
    o, s = fn(q, k, v, log_decay=g, initial_state=h0, segment_ids=segment_ids, **kw)
    return (o.astype(jnp.float32) * do).sum() + (s * ds).sum(), (o, s)

  fast = functools.partial(chunked_linear_attention, output_final_state=True, interpret=INTERPRET,
                           block_sizes=block_sizes)
  argnums = (0, 1, 2, 4) if g is None else (0, 1, 2, 3, 4)
  # Jitted: one compile of the interpreted kernel is ~3x cheaper than dispatching it eagerly.
  (_, (o, s)), grads = jax.jit(jax.value_and_grad(
      functools.partial(loss, fast), argnums, has_aux=True))(q, k, v, g, h0)
  (_, (o_ref, s_ref)), grads_ref = jax.jit(jax.value_and_grad(
      functools.partial(loss, recurrent_reference), argnums, has_aux=True))(q, k, v, g, h0)
  names = ["dq", "dk", "dv", "dg", "dh0"] if g is not None else ["dq", "dk", "dv", "dh0"]
  errors = {"o": rel_rms(o, o_ref), "S_T": rel_rms(s, s_ref)}
  errors.update({n: rel_rms(a, r) for n, a, r in zip(names, grads, grads_ref)})
  for name, err in errors.items():
    limit = gate_tol if name == "dg" else tol
    assert err <= limit, f"{name}: relative RMS error {err:.2e} > {limit:.0e} ({errors})"
  assert o.dtype == q.dtype and s.dtype == jnp.float32
  return errors


# ------------------------------------------------------------------------------------ tests

# A sample of the grid T x D x gate strength (each value of each axis at least once),
# over the four decay kinds and both dtypes. (B, H) = (2, 2) for the small cases, (1, 1) for slow.
GRID = [
    # T,    D,   kind,     normalizer, dtype,      slow
    (1,    32,  "vector",  1.0,        "float32",  False),
    (63,   60,  "scalar",  0.1,        "float32",  False),
    (111,  100, "head",    10.0,       "bfloat16", False),
    (111,  64,  "vector",  0.1,        "bfloat16", False),
    (63,   128, "none",    1.0,        "bfloat16", False),
    (500,  64,  "vector",  10.0,       "float32",  True),
    (500,  100, "scalar",  1.0,        "bfloat16", True),
    (1000, 128, "vector",  1.0,        "bfloat16", True),
    (1000, 60,  "scalar",  10.0,       "float32",  True),
]


@pytest.mark.parametrize(
    "t,d,kind,normalizer,dtype",
    [pytest.param(*c[:5], marks=[pytest.mark.slow] if c[5] else [],
                  id=f"T{c[0]}-D{c[1]}-{c[2]}-n{c[3]}-{c[4]}") for c in GRID])
def test_matches_recurrence(t, d, kind, normalizer, dtype):
  b, h = (1, 1) if t >= 500 else (2, 2)
  case = make_case(t * 7 + d, b, t, h, d, d, kind, normalizer, jnp.dtype(dtype))
  check_against_reference(*case, tol=TOL[dtype]["value"], gate_tol=TOL[dtype]["gate"])


@pytest.mark.parametrize("kind", ["vector"])
def test_sub_chunks_and_value_blocks(kind):
  """chunk 32 with 16-row sub-chunks, 16-wide value blocks, Dk != Dv, T not a chunk multiple."""
  case = make_case(3, 2, 77, 2, 24, 40, kind, 1.0, jnp.float32)
  check_against_reference(*case, tol=1e-5, gate_tol=2e-4,
                          block_sizes=BlockSizes(chunk=32, sub_chunk=16, block_v=16))


def _ids_from_lengths(lengths):
  """Segment ids with one id per segment, so a zero length is an id that never occurs."""
  return np.repeat(np.arange(len(lengths)), lengths)


@pytest.mark.parametrize("kind,dtype", [("vector", "float32"), ("scalar", "bfloat16")])
def test_packed_sequences(kind, dtype):
  """Resets at segment starts, with an empty and length-1 segments, crossing chunk edges."""
  t = 70
  seg = jnp.asarray(np.stack([_ids_from_lengths([0, 1, 20, 1, 31, 17]),
                              _ids_from_lengths([15, 0, 55])]), jnp.int32)
  case = make_case(11, 2, t, 2, 20, 24, kind, 1.0, jnp.dtype(dtype))
  check_against_reference(*case, segment_ids=seg, tol=TOL[dtype]["value"],
                          gate_tol=TOL[dtype]["gate"],
                          block_sizes=BlockSizes(chunk=16, sub_chunk=16, block_v=16))


def test_packed_equals_separate_calls():
  """Each packed segment gives what the kernel gives on that segment alone."""
  lengths = [1, 20, 19]
  seg = jnp.asarray(_ids_from_lengths(lengths)[None], jnp.int32)
  q, k, v, g, h0, _, _ = make_case(5, 1, sum(lengths), 1, 16, 16, "vector", 1.0, jnp.float32)
  run = functools.partial(chunked_linear_attention, interpret=INTERPRET, output_final_state=True,
                          block_sizes=BlockSizes(chunk=16))
  o_packed, s_packed = run(q, k, v, log_decay=g, initial_state=h0, segment_ids=seg)
  start = 0
  for i, n in enumerate(lengths):
    sl = slice(start, start + n)
    o_alone, s_alone = run(q[:, sl], k[:, sl], v[:, sl], log_decay=g[:, sl],
                           initial_state=h0 if i == 0 else None)
    assert rel_rms(o_packed[:, sl], o_alone) < 1e-5
    start += n
  assert rel_rms(s_packed, s_alone) < 1e-5


@pytest.mark.parametrize("kind", ["scalar", "vector"])
def test_strong_gates_stay_finite(kind):
  """Gate logits down to -1e4 (10% of steps): finite, and still matching the recurrence."""
  q, k, v, g, h0, do, ds = make_case(7, 1, 90, 2, 32, 32, kind, 1.0, jnp.float32)
  strong = jax.random.uniform(jax.random.PRNGKey(1), g.shape) < 0.1
  g = jnp.where(strong, -1e4, g)
  check_against_reference(q, k, v, g, h0, do, ds, tol=1e-4, gate_tol=1e-3,
                          block_sizes=BlockSizes(chunk=32))


def test_interpret_mode_poisons_outputs():
  """Interpret mode starts every output as NaN: rows a kernel never stores stay NaN."""

  def half_store(x_ref, o_ref):
    o_ref[pl.ds(0, 8), :] = x_ref[pl.ds(0, 8), :]

  out = pl.pallas_call(half_store, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32),
                       compiler_params=plt.CompilerParams(num_warps=4, num_stages=2),
                       interpret=True)(jnp.ones((16, 16)))
  assert np.all(np.asarray(out[:8]) == 1.0) and np.all(np.isnan(np.asarray(out[8:])))


def test_without_final_state_returns_none_and_default_scale():
  q, k, v, g, _, _, _ = make_case(2, 1, 20, 1, 16, 16, "scalar", 1.0, jnp.float32)
  o, s = chunked_linear_attention(q, k, v, log_decay=g, interpret=INTERPRET)
  assert s is None
  o_ref, _ = recurrent_reference(q, k, v, log_decay=g, scale=16 ** -0.5)
  assert rel_rms(o, o_ref) < 1e-5


@pytest.mark.parametrize("bad", ["k", "v", "log_decay", "segment_ids", "initial_state",
                                 "chunk"])
def test_bad_inputs_raise(bad):
  q = jnp.zeros((1, 8, 2, 16))
  args = dict(k=q, v=jnp.zeros((1, 8, 2, 8)), log_decay=None, segment_ids=None,
              initial_state=None)
  wrong = {"k": jnp.zeros((1, 8, 2, 15)), "v": jnp.zeros((1, 7, 2, 8)),
           "log_decay": jnp.zeros((1, 8)), "segment_ids": jnp.zeros((1, 9), jnp.int32),
           "initial_state": jnp.zeros((1, 2, 16, 9))}
  extra = {}
  if bad == "chunk":
    extra["chunk_size"] = 24
  else:
    args[bad] = wrong[bad]
  with pytest.raises(ValueError, match=bad if bad != "chunk" else "chunk"):
    chunked_linear_attention(q, args.pop("k"), args.pop("v"), interpret=INTERPRET, **args, **extra)


def dense_non_causal_reference(q, k, v, *, scale, normalize=False, initial_state=None,
                               segment_ids=None, eps=1e-10):
  """o_i = scale * sum_{j in seg(i)} (q_i . k_j) v_j (+ scale q_i S_0 in the first segment)."""
  b, t = q.shape[:2]
  f32 = lambda x: x.astype(jnp.float32)
  q, k, v = f32(q), f32(k), f32(v)
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  same = seg[:, :, None] == seg[:, None, :]
  w = scale * jnp.einsum("bihd,bjhd->bhij", q, k) * same[:, None]
  o = jnp.einsum("bhij,bjhv->bihv", w, v)
  den = jnp.sum(w, axis=-1).transpose(0, 2, 1)
  if initial_state is not None:
    first = (seg == seg[:, :1])[..., None, None]
    s0, z0 = initial_state if normalize else (initial_state, None)
    o = o + jnp.where(first, scale * jnp.einsum("bthk,bhkv->bthv", q, s0), 0.0)
    if normalize:
      den = den + jnp.where(first[..., 0], scale * jnp.einsum("bthk,bhk->bth", q, z0), 0.0)
  if normalize:
    o = o / (den[..., None] + eps)
  return o


@pytest.mark.parametrize("kind", ["head"])
def test_normalized(kind):
  """Normaliser state z_t = e^{g_t} z_{t-1} + k_t, o = scale q S / (scale q z + eps); positive
  feature maps (as normalised linear attention uses) keep the denominator away from zero."""
  q, k, v, g, h0, do, _ = make_case(9, 2, 45, 2, 20, 12, kind, 1.0, jnp.float32)
  q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
  z0 = jnp.abs(h0[..., 0])
  dz = jax.random.normal(jax.random.PRNGKey(3), z0.shape)

  def loss(fn, q, k, v, h0, z0):
    o, (s, z) = fn(q, k, v, log_decay=g, initial_state=(h0, z0), normalize=True)
    return (o * do).sum() + (z * dz).sum() + s.sum(), (o, s, z)

  fast = functools.partial(chunked_linear_attention, output_final_state=True, interpret=INTERPRET,
                           block_sizes=BlockSizes(chunk=16))
  (_, out), grads = jax.jit(jax.value_and_grad(functools.partial(loss, fast), (0, 1, 2, 3, 4),
                                               has_aux=True))(q, k, v, h0, z0)
  (_, out_ref), grads_ref = jax.jit(jax.value_and_grad(
      functools.partial(loss, recurrent_reference), (0, 1, 2, 3, 4), has_aux=True))(
          q, k, v, h0, z0)
  for x, ref in zip(out + grads, out_ref + grads_ref):
    assert rel_rms(x, ref) < 1e-5


@pytest.mark.parametrize("normalize,dtype", [(True, "float32"), (False, "bfloat16")])
def test_non_causal(normalize, dtype):
  """Every query reads the full state of its own segment; the initial state feeds segment 0."""
  seg = jnp.asarray(np.stack([_ids_from_lengths([1, 25, 0, 14]),
                              _ids_from_lengths([40])]), jnp.int32)
  q, k, v, _, h0, do, _ = make_case(13, 2, 40, 2, 24, 20, "none", 1.0, jnp.dtype(dtype))
  if normalize:
    q, k = (jax.nn.elu(q.astype(jnp.float32)) + 1).astype(q.dtype), jax.nn.elu(k) + 1
    h0 = (jnp.abs(h0), jnp.abs(h0[..., 0]))
  fast = functools.partial(chunked_linear_attention, causal=False, normalize=normalize,
                           segment_ids=seg, initial_state=h0, interpret=INTERPRET,
                           block_sizes=BlockSizes(chunk=16))
  ref = functools.partial(dense_non_causal_reference, scale=24 ** -0.5, normalize=normalize,
                          segment_ids=seg, initial_state=h0)
  fast_o = lambda q, k, v: fast(q, k, v)[0]
  def loss(fn, q, k, v):
    o = fn(q, k, v)
    return (o.astype(jnp.float32) * do).sum(), o
  vg = lambda fn: jax.jit(jax.value_and_grad(functools.partial(loss, fn), (0, 1, 2), has_aux=True))
  (_, o), grads = vg(fast_o)(q, k, v)
  (_, o_ref), grads_ref = vg(ref)(q, k, v)
  tol = TOL[dtype]["value"]
  for x, r in zip((o,) + grads, (o_ref,) + grads_ref):
    assert rel_rms(x, r) < tol


def test_non_causal_rejects_decay():
  q = jnp.zeros((1, 8, 1, 16))
  with pytest.raises(ValueError, match="log_decay"):
    chunked_linear_attention(q, q, q, log_decay=jnp.zeros((1,)), causal=False, interpret=INTERPRET)


@pytest.mark.parametrize("kind,normalize,causal,form", [
    ("head", False, True, "recurrent"), ("vector", True, True, "recurrent"),
    ("none", True, False, "recurrent"), ("scalar", False, True, "chunked")])
def test_matches_linear_family_engine(kind, normalize, causal, form):
  """Same contract as `attnjax.ops.linear.engine.linear_attention` in its recurrent and chunked
  (chunk 16, the kernel's chunk too) forms: values and gradients, packed segments, initial state
  (pair with the normaliser when normalize=True)."""
  from attnjax.ops.linear.engine import linear_attention
  seg = jnp.asarray(np.stack([_ids_from_lengths([7, 1, 30]), _ids_from_lengths([38])]),
                    jnp.int32)
  q, k, v, g, h0, do, _ = make_case(17, 2, 38, 2, 16, 20, kind, 1.0, jnp.float32)
  if normalize:
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
    h0 = (jnp.abs(h0), jnp.abs(h0[..., 0]))
  if not causal:
    g = None

  def loss(fn, q, k, v, g, h0):
    o, s = fn(q, k, v, log_decay=g, initial_state=h0, segment_ids=seg, normalize=normalize,
              causal=causal, output_final_state=True)
    s = s[0] if normalize else s
    return (o * do).sum() + s.sum(), o

  fast = functools.partial(chunked_linear_attention, interpret=INTERPRET,
                           block_sizes=BlockSizes(chunk=16))
  engine = functools.partial(linear_attention, form=form, chunk_size=16)
  argnums = (0, 1, 2) if g is None else (0, 1, 2, 3)
  (_, o), grads = jax.jit(jax.value_and_grad(functools.partial(loss, fast), argnums,
                                             has_aux=True))(q, k, v, g, h0)
  (_, o_ref), grads_ref = jax.jit(jax.value_and_grad(functools.partial(loss, engine), argnums,
                                                     has_aux=True))(q, k, v, g, h0)
  for x, r in zip((o,) + grads, (o_ref,) + grads_ref):
    assert rel_rms(x, r) < 2e-5
