"""Intra-layer hybrids of softmax and linear attention.

* `window_linear_attention`: LoLCATs (Zhang et al. 2024, arXiv:2410.10254) sliding-window softmax + linear attention over the older
  tokens, one shared normaliser (the STILL (Meng et al. 2026, arXiv:2602.02180) formula with the selected set = the window);
* `nats_attention`: NAtS-L (Deng et al. 2026, arXiv:2602.03681) routed hybrid: each chunk of tokens is kept for softmax attention
  or written into a Gated-DeltaNet state (one decision per chunk, acting once the chunk is
  complete), and the two read-outs are added.

All on `[B, T, H, D]`, causal (both are language-model mechanisms), with packed `segment_ids`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.ops.linear.delta import delta_rule, delta_rule_step
from attnjax.ops.linear.engine import linear_attention, run_ids
from attnjax.ops.softmax import dot_product_attention

WINDOW_FORMS = ("parallel", "chunked", "recurrent")


def _factor(f, h):
  """Scalar or `[H]` mixing factor -> `[1, 1, H, 1]`-broadcastable float32 over `[B, T, H, .]`."""
  f = jnp.asarray(f, jnp.float32)
  if f.ndim == 0:
    return jnp.broadcast_to(f, (h,))
  if f.shape != (h,):
    raise ValueError(f"window_factor / linear_factor must be a scalar or [H]={[h]}, got {list(f.shape)}")
  return f


def _check_window_inputs(q, k, v, phi_q, phi_k, window, segment_ids):
  if q.ndim != 4 or k.shape != q.shape:
    raise ValueError(f"q, k must be [B, T, H, D] of one shape, got {q.shape}, {k.shape}")
  b, t, h, _ = q.shape
  if v.ndim != 4 or v.shape[:3] != (b, t, h):
    raise ValueError(f"v must be [B, T, H, Dv] with [B, T, H]={[b, t, h]}, got {list(v.shape)}")
  if phi_q.ndim != 4 or phi_q.shape[:3] != (b, t, h) or phi_k.shape != phi_q.shape:
    raise ValueError(f"phi_q, phi_k must be [B, T, H, F] with [B, T, H]={[b, t, h]}, got "
                     f"{list(phi_q.shape)}, {list(phi_k.shape)}")
  if not isinstance(window, int) or window < 1:
    raise ValueError(f"window must be an int >= 1 (keys i - window < j <= i use softmax), got {window!r}")
  if segment_ids is not None and tuple(segment_ids.shape) != (b, t):
    raise ValueError(f"segment_ids must be [B, T]={[b, t]}, got {list(segment_ids.shape)}")


def _window_dense(q, k, v, pq, pk, window, wf, lf, scale, segment_ids):
  """The dense masked reference `[B, H, T, T]` (see `window_linear_attention`)."""
  t = q.shape[1]
  i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  same = jnp.ones((1, 1, t, t), bool)
  if segment_ids is not None:
    same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  win = same & (j <= i) & (j > i - window)
  lin = same & (j <= i - window)
  s = jnp.einsum("bihd,bjhd->bhij", q, k) * scale
  s = jnp.where(win, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)           # finite: the diagonal is always in the window
  e = wf[None, :, None, None] * jnp.exp(s - m)
  a = e + jnp.where(lin, lf[None, :, None, None] * jnp.einsum("bihf,bjhf->bhij", pq, pk), 0.0)
  o = jnp.einsum("bhij,bjhe->bihe", a, v)
  return o / jnp.sum(a, axis=-1)[..., None].transpose(0, 2, 1, 3)


def _banded_scores(q, k, v, seg, window, chunk_size, scale, q_seg=None, k_seg=None):
  """Causal banded scores: query blocks of `chunk_size` against the `chunk_size + window` keys
  before them (O(T (c + w)) memory). `q, k [B, T, H, D]`, `v [B, T, H, Dv]`, `seg [B, T]` int.
  Key j is visible to query i iff `i - window < j <= i` and their segment ids agree (`q_seg` /
  `k_seg` override `seg` per side, e.g. to hide keys). Returns `(s [b, n, h, c, K]` scaled scores
  (-inf where hidden), `vb [b, n, K, h, Dv]`, `visible [b, n, h?, c, K]`, `tp` padded length)."""
  b, t, h, d = q.shape
  c = chunk_size
  nb = -(-(window - 1) // c)                        # look-back blocks covering the window
  n = -(-t // c)
  tp = n * c
  q_seg = seg if q_seg is None else q_seg
  k_seg = seg if k_seg is None else k_seg
  padt = lambda x, front, val=0.0: jnp.pad(x, ((0, 0), (front, tp - t)) + ((0, 0),) * (x.ndim - 2),
                                            constant_values=val)
  qb = padt(q, 0).reshape(b, n, c, h, d)
  qpos = jnp.arange(tp).reshape(n, c)
  qseg = padt(q_seg, 0, -2).reshape(b, n, c)
  kpad, vpad = padt(k, nb * c), padt(v, nb * c)
  kseg = padt(k_seg, nb * c, -1)
  # Keys of query block i: padded blocks i .. i + nb (original blocks i - nb .. i).
  gather = lambda x: jnp.concatenate(
      [x[:, r * c:(r + n) * c].reshape(b, n, c, *x.shape[2:]) for r in range(nb + 1)], axis=2)
  kb, vb, ksb = gather(kpad), gather(vpad), gather(kseg)          # [b, n, (nb+1) c, ...]
  kpos = jnp.concatenate([(jnp.arange(n)[:, None] + r - nb) * c + jnp.arange(c)[None, :]
                          for r in range(nb + 1)], axis=1)         # [n, (nb+1) c]
  win = ((kpos[:, None, :] <= qpos[:, :, None]) & (kpos[:, None, :] > qpos[:, :, None] - window))
  win = win[None, :, None] & (ksb[:, :, None, None, :] == qseg[:, :, None, :, None])
  s = jnp.einsum("bnihd,bnjhd->bnhij", qb, kb) * scale
  return jnp.where(win, s, -jnp.inf), vb, win, tp


def _shifted_linear(pq, pk, v, window, seg, segment_ids, form, chunk_size):
  """Linear terms of the keys older than the window: `(num [B, T, H, Dv], den [B, T, H])` with
  `num_i = sum_{j <= i - window, same segment} (pq_i . pk_j) v_j` (and `den` without `v_j`).
  Key j reaches query i iff j <= i - window: shift keys and values right by `window` and run the
  causal engine with the queries' segment ids."""
  b, t, h, _ = v.shape
  dv = v.shape[-1]
  if window >= t:
    return 0.0, 0.0
  keep = (seg[:, window:] == seg[:, :-window])[..., None, None]
  sh = lambda x: jnp.pad(jnp.where(keep, x[:, :-window], 0.0), ((0, 0), (window, 0), (0, 0), (0, 0)))
  va = jnp.concatenate([v.astype(jnp.float32), jnp.ones((b, t, h, 1), jnp.float32)], axis=-1)
  o_lin, _ = linear_attention(pq, sh(pk), sh(va), scale=1.0, causal=True, segment_ids=segment_ids,
                              form=form, chunk_size=chunk_size)
  return o_lin[..., :dv], o_lin[..., dv]


