"""Mixture-of-Transformers (Liang et al., 2024, arXiv 2411.04996) against independent oracles.

Oracle: a float64 NumPy transcription of the authors' reference code
(facebookresearch/Mixture-of-Transformers, `src/simple_ModalityUntiedAttention.py` and
`src/simple_ModalityUntiedFeedForward.py`), written token by token: token t's q/k/v, output
projection, FFN and norms come from the weights of `modality[t]` (`x[modality_masks[i]]` in that
code), the softmax attention runs over all tokens of the row. The norm placement is the code's
(`norm_m` on each sublayer output) or the Llama pre-norm, as the model's `norm_position`. RoPE is
rotate-half, written out here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.models import DecoderLM
from attnjax.models.mot import MixtureOfTransformers, load_decoder_into_modality

V, D, H, L = 29, 16, 2, 2


def _np(p):
  return np.asarray(p[...], np.float64)


def _rms(x, s, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * s


def _rope(x, t):  # x [H, d] at position t, rotate-half
  d = x.shape[-1]
  ang = t * 10000.0 ** (-np.arange(0, d, 2) / d)
  a, b = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)], -1)


def _silu(z):
  return z / (1 + np.exp(-z))


def oracle(model, tokens, modality, patches=None, *, pre=True, causal=True):
  """Logits [B, T, V], one token at a time."""
  emb = _np(model.embed.embedding)
  out = []
  for b in range(tokens.shape[0]):
    T = tokens.shape[1]
    mods = [int(m) for m in modality[b]]
    x = np.stack([emb[tokens[b, t]] for t in range(T)])
    if patches is not None:
      w, bias = _np(model.patch_in.kernel), _np(model.patch_in.bias)
      x = np.stack([patches[b, t] @ w + bias if mods[t] == model.image_modality else x[t]
                    for t in range(T)])
    for blk in model.blocks:
      tw = [blk.towers[m] for m in mods]
      hd = D // H
      q, k, v = [], [], []
      for t in range(T):
        h = _rms(x[t], _np(tw[t].norm1.scale)) if pre else x[t]
        qt = (h @ _np(tw[t].q_proj.kernel)).reshape(H, hd)
        kt = (h @ _np(tw[t].k_proj.kernel)).reshape(-1, hd)
        vt = (h @ _np(tw[t].v_proj.kernel)).reshape(-1, hd)
        if tw[t].q_norm is not None:
          qt, kt = _rms(qt, _np(tw[t].q_norm.scale)), _rms(kt, _np(tw[t].k_norm.scale))
        q.append(_rope(qt, t)), k.append(_rope(kt, t)), v.append(vt)
      hk = k[0].shape[0]
      new = []
      for t in range(T):
        heads = []
        for hh in range(H):
          g = hh // (H // hk)
          keys = range(t + 1) if causal else range(T)
          s = np.array([q[t][hh] @ k[j][g] for j in keys]) / np.sqrt(hd)
          p = np.exp(s - s.max())
          p /= p.sum()
          heads.append(sum(pj * v[j][g] for pj, j in zip(p, keys)))
        a = np.concatenate(heads) @ _np(tw[t].o_proj.kernel)
        new.append(x[t] + (a if pre else _rms(a, _np(tw[t].norm1.scale))))
      x = np.stack(new)
      new = []
      for t in range(T):
        mlp = tw[t].mlp
        h = _rms(x[t], _np(tw[t].norm2.scale)) if pre else x[t]
        f = (_silu(h @ _np(mlp.gate.kernel)) * (h @ _np(mlp.up.kernel))) @ _np(mlp.down.kernel)
        new.append(x[t] + (f if pre else _rms(f, _np(tw[t].norm2.scale))))
      x = np.stack(new)
    x = np.stack([_rms(x[t], _np(model.final_norms[mods[t]].scale)) for t in range(T)])
    out.append(x @ emb.T)
  return np.stack(out)


def _perturb(model, seed):
  """Random norm scales (they start at 1, which would hide a norm taken from the wrong tower)."""
  key = jax.random.key(seed)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and path[-1] == "scale":
      key, sub = jax.random.split(key)
      var[...] = 1.0 + 0.5 * jax.random.normal(sub, var.shape)


@pytest.mark.parametrize("norm_position,qk_norm,kv_heads", [("pre", True, 1), ("output", False, 2)])
def test_mixed_batch_routes_each_token_to_its_modality(norm_position, qk_norm, kv_heads):
  model = MixtureOfTransformers(vocab_size=V, d_model=D, num_layers=L, num_heads=H,
                                num_kv_heads=kv_heads, mlp_ratio=1.5, qk_norm=qk_norm,
                                norm_position=norm_position, patch_dim=3, rngs=nnx.Rngs(0))
  _perturb(model, 1)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, V, (2, 7)).astype(np.int32)
  modality = rng.integers(0, 2, (2, 7)).astype(np.int32)
  modality[0, :2] = [0, 1]
  patches = rng.normal(size=(2, 7, 3)).astype(np.float32)
  got = jax.jit(lambda m, *a: m(a[0], a[1], patches=a[2]))(model, tokens, modality, patches)
  want = oracle(model, tokens, modality, patches, pre=norm_position == "pre")
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=2e-4)


def test_single_modality_batch_equals_the_dense_decoder_with_that_modalitys_weights():
  dense = DecoderLM(vocab_size=V, d_model=D, num_layers=L, num_heads=H, mlp_ratio=1.5,
                    mixer_options={"qk_norm": True}, rngs=nnx.Rngs(3))
  _perturb(dense, 4)
  model = MixtureOfTransformers(vocab_size=V, d_model=D, num_layers=L, num_heads=H, mlp_ratio=1.5,
                                qk_norm=True, rngs=nnx.Rngs(5))
  load_decoder_into_modality(model, dense, 1)
  tokens = np.random.default_rng(1).integers(0, V, (2, 9)).astype(np.int32)
  ones = np.ones_like(tokens)
  f = jax.jit(lambda m, t, mod: m(t, mod))
  np.testing.assert_allclose(np.asarray(f(model, tokens, ones)), np.asarray(jax.jit(lambda m, t: m(t))(dense, tokens)),
                             atol=1e-5, rtol=1e-5)
  # The other modality's tower is a different model.
  assert np.abs(np.asarray(f(model, tokens, 0 * ones)) - np.asarray(f(model, tokens, ones))).max() > 1e-2


def test_other_modalitys_parameters_get_exactly_zero_gradient():
  model = MixtureOfTransformers(vocab_size=V, d_model=D, num_layers=1, num_heads=H, mlp_ratio=1.5,
                                qk_norm=True, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(2).integers(0, V, (2, 6)).astype(np.int32)
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def grads(params, modality):
    def loss(p):
      return jnp.sum(jnp.sin(nnx.merge(graphdef, p)(tokens, modality)))
    return jax.grad(loss)(params)

  for m in (0, 1):
    g = nnx.to_flat_state(grads(params, np.full(tokens.shape, m, np.int32)))
    other = {p: v for p, v in g if (("towers" in p and p[p.index("towers") + 1] != m) or
                                    ("final_norms" in p and p[p.index("final_norms") + 1] != m))}
    mine = {p: v for p, v in g if (("towers" in p and p[p.index("towers") + 1] == m) or
                                   ("final_norms" in p and p[p.index("final_norms") + 1] == m))}
    assert other and mine
    for p, v in other.items():
      assert not np.any(np.asarray(v[...])), p
    for p, v in mine.items():
      assert np.any(np.asarray(v[...])), p


def test_bad_modality_shape_is_named():
  model = MixtureOfTransformers(vocab_size=V, d_model=D, num_layers=1, num_heads=H, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"modality must be an int array of shape \[B, T\]=\(1, 4\)"):
    model(jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 3), jnp.int32))
