"""`DecoderLM`: a pre-norm decoder-only language model with a mixer per layer."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.depth import DepthAttention
from attnjax.nn.layers import MLP_KINDS, Embed, GeluMLP, ShortConv, SwiGLU, dense, make_norm
from attnjax.registry import build_mixer

ATTN_RES_MODES = (None, "full", "block", "delta")


class FixedEmbedding(nnx.Variable):
  """A token-embedding table that is model state but not a parameter (the optimizer never sees
  it): RndEmbQK's fixed random query/key embeddings."""


def _per_layer(value, num_layers: int, name: str) -> list:
  """Broadcasts a single value to every layer, or checks a per-layer list's length."""
  if isinstance(value, (list, tuple)):
    if len(value) != num_layers:
      raise ValueError(f"{name} has {len(value)} entries but num_layers={num_layers}")
    return list(value)
  return [value] * num_layers


class DecoderBlock(nnx.Module):
  """`x + mixer(conv(norm(x)))`, then `x + SwiGLU(norm(x))` (the MLP is skipped if `mlp_ratio == 0`).

  `layer_index` (0-based) / `num_layers`: this block's depth, handed to mixers that are defined per
  depth (the registry passes them only to builders that name them). `norm` (`"rmsnorm"` or
  `"layernorm"`, see `attnjax.nn.layers.make_norm`) with `norm_eps`; `mlp` is `"swiglu"` or
  `"gelu"` (`GeluMLP`, exact GELU) with `mlp_hidden` channels (default `int(mlp_ratio * d_model)`)."""

  def __init__(self, d_model: int, num_heads: int, mixer: str, mixer_options: dict[str, Any], *,
               mlp_ratio: float, short_conv: int, causal: bool, rngs: nnx.Rngs,
               layer_index: int | None = None, num_layers: int | None = None,
               norm: str = "rmsnorm", norm_eps: float = 1e-6, mlp: str = "swiglu",
               mlp_hidden: int | None = None):
    if mlp not in MLP_KINDS:
      raise ValueError(f"mlp must be one of {MLP_KINDS}, got {mlp!r}")
    self.norm1 = make_norm(norm, d_model, eps=norm_eps)
    self.conv = ShortConv(d_model, short_conv, rngs=rngs) if short_conv else None
    opts = dict(mixer_options)
    depth = {k: v for k, v in (("layer_index", layer_index), ("num_layers", num_layers))
             if k not in opts}            # an explicit mixer option wins over the block's depth
    self.mixer = build_mixer(mixer, d_model=d_model, num_heads=num_heads, causal=causal, rngs=rngs,
                             **depth, **opts)
    self.mixer_name = mixer  # the registry name (read by `attnjax.fast_path_report`)
    hidden = int(mlp_ratio * d_model) if mlp_hidden is None else mlp_hidden
    self.norm2 = make_norm(norm, d_model, eps=norm_eps) if hidden else None
    mlp_cls = SwiGLU if mlp == "swiglu" else GeluMLP
    self.mlp = mlp_cls(d_model, hidden, rngs=rngs) if hidden else None

  def mix(self, x, *, segment_ids=None, decode=False, qk_inputs=None):
    """The token-mixing sublayer without its residual add: `mixer(conv(norm1(x)))`.

    `qk_inputs`: `{"static": layer-0 embeddings, "random": fixed random embeddings}` `[B, T, d]`,
    handed (as `qk_input=`) only to mixers that say `needs_qk_input` (StaticEmbQK, RndEmbQK)."""
    h = self.norm1(x)
    if self.conv is not None:
      h = self.conv(h, segment_ids=segment_ids, decode=decode)
    if getattr(self.mixer, "needs_qk_input", False):
      qk = (qk_inputs or {}).get(self.mixer.qk_source)
      return self.mixer(h, qk_input=qk, segment_ids=segment_ids, decode=decode)
    return self.mixer(h, segment_ids=segment_ids, decode=decode)

  def ffn(self, x):
    """The MLP sublayer without its residual add (only when `self.mlp` is not None)."""
    return self.mlp(self.norm2(x))

  @property
  def num_sublayers(self) -> int:
    return 1 if self.mlp is None else 2

  def sublayers(self, *, segment_ids=None, decode=False, qk_inputs=None):
    """The block's sublayers as functions `x -> f(x)` (no residual), in order; for AttnRes."""
    fns = [lambda x: self.mix(x, segment_ids=segment_ids, decode=decode, qk_inputs=qk_inputs)]
    if self.mlp is not None:
      fns.append(self.ffn)
    return fns

  def __call__(self, x, *, segment_ids=None, decode=False, qk_inputs=None):
    x = x + self.mix(x, segment_ids=segment_ids, decode=decode, qk_inputs=qk_inputs)
    if self.mlp is not None:
      x = x + self.ffn(x)
    return x


