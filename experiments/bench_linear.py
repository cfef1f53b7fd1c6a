"""Benchmark of the linear-attention engine: chunked vs parallel form, time and memory vs T.

For each length T and form, compiles `linear_attention` forward (`o`) and forward+backward (grads
of `sum(o * w)` w.r.t. q, k, v and the gate) with `jax.jit`, reads the compiled executable's
memory analysis (temp + output bytes) and times it (median of `--repeats` runs after a warm-up).
Configurations whose compiled memory exceeds `--max_gib` are recorded but not run. Fits the
exponent `a` of `time ~ T^a` (least squares in log-log) per form and pass. Writes `<out>.json` and
`<out>.md`.

  python -m experiments.bench_linear --out=benchmarks/linear_cpu
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from attnjax.ops.linear.engine import linear_attention

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192", "16384", "32768"],
                              "Sequence lengths T.")
_FORMS = flags.DEFINE_list("forms", ["parallel", "chunked"], "Engine forms to compare.")
_DECAY = flags.DEFINE_enum("decay", "head", ["none", "head", "scalar", "vector"],
                           "Gate kind: none, fixed per head [H] (Lightning), [B,T,H], [B,T,H,Dk] (GLA).")
_BATCH = flags.DEFINE_integer("batch", 1, "B.")
_HEADS = flags.DEFINE_integer("heads", 2, "H.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Dk = Dv.")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "Chunk size of the chunked form.")
_BACKWARD = flags.DEFINE_boolean("backward", True, "Also time forward+backward.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs after one warm-up (median reported).")
_MAX_GIB = flags.DEFINE_float("max_gib", 4.0, "Skip running configurations above this compiled memory.")
_OUT = flags.DEFINE_string("out", "benchmarks/linear_cpu", "Output path without extension.")


def _memory(compiled) -> dict:
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  return {"temp_bytes": int(ma.temp_size_in_bytes), "output_bytes": int(ma.output_size_in_bytes),
          "peak_bytes": int(ma.temp_size_in_bytes + ma.output_size_in_bytes)}


def _time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _inputs(t: int):
  b, h, d = _BATCH.value, _HEADS.value, _HEAD_DIM.value
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k = jax.random.normal(keys[1], (b, t, h, d)) * d ** -0.5
  v = jax.random.normal(keys[2], (b, t, h, d))
  shape = {"none": None, "head": (h,), "scalar": (b, t, h), "vector": (b, t, h, d)}[_DECAY.value]
  g = None if shape is None else jax.nn.log_sigmoid(3.0 + jax.random.normal(keys[3], shape))
  w = jax.random.normal(keys[4], (b, t, h, d))
  return q, k, v, g, w


def _fit_exponent(rows, form, key):
  pts = [(r["T"], r[key]) for r in rows if r["form"] == form and r.get(key)]
  if len(pts) < 2:
    return None
  x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
  return float(np.polyfit(x, y, 1)[0])


def main(argv):
  del argv
  rows = []
  load = os.getloadavg()
  for t in map(int, _SEQ_LENS.value):
    q, k, v, g, w = _inputs(t)
    for form in _FORMS.value:
      row = {"T": t, "form": form, "notes": []}

      def fwd(q, k, v, g, form=form):
        return linear_attention(q, k, v, log_decay=g, form=form, chunk_size=_CHUNK.value)[0]

      def fwd_bwd(q, k, v, g, w, form=form):
        return jax.grad(lambda *a: jnp.sum(fwd(*a) * w), argnums=(0, 1, 2, 3) if g is not None
                        else (0, 1, 2))(q, k, v, g)

      passes = [("fwd", fwd, (q, k, v, g))]
      if _BACKWARD.value:
        passes.append(("fwd_bwd", fwd_bwd, (q, k, v, g, w)))
      for name, fn, args in passes:
        compiled = jax.jit(fn).lower(*args).compile()
        mem = _memory(compiled)
        row[f"{name}_bytes"] = mem.get("peak_bytes")
        if mem and mem["peak_bytes"] > _MAX_GIB.value * 2 ** 30:
          row["notes"].append(f"{name}: not run: compiled peak {mem['peak_bytes'] / 2**30:.1f} GiB > --max_gib")
          continue
        row[f"{name}_s"] = _time(compiled, args, _REPEATS.value)
      print(row, flush=True)
      rows.append(row)

  fits = {f"{form}_{key}": _fit_exponent(rows, form, f"{key}_s") for form in _FORMS.value
          for key in ("fwd", "fwd_bwd")}
  meta = {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": "python -m experiments.bench_linear " + " ".join(sys.argv[1:]),
      "device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
      "machine": f"{platform.machine()}, {os.cpu_count()} cores visible, load average at start "
                 f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} (shared machine: timings indicative)",
      "versions": f"jax {jax.__version__}, numpy {np.__version__}, python {platform.python_version()}",
      "shape": f"B={_BATCH.value}, H={_HEADS.value}, Dk=Dv={_HEAD_DIM.value}, decay={_DECAY.value}, "
               f"chunk_size={_CHUNK.value}, float32",
      "time_exponents": fits,
  }
  with open(_OUT.value + ".json", "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  mib = lambda b: "" if b is None else f"{b / 2**20:,.1f}"
  ms = lambda s: "" if s is None else f"{s * 1e3:.1f}"
  lines = [f"# Linear-attention engine: chunked vs parallel form ({meta['platform']})", "",
           f"- date (UTC): {meta['date_utc']}", f"- command: `{meta['command']}`",
           f"- machine: {meta['machine']}", f"- versions: {meta['versions']}",
           f"- shape: {meta['shape']}",
           "- memory: compiled memory analysis, temp + output (MiB); time: median of "
           f"{_REPEATS.value} runs after a warm-up (ms)",
           "- fitted exponent a of time ~ T^a: " + ", ".join(
               f"{k} {v:.2f}" for k, v in fits.items() if v is not None), "",
           "| T | form | fwd MiB | fwd ms | fwd+bwd MiB | fwd+bwd ms | note |",
           "|---:|---|---:|---:|---:|---:|---|"]
  for r in rows:
    lines.append(f"| {r['T']} | {r['form']} | {mib(r.get('fwd_bytes'))} | {ms(r.get('fwd_s'))} | "
                 f"{mib(r.get('fwd_bwd_bytes'))} | {ms(r.get('fwd_bwd_s'))} | {'; '.join(r['notes'])} |")
  with open(_OUT.value + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
