"""Corrections and inference schemes on top of a sparse pass.

* Rectified SpaAttn (Liu et al. 2025, arXiv:2511.19835): pooled-QK block selection, then IPAR (rescale the critical blocks'
  softmax by the estimated share of the full normaliser) and GAPR (add pooled estimates of the
  non-critical blocks where the estimated gain beats the pooling error).
* Recycled Attention (Xu et al. 2024, arXiv:2411.05787): decoding that alternates full steps (which record the top-K keys per GQA
  group) with recycled steps (only those keys plus the tokens generated since).
* HyLRA (Ai et al. 2026, arXiv:2602.00777): per-layer policy (full vs reuse) chosen by a dynamic program; full layers pass their
  top-k key indices to the following reuse layers.
* Flux Attention (Qiu et al. 2026, arXiv:2604.07394): a router on the pooled context picks full or sparse attention per layer and
  input (Gumbel-sigmoid relaxation in training, hard at inference).
Re-ttention (Chen et al. 2025, arXiv:2505.22918) and the top-k primitives live in `dynamic.py`.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.ops import block_sparse
from attnjax.ops import dispatch
from attnjax.ops import layout as L
from attnjax.ops.softmax import dot_product_attention
from attnjax.ops.sparse import dynamic


def _check_bthd(q, k, v):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or v.shape[:3] != k.shape[:3] or (
      q.shape[0] != k.shape[0]) or q.shape[-1] != k.shape[-1] or q.shape[2] % k.shape[2]:
    raise ValueError(f"q, k, v must be [B, Tq, H, D], [B, Tk, Hk, D], [B, Tk, Hk, Dv] with "
                     f"H % Hk == 0, got {q.shape}, {k.shape}, {v.shape}")


# ---------------------------------------------------------------------------------------------
# Rectified SpaAttn
# ---------------------------------------------------------------------------------------------


def _block_pool(x, block):
  """`[B, T, Hx, D] -> (means [B, Hx, n, D] float32, sizes [n])` over blocks of `block` tokens."""
  b, t, hx, d = x.shape
  n = -(-t // block)
  xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n * block - t), (0, 0), (0, 0)))
  sizes = np.minimum(block, t - np.arange(n) * block).astype(np.float32)
  means = xp.reshape(b, n, block, hx, d).sum(2) / sizes[None, :, None, None]
  return means.transpose(0, 2, 1, 3), sizes


def pooled_block_selection(q, k, *, block: int, top_k: int):
  """`[B, H, nQ, nK]` bool: per query block, the `top_k` key blocks with the largest pooled score
  `mean(Q_I) . mean(K_J)` (the block-sparse selection Rectified SpaAttn sits on). Detached."""
  h, hk = q.shape[2], k.shape[2]
  qm, _ = _block_pool(jax.lax.stop_gradient(q), block)
  km, _ = _block_pool(jax.lax.stop_gradient(k), block)
  score = jnp.einsum("bhid,bhjd->bhij", qm, jnp.repeat(km, h // hk, axis=1))
  nk = score.shape[-1]
  _, idx = jax.lax.top_k(score, min(top_k, nk))
  return (idx[..., None] == jnp.arange(nk)).any(-2)


def rectified_spaattn(q, k, v, *, block: int, top_k: int, scale=None, ipar: bool = True,
                      gapr: bool = True, implementation: str | None = None,
                      return_row_mass: bool = False):
  """Rectified SpaAttn (Liu et al. 2025, arXiv:2511.19835) on `[B, T, H, D]` (non-causal, video DiT attention).

  Critical key blocks `C(I)` of query block I: `pooled_block_selection`. The sparse pass gives
  `O_s` and `lse_s` over them. Each non-critical block J is summarised by its pooled key/value
  (`k_J`, `v_J`, `n_J` tokens) and its estimated mass for query i is `m_iJ = n_J exp(scale q_i.k_J)`
  (exact when J's keys are all equal), so the implicit full normaliser is
  `Z_i = exp(lse_s) + sum_{J not in C} m_iJ`.

  * IPAR: the sparse softmax over-weights the critical keys by `Z_i / exp(lse_s)`; the output is
    rescaled by `exp(lse_s) / Z_i` (pooling isolated per block: no pooled block straddles two
    blocks; put modality boundaries on block boundaries to isolate text from video as the paper).
  * GAPR: a non-critical block's pooled contribution `m_iJ v_J / Z_i` is added where its gain beats
    its pooling error, read here as `|v_J| > sqrt(mean_{j in J} |v_j - v_J|^2)` (the restored value
    mass exceeds the within-block dispersion that pooling ignores).

  Reading ("from abstract + summary"; the exact gain/error estimators and the error-aware reweighting
  of the paper are not reproduced): `o_i = exp(lse_s - log Z_i) O_s,i + sum_{J added} m_iJ v_J / Z_i`.
  Without IPAR the added blocks join the normaliser instead (`Z_i` sums only what is used).
  Oracles: every block critical gives exact attention; with block-constant keys and values the
  pooled estimates are exact and the output is exact attention for any selection; the row mass
  `exp(lse_s)/Z + sum_added m/Z` is <= 1 and is 1 when every non-critical block is added.
  `implementation` goes to the sparse pass's `block_sparse_attention` ("reference": dense mask).
  Returns `o`, or
  `(o, row_mass [B, H, Tq])` with `return_row_mass`.
  """
  _check_bthd(q, k, v)
  if block < 1 or top_k < 1:
    raise ValueError(f"block and top_k must be >= 1, got {block}, {top_k}")
  dispatch.check_implementation(implementation, op="rectified_spaattn")
  fn = functools.partial(block_sparse.block_sparse_attention, implementation=implementation)
  b, tq, h, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  scale = d ** -0.5 if scale is None else float(scale)
  crit = pooled_block_selection(q, k, block=block, top_k=top_k)            # [B, H, nQ, nK]
  nk = crit.shape[-1]
  lay = L.from_block_mask(crit, None, block_q=block, block_k=block, tq=tq, tk=tk,
                          max_kv=min(top_k, nk))
  o_s, lse_s = fn(q, k, v, lay, scale=scale, return_lse=True)
  km, sizes = _block_pool(k, block)                                         # [B, Hk, nK, D]
  vm, _ = _block_pool(v, block)
  g = h // hk
  km, vm = jnp.repeat(km, g, axis=1), jnp.repeat(vm, g, axis=1)
  log_m = (jnp.einsum("bqhd,bhjd->bhqj", q.astype(jnp.float32), km) * scale
           + jnp.log(sizes))                                                # [B, H, Tq, nK]
  crit_tok = jnp.repeat(crit, block, axis=2)[:, :, :tq]                     # [B, H, Tq, nK]
  # Pooling error of each key block: RMS distance of its values to their mean.
  vp = jnp.pad(v.astype(jnp.float32), ((0, 0), (0, nk * block - tk), (0, 0), (0, 0)))
  dev = vp.reshape(b, nk, block, hk, -1) - vm[:, ::g].transpose(0, 2, 1, 3)[:, :, None]
  valid = (np.arange(nk * block) < tk).reshape(nk, block)
  err = jnp.sqrt(jnp.sum(jnp.where(valid[None, :, :, None, None], dev ** 2, 0.0), (2, 4))
                 / sizes[None, :, None])                                    # [B, nK, Hk]
  gain = jnp.linalg.norm(vm, axis=-1)                                       # [B, H, nK]
  passes = gain > jnp.repeat(err.transpose(0, 2, 1), g, axis=1)             # [B, H, nK]
  add = ~crit_tok & (passes[:, :, None, :] if gapr else False)
  in_z = ~crit_tok if ipar else add
  lse_terms = jnp.concatenate([lse_s[..., None], jnp.where(in_z, log_m, -jnp.inf)], -1)
  log_z = jax.nn.logsumexp(lse_terms, axis=-1)                              # [B, H, Tq]
  log_z = jnp.where(jnp.isfinite(log_z), log_z, 0.0)
  w_s = jnp.where(jnp.isfinite(lse_s), jnp.exp(lse_s - log_z), 0.0)
  w_add = jnp.where(add, jnp.exp(log_m - log_z[..., None]), 0.0)            # [B, H, Tq, nK]
  o = (w_s.transpose(0, 2, 1)[..., None] * o_s.astype(jnp.float32)
       + jnp.einsum("bhqj,bhjd->bqhd", w_add, vm))
  o = o.astype(q.dtype)
  if return_row_mass:
    return o, w_s + w_add.sum(-1)
  return o


# ---------------------------------------------------------------------------------------------
# Recycled Attention
# ---------------------------------------------------------------------------------------------


def recycled_decode(q, k, v, *, prompt_len: int, stride: int, top_k: int, scale=None):
  """Recycled Attention (Xu et al. 2024, arXiv:2411.05787) over `N` decode steps, as one scan.

  `q [B, N, H, D]` are the queries of positions `prompt_len + n`; `k, v [B, prompt_len + N, Hk, D]`
  hold every key (position p sees keys `j <= p`). Step n is a full step when `n % stride == 0`: it
  attends every visible key and records the `top_k` keys with the largest attention mass summed over
  its GQA group (`recycled indices [B, Hk, top_k]`); the other steps attend only the recorded keys
  plus the keys generated after the last full step. Oracles: `stride=1` or `top_k >= prompt_len + N`
  is full causal attention. Returns `(o [B, N, H, Dv], full_step [N] bool)`. Dense per step
  (O(T) memory per step: a decoding reference; the cache-sized fast path gathers the K keys as
  `dynamic.attend_to_indices` does).
  """
  _check_bthd(q, k, v)
  b, n, h, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  if tk != prompt_len + n or prompt_len < 1:
    raise ValueError(f"k must hold prompt_len + N = {prompt_len} + {n} keys (prompt_len >= 1), got "
                     f"{tk}")
  if stride < 1 or top_k < 1:
    raise ValueError(f"stride and top_k must be >= 1, got {stride}, {top_k}")
  scale = d ** -0.5 if scale is None else float(scale)
  g = h // hk
  kk = min(top_k, tk)
  j = jnp.arange(tk)

  def step(carry, inp):
    idx, last_full = carry
    qn, t = inp                                                     # [B, H, D], step index
    pos = prompt_len + t
    s = jnp.einsum("bhd,bjhd->bhj", qn.astype(jnp.float32),
                   jnp.repeat(k, g, axis=2).astype(jnp.float32)) * scale
    visible = j <= pos
    full = t % stride == 0
    member = (jnp.zeros((b, hk, tk), bool).at[jnp.arange(b)[:, None, None],
                                              jnp.arange(hk)[None, :, None], idx].set(True))
    recycled = jnp.repeat(member, g, axis=1) | (j > last_full)
    mask = visible & jnp.where(full, True, recycled)
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), -1)
    o = jnp.einsum("bhj,bjhd->bhd", p, jnp.repeat(v, g, axis=2).astype(jnp.float32))
    mass = p.reshape(b, hk, g, tk).sum(2)
    new_idx = jax.lax.top_k(jnp.where(visible, mass, -1.0), kk)[1].astype(jnp.int32)
    idx = jnp.where(full, new_idx, idx)
    last_full = jnp.where(full, pos, last_full)
    return (idx, last_full), o

  init = (jnp.zeros((b, hk, kk), jnp.int32), jnp.asarray(prompt_len - 1))
  _, o = jax.lax.scan(step, init, (q.transpose(1, 0, 2, 3), jnp.arange(n)))
  return o.transpose(1, 0, 2, 3).astype(q.dtype), np.arange(n) % stride == 0


# ---------------------------------------------------------------------------------------------
# HyLRA
# ---------------------------------------------------------------------------------------------


def hylra_policy(reuse_score, num_full: int) -> np.ndarray:
  """HyLRA's offline dynamic program: `[L]` bool, True = full layer.

  `reuse_score [L, L]` (host array): `reuse_score[i, j]` (i < j) is how well layer j does when it
  reuses layer i's top-k indices (e.g. the attention mass they recover on calibration data). Layer
  0 is always full; exactly `num_full` layers are full, and the choice maximises the sum over reuse
  layers j of `reuse_score[last full layer before j, j]`. O(L^2 * num_full).
  """
  s = np.asarray(reuse_score, np.float64)
  n_layers = s.shape[0]
  if s.shape != (n_layers, n_layers) or not 1 <= num_full <= n_layers:
    raise ValueError(f"reuse_score must be [L, L] and 1 <= num_full <= L, got {s.shape}, {num_full}")
  # seg[i, e]: value of layers i+1..e-1 all reusing full layer i.
  seg = np.zeros((n_layers, n_layers + 1))
  for i in range(n_layers):
    for e in range(i + 1, n_layers + 1):
      seg[i, e] = s[i, i + 1:e].sum()
  # best[c, i]: best value of layers i.. when layer i is full and c full layers remain (incl. i).
  best = np.full((num_full + 1, n_layers + 1), -np.inf)
  choice = np.zeros((num_full + 1, n_layers + 1), np.int64)
  for i in range(n_layers - 1, -1, -1):
    best[1, i] = seg[i, n_layers]
    choice[1, i] = n_layers
    for c in range(2, num_full + 1):
      for nxt in range(i + 1, n_layers):
        val = seg[i, nxt] + best[c - 1, nxt]
        if val > best[c, i]:
          best[c, i], choice[c, i] = val, nxt
  if not np.isfinite(best[num_full, 0]):
    raise ValueError(f"no policy with {num_full} full layers over {n_layers} layers")
  policy = np.zeros(n_layers, bool)
  i, c = 0, num_full
  while i < n_layers:
    policy[i] = True
    i, c = choice[c, i], c - 1
  return policy


def hylra_policy_score(reuse_score, policy) -> float:
  """The DP objective of a policy (for checks and reporting)."""
  s = np.asarray(reuse_score, np.float64)
  last, total = None, 0.0
  for j, full in enumerate(np.asarray(policy, bool)):
    if full:
      last = j
    else:
      if last is None:
        return -np.inf
      total += s[last, j]
  return total


def hylra_layer(q, k, v, *, full: bool, top_k: int, indices=None, causal: bool = True,
                scale=None):
  """One HyLRA (Ai et al. 2026, arXiv:2602.00777) layer: `(o, indices)`. A full layer computes dense attention and the top-k
  keys by attention mass (`dynamic.topk_key_indices`, per GQA group, over its queries); a reuse
  layer attends only to `indices [B, Hk, K]` from the last full layer (and passes them on).
  Oracles: all layers full, or `top_k >= Tk`, is dense attention."""
  _check_bthd(q, k, v)
  if full:
    o = dot_product_attention(q, k, v, causal=causal, scale=scale, implementation="reference")
    return o, dynamic.topk_key_indices(q, k, top_k, causal=causal, scale=scale)
  if indices is None:
    raise ValueError("a reuse layer needs the indices of a previous full layer")
  return dynamic.attend_to_indices(q, k, v, indices, causal=causal, scale=scale), indices


# ---------------------------------------------------------------------------------------------
# Flux Attention
# ---------------------------------------------------------------------------------------------


def pooled_context(x, *, causal: bool):
  """Router input: `x [B, T, ...]` averaged over tokens, `[B, T, F]` (features flattened). Causal:
  the running mean of the prefix (so that token i's decision never reads the future; at the last
  prompt token it equals the whole-prompt pooling the paper routes on); else the global mean."""
  b, t = x.shape[:2]
  x = x.reshape(b, t, -1).astype(jnp.float32)
  if causal:
    return jnp.cumsum(x, 1) / jnp.arange(1, t + 1, dtype=jnp.float32)[None, :, None]
  return jnp.broadcast_to(x.mean(1, keepdims=True), x.shape)


def flux_gate(logits, *, key=None, temperature: float = 1.0, hard: bool = False):
  """Probability of the full branch from router logits (any shape). Training: the Gumbel-sigmoid
  (binary concrete) relaxation `sigmoid((logit + l) / temperature)`, `l ~ Logistic(0, 1)` from
  `key`; without `key`, `sigmoid(logit / temperature)`. `hard=True` returns `1[logit + l > 0]` in
  the forward pass with the relaxed gradient (straight-through), as at inference."""
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  z = logits.astype(jnp.float32)
  if key is not None:
    z = z + jax.random.logistic(key, z.shape)
  soft = jax.nn.sigmoid(z / temperature)
  if not hard:
    return soft
  return soft + jax.lax.stop_gradient((z > 0).astype(jnp.float32) - soft)


def flux_attention(q, k, v, gate, *, sparse_fn: Callable, causal: bool = True, scale=None,
                   **kwargs):
  """Flux Attention (Qiu et al. 2026, arXiv:2604.07394): `gate * full + (1 - gate) * sparse`, `gate [B] | [B, Tq]` in [0, 1] (from
  `flux_gate`); `sparse_fn(q, k, v, causal=..., scale=..., **kwargs)` is the sparse branch (e.g. a
  sliding window or any block-sparse pattern). A hard gate of 1 is exactly the base (full) model
  (the defining property). Both branches are evaluated here; a serving stack runs only the chosen one."""
  _check_bthd(q, k, v)
  gate = jnp.asarray(gate, jnp.float32)
  b, tq = q.shape[:2]
  if gate.shape not in ((b,), (b, tq)):
    raise ValueError(f"gate must be [B] or [B, Tq] = [{b}] or [{b}, {tq}], got {gate.shape}")
  g = gate.reshape(b, -1)[:, :, None, None]
  full = dot_product_attention(q, k, v, causal=causal, scale=scale, **kwargs)
  sparse = sparse_fn(q, k, v, causal=causal, scale=scale, **kwargs)
  return (g * full.astype(jnp.float32) + (1 - g) * sparse.astype(jnp.float32)).astype(q.dtype)
