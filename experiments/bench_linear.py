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

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from attnjax.ops.linear.engine import linear_attention
from experiments import bench_common as common

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


def _markdown(meta: dict, rows: list[dict]) -> str:
  ms = lambda s: "" if s is None else f"{s * 1e3:.1f}"
  lines = [f"# Linear-attention engine: chunked vs parallel form ({meta['platform']})", "",
           f"- date (UTC): {meta['date_utc']}", f"- command: `{meta['command']}`",
           f"- machine: {meta['machine']}", f"- versions: {meta['versions']}",
           f"- shape: {meta['shape']}",
           "- memory: compiled memory analysis, temp + output (MiB); time: median of "
           f"{_REPEATS.value} runs after a warm-up (ms)",
           "- fitted exponent a of time ~ T^a: " + ", ".join(
               f"{k} {v:.2f}" for k, v in meta["time_exponents"].items() if v is not None), "",
           "| T | form | fwd MiB | fwd ms | fwd+bwd MiB | fwd+bwd ms | note |",
           "|---:|---|---:|---:|---:|---:|---|"]
  for r in rows:
    lines.append(f"| {r['T']} | {r['form']} | {common.mib(r.get('fwd_bytes'))} | "
                 f"{ms(r.get('fwd_s'))} | {common.mib(r.get('fwd_bwd_bytes'))} | "
                 f"{ms(r.get('fwd_bwd_s'))} | {'; '.join(r['notes'])} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  rows = []
  env = common.environment()  # at the start: its load average is the one the runs start under
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
        mem = common.compiled_memory(compiled)
        row[f"{name}_bytes"] = mem.get("peak_bytes")
        note = common.memory_limit_note(mem, _MAX_GIB.value)
        if note:
          row["notes"].append(f"{name}: {note}")
          continue
        row[f"{name}_s"] = common.median_seconds(compiled, args, _REPEATS.value)
      print(row, flush=True)
      rows.append(row)

  fits = {f"{form}_{key}": _fit_exponent(rows, form, f"{key}_s") for form in _FORMS.value
          for key in ("fwd", "fwd_bwd")}
  # This script's meta keeps its own (older) layout, with summary strings, so that its recorded
  # results stay comparable.
  meta = {
      "date_utc": env["date_utc"], "command": env["command"], "device": str(env["device"]),
      "platform": env["backend"],
      "machine": common.machine_summary(env, "shared machine: timings indicative"),
      "versions": common.version_summary(env),
      "shape": f"B={_BATCH.value}, H={_HEADS.value}, Dk=Dv={_HEAD_DIM.value}, decay={_DECAY.value}, "
               f"chunk_size={_CHUNK.value}, float32",
      "time_exponents": fits,
  }
  print(common.write_results(_OUT.value, meta, rows, _markdown, keys=("meta", "rows")))


if __name__ == "__main__":
  app.run(main)
