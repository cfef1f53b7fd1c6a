"""The linear-attention engine: one decayed outer-product recurrence, three equivalent forms.

`S_t = exp(g_t) (.) S_{t-1} + k_t^T v_t`, `o_t = scale * q_t S_t` on `[B, T, H, D]` arrays, with the
decay kind chosen by the shape of the log-space gate `g` (none, fixed per head, data-dependent per
head and step, data-dependent per key dimension). The forms:

* `recurrent`: a `lax.scan` over time (the oracle, and the decode step's semantics);
* `parallel`: the quadratic masked form `o = (Q K^T (.) D) V`, with `D_ij = exp(sum_{j<l<=i} g_l)`;
* `chunked`: intra-chunk quadratic plus inter-chunk states carried by a scan over chunks; memory
  is O(T * chunk) for the scores plus O(T / chunk * Dk * Dv) for the chunk states, never [T, T].

Numerics. Every decay factor is `exp` of a sum of gates (all <= 0) over a *segment* of positions,
computed directly as that segment's sum (a masked cumulative sum, "segsum"), never as a difference
of two long prefix sums. So a gate logit of -1e4 gives exact zeros (no `exp` of a positive number,
no `inf - inf`), and positions after a very negative gate lose no precision. For the per-key-dim
gate (GLA) the intra-chunk scores use GLA's secondary chunking: off-diagonal sub-blocks factor as
`(q (.) exp(g_fwd)) (k (.) exp(g_back))^T` with both exponents <= 0, diagonal sub-blocks are
computed element-wise.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from attnjax.cab import PatternUndefinedError
from attnjax.ops import dispatch

#: Added to the denominator `scale * q_t . z_t` when `normalize=True` (fla's value; all-zero
#: features give `0 / eps = 0`, never NaN).
NORMALIZE_EPS = 1e-10
FORMS = ("recurrent", "parallel", "chunked")
#: Sub-chunk length of the secondary chunking used for per-key-dimension gates (as in GLA).
SUB_CHUNK = 16


def _concrete_range(x):
  """(min, max) of `x` as floats, or None when `x` is traced (checks then happen only eagerly)."""
  try:
    return float(jnp.min(x)), float(jnp.max(x))
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


# ----------------------------------------------------------------------------------------------
# Which form a call runs (`form=None`).


@dataclasses.dataclass(frozen=True)
class FormChoice:
  """The forms a `form=None` call runs: `primal` when the call is not differentiated, and
  `differentiated` under `jax.grad` / `jax.vjp` (forward and backward both run it), with chunks of
  `chunk_size` where the caller leaves it to the table (None: 64)."""
  primal: str
  differentiated: str
  chunk_size: int | None = None


#: Per backend and decay kind, rows `(max_T, primal, differentiated[, chunk_size])`; the first row with
#: T <= max_T (None: any T) applies, and backends not listed run the chunked form in both passes.
#: CPU, measured (benchmarks/linear_vs_scan_cpu.md, `python -m experiments.bench_linear_vs_scan`,
#: B=1, H=4, D=64, T = 64 ... 32K, every kind): the token scan is the fastest forward from T=256 up
#: (the chunked form does about twice its FLOPs: 4 C D + 4 D^2 per token and head against 3 D^2,
#: in small matmuls), while its backward keeps a [Dk, Dv] state per token and is 3-8x slower than
#: the chunked form's (GLA's per-key gate, in chunks of 16: 1.3-1.5x); at T=64 all forms are within
#: 0.3 ms. GPU:
#: not measured against the scan here, so the chunked form stays.
#: "pallas" in a row means the Pallas kernel (`pallas_kernels.linear`: `chunked_linear_attention`,
#: `chunked_delta_rule`) in both passes; a call it cannot serve runs the chunked form instead. On a
#: CUDA GPU every kind goes to the kernel. Not measured there against the chunked XLA form: on an
#: H200 (benchmarks/gpu_h200_2026-11-27, T=4K, bf16) the kernel's forward is on par with fla's
#: without decay and with a scalar gate, while its per-key-dim (GLA) path is 20x slower than its
#: scalar one, so the "vector" row is the first to re-check with `bench_linear_vs_scan` on a GPU.
FORM_TABLE = {
    "cpu": {kind: ((None, "recurrent", "chunked"),) for kind in ("none", "head", "scalar", "delta")}
           # GLA's per-key gate: its sub-chunk exponentials dominate; chunks of 16 (one sub-chunk)
           # ran its forward+backward 1.2-1.3x faster than 64 at T = 256 ... 32K.
           | {"vector": ((None, "recurrent", "chunked", 16),)},
    "gpu": {kind: ((None, "pallas", "pallas"),)
            for kind in ("none", "head", "scalar", "vector", "delta")},
}
#: The value `form` / `FORM_TABLE` use for the Pallas kernel.
PALLAS = "pallas"


def select_form(t: int, decay: str = "none", *, backend: str | None = None) -> FormChoice:
  """The forms `linear_attention(..., form=None)` runs for a causal call of length `t`.

  `decay`: "none", "head", "scalar" or "vector" (see `decay_kind`), or "delta" for
  `delta.delta_rule`; `backend`: a JAX platform name
  ("cpu", "gpu", ...), default `jax.default_backend()`. On the CPU a token scan beats the chunked
  form's matmuls for the forward pass, while its backward (which keeps every step's state) loses
  to the chunked form's, so the two passes run different forms there (`FORM_TABLE`).
  """
  backend = dispatch.resolve_backend(backend)
  for max_t, primal, differentiated, *chunk in FORM_TABLE.get(backend, {}).get(decay, ()):
    if max_t is None or t <= max_t:
      return FormChoice(primal, differentiated, *chunk)
  return FormChoice("chunked", "chunked")


@dataclasses.dataclass(frozen=True)
class LinearCall:
  """Static description of one `linear_attention` / `delta_rule` call, used to choose a path."""
  t: int
  tk: int
  decay: str = "none"
  causal: bool = True
  dtype: str = "float32"
  chunk_size: int | None = None


def pallas_unsupported_reason(call: LinearCall) -> str | None:
  """Why the Pallas linear kernels cannot serve `call` (None if they can)."""
  if call.tk != call.t:
    return f"the kernels take keys of the queries' length (Tk={call.tk} != T={call.t})"
  if call.dtype not in dispatch.PALLAS_DTYPES:
    return f"the kernels take q, k, v of one dtype among {dispatch.PALLAS_DTYPES}, got {call.dtype}"
  if call.decay == "invalid":
    return "log_decay has no valid shape"
  c = call.chunk_size
  if c is not None and (c < 16 or not dispatch.is_power_of_two(c)):
    return f"the kernels need chunk_size a power of two >= 16, got {c}"
  return None


def choose_implementation(implementation: str | None, call: LinearCall, form: str | None = None,
                          backend: str | None = None, forms=FORMS) -> tuple[str, FormChoice, str]:
  """`(implementation, forms, reason)` of a linear-attention call on `backend` (pure).

  "reference": the oracle form (the token scan when causal, the quadratic form otherwise);
  "xla": the engine's forms (`form`, or `select_form`'s table row when None); "pallas": the Pallas
  kernel (`form` must be None or "chunked"); None: the table row for `backend` (`FORM_TABLE`; a
  "pallas" row on a CUDA GPU runs the kernel when it serves the call, else the chunked form).
  An explicit choice that cannot serve the call raises ValueError saying why.
  """
  dispatch.check_implementation(implementation, op="linear attention")
  if form is not None and form not in forms:
    raise ValueError(f"form must be None or one of {forms}, got {form!r}")
  backend = dispatch.resolve_backend(backend)
  reason = pallas_unsupported_reason(call)
  if implementation == "reference":
    oracle = "recurrent" if call.causal else "parallel"
    if form not in (None, oracle):
      raise ValueError(f"implementation='reference' runs the {oracle!r} form, got form={form!r}")
    return "reference", FormChoice(oracle, oracle), "explicit choice"
  if implementation == "pallas":
    if reason is not None:
      raise ValueError(f"implementation='pallas' cannot serve this call: {reason}")
    if form not in (None, "chunked"):
      raise ValueError(f"implementation='pallas' is the chunked kernel; got form={form!r}")
    return "pallas", FormChoice(PALLAS, PALLAS), "explicit choice"
  if form is not None:
    return "xla", FormChoice(form, form), "explicit form"
  choice = select_form(call.t, call.decay if call.decay != "invalid" else "none", backend=backend)
  if not call.causal and choice.primal != PALLAS:
    return "xla", FormChoice("chunked", "chunked"), "non-causal: one state per segment"
  if choice.primal == PALLAS:
    if implementation is None and reason is None:
      return "pallas", choice, f"FORM_TABLE[{backend!r}]: the Pallas kernel"
    why = reason if implementation is None else "implementation='xla'"
    return "xla", FormChoice("chunked", "chunked", choice.chunk_size), f"chunked form ({why})"
  return "xla", choice, f"FORM_TABLE[{backend!r}]"


# ----------------------------------------------------------------------------------------------
# Validation and canonicalisation.


def check_causal_qkv(q, k, v, segment_ids, chunk_size) -> tuple[int, int, int, int, int]:
  """Validates `q, k [B, T, H, Dk]`, `v [B, T, H, Dv]`, `segment_ids [B, T]`, `chunk_size >= 1` of
  the recurrent ops whose keys and queries share T (delta rule, Titans); returns `(B, T, H, Dk, Dv)`."""
  if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"q, k must be [B, T, H, Dk] and v [B, T, H, Dv]; got {q.shape}, {k.shape}, {v.shape}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
  b, t, h, dk = q.shape
  if segment_ids is not None and tuple(segment_ids.shape) != (b, t):
    raise ValueError(f"segment_ids must be [B, T]={[b, t]}, got {list(segment_ids.shape)}")
  return b, t, h, dk, v.shape[-1]


def _check_gate(name: str, g, expected: str):
  rng = _concrete_range(g) if g.size else None
  if rng is not None:
    gmax = rng[1]
    if math.isnan(gmax) or gmax > 0:
      raise ValueError(f"{name} must be a log-space gate <= 0 (expected {expected}); got max {gmax}")


def _canonical_decay(log_decay, b: int, t: int, h: int, dk: int):
  """Returns (g [B, T, H, Dg] float32, vector: bool) with Dg in {1, Dk}; g is None for no decay
  (the forms then skip every decay factor rather than multiply by exp(0))."""
  if log_decay is None:
    return None, False
  g = jnp.asarray(log_decay)
  shapes = {1: (h,), 3: (b, t, h), 4: (b, t, h, dk)}
  if g.ndim not in shapes or g.shape != shapes[g.ndim]:
    raise ValueError(f"log_decay must have shape [H]={[h]}, [B, T, H]={[b, t, h]} or "
                     f"[B, T, H, Dk]={[b, t, h, dk]}; got {list(g.shape)}")
  _check_gate("log_decay", g, "[H], [B, T, H] or [B, T, H, Dk]")
  g = g.astype(jnp.float32)
  if g.ndim == 1:
    return jnp.broadcast_to(g[None, None, :, None], (b, t, h, 1)), False
  if g.ndim == 3:
    return g[..., None], False
  return g, True


def decay_kind(log_decay) -> str:
  """The decay kind of a `log_decay` argument: "none", "head" ([H]), "scalar" ([B, T, H]) or
  "vector" ([B, T, H, Dk])."""
  if log_decay is None:
    return "none"
  return {1: "head", 3: "scalar", 4: "vector"}.get(jnp.ndim(log_decay), "invalid")


def _check_state(initial_state, b, h, dk, dv, normalize):
  if initial_state is None:
    return None, None
  if normalize:
    if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
      raise ValueError("initial_state must be a tuple (S [B, H, Dk, Dv], z [B, H, Dk]) when "
                       "normalize=True")
    s0, z0 = initial_state
  else:
    if isinstance(initial_state, (tuple, list)):
      raise ValueError("initial_state must be one array S [B, H, Dk, Dv] when normalize=False")
    s0, z0 = initial_state, None
  if tuple(s0.shape) != (b, h, dk, dv):
    raise ValueError(f"initial_state S must have shape [B, H, Dk, Dv]={[b, h, dk, dv]}, "
                     f"got {list(s0.shape)}")
  if s0.dtype != jnp.float32:
    raise ValueError(f"initial_state S must be float32, got {s0.dtype}")
  if z0 is not None:
    if tuple(z0.shape) != (b, h, dk):
      raise ValueError(f"initial_state z must have shape [B, H, Dk]={[b, h, dk]}, got {list(z0.shape)}")
    if z0.dtype != jnp.float32:
      raise ValueError(f"initial_state z must be float32, got {z0.dtype}")
  return s0, z0


def run_ids(segment_ids: jax.Array) -> jax.Array:
  """`[B, T]` segment ids -> monotone run index (a new run wherever the id changes), from 0."""
  starts = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], dtype=bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return jnp.cumsum(starts, axis=1, dtype=jnp.int32)


# ----------------------------------------------------------------------------------------------
# Segment sums of log gates.


def segsum(g: jax.Array) -> jax.Array:
  """`g [..., T, Dg]` -> `L [..., T, T, Dg]`, `L_ij = sum_{j<l<=i} g_l` (i >= j), -inf above."""
  t = g.shape[-2]
  strict = jnp.tril(jnp.ones((t, t), bool), -1)[..., None]
  x = jnp.where(strict, g[..., :, None, :], 0.0)
  lsum = jnp.cumsum(x, axis=-3)
  return jnp.where(jnp.tril(jnp.ones((t, t), bool))[..., None], lsum, -jnp.inf)


def _reverse_exclusive_cumsum(g: jax.Array, axis: int) -> jax.Array:
  """`out_j = sum_{l > j} g_l` along `axis`, summed directly (no cancellation)."""
  rev = jnp.flip(jnp.cumsum(jnp.flip(g, axis), axis=axis), axis)
  rev = jnp.moveaxis(rev, axis, -1)
  rev = jnp.concatenate([rev[..., 1:], jnp.zeros_like(rev[..., :1])], axis=-1)
  return jnp.moveaxis(rev, -1, axis)


def _scores(q, k, g, vector: bool, sub: int | None):
  """`A_ij = sum_d q_id k_jd exp(L_ijd)` for i >= j (0 above), `q, k: [..., C, Dk]`, `g [..., C, Dg]`.

  Scalar gates: one [C, C] decay matrix. Vector gates: element-wise over [C, C, Dk] when `sub` is
  None, else secondary chunking with sub-chunks of `sub` (which must divide C).
  """
  if not vector:
    dec = jnp.exp(segsum(g)[..., 0])
    return jnp.einsum("...id,...jd->...ij", q, k) * dec
  c_len = q.shape[-2]
  if sub is None or sub >= c_len:
    return jnp.einsum("...id,...jd,...ijd->...ij", q, k, jnp.exp(segsum(g)))
  ns = c_len // sub
  lead = q.shape[:-2]
  dk = q.shape[-1]
  qs = q.reshape(*lead, ns, sub, dk)
  ks = k.reshape(*lead, ns, sub, dk)
  gs = g.reshape(*lead, ns, sub, dk)
  # Diagonal sub-blocks, element-wise.
  diag = jnp.einsum("...sad,...sbd,...sabd->...sab", qs, ks, jnp.exp(segsum(gs)))
  # Off-diagonal: query sub-chunk s, key sub-chunk u < s.
  fwd = jnp.cumsum(gs, axis=-2)                      # sum from sub-chunk start to a (inclusive)
  back = _reverse_exclusive_cumsum(gs, axis=-2)      # sum from b+1 to sub-chunk end
  tot = jnp.sum(gs, axis=-2)                         # [..., ns, Dk]
  # between[s, u] = sum of totals of sub-chunks strictly between u and s.
  sidx = jnp.arange(ns)
  between_mask = ((sidx[None, :, None] > sidx[None, None, :]) &
                  (sidx[None, :, None] < sidx[:, None, None]))  # [s, m, u]: u < m < s
  between = jnp.einsum("smu,...md->...sud", between_mask.astype(g.dtype), tot)
  lower = (sidx[:, None] > sidx[None, :])[:, :, None, None]  # [s, u, 1, 1]
  expo = jnp.where(lower, between[..., :, :, None, :] + back[..., None, :, :, :], -jnp.inf)
  k_dec = ks[..., None, :, :, :] * jnp.exp(expo)     # [..., s, u, b, Dk]
  q_dec = qs * jnp.exp(fwd)                          # [..., s, a, Dk]
  off = jnp.einsum("...sad,...subd->...saub", q_dec, k_dec)
  eye = jnp.eye(ns, dtype=bool)[:, None, :, None]
  full = jnp.where(eye, diag[..., :, :, None, :], off)  # diag broadcast over u, kept where s == u
  return full.reshape(*lead, c_len, c_len)


# ----------------------------------------------------------------------------------------------
# The causal cores on [B, T, H, D] float32 (gates g [B, T, H, Dg], runs [B, T] or None).
# Each returns (o_unscaled [B, T, H, Dv], S_final [B, H, Dk, Dv]).


def _same_run_mask(runs, t):
  if runs is None:
    return jnp.ones((1, 1, t, t), bool)
  return (runs[:, :, None] == runs[:, None, :])[:, None]


def _causal_recurrent(q, k, v, g, vector, s0, runs):
  del vector  # a [Dk] or [1] gate broadcasts the same way over the state's key axis
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  s = jnp.zeros((b, h, dk, dv), jnp.float32) if s0 is None else s0
  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  if g is None:
    g = jnp.zeros((b, t, h, 1), jnp.float32)
  xs = (time_major(q), time_major(k), time_major(v), time_major(g))

  if runs is None:
    # No segments: the plain recurrence, without a reset select in every step.
    def step(s, x):
      qt, kt, vt, gt = x
      s = jnp.exp(gt)[..., :, None] * s + kt[..., :, None] * vt[..., None, :]
      return s, jnp.einsum("bhd,bhde->bhe", qt, s)
  else:
    prev = jnp.concatenate([runs[:, :1], runs[:, :-1]], axis=1)
    xs = xs + (jnp.transpose(runs != prev),)

    def step(s, x):
      qt, kt, vt, gt, rt = x
      decayed = jnp.where(rt[:, None, None, None], 0.0, jnp.exp(gt)[..., :, None] * s)
      s = decayed + kt[..., :, None] * vt[..., None, :]
      return s, jnp.einsum("bhd,bhde->bhe", qt, s)

  s, o = jax.lax.scan(step, s, xs)
  return time_major(o), s


def _to_bhtd(x):
  return jnp.transpose(x, (0, 2, 1, 3))


def _causal_parallel(q, k, v, g, vector, s0, runs):
  if g is None:
    g = jnp.zeros((*q.shape[:3], 1), jnp.float32)
  q, k, v, g = _to_bhtd(q), _to_bhtd(k), _to_bhtd(v), _to_bhtd(g)
  b, h, t, dk = q.shape
  a = _scores(q, k, g, vector, None)
  a = jnp.where(_same_run_mask(runs, t), a, 0.0)
  o = jnp.einsum("bhij,bhje->bhie", a, v)
  first = jnp.ones((b, 1, t), bool) if runs is None else (runs == runs[:, :1])[:, None]
  last = jnp.ones((b, 1, t), bool) if runs is None else (runs == runs[:, -1:])[:, None]
  back = _reverse_exclusive_cumsum(g, axis=2)
  k_dec = jnp.where(last[..., None], k * jnp.exp(back), 0.0)
  s = jnp.einsum("bhjd,bhje->bhde", k_dec, v)
  if s0 is not None:
    q_dec = jnp.where(first[..., None], q * jnp.exp(jnp.cumsum(g, axis=2)), 0.0)
    o = o + jnp.einsum("bhid,bhde->bhie", q_dec, s0)
    all_first = jnp.ones((b,), bool) if runs is None else runs[:, -1] == runs[:, 0]
    total = jnp.exp(jnp.sum(g, axis=2))[..., :, None]
    s = s + jnp.where(all_first[:, None, None, None], total * s0, 0.0)
  return _to_bhtd(o), s


def _causal_chunked(q, k, v, g, vector, s0, runs, chunk_size):
  decayed = g is not None
  q, k, v = _to_bhtd(q), _to_bhtd(k), _to_bhtd(v)
  g = _to_bhtd(g) if decayed else jnp.zeros((*q.shape[:3], 1), jnp.float32)
  b, h, t, dk = q.shape
  dv = v.shape[-1]
  c = int(chunk_size)
  n = -(-t // c)
  pad = n * c - t
  if pad:
    # Padded steps have k = v = 0 and g = 0 and share the last run id: they leave the state alone.
    padt = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))
    q, k, v, g = padt(q), padt(k), padt(v), padt(g)
    if runs is not None:
      runs = jnp.pad(runs, ((0, 0), (0, pad)), mode="edge")
  chunk = lambda x: x.reshape(b, h, n, c, x.shape[-1])
  qc, kc, vc, gc = chunk(q), chunk(k), chunk(v), chunk(g)
  sub = None
  if vector:
    sub = max(d for d in range(1, min(SUB_CHUNK, c) + 1) if c % d == 0)
  if decayed:
    a = _scores(qc, kc, gc, vector, sub)                     # [b, h, n, c, c]
  else:
    a = jnp.where(jnp.tril(jnp.ones((c, c), bool)), jnp.einsum("bhnid,bhnjd->bhnij", qc, kc), 0.0)
  if runs is not None:
    rc = runs.reshape(b, n, c)
    a = jnp.where((rc[:, :, :, None] == rc[:, :, None, :])[:, None], a, 0.0)
    r_prev = jnp.concatenate([runs[:, :1], rc[:, :-1, -1]], axis=1)   # run before each chunk
    r_last = rc[:, :, -1]
    in_mask = (rc == r_prev[:, :, None])[:, None, :, :, None]         # query sees carried state
    out_mask = (rc == r_last[:, :, None])[:, None, :, :, None]        # key reaches next state
    carry = (r_last == r_prev)[:, None, :, None, None]                # state survives the chunk
  else:
    in_mask = out_mask = True
    carry = jnp.ones((1, 1, n, 1, 1), bool)
  o = jnp.einsum("bhnij,bhnje->bhnie", a, vc)
  k_dec = kc * jnp.exp(_reverse_exclusive_cumsum(gc, axis=3)) if decayed else kc
  k_dec = jnp.where(out_mask, k_dec, 0.0)
  ds = jnp.einsum("bhnjd,bhnje->bhnde", k_dec, vc)            # [b, h, n, dk, dv]
  total = jnp.exp(jnp.sum(gc, axis=3))[..., :, None] if decayed else 1.0   # [b, h, n, Dg, 1]
  keep = jnp.where(carry, total, 0.0)
  s_init = jnp.zeros((b, h, dk, dv), jnp.float32) if s0 is None else s0

  def step(s, x):
    keep_n, ds_n = x
    return keep_n * s + ds_n, s

  s_fin, s_in = jax.lax.scan(step, s_init, (jnp.moveaxis(keep, 2, 0), jnp.moveaxis(ds, 2, 0)))
  s_in = jnp.moveaxis(s_in, 0, 2)                              # state entering each chunk
  q_dec = jnp.where(in_mask, qc * jnp.exp(jnp.cumsum(gc, axis=3)) if decayed else qc, 0.0)
  o = o + jnp.einsum("bhnid,bhnde->bhnie", q_dec, s_in)
  o = o.reshape(b, h, n * c, dv)[:, :, :t]
  return _to_bhtd(o), s_fin


def _core(q, k, v, g, vector, s0, runs, form, chunk_size):
  if form == "recurrent":
    return _causal_recurrent(q, k, v, g, vector, s0, runs)
  if form == "parallel":
    return _causal_parallel(q, k, v, g, vector, s0, runs)
  return _causal_chunked(q, k, v, g, vector, s0, runs, chunk_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def split_forms(run, primal_form: str, differentiated_form: str, *args):
  """`run(form, *args)` in `primal_form` when not differentiated; under `jax.grad` / `jax.vjp` the
  forward and backward both run `differentiated_form` (through its own autodiff), so each kind of
  call gets its fastest form. Forward-mode (`jax.jvp`) is not defined: call one form directly."""
  del differentiated_form
  return run(primal_form, *args)


def _split_forms_fwd(run, primal_form, differentiated_form, *args):
  del primal_form
  return jax.vjp(lambda *a: run(differentiated_form, *a), *args)


def _split_forms_bwd(run, primal_form, differentiated_form, vjp, ct):
  del run, primal_form, differentiated_form
  return vjp(ct)


split_forms.defvjp(_split_forms_fwd, _split_forms_bwd)


def _run_core(form, q, k, v, g, s0, runs, *, vector, chunk_size, want_state):
  o, s = _core(q, k, v, g, vector, s0, runs, form, chunk_size)
  # Without the final state the split's backward gets no zero cotangent to carry back through it.
  return (o, s) if want_state else (o, None)


def _causal(q, k, v, g, vector, s0, runs, choice: "FormChoice", chunk_size, want_state=True):
  if choice.primal == choice.differentiated:
    return _core(q, k, v, g, vector, s0, runs, choice.primal, chunk_size)
  run = functools.partial(_run_core, vector=vector, chunk_size=chunk_size, want_state=want_state)
  return split_forms(run, choice.primal, choice.differentiated, q, k, v, g, s0, runs)


def _noncausal(q, k, v, s0, runs, form, chunk_size):
  """`o_t = q_t (S_0 [t in first segment] + sum_{j in seg(t)} k_j^T v_j)`; S_final as causal.

  `q, k, v [B, T, H, D]` float32. Without segments every query reads the one total state, so all
  forms but "parallel" (the quadratic oracle) compute it directly in O(T Dk Dv).
  """
  b, t, h, dk = q.shape
  if form == "parallel":
    qb, kb, vb = _to_bhtd(q), _to_bhtd(k), _to_bhtd(v)
    a = jnp.einsum("bhid,bhjd->bhij", qb, kb)
    a = jnp.where(_same_run_mask(runs, t), a, 0.0)
    o = _to_bhtd(jnp.einsum("bhij,bhje->bhie", a, vb))
    _, s = _causal_parallel(q, k, v, None, False, s0, runs)
    if s0 is not None:
      first = jnp.ones((b, t, 1, 1), bool) if runs is None else (runs == runs[:, :1])[:, :, None, None]
      o = o + jnp.where(first, jnp.einsum("bthd,bhde->bthe", q, s0), 0.0)
    return o, s
  if runs is None:
    s = jnp.einsum("bthd,bthe->bhde", k, v) + (0.0 if s0 is None else s0)
    return jnp.einsum("bthd,bhde->bthe", q, s), s
  # Causal prefix + strictly-later suffix (the causal form on the reversed sequence minus its diagonal).
  form = "chunked" if form is None else form
  fwd, s = _core(q, k, v, None, False, s0, runs, form, chunk_size)
  flip = lambda x: jnp.flip(x, axis=1)
  bwd, _ = _core(flip(q), flip(k), flip(v), None, False, None, flip(runs), form, chunk_size)
  diag = jnp.sum(q * k, axis=-1, keepdims=True) * v
  return fwd + flip(bwd) - diag, s


# ----------------------------------------------------------------------------------------------
# Public API.


def _noted(impl, choice, reason):
  forms = "" if impl == "pallas" else f" (forms {choice.primal} / {choice.differentiated})"
  return impl, reason + forms


@dispatch.dispatching_op
def linear_attention(q, k, v, *, log_decay=None, scale=None, normalize=False, causal=True,
                     initial_state=None, output_final_state=False, segment_ids=None,
                     form=None, chunk_size=None, implementation=None):
  """Decayed linear attention `S_t = exp(g_t) (.) S_{t-1} + k_t^T v_t`, `o_t = scale * q_t S_t`.

  Shapes: `q, k: [B, T, H, Dk]` (feature maps already applied), `v: [B, T, H, Dv]`; returns
  `(o [B, T, H, Dv] in q.dtype, final_state or None)`. `scale` defaults to `Dk**-0.5` (fla).
  `log_decay` (log space, <= 0; checked when concrete) picks the decay kind by its shape: None (no
  decay), `[H]` (fixed per head: RetNet / Lightning), `[B, T, H]` (data-dependent scalar per head
  and step: simple GLA / Mamba-2), `[B, T, H, Dk]` (per key dimension: GLA). With
  `normalize=True` a key sum `z_t = exp(g_t) (.) z_{t-1} + k_t` is kept too and
  `o_t = (scale q_t S_t) / (scale q_t . z_t + NORMALIZE_EPS)` (scale on both sides, as fla; it only
  matters against eps); the state is then the tuple `(S [B, H, Dk, Dv], z [B, H, Dk])`. States are
  float32 (`initial_state` must be float32; `output_final_state=True` returns the state after the
  last token). `segment_ids [B, T]` int: packed sequences; the state resets wherever the id
  changes (no crossing), and `initial_state` applies to the first segment of each row only, while
  the final state is the last segment's. `causal=False`: every token reads its whole segment's
  state (`o_t = q_t S_seg`), `initial_state` added for the first segment; a decay has no
  direction-free meaning there, so `log_decay` with `causal=False` raises. Cross attention (the
  "CAB" cross pattern, `k, v` of another length Tk) is accepted only with `causal=False` and no
  segment ids. `form`: "recurrent" (scan), "parallel" (quadratic), "chunked" (any
  `chunk_size >= 1`, T need not be a multiple; O(T) memory); all agree to float32 rounding.
  `chunk_size=None`: the table's chunk for this call (see below), else 64.
  `form=None` (default) runs the fastest form measured for this backend, length and decay kind
  (`select_form` says which; on the CPU a token scan when not differentiated and the chunked form
  under autodiff, through a `custom_vjp`, so forward-mode `jax.jvp` needs an explicit `form`).
  `implementation` (`attnjax.ops.dispatch`): "reference" (the token scan; the quadratic form when
  non-causal), "xla" (the forms above), "pallas" (`pallas_kernels.linear.chunked_linear_attention`:
  every decay kind, normalize, segments, states, non-causal; not cross attention; compiled on a
  GPU, interpret mode elsewhere) or None: `FORM_TABLE`'s row for the backend, the kernel on a CUDA
  GPU (`choose_implementation` says which and why).
  """
  if form is not None and form not in FORMS:
    raise ValueError(f"form must be None or one of {FORMS}, got {form!r}")
  dispatch.check_implementation(implementation, op="linear_attention")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, T, H, D]; got {q.shape}, {k.shape}, {v.shape}")
  b, t, h, dk = q.shape
  tk = k.shape[1]
  if k.shape[0] != b or k.shape[2:] != (h, dk):
    raise ValueError(f"k must be [B, Tk, H, Dk]={[b, 'Tk', h, dk]}, got {list(k.shape)}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must be [B, Tk, H, Dv] with [B, Tk, H]={list(k.shape[:3])}, got {list(v.shape)}")
  dv = v.shape[-1]
  if tk != t and (causal or segment_ids is not None):
    raise PatternUndefinedError(
        f"k, v length Tk={tk} differs from q length T={t}: the 'causal_cross' pattern (and packed "
        "cross attention) is undefined here; only causal=False without segment_ids allows it")
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
  if not causal and log_decay is not None:
    raise ValueError("log_decay is only defined for causal=True (a bidirectional state has no decay "
                     "direction); fold data-independent key weights into k instead")
  if segment_ids is not None and tuple(segment_ids.shape) != (b, t):
    raise ValueError(f"segment_ids must be [B, T]={[b, t]}, got {list(segment_ids.shape)}")
  scale = dk ** -0.5 if scale is None else scale
  s0, z0 = _check_state(initial_state, b, h, dk, dv, normalize)
  out_dtype = q.dtype
  kind = decay_kind(log_decay)
  if log_decay is not None:
    _canonical_decay(log_decay, b, t, h, dk)  # shape and range checks, whichever path runs
  same = jnp.result_type(q) == jnp.result_type(k) == jnp.result_type(v)
  call = LinearCall(t=t, tk=tk, decay=kind, causal=bool(causal), chunk_size=chunk_size,
                    dtype=str(jnp.result_type(q)) if same else "mixed q/k/v dtypes")
  dispatch.note("linear_attention",
                lambda be: _noted(*choose_implementation(implementation, call, form, be)))
  impl, choice, _ = choose_implementation(implementation, call, form)
  if impl == "pallas":
    from pallas_kernels.linear.api import chunked_linear_attention  # heavy; lazily
    kw = {} if chunk_size is None and choice.chunk_size is None else dict(
        chunk_size=chunk_size or choice.chunk_size)
    return chunked_linear_attention(
        q, k, v, log_decay=log_decay, scale=scale, normalize=normalize, causal=causal,
        initial_state=initial_state, output_final_state=output_final_state,
        segment_ids=segment_ids, **kw)

  qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))    # [B, T, H, D]
  if normalize:
    # The key sum z is the state of a constant-one value column: run both at once.
    vf = jnp.concatenate([vf, jnp.ones_like(vf[..., :1])], axis=-1)
    if s0 is not None:
      s0 = jnp.concatenate([s0, z0[..., None]], axis=-1)
  runs = None if segment_ids is None else run_ids(segment_ids)

  if tk != t:
    s = jnp.einsum("bthd,bthe->bhde", kf, vf) + (0.0 if s0 is None else s0)
    o = jnp.einsum("bthd,bhde->bthe", qf, s)
  elif causal:
    g, vector = _canonical_decay(log_decay, b, t, h, dk)
    chunk_size = chunk_size or choice.chunk_size or 64
    o, s = _causal(qf, kf, vf, g, vector, s0, runs, choice, chunk_size, output_final_state)
  else:
    o, s = _noncausal(qf, kf, vf, s0, runs, choice.primal if impl == "reference" else form,
                      chunk_size or 64)

  o = o * scale
  if normalize:
    o = o[..., :dv] / (o[..., dv:] + NORMALIZE_EPS)
  o = o.astype(out_dtype)
  if not output_final_state:
    return o, None
  if normalize:
    return o, (s[..., :dv], s[..., dv])
  return o, s


def init_state(batch_size: int, num_heads: int, dk: int, dv: int, *, normalize: bool = False):
  """Zero float32 state `[B, H, Dk, Dv]` (or `(S, z [B, H, Dk])` when `normalize`)."""
  s = jnp.zeros((batch_size, num_heads, dk, dv), jnp.float32)
  return (s, jnp.zeros((batch_size, num_heads, dk), jnp.float32)) if normalize else s


def linear_attention_step(q_t, k_t, v_t, state, *, log_decay_t=None, scale=None, normalize=False):
  """One decode step: `q_t, k_t [B, H, Dk]`, `v_t [B, H, Dv]` -> `(o_t [B, H, Dv], new_state)`.

  O(1) memory per token; same semantics and state layout as `linear_attention` (float32 state
  `[B, H, Dk, Dv]` or `(S, z)` with `normalize`). `log_decay_t`: None, `[H]`, `[B, H]` or
  `[B, H, Dk]`, log space (<= 0).
  """
  if q_t.ndim != 3 or k_t.ndim != 3 or v_t.ndim != 3:
    raise ValueError(f"q_t, k_t, v_t must be [B, H, D]; got {q_t.shape}, {k_t.shape}, {v_t.shape}")
  b, h, dk = q_t.shape
  if k_t.shape != q_t.shape or v_t.shape[:2] != (b, h):
    raise ValueError(f"k_t must be [B, H, Dk]={[b, h, dk]} and v_t [B, H, Dv]; got {k_t.shape}, {v_t.shape}")
  dv = v_t.shape[-1]
  scale = dk ** -0.5 if scale is None else scale
  s, z = _check_state(state, b, h, dk, dv, normalize)
  if s is None:
    raise ValueError("state is required (use init_state)")
  if log_decay_t is None:
    dec = None
  else:
    g = jnp.asarray(log_decay_t)
    shapes = {1: (h,), 2: (b, h), 3: (b, h, dk)}
    if g.ndim not in shapes or g.shape != shapes[g.ndim]:
      raise ValueError(f"log_decay_t must be [H], [B, H] or [B, H, Dk] for B={b}, H={h}, Dk={dk}; "
                       f"got {list(g.shape)}")
    _check_gate("log_decay_t", g, "[H], [B, H] or [B, H, Dk]")
    g = g.astype(jnp.float32)
    dec = jnp.exp(g[None, :, None] if g.ndim == 1 else (g[..., None] if g.ndim == 2 else g))
  qf, kf, vf = (x.astype(jnp.float32) for x in (q_t, k_t, v_t))
  s = (s if dec is None else dec[..., None] * s) + kf[..., :, None] * vf[..., None, :]
  o = jnp.einsum("bhd,bhde->bhe", qf, s) * scale
  if normalize:
    z = (z if dec is None else dec * z) + kf
    o = o / (jnp.sum(qf * z, axis=-1, keepdims=True) * scale + NORMALIZE_EPS)
    return o.astype(q_t.dtype), (s, z)
  return o.astype(q_t.dtype), s
