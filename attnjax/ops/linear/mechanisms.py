"""Mechanisms built on the engine whose output is not a single `q S` read-out (MALA, ...)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.ops.linear.engine import linear_attention, linear_attention_step


def _augment(v):
  return jnp.concatenate([v.astype(jnp.float32), jnp.ones_like(v[..., :1], jnp.float32)], axis=-1)


def mala_combine(num, den, vsum, count, dk):
  """MALA's read-out from running sums (see `mala_attention`); all float32, `[..., Dv]`/`[..., 1]`."""
  s = dk ** -0.5
  z = s * den / count
  return (1.0 + 1.0 / z) * s * num / count - z * vsum / count


def mala_attention(phi_q, phi_k, v, *, causal=True, segment_ids=None, initial_state=None,
                   output_final_state=False, form=None, chunk_size=64):
  """Magnitude-Aware Linear Attention (MALA (Fan et al. 2025, arXiv:2507.00698)) on `[B, T, H, D]` features (`phi = elu + 1`).

  `z_i = s phi(q_i) . mean_j phi(k_j)` with `s = Dk^{-1/2}`,
  `o_i = (1 + 1/z_i) s mean_j[(phi(q_i) . phi(k_j)) v_j] - z_i mean_j v_j`, so the implied
  weights `(1 + 1/z_i) s phi(q_i).phi(k_j)/N - z_i/N` sum exactly to 1 (the defining property) but
  keep the query magnitude. Means run over the whole segment (`causal=False`, the paper's vision
  setting) or over `j <= i` (`causal=True`, our reading for language models: prefix means with
  the prefix length N_i = i + 1). Computed with two engine passes: `[phi_q S, phi_q z]` and the
  running `[sum v, N]`. State: `(S [B, H, Dk, Dv+1], C [B, H, 1, Dv+1])`, float32.
  RoPE, LePE and the output gate of the paper's vision block are left to the layer (not used).
  """
  b, t, h, dk = phi_q.shape
  dv = v.shape[-1]
  va = _augment(v)
  s0, c0 = (None, None) if initial_state is None else initial_state
  kw = dict(causal=causal, segment_ids=segment_ids, output_final_state=True, form=form,
            chunk_size=chunk_size, scale=1.0)
  ones = jnp.ones((b, t, h, 1), jnp.float32)
  o1, s1 = linear_attention(phi_q.astype(jnp.float32), phi_k.astype(jnp.float32), va,
                            initial_state=s0, **kw)
  o2, s2 = linear_attention(ones, ones, va, initial_state=c0, **kw)
  o = mala_combine(o1[..., :dv], o1[..., dv:], o2[..., :dv], o2[..., dv:], dk)
  return o.astype(phi_q.dtype), ((s1, s2) if output_final_state else None)


def mala_step(phi_q_t, phi_k_t, v_t, state):
  """One causal MALA decode step, `[B, H, D]` inputs, state as returned by `mala_attention`."""
  dk = phi_q_t.shape[-1]
  va = _augment(v_t)
  ones = jnp.ones((*v_t.shape[:2], 1), jnp.float32)
  o1, s1 = linear_attention_step(phi_q_t.astype(jnp.float32), phi_k_t.astype(jnp.float32), va,
                                 state[0], scale=1.0)
  o2, s2 = linear_attention_step(ones, ones, va, state[1], scale=1.0)
  dv = v_t.shape[-1]
  o = mala_combine(o1[..., :dv], o1[..., dv:], o2[..., :dv], o2[..., dv:], dk)
  return o.astype(phi_q_t.dtype), (s1, s2)


# ----------------------------------------------------------------------------------------------
# LightNet (Qin et al. 2024, arXiv:2405.21022).


def _segment_logcumsumexp(x, runs):
  """`logcumsumexp` along axis 1 of `x [B, T, ...]`, restarted at every run change."""
  if runs is None:
    return jax.lax.cumlogsumexp(x, axis=1)
  starts = jnp.concatenate([jnp.ones_like(runs[:, :1], bool), runs[:, 1:] != runs[:, :-1]], axis=1)
  starts = starts.reshape(starts.shape + (1,) * (x.ndim - 2))
  starts = jnp.broadcast_to(starts, x.shape)

  def combine(a, b):
    fa, va = a
    fb, vb = b
    return fa | fb, jnp.where(fb, vb, jnp.logaddexp(va, vb))

  return jax.lax.associative_scan(combine, (starts, x), axis=1)[1]


