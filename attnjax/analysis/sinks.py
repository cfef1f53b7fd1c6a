"""Attention-sink probes and the ACT calibration intervention.

* (Gu et al. 2024, arXiv:2410.10781) Gu et al., "When Attention Sink Emerges in Language Models": `sink_rate`.
* (Wong et al. 2025, arXiv:2512.22213) "On the Existence and Behaviour of Secondary Attention Sinks": `sink_scores`,
  `secondary_sinks`, `bos_alignment`, `sinks_by_bos_alignment` (the authors' detector).
* (Guo et al. 2024, arXiv:2410.13835) Guo et al., "Active-Dormant Attention Heads": `sink_mass`, `value_drain`,
  `residual_peak`, `dormant_heads`.
* (Yu et al. 2024, arXiv:2406.15765) Yu et al., "Unveiling and Harnessing Hidden Attention Sinks" (ACT): `act_sink_mask`,
  `act_calibrate`, `act_search_heads`.

Attention weights are `[..., H, Tq, Tk]` arrays whose rows sum to 1 (masked entries 0);
`attnjax.analysis.capture` hands them back from a model.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.analysis._checks import check_attention, check_ndim, check_range


# --- (Gu et al. 2024, arXiv:2410.10781) sink rate ------------------------------------------------------------------------


def sink_rate(attn, *, eps: float = 0.3, k: int = 0):
  """Sink_k^eps = (1/LH) sum_{l,h} 1[alpha^{l,h}_k > eps], averaged over the batch.

  `attn`: `[L, B, H, T, T]` (or `[B, H, T, T]` for one layer) attention weights of a causal LM.
  `k`: the 0-based key position whose sink-ness is measured (the paper's k=1 is the first token,
  `k=0` here). The importance `alpha_k = sum_i A_ik / (T - k)` averages over the `T - k` queries
  that can see key `k`, as the authors' code does (sail-sg/Attention-Sink,
  eval_sink_open_source.py `compute_attention_sink`: `ratios = arange(T, 0, -1)` over keys);
  for k=0 this is the paper's `(1/T) sum_i`. Returns a scalar in [0, 1] (the code reports %).
  Uniform causal attention at T=64 gives (1/64) sum_{i=1}^{64} 1/i ~= 0.074 for k=0, so 0 at
  eps=0.3; a one-hot on token 0 gives 1.
  """
  a = check_attention(attn, "attn", shape_doc="[L, B, H, T, T] or [B, H, T, T]")
  if a.ndim == 4:
    a = a[None]
  if a.ndim != 5:
    raise ValueError(f"attn must be [L, B, H, T, T] or [B, H, T, T], got shape {a.shape}")
  t = a.shape[-2]
  if not 0 <= k < a.shape[-1]:
    raise ValueError(f"k must be in [0, {a.shape[-1]}), got {k}")
  importance = jnp.sum(a[..., :, k], axis=-1) / (t - k)    # [L, B, H]
  return jnp.mean((importance > eps).astype(jnp.float32))


# --- (Wong et al. 2025, arXiv:2512.22213) secondary sinks -------------------------------------------------------------------


def sink_scores(attn, *, query_start: int | None = None):
  """Per-token sink score: mean over heads and later queries of the attention it receives.

  `attn`: `[B, H, T, T]` causal attention weights of one layer. Returns `[B, T]`:
  `score_j = mean_{h, i in Q_j} A^h_{ij}` where `Q_j = {i > j}` (the queries after `j`), or
  `Q = {i >= query_start}` for every `j` when `query_start` is given (same query set for all
  tokens, as when comparing a candidate with BOS). Tokens with no query in `Q_j` score 0.
  From the abstract: the paper's exact query set is not pinned down; "later queries" is read
  as strictly later positions.
  """
  a = check_ndim(attn, 4, "attn", "[B, H, T, T]")
  tq, tk = a.shape[-2:]
  i = jnp.arange(tq)[:, None]
  j = jnp.arange(tk)[None, :]
  sel = (i > j) if query_start is None else jnp.broadcast_to(i >= query_start, (tq, tk))
  count = jnp.sum(sel, axis=0)                              # [Tk]
  total = jnp.sum(jnp.where(sel, a, 0.0), axis=(1, 2))      # [B, Tk]
  return jnp.where(count > 0, total / (a.shape[1] * jnp.maximum(count, 1)), 0.0)


def secondary_sinks(scores, *, threshold: float, bos: int = 0):
  """`[B, T]` bool: non-BOS tokens whose sink score (`sink_scores`) exceeds `threshold`."""
  s = check_ndim(scores, 2, "scores", "[B, T]")
  return (s > threshold) & (jnp.arange(s.shape[1]) != bos)[None]


def bos_alignment(hidden, *, bos: int = 0):
  """Cosine similarity of each residual state with the BOS state: `[B, T, D] -> [B, T]`.

  The paper's mechanism: an MLP aligns `h_j` with the BOS direction, making `j` a secondary sink.
  """
  h = check_ndim(hidden, 3, "hidden", "[B, T, D]").astype(jnp.float32)
  ref = h[:, bos:bos + 1]
  num = jnp.sum(h * ref, -1)
  den = jnp.linalg.norm(h, axis=-1) * jnp.linalg.norm(ref, axis=-1)
  return num / jnp.maximum(den, 1e-12)


def sinks_by_bos_alignment(hidden, *, bos: int = 0, threshold: float = 0.9):
  """Secondary sinks of one layer: tokens after BOS with `|cos(h_j, h_bos)| > threshold`.

  `hidden`: `[B, T, D]` residual states -> `[B, T]` bool. Transcribes the authors' detector
  (JeffreyWong20/Secondary-Attention-Sinks, src/hidden_state_base.py
  `hidden_state_norm_detection`, threshold 0.9, positions after the BOS sink only); run it per
  layer (their "sink clipper" restricts it to the layers between the BOS norm's jump and drop).
  """
  cos = bos_alignment(hidden, bos=bos)
  return (jnp.abs(cos) > threshold) & (jnp.arange(cos.shape[1]) > bos)[None]


# --- (Guo et al. 2024, arXiv:2410.13835) active-dormant heads --------------------------------------------------------------


def sink_mass(attn, *, sink: int = 0):
  """Mean attention each head puts on token `sink`: `[..., H, Tq, Tk] -> [..., H]` (mean over queries)."""
  a = check_attention(attn, "attn")
  return jnp.mean(a[..., sink], axis=-1)


def value_drain(values, *, sink: int = 0):
  """`||v_sink|| / mean_{j != sink} ||v_j||` per head: `values [B, T, H, D] -> [B, H]`.

  Small values (< 1) mean the sink's value vector is drained (a dormant head's no-op target).
  From memory: the mean is over the other tokens.
  """
  v = check_ndim(values, 4, "values", "[B, T, H, D]").astype(jnp.float32)
  n = jnp.linalg.norm(v, axis=-1)                            # [B, T, H]
  others = jnp.arange(v.shape[1]) != sink
  rest = jnp.sum(jnp.where(others[None, :, None], n, 0.0), axis=1) / max(v.shape[1] - 1, 1)
  return n[:, sink] / jnp.maximum(rest, 1e-12)


def residual_peak(hidden, *, sink: int = 0):
  """`||h_sink|| / mean_{j != sink} ||h_j||`: `hidden [B, T, D] -> [B]` (massive residual state)."""
  h = check_ndim(hidden, 3, "hidden", "[B, T, D]").astype(jnp.float32)
  n = jnp.linalg.norm(h, axis=-1)
  others = jnp.arange(h.shape[1]) != sink
  rest = jnp.sum(jnp.where(others[None], n, 0.0), axis=1) / max(h.shape[1] - 1, 1)
  return n[:, sink] / jnp.maximum(rest, 1e-12)


def dormant_heads(attn, *, threshold: float = 0.95, sink: int = 0):
  """`[..., H]` bool: heads whose mean sink mass exceeds `threshold` on this input (dormant)."""
  check_range(threshold, 0.0, 1.0, "threshold")
  return sink_mass(attn, sink=sink) > threshold


# --- (Yu et al. 2024, arXiv:2406.15765) ACT: attention calibration ---------------------------------------------------------


def act_sink_mask(attn, *, threshold: float = 0.1, causal: bool = True):
  """ACT's sinks per head: `[..., H, T, T] -> [..., H, T]` bool.

  Authors' code (GATECH-EIC/ACT, models/llama_modelling_aug.py `atten_process_eval`): key `j`
  is a sink when the attention it receives, summed over queries and divided by the number of
  queries that can see it (`T - j` under a causal mask, `T` otherwise), exceeds `threshold`
  (their scripts use THRES=0.1); the first such key (normally the initial token, a useful
  sink) is dropped from the set, since ACT calibrates only the other ("hidden") sinks.
  """
  a = check_attention(attn, "attn", shape_doc="[..., H, T, T]")
  tq, tk = a.shape[-2:]
  seen_by = (tq - jnp.arange(tk)) if causal else jnp.full((tk,), tq)
  mean = jnp.sum(a, axis=-2) / jnp.maximum(seen_by, 1)
  sinks = mean > threshold
  first = jnp.cumsum(sinks.astype(jnp.int32), axis=-1) == 1
  return sinks & ~(first & sinks)


def act_calibrate(attn, sink_mask, *, beta: float = 0.4, heads=None):
  """ACT: scale sink columns by `beta` and give the freed mass to the other keys pro rata.

  `attn`: `[..., H, Tq, Tk]`; `sink_mask`: `[..., H, Tk]` bool (e.g. `act_sink_mask`); `heads`:
  `[..., H]` bool or None (all heads), the heads chosen on a calibration set. For a selected
  head and query row `i`: `A'_ij = beta A_ij` for sinks `j`, and
  `A'_ij = A_ij + (1-beta) (sum_{s sink} A_is) A_ij / sum_{j' not sink} A_ij'` otherwise, so
  rows keep their sums; rows with no non-sink mass are left as they are. `beta=1` is a no-op.
  The authors force row 0 to a one-hot on key 0; under a causal mask row 0 already is one.
  """
  a = check_attention(attn, "attn")
  check_range(beta, 0.0, 1.0, "beta")
  sm = jnp.asarray(sink_mask, bool)
  if sm.shape != a.shape[:-2] + a.shape[-1:]:
    raise ValueError(f"sink_mask must be {a.shape[:-2] + a.shape[-1:]} ([..., H, Tk]), got {sm.shape}")
  s = sm[..., None, :]
  sink_part = jnp.where(s, a, 0.0)
  rest = a - sink_part
  rest_sum = jnp.sum(rest, axis=-1, keepdims=True)
  freed = (1.0 - beta) * jnp.sum(sink_part, axis=-1, keepdims=True)
  has_rest = rest_sum > 0
  out = beta * sink_part + rest + freed * rest / jnp.where(has_rest, rest_sum, 1.0)
  out = jnp.where(has_rest, out, a)
  if heads is not None:
    hm = jnp.asarray(heads, bool)
    if hm.shape != a.shape[-3:-2] and hm.shape != a.shape[:-2]:
      raise ValueError(f"heads must be [H]={a.shape[-3:-2]} or {a.shape[:-2]} bool, got {hm.shape}")
    out = jnp.where(hm[..., None, None], out, a)
  return out


def act_search_heads(score_fn: Callable[[np.ndarray], float], num_layers: int, num_heads: int):
  """ACT's head search: a head is kept when calibrating it alone beats the uncalibrated score.

  `score_fn(heads [L, H] bool) -> float` runs the model on the calibration set with ACT applied
  to the given heads (higher is better). Returns `[L, H]` bool. The authors' scripts loop over
  single (layer, head) pairs the same way (scripts/calibration.sh, one run per head).
  """
  base = float(score_fn(np.zeros((num_layers, num_heads), bool)))
  keep = np.zeros((num_layers, num_heads), bool)
  for layer in range(num_layers):
    for head in range(num_heads):
      trial = np.zeros((num_layers, num_heads), bool)
      trial[layer, head] = True
      keep[layer, head] = float(score_fn(trial)) > base
  return keep
