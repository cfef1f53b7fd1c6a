"""Device meshes from config, logical-axis rules, parameter/optimizer shardings and a report.

Mesh axes are `("data", "fsdp", "tensor", "sequence")`. Layers name the dimensions of their
parameters with *logical* names (variable metadata `logical_axes`, see `attnjax.nn.layers`); a
rules table maps each logical name to a mesh axis. The default table is Megatron-LM tensor
parallelism (Shoeybi et al. 2019, arXiv:1909.08053) plus FSDP: "heads"/"kv_heads"/"mlp"/"vocab" -> "tensor" (so QKV and the MLP's
first matmul are column-parallel and the output/down projections, whose *input* dim carries the
name, are row-parallel: GSPMD inserts the one all-reduce each), "embed" -> "fsdp" (parameters and,
through `opt_state_shardings`, optimizer moments are sharded over `fsdp`). A dimension is
replicated when its name has no rule, when it is not divisible by the mesh axis size, or when the
mesh axis is already used by an earlier dimension of the same array; parameters without
`logical_axes` metadata are replicated and listed as such in the report. Batches are sharded over
`("data", "fsdp")`. Meshes use `AxisType.Auto` (GSPMD propagation) because the layers do not pass
`out_sharding` at their contractions.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("conv", None),
    ("layers", None),
    ("batch", ("data", "fsdp")),
    ("sequence", "sequence"),
)

BATCH_AXES = ("data", "fsdp")


def mesh_shape_from_config(mesh_config: Mapping[str, int] | None, num_devices: int) -> tuple[int, ...]:
  """`{"data": -1, "fsdp": 2, "tensor": 2}` -> sizes for `MESH_AXES`; one -1 takes what is left."""
  cfg = dict(mesh_config or {})
  unknown = sorted(set(cfg) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh config has unknown axes {unknown}; expected a subset of {MESH_AXES}")
  # An empty config means pure data parallelism over every device.
  sizes = [int(cfg.get(a, 1)) for a in MESH_AXES] if cfg else [-1, 1, 1, 1]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh config may leave at most one axis as -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh axis sizes must be >= 1 (or one -1), got {dict(zip(MESH_AXES, sizes))}")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes (product {fixed}) do not "
                       f"divide the device count {num_devices}")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
                     f"{num_devices} are available; the product of the axis sizes must equal it")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int] | None = None, devices: Sequence[Any] | None = None
              ) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: all) with axes `MESH_AXES`, all of type Auto (GSPMD)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape_from_config(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int],
                    mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> P:
  """Maps one array's logical names to a `PartitionSpec` (replicating what cannot be split)."""
  if logical_axes is None or len(logical_axes) != len(shape):
    return P(*([None] * len(shape)))
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name, dim in zip(logical_axes, shape):
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or dim % size:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


def _logical_axes(variable) -> tuple | None:
  md = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  axes = md.get("logical_axes")
  return tuple(axes) if axes is not None else None


def param_specs(state: nnx.State, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> nnx.State:
  """A State of `PartitionSpec`s, same structure as `state` (an `nnx.split` Param state)."""
  # Variables are kept as containers (holding specs) so the result has params' exact pytree structure.
  return jax.tree.map(lambda v: v.replace(logical_to_spec(_logical_axes(v), np.shape(v[...]), mesh, rules)),
                      state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def to_shardings(specs, mesh):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def replicated_like(tree, mesh):
  return jax.tree.map(lambda x: NamedSharding(mesh, P()), tree)


def opt_state_shardings(tx: optax.GradientTransformation, opt_state, param_shardings, mesh):
  """Optimizer moments inherit their parameter's sharding; counts and scalars are replicated.
  Parameters an `optax.multi_transform` branch does not own hold an empty `optax.MaskedNode`
  in that branch's state, which stays as it is."""
  return optax.tree_map_params(
      tx, lambda p, s: p if isinstance(p, optax.MaskedNode) else s, opt_state, param_shardings,
      transform_non_params=lambda _: NamedSharding(mesh, P()),
      is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)))


def present_axes(mesh: jax.sharding.Mesh, axes: Sequence[str] | str | None) -> tuple[str, ...]:
  """The names in `axes` that `mesh` has (so helpers also work on meshes without every axis)."""
  if axes is None:
    return ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return tuple(a for a in axes if a in mesh.axis_names)


def axis_size(mesh: jax.sharding.Mesh, axes: Sequence[str] | str | None) -> int:
  """Product of the sizes of the mesh axes `axes` that `mesh` has (1 for none)."""
  return math.prod(mesh.shape[a] for a in present_axes(mesh, axes))


def activation_spec(mesh: jax.sharding.Mesh, *, sequence: bool = False, heads: bool = True) -> P:
  """`PartitionSpec` of a `[B, T, H, D]` activation: B over data x fsdp, T over `sequence`
  (when `sequence`), H over `tensor` (when `heads`); axes the mesh lacks are left out."""
  def entry(axes):
    axes = present_axes(mesh, axes)
    return None if not axes else (axes[0] if len(axes) == 1 else axes)
  return P(entry(BATCH_AXES), entry("sequence" if sequence else None),
           entry("tensor" if heads else None), None)


def batch_sharding(mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch, mesh):
  """Places a host batch (the same global batch on every process) onto `mesh`, split over batch."""
  def put(x):
    x = np.asarray(x)
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    # A batch that does not split evenly (e.g. the last eval batch) is replicated instead.
    sharding = batch_sharding(mesh, x.ndim) if x.shape[0] % n == 0 else NamedSharding(mesh, P())
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(put, batch)


def sharding_report(state: nnx.State, shardings, mesh) -> str:
  """Per-parameter spec, logical names, global and per-device bytes; totals at the end."""
  flat_state = list(nnx.to_flat_state(state))
  flat_shard = dict(nnx.to_flat_state(shardings)) if isinstance(shardings, nnx.State) else None
  rows = [f"mesh {dict(mesh.shape)} on {mesh.devices.size} devices "
          f"({jax.process_count()} process(es), platform {mesh.devices.flat[0].platform})",
          f"{'parameter':<48} {'shape':<16} {'logical':<26} {'spec':<26} {'bytes':>10} {'per-device':>10}"]
  total = per_dev = 0
  unnamed = []
  for path, v in flat_state:
    x = v[...]
    sh = flat_shard[path] if flat_shard is not None else x.sharding
    sh = sh.get_value() if hasattr(sh, "get_value") else sh
    nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    local = sh.shard_shape(x.shape)
    local_bytes = int(np.prod(local)) * np.dtype(x.dtype).itemsize
    total, per_dev = total + nbytes, per_dev + local_bytes
    name = "/".join(str(p) for p in path)
    axes = _logical_axes(v)
    if axes is None:
      unnamed.append(name)
    rows.append(f"{name:<48} {str(tuple(x.shape)):<16} {str(axes):<26} {str(sh.spec):<26} "
                f"{nbytes:>10} {local_bytes:>10}")
  rows.append(f"total parameter bytes {total:,}; per device {per_dev:,} ({per_dev / max(total, 1):.2%})")
  if unnamed:
    rows.append(f"replicated for lack of logical_axes metadata: {', '.join(unnamed)}")
  return "\n".join(rows)


def bytes_per_device(tree) -> int:
  """Bytes that the most loaded device holds for `tree` (sharded jax arrays)."""
  per: dict[Any, int] = {}
  for x in jax.tree.leaves(tree):
    for s in x.addressable_shards:
      per[s.device] = per.get(s.device, 0) + s.data.nbytes
  return max(per.values()) if per else 0