def lightnet_attention(q, k, v, *, segment_ids=None, initial_state=None, output_final_state=False,
                       form=None, chunk_size=64):
  """LightNet's additive recurrence (Qin et al. 2024, arXiv:2405.21022) on `[B, T, H, D]` (q already activated, e.g. silu).

  `z_t = logcumsumexp_{s<=t}(k_s)` per key dimension, `k'_t = exp(k_t - z_t)`, log gate
  `g_t = z_{t-1} - z_t (<= 0)`, then GLA's `S_t = exp(g_t) S_{t-1} + k'_t^T v_t`, `o_t = q_t S_t`
  (no scale: the keys are already a softmax over the past). Equivalent to a per-dimension softmax
  over past keys: `o_t = sum_d q_td sum_{s<=t} softmax_{s<=t}(k_{., d})_s v_s`. Segments restart the
  log-cum-sum-exp. State: `(S [B, H, Dk, Dv], z [B, H, Dk])` float32, z = -inf when empty.
  """
  from attnjax.ops.linear.engine import run_ids  # local: avoid a cycle at import time
  b, t, h, dk = q.shape
  kf = k.astype(jnp.float32)
  runs = None if segment_ids is None else run_ids(segment_ids)
  if initial_state is not None:
    s0, zprev = initial_state
    # Fold the carried log-sum into the first segment: z_t = logaddexp(z_prev, lcse_t).
  else:
    s0, zprev = None, None
  z = _segment_logcumsumexp(kf, runs)
  if zprev is not None:
    first = jnp.ones((b, t), bool) if runs is None else runs == runs[:, :1]
    z = jnp.where(first[..., None, None], jnp.logaddexp(z, zprev[:, None]), z)
    z_before = jnp.concatenate([zprev[:, None], z[:, :-1]], axis=1)
  else:
    z_before = jnp.concatenate([jnp.full_like(z[:, :1], -jnp.inf), z[:, :-1]], axis=1)
  if runs is not None:
    starts = jnp.concatenate([jnp.zeros_like(runs[:, :1], bool), runs[:, 1:] != runs[:, :-1]], axis=1)
    z_before = jnp.where(starts[..., None, None], -jnp.inf, z_before)
  # g = z_{t-1} - z_t; 0 where the state is empty (z_{t-1} = -inf), where it multiplies zeros.
  g = jnp.where(jnp.isfinite(z_before), z_before - z, 0.0)
  g = jnp.minimum(g, 0.0)
  kp = jnp.exp(kf - z)
  o, s = linear_attention(q.astype(jnp.float32), kp, v, log_decay=g, scale=1.0, segment_ids=segment_ids,
                          initial_state=s0, output_final_state=True, form=form, chunk_size=chunk_size)
  return o.astype(q.dtype), ((s, z[:, -1]) if output_final_state else None)


# ----------------------------------------------------------------------------------------------
# Normalised non-causal / causal variants built from running sums.


def _sums(phi_q, phi_k, v, causal, segment_ids, form, chunk_size):
  """Running sums `num = phi_q . sum phi_k v^T`, `den = phi_q . sum phi_k`, `vsum`, `count`."""
  b, t, h, _ = phi_q.shape
  dv = v.shape[-1]
  va = _augment(v)
  kw = dict(causal=causal, segment_ids=segment_ids, form=form, chunk_size=chunk_size, scale=1.0)
  o1, _ = linear_attention(phi_q.astype(jnp.float32), phi_k.astype(jnp.float32), va, **kw)
  ones = jnp.ones((b, t, h, 1), jnp.float32)
  o2, _ = linear_attention(ones, ones, va, **kw)
  return o1[..., :dv], o1[..., dv:], o2[..., :dv], o2[..., dv:]


def inline_attention(phi_q, phi_k, v, *, scale=None, causal=False, segment_ids=None, form=None,
                     chunk_size=64):
  """InLine (injective linear) attention (Han et al. 2024, arXiv:2412.06590) as the authors' code (LeapLabTHU/InLine
  `models/inline_deit.py`, `InLineAttention.forward`): `o_i = phi_q_i (phi_k^T v) scale / N +
  (1 - scale phi_q_i . kbar) vbar`, `kbar, vbar` the means of `phi_k`, `v`, `scale = D^{-1/2}`
  (default). Implied weights `w_ij = scale (phi_q_i.phi_k_j - phi_q_i.kbar) / N + 1/N` sum to 1
  (may be negative). Means run over the segment (non-causal, the paper) or the prefix
  (`causal=True`, N_i = i + 1; our extension). The authors' `phi` is the identity (the layer
  applies it). The local residual belongs to the layer. `[B, T, H, D]`."""
  scale = phi_q.shape[-1] ** -0.5 if scale is None else scale
  num, den, vsum, count = _sums(phi_q, phi_k, v, causal, segment_ids, form, chunk_size)
  mean_v = vsum / count
  return (scale * (num - den * mean_v) / count + mean_v).astype(phi_q.dtype)


