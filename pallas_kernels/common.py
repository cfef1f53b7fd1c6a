"""Helpers shared by the Pallas kernels: backend detection, interpret mode, H100 cross-lowering.

Pallas-Triton kernels run on CPU only in interpret mode, and interpret mode checks none of the GPU
constraints (power-of-two tiles, dot sizes, out-of-bound slices). `lower_for_h100` lowers a jitted
function for an H100 target on a machine without a GPU, so those errors fail CI instead of the first
GPU run (jax >= 0.11 needs an `AbstractDevice` for this; see
`shared/notes/pallas-on-gpu-and-cpu.md` §1.5).
"""

from __future__ import annotations

import os

import jax
from jax.sharding import AbstractDevice, AbstractMesh

H100_DEVICE_KIND = "NVIDIA H100 80GB HBM3"


def on_gpu() -> bool:
  """True when the default JAX backend is a GPU (CUDA or ROCm)."""
  return jax.default_backend() == "gpu"


def resolve_interpret(interpret: bool | None) -> bool:
  """`None` means interpret mode exactly when there is no GPU to run the kernel on."""
  if interpret is None:
    return not on_gpu()
  return bool(interpret)


def interpret_in_tests() -> bool:
  """Whether the kernel tests run the kernels in interpret mode: yes, unless told otherwise.

  CI has no GPU, so the tests interpret. On a GPU machine,
  `ATTNJAX_KERNEL_TESTS_ON_GPU=1 JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest pytest tests/kernels`
  runs the same tests on the compiled kernels; the precision flag keeps float32 dots in IEEE float32
  (Triton's default for them is TF32), so the float32 tolerances stay meaningful.
  """
  return os.environ.get("ATTNJAX_KERNEL_TESTS_ON_GPU", "0") != "1"


def h100_abstract_mesh() -> AbstractMesh:
  """A one-device abstract mesh whose device is an H100, for cross-lowering without a GPU."""
  device = AbstractDevice(device_kind=H100_DEVICE_KIND, num_cores=None, platform="cuda")
  return AbstractMesh((1,), ("x",), abstract_device=device)


def lower_for_h100(fn, *args, **kwargs):
  """Cross-lowers `jax.jit(fn)(*args, **kwargs)` for CUDA on an H100 and returns the `Lowered`.

  Arguments are concrete arrays or `jax.ShapeDtypeStruct`s. They must be created outside the
  abstract-mesh context (jax raises otherwise), which is why this helper takes them as arguments.
  Pallas kernels inside `fn` must be called with `interpret=False`; lowering raises on violations of
  the Triton / Mosaic GPU constraints. `lowered.as_text()` gives the StableHLO.
  """
  jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
  with jax.sharding.use_abstract_mesh(h100_abstract_mesh()):
    return jitted.trace(*args, **kwargs).lower(lowering_platforms=("cuda",))
