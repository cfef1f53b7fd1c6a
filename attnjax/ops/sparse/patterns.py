"""Static sparse patterns, each a host-built `BlockLayout` (numpy, exact `max_kv`).

Every builder returns the tightest layout for its token-level rule (`layout.from_rule`), so the
dense-masked oracle is `layout.dense_mask(lay)`; block-granular patterns (PowerAttention, S2) use a
causal rule only on their diagonal blocks. All are causal unless stated.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from attnjax.ops import layout as L
from attnjax.ops.layout import MaskRule


def _check_pos(**kw):
  for name, v in kw.items():
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
      raise ValueError(f"{name} must be an int >= 0, got {v!r}")


def causal_layout(t: int, block: int = 128, tk: int | None = None) -> L.BlockLayout:
  """Causal (bottom-right aligned when `tk != t`)."""
  tk = t if tk is None else tk
  return L.from_rule(L.CausalRule(tk - t), block_q=block, block_k=block, tq=t, tk=tk)


def sliding_window_layout(t: int, left: int, right: int | None = 0, block: int = 128):
  """Sliding window: key j visible iff `i - left <= j <= i + right` (right=0: causal window)."""
  _check_pos(left=left)
  if right is not None:
    _check_pos(right=right)
  return L.from_rule(L.WindowRule(left, right, 0), block_q=block, block_k=block, tq=t, tk=t)


def sink_local_layout(t: int, num_sink: int, window: int, block: int = 128):
  """StreamingLLM-style: causal AND (first `num_sink` keys OR the last `window` keys incl. self)."""
  _check_pos(num_sink=num_sink, window=window)
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  rule = L.ComposedRule((L.CausalRule(0), L.AnyRule((L.SinkRule(num_sink),
                                                      L.WindowRule(window - 1, 0)))))
  return L.from_rule(rule, block_q=block, block_k=block, tq=t, tk=t)


@dataclasses.dataclass(frozen=True)
class StridedRule(MaskRule):
  """Sparse Transformer "strided": causal AND (within `local` keys OR `(i - j) % stride == 0`)."""
  stride: int
  local: int

  def __call__(self, q_idx, k_idx):
    diff = q_idx - k_idx
    return (diff >= 0) & ((diff < self.local) | (diff % self.stride == 0))


@dataclasses.dataclass(frozen=True)
class DilatedWindowRule(MaskRule):
  """Causal dilated window: `0 <= i - j < window * dilation` and `(i - j) % dilation == 0`."""
  window: int
  dilation: int

  def __call__(self, q_idx, k_idx):
    diff = q_idx - k_idx
    return (diff >= 0) & (diff < self.window * self.dilation) & (diff % self.dilation == 0)


def strided_layout(t: int, stride: int, local: int, block: int = 128):
  """Strided pattern (Child et al. 2019), one layout for both of its heads' patterns combined."""
  if stride < 1 or local < 1:
    raise ValueError(f"stride and local must be >= 1, got {stride}, {local}")
  return L.from_rule(StridedRule(stride, local), block_q=block, block_k=block, tq=t, tk=t)


def dilated_layout(t: int, window: int, dilation: int, block: int = 128):
  """Dilated causal sliding window (`window` keys spaced by `dilation`)."""
  if window < 1 or dilation < 1:
    raise ValueError(f"window and dilation must be >= 1, got {window}, {dilation}")
  return L.from_rule(DilatedWindowRule(window, dilation), block_q=block, block_k=block, tq=t, tk=t)


def power_attention_block_mask(num_blocks: int, num_sink_blocks: int = 1) -> np.ndarray:
  """PowerAttention (Chen et al. 2025, arXiv:2503.03588): block i sees block j iff `i - j in {0, 1} U {2^m}` or j is a sink block."""
  i = np.arange(num_blocks)[:, None]
  j = np.arange(num_blocks)[None, :]
  diff = i - j
  power = (diff > 0) & ((diff & (diff - 1)) == 0)
  return (diff >= 0) & ((diff <= 1) | power | (j < num_sink_blocks))


