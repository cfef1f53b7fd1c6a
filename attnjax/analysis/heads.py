"""Per-head probes: entropy, spectral reparametrisation, importance, distance, retrieval, influence.

* (Jha & Reagen 2025, arXiv:2501.03489) Entropy-Guided Attention for Private LLMs: `head_entropy`, `entropy_regularizer`.
* (Zhai et al. 2023, arXiv:2303.06296) sigmaReparam (Zhai et al.): `spectral_norm`, `sigma_reparam`.
* (Li et al. 2023, arXiv:2303.13731) How Does Attention Work in Vision Transformers?: `head_importance`,
  `mean_attention_distance`, `attention_by_offset`.
* (Wu et al. 2024, arXiv:2404.15574) Retrieval heads (Wu et al.): `retrieval_scores`, `retrieval_heads`.
* (Hua et al. 2025, arXiv:2505.07293) AttentionInfluence: `attention_influence`.

Head-masking probes take a function `loss_fn(head_scale [L, H]) -> loss` that runs the model with
per-head output multipliers (`attnjax.analysis.capture.with_head_scale` builds one from a model).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.analysis._checks import check_attention, check_ndim, xlogx


# --- (Jha & Reagen 2025, arXiv:2501.03489) entropy ---------------------------------------------------------------------------


def head_entropy(attn, *, query_mask=None):
  """Mean row entropy per head: `H^h = mean_i -sum_j A_ij log A_ij`; `[B, H, Tq, Tk] -> [H]`.

  `query_mask`: `[Tq]` or `[B, Tq]` bool, the rows to average (default all). Uniform rows over
  `T` keys give `log T`, one-hot rows 0 (0 log 0 = 0).
  """
  a = check_ndim(attn, 4, "attn", "[B, H, Tq, Tk]")
  ent = -jnp.sum(xlogx(a.astype(jnp.float32)), axis=-1)    # [B, H, Tq]
  if query_mask is None:
    return jnp.mean(ent, axis=(0, 2))
  m = jnp.broadcast_to(jnp.asarray(query_mask, bool).reshape(
      (-1, 1, a.shape[2]) if jnp.ndim(query_mask) == 2 else (1, 1, a.shape[2])), ent.shape)
  return jnp.sum(jnp.where(m, ent, 0.0), axis=(0, 2)) / jnp.maximum(jnp.sum(m, axis=(0, 2)), 1)


def entropy_regularizer(attn, theta, *, lam: float = 1e-5, gamma: float = 0.2,
                        context_size: int | None = None):
  """Entropy regulariser of [34], as the authors' code computes it.

  Transcribes `EntropyRegularization.compute_loss` (Nandan91/transformer-entropy-regularization):
  per query row, the deviation `d = H_i - theta^{l,h} H_max` of the row entropy from the head's
  learnable threshold (a fraction of `H_max = log(context_size)`, default `log Tk`) is penalised
  by `d^2` where `|d| > gamma H_max` and 0 inside the band; summed over batch and queries,
  averaged over heads and layers, times `lam`. (Our transcription writes `max(0, |d| - gamma H_max)^2`
  with a mean over rows; the code squares the whole deviation and sums rows.)

  `attn`: `[L, B, H, Tq, Tk]` (or `[B, H, Tq, Tk]` for one layer); `theta`: `[L, H]` or `[H]`
  (shared across layers, as in the code). Returns a scalar; differentiable in `attn`, `theta`.
  """
  a = check_attention(attn, "attn", shape_doc="[L, B, H, Tq, Tk] or [B, H, Tq, Tk]")
  if a.ndim == 4:
    a = a[None]
  if a.ndim != 5:
    raise ValueError(f"attn must be [L, B, H, Tq, Tk] or [B, H, Tq, Tk], got shape {a.shape}")
  th = jnp.asarray(theta, jnp.float32)
  th = jnp.broadcast_to(th, (a.shape[0], a.shape[2])) if th.shape in ((a.shape[2],), (a.shape[0], a.shape[2])) \
      else None
  if th is None:
    raise ValueError(f"theta must be [L, H]=({a.shape[0]}, {a.shape[2]}) or [H], got {jnp.shape(theta)}")
  h_max = jnp.log(float(context_size or a.shape[-1]))
  ent = -jnp.sum(xlogx(a.astype(jnp.float32)), axis=-1)      # [L, B, H, Tq]
  dev = ent - (th * h_max)[:, None, :, None]
  pen = jnp.where(jnp.abs(dev) > gamma * h_max, dev, 0.0) ** 2
  return lam * jnp.mean(jnp.sum(pen, axis=(1, 3)))


# --- (Zhai et al. 2023, arXiv:2303.06296) sigmaReparam ----------------------------------------------------------------------


def spectral_norm(w, u, *, num_iters: int = 1):
  """Power iteration for the top singular value: `(sigma, u_new)`.

  `w`: `[in, out]` kernel (the layer computes `x @ w`); `u`: `[out]` the running left vector
  (kept between steps, one iteration per update in the paper). `v = normalize(w u)`,
  `u = normalize(w^T v)`, `sigma = v^T w u`. Gradients do not flow through `u`, `v`.
  """
  w = check_ndim(w, 2, "w", "[in, out]").astype(jnp.float32)
  u = jnp.asarray(u, jnp.float32)
  if u.shape != (w.shape[1],):
    raise ValueError(f"u must be [out]=({w.shape[1]},), got {u.shape}")

  def step(_, uu):
    v = w @ uu
    v = v / jnp.maximum(jnp.linalg.norm(v), 1e-12)
    uu = w.T @ v
    return uu / jnp.maximum(jnp.linalg.norm(uu), 1e-12)

  u = jax.lax.stop_gradient(jax.lax.fori_loop(0, num_iters, step, u))
  v = jax.lax.stop_gradient(w @ u)
  v = v / jnp.maximum(jnp.linalg.norm(v), 1e-12)
  return v @ w @ u, u


def sigma_reparam(w, gamma, u, *, num_iters: int = 1):
  """`W_hat = (gamma / sigma(W)) W` and the updated power-iteration vector: `(W_hat, u_new)`."""
  sigma, u = spectral_norm(w, u, num_iters=num_iters)
  return (gamma / sigma) * jnp.asarray(w, jnp.float32), u


# --- (Li et al. 2023, arXiv:2303.13731) head importance, attention distance --------------------------------------------------


def head_importance(loss_fn: Callable[[jax.Array], jax.Array], num_layers: int, num_heads: int):
  """`I^{l,h} = loss(head (l, h) masked) - loss(no head masked)`: `[L, H]`.

  `loss_fn(head_scale [L, H]) -> scalar`: the model's loss with per-head output multipliers
  (1 = kept, 0 = masked). One forward per head plus the baseline.
  """
  ones = jnp.ones((num_layers, num_heads), jnp.float32)
  base = loss_fn(ones)
  out = np.zeros((num_layers, num_heads), np.float32)
  for layer in range(num_layers):
    for head in range(num_heads):
      out[layer, head] = float(loss_fn(ones.at[layer, head].set(0.0)) - base)
  return jnp.asarray(out)


def grid_positions(height: int, width: int, *, patch_size: float = 1.0):
  """`[height*width, 2]` float (row, col) patch centres in pixels (`patch_size` per patch)."""
  r, c = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return jnp.asarray(np.stack([r.ravel(), c.ravel()], -1) * patch_size, jnp.float32)


def mean_attention_distance(attn, positions):
  """Mean attention distance per head: `mean_i sum_j A_ij ||p_i - p_j||`, `[B, H, N, N] -> [H]`.

  `positions`: `[N, 2]` patch coordinates (`grid_positions`; drop the class token from `attn`
  first). Uniform attention gives the mean pairwise patch distance (over all N^2 pairs).
  """
  a = check_ndim(attn, 4, "attn", "[B, H, N, N]")
  p = check_ndim(positions, 2, "positions", "[N, 2]").astype(jnp.float32)
  if p.shape[0] != a.shape[-1] or a.shape[-1] != a.shape[-2]:
    raise ValueError(f"positions must be [N, 2] with N={a.shape[-1]} and attn square, got "
                     f"positions {p.shape}, attn {a.shape}")
  d = jnp.sqrt(jnp.sum((p[:, None] - p[None]) ** 2, -1))
  return jnp.mean(jnp.sum(a * d, -1), axis=(0, 2))


def attention_by_offset(attn, height: int, width: int):
  """Mean attention at each spatial offset per head: `[B, H, N, N] -> [H, 2h-1, 2w-1]`.

  Entry `[h, dy + height - 1, dx + width - 1]` averages `A_ij` over pairs with
  `p_j - p_i = (dy, dx)`.
  """
  a = check_ndim(attn, 4, "attn", "[B, H, N, N]")
  n = height * width
  if a.shape[-1] != n or a.shape[-2] != n:
    raise ValueError(f"attn must be [B, H, {n}, {n}] for a {height}x{width} grid, got {a.shape}")
  r, c = np.divmod(np.arange(n), width)
  idx = (r[None] - r[:, None] + height - 1) * (2 * width - 1) + (c[None] - c[:, None] + width - 1)
  bins = (2 * height - 1) * (2 * width - 1)
  mean_a = jnp.mean(a, axis=0).reshape(a.shape[1], -1)
  sums = jax.vmap(lambda x: jnp.zeros(bins).at[idx.ravel()].add(x))(mean_a)
  counts = np.bincount(idx.ravel(), minlength=bins)
  return (sums / counts).reshape(a.shape[1], 2 * height - 1, 2 * width - 1)


# --- (Wu et al. 2024, arXiv:2404.15574) retrieval heads -----------------------------------------------------------------


def retrieval_scores(step_attn, generated, context_tokens, needle_span: tuple[int, int], *,
                     topk: int = 1):
  """Retrieval score per head: `[S, L, H, Tk]` -> `[L, H]`.

  `step_attn`: each decoding step's attention row (the newest query) for every layer and head;
  `generated`: `[S]` the token produced at each step; `context_tokens`: `[Tk]` the token at each
  attended position; `needle_span = (start, end)`. At each step a head scores `1/|needle|` when
  one of its top-`topk` attended positions lies in the needle and holds the generated token
  (copy-paste); at most once per step. Transcribes `retrieval_calculate` of the authors' code
  (nightdessert/Retrieval_Head, retrieval_head_detection.py). A head is a retrieval head when
  its score, averaged over successful retrievals, exceeds 0.1 (`retrieval_heads`).
  """
  a = check_ndim(step_attn, 4, "step_attn", "[S, L, H, Tk]")
  gen = jnp.asarray(generated)
  ctx = jnp.asarray(context_tokens)
  start, end = needle_span
  if not 0 <= start < end <= a.shape[-1]:
    raise ValueError(f"needle_span must satisfy 0 <= start < end <= {a.shape[-1]}, got {needle_span}")
  if gen.shape != (a.shape[0],) or ctx.shape != (a.shape[-1],):
    raise ValueError(f"generated must be [S]=({a.shape[0]},) and context_tokens [Tk]=({a.shape[-1]},),"
                     f" got {gen.shape}, {ctx.shape}")
  _, idx = jax.lax.top_k(a, topk)                            # [S, L, H, k]
  in_needle = (idx >= start) & (idx < end)
  copies = ctx[idx] == gen[:, None, None, None]
  hit = jnp.any(in_needle & copies, axis=-1)                 # [S, L, H]
  return jnp.sum(hit, axis=0) / (end - start)


def retrieval_heads(scores, *, threshold: float = 0.1):
  """`[L, H]` bool: heads whose retrieval score exceeds `threshold` (0.1 in the paper)."""
  return jnp.asarray(scores) > threshold


# --- (Hua et al. 2025, arXiv:2505.07293) AttentionInfluence -----------------------------------------------------------------


def attention_influence(loss_fn: Callable[[jax.Array], jax.Array], heads):
  """`(L_masked(x) - L_base(x)) / L_base(x)` per sample, with the heads in `heads` masked.

  `loss_fn(head_scale [L, H]) -> [B]` per-sample losses with per-head output multipliers;
  `heads`: `[L, H]` bool, the (retrieval) heads to mask. Rank pretraining samples by the
  result (larger = the sample leans more on those heads). No heads masked gives 0.
  """
  hm = jnp.asarray(heads, bool)
  if hm.ndim != 2:
    raise ValueError(f"heads must be [L, H] bool, got shape {hm.shape}")
  base = loss_fn(jnp.ones(hm.shape, jnp.float32))
  masked = loss_fn(jnp.where(hm, 0.0, 1.0))
  return (masked - base) / base
