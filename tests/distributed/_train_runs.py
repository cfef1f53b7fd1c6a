"""Starts `experiments.train` runs of `configs/mqar_sharded.py:tiny` as subprocesses (tests only).

Shared by test_checkpoint.py (kill / SIGTERM / resume) and test_multiprocess.py. Every run uses
the same config, so the uninterrupted 8-device run (`reference_run`) is made once per pytest
session (per xdist worker) and both files compare against it. Subprocesses share a persistent
XLA compilation cache in the session's temp directory: a restarted run loads its train/eval
steps instead of compiling them again, which keeps the restart-heavy tests affordable on CPU.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable

from _multidevice import REPO_ROOT, multidevice_env

CONFIG = "configs/mqar_sharded.py:tiny"
STEPS = 20  # train.steps of the :tiny preset (the loss schedule depends on it: keep it)
TIMEOUT_S = 600.0  # per process; generous because the test machine's cores are shared


def run_env(cache_dir: str, num_devices: int = 8) -> dict[str, str]:
  env = multidevice_env(num_devices)
  env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
  return env


def start(workdir: str, cache_dir: str, *flags: str, num_devices: int = 8, tag: str = "run",
          kill_during_save_step: int = 0) -> subprocess.Popen:
  """Launches `python -m experiments.train --config=CONFIG --workdir=workdir *flags`.

  `kill_during_save_step=N` runs it through the test-only `_train_entry.py` instead, which
  SIGKILLs the process once the save of step N has started.

  stdout/stderr go to `<workdir>.<tag>.out/.err` (not pipes, which could fill and block).
  """
  os.makedirs(os.path.dirname(os.path.abspath(workdir)), exist_ok=True)
  entry = (["-m", "experiments.train"] if not kill_during_save_step else
           [os.path.join(os.path.dirname(os.path.abspath(__file__)), "_train_entry.py"),
            f"--kill_during_save_step={kill_during_save_step}"])
  cmd = [sys.executable, *entry, f"--config={CONFIG}", f"--workdir={workdir}", *flags]
  out = open(f"{workdir}.{tag}.out", "w")
  err = open(f"{workdir}.{tag}.err", "w")
  proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=run_env(cache_dir, num_devices), stdout=out,
                          stderr=err)
  proc.log_paths = (out.name, err.name)  # type: ignore[attr-defined]
  out.close()
  err.close()
  return proc


def output(proc: subprocess.Popen) -> tuple[str, str]:
  out, err = proc.log_paths  # type: ignore[attr-defined]
  return open(out).read(), open(err).read()


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT_S, expect_rc: int | None = 0) -> int:
  """Waits for `proc`; raises with its stderr tail when the exit code is not `expect_rc`."""
  try:
    rc = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise AssertionError(f"training run timed out after {timeout}s:\n{output(proc)[1][-3000:]}")
  if expect_rc is not None and rc != expect_rc:
    raise AssertionError(f"training run exited with {rc}, expected {expect_rc}; stderr tail:\n"
                         f"{_tail(output(proc)[1])}")
  return rc


def _tail(text: str, n: int = 4000) -> str:
  # Orbax logs every save at INFO; keep the lines that explain a failure.
  lines = [l for l in text.splitlines() if not l.startswith("I")]
  return "\n".join(lines)[-n:]


def wait_until(pred: Callable[[], bool], proc: subprocess.Popen, what: str,
               timeout: float = TIMEOUT_S) -> None:
  """Polls `pred` every 20 ms until it holds; fails if `proc` exits first or time runs out."""
  t0 = time.monotonic()
  while not pred():
    if proc.poll() is not None:
      raise AssertionError(f"training run exited (rc={proc.returncode}) before {what}; stderr tail:\n"
                           f"{_tail(output(proc)[1])}")
    if time.monotonic() - t0 > timeout:
      proc.kill()
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(0.02)


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:  # the line being written right now
        pass
  return out


def train_losses(records: list[dict]) -> dict[int, float]:
  return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def logged_step(workdir: str) -> int:
  """The last step with a train record in metrics.jsonl (0 when none)."""
  return max(train_losses(read_metrics(workdir)), default=0)


def completed_steps(checkpoint_dir: str) -> list[int]:
  """Finalized orbax steps (plain integer directory names; temporary ones are excluded)."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(n) for n in os.listdir(checkpoint_dir) if n.isdigit())


def send(proc: subprocess.Popen, sig: int) -> None:
  os.kill(proc.pid, sig)


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def reference_run(basetemp) -> str:
  """The uninterrupted single-process 8-device run (fsdp 4 x tensor 2); returns its workdir."""
  workdir = os.path.join(str(basetemp), "reference")
  if os.path.exists(os.path.join(workdir, "summary.json")):
    return workdir
  proc = start(workdir, cache_dir(basetemp), tag="reference")
  finish(proc)
  return workdir


def cache_dir(basetemp) -> str:
  return os.path.join(str(basetemp), "jax_cache")


SIGKILL, SIGTERM = signal.SIGKILL, signal.SIGTERM
