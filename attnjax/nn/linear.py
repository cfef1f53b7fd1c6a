"""NNX layers of the linear / recurrent family and their registry entries.

Every layer maps `x [B, T, d_model] -> [B, T, d_model]`, accepts `segment_ids [B, T]` (packed
sequences; the recurrent state resets at each segment change) and decodes with a constant-size
state cache (`init_cache`, then `decode=True` calls: a prefill of any length followed by
one-token steps equals the full causal forward). Registered mixers:

`linear` (feature-map option), `based`, `hedgehog`, `gla`, `retnet`, `lightning`, `deltanet`,
`gated_deltanet`, `mala`, `transnormer` (NormAttention) and `transnormer_diag` (DiagAttention);
`lightnet`, `slab`, `flowformer` (causal or not), `inline`, `linfusion`, `rala`, `lina`
(non-causal only: building them with causal=True raises NotImplementedError); the hybrids
`lolcats_window` (LoLCATs window + linear, shared normaliser), `nats` (NAtS-L routing) and `skip`
(LayerBoost's removed attention); `hybrid_layer_pattern` / `layerboost_pattern` give per-layer
mixer lists for `DecoderLM`. `PRepBN` is SLAB's progressive re-parameterised BatchNorm.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.cab import PatternUndefinedError
from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.layers import RMSNorm, ShortConv, dense
from attnjax.ops import masks as masks_lib
from attnjax.ops.operators._common import PatternUndefinedError
from attnjax.ops.linear import feature_maps as fm
from attnjax.ops.linear.delta import delta_rule, delta_rule_step
from attnjax.ops.linear.engine import init_state, linear_attention, linear_attention_step
from attnjax.ops.linear.hybrid import (chunk_prefix_mean, nats_attention, nats_decode,
                                       nats_init_cache, seqboat_attention, seqboat_decode,
                                       seqboat_init_cache, still_attention, still_decode,
                                       still_init_cache, still_saliency, still_select,
                                       straight_through, window_linear_attention,
                                       window_linear_init_cache, window_linear_step)
from attnjax.ops.rope import apply_rope
from attnjax.ops.linear.mechanisms import (flow_attention, flow_init_state, flow_step, inline_attention,
                                           lightnet_attention, lina_attention, linfusion_attention,
                                           mala_attention, mala_step, rala_attention, sla_attention,
                                           sla_step)
from attnjax.ops.softmax import alibi_slopes, dot_product_attention
from attnjax.registry import register_mixer, register_mixer_class

FEATURE_MAPS = ("identity", "elu", "relu", "silu", "taylor", "performer", "hedgehog")
DECAYS = ("none", "retnet", "lightning", "gla")
GATES = (None, "swish", "sigmoid")


def retnet_log_decay(num_heads: int) -> jax.Array:
  """RetNet's fixed per-head decay `gamma_h = 1 - 2^(-5 - h)`, as log gates `[H]`."""
  return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(num_heads, dtype=jnp.float32))))


def lightning_log_decay(num_heads: int, layer_index: int = 0, num_layers: int = 1) -> jax.Array:
  """TransNormerLLM / Lightning (Qin et al. 2023, arXiv:2307.14995) per-head decay as log gates `[H]`: `log lambda_h = -s_h (1 -
  l / (L - 1) + 1e-5)`, `s_h` the ALiBi slopes, `l = layer_index` (0-based), `L = num_layers`
  (OpenNLPLab/lightning-attention `examples/module/tnl_attn.py`; `lightning_attn/utils` builds the
  slopes exactly as ALiBi's `alibi_slopes`, and the kernel decays by `exp(-s)` per step). The
  first layer decays fastest; the last keeps almost everything (`s_h 1e-5`). `num_layers=1` (a
  lone layer) reads as the first layer."""
  if num_layers < 1 or not 0 <= layer_index < num_layers:
    raise ValueError(f"lightning: need 0 <= layer_index < num_layers, got layer_index={layer_index}, "
                     f"num_layers={num_layers}")
  depth = layer_index / (num_layers - 1) if num_layers > 1 else 0.0
  slopes = alibi_slopes(num_heads)
  return -slopes * (1.0 - depth + 1e-5)


def _no_cross(layer, context) -> None:
  """The linear-family layers read and write one state built from the sequence's own tokens (and
  the hybrids route those tokens): cross attention (`context=`) is not a pattern they define."""
  if context is not None:
    raise PatternUndefinedError(f"{type(layer).__name__}: cross attention (context=) is undefined "
                                "for this mixer (its state / routing is built from the query "
                                "sequence itself)")


class _StateCache:
  """Mixin: one `nnx.Cache` holding the recurrent state pytree."""

  def _cache_get(self, name: str):
    cache = getattr(self, name, None)
    if cache is None:
      raise ValueError(f"{type(self).__name__}: call init_cache(batch_size, max_len) before decode=True")
    return cache.get_value()


class LinearMixer(nnx.Module, _StateCache):
  """Multi-head linear attention `o_t = phi(q_t) S_t` (decayed, optionally normalised) with the
  projections, feature map, gates, output norm and output gate around `linear_attention`.

  Shapes: `x [B, T, d_model]`; per head `q, k: [B, T, H, dk]` (dk = key_dim / H, before the
  feature map), `v: [B, T, H, dv]` (dv = d_model / H). Options:
  `feature_map` in FEATURE_MAPS (hedgehog: learned `[H, dk, dk]` map, identity-initialised;
  performer: `num_features` fixed FAVOR+ features, default 2 dk); `normalize` (divide by
  `phi(q) . z`); `decay` in DECAYS (`retnet`/`lightning` fixed per head, `gla` data-dependent per
  key dim: `logsigmoid(x W1 W2 + b) / 16` with a rank-16 `W1 W2`); `output_norm` (per-head RMSNorm
  of `o`), `output_gate` (`swish`/`sigmoid` of `x W_r`, elementwise on `o`); `window > 0` adds a
  sliding-window softmax branch (its own projections, RoPE) whose output is summed (Based);
  `distill=True` sows Hedgehog's softmax-mimicry loss on this layer's q, k as "aux_loss" (times
  `distill_weight`). The engine's `chunk_size` / `form` / `implementation` are exposed (None: the
  engine's table for the backend, the Pallas kernel on a CUDA GPU).
  """

  def __init__(self, d_model: int, num_heads: int, *, causal: bool = True, feature_map: str = "elu",
               key_dim: int | None = None, normalize: bool = True, decay: str = "none",
               output_norm: bool = False, output_gate: str | None = None, window: int = 0,
               num_features: int | None = None, distill: bool = False, distill_weight: float = 1.0,
               layer_index: int = 0, num_layers: int = 1, gate_low_rank: int = 16,
               gate_normalizer: float = 16.0, chunk_size: int | None = None, form: str | None = None,
               implementation: str | None = None, rngs: nnx.Rngs):
    if feature_map not in FEATURE_MAPS:
      raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    if decay not in DECAYS:
      raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if output_gate not in GATES:
      raise ValueError(f"output_gate must be one of {GATES}, got {output_gate!r}")
    key_dim = d_model if key_dim is None else key_dim
    if key_dim % num_heads or d_model % num_heads:
      raise ValueError(f"key_dim={key_dim} and d_model={d_model} must be divisible by num_heads={num_heads}")
    if decay != "none" and not causal:
      raise PatternUndefinedError(f"decay={decay!r} needs causal=True (a bidirectional state has no decay)")
    self.h, self.dk, self.dv = num_heads, key_dim // num_heads, d_model // num_heads
    self.causal, self.feature_map, self.normalize, self.decay = causal, feature_map, normalize, decay
    self.chunk_size, self.form, self.implementation = chunk_size, form, implementation
    self.distill, self.distill_weight = distill, distill_weight
    self.gate_normalizer = gate_normalizer
    self.q_proj = dense(d_model, key_dim, axes=("embed", "heads"), rngs=rngs)
    self.k_proj = dense(d_model, key_dim, axes=("embed", "heads"), rngs=rngs)
    self.v_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.o_proj = dense(d_model, d_model, axes=("heads", "embed"), rngs=rngs)
    self.hh_weight = self.hh_bias = self.projection = nnx.data(None)
    if feature_map == "hedgehog":
      eye = jnp.broadcast_to(jnp.eye(self.dk), (num_heads, self.dk, self.dk))
      self.hh_weight = nnx.Param(eye, logical_axes=(None, "head_dim", None))
      self.hh_bias = nnx.Param(jnp.zeros((num_heads, self.dk)), logical_axes=(None, None))
    if feature_map == "performer":
      m = num_features or 2 * self.dk
      # Fixed random features (not trained), as in Performer; kept as a non-Param variable.
      self.projection = nnx.Variable(fm.orthogonal_projection(rngs.params(), num_heads, self.dk, m))
    self.fixed_log_decay = nnx.data(None)
    if decay == "retnet":
      self.fixed_log_decay = nnx.Variable(retnet_log_decay(num_heads))
    elif decay == "lightning":
      self.fixed_log_decay = nnx.Variable(lightning_log_decay(num_heads, layer_index, num_layers))
    self.gate_down = self.gate_up = nnx.data(None)
    if decay == "gla":
      self.gate_down = dense(d_model, gate_low_rank, axes=("embed", None), rngs=rngs)
      self.gate_up = dense(gate_low_rank, key_dim, axes=(None, "heads"), rngs=rngs, use_bias=True)
    self.out_norm = RMSNorm(self.dv, axis_name="head_dim") if output_norm else None
    self.output_gate = output_gate
    self.gate_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs) if output_gate else None
    self.window_attn = nnx.data(None)
    if window:
      if not causal:
        raise ValueError("window branch (Based) is defined for causal=True only")
      self.window_attn = MultiHeadAttention(d_model, num_heads, causal=True, window=window, rngs=rngs)
    self.state = nnx.data(None)

  @property
  def feature_dim(self) -> int:
    return {"taylor": 1 + self.dk + self.dk ** 2, "hedgehog": 2 * self.dk,
            "performer": self.projection.shape[-1] if self.projection is not None else 0
            }.get(self.feature_map, self.dk)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> None:
    if not self.causal:
      raise NotImplementedError(f"{type(self).__name__}: decoding needs causal=True")
    self.state = nnx.Cache(init_state(batch_size, self.h, self.feature_dim, self.dv,
                                      normalize=self.normalize))
    if self.window_attn is not None:
      self.window_attn.init_cache(batch_size, max_len, dtype)

  def phi(self, x: jax.Array, *, is_query: bool) -> jax.Array:
    name = self.feature_map
    if name == "identity":
      return x
    if name == "elu":
      return fm.elu_plus_one(x)
    if name == "relu":
      return fm.relu(x)
    if name == "silu":
      return jax.nn.silu(x)
    if name == "taylor":
      return fm.taylor(x)
    if name == "performer":
      return fm.performer_features(x, self.projection[...], is_query=is_query)
    return fm.hedgehog(x, self.hh_weight[...], self.hh_bias[...])

  def _log_decay(self, x):
    if self.fixed_log_decay is not None:
      return self.fixed_log_decay[...]
    if self.gate_down is not None:
      logits = self.gate_up(self.gate_down(x)).astype(jnp.float32)
      b, t, _ = x.shape
      return (jax.nn.log_sigmoid(logits) / self.gate_normalizer).reshape(b, t, self.h, self.dk)
    return None

  def _mix(self, q, k, v, log_decay, segment_ids, decode):
    kw = dict(normalize=self.normalize, implementation=self.implementation)
    if not decode:
      o, _ = linear_attention(q, k, v, log_decay=log_decay, causal=self.causal, segment_ids=segment_ids,
                              form=self.form, chunk_size=self.chunk_size, **kw)
      return o
    state = self._cache_get("state")
    if q.shape[1] == 1:
      ld = log_decay if log_decay is None or log_decay.ndim == 1 else log_decay[:, 0]
      o, state = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state, log_decay_t=ld,
                                       normalize=self.normalize)
      o = o[:, None]
    else:
      o, state = linear_attention(q, k, v, log_decay=log_decay, initial_state=state,
                                  output_final_state=True, form=self.form,
                                  chunk_size=self.chunk_size, **kw)
    self.state.set_value(state)
    return o

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               decode: bool = False, context: jax.Array | None = None,
               context_segment_ids: jax.Array | None = None) -> jax.Array:
    _no_cross(self, context)
    if x.ndim != 3:
      raise ValueError(f"x must be [B, T, d_model], got shape {x.shape}")
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.h, self.dk)
    k = self.k_proj(x).reshape(b, t, self.h, self.dk)
    v = self.v_proj(x).reshape(b, t, self.h, self.dv)
    pq, pk = self.phi(q, is_query=True), self.phi(k, is_query=False)
    if self.distill and not decode:
      loss = fm.hedgehog_distillation_loss(q, k, pq, pk, causal=self.causal, segment_ids=segment_ids)
      self.sow(nnx.Intermediate, "aux_loss", self.distill_weight * loss)
    o = self._mix(pq, pk, v, self._log_decay(x), segment_ids, decode)
    if self.out_norm is not None:
      o = self.out_norm(o)
    o = o.reshape(b, t, self.h * self.dv)
    if self.gate_proj is not None:
      g = self.gate_proj(x)
      o = o * (jax.nn.silu(g) if self.output_gate == "swish" else jax.nn.sigmoid(g))
    y = self.o_proj(o)
    if self.window_attn is not None:
      y = y + self.window_attn(x, segment_ids=segment_ids, decode=decode)
    return y


