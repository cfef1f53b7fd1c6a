"""Oracles for the sink probes and ACT (Gu et al. 2024, arXiv:2410.10781), (Wong et al. 2025, arXiv:2512.22213), (Guo et al. 2024, arXiv:2410.13835), (Yu et al. 2024, arXiv:2406.15765)."""

import numpy as np
import pytest

from attnjax.analysis import sinks


def _uniform_causal(t):
  a = np.tril(np.ones((t, t)))
  return a / a.sum(-1, keepdims=True)


def _random_causal(rng, b, h, t):
  s = rng.normal(size=(b, h, t, t)) * 2
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  e = np.exp(s - s.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_sink_rate_oracles():
  """[32] Gu et al. (oracle: sail-sg/Attention-Sink eval_sink_open_source.py): one-hot on the first token -> 1; uniform causal T=64 -> importance
  H_64/64 ~= 0.0741 -> 0 at eps=0.3, but 1 at eps=0.07 (the threshold is really applied)."""
  t = 64
  onehot = np.zeros((2, 1, 3, t, t)); onehot[..., 0] = 1
  assert float(sinks.sink_rate(onehot)) == 1.0
  uni = np.broadcast_to(_uniform_causal(t), (2, 1, 3, t, t))
  harmonic = sum(1 / i for i in range(1, t + 1)) / t
  assert abs(harmonic - 0.0741) < 1e-3
  assert float(sinks.sink_rate(uni, eps=0.3)) == 0.0
  assert float(sinks.sink_rate(uni, eps=harmonic - 1e-4)) == 1.0
  assert float(sinks.sink_rate(uni, eps=harmonic + 1e-4)) == 0.0
  # k > 0: sail-sg/Attention-Sink compute_attention_sink divides by the T - k queries that see k.
  imp3 = sum(1 / (i + 1) for i in range(3, t)) / (t - 3)
  assert float(sinks.sink_rate(uni, k=3, eps=imp3 - 1e-4)) == 1.0
  assert float(sinks.sink_rate(uni, k=3, eps=imp3 + 1e-4)) == 0.0
  # Half the heads one-hot: rate 1/2.
  mix = np.concatenate([onehot[:, :, :2], np.asarray(uni)[:, :, :2]], 2)
  assert float(sinks.sink_rate(mix)) == 0.5
  with pytest.raises(ValueError, match="attn"):
    sinks.sink_rate(np.zeros((4, 4)))


def test_sink_scores_bos_twin_and_loop_oracle():
  """[24]: a token whose key equals BOS's key gets BOS's score (over a common query set);
  default scores match a loop transcription (mean over heads and strictly later queries)."""
  rng = np.random.default_rng(0)
  b, h, t, d = 2, 3, 9, 4
  q = rng.normal(size=(b, h, t, d)); k = rng.normal(size=(b, h, t, d))
  k[:, :, 4] = k[:, :, 0]
  s = np.einsum("bhid,bhjd->bhij", q, k)
  s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  a = np.exp(s - s.max(-1, keepdims=True)); a /= a.sum(-1, keepdims=True)
  sc = np.asarray(sinks.sink_scores(a, query_start=5))
  np.testing.assert_allclose(sc[:, 4], sc[:, 0], rtol=1e-6)
  assert not np.allclose(sc[:, 3], sc[:, 0])
  ref = np.zeros((b, t))
  for j in range(t):
    rows = [i for i in range(t) if i > j]
    if rows:
      ref[:, j] = a[:, :, rows, j].mean(axis=(1, 2))
  np.testing.assert_allclose(np.asarray(sinks.sink_scores(a)), ref, rtol=1e-6, atol=1e-7)
  sec = np.asarray(sinks.secondary_sinks(ref, threshold=0.0))
  assert not sec[:, 0].any() and sec[:, 1:-1].all()


def test_sinks_by_bos_alignment():
  """[24] JeffreyWong20/Secondary-Attention-Sinks hidden_state_norm_detection: |cos| > 0.9 with
  the BOS state, positions after BOS only (anti-aligned counts too)."""
  rng = np.random.default_rng(5)
  h = rng.normal(size=(1, 6, 16))
  h[0, 3] = 2.0 * h[0, 0] + 0.01 * rng.normal(size=16)
  h[0, 5] = -h[0, 0]
  got = np.asarray(sinks.sinks_by_bos_alignment(h))
  np.testing.assert_array_equal(got[0], [False, False, False, True, False, True])
  hn = h[0] / np.linalg.norm(h[0], axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(sinks.bos_alignment(h))[0], hn @ hn[0], rtol=1e-5)


def test_active_dormant_metrics():
  """[99]: one-hot on token 0 -> sink mass 1 (dormant); value drain and residual peak are the
  norm ratio of token 0 to the mean of the others."""
  t = 6
  onehot = np.zeros((1, 2, t, t)); onehot[..., 0] = 1
  np.testing.assert_allclose(np.asarray(sinks.sink_mass(onehot)), 1.0)
  assert np.asarray(sinks.dormant_heads(onehot)).all()
  assert not np.asarray(sinks.dormant_heads(np.broadcast_to(_uniform_causal(t), (1, 2, t, t)))).any()
  rng = np.random.default_rng(1)
  v = rng.normal(size=(2, t, 3, 4))
  n = np.linalg.norm(v, axis=-1)
  np.testing.assert_allclose(np.asarray(sinks.value_drain(v)), n[:, 0] / n[:, 1:].mean(1), rtol=1e-5)
  hid = rng.normal(size=(2, t, 8)); hid[:, 0] *= 50
  nh = np.linalg.norm(hid, axis=-1)
  np.testing.assert_allclose(np.asarray(sinks.residual_peak(hid)), nh[:, 0] / nh[:, 1:].mean(1), rtol=1e-5)


def _act_oracle(a, beta, thres):
  """Loop transcription of GATECH-EIC/ACT models/llama_modelling_aug.py `atten_process_eval`
  for one head [T, T] (causal)."""
  t = a.shape[0]
  col = a.sum(0) / np.arange(t, 0, -1)
  idx = np.nonzero(col > thres)[0][1:]
  out = a.copy()
  freed = a[:, idx].sum(1) * (1 - beta)
  out[:, idx] *= beta
  ratios = a.copy(); ratios[1:, idx] = 0
  ratios = ratios / ratios.sum(1, keepdims=True)
  out = out + freed[:, None] * ratios
  out[0, 0] = 1
  return out


def test_act_calibration_matches_authors_code_and_noop():
  rng = np.random.default_rng(2)
  b, h, t = 1, 3, 12
  a = _random_causal(rng, b, h, t)
  a[..., 0] += 2.0; a[..., 5] += 1.0          # initial sink and a hidden sink at 5
  a = np.where(np.tril(np.ones((t, t), bool)), a, 0); a /= a.sum(-1, keepdims=True)
  mask = sinks.act_sink_mask(a, threshold=0.1)
  assert np.asarray(mask)[0, :, 5].all() and not np.asarray(mask)[..., 0].any()
  heads = np.array([True, False, True])
  out = np.asarray(sinks.act_calibrate(a, mask, beta=0.4, heads=heads))
  for hh in range(h):
    ref = _act_oracle(a[0, hh], 0.4, 0.1) if heads[hh] else a[0, hh]
    # Row 0's authors' ratio row divides by the sink column too; causal row 0 is one-hot anyway.
    np.testing.assert_allclose(out[0, hh, 1:], ref[1:], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(sinks.act_calibrate(a, mask, beta=1.0)), a, atol=1e-7)
  assert not np.allclose(out[0, 0], a[0, 0])


def test_act_search_keeps_only_helpful_heads():
  good = np.zeros((2, 3), bool); good[1, 2] = True
  score = lambda m: float((m & good).sum()) - 0.5 * float((m & ~good).sum())
  np.testing.assert_array_equal(sinks.act_search_heads(score, 2, 3), good)