def linfusion_attention(phi_q, phi_k, v, *, eps=1e-4, causal=False, segment_ids=None,
                        form=None, chunk_size=64):
  """LinFusion's generalised linear attention (Liu et al. 2024, arXiv:2409.02097): `o = phi_q (phi_k^T v / N) / (phi_q . mean
  phi_k + eps)`, eps = 1e-4 (their code), phi = elu + 1 applied by the caller. `[B, T, H, D]`."""
  num, den, _, count = _sums(phi_q, phi_k, v, causal, segment_ids, form, chunk_size)
  return ((num / count) / (den / count + eps)).astype(phi_q.dtype)


def _seg_total(x, runs):
  """Per token, the sum of `x [B, T, ...]` over its segment (the whole row when `runs` is None)."""
  if runs is None:
    return jnp.broadcast_to(jnp.sum(x, axis=1, keepdims=True), x.shape)
  t = x.shape[1]
  tot = jax.vmap(lambda xb, rb: jax.ops.segment_sum(xb, rb, num_segments=t))(x, runs)
  return jax.vmap(lambda tb, rb: tb[rb])(tot, runs)


def _seg_max(x, runs):
  """Per token, the max of `x [B, T, ...]` over its segment."""
  if runs is None:
    return jnp.broadcast_to(jnp.max(x, axis=1, keepdims=True), x.shape)
  t = x.shape[1]
  mx = jax.vmap(lambda xb, rb: jax.ops.segment_max(xb, rb, num_segments=t))(x, runs)
  return jax.vmap(lambda tb, rb: tb[rb])(mx, runs)


def _seg_scan(x, runs, combine):
  """Inclusive scan of `x [B, T, ...]` along time with `combine`, restarted at each segment."""
  b, t = x.shape[:2]
  if runs is None:
    starts = jnp.zeros((b, t), bool)
  else:
    starts = jnp.concatenate([jnp.ones((b, 1), bool), runs[:, 1:] != runs[:, :-1]], axis=1)
  starts = jnp.broadcast_to(starts.reshape((b, t) + (1,) * (x.ndim - 2)), x.shape)

  def comb(a, c):
    fa, va = a
    fc, vc = c
    return fa | fc, jnp.where(fc, vc, combine(va, vc))

  return jax.lax.associative_scan(comb, (starts, x), axis=1)[1]


def rala_attention(phi_q, phi_k, v, *, scale=None, segment_ids=None):
  """RALA's rank-augmented linear attention (Fan et al. 2024, arXiv:2411.07635), non-causal (vision), `[B, N, H, D]`:
  `eff = softmax_j(s * mean_i(phi_q_i) . phi_k_j)`, `k'_j = phi_k_j * eff_j * N`,
  `o_i = phi_q_i (k'^T v / N) / (phi_q_i . mean_j k'_j)`, s = D^{-1/2}. RoPE, LePE and the gate of
  the vision block are left to the layer. `segment_ids [B, N]`: means, softmax and sums run over
  each token's own segment (N = its length)."""
  from attnjax.ops.linear.engine import run_ids  # local: avoid a cycle at import time
  d = phi_q.shape[-1]
  dv = v.shape[-1]
  scale = d ** -0.5 if scale is None else scale
  runs = None if segment_ids is None else run_ids(segment_ids)
  pq, pk, vf = (x.astype(jnp.float32) for x in (phi_q, phi_k, v))
  n = _seg_total(jnp.ones(pq.shape[:2], jnp.float32), runs)[..., None]          # [B, N, 1]
  qbar = _seg_total(pq, runs) / n[..., None]
  logits = scale * jnp.einsum("bjhd,bjhd->bjh", qbar, pk)
  e = jnp.exp(logits - jax.lax.stop_gradient(_seg_max(logits, runs)))
  eff = e / _seg_total(e, runs)
  kp = pk * (eff * n)[..., None]
  o, _ = linear_attention(pq, kp, _augment(vf), causal=False, segment_ids=segment_ids, scale=1.0)
  return (o[..., :dv] / o[..., dv:]).astype(phi_q.dtype)