class DeltaNetMixer(nnx.Module, _StateCache):
  """DeltaNet / Gated DeltaNet (Wang et al. 2025, arXiv:2507.06457) layer around `delta_rule`.

  `q, k = l2norm(silu(x W))` per head, `v = silu(x W_v)`, `beta = sigmoid(x W_b)` `[B, T, H]`;
  gated: `log alpha = -exp(A_log) softplus(x W_a + dt_bias)` (Mamba-2 style, as fla's Gated
  DeltaNet); output per-head RMSNorm, then a swish gate `silu(x W_g)` (Gated DeltaNet) or none
  (DeltaNet), then `W_o`. `x [B, T, d_model] -> [B, T, d_model]`, head dim `d_model / H`.
  """

  def __init__(self, d_model: int, num_heads: int, *, causal: bool = True, gated: bool = True,
               chunk_size: int = 64, form: str | None = None, implementation: str | None = None,
               rngs: nnx.Rngs):
    if not causal:
      raise PatternUndefinedError("deltanet / gated_deltanet are causal recurrences (causal=True only)")
    self.h, self.d = num_heads, d_model // num_heads
    self.gated, self.chunk_size, self.form = gated, chunk_size, form
    self.implementation = implementation
    self.q_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.k_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.v_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.b_proj = dense(d_model, num_heads, axes=("embed", None), rngs=rngs)
    self.o_proj = dense(d_model, d_model, axes=("heads", "embed"), rngs=rngs)
    self.norm = RMSNorm(self.d, axis_name="head_dim")
    if gated:
      self.a_proj = dense(d_model, num_heads, axes=("embed", None), rngs=rngs)
      # A in [1, 16] and dt in [1e-3, 1e-1] at init (Mamba-2's ranges).
      k1, k2 = jax.random.split(rngs.params())
      self.a_log = nnx.Param(jnp.log(jax.random.uniform(k1, (num_heads,), minval=1.0, maxval=16.0)),
                             logical_axes=(None,))
      dt = jnp.exp(jax.random.uniform(k2, (num_heads,), minval=jnp.log(1e-3), maxval=jnp.log(1e-1)))
      self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)), logical_axes=(None,))
      self.g_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    else:
      self.a_proj = self.a_log = self.dt_bias = self.g_proj = None
    self.state = nnx.data(None)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> None:
    self.state = nnx.Cache(jnp.zeros((batch_size, self.h, self.d, self.d), jnp.float32))

  def __call__(self, x, *, segment_ids=None, decode=False, context=None, context_segment_ids=None):
    _no_cross(self, context)
    b, t, _ = x.shape
    heads = lambda y: y.reshape(b, t, self.h, self.d)
    l2 = lambda y: y * jax.lax.rsqrt(jnp.sum(y * y, axis=-1, keepdims=True) + 1e-6)
    q = l2(heads(jax.nn.silu(self.q_proj(x))))
    k = l2(heads(jax.nn.silu(self.k_proj(x))))
    v = heads(jax.nn.silu(self.v_proj(x)))
    beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
    ld = None
    if self.gated:
      ld = -jnp.exp(self.a_log[...]) * jax.nn.softplus(self.a_proj(x).astype(jnp.float32) + self.dt_bias[...])
    if decode:
      s = self._cache_get("state")
      if t == 1:
        o, s = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], s,
                               log_decay_t=None if ld is None else ld[:, 0])
        o = o[:, None]
      else:
        o, s = delta_rule(q, k, v, beta, log_decay=ld, initial_state=s, output_final_state=True,
                          form=self.form, chunk_size=self.chunk_size,
                          implementation=self.implementation)
      self.state.set_value(s)
    else:
      o, _ = delta_rule(q, k, v, beta, log_decay=ld, segment_ids=segment_ids, form=self.form,
                        chunk_size=self.chunk_size, implementation=self.implementation)
    o = self.norm(o).reshape(b, t, self.h * self.d)
    if self.g_proj is not None:
      o = o * jax.nn.silu(self.g_proj(x))
    return self.o_proj(o)


