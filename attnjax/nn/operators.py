"""NNX layers and registered mixers for the attention operators (`attnjax.ops.operators`).

Mixers that are "MHA with another score function" (sigmoid, LSSA / LSSAR, gated) are
`MultiHeadAttention` with an `attn_fn` / `output_gate`; the others (affine-scaled, differential,
MoH, Aaren, ...) own their projections here. All map `x [B, T, d_model] -> [B, T, d_model]` and follow
the registry contract (`segment_ids`, `decode` with `init_cache`, aux losses via `sow`). Cross
attention (`context=`) is available where the operator defines it; the rest raise.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.attention import MultiHeadAttention
from attnjax.nn.layers import RMSNorm, dense
from attnjax.ops import operators as ops
from attnjax.ops.operators._common import PatternUndefinedError
from attnjax.ops import softmax as softmax_lib
from attnjax.ops.rope import apply_rope as _apply_rope
from attnjax.registry import register_mixer


def _decode_query_positions(mask, tq: int, tk: int):
  """`[Tq]` token index of each query in a decode step: `MultiHeadAttention` passes the cache mask
  `k_pos <= q_pos`, so row i counts `q_pos_i + 1` keys."""
  return jnp.sum(jnp.broadcast_to(mask, (1, 1, tq, tk))[0, 0], axis=-1) - 1


# --------------------------------------------------------------------------------------------
# MODA (Zhang et al. 2025, arXiv:2507.04635): modality ids from the token layout, learned duplex basis and pair bias.


def modality_of_positions(positions, modality_lengths):
  """Modality id in `[0, len(modality_lengths)]` of each token position, for a prompt laid out as
  consecutive blocks of `modality_lengths` tokens followed by one more modality (the rest)."""
  if not modality_lengths:
    return jnp.zeros(jnp.shape(positions), jnp.int32)
  ends = jnp.cumsum(jnp.asarray(modality_lengths, jnp.int32))
  return jnp.searchsorted(ends, positions, side="right").astype(jnp.int32)


class ModaAttnFn(nnx.Module):
  """`attn_fn` for `MultiHeadAttention`: MODA's duplex attention (`ops.moda_attention`) with a
  learned per-modality basis `[M, D, D]` (identity init) and an adaptive pair bias `[M, M]` (zero
  init), so an untrained layer is softmax attention.

  Tokens are laid out as consecutive modality blocks of `modality_lengths` tokens and then one more
  modality for the rest (`M = len(modality_lengths) + 1`; e.g. `(256,)`: 256 image tokens, then
  text); positions count from each packed segment's start. `()` (the default) is one modality.
  RoPE is applied here, at those positions (the mixer's `MultiHeadAttention` has `rope=False`):
  the basis acts on rotated queries, so absolute positions would make a packed segment differ from
  the same tokens alone. Decoding reads the query positions off the cache mask.
  Cross attention is undefined (the modality layout lives on one prompt) and raises."""

  def __init__(self, num_heads: int, head_dim: int, modality_lengths, rngs: nnx.Rngs):
    del num_heads, rngs
    lengths = tuple(int(n) for n in modality_lengths)
    if any(n < 1 for n in lengths):
      raise ValueError(f"moda: modality_lengths must be a tuple of ints >= 1, got "
                       f"{modality_lengths!r}")
    self.modality_lengths = lengths
    m = len(lengths) + 1
    self.basis = nnx.Param(jnp.tile(jnp.eye(head_dim)[None], (m, 1, 1)),
                           logical_axes=(None, None, None))
    self.pair_bias = nnx.Param(jnp.zeros((m, m)), logical_axes=(None, None))

  def __call__(self, q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None,
               **unused):
    tq, tk = q.shape[1], k.shape[1]
    k_pos = jnp.arange(tk)
    if mask is None:
      if tq != tk:
        raise PatternUndefinedError("moda: cross attention is undefined (modality ids live on one "
                                    "prompt)")
      q_pos = k_pos[None]
      if q_segment_ids is not None:
        # Position within the token's packed segment: earlier tokens of the same segment.
        same = q_segment_ids[:, :, None] == q_segment_ids[:, None, :]
        q_pos = jnp.sum(same & (k_pos[None, None, :] < k_pos[None, :, None]), axis=-1)
      k_pos_b = q_pos
      vis = None
    else:
      q_pos = _decode_query_positions(mask, tq, tk)[None]
      k_pos_b = k_pos[None]
      vis = mask
    q = apply_rope(q, jnp.broadcast_to(q_pos, (q.shape[0], tq)))
    k = apply_rope(k, jnp.broadcast_to(k_pos_b, (k.shape[0], tk)))
    mq = modality_of_positions(q_pos, self.modality_lengths)
    mk = modality_of_positions(k_pos_b, self.modality_lengths)
    b = q.shape[0]
    mq, mk = jnp.broadcast_to(mq, (b, tq)), jnp.broadcast_to(mk, (b, tk))
    if q_segment_ids is not None:
      seg = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]
      vis = seg if vis is None else vis & seg
    return ops.moda_attention(q, k, v, mq, kv_modality_ids=mk, pair_bias=self.pair_bias[...],
                              basis=self.basis[...], causal=causal, mask=vis)


@register_mixer("moda", "MODA duplex attention (Zhang et al. 2025, arXiv:2507.04635): per-modality basis and pair bias over a "
                "modality_lengths token layout.")
def _build_moda(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                modality_lengths=(), **options: Any):
  fn = ModaAttnFn(num_heads, d_model // num_heads, modality_lengths, rngs)
  if options.pop("rope", False):
    raise ValueError("moda: RoPE is applied inside the MODA attention function; leave rope unset")
  return MultiHeadAttention(d_model, num_heads, causal=causal, attn_fn=fn, rngs=rngs, rope=False,
                            **options)


# Shared decode bookkeeping for the layers that own their projections.


class _CachedMixer(nnx.Module):
  """Named per-token caches `[B, max_len, ...]` plus a write index, and the decode visibility mask."""

  _cache_names: tuple[str, ...] = ()

  def _init_caches(self, batch_size: int, max_len: int, tails: dict[str, tuple], dtype) -> None:
    for name, tail in tails.items():
      setattr(self, f"cache_{name}", nnx.Cache(jnp.zeros((batch_size, max_len, *tail), dtype)))
    self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))

  def _decode_start(self, who: str):
    if getattr(self, "cache_index", None) is None:
      raise ValueError(f"{who}: call init_cache(batch_size, max_len) before decode=True")
    return self.cache_index[...]

  def _append(self, start, **new):
    """Writes the new tokens' arrays at `start`; returns the full caches and `mask [1, 1, t, max_len]`."""
    out = {}
    t = None
    for name, arr in new.items():
      cache = getattr(self, f"cache_{name}")
      cache[...] = jax.lax.dynamic_update_slice_in_dim(cache[...], arr.astype(cache.dtype), start, 1)
      out[name] = cache[...].astype(arr.dtype)
      t, max_len = arr.shape[1], cache.shape[1]
    self.cache_index[...] = start + t
    q_pos = start + jnp.arange(t)
    mask = jnp.arange(max_len)[None, :] <= q_pos[:, None]
    return out, mask[None, None], q_pos


def apply_rope(x, positions):
  """RoPE on the largest even prefix of the head dim (odd head sizes keep their last channel)."""
  rotary = x.shape[-1] // 2 * 2
  return x if rotary == 0 else _apply_rope(x, positions, rotary_dim=rotary)


def _check_x(who: str, x):
  if x.ndim != 3:
    raise ValueError(f"{who}: x must be [B, T, d_model], got shape {x.shape}")


def _check_options(who: str, options: dict[str, Any]):
  if options:
    raise ValueError(f"{who}: unknown options {sorted(options)}")


# --------------------------------------------------------------------------------------------
# MHA-based mixers: sigmoid, LSSA / LSSAR, gated attention.


SIGMOID_DEFAULT_SEQ_LEN = 2048   # `DecoderLM`'s default `max_len`: the context the layer is sized for


@register_mixer("sigmoid", "Sigmoid attention (Ramapuram et al. 2024, arXiv:2409.04431): sigmoid(qk/sqrt(d) - log n), QK-norm on by default.")
def _build_sigmoid(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                   bias: float | str | None = None, seq_len: int | None = None,
                   qk_norm: bool = True, **options: Any):
  """`MultiHeadAttention` with `sigmoid_attention` and QK-norm (the paper's best practice).

  The bias is the paper's fixed `b = -log n` (Ramapuram et al., "Theory, Analysis, and Best
  Practices for Sigmoid Self-Attention"; apple/ml-sigmoid-attention), one constant for every
  query: `n = seq_len`, the training context length (as Apple's axlearn sigmoid LMs set it from
  `max_sequence_length`), default `SIGMOID_DEFAULT_SEQ_LEN = 2048`. A constant bias keeps KV-cache
  decoding and packed sequences equal to the full forward. `bias` overrides it: a number, `[H]`,
  or `"visible"` for our per-row variant `b_i = -log(n_i)` over each query's visible keys.
  """
  if bias is None:
    seq_len = SIGMOID_DEFAULT_SEQ_LEN if seq_len is None else seq_len
    if seq_len < 1:
      raise ValueError(f"sigmoid: seq_len must be >= 1, got {seq_len}")
    bias = -math.log(seq_len)
  fn = functools.partial(ops.sigmoid_attention, bias=bias)
  return MultiHeadAttention(d_model, num_heads, causal=causal, qk_norm=qk_norm, rngs=rngs,
                            attn_fn=fn, **options)


@register_mixer("lssa", "Softplus attention LSSA (Gao et al. 2025, arXiv:2501.13428): softplus(log(n) s) / l1-norm.")
def _build_lssa(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                length_scale_base: float | None = None, reweight_power: float | None = None,
                reweight_threshold: float = 1.0, **options: Any):
  fn = functools.partial(ops.lssa_attention, length_scale_base=length_scale_base,
                         reweight_power=reweight_power, reweight_threshold=reweight_threshold)
  return MultiHeadAttention(d_model, num_heads, causal=causal, rngs=rngs, attn_fn=fn, **options)


@register_mixer("lssar", "LSSA with power re-weighting (LSSAR (Gao et al. 2025, arXiv:2501.13428)), default power 2.")
def _build_lssar(*, reweight_power: float = 2.0, **kw: Any):
  return _build_lssa(reweight_power=reweight_power, **kw)


@register_mixer("gated_attention", "Gated attention (Qiu et al. 2025, arXiv:2505.06708): sigmoid(x W) gate after SDPA (G1).")
def _build_gated(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                 gate: str = "elementwise", **options: Any):
  """`gate`: "elementwise" (paper's best, one gate per channel) or "headwise" (one per head)."""
  if gate not in ("elementwise", "headwise"):
    raise ValueError(f"gated_attention: gate must be 'elementwise' or 'headwise', got {gate!r}")
  return MultiHeadAttention(d_model, num_heads, causal=causal, output_gate=gate, rngs=rngs,
                            **options)


# --------------------------------------------------------------------------------------------
# FlashBias (Wu et al. 2025, arXiv:2505.12044).


def flashbias_alibi_fn(slopes):
  """An `attn_fn` for `MultiHeadAttention`: causal ALiBi folded into one extra q/k column (FlashBias)."""

  def attn(q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None, **kw):
    phi_q, phi_k = ops.alibi_key_factors(slopes, q.shape[1], k.shape[1])
    return ops.flashbias_attention(q, k, v, phi_q, phi_k, causal=causal, mask=mask,
                                   q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, **kw)

  return attn


@register_mixer("flashbias_alibi", "FlashBias (Wu et al. 2025, arXiv:2505.12044): causal ALiBi folded into extra q/k columns of the plain engine.")
def _build_flashbias_alibi(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                           **options: Any):
  """`MultiHeadAttention` without RoPE whose position signal is ALiBi (Press et al. slopes), run as
  FlashBias: the bias is given by low-rank factors appended to q and k, so the plain softmax engine
  (any implementation) computes it. Causal only: the symmetric non-causal ALiBi `-m |i - j|` is
  not low rank, so that pattern would need the SVD approximation (`lowrank_bias_factors`), which
  is an op-level choice, not this mixer's."""
  if not causal:
    raise PatternUndefinedError(
        "flashbias_alibi: the non-causal pattern is undefined (symmetric ALiBi -m|i-j| is not low "
        "rank; use lowrank_bias_factors + flashbias_attention for an SVD approximation)")
  slopes = softmax_lib.alibi_slopes(num_heads)
  return MultiHeadAttention(d_model, num_heads, causal=True, rope=False, rngs=rngs,
                            attn_fn=flashbias_alibi_fn(slopes), **options)


# --------------------------------------------------------------------------------------------
# Concentric causal attention (Xing et al. 2024, arXiv:2410.15926): the softmax mixer with CCA positions and mask.


def cca_attn_fn(grid, num_prefix: int = 0):
  """An `attn_fn` for `MultiHeadAttention(rope=False, ...)`: RoPE at CCA positions + the CCA mask.

  Tokens are laid out `[prefix (num_prefix), image (grid h x w, row-major), text]`
  (`attnjax.ops.operators.cca`). Causal: the ring-causal mask; non-causal: only the concentric
  positions. Decoding works from a prefill that holds the whole image (the visual tokens of one
  ring see each other both ways, so they cannot be fed one by one); the query's token index is
  read off the decode mask (`k <= q`) that `MultiHeadAttention` passes. Cross attention and
  packed sequences are undefined here (positions and mask live on one prompt) and raise.
  """
  gh, gw = (int(a) for a in grid)
  if gh < 1 or gw < 1 or num_prefix < 0:
    raise ValueError(f"cca: grid must be two positive ints and num_prefix >= 0, got {grid}, {num_prefix}")

  def attn(q, k, v, *, causal, mask=None, q_segment_ids=None, kv_segment_ids=None, **kw):
    if q_segment_ids is not None or kv_segment_ids is not None:
      raise NotImplementedError("cca: segment_ids (packed sequences) are not supported")
    tq, tk = q.shape[1], k.shape[1]
    k_idx = jnp.arange(tk)
    if mask is None:
      if tq != tk:
        raise PatternUndefinedError("cca: cross attention is undefined (positions and mask live on "
                                    "one prompt)")
      q_idx = k_idx
      vis = ops.cca_visibility(q_idx, k_idx, gh, gw, num_prefix) if causal else None
    else:
      # Decode: every slot below the last query's position + 1 has been written.
      q_idx = _decode_query_positions(mask, tq, tk)
      vis = ops.cca_visibility(q_idx, k_idx, gh, gw, num_prefix) & (k_idx[None, :] <= q_idx[-1])
    q = apply_rope(q, ops.cca_token_positions(q_idx, gh, gw, num_prefix))
    k = apply_rope(k, ops.cca_token_positions(k_idx, gh, gw, num_prefix))
    return softmax_lib.dot_product_attention(
        q, k, v, mask=None if vis is None else vis[None, None], causal=False, **kw)

  return attn


@register_mixer("cca", "Concentric causal attention (Xing et al. 2024, arXiv:2410.15926): softmax MHA with ring RoPE positions and ring-causal mask on an image grid.")
def _build_cca(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, grid=None,
               num_prefix: int = 0, **options: Any):
  """`grid = (h, w)` of the image tokens that follow `num_prefix` prefix tokens (a ViT class token:
  `num_prefix=1`); text tokens may follow. Without `grid` there are no image tokens and this is
  the `softmax` mixer (RoPE at token positions). Other options go to `MultiHeadAttention`."""
  if grid is None:
    return MultiHeadAttention(d_model, num_heads, causal=causal, rngs=rngs, **options)
  for bad in ("rope", "window", "attn_fn"):
    if bad in options:
      raise ValueError(f"cca: option {bad!r} is fixed by CCA (RoPE at ring positions, full ring mask)")
  return MultiHeadAttention(d_model, num_heads, causal=causal, rope=False, rngs=rngs,
                            attn_fn=cca_attn_fn(grid, num_prefix), **options)


class _QKVO(_CachedMixer):
  """q / k / v / o projections (`kv_heads` < heads for grouped keys) and the k / v decode caches."""

  def _proj(self, d_model, num_heads, rngs, kv_heads=None):
    self.num_heads, self.head_dim = num_heads, d_model // num_heads
    hd = num_heads * self.head_dim
    kvd = (kv_heads or num_heads) * self.head_dim
    self.q_proj = dense(d_model, hd, axes=("embed", "heads"), rngs=rngs)
    self.k_proj = dense(d_model, kvd, axes=("embed", "kv_heads"), rngs=rngs)
    self.v_proj = dense(d_model, kvd, axes=("embed", "kv_heads"), rngs=rngs)
    self.o_proj = dense(hd, d_model, axes=("heads", "embed"), rngs=rngs)
    self.cache_k, self.cache_v, self.cache_index = nnx.data(None), nnx.data(None), nnx.data(None)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> None:
    """k / v caches of all heads; layers with other cached tensors override this."""
    tail = (self.num_heads, self.head_dim)
    self._init_caches(batch_size, max_len, {"k": tail, "v": tail}, dtype)

  def _qkv(self, x, src, kv_heads=None):
    b, t, _ = x.shape
    s = src.shape[1]
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(src).reshape(b, s, kv_heads or self.num_heads, self.head_dim)
    v = self.v_proj(src).reshape(b, s, kv_heads or self.num_heads, self.head_dim)
    return q, k, v


# --------------------------------------------------------------------------------------------
# Affine-scaled attention (Bae et al. 2026, arXiv:2602.23057).


class AffineScaledAttention(_QKVO):
  """Affine-scaled attention layer (Bae et al. 2026, arXiv:2602.23057): `o_i = alpha_i softmax_i V + beta_i mean_{visible j} v_j`.

  `alpha = 2 sigmoid(x W_a + b_a)` and `beta = beta_max tanh(x W_b + b_b)` per head and token, from
  the layer input; zero-initialised, so a fresh layer is exactly softmax attention (alpha = 1,
  beta = 0). beta multiplies the mean of the visible values (`normalize_beta=True`), so the row mass
  is `alpha + beta` whatever the context length. RoPE on self-attention; `context=` gives cross
  attention (causal cross is bottom-right aligned). Reading: only the abstract was available;
  the sigmoid/tanh ranges are ours.
  """

  def __init__(self, d_model: int, num_heads: int, *, causal: bool = True, rope: bool = True,
               beta_max: float = 1.0, rngs: nnx.Rngs):
    self.causal, self.rope, self.beta_max = causal, rope, beta_max
    self._proj(d_model, num_heads, rngs)
    zeros = nnx.initializers.zeros_init()
    self.alpha_proj = dense(d_model, num_heads, axes=("embed", "heads"), rngs=rngs, use_bias=True,
                            kernel_init=zeros)
    self.beta_proj = dense(d_model, num_heads, axes=("embed", "heads"), rngs=rngs, use_bias=True,
                           kernel_init=zeros)

  def __call__(self, x, *, context=None, segment_ids=None, context_segment_ids=None, decode=False):
    _check_x("affine_scaled", x)
    b, t, _ = x.shape
    src = x if context is None else context
    q, k, v = self._qkv(x, src)
    alpha = 2.0 * jax.nn.sigmoid(self.alpha_proj(x).astype(jnp.float32))
    beta = self.beta_max * jnp.tanh(self.beta_proj(x).astype(jnp.float32))
    kw = dict(alpha=alpha, beta=beta, normalize_beta=True)
    if decode:
      if context is not None:
        raise NotImplementedError("affine_scaled: decode=True is for self-attention only")
      start = self._decode_start("affine_scaled")
      pos = start + jnp.arange(t)
      if self.rope:
        q, k = apply_rope(q, pos), apply_rope(k, pos)
      kv, mask, _ = self._append(start, k=k, v=v)
      o = ops.affine_scaled_attention(q, kv["k"], kv["v"], mask=mask, **kw)
    else:
      if self.rope and context is None:
        q, k = apply_rope(q, jnp.arange(t)), apply_rope(k, jnp.arange(t))
      kv_seg = segment_ids if context is None else context_segment_ids
      o = ops.affine_scaled_attention(q, k, v, causal=self.causal, q_segment_ids=segment_ids,
                                      kv_segment_ids=kv_seg, **kw)
    return self.o_proj(o.reshape(b, t, -1))


@register_mixer("affine_scaled", "Affine-scaled attention (Bae et al. 2026, arXiv:2602.23057): alpha * softmax + beta, input-dependent.")
def _build_affine(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, **options: Any):
  return AffineScaledAttention(d_model, num_heads, causal=causal, rngs=rngs, **options)


# --------------------------------------------------------------------------------------------
# Differential / grouped differential attention (Lim et al. 2025, arXiv:2510.06949).


class DifferentialAttention(_CachedMixer):
  """DIFF / Grouped Differential attention layer (Lim et al. 2025, arXiv:2510.06949) on `x [B, T, d_model]`.

  `Hs = num_heads` signal heads, `Hn = Hs / signal_noise_ratio` noise heads (1 = DIFF Transformer,
  3 or 4 = GDA). Per signal head h: `o_h = (softmax(Q1_h K1_h^T) - lam softmax(Q2_g K2_g^T)) V_h`
  with q/k head size `d = d_model / Hs / 2` and value size `2d` (DIFF's split, so parameters match
  MHA at ratio 1), `lam = exp(lq1.lk1) - exp(lq2.lk2) + lambda_init`, `lambda_init = 0.8 -
  0.6 exp(-0.3 layer_index)` (layer_index from 0, given by the backbone: `DecoderLM` / `ViT` pass each
  block its index), the lambda vectors init N(0, 0.1). Each head's
  output goes through RMSNorm (learned scale) and is multiplied by `1 - lambda_init`, then W_O.
  RoPE on self-attention; cross attention via `context=`.
  """

  def __init__(self, d_model: int, num_heads: int, *, signal_noise_ratio: int = 1,
               layer_index: int = 0, causal: bool = True, rope: bool = True, rngs: nnx.Rngs):
    if signal_noise_ratio < 1 or num_heads % signal_noise_ratio:
      raise ValueError(f"differential: num_heads={num_heads} must be a multiple of "
                       f"signal_noise_ratio={signal_noise_ratio} (>= 1)")
    self.hs, self.hn = num_heads, num_heads // signal_noise_ratio
    self.head_dim = max(1, d_model // num_heads // 2)
    self.causal, self.rope = causal, rope
    self.lambda_init = ops.diff_lambda_init(layer_index)
    d = self.head_dim
    self.q1 = dense(d_model, self.hs * d, axes=("embed", "heads"), rngs=rngs)
    self.k1 = dense(d_model, self.hs * d, axes=("embed", "heads"), rngs=rngs)
    self.q2 = dense(d_model, self.hn * d, axes=("embed", "heads"), rngs=rngs)
    self.k2 = dense(d_model, self.hn * d, axes=("embed", "heads"), rngs=rngs)
    self.v = dense(d_model, self.hs * 2 * d, axes=("embed", "heads"), rngs=rngs)
    self.o_proj = dense(self.hs * 2 * d, d_model, axes=("heads", "embed"), rngs=rngs)
    init = lambda: nnx.Param(0.1 * jax.random.normal(rngs.params(), (d,)), logical_axes=("head_dim",))
    self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = init(), init(), init(), init()
    self.head_norm = RMSNorm(2 * d, eps=1e-5, axis_name="head_dim")
    self.cache_k1, self.cache_k2 = nnx.data(None), nnx.data(None)
    self.cache_v, self.cache_index = nnx.data(None), nnx.data(None)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> None:
    d = self.head_dim
    self._init_caches(batch_size, max_len, {"k1": (self.hs, d), "k2": (self.hn, d),
                                            "v": (self.hs, 2 * d)}, dtype)

  def lam(self) -> jax.Array:
    return ops.diff_lambda(self.lambda_q1[...], self.lambda_k1[...], self.lambda_q2[...],
                           self.lambda_k2[...], self.lambda_init)

  def __call__(self, x, *, context=None, segment_ids=None, context_segment_ids=None, decode=False):
    _check_x("differential", x)
    b, t, _ = x.shape
    src = x if context is None else context
    s, d = src.shape[1], self.head_dim
    q1, q2 = self.q1(x).reshape(b, t, self.hs, d), self.q2(x).reshape(b, t, self.hn, d)
    k1, k2 = self.k1(src).reshape(b, s, self.hs, d), self.k2(src).reshape(b, s, self.hn, d)
    v = self.v(src).reshape(b, s, self.hs, 2 * d)
    if decode:
      if context is not None:
        raise NotImplementedError("differential: decode=True is for self-attention only")
      start = self._decode_start("differential")
      pos = start + jnp.arange(t)
      if self.rope:
        q1, q2, k1, k2 = (apply_rope(a, pos) for a in (q1, q2, k1, k2))
      kv, mask, _ = self._append(start, k1=k1, k2=k2, v=v)
      o = ops.differential_attention(q1, kv["k1"], q2, kv["k2"], kv["v"], self.lam(), mask=mask)
    else:
      if self.rope and context is None:
        pos = jnp.arange(t)
        q1, q2, k1, k2 = (apply_rope(a, pos) for a in (q1, q2, k1, k2))
      kv_seg = segment_ids if context is None else context_segment_ids
      o = ops.differential_attention(q1, k1, q2, k2, v, self.lam(), causal=self.causal,
                                     q_segment_ids=segment_ids, kv_segment_ids=kv_seg)
    o = self.head_norm(o) * (1.0 - self.lambda_init)
    return self.o_proj(o.reshape(b, t, -1).astype(x.dtype))


@register_mixer("differential", "Differential attention (DIFF Transformer; GDA ratio 1:1 (Lim et al. 2025, arXiv:2510.06949)).")
def _build_diff(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, layer_index: int = 0,
                **options: Any):
  return DifferentialAttention(d_model, num_heads, causal=causal, rngs=rngs, layer_index=layer_index,
                               **options)


@register_mixer("grouped_differential", "Grouped differential attention (Lim et al. 2025, arXiv:2510.06949), signal:noise heads 3:1 by default (falls back to the largest ratio <= 3 dividing num_heads).")
def _build_gda(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
               signal_noise_ratio: int | None = None, layer_index: int = 0, **options: Any):
  if signal_noise_ratio is None:
    signal_noise_ratio = next(r for r in (3, 2, 1) if num_heads % r == 0)
  return DifferentialAttention(d_model, num_heads, causal=causal, rngs=rngs,
                               signal_noise_ratio=signal_noise_ratio, layer_index=layer_index,
                               **options)


# --------------------------------------------------------------------------------------------
# Mixture-of-head attention (Jin et al. 2024, arXiv:2410.11842).


class MixtureOfHeadsAttention(_QKVO):
  """MoH layer (Jin et al. 2024, arXiv:2410.11842): `num_shared` always-on heads plus top-`top_k` of the routed heads per token.

  Output `sum_h g_h o_h W_O^h` with gates from `ops.moh_router` (shared: `a1 Hsh softmax(W_s x)`,
  routed: `a2 k renorm-top-k softmax(W_r x)`, `[a1, a2] = 2 softmax(W_h x)`). The routed heads'
  attention runs only for the (token, head) pairs picked (`ops.routed_heads_attention`: a token's
  unselected heads are never scored and get zero gradient); q/k/v projections stay dense (linear
  cost; k/v of every head are needed because later tokens may pick any head). The load-balance loss
  `Hr sum_i f_i P_i` is sown as `nnx.Intermediate` "aux_loss" times `aux_weight` (default 0.01).
  Defaults: `num_shared = H // 4`, `top_k` so that ~75% of heads are active (the paper's 50-90%).
  `routing="dense"` computes every head and zeroes the unselected ones (same output; no gathers,
  which is faster on CPU at small sizes); the default `"gather"` skips them.
  """

  def __init__(self, d_model: int, num_heads: int, *, num_shared: int | None = None,
               top_k: int | None = None, aux_weight: float = 0.01, causal: bool = True,
               rope: bool = True, routing: str = "gather", rngs: nnx.Rngs):
    if routing not in ("gather", "dense"):
      raise ValueError(f"moh: routing must be 'gather' or 'dense', got {routing!r}")
    self.routing = routing
    num_shared = num_heads // 4 if num_shared is None else num_shared
    routed = num_heads - num_shared
    if routed < 1 or num_shared < 0:
      raise ValueError(f"moh: num_shared must be in [0, num_heads - 1] = [0, {num_heads - 1}], "
                       f"got {num_shared}")
    if top_k is None:
      top_k = min(routed, max(1, round(0.75 * num_heads) - num_shared))
    if not 1 <= top_k <= routed:
      raise ValueError(f"moh: top_k must be in [1, {routed}] (routed heads), got {top_k}")
    self.num_shared, self.top_k = num_shared, top_k
    self.causal, self.rope, self.aux_weight = causal, rope, aux_weight
    self._proj(d_model, num_heads, rngs)
    small = nnx.initializers.normal(0.02)
    self.shared_router = dense(d_model, max(num_shared, 1), axes=("embed", None), rngs=rngs,
                               kernel_init=small)
    self.routed_router = dense(d_model, routed, axes=("embed", None), rngs=rngs, kernel_init=small)
    self.branch_router = dense(d_model, 2, axes=("embed", None), rngs=rngs, kernel_init=small)

  def __call__(self, x, *, context=None, segment_ids=None, context_segment_ids=None, decode=False):
    _check_x("moh", x)
    b, t, _ = x.shape
    src = x if context is None else context
    q, k, v = self._qkv(x, src)
    shared_logits = self.shared_router(x)[..., :self.num_shared]
    gates, idx, aux = ops.moh_router(shared_logits, self.routed_router(x), self.branch_router(x),
                                     self.top_k)
    self.sow(nnx.Intermediate, "aux_loss", self.aux_weight * aux)
    if decode:
      if context is not None:
        raise NotImplementedError("moh: decode=True is for self-attention only")
      start = self._decode_start("moh")
      pos = start + jnp.arange(t)
      if self.rope:
        q, k = apply_rope(q, pos), apply_rope(k, pos)
      kv, mask, _ = self._append(start, k=k, v=v)
      k, v = kv["k"], kv["v"]
      attn = dict(mask=mask)
    else:
      if self.rope and context is None:
        q, k = apply_rope(q, jnp.arange(t)), apply_rope(k, jnp.arange(t))
      kv_seg = segment_ids if context is None else context_segment_ids
      attn = dict(causal=self.causal, q_segment_ids=segment_ids, kv_segment_ids=kv_seg)
    hs = self.num_shared
    if self.routing == "dense":
      o = ops.mixture_of_heads_attention(q, k, v, gates, **attn)
      return self.o_proj(o.reshape(b, t, -1).astype(x.dtype))
    parts = []
    if hs:
      o_s = softmax_lib.dot_product_attention(q[:, :, :hs], k[:, :, :hs], v[:, :, :hs], **attn)
      parts.append(o_s.astype(jnp.float32) * gates[..., :hs, None])
    ridx = idx + hs
    q_sel = jnp.take_along_axis(q, ridx[..., None], axis=2)
    o_r = ops.routed_heads_attention(q_sel, ridx, k, v, **attn).astype(jnp.float32)
    g_sel = jnp.take_along_axis(gates, ridx, axis=-1)
    # Scatter the k selected heads back to their head slots (zeros elsewhere) for W_O.
    onehot = jax.nn.one_hot(idx, self.num_heads - hs, dtype=jnp.float32)
    parts.append(jnp.einsum("btjd,btjh->bthd", o_r * g_sel[..., None], onehot))
    o = jnp.concatenate(parts, axis=2).astype(x.dtype)
    return self.o_proj(o.reshape(b, t, -1))


@register_mixer("moh", "Mixture-of-head attention (Jin et al. 2024, arXiv:2410.11842): shared + top-k routed heads, load-balance aux loss.")
def _build_moh(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, **options: Any):
  return MixtureOfHeadsAttention(d_model, num_heads, causal=causal, rngs=rngs, **options)


# --------------------------------------------------------------------------------------------
# Aaren (Feng et al. 2024, arXiv:2405.13956).


class Aaren(_CachedMixer):
  """Aaren layer (Feng et al. 2024, arXiv:2405.13956): per head, causal softmax attention of a learned query over k/v of the tokens.

  `o_t = sum_{j<=t} softmax_j(w_h . k_j / sqrt(d)) v_j` via the parallel prefix scan; decoding keeps
  only the O(1) state `(m, u, w)` per head (no KV cache). The learned queries start at zero
  (uniform prefix averaging). Non-causal: every token gets the full-sequence summary. Cross attention
  is not defined for Aaren (its keys are the tokens the RNN reads) and raises.
  """

  def __init__(self, d_model: int, num_heads: int, *, causal: bool = True, rngs: nnx.Rngs):
    self.num_heads, self.head_dim, self.causal = num_heads, d_model // num_heads, causal
    hd = num_heads * self.head_dim
    self.query = nnx.Param(jnp.zeros((num_heads, self.head_dim)), logical_axes=("heads", "head_dim"))
    self.k_proj = dense(d_model, hd, axes=("embed", "heads"), rngs=rngs)
    self.v_proj = dense(d_model, hd, axes=("embed", "heads"), rngs=rngs)
    self.o_proj = dense(hd, d_model, axes=("heads", "embed"), rngs=rngs)
    self.state_m, self.state_u, self.state_w = nnx.data(None), nnx.data(None), nnx.data(None)

  def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> None:
    del max_len, dtype   # O(1) state, float32 accumulators
    st = ops.aaren_init_state(batch_size, self.num_heads, self.head_dim)
    self.state_m, self.state_u, self.state_w = (nnx.Cache(a) for a in st)

  def __call__(self, x, *, context=None, segment_ids=None, decode=False):
    _check_x("aaren", x)
    if context is not None:
      raise PatternUndefinedError("aaren: cross attention is not defined for Aaren (keys are the tokens it reads)")
    b, t, _ = x.shape
    hd = (self.num_heads, self.head_dim)
    k, v = self.k_proj(x).reshape(b, t, *hd), self.v_proj(x).reshape(b, t, *hd)
    query = self.query[...].astype(k.dtype)
    if decode:
      if not self.causal:
        raise ValueError("aaren: decode=True needs causal=True")
      if self.state_m is None:
        raise ValueError("aaren: call init_cache(batch_size, max_len) before decode=True")
      st = ops.AarenState(self.state_m[...], self.state_u[...], self.state_w[...])

      def step(st, kv):
        return ops.aaren_step(st, query, *kv)

      st, o = jax.lax.scan(step, st, (jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)))
      self.state_m[...], self.state_u[...], self.state_w[...] = st
      o = jnp.swapaxes(o, 0, 1)
    else:
      o = ops.aaren_attention(query, k, v, causal=self.causal, segment_ids=segment_ids)
    return self.o_proj(o.reshape(b, t, -1))


@register_mixer("aaren", "Aaren (Feng et al. 2024, arXiv:2405.13956): attention as an RNN (prefix scan of a learned query; O(1) decode).")
def _build_aaren(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, **options: Any):
  return Aaren(d_model, num_heads, causal=causal, rngs=rngs, **options)


# --------------------------------------------------------------------------------------------
# Plain q/k/v/o projections for the remaining operators.


def _no_decode(who):
  raise NotImplementedError(f"{who}: decoding is not supported by this mixer")


# --------------------------------------------------------------------------------------------
# Reversed attention (DependencyViT (Ding et al. 2023, arXiv:2304.03282)).


class ReversedAttention(_QKVO):
  """DependencyViT reversed attention layer (Ding et al. 2023, arXiv:2304.03282): column-softmax attention with a message controller.

  `o_i = sum_j A_ij m_j v_j`, `A` normalised over queries, `m_j = sigmoid(x_j w_h + b_h)` per head
  (bias init 2, so messages start mostly open). Non-causal self and cross attention; the causal
  pattern is undefined (normalising over queries would read later tokens) and raises at build time.
  """

  def __init__(self, d_model: int, num_heads: int, *, causal: bool = False, rngs: nnx.Rngs):
    if causal:
      raise PatternUndefinedError("reversed: the causal pattern is undefined for reversed attention (each key "
                       "is normalised over all queries, including later ones); use causal=False")
    self._proj(d_model, num_heads, rngs)
    self.message = dense(d_model, num_heads, axes=("embed", "heads"), rngs=rngs, use_bias=True)
    self.message.bias[...] = jnp.full((num_heads,), 2.0)

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    _no_decode("reversed")

  def __call__(self, x, *, context=None, segment_ids=None, context_segment_ids=None, decode=False):
    _check_x("reversed", x)
    if decode:
      _no_decode("reversed")
    src = x if context is None else context
    q, k, v = self._qkv(x, src)
    msg = jax.nn.sigmoid(self.message(src).astype(jnp.float32))
    kv_seg = segment_ids if context is None else context_segment_ids
    o = ops.reversed_attention(q, k, v, message=msg, q_segment_ids=segment_ids,
                               kv_segment_ids=kv_seg)
    return self.o_proj(o.reshape(*x.shape[:2], -1))


@register_mixer("reversed", "Reversed attention (DependencyViT (Ding et al. 2023, arXiv:2304.03282)); non-causal only.")
def _build_reversed(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, **options: Any):
  return ReversedAttention(d_model, num_heads, causal=causal, rngs=rngs, **options)


# --------------------------------------------------------------------------------------------
# ConViT GPSA (d'Ascoli et al. 2021, arXiv:2103.10697).


class GatedPositionalSelfAttention(_QKVO):
  """ConViT GPSA layer (d'Ascoli et al. 2021, arXiv:2103.10697) for tokens on a `grid = (h, w)` (default: square, inferred from T).

  `A_h = (1 - sigmoid(l_h)) softmax(QK^T/sqrt(d)) + sigmoid(l_h) softmax(v_h . r_ij)`, with the local
  init `v_h = -alpha (1, -2 Delta_h)` (`ops.gpsa_local_init`, `locality_strength = alpha`, default
  1), gates `l_h = 1` and, as the authors' `local_init` does, the value projection set to the
  identity (so a fully positional head starts as a pure shift of its input channels).
  No RoPE (the positional part is the position signal). Self-attention only (cross raises);
  `causal=True` masks later tokens in both parts (raster order). No decoding.
  """

  def __init__(self, d_model: int, num_heads: int, *, causal: bool = False, grid=None,
               locality_strength: float = 1.0, rngs: nnx.Rngs):
    self._proj(d_model, num_heads, rngs)
    self.v_proj.kernel[...] = jnp.eye(d_model, dtype=self.v_proj.kernel[...].dtype)
    self.causal, self.grid = causal, None if grid is None else tuple(grid)
    self.pos_weights = nnx.Param(ops.gpsa_local_init(num_heads, locality_strength),
                                 logical_axes=("heads", None))
    self.gate = nnx.Param(jnp.ones((num_heads,)), logical_axes=("heads",))

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    _no_decode("gpsa")

  def __call__(self, x, *, context=None, segment_ids=None, decode=False):
    _check_x("gpsa", x)
    if decode:
      _no_decode("gpsa")
    if context is not None:
      raise PatternUndefinedError("gpsa: cross attention is not defined for GPSA (positions live on one grid)")
    t = x.shape[1]
    grid = self.grid
    if grid is None:
      # A square T is an image's patch grid; any other T is read as a 1-D sequence (one row), so
      # the layer also runs as a sequence mixer (relative offsets (0, j - i), as for text).
      side = math.isqrt(t)
      grid = (side, side) if side * side == t else (1, t)
    q, k, v = self._qkv(x, x)
    mask = None
    if self.causal:
      mask = jnp.tril(jnp.ones((t, t), bool))
    if segment_ids is not None:
      seg = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
      mask = seg if mask is None else seg & mask
    o = ops.gpsa_attention(q, k, v, self.pos_weights[...], self.gate[...], grid=grid, mask=mask)
    return self.o_proj(o.reshape(*x.shape[:2], -1))


@register_mixer("gpsa", "ConViT gated positional self-attention (d'Ascoli et al. 2021, arXiv:2103.10697) (tokens on a square grid).")
def _build_gpsa(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, **options: Any):
  return GatedPositionalSelfAttention(d_model, num_heads, causal=causal, rngs=rngs, **options)


# --------------------------------------------------------------------------------------------
# Decoupled-head attention (Chen et al. 2024, arXiv:2406.06567).


def _contiguous(num_heads: int, groups: int):
  return tuple(h * groups // num_heads for h in range(num_heads))


class DecoupledHeadAttention(_QKVO):
  """DHA layer (Chen et al. 2024, arXiv:2406.06567): `num_k_groups` key heads and `num_v_groups` value heads, grouped independently.

  Query head h uses key group `k_assign[h]` and value group `v_assign[h]` (default contiguous
  groupings; equal groupings are GQA, `groups = H` is MHA). `fuse_from(mha, k_fusion, v_fusion)`
  initialises from a `MultiHeadAttention` checkpoint by linear head fusion (`ops.dha_fuse_heads`):
  group g's K/V projection is `sum_h fusion[g, h] W_h` (the paper then trains the fusion weights
  progressively; one-hot rows select heads). RoPE on self-attention; KV-cache decoding.
  """

  def __init__(self, d_model: int, num_heads: int, *, num_k_groups: int | None = None,
               num_v_groups: int | None = None, k_assign=None, v_assign=None,
               causal: bool = True, rope: bool = True, rngs: nnx.Rngs):
    gk = num_k_groups or max(1, num_heads // 2)
    gv = num_v_groups or num_heads
    self.gk, self.gv, self.causal, self.rope = gk, gv, causal, rope
    self._proj(d_model, num_heads, rngs)
    hd = d_model // num_heads
    self.k_proj = dense(d_model, gk * hd, axes=("embed", "kv_heads"), rngs=rngs)
    self.v_proj = dense(d_model, gv * hd, axes=("embed", "kv_heads"), rngs=rngs)
    self.k_assign = tuple(k_assign) if k_assign is not None else _contiguous(num_heads, gk)
    self.v_assign = tuple(v_assign) if v_assign is not None else _contiguous(num_heads, gv)
    for name, assign, g in (("k_assign", self.k_assign, gk), ("v_assign", self.v_assign, gv)):
      if len(assign) != num_heads or not all(0 <= a < g for a in assign):
        raise ValueError(f"dha: {name} must list {num_heads} group ids in [0, {g}), got {assign}")

  def fuse_from(self, mha: MultiHeadAttention, k_fusion, v_fusion) -> None:
    """Copies q/o from `mha` and fuses its K/V heads: `k_fusion [gK, Hkv]`, `v_fusion [gV, Hkv]`.

    `mha` must be a plain `MultiHeadAttention` of the same shape (no QK-norm, output gate or
    window, same RoPE setting), so that only the K/V head grouping differs."""
    if (mha.num_heads, mha.head_dim) != (self.num_heads, self.head_dim) or mha.rope != self.rope:
      raise ValueError(f"dha.fuse_from: mha must have num_heads={self.num_heads}, head_dim="
                       f"{self.head_dim}, rope={self.rope}; got {mha.num_heads}, {mha.head_dim}, {mha.rope}")
    if mha.q_norm is not None or mha.gate_proj is not None or mha.window is not None:
      raise ValueError("dha.fuse_from: mha must not use qk_norm, output_gate or window (DHA has none)")
    k_fusion, v_fusion = jnp.asarray(k_fusion), jnp.asarray(v_fusion)
    for name, f, g in (("k_fusion", k_fusion, self.gk), ("v_fusion", v_fusion, self.gv)):
      if f.shape != (g, mha.num_kv_heads):
        raise ValueError(f"dha.fuse_from: {name} must be [groups={g}, mha kv heads={mha.num_kv_heads}], "
                         f"got {f.shape}")
    self.q_proj.kernel[...] = mha.q_proj.kernel[...]
    self.o_proj.kernel[...] = mha.o_proj.kernel[...]
    self.k_proj.kernel[...] = ops.dha_fuse_heads(mha.k_proj.kernel[...], jnp.asarray(k_fusion), self.head_dim)
    self.v_proj.kernel[...] = ops.dha_fuse_heads(mha.v_proj.kernel[...], jnp.asarray(v_fusion), self.head_dim)

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    self._init_caches(batch_size, max_len, {"k": (self.gk, self.head_dim),
                                            "v": (self.gv, self.head_dim)}, dtype)

  def __call__(self, x, *, context=None, segment_ids=None, context_segment_ids=None, decode=False):
    _check_x("dha", x)
    b, t, _ = x.shape
    src = x if context is None else context
    s = src.shape[1]
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(src).reshape(b, s, self.gk, self.head_dim)
    v = self.v_proj(src).reshape(b, s, self.gv, self.head_dim)
    if decode:
      if context is not None:
        raise NotImplementedError("dha: decode=True is for self-attention only")
      start = self._decode_start("dha")
      pos = start + jnp.arange(t)
      if self.rope:
        q, k = apply_rope(q, pos), apply_rope(k, pos)
      kv, mask, _ = self._append(start, k=k, v=v)
      o = ops.dha_attention(q, kv["k"], kv["v"], self.k_assign, self.v_assign, mask=mask)
    else:
      if self.rope and context is None:
        q, k = apply_rope(q, jnp.arange(t)), apply_rope(k, jnp.arange(t))
      kv_seg = segment_ids if context is None else context_segment_ids
      o = ops.dha_attention(q, k, v, self.k_assign, self.v_assign, causal=self.causal,
                            q_segment_ids=segment_ids, kv_segment_ids=kv_seg)
    return self.o_proj(o.reshape(b, t, -1))


@register_mixer("dha", "Decoupled-head attention (Chen et al. 2024, arXiv:2406.06567): independent K and V head groupings.")
def _build_dha(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, **options: Any):
  return DecoupledHeadAttention(d_model, num_heads, causal=causal, rngs=rngs, **options)


# --------------------------------------------------------------------------------------------
# RCMHA (Sugiharto et al. 2023, arXiv:2308.03429).


class RelativeConvAttention(_QKVO):
  """RCMHA layer (Sugiharto et al. 2023, arXiv:2308.03429): depth-wise causal convolutions on Q, K, V, then Transformer-XL relative scores.

  `Q, K, V = DWConv_k(x W_{q,k,v})` (`ShortConv`, width `conv_width` = 3, current tap near identity),
  scores `((q_i + u) . k_j + (q_i + w) . R_{i-j}) / sqrt(d)`, `R = sinusoid(i - j) W_R`; u, w start
  at zero. The convolutions are causal, so the causal layer never reads later tokens; non-causal
  attention keeps the same (causal) convolutions. Cross attention: the context goes through the
  K/V convolutions. KV-cache decoding (the convolutions keep their own short caches).
  Our first spec of (Sugiharto et al. 2023, arXiv:2308.03429) was "from abstract + memory": Transformer-XL's relative terms on convolved Q/K/V.
  """

  def __init__(self, d_model: int, num_heads: int, *, conv_width: int = 3, causal: bool = True,
               rngs: nnx.Rngs):
    from attnjax.nn.layers import ShortConv
    self._proj(d_model, num_heads, rngs)
    self.causal, self.d_model = causal, d_model
    hd = num_heads * self.head_dim
    self.q_conv, self.k_conv, self.v_conv = (ShortConv(hd, conv_width, rngs=rngs) for _ in range(3))
    self.r_proj = dense(d_model, hd, axes=("embed", "heads"), rngs=rngs)
    self.u = nnx.Param(jnp.zeros((num_heads, self.head_dim)), logical_axes=("heads", "head_dim"))
    self.w = nnx.Param(jnp.zeros((num_heads, self.head_dim)), logical_axes=("heads", "head_dim"))

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    for c in (self.q_conv, self.k_conv, self.v_conv):
      c.init_cache(batch_size, max_len, dtype)
    super().init_cache(batch_size, max_len, dtype)

  def _rel(self, tk):
    dist = (tk - 1) - jnp.arange(2 * tk - 1)
    return self.r_proj(sinusoid_embed(dist, self.d_model)).reshape(2 * tk - 1, self.num_heads,
                                                                     self.head_dim)

  def __call__(self, x, *, context=None, segment_ids=None, context_segment_ids=None, decode=False):
    _check_x("rcmha", x)
    b, t, _ = x.shape
    src = x if context is None else context
    s = src.shape[1]
    kv_seg = segment_ids if context is None else context_segment_ids
    hd = (self.num_heads, self.head_dim)
    q = self.q_conv(self.q_proj(x), segment_ids=segment_ids, decode=decode).reshape(b, t, *hd)
    k = self.k_conv(self.k_proj(src), segment_ids=kv_seg, decode=decode).reshape(b, s, *hd)
    v = self.v_conv(self.v_proj(src), segment_ids=kv_seg, decode=decode).reshape(b, s, *hd)
    if decode:
      if context is not None:
        raise NotImplementedError("rcmha: decode=True is for self-attention only")
      start = self._decode_start("rcmha")
      kv, mask, _ = self._append(start, k=k, v=v)
      tk = kv["k"].shape[1]
      o = ops.relative_attention(q, kv["k"], kv["v"], self._rel(tk), self.u[...], self.w[...],
                                 mask=mask, q_offset=start)
    else:
      o = ops.relative_attention(q, k, v, self._rel(s), self.u[...], self.w[...], causal=self.causal,
                                 q_segment_ids=segment_ids, kv_segment_ids=kv_seg)
    return self.o_proj(o.reshape(b, t, -1))


def sinusoid_embed(positions, dim):
  return ops.sinusoid(positions, dim)


@register_mixer("rcmha", "Relative convolutional MHA (Sugiharto et al. 2023, arXiv:2308.03429): DW-conv Q/K/V + Transformer-XL relative scores.")
def _build_rcmha(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, **options: Any):
  return RelativeConvAttention(d_model, num_heads, causal=causal, rngs=rngs, **options)


# --------------------------------------------------------------------------------------------
# Hierarchical self-attention (Amizadeh et al. 2025, arXiv:2509.15448) and GAAM (Ioannides et al. 2024, arXiv:2401.11143).


class HierarchicalAttention(_QKVO):
  """Two-level hierarchical self-attention layer (Amizadeh et al. 2025, arXiv:2509.15448): consecutive groups of `group_size` tokens.

  Inside a group: softmax attention; across groups: block-constant weights from the groups'
  log-sum-exp scores (`ops.hierarchical_attention`). Non-causal self-attention only: causal and
  cross raise (both undefined for the block-constant projection), as does decoding.
  """

  def __init__(self, d_model: int, num_heads: int, *, group_size: int = 4, causal: bool = False,
               rngs: nnx.Rngs):
    if causal:
      raise PatternUndefinedError("hierarchical: the causal pattern is undefined (block scores average over "
                       "whole groups, including later tokens); use causal=False")
    if group_size < 1:
      raise ValueError(f"hierarchical: group_size must be >= 1, got {group_size}")
    self._proj(d_model, num_heads, rngs)
    self.group_size = group_size

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    _no_decode("hierarchical")

  def __call__(self, x, *, context=None, segment_ids=None, decode=False):
    _check_x("hierarchical", x)
    if decode:
      _no_decode("hierarchical")
    if context is not None:
      raise PatternUndefinedError("hierarchical: cross attention is undefined (one token tree)")
    b, t, _ = x.shape
    q, k, v = self._qkv(x, x)
    groups = jnp.broadcast_to(jnp.arange(t) // self.group_size, (b, t))
    if segment_ids is not None:
      raise NotImplementedError("hierarchical: segment_ids (packed sequences) are not supported")
    o = ops.hierarchical_attention(q, k, v, groups)
    return self.o_proj(o.reshape(b, t, -1))


@register_mixer("hierarchical", "Hierarchical self-attention (Amizadeh et al. 2025, arXiv:2509.15448) (two-level, non-causal).")
def _build_hier(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, **options: Any):
  return HierarchicalAttention(d_model, num_heads, causal=causal, rngs=rngs, **options)


class GaussianAdaptiveAttention(nnx.Module):
  """GAAM mixer (Ioannides et al. 2024, arXiv:2401.11143): `W_out (u * w)`, `u = W_in x`, w = GAAM weights along the sequence per channel.

  Each head's channel chunk has its own `num_gaussians` offsets (init 0) and scales (init 2, one of
  the authors' variants). Causal: prefix statistics and prefix normalisation (`ops.gaam_weights`).
  Cross attention is undefined (GAAM has no queries) and raises; decoding is not supported.
  """

  def __init__(self, d_model: int, num_heads: int, *, num_gaussians: int = 4, causal: bool = True,
               rngs: nnx.Rngs):
    self.num_heads, self.causal = num_heads, causal
    self.in_proj = dense(d_model, d_model, axes=("embed", "heads"), rngs=rngs)
    self.out_proj = dense(d_model, d_model, axes=("heads", "embed"), rngs=rngs)
    self.offsets = nnx.Param(jnp.zeros((num_heads, num_gaussians)), logical_axes=("heads", None))
    self.scales = nnx.Param(jnp.full((num_heads, num_gaussians), 2.0), logical_axes=("heads", None))

  def init_cache(self, batch_size, max_len, dtype=jnp.float32):
    _no_decode("gaam")

  def __call__(self, x, *, context=None, segment_ids=None, decode=False):
    _check_x("gaam", x)
    if context is not None:
      raise PatternUndefinedError("gaam: cross attention is undefined for GAAM (no queries or keys)")
    if decode:
      _no_decode("gaam")
    b, t, d = x.shape
    u = self.in_proj(x).reshape(b, t, self.num_heads, d // self.num_heads)
    outs = [ops.gaussian_adaptive_attention(u[:, :, h], self.offsets[...][h], self.scales[...][h],
                                            axis=1, causal=self.causal, segment_ids=segment_ids)
            for h in range(self.num_heads)]
    return self.out_proj(jnp.stack(outs, axis=2).reshape(b, t, d))


@register_mixer("gaam", "Gaussian adaptive attention (Ioannides et al. 2024, arXiv:2401.11143) along the sequence (causal via prefix stats).")
def _build_gaam(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, **options: Any):
  return GaussianAdaptiveAttention(d_model, num_heads, causal=causal, rngs=rngs, **options)


# --------------------------------------------------------------------------------------------
# Attention pooling layers (not sequence mixers: they map [B, N, C] to one vector).


class EfficientProbe(nnx.Module):
  """EP attentive probe (Psomas et al. 2025, arXiv:2506.10178): `num_queries` learned queries over the frozen tokens, `[B, N, C] -> [B, C / d_out]`.

  Paper defaults: 32 queries, `d_out = 1`, no qkv bias. Feed a linear classifier on top. A pooler,
  not a registered mixer: it returns one vector per example, not one per token (see
  `attnjax.ops.operators.pooling`).
  """

  def __init__(self, dim: int, *, num_queries: int = 32, d_out: int = 1, rngs: nnx.Rngs):
    out = dim // d_out
    if out % num_queries:
      raise ValueError(f"EfficientProbe: dim / d_out = {out} must be divisible by num_queries={num_queries}")
    self.queries = nnx.Param(0.02 * jax.random.normal(rngs.params(), (num_queries, dim)),
                             logical_axes=(None, "embed"))
    self.v_proj = dense(dim, out, axes=("embed", None), rngs=rngs)

  def __call__(self, x, *, mask=None):
    return ops.efficient_probe(x, self.queries[...], self.v_proj.kernel[...], mask=mask)


class LowRankAttentionPooling(nnx.Module):
  """LAMA pooling (Mehta et al. 2019, arXiv:1912.00835): `num_heads` low-rank bilinear attention heads against the mean context.

  `[B, N, D] -> [B, num_heads * D]` (token states from any encoder; the paper uses a BiGRU). A
  pooler, not a registered mixer (one vector per example; see `attnjax.ops.operators.pooling`).
  """

  def __init__(self, dim: int, *, rank: int = 16, num_heads: int = 4, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.u = nnx.Param(init(rngs.params(), (dim, rank)), logical_axes=("embed", None))
    self.v = nnx.Param(init(rngs.params(), (dim, rank)), logical_axes=("embed", None))
    self.p = nnx.Param(init(rngs.params(), (num_heads, rank)), logical_axes=("heads", None))

  def __call__(self, h, *, mask=None):
    return ops.lama_pool(h, self.u[...], self.v[...], self.p[...], mask=mask)[0]
