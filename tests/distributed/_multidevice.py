"""Runs Python snippets in a subprocess that sees N host CPU devices (for `multidevice` tests).

`XLA_FLAGS=--xla_force_host_platform_device_count=N` only takes effect before jax initialises its
backend, and the pytest process has already done that with one device, so multi-device checks run
in a fresh interpreter. Keep their number small: each pays a jax import and its own compiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def multidevice_env(num_devices: int = 8) -> dict[str, str]:
  """A copy of the environment with `num_devices` CPU devices and the repository importable."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  # First, so that no later token can keep XLA from reading it; jax's own option as well.
  env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={num_devices}"] + flags)
  env["JAX_NUM_CPU_DEVICES"] = str(num_devices)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
  return env


def run_snippet(code: str, *, num_devices: int = 8, timeout: float = 600.0) -> str:
  """Runs `code` (dedented) with `num_devices` host CPU devices; returns its stdout.

  Raises RuntimeError with the tail of stderr when the process fails or times out.
  """
  try:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT,
                          env=multidevice_env(num_devices), capture_output=True, text=True,
                          timeout=timeout)
  except subprocess.TimeoutExpired as e:
    raise RuntimeError(f"multi-device snippet timed out after {timeout}s; stderr tail:\n"
                       f"{(e.stderr or '')[-4000:] if isinstance(e.stderr, str) else ''}") from e
  if proc.returncode != 0:
    raise RuntimeError(f"multi-device snippet failed (exit {proc.returncode}); stderr tail:\n"
                       f"{proc.stderr[-6000:]}")
  return proc.stdout


def run_json(code: str, *, num_devices: int = 8, timeout: float = 600.0):
  """Runs `code` like `run_snippet` and parses the last non-empty stdout line as JSON."""
  out = run_snippet(code, num_devices=num_devices, timeout=timeout)
  lines = [line for line in out.splitlines() if line.strip()]
  if not lines:
    raise RuntimeError("multi-device snippet printed nothing; it must print one JSON line last")
  return json.loads(lines[-1])
