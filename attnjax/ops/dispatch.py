"""The one `implementation=` vocabulary of the attention ops, and the backend name selection uses.

Every op that has fast paths takes `implementation`:

* `None`: the best available path for this backend and call (each op's `select_implementation`
  says which and why; it never falls back silently from an explicit choice);
* `"reference"`: the materialised oracle (dense mask, plain autodiff);
* `"xla"`: the plain-JAX fast path (tiled, gathered or chunked; runs on every backend);
* `"pallas"`: the Pallas kernel (compiled on a CUDA GPU, interpret mode elsewhere, for tests);
* `"cudnn"`: softmax only, `jax.nn.dot_product_attention(implementation="cudnn")`.

An explicit choice that cannot serve a call raises `ValueError` saying why. Selection is a pure
function of `(backend, call)`: `backend` is "gpu" (a CUDA GPU), "cpu", "tpu", ... and defaults to
`current_backend()`, so the choice for a GPU can be asked (and tested) on any machine.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax

IMPLEMENTATIONS = ("reference", "xla", "pallas")
#: Floating dtypes the Pallas kernels take (q, k, v of one dtype).
PALLAS_DTYPES = ("float32", "bfloat16", "float16")


def on_cuda_gpu() -> bool:
  """True when the default device is an NVIDIA GPU."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return False
  return dev.platform in ("gpu", "cuda") and "nvidia" in dev.device_kind.lower()


def current_backend() -> str:
  """The backend name selection uses: "gpu" for a CUDA GPU, else `jax.default_backend()` (a
  non-NVIDIA GPU reports "rocm", where the CUDA-tuned choices are not made)."""
  if on_cuda_gpu():
    return "gpu"
  name = jax.default_backend()
  return "rocm" if name == "gpu" else name


def resolve_backend(backend: str | None) -> str:
  if backend is None:
    return current_backend()
  if not isinstance(backend, str) or not backend:
    raise ValueError(f"backend must be None or a platform name such as 'gpu' or 'cpu', got "
                     f"{backend!r}")
  return "gpu" if backend == "cuda" else backend


def check_implementation(implementation, allowed=IMPLEMENTATIONS, *, op: str) -> None:
  """Raises ValueError unless `implementation` is None or in `allowed`."""
  if implementation is not None and implementation not in allowed:
    raise ValueError(f"{op}: implementation must be None or one of {tuple(allowed)}, got "
                     f"{implementation!r}")


def is_power_of_two(n: int) -> bool:
  return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


# ----------------------------------------------------------------------------------------------
# Recording which implementation each op call would run on a given backend (fast_path_report).
# ----------------------------------------------------------------------------------------------

_DEPTH = contextvars.ContextVar("attnjax_dispatch_depth", default=0)
_RECORDERS: list = []


class _Recorder:
  def __init__(self, backend: str):
    self.backend = backend
    self.rows: list[tuple[str, str, str]] = []


def dispatching_op(fn):
  """Marks a public op whose choice `note` records; calls it makes to other such ops are inner
  steps of its own path and are not recorded separately."""
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    token = _DEPTH.set(_DEPTH.get() + 1)
    try:
      return fn(*args, **kwargs)
    finally:
      _DEPTH.reset(token)
  return wrapper


def note(op: str, choose) -> None:
  """Records `choose(backend) -> (implementation, reason)` for every active `record_choices`.

  Called by the ops at their dispatch point; does nothing unless a recorder is active (and inside
  another dispatching op). An explicit choice that cannot serve the call on the recorder's backend
  is recorded as implementation "error" with the reason.
  """
  if not _RECORDERS or _DEPTH.get() > 1:
    return
  for rec in _RECORDERS:
    try:
      impl, reason = choose(rec.backend)
    except ValueError as e:
      impl, reason = "error", str(e)
    rec.rows.append((op, impl, reason))


@contextlib.contextmanager
def record_choices(backend: str | None = None):
  """Within the block, op calls record which implementation they would run on `backend` (default:
  the current one); the calls themselves run as usual. Yields the recorder (`.rows`: a list of
  `(op, implementation, reason)`)."""
  rec = _Recorder(resolve_backend(backend))
  _RECORDERS.append(rec)
  try:
    yield rec
  finally:
    _RECORDERS.remove(rec)
