r"""Scaling table on host CPU devices: one model under data, fully-sharded and tensor parallelism.

For each device count n in `--devices` a subprocess is started with
`XLA_FLAGS=--xla_force_host_platform_device_count=n` (the device count is fixed when the backend
starts, so it cannot change inside one process). There, for each strategy in `--strategies`, the
trainer's own pieces (`experiments.trainer.make_mesh/state_shardings/make_steps`) build the MQAR
model and AdamW state on the mesh
  dp:   {"data": n}    parameters and optimizer state replicated, batch split n ways;
  fsdp: {"fsdp": n}    parameters and optimizer state split over `embed` dims, batch split;
  tp:   {"tensor": n}  Megatron: heads / MLP hidden / vocab split, batch replicated;
and records the bytes of parameters and of optimizer state on the most loaded device, the compiled
train step's temporary memory per device (XLA memory analysis), and the median wall time of
`--steps` jitted train steps after `--warmup` (`block_until_ready` after each). With n = 1 the
three strategies are the same program, so it runs once ("single"). Writes `<out>.json` and
`<out>.md` and prints the table.

  .venv/bin/python -m experiments.bench_scaling --out=benchmarks/scaling_cpu

Host "devices" share the same cores, so the times show the overhead of partitioning and
collectives rather than speed-ups; the byte columns are exact.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

from experiments import bench_common as common

_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Host device counts.")
_STRATEGIES = flags.DEFINE_list("strategies", ["dp", "fsdp", "tp"], "Parallelism strategies.")
_D_MODEL = flags.DEFINE_integer("d_model", 128, "Model width.")
_LAYERS = flags.DEFINE_integer("num_layers", 4, "Decoder blocks.")
_HEADS = flags.DEFINE_integer("num_heads", 8, "Attention heads (divisible by the largest n for TP).")
_MLP = flags.DEFINE_float("mlp_ratio", 4.0, "MLP hidden size / d_model (0: no MLP).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch (divisible by the largest n).")
_SEQ = flags.DEFINE_integer("seq_len", 64, "MQAR sequence length.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed train steps.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps first (the first one compiles).")
_OUT = flags.DEFINE_string("out", "benchmarks/scaling_cpu", "Output path without extension.")
_WORKER = flags.DEFINE_integer("worker", 0, "Internal: measure with this many devices, print JSON.")

MESHES = {"dp": "data", "fsdp": "fsdp", "tp": "tensor"}


def _config():
  from configs import mqar
  c = mqar.get_config()
  c.data.num_train, c.data.num_test, c.data.seq_len = 1024, 64, _SEQ.value
  c.model.d_model, c.model.num_layers, c.model.num_heads = _D_MODEL.value, _LAYERS.value, _HEADS.value
  c.model.mlp_ratio = _MLP.value
  c.train.batch_size, c.train.steps = _BATCH.value, 100
  return c


def _measure(n: int) -> list[dict]:
  """Runs in the worker process (n host devices): one record per strategy."""
  import jax
  import numpy as np
  from flax import nnx

  from attnjax.distributed import sharding as sh
  from experiments import tasks as tasks_lib
  from experiments import trainer

  assert jax.device_count() == n, (jax.device_count(), n)
  cfg = _config()
  task = tasks_lib.make_task(cfg)
  model = task.build_model(cfg, nnx.Rngs(0))
  graphdef, params0, rest0 = nnx.split(model, nnx.Param, ...)
  # Host copies: each strategy places fresh buffers (the step donates its inputs, and a
  # device_put onto a device that already holds the array may alias it instead of copying).
  params0, rest0 = jax.tree.map(np.asarray, params0), jax.tree.map(np.asarray, rest0)
  tx = trainer.make_optimizer(cfg)
  batches = [next(task.train_loader) for _ in range(_WARMUP.value + _STEPS.value)]
  records = []
  for strategy in (["single"] if n == 1 else _STRATEGIES.value):
    with cfg.unlocked():
      cfg.mesh = {"data": 1} if strategy == "single" else {MESHES[strategy]: n}
    mesh = trainer.make_mesh(cfg)
    p_sh, r_sh, o_sh = trainer.state_shardings(cfg, mesh, params0, rest0, tx)
    params, rest = jax.device_put(params0, p_sh), jax.device_put(rest0, r_sh)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
    b_sh = jax.tree.map(lambda x: sh.batch_sharding(mesh, np.ndim(x)), task.eval_batches[0])
    train_step, _ = trainer.make_steps(graphdef, task, tx, (p_sh, r_sh, o_sh, b_sh))
    first = sh.shard_batch(batches[0], mesh)
    guard = trainer.init_guard(0)   # the non-finite guard every train step carries
    t0 = time.perf_counter()
    compiled = train_step.lower(params, rest, opt_state, first, guard).compile()
    compile_s = time.perf_counter() - t0
    temp = common.compiled_memory(compiled).get("temp_bytes")
    rec = {"devices": n, "strategy": strategy, "mesh": dict(mesh.shape),
           "param_bytes_per_device": sh.bytes_per_device(params),
           "opt_bytes_per_device": sh.bytes_per_device(opt_state),
           "param_bytes_total": int(sum(x.nbytes for x in jax.tree.leaves(params))),
           "temp_bytes_per_device": temp, "compile_s": round(compile_s, 2)}
    times = []
    for i, batch in enumerate(batches):
      batch = sh.shard_batch(batch, mesh)
      t0 = time.perf_counter()
      params, rest, opt_state, metrics, guard = compiled(params, rest, opt_state, batch, guard)
      jax.block_until_ready((params, metrics))
      if i >= _WARMUP.value:
        times.append(time.perf_counter() - t0)
    rec["step_ms_median"] = round(1e3 * statistics.median(times), 2)
    rec["step_ms_min"] = round(1e3 * min(times), 2)
    rec["final_loss"] = float(metrics["loss"])
    records.append(rec)
    del params, rest, opt_state
  return records


def _run_worker(n: int) -> list[dict]:
  env = dict(os.environ)
  flags_ = [f for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags_ + [f"--xla_force_host_platform_device_count={n}"])
  env["JAX_PLATFORMS"] = "cpu"
  args = [a for a in sys.argv[1:] if not a.startswith("--worker")]
  proc = subprocess.run([sys.executable, "-m", "experiments.bench_scaling", *args, f"--worker={n}"],
                        env=env, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"worker with {n} devices failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(b) -> str:
  return "" if b is None else f"{b / 2**20:.3f}"


def _markdown(env: dict, rows: list[dict]) -> str:
  single = next((r for r in rows if r["devices"] == 1), None)
  lines = [
      "# Scaling on host CPU devices: DP vs FSDP vs Megatron TP (MQAR decoder)", "",
      f"- date (UTC): {env['date_utc']}",
      f"- command: `{env['command']}`",
      f"- machine: {common.machine_summary(env)}",
      f"- versions: {common.version_summary(env, ('jax', 'flax', 'python'))}",
      f"- model: {env['model']}; AdamW (2 moments per parameter); global batch {env['batch_size']}",
      f"- each n runs in its own process with `XLA_FLAGS=--xla_force_host_platform_device_count=n`; "
      f"time = median of {env['steps']} jitted train steps after {env['warmup']} warm-up steps",
      "", "**Step times were measured on 2 CPU cores shared with other jobs: all n host devices run "
      "on those same cores, so the times are only indicative (they show partitioning and "
      "collective overhead, not speed-up). The byte columns are exact.**", "",
      "| devices | strategy | mesh (data, fsdp, tensor) | params MiB/device | optimizer MiB/device | "
      "params+opt vs 1 device | XLA temp MiB/device | median step ms |",
      "|---:|---|---|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    m = r["mesh"]
    both = r["param_bytes_per_device"] + r["opt_bytes_per_device"]
    base = (single["param_bytes_per_device"] + single["opt_bytes_per_device"]) if single else None
    rel = f"{both / base:.3f}" if base else ""
    lines.append(f"| {r['devices']} | {r['strategy']} | ({m['data']}, {m['fsdp']}, {m['tensor']}) | "
                 f"{_mib(r['param_bytes_per_device'])} | {_mib(r['opt_bytes_per_device'])} | {rel} | "
                 f"{_mib(r['temp_bytes_per_device'])} | {r['step_ms_median']} |")
  lines += ["", "Reading: DP keeps a full copy per device (ratio 1). FSDP divides every parameter "
            "with an `embed` dimension and its Adam moments by n. TP divides the attention "
            "projections, MLP and vocabulary embedding over `tensor` while norms, convolution and "
            "`embed`-only vectors stay replicated, so its ratio stays a little above 1/n.", ""]
  return "\n".join(lines)


def main(argv):
  del argv
  if _WORKER.value:
    print(json.dumps(_measure(_WORKER.value)), flush=True)
    return
  # No device fields: this process only starts the workers, each with its own device count.
  env = common.environment(
      optional=("flax",), devices=False,
      model=(f"MQAR DecoderLM d_model {_D_MODEL.value}, {_LAYERS.value} layers, "
             f"{_HEADS.value} heads, mlp_ratio {_MLP.value}, softmax attention, vocab 512, "
             f"seq_len {_SEQ.value}"),
      batch_size=_BATCH.value, steps=_STEPS.value, warmup=_WARMUP.value,
      step_time_note="2 shared CPU cores; indicative only")
  rows = []
  for n in (int(x) for x in _DEVICES.value):
    for rec in _run_worker(n):
      print(json.dumps(rec), flush=True)
      rows.append(rec)
  print(common.write_results(_OUT.value, env, rows, _markdown))


if __name__ == "__main__":
  app.run(main)
