"""Benchmark: plain-JAX block-sparse attention vs dense masked attention at fixed block densities.

For each length T and target density (fraction of listed `(query block, key block)` pairs), builds a
non-causal symmetric band layout (`|i - j| <= w`, `w` chosen so that the block density is close to
the target; band blocks are full, the two edge diagonals partial) and compiles, with `jax.jit`:
* `block_sparse`: `block_sparse_attention(q, k, v, layout)` (gathers the listed key blocks);
* `dense`: `dot_product_attention(q, k, v, mask=dense_mask(layout), implementation="reference")`
  (the oracle: materialises the `[T, T]` mask and scores).
Records the compiled executable's memory analysis (temp + output bytes, what the call allocates beyond
its inputs) for every configuration, and the forward time (median of `--repeats` runs after a warm-up)
where the compiled memory is below `--max_gib` and the listed score pairs per head are below
`--max_pairs` (this CPU is shared by several jobs; larger runs take minutes each). Writes
`<out>.json` and `<out>.md`.

  python -m experiments.bench_block_sparse --out=benchmarks/block_sparse_cpu
"""

from __future__ import annotations

import json
import time

from absl import app
from absl import flags
import jax

from attnjax.ops import block_sparse
from attnjax.ops import layout as L
from attnjax.ops.softmax import dot_product_attention
from experiments import bench_common as common

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["4096", "8192", "16384", "32768"], "Lengths T.")
_DENSITIES = flags.DEFINE_list("densities", ["0.5", "0.25", "0.1", "0.05"], "Block densities.")
_IMPLS = flags.DEFINE_list("impls", ["block_sparse", "dense"], "Implementations.")
_HEADS = flags.DEFINE_integer("heads", 2, "H.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "D.")
_BLOCK = flags.DEFINE_integer("block", 128, "block_q = block_k of the layout.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs after one warm-up.")
_MAX_GIB = flags.DEFINE_float("max_gib", 4.0, "Do not run above this compiled memory.")
_MAX_PAIRS = flags.DEFINE_float("max_pairs", 1.1e8, "Do not time above this many score pairs/head.")
_OUT = flags.DEFINE_string("out", "benchmarks/block_sparse_cpu", "Output path without extension.")


def band_layout(t: int, density: float, block: int) -> L.BlockLayout:
  """Symmetric band `|i - j| <= w` whose block density is about `density`."""
  nb = -(-t // block)
  half = max(0, int(round((density * nb - 1) / 2)))     # listed blocks per row ~ 2 * half + 1
  w = half * block
  return L.from_rule(L.WindowRule(w, w), block_q=block, block_k=block, tq=t, tk=t)


def _bench(impl: str, t: int, lay: L.BlockLayout) -> dict:
  shape = (1, t, _HEADS.value, _HEAD_DIM.value)
  q, k, v = (jax.random.normal(kk, shape) for kk in jax.random.split(jax.random.key(0), 3))
  if impl == "block_sparse":
    fn = lambda q, k, v, lay: block_sparse.block_sparse_attention(q, k, v, lay)
  else:
    fn = lambda q, k, v, lay: dot_product_attention(q, k, v, mask=L.dense_mask(lay),
                                                    implementation="reference")
  dens = L.density(lay)
  rec = {"impl": impl, "T": t, "block_density": round(dens, 4),
         "element_density": round(L.density(lay, "element"), 4) if t <= 8192 else None}
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(q, k, v, lay).compile()
  rec["compile_s"] = round(time.perf_counter() - t0, 3)
  rec.update(common.compiled_memory(compiled))
  pairs = (dens if impl == "block_sparse" else 1.0) * t * t
  note = common.memory_limit_note(rec, _MAX_GIB.value)
  if note:
    rec["status"] = note
    return rec
  if pairs > _MAX_PAIRS.value:
    rec["status"] = f"not timed: {pairs:.2g} score pairs/head > --max_pairs"
    return rec
  rec["time_ms"] = round(1e3 * common.median_seconds(compiled, (q, k, v, lay), _REPEATS.value), 1)
  rec["status"] = "ok"
  return rec


def _markdown(env, records) -> str:
  lines = [
      f"# Block-sparse (plain JAX) vs dense masked attention ({env['backend']}, {env['device']})",
      "", f"- date (UTC): {env['date_utc']}", f"- command: `{env['command']}`",
      f"- machine: {common.machine_summary(env, 'shared by several jobs: timings are indicative')}",
      f"- versions: {common.version_summary(env)}",
      f"- shape: B=1, H={env['H']}, D={env['D']}, float32, forward only; layout: symmetric band, "
      f"block {env['block']}",
      "- memory: compiled temp + output bytes (MiB); time: median of "
      f"{env['repeats']} runs after a warm-up (ms); configurations above --max_gib / --max_pairs "
      "are compiled (memory recorded) but not run", "",
      "| T | target density | block density | impl | MiB | ms | note |",
      "|---:|---:|---:|---|---:|---:|---|"]
  for r in records:
    note = "" if r.get("status") == "ok" else r.get("status", "")
    lines.append(f"| {r['T']} | {r['target_density']} | {r['block_density']} | {r['impl']} | "
                 f"{common.mib(r.get('peak_bytes'))} | {r.get('time_ms', '')} | {note} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  env = common.environment(H=_HEADS.value, D=_HEAD_DIM.value, block=_BLOCK.value,
                           repeats=_REPEATS.value, max_gib=_MAX_GIB.value,
                           max_pairs=_MAX_PAIRS.value)
  records = []
  for t in (int(x) for x in _SEQ_LENS.value):
    for dens in (float(x) for x in _DENSITIES.value):
      lay = band_layout(t, dens, _BLOCK.value)
      for impl in _IMPLS.value:
        if impl == "dense" and dens != float(_DENSITIES.value[0]):
          # The dense oracle's cost does not depend on the density: measure it once per T.
          continue
        rec = {"target_density": dens, **_bench(impl, t, lay)}
        print(json.dumps(rec), flush=True)
        records.append(rec)
  print(common.write_results(_OUT.value, env, records, _markdown))


if __name__ == "__main__":
  app.run(main)
