"""The linear-attention engine: three forms vs a float64 NumPy loop (the defining property), grads,
segments, decode steps, extreme gates and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from attnjax.ops.linear import engine
from attnjax.ops.linear.engine import (FormChoice, init_state, linear_attention, linear_attention_step,
                                       NORMALIZE_EPS, select_form, split_forms)

B, T, H, DK, DV = 2, 37, 2, 5, 3   # T=37 is a multiple of none of the chunk sizes used
SEG = np.array([[0] * 10 + [1] * 20 + [2] * 7, [5] * 37])
KINDS = ("none", "head", "scalar", "vector")


def _inputs(seed, kind, t=T, strength=2.0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, t, H, DK)).astype(np.float32)
  k = rng.normal(size=(B, t, H, DK)).astype(np.float32)
  v = rng.normal(size=(B, t, H, DV)).astype(np.float32)
  shape = {"none": None, "head": (H,), "scalar": (B, t, H), "vector": (B, t, H, DK)}[kind]
  ld = None if shape is None else -rng.uniform(0, strength, size=shape).astype(np.float32)
  s0 = rng.normal(size=(B, H, DK, DV)).astype(np.float32)
  return q, k, v, ld, s0


def _naive(q, k, v, ld, s0, seg, normalize=False, causal=True):
  """Float64 loop: S_t = exp(g_t) S_{t-1} + k_t^T v_t (reset at segment changes), o_t = s q_t S_t."""
  b, t, h, dk = q.shape
  g = np.zeros((b, t, h, 1)) if ld is None else np.asarray(ld, np.float64)
  g = np.broadcast_to(g[None, None, :, None] if g.ndim == 1 else (g[..., None] if g.ndim == 3 else g),
                      (b, t, h, g.shape[-1] if g.ndim == 4 else 1))
  scale = dk ** -0.5
  o = np.zeros(v.shape, np.float64)
  fin_s, fin_z = np.zeros(s0.shape), np.zeros(s0.shape[:3])
  for bi in range(b):
    s, z = s0[bi].astype(np.float64), np.zeros((h, dk)) + 1.0 * (normalize and 0)
    states = []
    for ti in range(t):
      if seg is not None and ti > 0 and seg[bi, ti] != seg[bi, ti - 1]:
        s, z = np.zeros_like(s), np.zeros_like(z)
      s = np.exp(g[bi, ti])[..., None] * s + np.einsum("hd,he->hde", k[bi, ti], v[bi, ti])
      z = np.exp(g[bi, ti]) * z + k[bi, ti]
      states.append((s, z))
    for ti in range(t):
      if causal:
        st, zt = states[ti]
      else:
        last = max(j for j in range(t) if seg is None or seg[bi, j] == seg[bi, ti]
                   and all(seg[bi, m] == seg[bi, ti] for m in range(min(j, ti), max(j, ti) + 1)))
        st, zt = states[last]
      num = np.einsum("hd,hde->he", q[bi, ti], st) * scale
      if normalize:
        num = num / (np.einsum("hd,hd->h", q[bi, ti], zt)[:, None] * scale + NORMALIZE_EPS)
      o[bi, ti] = num
    fin_s[bi], fin_z[bi] = states[-1]
  return o, fin_s, fin_z


# Jitted (one XLA program per configuration is much cheaper than op-by-op on 2 CPU cores, and it
# checks that the engine traces with traced gates).
_jit_la = jax.jit(linear_attention, static_argnames=("normalize", "causal", "output_final_state",
                                                     "form", "chunk_size", "scale"))


def _run(q, k, v, ld, s0, **kw):
  return _jit_la(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                          log_decay=None if ld is None else jnp.asarray(ld),
                          initial_state=None if s0 is None else jnp.asarray(s0),
                          output_final_state=True, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_forms_match_naive_loop_with_segments_and_initial_state(kind):
  q, k, v, ld, s0 = _inputs(0, kind)
  ref, ref_s, _ = _naive(q, k, v, ld, s0, SEG)
  for form, cs in (("recurrent", 64), ("parallel", 64), ("chunked", 8), ("chunked", 7),
                   ("chunked", 64)):
    o, s = _run(q, k, v, ld, s0, segment_ids=jnp.asarray(SEG), form=form, chunk_size=cs)
    np.testing.assert_allclose(o, ref, atol=2e-5, rtol=2e-5, err_msg=f"{form} {cs}")
    np.testing.assert_allclose(s, ref_s, atol=2e-5, rtol=2e-5, err_msg=f"{form} {cs} state")
    assert s.dtype == jnp.float32


@pytest.mark.parametrize("kind", ("none", "vector"))
def test_normalize_matches_naive(kind):
  q, k, v, ld, _ = _inputs(1, kind)
  q, k = np.abs(q) + 0.1, np.abs(k) + 0.1   # positive features, as the feature maps produce
  ref, ref_s, ref_z = _naive(q, k, v, ld, np.zeros((B, H, DK, DV), np.float32), None, normalize=True)
  for form, cs in (("recurrent", 64), ("parallel", 64), ("chunked", 16)):
    o, (s, z) = _run(q, k, v, ld, None, normalize=True, form=form, chunk_size=cs)
    np.testing.assert_allclose(o, ref, atol=2e-5, rtol=2e-5, err_msg=form)
    np.testing.assert_allclose(s, ref_s, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(z, ref_z, atol=2e-5, rtol=2e-5)


def test_chunk_size_invariance_gates_near_zero_and_one():
  for strength, seed in ((1e-4, 2), (30.0, 3)):   # decay ~1 and decay ~0
    q, k, v, ld, s0 = _inputs(seed, "vector", strength=strength)
    ref, _ = _run(q, k, v, ld, s0, form="recurrent")
    for cs in (1, 5, 16, 40):
      o, _ = _run(q, k, v, ld, s0, form="chunked", chunk_size=cs)
      np.testing.assert_allclose(o, ref, atol=3e-5, rtol=3e-5, err_msg=f"{strength} {cs}")


def test_decay_one_is_plain_linear_attention():
  """Oracle (GLA (Yang et al. 2023, arXiv:2312.06635)): alpha = 1 (log gate 0) gives plain causal linear attention."""
  q, k, v, _, _ = _inputs(4, "none")
  zero = np.zeros((B, T, H, DK), np.float32)
  o, _ = _run(q, k, v, zero, None, form="chunked", chunk_size=8)
  a = np.tril(np.einsum("bihd,bjhd->bhij", q, k)) * DK ** -0.5
  np.testing.assert_allclose(o, np.einsum("bhij,bjhe->bihe", a, v), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind", ("none", "scalar", "vector"))
def test_gradients_agree_across_forms(kind):
  """All forms, and the default `form=None` (on the CPU its forward is the token scan and its
  gradient the chunked form's autodiff, through `split_forms`), give the same values and grads."""
  q, k, v, ld, s0 = _inputs(5, kind, t=19)
  seg = jnp.asarray(SEG[:, :19])
  ct = np.random.default_rng(6).normal(size=(B, 19, H, DV)).astype(np.float32)
  cs = np.random.default_rng(7).normal(size=(B, H, DK, DV)).astype(np.float32)

  def loss(form, cs_len):
    def f(q, k, v, ld, s0):
      o, s = linear_attention(q, k, v, log_decay=ld, initial_state=s0, output_final_state=True,
                              segment_ids=seg, form=form, chunk_size=cs_len)
      return jnp.sum(o * ct) + jnp.sum(s * cs)
    args = [None if x is None else jnp.asarray(x) for x in (q, k, v, ld, s0)]
    value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))(*args)
    return [value, *grads]

  ref = loss("recurrent", 64)
  for form, cs_len in (("parallel", 64), ("chunked", 6), (None, 6)):
    for name, a, r in zip("loss q k v log_decay s0".split(), loss(form, cs_len), ref):
      if r is not None:
        np.testing.assert_allclose(a, r, atol=5e-5, rtol=5e-5, err_msg=f"{form} d{name}")


