"""`MosaicBERT`: a bidirectional post-LN encoder with ALiBi, GeGLU and unpadding (Portes et al.,
2023, arXiv 2312.17482), whose attention is any registered non-causal mixer.

The layout follows the authors' public code (mosaicml/examples, `examples/benchmarks/bert/src/
bert_layers.py` and `bert_padding.py`):

* embeddings: token embedding (no position embedding: ALiBi carries position), then LayerNorm;
* each layer, post-LN as in BERT: `h = LN(x + O(attn(x)))`, then
  `y = LN(h + W_o(gelu(W_g h) * W_ng h))` (GeGLU; `W_g`/`W_ng` are one bias-free
  `[d, 2 * hidden]` matrix, gated half first, exact GELU; `W_o` has a bias);
* ALiBi on the softmax mixer, symmetric for an encoder: `-m_h |i - j|` with the geometric slopes
  `m_h = 2^(-8 h / H)` (`attnjax.ops.alibi_slopes`, the authors' `_get_alibi_head_slopes`);
* MLM head: `dense -> gelu -> LN`, logits tied to the token embedding plus a bias;
* unpadding: the real tokens of the batch are gathered into one packed row `[1, P]`, every layer
  (embedding, attention, MLP, LN) runs on those P tokens only, and attention sees each sequence
  through segment ids (the authors pad back around a padded attention kernel; here attention runs
  on the packed row too, which the packed layout keeps exact: positions inside a sequence stay
  contiguous, so ALiBi distances are unchanged). Outputs are scattered back to `[B, T]`, zeros at
  pads. P (`packed_len`) is static, as jit needs; the compute saving is `B * T / P`.
* low-precision LayerNorm (`ln_dtype="bfloat16"`): LN on bf16 inputs, weights and outputs, as
  Composer's LowPrecisionLayerNorm runs it under the authors' amp_bf16 recipe (see `LayerNorm`).

Deviations, on purpose: the q/k/v/o projections are the library's mixers' (bias-free); no
token-type embedding (single-segment MLM) and no dropout.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.layers import dense
from attnjax.ops.softmax import alibi_slopes, dot_product_attention
from attnjax.registry import build_mixer

LN_DTYPES = ("float32", "bfloat16")
_INIT = nnx.initializers.normal(0.02)  # BERT's initializer_range


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, `(x - mean) / sqrt(var + eps) * scale + bias`.

  `compute_dtype="float32"`: in float32. `"bfloat16"`: low-precision LN as Composer's
  LowPrecisionLayerNorm runs it (PyTorch's `layer_norm` on bf16 tensors with autocast off): input,
  scale and bias rounded to bf16, statistics accumulated in float32 inside the kernel, output
  rounded to bf16. Returns x's dtype.
  """

  def __init__(self, dim: int, *, eps: float = 1e-12, compute_dtype: str = "float32"):
    if compute_dtype not in LN_DTYPES:
      raise ValueError(f"compute_dtype must be one of {LN_DTYPES}, got {compute_dtype!r}")
    self.eps, self.compute_dtype = eps, compute_dtype
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("embed",))
    self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    low = self.compute_dtype == "bfloat16"
    rnd = (lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)) if low else (lambda a: a.astype(jnp.float32))
    xf, w, b = rnd(x), rnd(self.scale[...]), rnd(self.bias[...])
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * w + b
    return (y.astype(jnp.bfloat16) if low else y).astype(x.dtype)


class GeGLU(nnx.Module):
  """`W_o(gelu(x W_g) * (x W_ng)) + b_o`, `x: [..., d] -> [..., d]` (exact GELU, gated half first)."""

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
    self.hidden = hidden
    self.gated = dense(d_model, 2 * hidden, axes=("embed", "mlp"), rngs=rngs, kernel_init=_INIT)
    self.out = dense(hidden, d_model, axes=("mlp", "embed"), rngs=rngs, use_bias=True, kernel_init=_INIT)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.gated(x)
    return self.out(jax.nn.gelu(h[..., :self.hidden], approximate=False) * h[..., self.hidden:])


def _alibi_attn_fn(slopes: tuple[float, ...]):
  """`dot_product_attention` with symmetric ALiBi (`-m_h |i - j|`, non-causal) added."""
  def attn(q, k, v, **kw):
    return dot_product_attention(q, k, v, alibi_slopes=jnp.asarray(slopes, jnp.float32), **kw)
  return attn


class MosaicBertLayer(nnx.Module):
  """`h = LN(x + mixer(x))`, `y = LN(h + GeGLU(h))` on `[B, T, d]` with `segment_ids [B, T]`."""

  def __init__(self, d_model: int, num_heads: int, mixer: str, mixer_options: dict[str, Any], *,
               hidden: int, ln_dtype: str, rngs: nnx.Rngs, layer_index: int, num_layers: int):
    self.attn = build_mixer(mixer, d_model=d_model, num_heads=num_heads, causal=False, rngs=rngs,
                            layer_index=layer_index, num_layers=num_layers, **mixer_options)
    self.ln1 = LayerNorm(d_model, compute_dtype=ln_dtype)
    self.mlp = GeGLU(d_model, hidden, rngs=rngs)
    self.ln2 = LayerNorm(d_model, compute_dtype=ln_dtype)

  def __call__(self, x: jax.Array, segment_ids: jax.Array) -> jax.Array:
    h = self.ln1(x + self.attn(x, segment_ids=segment_ids))
    return self.ln2(h + self.mlp(h))


