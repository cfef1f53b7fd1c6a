"""[65] RSQ: attention-based token importance for GPTQ, and the GPTQ step itself.

Transcribes the authors' code (ylsung/rsq): `fake_quant/input_weighting_module.py` (AttnCon:
attention received by each token, summed over heads and queries of the layer, min-max scaled
into `[r_min, r_max] = [1, 3]` by default) and `fake_quant/gptq_utils.py` (`add_batch`: the
weights are renormalised to mean 1 and each token's input is scaled by `sqrt(w)`, so
`H = sum_t w_t x_t x_t^T`). The rotation step (QuaRot Hadamard) is outside this module: pass
rotated inputs. `r = 1` everywhere gives the plain GPTQ Hessian.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.analysis._checks import check_ndim


def token_importance(attn, *, r_min: float = 1.0, r_max: float = 3.0):
  """AttnCon importance: `[B, H, Tq, Tk] -> [B, Tk]` in `[r_min, r_max]`.

  `r_t = sum_{h, i} A^h_{it}` (attention received, summed over heads and queries), min-max
  scaled per example. A constant `r` (no spread) maps to `r_min`.
  """
  a = check_ndim(attn, 4, "attn", "[B, H, Tq, Tk]").astype(jnp.float32)
  if not r_min <= r_max:
    raise ValueError(f"need r_min <= r_max, got {r_min}, {r_max}")
  r = jnp.sum(a, axis=(1, 2))
  lo = jnp.min(r, -1, keepdims=True)
  hi = jnp.max(r, -1, keepdims=True)
  unit = (r - lo) / jnp.where(hi > lo, hi - lo, 1.0)
  return jnp.clip(unit * (r_max - r_min) + r_min, r_min, r_max)


def weighted_hessian(x, weights=None):
  """GPTQ's layer Hessian `H = sum_t w_t x_t x_t^T` with `w` renormalised to mean 1.

  `x`: `[N, D_in]` layer inputs (tokens flattened); `weights`: `[N]` or None (plain GPTQ,
  `H = X^T X`). Returns `[D_in, D_in]` float32 (the authors drop GPTQ's 2/N factor).
  """
  x = check_ndim(x, 2, "x", "[N, D_in]").astype(jnp.float32)
  if weights is None:
    return x.T @ x
  w = jnp.asarray(weights, jnp.float32)
  if w.shape != (x.shape[0],):
    raise ValueError(f"weights must be [N]=({x.shape[0]},), got {w.shape}")
  w = w / jnp.sum(w) * w.shape[0]
  return (x * w[:, None]).T @ x


def _minmax_grid(w, bits):
  # GPTQ's default quantizer: asymmetric, per output row, range from the unquantized row.
  qmax = 2 ** bits - 1
  lo = jnp.minimum(jnp.min(w, axis=1), 0.0)
  hi = jnp.maximum(jnp.max(w, axis=1), 0.0)
  both_zero = (lo == 0) & (hi == 0)
  lo = jnp.where(both_zero, -1.0, lo)
  hi = jnp.where(both_zero, 1.0, hi)
  scale = (hi - lo) / qmax
  zero = jnp.round(-lo / scale)
  return scale, zero, qmax


def quantize_rtn(w, *, bits: int = 4):
  """Round-to-nearest onto GPTQ's per-row min-max grid: `[out, in] -> [out, in]` (dequantised)."""
  w = check_ndim(w, 2, "w", "[out, in]").astype(jnp.float32)
  scale, zero, qmax = _minmax_grid(w, bits)
  q = jnp.clip(jnp.round(w / scale[:, None]) + zero[:, None], 0, qmax)
  return scale[:, None] * (q - zero[:, None])


def gptq(w, hessian, *, bits: int = 4, percdamp: float = 0.01):
  """GPTQ (Frantar et al., Alg. 1) on one weight `[out, in]` with Hessian `[in, in]`.

  Columns are quantized left to right on the per-row min-max grid; each column's error, divided
  by the Cholesky factor's diagonal, is propagated to the remaining columns through the upper
  Cholesky factor of `H^-1` (dampened by `percdamp * mean(diag H)`). Dead inputs (`H_ii = 0`)
  get weight 0. Returns the dequantised weight. Lazy block updates change only the order of
  float operations, so this is the unblocked form.
  """
  w = check_ndim(w, 2, "w", "[out, in]").astype(jnp.float32)
  h = check_ndim(hessian, 2, "hessian", "[in, in]").astype(jnp.float32)
  n = w.shape[1]
  if h.shape != (n, n):
    raise ValueError(f"hessian must be [in, in]=({n}, {n}), got {h.shape}")
  dead = jnp.diag(h) == 0
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
  w = jnp.where(dead[None], 0.0, w)
  h = h + percdamp * jnp.mean(jnp.diag(h)) * jnp.eye(n)
  hinv = jnp.linalg.inv(h)
  u = jnp.linalg.cholesky(hinv).T                               # upper: hinv = u^T u
  scale, zero, qmax = _minmax_grid(w, bits)
  cols = jnp.arange(n)

  def body(i, carry):
    ww, qq = carry
    col = ww[:, i]
    q = jnp.clip(jnp.round(col / scale) + zero, 0, qmax)
    q = scale * (q - zero)
    err = (col - q) / u[i, i]
    ww = ww - err[:, None] * jnp.where(cols > i, u[i], 0.0)[None]
    return ww, qq.at[:, i].set(q)

  _, q = jax.lax.fori_loop(0, n, body, (w, jnp.zeros_like(w)))
  return q


def quantization_error(w, w_q, x, weights=None):
  """Layer reconstruction error `sum_t w_t ||(W - W_q) x_t||^2` (`w` renormalised to mean 1).

  `w`, `w_q`: `[out, in]`; `x`: `[N, in]`; `weights`: `[N]` or None (plain squared error).
  """
  d = jnp.asarray(w, jnp.float32) - jnp.asarray(w_q, jnp.float32)
  e = jnp.sum((jnp.asarray(x, jnp.float32) @ d.T) ** 2, -1)
  if weights is None:
    return jnp.sum(e)
  ww = jnp.asarray(weights, jnp.float32)
  return jnp.sum(e * ww / jnp.sum(ww) * ww.shape[0])


def rsq_quantize(w, x, attn, *, bits: int = 4, r_min: float = 1.0, r_max: float = 3.0,
                 percdamp: float = 0.01):
  """RSQ's scale-then-quantize step for one layer: `(W_q [out, in], token weights [B*T])`.

  `w`: `[out, in]`; `x`: `[B, T, in]` the layer's (rotated) inputs; `attn`: `[B, H, T, T]` the
  attention weights of the layer's block on the same batch.
  """
  x = check_ndim(x, 3, "x", "[B, T, in]")
  r = token_importance(attn, r_min=r_min, r_max=r_max).reshape(-1)
  xf = x.reshape(-1, x.shape[-1])
  return gptq(w, weighted_hessian(xf, r), bits=bits, percdamp=percdamp), r