def sla_attention(q, k, v, *, eps=1e-6, causal=False, segment_ids=None, initial_state=None,
                  output_final_state=False, form=None, chunk_size=64):
  """SLAB's simplified linear attention (Guo et al. 2024, arXiv:2405.11582) (without its depth-wise conv on V, which the layer
  adds): `o = relu(Q)(relu(K)^T V) / (relu(Q) . sum relu(K) + eps)`. All-zero rows give 0.
  Causal (prefix sums, our extension for language models) with `initial_state` /
  `output_final_state`: the state is `S [B, H, Dk, Dv + 1]` float32 (the last column is the key sum)."""
  dv = v.shape[-1]
  o, s = linear_attention(jax.nn.relu(q.astype(jnp.float32)), jax.nn.relu(k.astype(jnp.float32)),
                          _augment(v), causal=causal, segment_ids=segment_ids, scale=1.0,
                          initial_state=initial_state, output_final_state=output_final_state,
                          form=form, chunk_size=chunk_size)
  o = (o[..., :dv] / (o[..., dv:] + eps)).astype(q.dtype)
  return (o, s) if output_final_state else o


def sla_step(q_t, k_t, v_t, state, *, eps=1e-6):
  """One causal `sla_attention` decode step: `[B, H, D]` inputs, state `S [B, H, Dk, Dv + 1]`."""
  dv = v_t.shape[-1]
  o, s = linear_attention_step(jax.nn.relu(q_t.astype(jnp.float32)), jax.nn.relu(k_t.astype(jnp.float32)),
                               _augment(v_t), state, scale=1.0)
  return (o[..., :dv] / (o[..., dv:] + eps)).astype(q_t.dtype), s


def lina_attention(phi_q, phi_k, v, kv_gate, *, eps=1e-6, segment_ids=None):
  """LINA's bidirectional gated linear attention (Wang et al. 2026, arXiv:2601.22630) (reading: the data-independent per-token
  memory weight `g_j > 0` scales key j in numerator and denominator):
  `o_i = sum_j g_j phi_q_i.phi_k_j v_j / (sum_j g_j phi_q_i.phi_k_j + eps)`; `kv_gate [N]` or
  `[B, N, H]`. g = 1 is plain normalised linear attention; weights sum to 1."""
  g = jnp.asarray(kv_gate, jnp.float32)
  if g.ndim == 1:
    g = g[None, :, None]
  num, den, _, _ = _sums(phi_q, phi_k * g[..., None], v, False, segment_ids, "chunked", 64)
  return (num / (den + eps)).astype(phi_q.dtype)


def flow_attention(q, k, v, *, causal=False, eps=1e-6, segment_ids=None):
  """Flowformer's Flow-Attention (Wu et al. 2022, arXiv:2202.06258) with `phi = sigmoid`, `[B, N, H, D]`, as the authors' code
  (thuml/Flowformer `Flow_Attention.py`, classes `Flow_Attention` and `Flow_Attention_Causal`).

  Non-causal: incoming `I_i = phi_q_i . sum_j phi_k_j`, outgoing `O_j = phi_k_j . sum_i phi_q_i`;
  conserved `Ihat_i = phi_q_i . sum_j phi_k_j / O_j`, `Ohat_j = clamp(phi_k_j . sum_i phi_q_i / I_i,
  -1, 1)` (the authors' stability clamp); competition `Vhat = N softmax_j(Ohat) (.) V`;
  aggregation `R = phi_q (phi_k^T Vhat) / I`; allocation `out = sigmoid(Ihat) (.) R`.
  Causal: the sums run over the prefix and, with `n_i = i + 1` (the authors' `normal`: a prefix
  sum of n_i terms is rescaled to the size of a full one), `Ihat_i = phi_q_i . sum_{j<=i} n_j
  phi_k_j / O_j / n_i`, `Ohat_i = clamp(phi_k_i . sum_{j<=i} n_j phi_q_j / I_j / n_i, -1, 1)` and the
  competition is `n_i exp(Ohat_i) / sum_{j<=i} exp(Ohat_j)`. `eps` sits where the authors put it
  (on each feature and each sum). `segment_ids [B, N]`: every sum, count (n) and softmax runs
  within the token's segment. `flow_step` is the causal form one token at a time.
  """
  from attnjax.ops.linear.engine import run_ids  # local: avoid a cycle at import time
  pq, pk = jax.nn.sigmoid(q.astype(jnp.float32)), jax.nn.sigmoid(k.astype(jnp.float32))
  vf = v.astype(jnp.float32)
  runs = None if segment_ids is None else run_ids(segment_ids)
  if causal:
    agg = lambda x: _seg_scan(x, runs, jnp.add)
  else:
    agg = lambda x: _seg_total(x, runs)
  cnt = agg(jnp.ones(q.shape[:3], jnp.float32))                 # segment length / prefix length
  normal = cnt if causal else jnp.ones_like(cnt)
  dot = lambda a, b_: jnp.einsum("bihd,bihd->bih", a, b_)
  incoming = dot(pq + eps, agg(pk) + eps)
  outgoing = dot(pk + eps, agg(pq) + eps)
  cons_in = dot(pq + eps, agg(pk * (normal / outgoing)[..., None]) + eps) / normal
  cons_out = dot(pk + eps, agg(pq * (normal / incoming)[..., None]) + eps) / normal
  cons_out = jnp.clip(cons_out, -1.0, 1.0)
  if causal:
    # Prefix softmax: a segmented scan of (running max, sum of exp(. - max)).
    def comb(a, c):
      return jnp.stack(_lse_combine((a[..., 0], a[..., 1]), (c[..., 0], c[..., 1])), axis=-1)
    ml = _seg_scan(jnp.stack([cons_out, jnp.ones_like(cons_out)], axis=-1), runs, comb)
    comp = cnt * jnp.exp(cons_out - ml[..., 0]) / ml[..., 1]
  else:
    e = jnp.exp(cons_out - jax.lax.stop_gradient(_seg_max(cons_out, runs)))
    comp = cnt * e / _seg_total(e, runs)
  vhat = vf * comp[..., None]
  o, _ = linear_attention(pq, pk, vhat, scale=1.0, causal=causal, segment_ids=segment_ids)
  r = o / incoming[..., None]
  return (jax.nn.sigmoid(cons_in)[..., None] * r).astype(q.dtype)


