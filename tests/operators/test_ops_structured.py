"""Reversed (Ding et al. 2023, arXiv:2304.03282), GPSA (d'Ascoli et al. 2021, arXiv:2103.10697), DHA (Chen et al. 2024, arXiv:2406.06567), relative (Sugiharto et al. 2023, arXiv:2308.03429), hierarchical (Amizadeh et al. 2025, arXiv:2509.15448), MODA (Zhang et al. 2025, arXiv:2507.04635), EP (Psomas et al. 2025, arXiv:2506.10178),
LAMA (Mehta et al. 2019, arXiv:1912.00835), CCA (Xing et al. 2024, arXiv:2410.15926), GAAM (Ioannides et al. 2024, arXiv:2401.11143): oracles, gradients, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops import dot_product_attention
from attnjax.ops import operators as ops

B, T, H, D, DV = 2, 7, 3, 5, 4


def _qkv(rand, tq=T, tk=T, h=H, hk=H):
  return rand(1, B, tq, h, D), rand(2, B, tk, hk, D), rand(3, B, tk, hk, DV)


def _grads_close(f, g, args, rand, out_shape):
  ct = rand(99, *out_shape)
  n = tuple(range(len(args)))
  # Jitted: one compile per side is far cheaper than op-by-op dispatch on this CPU.
  g1 = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * ct), n))(*args)
  g2 = jax.jit(jax.grad(lambda *a: jnp.sum(g(*a) * ct), n))(*args)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_reversed_attention_oracles(rand):
  q, k, v = _qkv(rand, tq=5, tk=T)
  w = ops.reversed_attention_weights(q, k)
  np.testing.assert_allclose(w.sum(-2), 1.0, rtol=1e-6)        # columns sum to 1
  # Transpose of the standard softmax on S^T.
  wt = ops.softmax_attention_weights(k, q)
  np.testing.assert_allclose(w, jnp.swapaxes(wt, -1, -2), atol=1e-6)
  o = ops.reversed_attention(q, k, v)
  np.testing.assert_allclose(o.sum(1), jnp.asarray(v).sum(1), atol=1e-5)   # m = 1: mass conserved
  msg = jax.nn.sigmoid(rand(4, B, T, H))
  ref = lambda q, k, v, m: jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(
      jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D), axis=-2) * jnp.swapaxes(m, 1, 2)[:, :, None], v)
  np.testing.assert_allclose(jax.jit(ops.reversed_attention)(q, k, v, message=msg),
                             jax.jit(ref)(q, k, v, msg), atol=1e-5)
  _grads_close(lambda *a: ops.reversed_attention(*a[:3], message=a[3]), ref, (q, k, v, msg), rand,
               (B, 5, H, DV))
  with pytest.raises(ValueError, match="causal pattern is undefined"):
    ops.reversed_attention(q, k, v, causal=True)


def test_gpsa_oracles(rand):
  gh, gw = 3, 4
  q, k, v = _qkv(rand, tq=gh * gw, tk=gh * gw)
  pos = ops.gpsa_local_init(H, 1.0)
  gpsa = jax.jit(ops.gpsa_attention, static_argnames="grid")
  plain = gpsa(q, k, v, pos, jnp.full((H,), -60.0), grid=(gh, gw))
  np.testing.assert_allclose(plain, jax.jit(dot_product_attention)(q, k, v),
                             atol=1e-6)   # sigma(l) = 0
  _grads_close(lambda q, k, v: ops.gpsa_attention(q, k, v, pos, jnp.ones(H), grid=(gh, gw)),
               lambda q, k, v: (1 - jax.nn.sigmoid(1.0)) * dot_product_attention(q, k, v)
               + jax.nn.sigmoid(1.0) * jnp.einsum("hqk,bkhd->bqhd", jax.nn.softmax(jnp.einsum(
                   "qkr,hr->hqk", ops.grid_offsets(gh, gw), pos), -1), v),
               (q, k, v), rand, (B, gh * gw, H, DV))
  with pytest.raises(ValueError, match="grid"):
    ops.gpsa_attention(q, k, v, pos, jnp.ones(H), grid=(3, 3))


def _convit_local_init(num_heads, locality_strength):
  """Transcription of `GPSA.local_init` (facebookresearch/convit `convit.py`): the `pos_proj`
  weight `[H, 3]` over the authors' `rel_indices` channels `(indx, indy, indd)`."""
  w = np.zeros((num_heads, 3), np.float32)
  kernel_size = int(num_heads ** .5)
  center = (kernel_size - 1) / 2 if kernel_size % 2 == 0 else kernel_size // 2
  for h1 in range(kernel_size):
    for h2 in range(kernel_size):
      position = h1 + kernel_size * h2
      w[position, 2] = -1
      w[position, 1] = 2 * (h1 - center)
      w[position, 0] = 2 * (h2 - center)
  return w * locality_strength


