"""Oracles for VAR, text dominance, CARVE, VHD/VHR and SGL (Kang et al. 2025, arXiv:2503.03321), (Wu et al. 2025, arXiv:2508.10552), (Ge et al. 2025, arXiv:2509.06461), (He et al. 2024, arXiv:2412.13949), (Zhao et al. 2024, arXiv:2412.03324)."""

import numpy as np
import pytest

from attnjax.analysis import multimodal as mm


def _rows(rng, shape):
  a = rng.uniform(size=shape)
  return a / a.sum(-1, keepdims=True)


def test_massive_activation_sinks():
  """[11]: phi = max over sink dims of |x_d| / RMS(x) > tau."""
  rng = np.random.default_rng(0)
  h = rng.normal(size=(1, 5, 1024)); h[0, 2, 7] = 400.0; h[0, 4, 9] = -300.0; h[0, 3, 20] = 500.0
  got = np.asarray(mm.massive_activation_sinks(h, [7, 9], tau=20.0))
  rms = np.sqrt((h ** 2).mean(-1) + 1e-6)
  ref = np.max(np.abs(h[..., [7, 9]]) / rms[..., None], -1) > 20.0
  np.testing.assert_array_equal(got, ref)
  assert got[0, 2] and got[0, 4] and not got[0, 3]


def test_var_redistribution_oracle_rowsums_and_noop():
  """[11]: p=0 is a no-op; rows keep their sums; loop oracle (sink weights times 1-p, budget
  spread over non-sink image tokens pro rata) for selected rows only."""
  rng = np.random.default_rng(1)
  b, h, t = 1, 2, 8
  a = _rows(rng, (b, h, t, t))
  img = np.zeros(t, bool); img[2:6] = True
  sink = np.zeros(t, bool); sink[0] = True; sink[3] = True
  sel = np.asarray(mm.image_centric_heads(a, sink, img, rho=0.5, min_visual=0.2))
  vis = a[..., img].sum(-1); ns = a[..., img & ~sink].sum(-1)
  np.testing.assert_array_equal(sel, (vis >= 0.2) & (ns / vis >= 0.5))
  sel = np.zeros((b, h, t), bool); sel[0, 0, ::2] = True
  np.testing.assert_allclose(np.asarray(mm.var_redistribute(a, sink, img, sel, p=0.0)), a, atol=1e-7)
  out = np.asarray(mm.var_redistribute(a, sink, img, sel, p=0.6))
  np.testing.assert_allclose(out.sum(-1), a.sum(-1), rtol=1e-6)
  ref = a.copy()
  for hh in range(h):
    for i in range(t):
      if not sel[0, hh, i]:
        continue
      row = a[0, hh, i]
      budget = 0.6 * row[sink].sum()
      tgt = np.where(img & ~sink, row, 0)
      new = np.where(sink, 0.4 * row, row) + budget * tgt / tgt.sum()
      ref[0, hh, i] = new
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-7)
  assert not np.allclose(out, a)


def test_modality_dominance_uniform_is_balanced():
  """[18]: uniform attention over visible keys gives AEI = MDI = 1 (causal and bidirectional);
  attention only on text gives MDI > 1."""
  t = 10
  text = np.zeros(t, bool); text[6:] = True
  uni = np.tril(np.ones((t, t))); uni /= uni.sum(-1, keepdims=True)
  a = np.broadcast_to(uni, (2, 3, t, t))
  np.testing.assert_allclose(np.asarray(mm.modality_aei(a, text)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(mm.modality_dominance(a, text)), 1.0, rtol=1e-5)
  full = np.full((1, 2, t, t), 1.0 / t)
  np.testing.assert_allclose(np.asarray(mm.modality_dominance(full, text, causal=False)), 1.0, rtol=1e-5)
  q = np.zeros(t, bool); q[6:] = True
  tonly = np.zeros((1, 1, t, t)); tonly[..., 6:, 6] = 1.0; tonly[..., :6, 0] = 1.0
  assert float(mm.modality_dominance(tonly + 1e-3, text, query_mask=q)[0]) > 5


def test_contrastive_attention_flat_on_equal_maps():
  """[77]: A_t = A_g gives a flat map (uniform ratio, zero difference); a task peak survives."""
  rng = np.random.default_rng(2)
  g = rng.uniform(size=(2, 9))
  np.testing.assert_allclose(np.asarray(mm.contrastive_attention(3 * g, g)), 1 / 9, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(mm.contrastive_attention(g, g, mode="difference")), 0, atol=1e-7)
  t = g.copy(); t[:, 4] *= 10
  assert (np.argmax(np.asarray(mm.contrastive_attention(t, g)), -1) == 4).all()
  np.testing.assert_allclose(float(mm.attention_map_entropy(np.ones(8))), np.log(8), rtol=1e-6)


def test_vhd_and_vhr():
  """[89]: identical inputs -> VHD 0; VHD is the L2 distance; VHR scales exactly the top-k."""
  rng = np.random.default_rng(3)
  o = rng.normal(size=(2, 1, 3, 4))
  np.testing.assert_allclose(np.asarray(mm.vhd(o, o)), 0.0)
  o2 = o + rng.normal(size=o.shape)
  np.testing.assert_allclose(np.asarray(mm.vhd(o2, o)), np.linalg.norm(o2 - o, axis=-1), rtol=1e-5)
  s = np.array([[0.1, 0.9, 0.3], [0.5, 0.0, 0.7]])
  sc = np.asarray(mm.vhr_head_scale(s, top_k=2, alpha=1.5))
  np.testing.assert_allclose(sc, [[1, 1.5, 1], [1, 1, 1.5]])
  np.testing.assert_allclose(np.asarray(mm.vhr_head_scale(s, top_k=2, alpha=1.0)), 1.0)


def test_sgl_importance_pruning():
  """[103]: keep ratio 1 keeps every token (large model input unchanged); scores are
  permutation-equivariant in the keys; pruning keeps the highest-importance visual tokens."""
  rng = np.random.default_rng(4)
  t = 8
  a = _rows(rng, (2, 1, 2, t, t))
  vis = np.zeros(t, bool); vis[1:6] = True
  qm = np.zeros(t, bool); qm[6:] = True
  imp = np.asarray(mm.visual_token_importance(a, vis, qm))
  ref = a[..., 6:, :].sum((0, 2, 3))
  np.testing.assert_allclose(imp[:, vis], ref[:, vis], rtol=1e-6)
  assert np.isneginf(imp[:, ~vis]).all()
  perm = rng.permutation(t)
  imp_p = np.asarray(mm.visual_token_importance(a[..., perm], vis[perm], qm))
  np.testing.assert_allclose(imp_p, imp[:, perm], rtol=1e-6)
  x = rng.normal(size=(1, t, 3)).astype(np.float32)
  keep = mm.sgl_keep_indices(imp, vis, keep_ratio=1.0)
  np.testing.assert_array_equal(np.asarray(mm.sgl_prune(np.repeat(x, 1, 0), keep[:1])), x)
  keep = np.asarray(mm.sgl_keep_indices(imp, vis, keep_ratio=0.4))
  top = np.argsort(-imp[0, vis])[:2] + 1
  np.testing.assert_array_equal(keep[0], np.sort(np.concatenate([[0, 6, 7], top])))
