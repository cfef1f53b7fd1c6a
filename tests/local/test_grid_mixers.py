"""2D vision patterns as registered mixers (`swin`, `halo`, `bra`, `freeswim`, `na2d`, `swin_rmt`):
the grid layout, the fast op against the pattern's dense mask, the class-token path, the CAB
patterns, the halo / bra / swin_rmt layers against their authors' code, and a ViT built on each.
float32, atol 2e-5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import build_mixer
from attnjax.models.vit import ViT
from attnjax.nn.local import grid_attn_fn, grid_layout
from attnjax.ops import local as local_ops
from attnjax.ops.operators._common import PatternUndefinedError
from attnjax.ops.softmax import dot_product_attention

# pattern -> options that tile an 8 x 8 grid (fast path) and ones that do not (dense fallback).
_REL = tuple(jax.random.normal(jax.random.key(s), (11, 8)) * 0.5 for s in (11, 12))
CASES = {"swin": ({"window": 4, "shift": 2}, {"window": 3, "shift": 1}),
         "halo": ({"block": 4, "halo": 1}, {"block": 3, "halo": 1},
                  {"block": 4, "halo": 1, "pad_mode": "mask", "rel_h": _REL[0], "rel_w": _REL[1]}),
         "bra": ({"regions": 4, "top_k": 3}, {"regions": 3, "top_k": 2}),
         "freeswim": ({"window": 5}, {"window": 3}),
         "na2d": ({"kernel_size": 3, "dilation": 2}, {"kernel_size": 5})}
MIXER_OPTS = {**{p: {k_: v_ for k_, v_ in c[0].items()} for p, c in CASES.items()},
              "swin_rmt": {"window": 4, "shift": 2}}


def _qkv(t, h=2, d=8, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k_, (2, t, h, d)) for k_ in ks)


def test_grid_layout():
  assert grid_layout(64) == (0, (8, 8))
  assert grid_layout(65) == (1, (8, 8))              # class token + 8 x 8
  assert grid_layout(13) == (0, (1, 13))             # a plain sequence: one row
  assert grid_layout(12, grid=(3, 4)) == (0, (3, 4))
  assert grid_layout(14, grid=(3, 4)) == (2, (3, 4))
  with pytest.raises(ValueError, match="does not fit"):
    grid_layout(13, grid=(3, 4), num_prefix=0)


@pytest.mark.parametrize("pattern", sorted(CASES))
def test_fast_path_equals_dense_pattern(pattern):
  q, k, v = _qkv(64)
  for opts in CASES[pattern]:
    fn = lambda q, k, v, dense: grid_attn_fn(q, k, v, causal=False, pattern=pattern,
                                             pattern_options=opts,
                                             implementation="reference" if dense else None)
    w = jax.random.normal(jax.random.key(5), v.shape)
    loss = lambda dense: jax.jit(jax.value_and_grad(
        lambda q, k, v: jnp.sum(w * fn(q, k, v, dense)), argnums=(0, 1, 2)))(q, k, v)
    (lf, gf), (ld, gd) = loss(False), loss(True)
    np.testing.assert_allclose(jax.jit(fn, static_argnums=3)(q, k, v, False),
                               jax.jit(fn, static_argnums=3)(q, k, v, True), atol=2e-5)
    for a, b in zip(gf, gd):
      np.testing.assert_allclose(a, b, atol=1e-4)


def test_swin_dense_fallback_is_the_window_mask():
  """Partial windows (window 3 on an 8 x 8 map): each token attends its own cell only."""
  q, k, v = _qkv(64)
  o = grid_attn_fn(q, k, v, causal=False, pattern="swin", pattern_options={"window": 3})
  mask = local_ops.swin_mask(8, 8, 3, 0)
  ref = dot_product_attention(q, k, v, mask=jnp.asarray(mask), implementation="reference")
  np.testing.assert_allclose(o, ref, atol=2e-5)
  assert not mask[0, 3] and mask[0, 2] and mask[63, 54]


def test_class_token_attends_everything_and_image_tokens_ignore_it():
  q, k, v = _qkv(65)
  o = grid_attn_fn(q, k, v, causal=False, pattern="halo", pattern_options={"block": 4, "halo": 1})
  np.testing.assert_allclose(o[:, :1], dot_product_attention(q[:, :1], k, v,
                                                             implementation="reference"), atol=2e-5)
  img = grid_attn_fn(q[:, 1:], k[:, 1:], v[:, 1:], causal=False, pattern="halo",
                     pattern_options={"block": 4, "halo": 1})
  np.testing.assert_allclose(o[:, 1:], img, atol=2e-5)


@pytest.mark.parametrize("pattern", sorted(MIXER_OPTS))
def test_cab_patterns(pattern):
  """Non-causal self: defined. Non-causal cross against a map on the same grid: defined (keys at
  the same positions; the output reads the context). Causal (self or cross), packed sequences
  and a context of another length: `PatternUndefinedError`."""
  with pytest.raises(PatternUndefinedError, match="causal"):
    build_mixer(pattern, d_model=16, num_heads=2, causal=True, rngs=nnx.Rngs(0))
  m = build_mixer(pattern, d_model=16, num_heads=2, causal=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, 16, 16))
  ctx = jax.random.normal(jax.random.key(1), (1, 16, 16))
  cross = nnx.jit(lambda m, x, c: m(x, context=c))
  y = cross(m, x, ctx)
  assert y.shape == x.shape and np.isfinite(y).all()
  assert not np.allclose(cross(m, x, ctx.at[:, 5].add(3.0)), y, atol=1e-5)
  with pytest.raises(PatternUndefinedError, match="segment_ids"):
    m(x, segment_ids=jnp.zeros((1, 16), jnp.int32))
  with pytest.raises(PatternUndefinedError, match="cross attention"):
    m(x, context=jnp.ones((1, 9, 16)))
  if pattern == "swin":
    with pytest.raises(ValueError, match="swin_rmt"):
      build_mixer("swin", d_model=16, num_heads=2, causal=False, gamma=0.9, rngs=nnx.Rngs(0))


def _proj(m, x):
  h = m.num_heads
  heads = lambda a: a.reshape(a.shape[0], a.shape[1], h, -1)
  return (heads(x @ m.q_proj.kernel[...]), heads(x @ m.k_proj.kernel[...]),
          heads(x @ m.v_proj.kernel[...]))


def test_halo_mixer_is_timm_haloattn():
  """The mixer runs timm's HaloAttn (`timm/layers/halo_attn.py`): zero-padded, unmasked border
  keys and the relative-position logits (`ops.local.halo_attention` is checked against a
  transcription of timm in tests/local/test_local_and_patterns.py)."""
  m = build_mixer("halo", d_model=16, num_heads=2, causal=False, block=4, halo=1, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (2, 64, 16))
  q, k, v = _proj(m, x)
  img = lambda a: a.reshape(2, 8, 8, 2, 8)
  for pad_mode in ("zeros", "mask"):
    o = local_ops.halo_attention(img(q), img(k), img(v), 4, 1, pad_mode=pad_mode,
                                 rel_h=m.attn_fn.rel_h[...], rel_w=m.attn_fn.rel_w[...])
    want = o.reshape(2, 64, 16) @ m.o_proj.kernel[...]
    if pad_mode == "zeros":
      np.testing.assert_allclose(m(x), want, atol=2e-5)
    else:
      assert not np.allclose(m(x), want, atol=1e-4)     # border blocks differ: keys unmasked
  assert np.abs(m.attn_fn.rel_h[...]).max() > 0


def _bra_legacy(q, k, v, n_win, topk):
  """Transcription of `BiLevelRoutingAttention.forward` (rayleizhu/BiFormer `ops/bra_legacy.py`)
  after the q / kv projection, without LCE: `auto_pad` (zeros at the bottom / right), region-mean
  routing `(q_win * scale) @ k_win^T` and top-k, gather, and per-head softmax attention scaled by
  `scale = qk_dim ** -0.5` with `qk_dim` the full width. numpy, `[N, H, W, C]` in and out."""
  n, h_in, w_in, c = q.shape
  pad = ((0, 0), (0, -h_in % n_win), (0, -w_in % n_win), (0, 0))
  q, k, v = (np.pad(a, pad) for a in (q, k, v))
  _, hh, ww, _ = q.shape
  rh, rw = hh // n_win, ww // n_win
  scale = c ** -0.5
  part = lambda a: a.reshape(n, n_win, rh, n_win, rw, c).transpose(0, 1, 3, 2, 4, 5).reshape(
      n, n_win * n_win, rh * rw, c)
  qp, kp, vp = part(q), part(k), part(v)
  logit = (qp.mean(2) * scale) @ kp.mean(2).transpose(0, 2, 1)
  idx = np.argsort(-logit, axis=-1)[..., :topk]
  out = np.zeros_like(qp)
  nh = NUM_HEADS
  for b in range(n):
    for r in range(n_win * n_win):
      ks = kp[b, idx[b, r]].reshape(-1, nh, c // nh)
      vs = vp[b, idx[b, r]].reshape(-1, nh, c // nh)
      qs = qp[b, r].reshape(-1, nh, c // nh)
      a = np.einsum("qhd,khd->hqk", qs * scale, ks)
      a = np.exp(a - a.max(-1, keepdims=True))
      a /= a.sum(-1, keepdims=True)
      out[b, r] = np.einsum("hqk,khd->qhd", a, vs).reshape(-1, c)
  out = out.reshape(n, n_win, n_win, rh, rw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, hh, ww, c)
  return out[:, :h_in, :w_in]


NUM_HEADS = 2


def test_bra_mixer_matches_bra_legacy():
  """A 6 x 6 map with 4 regions: padded to 8 x 8 (not silently 3 regions), full-width scale."""
  m = build_mixer("bra", d_model=16, num_heads=NUM_HEADS, causal=False, regions=4, top_k=3,
                  rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 36, 16)) * 2.0
  q, k, v = _proj(m, x)
  flat = lambda a: np.asarray(a, np.float64).reshape(2, 6, 6, 16)
  o = _bra_legacy(flat(q), flat(k), flat(v), 4, 3).reshape(2, 36, 16)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(m, x),
                             o @ np.asarray(m.o_proj.kernel[...], np.float64), atol=2e-5)


def _depthwise_same(x, kernel, bias):
  """numpy depth-wise 2-D cross-correlation, zero 'SAME' padding: x [B, X, Y, C], kernel
  [kh, kw, 1, C] (flax layout), bias [C]."""
  kh, kw = kernel.shape[:2]
  xp = np.pad(x, ((0, 0), (kh // 2, kh - 1 - kh // 2), (kw // 2, kw - 1 - kw // 2), (0, 0)))
  out = np.zeros_like(x) + bias
  for a in range(kh):
    for c in range(kw):
      out = out + xp[:, a:a + x.shape[1], c:c + x.shape[2]] * kernel[a, c, 0]
  return out


def test_swin_rmt_mixer_is_gated_retention_with_lce():
  """Gated-SwinRMT-Retention (Maity et al. 2026, arXiv:2604.06014): `W_O (sigmoid(x W_g) * (DecomposedRetention(Q, K, V) +
  LCE(V)))` with RMT's per-head decay `log(1 - 2^(-2 - 4 h / H))` (qhfan/RMT `RetNetRelPos2d`)."""
  m = build_mixer("swin_rmt", d_model=16, num_heads=2, causal=False, window=4, shift=2,
                  rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(4), (2, 64, 16))
  q, k, v = _proj(m, x)
  img = lambda a: a.reshape(2, 8, 8, 2, 8)
  decay = np.log(1 - 2.0 ** (-2.0 - 4.0 * np.arange(2) / 2))
  ret = local_ops.decomposed_window_retention(img(q), img(k), img(v), 4, 2, log_decay=decay)
  lce = _depthwise_same(np.asarray(v).reshape(2, 8, 8, 16), np.asarray(m.attn_fn.lce.kernel[...]),
                        np.asarray(m.attn_fn.lce.bias[...]))
  gate = jax.nn.sigmoid(x @ m.gate_proj.kernel[...] + m.gate_proj.bias[...])
  want = (gate * (np.asarray(ret).reshape(2, 64, 16) + lce.reshape(2, 64, 16))) @ m.o_proj.kernel[...]
  np.testing.assert_allclose(m(x), want, atol=2e-5)


