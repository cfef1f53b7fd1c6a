"""Sharded orbax checkpoints: async saves, keep-last-N plus keep-best, resume, reshard, inference.

A checkpoint step holds `params` and `opt_state` (sharded arrays, `StandardSave`), `rest` (the
model's non-parameter state such as RNG counters, only when the model has any) and `meta` (JSON:
step, data-loader position, seed). Restoring builds *abstract* targets
(`ShapeDtypeStruct` with the target mesh's shardings), so a checkpoint saved on one mesh restores
onto any other mesh or device count. Orbax writes each step into a temporary directory and renames
it when complete, so a process killed mid-save leaves only a temporary directory: `list_incomplete`
finds those and `open_manager` warns about them (they are never restored). Shapes are checked
against the target before reading and the first mismatched parameter is named.
`restore_model_for_inference` reads the parameters alone.

Integrity: `save` records in `meta["integrity"]` a checksum of every saved array (position-indexed
sums of the raw bits, computed on device, so a checkpoint restored onto another mesh checks the
same) and a SHA-256 of the rest of `meta` (data-loader position, seed, step); `restore` verifies
them and raises `CheckpointCorrupt` on a mismatch. `restore_latest_intact` walks back from the
newest step: a step that fails to read, fails its check or is partial/empty is logged and warned
about, moved aside to `<step>.corrupt`, and the next older step is tried; when damaged steps were
found and none is intact it raises `NoIntactCheckpoint` (never a silent fresh start). A failed
save raises `CheckpointSaveError` naming the step; earlier steps stay as they were. Multi-process: every process calls
`save`/`restore` with its part of the global arrays; orbax coordinates the writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

_pp = ocp.checkpoint_managers


# Items saved with `StandardSave` (sharded arrays); `meta` is JSON.
ARRAY_ITEMS = ("params", "opt_state", "rest")

# Orbax writes step N into `N.orbax-checkpoint-tmp[-<timestamp>]` and renames it when finalized.
_TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointCorrupt(Exception):
  """A checkpoint step that cannot be read back as it was written."""


class CheckpointMismatch(ValueError):
  """A readable checkpoint that does not fit the model config (shapes, parameter names)."""


class NoIntactCheckpoint(RuntimeError):
  """Every checkpoint step in the directory was damaged (they were moved aside)."""


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint step failed (e.g. the disk is full)."""

  def __init__(self, step, cause: BaseException):
    self.step, self.cause = step, cause
    super().__init__(f"saving checkpoint step {step} failed: {_reason(cause)}")


def _reason(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}"
  text = " ".join(text.split())
  return text if len(text) <= 300 else text[:297] + "..."


# ----------------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------------

def _leaf_digest(x) -> jax.Array:
  """Two uint32 sums over the raw bits of `x`, each term keyed by the element's global position.

  Integer sums mod 2^32 do not depend on the reduction order, so the digest of a sharded array
  equals that of the same values on any other mesh. Lane 1: sum(bits * (2 i + 1)); an odd weight
  makes any single changed element change it. Lane 0: a mixed hash of (bits, i) for the rest.
  """
  x = jnp.asarray(x)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  if size == 8:
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
  else:
    u = jax.lax.bitcast_convert_type(x, {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[size])
    u = u.astype(jnp.uint32)
  if u.ndim == 0:
    idx = jnp.zeros((), jnp.uint32)
  else:
    idx = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(u.ndim)):
      idx = idx + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
      stride *= u.shape[d]
  h = u * jnp.uint32(0x9E3779B1) ^ (idx * jnp.uint32(0x85EBCA77) + jnp.uint32(0x165667B1))
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x2C1B3C6D)
  h = h ^ (h >> 12)
  weighted = u * (idx * jnp.uint32(2) + jnp.uint32(1))
  return jnp.stack([jnp.sum(h, dtype=jnp.uint32), jnp.sum(weighted, dtype=jnp.uint32)])


_tree_digest = jax.jit(lambda tree: jax.tree.map(_leaf_digest, tree))


def _leaf_name(path) -> str:
  name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
  return name[:-len("/value")] if name.endswith("/value") else name


def array_checksums(tree) -> dict[str, str]:
  """`{leaf name: 16 hex digits}` for every array of `tree` (host, device or sharded arrays)."""
  if not jax.tree.leaves(tree):
    return {}
  digests = _tree_digest(tree)
  out = {}
  for path, d in jax.tree_util.tree_flatten_with_path(digests)[0]:
    d = d if d.is_fully_addressable else d.addressable_shards[0].data  # replicated scalar pair
    a, b = (int(v) for v in np.asarray(jax.device_get(d)))
    out[_leaf_name(path)] = f"{a:08x}{b:08x}"
  return out


