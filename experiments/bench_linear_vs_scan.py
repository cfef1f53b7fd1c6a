"""The linear-attention engine against a hand-written token scan (and dense causal softmax), per decay kind.

For each decay kind (none, fixed per head `[H]`, per head and step `[B, T, H]`, per key dimension
`[B, T, H, Dk]`, per head and step with `normalize=True`, and the gated delta rule) and each length
T, times, in one process and interleaved (round-robin over the methods, median of `--repeats`):

* `default`: `linear_attention` / `delta_rule` as users call them (`form=None`);
* `recurrent`, `chunked`, `parallel` (T <= `--parallel_max_t`): the engine's explicit forms;
* `scan`: a plain `jax.lax.scan` of the same recurrence, written here independently of the engine
  (the baseline a user would write by hand);
* `softmax`: dense causal softmax attention (`jax.nn.dot_product_attention`, XLA) on the same
  shapes, up to `--softmax_max_t`.

Each method runs forward (`o`) and forward+backward (grads of `sum(o * w)` w.r.t. every input),
each jitted and compiled before timing; in each round every timed call follows an untimed call of
the same program. A method whose time exceeds `--max_seconds` at some T is
not run at longer T. Writes `<out>.json` and `<out>.md` after every case (a cut-short run keeps
what it measured); the markdown ends with the fastest engine form per (kind, T, pass), the table
`engine.FORM_TABLE` is read from.

  python -m experiments.bench_linear_vs_scan --out=benchmarks/linear_vs_scan_cpu
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from attnjax.ops.linear import engine
from attnjax.ops.linear.delta import delta_rule
from experiments import bench_common as common

KINDS = ("none", "head", "scalar", "vector", "scalar_normalize", "delta")
METHODS = ("default", "recurrent", "chunked", "parallel", "scan", "softmax")

_KINDS = flags.DEFINE_list("kinds", list(KINDS), f"Decay kinds, from {KINDS}.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Methods, from {METHODS}.")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["64", "256", "1024", "4096", "16384", "32768"],
                              "Sequence lengths T.")
_BATCH = flags.DEFINE_integer("batch", 1, "B.")
_HEADS = flags.DEFINE_integer("heads", 4, "H.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Dk = Dv.")
_CHUNK = flags.DEFINE_integer("chunk_size", 64, "Chunk size of the explicit chunked form (the "
                              "default call of linear_attention takes the table's).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds after one warm-up (median reported).")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 8.0,
                                  "A method slower than this at some T is not run at longer T.")
_PARALLEL_MAX_T = flags.DEFINE_integer("parallel_max_t", 1024, "Longest T for the quadratic form.")
_SOFTMAX_MAX_T = flags.DEFINE_integer("softmax_max_t", 8192, "Longest T for dense softmax.")
_OUT = flags.DEFINE_string("out", "benchmarks/linear_vs_scan_cpu", "Output path without extension.")


# ----------------------------------------------------------------------------------- the baseline


def plain_scan(q, k, v, g, beta, kind):
  """The recurrence as a user writes it: one `lax.scan` over tokens, state `[B, H, Dk, Dv]`.

  `S_t = exp(g_t) S_{t-1} + k_t^T v_t`, `o_t = q_t S_t` (scale 1); `normalize`: also
  `z_t = exp(g_t) z_{t-1} + k_t`, `o_t /= q_t . z_t`; delta rule: `S_t = exp(g_t) S_{t-1}`,
  then `S_t += k_t^T beta_t (v_t - k_t S_t)`.
  """
  b, _, h, dk = q.shape
  dv = v.shape[-1]

  def step(carry, x):
    s, z = carry
    qt, kt, vt, gt, bt = x
    dec = 1.0 if gt is None else jnp.exp(gt)[..., None] if gt.ndim == 3 else jnp.exp(gt)[..., None, None]
    s = dec * s
    if kind == "delta":
      u = bt[..., None] * (vt - jnp.einsum("bhd,bhde->bhe", kt, s))
      s = s + kt[..., :, None] * u[..., None, :]
    else:
      s = s + kt[..., :, None] * vt[..., None, :]
    o = jnp.einsum("bhd,bhde->bhe", qt, s)
    if kind == "scalar_normalize":
      z = (dec[..., 0] if gt is not None else 1.0) * z + kt
      o = o / (jnp.sum(qt * z, -1, keepdims=True) + 1e-10)
    return (s, z), o

  if g is not None and g.ndim == 1:  # a fixed per-head decay, broadcast over time
    g = jnp.broadcast_to(g, (b, q.shape[1], h))
  tm = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)
  init = (jnp.zeros((b, h, dk, dv), jnp.float32), jnp.zeros((b, h, dk), jnp.float32))
  _, o = jax.lax.scan(step, init, (tm(q), tm(k), tm(v), tm(g), tm(beta)))
  return jnp.moveaxis(o, 0, 1)


# ---------------------------------------------------------------------------------------- methods


def _inputs(kind: str, t: int):
  b, h, d = _BATCH.value, _HEADS.value, _HEAD_DIM.value
  keys = jax.random.split(jax.random.key(0), 6)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k = jax.random.normal(keys[1], (b, t, h, d))
  if kind == "scalar_normalize":   # positive features, as a normalised mixer's feature map gives
    q, k = jax.nn.softplus(q), jax.nn.softplus(k)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(keys[2], (b, t, h, d))
  shape = {"none": None, "head": (h,), "scalar": (b, t, h), "vector": (b, t, h, d),
           "scalar_normalize": (b, t, h), "delta": (b, t, h)}[kind]
  g = None if shape is None else jax.nn.log_sigmoid(3.0 + jax.random.normal(keys[3], shape))
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (b, t, h))) if kind == "delta" else None
  w = jax.random.normal(keys[5], (b, t, h, d))
  return q, k, v, g, beta, w


def _method_fn(method: str, kind: str):
  """`fn(q, k, v, g, beta) -> o [B, T, H, Dv]` of one method."""
  if method == "scan":
    return lambda q, k, v, g, beta: plain_scan(q, k, v, g, beta, kind)
  if method == "softmax":
    return lambda q, k, v, g, beta: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                implementation="xla")
  form = None if method == "default" else method
  if kind == "delta":
    return lambda q, k, v, g, beta: delta_rule(q, k, v, beta, log_decay=g, scale=1.0, form=form,
                                               chunk_size=_CHUNK.value)[0]
  normalize = kind == "scalar_normalize"
  chunk = None if form is None else _CHUNK.value   # the default call leaves the chunk to the table
  return lambda q, k, v, g, beta: engine.linear_attention(
      q, k, v, log_decay=g, scale=1.0, normalize=normalize, form=form, chunk_size=chunk)[0]


def _passes(fn, args):
  """{"fwd": (f, args), "fwd_bwd": (f, args)}: forward, and grads of sum(o * w) w.r.t. all inputs."""
  q, k, v, g, beta, w = args
  diff = [i for i, a in enumerate((q, k, v, g, beta)) if a is not None]

  def fwd_bwd(q, k, v, g, beta, w):
    loss = lambda *a: jnp.sum(fn(*a) * w)
    return jax.grad(loss, argnums=tuple(diff))(q, k, v, g, beta)

  return {"fwd": (fn, (q, k, v, g, beta)), "fwd_bwd": (fwd_bwd, args)}


def _runnable(method: str, t: int) -> str | None:
  if method == "parallel" and t > _PARALLEL_MAX_T.value:
    return f"not run: quadratic form above T={_PARALLEL_MAX_T.value}"
  if method == "softmax" and t > _SOFTMAX_MAX_T.value:
    return f"not run: dense softmax above T={_SOFTMAX_MAX_T.value}"
  return None


# ----------------------------------------------------------------------------------------- output


def _fastest_forms(rows):
  """{(kind, T, pass): fastest of the engine's explicit forms}."""
  best = {}
  for r in rows:
    if r["method"] in ("recurrent", "chunked", "parallel") and r.get("ms") is not None:
      key = (r["kind"], r["T"], r["pass"])
      if key not in best or r["ms"] < best[key][1]:
        best[key] = (r["method"], r["ms"])
  return {k: v[0] for k, v in best.items()}


def _markdown(env: dict, rows: list[dict]) -> str:
  lines = [f"# Linear-attention engine vs a plain token scan ({env['backend']})", "",
           f"- date (UTC): {env['date_utc']}", f"- command: `{env['command']}`",
           f"- machine: {common.machine_summary(env)}", f"- versions: {common.version_summary(env)}",
           f"- shape: {env['shape']}",
           f"- time: median of {env['repeats']} interleaved rounds (each timed call right after an "
           "untimed one), ms; "
           "`default` is the engine as called with `form=None`", ""]
  methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
  for kind in [k for k in KINDS if any(r["kind"] == k for r in rows)]:
    for pas in ("fwd", "fwd_bwd"):
      sub = [r for r in rows if r["kind"] == kind and r["pass"] == pas]
      if not sub:
        continue
      lines += [f"## {kind}, {'forward' if pas == 'fwd' else 'forward+backward'}", "",
                "| T | " + " | ".join(methods) + " | default / scan |",
                "|---:|" + "---:|" * (len(methods) + 1)]
      for t in sorted({r["T"] for r in sub}):
        cell = {r["method"]: r for r in sub if r["T"] == t}
        ms = lambda m: cell[m]["ms"] if m in cell and cell[m].get("ms") is not None else None
        fmt = lambda m: "" if m not in cell else (f"{ms(m):.1f}" if ms(m) is not None else "-")
        ratio = (f"{ms('default') / ms('scan'):.2f}" if ms("default") and ms("scan") else "")
        lines.append(f"| {t} | " + " | ".join(fmt(m) for m in methods) + f" | {ratio} |")
      lines.append("")
  best = _fastest_forms(rows)
  if best:
    lines += ["## Fastest explicit form (what `engine.FORM_TABLE` is read from)", "",
              "| kind | T | forward | forward+backward |", "|---|---:|---|---|"]
    for kind, t in sorted({(k, t) for k, t, _ in best}, key=lambda x: (KINDS.index(x[0]), x[1])):
      lines.append(f"| {kind} | {t} | {best.get((kind, t, 'fwd'), '')} | "
                   f"{best.get((kind, t, 'fwd_bwd'), '')} |")
    lines.append("")
  notes = {}
  for r in rows:   # one line per (method, reason), with the lengths it applies to
    if r.get("note"):
      notes.setdefault((r["method"], r["note"]), set()).add(r["T"])
  if notes:
    lines += ["Not run:"] + [f"- {m}, T = {', '.join(map(str, sorted(ts)))}: {note}"
                             for (m, note), ts in notes.items()] + [""]
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main


def main(argv):
  del argv
  env = common.environment(
      shape=f"B={_BATCH.value}, H={_HEADS.value}, Dk=Dv={_HEAD_DIM.value}, float32, scale 1, "
            f"chunk_size={_CHUNK.value}",
      repeats=_REPEATS.value)
  rows: list[dict] = []
  too_slow: set[tuple[str, str, str]] = set()
  for kind in _KINDS.value:
    if kind not in KINDS:
      raise app.UsageError(f"--kinds: unknown kind {kind!r}, expected one of {KINDS}")
    for t in map(int, _SEQ_LENS.value):
      args = _inputs(kind, t)
      compiled = {}
      for method in _METHODS.value:
        if method not in METHODS:
          raise app.UsageError(f"--methods: unknown method {method!r}, expected one of {METHODS}")
        for pas, (fn, pargs) in _passes(_method_fn(method, kind), args).items():
          row = {"kind": kind, "T": t, "method": method, "pass": pas, "ms": None}
          note = _runnable(method, t) or (
              f"not run: over {_MAX_SECONDS.value} s at a shorter T"
              if (kind, method, pas) in too_slow else None)
          if note:
            row["note"] = note
          else:
            exe = jax.jit(fn).lower(*pargs).compile()
            row["MiB"] = round(common.compiled_memory(exe).get("peak_bytes", 0) / 2 ** 20, 1)
            compiled[(method, pas)] = (exe, pargs, row)
          rows.append(row)
      # Interleaved rounds: every method sees the same machine load. Each timed call follows an
      # untimed call of the same program, because a call right after another program that freed
      # large buffers (the scan's backward, dense softmax) runs up to ~3x slower.
      times = {key: [] for key in compiled}
      for _ in range(_REPEATS.value):
        for key, (exe, pargs, _) in compiled.items():
          jax.block_until_ready(exe(*pargs))
          t0 = time.perf_counter()
          jax.block_until_ready(exe(*pargs))
          times[key].append(time.perf_counter() - t0)
      for (method, pas), (_, _, row) in compiled.items():
        row["ms"] = statistics.median(times[(method, pas)]) * 1e3
        if row["ms"] > _MAX_SECONDS.value * 1e3:
          too_slow.add((kind, method, pas))
      print(kind, t, {f"{m}/{p}": round(r["ms"], 1) for (m, p), (_, _, r) in compiled.items()},
            flush=True)
      common.write_results(_OUT.value, env, rows, _markdown)
  print(common.write_results(_OUT.value, env, rows, _markdown))


if __name__ == "__main__":
  app.run(main)