def _convit_rel_indices(num_patches):
  """Transcription of `GPSA.get_rel_indices` (same file): `[N, N, 3] = (indx, indy, indd)`."""
  img_size = int(num_patches ** .5)
  ind = np.arange(img_size).reshape(1, -1) - np.arange(img_size).reshape(-1, 1)
  indx = np.tile(ind, (img_size, img_size))
  indy = np.repeat(np.repeat(ind, img_size, axis=0), img_size, axis=1)
  return np.stack([indx, indy, indx ** 2 + indy ** 2], -1).astype(np.float32)


@pytest.mark.parametrize("heads", [4, 9])
def test_gpsa_local_init_matches_convit(rand, heads):
  """Even k (4 heads: half-integer centres) and odd k (9 heads): the positional attention of the
  local init equals the authors' `softmax(pos_proj(rel_indices))`, and at high locality each head
  attends to its centre (a convolution)."""
  side, alpha = 4, 1.7
  q, k, v = _qkv(rand, tq=side * side, tk=side * side, h=heads, hk=heads)
  pos = ops.gpsa_local_init(heads, alpha)
  got = jax.jit(ops.gpsa_attention, static_argnames="grid")(q, k, v, pos, jnp.full((heads,), 60.0),
                                                           grid=(side, side))
  logits = np.einsum("nmr,hr->hnm", _convit_rel_indices(side * side), _convit_local_init(heads, alpha))
  want = jnp.einsum("hnm,bmhd->bnhd", jax.nn.softmax(jnp.asarray(logits), -1), v)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Non-square H: the k^2 centred heads as the authors', the rest position-agnostic (0).
  w5 = ops.gpsa_local_init(5, alpha)
  np.testing.assert_allclose(w5[:4], ops.gpsa_local_init(4, alpha))
  np.testing.assert_allclose(w5[4], 0.0)


def test_dha_groupings(rand):
  q = rand(1, B, T, 4, D)
  k4, v4 = rand(2, B, T, 4, D), rand(3, B, T, 4, DV)
  ident = jnp.arange(4)
  np.testing.assert_allclose(ops.dha_attention(q, k4, v4, ident, ident, causal=True),
                             dot_product_attention(q, k4, v4, causal=True), atol=1e-6)
  k2, v2 = k4[:, :, :2], v4[:, :, :2]
  grp = jnp.array([0, 0, 1, 1])
  np.testing.assert_allclose(ops.dha_attention(q, k2, v2, grp, grp, causal=True),
                             dot_product_attention(q, k2, v2, causal=True), atol=1e-6)   # GQA
  kernel = rand(5, 6, 4 * D)
  sel = ops.dha_fuse_heads(kernel, jax.nn.one_hot(jnp.array([2, 0]), 4), D)
  np.testing.assert_allclose(sel.reshape(6, 2, D), kernel.reshape(6, 4, D)[:, [2, 0]])
  fused = ops.dha_fuse_heads(kernel, jnp.full((1, 4), 0.25), D)
  np.testing.assert_allclose(fused, kernel.reshape(6, 4, D).mean(1), atol=1e-6)
  with pytest.raises(ValueError, match="k_assign"):
    ops.dha_attention(q, k2, v2, grp[:3], grp)