class MALAMixer(nnx.Module, _StateCache):
  """MALA (Fan et al. 2025, arXiv:2507.00698) layer: `phi = elu + 1` on `x W_q`, `x W_k`; `mala_attention`; `W_o`.

  Non-causal (vision) or causal with prefix means (see `mala_attention`). The paper's RoPE on
  phi(q), phi(k), LePE depth-wise conv and output gate are vision-block extras not included.
  """

  def __init__(self, d_model: int, num_heads: int, *, causal: bool = True, chunk_size: int = 64,
               form: str | None = None, rngs: nnx.Rngs):
    self.h, self.d, self.causal = num_heads, d_model // num_heads, causal
    self.chunk_size, self.form = chunk_size, form
    self.q_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.k_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.v_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.o_proj = dense(d_model, d_model, axes=("heads", "embed"), rngs=rngs)
    self.state = nnx.data(None)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> None:
    if not self.causal:
      raise NotImplementedError("MALAMixer: decoding needs causal=True")
    z = lambda dk: jnp.zeros((batch_size, self.h, dk, self.d + 1), jnp.float32)
    self.state = nnx.Cache((z(self.d), z(1)))

  def __call__(self, x, *, segment_ids=None, decode=False, context=None, context_segment_ids=None):
    _no_cross(self, context)
    b, t, _ = x.shape
    heads = lambda y: y.reshape(b, t, self.h, self.d)
    pq = fm.elu_plus_one(heads(self.q_proj(x)))
    pk = fm.elu_plus_one(heads(self.k_proj(x)))
    v = heads(self.v_proj(x))
    if decode:
      state = self._cache_get("state")
      if t == 1:
        o, state = mala_step(pq[:, 0], pk[:, 0], v[:, 0], state)
        o = o[:, None]
      else:
        o, state = mala_attention(pq, pk, v, initial_state=state, output_final_state=True,
                                  form=self.form, chunk_size=self.chunk_size)
      self.state.set_value(state)
    else:
      o, _ = mala_attention(pq, pk, v, causal=self.causal, segment_ids=segment_ids, form=self.form,
                            chunk_size=self.chunk_size)
    return self.o_proj(o.reshape(b, t, self.h * self.d))