def test_split_forms_runs_one_form_forward_and_the_other_under_autodiff():
  """`split_forms(run, a, b, x)` is run("a") when not differentiated; its value and gradient under
  `jax.grad` are run("b")'s (the two runs differ on purpose here, so either half can fail)."""
  run = lambda form, x: jnp.sin(x) if form == "a" else x ** 2
  x = jnp.linspace(-1.0, 2.0, 7)
  np.testing.assert_allclose(split_forms(run, "a", "b", x), jnp.sin(x), rtol=1e-6)
  value, grad = jax.value_and_grad(lambda x: jnp.sum(split_forms(run, "a", "b", x)))(x)
  np.testing.assert_allclose(value, jnp.sum(x ** 2), rtol=1e-6)
  np.testing.assert_allclose(grad, 2 * x, rtol=1e-6)


def test_select_form_reads_the_table_and_default_calls_run_it(monkeypatch):
  """`select_form` answers which forms a `form=None` call runs, from `FORM_TABLE` (first row with
  T <= max_T; chunked on backends the table lacks), and a default call runs exactly those."""
  assert select_form(100, "scalar", backend="tpu") == FormChoice("chunked", "chunked")
  table = {"cpu": {"scalar": ((20, "parallel", "recurrent"), (None, "recurrent", "chunked")),
                   "vector": ((None, "recurrent", "chunked", 16),)}}
  monkeypatch.setattr(engine, "FORM_TABLE", table)
  assert select_form(20, "scalar", backend="cpu") == FormChoice("parallel", "recurrent")
  assert select_form(21, "scalar", backend="cpu") == FormChoice("recurrent", "chunked")
  assert select_form(21, "vector", backend="cpu") == FormChoice("recurrent", "chunked", 16)
  assert select_form(21, "none", backend="cpu") == FormChoice("chunked", "chunked")
  # Which form ran is visible in the program: only the recurrent form scans over all T tokens.
  q, k, v, ld, _ = _inputs(9, "scalar", t=T)
  f = lambda q, k, v, ld: linear_attention(q, k, v, log_decay=ld, chunk_size=8)[0]
  g = jax.grad(lambda q, k, v, ld: jnp.sum(f(q, k, v, ld)))
  if jax.default_backend() == "cpu":
    assert str(jax.make_jaxpr(f)(q, k, v, ld)).count(f"length={T}") >= 1      # recurrent forward
    assert f"length={T}" not in str(jax.make_jaxpr(g)(q, k, v, ld))           # chunked autodiff