def power_attention_layout(t: int, block: int = 128, num_sink_blocks: int = 1):
  """PowerAttention (Chen et al. 2025, arXiv:2503.03588) as a causal block layout (diagonal blocks partial, the rest full).

  Reading: the spec's "i - j in {0, 1} U {2^m} (+ sink block)" at block granularity; 2^0 = 1
  already covers the neighbour block. A reading from the abstract and memory: the paper's
  exact sink/local sizes are not verified here.
  """
  nb = -(-t // block)
  bm = power_attention_block_mask(nb, num_sink_blocks)
  diag = np.eye(nb, dtype=bool)
  return L.from_block_mask(bm[None, None], diag[None, None], block_q=block, block_k=block, tq=t,
                           tk=t, mask_rule=L.CausalRule(0))


def s2_block_mask(num_blocks: int, num_heads: int, local_blocks: int, vert_stride: int):
  """S2-Attention (Lin et al. 2024, arXiv:2407.17678) / vLLM blocksparse: per head h, block (i, j), j <= i, kept iff
  `i - j < local_blocks` or `(j + h * step + 1) % vert_stride == 0`, `step = max(1, stride // H)`."""
  step = max(1, vert_stride // num_heads)
  i = np.arange(num_blocks)[:, None]
  j = np.arange(num_blocks)[None, :]
  out = []
  for h in range(num_heads):
    keep = (j <= i) & (((i - j) < local_blocks) | (((j + h * step + 1) % vert_stride) == 0))
    out.append(keep)
  return np.stack(out)[None]


def s2_layout(t: int, num_heads: int, block: int = 64, local_blocks: int = 2, vert_stride: int = 4):
  """S2-Attention per-head heterogeneous strided shards (Lin et al. 2024, arXiv:2407.17678) (layout `[1, H, nQ, nK]`).

  Follows vLLM's `blocksparse_attention` reading (cited by the S2 authors' dkernel): heads shift
  the vertical stride so that together they cover every key block.
  """
  if local_blocks < 1 or vert_stride < 1:
    raise ValueError(f"local_blocks and vert_stride must be >= 1, got {local_blocks}, {vert_stride}")
  nb = -(-t // block)
  bm = s2_block_mask(nb, num_heads, local_blocks, vert_stride)
  diag = np.broadcast_to(np.eye(nb, dtype=bool), bm.shape)
  return L.from_block_mask(bm, diag, block_q=block, block_k=block, tq=t, tk=t,
                           mask_rule=L.CausalRule(0))


def _radial_band(dist: int, frame_tokens: int, block: int, decay_factor: float, model_type: str):
  """Spatial band half-width for frames `dist` apart (authors' `get_window_width`): the whole
  frame near the diagonal, then `2^bitlen(F) / 2^bitlen(dist) * decay_factor`, never below one
  block (the minimum band width)."""
  if model_type == "wan":
    if dist < 1:
      return frame_tokens
    if dist == 1:
      return frame_tokens // 2
  elif dist <= 1:                                          # "hunyuan"
    return frame_tokens
  decay = 2 ** frame_tokens.bit_length() / 2 ** dist.bit_length() * decay_factor
  return max(decay, block)


def _radial_keeps_frame(dist: int, frame_tokens: int, block: int) -> bool:
  """Temporal subsampling (authors' `get_diagonal_split_mask`): once the undecayed band is
  narrower than a block, only every `block / band`-th frame distance is kept."""
  decay = 2 ** frame_tokens.bit_length() / 2 ** dist.bit_length()
  return decay >= block or dist % int(block / decay) == 0


def radial_block_mask(num_frames: int, frame_tokens: int, block: int, *, decay_factor: float = 1.0,
                      model_type: str = "hunyuan") -> np.ndarray:
  """Radial attention (Li et al. 2025, arXiv:2506.19852) block mask `[nB, nB]` over `num_frames * frame_tokens` tokens in
  frame-major order, `nB = ceil(T / block)`: mit-han-lab/radial-attention `radial_attn/
  attn_mask.py` `gen_log_mask_shrinked`. For query frame i and key frame j the token mask is all
  ones when j == 0 (key frame 0 is the attention sink; query frame 0 is not special), else the
  band `|c - r| <= _radial_band(|i - j|)` on frames kept by `_radial_keeps_frame`; each frame
  pair's mask, placed at its offset inside its blocks, is shrunk to blocks by the authors'
  density rule (`shrinkMaskStrict`: a block is kept when > 60% of its non-empty columns are > 1/3
  full) and OR-ed in. A last partial block is dense (the authors' video/text border). The
  authors hard-code the subsampling threshold at 128, "equal to block-size": `block` here."""
  if model_type not in ("hunyuan", "wan"):
    raise ValueError(f"model_type must be 'hunyuan' or 'wan', got {model_type!r}")
  t = num_frames * frame_tokens
  nb = -(-t // block)
  out = np.zeros((nb, nb), bool)
  out[t // block:] = True
  out[:, t // block:] = True
  r = np.arange(frame_tokens)
  nblk = (frame_tokens - 1) // block + 1
  for i in range(num_frames):
    for j in range(num_frames):
      dist = abs(i - j)
      if j == 0:
        local = np.ones((frame_tokens, frame_tokens), bool)
      elif _radial_keeps_frame(dist, frame_tokens, block):
        local = np.abs(r[None, :] - r[:, None]) <= _radial_band(dist, frame_tokens, block,
                                                                decay_factor, model_type)
      else:
        continue
      ro, co = (i * frame_tokens) % block, (j * frame_tokens) % block
      canvas = np.zeros((ro + nblk * block, co + nblk * block), bool)
      canvas[ro:ro + frame_tokens, co:co + frame_tokens] = local
      cols = canvas[:nblk * block, :nblk * block].reshape(nblk, block, nblk, block).mean(1)
      frac = (cols > 1 / 3).sum(-1) / ((cols > 0).sum(-1) + 1e-9)
      r0, c0 = i * frame_tokens // block, j * frame_tokens // block
      tile = out[r0:r0 + nblk, c0:c0 + nblk]
      tile |= (frac > 0.6)[:tile.shape[0], :tile.shape[1]]
  return out


def radial_layout(num_frames: int, frame_tokens: int, block: int = 64, *, decay_factor: float = 1.0,
                  model_type: str = "hunyuan"):
  """Static Radial-attention layout over `num_frames * frame_tokens` tokens: whole blocks of
  `radial_block_mask` (non-causal; not symmetric: key frame 0 is a sink, query frame 0 is not)."""
  if num_frames < 1 or frame_tokens < 1 or block < 1:
    raise ValueError("num_frames, frame_tokens and block must be >= 1, got "
                     f"{num_frames}, {frame_tokens}, {block}")
  t = num_frames * frame_tokens
  bm = radial_block_mask(num_frames, frame_tokens, block, decay_factor=decay_factor,
                         model_type=model_type)
  return L.from_block_mask(bm[None, None], None, block_q=block, block_k=block, tq=t, tk=t)


def reachable_blocks(block_mask: np.ndarray, num_layers: int) -> np.ndarray:
  """Boolean `[nQ, nK]`: key blocks reachable from each query block through `num_layers` layers."""
  m = block_mask.astype(np.int64)
  reach = m.copy()
  for _ in range(num_layers - 1):
    reach = ((reach @ m) > 0).astype(np.int64)
  return reach > 0
