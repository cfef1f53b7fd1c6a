"""Attention with a different score normaliser: sigmoid (Ramapuram et al. 2024, arXiv:2409.04431), softplus LSSA / LSSAR (Gao et al. 2025, arXiv:2501.13428), affine-scaled (Bae et al. 2026, arXiv:2602.23057).

All three take `q [B, Tq, H, D]`, `k [B, Tk, Hk, D]`, `v [B, Tk, Hk, Dv]` and the shared masking keywords
(`mask`, `causal` bottom-right aligned, `window=(left, right)`, `q_segment_ids`, `kv_segment_ids`), so
they serve the four CAB patterns (causal cross = bottom-right aligned causal, as KV-cache decoding).
They are dense references (O(Tq Tk) memory) with float32 accumulation; fully hidden rows give zeros.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnjax.ops import dispatch
from attnjax.ops import softmax as softmax_lib
from attnjax.ops.operators import _common


def _prep(name, q, k, v, mask, causal, window, q_segment_ids, kv_segment_ids, scale):
  _common.check_qkv(name, q, k, v)
  s = _common.scores(q, k, scale=scale)
  valid = _common.visibility(q.shape[1], k.shape[1], mask=mask, causal=causal, window=window,
                             q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
  return s, jnp.broadcast_to(valid, s.shape)


def sigmoid_attention_weights(q, k, *, bias=None, mask=None, causal=False, window=None,
                              q_segment_ids=None, kv_segment_ids=None, scale=None):
  """`A = sigmoid(q.k * scale + b)` on visible pairs, 0 elsewhere; `[B, H, Tq, Tk]` float32.

  `bias` is a scalar or `[H]`; `None` gives the paper's `b = -log(n)` with `n = Tk` (key length);
  `"visible"` gives each query row `b_i = -log(n_i)` with `n_i` its number of visible keys.
  """
  s, valid = _prep("sigmoid_attention", q, k, k, mask, causal, window, q_segment_ids,
                   kv_segment_ids, scale)
  if isinstance(bias, str):
    if bias != "visible":
      raise ValueError(f"sigmoid_attention: bias must be a number, [H], None or 'visible', got {bias!r}")
    n = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)
    b = -jnp.log(jnp.maximum(n, 1.0))
  else:
    b = -math.log(k.shape[1]) if bias is None else bias
    b = _common.per_head(b, q.shape[2], "sigmoid_attention", "bias")
  return jnp.where(valid, jax.nn.sigmoid(s + b), 0.0)


SIGMOID_IMPLEMENTATIONS = ("reference", "pallas")


def sigmoid_pallas_unsupported_reason(q, k, v, *, bias=None, mask=None) -> str | None:
  """Why the flash kernel's sigmoid score mode cannot serve a `sigmoid_attention` call (or None)."""
  same = jnp.result_type(q) == jnp.result_type(k) == jnp.result_type(v)
  if not same or str(jnp.result_type(q)) not in dispatch.PALLAS_DTYPES:
    return f"the flash kernel takes q, k, v of one dtype among {dispatch.PALLAS_DTYPES}"
  if max(q.shape[-1], v.shape[-1]) > softmax_lib.PALLAS_MAX_HEAD_DIM:
    return f"the flash kernel needs D, Dv <= {softmax_lib.PALLAS_MAX_HEAD_DIM}"
  if mask is not None:
    return "the flash kernel takes no dense mask (causal / window / segment ids only)"
  if isinstance(bias, str):
    return "the flash kernel takes one constant bias, not the per-row bias='visible'"
  if bias is not None and not isinstance(bias, (int, float)):
    return "the flash kernel takes one constant (python number) bias, not a per-head array"
  return None


def choose_sigmoid_implementation(implementation, q, k, v, *, bias=None, mask=None,
                                  backend: str | None = None) -> tuple[str, str]:
  """`(implementation, reason)` of `sigmoid_attention` on `backend` (pure): None picks the flash
  kernel's sigmoid score mode on a CUDA GPU when it serves the call, else the reference; there is
  no separate tiled XLA path, so "xla" raises. Explicit "pallas" that cannot serve raises."""
  dispatch.check_implementation(implementation, SIGMOID_IMPLEMENTATIONS, op="sigmoid_attention")
  reason = sigmoid_pallas_unsupported_reason(q, k, v, bias=bias, mask=mask)
  if implementation == "pallas":
    if reason is not None:
      raise ValueError(f"sigmoid_attention: implementation='pallas' cannot serve this call: "
                       f"{reason}")
    return "pallas", "explicit choice"
  if implementation == "reference":
    return "reference", "explicit choice"
  backend = dispatch.resolve_backend(backend)
  if backend == "gpu" and reason is None:
    return "pallas", "flash kernel, sigmoid score mode"
  why = reason if backend == "gpu" else f"no GPU kernel on {backend!r}"
  return "reference", f"materialised weights ({why})"