def test_check_grads_chunked():
  q, k, v, ld, s0 = _inputs(8, "scalar", t=9)
  f = lambda q, k, v, ld, s0: linear_attention(q, k, v, log_decay=ld, initial_state=s0,
                                               form="chunked", chunk_size=4)[0]
  args = [jnp.asarray(x) for x in (q, k, v, ld - 0.1, s0)]
  check_grads(f, args, order=1, modes=["rev"], atol=5e-2, rtol=5e-2, eps=1e-2)


@pytest.mark.parametrize("kind", ("scalar", "vector"))
def test_extreme_gate_logits_are_finite(kind):
  """log_decay = log_sigmoid(-1e4) = -1e4 at random places: exact resets, finite values and grads."""
  q, k, v, ld, s0 = _inputs(9, kind, t=21)
  mask = np.random.default_rng(10).random(ld.shape) < 0.3
  ld = np.where(mask, np.float32(jax.nn.log_sigmoid(-1e4)), ld).astype(np.float32)
  ref, _, _ = _naive(q, k, v, ld, s0, None)
  for form, cs in (("recurrent", 64), ("parallel", 64), ("chunked", 8)):
    o, _ = _run(q, k, v, ld, s0, form=form, chunk_size=cs)
    np.testing.assert_allclose(o, ref, atol=3e-5, rtol=3e-5, err_msg=form)
    grads = jax.jit(jax.grad(lambda q, ld: jnp.sum(linear_attention(q, jnp.asarray(k), jnp.asarray(v),
                                                            log_decay=ld, form=form, chunk_size=cs)[0]),
                     argnums=(0, 1)))(jnp.asarray(q), jnp.asarray(ld))
    for gr in grads:
      assert np.all(np.isfinite(gr)), form


