r"""A CAB-style benchmark of the registered mixers, in three parts.

CAB (Zhang et al. 2024, "Benchmarking Efficient Attention", arXiv:2410.19258) compares attention
mechanisms by the patterns they define (causal or not, self or cross), their cost against sequence
length, and their quality on tasks. One command runs all three:

  .venv/bin/python -m experiments.cab --config=configs/cab.py --workdir=workdirs/cab [--record]

1. patterns: every registered mixer in each of the four patterns (`attnjax.cab.PATTERNS`), once on a
   tiny input: a defined pattern must give a finite `[B, T, d_model]` output (causal ones: a token
   perturbed inside the sequence, not at a chunk edge, leaves every earlier output unchanged); an
   undefined one must raise `PatternUndefinedError`. The table is generated from what each cell did
   and compared with the declarations (`attnjax.registry.pattern_table`); a cell that disagrees is
   marked FAIL and the command exits non-zero.
2. efficiency: forward and forward+backward wall time and XLA's compiled memory
   (`compiled.memory_analysis()`, temp + output bytes) against T for a set of mixers; a cell whose
   compiled peak exceeds `max_gib`, or whose predicted time per call (extrapolated from the smaller
   T) exceeds `time_limit_s`, is skipped and says so. One plot: time vs T (log-log, one line per
   mixer) and memory vs T.
3. quality: training runs (`experiments.compare.run`) on the tasks listed in the config
   (`quality.tasks`, data: task name, config file, mixers, overrides); an entry whose task is not
   registered in `experiments.tasks` is skipped with a message.

Writes `<workdir>/cab_{patterns,efficiency,quality}.{md,json}` and `cab_efficiency.png`,
`cab_quality.png`; `--record` also writes them into `benchmarks/` (`cab_patterns.md`, which
`tests/test_all_mixers.py` checks against the declarations, and `cab_efficiency_<backend>.*`,
`cab_quality_<backend>.*`). `--parts=patterns,efficiency` runs a subset, `--all_mixers` times every
registered mixer.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax import registry
from attnjax.cab import PATTERNS, PatternUndefinedError
from experiments import bench_common as common

PARTS = ("patterns", "efficiency", "quality")
REPO = pathlib.Path(__file__).resolve().parents[1]


def _split_names(v) -> list[str]:
  return [s.strip() for s in (v.split(",") if isinstance(v, str) else list(v)) if str(s).strip()]


# ------------------------------------------------------------------------------------ 1: patterns


def _pure_forward(module):
  """`f(state, x, context) -> y` of `module`, with the state a training forward may change (running
  statistics, centroids) kept inside the call."""
  graphdef, state = nnx.split(module)

  def f(state, x, context):
    m = nnx.merge(graphdef, state)
    return m(x) if context is None else m(x, context=context)
  return f, state


def check_cell(name: str, pattern: str, *, seq_len: int = 12, d_model: int = 32, num_heads: int = 2,
               batch: int = 2, perturb_at: int = 9, seed: int = 0) -> dict:
  """Runs mixer `name` once in `pattern`. Returns `{"mixer", "pattern", "outcome", "detail"}` with
  outcome "defined" (built, ran, output `[B, T, d_model]` and finite, and causal where the pattern
  is), "refused" (`PatternUndefinedError`) or "error" (anything else; `detail` says what).

  Causality: tokens `perturb_at..` of `x` (causal self) or of the context (causal cross, S = T, so
  bottom-right alignment lets query i see keys j <= i) are replaced; outputs `< perturb_at` must not
  change. 9 of 12 is inside a block of every default block or chunk size (2, 3, 4, 8)."""
  causal, cross = pattern.startswith("causal"), pattern.endswith("cross")
  out = {"mixer": name, "pattern": pattern}
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (batch, seq_len, d_model))
  ctx = jax.random.normal(ks[1], (batch, seq_len, d_model)) if cross else None
  try:
    m = registry.build_mixer(name, d_model=d_model, num_heads=num_heads, causal=causal,
                             rngs=nnx.Rngs(seed))
    f, state = _pure_forward(m)
    jf = jax.jit(f)
    y = jf(state, x, ctx)
    if causal:   # the same call (one compile) with tokens perturb_at.. replaced, in x or in the context
      # Not stacked into one batch with the original: a mixer that draws per row (hashing, key
      # sampling) would differ between the copies for reasons other than causality.
      noise = jax.random.normal(ks[2], (batch, seq_len - perturb_at, d_model))
      if cross:
        y_moved = jf(state, x, ctx.at[:, perturb_at:].set(noise))
      else:
        y_moved = jf(state, x.at[:, perturb_at:].set(noise), None)
  except PatternUndefinedError as e:
    return {**out, "outcome": "refused", "detail": str(e)}
  except Exception as e:  # noqa: BLE001 - a crash in a cell is what this part reports
    return {**out, "outcome": "error", "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
  if y.shape != x.shape:
    return {**out, "outcome": "error", "detail": f"output shape {y.shape} != {x.shape}"}
  if not bool(jnp.all(jnp.isfinite(y))):
    return {**out, "outcome": "error", "detail": "non-finite output"}
  if causal:
    leak = float(jnp.max(jnp.abs(y_moved[:, :perturb_at] - y[:, :perturb_at])))
    scale = max(1.0, float(jnp.max(jnp.abs(y))))
    if leak > 1e-4 * scale:
      what = "context keys" if cross else "tokens"
      return {**out, "outcome": "error",
              "detail": f"not causal: {what} {perturb_at}.. change earlier outputs by {leak:.2e}"}
  return {**out, "outcome": "defined", "detail": ""}


def run_patterns(mixers=None, **cell_kw) -> list[dict]:
  """One row per mixer: `{"mixer", <pattern>: outcome, ..., "declared": {pattern: bool}, "agrees",
  "details"}`; `agrees` is whether every cell did what `registry.pattern_table` declares."""
  table = {r["mixer"]: r for r in registry.pattern_table()}
  names = mixers or sorted(table)
  rows = []
  for name in _progress(names, "patterns"):
    cells = {p: check_cell(name, p, **cell_kw) for p in PATTERNS}
    declared = {p: table[name][p] for p in PATTERNS}
    agrees = all((c["outcome"] == "defined") == bool(declared[p]) and c["outcome"] != "error"
                 for p, c in cells.items())
    rows.append({"mixer": name, **{p: cells[p]["outcome"] for p in PATTERNS}, "declared": declared,
                 "note": table[name]["note"], "agrees": agrees,
                 "details": {p: c["detail"] for p, c in cells.items() if c["outcome"] == "error"}})
  return rows


def observed_table(rows: list[dict]) -> list[dict]:
  """The rows in `registry.pattern_table()`'s form, from what the cells did (True: defined,
  False: refused, "error": neither)."""
  conv = {"defined": True, "refused": False, "error": "error"}
  return [{"mixer": r["mixer"], **{p: conv[r[p]] for p in PATTERNS}, "note": r["note"]} for r in rows]


def patterns_markdown(rows: list[dict]) -> str:
  """The observed table, in `registry.pattern_table_markdown()`'s format (the two are equal when
  every cell agrees with its declaration); a disagreeing cell reads FAIL."""
  lines = ["| mixer | self | causal self | cross | causal cross | why the others are undefined |",
           "| --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    cells = []
    for p in PATTERNS:
      ok = r[p] != "error" and (r[p] == "defined") == bool(r["declared"][p])
      cells.append(("yes" if r[p] == "defined" else "-") if ok else "FAIL")
    lines.append("| " + " | ".join([f"`{r['mixer']}`", *cells, r["note"]]) + " |")
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- 2: efficiency


def _efficiency_pattern(name: str) -> str:
  defined = registry.mixer_patterns(name) or ()
  return "causal_self" if "causal_self" in defined else "self"


def _compile(name, pattern, seq_len, *, batch, d_model, num_heads, dtype, mode, seed=0):
  """(compiled function, its arguments) of the forward (`mode="fwd"`) or of the gradient of
  `sum(y^2)` with respect to the parameters and the input (`mode="fwd_bwd"`)."""
  m = registry.build_mixer(name, d_model=d_model, num_heads=num_heads, causal=pattern == "causal_self",
                           rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(seed), (batch, seq_len, d_model), dtype)
  params = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)

  def fwd(p, r, x):
    return nnx.merge(graphdef, p, r)(x)

  def loss(p, r, x):
    return jnp.sum(fwd(p, r, x).astype(jnp.float32) ** 2)

  fn = fwd if mode == "fwd" else jax.grad(loss, argnums=(0, 2))
  args = (params, rest, x)
  return jax.jit(fn).lower(*args).compile(), args


def measure_mixer(name: str, seq_lens, *, batch=1, d_model=128, num_heads=2, dtype="float32",
                  repeats=3, warmup=1, max_gib=8.0, time_limit_s=20.0, compile_limit_s=60.0) -> list[dict]:
  """One record per (T, mode) for mixer `name`, in its causal self pattern (self where it has none).

  Per mode, T ascending: compile, read the compiled memory, skip the call if the peak exceeds
  `max_gib`, else time `repeats` calls after `warmup`. Once a call time is known, the next T's is
  predicted from the growth seen so far (the exponent of the last two Ts, 2 before there are two,
  clamped to [1, 3]); a T predicted to exceed `time_limit_s` per call, and every larger T, is
  skipped with the reason, as are the Ts after one whose compile took longer than `compile_limit_s`.
  An exception (out of memory, an unsupported size) skips the larger Ts."""
  pattern = _efficiency_pattern(name)
  dt = jnp.dtype(dtype)
  recs = []
  for mode in ("fwd", "fwd_bwd"):
    done: list[tuple[int, float]] = []
    stop = None
    for t in seq_lens:
      rec = {"mixer": name, "pattern": pattern, "T": int(t), "mode": mode}
      if stop is None and done:
        (t0, s0), (t1, s1) = (done[-2] if len(done) > 1 else (None, None)), done[-1]
        expo = 2.0 if t0 is None else min(3.0, max(1.0, math.log(s1 / s0) / math.log(t1 / t0)))
        predicted = s1 * (t / t1) ** expo
        if predicted > time_limit_s:
          stop = f"skipped: predicted {predicted:.1f} s per call > time_limit_s={time_limit_s:g}"
      if stop is not None:
        recs.append({**rec, "status": "skipped", "note": stop})
        continue
      try:
        t_c = time.perf_counter()
        compiled, args = _compile(name, pattern, t, batch=batch, d_model=d_model, num_heads=num_heads,
                                  dtype=dt, mode=mode)
        rec["compile_s"] = round(time.perf_counter() - t_c, 2)
        if rec["compile_s"] > compile_limit_s:   # a graph that grows with T (unrolled recursion)
          stop = f"skipped: compiling T={t} took {rec['compile_s']:.0f} s > compile_limit_s={compile_limit_s:g}"
        mem = common.compiled_memory(compiled)
        rec.update(mem)
        over = common.memory_limit_note(mem, max_gib)
        if over:
          stop = over.replace("not run", "skipped") + f" (at T={t})"
          recs.append({**rec, "status": "skipped", "note": over.replace("not run", "skipped")})
          continue
        times = common.timings(compiled, args, repeats=repeats, warmup=warmup)
        med = float(np.median(times))
        rec.update(status="ok", ms=round(1e3 * med, 3), ms_min=round(1e3 * min(times), 3), note="")
        done.append((int(t), med))
        del compiled, args
      except Exception as e:  # noqa: BLE001 - an out-of-memory or unsupported size: say so, go on
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        rec.update(status="failed", note=msg)
        stop = f"skipped: T={t} failed ({msg})"
      recs.append(rec)
  return recs


def efficiency_markdown(env: dict, recs: list[dict]) -> str:
  e = env["efficiency"]
  lines = [
      "# CAB efficiency: time and compiled memory vs sequence length", "",
      f"- date (UTC): {env['date_utc']}", f"- command: `{env['command']}`",
      f"- device: {env['backend']} ({env['device']}); machine: {common.machine_summary(env)}",
      f"- versions: {common.version_summary(env)}",
      f"- one mixer layer, B={e['batch']}, d_model={e['d_model']}, {e['num_heads']} heads, {e['dtype']}, "
      f"causal self pattern (self for mixers without one); fwd+bwd = gradient of sum(y^2) w.r.t. "
      f"parameters and input; time = median of {e['repeats']} calls after {e['warmup']} warm-up; "
      f"MiB = XLA compiled temp + output; limits: {e['max_gib']:g} GiB compiled peak, "
      f"{e['time_limit_s']:g} s per call (predicted from the smaller T), larger Ts skipped after a "
      f"compile over {e['compile_limit_s']:g} s", "",
      "| mixer | pattern | T | fwd ms | fwd MiB | fwd+bwd ms | fwd+bwd MiB | note |",
      "|---|---|---:|---:|---:|---:|---:|---|"]
  by = {(r["mixer"], r["T"], r["mode"]): r for r in recs}
  for mixer in dict.fromkeys(r["mixer"] for r in recs):
    for t in sorted({r["T"] for r in recs if r["mixer"] == mixer}):
      f, b = by.get((mixer, t, "fwd"), {}), by.get((mixer, t, "fwd_bwd"), {})
      notes = "; ".join(dict.fromkeys(n for n in (f.get("note"), b.get("note")) if n))
      cell = lambda r: (f"{r['ms']:,.2f}" if r.get("status") == "ok" else "")
      lines.append(f"| {mixer} | {f.get('pattern', b.get('pattern', ''))} | {t} | {cell(f)} | "
                   f"{common.mib(f.get('peak_bytes'))} | {cell(b)} | {common.mib(b.get('peak_bytes'))} | {notes} |")
  return "\n".join(lines) + "\n"


def plot_efficiency(recs: list[dict], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.6))
  for i, mixer in enumerate(dict.fromkeys(r["mixer"] for r in recs)):
    color = f"C{i % 10}"
    for mode, style in (("fwd_bwd", "-"), ("fwd", ":")):
      ok = sorted((r for r in recs if r["mixer"] == mixer and r["mode"] == mode and r.get("status") == "ok"),
                  key=lambda r: r["T"])
      if ok:
        ax_t.plot([r["T"] for r in ok], [r["ms"] for r in ok], style, marker="o", ms=3, color=color,
                  label=mixer if mode == "fwd_bwd" else None)
      mem = sorted((r for r in recs if r["mixer"] == mixer and r["mode"] == mode and r.get("peak_bytes")),
                   key=lambda r: r["T"])
      if mem:
        ax_m.plot([r["T"] for r in mem], [r["peak_bytes"] / 2 ** 20 for r in mem], style, marker="o", ms=3,
                  color=color, label=mixer if mode == "fwd_bwd" else None)
  for ax, ylabel in ((ax_t, "time per call (ms)"), (ax_m, "compiled peak memory (MiB)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
  ax_t.set_title("time: fwd+bwd (solid), fwd (dotted)")
  ax_m.set_title("XLA compiled memory: fwd+bwd (solid), fwd (dotted)")
  ax_t.legend(fontsize=7, ncol=2)
  ax_m.legend(fontsize=7, ncol=2)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------------------------- 3: quality

# The pattern a task's model builds its mixers in (decoders: causal self; ViT / encoders: self).
TASK_PATTERN = {"mqar": "causal_self", "lm": "causal_self", "selective_copy": "causal_self",
                "digits": "self", "mlm": "self"}


def load_config(spec: str):
  """`path/to/config.py[:preset]` (relative to the repository root) -> its `get_config(preset)`."""
  path, _, preset = spec.partition(":")
  full = path if os.path.isabs(path) else str(REPO / path)
  mod_spec = importlib.util.spec_from_file_location("_cab_task_config", full)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(preset) if preset else mod.get_config()


def _apply_overrides(cfg, overrides) -> None:
  flat = {}

  def walk(prefix, node):
    for k in node.keys():
      v = node[k]
      if hasattr(v, "keys") and not (prefix + k).endswith("mixer_options"):
        walk(prefix + k + ".", v)
      else:
        flat[prefix + k] = v
  walk("", overrides or {})
  with cfg.unlocked():
    for name, v in flat.items():
      *path, last = name.split(".")
      node = cfg
      for p in path:
        node = node[p]
      node[last] = v


def run_quality(tasks_cfg, workdir: str, only=None) -> list[dict]:
  """Trains the mixers of each entry of `tasks_cfg` (name -> {task, config, mixers, overrides});
  returns one record per (entry, mixer): accuracy, params, steps/s, or `skipped` with the reason."""
  from experiments import compare
  from experiments import tasks as tasks_lib
  out = []
  for entry_name in tasks_cfg.keys():
    if only and entry_name not in only:
      continue
    e = tasks_cfg[entry_name]
    mixers = _split_names(e.mixers)
    base = {"entry": entry_name, "task": e.task, "config": e.config}
    why = None
    if e.task not in tasks_lib.registered_tasks():
      why = f"task {e.task!r} is not registered in experiments/tasks.py (known: {', '.join(tasks_lib.registered_tasks())})"
    elif not (REPO / e.config.partition(":")[0]).is_file() and not os.path.isfile(e.config.partition(":")[0]):
      why = f"config file {e.config.partition(':')[0]} does not exist"
    if why:
      print(f"quality: skipping {entry_name}: {why}", flush=True)
      out += [{**base, "mixer": m, "status": "skipped", "note": why} for m in mixers]
      continue
    cfg = load_config(e.config)
    _apply_overrides(cfg, e.get("overrides"))
    if cfg.task != e.task:
      raise ValueError(f"quality.tasks.{entry_name}: config {e.config} is task {cfg.task!r}, not {e.task!r}")
    need = TASK_PATTERN.get(e.task, "causal_self")
    runnable = []
    for m in mixers:
      if need not in (registry.mixer_patterns(m) or ()):
        why = f"{m} does not define the {need!r} pattern this task's model uses"
        print(f"quality: {entry_name}: skipping {why}", flush=True)
        out.append({**base, "mixer": m, "status": "skipped", "note": why})
      else:
        runnable.append(m)
    if not runnable:
      continue
    print(f"quality: {entry_name} ({e.config}): {', '.join(runnable)}", flush=True)
    for r in compare.run(cfg, runnable, [], os.path.join(workdir, "quality", entry_name)):
      out.append({**base, "mixer": r["mixer"], "status": "ok", "d_model": r["d_model"], "params": r["params"],
                  "accuracy": r["accuracy"], "steps_per_s": r["steps_per_s"], "steps": cfg.train.steps,
                  "history": r["history"], "note": ""})
  return out


def quality_markdown(env: dict, recs: list[dict]) -> str:
  entries = list(dict.fromkeys(r["entry"] for r in recs))
  lines = ["# CAB quality: test accuracy per task", "",
           f"- date (UTC): {env['date_utc']}", f"- command: `{env['command']}`",
           f"- machine: {common.machine_summary(env)}; versions: {common.version_summary(env)}", "",
           "| mixer | " + " | ".join(entries) + " |", "|---|" + "---:|" * len(entries)]
  by = {(r["entry"], r["mixer"]): r for r in recs}
  for mixer in dict.fromkeys(r["mixer"] for r in recs):
    cells = []
    for e in entries:
      r = by.get((e, mixer))
      cells.append("" if r is None else f"{r['accuracy']:.4f}" if r["status"] == "ok" else "skipped")
    lines.append(f"| {mixer} | " + " | ".join(cells) + " |")
  lines += ["", "Per entry (config, steps, params, steps/s; steps/s on a shared machine are indicative):", ""]
  for e in entries:
    rs = [r for r in recs if r["entry"] == e]
    ok = [r for r in rs if r["status"] == "ok"]
    head = f"- **{e}** (task `{rs[0]['task']}`, `{rs[0]['config']}`"
    head += f", {ok[0]['steps']} steps)" if ok else ")"
    lines.append(head + ": " + "; ".join(
        f"{r['mixer']} {r['accuracy']:.4f} ({r['params']:,} params, {r['steps_per_s']:.1f} steps/s)"
        if r["status"] == "ok" else f"{r['mixer']} skipped: {r['note']}" for r in rs))
  return "\n".join(lines) + "\n"


def plot_quality(recs: list[dict], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ok = [r for r in recs if r["status"] == "ok"]
  entries = list(dict.fromkeys(r["entry"] for r in ok))
  mixers = list(dict.fromkeys(r["mixer"] for r in ok))
  fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(entries) + 2), 4))
  width = 0.8 / max(1, len(mixers))
  by = {(r["entry"], r["mixer"]): r["accuracy"] for r in ok}
  for i, m in enumerate(mixers):
    xs = [j + i * width for j, e in enumerate(entries) if (e, m) in by]
    ax.bar(xs, [by[e, m] for e in entries if (e, m) in by], width, label=m, color=f"C{i % 10}")
  ax.set_xticks([j + 0.4 - width / 2 for j in range(len(entries))], entries, fontsize=8)
  ax.set_ylim(0, 1.02)
  ax.set_ylabel("test accuracy")
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=7, ncol=2)
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------------------- driver


def _progress(items, desc):
  try:
    from tqdm import tqdm
    return tqdm(items, desc=desc, leave=False, disable=not sys.stderr.isatty())
  except ImportError:
    return items


def _seq_lens(value) -> list[int]:
  if value == "auto":   # longer on an accelerator
    top = 32768 if jax.default_backend() == "cpu" else 131072
    return [2 ** k for k in range(10, int(math.log2(top)) + 1)]
  return [int(s) for s in _split_names(str(value))]


def _write(out_base: str, payload: dict, markdown: str) -> None:
  os.makedirs(os.path.dirname(out_base) or ".", exist_ok=True)
  with open(out_base + ".json", "w") as f:
    json.dump(payload, f, indent=1, default=str, allow_nan=False)
  with open(out_base + ".md", "w") as f:
    f.write(markdown)


def run_suite(config, workdir: str, *, parts=PARTS, record: bool = False, all_mixers: bool = False,
              bench_dir: str | None = None) -> dict:
  """Runs `parts` of the suite as `config` (configs/cab.py) says; writes tables and plots into
  `workdir` (and, with `record`, into `bench_dir`, default `benchmarks/`). Returns
  `{"patterns": rows, "efficiency": records, "quality": records}` for the parts run, plus
  `"pattern_failures"`: the mixers whose cells disagree with their declarations."""
  from experiments import cab_patterns, guards
  bad = [p for p in parts if p not in PARTS]
  if bad:
    raise guards.ConfigError("--parts", ",".join(bad), f"must name parts of {', '.join(PARTS)}")
  os.makedirs(workdir, exist_ok=True)
  bench_dir = bench_dir or str(REPO / "benchmarks")
  backend = jax.default_backend()
  env = common.environment(optional=("flax",), config=config.to_dict())
  result: dict[str, Any] = {}
  outputs = []

  def emit(name, payload, md, bench_name=None):
    for base in [os.path.join(workdir, name)] + ([os.path.join(bench_dir, bench_name)] if record and bench_name else []):
      _write(base, payload, md)
      outputs.append(base + ".md")

  if "patterns" in parts:
    p = config.patterns
    rows = run_patterns(_split_names(p.mixers) or None, seq_len=p.seq_len, d_model=p.d_model,
                        num_heads=p.num_heads, batch=p.batch, perturb_at=p.perturb_at)
    md = patterns_markdown(rows)
    emit("cab_patterns", {"environment": env, "results": rows}, cab_patterns.HEADER + md)
    if record and not _split_names(p.mixers):   # the recorded table covers every mixer
      with open(os.path.join(bench_dir, "cab_patterns.md"), "w") as f:
        f.write(cab_patterns.HEADER + md)
      outputs.append(os.path.join(bench_dir, "cab_patterns.md"))
    result["patterns"] = rows
    result["pattern_failures"] = [r["mixer"] for r in rows if not r["agrees"]]
    print(md, flush=True)
    for r in rows:
      for pat, d in r["details"].items():
        print(f"patterns: {r['mixer']} {pat}: {d}", flush=True)

  if "efficiency" in parts:
    e = config.efficiency
    mixers = sorted(registry.list_mixers()) if all_mixers else _split_names(e.mixers)
    seq_lens = _seq_lens(e.seq_lens)
    env_e = {**env, "efficiency": {k: e[k] for k in ("batch", "d_model", "num_heads", "dtype", "repeats",
                                                      "warmup", "max_gib", "time_limit_s", "compile_limit_s")}}
    env_e["efficiency"]["seq_lens"] = seq_lens
    recs = []
    for name in _progress(mixers, "efficiency"):
      recs += measure_mixer(name, seq_lens, batch=e.batch, d_model=e.d_model, num_heads=e.num_heads,
                            dtype=e.dtype, repeats=e.repeats, warmup=e.warmup, max_gib=e.max_gib,
                            time_limit_s=e.time_limit_s, compile_limit_s=e.compile_limit_s)
      print(f"efficiency: {name}: " + ", ".join(
          f"T={r['T']} {r['mode']} {r['ms']:.1f} ms" if r["status"] == "ok" else f"T={r['T']} {r['mode']} {r['status']}"
          for r in recs if r["mixer"] == name), flush=True)
    md = efficiency_markdown(env_e, recs)
    emit("cab_efficiency", {"environment": env_e, "results": recs}, md, f"cab_efficiency_{backend}")
    title = f"one mixer layer, B={e.batch}, d_model={e.d_model}, {e.num_heads} heads, {e.dtype}, {env['device']}"
    for d in [workdir] + ([bench_dir] if record else []):
      name = "cab_efficiency.png" if d == workdir else f"cab_efficiency_{backend}.png"
      plot_efficiency(recs, os.path.join(d, name), title)
    result["efficiency"] = recs
    print(md, flush=True)

  if "quality" in parts:
    recs = run_quality(config.quality.tasks, workdir)
    md = quality_markdown(env, recs)
    emit("cab_quality", {"environment": env, "results": recs}, md, f"cab_quality_{backend}")
    for d in [workdir] + ([bench_dir] if record else []):
      name = "cab_quality.png" if d == workdir else f"cab_quality_{backend}.png"
      plot_quality(recs, os.path.join(d, name), "CAB quality (test accuracy)")
    result["quality"] = recs
    print(md, flush=True)
  print("wrote " + ", ".join(outputs), flush=True)
  return result


def _define_flags():
  """Defined only when run as a program (see `experiments.compare._define_flags`)."""
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/cab.py", "Path to configs/cab.py[:preset].",
                                  lock_config=False)
  flags.DEFINE_string("workdir", "workdirs/cab", "Output directory.")
  flags.DEFINE_list("parts", list(PARTS), f"Parts to run, of {', '.join(PARTS)}.")
  flags.DEFINE_boolean("record", False, "Also write the tables and plots into benchmarks/.")
  flags.DEFINE_boolean("all_mixers", False, "Efficiency: every registered mixer, not efficiency.mixers.")


def main(argv):
  del argv
  from absl import flags
  from experiments import guards
  F = flags.FLAGS
  out = guards.exit_on_run_error(lambda: run_suite(F.config, F.workdir, parts=tuple(F.parts), record=F.record,
                                                   all_mixers=F.all_mixers))
  if out.get("pattern_failures"):
    print(f"error: cells disagree with their declared patterns: {', '.join(out['pattern_failures'])}",
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  from absl import app
  from experiments import guards as _guards
  _define_flags()
  app.run(main, flags_parser=_guards.parse_flags)
