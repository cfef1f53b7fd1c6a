r"""Trains a model on a task from an ml_collections config.

  .venv/bin/python -m experiments.train --config=configs/mqar.py --config.model.mixer=softmax \
      --workdir=workdirs/mqar_softmax

Writes `metrics.jsonl` (one JSON object per log/eval step) and `summary.json` into the workdir.
A bad config value, a workdir another run holds, a non-finite loss, a failed save or checkpoints
that are all damaged end the run with one `error: ...` line on stderr and exit code 2 (bad input)
or 1 (a run that had to stop); see README "Training runs: what is guaranteed".

Sharded / multi-process (see `configs/mqar_sharded.py`):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python -m experiments.train \
      --config=configs/mqar_sharded.py --config.mesh.fsdp=4 --config.mesh.tensor=2 --workdir=workdirs/s
  # N processes (one per host); flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID:
  .venv/bin/python -m experiments.train --config=... --coordinator_address=localhost:1234 \
      --num_processes=2 --process_id=0
"""

from __future__ import annotations

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import guards
from experiments.trainer import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                          lock_config=True)
flags.mark_flag_as_required("config")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics (created if missing).")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs); "
                             "default: $JAX_COORDINATOR_ADDRESS.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Process count; default: $JAX_NUM_PROCESSES.")
_PID = flags.DEFINE_integer("process_id", None, "This process's id; default: $JAX_PROCESS_ID.")
_CPU_COLLECTIVES = flags.DEFINE_string("cpu_collectives", "gloo", "CPU collectives for multi-process runs.")


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize` when a coordinator is given by flag or environment."""
  coord = _COORD.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  nproc = _NPROC.value if _NPROC.value is not None else os.environ.get("JAX_NUM_PROCESSES")
  pid = _PID.value if _PID.value is not None else os.environ.get("JAX_PROCESS_ID")
  if not coord:
    if nproc not in (None, 1, "1"):
      raise app.UsageError("--num_processes > 1 needs --coordinator_address")
    return
  if nproc is None or pid is None:
    raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
  # Before the backend starts: cross-process collectives on CPU devices go through gloo.
  jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
  jax.distributed.initialize(coordinator_address=coord, num_processes=int(nproc), process_id=int(pid))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  maybe_initialize_distributed()
  config = _CONFIG.value
  guards.exit_on_run_error(lambda: guards.validate(config))  # before the config dump and any build
  workdir = _WORKDIR.value or os.path.join("workdirs", f"{config.task}_{config.model.mixer}")
  logging.info("config:\n%s", config)
  summary = guards.exit_on_run_error(lambda: train_and_evaluate(config, workdir, print_report=True))
  if jax.process_index() != 0:  # process 0 reports for all (and alone writes metrics/summary)
    return
  ev = summary["final_eval"]
  print(f"{summary['mixer']}: params={summary['params']:,} eval_accuracy={ev.get('accuracy', float('nan')):.4f} "
        f"eval_loss={ev.get('loss', float('nan')):.4f} steps/s={summary['steps_per_s']:.1f} -> {workdir}")
  if summary["preempted"]:
    print(f"stopped by SIGTERM after step {summary['last_step']} (checkpoint saved; rerun to resume)")


if __name__ == "__main__":
  app.run(main, flags_parser=guards.parse_flags)