@dispatch.dispatching_op
def sigmoid_attention(q, k, v, *, bias=None, mask=None, causal=False, window=None,
                      q_segment_ids=None, kv_segment_ids=None, scale=None, implementation=None):
  """Sigmoid self/cross attention (Ramapuram et al. (Ramapuram et al. 2024, arXiv:2409.04431)): `o_i = sum_j sigmoid(q_i.k_j/sqrt(D) + b) v_j`.

  Shapes `q [B, Tq, H, D]`, `k [B, Tk, Hk, D]`, `v [B, Tk, Hk, Dv]` -> `[B, Tq, H, Dv]`. Rows are not
  normalised: each row's mass is `sum_j sigmoid(.)`, so `b = -log n` (default, `n = Tk`) keeps the
  initial mass near 1 (`n / (n + 1)` at zero logits). The paper pairs this with QK-norm (see the
  `sigmoid` mixer, which turns it on by default). Reading: `n` is the key length of the call; under
  KV-cache decoding that is the cache length, so pass `bias` explicitly for length-independent
  behaviour, or `bias="visible"` for `b_i = -log(n_i)` per query row (`n_i` = its visible keys; equals
  `-log Tk` without masks, and is invariant to cache padding and sequence packing). Our first spec of (Ramapuram et al. 2024, arXiv:2409.04431) was
  "from memory"; the formula matches the authors' FlashSigmoid README (`sigmoid(q k^T/sqrt(d) + b)`).
  `implementation`: "reference" (materialised weights), "pallas" (the flash kernel's sigmoid score
  mode: a constant bias, no dense mask; interpret mode without a GPU) or None (the kernel on a CUDA
  GPU when it serves the call; `choose_sigmoid_implementation`).
  """
  dispatch.note("sigmoid_attention", lambda be: choose_sigmoid_implementation(
      implementation, q, k, v, bias=bias, mask=mask, backend=be))
  impl, _ = choose_sigmoid_implementation(implementation, q, k, v, bias=bias, mask=mask)
  if impl == "pallas":
    _common.check_qkv("sigmoid_attention", q, k, v)
    from pallas_kernels.flash.api import flash_attention  # heavy; lazily
    d, dv = q.shape[-1], v.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    b = -math.log(k.shape[1]) if bias is None else float(bias)
    if d != dv:
      width = max(d, dv)
      pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])
      q, k, v = pad(q), pad(k), pad(v)
    window = None if window is None else tuple(window)
    o = flash_attention(q, k, v, causal=bool(causal), window=window, q_segment_ids=q_segment_ids,
                        kv_segment_ids=kv_segment_ids, score_mode="sigmoid", sigmoid_bias=b,
                        scale=scale)
    return o[..., :dv]
  w = sigmoid_attention_weights(q, k, bias=bias, mask=mask, causal=causal, window=window,
                                q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                scale=scale)
  return _common.apply_weights(w, v, q.dtype)


def lssa_weights(q, k, *, reweight_power=None, reweight_threshold=1.0, length_scale_base=None,
                 mask=None, causal=False, window=None, q_segment_ids=None, kv_segment_ids=None,
                 scale=None):
  """LSSA (and, with `reweight_power`, LSSAR) weights `[B, H, Tq, Tk]` float32; see `lssa_attention`."""
  s, valid = _prep("lssa_attention", q, k, k, mask, causal, window, q_segment_ids, kv_segment_ids,
                   scale)
  n = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)
  lam = jnp.log(jnp.maximum(n, 1.0))
  if length_scale_base is not None:
    if length_scale_base <= 1:
      raise ValueError(f"lssa_attention: length_scale_base must be > 1, got {length_scale_base}")
    lam = lam / math.log(length_scale_base)
  # softplus(x) / sum softplus in log space: log softplus(x) ~ x below -15 (rel. err < 1e-6), so
  # rows whose logits are all very negative do not underflow to 0/0 (same weights otherwise).
  x = lam * s
  log_f = jnp.where(x > -15.0, jnp.log(jax.nn.softplus(jnp.maximum(x, -15.0))), x)
  a = _common.masked_softmax(log_f, valid)
  if reweight_power is None:
    return a
  if reweight_power <= 0:
    raise ValueError(f"lssa_attention: reweight_power must be > 0, got {reweight_power}")
  # Weights below `threshold * (row average 1/n_i)` are dropped, the rest raised to the power p.
  r = jnp.where(valid, jax.nn.relu(a - reweight_threshold / jnp.maximum(n, 1.0)), 0.0)
  r = r ** reweight_power
  rs = jnp.sum(r, axis=-1, keepdims=True)
  # A perfectly uniform row has nothing above its average: keep the LSSA row instead of zeros.
  return jnp.where(rs > 0, r / jnp.where(rs > 0, rs, 1.0), a)


