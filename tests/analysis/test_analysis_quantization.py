"""Oracles for RSQ token importance, the weighted Hessian and GPTQ (Sung et al. 2025, arXiv:2503.01820)."""

import jax
import numpy as np
import pytest

from attnjax.analysis import quantization as qz


def _gptq_oracle(w, h, bits, percdamp=0.01):
  """Loop transcription of GPTQ Algorithm 1 (Frantar et al.; IST-DASLab/gptq gptq.py
  `fasterquant` without blocking), float64."""
  w = w.astype(np.float64).copy(); h = h.astype(np.float64).copy()
  n = w.shape[1]
  h += percdamp * np.mean(np.diag(h)) * np.eye(n)
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  qmax = 2 ** bits - 1
  lo = np.minimum(w.min(1), 0); hi = np.maximum(w.max(1), 0)
  scale = (hi - lo) / qmax; zero = np.round(-lo / scale)
  q = np.zeros_like(w)
  for i in range(n):
    qi = np.clip(np.round(w[:, i] / scale) + zero, 0, qmax)
    q[:, i] = scale * (qi - zero)
    err = (w[:, i] - q[:, i]) / u[i, i]
    w[:, i + 1:] -= np.outer(err, u[i, i + 1:])
  return q


def test_token_importance_and_unit_weights_give_plain_hessian():
  """RSQ (ylsung/rsq input_weighting_module.py AttnCon): received attention summed over heads
  and queries, min-max scaled into [1, 3]; r == const gives the plain X^T X Hessian."""
  rng = np.random.default_rng(0)
  a = rng.uniform(size=(1, 2, 5, 5)); a /= a.sum(-1, keepdims=True)
  r = np.asarray(qz.token_importance(a))
  raw = a.sum((1, 2))[0]
  np.testing.assert_allclose(r[0], 1 + 2 * (raw - raw.min()) / (raw.max() - raw.min()), rtol=1e-5)
  x = rng.normal(size=(5, 3))
  np.testing.assert_allclose(np.asarray(qz.weighted_hessian(x, np.full(5, 2.0))), x.T @ x, rtol=1e-5)
  w = r[0]
  np.testing.assert_allclose(np.asarray(qz.weighted_hessian(x, w)),
                             sum(wi * np.outer(xi, xi) for wi, xi in zip(w / w.mean(), x)), rtol=1e-5)


def test_gptq_matches_loop_oracle_and_beats_rtn():
  """GPTQ equals the loop transcription; with correlated inputs its layer error is below RTN's;
  RSQ weighting lowers the weighted error relative to plain GPTQ on the same grid."""
  rng = np.random.default_rng(1)
  n_tok, d_in, d_out = 96, 13, 6
  mix = rng.normal(size=(d_in, d_in))
  x = rng.normal(size=(n_tok, d_in)) @ mix
  w = rng.normal(size=(d_out, d_in)).astype(np.float32)
  h = (x.T @ x).astype(np.float32)
  gptq4 = jax.jit(lambda w, h: qz.gptq(w, h, bits=4))   # one compile for the three calls
  q = np.asarray(gptq4(w, h))
  np.testing.assert_allclose(q, _gptq_oracle(w, h, 4), rtol=1e-4, atol=1e-4)
  rtn = np.asarray(qz.quantize_rtn(w, bits=4))
  assert float(qz.quantization_error(w, q, x)) < float(qz.quantization_error(w, rtn, x))
  imp = rng.uniform(1, 3, size=n_tok) ** 4
  q_rsq = np.asarray(gptq4(w, qz.weighted_hessian(x, imp)))
  assert float(qz.quantization_error(w, q_rsq, x, imp)) < float(qz.quantization_error(w, q, x, imp))
  # Diagonal Hessian: no error propagation, GPTQ reduces to RTN.
  np.testing.assert_allclose(np.asarray(gptq4(w, np.diag(rng.uniform(1, 2, d_in)).astype(np.float32))), rtn, atol=1e-6)
  with pytest.raises(ValueError, match="hessian"):
    qz.gptq(w, np.eye(3))