def meta_checksum(meta: dict) -> str:
  body = {k: v for k, v in meta.items() if k != "integrity"}
  return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def verify(meta: dict, items: dict[str, Any], step=None) -> None:
  """Raises `CheckpointCorrupt` when `meta` or a restored item differs from what was saved."""
  integrity = meta.get("integrity") if isinstance(meta, dict) else None
  if not isinstance(integrity, dict):
    msg = f"checkpoint step {step} has no checksums (written before they were recorded): not verified"
    logging.warning("%s", msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    return
  if integrity.get("meta") != meta_checksum(meta):
    raise CheckpointCorrupt("checksum of meta (step, data-loader and seed state) does not match")
  saved = integrity.get("arrays", {})
  for item, tree in items.items():
    want = saved.get(item)
    if want is None:
      raise CheckpointCorrupt(f"no checksums recorded for {item!r}")
    got = array_checksums(tree)
    if set(got) != set(want):
      raise CheckpointCorrupt(f"{item!r} holds arrays {sorted(set(got) ^ set(want))[:3]} that were "
                              "not saved (or misses saved ones)")
    for name, digest in got.items():
      if want[name] != digest:
        raise CheckpointCorrupt(f"checksum of {item}/{name} does not match (saved {want[name]}, "
                                f"read {digest})")


def list_incomplete(directory: str) -> list[str]:
  """Entries of `directory` that orbax left unfinished (temporary directories of killed saves)."""
  if not os.path.isdir(directory):
    return []
  return sorted(n for n in os.listdir(directory) if _TMP_MARKER in n)


def open_manager(directory: str, *, max_to_keep: int = 3, best_metric: str | None = None,
                 best_mode: str = "max", keep_best: int = 1, async_save: bool = True,
                 create: bool = True) -> ocp.CheckpointManager:
  """A manager that keeps the last `max_to_keep` steps plus the `keep_best` best by `best_metric`."""
  if not create and not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
  if best_mode not in ("max", "min"):
    raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
  for name in list_incomplete(directory):
    # Orbax never lists these as steps; a later save of the same step replaces the directory.
    msg = (f"ignoring incomplete checkpoint {os.path.join(directory, name)!r} "
           "(a save that did not finish, e.g. the process was killed while saving)")
    logging.warning("%s", msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
  if max_to_keep < 1 or keep_best < 1:
    raise ValueError(f"max_to_keep and keep_best must be >= 1, got {max_to_keep} and {keep_best}")
  policies = [_pp.LatestN(n=max_to_keep)]
  best_fn = None
  if best_metric:
    best_fn = lambda m: m[best_metric]  # noqa: E731
    # BestN sorts ascending and keeps the tail, so "min" sorts descending. Steps saved without
    # metrics are left to LatestN (kept only while recent).
    policies.append(_pp.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=keep_best,
                              keep_checkpoints_without_metrics=False))
  # A step is deleted only when no policy keeps it; best_fn/best_mode make `best_step()` work.
  options = ocp.CheckpointManagerOptions(
      create=create, enable_async_checkpointing=async_save, best_fn=best_fn, best_mode=best_mode,
      preservation_policy=_pp.AnyPreservationPolicy(policies))
  # Handlers are registered up front: a fresh manager (a restarted run, an inference job) can then
  # read item metadata for the shape check before restoring; unregistered items read as None.
  handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
  handlers["meta"] = ocp.JsonCheckpointHandler()
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict,
         metrics: dict | None = None, *, rest=None, force: bool = True) -> bool:
  """Starts an (async) save of `params`, `opt_state`, `rest` and JSON `meta`; returns whether it saved.

  `metrics` (e.g. `{"eval_accuracy": 0.9}`) feed keep-best; steps saved without them are kept
  only while they are among the last `max_to_keep`. `rest` is skipped when it has no arrays.
  `meta` gets an `integrity` entry (checksums of the arrays and of `meta` itself).
  A failure raises `CheckpointSaveError`: of this step, or of the previous async save (orbax
  finishes that one first), whose step the error names.
  """
  arrays = {"params": params, "opt_state": opt_state}
  if rest is not None and jax.tree.leaves(rest):
    arrays["rest"] = rest
  meta = {k: v for k, v in meta.items() if k != "integrity"}
  meta["integrity"] = {"arrays": {k: array_checksums(v) for k, v in arrays.items()},
                       "meta": meta_checksum(meta)}
  items = {k: ocp.args.StandardSave(v) for k, v in arrays.items()}
  items["meta"] = ocp.args.JsonSave(meta)
  wait(mngr)
  try:
    saved = mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
  except Exception as e:  # noqa: BLE001 - any write failure stops the run with its reason
    raise CheckpointSaveError(step, e) from e
  _PENDING[id(mngr)] = step
  return saved


_PENDING: dict[int, int] = {}  # manager -> step of its save that may still be in flight


