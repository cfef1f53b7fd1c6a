"""Every attention-operator function under the four CAB patterns (non-causal / causal x self / cross).

For each operator and pattern: either the pattern is defined, and then (a) neutral parameters give
`dot_product_attention` under the same pattern where the operator has such a point, and (b) at random
parameters a key hidden from some queries (bottom-right aligned causal) does not reach them while
visible keys do; or the pattern is undefined and the call raises `PatternUndefinedError` saying so.
Aaren has no query sequence (a learned query over the tokens it reads), so its cross patterns
cannot even be written as a call (its layer raises; `tests/test_all_mixers.py` checks every
layer's patterns); GAAM has neither queries nor keys (see `test_operator_mixers` for its layer).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import PatternUndefinedError
from attnjax.ops import dot_product_attention
from attnjax.ops import operators as ops
from attnjax.ops.operators._common import repeat_kv

B, H, HK, D, DV = 2, 4, 2, 5, 3
SELF_T, CROSS_TQ, CROSS_TK = 6, 5, 8          # odd and unequal on purpose
GRID = (2, 3)                                  # GPSA self-attention grid, T = 6


def _rnd(seed, *shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _sig(*shape):
  """Deterministic, shape-dependent, non-trivial parameters."""
  n = int(np.prod(shape))
  return jnp.sin(0.7 * jnp.arange(n, dtype=jnp.float32) + 0.3).reshape(shape)


def _sigmoid(q, k, v, causal):
  return ops.sigmoid_attention(q, k, v, causal=causal)


def _lssa(q, k, v, causal):
  return ops.lssa_attention(q, k, v, causal=causal)


def _lssar(q, k, v, causal):
  return ops.lssa_attention(q, k, v, causal=causal, reweight_power=2.0, reweight_threshold=0.5)


def _affine(q, k, v, causal, neutral=False):
  b, tq, h = q.shape[:3]
  alpha, beta = (jnp.ones((b, tq, h)), jnp.zeros((b, tq, h))) if neutral else \
      (1.0 + 0.5 * _sig(b, tq, h), 0.2 * _sig(b, tq, h) ** 2)
  return ops.affine_scaled_attention(q, k, v, alpha, beta, causal=causal)


def _gated(q, k, v, causal, neutral=False):
  g = jnp.full(q.shape[:3], 60.0) if neutral else _sig(*q.shape[:3])
  return ops.gated_attention(q, k, v, g, causal=causal)


def _gated_elementwise(q, k, v, causal, neutral=False):
  g = jnp.full((*q.shape[:3], v.shape[-1]), 60.0) if neutral else _sig(*q.shape[:3], v.shape[-1])
  return ops.gated_attention(q, k, v, g, causal=causal)


def _differential(q, k, v, causal, neutral=False):
  # 4 signal heads (GQA keys), 2 noise heads (GDA 2:1); v per signal head.
  return ops.differential_attention(q, k, 0.8 * q[:, :, ::2], k[:, :, ::-1], repeat_kv(v, H),
                                    0.0 if neutral else jnp.array([0.1, 0.3, 0.5, 0.7]),
                                    causal=causal)


def _moh(q, k, v, causal, neutral=False):
  gates = jnp.ones(q.shape[:3]) if neutral else jnp.abs(_sig(*q.shape[:3]))
  return ops.mixture_of_heads_attention(q, k, v, gates, causal=causal)


def _routed(q, k, v, causal, neutral=False):
  del neutral
  b, tq = q.shape[:2]
  idx = (jnp.arange(b * tq * 2).reshape(b, tq, 2) * 3) % H
  idx = jnp.where(idx[..., :1] == idx[..., 1:], (idx + 1) % H, idx)    # two distinct heads
  q_sel = jnp.take_along_axis(q, idx[..., None], axis=2)
  return ops.routed_heads_attention(q_sel, idx, repeat_kv(k, H), repeat_kv(v, H), causal=causal)


def _flashbias(q, k, v, causal, neutral=False):
  tq, tk = q.shape[1], k.shape[1]
  phi_q, phi_k = _sig(tq, H, 2), _sig(tk, H, 2)[::-1]
  if neutral:
    phi_q = jnp.zeros_like(phi_q)
  return ops.flashbias_attention(q, k, v, phi_q, phi_k, causal=causal)


def _dha(q, k, v, causal, neutral=False):
  ka, va = ((0, 0, 1, 1), (0, 0, 1, 1)) if neutral else ((0, 1, 1, 0), (1, 0, 0, 1))
  return ops.dha_attention(q, k, v, ka, va, causal=causal)


def _relative(q, k, v, causal, neutral=False):
  tk = k.shape[1]
  rel, u, w = 0.5 * _sig(2 * tk - 1, H, D), 0.3 * _sig(H, D), -0.3 * _sig(H, D)
  if neutral:
    rel, u, w = jnp.zeros_like(rel), jnp.zeros_like(u), jnp.zeros_like(w)
  return ops.relative_attention(q, k, v, rel, u, w, causal=causal)


def _moda(q, k, v, causal, neutral=False):
  b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
  mq = jnp.broadcast_to(jnp.arange(tq) % 2, (b, tq))
  mk = jnp.broadcast_to((jnp.arange(tk) // 3) % 2, (b, tk))
  if neutral:
    bias, basis = jnp.zeros((2, 2)), jnp.broadcast_to(jnp.eye(D), (2, D, D))
  else:
    bias, basis = jnp.array([[0.0, -0.5], [0.3, 0.0]]), jnp.eye(D) + 0.2 * _sig(2, D, D)
  return ops.moda_attention(q, k, v, mq, kv_modality_ids=mk, pair_bias=bias, basis=basis,
                            causal=causal)


def _reversed(q, k, v, causal):
  msg = jax.nn.sigmoid(_sig(q.shape[0], k.shape[1], H))
  return ops.reversed_attention(q, k, v, message=msg, causal=causal)


def _hierarchical(q, k, v, causal):
  groups = jnp.broadcast_to(jnp.arange(q.shape[1]) // 2, q.shape[:2])
  return ops.hierarchical_attention(q, k, v, groups, causal=causal)


def _gpsa(q, k, v, causal):
  return ops.gpsa_attention(q, repeat_kv(k, H), repeat_kv(v, H), ops.gpsa_local_init(H, 1.0),
                            _sig(H), grid=GRID, causal=causal)


# Jitted: the associative scan run op by op compiles every level's slices separately (~20 s).
_aaren_jit = jax.jit(ops.aaren_attention, static_argnames=("causal",))


def _aaren(q, k, v, causal):
  return _aaren_jit(q[:, 0], repeat_kv(k, H), repeat_kv(v, H), causal=causal)


# name -> (fn, has a neutral point equal to softmax attention, undefined patterns)
OPS = {
    "sigmoid": (_sigmoid, False, ()),
    "lssa": (_lssa, False, ()),
    "lssar": (_lssar, False, ()),
    "affine_scaled": (_affine, True, ()),
    "gated_headwise": (_gated, True, ()),
    "gated_elementwise": (_gated_elementwise, True, ()),
    "differential": (_differential, True, ()),
    "moh_dense": (_moh, True, ()),
    "moh_routed": (_routed, False, ()),
    "flashbias": (_flashbias, True, ()),
    "dha": (_dha, True, ()),
    "relative": (_relative, True, ()),
    "moda": (_moda, True, ()),
    "reversed": (_reversed, False, ("causal_self", "causal_cross")),
    "hierarchical": (_hierarchical, False, ("causal_self", "causal_cross", "cross")),
    "gpsa": (_gpsa, False, ("cross", "causal_cross")),
    "aaren": (_aaren, False, ()),                # cross: not expressible (no query sequence)
}
PATTERNS = {"self": (False, False), "causal_self": (True, False), "cross": (False, True),
            "causal_cross": (True, True)}


def _inputs(cross):
  tq, tk = (CROSS_TQ, CROSS_TK) if cross else (SELF_T, SELF_T)
  return _rnd(1, B, tq, H, D), _rnd(2, B, tk, HK, D), _rnd(3, B, tk, HK, DV)


@pytest.mark.parametrize("name,pattern", [(n, p) for n in sorted(OPS) for p in sorted(PATTERNS)
                                          if not (n == "aaren" and p.endswith("cross"))])
def test_operator_pattern(name, pattern):
  fn, has_neutral, undefined = OPS[name]
  causal, cross = PATTERNS[pattern]
  q, k, v = _inputs(cross)
  if pattern in undefined:
    with pytest.raises(PatternUndefinedError, match="undefined") as err:
      fn(q, k, v, causal)
    assert type(err.value) is PatternUndefinedError, err.value
    return
  out = fn(q, k, v, causal)
  assert out.shape[:2] == (B, q.shape[1]) and np.all(np.isfinite(out)), name
  if has_neutral:
    np.testing.assert_allclose(fn(q, k, v, causal, neutral=True),
                               dot_product_attention(q, k, v, causal=causal), atol=2e-5,
                               err_msg=name)
  # Perturb key/value j: with bottom-right aligned causality, query i sees j iff j <= i + Tk - Tq.
  tq, tk = q.shape[1], k.shape[1]
  j = tk - 2
  k2, v2 = k.at[:, j].add(2.0), v.at[:, j].add(2.0)
  out2 = fn(q, k2, v2, causal)
  sees = np.arange(tq) + tk - tq >= j if causal else np.ones(tq, bool)
  diff = np.abs(np.asarray(out2 - out)).reshape(B, tq, -1).max(axis=(0, 2))
  assert np.all(diff[~sees] < 1e-6), (name, pattern, diff)
  assert np.all(diff[sees] > 1e-4), (name, pattern, diff)