def _block_attention(block: int):
  """Softmax attention restricted to the same block of `block` positions (TransNormer's
  DiagAttention), for `MultiHeadAttention(attn_fn=...)`."""

  def attn(q, k, v, *, causal=False, mask=None, q_segment_ids=None, kv_segment_ids=None, **kw):
    tq, tk = q.shape[1], k.shape[1]
    if mask is not None:
      # Decode path: queries sit at the end of the cache; mask [1,1,Tq,Tk] holds k_pos <= q_pos.
      q_pos = jnp.sum(mask[0, 0], axis=-1) - 1          # last visible key = the query's position
      k_pos = jnp.arange(tk)
      same = (k_pos[None, :] // block) == (q_pos[:, None] // block)
      mask = mask & same[None, None]
    else:
      blocks = jnp.arange(tq) // block
      same = (blocks[:, None] == blocks[None, :])[None, None]
      mask = same
    return dot_product_attention(q, k, v, causal=causal, mask=mask, q_segment_ids=q_segment_ids,
                                 kv_segment_ids=kv_segment_ids, **kw)

  return attn


class DiagAttention(MultiHeadAttention):
  """TransNormer's DiagAttention: `MultiHeadAttention` with `_block_attention` (softmax within
  blocks of absolute positions). Blocks tile one sequence, so cross attention is undefined."""

  def __call__(self, x, *, context=None, **kw):
    _no_cross(self, context)
    return super().__call__(x, **kw)


# ----------------------------------------------------------------------------------------------
# Registry entries.


def _reject(name: str, options: dict[str, Any]) -> None:
  if options:
    raise ValueError(f"mixer {name!r}: unknown options {sorted(options)}")


@register_mixer("linear", "Linear attention with a feature map (elu/relu/taylor/performer/hedgehog), normalised.")
def _build_linear(*, d_model, num_heads, causal, rngs, feature_map="elu", **options):
  return LinearMixer(d_model, num_heads, causal=causal, feature_map=feature_map, rngs=rngs, **options)


@register_mixer("based", "Based: Taylor (2nd order) linear attention, feature_dim 16, + sliding-window softmax.")
def _build_based(*, d_model, num_heads, causal, rngs, feature_dim: int = 16, window: int = 64, **options):
  return LinearMixer(d_model, num_heads, causal=causal, feature_map="taylor",
                     key_dim=feature_dim * num_heads, window=window if causal else 0, rngs=rngs, **options)


@register_mixer("hedgehog", "Hedgehog: learned [softmax(xW), softmax(-xW)] feature map (+ distillation loss option).")
def _build_hedgehog(*, d_model, num_heads, causal, rngs, **options):
  return LinearMixer(d_model, num_heads, causal=causal, feature_map="hedgehog", rngs=rngs, **options)


@register_mixer("gla", "Gated Linear Attention: low-rank per-key-dim gate logsigmoid/16, RMSNorm + swish gate.")
def _build_gla(*, d_model, num_heads, causal, rngs, expand_k: float = 0.5, **options):
  key_dim = max(num_heads, int(d_model * expand_k) // num_heads * num_heads)
  return LinearMixer(d_model, num_heads, causal=causal, feature_map="identity", key_dim=key_dim,
                     normalize=False, decay="gla", output_norm=True, output_gate="swish", rngs=rngs,
                     **options)


@register_mixer("retnet", "RetNet retention: fixed per-head decay 1 - 2^(-5-h), RMSNorm + swish gate.")
def _build_retnet(*, d_model, num_heads, causal, rngs, **options):
  return LinearMixer(d_model, num_heads, causal=causal, feature_map="identity", normalize=False,
                     decay="retnet", output_norm=True, output_gate="swish", rngs=rngs, **options)


@register_mixer("lightning", "Lightning Attention / TransNormerLLM: silu q,k, fixed per-head decay, SRMSNorm-style norm + sigmoid gate.")
def _build_lightning(*, d_model, num_heads, causal, rngs, layer_index: int = 0, num_layers: int = 1,
                     **options):
  return LinearMixer(d_model, num_heads, causal=causal, feature_map="silu", normalize=False,
                     decay="lightning", output_norm=True, output_gate="sigmoid",
                     layer_index=layer_index, num_layers=num_layers, rngs=rngs, **options)


@register_mixer("transnormer", "TransNormer NormAttention: o = RMSNorm(phi(Q)(phi(K)^T V)), no denominator.")
def _build_transnormer(*, d_model, num_heads, causal, rngs, feature_map: str = "elu", **options):
  return LinearMixer(d_model, num_heads, causal=causal, feature_map=feature_map, normalize=False,
                     output_norm=True, rngs=rngs, **options)


@register_mixer("transnormer_diag", "TransNormer DiagAttention: softmax attention within blocks of 64 tokens.")
def _build_transnormer_diag(*, d_model, num_heads, causal, rngs, block: int = 64, **options):
  return DiagAttention(d_model, num_heads, causal=causal, attn_fn=_block_attention(block),
                       rngs=rngs, **options)


@register_mixer("deltanet", "DeltaNet: delta rule with L2-normalised keys (chunked UT form).")
def _build_deltanet(*, d_model, num_heads, causal, rngs, **options):
  return DeltaNetMixer(d_model, num_heads, causal=causal, gated=False, rngs=rngs, **options)


@register_mixer("gated_deltanet", "Gated DeltaNet: delta rule with Mamba-2 style scalar decay, RMSNorm + swish gate.")
def _build_gated_deltanet(*, d_model, num_heads, causal, rngs, **options):
  return DeltaNetMixer(d_model, num_heads, causal=causal, gated=True, rngs=rngs, **options)


register_mixer_class(
    "mala",
    "MALA: magnitude-aware linear attention (elu+1, weights sum to 1).",
    MALAMixer)


# ----------------------------------------------------------------------------------------------
# More linear-family mechanisms: LightNet, InLine, LinFusion, RALA, SLAB, LINA, Flowformer, and
# the intra-/inter-layer hybrids (LoLCATs window, NAtS-L, layer patterns).


def _noncausal_only(name: str, causal: bool) -> None:
  if causal:
    raise PatternUndefinedError(f"mixer {name!r} is defined non-causal only (a vision / bidirectional "
                              "mechanism); build it with causal=False")


def _no_decode(name: str):
  raise NotImplementedError(f"mixer {name!r} is non-causal and cannot decode token by token")


def _local_conv(x, kernel, segment_ids, causal):
  """Depth-wise conv along time of `x [B, T, C]` with `kernel [W, C]`, or one kernel per output
  token `[B, T, W, C]` (W odd): centred taps when non-causal (the 1-D stand-in for the papers' 3x3
  DWConv), zero outside the sequence, never reading across a segment."""
  b, t, _ = x.shape
  w = kernel.shape[-2]
  offs = range(-(w // 2), w // 2 + 1)
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  y = jnp.zeros_like(x)
  for tap, o in enumerate(offs):
    shifted = jnp.roll(x, -o, axis=1)
    sseg = jnp.roll(seg, -o, axis=1)
    idx = jnp.arange(t) + o
    ok = (idx >= 0) & (idx < t) & (sseg == seg)
    y = y + jnp.where(ok[..., None], shifted, 0.0) * kernel[..., tap, :]
  return y


class _QKVBase(nnx.Module, _StateCache):
  """q, k, v, o projections (head dim d_model / H) shared by the mixers below."""

  def __init__(self, d_model, num_heads, *, causal, rngs, chunk_size=64, form=None):
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
    self.h, self.d, self.causal = num_heads, d_model // num_heads, causal
    self.chunk_size, self.form = chunk_size, form
    self.q_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.k_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.v_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.o_proj = dense(d_model, d_model, axes=("heads", "embed"), rngs=rngs)
    self.state = nnx.data(None)

  def _heads(self, y):
    b, t, _ = y.shape
    return y.reshape(b, t, self.h, -1)

  def _qkv(self, x):
    if x.ndim != 3:
      raise ValueError(f"x must be [B, T, d_model], got shape {x.shape}")
    return self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

  def _out(self, o):
    b, t = o.shape[:2]
    return self.o_proj(o.reshape(b, t, self.h * o.shape[-1]))


def _scan_decode(step, inputs, state):
  """Runs `step(state, *token_inputs) -> (o, state)` over the time axis 1 of `inputs`."""
  mv = lambda a: jnp.moveaxis(a, 1, 0)

  def body(s, xs):
    o, s = step(s, *xs)
    return s, o

  state, o = jax.lax.scan(body, state, tuple(mv(a) for a in inputs))
  return mv(o), state


class LightNetMixer(_QKVBase):
  """LightNet (Qin et al. 2024, arXiv:2405.21022) layer (fla's `LightNetAttention`): `q = silu(x W_q)`, raw keys into
  `lightnet_attention` (per-dimension softmax over the past), per-head RMSNorm, swish gate from a
  low-rank `x W_g1 W_g2`, `W_o`. Causal only (the additive recurrence scans forward)."""

  def __init__(self, d_model, num_heads, *, causal=True, gate_low_rank=16, rngs, **kw):
    if not causal:
      raise PatternUndefinedError("mixer 'lightnet' is a causal recurrence (causal=True only)")
    super().__init__(d_model, num_heads, causal=causal, rngs=rngs, **kw)
    self.norm = RMSNorm(self.d, axis_name="head_dim")
    self.g_down = dense(d_model, gate_low_rank, axes=("embed", None), rngs=rngs)
    self.g_up = dense(gate_low_rank, d_model, axes=(None, "heads"), rngs=rngs, use_bias=True)

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    self.state = nnx.Cache((jnp.zeros((batch_size, self.h, self.d, self.d), jnp.float32),
                            jnp.full((batch_size, self.h, self.d), -jnp.inf, jnp.float32)))

  def __call__(self, x, *, segment_ids=None, decode=False, context=None, context_segment_ids=None):
    _no_cross(self, context)
    q, k, v = self._qkv(x)
    q = jax.nn.silu(q)
    if decode:
      o, st = lightnet_attention(q, k, v, initial_state=self._cache_get("state"),
                                 output_final_state=True, form=self.form, chunk_size=self.chunk_size)
      self.state.set_value(st)
    else:
      o, _ = lightnet_attention(q, k, v, segment_ids=segment_ids, form=self.form, chunk_size=self.chunk_size)
    o = self.norm(o)
    b, t = x.shape[:2]
    o = o.reshape(b, t, -1) * jax.nn.silu(self.g_up(self.g_down(x)))
    return self.o_proj(o)


class _NormalisedNonCausal(_QKVBase):
  """Shared shell of the non-causal-only mixers (InLine, LinFusion, RALA, LINA)."""
  name = ""

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    _no_decode(self.name)


class InLineMixer(_NormalisedNonCausal):
  """InLine (Han et al. 2024, arXiv:2412.06590) layer (LeapLabTHU/InLine `models/inline_deit.py` `InLineAttention`): `phi` on
  `x W_q`, `x W_k` (identity by default, as the authors; elu / relu optional), `inline_attention`
  (injective weights summing to 1, `scale = D^{-1/2}`), plus the local residual: a depth-wise conv
  of V whose kernel is predicted per sample from the pooled input, `kernel = W2 GELU(W1 mean(x) +
  b1) + b2` (W1, W2 grouped by head as the authors' grouped 1x1 convs; W2 gives `local` taps per
  channel), then `W_o`. The authors' conv is 3x3 on the image grid (cls token excluded); here it
  is the 1-D stand-in: `local` centred taps along the sequence (default 3; 0 = off), zero-padded,
  within each packed segment, whose mean it pools. Non-causal only, as in the paper (the pure
  function also has a prefix-mean extension)."""
  name = "inline"

  def __init__(self, d_model, num_heads, *, causal=False, feature_map="identity", local=3, rngs, **kw):
    _noncausal_only(self.name, causal)
    if feature_map not in ("elu", "relu", "identity"):
      raise ValueError(f"feature_map must be 'elu', 'relu' or 'identity', got {feature_map!r}")
    if local and local % 2 == 0:
      raise ValueError(f"local must be 0 or an odd width, got {local}")
    super().__init__(d_model, num_heads, causal=causal, rngs=rngs, **kw)
    self.feature_map, self.local = feature_map, local
    self.res_w1 = self.res_b1 = self.res_w2 = self.res_b2 = nnx.data(None)
    if local:
      d = self.d
      init = nnx.initializers.lecun_normal(in_axis=1, out_axis=2)
      self.res_w1 = nnx.Param(init(rngs.params(), (num_heads, d, d)), logical_axes=(None, None, None))
      self.res_b1 = nnx.Param(jnp.zeros((d_model,)), logical_axes=(None,))
      self.res_w2 = nnx.Param(init(rngs.params(), (num_heads, d, local * d)), logical_axes=(None, None, None))
      self.res_b2 = nnx.Param(jnp.zeros((local * d_model,)), logical_axes=(None,))

  def residual_kernel(self, x, segment_ids=None):
    """Per-token conv kernels `[B, T, local, d_model]` from the mean of `x` over each token's
    segment (the authors' `self.residual(x.mean(dim=1))`, reshaped to channel-major taps)."""
    from attnjax.ops.linear.engine import run_ids  # local: avoid a cycle at import time
    b, t, c = x.shape
    xf = x.astype(jnp.float32)
    if segment_ids is None:
      pooled = jnp.broadcast_to(jnp.mean(xf, axis=1, keepdims=True), xf.shape)
    else:
      runs = run_ids(segment_ids)
      tot = jax.vmap(lambda xb, rb: jax.ops.segment_sum(xb, rb, num_segments=t))(xf, runs)
      cnt = jax.vmap(lambda rb: jax.ops.segment_sum(jnp.ones((t,)), rb, num_segments=t))(runs)
      pooled = jax.vmap(lambda tb, cb, rb: tb[rb] / cb[rb][:, None])(tot, cnt, runs)
    hid = jnp.einsum("btgi,gio->btgo", pooled.reshape(b, t, self.h, self.d), self.res_w1[...])
    hid = jax.nn.gelu(hid.reshape(b, t, c) + self.res_b1[...], approximate=False)
    ker = jnp.einsum("btgi,gio->btgo", hid.reshape(b, t, self.h, self.d), self.res_w2[...])
    ker = ker.reshape(b, t, c * self.local) + self.res_b2[...]
    return jnp.swapaxes(ker.reshape(b, t, c, self.local), -1, -2)       # output channel = c*local + tap

  def __call__(self, x, *, segment_ids=None, decode=False, context=None, context_segment_ids=None):
    _no_cross(self, context)
    if decode:
      _no_decode(self.name)
    q, k, v = self._qkv(x)
    phi = {"elu": fm.elu_plus_one, "relu": fm.relu, "identity": fm.identity}[self.feature_map]
    o = inline_attention(phi(q), phi(k), v, segment_ids=segment_ids, form=self.form,
                         chunk_size=self.chunk_size)
    if self.local:
      b, t = x.shape[:2]
      ker = self.residual_kernel(x, segment_ids)
      o = o + self._heads(_local_conv(v.reshape(b, t, -1), ker, segment_ids, False)).astype(o.dtype)
    return self._out(o)


class LinFusionMixer(_NormalisedNonCausal):
  """LinFusion (Liu et al. 2024, arXiv:2409.02097) generalised linear attention: `q = W_q(x + MLP_q(x))`, `k = W_k(x + MLP_k(x))`
  with `MLP = Linear-LayerNorm-LeakyReLU-Linear` (zero-initialised last layer, so it starts as plain
  linear attention), `v = x W_v`, `phi = elu + 1`, `linfusion_attention` (eps 1e-4), `W_o`. Non-causal."""
  name = "linfusion"

  def __init__(self, d_model, num_heads, *, causal=False, eps=1e-4, rngs, **kw):
    _noncausal_only(self.name, causal)
    super().__init__(d_model, num_heads, causal=causal, rngs=rngs, **kw)
    self.eps = eps
    mk = lambda: nnx.Sequential(
        dense(d_model, d_model, axes=("embed", "mlp"), rngs=rngs),
        nnx.LayerNorm(d_model, rngs=rngs), lambda y: jax.nn.leaky_relu(y, 0.01),
        nnx.Linear(d_model, d_model, kernel_init=nnx.initializers.zeros, rngs=rngs))
    self.mlp_q, self.mlp_k = mk(), mk()

  def __call__(self, x, *, segment_ids=None, decode=False, context=None, context_segment_ids=None):
    _no_cross(self, context)
    if decode:
      _no_decode(self.name)
    q = self._heads(self.q_proj(x + self.mlp_q(x)))
    k = self._heads(self.k_proj(x + self.mlp_k(x)))
    v = self._heads(self.v_proj(x))
    o = linfusion_attention(fm.elu_plus_one(q), fm.elu_plus_one(k), v, eps=self.eps,
                            segment_ids=segment_ids, form=self.form, chunk_size=self.chunk_size)
    return self._out(o)


class RALAMixer(_NormalisedNonCausal):
  """RALA (Fan et al. 2024, arXiv:2411.07635) layer: `phi = elu + 1`, `rala_attention` (query-aware key re-weighting), plus a
  centred depth-wise conv of V (LePE's 1-D stand-in, width `local`), `W_o`. Non-causal (the
  re-weighting reads the mean of all queries). RoPE and the output gate of the vision block are
  not included."""
  name = "rala"

  def __init__(self, d_model, num_heads, *, causal=False, local=3, rngs, **kw):
    _noncausal_only(self.name, causal)
    super().__init__(d_model, num_heads, causal=causal, rngs=rngs, **kw)
    self.local = (nnx.Param(jnp.zeros((local, d_model)), logical_axes=("conv", "embed"))
                  if local else nnx.data(None))

  def __call__(self, x, *, segment_ids=None, decode=False, context=None, context_segment_ids=None):
    _no_cross(self, context)
    if decode:
      _no_decode(self.name)
    q, k, v = self._qkv(x)
    o = rala_attention(fm.elu_plus_one(q), fm.elu_plus_one(k), v, segment_ids=segment_ids)
    if self.local is not None:
      b, t = x.shape[:2]
      o = o + self._heads(_local_conv(v.reshape(b, t, -1), self.local[...], segment_ids, False))
    return self._out(o)


class LINAMixer(_NormalisedNonCausal):
  """LINA (Wang et al. 2026, arXiv:2601.22630) layer: bidirectional normalised linear attention (`phi = elu + 1`) with the KV
  gate: a learned, data-independent weight per position `g_p = exp(a_p) > 0` (p = position within
  the segment, `max_len` positions, a = 0 at init so it starts as plain normalised linear
  attention) scaling key p in numerator and denominator (`lina_attention`); plus a centred
  depth-wise conv of V for locality (width `local`); `W_o`. Non-causal (image tokens in MAR-style
  generation). Our reading of the gate, from the abstract: see `lina_attention`."""
  name = "lina"

  def __init__(self, d_model, num_heads, *, causal=False, max_len=2048, local=3, eps=1e-6, rngs, **kw):
    _noncausal_only(self.name, causal)
    super().__init__(d_model, num_heads, causal=causal, rngs=rngs, **kw)
    self.max_len, self.eps = max_len, eps
    self.log_gate = nnx.Param(jnp.zeros((max_len, num_heads)), logical_axes=(None, None))
    self.local = (nnx.Param(jnp.zeros((local, d_model)), logical_axes=("conv", "embed"))
                  if local else nnx.data(None))

  def __call__(self, x, *, segment_ids=None, decode=False, context=None, context_segment_ids=None):
    _no_cross(self, context)
    if decode:
      _no_decode(self.name)
    b, t = x.shape[:2]
    if t > self.max_len:
      raise ValueError(f"lina: sequence length {t} exceeds max_len={self.max_len} (one gate per position)")
    q, k, v = self._qkv(x)
    pos = _segment_positions(segment_ids, b, t)
    gate = jnp.exp(self.log_gate[...][pos])                       # [B, T, H]
    o = lina_attention(fm.elu_plus_one(q), fm.elu_plus_one(k), v, gate, eps=self.eps,
                       segment_ids=segment_ids)
    if self.local is not None:
      o = o + self._heads(_local_conv(v.reshape(b, t, -1), self.local[...], segment_ids, False))
    return self._out(o)


def _segment_positions(segment_ids, b, t):
  """Position of each token within its packed segment `[B, T]` (0, 1, ... from each start)."""
  if segment_ids is None:
    return jnp.broadcast_to(jnp.arange(t), (b, t))
  first = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  return jnp.arange(t) - jax.lax.cummax(jnp.where(first, jnp.arange(t), 0), axis=1)


class SLABMixer(_QKVBase):
  """SLAB (Guo et al. 2024, arXiv:2405.11582) simplified linear attention layer, as the authors' `Attention` in xinghaochen/SLAB
  `classification/models/slab_deit.py`: `k = x W_k + P` (a learned positional encoding on the keys,
  zero-initialised, one row per position: `pos_emb=True`, `max_len` rows; packed segments count
  positions from their start), `sla_attention(relu(Q), relu(K), V)` (eps 1e-6), plus a depth-wise
  conv of V of width `local` (default 5, the authors' `kernel_size=5`), then `W_o`.
  Non-causal (the paper's vision setting): the conv's `[local, head_dim]` kernel and bias are
  shared by the heads, as the authors' `dwc` (a `head_dim`-channel conv run on every head); it is
  the 1-D stand-in for their 5x5 conv on the image grid (centred taps, zero padding). Causal (our
  extension for language models): prefix sums, and the conv is a causal `ShortConv` over all
  channels (without its bias); decodes with the state `S [B, H, D, D + 1]`, the conv's cache and a
  position counter. SLAB's other half, PRepBN, is `PRepBN` below."""

  def __init__(self, d_model, num_heads, *, causal=True, local=5, pos_emb=True, max_len=2048,
               eps=1e-6, rngs, **kw):
    super().__init__(d_model, num_heads, causal=causal, rngs=rngs, **kw)
    self.eps, self.max_len = eps, max_len
    self.conv = self.local = self.local_bias = self.k_pos = nnx.data(None)
    if local and causal:
      self.conv = ShortConv(d_model, local, rngs=rngs)
    elif local:
      if local % 2 == 0:
        raise ValueError(f"local must be an odd width when causal=False, got {local}")
      w = jax.random.normal(rngs.params(), (local, self.d)) * local ** -0.5
      self.local = nnx.Param(w, logical_axes=("conv", None))
      self.local_bias = nnx.Param(jnp.zeros((self.d,)), logical_axes=(None,))
    if pos_emb:
      self.k_pos = nnx.Param(jnp.zeros((max_len, d_model)), logical_axes=(None, "embed"))
    self.pos_index = nnx.data(None)

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    if not self.causal:
      raise NotImplementedError("mixer 'slab': decoding needs causal=True")
    if self.k_pos is not None and max_len > self.max_len:
      raise ValueError(f"slab: max_len={max_len} exceeds the positional encoding's max_len={self.max_len}")
    self.state = nnx.Cache(jnp.zeros((batch_size, self.h, self.d, self.d + 1), jnp.float32))
    self.pos_index = nnx.Cache(jnp.zeros((), jnp.int32))
    if self.conv is not None:
      self.conv.init_cache(batch_size, max_len, dtype)

  def __call__(self, x, *, segment_ids=None, decode=False, context=None, context_segment_ids=None):
    _no_cross(self, context)
    q, k, v = self._qkv(x)
    b, t = x.shape[:2]
    if self.k_pos is not None:
      if decode:
        start = self.pos_index[...]
        pos = jnp.broadcast_to(start + jnp.arange(t), (b, t))
        self.pos_index[...] = start + t
      else:
        if t > self.max_len:
          raise ValueError(f"slab: sequence length {t} exceeds max_len={self.max_len} (one key "
                           "positional encoding per position)")
        pos = _segment_positions(segment_ids, b, t)
      k = k + self._heads(self.k_pos[...][pos]).astype(k.dtype)
    if decode:
      st = self._cache_get("state")
      if t == 1:
        o, st = sla_step(q[:, 0], k[:, 0], v[:, 0], st, eps=self.eps)
        o = o[:, None]
      else:
        o, st = sla_attention(q, k, v, eps=self.eps, causal=True, initial_state=st,
                              output_final_state=True, form=self.form, chunk_size=self.chunk_size)
      self.state.set_value(st)
    else:
      o = sla_attention(q, k, v, eps=self.eps, causal=self.causal, segment_ids=segment_ids,
                        form=self.form, chunk_size=self.chunk_size)
    vf = v.reshape(b, t, -1)
    if self.conv is not None:
      o = o + self._heads(self.conv(vf, segment_ids=segment_ids, decode=decode) - self.conv.bias[...])
    elif self.local is not None:
      ker = jnp.tile(self.local[...], (1, self.h))              # channel h*D + i uses tap column i
      o = o + self._heads(_local_conv(vf, ker, segment_ids, False)) + self.local_bias[...]
    return self._out(o)


class FlowformerMixer(_QKVBase):
  """Flowformer (Wu et al. 2022, arXiv:2202.06258) layer: `flow_attention` (sigmoid features, conservation-flow competition and
  allocation) between the projections. Non-causal, or causal with prefix sums (the paper's
  autoregressive version); causal decoding runs `flow_step` per token."""

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    if not self.causal:
      raise NotImplementedError("mixer 'flowformer': decoding needs causal=True")
    self.state = nnx.Cache(flow_init_state(batch_size, self.h, self.d, self.d))

  def __call__(self, x, *, segment_ids=None, decode=False, context=None, context_segment_ids=None):
    _no_cross(self, context)
    q, k, v = self._qkv(x)
    if decode:
      o, st = _scan_decode(lambda s, a, b_, c: flow_step(a, b_, c, s), (q, k, v), self._cache_get("state"))
      self.state.set_value(st)
    else:
      o = flow_attention(q, k, v, causal=self.causal, segment_ids=segment_ids)
    return self._out(o)


class PRepBN(nnx.Module):
  """SLAB's progressive re-parameterised BatchNorm (Guo et al. 2024, arXiv:2405.11582) for `x [..., C]` (a LayerNorm replacement).

  Training: `y = gamma LN(x) + (1 - gamma) RepBN(x)` with `RepBN(x) = BN(x) + eta x` (eta a learned
  scalar, 1 at init; BN over every axis but the last, batch statistics, running averages updated
  with `momentum`), and `gamma` following the authors' schedule: 1 (LN only) for `warmup` calls,
  then `gamma = r0 * remaining / total_steps`, decreasing linearly to 0 over `total_steps` calls.
  Evaluation (`train=False`, or `module.eval()`): only RepBN with running statistics, folded into
  one per-channel affine `y = a x + c` (`folded()`), which is what lets it merge into the next
  linear layer. Each training call advances the schedule by one step.
  """

  def __init__(self, num_features, *, total_steps: int, warmup: int = 0, r0: float = 1.0,
               momentum: float = 0.9, eps: float = 1e-5, rngs: nnx.Rngs | None = None):
    if total_steps < 1 or warmup < 0:
      raise ValueError(f"total_steps must be >= 1 and warmup >= 0, got {total_steps}, {warmup}")
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    del rngs
    self.total_steps, self.r0, self.momentum, self.eps = total_steps, r0, momentum, eps
    self.ln = nnx.LayerNorm(num_features, epsilon=eps, rngs=nnx.Rngs(0))
    self.bn_scale = nnx.Param(jnp.ones((num_features,)))
    self.bn_bias = nnx.Param(jnp.zeros((num_features,)))
    self.eta = nnx.Param(jnp.ones(()))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,)))
    self.var = nnx.BatchStat(jnp.ones((num_features,)))
    self.warm = nnx.BatchStat(jnp.asarray(warmup, jnp.int32))
    self.remaining = nnx.BatchStat(jnp.asarray(total_steps, jnp.int32))
    self.use_running_average = False

  def gamma(self) -> jax.Array:
    """The LayerNorm weight the next training call uses (1 during warm-up)."""
    g = self.r0 * self.remaining[...].astype(jnp.float32) / self.total_steps
    return jnp.where(self.warm[...] > 0, 1.0, g)

  def folded(self):
    """`(a, c) [C]` with `RepBN_eval(x) = a x + c` (running statistics folded in)."""
    inv = self.bn_scale[...] * jax.lax.rsqrt(self.var[...] + self.eps)
    return inv + self.eta[...], self.bn_bias[...] - inv * self.mean[...]

  def __call__(self, x: jax.Array, *, train: bool | None = None) -> jax.Array:
    train = (not self.use_running_average) if train is None else train
    if x.shape[-1] != self.bn_scale.shape[0]:
      raise ValueError(f"x must be [..., C] with C={self.bn_scale.shape[0]}, got {x.shape}")
    if not train:
      a, c = self.folded()
      return x * a + c
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mu, var = jnp.mean(xf, axes), jnp.var(xf, axes)
    n = xf.size // xf.shape[-1]
    m = self.momentum
    self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mu)
    # Running variance unbiased, as torch's BatchNorm keeps it.
    self.var[...] = m * self.var[...] + (1 - m) * jax.lax.stop_gradient(var * n / max(n - 1, 1))
    rep = (xf - mu) * jax.lax.rsqrt(var + self.eps) * self.bn_scale[...] + self.bn_bias[...] + self.eta[...] * xf
    gamma = self.gamma()
    y = gamma * self.ln(xf) + (1.0 - gamma) * rep
    warming = self.warm[...] > 0
    self.warm[...] = jnp.where(warming, self.warm[...] - 1, self.warm[...])
    self.remaining[...] = jnp.where(warming, self.remaining[...], jnp.maximum(self.remaining[...] - 1, 0))
    return y.astype(x.dtype)


