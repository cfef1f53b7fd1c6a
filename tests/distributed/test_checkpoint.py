"""Sharded orbax checkpoints: kill / SIGTERM and resume, mesh-change restores, retention, errors.

The kill-and-resume test drives `python -m experiments.train --config=configs/mqar_sharded.py:tiny`
(8 host devices, fsdp 4 x tensor 2) as subprocesses and compares every logged training loss with
the uninterrupted run's, bit for bit: a resumed run restores parameters, optimizer state, step and
the data-loader position, and the compiled step is deterministic on CPU, so nothing may differ.
The mesh-change test runs in one 8-device subprocess; the retention and error tests run in the
pytest process (one device).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

import _train_runs as tr
from _multidevice import run_json
from attnjax.distributed import checkpoint as ckpt
from attnjax.distributed import sharding as sh
from configs import mqar_sharded
from experiments import tasks as tasks_lib
from experiments import trainer


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return tr.reference_run(tmp_path_factory.getbasetemp())


def _one_device_config(**model):
  cfg = mqar_sharded.get_config("tiny")
  with cfg.unlocked():
    cfg.mesh = ml_collections.ConfigDict({"data": -1})
    for k, v in model.items():
      cfg.model[k] = v
  return cfg


def _restore_on_one_device(checkpoint_dir: str, step: int):
  """(params, opt_state, meta) of `step` as host arrays, restored onto this process's one device."""
  cfg = mqar_sharded.get_config("tiny")
  mesh = sh.make_mesh({}, jax.devices()[:1])
  _, params, _, opt = trainer.abstract_train_state(cfg, mesh)
  mngr = ckpt.open_manager(checkpoint_dir, create=False, async_save=False)
  try:
    p, o, meta = ckpt.restore(mngr, step, params, opt)
  finally:
    mngr.close()
  return jax.tree.map(np.asarray, p), jax.tree.map(np.asarray, o), meta


def _assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and len(la) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------------------------
# 1. Kill (also during a save), SIGTERM, resume: losses equal the uninterrupted run step for step.
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.multidevice
def test_kill_sigterm_and_resume_reproduce_the_uninterrupted_run(reference, tmp_path, tmp_path_factory):
  cache = tr.cache_dir(tmp_path_factory.getbasetemp())
  wd = str(tmp_path / "run")
  ck = os.path.join(wd, "checkpoints")
  ref_records = tr.read_metrics(reference)
  ref_losses = tr.train_losses(ref_records)
  assert sorted(ref_losses) == list(range(1, tr.STEPS + 1))
  segments = []  # metrics.jsonl as each interrupted process left it

  # (a) SIGKILL while the async save of step 8 is in flight (trainer test hook).
  p = tr.start(wd, cache, "--config.checkpoint.kill_during_save_step=8", tag="a")
  tr.finish(p, expect_rc=-tr.SIGKILL)
  assert tr.completed_steps(ck) == [4]
  incomplete = ckpt.list_incomplete(ck)
  assert incomplete and incomplete[0].startswith("8.")
  segments.append(tr.read_metrics(wd))
  assert tr.logged_step(wd) == 8

  # (b) Restart: warns about the temporary directory, resumes from step 4; SIGTERM after step 9
  # is logged makes it save at the next step boundary and exit cleanly.
  p = tr.start(wd, cache, tag="b")
  tr.wait_until(lambda: tr.logged_step(wd) >= 9, p, "step 9 in metrics.jsonl")
  tr.send(p, tr.SIGTERM)
  tr.finish(p)
  out, err = tr.output(p)
  assert "ignoring incomplete checkpoint" in err and "8.orbax-checkpoint-tmp" in err
  summary = json.load(open(os.path.join(wd, "summary.json")))
  assert summary["resumed_from"] == 4 and summary["preempted"]
  term_step = summary["last_step"]
  assert 9 <= term_step < tr.STEPS and "stopped by SIGTERM" in out
  assert term_step in tr.completed_steps(ck) and not ckpt.list_incomplete(ck)
  assert tr.logged_step(wd) == term_step
  segments.append(tr.read_metrics(wd))

  # (c) Restart from the SIGTERM checkpoint; SIGKILL once this process has finalized a
  # checkpoint of its own.
  p = tr.start(wd, cache, tag="c")
  tr.wait_until(lambda: any(s > term_step for s in tr.completed_steps(ck)), p,
                f"a checkpoint after step {term_step}")
  tr.send(p, tr.SIGKILL)
  rc = tr.finish(p, expect_rc=None)
  assert rc == -tr.SIGKILL, f"the run ended (rc={rc}) before it could be killed"
  segments.append(tr.read_metrics(wd))
  survivors = tr.completed_steps(ck)
  assert max(survivors) > term_step

  # (d) Restart and finish.
  p = tr.start(wd, cache, tag="d")
  tr.finish(p)
  summary = json.load(open(os.path.join(wd, "summary.json")))
  assert summary["resumed_from"] == max(survivors) and not summary["preempted"]

  # Every loss any segment logged equals the uninterrupted run's loss at that step, exactly;
  # the final metrics.jsonl has each step once (resuming cut back the records of lost steps).
  for seg in segments:
    for step, loss in tr.train_losses(seg).items():
      assert loss == ref_losses[step], (step, loss, ref_losses[step])
  final = tr.read_metrics(wd)
  steps = [r["step"] for r in final if "train_loss" in r]
  assert steps == list(range(1, tr.STEPS + 1))
  assert tr.train_losses(final) == ref_losses
  ref_evals = {r["step"]: r for r in ref_records if "eval_loss" in r}
  evals = {r["step"]: r for r in final if "eval_loss" in r}
  assert evals == ref_evals and sorted(evals) == [8, 16, 20]

  # Every completed checkpoint restores (here onto one device); steps that the reference run
  # also kept hold identical parameters and optimizer state.
  kept = tr.completed_steps(ck)
  assert tr.STEPS in kept and not ckpt.list_incomplete(ck)
  ref_kept = tr.completed_steps(os.path.join(reference, "checkpoints"))
  for step in kept:
    params, opt, meta = _restore_on_one_device(ck, step)
    assert meta["step"] == step and meta["seed"] == 0
    if step in ref_kept:
      ref_params, ref_opt, ref_meta = _restore_on_one_device(os.path.join(reference, "checkpoints"), step)
      _assert_trees_equal(params, ref_params)
      _assert_trees_equal(opt, ref_opt)
      assert meta == ref_meta