def test_relative_attention(rand):
  q, k, v = _qkv(rand, tq=5, tk=T)
  zeros_r, zeros_h = jnp.zeros((2 * T - 1, H, D)), jnp.zeros((H, D))
  relative = jax.jit(ops.relative_attention, static_argnames="causal")
  np.testing.assert_allclose(relative(q, k, v, zeros_r, zeros_h, zeros_h, causal=True),
                             jax.jit(dot_product_attention, static_argnames="causal")(
                                 q, k, v, causal=True), atol=1e-6)
  rel, u, w = rand(4, 2 * T - 1, H, D), rand(5, H, D), rand(6, H, D)

  def ref(q, k, v, rel, u, w):
    i = jnp.arange(5)[:, None] + T - 5
    j = jnp.arange(T)[None]
    r = rel[T - 1 - (i - j)]                                   # [Tq, Tk, H, D]
    s = (jnp.einsum("bqhd,bkhd->bhqk", q + u, k) + jnp.einsum("bqhd,qkhd->bhqk", q + w, r)) / math.sqrt(D)
    s = jnp.where(j <= i, s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)

  np.testing.assert_allclose(relative(q, k, v, rel, u, w, causal=True),
                             jax.jit(ref)(q, k, v, rel, u, w), atol=1e-5)
  _grads_close(lambda *a: ops.relative_attention(*a, causal=True), ref, (q, k, v, rel, u, w), rand,
               (B, 5, H, DV))


def test_hierarchical_oracles(rand):
  q, k, v = _qkv(rand)
  flat = jnp.broadcast_to(jnp.arange(T), (B, T))
  np.testing.assert_allclose(ops.hierarchical_attention(q, k, v, flat), dot_product_attention(q, k, v),
                             atol=1e-5)
  groups = jnp.array([[0, 0, 0, 1, 1, 2, 2]] * B)
  w = ops.hierarchical_attention_weights(q, k, groups)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
  w = np.asarray(w)
  # Block-constant across groups: query 0 (group 0) gives keys 3 and 4 (group 1) equal weight,
  # and queries 0, 1, 2 give group 1 the same total mass up to their own normaliser.
  np.testing.assert_allclose(w[..., 0, 3], w[..., 0, 4], rtol=1e-5)
  with pytest.raises(ValueError, match="causal pattern is undefined"):
    ops.hierarchical_attention(q, k, v, groups, causal=True)


def test_moda_oracles(rand):
  q, k, v = _qkv(rand)
  mod = jnp.array([[0, 0, 1, 1, 0, 1, 1]] * B)
  zero = jnp.zeros((2, 2))
  eye = jnp.broadcast_to(jnp.eye(D), (2, D, D))
  np.testing.assert_allclose(ops.moda_attention(q, k, v, mod, pair_bias=zero, basis=eye, causal=True),
                             dot_product_attention(q, k, v, causal=True), atol=1e-5)
  blocked = jnp.array([[0.0, -jnp.inf], [-jnp.inf, 0.0]])
  np.testing.assert_allclose(ops.moda_attention(q, k, v, mod, pair_bias=blocked),
                             dot_product_attention(q, k, v, q_segment_ids=mod, kv_segment_ids=mod),
                             atol=1e-5)
  with pytest.raises(ValueError, match="modality_ids"):
    ops.moda_attention(q, k, v, mod[:, :3], pair_bias=zero)


def test_efficient_probe_and_lama(rand):
  x = rand(1, B, 9, 8)
  qs, wv = rand(2, 4, 8), rand(3, 8, 8)
  out = ops.efficient_probe(x, qs, wv)
  perm = jax.random.permutation(jax.random.PRNGKey(0), 9)
  np.testing.assert_allclose(ops.efficient_probe(x[:, perm], qs, wv), out, atol=1e-5)
  same = jnp.broadcast_to(x[:, :1], x.shape)
  np.testing.assert_allclose(ops.efficient_probe(same, qs, wv), (x[:, 0] @ wv), atol=1e-5)
  u, vv, p = rand(4, 8, 3), rand(5, 8, 3), rand(6, 2, 3)
  pooled, a = ops.lama_pool(x, u, vv, p)
  assert pooled.shape == (B, 16)
  np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(ops.lama_pool(x[:, perm], u, vv, p)[0], pooled, atol=1e-5)
  with pytest.raises(ValueError, match="w_v"):
    ops.efficient_probe(x, qs, rand(3, 8, 6))