class WindowLinearMixer(_QKVBase):
  """LoLCATs (Zhang et al. 2024, arXiv:2410.10254) attention layer: sliding-window softmax (`window` keys) plus Hedgehog linear
  attention for older tokens, one shared normaliser (`window_linear_attention`).

  Hedgehog map per head `[softmax(x W), softmax(-x W)]` (`W [H, D, D]`, identity init, no bias, as
  the LoLCATs config), window factor `sigmoid(w_h)` per head with `w_h = -2.197` at init (0.1),
  linear factor 1. Causal only; decodes with the last `window` keys plus the linear state
  (`window_linear_step`). No positional encoding (the window gives locality).
  """

  def __init__(self, d_model, num_heads, *, causal=True, window=64, window_logit_init=-2.197,
               rngs, **kw):
    if not causal:
      raise PatternUndefinedError("mixer 'lolcats_window' is causal only (a window of past keys)")
    if not isinstance(window, int) or window < 1:
      raise ValueError(f"window must be an int >= 1, got {window!r}")
    super().__init__(d_model, num_heads, causal=causal, rngs=rngs, **kw)
    self.window = window
    eye = jnp.broadcast_to(jnp.eye(self.d), (num_heads, self.d, self.d))
    self.fm_q = nnx.Param(eye, logical_axes=(None, "head_dim", None))
    self.fm_k = nnx.Param(eye, logical_axes=(None, "head_dim", None))
    self.window_logit = nnx.Param(jnp.full((num_heads,), window_logit_init), logical_axes=(None,))

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    self.state = nnx.Cache(window_linear_init_cache(batch_size, self.window, self.h, self.d,
                                                    2 * self.d, self.d))

  def __call__(self, x, *, segment_ids=None, decode=False, context=None, context_segment_ids=None):
    _no_cross(self, context)
    q, k, v = self._qkv(x)
    pq, pk = fm.hedgehog(q, self.fm_q[...]), fm.hedgehog(k, self.fm_k[...])
    wf = jax.nn.sigmoid(self.window_logit[...])
    if decode:
      o, st = _scan_decode(lambda s, *a: window_linear_step(*a, s, window_factor=wf),
                           (q, k, v, pq, pk), self._cache_get("state"))
      self.state.set_value(st)
    else:
      o = window_linear_attention(q, k, v, pq, pk, window=self.window, window_factor=wf,
                                  segment_ids=segment_ids, form=self.form or "chunked", chunk_size=self.chunk_size)
    return self._out(o)


