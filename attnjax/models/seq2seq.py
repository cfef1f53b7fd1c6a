"""`EncoderDecoder`: a pre-norm Transformer encoder-decoder (self-, cross-attention, SwiGLU).

Built from the project's pieces: the encoder is `DecoderBlock`s with `causal=False`, the decoder
blocks add a `MultiHeadAttention` cross-attention sublayer (`mixer(x, context=memory)`), so
`attnjax.analysis.capture` sees every layer (select the cross-attention ones by the path
component `"cross"`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.models.decoder import DecoderBlock
from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.layers import Embed, RMSNorm, SwiGLU
from attnjax.registry import build_mixer


class CrossDecoderBlock(nnx.Module):
  """`x + self(norm1(x))`, `x + cross(norm_c(x), context=memory)`, `x + SwiGLU(norm2(x))`.

  The self-attention is any registered causal mixer; the cross-attention is softmax
  `MultiHeadAttention` with `causal=False` and no RoPE (source and target positions differ).
  """

  def __init__(self, d_model: int, num_heads: int, mixer: str, mixer_options: dict[str, Any], *,
               mlp_ratio: float, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(d_model)
    self.mixer = build_mixer(mixer, d_model=d_model, num_heads=num_heads, causal=True, rngs=rngs,
                             **mixer_options)
    self.norm_c = RMSNorm(d_model)
    self.cross = MultiHeadAttention(d_model, num_heads, causal=False, rope=False, rngs=rngs)
    hidden = int(mlp_ratio * d_model)
    self.norm2 = RMSNorm(d_model) if hidden else None
    self.mlp = SwiGLU(d_model, hidden, rngs=rngs) if hidden else None

  def __call__(self, x, memory):
    x = x + self.mixer(self.norm1(x))
    x = x + self.cross(self.norm_c(x), context=memory)
    if self.mlp is not None:
      x = x + self.mlp(self.norm2(x))
    return x


class EncoderDecoder(nnx.Module):
  """Shared token embedding (tied output), encoder, decoder with cross-attention.

  `__call__(src [B, S] int, tgt_in [B, T] int, *, src_scale [B, S] | None) -> logits [B, T, vocab]`.
  `src_scale` multiplies the source embeddings (ones: no change), so `d logit / d src_scale`
  is gradient x input per source token (the saliency the cross-attention probe compares with).
  Positions come from RoPE in the self-attention mixers.
  """

  def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               mixer: str = "softmax", mixer_options: dict[str, Any] | None = None,
               mlp_ratio: float = 4.0, num_encoder_layers: int | None = None, rngs: nnx.Rngs):
    opts = dict(mixer_options or {})
    n_enc = num_layers if num_encoder_layers is None else num_encoder_layers
    self.embed = Embed(vocab_size, d_model, rngs=rngs)
    self.encoder = nnx.List([
        DecoderBlock(d_model, num_heads, mixer, opts, mlp_ratio=mlp_ratio, short_conv=0,
                     causal=False, rngs=rngs, layer_index=i, num_layers=n_enc) for i in range(n_enc)])
    self.enc_norm = RMSNorm(d_model)
    self.decoder = nnx.List([
        CrossDecoderBlock(d_model, num_heads, mixer, opts, mlp_ratio=mlp_ratio, rngs=rngs)
        for _ in range(num_layers)])
    self.final_norm = RMSNorm(d_model)

  def encode(self, src: jax.Array, src_scale: jax.Array | None = None) -> jax.Array:
    """`[B, S] -> [B, S, d_model]` encoder memory."""
    if src.ndim != 2:
      raise ValueError(f"src must be [B, S], got shape {src.shape}")
    x = self.embed(src)
    if src_scale is not None:
      x = x * jnp.asarray(src_scale, x.dtype)[..., None]
    for blk in self.encoder:
      x = blk(x)
    return self.enc_norm(x)

  def __call__(self, src: jax.Array, tgt_in: jax.Array, *, src_scale: jax.Array | None = None):
    if tgt_in.ndim != 2 or tgt_in.shape[0] != src.shape[0]:
      raise ValueError(f"tgt_in must be [B, T] with B={src.shape[0]}, got shape {tgt_in.shape}")
    memory = self.encode(src, src_scale)
    y = self.embed(tgt_in)
    for blk in self.decoder:
      y = blk(y, memory)
    return self.embed.attend(self.final_norm(y))
