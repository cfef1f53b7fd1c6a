"""NNX layers of the linear / recurrent family (catalog L) and their registry entries.

Every layer maps `x [B, T, d_model] -> [B, T, d_model]`, accepts `segment_ids [B, T]` (packed
sequences; the recurrent state resets at each segment change) and decodes with a constant-size
state cache (`init_cache`, then `decode=True` calls: a prefill of any length followed by
one-token steps equals the full causal forward). Registered mixers:

`linear` (feature-map option), `based`, `hedgehog`, `gla`, `retnet`, `lightning`, `deltanet`,
`gated_deltanet`, `mala`, `transnormer` (NormAttention) and `transnormer_diag` (DiagAttention).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.layers import RMSNorm, dense
from attnjax.ops import masks as masks_lib
from attnjax.ops.linear import feature_maps as fm
from attnjax.ops.linear.delta import delta_rule, delta_rule_step
from attnjax.ops.linear.engine import init_state, linear_attention, linear_attention_step
from attnjax.ops.linear.mechanisms import mala_attention, mala_step
from attnjax.ops.softmax import dot_product_attention
from attnjax.registry import register_mixer

FEATURE_MAPS = ("identity", "elu", "relu", "silu", "taylor", "performer", "hedgehog")
DECAYS = ("none", "retnet", "lightning", "gla")
GATES = (None, "swish", "sigmoid")


def retnet_log_decay(num_heads: int) -> jax.Array:
  """RetNet's fixed per-head decay `gamma_h = 1 - 2^(-5 - h)`, as log gates `[H]`."""
  return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(num_heads, dtype=jnp.float32))))


