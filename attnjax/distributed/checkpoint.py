"""Sharded orbax checkpoints: async saves, keep-last-N plus keep-best, resume, reshard, inference.

A checkpoint step holds `params` and `opt_state` (sharded arrays, `StandardSave`), `rest` (the
model's non-parameter state such as RNG counters, only when the model has any) and `meta` (JSON:
step, data-loader position, seed). Restoring builds *abstract* targets
(`ShapeDtypeStruct` with the target mesh's shardings), so a checkpoint saved on one mesh restores
onto any other mesh or device count. Orbax writes each step into a temporary directory and renames
it when complete, so a process killed mid-save leaves only a temporary directory: `list_incomplete`
finds those and `open_manager` warns about them (they are never restored). Shapes are checked
against the target before reading and the first mismatched parameter is named.
`restore_model_for_inference` reads the parameters alone. Multi-process: every process calls
`save`/`restore` with its part of the global arrays; orbax coordinates the writes.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

_pp = ocp.checkpoint_managers


# Items saved with `StandardSave` (sharded arrays); `meta` is JSON.
ARRAY_ITEMS = ("params", "opt_state", "rest")

# Orbax writes step N into `N.orbax-checkpoint-tmp[-<timestamp>]` and renames it when finalized.
_TMP_MARKER = ".orbax-checkpoint-tmp"


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
  """
  items = {"params": ocp.args.StandardSave(params), "opt_state": ocp.args.StandardSave(opt_state),
           "meta": ocp.args.JsonSave(meta)}
  if rest is not None and jax.tree.leaves(rest):
    items["rest"] = ocp.args.StandardSave(rest)
  return mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)


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
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    # nnx Variables flatten to `.../value`; drop it so messages name the parameter itself.
    name = name[:-len("/value")] if name.endswith("/value") else name
    out[name] = tuple(getattr(leaf, "shape", ()))
  return out


def check_shapes(mngr: ocp.CheckpointManager, step: int, item: str, target) -> None:
  """Raises ValueError naming the first parameter whose saved shape differs from `target`'s."""
  saved = mngr.item_metadata(step).get(item)
  if saved is None:
    raise ValueError(f"checkpoint step {step} in {str(mngr.directory)!r} has no item {item!r}")
  got, want = _flat_shapes(saved), _flat_shapes(target)
  for name, shape in want.items():
    if name not in got:
      raise ValueError(f"checkpoint step {step} item {item!r} has no parameter {name!r} that the "
                       f"model config expects (saved parameters: {sorted(got)[:5]}...)")
    if tuple(got[name]) != tuple(shape):
      raise ValueError(f"checkpoint step {step} item {item!r}: parameter {name!r} has shape "
                       f"{tuple(got[name])} but the model config gives {tuple(shape)}")
  extra = sorted(set(got) - set(want))
  if extra:
    raise ValueError(f"checkpoint step {step} item {item!r} has parameter {extra[0]!r} that the "
                     "model config does not have")


def restore(mngr: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state=None,
            abstract_rest=None):
  """Restores `(params, opt_state or None, meta)` into the shardings of the abstract targets.

  With `abstract_rest` (a non-empty tree) it returns `(params, opt_state, meta, rest)`.
  """
  check_shapes(mngr, step, "params", abstract_params)
  items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
  if abstract_opt_state is not None:
    check_shapes(mngr, step, "opt_state", abstract_opt_state)
    items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
  with_rest = abstract_rest is not None and bool(jax.tree.leaves(abstract_rest))
  if with_rest:
    items["rest"] = ocp.args.StandardRestore(abstract_rest)
  out = mngr.restore(step, args=ocp.args.Composite(**items))
  opt = out["opt_state"] if abstract_opt_state is not None else None
  if abstract_rest is not None:
    return out["params"], opt, out["meta"], (out["rest"] if with_rest else abstract_rest)
  return out["params"], opt, out["meta"]


def restore_model_for_inference(checkpoint_dir: str, model: nnx.Module, mesh, rules=None,
                                step: int | None = None) -> nnx.Module:
  """Loads only the parameters of `step` (default: latest) into `model`, sharded on `mesh`.

  `model` is built from the same config, concretely or abstractly (`nnx.eval_shape`); its
  parameter values are replaced and its other state (e.g. RNG counters) is kept. The optimizer
  state is never read, so a checkpoint whose `opt_state` is missing or damaged still serves.
  Raises FileNotFoundError for a missing directory or one without a completed checkpoint, and
  ValueError naming the first parameter whose saved shape differs from `model`'s.
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
    out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
  finally:
    mngr.close()
  nnx.update(model, out["params"])
  return model


def describe(mngr: ocp.CheckpointManager) -> dict[str, Any]:
  """Completed steps, the latest and the best (by the manager's metric; None without one)."""
  return {"steps": list(mngr.all_steps()), "latest": mngr.latest_step(), "best": mngr.best_step()}