class NAtSMixer(_QKVBase):
  """NAtS-L (Deng et al. 2026, arXiv:2602.03681) layer: one routing decision per chunk between softmax attention and Gated
  DeltaNet (automl/NeuralAttentionSearchLinear `layers/natsl_attn_gdn.py`, our reading).

  Shared `W_q, W_k, W_v`; the router scores `Linear(mean-pool of the chunk) in R^2` (chunks of
  `route_chunk` positions from the segment start), `p = softmax(score)[1]`, decision `p > 0.5`
  with a straight-through gradient (the authors' `hard_softmax`). The pool is the whole chunk, so
  the decision exists once the chunk is complete, and it only governs how later chunks see the
  chunk's tokens (kept in the KV cache for softmax attention with raw q, k, scale D^-1/2, or
  committed to the GDN state: `l2norm(silu(.))` q, k, `beta = sigmoid(x W_b)`, Mamba-2 style
  decay); a query reads its own chunk through the GDN state (`nats_attention`). The read-outs are
  added, then per-head RMSNorm, swish gate, `W_o`. `router_bias` initialises the softmax logit's
  bias (0: about half the chunks at init).
  """

  def __init__(self, d_model, num_heads, *, causal=True, route_chunk=16, router_bias=0.0, rngs, **kw):
    if not causal:
      raise PatternUndefinedError("mixer 'nats' is causal only (a KV cache and a recurrent state)")
    super().__init__(d_model, num_heads, causal=causal, rngs=rngs, **kw)
    self.route_chunk = route_chunk
    self.router = dense(d_model, 2, axes=("embed", None), rngs=rngs, use_bias=True)
    self.router.bias[...] = jnp.asarray([0.0, router_bias])
    self.b_proj = dense(d_model, num_heads, axes=("embed", None), rngs=rngs)
    self.a_proj = dense(d_model, num_heads, axes=("embed", None), rngs=rngs)
    k1, k2 = jax.random.split(rngs.params())
    self.a_log = nnx.Param(jnp.log(jax.random.uniform(k1, (num_heads,), minval=1.0, maxval=16.0)),
                           logical_axes=(None,))
    dt = jnp.exp(jax.random.uniform(k2, (num_heads,), minval=jnp.log(1e-3), maxval=jnp.log(1e-1)))
    self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)), logical_axes=(None,))
    self.g_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.norm = RMSNorm(self.d, axis_name="head_dim")
    self.d_model = d_model

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    self.state = nnx.Cache(nats_init_cache(batch_size, max_len, self.h, self.d, self.d, self.d_model))

  def route(self, x, *, segment_ids=None, start_pos=None, carry=None):
    """Straight-through 0/1 route `[B, T]` and the partial-chunk pool sum. Only the value at a
    chunk's last token is used (there the causal pool covers the whole chunk): the chunk's one
    decision."""
    pooled, tail = chunk_prefix_mean(x, self.route_chunk, segment_ids=segment_ids,
                                     start_pos=start_pos, carry=carry)
    p = jax.nn.softmax(self.router(pooled).astype(jnp.float32), axis=-1)[..., 1]
    return straight_through(p), tail

  def __call__(self, x, *, segment_ids=None, decode=False, context=None, context_segment_ids=None):
    _no_cross(self, context)
    q, k, v = self._qkv(x)
    l2 = lambda y: y * jax.lax.rsqrt(jnp.sum(y * y, axis=-1, keepdims=True) + 1e-6)
    ql, kl = l2(jax.nn.silu(q)), l2(jax.nn.silu(k))
    beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
    ld = -jnp.exp(self.a_log[...]) * jax.nn.softplus(self.a_proj(x).astype(jnp.float32) + self.dt_bias[...])
    if decode:
      cache = self._cache_get("state")
      b = x.shape[0]
      r, tail = self.route(x, start_pos=jnp.broadcast_to(cache["pos"], (b,)), carry=cache["pool"])
      o, cache = nats_decode(q, k, v, beta, r, cache, route_chunk=self.route_chunk, q_lin=ql,
                             k_lin=kl, log_decay=ld)
      self.state.set_value(dict(cache, pool=tail))
    else:
      r, _ = self.route(x, segment_ids=segment_ids)
      o = nats_attention(q, k, v, beta, r, route_chunk=self.route_chunk, q_lin=ql, k_lin=kl,
                         log_decay=ld, segment_ids=segment_ids,
                         form="parallel" if self.form == "parallel" else "chunked",
                         chunk_size=self.chunk_size)
    b, t = x.shape[:2]
    o = self.norm(o).reshape(b, t, -1) * jax.nn.silu(self.g_proj(x))
    return self.o_proj(o)


