"""Controlled attention variants that change where the attention *weights* come from.

Xue, Moosavi & Aletras 2025, "Deconstructing Attention: Investigating Design Principles for
Effective Language Modeling" (arXiv 2510.11602). Standard attention couples its queries and keys to
the evolving hidden state of the layer: `A = softmax(mask(Q K^T / sqrt(d)))` with `Q = h W_q`,
`K = h W_k`, and `y = A (h W_v) W_o`. The variants keep values, output projection and softmax as
they are and change only the source of `Q` and `K`:

* `static_emb_qk` (StaticEmbQK): `Q, K` from the *layer-0 token embeddings* `e` (the input
  embeddings, before any block), so the weights depend on the tokens but not on this layer's
  state. Needs `qk_input=e` from the backbone (`DecoderLM` passes it).
* `rnd_emb_qk` (RndEmbQK): `Q, K` from *fixed random* token embeddings `r = R[tokens]` (`R` drawn
  once, never trained; owned by `DecoderLM`, which passes `qk_input=r`).
* `fixed_seq_qk` (FixedSeqQK): `Q, K` are learned per-position vectors `P_q[t], P_k[t]`: the
  weights are the same for every input sequence (sequence-independent), a learned causal
  (or full) mixing matrix per head.

Any of them can be a whole model (`mixer="static_emb_qk"`) or interleaved with standard layers
(`model.layer_mixers="softmax,static_emb_qk,softmax,static_emb_qk"`), the paper's uniform and
hybrid settings.

Reading: the paper's text could not be consulted here (abstract and summaries only), so the
variants are the most direct reading of its names and of the principle each relaxes. Choices that
reading leaves open, made here: `qk_input` goes through this layer's own RMSNorm before `W_q`,
`W_k` (as `h` does before entering a pre-norm block); RoPE rotates `Q`, `K` of the token-based
variants as in `softmax` (so only the weight source differs from the repository's standard
layer), and not for `fixed_seq_qk` (its queries and keys are positions already). The paper's
"approximate / non-approximate" alternative mathematical forms are not implemented (their
formulas were not available).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.layers import RMSNorm, dense
from attnjax.ops.rope import apply_rope
from attnjax.ops.softmax import dot_product_attention
from attnjax.registry import register_mixer

QK_SOURCES = ("hidden", "static", "random", "positions")


class DeconstructedAttention(nnx.Module):
  """Softmax attention whose queries and keys come from `qk_source` (see the module docstring).

  `__call__(x [B, T, d_model], *, qk_input [B, T, d_model] | None, segment_ids [B, T] | None)
  -> [B, T, d_model]`; values always come from `x`. `qk_input` is required for the `static` and
  `random` sources (the backbone's layer-0 or fixed random token embeddings) and refused for the
  others. `"hidden"` is standard attention (`qk_input` unused) and exists as the control the
  variants are measured against. `max_len`: positions `P_q, P_k` kept by `"positions"`.
  """

  def __init__(self, d_model: int, num_heads: int, *, causal: bool, rngs: nnx.Rngs,
               qk_source: str = "hidden", max_len: int = 512, rope_base: float = 10000.0):
    if qk_source not in QK_SOURCES:
      raise ValueError(f"qk_source must be one of {QK_SOURCES}, got {qk_source!r}")
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
    self.d_model, self.h, self.hd = d_model, num_heads, d_model // num_heads
    self.causal, self.qk_source, self.max_len, self.rope_base = causal, qk_source, max_len, rope_base
    self.v = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.o = dense(d_model, d_model, axes=("heads", "embed"), rngs=rngs)
    if qk_source == "positions":
      init = lambda: jax.random.normal(rngs.params(), (max_len, d_model)) * d_model ** -0.5
      self.pos_q = nnx.Param(init(), logical_axes=(None, "heads"))
      self.pos_k = nnx.Param(init(), logical_axes=(None, "heads"))
    else:
      self.qk_norm = RMSNorm(d_model) if qk_source in ("static", "random") else None
      self.q = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
      self.k = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)

  @property
  def needs_qk_input(self) -> bool:
    return self.qk_source in ("static", "random")

  def queries_keys(self, x, qk_input=None, segment_ids=None):
    """`(q, k)`, each `[B or 1, T, H, D]`, from this layer's weight source."""
    b, t, _ = x.shape
    if self.qk_source == "positions":
      if t > self.max_len:
        raise ValueError(f"{self.name}: {t} tokens exceed mixer_options.max_len={self.max_len}")
      if segment_ids is None:
        pos = jnp.arange(t)[None]
      else:   # packed sequences: each segment's positions start at 0 (contiguous segments)
        idx = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
        start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                                 segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        pos = idx - jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
      q = jnp.take(self.pos_q[...], pos, axis=0).reshape(pos.shape[0], t, self.h, self.hd)
      k = jnp.take(self.pos_k[...], pos, axis=0).reshape(pos.shape[0], t, self.h, self.hd)
      return q, k
    src = x
    if self.needs_qk_input:
      src = self.qk_norm(qk_input)
    q = self.q(src).reshape(b, t, self.h, self.hd)
    k = self.k(src).reshape(b, t, self.h, self.hd)
    pos = jnp.arange(t)
    return apply_rope(q, pos, base=self.rope_base), apply_rope(k, pos, base=self.rope_base)

  @property
  def name(self) -> str:
    return {"hidden": "deconstructed(hidden)", "static": "static_emb_qk", "random": "rnd_emb_qk",
            "positions": "fixed_seq_qk"}[self.qk_source]

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> None:
    raise NotImplementedError(f"{self.name}: token-by-token decoding is not implemented")

  def __call__(self, x, *, qk_input=None, segment_ids=None, decode=False):
    if decode:
      raise NotImplementedError(f"{self.name}: token-by-token decoding is not implemented")
    if x.ndim != 3 or x.shape[-1] != self.d_model:
      raise ValueError(f"{self.name}: x must be [B, T, d_model={self.d_model}], got {x.shape}")
    if self.needs_qk_input:
      if qk_input is None or qk_input.shape != x.shape:
        got = None if qk_input is None else qk_input.shape
        raise ValueError(f"{self.name}: needs qk_input [B, T, d_model] = {x.shape} (the "
                         f"{'layer-0' if self.qk_source == 'static' else 'fixed random'} token "
                         f"embeddings, passed by DecoderLM), got {got}")
    elif qk_input is not None:
      raise ValueError(f"{self.name}: takes no qk_input (queries and keys come from "
                       f"{'x' if self.qk_source == 'hidden' else 'learned positions'})")
    b, t, _ = x.shape
    q, k = self.queries_keys(x, qk_input, segment_ids)
    q, k = jnp.broadcast_to(q, (b, t, self.h, self.hd)), jnp.broadcast_to(k, (b, t, self.h, self.hd))
    v = self.v(x).reshape(b, t, self.h, self.hd)
    o = dot_product_attention(q, k, v, causal=self.causal, q_segment_ids=segment_ids,
                              implementation="xla")
    return self.o(o.reshape(b, t, self.d_model))


def _builder(source: str):
  def build(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, **options):
    return DeconstructedAttention(d_model, num_heads, causal=causal, rngs=rngs, qk_source=source,
                                  **options)
  build.__name__ = f"build_{source}_qk"
  return build


register_mixer("static_emb_qk", "StaticEmbQK (arXiv 2510.11602): Q, K from the layer-0 token "
               "embeddings (DecoderLM passes them), V from the hidden state.")(_builder("static"))
register_mixer("rnd_emb_qk", "RndEmbQK (arXiv 2510.11602): Q, K from fixed random token "
               "embeddings (owned by DecoderLM), V from the hidden state.")(_builder("random"))
register_mixer("fixed_seq_qk", "FixedSeqQK (arXiv 2510.11602): sequence-independent weights "
               "softmax(P_q P_k^T) from learned positions (max_len option).")(_builder("positions"))