def check_attn_res(attn_res, block_size: int) -> None:
  if attn_res not in ATTN_RES_MODES:
    raise ValueError(f"attn_res must be one of {ATTN_RES_MODES}, got {attn_res!r}")
  if block_size < 1:
    raise ValueError(f"attn_res_block_size must be >= 1, got {block_size}")


def build_depth_attention(attn_res, block_size: int, d_model: int, blocks) -> DepthAttention | None:
  """The AttnRes depth mixer for `blocks` (one pseudo-query per sublayer, plus the readout).

  `"full"` is AttnRes over every sublayer output, `"block"` Block AttnRes with `block_size`
  sublayers per block, `"delta"` Delta AttnRes over the residual increments (grouped by
  `block_size` too; 1 = every increment is its own source).
  """
  check_attn_res(attn_res, block_size)
  if attn_res is None:
    return None
  n = sum(b.num_sublayers for b in blocks)
  return DepthAttention(d_model, n, block_size=1 if attn_res == "full" else block_size,
                        delta=attn_res == "delta")


def run_blocks(blocks, depth: DepthAttention | None, x, *, segment_ids=None, decode=False,
               qk_inputs=None):
  """Runs the blocks with the standard residual stream, or with AttnRes when `depth` is given.

  AttnRes: sublayer l's input is `depth(sources, l)` and the stream's output is
  `depth.readout(sources)`; sources are the embedding and each sublayer output (`full`/`block`) or the
  cumulative residual states (`delta`, see `attnjax.nn.depth`). Weights are per token, so decoding
  needs no extra cache. `qk_inputs`: see `DecoderBlock.mix`.
  """
  if depth is None:
    for blk in blocks:
      x = blk(x, segment_ids=segment_ids, decode=decode, qk_inputs=qk_inputs)
    return x
  fns = [f for blk in blocks
         for f in blk.sublayers(segment_ids=segment_ids, decode=decode, qk_inputs=qk_inputs)]
  sources = [x]
  for layer, f in enumerate(fns):
    out = f(depth(sources, layer))
    sources.append(sources[-1] + out if depth.delta else out)
  return depth.readout(sources)


