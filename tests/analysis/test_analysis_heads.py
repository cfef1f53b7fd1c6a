"""Oracles for the per-head probes (Jha & Reagen 2025, arXiv:2501.03489), (Zhai et al. 2023, arXiv:2303.06296), (Li et al. 2023, arXiv:2303.13731), (Wu et al. 2024, arXiv:2404.15574), (Hua et al. 2025, arXiv:2505.07293)."""

import numpy as np
import pytest

from attnjax.analysis import heads


def _entropy_reg_oracle(attn_layers, theta, lam, gamma):
  """Loop transcription of Nandan91/transformer-entropy-regularization EntropyRegularization.compute_loss."""
  h_max = np.log(attn_layers[0].shape[-1])
  total = 0.0
  for layer, a in enumerate(attn_layers):
    ent = -np.nansum(a * np.log(a + 1e-9), axis=-1)
    lay = 0.0
    for h in range(a.shape[1]):
      dev = ent[:, h] - theta[layer, h] * h_max
      lay += np.sum(np.where(np.abs(dev) > gamma * h_max, dev, 0.0) ** 2)
    total += lay / a.shape[1]
  return lam * total / len(attn_layers)


def test_head_entropy_uniform_onehot_and_regulariser():
  """[34]: uniform rows -> log T, one-hot -> 0 (no NaN); the regulariser matches the authors'
  loop, is 0 when every row is inside the band and grows with the full squared deviation."""
  t = 16
  uni = np.full((2, 3, 5, t), 1.0 / t)
  np.testing.assert_allclose(np.asarray(heads.head_entropy(uni)), np.log(t), rtol=1e-6)
  oh = np.zeros((2, 3, 5, t)); oh[..., 2] = 1
  np.testing.assert_allclose(np.asarray(heads.head_entropy(oh)), 0.0, atol=1e-7)
  rng = np.random.default_rng(0)
  s = rng.normal(size=(2, 2, 3, 5, t)) * 3
  a = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
  theta = rng.uniform(0.2, 0.9, size=(2, 3))
  got = float(heads.entropy_regularizer(a, theta, lam=1e-2, gamma=0.1))
  assert got > 0
  np.testing.assert_allclose(got, _entropy_reg_oracle(list(a), theta, 1e-2, 0.1), rtol=1e-4)
  assert float(heads.entropy_regularizer(uni, np.ones(3), gamma=0.2)) == 0.0
  # Just outside the band the penalty is the full deviation squared (not the excess).
  th = np.full(3, 1.0 - 0.25)
  np.testing.assert_allclose(float(heads.entropy_regularizer(uni, th, lam=1.0, gamma=0.2)),
                             2 * 5 * (0.25 * np.log(t)) ** 2, rtol=1e-5)