@pytest.mark.parametrize("pattern", sorted(MIXER_OPTS))
def test_vit_on_each_pattern_trains(pattern):
  """ViT(8x8 patches, class token) with the pattern in every layer: finite loss that drops."""
  import optax
  model = ViT(image_size=16, patch_size=2, in_channels=3, num_classes=4, d_model=32, num_layers=2,
              num_heads=2, mixer=pattern, mixer_options=MIXER_OPTS[pattern], rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
  y = jnp.arange(8) % 4
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    loss, g = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, g)
    return loss

  losses = [float(step(model, opt)) for _ in range(6)]
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


def test_bra_layer_pads_before_projection_and_scales_by_full_width():
  """`BiLevelRoutingAttention2D` (the BiFormer backbone's layer) as the authors' forward with
  `auto_pad`: x zero-padded to a multiple of the regions before the biased q/k/v projection,
  `_bra_legacy` attention, LCE (depth-wise 5x5 conv of V) added, output projection, crop."""
  from attnjax.nn.sparse import BiLevelRoutingAttention2D
  m = BiLevelRoutingAttention2D(16, NUM_HEADS, regions=4, top_k=3, rngs=nnx.Rngs(0))
  m.qkv.bias[...] = jax.random.normal(jax.random.key(6), m.qkv.bias[...].shape)
  x = jax.random.normal(jax.random.key(5), (2, 6, 6, 16)) * 2.0
  f = lambda a: np.asarray(a, np.float64)
  xp = np.pad(f(x), ((0, 0), (0, 2), (0, 2), (0, 0)))
  qkv = (xp @ f(m.qkv.kernel[...]) + f(m.qkv.bias[...])).reshape(2, 8, 8, 3, NUM_HEADS, 8)
  q, k, v = (qkv[..., i, :, :].reshape(2, 8, 8, 16) for i in range(3))
  o = _bra_legacy(q, k, v, 4, 3) + _depthwise_same(v, f(m.lce.kernel[...]), f(m.lce.bias[...]))
  want = (o @ f(m.proj.kernel[...]) + f(m.proj.bias[...]))[:, :6, :6]
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(m, x), want, atol=5e-5)
