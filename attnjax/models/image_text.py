"""`ImageTextLM`: a causal decoder that reads an image as patch tokens, then text tokens.

The LLaVA-style layout in miniature: `[patch_1 .. patch_N, text_1 .. text_T]` in one causal
sequence through a `DecoderLM`'s blocks (any registered mixer), logits at every position. The
image tokens are a linear projection of the patches plus learned positions (RoPE in the
mixers gives positions over the whole sequence too). For the multimodal probes
(`attnjax.analysis.multimodal`): image keys are positions `< num_patches`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.models.decoder import DecoderLM, run_blocks
from attnjax.models.vit import patchify
from attnjax.nn.layers import dense


class ImageTextLM(nnx.Module):
  """`__call__(images [B, H, W, C], tokens [B, T]) -> logits [B, N + T, vocab]`, `N` patches.

  `embed_inputs` and `from_embeddings` split the call, so a probe can drop or edit tokens of the
  joint sequence (SGL pruning) between them.
  """

  def __init__(self, *, image_size: int, patch_size: int, in_channels: int, vocab_size: int,
               d_model: int, num_layers: int, num_heads: int, mixer: str = "softmax",
               mixer_options: dict[str, Any] | None = None, mlp_ratio: float = 4.0,
               max_text_len: int = 64, rngs: nnx.Rngs):
    if image_size % patch_size:
      raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
    self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
    self.grid = (image_size // patch_size,) * 2
    self.num_patches = self.grid[0] * self.grid[1]
    self.lm = DecoderLM(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers,
                        num_heads=num_heads, mixer=mixer, mixer_options=mixer_options,
                        mlp_ratio=mlp_ratio, max_len=self.num_patches + max_text_len, rngs=rngs)
    self.patch = dense(patch_size * patch_size * in_channels, d_model, axes=(None, "embed"),
                       rngs=rngs, use_bias=True)
    self.img_pos = nnx.Param(jax.random.normal(rngs.params(), (self.num_patches, d_model)) * 0.02,
                             logical_axes=(None, "embed"))

  def embed_inputs(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
    """`[B, N + T, d_model]`: patch embeddings, then token embeddings."""
    want = (self.image_size, self.image_size, self.in_channels)
    if images.ndim != 4 or images.shape[1:] != want:
      raise ValueError(f"images must be [B, {want[0]}, {want[1]}, {want[2]}], got shape {images.shape}")
    if tokens.ndim != 2 or tokens.shape[0] != images.shape[0]:
      raise ValueError(f"tokens must be [B, T] with B={images.shape[0]}, got shape {tokens.shape}")
    img = self.patch(patchify(images, self.patch_size)) + self.img_pos[...][None]
    return jnp.concatenate([img, self.lm.embed(tokens).astype(img.dtype)], axis=1)

  def from_embeddings(self, x: jax.Array) -> jax.Array:
    """`[B, T', d_model] -> logits [B, T', vocab]` through the decoder blocks."""
    h = run_blocks(self.lm.blocks, self.lm.depth, x)
    return self.lm.logits(self.lm.final_norm(h))

  def __call__(self, images: jax.Array, tokens: jax.Array) -> jax.Array:
    return self.from_embeddings(self.embed_inputs(images, tokens))