def test_spectral_norm_converges_to_svd_and_reparam_norm_is_gamma():
  """[39]: converged power iteration matches the SVD's top singular value, so ||W_hat||_2 = |gamma|."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(7, 5)).astype(np.float32)
  u0 = rng.normal(size=(5,)).astype(np.float32)
  top = np.linalg.svd(w, compute_uv=False)[0]
  sigma, _ = heads.spectral_norm(w, u0, num_iters=200)
  np.testing.assert_allclose(float(sigma), top, rtol=1e-5)
  s1, _ = heads.spectral_norm(w, u0, num_iters=1)
  assert float(s1) <= top + 1e-5
  w_hat, _ = heads.sigma_reparam(w, -1.7, u0, num_iters=200)
  np.testing.assert_allclose(np.linalg.svd(np.asarray(w_hat), compute_uv=False)[0], 1.7, rtol=1e-5)


def test_mean_attention_distance_and_offsets():
  """[7]: uniform attention gives the mean pairwise patch distance; a head attending one patch to
  the right gives distance 1 and all its offset mass at (0, +1)."""
  hgt, wid = 3, 4
  pos = np.stack(np.meshgrid(np.arange(hgt), np.arange(wid), indexing="ij"), -1).reshape(-1, 2)
  n = hgt * wid
  pair = np.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1)).mean()
  uni = np.full((1, 2, n, n), 1.0 / n)
  got = heads.mean_attention_distance(uni, heads.grid_positions(hgt, wid))
  np.testing.assert_allclose(np.asarray(got), pair, rtol=1e-6)
  right = np.zeros((1, 1, n, n))
  for i in range(n):
    r, c = divmod(i, wid)
    right[0, 0, i, r * wid + min(c + 1, wid - 1) if c + 1 < wid else i] = 1.0
  # Every query but the last column's moves one patch: distance (wid - 1) / wid on average.
  d = float(heads.mean_attention_distance(right, heads.grid_positions(hgt, wid))[0])
  assert d == pytest.approx((wid - 1) / wid)
  off = np.asarray(heads.attention_by_offset(right, hgt, wid))
  assert off.shape == (1, 2 * hgt - 1, 2 * wid - 1)
  # (0, +1) offset: every pair (i, i+1) in a row; 3 of 4 patches per row attend there.
  assert off[0, hgt - 1, wid] == pytest.approx(1.0)
  assert off[0, hgt - 1, wid - 1] == pytest.approx(hgt / (hgt * wid))  # self: the last column only


def test_head_importance_and_influence():
  """[7], (Hua et al. 2025, arXiv:2505.07293): masking a head whose output is already zero gives I_h = 0; no heads masked
  gives influence 0; masking a used head raises the loss."""
  contrib = np.array([[0.0, 1.0], [2.0, 0.5]])
  loss_fn = lambda s: 10.0 - np.sum(s * contrib)
  imp = np.asarray(heads.head_importance(loss_fn, 2, 2))
  np.testing.assert_allclose(imp, contrib)
  assert imp[0, 0] == 0.0
  per_sample = lambda s: np.stack([10.0 - np.sum(s * contrib), 5.0 - np.sum(s * contrib) / 2])
  np.testing.assert_allclose(np.asarray(heads.attention_influence(per_sample, np.zeros((2, 2), bool))), 0.0)
  m = np.zeros((2, 2), bool); m[1, 0] = True
  np.testing.assert_allclose(np.asarray(heads.attention_influence(per_sample, m)),
                             [2.0 / (10 - 3.5), 1.0 / (5 - 1.75)], rtol=1e-6)


def test_retrieval_scores_copy_head_and_loop_oracle():
  """[98] transcription of nightdessert/Retrieval_Head `retrieval_calculate`: a synthetic copy
  head (one-hot on the copied needle position) scores 1; a head one position off scores 0."""
  rng = np.random.default_rng(3)
  tk, start, end = 20, 6, 11
  ctx = rng.permutation(100)[:tk]
  steps = end - start
  gen = ctx[start:end]
  att = rng.uniform(size=(steps, 2, 3, tk)) * 0.1
  for s in range(steps):
    att[s, 0, 1, start + s] = 1.0            # copy head (layer 0, head 1)
    att[s, 1, 2, start + s + 1] = 1.0        # off by one: attends the next needle token
  got = np.asarray(heads.retrieval_scores(att, gen, ctx, (start, end)))
  assert got[0, 1] == pytest.approx(1.0)
  assert got[1, 2] == pytest.approx(0.0)
  ref = np.zeros((2, 3))
  for s in range(steps):
    for l in range(2):
      for h in range(3):
        i = int(np.argmax(att[s, l, h]))
        if start <= i < end and gen[s] == ctx[i]:
          ref[l, h] += 1 / (end - start)
  np.testing.assert_allclose(got, ref, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(heads.retrieval_heads(got)), ref > 0.1)
  with pytest.raises(ValueError, match="needle_span"):
    heads.retrieval_scores(att, gen, ctx, (5, 30))
