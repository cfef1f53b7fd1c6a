"""Static sparse patterns and the 2D local schemes against their dense-mask definitions."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from attnjax.ops import layout as L
from attnjax.ops import block_sparse as bs
from attnjax.ops import local
from attnjax.ops import neighborhood as N
from attnjax.ops.sparse import patterns as P
from attnjax.ops.softmax import dot_product_attention


def _dense(lay):
  return np.asarray(L.dense_mask(lay))


def test_static_patterns_equal_token_definitions():
  t, blk = 37, 8
  i, j = np.arange(t)[:, None], np.arange(t)[None]
  np.testing.assert_array_equal(_dense(P.causal_layout(t, blk))[0, 0], j <= i)
  np.testing.assert_array_equal(_dense(P.sliding_window_layout(t, 5, 0, blk))[0, 0],
                                (j <= i) & (j >= i - 5))
  np.testing.assert_array_equal(_dense(P.sink_local_layout(t, 3, 4, blk))[0, 0],
                                (j <= i) & ((j < 3) | (j > i - 4)))
  np.testing.assert_array_equal(_dense(P.strided_layout(t, 6, 3, blk))[0, 0],
                                (j <= i) & ((i - j < 3) | ((i - j) % 6 == 0)))
  np.testing.assert_array_equal(_dense(P.dilated_layout(t, 4, 3, blk))[0, 0],
                                (j <= i) & (i - j < 12) & ((i - j) % 3 == 0))
  for lay in (P.causal_layout(t, blk), P.strided_layout(t, 6, 3, blk), P.s2_layout(t, 3, blk)):
    L.check_layout(lay)
  # Window covering everything = full causal attention (the defining property).
  np.testing.assert_array_equal(_dense(P.sliding_window_layout(t, t, 0, blk))[0, 0], j <= i)
  assert P.sliding_window_layout(t, 5, 0, blk).max_kv == 2


def test_power_attention_pattern_and_receptive_field():
  bm = P.power_attention_block_mask(16, num_sink_blocks=1)
  assert bm[10, 10] and bm[10, 9] and bm[10, 8] and bm[10, 6] and bm[10, 2] and bm[10, 0]
  assert not bm[10, 7] and not bm[10, 11]
  # log-density: row counts grow like log2(i).
  assert bm.sum(1).max() <= 2 + int(np.log2(16)) + 1
  # Two layers reach every earlier block within distance 2^2 ... in fact all earlier blocks here.
  reach = P.reachable_blocks(bm, 2)
  assert all(reach[i, i - dd] for i in range(16) for dd in range(0, min(i, 4) + 1))
  lay = P.power_attention_layout(70, block=8)
  L.check_layout(lay)
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 70, 2, 8))
  o = bs.block_sparse_attention(q, q, q, lay)
  np.testing.assert_allclose(np.asarray(o), np.asarray(bs.reference_attention(q, q, q, lay)),
                             atol=2e-5)


def test_s2_heads_cover_full_causal():
  lay = P.s2_layout(64, num_heads=4, block=8, local_blocks=1, vert_stride=4)
  dm = _dense(lay)[0]
  assert dm.shape[0] == 4
  np.testing.assert_array_equal(dm.any(0), np.tril(np.ones((64, 64), bool)))
  assert all(not (dm[h] == dm[0]).all() for h in range(1, 4))


def _qkv(key, shape, h, d, hk=None):
  ks = jax.random.split(key, 3)
  hk = hk or h
  return (jax.random.normal(ks[0], shape + (h, d)), jax.random.normal(ks[1], shape + (hk, d)),
          jax.random.normal(ks[2], shape + (hk, d)))


def _timm_rel_logits_1d(q, rel_k, permute_mask):
  """Transcription of `rel_logits_1d` (timm `timm/layers/halo_attn.py`) in numpy."""
  B, H, W, dim = q.shape
  rel_size = rel_k.shape[0]
  win_size = (rel_size + 1) // 2
  x = (q @ rel_k.T).reshape(-1, W, rel_size)
  x_pad = np.pad(x, [(0, 0), (0, 0), (0, 1)]).reshape(x.shape[0], -1)
  x_pad = np.pad(x_pad, [(0, 0), (0, rel_size - W)])
  x = x_pad.reshape(-1, W + 1, rel_size)[:, :W, win_size - 1:]
  x = np.broadcast_to(x.reshape(B, H, 1, W, win_size), (B, H, win_size, W, win_size))
  return x.transpose(permute_mask)


def _timm_halo(q, k, v, block, halo, height_rel, width_rel):
  """Transcription of `HaloAttn.forward` after the q / kv convs (timm `halo_attn.py`, stride 1,
  `scale_pos_embed=False`): zero-padded kv unfolded into windows, `PosEmbedRel` logits, softmax.
  q, k, v `[B, X, Y, H, D]` (timm's NCHW with heads folded into the batch)."""
  b, x, y, nh, d = q.shape
  win = block + 2 * halo
  nb_h, nb_w = x // block, y // block
  fold = lambda a: a.transpose(0, 3, 4, 1, 2).reshape(b * nh, a.shape[-1], x, y)   # (B*nh, d, X, Y)
  qn = fold(q).reshape(b * nh, d, nb_h, block, nb_w, block).transpose(0, 2, 4, 3, 5, 1)
  qn = qn.reshape(b * nh, nb_h * nb_w, block * block, d)
  kvp = np.pad(np.concatenate([fold(k), fold(v)], 1), [(0, 0), (0, 0), (halo, halo), (halo, halo)])
  wins = np.stack([np.stack([kvp[:, :, i * block:i * block + win, j * block:j * block + win]
                             for j in range(nb_w)], 2) for i in range(nb_h)], 2)   # (B*nh, c, nbh, nbw, win, win)
  kv = wins.reshape(b * nh, 2 * d, nb_h * nb_w, win * win).transpose(0, 2, 3, 1)
  kk, vv = kv[..., :d], kv[..., d:]
  qq = qn.reshape(-1, block, block, d)
  rel = (_timm_rel_logits_1d(qq.transpose(0, 2, 1, 3), height_rel, (0, 3, 1, 4, 2))
         + _timm_rel_logits_1d(qq, width_rel, (0, 1, 3, 2, 4)))
  attn = qn @ kk.transpose(0, 1, 3, 2) * d ** -0.5 + rel.reshape(b * nh, nb_h * nb_w, block * block, -1)
  attn = np.exp(attn - attn.max(-1, keepdims=True))
  out = (attn / attn.sum(-1, keepdims=True)) @ vv                 # (B*nh, nb, block^2, d)
  out = out.reshape(b, nh, nb_h, nb_w, block, block, d).transpose(0, 2, 4, 3, 5, 1, 6)
  return out.reshape(b, x, y, nh, d)


def test_halo_matches_timm_haloattn():
  """Zero-padded, unmasked border keys and relative-position logits, as timm's HaloAttn."""
  q, k, v = _qkv(jax.random.PRNGKey(1), (1, 8, 12), 2, 8)
  block, halo = 4, 1
  win = block + 2 * halo
  rh, rw = (jax.random.normal(jax.random.PRNGKey(s), (2 * win - 1, 8)) for s in (7, 8))
  got = jax.jit(local.halo_attention, static_argnums=(3, 4))(q, k, v, block, halo, rel_h=rh, rel_w=rw)
  want = _timm_halo(*(np.asarray(a, np.float64) for a in (q, k, v)), block, halo,
                    np.asarray(rh, np.float64), np.asarray(rw, np.float64))
  np.testing.assert_allclose(got, want, atol=2e-5)
  np.testing.assert_allclose(local.halo_attention(q, k, v, block, halo),
                             _timm_halo(*(np.asarray(a) for a in (q, k, v)), block, halo,
                                        np.zeros((2 * win - 1, 8)), np.zeros((2 * win - 1, 8))),
                             atol=2e-5)


@pytest.mark.parametrize("pad_mode", ["zeros", "mask"])
def test_halo_matches_dense_definition(pad_mode):
  """Fast path (unfold) against the dense oracle (absolute offsets), with relative logits, GQA and
  a map that the block does not divide (padded at the far border)."""
  block, halo = 4, 1
  win = block + 2 * halo
  rh, rw = (jax.random.normal(jax.random.PRNGKey(s), (2 * win - 1, 8)) for s in (7, 8))
  for shape in ((1, 7, 10),):
    q, k, v = _qkv(jax.random.PRNGKey(1), shape, 2, 8, hk=1)
    kw = dict(pad_mode=pad_mode, rel_h=rh, rel_w=rw)
    fast = jax.jit(lambda q, k, v: local.halo_attention(q, k, v, block, halo, **kw))
    ref = jax.jit(lambda q, k, v: local.halo_attention_reference(q, k, v, block, halo, **kw))
    np.testing.assert_allclose(fast(q, k, v), ref(q, k, v), atol=2e-5)
    g = jax.jit(jax.grad(lambda q, k: jnp.sum(fast(q, k, v) ** 2), (0, 1)))(q, k)
    g_ref = jax.jit(jax.grad(lambda q, k: jnp.sum(ref(q, k, v) ** 2), (0, 1)))(q, k)
    for a, b in zip(g, g_ref):
      np.testing.assert_allclose(a, b, atol=1e-4)


def test_halo_covering_image_is_global_attention_and_errors():
  q, k, v = _qkv(jax.random.PRNGKey(2), (1, 4, 4), 1, 4)
  o = local.halo_attention(q, k, v, block=2, halo=2, pad_mode="mask")
  o_full = dot_product_attention(q.reshape(1, 16, 1, 4), k.reshape(1, 16, 1, 4),
                                 v.reshape(1, 16, 1, 4), implementation="reference")
  np.testing.assert_allclose(np.asarray(o).reshape(1, 16, 1, 4), np.asarray(o_full), atol=2e-5)
  with pytest.raises(ValueError, match="block"):
    local.halo_attention(q, k, v, block=0, halo=1)
  with pytest.raises(ValueError, match="rel_h"):
    local.halo_attention(q, k, v, block=2, halo=1, rel_h=jnp.zeros((7, 4)), rel_w=jnp.zeros((6, 4)))


@pytest.mark.parametrize("shift", [0, (2, 1)])
def test_swin_roll_equals_cell_mask_with_bias(shift):
  q, k, v = _qkv(jax.random.PRNGKey(3), (2, 8, 6), 2, 8)
  rpb = jax.random.normal(jax.random.PRNGKey(4), (2, 12, 12))
  fast = lambda q: local.swin_window_attention(q, k, v, (4, 3), shift, bias=rpb)
  ref = lambda q: local.swin_window_attention_reference(q, k, v, (4, 3), shift, bias=rpb)
  np.testing.assert_allclose(jax.jit(fast)(q), jax.jit(ref)(q), atol=2e-5)
  g = jax.jit(jax.grad(lambda q: jnp.sum(fast(q) ** 2)))(q)
  g_ref = jax.jit(jax.grad(lambda q: jnp.sum(ref(q) ** 2)))(q)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-4)


