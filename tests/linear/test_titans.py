"""Titans neural memory and the Miras variants: forms agree, defining properties, gate limits, decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import build_mixer
from attnjax.ops.linear import titans as T
from attnjax.ops.linear.delta import delta_rule
from attnjax.ops.linear.engine import linear_attention

B, L, H, D = 2, 11, 2, 4
_l2 = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(seed=0, t=L):
  ks = jax.random.split(jax.random.key(seed), 6)
  q = _l2(jax.random.normal(ks[0], (B, t, H, D)))
  k = _l2(jax.random.normal(ks[1], (B, t, H, D)))
  v = jax.random.normal(ks[2], (B, t, H, D))
  lr = 0.4 * jax.random.uniform(ks[3], (B, t, H))
  lg = jax.nn.log_sigmoid(jax.random.normal(ks[4], (B, t, H)) + 2.0)
  lm = jax.nn.log_sigmoid(jax.random.normal(ks[5], (B, t, H)))
  return q, k, v, lr, lg, lm


# Jitted once per static configuration: eager dispatch of the scans dominates the runtime otherwise.
_nm = jax.jit(T.neural_memory, static_argnames=("spec", "chunk_size", "form", "output_final_state",
                                                "fast_linear"))


def _init(spec, seed=7):
  shapes = T.memory_shapes(spec, D, D, expansion=2)
  return tuple(0.3 * jax.random.normal(jax.random.key(seed + i), (H,) + s) for i, s in enumerate(shapes))


def _close(a, b, tol=2e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


SPECS = {
    "titans_linear": T.MemorySpec(),
    "titans_mlp": T.MemorySpec(memory="mlp"),
    "moneta_mlp": T.MemorySpec(memory="mlp", loss="lp", p=3.0, retention="lq", q=4.0),
    "yaad_linear": T.MemorySpec(loss="huber", huber_delta=0.5),
    "memora_linear": T.MemorySpec(retention="kl"),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_chunked_equals_recurrent_values_and_state(name):
  spec = SPECS[name]
  q, k, v, lr, lg, lm = _inputs()
  init = _init(spec)
  for c in (3,) if name != "titans_linear" else (1, 3, 16):
    kw = dict(log_retain=lg, log_momentum=lm, spec=spec, init_memory=init, chunk_size=c,
              output_final_state=True)
    ref = _nm(q, k, v, lr, form="recurrent", **kw)
    _close(_nm(q, k, v, lr, form="chunked", **kw), ref, 1e-4)
    if spec.fast_linear:   # the matmul form against the materialising one
      _close(_nm(q, k, v, lr, form="chunked", fast_linear=False, **kw), ref, 1e-4)


@pytest.mark.parametrize("name", ["titans_linear", pytest.param("titans_mlp", marks=pytest.mark.slow)])
def test_chunked_gradients_match_recurrent(name):
  q, k, v, lr, lg, lm = _inputs(1)
  w = jax.random.normal(jax.random.key(9), (B, L, H, D))
  spec = SPECS[name]
  if True:
    init = _init(spec)

    def loss(args, form):
      q_, k_, v_, lr_, lg_, lm_ = args
      o, _ = _nm(q_, k_, v_, lr_, log_retain=lg_, log_momentum=lm_, spec=spec,
                             init_memory=init, chunk_size=3, form=form)
      return jnp.sum(o * w)

    args = (q, k, v, lr, lg, lm)
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    _close(grad(args, "chunked"), grad(args, "recurrent"), 2e-4)


def test_chunk_size_one_is_the_fully_recurrent_rule():
  """An independent loop: gradient at M_{t-1}, S_t = eta S - theta g, M_t = (1-alpha) M + S, y = M_t(q)."""
  spec = SPECS["titans_mlp"]
  q, k, v, lr, lg, lm = _inputs(2, t=5)
  init = _init(spec)
  loss = lambda w, kk, vv: jnp.sum((T.memory_apply(spec, w, kk) - vv) ** 2)
  grad = jax.jit(jax.grad(loss))
  outs = {}
  for b, h in ((0, 0), (1, 1)):
    m = tuple(x[h] for x in init)
    s = tuple(jnp.zeros_like(x) for x in m)
    for t in range(5):
      g = grad(m, k[b, t, h], v[b, t, h])
      s = tuple(jnp.exp(lm[b, t, h]) * si - lr[b, t, h] * gi for si, gi in zip(s, g))
      m = tuple(jnp.exp(lg[b, t, h]) * mi + si for mi, si in zip(m, s))
      outs[b, t, h] = T.memory_apply(spec, m, q[b, t, h])
  for form in ("chunked", "recurrent"):
    o, _ = _nm(q, k, v, lr, log_retain=lg, log_momentum=lm, spec=spec, init_memory=init,
               chunk_size=1, form=form)
    for (b, t, h), y in outs.items():
      np.testing.assert_allclose(o[b, t, h], y, atol=2e-5, rtol=2e-5)


def test_linear_memory_without_momentum_and_decay_is_the_delta_rule():
  """Defining property: eta = 0, alpha = 0, C = 1: W <- W - theta grad = delta rule with beta = 2 theta."""
  q, k, v, lr, _, _ = _inputs(3)
  o, _ = _nm(q, k, v, lr, chunk_size=1)
  od, _ = delta_rule(q, k, v, 2 * lr, scale=1.0, form="recurrent")
  np.testing.assert_allclose(o, od, atol=1e-5)


def test_one_chunk_from_zero_memory_is_decayed_linear_attention():
  """All gradients at M_0 = 0: g_j = -2 k_j^T v_j, so with no momentum M_t = sum_j prod(a) 2 theta_j k_j^T v_j."""
  q, k, v, lr, lg, _ = _inputs(4)
  o, _ = _nm(q, k, v, lr, log_retain=lg, chunk_size=16)
  ol, _ = linear_attention(q, 2 * lr[..., None] * k, v, log_decay=lg, scale=1.0, form="recurrent")
  np.testing.assert_allclose(o, ol, atol=1e-5)


def test_gate_limits_closed_forms_and_finite_gradients():
  q, k, v, lr, _, _ = _inputs(5)
  zero, one = jnp.full((B, L, H), -1e4), jnp.zeros((B, L, H))
  # alpha = 1 (retain nothing), no momentum: M_t = 2 theta_t k_t^T v_t (gradient at M_0 = 0).
  o, _ = _nm(q, k, v, lr, log_retain=zero, chunk_size=16)
  expect = 2 * lr[..., None] * jnp.sum(q * k, -1, keepdims=True) * v
  np.testing.assert_allclose(o, expect, atol=1e-5)
  # eta = 1, alpha = 0: S and M both accumulate: M_t = sum_j (t - j + 1) u_j, u_j = 2 theta_j k_j^T v_j.
  o, _ = _nm(q, k, v, lr, log_retain=one, log_momentum=one, chunk_size=16)
  t = jnp.arange(L)
  wgt = jnp.where(t[:, None] >= t[None, :], t[:, None] - t[None, :] + 1.0, 0.0)
  expect = jnp.einsum("ij,bihd,bjhd,bjh,bjhe->bihe", wgt, q, k, 2 * lr, v)
  np.testing.assert_allclose(o, expect, atol=1e-4, rtol=1e-5)
  # Extreme log gates: finite values and gradients in both forms.
  for form in ("chunked", "recurrent"):
    g = jax.grad(lambda lg_: jnp.sum(_nm(q, k, v, lr, log_retain=lg_, log_momentum=zero,
                                                     chunk_size=4, form=form)[0]))(zero)
    assert np.isfinite(np.asarray(g)).all()


def test_packed_segments_restart_memory_and_chunk_grid():
  q, k, v, lr, lg, lm = _inputs(6)
  seg = jnp.array([[0] * 5 + [1] * 6] * B)
  kw = dict(log_retain=lg, log_momentum=lm, chunk_size=3)
  o, _ = _nm(q, k, v, lr, segment_ids=seg, **kw)
  cut = lambda x, s: x[:, s]
  for s in (slice(0, 5), slice(5, L)):
    alone, _ = _nm(cut(q, s), cut(k, s), cut(v, s), cut(lr, s), log_retain=cut(lg, s),
                               log_momentum=cut(lm, s), chunk_size=3)
    np.testing.assert_allclose(o[:, s], alone, atol=1e-5)


def test_step_continues_any_state_like_the_full_forward():
  spec = SPECS["titans_mlp"]
  q, k, v, lr, lg, lm = _inputs(7)
  init = _init(spec)
  kw = dict(spec=spec, init_memory=init, chunk_size=3)
  full, _ = _nm(q, k, v, lr, log_retain=lg, log_momentum=lm, **kw)
  _, st = _nm(q[:, :4], k[:, :4], v[:, :4], lr[:, :4], log_retain=lg[:, :4],
                          log_momentum=lm[:, :4], output_final_state=True, **kw)
  assert int(st.pos[0]) == 1   # mid-chunk
  outs = []
  for t in range(4, L):
    o, st = T.neural_memory_step(q[:, t], k[:, t], v[:, t], lr[:, t], st, log_retain_t=lg[:, t],
                                 log_momentum_t=lm[:, t], spec=spec, chunk_size=3)
    outs.append(o)
  np.testing.assert_allclose(jnp.stack(outs, 1), full[:, 4:], atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------------------------
# Miras variants: each one's defining property.


def test_moneta_with_p2_q2_is_the_titans_update():
  q, k, v, lr, lg, _ = _inputs(8)
  base = T.MemorySpec(memory="mlp")
  moneta = T.MemorySpec(memory="mlp", loss="lp", p=2.0, retention="lq", q=2.0)
  init = _init(base)
  kw = dict(log_retain=lg, init_memory=init, chunk_size=3)
  np.testing.assert_allclose(_nm(q, k, v, lr, spec=moneta, **kw)[0],
                             _nm(q, k, v, lr, spec=base, **kw)[0], atol=1e-5)
  # p = 3: the l_p gradient is p sign(e) |e|^(p-1) (up to the eps smoothing).
  e = jnp.array([0.5, -2.0, 1.5])
  g = jax.grad(lambda p: T.attentional_bias(T.MemorySpec(loss="lp", p=3.0), p, jnp.zeros(3)))(e)
  np.testing.assert_allclose(g, 3 * jnp.sign(e) * jnp.abs(e) ** 2, rtol=1e-5)
  # q = 4: the read-out is A / ||A||_4^2.
  a = (jnp.array([[1.0, -2.0], [0.5, 3.0]]),)
  w = T.read_transform(T.MemorySpec(retention="lq", q=4.0, eps=1e-12), a)[0]
  np.testing.assert_allclose(w, a[0] / jnp.sum(a[0] ** 4) ** 0.5, rtol=1e-5)


def test_yaad_huber_is_l2_for_small_errors_and_bounded_for_large():
  q, k, v, lr, lg, lm = _inputs(9)
  kw = dict(log_retain=lg, log_momentum=lm, chunk_size=3)
  big = T.MemorySpec(loss="huber", huber_delta=1e3)
  np.testing.assert_allclose(_nm(q, k, v, lr, spec=big, **kw)[0],
                             _nm(q, k, v, lr, **kw)[0], atol=1e-6)
  spec = T.MemorySpec(loss="huber", huber_delta=0.5)
  grad = lambda e: jax.grad(lambda p: T.attentional_bias(spec, p, jnp.zeros(3)))(e)
  small = jnp.array([0.1, -0.2, 0.1])
  np.testing.assert_allclose(grad(small), 2 * small, rtol=1e-6)
  large = jnp.array([3.0, -4.0, 0.0])
  np.testing.assert_allclose(jnp.linalg.norm(grad(large)), 2 * 0.5, rtol=1e-5)


def test_memora_is_the_softmax_of_retained_log_weights():
  """KL retention: W_t = softmax(a_t log W_{t-1} - theta_t g_t) row-wise (literal rule, C = 1)."""
  spec = SPECS["memora_linear"]
  q, k, v, lr, lg, _ = _inputs(10, t=5)
  init = _init(spec)
  o, st = _nm(q, k, v, lr, log_retain=lg, spec=spec, init_memory=init, chunk_size=1,
                          output_final_state=True)
  loss = lambda w, kk, vv: jnp.sum((kk @ w - vv) ** 2)
  for b, h in ((0, 0), (1, 1)):
    w = jax.nn.softmax(init[0][h], axis=-1)
    for t in range(5):
      g = jax.grad(loss)(w, k[b, t, h], v[b, t, h])
      w = jax.nn.softmax(jnp.exp(lg[b, t, h]) * jnp.log(w) - lr[b, t, h] * g, axis=-1)
      np.testing.assert_allclose(o[b, t, h], q[b, t, h] @ w, atol=1e-5)
  w_final = T.read_transform(spec, tuple(x[1, 1] for x in st.memory))[0]
  np.testing.assert_allclose(jnp.sum(w_final, -1), 1.0, rtol=1e-6)
  assert float(jnp.min(w_final)) >= 0


def test_bad_inputs_raise():
  q, k, v, lr, lg, lm = _inputs(11)
  with pytest.raises(ValueError, match="lr"):
    T.neural_memory(q, k, v, -lr)
  with pytest.raises(ValueError, match="log_retain"):
    T.neural_memory(q, k, v, lr, log_retain=-lg + 1.0)
  with pytest.raises(ValueError, match="log_momentum"):
    T.neural_memory(q, k, v, lr, log_momentum=lm[:, :3])
  with pytest.raises(ValueError, match="chunk_size"):
    T.neural_memory(q, k, v, lr, chunk_size=0)
  with pytest.raises(ValueError, match="q, k"):
    T.neural_memory(q, k[:, :3], v, lr)
  with pytest.raises(ValueError, match="init_memory is required"):
    T.neural_memory(q, k, v, lr, spec=T.MemorySpec(memory="mlp"))
  with pytest.raises(ValueError, match="loss"):
    T.MemorySpec(loss="l3")
  _, st = T.neural_memory(q[:, :4], k[:, :4], v[:, :4], lr[:, :4], chunk_size=3, output_final_state=True)
  with pytest.raises(ValueError, match="pos must be 0"):
    T.neural_memory(q, k, v, lr, initial_state=st, chunk_size=3)
  bad = st._replace(memory=(st.memory[0].astype(jnp.bfloat16),))
  with pytest.raises(ValueError, match="float32"):
    T.neural_memory(q, k, v, lr, initial_state=bad, form="recurrent")
  with pytest.raises(ValueError, match=r"\[B, H"):
    T.neural_memory_step(q[:, 0], k[:, 0], v[:, 0], lr[:, 0], st._replace(momentum=(st.momentum[0][:, :1],)))


# ----------------------------------------------------------------------------------------------
# Layers.


@pytest.mark.parametrize("name,options", [pytest.param("titans_memory", dict(memory="mlp", chunk_size=3),
                                                       marks=pytest.mark.slow),
                                          ("titans_mag", dict(retention="kl", chunk_size=3, window=4))])
def test_layer_decoding_across_chunk_boundaries_equals_forward(name, options):
  m = build_mixer(name, d_model=16, num_heads=2, causal=True, rngs=nnx.Rngs(0), **options)
  x = jax.random.normal(jax.random.key(12), (1, 7, 16))
  full = m(x)
  m.init_cache(1, 8)
  outs = [m(x[:, :4], decode=True)] + [m(x[:, t:t + 1], decode=True) for t in range(4, 7)]
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-4, rtol=2e-3)


def test_mac_runs_by_segments_and_rejects_bad_options():
  m = build_mixer("titans_mac", d_model=16, num_heads=2, causal=True, rngs=nnx.Rngs(0), segment_len=4)
  x = jax.random.normal(jax.random.key(13), (1, 10, 16))
  fwd = nnx.jit(lambda m, x: m(x))
  y = fwd(m, x)
  assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()
  # Causal across and within segments: changing token 6 leaves 0..5 alone.
  np.testing.assert_allclose(fwd(m, x.at[:, 6:].set(0.0))[:, :6], y[:, :6], atol=1e-5)
  with pytest.raises(ValueError, match="init_cache"):
    m(x[:, :1], decode=True)
  with pytest.raises(ValueError, match="segment_len"):
    build_mixer("titans_mac", d_model=16, num_heads=2, causal=True, rngs=nnx.Rngs(0), segment_len=6,
                chunk_size=4)
  with pytest.raises(NotImplementedError):
    build_mixer("titans_mag", d_model=16, num_heads=2, causal=False, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown options"):
    build_mixer("titans_mal", d_model=16, num_heads=2, causal=True, rngs=nnx.Rngs(0), segment_len=4)


@pytest.mark.parametrize("options", [dict(segment_len=4),
                                     pytest.param(dict(segment_len=4, chunk_size=2, memory="mlp"),
                                                  marks=pytest.mark.slow)])
def test_mac_decoding_across_segment_boundaries_equals_forward(options):
  """Segments of 4: a prefill ending mid-segment (3), calls that cross a segment boundary and
  end mid-segment (3..5, 6..8), then single steps: every piece equals the full forward."""
  m = build_mixer("titans_mac", d_model=16, num_heads=2, causal=True, rngs=nnx.Rngs(0), **options)
  x = jax.random.normal(jax.random.key(14), (2, 11, 16))
  full = nnx.jit(lambda m, x: m(x))(m, x)
  step = nnx.jit(lambda m, x: m(x, decode=True))
  m.init_cache(2, 1024)
  # O(segment_len) state: [h-token | x-token] slots of one segment, whatever max_len.
  assert m.state.get_value()["k"].shape == (2, 8, 2, 8)
  outs, start = [], 0
  for n in (3, 3, 3, 1, 1):
    outs.append(step(m, x[:, start:start + n]))
    start += n
    assert int(m.state.get_value()["pos"]) == start % 4
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=2e-4)