def wait(mngr: ocp.CheckpointManager) -> None:
  """Waits for the in-flight async save; its failure raises `CheckpointSaveError` naming its step."""
  try:
    mngr.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    raise CheckpointSaveError(_PENDING.pop(id(mngr), "in flight"), e) from e
  _PENDING.pop(id(mngr), None)


def param_shardings(params, mesh, rules=None):
  """NamedShardings for an `nnx.Param` state by the logical-axis rules; `params` may be abstract.

  `sharding.param_specs` reads each value with `v[...]`, which a `ShapeDtypeStruct` does not
  support, so abstract leaves are stood in for by zero-stride NumPy views of the right shape and
  dtype (`np.broadcast_to` allocates nothing).
  """
  from attnjax.distributed import sharding as sh
  concrete = jax.tree.map(
      lambda x: np.broadcast_to(np.zeros((), x.dtype), x.shape)
      if isinstance(x, jax.ShapeDtypeStruct) else x, params)
  return sh.to_shardings(sh.param_specs(concrete, mesh, rules or sh.DEFAULT_RULES), mesh)


def abstract_like(tree, shardings):
  """`ShapeDtypeStruct`s of `tree` placed with `shardings` (a matching tree of NamedShardings)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def _flat_shapes(tree) -> dict[str, tuple]:
  # nnx Variables flatten to `.../value`; `_leaf_name` drops it so messages name the parameter.
  return {_leaf_name(path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_shapes(mngr: ocp.CheckpointManager, step: int, item: str, target) -> None:
  """Raises `CheckpointMismatch` (a ValueError) naming the first parameter whose saved shape
  differs from `target`'s; `CheckpointCorrupt` when the item's metadata cannot be read."""
  try:
    saved = mngr.item_metadata(step).get(item)
  except Exception as e:  # noqa: BLE001 - unreadable metadata is damage, not a config mismatch
    raise CheckpointCorrupt(f"metadata of {item!r} unreadable ({_reason(e)})") from e
  if saved is None:
    raise CheckpointCorrupt(f"checkpoint step {step} in {str(mngr.directory)!r} has no item {item!r}")
  got, want = _flat_shapes(saved), _flat_shapes(target)
  for name, shape in want.items():
    if name not in got:
      raise CheckpointMismatch(f"checkpoint step {step} item {item!r} has no parameter {name!r} that the "
                       f"model config expects (saved parameters: {sorted(got)[:5]}...)")
    if tuple(got[name]) != tuple(shape):
      raise CheckpointMismatch(f"checkpoint step {step} item {item!r}: parameter {name!r} has shape "
                       f"{tuple(got[name])} but the model config gives {tuple(shape)}")
  extra = sorted(set(got) - set(want))
  if extra:
    raise CheckpointMismatch(f"checkpoint step {step} item {item!r} has parameter {extra[0]!r} that the "
                     "model config does not have")


def restore(mngr: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state=None,
            abstract_rest=None, *, verify_checksums: bool = True):
  """Restores `(params, opt_state or None, meta)` into the shardings of the abstract targets.

  With `abstract_rest` (a non-empty tree) it returns `(params, opt_state, meta, rest)`.
  Raises `CheckpointMismatch` when the step does not fit the targets and `CheckpointCorrupt`
  when it cannot be read or fails its checksums (`verify=False` skips those).
  """
  with_rest = abstract_rest is not None and bool(jax.tree.leaves(abstract_rest))
  problem = step_problem(str(mngr.directory), step, with_opt_state=abstract_opt_state is not None,
                         with_rest=with_rest)
  if problem:
    raise CheckpointCorrupt(problem)
  check_shapes(mngr, step, "params", abstract_params)
  items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
  if abstract_opt_state is not None:
    check_shapes(mngr, step, "opt_state", abstract_opt_state)
    items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
  if with_rest:
    items["rest"] = ocp.args.StandardRestore(abstract_rest)
  try:
    out = mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # noqa: BLE001 - a read failure of a step that passed the shape check
    raise CheckpointCorrupt(f"read failed ({_reason(e)})") from e
  if verify_checksums:
    verify(out["meta"], {k: out[k] for k in items if k != "meta"}, step)
  # The caller gets back the `meta` it saved; the checksums are this module's business.
  meta = {k: v for k, v in out["meta"].items() if k != "integrity"}
  opt = out["opt_state"] if abstract_opt_state is not None else None
  if abstract_rest is not None:
    return out["params"], opt, meta, (out["rest"] if with_rest else abstract_rest)
  return out["params"], opt, meta


def restore_model_for_inference(checkpoint_dir: str, model: nnx.Module, mesh, rules=None,
                                step: int | None = None) -> nnx.Module:
  """Loads only the parameters of `step` (default: latest) into `model`, sharded on `mesh`.

  `model` is built from the same config, concretely or abstractly (`nnx.eval_shape`); its
  parameter values are replaced and its other state (e.g. RNG counters) is kept. The optimizer
  state is never read, so a checkpoint whose `opt_state` is missing or damaged still serves.
  Raises FileNotFoundError for a missing directory or one without a completed checkpoint,
  `CheckpointMismatch` (a ValueError) naming the first parameter whose saved shape differs from
  `model`'s, and `CheckpointCorrupt` when the parameters are partial or fail their checksums.
  """
  if not os.path.isdir(checkpoint_dir):
    raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} does not exist")
  mngr = open_manager(checkpoint_dir, create=False, async_save=False)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no completed checkpoint in {checkpoint_dir!r} "
                              f"(incomplete: {list_incomplete(checkpoint_dir)})")
    if step not in mngr.all_steps():
      raise FileNotFoundError(f"checkpoint step {step} not in {checkpoint_dir!r}; "
                              f"completed steps: {list(mngr.all_steps())}")
    _, params, _ = nnx.split(model, nnx.Param, ...)
    target = abstract_like(params, param_shardings(params, mesh, rules))
    check_shapes(mngr, step, "params", target)
    problem = step_problem(checkpoint_dir, step, with_opt_state=False)
    if problem:
      raise CheckpointCorrupt(f"checkpoint step {step}: {problem}")
    out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target),
                                                     meta=ocp.args.JsonRestore()))
    verify(out["meta"], {"params": out["params"]}, step)
  finally:
    mngr.close()
  nnx.update(model, out["params"])
  return model


def completed_steps(directory: str) -> list[int]:
  """Step folders (plain integer names) in `directory`, oldest first."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def step_problem(directory: str, step: int, *, with_opt_state: bool = True,
                 with_rest: bool = False) -> str | None:
  """Why step `step` of `directory` is partial (missing or empty item folders); None if whole."""
  path = os.path.join(directory, str(step))
  if not os.path.isdir(path):
    return "its folder is missing"
  if not os.listdir(path):
    return "its folder is empty"
  need = ["params", "meta"] + (["opt_state"] if with_opt_state else []) + (["rest"] if with_rest else [])
  for item in need:
    d = os.path.join(path, item)
    if not os.path.isdir(d) or not os.listdir(d):
      return f"item {item!r} is missing or empty"
  return None