def _lse_combine(a, c):
  """Merges two (max, sum of exp(x - max)) pairs."""
  ma, sa = a
  mc, sc = c
  mm = jnp.maximum(ma, mc)
  return mm, sa * jnp.exp(ma - mm) + sc * jnp.exp(mc - mm)


def flow_init_state(batch_size: int, num_heads: int, dk: int, dv: int):
  """Zero state of `flow_step`: prefix sums of phi_k, phi_q, n phi_k / O, n phi_q / I `[B, H, Dk]`,
  the competition's running (max, sum) `[B, H]`, the count `[B, H]` and `S [B, H, Dk, Dv]`."""
  z = lambda *s: jnp.zeros(s, jnp.float32)
  return dict(spk=z(batch_size, num_heads, dk), spq=z(batch_size, num_heads, dk),
              spk_o=z(batch_size, num_heads, dk), spq_i=z(batch_size, num_heads, dk),
              m=jnp.full((batch_size, num_heads), -jnp.inf, jnp.float32), l=z(batch_size, num_heads),
              n=z(batch_size, num_heads), s=z(batch_size, num_heads, dk, dv))


def flow_step(q_t, k_t, v_t, state, *, eps=1e-6):
  """One causal Flow-Attention step (the causal `flow_attention`, with the authors' `normal = n`
  rescaling and clamp), `q_t, k_t [B, H, Dk]`, `v_t [B, H, Dv]` -> `(o_t, state)`."""
  pq, pk = jax.nn.sigmoid(q_t.astype(jnp.float32)), jax.nn.sigmoid(k_t.astype(jnp.float32))
  st = dict(state)
  st["spk"], st["spq"], st["n"] = st["spk"] + pk, st["spq"] + pq, st["n"] + 1.0
  dot = lambda a, b_: jnp.sum(a * b_, axis=-1)
  incoming = dot(pq + eps, st["spk"] + eps)
  outgoing = dot(pk + eps, st["spq"] + eps)
  n = st["n"]
  st["spk_o"] = st["spk_o"] + pk * (n / outgoing)[..., None]
  st["spq_i"] = st["spq_i"] + pq * (n / incoming)[..., None]
  cons_in = dot(pq + eps, st["spk_o"] + eps) / n
  cons_out = jnp.clip(dot(pk + eps, st["spq_i"] + eps) / n, -1.0, 1.0)
  m_prev = st["m"]
  mm = jnp.maximum(m_prev, cons_out)
  st["m"] = mm
  st["l"] = st["l"] * jnp.exp(jnp.where(jnp.isfinite(m_prev), m_prev - mm, -jnp.inf)) + jnp.exp(cons_out - mm)
  vhat = v_t.astype(jnp.float32) * (st["n"] * jnp.exp(cons_out - mm) / st["l"])[..., None]
  st["s"] = st["s"] + pk[..., :, None] * vhat[..., None, :]
  r = jnp.einsum("bhd,bhde->bhe", pq, st["s"]) / incoming[..., None]
  return (jax.nn.sigmoid(cons_in)[..., None] * r).astype(q_t.dtype), st
