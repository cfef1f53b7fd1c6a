"""2D vision patterns as registered mixers (`swin`, `halo`, `bra`, `freeswim`): the grid layout,
the fast op against the pattern's dense mask, the class-token path, the undefined patterns, and a
ViT built on each. float32, atol 2e-5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import build_mixer
from attnjax.models.vit import ViT
from attnjax.nn.local import grid_attn_fn, grid_layout
from attnjax.ops import local as local_ops
from attnjax.ops.softmax import dot_product_attention

# pattern -> options that tile an 8 x 8 grid (fast path) and ones that do not (dense fallback).
CASES = {"swin": ({"window": 4, "shift": 2}, {"window": 3, "shift": 1},
                 {"window": 4, "shift": 2, "gamma": 0.7}, {"window": 3, "gamma": 0.8}),
         "halo": ({"block": 4, "halo": 1}, {"block": 3, "halo": 1}),
         "bra": ({"regions": 4, "top_k": 3}, {"regions": 3, "top_k": 2}),
         "freeswim": ({"window": 5}, {"window": 3}),
         "na2d": ({"kernel_size": 3, "dilation": 2}, {"kernel_size": 5})}


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
                                             pattern_options=opts, force_dense=dense)
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


@pytest.mark.parametrize("pattern", sorted(CASES))
def test_undefined_patterns_raise(pattern):
  with pytest.raises(NotImplementedError, match="causal"):
    build_mixer(pattern, d_model=16, num_heads=2, causal=True, rngs=nnx.Rngs(0))
  m = build_mixer(pattern, d_model=16, num_heads=2, causal=False, rngs=nnx.Rngs(0))
  x = jnp.ones((1, 16, 16))
  with pytest.raises(NotImplementedError, match="segment_ids"):
    m(x, segment_ids=jnp.zeros((1, 16), jnp.int32))
  with pytest.raises(NotImplementedError, match="cross attention"):
    m(x, context=jnp.ones((1, 9, 16)))


@pytest.mark.parametrize("pattern", sorted(CASES))
def test_vit_on_each_pattern_trains(pattern):
  """ViT(8x8 patches, class token) with the pattern in every layer: finite loss that drops."""
  import optax
  model = ViT(image_size=16, patch_size=2, in_channels=3, num_classes=4, d_model=32, num_layers=2,
              num_heads=2, mixer=pattern, mixer_options=CASES[pattern][0], rngs=nnx.Rngs(0))
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