def _window_blocked(q, k, v, pq, pk, window, wf, lf, scale, segment_ids, form, chunk_size):
  """Blocked window softmax (O(T (c + w)) scores) + the engine for the linear part."""
  b, t, h, d = q.shape
  dv = v.shape[-1]
  c = chunk_size
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  s, vb, _, tp = _banded_scores(q, k, v, seg, window, c, scale)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)            # padded query rows only
  e = wf[None, None, :, None, None] * jnp.exp(s - m)
  num_w = jnp.einsum("bnhij,bnjhe->bnihe", e, vb).reshape(b, tp, h, dv)[:, :t]
  den_w = jnp.sum(e, axis=-1).transpose(0, 1, 3, 2).reshape(b, tp, h)[:, :t]
  num_l, den_l = _shifted_linear(pq, pk, v, window, seg, segment_ids, form, c)
  lfb = lf[None, None, :]
  return (num_w + lfb[..., None] * num_l) / (den_w + lfb * den_l)[..., None]


def window_linear_init_cache(batch_size: int, window: int, num_heads: int, head_dim: int,
                             feature_dim: int, value_dim: int):
  """Decode cache of `window_linear_step`: the last `window` keys/values/features in a ring
  buffer, the linear state `(S [B, H, F, Dv], z [B, H, F])` of the tokens that left the window,
  and the position within the sequence. All float32."""
  z = lambda *s: jnp.zeros(s, jnp.float32)
  return dict(k=z(batch_size, window, num_heads, head_dim), v=z(batch_size, window, num_heads, value_dim),
              pk=z(batch_size, window, num_heads, feature_dim),
              valid=jnp.zeros((batch_size, window), bool),
              s=z(batch_size, num_heads, feature_dim, value_dim), z=z(batch_size, num_heads, feature_dim),
              pos=jnp.zeros((batch_size,), jnp.int32))


def window_linear_step(q_t, k_t, v_t, phi_q_t, phi_k_t, cache, *, window_factor=1.0,
                       linear_factor=1.0, scale=None, reset=None):
  """One decode step of `window_linear_attention`: `q_t, k_t [B, H, D]`, `v_t [B, H, Dv]`,
  `phi_* [B, H, F]`, `cache` from `window_linear_init_cache` -> `(o_t [B, H, Dv], cache)`.

  The token leaving the window (position p - window) is folded into `(S, z)`, the new one takes
  its ring slot. `reset [B]` bool clears the cache first (a new packed sequence). O(window) per token.
  """
  b, h, d = q_t.shape
  w = cache["k"].shape[1]
  if cache["k"].shape != (b, w, h, d) or cache["pk"].shape[-1] != phi_k_t.shape[-1]:
    raise ValueError(f"cache does not match q_t [B, H, D]={[b, h, d]} / phi_k_t {list(phi_k_t.shape)}")
  scale = d ** -0.5 if scale is None else scale
  wf, lf = _factor(window_factor, h), _factor(linear_factor, h)
  f32 = lambda x: x.astype(jnp.float32)
  if reset is not None:
    cache = {key: jnp.where(reset.reshape((b,) + (1,) * (val.ndim - 1)), jnp.zeros_like(val), val)
             for key, val in cache.items()}
  slot = cache["pos"] % w                                           # [B]
  onehot = jax.nn.one_hot(slot, w, dtype=jnp.float32)               # [B, W]
  old = (onehot * cache["valid"])                                    # evicted token (if any)
  old_pk = jnp.einsum("bw,bwhf->bhf", old, cache["pk"])
  old_v = jnp.einsum("bw,bwhe->bhe", old, cache["v"])
  s = cache["s"] + old_pk[..., :, None] * old_v[..., None, :]
  z = cache["z"] + old_pk
  put = lambda buf, x: jnp.where(onehot.astype(bool)[:, :, None, None], f32(x)[:, None], buf)
  kbuf, vbuf, pkbuf = put(cache["k"], k_t), put(cache["v"], v_t), put(cache["pk"], phi_k_t)
  valid = cache["valid"] | onehot.astype(bool)
  sc = jnp.einsum("bhd,bwhd->bhw", f32(q_t), kbuf) * scale
  sc = jnp.where(valid[:, None], sc, -jnp.inf)
  m = jnp.max(sc, axis=-1, keepdims=True)
  e = wf[None, :, None] * jnp.exp(sc - m)
  pq = f32(phi_q_t)
  num = jnp.einsum("bhw,bwhe->bhe", e, vbuf) + lf[None, :, None] * jnp.einsum("bhf,bhfe->bhe", pq, s)
  den = jnp.sum(e, axis=-1) + lf[None] * jnp.einsum("bhf,bhf->bh", pq, z)
  new = dict(k=kbuf, v=vbuf, pk=pkbuf, valid=valid, s=s, z=z, pos=cache["pos"] + 1)
  return (num / den[..., None]).astype(q_t.dtype), new