@pytest.mark.parametrize("normalize", (False, True))
def test_decode_steps_equal_forward(normalize):
  q, k, v, ld, _ = _inputs(11, "vector", t=12)
  if normalize:
    q, k = np.abs(q), np.abs(k)
  full, fin = _run(q, k, v, ld, None, normalize=normalize, form="chunked", chunk_size=4)
  # Prefill 5 tokens, then one token at a time.
  pre, state = _run(q[:, :5], k[:, :5], v[:, :5], ld[:, :5], None, normalize=normalize)
  outs = [pre]
  for t in range(5, 12):
    o_t, state = linear_attention_step(jnp.asarray(q[:, t]), jnp.asarray(k[:, t]), jnp.asarray(v[:, t]),
                                       state, log_decay_t=jnp.asarray(ld[:, t]), normalize=normalize)
    outs.append(o_t[:, None])
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(fin)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def test_step_per_head_decay_and_init_state():
  q, k, v, ld, _ = _inputs(12, "head", t=3)
  full, _ = _run(q, k, v, ld, None, form="recurrent")
  state = init_state(B, H, DK, DV)
  for t in range(3):
    o_t, state = linear_attention_step(q[:, t], k[:, t], v[:, t], state, log_decay_t=jnp.asarray(ld))
  np.testing.assert_allclose(o_t, full[:, -1], atol=2e-5, rtol=2e-5)


def test_noncausal_forms_and_oracle():
  q, k, v, _, s0 = _inputs(13, "none")
  ref, ref_s, _ = _naive(q, k, v, None, s0, SEG, causal=False)
  for form, cs in (("recurrent", 64), ("parallel", 64), ("chunked", 8)):
    o, s = _run(q, k, v, None, s0, causal=False, segment_ids=jnp.asarray(SEG), form=form, chunk_size=cs)
    np.testing.assert_allclose(o, ref, atol=3e-5, rtol=3e-5, err_msg=form)
    np.testing.assert_allclose(s, ref_s, atol=3e-5, rtol=3e-5)


def test_noncausal_cross_attention_lengths():
  q, _, _, _, _ = _inputs(14, "none", t=5)
  _, k, v, _, _ = _inputs(15, "none", t=9)
  o, s = _run(q, k, v, None, None, causal=False, normalize=True)
  kv = np.einsum("bjhd,bjhe->bhde", k, v)
  num = np.einsum("bihd,bhde->bihe", q, kv)
  den = np.einsum("bihd,bhd->bih", q, k.sum(1))[..., None]
  np.testing.assert_allclose(o, num / (den + NORMALIZE_EPS * DK ** 0.5), rtol=1e-4, atol=1e-4)


def test_bf16_inputs_close_to_float32():
  q, k, v, ld, _ = _inputs(16, "vector", t=20)
  ref, _ = _run(q, k, v, ld, None, form="recurrent")
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  o, s = linear_attention(bf(q), bf(k), bf(v), log_decay=bf(ld), form="chunked", chunk_size=8,
                          output_final_state=True)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  # bf16 rounding of inputs (8 mantissa bits) dominates: ~2^-8 relative per factor.
  np.testing.assert_allclose(np.asarray(o, np.float32), ref, atol=5e-2, rtol=5e-2)


