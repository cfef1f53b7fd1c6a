"""Attention-free token mixers built from gating units, for the ViT: NiNformer and Activator.

Both are the mixer sublayer of a pre-norm block (`x + mixer(norm(x))`, then the block's MLP), so
`ViT(mixer="ninformer", ...)` is the authors' block up to the backbone's own norm and MLP choice
(RMSNorm and SwiGLU here, LayerNorm and a GELU MLP in the authors' code).

* `NiNformerMixer` (Abdullah & Aydin 2024, arXiv 2403.02411; authors' code
  Abdullah-88/NiNformer `ninformer.py`, `MixerGatingUnit`): `y = (x W_p + b_p) * M(x)`, where the
  gate `M` is a whole MLP-Mixer block (Tolstikhin et al. 2021): `u = x + TokenMLP(LN(x))` (an MLP
  over the *token* axis, `seq_len -> hidden -> seq_len`), `M(x) = u + ChannelMLP(LN(u))`. The gate
  is generated from the input (dynamic), the token mixing lives in the gate only.
* `ActivatorMixer` (Abdullah & Aydin 2024, arXiv 2405.15953; authors' code Abdullah-88/Activator
  `activator.py`, `ActivatorGatingUnit`): `y = W_3 (LN(gelu(x W_1 + b_1)) * LN(x W_2 + b_2)) + b_3`,
  one LayerNorm (over the hidden width) shared by both branches, applied per token: the authors'
  Activator mixes no tokens at all (the open question "which axis": the channel axis), so a
  classifier must pool over tokens (`pool="mean"`, the authors' global average pooling). Their
  "Activator only GEGLU" model drops the block's second MLP: `mlp_ratio=0`.

Both define only the non-causal self pattern: NiNformer's token MLP is a dense map over a fixed
number of positions (`seq_len`, no causal order, no context); Activator is declared the same way
because it is a ViT replacement for attention (its per-token map reads no other token, so any
causal form would be the same function).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.layers import dense
from attnjax.registry import register_mixer_class


def _check_x(name: str, x, d_model: int):
  if x.ndim != 3 or x.shape[-1] != d_model:
    raise ValueError(f"{name}: x must be [B, T, d_model={d_model}], got shape {x.shape}")


def _no_decode(name: str, decode: bool):
  if decode:
    raise NotImplementedError(f"{name} is a non-causal vision mixer and cannot decode")


class _MLP(nnx.Module):
  """`Linear(n -> hidden), GELU, Linear(hidden -> n)` (biases, as torch's `nn.Linear`)."""

  def __init__(self, n: int, hidden: int, *, axes: tuple, rngs: nnx.Rngs):
    self.fc1 = dense(n, hidden, axes=(axes[0], "mlp"), rngs=rngs, use_bias=True)
    self.fc2 = dense(hidden, n, axes=("mlp", axes[0]), rngs=rngs, use_bias=True)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class NiNformerMixer(nnx.Module):
  """NiNformer's Mixer Gating Unit on `x [B, seq_len, d_model]` (see the module docstring).

  `seq_len`: the number of tokens (fixed: the token MLP's weights are `[seq_len, hidden]`; a ViT
  with `pool="mean"` has `(image_size / patch_size)^2` tokens, one more with `pool="cls"`).
  `hidden`: the token and channel MLPs' width (the authors use one `d_ffn` for both; default
  `2 * d_model`). `num_heads` is unused (no heads). Packed sequences (`segment_ids`) are refused:
  the token MLP mixes all `seq_len` positions.
  """

  def __init__(self, d_model: int, num_heads: int, *, causal: bool, rngs: nnx.Rngs,
               seq_len: int | None = None, hidden: int | None = None):
    del num_heads, causal           # the registry refuses causal=True (declared "self" only)
    if seq_len is None or int(seq_len) < 1:
      raise ValueError(f"ninformer: seq_len must be the number of tokens (an int >= 1), got {seq_len!r}; "
                       "set mixer_options.seq_len")
    self.d_model, self.seq_len = d_model, int(seq_len)
    hidden = int(hidden or 2 * d_model)
    self.proj = dense(d_model, d_model, axes=("embed", "embed"), rngs=rngs, use_bias=True)
    self.token_norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.token_mlp = _MLP(self.seq_len, hidden, axes=(None,), rngs=rngs)
    self.channel_norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.channel_mlp = _MLP(d_model, hidden, axes=("embed",), rngs=rngs)

  def gate(self, x):
    """The generated gate `M(x) [B, T, d_model]`: one MLP-Mixer block (token then channel MLP)."""
    t = self.token_mlp(jnp.swapaxes(self.token_norm(x), 1, 2))        # [B, d, T]: mix over tokens
    u = x + jnp.swapaxes(t, 1, 2)
    return u + self.channel_mlp(self.channel_norm(u))

  def __call__(self, x, *, segment_ids=None, decode=False):
    _check_x("ninformer", x, self.d_model)
    _no_decode("ninformer", decode)
    if segment_ids is not None:
      raise NotImplementedError("ninformer: the token MLP mixes all seq_len positions; packed "
                                "sequences (segment_ids) are not supported")
    if x.shape[1] != self.seq_len:
      raise ValueError(f"ninformer: x has {x.shape[1]} tokens but mixer_options.seq_len={self.seq_len}")
    return self.proj(x) * self.gate(x)


class ActivatorMixer(nnx.Module):
  """Activator's GLU gating unit on `x [B, T, d_model]`, per token (see the module docstring).

  `hidden`: the GLU width (the authors' `d_ffn`; default `2 * d_model`). `num_heads` is unused.
  """

  def __init__(self, d_model: int, num_heads: int, *, causal: bool, rngs: nnx.Rngs,
               hidden: int | None = None):
    del num_heads, causal
    self.d_model = d_model
    hidden = int(hidden or 2 * d_model)
    self.proj_1 = dense(d_model, hidden, axes=("embed", "mlp"), rngs=rngs, use_bias=True)
    self.proj_2 = dense(d_model, hidden, axes=("embed", "mlp"), rngs=rngs, use_bias=True)
    self.proj_3 = dense(hidden, d_model, axes=("mlp", "embed"), rngs=rngs, use_bias=True)
    self.norm = nnx.LayerNorm(hidden, rngs=rngs)     # one LayerNorm, shared by both branches

  def value(self, x):
    """The GELU branch `LN(gelu(x W_1 + b_1)) [B, T, hidden]`."""
    return self.norm(jax.nn.gelu(self.proj_1(x), approximate=False))

  def gate(self, x):
    """The linear (gate) branch `LN(x W_2 + b_2) [B, T, hidden]`."""
    return self.norm(self.proj_2(x))

  def __call__(self, x, *, segment_ids=None, decode=False):
    del segment_ids                  # per token: packed sequences cannot interact
    _check_x("activator", x, self.d_model)
    _no_decode("activator", decode)
    return self.proj_3(self.value(x) * self.gate(x))


register_mixer_class("ninformer", "NiNformer (arXiv 2403.02411): linear projection gated by an "
                     "MLP-Mixer block (token-mixing gate; needs mixer_options.seq_len).", NiNformerMixer)
register_mixer_class("activator", "Activator (arXiv 2405.15953): per-token GLU unit "
                     "W3(LN(gelu(xW1)) * LN(xW2)) replacing attention.", ActivatorMixer)
