"""BAM, Branch-Attend-Mix (Zhang et al., 2024, arXiv 2408.08274): dense models upcycled into a
mixture of attention experts and FFN experts in a parallel-attention transformer.

Branch: E dense seed models (or E copies of one) are trained; Mix: each layer of the mixture model
gets E attention experts (all attention parameters of dense model e) and E FFN experts (its FFN);
routers are new (random), every other parameter (embeddings, norms, and with `shared_kv` the key /
value projections) is the average over the dense models. The block is parallel,
`y = x + MoA(LN x) + MoE(LN x)` with one norm, so both mixtures read the same input.

* Attention: a *soft* mixture, `MoA(h)_t = sum_e p_te Attn_e(h)_t`, `p_t = softmax(W_a h_t)` over all
  E experts (every expert runs on every token). With `shared_kv` the experts share one key and one
  value projection (one K/V cache) and keep their own query and output projections.
* FFN: top-k routing, `MoE(h)_t = sum_{e in topk(W_f h_t)} g_te FFN_e(h_t)`, `g_t = softmax` over the
  k selected logits (weights sum to 1, as in Mixtral / BTX), with the Switch load-balancing loss
  `aux_weight * E * sum_e f_e P_e` sown as "aux_loss" (`f_e` the fraction of (token, slot)
  assignments to e, `P_e` the mean router probability).

Reading: the abstract fixes soft attention routing, the optional K/V sharing, the parallel block and
upcycling by averaging the non-expert parameters; the FFN router's k (default 2), its renormalised
top-k gates and the Switch balance loss follow the BTX recipe BAM builds on (the paper's exact
coefficient is a hyperparameter here). For clarity on small models every FFN expert is evaluated
densely and weighted by gates that are exactly zero outside the top k (same values and gradients
as a dispatch, E times the FFN FLOPs).
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.layers import Embed, RMSNorm, SwiGLU, dense
from attnjax.ops.rope import apply_rope
from attnjax.ops.softmax import dot_product_attention


# ----------------------------------------------------------------------------------------------
# Dense seed model: a parallel-attention decoder
# ----------------------------------------------------------------------------------------------

class ParallelBlock(nnx.Module):
  """`y = x + Attn(n(x)) + FFN(n(x))` with one RMSNorm `n` (GPT-J / PaLM parallel block)."""

  def __init__(self, d_model: int, num_heads: int, *, mlp_ratio: float, causal: bool, rngs: nnx.Rngs):
    self.norm = RMSNorm(d_model)
    self.attn = MultiHeadAttention(d_model, num_heads, causal=causal, rngs=rngs)
    self.mlp = SwiGLU(d_model, int(mlp_ratio * d_model), rngs=rngs)

  def __call__(self, x, *, segment_ids=None):
    h = self.norm(x)
    return x + self.attn(h, segment_ids=segment_ids) + self.mlp(h)


class ParallelDecoderLM(nnx.Module):
  """Embedding, `num_layers` parallel blocks, final RMSNorm, tied head: BAM's dense seed model.

  `__call__(tokens [B, T] int, *, segment_ids=None) -> logits [B, T, vocab]`; `hidden` / `logits`
  split the two as in `DecoderLM`.
  """

  def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               mlp_ratio: float = 4.0, causal: bool = True, rngs: nnx.Rngs):
    self.vocab_size, self.d_model = vocab_size, d_model
    self.embed = Embed(vocab_size, d_model, rngs=rngs)
    self.blocks = nnx.List([ParallelBlock(d_model, num_heads, mlp_ratio=mlp_ratio, causal=causal,
                                          rngs=rngs) for _ in range(num_layers)])
    self.final_norm = RMSNorm(d_model)

  def hidden(self, tokens, *, segment_ids=None):
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    x = self.embed(tokens)
    for blk in self.blocks:
      x = blk(x, segment_ids=segment_ids)
    return self.final_norm(x)

  def logits(self, h):
    return self.embed.attend(h)

  def __call__(self, tokens, *, segment_ids=None):
    return self.logits(self.hidden(tokens, segment_ids=segment_ids))


# ----------------------------------------------------------------------------------------------
# Mixture layers
# ----------------------------------------------------------------------------------------------

class SoftAttentionExperts(nnx.Module):
  """Soft mixture of E attention experts, `[B, T, d_model] -> [B, T, d_model]`.

  `q_proj[e]`, `o_proj[e]` per expert; `k_proj` / `v_proj` hold E projections, or one shared by all
  experts with `shared_kv` (computed once). RoPE and causal softmax as in `MultiHeadAttention`.
  """

  def __init__(self, d_model: int, num_heads: int, num_experts: int, *, shared_kv: bool = False,
               causal: bool = True, rope_base: float = 10000.0, rngs: nnx.Rngs):
    if d_model % num_heads:
      raise ValueError(f"num_heads={num_heads} must divide d_model={d_model}")
    self.num_heads, self.head_dim, self.num_experts = num_heads, d_model // num_heads, num_experts
    self.causal, self.rope_base, self.shared_kv = causal, rope_base, shared_kv
    proj = lambda ax: dense(d_model, d_model, axes=("embed", ax), rngs=rngs)  # noqa: E731
    n_kv = 1 if shared_kv else num_experts
    self.q_proj = nnx.List([proj("heads") for _ in range(num_experts)])
    self.k_proj = nnx.List([proj("kv_heads") for _ in range(n_kv)])
    self.v_proj = nnx.List([proj("kv_heads") for _ in range(n_kv)])
    self.o_proj = nnx.List([dense(d_model, d_model, axes=("heads", "embed"), rngs=rngs)
                            for _ in range(num_experts)])
    self.router = dense(d_model, num_experts, axes=("embed", None), rngs=rngs,
                        kernel_init=nnx.initializers.normal(0.02))

  def __call__(self, h, *, segment_ids=None):
    b, t, d = h.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)  # noqa: E731
    pos = jnp.arange(t)
    ks = [apply_rope(heads(p(h)), pos, base=self.rope_base) for p in self.k_proj]
    vs = [heads(p(h)) for p in self.v_proj]
    probs = jax.nn.softmax(self.router(h).astype(jnp.float32), axis=-1)    # [B, T, E]
    out = jnp.zeros_like(h)
    for e in range(self.num_experts):
      kv = 0 if self.shared_kv else e
      q = apply_rope(heads(self.q_proj[e](h)), pos, base=self.rope_base)
      o = dot_product_attention(q, ks[kv], vs[kv], causal=self.causal, q_segment_ids=segment_ids,
                                kv_segment_ids=segment_ids)
      out = out + probs[..., e:e + 1].astype(h.dtype) * self.o_proj[e](o.reshape(b, t, d))
    return out


def topk_gates(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
  """`(gates [..., E], picked [..., E])`: softmax over the top-k logits, exactly 0 elsewhere;
  `picked` is the 0/1 selection."""
  e = logits.shape[-1]
  if not 1 <= top_k <= e:
    raise ValueError(f"top_k must be in [1, num_experts={e}], got {top_k}")
  top, idx = jax.lax.top_k(logits, top_k)
  w = jax.nn.softmax(top, axis=-1)
  onehot = jax.nn.one_hot(idx, e, dtype=logits.dtype)                    # [..., k, E]
  return jnp.einsum("...k,...ke->...e", w, onehot), jnp.sum(onehot, axis=-2)


def switch_balance_loss(probs: jax.Array, picked: jax.Array, top_k: int) -> jax.Array:
  """`E * sum_e f_e P_e` over all tokens (Fedus et al., 2022): 1 for perfectly balanced routing."""
  e = probs.shape[-1]
  frac = jnp.mean(picked.reshape(-1, e), axis=0) / top_k
  return e * jnp.sum(frac * jnp.mean(probs.reshape(-1, e), axis=0))


class TopKFFNExperts(nnx.Module):
  """E SwiGLU experts with a top-k router, `[B, T, d_model] -> [B, T, d_model]`; sows the
  weighted Switch balance loss as "aux_loss"."""

  def __init__(self, d_model: int, hidden: int, num_experts: int, *, top_k: int = 2,
               aux_weight: float = 0.01, rngs: nnx.Rngs):
    if not 1 <= top_k <= num_experts:
      raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    self.top_k, self.aux_weight, self.num_experts = top_k, aux_weight, num_experts
    self.experts = nnx.List([SwiGLU(d_model, hidden, rngs=rngs) for _ in range(num_experts)])
    self.router = dense(d_model, num_experts, axes=("embed", None), rngs=rngs,
                        kernel_init=nnx.initializers.normal(0.02))

  def __call__(self, h):
    logits = self.router(h).astype(jnp.float32)
    gates, picked = topk_gates(logits, self.top_k)
    if self.aux_weight:
      aux = switch_balance_loss(jax.nn.softmax(logits, -1), picked, self.top_k)
      self.sow(nnx.Intermediate, "aux_loss", self.aux_weight * aux, capture_noop=True)
    out = jnp.zeros_like(h)
    for e, ffn in enumerate(self.experts):
      out = out + gates[..., e:e + 1].astype(h.dtype) * ffn(h)
    return out


class BAMBlock(nnx.Module):
  """`y = x + MoA(n(x)) + MoE(n(x))`."""

  def __init__(self, d_model: int, num_heads: int, num_experts: int, *, mlp_ratio: float,
               top_k: int, shared_kv: bool, aux_weight: float, causal: bool, rngs: nnx.Rngs):
    self.norm = RMSNorm(d_model)
    self.attn = SoftAttentionExperts(d_model, num_heads, num_experts, shared_kv=shared_kv,
                                     causal=causal, rngs=rngs)
    self.moe = TopKFFNExperts(d_model, int(mlp_ratio * d_model), num_experts, top_k=top_k,
                              aux_weight=aux_weight, rngs=rngs)

  def __call__(self, x, *, segment_ids=None):
    h = self.norm(x)
    return x + self.attn(h, segment_ids=segment_ids) + self.moe(h)


class BAMLM(nnx.Module):
  """A BAM mixture language model: `__call__(tokens [B, T] int) -> logits [B, T, vocab]`.

  Build it with `upcycle(dense_models, ...)` (or `upcycle_from_checkpoints`) to start from trained
  dense models; a fresh `BAMLM(...)` has random experts.
  """

  def __init__(self, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
               num_experts: int, top_k: int = 2, shared_kv: bool = False, mlp_ratio: float = 4.0,
               aux_weight: float = 0.01, causal: bool = True, rngs: nnx.Rngs):
    if num_experts < 1:
      raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    self.vocab_size, self.d_model = vocab_size, d_model
    self.embed = Embed(vocab_size, d_model, rngs=rngs)
    self.blocks = nnx.List([
        BAMBlock(d_model, num_heads, num_experts, mlp_ratio=mlp_ratio, top_k=top_k,
                 shared_kv=shared_kv, aux_weight=aux_weight, causal=causal, rngs=rngs)
        for _ in range(num_layers)])
    self.final_norm = RMSNorm(d_model)

  def hidden(self, tokens, *, segment_ids=None):
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    x = self.embed(tokens)
    for blk in self.blocks:
      x = blk(x, segment_ids=segment_ids)
    return self.final_norm(x)

  def logits(self, h):
    return self.embed.attend(h)

  def __call__(self, tokens, *, segment_ids=None):
    return self.logits(self.hidden(tokens, segment_ids=segment_ids))


# ----------------------------------------------------------------------------------------------
# Upcycling
# ----------------------------------------------------------------------------------------------

def _mean(values):
  return sum(values) / len(values)


def upcycle(dense_models: Sequence[ParallelDecoderLM], *, top_k: int = 2, shared_kv: bool = False,
            aux_weight: float = 0.01, noise: float = 0.0, rngs: nnx.Rngs) -> BAMLM:
  """The BAM mixture of `dense_models` (E = their number, all the same sizes).

  Expert e's attention (q, k, v, o) and FFN are dense model e's; embeddings, norms and, with
  `shared_kv`, the K/V projections are averaged; routers are random (`rngs`). `noise > 0` adds
  `noise * std(W) * N(0, 1)` to every expert weight (to branch E copies of one model).
  """
  if not dense_models:
    raise ValueError("upcycle needs at least one dense model")
  first = dense_models[0]
  d, nl = first.d_model, len(first.blocks)
  for m in dense_models:
    if m.d_model != d or len(m.blocks) != nl or m.vocab_size != first.vocab_size:
      raise ValueError("upcycle: dense models differ in vocab_size, d_model or num_layers")
  attn0 = first.blocks[0].attn
  hidden = first.blocks[0].mlp.gate.out_features
  bam = BAMLM(vocab_size=first.vocab_size, d_model=d, num_layers=nl, num_heads=attn0.num_heads,
              num_experts=len(dense_models), top_k=top_k, shared_kv=shared_kv,
              mlp_ratio=hidden / d, aux_weight=aux_weight, causal=attn0.causal, rngs=rngs)
  key = rngs.params() if noise else None

  def expert(w):
    nonlocal key
    if not noise:
      return w
    key, sub = jax.random.split(key)
    return w + noise * jnp.std(w) * jax.random.normal(sub, w.shape, w.dtype)

  bam.embed.embedding[...] = _mean([m.embed.embedding[...] for m in dense_models])
  bam.final_norm.scale[...] = _mean([m.final_norm.scale[...] for m in dense_models])
  for i, blk in enumerate(bam.blocks):
    src = [m.blocks[i] for m in dense_models]
    blk.norm.scale[...] = _mean([s.norm.scale[...] for s in src])
    for e, s in enumerate(src):
      blk.attn.q_proj[e].kernel[...] = expert(s.attn.q_proj.kernel[...])
      blk.attn.o_proj[e].kernel[...] = expert(s.attn.o_proj.kernel[...])
      for name in ("gate", "up", "down"):
        getattr(blk.moe.experts[e], name).kernel[...] = expert(getattr(s.mlp, name).kernel[...])
      if not shared_kv:
        blk.attn.k_proj[e].kernel[...] = expert(s.attn.k_proj.kernel[...])
        blk.attn.v_proj[e].kernel[...] = expert(s.attn.v_proj.kernel[...])
    if shared_kv:
      blk.attn.k_proj[0].kernel[...] = _mean([s.attn.k_proj.kernel[...] for s in src])
      blk.attn.v_proj[0].kernel[...] = _mean([s.attn.v_proj.kernel[...] for s in src])
  return bam


def load_dense_checkpoint(checkpoint_dir: str, *, vocab_size: int, d_model: int, num_layers: int,
                          num_heads: int, mlp_ratio: float, step: int | None = None) -> ParallelDecoderLM:
  """A `ParallelDecoderLM` with the parameters of an orbax checkpoint directory (the trainer's
  `<workdir>/checkpoints`, latest step by default); the sizes must be those it was trained with."""
  from attnjax.distributed import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  from attnjax.distributed import sharding as sh  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(checkpoint_dir):
    raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} does not exist")
  model = nnx.eval_shape(lambda: ParallelDecoderLM(vocab_size=vocab_size, d_model=d_model,
                                                   num_layers=num_layers, num_heads=num_heads,
                                                   mlp_ratio=mlp_ratio, rngs=nnx.Rngs(0)))
  mesh = sh.make_mesh({}, jax.devices()[:1])
  return ckpt.restore_model_for_inference(checkpoint_dir, model, mesh, step=step)


def upcycle_from_checkpoints(checkpoint_dirs: Sequence[str], *, copies: int = 1,
                             vocab_size: int, d_model: int, num_layers: int, num_heads: int,
                             mlp_ratio: float, top_k: int = 2, shared_kv: bool = False,
                             aux_weight: float = 0.01, noise: float = 0.0,
                             rngs: nnx.Rngs) -> BAMLM:
  """`upcycle` of the dense models in `checkpoint_dirs`, each used `copies` times (E =
  `len(checkpoint_dirs) * copies`; give `noise > 0` to break the symmetry of copies)."""
  dense_models = [load_dense_checkpoint(c, vocab_size=vocab_size, d_model=d_model,
                                        num_layers=num_layers, num_heads=num_heads,
                                        mlp_ratio=mlp_ratio) for c in checkpoint_dirs]
  return upcycle([m for m in dense_models for _ in range(copies)], top_k=top_k,
                 shared_kv=shared_kv, aux_weight=aux_weight, noise=noise, rngs=rngs)