def test_swin_unshifted_equals_blocked_na_and_errors():
  q, k, v = _qkv(jax.random.PRNGKey(5), (1, 6, 6), 2, 8)
  o = local.swin_window_attention(q, k, v, 3, 0)
  o_na = N.na2d(q, k, v, 3, stride=3, implementation="reference")
  np.testing.assert_allclose(np.asarray(o), np.asarray(o_na), atol=2e-5)
  with pytest.raises(ValueError, match="window"):
    local.swin_window_attention(q, k, v, 4, 0)
  with pytest.raises(ValueError, match="shift"):
    local.swin_window_attention(q, k, v, 3, 3)


def _rmt_decomposed_in_windows(q, k, v, window, shift, decay):
  """Oracle: Swin's `torch.roll` + window partition (+ its region mask between wrapped slices),
  and inside each window the two passes of RMT's `VisionRetentionChunk.forward` (qhfan/RMT
  `classfication_release/RMT.py`): width-wise `softmax(q k^T * d^-0.5 + mask_w) v`, then
  height-wise on that output with `mask_h`, `mask = |i - j| * decay` (`generate_1d_decay`).
  numpy float64, `[B, X, Y, H, D]`, `decay [H]`."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  (wx, wy), (sx, sy) = window, shift
  b, x, y, h, d = q.shape
  roll = lambda a, s: np.roll(a, s, axis=(1, 2))
  q, k, v = roll(q, (-sx, -sy)), roll(k, (-sx, -sy)), roll(v, (-sx, -sy))
  def regions(size, w, s):   # Swin's slices (0, -w), (-w, -s), (-s, None)
    r = np.zeros(size, int)
    if s:
      r[size - w:size - s], r[size - s:] = 1, 2
    return r
  rx, ry = regions(x, wx, sx), regions(y, wy, sy)
  decay = np.asarray(decay, np.float64)
  def one_d(l):
    idx = np.arange(l)
    return np.abs(idx[:, None] - idx[None])[None] * decay[:, None, None]      # (n l l)
  def softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)
  out = np.zeros(v.shape)
  for i in range(0, x, wx):
    for j in range(0, y, wy):
      qw, kw, vw = (a[:, i:i + wx, j:j + wy] for a in (q, k, v))          # (b wx wy n d)
      mw = one_d(wy) + np.where(ry[j:j + wy][:, None] == ry[j:j + wy][None], 0, -np.inf)
      mh = one_d(wx) + np.where(rx[i:i + wx][:, None] == rx[i:i + wx][None], 0, -np.inf)
      qr, kr = qw.transpose(0, 3, 1, 2, 4), kw.transpose(0, 3, 1, 2, 4) * d ** -0.5  # (b n h w d)
      qr_w, kr_w = qr.transpose(0, 2, 1, 3, 4), kr.transpose(0, 2, 1, 3, 4)        # (b h n w d)
      vv = vw.transpose(0, 1, 3, 2, 4)                                              # (b h n w d2)
      vv = softmax(qr_w @ kr_w.swapaxes(-1, -2) + mw) @ vv
      qr_h, kr_h = qr.transpose(0, 3, 1, 2, 4), kr.transpose(0, 3, 1, 2, 4)        # (b w n h d)
      vv = vv.transpose(0, 3, 2, 1, 4)                                              # (b w n h d2)
      o = softmax(qr_h @ kr_h.swapaxes(-1, -2) + mh) @ vv                           # (b w n h d2)
      out[:, i:i + wx, j:j + wy] = o.transpose(0, 3, 1, 2, 4)
  return roll(out, (sx, sy))


@pytest.mark.parametrize("window,shift", [((4, 3), (0, 0)), ((4, 3), (2, 1)), ((2, 6), (1, 0))])
def test_decomposed_window_retention_matches_rmt_passes(window, shift):
  """Gated-SwinRMT's width- then height-wise retention (not a joint 2-D softmax) with RMT's
  per-head decay schedule, against the per-window transcription of RMT's two passes."""
  q, k, v = _qkv(jax.random.PRNGKey(3), (2, 8, 6), 2, 8)
  decay = local.rmt_log_decay(2, 2.0, 4.0)
  np.testing.assert_allclose(decay, np.log(1 - 2 ** (-2.0 - 4.0 * np.arange(2) / 2)), rtol=1e-6)
  fn = jax.jit(lambda q, k, v: local.decomposed_window_retention(q, k, v, window, shift,
                                                                 log_decay=decay))
  np.testing.assert_allclose(fn(q, k, v), _rmt_decomposed_in_windows(q, k, v, window, shift, decay),
                             atol=2e-5)
  # A window that does not divide the map: the far-border partial cell (rows 6-7, columns 4-5 of
  # window (3, 4)) sees only itself, so it equals the op on that cell alone.
  part = local.decomposed_window_retention(q, k, v, (3, 4), 0, log_decay=decay)
  alone = local.decomposed_window_retention(q[:, 6:, 4:], k[:, 6:, 4:], v[:, 6:, 4:], (2, 2), 0,
                                            log_decay=decay)
  np.testing.assert_allclose(part[:, 6:, 4:], alone, atol=2e-6)
  g = jax.jit(jax.grad(lambda q, k: jnp.sum(fn(q, k, v) ** 2), (0, 1)))(q, k)
  assert all(np.isfinite(a).all() for a in g)
  with pytest.raises(ValueError, match="log_decay"):
    local.decomposed_window_retention(q, k, v, 4, 0, log_decay=jnp.zeros(3))