class DecoderLM(nnx.Module):
  """Decoder-only LM: embedding, `num_layers` pre-RMSNorm blocks (mixer + SwiGLU), final norm.

  `mixer` is a registered mixer name or one name per layer (hybrids: `["gla", "gla", "softmax"]`);
  `mixer_options` a dict or one dict per layer; block i's mixer gets `layer_index=i`,
  `num_layers` if its builder takes them (Lightning's decay, DIFF's lambda_init). `short_conv > 0` puts a causal depth-wise
  convolution of that width before each mixer (Zoology's MQAR setup). Positions come from the
  mixers (RoPE in softmax attention); `pos_emb="learned"` adds learned absolute embeddings.
  `attn_res` replaces the residual sum by Attention Residuals (Kimi Team 2026, arXiv:2603.15031) over the sublayer outputs
  (`"full"`), Block AttnRes with `attn_res_block_size` sublayers per block (`"block"`; size 1
  equals `"full"`) or Delta AttnRes (Luo et al. 2026, arXiv:2605.18855) (`"delta"`); `None` (default) is the standard residual.
  `norm` / `norm_eps` / `mlp` / `mlp_hidden` choose every block's norms and MLP as in
  `DecoderBlock` (the final norm too); the defaults are RMSNorm(eps 1e-6) and SwiGLU.

  `__call__(tokens [B, T] int32, *, segment_ids [B, T] | None, decode=False) -> logits [B, T, vocab]`.
  `hidden(tokens, ...) -> [B, T, d_model]` and `logits(h) -> [..., vocab]` split the two, so a task
  can compute logits at a few positions only.
  """

  def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               mixer: str | Sequence[str] = "softmax",
               mixer_options: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
               mlp_ratio: float = 4.0, short_conv: int = 0, causal: bool = True,
               pos_emb: str = "none", max_len: int = 2048, tie_embeddings: bool = True,
               attn_res: str | None = None, attn_res_block_size: int = 1,
               norm: str = "rmsnorm", norm_eps: float = 1e-6, mlp: str = "swiglu",
               mlp_hidden: int | None = None, rngs: nnx.Rngs):
    check_attn_res(attn_res, attn_res_block_size)
    if pos_emb not in ("none", "learned"):
      raise ValueError(f"pos_emb must be 'none' or 'learned', got {pos_emb!r}")
    mixers = _per_layer(mixer, num_layers, "mixer")
    options = _per_layer(dict(mixer_options or {}) if not isinstance(mixer_options, (list, tuple))
                         else mixer_options, num_layers, "mixer_options")
    self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, max_len
    self.embed = Embed(vocab_size, d_model, rngs=rngs)
    self.pos = (nnx.Param(jax.random.normal(rngs.params(), (max_len, d_model)) * 0.02,
                          logical_axes=(None, "embed")) if pos_emb == "learned" else None)
    self.blocks = nnx.List([
        DecoderBlock(d_model, num_heads, m, o, mlp_ratio=mlp_ratio, short_conv=short_conv,
                     causal=causal, rngs=rngs, layer_index=i, num_layers=num_layers, norm=norm,
                     norm_eps=norm_eps, mlp=mlp, mlp_hidden=mlp_hidden)
        for i, (m, o) in enumerate(zip(mixers, options))])
    self.depth = build_depth_attention(attn_res, attn_res_block_size, d_model, self.blocks)
    self.final_norm = make_norm(norm, d_model, eps=norm_eps)
    self.head = None if tie_embeddings else dense(d_model, vocab_size, axes=("embed", "vocab"), rngs=rngs)
    self.decode_index = nnx.data(None)
    # Queries/keys from token embeddings instead of the residual stream (Deconstructing
    # Attention's StaticEmbQK / RndEmbQK): which sources some layer reads, and, for "random", a
    # fixed (never trained) random embedding table.
    self.qk_sources = tuple(sorted({b.mixer.qk_source for b in self.blocks
                                    if getattr(b.mixer, "needs_qk_input", False)}))
    self.random_qk_embed = (FixedEmbedding(jax.random.normal(rngs.params(), (vocab_size, d_model)),
                                           logical_axes=("vocab", "embed"))
                            if "random" in self.qk_sources else None)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> None:
    """Prepares every layer for `decode=True` calls (prefill, then one token at a time)."""
    for blk in self.blocks:
      if blk.conv is not None:
        blk.conv.init_cache(batch_size, max_len, dtype)
      blk.mixer.init_cache(batch_size, max_len, dtype)
    self.decode_index = nnx.Cache(jnp.zeros((), jnp.int32))

  def hidden(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
             decode: bool = False) -> jax.Array:
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    x = self.embed(tokens)
    qk_inputs = None
    if self.qk_sources:
      qk_inputs = {"static": x}
      if self.random_qk_embed is not None:
        qk_inputs["random"] = jnp.take(self.random_qk_embed[...], tokens, axis=0)
    if self.pos is not None:
      t = tokens.shape[1]
      start = self.decode_index[...] if decode else 0
      x = x + jax.lax.dynamic_slice_in_dim(self.pos[...], start, t, axis=0)[None]
    if decode:
      self.decode_index[...] = self.decode_index[...] + tokens.shape[1]
    x = run_blocks(self.blocks, self.depth, x, segment_ids=segment_ids, decode=decode,
                   qk_inputs=qk_inputs)
    return self.final_norm(x)

  def logits(self, h: jax.Array) -> jax.Array:
    return self.embed.attend(h) if self.head is None else self.head(h)

  def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
               decode: bool = False) -> jax.Array:
    return self.logits(self.hidden(tokens, segment_ids=segment_ids, decode=decode))
