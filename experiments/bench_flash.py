"""GPU benchmark of the Pallas block-sparse flash kernel (issue 6) against cuDNN and NATTEN's Flex.

Suites (all timings are medians of `--repeats` runs after `--warmup` runs, on jitted functions, with
`block_until_ready`; torch peers are timed with CUDA events):
* `dense`: non-causal and causal attention, B in `--batch_sizes`, H=16, D=128, T in `--seq_lens`,
  bf16, forward and forward+backward: `pallas_kernels.flash.flash_attention` against
  `jax.nn.dot_product_attention(implementation="cudnn")`, both in TFLOP/s. FLOPs: forward
  `4 B H Tq Tk D` (halved when causal), forward+backward 3.5x that (FlashAttention-2's convention:
  the backward does 2.5x the forward's matmul work).
* `sparse`: random block layouts (every listed block full, the diagonal always listed) at the block
  densities `--densities`, against the same kernel's dense run; reports the efficiency
  `ideal / measured` where `ideal = density x dense time` (issue target: >= 0.7 at 10-25 %).
* `na`: NATTEN's published H100 cases (1D T=32K window 2K, stride 1 / 256 / 2048; 2D 256x256
  window 80x80, stride 1 / 16x16; 3D 30x48x80 window 18x24x24, stride 1 / 16x8x8; fp16, B=1,
  forward) on tile-permuted tokens, against cuDNN dense on the same tokens and NATTEN's Flex backend
  (`natten.na{1,2,3}d(..., backend="flex-fna")`, when `natten` and CUDA torch import), plus NATTEN's
  published hopper-fna times (copied from NATTEN's docs via `shared/notes/local-and-sparse-anchors.md`;
  NOT measured here, labelled `published`). The kernel is timed on already-permuted tokens, as
  NATTEN's own figures exclude the token permutation.

Writes `<out>.json` (device, jax/torch/natten versions, date, exact command, every row) and
`<out>.md`. Errors of one case (e.g. out of memory) are recorded in its row instead of stopping.

  # on the GPU machine (NATTEN from ../shared/gpu/prepare_wheels.sh):
  python -m experiments.bench_flash --suites=dense,sparse,na --out=benchmarks/flash_h100
  # CPU smoke run of the script itself (interpret mode, tiny shapes, no peers):
  python -m experiments.bench_flash --smoke --out=/tmp/flash_smoke
"""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
import traceback

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as common
from attnjax.ops import layout as layouts
from attnjax.ops import neighborhood as na_lib
from pallas_kernels.flash import api
from pallas_kernels.flash.blocks import default_block_sizes

