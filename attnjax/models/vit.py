"""`ViT`: a Vision Transformer whose token mixer is any registered (non-causal) mixer."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.models.decoder import (DecoderBlock, _per_layer, build_depth_attention, check_attn_res,
                                     run_blocks)
from attnjax.nn.layers import dense, make_norm
from attnjax.nn.operators import EfficientProbe, LowRankAttentionPooling


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """`[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C]`, patches in row-major order (`p = patch_size`)."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class ViT(nnx.Module):
  """Patch embedding, learned positions, `num_layers` pre-norm blocks, then a classifier.

  `__call__(images [B, H, W, C]) -> logits [B, num_classes]`. `pool="cls"` prepends a class token
  and classifies from it; `pool="mean"` averages the patch tokens; `pool="ep"` (EP attentive
  probe (Psomas et al. 2025, arXiv:2506.10178): learned queries, `pool_options` `num_queries` (default 4) and `d_out` (1)) and
  `pool="lama"` (LAMA low-rank attention pooling (Mehta et al. 2019, arXiv:1912.00835): `rank`, `num_heads`) pool the patch tokens
  with attention, and the classifier reads their output. Mixers are built with
  `causal=False`; `mixer` / `mixer_options` may be per layer, as in `DecoderLM` (and block i's mixer gets
  `layer_index=i`, `num_layers` the same way). `attn_res` /
  `attn_res_block_size`: Attention Residuals (Kimi Team 2026, arXiv:2603.15031; Luo et al. 2026, arXiv:2605.18855) instead of the residual sum, as in `DecoderLM`.
  `norm` / `norm_eps` / `mlp` / `mlp_hidden`: the blocks' (and final) norms and MLP, as in
  `DecoderLM` (defaults RMSNorm and SwiGLU). `distill_token=True` (with `pool="cls"`) adds DeiT's
  distillation token (Touvron et al., 2021, arXiv:2012.12877) after the class token, with its own
  classifier `dist_classifier` on it; the logits are the mean of the two heads, DeiT's inference rule.
  Token order is `[cls, dist, patches...]`, and `pos` covers all of them.
  """

  def __init__(self, *, image_size: int | tuple[int, int], patch_size: int, num_classes: int,
               d_model: int, num_layers: int, num_heads: int, in_channels: int = 3,
               mixer: str | Sequence[str] = "softmax",
               mixer_options: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
               mlp_ratio: float = 4.0, pool: str = "cls", attn_res: str | None = None,
               attn_res_block_size: int = 1, pool_options: dict[str, Any] | None = None,
               norm: str = "rmsnorm", norm_eps: float = 1e-6, mlp: str = "swiglu",
               mlp_hidden: int | None = None, distill_token: bool = False, rngs: nnx.Rngs):
    check_attn_res(attn_res, attn_res_block_size)
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if hw[0] % patch_size or hw[1] % patch_size:
      raise ValueError(f"image_size {hw} must be divisible by patch_size={patch_size}")
    if pool not in ("cls", "mean", "ep", "lama"):
      raise ValueError(f"pool must be 'cls', 'mean', 'ep' or 'lama', got {pool!r}")
    if pool_options and pool not in ("ep", "lama"):
      raise ValueError(f"pool_options are for pool='ep' or 'lama', got pool={pool!r}")
    if distill_token and pool != "cls":
      raise ValueError(f"distill_token needs pool='cls', got pool={pool!r}")
    self.image_size, self.patch_size, self.in_channels, self.pool = hw, patch_size, in_channels, pool
    self.grid = (hw[0] // patch_size, hw[1] // patch_size)
    n_tokens = self.grid[0] * self.grid[1] + (pool == "cls") + bool(distill_token)
    self.patch = dense(patch_size * patch_size * in_channels, d_model, axes=(None, "embed"),
                       rngs=rngs, use_bias=True)
    self.pos = nnx.Param(jax.random.normal(rngs.params(), (n_tokens, d_model)) * 0.02,
                         logical_axes=(None, "embed"))
    self.cls = nnx.Param(jnp.zeros((1, 1, d_model)), logical_axes=(None, None, "embed")) if pool == "cls" else None
    self.dist = (nnx.Param(jnp.zeros((1, 1, d_model)), logical_axes=(None, None, "embed"))
                 if distill_token else None)
    mixers = _per_layer(mixer, num_layers, "mixer")
    options = _per_layer(dict(mixer_options or {}) if not isinstance(mixer_options, (list, tuple))
                         else mixer_options, num_layers, "mixer_options")
    self.blocks = nnx.List([
        DecoderBlock(d_model, num_heads, m, o, mlp_ratio=mlp_ratio, short_conv=0, causal=False,
                     rngs=rngs, layer_index=i, num_layers=num_layers, norm=norm, norm_eps=norm_eps,
                     mlp=mlp, mlp_hidden=mlp_hidden)
        for i, (m, o) in enumerate(zip(mixers, options))])
    self.depth = build_depth_attention(attn_res, attn_res_block_size, d_model, self.blocks)
    self.norm = make_norm(norm, d_model, eps=norm_eps)
    pool_options = dict(pool_options or {})
    pooler, pooled = None, d_model
    if pool == "ep":
      pool_options.setdefault("num_queries", 4)
      pooler = EfficientProbe(d_model, rngs=rngs, **pool_options)
      pooled = d_model // pool_options.get("d_out", 1)
    elif pool == "lama":
      pooler = LowRankAttentionPooling(d_model, rngs=rngs, **pool_options)
      pooled = d_model * pool_options.get("num_heads", 4)
    self.pooler = nnx.data(pooler)
    self.classifier = dense(pooled, num_classes, axes=("embed", None), rngs=rngs, use_bias=True)
    self.dist_classifier = (dense(d_model, num_classes, axes=("embed", None), rngs=rngs, use_bias=True)
                            if distill_token else None)

  def patchify(self, images: jax.Array) -> jax.Array:
    """`[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C]`, patches in row-major order."""
    return patchify(images, self.patch_size)

  def __call__(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4 or images.shape[1:] != (*self.image_size, self.in_channels):
      raise ValueError(f"images must be [B, {self.image_size[0]}, {self.image_size[1]}, "
                       f"{self.in_channels}], got shape {images.shape}")
    x = self.patch(self.patchify(images))
    if self.cls is not None:
      extra = [self.cls] if self.dist is None else [self.cls, self.dist]
      x = jnp.concatenate([jnp.broadcast_to(t[...], (x.shape[0], 1, x.shape[2])) for t in extra]
                          + [x], axis=1)
    x = x + self.pos[...][None]
    x = run_blocks(self.blocks, self.depth, x)
    x = self.norm(x)
    if self.pooler is not None:
      return self.classifier(self.pooler(x))
    if self.dist_classifier is not None:
      return (self.classifier(x[:, 0]) + self.dist_classifier(x[:, 1])) / 2
    return self.classifier(x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1))