class SkipMixer(nnx.Module):
  """A removed attention sublayer (LayerBoost's "low sensitivity" policy): outputs zeros, so the
  block's residual passes `x` unchanged. Decodes trivially."""

  def __call__(self, x, *, segment_ids=None, decode=False, context=None, context_segment_ids=None):
    _no_cross(self, context)
    if x.ndim != 3:
      raise ValueError(f"x must be [B, T, d_model], got shape {x.shape}")
    return jnp.zeros_like(x)

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    return None


def _parse_ratio(ratio) -> tuple[int, int]:
  if isinstance(ratio, str):
    parts = ratio.split(":")
    ok = len(parts) == 2 and all(p.strip().isdigit() for p in parts)
    lin, full = (int(parts[0]), int(parts[1])) if ok else (-1, -1)
  elif isinstance(ratio, (tuple, list)) and len(ratio) == 2:
    lin, full = int(ratio[0]), int(ratio[1])
  else:
    lin = full = -1
  if lin < 0 or full < 0 or lin + full == 0:
    raise ValueError(f"ratio must be 'L:F' (linear:full, non-negative ints, not both 0), got {ratio!r}")
  return lin, full


def hybrid_layer_pattern(num_layers: int, ratio="3:1", *, linear: str = "gated_deltanet",
                         full: str = "softmax") -> list[str]:
  """Per-layer mixer names for a layer-level hybrid with `linear:full` = `ratio` ((Wang et al. 2025, arXiv:2507.06457): 3:1 to 6:1
  with Gated DeltaNet; "1:0" all linear, "0:1" all full).

  The layers are cut into groups of `L + F`, each group L linear layers then F full ones (so with
  3:1 every fourth layer is full attention, and the last layer of a multiple-of-4 stack is full, as
  in [97]'s interleaving). A trailing partial group keeps the same order. For `DecoderLM(mixer=...)`.
  """
  if not isinstance(num_layers, int) or num_layers < 1:
    raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
  lin, fl = _parse_ratio(ratio)
  group = [linear] * lin + [full] * fl
  return [group[i % len(group)] for i in range(num_layers)]


def layerboost_pattern(sensitivity, *, num_full: int, num_removed: int = 0, full: str = "softmax",
                       linear: str = "lolcats_window", removed: str = "skip") -> list[str]:
  """LayerBoost (Souibgui et al. 2026, arXiv:2604.22050) policy from per-layer sensitivities `s_l` (loss change when layer l's attention
  is replaced): the `num_full` most sensitive layers keep softmax attention, the `num_removed` least
  sensitive lose it (`skip`: the residual passes unchanged), the rest get linear sliding-window
  attention (LoLCATs-style `lolcats_window` by default). Ties keep the earlier layer more sensitive.
  """
  s = [float(x) for x in sensitivity]
  n = len(s)
  if n == 0 or num_full < 0 or num_removed < 0 or num_full + num_removed > n:
    raise ValueError(f"need 0 <= num_full + num_removed <= len(sensitivity)={n}, got "
                     f"num_full={num_full}, num_removed={num_removed}")
  order = sorted(range(n), key=lambda i: (-s[i], i))
  out = [linear] * n
  for i in order[:num_full]:
    out[i] = full
  for i in order[n - num_removed:] if num_removed else []:
    out[i] = removed
  return out


register_mixer_class(
    "lightnet",
    "LightNet: additive recurrence (per-dim softmax over the past), RMSNorm + swish gate.",
    LightNetMixer)


register_mixer_class(
    "inline",
    "InLine: injective linear attention (weights sum to 1) + local residual; non-causal.",
    InLineMixer)


register_mixer_class(
    "linfusion",
    "LinFusion: generalised linear attention with MLP-refined q, k; non-causal.",
    LinFusionMixer)


register_mixer_class(
    "rala",
    "RALA: rank-augmented linear attention (query-aware key weights) + local conv; non-causal.",
    RALAMixer)


register_mixer_class(
    "slab",
    "SLAB: simplified linear attention relu(Q)(relu(K)^T V)/norm + depth-wise conv of V.",
    SLABMixer)


register_mixer_class(
    "lina",
    "LINA: bidirectional linear attention with a learned per-position KV gate; non-causal.",
    LINAMixer)


register_mixer_class(
    "flowformer",
    "Flowformer: flow-conservation linear attention (sigmoid features), causal or not.",
    FlowformerMixer)


register_mixer_class(
    "lolcats_window",
    "LoLCATs: sliding-window softmax + Hedgehog linear attention, shared normaliser.",
    WindowLinearMixer)


register_mixer_class(
    "nats",
    "NAtS-L: per-chunk routing between softmax attention and Gated DeltaNet in one layer.",
    NAtSMixer)


@register_mixer("skip", "No attention (LayerBoost's removed layer): zeros, the residual passes unchanged.")
def _build_skip(*, d_model, num_heads, causal, rngs, **options):
  _reject("skip", options)
  return SkipMixer()


# ----------------------------------------------------------------------------------------------
# STILL (Meng et al. 2026, arXiv:2602.02180) and SeqBoat (Ren et al. 2023, arXiv:2306.11197).


