"""Benchmark of `dot_product_attention` implementations: time and compiled peak memory vs length.

For each sequence length T and implementation, compiles the forward (`o`) and forward+backward
(grads of `sum(o * w)` w.r.t. q, k, v) with `jax.jit`, reads the executable's memory analysis
(temp + output bytes: what the call allocates beyond its inputs), and times it (median of
`--repeats` runs after one warm-up). A configuration whose compiled memory exceeds `--max_gib` is
recorded as not run (its compiled memory still is). Writes `<out>.json` and `<out>.md`.

  python -m experiments.bench_softmax --out=benchmarks/softmax_cpu
"""

from __future__ import annotations

import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from attnjax.ops.softmax import dot_product_attention
from experiments import bench_common as common

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["512", "1024", "2048", "4096", "8192", "16384"],
                              "Sequence lengths T (Tq = Tk).")
_IMPLS = flags.DEFINE_list("impls", ["reference", "xla"], "Implementations to compare.")
_BATCH = flags.DEFINE_integer("batch", 1, "B.")
_HEADS = flags.DEFINE_integer("heads", 4, "H (query and key/value heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "D.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Input dtype.")
_CAUSAL = flags.DEFINE_boolean("causal", True, "Causal attention.")
_BLOCK = flags.DEFINE_integer("block_size", 512, "Key block of the xla implementation.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs after one warm-up (median reported).")
_MAX_GIB = flags.DEFINE_float("max_gib", 4.0,
                              "Do not run configurations whose compiled temp+output exceed this.")
_OUT = flags.DEFINE_string("out", "benchmarks/softmax_cpu", "Output path without extension.")


def _bench_one(impl: str, t: int, mode: str) -> dict:
  dtype = jnp.dtype(_DTYPE.value)
  shape = (_BATCH.value, t, _HEADS.value, _HEAD_DIM.value)
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, w = (jax.random.normal(kk, shape, dtype) for kk in keys)
  kwargs = dict(causal=_CAUSAL.value, implementation=impl, block_size=_BLOCK.value)

  def fwd(q, k, v):
    return dot_product_attention(q, k, v, **kwargs)

  def loss(q, k, v):
    return jnp.sum(fwd(q, k, v).astype(jnp.float32) * w.astype(jnp.float32))

  fn = fwd if mode == "fwd" else jax.grad(loss, argnums=(0, 1, 2))
  rec = {"impl": impl, "T": t, "mode": mode}
  try:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(q, k, v).compile()
    rec["compile_s"] = round(time.perf_counter() - t0, 3)
  except Exception as e:  # pylint: disable=broad-except
    rec["status"] = f"compile failed: {type(e).__name__}: {str(e)[:200]}"
    return rec
  rec.update(common.compiled_memory(compiled))
  note = common.memory_limit_note(rec, _MAX_GIB.value)
  if note:
    rec["status"] = note
    return rec
  try:
    rec["time_ms"] = round(1e3 * common.median_seconds(compiled, (q, k, v), _REPEATS.value), 3)
    rec["status"] = "ok"
  except Exception as e:  # pylint: disable=broad-except
    rec["status"] = f"run failed: {type(e).__name__}: {str(e)[:200]}"
  return rec


def _environment() -> dict:
  return common.environment(
      shape={"B": _BATCH.value, "H": _HEADS.value, "D": _HEAD_DIM.value},
      dtype=_DTYPE.value, causal=_CAUSAL.value, block_size=_BLOCK.value,
      repeats=_REPEATS.value, max_gib=_MAX_GIB.value)


def _markdown(env: dict, records: list[dict]) -> str:
  lines = [
      f"# Softmax attention: reference vs xla ({env['backend']}, {env['device']})", "",
      f"- date (UTC): {env['date_utc']}",
      f"- command: `{env['command']}`",
      f"- machine: {common.machine_summary(env, 'shared machine: timings are indicative')}",
      f"- versions: {common.version_summary(env)}",
      f"- shape: B={env['shape']['B']}, H={env['shape']['H']}, D={env['shape']['D']}, Tq = Tk = T; "
      f"dtype {env['dtype']}; causal={env['causal']}; xla block_size={env['block_size']}",
      "- memory: compiled executable's memory analysis, temp + output bytes (MiB), i.e. what the "
      "call allocates beyond its inputs; time: median of "
      f"{env['repeats']} runs after a warm-up (ms)", "",
      "| T | impl | fwd MiB | fwd ms | fwd+bwd MiB | fwd+bwd ms | note |",
      "|---:|---|---:|---:|---:|---:|---|",
  ]
  by_key = {(r["T"], r["impl"], r["mode"]): r for r in records}
  for t in sorted({r["T"] for r in records}):
    for impl in dict.fromkeys(r["impl"] for r in records):
      f, g = by_key.get((t, impl, "fwd"), {}), by_key.get((t, impl, "fwd+bwd"), {})
      notes = "; ".join(f"{m}: {r['status']}" for m, r in (("fwd", f), ("fwd+bwd", g))
                        if r and r.get("status") != "ok")
      lines.append(f"| {t} | {impl} | {common.mib(f.get('peak_bytes'))} | {f.get('time_ms', '')} "
                   f"| {common.mib(g.get('peak_bytes'))} | {g.get('time_ms', '')} | {notes} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  env = _environment()
  records = []
  for t in (int(x) for x in _SEQ_LENS.value):
    for impl in _IMPLS.value:
      for mode in ("fwd", "fwd+bwd"):
        rec = _bench_one(impl, t, mode)
        print(json.dumps(rec), flush=True)
        records.append(rec)
  print(common.write_results(_OUT.value, env, records, _markdown))


if __name__ == "__main__":
  app.run(main)