_SUITES = flags.DEFINE_list("suites", ["dense", "sparse", "na"], "Which suites to run.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "2", "4"], "Batch sizes of the dense suite.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["4096", "8192", "16384"], "T of the dense suite.")
_HEADS = flags.DEFINE_integer("heads", 16, "H of the dense and sparse suites.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "D of every suite.")
_SPARSE_T = flags.DEFINE_integer("sparse_seq_len", 16384, "T of the sparse suite.")
_DENSITIES = flags.DEFINE_list("densities", ["0.5", "0.25", "0.1", "0.05"], "Block densities.")
_MODES = flags.DEFINE_list("modes", ["fwd", "fwd_bwd"], "fwd and/or fwd_bwd (dense, sparse).")
_NA_MODES = flags.DEFINE_list("na_modes", ["fwd"], "Modes of the NA suite.")
_BLOCK_Q = flags.DEFINE_integer("block_q", None, "Kernel block_q (default: blocks.py).")
_BLOCK_K = flags.DEFINE_integer("block_k", None, "Kernel block_k (default: blocks.py).")
_NUM_WARPS = flags.DEFINE_integer("num_warps", None, "Triton warps (default: blocks.py).")
_NUM_STAGES = flags.DEFINE_integer("num_stages", None, "Triton stages (default: blocks.py).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs after compilation.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed runs.")
_PEERS = flags.DEFINE_list("peers", ["cudnn", "natten_flex"], "Peers to compare against.")
_NATTEN_COMPILE = flags.DEFINE_bool("natten_torch_compile", True,
                                    "Pass torch_compile=True to NATTEN's Flex backend.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes in interpret mode, no peers (CPU check).")
_OUT = flags.DEFINE_string("out", "benchmarks/flash_h100", "Output path without extension.")

# NATTEN hopper-fna forward times on H100 (fp16, B=1, D=128) from NATTEN's docs sample outputs, as
# collected in shared/notes/local-and-sparse-anchors.md. Published figures, not measured here.
NATTEN_PUBLISHED_HOPPER_MS = {
    "na1d_32k_w2048": 0.0948,
    "na1d_32k_w2048_s256": 0.0627,
    "na1d_32k_w2048_s2048": 0.0593,
    "na2d_256x256_w80": 16.2,
    "na2d_256x256_w80_s16": 7.9,
    "na3d_30x48x80_w18x24x24": 79.0,
    "na3d_30x48x80_w18x24x24_s16x8x8": 23.4,
}

# name: (spatial, kernel_size, stride, heads, tile); tiles as in NATTEN's Hopper runs.
NA_CASES = {
    "na1d_32k_w2048": ((32768,), (2048,), (1,), 1, None),
    "na1d_32k_w2048_s256": ((32768,), (2048,), (256,), 1, None),
    "na1d_32k_w2048_s2048": ((32768,), (2048,), (2048,), 1, None),
    "na2d_256x256_w80": ((256, 256), (80, 80), (1, 1), 24, (16, 8)),
    "na2d_256x256_w80_s16": ((256, 256), (80, 80), (16, 16), 24, (16, 8)),
    "na3d_30x48x80_w18x24x24": ((30, 48, 80), (18, 24, 24), (1, 1, 1), 24, (2, 8, 8)),
    "na3d_30x48x80_w18x24x24_s16x8x8": ((30, 48, 80), (18, 24, 24), (16, 8, 8), 24, (2, 8, 8)),
}
SMOKE_NA_CASES = {
    "na1d_smoke": ((48,), (9,), (2,), 2, None),
    "na2d_smoke": ((8, 8), (3, 5), (1, 2), 2, (4, 4)),
}


def with_grad(attn):
  """`attn(q, k, v) -> o` turned into forward+backward (grads of sum(o * do) w.r.t. q, k, v)."""

  def fwd_bwd(q, k, v, do):
    o, vjp = jax.vjp(attn, q, k, v)
    return vjp(do)

  return fwd_bwd


def timed(attn, mode, q, k, v):
  """Median seconds of `attn` in `mode` ("fwd" or "fwd_bwd"), or raises.

  The jitted function's first untimed call compiles, then `--warmup` more precede the
  `--repeats` timed ones.
  """
  if mode == "fwd":
    fn, args = jax.jit(attn), (q, k, v)
  else:
    fn, args = jax.jit(with_grad(attn)), (q, k, v, jnp.ones(q.shape[:3] + (v.shape[-1],), q.dtype))
  return common.median_seconds(fn, args, _REPEATS.value, warmup=1 + _WARMUP.value)


def record(rows, base: dict, fn):
  """Runs `fn() -> dict` and appends `base | result`, or the error, to rows (and prints it)."""
  try:
    row = dict(base, **fn())
  except Exception as e:  # pylint: disable=broad-except
    row = dict(base, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    traceback.print_exc(limit=2)
  rows.append(row)
  print(json.dumps(row), flush=True)


def kernel_kwargs(interpret: bool) -> dict:
  return dict(block_q=_BLOCK_Q.value, block_k=_BLOCK_K.value, num_warps=_NUM_WARPS.value,
              num_stages=_NUM_STAGES.value, interpret=interpret)


def random_inputs(b, tq, tk, h, d, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(key, (b, t, h, d), jnp.float32).astype(dtype)
               for key, t in zip(ks, (tq, tk, tk)))


def attention_flops(b, h, tq, d, pairs_per_head, mode) -> float:
  """Matmul FLOPs: 4 D per visible (query, key) pair forward; x3.5 with the backward."""
  del tq
  fwd = 4.0 * b * h * pairs_per_head * d
  return fwd * (3.5 if mode == "fwd_bwd" else 1.0)


def dense_suite(rows, interpret, peers):
  dtype, h, d = jnp.bfloat16, _HEADS.value, _HEAD_DIM.value
  for t in (int(x) for x in _SEQ_LENS.value):
    for b in (int(x) for x in _BATCHES.value):
      q, k, v = random_inputs(b, t, t, h, d, dtype)
      for causal in (False, True):
        pairs = t * t / 2 if causal else t * t
        for mode in _MODES.value:
          flops = attention_flops(b, h, t, d, pairs, mode)
          base = dict(suite="dense", B=b, T=t, H=h, D=d, dtype="bfloat16", causal=causal,
                      mode=mode)
          impls = {"pallas": functools.partial(api.flash_attention, causal=causal,
                                               **kernel_kwargs(interpret))}
          if "cudnn" in peers:
            impls["cudnn"] = functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                                               implementation="cudnn")
          for impl, attn in impls.items():
            def run(attn=attn):
              s = timed(attn, mode, q, k, v)
              return dict(ms=s * 1e3, tflops=flops / s / 1e12)
            record(rows, dict(base, impl=impl), run)
          by_impl = {r["impl"]: r for r in rows[-len(impls):] if "ms" in r}
          if "pallas" in by_impl and "cudnn" in by_impl:
            rows[-len(impls)]["vs_cudnn"] = by_impl["cudnn"]["ms"] / by_impl["pallas"]["ms"]


def random_block_layout(t, block_q, block_k, density, heads, seed=0):
  """Per-head random layout with about `density` of the blocks listed, all full, diagonal listed."""
  rng = np.random.default_rng(seed)
  nq, nk = -(-t // block_q), -(-t // block_k)
  per_row = max(1, int(round(density * nk)))
  kind = np.zeros((1, heads, nq, nk), np.int32)
  for h in range(heads):
    for i in range(nq):
      diag = min(i * block_q // block_k, nk - 1)
      others = rng.choice(np.delete(np.arange(nk), diag), size=per_row - 1, replace=False)
      kind[0, h, i, np.append(others, diag)] = 2
  layout = layouts.from_block_mask(kind > 0, kind == 1, block_q=block_q, block_k=block_k, tq=t,
                                   tk=t)
  return layout, per_row / nk


def sparse_suite(rows, interpret, peers):
  del peers
  dtype, h, d, t = jnp.bfloat16, _HEADS.value, _HEAD_DIM.value, _SPARSE_T.value
  defaults = default_block_sizes(max(16, 1 << (d - 1).bit_length()), interpret=interpret)
  bq, bk = _BLOCK_Q.value or defaults.block_q, _BLOCK_K.value or defaults.block_k
  kw = dict(kernel_kwargs(interpret), block_q=None, block_k=None)
  q, k, v = random_inputs(1, t, t, h, d, dtype)
  for mode in _MODES.value:
    dense_ms = None
    base = dict(suite="sparse", B=1, T=t, H=h, D=d, dtype="bfloat16", mode=mode, block_q=bq,
                block_k=bk)

    def run_dense():
      s = timed(functools.partial(api.flash_attention, **dict(kw, block_q=bq, block_k=bk)), mode,
                q, k, v)
      return dict(ms=s * 1e3, tflops=attention_flops(1, h, t, d, t * t, mode) / s / 1e12)

    record(rows, dict(base, impl="pallas_dense", density=1.0), run_dense)
    dense_ms = rows[-1].get("ms")
    for density in (float(x) for x in _DENSITIES.value):
      layout, actual = random_block_layout(t, bq, bk, density, h)

      def run_sparse(layout=layout, actual=actual):
        attn = functools.partial(api.block_sparse_flash_attention, layout=layout, **kw)
        s = timed(attn, mode, q, k, v)
        out = dict(ms=s * 1e3, block_density=actual)
        if dense_ms is not None:
          ideal = actual * dense_ms
          out.update(ideal_ms=ideal, efficiency=ideal / (s * 1e3))
        return out

      record(rows, dict(base, impl="pallas_block_sparse", density=density), run_sparse)


def natten_flex_ms(spatial, kernel, stride, heads, d, mode) -> float:
  """NATTEN's Flex backend on CUDA torch tensors, median ms over CUDA events."""
  import natten  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(spatial)]
  if _NATTEN_COMPILE.value and hasattr(natten, "allow_flex_compile"):
    # NATTEN (>= 0.21) refuses torch.compile of its Flex backend unless allowed; uncompiled Flex
    # is not the backend NATTEN benchmarks, so allow it and label the rows (`natten_torch_compile`).
    natten.allow_flex_compile()
  shape = (1,) + tuple(spatial) + (heads, d)
  q, k, v = (torch.randn(shape, device="cuda", dtype=torch.float16,
                         requires_grad=(mode == "fwd_bwd")) for _ in range(3))

  def step():
    o = fn(q, k, v, kernel_size=kernel, stride=stride, backend="flex-fna",
           torch_compile=_NATTEN_COMPILE.value)
    if mode == "fwd_bwd":
      o.sum().backward()

  # The first untimed call compiles (torch.compile), then `--warmup` more.
  return statistics.median(common.cuda_event_times_ms(step, _REPEATS.value,
                                                      warmup=1 + _WARMUP.value))


def na_suite(rows, interpret, peers):
  d = _HEAD_DIM.value
  dtype = jnp.float16
  cases = SMOKE_NA_CASES if _SMOKE.value else NA_CASES
  defaults = default_block_sizes(max(16, 1 << (d - 1).bit_length()), interpret=interpret)
  for name, (spatial, kernel, stride, heads, tile) in cases.items():
    n = math.prod(spatial)
    rank = len(spatial)
    # The ops' tile-permuted NA layout: one tile (a power-of-two token count) is one block.
    tile = tuple(tile) if tile is not None else (_BLOCK_Q.value or defaults.block_q,)
    block = math.prod(tile)
    base = dict(suite="na", case=name, spatial=list(spatial), kernel_size=list(kernel),
                stride=list(stride), B=1, H=heads, D=d, dtype="float16", tile=list(tile),
                block_q=block, block_k=block)
    try:
      start = time.perf_counter()
      layout, _, _ = na_lib.na_layout(tuple(spatial), tuple(kernel), tuple(stride), (1,) * rank,
                                      (False,) * rank, tile)
      counts = np.asarray(layout.kv_counts)
      base.update(layout_build_s=time.perf_counter() - start,
                  block_density=float(counts.sum()) / (counts.size * layout.num_k_blocks))
    except Exception as e:  # pylint: disable=broad-except
      rows.append(dict(base, impl="pallas", error=f"layout: {type(e).__name__}: {e}"[:300]))
      continue
    q, k, v = (x.reshape((1,) + tuple(spatial) + x.shape[2:])
               for x in random_inputs(1, n, n, heads, d, dtype))
    window_pairs = n * math.prod(kernel)  # NATTEN's FLOP count: every query sees prod(kernel) keys
    for mode in _NA_MODES.value:
      mbase = dict(base, mode=mode)

      def run_pallas():
        # Includes the token permutation in and out (the ops path's full cost).
        attn = functools.partial(na_lib.neighborhood_attention, kernel_size=tuple(kernel),
                                 stride=tuple(stride), tile_shape=tile, implementation="pallas")
        s = timed(attn, mode, q, k, v)
        return dict(ms=s * 1e3, tflops=attention_flops(1, heads, n, d, window_pairs, mode)
                    / s / 1e12)

      record(rows, dict(mbase, impl="pallas"), run_pallas)
      if "cudnn" in peers:
        def run_cudnn():
          attn = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
          return dict(ms=timed(attn, mode, q, k, v) * 1e3)
        record(rows, dict(mbase, impl="cudnn_dense"), run_cudnn)
      if "natten_flex" in peers:
        record(rows, dict(mbase, impl="natten_flex"),
               lambda: dict(ms=natten_flex_ms(spatial, kernel, stride, heads, d, mode)))
      if mode == "fwd" and name in NATTEN_PUBLISHED_HOPPER_MS:
        rows.append(dict(mbase, impl="natten_hopper_published",
                         ms=NATTEN_PUBLISHED_HOPPER_MS[name],
                         note="published by NATTEN (docs sample outputs), not measured here"))


def markdown(meta, rows) -> str:
  """The run's provenance and a table with a column for every key that some row has."""
  cols = ["suite", "case", "impl", "mode", "B", "T", "H", "D", "causal", "density",
          "block_density", "ms", "tflops", "vs_cudnn", "ideal_ms", "efficiency", "error"]
  cols = [c for c in cols if any(c in r for r in rows)]
  fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else ("" if x is None else str(x))
  lines = [f"# Flash kernel benchmark ({meta['device']})", "",
           f"- date: {meta['date']}", f"- versions: {json.dumps(meta['versions'])}",
           f"- command: `{meta['command']}`",
           f"- timing: median of {meta['repeats']} runs after {meta['warmup']} warm-up runs",
           "- `natten_hopper_published` rows are NATTEN's published figures, not measurements.", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  interpret = jax.default_backend() != "gpu"
  peers = [] if _SMOKE.value else list(_PEERS.value)
  if _SMOKE.value:
    flags.FLAGS.batch_sizes, flags.FLAGS.seq_lens, flags.FLAGS.heads = ["1"], ["40"], 2
    flags.FLAGS.head_dim, flags.FLAGS.sparse_seq_len = 32, 64
    flags.FLAGS.densities, flags.FLAGS.repeats, flags.FLAGS.warmup = ["0.5"], 1, 0
  elif interpret:
    raise SystemExit("bench_flash needs a GPU (use --smoke to check the script on CPU)")
  rows = []
  # This script's meta keeps its own layout (`date`, a `versions` dict) so that the recorded GPU
  # results stay comparable.
  meta = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
              versions=common.versions("torch", "natten", "triton"), date=common.utc_now(),
              command=common.command_line(),
              repeats=_REPEATS.value, warmup=_WARMUP.value, interpret=interpret,
              natten_torch_compile=_NATTEN_COMPILE.value)
  suites = {"dense": dense_suite, "sparse": sparse_suite, "na": na_suite}
  for name in _SUITES.value:
    suites[name](rows, interpret, peers)
    # After every suite, so a run cut short by a time limit keeps what it measured.
    common.write_results(_OUT.value, meta, rows, markdown, keys=("meta", "rows"))
  print(f"wrote {_OUT.value}.json and .md")


if __name__ == "__main__":
  app.run(main)