class StillMixer(WindowLinearMixer):
  """STILL (Meng et al. 2026, arXiv:2602.02180) layer: the LoLCATs window + linear hybrid (`WindowLinearMixer`: learned Hedgehog
  maps, here inside the NP-Map below; per-head window factor) whose softmax set also keeps the
  salient older tokens.

  Reading (only the abstract was available; the score is unverified): the
  Self-Saliency Score of token j is the log weight it gives itself in its own causal window
  softmax (`still_saliency`: computed in sliding windows, as the abstract says); per head, the
  `top_k` best tokens of each `select_chunk` positions (from the segment start) are salient
  (`still_select`). "Delayed selection": a chunk is decided once it is complete, which happens
  before its first token leaves the window because `select_chunk <= window` (enforced), so the
  layer is causal. Decoding keeps every key (`still_decode`, dense over the cache; it receives
  the same feature maps as the full forward).

  NP-Map (`np_map=True`, default): the linear branch's features are
  `phi(x) = ||x|| psi(x / ||x||)` with `psi` the Hedgehog map (per head, learned `W`) applied to
  the unit direction, so the learned map only shapes the direction and the pretrained norm of
  q / k is re-injected (`phi(c x) = c phi(x)` for c > 0; `phi(0) = 0`). Only the abstract was
  available ("decouples feature direction from magnitude and reinjects pretrained norms"): that
  `psi` is Hedgehog's map and that the norm is the plain L2 norm of the head's q / k is our
  reading. `np_map=False` uses Hedgehog's map on the raw q / k (the LoLCATs features).
  """

  def __init__(self, d_model, num_heads, *, causal=True, window=64, top_k=4, select_chunk=None,
               np_map: bool = True, rngs, **kw):
    if not causal:
      raise PatternUndefinedError("mixer 'still' is causal only (a window of past keys)")
    if not isinstance(np_map, bool):
      raise ValueError(f"np_map must be a bool, got {np_map!r}")
    self.np_map = np_map
    super().__init__(d_model, num_heads, causal=causal, window=window, rngs=rngs, **kw)
    select_chunk = window if select_chunk is None else select_chunk
    if not isinstance(select_chunk, int) or not 1 <= select_chunk <= window:
      raise ValueError(f"select_chunk must be an int in [1, window={window}] (causal delayed "
                       f"selection), got {select_chunk!r}")
    if not isinstance(top_k, int) or top_k < 0:
      raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    self.top_k, self.select_chunk = top_k, select_chunk

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    self.state = nnx.Cache(still_init_cache(batch_size, max_len, self.h, self.d, 2 * self.d, self.d))

  def feature(self, x, weight):
    """The linear branch's feature map: `x [..., H, D]`, `weight [H, D, D]` -> `[..., H, 2D]`
    (NP-Map `||x|| hedgehog(x / ||x||)`, or plain Hedgehog with `np_map=False`)."""
    if not self.np_map:
      return fm.hedgehog(x, weight)
    xf = x.astype(jnp.float32)
    n2 = jnp.sum(xf * xf, axis=-1, keepdims=True)
    # A zero vector has no direction: its feature is 0 (the norm factor), and the guarded sqrt
    # keeps its gradient finite.
    nz = n2 > 0
    n = jnp.sqrt(jnp.where(nz, n2, 1.0))
    psi = fm.hedgehog(xf / n, weight)
    return (jnp.where(nz, n, 0.0) * psi).astype(x.dtype)

  def __call__(self, x, *, segment_ids=None, decode=False, context=None, context_segment_ids=None):
    _no_cross(self, context)
    q, k, v = self._qkv(x)
    pq, pk = self.feature(q, self.fm_q[...]), self.feature(k, self.fm_k[...])
    wf = jax.nn.sigmoid(self.window_logit[...])
    if decode:
      o, st = still_decode(q, k, v, pq, pk, self._cache_get("state"), window=self.window,
                           top_k=self.top_k, chunk=self.select_chunk, window_factor=wf)
      self.state.set_value(st)
      return self._out(o)
    t = x.shape[1]
    score = still_saliency(q, k, window=self.window, segment_ids=segment_ids,
                           chunk_size=self.chunk_size)
    sal = still_select(score, top_k=self.top_k, chunk=self.select_chunk, segment_ids=segment_ids)
    # Exactly min(top_k, chunk) per chunk, so without packing the count is known statically.
    bound = None if segment_ids is not None else min(t, self.top_k * -(-t // self.select_chunk))
    o = still_attention(q, k, v, pq, pk, sal, window=self.window, window_factor=wf,
                        segment_ids=segment_ids, form="parallel" if self.form == "parallel" else "chunked",
                        chunk_size=self.chunk_size, max_salient=bound)
    return self._out(o)


class SeqBoatMixer(nnx.Module, _StateCache):
  """SeqBoat (Ren et al. 2023, arXiv:2306.11197) layer (the authors' `SeqBoatLayer`, causal, without its norm / residual /
  output activation, which the block provides).

  Backbone over every token: MEGA's multi-head damped EMA per channel (`ndim` states,
  `h_t = (1 - p a) h_{t-1} + p b x_t`, `y_t = gamma . h_t / sqrt(ndim) + omega x_t`), run on the
  linear engine with a per-key-dimension decay (heads = channels), then `mx = silu(y)`.
  `[u, hx] = mx W_h`: `hx` is the backbone's output, `u` two router logits (attention off / on);
  `p = softmax(u / tau)` (`tau = exp(log_tau)`, sqrt(d_model) at init, the latent configurator),
  route = argmax is "on". Routed tokens run a GAU-style local attention on the compressed
  sequence (`seqboat_attention`): `[z, r, v] = silu(mx W_m)`, `q, k = z gamma_{q,k} + beta_{q,k}`
  (RoPE on the original positions, the authors' LM setting), softmax over the last `window`
  routed tokens, `h = ((A v) * r) W_o`, scattered back. The router learns through the authors'
  estimator: `h` is multiplied by the chosen option's probability (so 0 for unrouted tokens).
  Output `hx + h`. Heads split z and v (the paper's GAU is single-head: num_heads=1).
  Decoding keeps O(window) state: the EMA state and a ring of the last `window` routed keys and
  values (`seqboat_init_cache`), whatever the decode length.
  """

  def __init__(self, d_model, num_heads, *, causal=True, window=64, ndim=16, chunk_size=64,
               activation="softmax", router_bias=0.0, form=None, rngs):
    if not causal:
      raise PatternUndefinedError("mixer 'seqboat' is built causal only here (an EMA scanned forward)")
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
    if not isinstance(window, int) or window < 1:
      raise ValueError(f"window must be an int >= 1, got {window!r}")
    self.h, self.d, self.c, self.n = num_heads, d_model // num_heads, d_model, ndim
    self.window, self.chunk_size, self.activation, self.form = window, chunk_size, activation, form
    keys = jax.random.split(rngs.params(), 6)
    nrm = lambda key, shape, std: nnx.Param(std * jax.random.normal(key, shape), logical_axes=(None,) * len(shape))
    self.ema_delta = nrm(keys[0], (d_model, ndim), 0.2)
    self.ema_alpha = nrm(keys[1], (d_model, ndim), 0.2)
    sign = jnp.where(jnp.arange(ndim) % 2 == 0, 1.0, -1.0)
    self.ema_beta = nnx.Param(sign + 0.02 * jax.random.normal(keys[2], (d_model, ndim)), logical_axes=(None, None))
    self.ema_gamma = nrm(keys[3], (d_model, ndim), 1.0)
    self.ema_omega = nrm(keys[4], (d_model,), 1.0)
    self.h_proj_in = dense(d_model, 2 + d_model, axes=("embed", None), rngs=rngs, use_bias=True)
    self.h_proj_in.bias[...] = jnp.zeros((2 + d_model,)).at[1].set(router_bias)
    self.log_tau = nnx.Param(jnp.full((), 0.5 * jnp.log(float(d_model))))
    self.m_proj = dense(d_model, 3 * d_model, axes=("embed", "heads"), rngs=rngs, use_bias=True)
    self.qk_gamma = nnx.Param(0.02 * jax.random.normal(keys[5], (2, d_model)) + 1.0, logical_axes=(None, None))
    self.qk_beta = nnx.Param(jnp.zeros((2, d_model)), logical_axes=(None, None))
    self.o_proj = dense(d_model, d_model, axes=("heads", "embed"), rngs=rngs, use_bias=True)
    self.state = nnx.data(None)

  def _ema_inputs(self, x):
    p = jax.nn.sigmoid(self.ema_delta[...])
    log_q = jnp.log1p(-p * jax.nn.sigmoid(self.ema_alpha[...]))        # [C, N], < 0
    kk = p * self.ema_beta[...]
    qq = self.ema_gamma[...] * self.n ** -0.5
    b, t, _ = x.shape
    bc = lambda a: jnp.broadcast_to(a, (b, t, self.c, self.n))
    return bc(qq), bc(kk), x.astype(jnp.float32)[..., None], bc(log_q)

  def backbone(self, x, *, segment_ids=None, decode=False):
    """`(mx, hx, router logits u)` of the EMA backbone; updates the EMA state when decoding."""
    if x.ndim != 3:
      raise ValueError(f"x must be [B, T, d_model], got shape {x.shape}")
    qq, kk, vv, lq = self._ema_inputs(x)
    if decode:
      st = self._cache_get("state")
      y, s = linear_attention(qq, kk, vv, log_decay=lq, scale=1.0, initial_state=st["ema"],
                              output_final_state=True, form="recurrent")
      self.state.set_value(dict(st, ema=s))
    else:
      y, _ = linear_attention(qq, kk, vv, log_decay=lq, scale=1.0, segment_ids=segment_ids,
                              form="parallel" if self.form == "parallel" else "chunked",
                              chunk_size=self.chunk_size)
    mx = jax.nn.silu(y[..., 0] + self.ema_omega[...] * x.astype(jnp.float32)).astype(x.dtype)
    hu = self.h_proj_in(mx)
    return mx, hu[..., 2:], hu[..., :2]

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    # The attention cache is a ring of the last `window` routed tokens, whatever max_len is.
    self.state = nnx.Cache(dict(attn=seqboat_init_cache(batch_size, self.window, self.h, self.d, self.d),
                                ema=init_state(batch_size, self.c, self.n, 1)))

  def __call__(self, x, *, segment_ids=None, decode=False, context=None, context_segment_ids=None):
    _no_cross(self, context)
    b, t, _ = x.shape
    mx, hx, u = self.backbone(x, segment_ids=segment_ids, decode=decode)
    p = jax.nn.softmax(u.astype(jnp.float32) / jnp.exp(self.log_tau[...]), axis=-1)
    route = p[..., 1] > p[..., 0]
    gate = jnp.where(route, jnp.max(p, axis=-1), 0.0)               # the authors' estimator
    z, r, v = jnp.split(jax.nn.silu(self.m_proj(mx)), 3, axis=-1)
    qk = z[..., None, :] * self.qk_gamma[...] + self.qk_beta[...]
    heads = lambda a: a.reshape(b, t, self.h, self.d)
    q, k, v = heads(qk[..., 0, :]), heads(qk[..., 1, :]), heads(v)
    if decode:
      st = self._cache_get("state")
      pos = st["attn"]["pos"] + jnp.arange(t)
      q, k = apply_rope(q, pos), apply_rope(k, pos)
      o, att = seqboat_decode(q, k, v, route, st["attn"], window=self.window, activation=self.activation)
      self.state.set_value(dict(self.state.get_value(), attn=att))
    else:
      pos = jnp.arange(t)
      q, k = apply_rope(q, pos), apply_rope(k, pos)
      o = seqboat_attention(q, k, v, route, window=self.window, activation=self.activation,
                            segment_ids=segment_ids, form="parallel" if self.form == "parallel" else "chunked",
                            chunk_size=self.chunk_size)
    h = self.o_proj(o.reshape(b, t, -1) * r) * gate[..., None].astype(x.dtype)
    return hx + h


register_mixer_class(
    "still",
    "STILL: window softmax + salient tokens (self-saliency top-k per chunk) + NP-Map linear rest, shared normaliser.",
    StillMixer)


register_mixer_class(
    "seqboat",
    "SeqBoat: EMA backbone + router-activated local attention over the selected tokens.",
    SeqBoatMixer)
