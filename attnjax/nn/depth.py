"""Depth mixing: Attention Residuals (Kimi Team 2026, arXiv:2603.15031), Block AttnRes (Kimi Team 2026, arXiv:2603.15031) and Delta Attention Residuals (Luo et al. 2026, arXiv:2605.18855).

`DepthAttention` replaces the fixed residual sum by a softmax over earlier representations, with
one zero-initialised pseudo-query per sublayer. It is a piece a backbone calls between sublayers;
it does not own any sublayer (see `attnjax.models.decoder.run_blocks`). AttnRes (`delta=False`)::

    depth = DepthAttention(d_model, num_layers=L, block_size=S, rngs=rngs)
    sources = [embedding]                       # v_0
    for l, sublayer in enumerate(sublayers):    # sublayer = f_l WITHOUT its residual add
      h = depth(sources, l)                     # input of sublayer l (replaces the residual)
      sources.append(sublayer(h))               # v_{l+1} = f_l(h_l)
    h_final = depth.readout(sources)            # query L, then final norm / head

Delta AttnRes (`delta=True`) keeps the ordinary residual stream and ADDS a softmax selection of
the increments to it, as the authors' code does (wdlctc/delta-attention-residuals-code,
`delta_attn_res`): pass the cumulative states `states = [h_0]`, `x_l = depth(states, l)`,
`states.append(states[-1] + f_l(x_l))`, `h_final = depth.readout(states)` (= `states[-1]`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def _rms_normalize(x, eps=1e-6):
  xf = x.astype(jnp.float32)
  return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def group_sources(values: Sequence[jax.Array], block_size: int) -> list[jax.Array]:
  """Block AttnRes sources: `[v_0, b_1, ..., b_{n-1}, partial b_n]`.

  `values = [v_0, v_1, ..., v_m]`; `v_0` (the embedding) is its own block, then consecutive groups
  of `block_size` layer outputs are summed (the standard residual sum inside a block), and the
  unfinished last group, if any, is the partial block. `block_size = 1` returns `values` (full AttnRes).
  """
  if block_size < 1:
    raise ValueError(f"block_size must be >= 1, got {block_size}")
  values = list(values)
  out = [values[0]]
  for i in range(1, len(values), block_size):
    group = values[i:i + block_size]
    out.append(group[0] if len(group) == 1 else sum(group[1:], group[0]))
  return out


def deltas(states: Sequence[jax.Array]) -> list[jax.Array]:
  """Delta AttnRes sources from cumulative states: `[h_0, h_1 - h_0, ..., h_m - h_{m-1}]`."""
  states = list(states)
  return [states[0]] + [b - a for a, b in zip(states[:-1], states[1:])]


class DepthAttention(nnx.Module):
  """Softmax attention over depth with one pseudo-query per sublayer.

  AttnRes (Kimi Team 2026, arXiv:2603.15031): `h_l = sum_i alpha_{i->l} v_i`, `alpha_{.->l} = softmax_i(w_l . RMSNorm(v_i))` over
  `v_0` = embedding and `v_i` = output of sublayer i-1; `num_layers` sublayers get `w_0 .. w_{L-1}`
  and the readout before the final norm gets `w_L`. Block AttnRes: `block_size > 1` sums each run of
  `block_size` outputs (`group_sources`); `block_size = 1` is full AttnRes.
  Delta AttnRes (Luo et al. 2026, arXiv:2605.18855) (`delta=True`): the caller passes cumulative states `h_0 .. h_l` of the
  ordinary residual stream; sources are the deltas `v_0 = h_0`, `v_i = h_i - h_{i-1}` (grouped by
  `block_size` too) and the input of sublayer l is `h_l + sum_i alpha_{i->l} v_i` (sublayer 0,
  with no increment yet, gets `h_0`); the readout is `h_L`, so `w_L` is not created.
  Sources are `[B, T, d_model]` each (any leading shape); weights are per token, so decoding
  needs no cache. Pseudo-queries `[L + 1, d_model]` (`[L, d_model]` for delta) are zero-init, so a
  fresh model averages its sources. Keys are RMSNorm of the sources without a learned scale, so
  alpha is invariant to `v_i -> c v_i` (c > 0).
  Readings: [2] was read from memory and the official blog pseudocode. For (Luo et al. 2026, arXiv:2605.18855) the spec's
  reading ("from abstract": a replacement `h_l = sum alpha v` over deltas, whose all-ones limit
  telescopes to the residual) differs from the authors' code, which adds the selection to the
  residual stream; we follow the code (its default "bias" gate, no null source).
  """

  def __init__(self, d_model: int, num_layers: int, *, block_size: int = 1, delta: bool = False,
               rngs: nnx.Rngs | None = None):
    del rngs
    if num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if block_size < 1:
      raise ValueError(f"block_size must be >= 1, got {block_size}")
    self.num_layers, self.block_size, self.delta = num_layers, block_size, delta
    n_queries = num_layers if delta else num_layers + 1
    self.queries = nnx.Param(jnp.zeros((n_queries, d_model)), logical_axes=(None, "embed"))

  def sources(self, values: Sequence[jax.Array]) -> list[jax.Array]:
    """What the queries attend over, given the caller's list (outputs, or states when `delta`)."""
    if not values:
      raise ValueError("DepthAttention: needs at least one source (the embedding)")
    values = deltas(values) if self.delta else list(values)
    return group_sources(values, self.block_size)

  def _check_layer(self, layer: int) -> None:
    hi = self.queries.shape[0] - 1
    if not 0 <= layer <= hi:
      raise ValueError(f"layer must be in [0, {hi}], got {layer}")

  def weights(self, values: Sequence[jax.Array], layer: int) -> jax.Array:
    """`alpha [S, ...]` float32 over the S sources (sums to 1 over axis 0), for query `layer`."""
    self._check_layer(layer)
    src = self.sources(values)
    w = self.queries[...][layer].astype(jnp.float32)
    logits = jnp.stack([jnp.einsum("...d,d->...", _rms_normalize(v), w) for v in src])
    return jax.nn.softmax(logits, axis=0)

  def select(self, values: Sequence[jax.Array], layer: int) -> jax.Array:
    """`sum_i alpha_{i->layer} v_i` in float32 (no residual term)."""
    src = self.sources(values)
    alpha = self.weights(values, layer)
    return sum(a[..., None] * v.astype(jnp.float32) for a, v in zip(alpha, src))

  def __call__(self, values: Sequence[jax.Array], layer: int) -> jax.Array:
    """The input of sublayer `layer` (AttnRes: the selection; delta: last state + selection)."""
    if self.delta:
      self._check_layer(layer)
      if len(values) == 1:
        return values[0]
      return (values[-1].astype(jnp.float32) + self.select(values, layer)).astype(values[-1].dtype)
    return self.select(values, layer).astype(values[0].dtype)

  def readout(self, values: Sequence[jax.Array]) -> jax.Array:
    """The stream's final representation (before the final norm)."""
    if self.delta:
      return values[-1]
    return self(values, self.num_layers)
