"""Pieces shared by the benchmark scripts `experiments/bench_*.py`.

Timing (`timings`, `median_seconds`, `cuda_event_times_ms`), compiled memory (`compiled_memory`,
`memory_limit_note`), provenance of a run (`environment`, `versions`, `command_line`, `utc_now`)
and output (`write_results`, `mib`, `machine_summary`, `version_summary`). The scripts keep their
own JSON keys and markdown tables; these helpers only produce the parts they have in common, so
results recorded before and after the helpers were shared stay comparable.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Sequence

import jax


# ----------------------------------------------------------------------------------------- timing


def timings(fn: Callable, args: Sequence = (), repeats: int = 1, warmup: int = 1) -> list[float]:
  """Wall seconds of `repeats` calls `fn(*args)`, after `warmup` untimed calls.

  Every call is followed by `jax.block_until_ready`, so a time covers the computation and not only
  its dispatch. With a jitted (not yet compiled) `fn`, the first warm-up call also compiles.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


def median_seconds(fn: Callable, args: Sequence = (), repeats: int = 1, warmup: int = 1) -> float:
  """Median of `timings(fn, args, repeats, warmup)`."""
  return statistics.median(timings(fn, args, repeats, warmup))


def cuda_event_times_ms(step: Callable[[], object], repeats: int, warmup: int) -> list[float]:
  """Milliseconds of `repeats` calls `step()` of torch CUDA work, after `warmup` untimed calls.

  Timed with CUDA events around each call and a synchronisation after it (torch launches are
  asynchronous, so host wall time would measure the launch only). Imports torch only when called.
  """
  import torch  # pylint: disable=import-outside-toplevel
  for _ in range(warmup):
    step()
  torch.cuda.synchronize()
  times = []
  for _ in range(repeats):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end))
  return times


# ----------------------------------------------------------------------------------------- memory


def compiled_memory(compiled) -> dict:
  """XLA's memory analysis of a compiled executable, in bytes ({} where the backend has none).

  `peak_bytes` = temp + output: what one call allocates beyond its inputs.
  """
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  return {"temp_bytes": int(ma.temp_size_in_bytes), "output_bytes": int(ma.output_size_in_bytes),
          "argument_bytes": int(ma.argument_size_in_bytes),
          "peak_bytes": int(ma.temp_size_in_bytes + ma.output_size_in_bytes)}


def memory_limit_note(memory: dict, max_gib: float) -> str | None:
  """The 'not run' note of a configuration whose compiled peak exceeds `max_gib`, else None."""
  peak = memory.get("peak_bytes", 0)
  if peak > max_gib * 2 ** 30:
    return f"not run: compiled peak {peak / 2 ** 30:.1f} GiB > --max_gib"
  return None


# ------------------------------------------------------------------------------------- provenance


def utc_now() -> str:
  """The current UTC time to the second, ISO 8601."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
  """The command that started this process, as `python -m experiments.bench_x --flag=...`."""
  spec = getattr(sys.modules["__main__"], "__spec__", None)
  # Under `python -m` the main module's spec names it; otherwise fall back to the script path.
  prog = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
  return " ".join([prog, *sys.argv[1:]])


def versions(*optional: str) -> dict:
  """jax, jaxlib, numpy, python versions, then those of `optional` modules (None if not importable).

  Optional modules (torch, triton, fla, natten, flax) are imported only when named: torch and fla
  take seconds to import and are absent on the CPU machine.
  """
  out = {name: _module_version(name) for name in ("jax", "jaxlib", "numpy")}
  out["python"] = platform.python_version()
  out.update((name, _module_version(name)) for name in optional)
  return out


def _module_version(name: str) -> str | None:
  try:
    return importlib.import_module(name).__version__
  except Exception:  # pylint: disable=broad-except  (an absent or broken install alike)
    return None


def environment(optional: Sequence[str] = (), devices: bool = True, **extra) -> dict:
  """Where and how a benchmark ran, for the head of its JSON and markdown.

  Keys: date_utc, command, backend, device, num_devices (when `devices`; a parent that only starts
  workers with other device counts passes False), cpu, cpu_count, load_average_at_start, the
  versions of `versions(*optional)`, then `extra` (the script's own settings).
  """
  env = {"date_utc": utc_now(), "command": command_line()}
  if devices:
    env.update(backend=jax.default_backend(), device=jax.devices()[0].device_kind,
               num_devices=jax.device_count())
  env.update(cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
             load_average_at_start=os.getloadavg())
  env.update(versions(*optional))
  env.update(extra)
  return env


# ----------------------------------------------------------------------------------------- output


def mib(nbytes) -> str:
  """Bytes as MiB to 0.1, with thousands separators, for a table cell; '' for None."""
  return "" if nbytes is None else f"{nbytes / 2 ** 20:,.1f}"


def machine_summary(env: dict, note: str | None = None) -> str:
  """'x86_64, 2 cores visible, load average at start 0.50, 0.40, 0.30 (note)' from `environment`."""
  load = ", ".join(f"{x:.2f}" for x in env["load_average_at_start"])
  text = f"{env['cpu']}, {env['cpu_count']} cores visible, load average at start {load}"
  return f"{text} ({note})" if note else text


def version_summary(env: dict, names: Sequence[str] = ("jax", "numpy", "python")) -> str:
  """'jax 0.4, numpy 2.0, python 3.12' from the version entries of `environment`."""
  return ", ".join(f"{name} {env[name]}" for name in names)


def write_results(out: str, env: dict, records: list, markdown_fn: Callable[[dict, list], str],
                  keys: tuple[str, str] = ("environment", "results")) -> str:
  """Writes `<out>.json` ({keys[0]: env, keys[1]: records}) and `<out>.md`; returns the markdown.

  Rewrites both files whole, so a script may call it after every case: a run cut short by a time
  limit then keeps everything it measured so far.
  """
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump({keys[0]: env, keys[1]: records}, f, indent=1)
  md = markdown_fn(env, records)
  with open(out + ".md", "w") as f:
    f.write(md)
  return md