def quarantine(directory: str, step: int) -> str:
  """Moves step `step` aside to `<step>.corrupt` (or `.corrupt.N`), where orbax no longer sees it."""
  src = os.path.join(directory, str(step))
  dst, n = f"{src}.corrupt", 1
  while os.path.exists(dst):
    dst, n = f"{src}.corrupt.{n}", n + 1
  if jax.process_index() == 0:
    os.rename(src, dst)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
  return dst


def restore_latest_intact(open_fn, abstract_params, abstract_opt_state, abstract_rest=None):
  """Restores the newest intact step: `(mngr, step, (params, opt_state, meta, rest))`.

  `open_fn()` opens the checkpoint manager; it is reopened after each damaged step is moved aside
  (a manager caches its step list). A step that is partial, unreadable or fails its checksums is
  warned about (step and reason) and moved to `<step>.corrupt`; the next older step is tried.
  Returns `(mngr, None, None)` when the directory holds no step at all; raises
  `NoIntactCheckpoint` when steps existed but none is intact, and lets `CheckpointMismatch`
  (a checkpoint of another model config) through without moving anything.
  """
  moved = []
  while True:
    mngr = open_fn()
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
      break
    step = steps[0]
    try:
      out = restore(mngr, step, abstract_params, abstract_opt_state,
                    abstract_rest if abstract_rest is not None else {})
      return mngr, step, out
    except CheckpointMismatch:
      mngr.close()
      raise
    except Exception as e:  # noqa: BLE001 - any failure to read a step back is damage
      reason = str(e) if isinstance(e, CheckpointCorrupt) else _reason(e)
      mngr.close()
      directory = str(mngr.directory)
      dst = quarantine(directory, step)
      msg = (f"checkpoint step {step} is damaged ({reason}); moved it to {dst!r} and trying the "
             "next older step")
      logging.warning("%s", msg)
      warnings.warn(msg, RuntimeWarning, stacklevel=2)
      moved.append(step)
  if moved:
    mngr.close()
    raise NoIntactCheckpoint(
        f"no intact checkpoint left in {str(mngr.directory)!r}: damaged steps {moved} were moved "
        "aside (<step>.corrupt); not restarting from step 0 - remove the checkpoints folder to "
        "start afresh")
  return mngr, None, None


def describe(mngr: ocp.CheckpointManager) -> dict[str, Any]:
  """Completed steps, the latest and the best (by the manager's metric; None without one)."""
  return {"steps": list(mngr.all_steps()), "latest": mngr.latest_step(), "best": mngr.best_step()}
