"""Multi-device checks behind `test_context_parallel.py`, run in a subprocess with 8 CPU devices.

`run(groups)` returns a dict of max abs errors (and a few facts) per case; every compiled function
computes its output and gradients at once (`jax.vjp`), so each case costs one compile per side.
Sequence lengths are shards x odd (T = 52 = 4 * 13), so no shard is a multiple of a chunk size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from attnjax.distributed import context_parallel as cp
from attnjax.distributed import sharding as sh
from attnjax.ops.linear.engine import linear_attention
from attnjax.ops.softmax import dot_product_attention

# name: (mesh config, causal, Hq, Hk, with sinks)
RING_CASES = {
    "s2_full_mha": ({"data": 2, "tensor": 2, "sequence": 2}, False, 4, 4, False),
    "s2_causal_gqa": ({"data": 2, "tensor": 2, "sequence": 2}, True, 4, 2, False),
    "s4_full_gqa": ({"tensor": 2, "sequence": 4}, False, 4, 2, False),
    "s4_causal_mha": ({"data": 2, "sequence": 4}, True, 4, 4, False),
    "s4_causal_gqa_sinks": ({"tensor": 2, "sequence": 4}, True, 4, 2, True),
}
# name: (mesh config, log-decay kind, normalize, causal, with initial state)
LIN_CASES = {
    "none_s4": ({"data": 2, "sequence": 4}, None, False, True, False),
    "scalar_s2_init": ({"data": 2, "tensor": 2, "sequence": 2}, "scalar", False, True, True),
    "scalar_s4": ({"tensor": 2, "sequence": 4}, "scalar", False, True, False),
    "head_s4": ({"data": 2, "sequence": 4}, "head", False, True, False),
    "vector_s4": ({"tensor": 2, "sequence": 4}, "vector", False, True, False),
    "vector_s2_norm_init": ({"data": 2, "tensor": 2, "sequence": 2}, "vector", True, True, True),
    "noncausal_s4_norm": ({"data": 2, "sequence": 4}, None, True, False, False),
}


# Host-side work is numpy: every eager jnp op on a new shape would cost a small compile.
def _err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _tree_err(a, b) -> float:
  return max((_err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), default=0.0)


def _absmax(x) -> float:
  return float(np.max(np.abs(np.asarray(x, np.float32))))


def _softplus(x):
  return np.logaddexp(0.0, x).astype(np.float32)


class _Rand:
  def __init__(self, seed: int):
    self._rng = np.random.default_rng(seed)

  def __call__(self, *shape):
    return self._rng.standard_normal(shape, dtype=np.float32)


def _out_and_grads(fn, nargs: int):
  """jit of `(ct, *args) -> (fn(*args), grads of <fn(*args), ct> w.r.t. args[:nargs])`."""
  def run(ct, *args):
    out, vjp = jax.vjp(lambda *a: fn(*a, *args[nargs:]), *args[:nargs])
    return out, vjp(jax.tree.map(lambda c, o: c.astype(o.dtype), ct, out))
  return jax.jit(run)


def ring_case(name: str, rnd: _Rand, wrong: bool) -> dict:
  mcfg, causal, hq, hk, use_sinks = RING_CASES[name]
  b, t, d = 2, 52, 8
  mesh = sh.make_mesh(mcfg)
  q, k, v = rnd(b, t, hq, d), rnd(b, t, hk, d), rnd(b, t, hk, d)
  sinks = rnd(hq) if use_sinks else None
  ct = rnd(b, t, hq, d)
  ref = _out_and_grads(lambda q, k, v, s: dot_product_attention(q, k, v, causal=causal, sinks=s), 3)
  ring = _out_and_grads(
      lambda q, k, v, s: cp.ring_attention(q, k, v, mesh=mesh, causal=causal, sinks=s), 3)
  (o_ref, g_ref), (o_cp, g_cp) = ref(ct, q, k, v, sinks), ring(ct, q, k, v, sinks)
  out = {"o": _err(o_cp, o_ref), "dq": _err(g_cp[0], g_ref[0]), "dk": _err(g_cp[1], g_ref[1]),
         "dv": _err(g_cp[2], g_ref[2]), "o_norm": _absmax(o_ref), "dk_norm": _absmax(g_ref[1]),
         "out_spec": str(o_cp.sharding.spec), "local_only": None}
  if wrong:
    # A deliberately wrong scheme: every shard attends to its own block only (no ring).
    local = jax.jit(jax.shard_map(lambda q, k, v: dot_product_attention(q, k, v, causal=causal),
                                  mesh=mesh, in_specs=P(None, "sequence"), out_specs=P(None, "sequence")))
    out["local_only"] = _err(local(q, k, v), o_ref)
  return out


def ring_bf16(rnd: _Rand) -> dict:
  """bf16 inputs against the float32 single-device result on the same (rounded) inputs."""
  mesh = sh.make_mesh({"data": 2, "sequence": 4})
  q, k, v = (rnd(2, 52, 4, 8).astype(jnp.bfloat16) for _ in range(3))   # numpy (ml_dtypes) cast
  f32 = lambda x: x.astype(jnp.float32)
  o_ref = jax.jit(lambda q, k, v: dot_product_attention(f32(q), f32(k), f32(v), causal=True))(q, k, v)
  o_one = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, causal=True))(q, k, v)
  o_cp = jax.jit(lambda q, k, v: cp.ring_attention(q, k, v, mesh=mesh, causal=True))(q, k, v)
  return {"o": _err(o_cp, o_ref), "single_device": _err(o_one, o_ref), "dtype": str(o_cp.dtype)}


def linear_case(name: str, rnd: _Rand, wrong: bool) -> dict:
  mcfg, kind, norm, causal, use_init = LIN_CASES[name]
  b, t, h, dk, dv = 2, 52, 4, 8, 6
  mesh = sh.make_mesh(mcfg)
  q, k, v = rnd(b, t, h, dk), rnd(b, t, h, dk), rnd(b, t, h, dv)
  if norm:  # positive features keep the normaliser's denominator away from zero
    q, k = _softplus(q), _softplus(k)
  gshape = {None: None, "head": (h,), "scalar": (b, t, h), "vector": (b, t, h, dk)}[kind]
  g = None if gshape is None else -0.5 * _softplus(rnd(*gshape))
  s0 = None
  if use_init:
    s0 = (rnd(b, h, dk, dv), _softplus(rnd(b, h, dk))) if norm else rnd(b, h, dk, dv)
  kw = dict(normalize=norm, causal=causal, output_final_state=True)
  # The single-device reference uses the quadratic form (cheapest to compile; all forms agree).
  ref_fn = lambda q, k, v, g, s0: linear_attention(q, k, v, log_decay=g, initial_state=s0,
                                                   form="parallel", **kw)
  shapes = jax.eval_shape(ref_fn, q, k, v, g, s0)
  ct = jax.tree.map(lambda x: rnd(*x.shape), shapes)
  ref = _out_and_grads(ref_fn, 5)
  cpf = _out_and_grads(lambda q, k, v, g, s0: cp.context_parallel_linear_attention(
      q, k, v, mesh=mesh, log_decay=g, initial_state=s0, chunk_size=8, **kw), 5)
  (o_ref, g_ref), (o_cp, g_cp) = ref(ct, q, k, v, g, s0), cpf(ct, q, k, v, g, s0)
  out = {"o": _err(o_cp[0], o_ref[0]), "state": _tree_err(o_cp[1], o_ref[1]),
         "dq": _err(g_cp[0], g_ref[0]), "dk": _err(g_cp[1], g_ref[1]), "dv": _err(g_cp[2], g_ref[2]),
         "dg": _tree_err(g_cp[3], g_ref[3]), "ds0": _tree_err(g_cp[4], g_ref[4]),
         "o_norm": _absmax(o_ref[0]), "dk_norm": _absmax(g_ref[1]),
         "state_spec": str(jax.tree.leaves(o_cp[1])[0].sharding.spec), "local_only": None}
  if wrong and s0 is None:
    # A deliberately wrong scheme: every shard starts from a zero state (no state passing).
    g_spec = P() if gshape is None or len(gshape) == 1 else P(None, "sequence")
    local = jax.jit(jax.shard_map(
        lambda q, k, v, g: linear_attention(q, k, v, log_decay=g, normalize=norm, causal=causal)[0],
        mesh=mesh, in_specs=(P(None, "sequence"),) * 3 + (g_spec,), out_specs=P(None, "sequence"),
        check_vma=False))   # the engine's scans start from an unvarying zero state
    out["local_only"] = _err(local(q, k, v, g), o_ref[0])
  return out


def shard_heads_checks(rnd: _Rand) -> dict:
  mesh = sh.make_mesh({"data": 2, "tensor": 4})
  bspec = ("data", "fsdp")
  q, k, v = rnd(4, 21, 8, 8), rnd(4, 21, 4, 8), rnd(4, 21, 4, 8)
  attn = cp.shard_heads(dot_product_attention, mesh)
  with_lse = cp.shard_heads(dot_product_attention, mesh,
                            out_specs=(P(bspec, None, "tensor", None), P(bspec, "tensor", None)))
  ref = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, causal=True, return_lse=True))
  o_ref, lse_ref = ref(q, k, v)
  o_sh, lse_sh = jax.jit(lambda q, k, v: with_lse(q, k, v, causal=True, return_lse=True))(q, k, v)
  o_plain = jax.jit(lambda q, k, v: attn(q, k, v, causal=True))(q, k, v)
  lin = cp.shard_heads(linear_attention, mesh,
                       out_specs=(P(bspec, None, "tensor", None), P(bspec, "tensor", None, None)))
  ql, kl, vl = rnd(4, 21, 4, 8), rnd(4, 21, 4, 8), rnd(4, 21, 4, 8)
  lo_ref, ls_ref = jax.jit(lambda q, k, v: linear_attention(q, k, v, output_final_state=True))(ql, kl, vl)
  lo_sh, ls_sh = jax.jit(lambda q, k, v: lin(q, k, v, output_final_state=True))(ql, kl, vl)
  errors = {}
  bad = {"hq": (rnd(4, 21, 6, 8), k, v), "hk": (q, rnd(4, 21, 2, 8), rnd(4, 21, 2, 8)),
         "batch": (rnd(3, 21, 8, 8), rnd(3, 21, 4, 8), rnd(3, 21, 4, 8))}
  for label, args in bad.items():
    try:
      attn(*args)
      errors[label] = ""
    except ValueError as e:
      errors[label] = str(e)
  try:
    cp.ring_attention(*(rnd(2, 50, 4, 8) for _ in range(3)), mesh=sh.make_mesh({"sequence": 8}))
    errors["ring_t"] = ""
  except ValueError as e:
    errors["ring_t"] = str(e)
  return {"o": _err(o_sh, o_ref), "o_plain": _err(o_plain, o_ref), "lse": _err(lse_sh, lse_ref),
          "lin_o": _err(lo_sh, lo_ref), "lin_state": _err(ls_sh, ls_ref),
          "out_spec": str(o_sh.sharding.spec), "o_norm": _absmax(o_ref), "errors": errors}


def run(ring: list[str], linear: list[str], extras: bool) -> dict:
  """Runs the named cases; `extras` adds the wrong-scheme controls, bf16 and shard_heads checks."""
  assert jax.device_count() == 8, jax.devices()
  rnd = _Rand(0)
  res = {"ring": {n: ring_case(n, rnd, extras) for n in ring},
         "linear": {n: linear_case(n, rnd, extras) for n in linear}}
  if extras:
    res["bf16"] = ring_bf16(rnd)
    res["shard_heads"] = shard_heads_checks(rnd)
  return res
