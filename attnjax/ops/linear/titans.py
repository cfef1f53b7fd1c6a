"""Titans neural memory (Behrouz et al. 2024, arXiv:2501.00663) and the Miras memory variants (Behrouz et al. 2025, arXiv:2504.13173): a memory learned at test time.

The memory is a small model `M_W(x)` (a matrix, or a 2-layer MLP) whose weights are updated at
every token by gradient descent on an associative ("attentional bias") loss `l(M_W(k_t), v_t)`,
with momentum and a retention (forgetting) gate, all data-dependent per token and head::

    g_t = grad_W l(M_W(k_t), v_t) at W = R(A_ref(t))     (the "momentary surprise")
    S_t = eta_t S_{t-1} - theta_t g_t                   (momentum: the "surprise")
    A_t = a_t A_{t-1} + S_t                             (a_t = 1 - alpha_t: retention / forget gate)
    W_t = R(A_t),  y_t = M_{W_t}(q_t)                   (read-out after the update, as fla's Titans)

`A` is the memory's accumulator and `R` its read transform: identity for Titans (so `W = A`),
the l_q normalisation for Moneta and a row softmax for Memora (below). Gates are given the
project's way: `lr = theta >= 0` (linear), `log_retain = log(1 - alpha) <= 0` and
`log_momentum = log eta <= 0` (log space; None = no forgetting / no momentum).

Chunking (explicit in the API). `chunk_size = C` fixes *where the gradients are taken*: every
gradient of a chunk is taken at the memory from the chunk start, `A_ref(t) = A_{C floor(t/C)}`
(chunks counted from each sequence's start), exactly as the paper's parallel ("mini-batch")
training. `C = 1` is the fully recurrent rule (gradient at `W_{t-1}`). It is a semantic choice,
not only a speed knob: both forms below compute the same function of `C`.

* `form="recurrent"`: a scan over tokens that refreshes the gradient point every C tokens (the
  oracle; also the decode step's semantics; O(1) state per token).
* `form="chunked"`: a scan over chunks. With the gradient point fixed, `S` and `A` are linear
  recurrences in the per-token updates `u_j = -theta_j g_j`, so inside a chunk
  `A_i = b_i A_0 + f_i S_0 + sum_{j<=i} G_ij u_j` with `b_i = prod_{l<=i} a_l`,
  `f_i = sum_{m<=i} (b_i / b_m) E_m`, `E_m = prod_{l<=m} eta_l` and
  `G_ij = sum_{j<=m<=i} (b_i / b_m)(E_m / E_j)` (`G = exp(segsum log a) @ exp(segsum log eta)`, all
  factors exps of segment sums <= 0, so gates at 0 or 1 are exact). For the linear memory with
  identity read-out the per-token gradient is an outer product `k_j^T psi_j`
  (`psi = dl/dpred` at the chunk-start memory), and the chunk reduces to matmuls (fla's
  `chunk_titans_linear` form): `Y = (b Q) A_0 + (f Q) S_0 - ((Q K^T) (.) G (.) theta_j) Psi`.
  Other memories (MLP, Moneta / Memora read-outs) take per-token gradients with `vmap(grad)` and
  materialise the per-token memories of one chunk (O(C |W|) per head).

Memories (`MemorySpec.memory`): "linear" (`W [Dk, Dv]`, `M(x) = x W`; Titans' matrix memory, the
case the paper's parallel form is written for) and "mlp" (`M(x) = x + gelu(x W1) W2`,
`W1 [Dk, e Dk]`, `W2 [e Dk, Dv]`, Dk = Dv: the paper's main deep memory, depth 2, with the
residual that lucidrains' `ResidualNorm` and Miras' `x + LN(...)` use; the LayerNorm is left out
because its derivative at a zero output is 1/sqrt(eps), which makes the zero-initialised second
layer's first updates explode).

Miras (Behrouz et al. 2025, arXiv:2504.13173) as options of the same update (what the paper pins down, and what we chose):

* attentional bias (`loss`): "l2" `||e||^2` (Titans; e = M(k) - v); "lp" `sum_i |e_i|^p`
  (Moneta, p = 3 in the paper) with the paper's smooth `|x| ~ sqrt(x^2 + eps)`, i.e.
  `sum_i (e_i^2 + eps)^(p/2)`: its gradient `p e (e^2 + eps)^((p-2)/2)` is exactly the l2 one at
  p = 2; "huber" (Yaad): the paper's Yaad switches, per token, from the l2 gradient to a
  `delta`-scaled l1 one when `||e|| > delta` (a jump at the threshold); we use the continuous
  l2-norm Huber the paper also gives (its eq. for `H(||e||_2)`), scaled to match l2 below the
  threshold: `||e||^2` if `||e|| <= delta`, else `2 delta ||e|| - delta^2` (gradient
  `2 delta e / ||e||`, so a single outlier moves the memory by at most `2 delta theta ||k||`).
* retention (`retention`): "l2" (Titans / Yaad: the multiplicative forget gate `a_t` above;
  `R` = identity); "lq" (Moneta: `A_t = a_t A_{t-1} - theta_t g_t`,
  `W_t = A_t / ||A_t||_q^(q-2)`, norm over each weight matrix per head, with the smooth
  `(sum (A^2 + eps)^(q/2))^((q-2)/q)`; q = 2 is plain gradient descent); "kl" (Memora:
  `W_t = softmax(a_t log W_{t-1} - theta_t g_t)` row-wise over each weight's output axis. Since
  `log softmax(Z) = Z - lse(Z)` and a row constant does not change a softmax, this equals the
  linear recurrence `Z_t = a_t Z_{t-1} - theta_t g_t` on logits with `W = softmax(Z)`; so Memora
  chunks like the others, with the gradient at the chunk start's W. The paper instead applies
  the softmax only at each chunk's first token and linearises inside the chunk; both reduce to
  the exact rule at C = 1).
* algorithm: gradient descent with momentum (Miras' three models use none: pass
  `log_momentum=None`).

Packed sequences: `segment_ids [B, T]` reset the memory to `init_memory` (and the momentum to 0)
at each segment start, and the chunk grid restarts with each segment, so a packed sequence
equals its segments run alone. The chunked form's grid is absolute, so with `segment_ids` it
runs the recurrent form (exact, sequential).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attnjax.ops.linear.engine import _check_gate, _concrete_range, check_causal_qkv, run_ids, segsum

MEMORIES = ("linear", "mlp")
LOSSES = ("l2", "lp", "huber")
RETENTIONS = ("l2", "lq", "kl")
MEMORY_FORMS = ("recurrent", "chunked")
#: Stands in for log(0) when momentum is off (exp gives exactly 0; no inf arithmetic).
_NO_MOMENTUM = -1e30


@dataclasses.dataclass(frozen=True)
class MemorySpec:
  """The static choices of the memory update (hashable; see the module docstring).

  `memory` in MEMORIES, `loss` in LOSSES (with `p` for "lp", `huber_delta` for "huber"),
  `retention` in RETENTIONS (with `q` for "lq"), `eps` the smoothing of |.| in "lp" / "lq".
  """
  memory: str = "linear"
  loss: str = "l2"
  p: float = 3.0
  huber_delta: float = 1.0
  retention: str = "l2"
  q: float = 4.0
  eps: float = 1e-6

  def __post_init__(self):
    if self.memory not in MEMORIES:
      raise ValueError(f"memory must be one of {MEMORIES}, got {self.memory!r}")
    if self.loss not in LOSSES:
      raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
    if self.retention not in RETENTIONS:
      raise ValueError(f"retention must be one of {RETENTIONS}, got {self.retention!r}")
    if not self.p >= 1.0:
      raise ValueError(f"p must be >= 1 (l_p attentional bias), got {self.p}")
    if not self.q > 1.0:
      raise ValueError(f"q must be > 1 (l_q retention), got {self.q}")
    if not self.huber_delta > 0:
      raise ValueError(f"huber_delta must be > 0, got {self.huber_delta}")
    if not self.eps > 0:
      raise ValueError(f"eps must be > 0, got {self.eps}")

  @property
  def fast_linear(self) -> bool:
    """Whether the matmul chunk form applies (linear memory, identity read-out)."""
    return self.memory == "linear" and self.retention == "l2"


class MemoryState(NamedTuple):
  """The recurrent state. `memory`, `momentum`, `ref`: tuples of float32 `[B, H, ...]` arrays
  (the accumulator A, the momentum S and the accumulator at the last gradient-point refresh);
  `pos [B]` int32: tokens since that refresh (0 <= pos < chunk_size)."""
  memory: tuple
  momentum: tuple
  ref: tuple
  pos: jax.Array


# ----------------------------------------------------------------------------------------------
# The memory model, loss and read transform, for one head and one token.


def memory_apply(spec: MemorySpec, w: tuple, x: jax.Array) -> jax.Array:
  """`M_W(x)`: `x [Dk] -> [Dv]` with `w = (W,)` (linear) or `(W1, W2)` (mlp)."""
  if spec.memory == "linear":
    return x @ w[0]
  return x + jax.nn.gelu(x @ w[0]) @ w[1]


def attentional_bias(spec: MemorySpec, pred: jax.Array, v: jax.Array) -> jax.Array:
  """The per-token loss `l(pred, v)` (scalar) for `pred, v [Dv]`."""
  e = pred - v
  if spec.loss == "l2":
    return jnp.sum(e * e)
  if spec.loss == "lp":
    return jnp.sum((e * e + spec.eps) ** (spec.p / 2.0))
  r2 = jnp.sum(e * e)
  d = spec.huber_delta
  # The sqrt branch only matters above the threshold; +eps keeps its (unused) gradient finite at 0.
  return jnp.where(r2 <= d * d, r2, 2.0 * d * jnp.sqrt(r2 + spec.eps) - d * d)


def read_transform(spec: MemorySpec, a: tuple) -> tuple:
  """`W = R(A)` per weight of one head: identity (l2), l_q normalisation (Moneta), row softmax (Memora)."""
  if spec.retention == "l2":
    return a
  if spec.retention == "kl":
    return tuple(jax.nn.softmax(x, axis=-1) for x in a)
  q = spec.q
  return tuple(x / jnp.sum((x * x + spec.eps) ** (q / 2.0)) ** ((q - 2.0) / q) for x in a)


def _token_grad(spec, w, k, v):
  return jax.grad(lambda w_: attentional_bias(spec, memory_apply(spec, w_, k), v))(w)


# Vectorised over heads and batch: leaves [B, H, ...], vectors [B, H, D] (or [B, H, C, D] for `_c`).
_over_bh = lambda f, axes: jax.vmap(jax.vmap(f, in_axes=axes), in_axes=axes)


def _grads(spec, w, k, v):
  return _over_bh(lambda w_, k_, v_: _token_grad(spec, w_, k_, v_), (0, 0, 0))(w, k, v)


def _grads_c(spec, w, k, v):
  per_tok = jax.vmap(lambda w_, k_, v_: _token_grad(spec, w_, k_, v_), in_axes=(None, 0, 0))
  return _over_bh(per_tok, (0, 0, 0))(w, k, v)


def _apply_read(spec, a, q):
  return _over_bh(lambda a_, q_: memory_apply(spec, read_transform(spec, a_), q_), (0, 0))(a, q)


def _apply_read_c(spec, a, q):
  """Per-token memories `a` (leaves [B, H, C, ...]) read at `q [B, H, C, Dk]`."""
  per_tok = jax.vmap(lambda a_, q_: memory_apply(spec, read_transform(spec, a_), q_), in_axes=(0, 0))
  return _over_bh(per_tok, (0, 0))(a, q)


# ----------------------------------------------------------------------------------------------
# Shapes and states.


def memory_shapes(spec: MemorySpec, dk: int, dv: int, expansion: int = 4) -> tuple:
  """Shapes of the memory weights of one head: `((Dk, Dv),)` or `((Dk, e Dk), (e Dk, Dv))`."""
  if spec.memory == "linear":
    return ((dk, dv),)
  if dk != dv:
    raise ValueError(f"the mlp memory has a residual: it needs Dk == Dv, got {dk} and {dv}")
  return ((dk, expansion * dk), (expansion * dk, dv))


def _broadcast_memory(init_memory, b):
  """Weights are matrices per head: `[H, m, n]` leaves get the batch axis, `[B, H, m, n]` stay."""
  if not isinstance(init_memory, (tuple, list)):
    raise ValueError("init_memory must be a tuple of weight arrays ([H, m, n] or [B, H, m, n])")
  out = []
  for x in init_memory:
    x = jnp.asarray(x).astype(jnp.float32)
    if x.ndim == 3:
      x = jnp.broadcast_to(x[None], (b,) + x.shape)
    out.append(x)
  return tuple(out)


def init_memory_state(init_memory: tuple, batch_size: int) -> MemoryState:
  """A fresh state from the initial weights `init_memory` (leaves `[H, ...]` or `[B, H, ...]`)."""
  mem = _broadcast_memory(init_memory, batch_size)
  return MemoryState(mem, tuple(jnp.zeros_like(x) for x in mem), mem,
                     jnp.zeros((batch_size,), jnp.int32))


def _check_memory(spec, mem, b, h, dk, dv, name):
  if not isinstance(mem, (tuple, list)) or len(mem) != (1 if spec.memory == "linear" else 2):
    raise ValueError(f"{name} must be a tuple of {1 if spec.memory == 'linear' else 2} arrays "
                     f"for memory={spec.memory!r}")
  shapes = memory_shapes(spec, dk, dv, mem[-1].shape[-2] // dk if spec.memory == "mlp" else 4)
  for x, s in zip(mem, shapes):
    if tuple(x.shape) != (b, h) + s:
      raise ValueError(f"{name} weights must be [B, H, ...]={[b, h, *s]}, got {list(x.shape)}")
    if x.dtype != jnp.float32:
      raise ValueError(f"{name} weights must be float32, got {x.dtype}")


def _check_state(spec, state, b, h, dk, dv):
  if not isinstance(state, MemoryState):
    raise ValueError(f"state must be a MemoryState (see init_memory_state), got {type(state).__name__}")
  for name in ("memory", "momentum", "ref"):
    _check_memory(spec, getattr(state, name), b, h, dk, dv, f"state.{name}")
  if tuple(state.pos.shape) != (b,) or state.pos.dtype != jnp.int32:
    raise ValueError(f"state.pos must be int32 [B]={[b]}, got {state.pos.dtype} {list(state.pos.shape)}")


def _canonical_gate(x, name, b, t, h, default):
  if x is None:
    return jnp.full((b, h, t), default, jnp.float32)
  x = jnp.asarray(x)
  if x.shape == (h,):
    x = jnp.broadcast_to(x[None, None], (b, t, h))
  if tuple(x.shape) != (b, t, h):
    raise ValueError(f"{name} must be [B, T, H]={[b, t, h]} or [H]={[h]}, got {list(x.shape)}")
  if name != "lr":
    _check_gate(name, x, "[B, T, H] or [H]")
  return jnp.transpose(x.astype(jnp.float32), (0, 2, 1))


def _check_lr(lr):
  rng = _concrete_range(lr) if lr.size else None
  if rng is not None and not (rng[0] >= 0.0):
    raise ValueError(f"lr (theta, the inner learning rate) must be >= 0, got min {rng[0]}")


# ----------------------------------------------------------------------------------------------
# Recurrent form (and the decode step).


def _recurrent_step(spec, chunk_size, carry, x):
  a, s, ref, pos = carry
  q_t, k_t, v_t, th, lr, lm = x
  g = _grads(spec, read_transform_bh(spec, ref), k_t, v_t)
  bc = lambda c, y: c.reshape(c.shape + (1,) * (y.ndim - c.ndim))
  s = tuple(bc(jnp.exp(lm), y) * y - bc(th, gy) * gy for y, gy in zip(s, g))
  a = tuple(bc(jnp.exp(lr), y) * y + sy for y, sy in zip(a, s))
  o = _apply_read(spec, a, q_t)
  pos = pos + 1
  full = pos >= chunk_size
  ref = tuple(jnp.where(bc(full, y), y, r) for y, r in zip(a, ref))
  return (a, s, ref, jnp.where(full, 0, pos)), o


def read_transform_bh(spec, a):
  """`read_transform` over leaves `[B, H, ...]` (it acts per head)."""
  if spec.retention == "l2":
    return a
  return _over_bh(lambda a_: read_transform(spec, a_), (0,))(a)


def _recurrent(spec, q, k, v, th, lr, lm, state, init, resets, c):
  mv = lambda x: jnp.moveaxis(x, 2, 0)

  def step(carry, x):
    *rest, reset = x
    a, s, ref, pos = carry
    bc = lambda y: reset.reshape(reset.shape + (1,) * (y.ndim - 1))
    a = tuple(jnp.where(bc(y), i, y) for y, i in zip(a, init))
    ref = tuple(jnp.where(bc(y), i, y) for y, i in zip(ref, init))
    s = tuple(jnp.where(bc(y), 0.0, y) for y in s)
    pos = jnp.where(reset, 0, pos)
    return _recurrent_step(spec, c, (a, s, ref, pos), rest)

  carry = (state.memory, state.momentum, state.ref, state.pos)
  carry, o = jax.lax.scan(step, carry, (mv(q), mv(k), mv(v), mv(th), mv(lr), mv(lm), resets))
  return jnp.moveaxis(o, 0, 2), MemoryState(*carry)


def neural_memory_step(q_t, k_t, v_t, lr_t, state: MemoryState, *, log_retain_t=None,
                       log_momentum_t=None, spec: MemorySpec = MemorySpec(), chunk_size: int = 16):
  """One decode step: `q_t, k_t [B, H, Dk]`, `v_t [B, H, Dv]`, `lr_t [B, H]` (theta >= 0), log gates
  `[B, H]`, `[H]` or None -> `(o_t [B, H, Dv], new_state)`; the same update as `neural_memory`
  (the gradient point refreshes whenever `state.pos` reaches `chunk_size`)."""
  if q_t.ndim != 3 or k_t.shape != q_t.shape or v_t.ndim != 3 or v_t.shape[:2] != q_t.shape[:2]:
    raise ValueError(f"q_t, k_t must be [B, H, Dk], v_t [B, H, Dv]; got {q_t.shape}, {k_t.shape}, {v_t.shape}")
  b, h, dk = q_t.shape
  dv = v_t.shape[-1]
  _check_state(spec, state, b, h, dk, dv)
  gate = lambda x, name, default: _canonical_gate(None if x is None else jnp.asarray(x)[:, None]
                                                  if jnp.ndim(x) == 2 else x, name, b, 1, h, default)[..., 0]
  th = gate(lr_t, "lr", 0.0)
  _check_lr(th)
  lr = gate(log_retain_t, "log_retain", 0.0)
  lm = gate(log_momentum_t, "log_momentum", _NO_MOMENTUM)
  f32 = lambda x: x.astype(jnp.float32)
  carry, o = _recurrent_step(spec, chunk_size, tuple(state[:4]),
                             (f32(q_t), f32(k_t), f32(v_t), th, lr, lm))
  return o.astype(q_t.dtype), MemoryState(*carry)


# ----------------------------------------------------------------------------------------------
# Chunked form.


def _chunk_coefficients(lr, lm):
  """`lr, lm [..., C]` log gates -> (b, f, E [..., C]; Ar, Em, G [..., C, C]) of the module docstring."""
  ar = jnp.exp(segsum(lr[..., None])[..., 0])          # prod_{m<l<=i} a_l, 0 above the diagonal
  em = jnp.exp(segsum(lm[..., None])[..., 0])          # prod_{j<l<=m} eta_l
  b = jnp.exp(jnp.cumsum(lr, axis=-1))
  e = jnp.exp(jnp.cumsum(lm, axis=-1))
  f = jnp.einsum("...im,...m->...i", ar, e)
  g = jnp.einsum("...im,...mj->...ij", ar, em)
  return b, f, e, ar, em, g


def _chunked(spec, q, k, v, th, lr, lm, state, c, fast):
  b_, h, t, dk = q.shape
  n = -(-t // c)
  pad = n * c - t
  if pad:
    p4 = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))
    p3 = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, pad)))
    q, k, v, th, lr, lm = p4(q), p4(k), p4(v), p3(th), p3(lr), p3(lm)
  ch = lambda x: jnp.moveaxis(x.reshape(b_, h, n, c, *x.shape[3:]), 2, 0)   # [n, B, H, C, ...]
  qc, kc, vc, thc = ch(q), ch(k), ch(v), ch(th)
  bb, f, e, ar, em, g = _chunk_coefficients(ch(lr), ch(lm))
  # The state carried out of a chunk is its row `last` (C - 1, or the last real token of the
  # final chunk): padded steps have theta = 0 but would still add the momentum to A.
  last = jnp.full((n,), c - 1, jnp.int32).at[-1].set((t - 1) % c)
  sel = jax.nn.one_hot(last, c, dtype=jnp.float32)                          # [n, C]
  row = lambda x: jnp.einsum("nbhi...,ni->nbh...", x, sel)
  xs = (qc, kc, vc, thc, bb, f, e, g, em, row(bb), row(f), row(e), row(g), row(em), last)

  def step_fast(carry, x):
    (a,), (s,), _ = carry
    q_, k_, v_, th_, b_i, f_i, _, g_, _, b_l, f_l, e_l, g_l, em_l, _ = x
    pred = jnp.einsum("bhcd,bhde->bhce", k_, a)
    psi = jax.grad(lambda p: jnp.sum(jax.vmap(jax.vmap(jax.vmap(
        lambda p1, v1: attentional_bias(spec, p1, v1))))(p, v_)))(pred)
    w = th_[..., None] * psi                                                  # theta_j psi_j
    qk = jnp.einsum("bhid,bhjd->bhij", q_, k_) * g_
    o = (b_i[..., None] * jnp.einsum("bhcd,bhde->bhce", q_, a)
         + f_i[..., None] * jnp.einsum("bhcd,bhde->bhce", q_, s)
         - jnp.einsum("bhij,bhje->bhie", qk, w))
    a_new = (b_l[..., None, None] * a + f_l[..., None, None] * s
             - jnp.einsum("bhj,bhjd,bhje->bhde", g_l, k_, w))
    s_new = e_l[..., None, None] * s - jnp.einsum("bhj,bhjd,bhje->bhde", em_l, k_, w)
    return ((a_new,), (s_new,), (a,)), o

  def step_generic(carry, x):
    a, s, _ = carry
    q_, k_, v_, th_, b_i, f_i, e_i, g_, em_, *_rest, l_ = x
    grads = _grads_c(spec, read_transform_bh(spec, a), k_, v_)               # [B, H, C, ...]
    u = tuple(-th_.reshape(th_.shape + (1,) * (y.ndim - 3)) * y for y in grads)
    ex = lambda c_, y: c_.reshape(c_.shape + (1,) * (y.ndim - c_.ndim))      # [B, H, C] -> per-token
    a_all = tuple(ex(b_i, u_) * a0[:, :, None] + ex(f_i, u_) * s0[:, :, None]
                  + jnp.einsum("bhij,bhj...->bhi...", g_, u_) for a0, s0, u_ in zip(a, s, u))
    s_all = tuple(ex(e_i, u_) * s0[:, :, None] + jnp.einsum("bhij,bhj...->bhi...", em_, u_)
                  for s0, u_ in zip(s, u))
    o = _apply_read_c(spec, a_all, q_)
    pick = lambda y: jax.lax.dynamic_index_in_dim(y, l_, axis=2, keepdims=False)
    return (tuple(map(pick, a_all)), tuple(map(pick, s_all)), a), o

  carry = (state.memory, state.momentum, state.memory)
  carry, o = jax.lax.scan(step_fast if fast else step_generic, carry, xs)
  o = jnp.moveaxis(o, 0, 2).reshape(b_, h, n * c, -1)[:, :, :t]
  a, s, a_start = carry
  if t % c == 0:
    final = MemoryState(a, s, a, jnp.zeros((b_,), jnp.int32))
  else:
    final = MemoryState(a, s, a_start, jnp.full((b_,), t % c, jnp.int32))
  return o, final


# ----------------------------------------------------------------------------------------------
# Public API.


def neural_memory(q, k, v, lr, *, log_retain=None, log_momentum=None,
                  spec: MemorySpec = MemorySpec(), init_memory=None, initial_state=None,
                  output_final_state=False, segment_ids=None, chunk_size: int = 16,
                  form: str = "chunked", fast_linear: bool = True):
  """Titans / Miras neural memory over `[B, T, H, D]`; returns `(o [B, T, H, Dv], state | None)`.

  `q, k [B, T, H, Dk]`, `v [B, T, H, Dv]` (the layer L2-normalises q and k, as Titans does);
  `lr [B, T, H]` the inner learning rate theta >= 0; `log_retain` (log(1 - alpha)) and
  `log_momentum` (log eta), `[B, T, H]` or `[H]`, log space <= 0, None = keep everything / no
  momentum. `spec` picks the memory, loss and retention (module docstring). `init_memory`: the
  memory's initial weights, a tuple of `[H, ...]` or `[B, H, ...]` arrays of `memory_shapes`
  (default zeros for the linear memory; required for "mlp", whose zero point has zero gradient);
  segments reset to it. `initial_state` (a `MemoryState`, e.g. a previous call's final state)
  overrides it for the first segment; the chunked form needs `initial_state.pos == 0` (a chunk
  boundary; checked when concrete), the recurrent form continues any state. `chunk_size = C >= 1`
  fixes the gradient points (module docstring); `form` "recurrent" or "chunked" compute the same
  function. `fast_linear=False` forces the generic (materialising) chunk path, for tests.
  """
  if form not in MEMORY_FORMS:
    raise ValueError(f"form must be one of {MEMORY_FORMS}, got {form!r}")
  if not isinstance(spec, MemorySpec):
    raise ValueError(f"spec must be a MemorySpec, got {type(spec).__name__}")
  b, t, h, dk, dv = check_causal_qkv(q, k, v, segment_ids, chunk_size)
  th = _canonical_gate(lr, "lr", b, t, h, 0.0)
  _check_lr(th)
  lg = _canonical_gate(log_retain, "log_retain", b, t, h, 0.0)
  lm = _canonical_gate(log_momentum, "log_momentum", b, t, h, _NO_MOMENTUM)
  if init_memory is None:
    if spec.memory != "linear":
      raise ValueError("init_memory is required for the mlp memory (zero weights get zero gradients)")
    init_memory = (jnp.zeros((h, dk, dv), jnp.float32),)
  init = _broadcast_memory(init_memory, b)
  _check_memory(spec, init, b, h, dk, dv, "init_memory")
  if initial_state is None:
    state = MemoryState(init, tuple(jnp.zeros_like(x) for x in init), init, jnp.zeros((b,), jnp.int32))
  else:
    _check_state(spec, initial_state, b, h, dk, dv)
    state = initial_state
  tr = lambda x: jnp.transpose(x, (0, 2, 1, 3)).astype(jnp.float32)
  qf, kf, vf = tr(q), tr(k), tr(v)
  if form == "chunked" and segment_ids is None:
    if initial_state is not None:
      rng = _concrete_range(state.pos)
      if rng is not None and rng[1] != 0:
        raise ValueError("form='chunked' starts at a chunk boundary: initial_state.pos must be 0 "
                         f"(got up to {int(rng[1])}); use form='recurrent' to continue mid-chunk")
    o, final = _chunked(spec, qf, kf, vf, th, lg, lm, state, chunk_size,
                        fast_linear and spec.fast_linear)
  else:
    if segment_ids is None:
      resets = jnp.zeros((t, b), bool)
    else:
      runs = run_ids(segment_ids)
      resets = jnp.transpose(runs != jnp.concatenate([runs[:, :1], runs[:, :-1]], axis=1))
    o, final = _recurrent(spec, qf, kf, vf, th, lg, lm, state, init, resets, chunk_size)
  o = jnp.transpose(o, (0, 2, 1, 3)).astype(q.dtype)
  return (o, final) if output_final_state else (o, None)


def memory_read(spec: MemorySpec, memory: tuple, q: jax.Array) -> jax.Array:
  """Reads a fixed memory without updating it (Titans' `M*(q)`): leaves `[B, H, ...]`,
  `q [B, T, H, Dk]` -> `[B, T, H, Dv]`."""
  qf = jnp.transpose(q, (0, 2, 1, 3)).astype(jnp.float32)
  per_tok = jax.vmap(lambda a_, q_: memory_apply(spec, read_transform(spec, a_), q_), in_axes=(None, 0))
  o = _over_bh(per_tok, (0, 0))(memory, qf)
  return jnp.transpose(o, (0, 2, 1, 3)).astype(q.dtype)
