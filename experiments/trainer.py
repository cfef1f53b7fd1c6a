"""The training loop behind `experiments.train` and `experiments.compare` (no flags here).

`train_and_evaluate(config, workdir)` builds the task's model, trains it with AdamW (warm-up +
cosine, gradient clipping) under a jit-compiled step, evaluates every `train.eval_every` steps,
shows a progress bar, and writes `metrics.jsonl` / `summary.json` into `workdir`.

Guards (`experiments.guards`): the config is validated before anything is built; the workdir is
checked writable and locked for the run; loss and gradient norm are checked on device every step
and read back only when metrics are fetched anyway (log, eval and checkpoint steps, always before a
save); checkpoints are verified on resume and damaged steps moved aside. Failures raise a
`guards.RunError` subclass, which the entry points print as one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from tqdm.auto import tqdm

from attnjax.distributed import checkpoint as ckpt
from attnjax.distributed import sharding as sh
from experiments import guards
from experiments import tasks as tasks_lib


class NonFiniteError(guards.RunError):
  """The loss or gradient norm stopped being finite (train.nonfinite="stop")."""


def _skip_nonfinite(config) -> bool:
  return config.train.get("nonfinite", "stop") == "skip"


def make_optimizer(config, param_labels=None) -> optax.GradientTransformation:
  """AdamW with warm-up + cosine and clipping; `train.nonfinite="skip"` wraps it in
  `optax.apply_if_finite`, which leaves params and moments alone on a non-finite gradient and
  counts those steps (`total_notfinite`). `param_labels` (a task's `fn(params) -> "trainable" |
  "frozen"` per leaf) trains only the trainable leaves: frozen ones get exactly zero updates
  (`optax.multi_transform` with `optax.set_to_zero`), and clipping sees the trainable ones only."""
  o = config.optim
  schedule = optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, max(config.train.steps, o.warmup_steps + 1))
  tx = optax.chain(optax.clip_by_global_norm(o.clip_norm),
                   optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
  if param_labels is not None:
    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, param_labels)
  if _skip_nonfinite(config):
    # Never give up skipping: after max_consecutive_errors apply_if_finite would apply the update.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=2**31 - 1)
  return tx


# The guard is an int32[3] carried through the train step on device: [steps done, first step whose
# loss or gradient norm was non-finite (0: none yet), which of them (bit 1: loss, bit 2: grad_norm)].
_NONFINITE_BITS = ((1, "loss"), (2, "grad_norm"))


def init_guard(step: int) -> np.ndarray:
  return np.array([step, 0, 0], np.int32)


def _update_guard(guard, loss, grad_norm):
  step = guard[0] + 1
  bad = (jnp.where(jnp.isfinite(loss), 0, 1) + jnp.where(jnp.isfinite(grad_norm), 0, 2)).astype(jnp.int32)
  first = (guard[1] == 0) & (bad > 0)
  return jnp.stack([step, jnp.where(first, step, guard[1]), jnp.where(first, bad, guard[2])])


def check_guard(guard, last_checkpoint=None) -> None:
  """Raises `NonFiniteError` naming the first non-finite step and quantity of a fetched guard."""
  g = np.asarray(guard)
  if int(g[1]) == 0:
    return
  what = " and ".join(name for bit, name in _NONFINITE_BITS if int(g[2]) & bit)
  saved = (f"the last checkpoint (step {last_checkpoint}) holds finite state" if last_checkpoint
           else "no checkpoint of it was written")
  raise NonFiniteError(f"non-finite {what} at step {int(g[1])}: training stopped; {saved}. Lower "
                       "optim.lr, or set train.nonfinite='skip' to skip such updates")


def sum_aux_losses(intermediates) -> jax.Array:
  """Sums every `aux_loss` a mixer sowed, from the `nnx.Intermediate` state `nnx.capture` returns."""
  total = jnp.zeros((), jnp.float32)
  for path, leaf in nnx.to_flat_state(intermediates):
    if "aux_loss" in path:
      vals = leaf.get_value() if hasattr(leaf, "get_value") else leaf
      for v in jax.tree.leaves(vals):
        total = total + jnp.sum(v).astype(jnp.float32)
  return total


def make_steps(graphdef, task: tasks_lib.Task, tx: optax.GradientTransformation, shardings=None):
  """Returns jitted `train_step(params, rest, opt_state, batch, guard) -> (params, rest, opt_state,
  metrics, guard)` and `eval_step(params, rest, batch)`. `guard` (`init_guard`) records the first
  step whose loss or gradient norm is non-finite, on device (no host sync). With an
  `apply_if_finite` optimizer a non-finite loss skips the update too, and `metrics` carry
  `skipped_steps` (the running count).

  `shardings = (params, rest, opt_state, batch)` NamedSharding trees: the step is compiled with
  them as explicit in/out shardings (GSPMD partitions the math, e.g. Megatron TP) and donates
  the params/rest/optimizer buffers. None: plain `jax.jit` (shardings follow the inputs).
  """

  def loss_fn(params, rest, batch):
    # Fresh Variables for the non-Param state at this trace level: a training forward may update
    # buffers (k-means centroids, running statistics), and nnx lets a Variable change only at the
    # trace level it was made at (under value_and_grad, rest's own Variables are one level up).
    model = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, rest))
    # Mixers sow aux losses (MoH's load balance, Hedgehog's distillation); capture collects them
    # without storing them on the module.
    (loss, metrics), intermediates = nnx.capture(task.loss, nnx.Intermediate)(model, batch)
    aux = sum_aux_losses(intermediates)
    new_rest = nnx.state(model, nnx.Not(nnx.Param))
    return loss + aux, (metrics | {"aux_loss": aux}, new_rest)

  def train_step(params, rest, opt_state, batch, guard):
    (loss, (metrics, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch)
    grad_norm = optax.tree.norm(grads)
    skipping = isinstance(opt_state, optax.ApplyIfFiniteState)
    if skipping:
      # apply_if_finite looks at the gradients only; a non-finite loss must skip the step too.
      grads = jax.tree.map(lambda g: jnp.where(jnp.isfinite(loss), g, jnp.nan), grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if skipping:  # a skipped step keeps the model state (e.g. RNG counters) it started with
      new_rest = jax.lax.cond(opt_state.last_finite, lambda: new_rest, lambda: rest)
      metrics["skipped_steps"] = opt_state.total_notfinite
    metrics["grad_norm"] = grad_norm
    return params, new_rest, opt_state, metrics, _update_guard(guard, loss, grad_norm)

  def eval_step(params, rest, batch):
    _, (metrics, _) = loss_fn(params, rest, batch)
    return metrics

  if shardings is None:
    return jax.jit(train_step), jax.jit(eval_step)
  p_sh, r_sh, o_sh, b_sh = shardings
  mesh = jax.tree.leaves(p_sh)[0].mesh
  repl = jax.NamedSharding(mesh, jax.P())
  train_jit = jax.jit(train_step, in_shardings=(p_sh, r_sh, o_sh, b_sh, repl),
                      out_shardings=(p_sh, r_sh, o_sh, repl, repl), donate_argnums=(0, 1, 2))
  # Eval batches may have a different (last, smaller) size, so their sharding follows the input.
  eval_jit = jax.jit(eval_step, out_shardings=repl)
  return train_jit, eval_jit


def evaluate(eval_step, params, rest, batches) -> dict[str, float]:
  sums: dict[str, float] = {}
  n = 0
  for batch in batches:
    m = jax.device_get(eval_step(params, rest, batch))
    w = jax.tree.leaves(batch)[0].shape[0]
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v) * w
    n += w
  return {k: v / n for k, v in sums.items()}


def _place(tree, shardings):
  """Puts host values onto (possibly multi-process) shardings; every process holds the same values."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(put, tree, shardings)


def _checkpoint_config(config):
  ck = config.get("checkpoint") or {}
  get = ck.get if hasattr(ck, "get") else (lambda k, d=None: d)
  return {"every": int(get("every", 0) or 0), "max_to_keep": int(get("max_to_keep", 3)),
          "best_metric": get("best_metric", None), "best_mode": get("best_mode", "max"),
          "keep_best": int(get("keep_best", 1)),
          "async_save": bool(get("async_save", True)), "resume": bool(get("resume", True)),
          "save_on_sigterm": bool(get("save_on_sigterm", True))}


class _Preemption:
  """Notices a SIGTERM so the loop can save a checkpoint and stop at a step boundary.

  One process: a Python SIGTERM handler sets a flag. Several processes: the signal may reach only
  some of them, and all must save the same step together (orbax saves are collective), so JAX's
  preemption service (started by `jax.distributed.initialize`, it listens for SIGTERM itself)
  picks a common step: `reached_preemption_sync_point(step)` is True on every process at it.
  """

  def __init__(self, enabled: bool):
    self._flag = False
    self._previous = None
    self._multi = enabled and jax.process_count() > 1
    if enabled and not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._flag = True

  def requested(self, step: int) -> bool:
    """Call once per step, on every process, with increasing `step`."""
    if self._multi:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The mesh `config.mesh` asks for, over `devices` (default: all, or the first
  `config.mesh_num_devices`). ValueError when the axis sizes do not fit the device count."""
  mesh_cfg = config.get("mesh")
  if devices is None:
    n_dev = config.get("mesh_num_devices")  # only the first n devices (tests, scaling runs)
    devices = jax.devices()[:n_dev] if n_dev else jax.devices()
  return sh.make_mesh(mesh_cfg.to_dict() if hasattr(mesh_cfg, "to_dict") else mesh_cfg, devices)


def state_shardings(config, mesh, params, rest, tx):
  """NamedSharding trees `(params, rest, opt_state)` for the train state on `mesh`.

  Parameters follow the logical-axis rules (`config.sharding_rules` or the default Megatron + FSDP
  table), optimizer moments follow their parameter, everything else is replicated. `params` and
  `rest` may be abstract (`ShapeDtypeStruct` leaves).
  """
  rules = tuple(tuple(r) for r in config.get("sharding_rules") or sh.DEFAULT_RULES)
  p_sh = ckpt.param_shardings(params, mesh, rules)
  r_sh = sh.replicated_like(rest, mesh)
  o_sh = sh.opt_state_shardings(tx, jax.eval_shape(tx.init, params), p_sh, mesh)
  return p_sh, r_sh, o_sh


def abstract_train_state(config, mesh, task: tasks_lib.Task | None = None):
  """`(graphdef, params, rest, opt_state)` as `ShapeDtypeStruct`s carrying the shardings that
  `train_and_evaluate` uses on `mesh`: the targets for restoring a checkpoint onto that mesh
  (any mesh: orbax reshards on read). Nothing is materialised."""
  task = task or tasks_lib.make_task(config)
  model = nnx.eval_shape(lambda: task.build_model(config, nnx.Rngs(config.seed)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = make_optimizer(config, task.param_labels)
  p_sh, r_sh, o_sh = state_shardings(config, mesh, params, rest, tx)
  opt_state = jax.eval_shape(tx.init, params)
  return (graphdef, ckpt.abstract_like(params, p_sh), ckpt.abstract_like(rest, r_sh),
          ckpt.abstract_like(opt_state, o_sh))


def _truncate_metrics(path: str, last_step: int) -> None:
  """Drops records after `last_step` (logged by a run that died before its next checkpoint), so
  that a resumed run's metrics.jsonl holds each step once."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [l for l in f if l.strip()]
  keep = []
  for line in lines:
    try:
      if json.loads(line).get("step", 0) <= last_step:
        keep.append(line)
    except json.JSONDecodeError:  # a line cut short by the kill
      pass
  with open(path, "w") as f:
    f.writelines(l if l.endswith("\n") else l + "\n" for l in keep)


def train_and_evaluate(config, workdir: str | None = None, *, print_report: bool = False) -> dict[str, Any]:
  """Runs the training loop; returns a summary with the eval history and throughput.

  Scale-out (all optional, see `configs/mqar_sharded.py`): `config.mesh` (axis sizes for
  `data/fsdp/tensor/sequence`, one may be -1; default: data parallel over every device) and
  `config.sharding_rules` (logical name -> mesh axis pairs). The parameter sharding report is
  printed at start-up. `config.checkpoint.every > 0` saves sharded orbax checkpoints under
  `workdir/checkpoints` (async, keep-last-N + keep-best by `best_metric`), resumes from the latest
  intact one (params, optimizer, non-parameter model state such as RNG counters, step and data
  position, so the resumed run sees the batches the uninterrupted run would have seen; a
  checkpoint from another mesh is resharded on read), and on SIGTERM saves at the next step
  boundary and stops (`summary["preempted"]`). On resume, metrics.jsonl is cut back to the
  restored step so that each step appears once. Only process 0 writes metrics and the summary.

  Raises `guards.ConfigError` for a bad config (before anything is built), `guards.LockError`
  when another live run holds `workdir`, `guards.DiskError` for an unwritable workdir or a failed
  save, `NonFiniteError` at a non-finite loss / gradient norm (`train.nonfinite="stop"`) and
  `guards.RunError` when checkpoints exist but none is intact.
  """
  guards.validate(config)
  ck = _checkpoint_config(config)
  if ck["every"] > 0 and not workdir:
    raise ValueError("checkpoint.every > 0 needs a workdir (checkpoints go to <workdir>/checkpoints)")
  try:
    mesh = make_mesh(config)
  except ValueError as e:
    raise guards.ConfigError("mesh", config.get("mesh") and config.mesh.to_dict(), str(e)) from None
  n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.train.batch_size % n_batch_shards:
    raise guards.ConfigError("train.batch_size", config.train.batch_size,
                             f"must be divisible by the mesh's data x fsdp = {n_batch_shards}")
  is_chief = jax.process_index() == 0
  lock = contextlib.nullcontext()
  if workdir and is_chief:
    guards.check_writable(workdir)
    lock = guards.workdir_lock(workdir)
  with lock:
    return _train(config, workdir, ck, mesh, is_chief, print_report)


def _train(config, workdir, ck, mesh, is_chief, print_report) -> dict[str, Any]:
  task = tasks_lib.make_task(config)
  try:
    model = task.build_model(config, nnx.Rngs(config.seed))
  except guards.ConfigError:
    raise  # a builder that names the field itself (e.g. a base checkpoint of other sizes)
  except (TypeError, ValueError) as e:
    # Mixer options are free-form (each mixer has its own): the builder is their rule.
    m = config.model
    field, value = (("model.mixer_options", m.mixer_options.to_dict()) if m.mixer_options.keys()
                    else ("model.mixer", tasks_lib.layer_mixers(m)))
    raise guards.ConfigError(field, value, f"rejected by the mixer: {' '.join(str(e).split())}") from None
  n_params = tasks_lib.count_params(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = make_optimizer(config, task.param_labels)

  p_sh, r_sh, o_sh = state_shardings(config, mesh, params, rest, tx)
  params, rest = _place(params, p_sh), _place(rest, r_sh)
  opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
  b_sh = jax.tree.map(lambda x: sh.batch_sharding(mesh, np.ndim(x)), task.eval_batches[0])
  train_step, eval_step = make_steps(graphdef, task, tx, (p_sh, r_sh, o_sh, b_sh))
  repl = jax.NamedSharding(mesh, jax.P())
  report = sh.sharding_report(params, p_sh, mesh)
  if is_chief:
    logging.info("sharding:\n%s", report)
    if print_report:
      print(report, flush=True)

  mngr = None
  start_step = 0
  resumed_from = None
  last_saved = None
  log_file = None
  preempt = None
  try:
    if ck["every"] > 0:
      open_fn = lambda: ckpt.open_manager(  # noqa: E731
          os.path.join(workdir, "checkpoints"), max_to_keep=ck["max_to_keep"],
          best_metric=ck["best_metric"], best_mode=ck["best_mode"], keep_best=ck["keep_best"],
          async_save=ck["async_save"])
      if ck["resume"]:
        try:
          # Restore straight into this run's shardings (the checkpoint may come from another mesh).
          mngr, latest, restored = ckpt.restore_latest_intact(
              open_fn, ckpt.abstract_like(params, p_sh), ckpt.abstract_like(opt_state, o_sh),
              ckpt.abstract_like(rest, r_sh))
        except ckpt.CheckpointMismatch as e:
          raise guards.ResumeMismatch(f"cannot resume from {workdir}/checkpoints: {e}") from None
        except ckpt.NoIntactCheckpoint as e:
          raise guards.RunError(str(e)) from None
        if latest is not None:
          params, opt_state, meta, restored_rest = restored
          if jax.tree.leaves(rest):
            rest = restored_rest
          if meta.get("seed", config.seed) != config.seed:
            logging.warning("checkpoint was written with seed %s but config.seed=%s: the data order "
                            "after resuming differs from the original run", meta.get("seed"), config.seed)
          task.train_loader.restore(meta["loader"])
          start_step = resumed_from = last_saved = int(meta["step"])
          logging.info("resumed from step %d", start_step)
      else:
        mngr = open_fn()

    metrics_path = None
    if workdir and is_chief:
      metrics_path = os.path.join(workdir, "metrics.jsonl")
      try:
        if resumed_from is not None:
          _truncate_metrics(metrics_path, resumed_from)
        log_file = open(metrics_path, "a" if resumed_from is not None else "w")
      except OSError as e:
        raise guards.DiskError(f"cannot write {metrics_path}: {e.strerror or e}") from None

    def log(record):
      if log_file:
        try:
          log_file.write(json.dumps(record) + "\n")
          log_file.flush()
        except OSError as e:
          raise guards.DiskError(f"cannot write {metrics_path}: {e.strerror or e}") from None

    def save(step, metrics=None):
      nonlocal last_saved
      if metrics is not None and ck["best_metric"] and ck["best_metric"] not in metrics:
        raise ValueError(f"checkpoint.best_metric={ck['best_metric']!r} is not among the eval "
                         f"metrics {sorted(metrics)}")
      meta = {"step": step, "loader": task.train_loader.state(), "seed": config.seed}
      try:
        ckpt.save(mngr, step, params, opt_state, meta, metrics=metrics, rest=rest)
      except ckpt.CheckpointSaveError as e:
        _raise_save_error(e, mngr)
      last_saved = step

    preempt = _Preemption(mngr is not None and ck["save_on_sigterm"])
    history = []
    steps = config.train.steps
    stop_on_nonfinite = not _skip_nonfinite(config)
    guard = _place(init_guard(start_step), repl)
    bar = tqdm(total=steps, initial=start_step, desc=f"{config.task}:{tasks_lib.layer_mixers(config.model)}",
               disable=not (config.train.get("progress", True) and is_chief), dynamic_ncols=True)
    t_start = None
    t_steps = 0
    last = {}
    preempted = False
    last_step = start_step
    for step in range(start_step + 1, steps + 1):
      last_step = step
      batch = sh.shard_batch(next(task.train_loader), mesh)
      params, rest, opt_state, metrics, guard = train_step(params, rest, opt_state, batch, guard)
      if t_start is None:
        jax.block_until_ready(params)
        t_start = time.perf_counter()  # excludes compilation from steps/s
      else:
        t_steps += 1
      is_log = step % config.train.log_every == 0 or step == steps
      is_eval = step % config.train.eval_every == 0 or step == steps
      stop = mngr is not None and preempt.requested(step)
      is_save = mngr is not None and (step % ck["every"] == 0 or step == steps or stop)
      if is_log:
        fetched, g = jax.device_get((metrics, guard))
        last = {k: float(v) for k, v in fetched.items()}
        log({"step": step, **{f"train_{k}": v for k, v in last.items()}})
        bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.3f}")
      elif is_eval or is_save:
        g = jax.device_get(guard)  # a host sync these steps make anyway (eval, save)
      if stop_on_nonfinite and (is_log or is_eval or is_save):
        check_guard(g, last_saved)  # before an eval or save of non-finite state
      ev = None
      if is_eval:
        ev = evaluate(eval_step, params, rest, [sh.shard_batch(b, mesh) for b in task.eval_batches])
        history.append({"step": step, **ev})
        log({"step": step, **{f"eval_{k}": v for k, v in ev.items()}})
        bar.set_postfix(loss=f"{last.get('loss', float('nan')):.3f}", eval_acc=f"{ev['accuracy']:.3f}")
      bar.update(1)
      if is_save:
        save(step, {f"eval_{k}": v for k, v in ev.items()} if ev else None)
        if stop:
          logging.warning("SIGTERM: saved step %d, stopping", step)
          preempted = True
          break
    jax.block_until_ready(params)
    elapsed = time.perf_counter() - t_start if t_steps else float("nan")
    bar.close()
    if mngr is not None:
      try:
        ckpt.wait(mngr)
      except ckpt.CheckpointSaveError as e:
        _raise_save_error(e, mngr)
  finally:
    if preempt is not None:
      preempt.close()
    if mngr is not None:
      try:
        mngr.close()  # waits for an in-flight save (of finite state: saves are checked first)
      except Exception as e:  # noqa: BLE001 - already stopping for another reason, or reported
        logging.warning("closing the checkpoint manager: %s", e)
    if log_file:
      log_file.close()
  summary = {
      "task": config.task, "mixer": tasks_lib.layer_mixers(config.model), "params": n_params,
      "steps": steps, "steps_per_s": t_steps / elapsed if t_steps else float("nan"),
      "final_eval": history[-1] if history else {}, "history": history,
      "final_train": last, "mesh": dict(mesh.shape), "resumed_from": resumed_from,
      "preempted": preempted, "last_step": last_step, "param_bytes_per_device": sh.bytes_per_device(params),
      "opt_bytes_per_device": sh.bytes_per_device(opt_state),
  }
  if workdir and is_chief:
    path = os.path.join(workdir, "summary.json")
    try:
      with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    except OSError as e:
      raise guards.DiskError(f"cannot write {path}: {e.strerror or e}") from None
  if jax.process_count() == 1:
    nnx.update(model, params, rest)
  summary["model"] = model
  return summary


def _raise_save_error(e: "ckpt.CheckpointSaveError", mngr) -> None:
  """A failed save stops the run; the steps finalized before it are untouched and restorable."""
  kept = [s for s in ckpt.completed_steps(str(mngr.directory)) if s != e.step]
  full = " (disk full)" if guards.is_disk_full(e.cause) else ""
  raise guards.DiskError(f"{e}{full}; training stopped, earlier checkpoints {kept} are intact "
                         "(rerun to resume from the newest)") from None