def window_linear_attention(q, k, v, phi_q, phi_k, *, window: int, window_factor=1.0,
                            linear_factor=1.0, scale=None, segment_ids=None, form="chunked",
                            chunk_size: int = 64):
  """LoLCATs (Zhang et al. 2024, arXiv:2410.10254) hybrid: sliding-window softmax + linear attention, one shared normaliser (causal).

  `q, k [B, T, H, D]` (softmax scores `s_ij = scale q_i.k_j`, scale = D^-1/2), `phi_q, phi_k
  [B, T, H, F]` (feature maps already applied, e.g. Hedgehog), `v [B, T, H, Dv]`. With the window
  `W_i = {i - window < j <= i}` and `m_i = max_{j in W_i} s_ij`:

      o_i = (wf sum_{j in W_i} e^{s_ij - m_i} v_j + lf sum_{j <= i - window} phi_q_i.phi_k_j v_j)
            / (wf sum_{j in W_i} e^{s_ij - m_i}   + lf sum_{j <= i - window} phi_q_i.phi_k_j)

  as in the authors' code (`linear_window_attention_sw.py`; the `_tk` variant's block-terraced
  window is a kernel convenience not reproduced): the max is subtracted from the softmax terms
  only, `wf = window_factor` (LoLCATs: sigmoid of a learned per-head logit, 0.1 at init) and
  `lf = linear_factor` (1 in LoLCATs), scalars or `[H]`. STILL (Meng et al. 2026, arXiv:2602.02180) uses the same shared-normaliser
  formula with a different softmax set (top-k salient tokens); that selection is not implemented.
  `window >= T` is exact softmax attention (the defining property). `segment_ids [B, T]`: packed
  sequences, nothing crosses a boundary.

  `form`: "parallel" (dense [T, T] masked reference), "chunked" (window softmax in query blocks of
  `chunk_size` against `chunk_size + window` keys, linear part by the chunked engine on keys shifted
  by `window`: O(T (chunk + window)) memory), "recurrent" (a scan of `window_linear_step`, the
  decode semantics). All agree in values and gradients. Returns `o [B, T, H, Dv]` in q's dtype.
  """
  if form not in WINDOW_FORMS:
    raise ValueError(f"form must be one of {WINDOW_FORMS}, got {form!r}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
  _check_window_inputs(q, k, v, phi_q, phi_k, window, segment_ids)
  b, t, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  wf, lf = _factor(window_factor, h), _factor(linear_factor, h)
  f32 = lambda x: x.astype(jnp.float32)
  args = (f32(q), f32(k), f32(v), f32(phi_q), f32(phi_k))
  if form == "parallel":
    o = _window_dense(*args, window, wf, lf, scale, segment_ids)
  elif form == "chunked":
    o = _window_blocked(*args, window, wf, lf, scale, segment_ids, "chunked", chunk_size)
  else:
    cache = window_linear_init_cache(b, window, h, d, phi_q.shape[-1], v.shape[-1])
    if segment_ids is None:
      reset = jnp.zeros((t, b), bool)
    else:
      reset = jnp.concatenate([jnp.zeros((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1).T
    mv = lambda x: jnp.moveaxis(x, 1, 0)

    def step(cache, xs):
      qt, kt, vt, pqt, pkt, rt = xs
      o, cache = window_linear_step(qt, kt, vt, pqt, pkt, cache, window_factor=wf,
                                    linear_factor=lf, scale=scale, reset=rt)
      return cache, o

    _, o = jax.lax.scan(step, cache, tuple(mv(a) for a in args) + (reset,))
    o = mv(o)
  return o.astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# NAtS-L (Deng et al. 2026, arXiv:2602.03681).


NATS_FORMS = ("parallel", "chunked")


def straight_through(p: jax.Array, threshold: float = 0.5) -> jax.Array:
  """Hard `p > threshold` in the forward pass, gradient of `p` in the backward (straight-through)."""
  hard = (p > threshold).astype(p.dtype)
  return hard + p - jax.lax.stop_gradient(p)


def _nats_gdn_scan(q_lin, k_lin, v, beta, log_decay, r_prev, chunk_start, seg_start, carry, scale):
  """The GDN branch of NAtS-L, token by token (`[B, T, ...]` inputs). `carry = (S_cur, S_commit)`:
  `S_cur` includes the current chunk's writes, `S_commit` only the committed chunks (decayed every
  step). At a chunk start the previous chunk's decision `r_prev [B, T]` (1 = softmax) picks the
  state the new chunk starts from: `r S_commit + (1 - r) S_cur`; a segment start resets both."""
  b, t, h, _ = q_lin.shape
  ld = jnp.zeros((b, t, h), jnp.float32) if log_decay is None else log_decay.astype(jnp.float32)
  mv = lambda a: jnp.moveaxis(a, 1, 0)

  def step(st, xs):
    s_cur, s_commit = st
    qt, kt, vt, bt, gt, rp, cs, ss = xs
    r = rp.astype(jnp.float32)[:, None, None, None]
    at_cs = (cs & ~ss)[:, None, None, None]
    base = jnp.where(at_cs, r * s_commit + (1.0 - r) * s_cur, s_cur)
    commit = jnp.where(at_cs, base, s_commit)
    keep = (~ss)[:, None, None, None]
    base, commit = jnp.where(keep, base, 0.0), jnp.where(keep, commit, 0.0)
    o, s_new = delta_rule_step(qt, kt, vt, bt, base, log_decay_t=gt, scale=scale)
    return (s_new, commit * jnp.exp(gt)[..., None, None]), o

  xs = tuple(mv(a) for a in (q_lin, k_lin, v, beta.astype(jnp.float32), ld, r_prev, chunk_start, seg_start))
  carry, o = jax.lax.scan(step, carry, xs)
  return mv(o), carry


def nats_attention(q, k, v, beta, route, *, route_chunk: int, q_lin=None, k_lin=None, log_decay=None,
                   scale=None, segment_ids=None, form="chunked", chunk_size: int = 64):
  """NAtS-L (Deng et al. 2026, arXiv:2602.03681) chunk-routed hybrid of causal softmax attention and Gated DeltaNet.

  Chunks are `route_chunk` positions counted from each segment's start; each chunk gets ONE
  decision, read from `route [B, T]` at the chunk's last token (1 = its tokens go to the softmax
  KV cache, 0 = into the GDN state; forward values 0/1, e.g. `straight_through(p)` of the router on
  the chunk's mean pool). As the authors' layer (automl/NeuralAttentionSearchLinear
  `layers/natsl_attn_gdn.py` with its defaults `ops_for_incomplete_chunks='gated_delta_net'`,
  `incomplete_block_start_with_ht=True`, `decay_for_non_gdn_blocks=True`), a chunk's decision
  only acts once the chunk is complete, so no query sees the future:

      o_i = softmax of q_i over {j in earlier chunks of i's segment whose decision is 1}
          + GDN read-out of q_lin_i from the state that starts i's chunk (the committed
            GDN chunks, decayed through every step) updated by i's own chunk up to i.

  The decision reaches the router's gradient through `v_j route_j` (softmax) and the chunk-start
  state `r S_commit + (1 - r) S_cur` (GDN). Our reading leaves out the authors' per-head routing,
  separate attention head count and output weights (`nats_out_weights_layer`): the read-outs are
  added. `q, k [B, T, H, D]`, `v [B, T, H, Dv]`, `beta [B, T, H]`, `log_decay [B, T, H]`.
  `form`: "parallel" (dense masked softmax) or "chunked" (the softmax op with a block mask); the
  GDN branch is a scan over tokens in both (`chunk_size` is accepted for the layer's API).
  """
  del chunk_size
  if form not in NATS_FORMS:
    raise ValueError(f"form must be one of {NATS_FORMS}, got {form!r}")
  if q.ndim != 4:
    raise ValueError(f"q must be [B, T, H, D], got {q.shape}")
  b, t, h, d = q.shape
  if tuple(route.shape) != (b, t):
    raise ValueError(f"route must be [B, T]={[b, t]} (per token, shared by the heads), got {list(route.shape)}")
  if segment_ids is not None and tuple(segment_ids.shape) != (b, t):
    raise ValueError(f"segment_ids must be [B, T]={[b, t]}, got {list(segment_ids.shape)}")
  if not isinstance(route_chunk, int) or route_chunk < 1:
    raise ValueError(f"route_chunk must be an int >= 1, got {route_chunk!r}")
  scale = d ** -0.5 if scale is None else scale
  q_lin = q if q_lin is None else q_lin
  k_lin = k if k_lin is None else k_lin
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else run_ids(segment_ids)
  pos = _positions_in_segment(b, t, segment_ids)
  chunk = pos // route_chunk
  # Each key's chunk decision: `route` at the chunk's last token (if the chunk completes here).
  end = jnp.arange(t)[None, :] + (route_chunk - 1 - pos % route_chunk)
  end_c = jnp.minimum(end, t - 1)
  complete = (end < t) & (jnp.take_along_axis(seg, end_c, axis=1) == seg)
  r = route.astype(jnp.float32)
  r_key = jnp.where(complete, jnp.take_along_axis(r, end_c, axis=1), 0.0)
  vr = (v.astype(jnp.float32) * r_key[..., None, None]).astype(v.dtype)
  mask = ((seg[:, :, None] == seg[:, None, :]) & (chunk[:, None, :] < chunk[:, :, None])
          & (r_key[:, None, :] > 0.5))[:, None]                            # [B, 1, Tq, Tk]
  if form == "parallel":
    sc = jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    sc = jnp.where(mask, sc, -jnp.inf)
    m = jnp.max(sc, axis=-1, keepdims=True)
    p = jnp.exp(sc - jnp.where(jnp.isfinite(m), m, 0.0))
    den = jnp.sum(p, axis=-1, keepdims=True)
    o_sm = jnp.einsum("bhij,bjhe->bihe", p / jnp.where(den > 0, den, 1.0), vr.astype(jnp.float32))
  else:
    o_sm = dot_product_attention(q, k, vr, mask=mask, scale=scale,
                                 implementation="xla").astype(jnp.float32)
  r_prev = jnp.concatenate([jnp.zeros((b, 1), jnp.float32), r[:, :-1]], axis=1)
  seg_start = pos == 0
  chunk_start = (pos % route_chunk) == 0
  dk, dv = q_lin.shape[-1], v.shape[-1]
  zero = jnp.zeros((b, h, dk, dv), jnp.float32)
  o_lin, _ = _nats_gdn_scan(q_lin, k_lin, v, beta, log_decay, r_prev, chunk_start, seg_start,
                            (zero, zero), None)
  return (o_sm + o_lin.astype(jnp.float32)).astype(q.dtype)


def chunk_prefix_mean(x, chunk_size: int, *, segment_ids=None, start_pos=None, carry=None):
  """Causal per-chunk mean pool: token t gets the mean of its chunk's tokens up to t.

  `x [B, T, C]`; chunks are `chunk_size` positions counted from each segment's start (or from
  `start_pos [B]` with the carried partial-chunk sum `carry [B, C]`, for decoding). Returns
  `(mean [B, T, C] float32, sum of the last token's partial chunk [B, C])`. At a chunk's last token
  this is NAtS-L's chunk mean pool; earlier tokens see only the chunk's prefix (causal).
  """
  b, t, _ = x.shape
  xf = x.astype(jnp.float32)
  tpos = jnp.arange(t)[None, :]
  if segment_ids is not None:
    runs = run_ids(segment_ids)
    first = jnp.concatenate([jnp.ones((b, 1), bool), runs[:, 1:] != runs[:, :-1]], axis=1)
    seg_start = jax.lax.cummax(jnp.where(first, tpos, 0), axis=1)
    pos = tpos - seg_start
  else:
    pos = jnp.broadcast_to(tpos, (b, t))
  if start_pos is not None:
    pos = pos + start_pos[:, None]
  restart = (pos % chunk_size) == 0
  if carry is not None:
    xf = xf.at[:, 0].add(jnp.where(restart[:, 0, None], 0.0, carry.astype(jnp.float32)))

  def comb(a, c):
    ra, va = a
    rc, vc = c
    return ra | rc, jnp.where(rc[..., None], vc, va + vc)

  _, sums = jax.lax.associative_scan(comb, (restart, xf), axis=1)
  count = (pos % chunk_size + 1).astype(jnp.float32)[..., None]
  return sums / count, sums[:, -1]


def nats_init_cache(batch_size: int, max_len: int, num_heads: int, head_dim: int, value_dim: int,
                    d_model: int):
  """Decode cache of the NAtS-L layer: the KV cache with each position's softmax decision (set
  when its chunk completes), the GDN states `s` (current) and `s_commit`, the last token's route,
  the partial-chunk sum of the router's mean pool and the position."""
  z = lambda *s: jnp.zeros(s, jnp.float32)
  return dict(k=z(batch_size, max_len, num_heads, head_dim), v=z(batch_size, max_len, num_heads, value_dim),
              kept=jnp.zeros((batch_size, max_len), bool),
              s=z(batch_size, num_heads, head_dim, value_dim),
              s_commit=z(batch_size, num_heads, head_dim, value_dim), r_last=z(batch_size),
              pool=z(batch_size, d_model), pos=jnp.zeros((), jnp.int32))


def nats_decode(q, k, v, beta, route, cache, *, route_chunk: int, q_lin=None, k_lin=None,
                log_decay=None, scale=None):
  """Decode `T >= 1` tokens with `nats_attention`'s semantics from `cache` (see `nats_init_cache`).

  Writes k, v at `pos .. pos + T`; every chunk that completes among the new tokens gets its
  decision (route at its last token) on all its cached positions; softmax over cached keys of
  earlier chunks with decision 1; the GDN branch continues the token scan from the cached states.
  Returns `(o [B, T, H, Dv], cache)`; the router's pool sum is updated by the caller.
  """
  b, t, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  q_lin = q if q_lin is None else q_lin
  k_lin = k if k_lin is None else k_lin
  max_len = cache["k"].shape[1]
  pos = cache["pos"]
  r = route.astype(jnp.float32)
  upd = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), pos, axis=1)
  kc, vc = upd(cache["k"], k), upd(cache["v"], v)
  j = jnp.arange(max_len)
  end = (j // route_chunk) * route_chunk + route_chunk - 1
  idx = end - pos
  decided = (idx >= 0) & (idx < t)
  r_end = jnp.take(r, jnp.clip(idx, 0, t - 1), axis=1)                      # [B, max_len]
  kept = jnp.where(decided[None], r_end > 0.5, cache["kept"])
  qpos = pos + jnp.arange(t)
  mask = ((j[None, :] // route_chunk) < (qpos[:, None] // route_chunk))[None, None] & kept[:, None, None, :]
  vk = vc * kept[:, :, None, None].astype(vc.dtype)
  o_sm = dot_product_attention(q.astype(jnp.float32), kc, vk, mask=mask, scale=scale,
                               implementation="xla")
  r_prev = jnp.concatenate([cache["r_last"][:, None], r[:, :-1]], axis=1)
  pb = jnp.broadcast_to(qpos[None], (b, t))
  o_lin, (s, s_commit) = _nats_gdn_scan(q_lin, k_lin, v, beta, log_decay, r_prev,
                                        pb % route_chunk == 0, pb == 0,
                                        (cache["s"], cache["s_commit"]), None)
  new = dict(cache, k=kc, v=vc, kept=kept, s=s, s_commit=s_commit, r_last=r[:, -1], pos=pos + t)
  return (o_sm.astype(jnp.float32) + o_lin.astype(jnp.float32)).astype(q.dtype), new


# ----------------------------------------------------------------------------------------------
# STILL (Meng et al. 2026, arXiv:2602.02180): salient tokens keep softmax attention beyond the window.


STILL_FORMS = ("parallel", "chunked")


def _positions_in_segment(b: int, t: int, segment_ids=None):
  """`[B, T]` position of each token from its segment's (run's) start."""
  tpos = jnp.broadcast_to(jnp.arange(t)[None, :], (b, t))
  if segment_ids is None:
    return tpos
  runs = run_ids(segment_ids)
  first = jnp.concatenate([jnp.ones((b, 1), bool), runs[:, 1:] != runs[:, :-1]], axis=1)
  return tpos - jax.lax.cummax(jnp.where(first, tpos, 0), axis=1)


def still_saliency(q, k, *, window: int, scale=None, segment_ids=None, chunk_size: int = 64):
  """STILL's Self-Saliency Score (our reading, see `still_attention`): `[B, T, H]` float32,
  `score_j = s_jj - logsumexp_{j - window < l <= j} s_jl`, the log of the weight token j gives
  itself in its own causal sliding-window softmax (`s = scale q.k`). Computed with the window's
  banded scores, so it costs O(T (chunk + window)); causal (uses nothing after j)."""
  if q.ndim != 4 or k.shape != q.shape:
    raise ValueError(f"q, k must be [B, T, H, D] of one shape, got {q.shape}, {k.shape}")
  if not isinstance(window, int) or window < 1:
    raise ValueError(f"window must be an int >= 1, got {window!r}")
  b, t, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  s, _, _, tp = _banded_scores(qf, kf, kf[..., :1], seg, window, chunk_size, scale)
  lse = jax.nn.logsumexp(s, axis=-1)                                   # [b, n, h, c]
  lse = lse.transpose(0, 1, 3, 2).reshape(b, tp, h)[:, :t]
  return jnp.sum(qf * kf, axis=-1) * scale - lse


def still_select(score, *, top_k: int, chunk: int, segment_ids=None, positions=None):
  """Top-`top_k` tokens per chunk of `chunk` positions (counted from each segment's start, or
  given as `positions [B, T]`), per head: `score [B, T, H]` -> salient `[B, T, H]` bool. Ties go
  to the earlier token. O(T chunk) (banded comparisons)."""
  if score.ndim != 3:
    raise ValueError(f"score must be [B, T, H], got {score.shape}")
  if not isinstance(top_k, int) or top_k < 0 or not isinstance(chunk, int) or chunk < 1:
    raise ValueError(f"need an int top_k >= 0 and chunk >= 1, got top_k={top_k!r}, chunk={chunk!r}")
  b, t, h = score.shape
  pos = _positions_in_segment(b, t, segment_ids) if positions is None else positions
  runs = jnp.zeros((b, t), jnp.int32) if segment_ids is None else run_ids(segment_ids)
  group = pos // chunk
  sc = jnp.where(jnp.isnan(score), -jnp.inf, score.astype(jnp.float32))
  # All 2 chunk - 1 offsets at once (a Python loop over them unrolls into a program that takes
  # seconds to compile at the default chunk of 64).
  offsets = np.array([o for o in range(-(chunk - 1), chunk) if o != 0], np.int32)   # [n_off]
  j = jnp.arange(t)[:, None] + offsets[None, :]                                      # [T, n_off]
  ok = (j >= 0) & (j < t)
  jc = jnp.clip(j, 0, t - 1)
  same = ok[None] & (group[:, jc] == group[:, :, None]) & (runs[:, jc] == runs[:, :, None])
  other = sc[:, jc]                                                     # [B, T, n_off, H]
  mine = sc[:, :, None]
  beats = (other > mine) | ((other == mine) & (offsets < 0)[None, None, :, None])
  rank = jnp.sum(same[..., None] & beats, axis=2, dtype=jnp.int32)
  return rank < top_k


def _still_dense(q, k, v, pq, pk, salient, window, wf, lf, scale, qpos, kpos, qseg, kseg, kvalid=None):
  """Dense masked STILL formula (the reference and the decode path). `q [B, Tq, H, D]` at
  positions `qpos [Tq]`, keys `[B, Tk, ...]` at `kpos [Tk]`, `salient [B, Tk, H]`, segment ids
  `qseg [B, Tq]`, `kseg [B, Tk]`, optional `kvalid [B, Tk]` (written cache slots)."""
  i, j = qpos[:, None], kpos[None, :]
  same = (qseg[:, :, None] == kseg[:, None, :])
  if kvalid is not None:
    same = same & kvalid[:, None, :]
  same = same[:, None]                                                 # [B, 1, Tq, Tk]
  sal = salient.transpose(0, 2, 1)[:, :, None, :]                      # [B, H, 1, Tk]
  old = same & (j <= i - window)
  soft = same & (j <= i) & ((j > i - window) | sal)
  lin = old & ~sal
  s = jnp.einsum("bihd,bjhd->bhij", q, k) * scale
  s = jnp.where(soft, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = wf[None, :, None, None] * jnp.exp(s - m)
  a = e + jnp.where(lin, lf[None, :, None, None] * jnp.einsum("bihf,bjhf->bhij", pq, pk), 0.0)
  o = jnp.einsum("bhij,bjhe->bihe", a, v)
  den = jnp.sum(a, axis=-1).transpose(0, 2, 1)[..., None]
  return o / jnp.where(den > 0, den, 1.0)


def still_attention(q, k, v, phi_q, phi_k, salient, *, window: int, window_factor=1.0,
                    linear_factor=1.0, scale=None, segment_ids=None, form="chunked",
                    chunk_size: int = 64, max_salient: int | None = None):
  """STILL (Meng et al. 2026, arXiv:2602.02180) hybrid: softmax over the sliding window and the salient older keys, linear
  attention over the other older keys, one shared normaliser (causal).

  With `W_i = {i - window < j <= i}`, `S_i = {j <= i - window : salient_j}`, `L_i` the other
  keys `j <= i - window`, and `m_i` the max of `s_ij = scale q_i.k_j` over `W_i + S_i`:

      o_i = (wf sum_{W_i + S_i} e^{s_ij - m_i} v_j + lf sum_{L_i} phi_q_i.phi_k_j v_j)
            / (wf sum_{W_i + S_i} e^{s_ij - m_i}   + lf sum_{L_i} phi_q_i.phi_k_j)

  the formula as we transcribed it (its softmax set = window + salient, the rest linear) with LoLCATs' max
  subtraction and factors, so no salient key gives exactly `window_linear_attention` and every
  key salient gives causal softmax attention (the oracles). `salient [B, T, H]` bool, per head;
  the STILL layer makes it with `still_saliency` + `still_select` (our reading of the paper's
  Self-Saliency Score and chunk-wise delayed top-k selection; only the abstract was available, see
  `StillMixer`). Shapes as `window_linear_attention`; `segment_ids [B, T]` packed sequences.

  `form`: "parallel" (dense [T, T] masked reference) or "chunked" (window by query blocks of
  `chunk_size`, linear part by the chunked engine on the non-salient keys, salient part against
  the salient keys gathered into `max_salient` slots per head: O(T (chunk + window + max_salient))
  memory). `max_salient` (static; default T) must bound the salient count of every row and head:
  salient keys beyond it are dropped. Selection carries no gradient (a hard top-k).
  """
  if form not in STILL_FORMS:
    raise ValueError(f"form must be one of {STILL_FORMS}, got {form!r}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
  _check_window_inputs(q, k, v, phi_q, phi_k, window, segment_ids)
  b, t, h, d = q.shape
  if tuple(salient.shape) != (b, t, h):
    raise ValueError(f"salient must be [B, T, H]={[b, t, h]} (per key and head), got {list(salient.shape)}")
  scale = d ** -0.5 if scale is None else scale
  wf, lf = _factor(window_factor, h), _factor(linear_factor, h)
  f32 = lambda x: x.astype(jnp.float32)
  q, k, v, pq, pk = f32(q), f32(k), f32(v), f32(phi_q), f32(phi_k)
  sal = jax.lax.stop_gradient(salient).astype(bool)
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  if form == "parallel":
    pos = jnp.arange(t)
    return _still_dense(q, k, v, pq, pk, sal, window, wf, lf, scale, pos, pos, seg, seg).astype(q.dtype)
  dv = v.shape[-1]
  c = chunk_size
  # Window terms, unnormalised, with their own max.
  s, vb, _, tp = _banded_scores(q, k, v, seg, window, c, scale)
  m_w = jnp.max(s, axis=-1)                                          # [b, n, h, c], finite
  m_w = jnp.where(jnp.isfinite(m_w), m_w, 0.0)
  e = jnp.exp(s - m_w[..., None])
  num_w = jnp.einsum("bnhij,bnjhe->bnihe", e, vb).reshape(b, tp, h, dv)[:, :t]
  den_w = jnp.sum(e, axis=-1).transpose(0, 1, 3, 2).reshape(b, tp, h)[:, :t]
  m_w = m_w.transpose(0, 1, 3, 2).reshape(b, tp, h)[:, :t]
  # Salient older keys, gathered per head into `ns` slots (stable: salient first, in order).
  ns = t if max_salient is None else max(1, min(int(max_salient), t))
  order = jnp.argsort(~sal, axis=1, stable=True)[:, :ns]             # [b, ns, h]
  take = lambda x: jnp.take_along_axis(x, order[..., None], axis=1)
  ks, vs = take(k), take(v)
  ok = jnp.take_along_axis(sal, order, axis=1)                       # [b, ns, h]
  kseg = jnp.take_along_axis(seg[..., None], order, axis=1)
  i = jnp.arange(t)
  vis = ((order.transpose(0, 2, 1)[:, :, None, :] <= i[None, None, :, None] - window)
         & ok.transpose(0, 2, 1)[:, :, None, :]
         & (kseg.transpose(0, 2, 1)[:, :, None, :] == seg[:, None, :, None]))   # [b, h, t, ns]
  ss = jnp.where(vis, jnp.einsum("bihd,bjhd->bhij", q, ks) * scale, -jnp.inf)
  m_s = jnp.max(ss, axis=-1)                                          # [b, h, t]
  m = jnp.maximum(m_w, m_s.transpose(0, 2, 1))                        # [b, t, h], finite
  es = jnp.exp(ss - m.transpose(0, 2, 1)[..., None])
  num_s = jnp.einsum("bhij,bjhe->bihe", es, vs)
  den_s = jnp.sum(es, axis=-1).transpose(0, 2, 1)
  rw = jnp.exp(m_w - m)
  num_l, den_l = _shifted_linear(pq, pk * (~sal)[..., None], v, window, seg, segment_ids, "chunked", c)
  wfb, lfb = wf[None, None, :], lf[None, None, :]
  num = wfb[..., None] * (rw[..., None] * num_w + num_s) + lfb[..., None] * num_l
  den = wfb * (rw * den_w + den_s) + lfb * den_l
  return (num / den[..., None]).astype(q.dtype)


def still_init_cache(batch_size: int, max_len: int, num_heads: int, head_dim: int, feature_dim: int,
                     value_dim: int):
  """Decode cache of `still_decode`: every written key, value, key feature and saliency score
  (STILL keeps the salient keys for softmax, and which are salient is decided per chunk when the
  chunk leaves the window, so the keys are kept), and the position."""
  z = lambda *s: jnp.zeros(s, jnp.float32)
  return dict(k=z(batch_size, max_len, num_heads, head_dim), v=z(batch_size, max_len, num_heads, value_dim),
              pk=z(batch_size, max_len, num_heads, feature_dim),
              score=jnp.full((batch_size, max_len, num_heads), -jnp.inf, jnp.float32),
              pos=jnp.zeros((), jnp.int32))


def still_decode(q, k, v, phi_q, phi_k, cache, *, window: int, top_k: int, chunk: int,
                 window_factor=1.0, linear_factor=1.0, scale=None):
  """Decode `T >= 1` tokens with the STILL layer's semantics (`still_saliency` + `still_select`
  + `still_attention`) from `cache` (`still_init_cache`). Dense over the cache: O(max_len) per
  token (a reference decode, not the paper's kernel). Returns `(o [B, T, H, Dv], cache)`."""
  b, t, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  wf, lf = _factor(window_factor, h), _factor(linear_factor, h)
  f32 = lambda x: x.astype(jnp.float32)
  max_len = cache["k"].shape[1]
  pos = cache["pos"]
  upd = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, f32(x), pos, axis=1)
  kc, vc, pkc = upd(cache["k"], k), upd(cache["v"], v), upd(cache["pk"], phi_k)
  kpos, qpos = jnp.arange(max_len), pos + jnp.arange(t)
  written = jnp.broadcast_to(kpos < pos + t, (b, max_len))
  # Scores of the new tokens: their own causal window over the cache.
  sw = jnp.einsum("bihd,bjhd->bhij", f32(q), kc) * scale
  inwin = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - window)
  lse = jax.nn.logsumexp(jnp.where(inwin, sw, -jnp.inf), axis=-1).transpose(0, 2, 1)
  new_score = jnp.sum(f32(q) * f32(k), axis=-1) * scale - lse
  score = upd(cache["score"], new_score)
  sal = still_select(score, top_k=top_k, chunk=chunk, positions=jnp.broadcast_to(kpos, (b, max_len)))
  zeros = jnp.zeros((b, t), jnp.int32)
  o = _still_dense(f32(q), kc, vc, f32(phi_q), pkc, sal, window, wf, lf, scale, qpos, kpos, zeros,
                   jnp.zeros((b, max_len), jnp.int32), written)
  new = dict(k=kc, v=vc, pk=pkc, score=score, pos=pos + t)
  return o.astype(q.dtype), new


# ----------------------------------------------------------------------------------------------
# SeqBoat (Ren et al. 2023, arXiv:2306.11197): sparse modular activation of a local attention over the selected tokens.


SEQBOAT_FORMS = ("parallel", "chunked")
SEQBOAT_ACTIVATIONS = ("softmax", "relu2")


def _activate(s, activation):
  """softmax (rows with no visible key give 0) or squared ReLU (unnormalised) of masked scores."""
  if activation == "relu2":
    return jnp.where(jnp.isfinite(s), jnp.square(jax.nn.relu(s)), 0.0)
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  den = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(den > 0, den, 1.0)


def seqboat_attention(q, k, v, route, *, window: int, scale=None, activation="softmax",
                      segment_ids=None, form="chunked", chunk_size: int = 64):
  """SeqBoat (Ren et al. 2023, arXiv:2306.11197) sparse modular activation of causal local attention (the attention half of
  the layer; the SSM backbone and the router live in `SeqBoatMixer`).

  `route [B, T]` (0/1, hard; no gradient flows through it: SeqBoat trains the router through the
  gate multiplying the module's output, see `SeqBoatMixer`). The routed tokens form the
  compressed sequence (their order kept), `c_i` = token i's index in it; a routed query i attends
  to the routed keys j with `j <= i` and `c_i - c_j < window` (the last `window` routed tokens,
  itself included; the authors' "exact window" of W keys back is `window = W + 1`), same segment.
  Unrouted tokens get 0. `activation`: "softmax" (the authors' LM setting, scale D^-1/2) or
  "relu2" (GAU's squared ReLU, unnormalised, scale 1/window as the authors' code). `q, k [B, T,
  H, D]`, `v [B, T, H, Dv]`; returns `[B, T, H, Dv]` in q's dtype.

  `form`: "parallel" (dense [T, T] masked reference on the original positions) or "chunked" (the
  authors' compress -> local attention -> scatter: routed tokens gathered to the front by a stable
  sort, blocked local attention of `chunk_size` query blocks on the compressed sequence, the
  outputs gathered back: O(T (chunk + window)) memory). All routed and one segment: causal
  sliding-window attention; none routed: zeros (the defining properties).
  """
  if form not in SEQBOAT_FORMS:
    raise ValueError(f"form must be one of {SEQBOAT_FORMS}, got {form!r}")
  if activation not in SEQBOAT_ACTIVATIONS:
    raise ValueError(f"activation must be one of {SEQBOAT_ACTIVATIONS}, got {activation!r}")
  if not isinstance(window, int) or window < 1:
    raise ValueError(f"window must be an int >= 1 (routed keys c_i - window < c_j <= c_i), got {window!r}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
  if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"q, k must be [B, T, H, D] and v [B, T, H, Dv], got {q.shape}, {k.shape}, {v.shape}")
  b, t, h, d = q.shape
  if tuple(route.shape) != (b, t):
    raise ValueError(f"route must be [B, T]={[b, t]} (per token, shared by the heads), got {list(route.shape)}")
  if segment_ids is not None and tuple(segment_ids.shape) != (b, t):
    raise ValueError(f"segment_ids must be [B, T]={[b, t]}, got {list(segment_ids.shape)}")
  if scale is None:
    scale = d ** -0.5 if activation == "softmax" else 1.0 / window
  r = jax.lax.stop_gradient(route) > 0.5
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  f32 = lambda x: x.astype(jnp.float32)
  if form == "parallel":
    ci = jnp.cumsum(r.astype(jnp.int32), axis=1)
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    vis = ((j <= i) & (seg[:, :, None] == seg[:, None, :]) & r[:, :, None] & r[:, None, :]
           & (ci[:, :, None] - ci[:, None, :] < window))[:, None]
    s = jnp.where(vis, jnp.einsum("bihd,bjhd->bhij", f32(q), f32(k)) * scale, -jnp.inf)
    o = jnp.einsum("bhij,bjhe->bihe", _activate(s, activation), f32(v))
    return o.astype(q.dtype)
  order = jnp.argsort(~r, axis=1, stable=True)                       # routed tokens first
  take = lambda x: jnp.take_along_axis(x, order.reshape((b, t) + (1,) * (x.ndim - 2)), axis=1)
  rc = take(r)
  sc = take(seg)
  # Unrouted slots: queries and keys get segment ids nobody else has, so they see nothing.
  s, vb, _, tp = _banded_scores(f32(take(q)), f32(take(k)), f32(take(v)), sc, window, chunk_size,
                                scale, q_seg=jnp.where(rc, sc, -3), k_seg=jnp.where(rc, sc, -4))
  a = _activate(s, activation)
  oc = jnp.einsum("bnhij,bnjhe->bnihe", a, vb).reshape(b, tp, h, v.shape[-1])[:, :t]
  inv = jnp.argsort(order, axis=1)
  o = jnp.take_along_axis(oc, inv[..., None, None], axis=1) * r[..., None, None]
  return o.astype(q.dtype)


_NO_TOKEN = -(2 ** 30)  # compressed index of an empty ring slot: never within a window of a query


def seqboat_init_cache(batch_size: int, window: int, num_heads: int, head_dim: int, value_dim: int):
  """Decode cache of `seqboat_decode`: a ring of the last `window` routed tokens per row (keys
  `[B, W, H, D]`, values `[B, W, H, Dv]`, their compressed indices `[B, W]`), the routed count `[B]`
  and the position. O(window) memory however long the decode: a routed query only ever sees the
  last `window` routed keys. (The SSM state is the layer's.)"""
  if not isinstance(window, int) or window < 1:
    raise ValueError(f"window must be an int >= 1, got {window!r}")
  z = lambda *s: jnp.zeros(s, jnp.float32)
  return dict(k=z(batch_size, window, num_heads, head_dim), v=z(batch_size, window, num_heads, value_dim),
              cidx=jnp.full((batch_size, window), _NO_TOKEN, jnp.int32),
              count=jnp.zeros((batch_size,), jnp.int32), pos=jnp.zeros((), jnp.int32))


def seqboat_decode(q, k, v, route, cache, *, window: int, scale=None, activation="softmax"):
  """Decode `T >= 1` tokens with `seqboat_attention`'s semantics from `cache`
  (`seqboat_init_cache` with the same `window`). Each new routed query attends to the ring (the
  routed tokens before this call) and to the new routed tokens up to itself, keeping the last
  `window` in compressed order; then the ring keeps the last `window` routed tokens. Cost
  O(T (T + window)) per call; memory O(window). Returns `(o [B, T, H, Dv], cache)`."""
  b, t, h, d = q.shape
  ring = cache["k"].shape[1]
  if ring != window:
    raise ValueError(f"cache holds {ring} routed tokens but window={window}: build it with "
                     f"seqboat_init_cache(..., window={window}, ...)")
  if scale is None:
    scale = d ** -0.5 if activation == "softmax" else 1.0 / window
  r = jax.lax.stop_gradient(route) > 0.5                                     # [B, T]
  ci_new = cache["count"][:, None] + jnp.cumsum(r.astype(jnp.int32), axis=1)  # compressed indices
  k_all = jnp.concatenate([cache["k"], k.astype(jnp.float32)], axis=1)         # [B, W + T, H, D]
  v_all = jnp.concatenate([cache["v"], v.astype(jnp.float32)], axis=1)
  ci_all = jnp.concatenate([cache["cidx"], ci_new], axis=1)                   # [B, W + T]
  # The ring's tokens precede this call's; among the new ones a query sees itself and earlier ones.
  order = jnp.concatenate([jnp.ones((t, window), bool),
                           jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]], axis=1)
  routed_key = jnp.concatenate([jnp.ones((b, window), bool), r], axis=1)
  vis = (order[None] & routed_key[:, None, :] & r[:, :, None]
         & (ci_new[:, :, None] - ci_all[:, None, :] < window))[:, None]       # [B, 1, T, W + T]
  s = jnp.where(vis, jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), k_all) * scale, -jnp.inf)
  o = jnp.einsum("bhij,bjhe->bihe", _activate(s, activation), v_all)
  # Ring update: slot = compressed index mod window. The new routed tokens among the last
  # `window` have distinct slots, so each slot gets at most one writer; the others keep their token.
  count = ci_new[:, -1]
  keep = r & (ci_new > count[:, None] - window)
  sel = keep[:, :, None] & ((ci_new % window)[:, :, None] == jnp.arange(window))  # [B, T, W]
  written = jnp.any(sel, axis=1)                                              # [B, W]
  sel_f = sel.astype(jnp.float32)
  put = lambda old, x: jnp.where(written.reshape(written.shape + (1,) * (old.ndim - 2)),
                                 jnp.einsum("btw,bt...->bw...", sel_f, x.astype(jnp.float32)), old)
  new = dict(k=put(cache["k"], k), v=put(cache["v"], v),
             cidx=jnp.where(written, jnp.sum(jnp.where(sel, ci_new[:, :, None], 0), axis=1), cache["cidx"]),
             count=count, pos=cache["pos"] + t)
  return o.astype(q.dtype), new
