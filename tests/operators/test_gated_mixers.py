"""NiNformer and Activator token mixers against numpy transcriptions of the authors' code.

Oracles (written from the authors' PyTorch, not from `attnjax.nn.gated_mixers`):
* NiNformer, Abdullah & Aydin 2024 (arXiv 2403.02411), repo Abdullah-88/NiNformer, `ninformer.py`:
  `MixerGatingUnit.forward`: `u = proj(x)`, `v = MixerBlock(x)`, `out = u * v`; `MixerBlock`:
  `x = x + token_mix(x)` (LayerNorm, `b n d -> b d n`, FeedForward over n, back), then
  `x = x + channel_mix(x)` (LayerNorm, FeedForward over d); FeedForward = Linear, GELU, Linear.
* Activator, Abdullah & Aydin 2024 (arXiv 2405.15953), repo Abdullah-88/Activator, `activator.py`:
  `ActivatorGatingUnit.forward`: `u = norm(gelu(proj_1 x))`, `v = norm(proj_2 x)` (one shared
  LayerNorm), `out = proj_3(u * v)`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import build_mixer
from attnjax.models import ViT
from attnjax.nn import gated_mixers

_erf = np.vectorize(__import__("math").erf)


def _gelu(x):
  return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))


def _layer_norm(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def _lin(x, layer):
  return x @ np.asarray(layer.kernel[...], np.float64) + np.asarray(layer.bias[...], np.float64)


def _ln(x, norm):
  return _layer_norm(x, np.asarray(norm.scale[...], np.float64), np.asarray(norm.bias[...], np.float64),
                     norm.epsilon)


def _ff(x, mlp):
  return _lin(_gelu(_lin(x, mlp.fc1)), mlp.fc2)


def _ninformer_oracle(m, x):
  x = np.asarray(x, np.float64)
  u = _lin(x, m.proj)
  tok = _ff(_ln(x, m.token_norm).transpose(0, 2, 1), m.token_mlp).transpose(0, 2, 1)   # b d n
  v = x + tok
  v = v + _ff(_ln(v, m.channel_norm), m.channel_mlp)
  return u * v


def _activator_oracle(m, x):
  x = np.asarray(x, np.float64)
  u = _ln(_gelu(_lin(x, m.proj_1)), m.norm)
  v = _ln(_lin(x, m.proj_2), m.norm)
  return _lin(u * v, m.proj_3)


def _perturb(m, seed):
  """Non-trivial LayerNorm affines and biases (initialised to 1 / 0), so the oracle checks them."""
  leaves = nnx.state(m, nnx.Param)
  flat = jax.tree.leaves(leaves)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  new = [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(flat, keys)]
  nnx.update(m, jax.tree.unflatten(jax.tree.structure(leaves), new))


@pytest.mark.parametrize("name,oracle,opts", [
    ("ninformer", _ninformer_oracle, {"seq_len": 7, "hidden": 10}),
    ("activator", _activator_oracle, {"hidden": 10}),
])
def test_matches_the_authors_formula_with_gradients(name, oracle, opts, rand):
  m = build_mixer(name, d_model=12, num_heads=1, causal=False, rngs=nnx.Rngs(0), **opts)
  _perturb(m, 1)
  x, d = rand(2, 3, 7, 12), rand(3, 3, 7, 12)
  # One compile: the output and its derivative along d (jvp), the latter against central
  # differences of the oracle.
  y, dy = nnx.jit(lambda m, x, d: jax.jvp(lambda x: m(x), (x,), (d,)))(m, x, d)
  assert y.shape == x.shape
  np.testing.assert_allclose(y, oracle(m, x), atol=2e-4, rtol=2e-4)
  xd, dd, eps = np.asarray(x, np.float64), np.asarray(d, np.float64), 1e-5
  fd = (oracle(m, xd + eps * dd) - oracle(m, xd - eps * dd)) / (2 * eps)
  np.testing.assert_allclose(dy, fd, rtol=2e-3, atol=2e-3)


def test_ninformer_mixes_tokens_and_activator_does_not(rand):
  x = rand(4, 1, 7, 12)
  x2 = x.at[:, 5].add(rand(5, 1, 12))       # not a constant: LayerNorm would remove that
  nin = build_mixer("ninformer", d_model=12, num_heads=1, causal=False, rngs=nnx.Rngs(0), seq_len=7)
  act = build_mixer("activator", d_model=12, num_heads=1, causal=False, rngs=nnx.Rngs(0))
  both = nnx.jit(lambda a, b, x: (a(x), b(x)))
  (n1, n2), (a1, a2) = [jnp.split(y, 2) for y in both(nin, act, jnp.concatenate([x, x2]))]
  assert np.abs(np.asarray(n2 - n1))[:, :5].max() > 1e-4     # the gate reads every token
  np.testing.assert_allclose(a2[:, :5], a1[:, :5], atol=1e-6)  # per token only
  with pytest.raises(ValueError, match="seq_len=7"):
    nin(x[:, :6])
  with pytest.raises(NotImplementedError, match="segment_ids"):
    nin(x, segment_ids=jnp.zeros((1, 7), jnp.int32))
  with pytest.raises(ValueError, match="seq_len must be"):
    build_mixer("ninformer", d_model=12, num_heads=1, causal=False, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\[B, T, d_model=12\]"):
    act(x[..., :8])


def test_gate_of_one_gives_the_plain_block(monkeypatch, rand):
  """A gate identically 1 leaves NiNformer's linear projection (so the ViT block is a plain block
  with a token-wise linear mixer) and Activator's GELU MLP `W3 LN(gelu(x W1))`."""
  x = rand(5, 2, 7, 12)
  nin = build_mixer("ninformer", d_model=12, num_heads=1, causal=False, rngs=nnx.Rngs(0), seq_len=7)
  act = build_mixer("activator", d_model=12, num_heads=1, causal=False, rngs=nnx.Rngs(0), hidden=10)
  _perturb(nin, 2), _perturb(act, 3)
  monkeypatch.setattr(gated_mixers.NiNformerMixer, "gate", lambda self, x: jnp.ones_like(x))
  monkeypatch.setattr(gated_mixers.ActivatorMixer, "gate",
                      lambda self, x: jnp.ones(x.shape[:-1] + (10,)))
  y_nin, y_act = nnx.jit(lambda a, b, x: (a(x), b(x)))(nin, act, x)
  np.testing.assert_allclose(y_nin, _lin(np.asarray(x, np.float64), nin.proj), atol=1e-5)
  mlp = _lin(_ln(_gelu(_lin(np.asarray(x, np.float64), act.proj_1)), act.norm), act.proj_3)
  np.testing.assert_allclose(y_act, mlp, atol=1e-4)


def test_vit_interleaving_gated_mixers():
  """One ViT, one compile: a NiNformer layer then an Activator layer with no MLP."""
  imgs = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  vit = ViT(image_size=8, patch_size=2, num_classes=10, d_model=16, num_layers=2, num_heads=2,
            in_channels=1, mixer=["ninformer", "activator"], mixer_options=[{"seq_len": 16}, {}],
            pool="mean", rngs=nnx.Rngs(0))
  assert nnx.jit(lambda m, x: m(x))(vit, imgs).shape == (2, 10)