# ----------------------------------------------------------------------------------------------
# 2. Restore onto other meshes (8 devices 4x2 -> 2x4, 4 devices, 1 device) and for inference.
# ----------------------------------------------------------------------------------------------

_MESH_CHANGE = r"""
import json, os, shutil
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from attnjax.distributed import checkpoint as ckpt, sharding as sh
from configs import mqar_sharded
from experiments import tasks as tasks_lib, trainer

d = __DIR__
cfg = mqar_sharded.get_config("tiny")
task = tasks_lib.make_task(cfg)
devs = jax.devices()
assert len(devs) == 8
mesh_a = sh.make_mesh({"fsdp": 4, "tensor": 2}, devs)
graphdef, ap, ar, ao = trainer.abstract_train_state(cfg, mesh_a, task)

# Random values (also for the optimizer moments and count), laid out with the 4x2 shardings.
keys = iter(jax.random.split(jax.random.key(0), 4096))
def rand(a):
  if jnp.issubdtype(a.dtype, jnp.floating):
    x = jax.random.normal(next(keys), a.shape, a.dtype)
  else:
    x = jnp.full(a.shape, 7, a.dtype)
  return jax.device_put(x, a.sharding)
params, opt = jax.tree.map(rand, ap), jax.tree.map(rand, ao)
assert any(len(s) > 1 for s in {tuple(x.sharding.spec) for x in jax.tree.leaves(params)})
mngr = ckpt.open_manager(os.path.join(d, "ck"), async_save=True)
ckpt.save(mngr, 5, params, opt, {"step": 5, "loader": {"epoch": 0, "index": 80}, "seed": 0})
mngr.wait_until_finished(); mngr.close()
want_p, want_o = jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, opt)

def same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), y) for x, y in zip(la, lb))

out = {}
for name, mesh_cfg, n in [("2x4", {"fsdp": 2, "tensor": 4}, 8), ("4dev", {"fsdp": 2, "tensor": 2}, 4),
                          ("1dev", {}, 1)]:
  mesh = sh.make_mesh(mesh_cfg, devs[:n])
  _, tp, _, to = trainer.abstract_train_state(cfg, mesh, task)
  mngr = ckpt.open_manager(os.path.join(d, "ck"), create=False)
  p, o, meta = ckpt.restore(mngr, 5, tp, to)
  mngr.close()
  out[name] = {
      "params_equal": same(p, want_p), "opt_equal": same(o, want_o), "meta": meta,
      "placed": all(x.sharding == t.sharding for x, t in zip(jax.tree.leaves((p, o)), jax.tree.leaves((tp, to)))),
      "devices": sorted({len(x.sharding.device_set) for x in jax.tree.leaves(p)}),
      "q_spec": list(p["blocks"][0]["mixer"]["q_proj"]["kernel"][...].sharding.spec),
  }

# Inference: parameters only, from a copy whose optimizer state is gone, onto a 2-device mesh.
shutil.copytree(os.path.join(d, "ck"), os.path.join(d, "ck_noopt"))
shutil.rmtree(os.path.join(d, "ck_noopt", "5", "opt_state"))
mesh2 = sh.make_mesh({"tensor": 2}, devs[:2])
model = nnx.eval_shape(lambda: task.build_model(cfg, nnx.Rngs(123)))
model = ckpt.restore_model_for_inference(os.path.join(d, "ck_noopt"), model, mesh2)
_, mp, _ = nnx.split(model, nnx.Param, ...)
ref_model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, want_p), jax.tree.map(jnp.asarray, ar))
batch = task.eval_batches[0]
h = jax.jit(lambda m, x: m.hidden(x))(model, batch.inputs)
h_ref = jax.jit(lambda m, x: m.hidden(x))(ref_model, batch.inputs)
out["inference"] = {"params_equal": same(mp, want_p),
                    "devices": sorted({len(x.sharding.device_set) for x in jax.tree.leaves(mp)}),
                    "rel_diff": float(jnp.max(jnp.abs(h - h_ref)) / jnp.max(jnp.abs(h_ref)))}
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.multidevice
def test_restore_onto_other_meshes_and_for_inference(tmp_path):
  res = run_json(_MESH_CHANGE.replace("__DIR__", repr(str(tmp_path))), num_devices=8)
  q_specs = {"2x4": ["fsdp", "tensor"], "4dev": ["fsdp", "tensor"], "1dev": [None, None]}
  for name, n in [("2x4", 8), ("4dev", 4), ("1dev", 1)]:
    r = res[name]
    assert r["params_equal"] and r["opt_equal"] and r["placed"], (name, r)
    assert r["devices"] == [n] and r["meta"]["step"] == 5 and r["meta"]["loader"]["index"] == 80
    assert r["q_spec"] == q_specs[name], (name, r["q_spec"])
  inf = res["inference"]
  assert inf["params_equal"] and inf["devices"] == [2]
  # Same function on 2 devices vs 1 (random N(0, 1) weights make activations large: relative).
  # Sharded matmuls sum in another order: ~1e-5 relative in float32, a wrong restore gives O(1).
  assert inf["rel_diff"] < 5e-5


# ----------------------------------------------------------------------------------------------
# 3. Keep-last-N plus keep-best by metric.
# ----------------------------------------------------------------------------------------------

def _save_series(directory, metrics_by_step, **kw):
  mngr = ckpt.open_manager(directory, async_save=False, **kw)
  tree = {"w": np.arange(3, dtype=np.float32)}
  for step, m in metrics_by_step.items():
    ckpt.save(mngr, step, tree, {"count": np.int32(step)}, {"step": step}, metrics=m)
  mngr.wait_until_finished()
  info = ckpt.describe(mngr)
  mngr.close()
  return info


def test_keep_last_n_and_keep_best(tmp_path):
  acc = {1: {"eval_accuracy": 0.1}, 2: {"eval_accuracy": 0.9}, 3: None, 4: {"eval_accuracy": 0.3},
         5: None, 6: {"eval_accuracy": 0.2}, 7: None}
  info = _save_series(str(tmp_path / "max"), acc, max_to_keep=2, best_metric="eval_accuracy")
  # Last two (6, 7) plus the best accuracy (2); steps without metrics go once they are old.
  assert info["steps"] == [2, 6, 7] and info["best"] == 2 and info["latest"] == 7
  assert sorted(os.listdir(tmp_path / "max")) == ["2", "6", "7"]

  loss = {s: {"eval_loss": v} for s, v in {1: 3.0, 2: 1.0, 3: 0.5, 4: 2.0, 5: 4.0, 6: 5.0}.items()}
  info = _save_series(str(tmp_path / "min"), loss, max_to_keep=1, best_metric="eval_loss",
                      best_mode="min", keep_best=2)
  assert info["steps"] == [2, 3, 6] and info["best"] == 3

  info = _save_series(str(tmp_path / "last"), {s: None for s in range(1, 6)}, max_to_keep=3)
  assert info["steps"] == [3, 4, 5]
  with pytest.raises(ValueError, match="best_mode"):
    ckpt.open_manager(str(tmp_path / "bad"), best_metric="x", best_mode="largest")


# ----------------------------------------------------------------------------------------------
# 4. Clear errors.
# ----------------------------------------------------------------------------------------------

def test_mesh_shape_that_does_not_fit_the_devices_is_an_error(tmp_path):
  cfg = mqar_sharded.get_config("tiny")  # fsdp -1 x tensor 2: needs an even device count
  with pytest.raises(ValueError, match=r"do not divide the device count 1"):
    trainer.train_and_evaluate(cfg, str(tmp_path))
  with cfg.unlocked():
    cfg.mesh = ml_collections.ConfigDict({"data": 2, "tensor": 2})
  with pytest.raises(ValueError, match=r"has 4 devices but 1 are available"):
    trainer.make_mesh(cfg)
  with cfg.unlocked():
    cfg.mesh = ml_collections.ConfigDict({"data": 1, "model": 1})
  with pytest.raises(ValueError, match=r"unknown axes \['model'\]"):
    trainer.make_mesh(cfg)


def _save_model_checkpoint(directory, cfg):
  task = tasks_lib.make_task(cfg)
  model = task.build_model(cfg, nnx.Rngs(0))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  opt = trainer.make_optimizer(cfg).init(params)
  mngr = ckpt.open_manager(directory, async_save=False)
  ckpt.save(mngr, 3, params, opt, {"step": 3, "loader": task.train_loader.state(), "seed": cfg.seed},
            rest=rest)
  mngr.close()
  return task, params


def test_checkpoint_with_other_shapes_names_the_first_mismatched_parameter(tmp_path):
  cfg = _one_device_config()
  _save_model_checkpoint(str(tmp_path / "checkpoints"), cfg)
  wider = _one_device_config(d_model=48)
  # Resuming a run whose config changed fails before training, naming the parameter.
  with pytest.raises(ValueError, match=r"'blocks/0/conv/bias' has shape \(32,\) but the model "
                                       r"config gives \(48,\)"):
    trainer.train_and_evaluate(wider, str(tmp_path))
  mesh = sh.make_mesh({}, jax.devices()[:1])
  model = nnx.eval_shape(lambda: tasks_lib.build_decoder(wider, nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"'blocks/0/conv/bias' has shape \(32,\)"):
    ckpt.restore_model_for_inference(str(tmp_path / "checkpoints"), model, mesh)
  deeper = _one_device_config(num_layers=3)
  model = nnx.eval_shape(lambda: tasks_lib.build_decoder(deeper, nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"no parameter 'blocks/2/conv/bias'"):
    ckpt.restore_model_for_inference(str(tmp_path / "checkpoints"), model, mesh)
  # The matching config restores exactly what was saved.
  task, saved = _save_model_checkpoint(str(tmp_path / "again"), cfg)
  model = nnx.eval_shape(lambda: tasks_lib.build_decoder(cfg, nnx.Rngs(7)))
  model = ckpt.restore_model_for_inference(str(tmp_path / "again"), model, mesh)
  _assert_trees_equal(jax.tree.map(np.asarray, nnx.state(model, nnx.Param)),
                      jax.tree.map(np.asarray, saved))


def test_missing_workdir_or_checkpoint_directory_is_an_error(tmp_path):
  cfg = _one_device_config()
  with pytest.raises(ValueError, match="needs a workdir"):
    trainer.train_and_evaluate(cfg, None)
  mesh = sh.make_mesh({}, jax.devices()[:1])
  model = nnx.eval_shape(lambda: tasks_lib.build_decoder(cfg, nnx.Rngs(0)))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ckpt.restore_model_for_inference(str(tmp_path / "nowhere"), model, mesh)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    ckpt.open_manager(str(tmp_path / "nowhere"), create=False)
  # A directory holding only an interrupted save: warned about, and not a checkpoint.
  os.makedirs(tmp_path / "partial" / "4.orbax-checkpoint-tmp")
  with pytest.warns(RuntimeWarning, match="ignoring incomplete checkpoint"):
    with pytest.raises(FileNotFoundError, match="no completed checkpoint"):
      ckpt.restore_model_for_inference(str(tmp_path / "partial"), model, mesh)
  with pytest.warns(RuntimeWarning, match="4.orbax-checkpoint-tmp"):
    _save_model_checkpoint(str(tmp_path / "partial"), cfg)
  with pytest.warns(RuntimeWarning, match="4.orbax-checkpoint-tmp"):
    with pytest.raises(FileNotFoundError, match=r"step 9 not in .* completed steps: \[3\]"):
      ckpt.restore_model_for_inference(str(tmp_path / "partial"), model, mesh, step=9)
  shutil.rmtree(tmp_path / "partial" / "4.orbax-checkpoint-tmp")
  assert ckpt.list_incomplete(str(tmp_path / "partial")) == []