def test_cca_positions_and_mask():
  ring = ops.cca_ring_index(24, 24)
  assert len(np.unique(np.asarray(ring))) == 12
  pos = ops.cca_positions(4, 5, num_text=3)
  np.testing.assert_array_equal(pos[-3:], [2, 3, 4])        # rings 0..1, text continues at 2
  m = np.asarray(ops.cca_mask(4, 5, num_text=3))
  order = np.argsort(np.asarray(ops.cca_ring_index(4, 5)), kind="stable")
  mv = m[:20, :20][np.ix_(order, order)]
  rs = np.asarray(ops.cca_ring_index(4, 5))[order]
  assert np.all(mv == (rs[None, :] <= rs[:, None]))          # block lower-triangular in ring order
  assert not m[:20, 20:].any() and m[20:, :20].all() and np.all(m[20:, 20:] == np.tril(np.ones((3, 3))))


def test_gaam_oracles(rand):
  """Oracle: a transcription of the authors' forward (gioannides/Gaussian-Adaptive-Attention,
  `gaussian_adaptive_attention/gaussian_adaptive_attention.py`): torch's default, unbiased
  `x.var(dim)`, a product of G Gaussians of `(x - mean - delta_g) / sqrt(var)` normalised along T."""
  x = rand(1, B, T, 6)
  off, sc = jnp.array([0.0, 0.3]), jnp.array([2.0, 1.0])
  gaam = jax.jit(ops.gaam_weights, static_argnames="causal")
  w = gaam(x, off, sc)
  np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-5)

  def naive(x):
    n = x.shape[1]
    mean = jnp.sum(x, 1, keepdims=True) / n
    var = jnp.sum((x - mean) ** 2, 1, keepdims=True) / (n - 1) + 1e-8   # torch.var, unbiased
    mixture = 1.0
    for d, c in zip(off, sc):
      y = (x - (mean + d)) / jnp.sqrt(var)
      mixture = mixture * jnp.exp(-(y ** 2) / (2.0 * c ** 2)) / jnp.sqrt(2 * jnp.pi * c ** 2)
    return mixture / jnp.maximum(jnp.sum(mixture, 1, keepdims=True), 1e-8)

  np.testing.assert_allclose(w, jax.jit(naive)(x), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(lambda x: jnp.sum(ops.gaam_weights(x, off, sc) * x)))(x),
                             jax.jit(jax.grad(lambda x: jnp.sum(naive(x) * x)))(x), rtol=1e-3,
                             atol=1e-5)
  # Causal: position t is the authors' forward on the prefix x[:, :t + 1] (its last weight).
  wc_all = gaam(x, off, sc, causal=True)
  for t in (1, 2, 5):
    np.testing.assert_allclose(wc_all[:, t], naive(x[:, :t + 1])[:, -1], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(wc_all[:, 0], 1.0, rtol=1e-6)
  const = jnp.ones((B, T, 6))
  np.testing.assert_allclose(gaam(const, jnp.zeros(2), sc), 1.0 / T, rtol=1e-5)
  wc = gaam(x, off, sc, causal=True)
  # Causal: w_t depends only on x_{<=t}; the last position equals the non-causal weight.
  np.testing.assert_allclose(wc[:, -1], w[:, -1], rtol=1e-4)
  wc2 = gaam(x.at[:, 5].add(2.0), off, sc, causal=True)
  np.testing.assert_allclose(wc2[:, :5], wc[:, :5], rtol=1e-6)
  g = jax.jit(jax.grad(lambda x: jnp.sum(ops.gaussian_adaptive_attention(x, off, sc) ** 2)))(x)
  assert np.all(np.isfinite(g))
  # Packed segments: each segment's weights equal running it alone (causal and not).
  seg = jnp.array([[0] * 4 + [1] * (T - 4)] * B)
  for causal in (False, True):
    ws = gaam(x, off, sc, causal=causal, segment_ids=seg)
    np.testing.assert_allclose(ws[:, :4], gaam(x[:, :4], off, sc, causal=causal),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ws[:, 4:], gaam(x[:, 4:], off, sc, causal=causal),
                               rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gaam(x, off, sc, causal=True, segment_ids=jnp.zeros((B, T))),
                             wc, rtol=1e-4, atol=1e-6)   # one segment == the prefix-stats path
  with pytest.raises(ValueError, match="offsets"):
    ops.gaam_weights(x, off, sc[:1])
  with pytest.raises(ValueError, match="segment_ids"):
    ops.gaam_weights(x, off, sc, segment_ids=seg[:, :3])
