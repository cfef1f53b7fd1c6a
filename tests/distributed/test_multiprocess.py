"""Two processes x 4 CPU devices (gloo collectives) train like one process with 8 devices.

Both runs use `configs/mqar_sharded.py:tiny` with the same mesh (fsdp 4 x tensor 2) and
checkpoints on (every 4 steps, async): the two processes write one shared checkpoint directory
through orbax's multi-process protocol, and only process 0 writes metrics.jsonl / summary.json.
Values agree to float32 rounding, not bit for bit: gloo's cross-process all-reduces add the
partial sums in another order than the single-process CPU collectives do.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import _train_runs as tr
from attnjax.distributed import checkpoint as ckpt
from attnjax.distributed import sharding as sh
from configs import mqar_sharded
from experiments import trainer

RTOL = 2e-5  # measured: ~1e-7 relative on losses; Adam amplifies rounding a little over 20 steps


def _restore_params(checkpoint_dir: str, step: int):
  cfg = mqar_sharded.get_config("tiny")
  mesh = sh.make_mesh({}, jax.devices()[:1])
  _, params, _, opt = trainer.abstract_train_state(cfg, mesh)
  mngr = ckpt.open_manager(checkpoint_dir, create=False, async_save=False)
  try:
    p, _, meta = ckpt.restore(mngr, step, params, opt)
  finally:
    mngr.close()
  return jax.tree.map(np.asarray, p), meta


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_with_gloo_match_one_process_with_eight_devices(tmp_path, tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  reference = tr.reference_run(base)
  wd = str(tmp_path / "mp")
  port = tr.free_port()
  procs = [tr.start(wd, tr.cache_dir(base), f"--coordinator_address=localhost:{port}",
                    "--num_processes=2", f"--process_id={i}", num_devices=4, tag=f"p{i}")
           for i in range(2)]
  try:
    for p in procs:
      tr.finish(p)
  finally:  # one failed process leaves the other waiting on the coordinator
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  (out0, err0), (out1, _) = tr.output(procs[0]), tr.output(procs[1])
  assert "8 devices (2 process(es)" in out0 and "fsdp': 4" in out0 and "tensor': 2" in out0
  # Cross-process collectives on CPU need an implementation (gloo, from train.py's flag); without
  # one the sharded step would fail, so finishing at all shows they work. Gloo also says hello.
  assert "gloo" in (out0 + err0).lower()
  # Process 1 neither prints the report/summary nor writes metrics: each step is logged once.
  assert "per device" not in out1 and "eval_accuracy=" not in out1
  records = tr.read_metrics(wd)
  assert [r["step"] for r in records if "train_loss" in r] == list(range(1, tr.STEPS + 1))

  ref_records = tr.read_metrics(reference)
  mp, ref = tr.train_losses(records), tr.train_losses(ref_records)
  np.testing.assert_allclose([mp[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=RTOL)
  mp_eval = [r for r in records if "eval_loss" in r]
  ref_eval = [r for r in ref_records if "eval_loss" in r]
  assert [r["step"] for r in mp_eval] == [r["step"] for r in ref_eval] == [8, 16, 20]
  for a, b in zip(mp_eval, ref_eval):
    np.testing.assert_allclose(a["eval_loss"], b["eval_loss"], rtol=RTOL)
    assert a["eval_accuracy"] == pytest.approx(b["eval_accuracy"], abs=1e-6)
  summary = json.load(open(os.path.join(wd, "summary.json")))
  assert summary["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1}

  # The shared checkpoint directory holds the same completed steps, and the final parameters
  # restore (onto this process's one device) equal to the single-process run's.
  ck, ref_ck = os.path.join(wd, "checkpoints"), os.path.join(reference, "checkpoints")
  assert tr.completed_steps(ck) == tr.completed_steps(ref_ck) and not ckpt.list_incomplete(ck)
  got, meta = _restore_params(ck, tr.STEPS)
  want, ref_meta = _restore_params(ref_ck, tr.STEPS)
  assert meta == ref_meta
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(x, y, rtol=RTOL, atol=1e-6)
