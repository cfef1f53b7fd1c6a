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

  # (a) SIGKILL while the async save of step 8 is in flight (test-only entry, _train_entry.py).
  p = tr.start(wd, cache, tag="a", kill_during_save_step=8)
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
  assert "taking over the stale lock" in err  # the killed run's lock
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


# ----------------------------------------------------------------------------------------------
# 5. Integrity: checksums, damaged steps moved aside, a failed save, non-finite steps (one device).
# ----------------------------------------------------------------------------------------------

def _short_config(steps=8, every=2, **train):
  cfg = _one_device_config()
  with cfg.unlocked():
    cfg.train.steps, cfg.train.eval_every = steps, steps
    cfg.checkpoint.every, cfg.checkpoint.max_to_keep = every, 10
    for k, v in train.items():
      cfg.train[k] = v
  return cfg


def _losses(workdir):
  return tr.train_losses(tr.read_metrics(str(workdir)))


def _garble_largest_file(folder):
  """XORs 16 bytes in the middle of the largest file under `folder` (a chunk of array data)."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  mid = len(data) // 2
  data[mid:mid + 16] = bytes(b ^ 0x5A for b in data[mid:mid + 16])
  open(path, "wb").write(bytes(data))


@pytest.fixture(scope="module")
def short_reference(tmp_path_factory):
  """An uninterrupted 8-step one-device run with checkpoints at 2, 4, 6, 8."""
  wd = tmp_path_factory.mktemp("short_reference")
  trainer.train_and_evaluate(_short_config(), str(wd))
  assert tr.completed_steps(str(wd / "checkpoints")) == [2, 4, 6, 8]
  return wd


def test_damaged_steps_are_moved_aside_resume_matches_and_a_full_disk_keeps_earlier_steps(
    short_reference, tmp_path, monkeypatch):
  """Garbled params (step 8), garbled optimizer state (step 6) and an empty newer step (10): each
  is warned about by step and moved to <step>.corrupt; the run resumes from step 4 and its losses
  equal the uninterrupted run's bit for bit. Its save of step 8 then fails with ENOSPC inside
  orbax's async writer: the run stops naming the step, and steps 2, 4 and 6 stay restorable."""
  import errno
  import orbax.checkpoint as ocp
  from experiments import guards
  wd = tmp_path / "run"
  shutil.copytree(short_reference, wd)
  ck = wd / "checkpoints"
  _garble_largest_file(ck / "8" / "params")
  _garble_largest_file(ck / "6" / "opt_state")
  os.makedirs(ck / "10")
  original = ocp.JsonCheckpointHandler._save_fn

  async def full_disk_at_step_8(self, x, directory):
    if x.get("step") == 8:
      raise OSError(errno.ENOSPC, "No space left on device")
    return await original(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_disk_at_step_8)
  with pytest.warns(RuntimeWarning) as record:
    with pytest.raises(guards.DiskError, match=r"saving checkpoint step 8 failed.*No space left on "
                                               r"device.*earlier checkpoints \[2, 4, 6\] are intact"):
      trainer.train_and_evaluate(_short_config(), str(wd))
  monkeypatch.undo()
  msgs = " ".join(str(w.message) for w in record)
  assert "step 10 is damaged (its folder is empty)" in msgs
  assert "step 8 is damaged" in msgs and "step 6 is damaged" in msgs
  assert sorted(n for n in os.listdir(ck) if "tmp" not in n) == [
      "10.corrupt", "2", "4", "6", "6.corrupt", "8.corrupt"]
  ref = _losses(short_reference)
  assert _losses(wd) == ref and sorted(ref) == list(range(1, 9))  # steps 5-8 logged before the save
  with pytest.warns(RuntimeWarning, match="8.orbax-checkpoint-tmp"):  # the failed save's leftovers
    params, _, meta = _restore_on_one_device(str(ck), 6)
  assert meta["step"] == 6 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_checksums_catch_changed_arrays_and_metadata(tmp_path):
  """Silent damage (values that still read back) fails the checksum; damaged metadata, a removed
  item and an unreadable meta file are caught too; all damaged -> NoIntactCheckpoint."""
  d = str(tmp_path / "ck")
  mngr = ckpt.open_manager(d, async_save=False, max_to_keep=10)
  params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
  for step in (1, 2, 3, 4, 5):
    ckpt.save(mngr, step, jax.tree.map(lambda x: x * step, params), {"count": np.int32(step)},
              {"step": step, "loader": {"index": 8 * step}})
  mngr.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  abstract_opt = {"count": jax.ShapeDtypeStruct((), np.int32)}
  restored = ckpt.restore_latest_intact(lambda: ckpt.open_manager(d, create=False), abstract,
                                        abstract_opt)
  restored[0].close()
  assert restored[1] == 5 and restored[2][2] == {"step": 5, "loader": {"index": 40}}
  # One changed element (a flipped low bit) changes the checksum; so does a changed loader position.
  meta = {"step": 1, "loader": {"index": 8}}
  saved = {"integrity": {"arrays": {"params": ckpt.array_checksums(params)}}, **meta}
  saved["integrity"]["meta"] = ckpt.meta_checksum(saved)
  ckpt.verify(saved, {"params": params})
  w = params["w"].copy()
  w.view(np.uint32)[1, 2] ^= 1
  with pytest.raises(ckpt.CheckpointCorrupt, match="checksum of params/w"):
    ckpt.verify(saved, {"params": {"w": w, "b": params["b"]}})
  with pytest.raises(ckpt.CheckpointCorrupt, match="checksum of meta"):
    ckpt.verify({**saved, "loader": {"index": 9}}, {"params": params})
  # On disk: step 5's largest params file truncated, step 4's meta edited (valid JSON), step 3's
  # params/_METADATA removed, step 2's meta file garbled, step 1's params folder removed.
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(d, "5", "params")) for f in fs]
  big = max(files, key=os.path.getsize)
  open(big, "r+b").truncate(os.path.getsize(big) // 2)
  meta_file = os.path.join(d, "4", "meta", "metadata")
  m = json.load(open(meta_file))
  m["loader"]["index"] = 0
  json.dump(m, open(meta_file, "w"))
  os.remove(os.path.join(d, "3", "params", "_METADATA"))
  open(os.path.join(d, "2", "meta", "metadata"), "w").write('{"step": 2, "loa')
  shutil.rmtree(os.path.join(d, "1", "params"))
  with pytest.warns(RuntimeWarning) as record:
    with pytest.raises(ckpt.NoIntactCheckpoint, match=r"damaged steps \[5, 4, 3, 2, 1\]"):
      ckpt.restore_latest_intact(lambda: ckpt.open_manager(d, create=False), abstract, abstract_opt)
  msgs = [str(w.message) for w in record]
  assert "step 5 is damaged" in msgs[0]
  assert "checksum of meta" in msgs[1] and "step 3 is damaged" in msgs[2]
  assert "step 1 is damaged (item 'params' is missing or empty)" in msgs[4]
  assert sorted(os.listdir(d)) == ["1.corrupt", "2.corrupt", "3.corrupt", "4.corrupt", "5.corrupt"]


def test_run_with_only_damaged_checkpoints_stops_instead_of_restarting(tmp_path):
  from experiments import guards
  os.makedirs(tmp_path / "checkpoints" / "4")
  with pytest.warns(RuntimeWarning, match="step 4 is damaged"):
    with pytest.raises(guards.RunError, match="no intact checkpoint left .* not restarting from step 0"):
      trainer.train_and_evaluate(_short_config(), str(tmp_path))
  assert not (tmp_path / "metrics.jsonl").exists()


def _poison_batch(monkeypatch, at_call: int):
  """The `at_call`-th training batch of every loader gets token ids past the vocabulary: the
  embedding lookup fills them with NaN, so that step's loss and gradients are NaN."""
  from attnjax.data import mqar as mqar_data
  original = mqar_data.MQARLoader.__next__

  def poisoned(self):
    batch = original(self)
    self._calls = getattr(self, "_calls", 0) + 1
    if self._calls == at_call:
      batch = mqar_data.MQARBatch(np.full_like(batch.inputs, 10**6), batch.query_positions, batch.targets)
    return batch

  monkeypatch.setattr(mqar_data.MQARLoader, "__next__", poisoned)


def test_non_finite_step_stops_the_run_before_any_save_of_it(tmp_path, monkeypatch):
  """A NaN at step 3, first read at step 4's save (log_every=100): the run stops naming step 3
  and the quantity, and only step 2 is checkpointed."""
  from experiments import guards
  _poison_batch(monkeypatch, 3)
  with pytest.raises(trainer.NonFiniteError,
                     match=r"non-finite loss and grad_norm at step 3: training stopped; the last "
                           r"checkpoint \(step 2\) holds finite state"):
    trainer.train_and_evaluate(_short_config(steps=6, log_every=100), str(tmp_path))
  assert tr.completed_steps(str(tmp_path / "checkpoints")) == [2]
  assert isinstance(trainer.NonFiniteError("x"), guards.RunError)


def test_skip_mode_drops_non_finite_updates_and_counts_them(tmp_path, monkeypatch):
  _poison_batch(monkeypatch, 3)
  s = trainer.train_and_evaluate(_short_config(steps=4, every=4, nonfinite="skip"), str(tmp_path))
  records = tr.read_metrics(str(tmp_path))
  skipped = {r["step"]: r["train_skipped_steps"] for r in records if "train_loss" in r}
  assert skipped == {1: 0, 2: 0, 3: 1, 4: 1}
  assert np.isnan(_losses(tmp_path)[3]) and np.isfinite(_losses(tmp_path)[4])
  assert np.isfinite(s["final_eval"]["loss"])