def unpad_indices(attention_mask: jax.Array, packed_len: int):
  """Where the real tokens of `attention_mask [B, T]` (True = real) go in a packed row of
  `packed_len` slots: `(indices [P] int32 into the flattened B*T tokens, B*T for an empty slot;
  segment_ids [1, P]: row b's tokens get b + 1, empty slots 0)`. Row-major, so each sequence stays
  contiguous and in order. Tokens beyond `packed_len` are dropped: size P to the batch's budget."""
  b, t = attention_mask.shape
  idx = jnp.nonzero(attention_mask.reshape(-1), size=packed_len, fill_value=b * t)[0].astype(jnp.int32)
  seg = jnp.where(idx < b * t, idx // t + 1, 0).astype(jnp.int32)
  return idx, seg[None]


def pad_back(packed: jax.Array, indices: jax.Array, batch: int, seq_len: int) -> jax.Array:
  """Scatters `packed [1, P, ...]` back to `[B, T, ...]` (zeros where no token was packed)."""
  rest = packed.shape[2:]
  buf = jnp.zeros((batch * seq_len + 1, *rest), packed.dtype)  # the extra row takes empty slots
  return buf.at[indices].set(packed[0])[:-1].reshape(batch, seq_len, *rest)


class MosaicBERT(nnx.Module):
  """MosaicBERT encoder with an MLM head.

  `__call__(tokens [B, T] int, attention_mask [B, T] bool | None) -> logits [B, T, vocab]`
  (zeros at pads); `hidden(...) -> [B, T, d_model]`. `packed_len=None` runs the padded batch with
  pads hidden from real tokens by segment ids (padded + masked); `packed_len=P` unpads (see the
  module docstring), and must be >= the number of real tokens in any batch.

  `mixer` / `mixer_options`: any registered mixer with a non-causal pattern, built with
  `causal=False`. `alibi=None` means ALiBi on for `mixer="softmax"` (which is then built with
  `rope=False`) and off for other mixers, whose own position handling applies; `alibi=True` with
  another mixer is an error. `mlp_ratio`: GeGLU hidden size / d_model. `ln_dtype`: "float32" or
  "bfloat16" (low-precision LayerNorm).
  """

  def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               mixer: str = "softmax", mixer_options: dict[str, Any] | None = None,
               mlp_ratio: float = 4.0, alibi: bool | None = None, ln_dtype: str = "float32",
               packed_len: int | None = None, rngs: nnx.Rngs):
    if ln_dtype not in LN_DTYPES:
      raise ValueError(f"ln_dtype must be one of {LN_DTYPES}, got {ln_dtype!r}")
    if packed_len is not None and packed_len < 1:
      raise ValueError(f"packed_len must be None or >= 1, got {packed_len}")
    hidden = int(mlp_ratio * d_model)
    if hidden < 1:
      raise ValueError(f"mlp_ratio={mlp_ratio} gives a GeGLU hidden size < 1 (d_model={d_model})")
    if alibi is None:
      alibi = mixer == "softmax"
    if alibi and mixer != "softmax":
      raise ValueError(f"alibi=True needs mixer='softmax' (ALiBi is a softmax-score bias), got {mixer!r}")
    opts = dict(mixer_options or {})
    if alibi:
      if "attn_fn" in opts:
        raise ValueError("mixer_options.attn_fn conflicts with alibi=True")
      opts.setdefault("rope", False)
      opts["attn_fn"] = _alibi_attn_fn(tuple(float(s) for s in alibi_slopes(num_heads)))
    self.vocab_size, self.packed_len, self.alibi = vocab_size, packed_len, bool(alibi)
    self.embedding = nnx.Param(_INIT(rngs.params(), (vocab_size, d_model)), logical_axes=("vocab", "embed"))
    self.emb_ln = LayerNorm(d_model, compute_dtype=ln_dtype)
    self.layers = nnx.List([
        MosaicBertLayer(d_model, num_heads, mixer, opts, hidden=hidden, ln_dtype=ln_dtype, rngs=rngs,
                        layer_index=i, num_layers=num_layers) for i in range(num_layers)])
    self.head = dense(d_model, d_model, axes=("embed", "embed"), rngs=rngs, use_bias=True, kernel_init=_INIT)
    self.head_ln = LayerNorm(d_model, compute_dtype=ln_dtype)
    self.head_bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32), logical_axes=("vocab",))

  def _encode(self, tokens, segment_ids):
    x = self.emb_ln(jnp.take(self.embedding[...], tokens, axis=0))
    for layer in self.layers:
      x = layer(x, segment_ids)
    return x

  def _logits(self, x):
    h = self.head_ln(jax.nn.gelu(self.head(x), approximate=False))
    return h @ self.embedding[...].T + self.head_bias[...]

  def _run(self, tokens, attention_mask, head: bool):
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    b, t = tokens.shape
    mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if mask.shape != (b, t):
      raise ValueError(f"attention_mask must be [B, T] = {(b, t)}, got shape {mask.shape}")
    if self.packed_len is None:
      x = self._encode(tokens, mask.astype(jnp.int32))  # pads form their own segment 0
      out = self._logits(x) if head else x
      return jnp.where(mask[..., None], out, 0)
    idx, seg = unpad_indices(mask, self.packed_len)
    packed_tokens = jnp.take(tokens.reshape(-1), jnp.minimum(idx, b * t - 1))[None]
    x = self._encode(packed_tokens, seg)
    return pad_back(self._logits(x) if head else x, idx, b, t)

  def hidden(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    return self._run(tokens, attention_mask, head=False)

  def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    return self._run(tokens, attention_mask, head=True)