def lightning_log_decay(num_heads: int, layer_idx: int = 0, num_layers: int = 1) -> jax.Array:
  """TransNormerLLM / Lightning [41] per-head decay `log lambda_h = -(8 h / H)(1 - l / L)`, `[H]`
  (the schedule fla's `chunk_lightning_attn` uses; head 0 does not decay)."""
  return -(8.0 / num_heads) * (1.0 - layer_idx / num_layers) * jnp.arange(num_heads, dtype=jnp.float32)


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
  `distill_weight`). The engine's `chunk_size` / `form` are exposed.
  """

  def __init__(self, d_model: int, num_heads: int, *, causal: bool = True, feature_map: str = "elu",
               key_dim: int | None = None, normalize: bool = True, decay: str = "none",
               output_norm: bool = False, output_gate: str | None = None, window: int = 0,
               num_features: int | None = None, distill: bool = False, distill_weight: float = 1.0,
               layer_idx: int = 0, num_layers: int = 1, gate_low_rank: int = 16,
               gate_normalizer: float = 16.0, chunk_size: int = 64, form: str = "chunked",
               rngs: nnx.Rngs):
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
      raise ValueError(f"decay={decay!r} needs causal=True (a bidirectional state has no decay)")
    self.h, self.dk, self.dv = num_heads, key_dim // num_heads, d_model // num_heads
    self.causal, self.feature_map, self.normalize, self.decay = causal, feature_map, normalize, decay
    self.chunk_size, self.form = chunk_size, form
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
      self.fixed_log_decay = nnx.Variable(lightning_log_decay(num_heads, layer_idx, num_layers))
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
    kw = dict(normalize=self.normalize)
    if not decode:
      o, _ = linear_attention(q, k, v, log_decay=log_decay, causal=self.causal, segment_ids=segment_ids,
                              form=self.form, chunk_size=self.chunk_size, **kw)
      return o
    state = self._cache_get("state")
    if q.shape[1] == 1:
      ld = log_decay if log_decay is None or log_decay.ndim == 1 else log_decay[:, 0]
      o, state = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state, log_decay_t=ld, **kw)
      o = o[:, None]
    else:
      o, state = linear_attention(q, k, v, log_decay=log_decay, initial_state=state,
                                  output_final_state=True, form=self.form,
                                  chunk_size=self.chunk_size, **kw)
    self.state.set_value(state)
    return o

  def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
               decode: bool = False) -> jax.Array:
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
  """DeltaNet / Gated DeltaNet [97] layer around `delta_rule`.

  `q, k = l2norm(silu(x W))` per head, `v = silu(x W_v)`, `beta = sigmoid(x W_b)` `[B, T, H]`;
  gated: `log alpha = -exp(A_log) softplus(x W_a + dt_bias)` (Mamba-2 style, as fla's Gated
  DeltaNet); output per-head RMSNorm, then a swish gate `silu(x W_g)` (Gated DeltaNet) or none
  (DeltaNet), then `W_o`. `x [B, T, d_model] -> [B, T, d_model]`, head dim `d_model / H`.
  """

  def __init__(self, d_model: int, num_heads: int, *, causal: bool = True, gated: bool = True,
               chunk_size: int = 64, form: str = "chunked", rngs: nnx.Rngs):
    if not causal:
      raise ValueError("deltanet / gated_deltanet are causal recurrences (causal=True)")
    self.h, self.d = num_heads, d_model // num_heads
    self.gated, self.chunk_size, self.form = gated, chunk_size, form
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

  def __call__(self, x, *, segment_ids=None, decode=False):
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
                          form=self.form, chunk_size=self.chunk_size)
      self.state.set_value(s)
    else:
      o, _ = delta_rule(q, k, v, beta, log_decay=ld, segment_ids=segment_ids, form=self.form,
                        chunk_size=self.chunk_size)
    o = self.norm(o).reshape(b, t, self.h * self.d)
    if self.g_proj is not None:
      o = o * jax.nn.silu(self.g_proj(x))
    return self.o_proj(o)


class MALAMixer(nnx.Module, _StateCache):
  """MALA [6] layer: `phi = elu + 1` on `x W_q`, `x W_k`; `mala_attention`; `W_o`.

  Non-causal (vision) or causal with prefix means (see `mala_attention`). The paper's RoPE on
  phi(q), phi(k), LePE depth-wise conv and output gate are vision-block extras not included.
  """

  def __init__(self, d_model: int, num_heads: int, *, causal: bool = True, chunk_size: int = 64,
               form: str = "chunked", rngs: nnx.Rngs):
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

  def __call__(self, x, *, segment_ids=None, decode=False):
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
def _build_lightning(*, d_model, num_heads, causal, rngs, **options):
  return LinearMixer(d_model, num_heads, causal=causal, feature_map="silu", normalize=False,
                     decay="lightning", output_norm=True, output_gate="sigmoid", rngs=rngs, **options)


@register_mixer("transnormer", "TransNormer NormAttention: o = RMSNorm(phi(Q)(phi(K)^T V)), no denominator.")
def _build_transnormer(*, d_model, num_heads, causal, rngs, feature_map: str = "elu", **options):
  return LinearMixer(d_model, num_heads, causal=causal, feature_map=feature_map, normalize=False,
                     output_norm=True, rngs=rngs, **options)


@register_mixer("transnormer_diag", "TransNormer DiagAttention: softmax attention within blocks of 64 tokens.")
def _build_transnormer_diag(*, d_model, num_heads, causal, rngs, block: int = 64, **options):
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=_block_attention(block),
                            rngs=rngs, **options)


@register_mixer("deltanet", "DeltaNet: delta rule with L2-normalised keys (chunked UT form).")
def _build_deltanet(*, d_model, num_heads, causal, rngs, **options):
  return DeltaNetMixer(d_model, num_heads, causal=causal, gated=False, rngs=rngs, **options)


@register_mixer("gated_deltanet", "Gated DeltaNet: delta rule with Mamba-2 style scalar decay, RMSNorm + swish gate.")
def _build_gated_deltanet(*, d_model, num_heads, causal, rngs, **options):
  return DeltaNetMixer(d_model, num_heads, causal=causal, gated=True, rngs=rngs, **options)


@register_mixer("mala", "MALA: magnitude-aware linear attention (elu+1, weights sum to 1).")
def _build_mala(*, d_model, num_heads, causal, rngs, **options):
  return MALAMixer(d_model, num_heads, causal=causal, rngs=rngs, **options)
