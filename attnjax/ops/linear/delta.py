"""The (gated) delta rule: DeltaNet and Gated DeltaNet, recurrent and chunked (WY / UT) forms.

`S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t^T v_t`, `o_t = scale * q_t S_t` with the
state `S [Dk, Dv]` as in `engine.linear_attention` (fla's `[B, H, K, V]` layout).

Chunked form. Writing `S_t = exp(g_t) S_{t-1} + k_t^T u_t` with the "pseudo-value"
`u_t = beta_t (v_t - exp(g_t) k_t S_{t-1})`, the u's of one chunk solve a unit lower-triangular
system `(I + A) U = beta V - beta Gamma (K S_0)`, `A_ij = beta_i exp(G_i - G_j) k_i . k_j` (j < i).
With `T = (I + A)^{-1}` (the UT transform) `U = T beta V - (T beta Gamma K) S_0 = U' - W S_0`: `T`,
`W` and `U'` are computed for all chunks in parallel, and only the cheap `U = U' - W S_0`, the
output and the next state run in the scan over chunks. All decay factors are exps of direct
segment sums (<= 0), as in the engine.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attnjax.ops import dispatch
from attnjax.ops.linear.engine import (FormChoice, LinearCall, _check_gate, _concrete_range,
                                       _check_state, _reverse_exclusive_cumsum, check_causal_qkv,
                                       _noted, choose_implementation, run_ids, segsum,
                                       select_form, split_forms)

DELTA_FORMS = ("recurrent", "parallel", "chunked")


def _canonical(log_decay, beta, b, t, h):
  if tuple(beta.shape) != (b, t, h):
    raise ValueError(f"beta must be [B, T, H]={[b, t, h]}, got {list(beta.shape)}")
  rng = _concrete_range(beta) if beta.size else None
  if rng is not None:
    lo, hi = rng
    if not (0.0 <= lo and hi <= 2.0):
      raise ValueError(f"beta must lie in [0, 2] (write strength), got range [{lo}, {hi}]")
  beta = jnp.transpose(beta.astype(jnp.float32), (0, 2, 1))
  if log_decay is None:
    return jnp.zeros((b, h, t), jnp.float32), beta
  g = jnp.asarray(log_decay)
  if g.shape == (h,):
    g = jnp.broadcast_to(g[None, :, None], (b, h, t))
  elif g.shape == (b, t, h):
    g = jnp.transpose(g, (0, 2, 1))
  else:
    raise ValueError(f"log_decay must be [H]={[h]} or [B, T, H]={[b, t, h]} for the delta rule "
                     f"(per-key-dim gates are not supported), got {list(g.shape)}")
  _check_gate("log_decay", log_decay, "[H] or [B, T, H]")
  return g.astype(jnp.float32), beta


def _recurrent(q, k, v, beta, g, s0, runs):
  b, h, t, dk = q.shape
  dv = v.shape[-1]
  s = jnp.zeros((b, h, dk, dv), jnp.float32) if s0 is None else s0
  if runs is None:
    reset = jnp.zeros((t, b), bool)
  else:
    reset = jnp.transpose(runs != jnp.concatenate([runs[:, :1], runs[:, :-1]], axis=1))
  mv = lambda x: jnp.moveaxis(x, 2, 0)

  def step(s, x):
    qt, kt, vt, bt, gt, rt = x
    s = jnp.where(rt[:, None, None, None], 0.0, jnp.exp(gt)[..., None, None] * s)
    u = bt[..., None] * (vt - jnp.einsum("bhd,bhde->bhe", kt, s))
    s = s + kt[..., :, None] * u[..., None, :]
    return s, jnp.einsum("bhd,bhde->bhe", qt, s)

  s, o = jax.lax.scan(step, s, (mv(q), mv(k), mv(v), mv(beta), mv(g), reset))
  return jnp.moveaxis(o, 0, 2), s


def _chunked(q, k, v, beta, g, s0, runs, c):
  b, h, t, dk = q.shape
  dv = v.shape[-1]
  n = -(-t // c)
  pad = n * c - t
  if pad:
    # Padded steps: k = v = beta = g = 0, same run as the last token: they leave the state alone.
    p4 = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))
    p3 = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, pad)))
    q, k, v, beta, g = p4(q), p4(k), p4(v), p3(beta), p3(g)
    if runs is not None:
      runs = jnp.pad(runs, ((0, 0), (0, pad)), mode="edge")
  qc, kc, vc = (x.reshape(b, h, n, c, x.shape[-1]) for x in (q, k, v))
  bc, gc = beta.reshape(b, h, n, c), g.reshape(b, h, n, c)
  dec = jnp.exp(segsum(gc[..., None])[..., 0])                       # [b,h,n,c,c], incl. diagonal
  gam = jnp.exp(jnp.cumsum(gc, axis=-1))                              # decay chunk start -> i
  back = jnp.exp(_reverse_exclusive_cumsum(gc, axis=-1))              # decay j -> chunk end
  total = jnp.exp(jnp.sum(gc, axis=-1))                               # [b,h,n]
  if runs is not None:
    rc = runs.reshape(b, n, c)
    same = (rc[:, :, :, None] == rc[:, :, None, :])[:, None]
    r_prev = jnp.concatenate([runs[:, :1], rc[:, :-1, -1]], axis=1)
    r_last = rc[:, :, -1]
    in_mask = (rc == r_prev[:, :, None])[:, None]
    out_mask = (rc == r_last[:, :, None])[:, None]
    carry = (r_last == r_prev)[:, None]
    dec = jnp.where(same, dec, 0.0)
    gam = jnp.where(in_mask, gam, 0.0)
    back = jnp.where(out_mask, back, 0.0)
    total = jnp.where(carry, total, 0.0)
  strict = jnp.tril(jnp.ones((c, c), bool), -1)
  kk = jnp.einsum("...id,...jd->...ij", kc, kc)
  a = jnp.where(strict, bc[..., :, None] * dec * kk, 0.0)
  eye = jnp.eye(c, dtype=jnp.float32)
  solve = lambda rhs: jax.scipy.linalg.solve_triangular(eye + a, rhs, lower=True, unit_diagonal=True)
  u_free = solve(bc[..., None] * vc)                                  # U' = T beta V
  w = solve((bc * gam)[..., None] * kc)                               # W = T beta Gamma K
  qk = jnp.einsum("...id,...jd->...ij", qc, kc) * dec                 # causal incl. diagonal
  q_gam = qc * gam[..., None]
  k_back = kc * back[..., None]
  s_init = jnp.zeros((b, h, dk, dv), jnp.float32) if s0 is None else s0
  mv = lambda x: jnp.moveaxis(x, 2, 0)

  def step(s, x):
    u_free_n, w_n, qk_n, q_gam_n, k_back_n, total_n = x
    u = u_free_n - jnp.einsum("bhid,bhde->bhie", w_n, s)
    o = jnp.einsum("bhid,bhde->bhie", q_gam_n, s) + jnp.einsum("bhij,bhje->bhie", qk_n, u)
    s = total_n[..., None, None] * s + jnp.einsum("bhjd,bhje->bhde", k_back_n, u)
    return s, o

  s, o = jax.lax.scan(step, s_init, tuple(map(mv, (u_free, w, qk, q_gam, k_back, total))))
  o = jnp.moveaxis(o, 0, 2).reshape(b, h, n * c, dv)[:, :, :t]
  return o, s


def select_delta_form(t: int, *, backend: str | None = None) -> FormChoice:
  """The forms `delta_rule(..., form=None)` runs for length `t` (the engine's table, kind "delta")."""
  return select_form(t, "delta", backend=backend)


def _run_form(form, q, k, v, beta, g, s0, runs, *, chunk_size, want_state=True):
  if form == "recurrent":
    o, s = _recurrent(q, k, v, beta, g, s0, runs)
  else:
    o, s = _chunked(q, k, v, beta, g, s0, runs, q.shape[2] if form == "parallel" else chunk_size)
  # Without the final state the split's backward gets no zero cotangent to carry back through it.
  return (o, s) if want_state else (o, None)


@dispatch.dispatching_op
def delta_rule(q, k, v, beta, *, log_decay=None, scale=None, initial_state=None,
               output_final_state=False, segment_ids=None, form=None, chunk_size=64,
               implementation=None):
  """Gated delta rule on `[B, T, H, D]`; returns `(o [B, T, H, Dv], final_state | None)`.

  `S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t^T v_t`, `o_t = scale q_t S_t`
  (DeltaNet when `log_decay` is None; Gated DeltaNet (Wang et al. 2025, arXiv:2507.06457) with `log_decay [B, T, H]` or `[H]`, log
  space <= 0). `beta [B, T, H]` in [0, 2] (usually a sigmoid). Keys are used as given: the layers
  L2-normalise them, which the delta rule needs for stability (||k|| = 1, beta <= 1 keeps
  `I - beta k k^T` a contraction). `scale` defaults to `Dk**-0.5`. State: float32
  `[B, H, Dk, Dv]`; `segment_ids`/`initial_state` semantics as in `linear_attention` (reset at each
  segment change; the initial state feeds the first segment). Forms: "recurrent" (scan) and
  "chunked" (UT transform, any `chunk_size`, T need not be a multiple); "parallel" is the chunked
  form with a single chunk of length T (the WY form, O(T^2)). `form=None` (default): the fastest
  form measured for this backend and length (`select_delta_form`; on the CPU the token scan when not
  differentiated and the chunked form under autodiff, through a `custom_vjp`).
  `implementation` (`attnjax.ops.dispatch`): "reference" (the token scan), "xla" (the forms above),
  "pallas" (`pallas_kernels.linear.chunked_delta_rule`: no decay, `[H]` or `[B, T, H]` gates,
  segments, states; chunk_size a power of two >= 16; compiled on a GPU, interpret mode elsewhere)
  or None: `FORM_TABLE`'s "delta" row for the backend, the kernel on a CUDA GPU.
  """
  if form is not None and form not in DELTA_FORMS:
    raise ValueError(f"form must be None or one of {DELTA_FORMS}, got {form!r}")
  dispatch.check_implementation(implementation, op="delta_rule")
  b, t, h, dk, dv = check_causal_qkv(q, k, v, segment_ids, chunk_size)
  s0, _ = _check_state(initial_state, b, h, dk, dv, False)
  g, bt = _canonical(log_decay, jnp.asarray(beta), b, t, h)
  scale = dk ** -0.5 if scale is None else scale
  same = jnp.result_type(q) == jnp.result_type(k) == jnp.result_type(v)
  call = LinearCall(t=t, tk=t, decay="delta", causal=True, chunk_size=chunk_size,
                    dtype=str(jnp.result_type(q)) if same else "mixed q/k/v dtypes")
  dispatch.note("delta_rule", lambda be: _noted(
      *choose_implementation(implementation, call, form, be, forms=DELTA_FORMS)))
  impl, choice, _ = choose_implementation(implementation, call, form, forms=DELTA_FORMS)
  if impl == "pallas":
    from pallas_kernels.linear.delta import chunked_delta_rule  # heavy; lazily
    return chunked_delta_rule(q, k, v, jnp.asarray(beta), log_decay=log_decay, scale=scale,
                              initial_state=initial_state, output_final_state=output_final_state,
                              segment_ids=segment_ids, chunk_size=chunk_size)
  tr = lambda x: jnp.transpose(x, (0, 2, 1, 3)).astype(jnp.float32)
  qf, kf, vf = tr(q), tr(k), tr(v)
  runs = None if segment_ids is None else run_ids(segment_ids)
  run = functools.partial(_run_form, chunk_size=chunk_size, want_state=output_final_state)
  if choice.primal == choice.differentiated:
    o, s = run(choice.primal, qf, kf, vf, bt, g, s0, runs)
  else:
    o, s = split_forms(run, choice.primal, choice.differentiated, qf, kf, vf, bt, g, s0, runs)
  o = jnp.transpose(o * scale, (0, 2, 1, 3)).astype(q.dtype)
  return (o, s) if output_final_state else (o, None)


def delta_rule_step(q_t, k_t, v_t, beta_t, state, *, log_decay_t=None, scale=None):
  """One decode step of `delta_rule`: `q_t, k_t [B, H, Dk]`, `v_t [B, H, Dv]`, `beta_t [B, H]`,
  `log_decay_t` None, `[H]` or `[B, H]` -> `(o_t [B, H, Dv], new_state [B, H, Dk, Dv] float32)`."""
  if q_t.ndim != 3 or k_t.shape != q_t.shape or v_t.shape[:2] != q_t.shape[:2]:
    raise ValueError(f"q_t, k_t must be [B, H, Dk], v_t [B, H, Dv]; got {q_t.shape}, {k_t.shape}, {v_t.shape}")
  b, h, dk = q_t.shape
  dv = v_t.shape[-1]
  if tuple(beta_t.shape) != (b, h):
    raise ValueError(f"beta_t must be [B, H]={[b, h]}, got {list(beta_t.shape)}")
  s, _ = _check_state(state, b, h, dk, dv, False)
  if s is None:
    raise ValueError("state is required (zeros [B, H, Dk, Dv] float32 to start)")
  scale = dk ** -0.5 if scale is None else scale
  if log_decay_t is not None:
    g = jnp.asarray(log_decay_t, jnp.float32)
    if g.shape not in ((h,), (b, h)):
      raise ValueError(f"log_decay_t must be [H] or [B, H], got {list(g.shape)}")
    s = jnp.exp(jnp.broadcast_to(g, (b, h)))[..., None, None] * s
  qf, kf, vf = (x.astype(jnp.float32) for x in (q_t, k_t, v_t))
  u = beta_t.astype(jnp.float32)[..., None] * (vf - jnp.einsum("bhd,bhde->bhe", kf, s))
  s = s + kf[..., :, None] * u[..., None, :]
  return (jnp.einsum("bhd,bhde->bhe", qf, s) * scale).astype(q_t.dtype), s