def test_bad_inputs_raise():
  q, k, v, ld, s0 = _inputs(17, "scalar", t=6)
  q, k, v = map(jnp.asarray, (q, k, v))
  with pytest.raises(ValueError, match="log_decay must be a log-space gate"):
    linear_attention(q, k, v, log_decay=-jnp.asarray(ld))
  with pytest.raises(ValueError, match="log_decay must have shape"):
    linear_attention(q, k, v, log_decay=jnp.zeros((B, 6)))
  with pytest.raises(ValueError, match="initial_state S must have shape"):
    linear_attention(q, k, v, initial_state=jnp.zeros((B, H, DK + 1, DV)))
  with pytest.raises(ValueError, match="must be float32"):
    linear_attention(q, k, v, initial_state=jnp.zeros((B, H, DK, DV), jnp.bfloat16))
  with pytest.raises(ValueError, match="tuple"):
    linear_attention(q, k, v, normalize=True, initial_state=jnp.zeros((B, H, DK, DV)))
  with pytest.raises(ValueError, match="form must be"):
    linear_attention(q, k, v, form="fast")
  with pytest.raises(ValueError, match="chunk_size"):
    linear_attention(q, k, v, chunk_size=0)
  with pytest.raises(ValueError, match="q, k, v must be"):
    linear_attention(q[0], k, v)
  with pytest.raises(ValueError, match="causal=True"):
    linear_attention(q, k, v, causal=False, log_decay=jnp.asarray(ld))
  with pytest.raises(ValueError, match="segment_ids must be"):
    linear_attention(q, k, v, segment_ids=jnp.zeros((B, 5), jnp.int32))
  with pytest.raises(ValueError, match="cross attention"):
    linear_attention(q, k[:, :3], v[:, :3])
  with pytest.raises(ValueError, match="log_decay_t"):
    linear_attention_step(q[:, 0], k[:, 0], v[:, 0], init_state(B, H, DK, DV),
                          log_decay_t=jnp.zeros((H, 3)))


@pytest.mark.parametrize("kind", ("none", "head", "vector", "scalar_normalize", "delta"))
def test_benchmark_scan_baseline_is_the_same_recurrence(kind):
  """The hand-written scan the CPU benchmark compares against computes what the engine does."""
  from experiments.bench_linear_vs_scan import plain_scan
  from attnjax.ops.linear.delta import delta_rule
  rng = np.random.default_rng(11)
  q, k, v = (rng.normal(size=(B, 13, H, DK)).astype(np.float32) for _ in range(3))
  if kind == "scalar_normalize":
    q, k = np.abs(q) + 0.1, np.abs(k) + 0.1
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  v = v[..., :DK]
  shape = {"none": None, "head": (H,), "vector": (B, 13, H, DK), "scalar_normalize": (B, 13, H),
           "delta": (B, 13, H)}[kind]
  g = None if shape is None else -rng.uniform(0, 1, size=shape).astype(np.float32)
  beta = rng.uniform(0, 1, size=(B, 13, H)).astype(np.float32)
  if kind == "delta":
    ref = delta_rule(q, k, v, beta, log_decay=g, scale=1.0, form="recurrent")[0]
  else:
    ref = linear_attention(q, k, v, log_decay=g, scale=1.0, normalize=kind == "scalar_normalize",
                           form="recurrent")[0]
  np.testing.assert_allclose(plain_scan(q, k, v, g, beta, kind), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ("gla", "retnet", "lightning", "deltanet", "gated_deltanet"))
def test_registry_linear_mixers_run_the_selected_forms(name, monkeypatch):
  """Mixers built by name get `form=None` and so run what `select_form` picks: with a table that
  says "token scan forward, chunked autodiff", their forward scans every token and their gradient
  has no token-length scan."""
  from flax import nnx
  from attnjax import build_mixer
  backend = jax.default_backend()
  table = {kind: ((None, "recurrent", "chunked"),) for kind in ("none", "head", "scalar", "vector", "delta")}
  monkeypatch.setattr(engine, "FORM_TABLE", {backend: table})
  m = build_mixer(name, d_model=16, num_heads=2, causal=True, rngs=nnx.Rngs(0))
  assert m.form is None
  t = 21
  x = jax.random.normal(jax.random.key(0), (1, t, 16))
  graphdef, state = nnx.split(m)
  fwd = lambda state, x: nnx.merge(graphdef, state)(x)
  loss = lambda state, x: jnp.sum(fwd(state, x) ** 2)
  assert f"length={t}" in str(jax.make_jaxpr(fwd)(state, x))
  assert f"length={t}" not in str(jax.make_jaxpr(jax.grad(loss))(state, x))
