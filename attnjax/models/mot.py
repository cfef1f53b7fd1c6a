"""Mixture-of-Transformers (Liang et al., 2024, arXiv 2411.04996).

Every non-embedding parameter is untied by modality: each modality has its own query / key / value /
output projections, (optional) QK-norm, feed-forward network and norms, and each token is processed
by the weights of its modality id. One global self-attention (causal by default) runs over all
tokens of the interleaved sequence, so modalities interact only there.

The authors' reference code (facebookresearch/Mixture-of-Transformers,
`src/simple_ModalityUntiedAttention.py`, `src/simple_ModalityUntiedFeedForward.py`) gathers each
modality's tokens (`x[modality_mask]`), projects them and scatters the results back. Here, with
static shapes under `jit`, every modality's projection is computed for every token and the token's
own modality is selected (`jnp.where`), so values and gradients are those of the gather (a token
never touches another modality's weights: their gradient from it is exactly zero) at `M` times
the projection FLOPs. That code applies each modality's norm to the sublayer *output*
(`x + norm_m(attn(x))`, Chameleon's ordering), `norm_position="output"`; the default `"pre"` is
the Llama / `DecoderLM` ordering `x + attn(norm_m(x))` that LlamaFusion builds on.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.layers import Embed, RMSNorm, SwiGLU, dense
from attnjax.ops.rope import apply_rope
from attnjax.ops.softmax import dot_product_attention

NORM_POSITIONS = ("pre", "output")


def select_by_modality(modality: jax.Array, outputs: Sequence[jax.Array]) -> jax.Array:
  """`outputs[m][b, t]` where `modality[b, t] == m`; zeros for an id outside `[0, len(outputs))`.

  `modality [B, T]` int, each output `[B, T, ...]`. `jnp.where` passes no gradient to the
  unselected branch, so modality m's weights get exactly zero gradient from other tokens.
  """
  out = jnp.zeros_like(outputs[0])
  for m, o in enumerate(outputs):
    sel = (modality == m).reshape(modality.shape + (1,) * (o.ndim - 2))
    out = jnp.where(sel, o, out)
  return out


def check_modality(modality: jax.Array, shape: tuple[int, ...]) -> None:
  if modality.shape != tuple(shape) or not jnp.issubdtype(modality.dtype, jnp.integer):
    raise ValueError(f"modality must be an int array of shape [B, T]={tuple(shape)}, got "
                     f"{modality.dtype} {modality.shape}")


class ModalityTower(nnx.Module):
  """One modality's weights of one block: `norm1`, `q/k/v/o_proj`, optional `q_norm`/`k_norm`,
  `norm2` and the SwiGLU `mlp` (named as in `DecoderBlock` / `MultiHeadAttention`)."""

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, hidden: int,
               *, qk_norm: bool, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(d_model)
    self.q_proj = dense(d_model, num_heads * head_dim, axes=("embed", "heads"), rngs=rngs)
    self.k_proj = dense(d_model, num_kv_heads * head_dim, axes=("embed", "kv_heads"), rngs=rngs)
    self.v_proj = dense(d_model, num_kv_heads * head_dim, axes=("embed", "kv_heads"), rngs=rngs)
    self.o_proj = dense(num_heads * head_dim, d_model, axes=("heads", "embed"), rngs=rngs)
    self.q_norm = RMSNorm(head_dim, axis_name="head_dim") if qk_norm else None
    self.k_norm = RMSNorm(head_dim, axis_name="head_dim") if qk_norm else None
    self.norm2 = RMSNorm(d_model)
    self.mlp = SwiGLU(d_model, hidden, rngs=rngs)


class MoTBlock(nnx.Module):
  """One Mixture-of-Transformers block: per-modality towers around one global attention.

  `__call__(x [B, T, d_model], modality [B, T] int) -> [B, T, d_model]`:
  `pre`:    `h = x + O_m(attn(Q_m n1_m(x), K_m n1_m(x), V_m n1_m(x)))`, `y = h + FFN_m(n2_m(h))`;
  `output`: `h = x + n1_m(O_m(attn(Q_m x, K_m x, V_m x)))`,          `y = h + n2_m(FFN_m(h))`;
  with `m = modality[b, t]` per token and the attention over every token of the row.
  """

  def __init__(self, d_model: int, num_heads: int, *, num_modalities: int = 2,
               num_kv_heads: int | None = None, mlp_ratio: float = 4.0, qk_norm: bool = False,
               causal: bool = True, rope_base: float = 10000.0, norm_position: str = "pre",
               rngs: nnx.Rngs):
    if num_modalities < 1:
      raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
    if norm_position not in NORM_POSITIONS:
      raise ValueError(f"norm_position must be one of {NORM_POSITIONS}, got {norm_position!r}")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if d_model % num_heads or num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} must divide d_model={d_model} and be a multiple "
                       f"of num_kv_heads={num_kv_heads}")
    hidden = int(mlp_ratio * d_model)
    if hidden < 1:
      raise ValueError(f"mlp_ratio must give a hidden size >= 1, got {mlp_ratio}")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, d_model // num_heads
    self.causal, self.rope_base, self.norm_position = causal, rope_base, norm_position
    self.towers = nnx.List([
        ModalityTower(d_model, num_heads, num_kv_heads, self.head_dim, hidden, qk_norm=qk_norm,
                      rngs=rngs) for _ in range(num_modalities)])

  def _per_modality(self, modality, fn):
    return select_by_modality(modality, [fn(t) for t in self.towers])

  def __call__(self, x: jax.Array, modality: jax.Array, *,
               segment_ids: jax.Array | None = None) -> jax.Array:
    b, t, _ = x.shape
    pre = self.norm_position == "pre"

    def qkv(tower):
      h = tower.norm1(x) if pre else x
      q = tower.q_proj(h).reshape(b, t, self.num_heads, self.head_dim)
      k = tower.k_proj(h).reshape(b, t, self.num_kv_heads, self.head_dim)
      v = tower.v_proj(h).reshape(b, t, self.num_kv_heads, self.head_dim)
      if tower.q_norm is not None:
        q, k = tower.q_norm(q), tower.k_norm(k)
      return q, k, v

    per = [qkv(tw) for tw in self.towers]
    q, k, v = (select_by_modality(modality, [p[i] for p in per]) for i in range(3))
    pos = jnp.arange(t)
    q, k = apply_rope(q, pos, base=self.rope_base), apply_rope(k, pos, base=self.rope_base)
    o = dot_product_attention(q, k, v, causal=self.causal, q_segment_ids=segment_ids,
                              kv_segment_ids=segment_ids)
    o = o.reshape(b, t, self.num_heads * self.head_dim)
    x = x + self._per_modality(
        modality, (lambda tw: tw.o_proj(o)) if pre else (lambda tw: tw.norm1(tw.o_proj(o))))
    return x + self._per_modality(
        modality, (lambda tw: tw.mlp(tw.norm2(x))) if pre else (lambda tw: tw.norm2(tw.mlp(x))))


class MixtureOfTransformers(nnx.Module):
  """A Mixture-of-Transformers language model over an interleaved multi-modal sequence.

  Token embedding and the tied output head are shared (the paper unties every *non-embedding*
  parameter; in its Chameleon setting images are discrete tokens of one vocabulary); blocks and the
  final norm are per modality. `patch_dim` adds a (per-model) linear input projection for
  continuous image patches, as Transfusion / LlamaFusion feed images: positions whose modality is
  `image_modality` then read `patch_in(patches)` instead of the token embedding.

  * `__call__(tokens [B, T] int, modality [B, T] int, *, patches [B, T, patch_dim] | None)
    -> logits [B, T, vocab]`
  * `hidden(...)` -> `[B, T, d_model]` after the per-modality final norm; `logits(h)`.
  """

  def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               num_modalities: int = 2, num_kv_heads: int | None = None, mlp_ratio: float = 4.0,
               qk_norm: bool = False, causal: bool = True, norm_position: str = "pre",
               patch_dim: int | None = None, image_modality: int = 1, rngs: nnx.Rngs):
    if patch_dim is not None and not 0 <= image_modality < num_modalities:
      raise ValueError(f"image_modality must be in [0, num_modalities={num_modalities}), got "
                       f"{image_modality}")
    self.vocab_size, self.d_model, self.num_modalities = vocab_size, d_model, num_modalities
    self.image_modality = image_modality
    self.embed = Embed(vocab_size, d_model, rngs=rngs)
    self.patch_in = (dense(patch_dim, d_model, axes=(None, "embed"), use_bias=True, rngs=rngs)
                     if patch_dim else None)
    self.blocks = nnx.List([
        MoTBlock(d_model, num_heads, num_modalities=num_modalities, num_kv_heads=num_kv_heads,
                 mlp_ratio=mlp_ratio, qk_norm=qk_norm, causal=causal, norm_position=norm_position,
                 rngs=rngs) for _ in range(num_layers)])
    self.final_norms = nnx.List([RMSNorm(d_model) for _ in range(num_modalities)])

  def embed_inputs(self, tokens: jax.Array, modality: jax.Array,
                   patches: jax.Array | None = None) -> jax.Array:
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    check_modality(modality, tokens.shape)
    x = self.embed(tokens)
    if patches is not None:
      if self.patch_in is None:
        raise ValueError("patches given but the model was built without patch_dim")
      if patches.shape[:2] != tokens.shape or patches.shape[2] != self.patch_in.in_features:
        raise ValueError(f"patches must be [B, T, patch_dim]={tokens.shape + (self.patch_in.in_features,)}, "
                         f"got {patches.shape}")
      x = jnp.where((modality == self.image_modality)[..., None], self.patch_in(patches), x)
    return x

  def hidden(self, tokens, modality, *, patches=None, segment_ids=None) -> jax.Array:
    x = self.embed_inputs(tokens, modality, patches)
    for blk in self.blocks:
      x = blk(x, modality, segment_ids=segment_ids)
    return select_by_modality(modality, [n(x) for n in self.final_norms])

  def logits(self, h: jax.Array) -> jax.Array:
    return self.embed.attend(h)

  def __call__(self, tokens, modality, *, patches=None, segment_ids=None) -> jax.Array:
    return self.logits(self.hidden(tokens, modality, patches=patches, segment_ids=segment_ids))


def load_decoder_into_modality(mot: MixtureOfTransformers, decoder, modality: int, *,
                               embedding: bool = True) -> None:
  """Copies a `DecoderLM`'s weights into modality `modality`'s towers and final norm (and, with
  `embedding=True`, its token embedding), in place.

  The decoder must be the plain Llama-style one this MoT mirrors: softmax mixers (no output gate,
  no short conv, no AttnRes, no learned positions), tied embeddings, the same sizes and a SwiGLU MLP.
  """
  if not 0 <= modality < mot.num_modalities:
    raise ValueError(f"modality must be in [0, {mot.num_modalities}), got {modality}")
  if len(decoder.blocks) != len(mot.blocks):
    raise ValueError(f"decoder has {len(decoder.blocks)} blocks, the MoT {len(mot.blocks)}")
  if decoder.head is not None or decoder.pos is not None or decoder.depth is not None:
    raise ValueError("decoder must have tied embeddings, pos_emb='none' and attn_res=None")
  if embedding:
    mot.embed.embedding[...] = decoder.embed.embedding[...]
  mot.final_norms[modality].scale[...] = decoder.final_norm.scale[...]
  for blk, mblk in zip(decoder.blocks, mot.blocks):
    mix = blk.mixer
    if (blk.conv is not None or blk.mlp is None or getattr(mix, "gate_proj", None) is not None
        or not hasattr(mix, "q_proj") or mix.window is not None or not mix.rope):
      raise ValueError("decoder blocks must be plain softmax attention (RoPE, no window, no gate, "
                       "no short conv) with a SwiGLU MLP")
    if mix.rope_base != mblk.rope_base or mix.causal != mblk.causal or mix.attn_options:
      raise ValueError("decoder's attention (rope_base, causal, attn_options) differs from the MoT's")
    tw = mblk.towers[modality]
    pairs = [(tw.norm1, blk.norm1), (tw.norm2, blk.norm2), (tw.q_proj, mix.q_proj),
             (tw.k_proj, mix.k_proj), (tw.v_proj, mix.v_proj), (tw.o_proj, mix.o_proj),
             (tw.mlp, blk.mlp)]
    if (tw.q_norm is None) != (mix.q_norm is None):
      raise ValueError("decoder's qk_norm differs from the MoT's")
    if tw.q_norm is not None:
      pairs += [(tw.q_norm, mix.q_norm), (tw.k_norm, mix.k_norm)]
    for dst, src in pairs:
      s_src, s_dst = nnx.state(src, nnx.Param), nnx.state(dst, nnx.Param)
      shapes = jax.tree.map(jnp.shape, s_src), jax.tree.map(jnp.shape, s_dst)
      if shapes[0] != shapes[1]:
        raise ValueError(f"decoder and MoT parameter shapes differ: {shapes[0]} vs {shapes[1]}")
      nnx.update(dst, s_src)