def lssa_attention(q, k, v, *, reweight_power=None, reweight_threshold=1.0,
                   length_scale_base=None, mask=None, causal=False, window=None,
                   q_segment_ids=None, kv_segment_ids=None, scale=None):
  """Softplus attention LSSA / LSSAR (Gao et al. (Gao et al. 2025, arXiv:2501.13428)) on `[B, T, H, D]`.

  LSSA: `A_ij = softplus(lam_i S_ij) / sum_j softplus(lam_i S_ij)` with `S = q.k / sqrt(D)` and the
  length-dependent scale `lam_i = log(n_i)` (`n_i` = keys visible to query i; divided by
  `log(length_scale_base)` when given, e.g. the training length, so `lam = 1` there). LSSAR
  re-weights: `A'_ij ∝ relu(A_ij - tau / n_i) ** p`, renormalised (`tau = reweight_threshold`,
  default 1 = the row average; `p = reweight_power`), which amplifies above-average weights and
  zeroes weak ones; `p = 1, tau = 0` gives LSSA back. `o = A V` -> `[B, Tq, H, Dv]`. Reading (the
  only the abstract was available): the abstract fixes softplus + l1 norm + an entropy-invariant
  `log n` scale + a power re-weighting; the exact constants are our choice and are parameters here.
  """
  w = lssa_weights(q, k, reweight_power=reweight_power, reweight_threshold=reweight_threshold,
                   length_scale_base=length_scale_base, mask=mask, causal=causal, window=window,
                   q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, scale=scale)
  return _common.apply_weights(w, v, q.dtype)


def affine_scaled_attention(q, k, v, alpha, beta, *, normalize_beta=False, mask=None,
                            causal=False, window=None, q_segment_ids=None, kv_segment_ids=None,
                            scale=None, implementation=None):
  """Affine-scaled attention (Bae et al. (Bae et al. 2026, arXiv:2602.23057)): `o_i = sum_j (alpha_i P_ij + beta_i) v_j`, `P = softmax`.

  `alpha, beta: [B, Tq, H]` (input-dependent, per head and query). The sum over j runs over the keys
  visible to query i (`n_i` of them), so the row mass is `alpha_i + n_i beta_i`; with
  `normalize_beta=True` beta is divided by `n_i` (bias term = beta * mean of visible values, mass
  `alpha + beta`), which keeps the bias bounded for long contexts. `alpha = 1, beta = 0` is exactly
  softmax attention. The softmax part runs on `dot_product_attention` (any implementation); the
  bias part is a masked sum of values. Our first spec of (Bae et al. 2026, arXiv:2602.23057) was "from abstract": the affine form on the
  softmax weights is the abstract's; the alpha/beta parametrisation lives in the layer.
  """
  _common.check_qkv("affine_scaled_attention", q, k, v)
  b, tq, h, _ = q.shape
  for arg, x in (("alpha", alpha), ("beta", beta)):
    if x.shape != (b, tq, h):
      raise ValueError(f"affine_scaled_attention: {arg} must be [B, Tq, H] = {(b, tq, h)}, got {x.shape}")
  o = softmax_lib.dot_product_attention(
      q, k, v, mask=mask, causal=causal, window=window, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, scale=scale, implementation=implementation)
  valid = _common.visibility(tq, k.shape[1], mask=mask, causal=causal, window=window,
                             q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
  valid = jnp.broadcast_to(valid, (b, h, tq, k.shape[1])).astype(jnp.float32)
  vsum = _common.apply_weights(valid, v, jnp.float32)          # [B, Tq, H, Dv]
  beta = beta.astype(jnp.float32)
  if normalize_beta:
    n = jnp.sum(valid, axis=-1).transpose(0, 2, 1)               # [B, Tq, H]
    beta = beta / jnp.maximum(n, 1.0)
  out = alpha.astype(jnp.float32)[..., None] * o.astype(jnp.float32) + beta[..., None] * vsum
  return out.astype(q.dtype)


def gated_attention(q, k, v, gate_logits, **attn_kwargs):
  """Gated attention, G1 position (Qiu et al. (Qiu et al. 2025, arXiv:2505.06708)): `Y' = SDPA(q, k, v) * sigmoid(gate_logits)`.

  `gate_logits` is `[B, Tq, H]` (head-wise: one gate per head and token) or `[B, Tq, H, Dv]`
  (element-wise, the paper's best variant), computed by the layer from the same pre-norm input `x`
  (`G = x W_theta`). `attn_kwargs` go to `dot_product_attention`. A gate of 1 is plain attention and
  `|Y'| <= |Y|` elementwise.
  """
  _common.check_qkv("gated_attention", q, k, v)
  o = softmax_lib.dot_product_attention(q, k, v, **attn_kwargs)
  b, tq, h, dv = o.shape
  if gate_logits.shape == (b, tq, h):
    g = jax.nn.sigmoid(gate_logits.astype(jnp.float32))[..., None]
  elif gate_logits.shape == (b, tq, h, dv):
    g = jax.nn.sigmoid(gate_logits.astype(jnp.float32))
  else:
    raise ValueError(f"gated_attention: gate_logits must be [B, Tq, H] = {(b, tq, h)} or "
                     f"[B, Tq, H, Dv] = {(b, tq, h, dv)}, got {gate_logits.shape}")
  return (o.astype(jnp.float32) * g).astype(o.dtype)
