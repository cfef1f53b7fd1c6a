"""`MultiHeadAttention`: the NNX layer that owns the projections around any attention function.

Registered mixers here: `softmax` (full causal / bidirectional softmax attention) and
`sliding_window` (softmax over the last `window` keys). Other families register theirs in
their own `attnjax/nn/<family>.py`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.layers import RMSNorm, dense
from attnjax.ops import masks as masks_lib
from attnjax.ops.rope import ROPE_STYLES, apply_rope
from attnjax.ops.softmax import dot_product_attention
from attnjax.registry import register_mixer

AttnFn = Callable[..., jax.Array]

# What `MultiHeadAttention.capture` may name (see its docstring); sown as nnx.Intermediate.
CAPTURE_KINDS = ("weights", "scores", "key_mass", "head_outputs", "values", "queries", "keys",
                 "inputs", "perturb_weights")
# attn_options the explicit-weights path reproduces (the rest change the weights' definition).
_EXPLICIT_OPTIONS = ("scale", "softcap", "sinks", "implementation", "block_size",
                     "query_block_size")
_KEY_MASS_CHUNK = 128


class HeadScale(nnx.Variable):
  """Per-head multipliers `[H]` on a `MultiHeadAttention`'s per-head outputs (ablation, VHR)."""


class MultiHeadAttention(nnx.Module):
  """Multi-head attention with any attention function ("mixer") from `attnjax.ops`.

  `__call__(x [B, T, d_model], *, context [B, S, d_model] | None, segment_ids [B, T] | None,
  context_segment_ids [B, S] | None, decode: bool) -> [B, T, d_model]`.

  * `attn_fn(q [B,T,H,D], k [B,S,Hk,D], v [B,S,Hk,D], *, causal, mask, q_segment_ids,
    kv_segment_ids, **attn_options) -> [B,T,H,D]`; defaults to softmax `dot_product_attention`.
  * GQA / MQA with `num_kv_heads`; RoPE on self-attention (`rope=True`, `rope_base`, `rope_style`
    `"half"` (rotate-half, LLaMA / Hugging Face) or `"interleaved"`, see `attnjax.ops.rope`;
    `rope_inv_freq [head_dim // 2]` overrides the frequencies `rope_base` gives);
    QK-norm (RMSNorm over head_dim on q and k, before RoPE, eps `qk_norm_eps`) with `qk_norm=True`.
  * `qkv_bias` / `out_bias`: biases on the q, k, v projections (Qwen2, ViT) / on `o_proj` (ViT).
  * `window`: causal sliding window of `window` keys before the query (plus the query itself).
  * `output_gate`: `None`, `"headwise"` (one sigmoid gate per head and token) or `"elementwise"`
    (one per output channel), applied to the attention output before the output projection
    (gated attention, Qiu et al. (Qiu et al. 2025, arXiv:2505.06708)); gates are computed from `x`.
  * Decoding: `init_cache(batch, max_len)`, then calls with `decode=True` append the new tokens'
    keys/values to the cache and attend to every cached position <= their own. A prefill of T
    tokens followed by one-token steps equals the full causal forward.

  Probing (all off by default; the default program is unchanged and never forms `[T, T]`):
  * `capture`: a tuple of `CAPTURE_KINDS`, sown with `self.sow(nnx.Intermediate, kind, ...)`
    and collected by `nnx.capture(fn, nnx.Intermediate)` (`attnjax.analysis.capture`):
    `weights [B, H, Tq, Tk]` (float32 softmax weights), `scores [B, H, Tq, Tk]` (pre-softmax
    logits, -inf where hidden), `key_mass [B, H, Tk]` (attention each key receives, summed over
    queries, streamed over query chunks of 128 from the kernel's log-sum-exp, so long sequences
    need not materialise `T^2`), `head_outputs [B, Tq, H, D]` (after the output gate, before
    `head_scale`), `values` / `keys` `[B, Tk, Hk, D]` (keys after RoPE), `queries [B, Tq, H, D]`,
    `inputs [B, Tq, d_model]`. `perturb_weights` routes the weights through
    `self.perturb("attn_weights", ...)` so `nnx.capture(..., init=...)` + grad gives `dL/dA`.
    Asking for weights/scores (or a `weights_transform`) computes the output from the explicit
    weights, which needs the default softmax `attn_fn` (options: scale, softcap, sinks).
  * `weights_transform`: `None` or `fn(A [B, H, Tq, Tk]) -> A'`, applied to the weights before
    they meet the values (ACT calibration, VAR redistribution, LocoRE).
  * `head_scale`: `None` or a `HeadScale` `[H]` multiplying each head's output before `o_proj`
    (0 masks a head: equal to zeroing its rows of `o_proj`).
  """

  def __init__(self, d_model: int, num_heads: int, *, num_kv_heads: int | None = None,
               head_dim: int | None = None, attn_fn: AttnFn | None = None, causal: bool = True,
               qk_norm: bool = False, rope: bool = True, rope_base: float = 10000.0,
               window: int | None = None, output_gate: str | None = None,
               attn_options: dict[str, Any] | None = None, qkv_bias: bool = False,
               out_bias: bool = False, rope_style: str = "half",
               rope_inv_freq: Sequence[float] | None = None, qk_norm_eps: float = 1e-6,
               rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}")
    if head_dim is None:
      if d_model % num_heads:
        raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
      head_dim = d_model // num_heads
    if output_gate not in (None, "headwise", "elementwise"):
      raise ValueError(f"output_gate must be None, 'headwise' or 'elementwise', got {output_gate!r}")
    if rope_style not in ROPE_STYLES:
      raise ValueError(f"rope_style must be one of {ROPE_STYLES}, got {rope_style!r}")
    if window is not None and window < 0:
      raise ValueError(f"window must be >= 0, got {window}")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.causal, self.rope, self.rope_base, self.window = causal, rope, rope_base, window
    self.rope_style = rope_style
    self.rope_inv_freq = None if rope_inv_freq is None else tuple(float(f) for f in rope_inv_freq)
    self.attn_fn = attn_fn or dot_product_attention
    self.attn_options = dict(attn_options or {})
    self.output_gate = output_gate
    self.q_proj = dense(d_model, num_heads * head_dim, axes=("embed", "heads"), rngs=rngs,
                        use_bias=qkv_bias)
    self.k_proj = dense(d_model, num_kv_heads * head_dim, axes=("embed", "kv_heads"), rngs=rngs,
                        use_bias=qkv_bias)
    self.v_proj = dense(d_model, num_kv_heads * head_dim, axes=("embed", "kv_heads"), rngs=rngs,
                        use_bias=qkv_bias)
    self.o_proj = dense(num_heads * head_dim, d_model, axes=("heads", "embed"), rngs=rngs,
                        use_bias=out_bias)
    self.q_norm = RMSNorm(head_dim, eps=qk_norm_eps, axis_name="head_dim") if qk_norm else None
    self.k_norm = RMSNorm(head_dim, eps=qk_norm_eps, axis_name="head_dim") if qk_norm else None
    if output_gate is not None:
      n_gates = num_heads if output_gate == "headwise" else num_heads * head_dim
      self.gate_proj = dense(d_model, n_gates, axes=("embed", "heads"), rngs=rngs, use_bias=True)
    else:
      self.gate_proj = None
    self.cache_k = nnx.data(None)  # nnx.Cache arrays once init_cache() runs
    self.cache_v = nnx.data(None)
    self.cache_index = nnx.data(None)
    self.capture: tuple[str, ...] = ()
    self.weights_transform: Callable[[jax.Array], jax.Array] | None = None
    self.head_scale = nnx.data(None)  # a HeadScale [H] once set from outside

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> None:
    shape = (batch_size, max_len, self.num_kv_heads, self.head_dim)
    self.cache_k = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_v = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))

  def state_size(self, seq_len: int) -> int:
    """Floats a decoder keeps per sequence after `seq_len` tokens: the K/V it must remember."""
    kept = seq_len if self.window is None else min(seq_len, self.window + 1)
    return 2 * kept * self.num_kv_heads * self.head_dim

  def _heads(self, y: jax.Array, n: int) -> jax.Array:
    return y.reshape(*y.shape[:-1], n, self.head_dim)

  def __call__(self, x: jax.Array, *, context: jax.Array | None = None,
               segment_ids: jax.Array | None = None, context_segment_ids: jax.Array | None = None,
               decode: bool = False) -> jax.Array:
    if x.ndim != 3:
      raise ValueError(f"x must be [B, T, d_model], got shape {x.shape}")
    b, t, _ = x.shape
    src = x if context is None else context
    q = self._heads(self.q_proj(x), self.num_heads)
    k = self._heads(self.k_proj(src), self.num_kv_heads)
    v = self._heads(self.v_proj(src), self.num_kv_heads)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)

    if decode:
      if context is not None:
        raise NotImplementedError("MultiHeadAttention: decode=True is for self-attention only")
      if self.cache_k is None:
        raise ValueError("MultiHeadAttention: call init_cache(batch_size, max_len) before decode=True")
      start = self.cache_index[...]
      max_len = self.cache_k.shape[1]
      q_pos = start + jnp.arange(t)
      if self.rope:
        q = apply_rope(q, q_pos, base=self.rope_base, style=self.rope_style,
                       inv_freq=self.rope_inv_freq)
        k = apply_rope(k, q_pos, base=self.rope_base, style=self.rope_style,
                       inv_freq=self.rope_inv_freq)
      self.cache_k[...] = jax.lax.dynamic_update_slice_in_dim(
          self.cache_k[...], k.astype(self.cache_k.dtype), start, axis=1)
      self.cache_v[...] = jax.lax.dynamic_update_slice_in_dim(
          self.cache_v[...], v.astype(self.cache_v.dtype), start, axis=1)
      self.cache_index[...] = start + t
      k_pos = jnp.arange(max_len)
      mask = k_pos[None, :] <= q_pos[:, None]
      if self.window is not None:
        mask &= k_pos[None, :] >= q_pos[:, None] - self.window
      k_all = self.cache_k[...].astype(q.dtype)
      v_all = self.cache_v[...].astype(q.dtype)
      rules = dict(causal=False, mask=mask[None, None])
      o = self._attend(q, k_all, v_all, rules, x) if self.capture or self.weights_transform \
          else self.attn_fn(q, k_all, v_all, causal=False, mask=mask[None, None], **self.attn_options)
    else:
      if self.rope and context is None:
        pos = jnp.arange(t)
        q = apply_rope(q, pos, base=self.rope_base, style=self.rope_style,
                       inv_freq=self.rope_inv_freq)
        k = apply_rope(k, pos, base=self.rope_base, style=self.rope_style,
                       inv_freq=self.rope_inv_freq)
      kv_seg = segment_ids if context is None else context_segment_ids
      if (segment_ids is None) != (kv_seg is None):
        raise ValueError("segment_ids and context_segment_ids must be given together for cross attention")
      extra = {}
      if self.window is not None:
        extra["window"] = (self.window, 0 if self.causal else self.window)
      if self.capture or self.weights_transform is not None:
        rules = dict(causal=self.causal, q_segment_ids=segment_ids, kv_segment_ids=kv_seg, **extra)
        o = self._attend(q, k, v, rules, x)
      else:
        o = self.attn_fn(q, k, v, causal=self.causal, q_segment_ids=segment_ids,
                         kv_segment_ids=kv_seg, **extra, **self.attn_options)

    if self.gate_proj is not None:
      g = jax.nn.sigmoid(self.gate_proj(x).astype(jnp.float32))
      g = g[..., None] if self.output_gate == "headwise" else g.reshape(b, t, self.num_heads, self.head_dim)
      o = (o.astype(jnp.float32) * g).astype(o.dtype)
    if "head_outputs" in self.capture:
      self.sow(nnx.Intermediate, "head_outputs", o, capture_noop=True)
    if self.head_scale is not None:
      o = (o * self.head_scale[...].astype(o.dtype)[:, None]).astype(o.dtype)
    return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim))

  # --- probing path (only traced when `capture` or `weights_transform` is set) ---------------

  def _check_probe_options(self, what: str) -> None:
    if self.attn_fn is not dot_product_attention:
      raise ValueError(f"MultiHeadAttention: capturing {what} needs the default softmax attn_fn "
                       f"(dot_product_attention), got {getattr(self.attn_fn, '__name__', self.attn_fn)!r}")
    extra = sorted(set(self.attn_options) - set(_EXPLICIT_OPTIONS))
    if extra:
      raise ValueError(f"MultiHeadAttention: capturing {what} supports attn_options "
                       f"{_EXPLICIT_OPTIONS}, got {extra}")

  def _logits(self, q, k, rules, rows=None):
    """Float32 scores `[B, H, Tq|len(rows), Tk]` and visibility, as `dot_product_attention` forms them."""
    tq, tk = q.shape[1], k.shape[1]
    if rows is not None:
      q = q[:, rows]
    scale = self.attn_options.get("scale") or self.head_dim ** -0.5
    kf = jnp.repeat(k.astype(jnp.float32), self.num_heads // self.num_kv_heads, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kf,
                   precision=jax.lax.Precision.HIGHEST) * scale
    cap = self.attn_options.get("softcap")
    if cap is not None:
      s = cap * jnp.tanh(s / cap)
    rows = jnp.arange(tq) if rows is None else rows
    q_pos = rows[:, None] + (tk - tq)
    k_pos = jnp.arange(tk)[None, :]
    valid = jnp.ones((1, 1, rows.shape[0], tk), bool)
    if rules.get("mask") is not None:
      valid = valid & jnp.broadcast_to(rules["mask"], (1, 1, tq, tk))[:, :, rows]
    if rules.get("causal"):
      valid = valid & (k_pos <= q_pos)
    if rules.get("window") is not None:
      left, right = rules["window"]
      valid = valid & (k_pos >= q_pos - left) & (k_pos <= q_pos + right)
    if rules.get("q_segment_ids") is not None:
      seg = masks_lib.segment_mask(rules["q_segment_ids"][:, rows], rules["kv_segment_ids"])
      valid = valid & seg[:, None]
    return jnp.where(valid, s, -jnp.inf), valid

  def _softmax(self, s, valid):
    m = jnp.max(s, axis=-1, keepdims=True)
    sinks = self.attn_options.get("sinks")
    if sinks is not None:
      sink = jnp.asarray(sinks, jnp.float32)[None, :, None, None]
      m = jnp.maximum(m, sink)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(valid, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    if sinks is not None:
      l = l + jnp.exp(sink - m)
    return p / jnp.where(l > 0, l, 1.0)

  def _key_mass(self, q, k, lse, rules):
    """Sum over queries of the weights each key receives, `[B, H, Tk]`, in query chunks."""
    tq = q.shape[1]
    c = min(_KEY_MASS_CHUNK, tq)
    n = -(-tq // c)

    def chunk(i):
      rows = jnp.minimum(i * c + jnp.arange(c), tq - 1)
      s, valid = self._logits(q, k, rules, rows)
      lse_c = jnp.take(lse, rows, axis=2)[..., None]
      keep = (i * c + jnp.arange(c) < tq)[None, None, :, None] & valid & jnp.isfinite(lse_c)
      return jnp.sum(jnp.where(keep, jnp.exp(s - jnp.where(keep, lse_c, 0.0)), 0.0), axis=2)

    return jnp.sum(jax.lax.map(chunk, jnp.arange(n)), axis=0)

  def _attend(self, q, k, v, rules, x):
    """The attention call with the requested captures (and weights transform)."""
    cap = set(self.capture)
    unknown = sorted(cap - set(CAPTURE_KINDS))
    if unknown:
      raise ValueError(f"MultiHeadAttention.capture: unknown kinds {unknown}; expected some of {CAPTURE_KINDS}")
    for kind, val in (("inputs", x), ("queries", q), ("keys", k), ("values", v)):
      if kind in cap:
        self.sow(nnx.Intermediate, kind, val, capture_noop=True)
    explicit = bool(cap & {"weights", "scores", "perturb_weights"}) or self.weights_transform is not None
    if not explicit:
      if "key_mass" not in cap:
        return self.attn_fn(q, k, v, **rules, **self.attn_options)
      self._check_probe_options("key_mass")
      o, lse = self.attn_fn(q, k, v, **rules, return_lse=True, **self.attn_options)
      self.sow(nnx.Intermediate, "key_mass", self._key_mass(q, k, lse, rules), capture_noop=True)
      return o
    self._check_probe_options("attention weights")
    s, valid = self._logits(q, k, rules)
    a = self._softmax(s, valid)
    if self.weights_transform is not None:
      a = self.weights_transform(a)
    if "perturb_weights" in cap:
      a = self.perturb("attn_weights", a, capture_noop=True)
    if "scores" in cap:
      self.sow(nnx.Intermediate, "scores", s, capture_noop=True)
    if "weights" in cap:
      self.sow(nnx.Intermediate, "weights", a, capture_noop=True)
    if "key_mass" in cap:
      self.sow(nnx.Intermediate, "key_mass", jnp.sum(a, axis=2), capture_noop=True)
    vf = jnp.repeat(v.astype(jnp.float32), self.num_heads // self.num_kv_heads, axis=2)
    o = jnp.einsum("bhqk,bkhd->bqhd", a, vf, precision=jax.lax.Precision.HIGHEST)
    return o.astype(q.dtype)


@register_mixer("softmax", "Softmax multi-head attention (RoPE; GQA, QK-norm, output gate options).")
def _build_softmax(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                   **options: Any) -> MultiHeadAttention:
  return MultiHeadAttention(d_model, num_heads, causal=causal, rngs=rngs, **options)


@register_mixer("sliding_window", "Softmax attention over a local window (default 16 keys back).")
def _build_sliding_window(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                          window: int = 16, **options: Any) -> MultiHeadAttention:
  return MultiHeadAttention(d_model, num_heads, causal=causal, window=window, rngs=rngs, **options)
