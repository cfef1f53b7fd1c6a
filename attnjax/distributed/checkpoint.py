"""Sharded orbax checkpoints: async saves, keep-last-N plus keep-best, resume, reshard, inference.

A checkpoint step holds three items: `params` and `opt_state` (sharded arrays, `StandardSave`) and
`meta` (JSON: step, data-loader position, seed, metrics). Restoring builds *abstract* targets
(`ShapeDtypeStruct` with the target mesh's shardings), so a checkpoint saved on one mesh restores
onto any other mesh or device count. Orbax writes each step into a temporary directory and renames
it when complete, so a process killed mid-save leaves only a temporary directory: `list_incomplete`
finds those and `open_manager` warns about them (they are never restored). Shapes are checked
against the target before reading and the first mismatched parameter is named.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

_pp = ocp.checkpoint_managers


def list_incomplete(directory: str) -> list[str]:
  """Entries of `directory` that orbax left unfinished (temporary directories of killed saves)."""
  if not os.path.isdir(directory):
    return []
  return sorted(n for n in os.listdir(directory) if "tmp" in n)


def open_manager(directory: str, *, max_to_keep: int = 3, best_metric: str | None = None,
                 best_mode: str = "max", keep_best: int = 1, async_save: bool = True,
                 create: bool = True) -> ocp.CheckpointManager:
  """A manager that keeps the last `max_to_keep` steps plus the `keep_best` best by `best_metric`."""
  if not create and not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
  if best_mode not in ("max", "min"):
    raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
  for name in list_incomplete(directory):
    warnings.warn(f"ignoring incomplete checkpoint {os.path.join(directory, name)!r} "
                  "(a save that did not finish)", RuntimeWarning, stacklevel=2)
  policies = [_pp.LatestN(n=max_to_keep)]
  if best_metric:
    policies.append(_pp.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                              n=keep_best, keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      create=create, enable_async_checkpointing=async_save,
      preservation_policy=_pp.AnyPreservationPolicy(policies))
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict,
         metrics: dict | None = None, *, force: bool = True) -> bool:
  """Starts an (async) save of `params`, `opt_state` and JSON `meta`; returns whether it saved."""
  args = ocp.args.Composite(params=ocp.args.StandardSave(params),
                            opt_state=ocp.args.StandardSave(opt_state),
                            meta=ocp.args.JsonSave(meta))
  return mngr.save(step, args=args, metrics=metrics, force=force)


def abstract_like(tree, shardings):
  """`ShapeDtypeStruct`s of `tree` placed with `shardings` (a matching tree of NamedShardings)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def _flat_shapes(tree) -> dict[str, tuple]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
    out[name] = tuple(getattr(leaf, "shape", ()))
  return out


def check_shapes(mngr: ocp.CheckpointManager, step: int, item: str, target) -> None:
  """Raises ValueError naming the first parameter whose saved shape differs from `target`'s."""
  saved = mngr.item_metadata(step)[item]
  if saved is None:
    return
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


def restore(mngr: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state=None):
  """Restores `(params, opt_state or None, meta)` into the shardings of the abstract targets."""
  check_shapes(mngr, step, "params", abstract_params)
  items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
  if abstract_opt_state is not None:
    items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
  out = mngr.restore(step, args=ocp.args.Composite(**items))
  return out["params"], (out["opt_state"] if abstract_opt_state is not None else None), out["meta"]


def restore_model_for_inference(checkpoint_dir: str, model: nnx.Module, mesh, rules=None,
                                step: int | None = None) -> nnx.Module:
  """Loads only the parameters of `step` (default: latest) into `model`, sharded on `mesh`.

  `model` is any instance built from the same config (its values are replaced); the optimizer
  state is not read.
  """
  from attnjax.distributed import sharding as sh
  if not os.path.isdir(checkpoint_dir):
    raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} does not exist")
  mngr = open_manager(checkpoint_dir, create=False, async_save=False)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no completed checkpoint in {checkpoint_dir!r}")
  _, params, _ = nnx.split(model, nnx.Param, ...)
  specs = sh.param_specs(params, mesh, rules or sh.DEFAULT_RULES)
  target = abstract_like(params, sh.to_shardings(specs, mesh))
  check_shapes(mngr, step, "params", target)
  out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
  nnx.update(model, out["params"])
  mngr.close()
  return model


def describe(mngr: ocp.CheckpointManager) -> dict[str, Any]:
  return {"steps": list(mngr.all_steps()), "latest": mngr.latest_step(), "best": mngr.best_step()}