def _inward_window_attention(q, k, v, window):
  """Oracle for FreeSwim's inward sliding window (Wu et al. 2025, arXiv:2511.14712), from the definition alone: along each
  spatial axis a query at i sees the `w` keys `[s, s + w)` with `s = clip(i - w // 2, 0, size - w)`
  (the window centred on the query, shifted inward at the borders; `w` clipped to the size), and
  softmax attention runs over the product of those ranges. numpy, `[B, *spatial, H, D]`."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  spatial = q.shape[1:-2]
  vis = np.ones((1, 1), bool)
  for size, w in zip(spatial, window):
    w = min(w, size)
    s = np.clip(np.arange(size) - w // 2, 0, size - w)
    r = (np.arange(size)[None, :] >= s[:, None]) & (np.arange(size)[None, :] < s[:, None] + w)
    vis = (vis[:, None, :, None] & r[None, :, None, :]).reshape(vis.shape[0] * size, -1)
  b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
  qf, kf, vf = (a.reshape(b, -1, h, a.shape[-1]) for a in (q, k, v))
  sc = np.where(vis, np.einsum("bqhd,bkhd->bhqk", qf, kf) / np.sqrt(d), -np.inf)
  p = np.exp(sc - sc.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, vf).reshape(q.shape[:-1] + (v.shape[-1],))


def test_freeswim_inward_window():
  """The fast path and the reference against the inward-window definition (odd windows, where the
  centring is unambiguous; a window larger than the map is full attention along that axis)."""
  fs = jax.jit(local.freeswim_attention, static_argnums=3, static_argnames="implementation")
  q, k, v = _qkv(jax.random.PRNGKey(6), (1, 7, 9), 2, 8)
  for window in ((3, 5), (5, 16)):
    want = _inward_window_attention(q, k, v, window)
    for impl in ("xla", "reference"):
      np.testing.assert_allclose(fs(q, k, v, window, implementation=impl), want, atol=2e-5,
                                 err_msg=f"{window} {impl}")
  q1, k1, v1 = _qkv(jax.random.PRNGKey(7), (2, 11), 1, 4)
  np.testing.assert_allclose(fs(q1, k1, v1, 5), _inward_window_attention(q1, k1, v1, (5,)),
                             atol=2e-5)
  # Even windows: every query still sees exactly prod(window) keys.
  assert (N.na_mask((7, 9), (3, 4)).sum(1) == 12).all()
