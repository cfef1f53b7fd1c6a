"""Megatron TP and FSDP give the unsharded results; mesh-shape errors name the problem.

The multi-device checks (a tiny DecoderLM's loss, logits and gradients under `jax.jit` with
explicit in/out shardings on TP=2, TP=4, DP=8 and FSDP=8 meshes) live in `_sharding_checks.py`
and run once in a subprocess with 8 forced host CPU devices; the tests assert on its JSON.
Mesh-shape validation is pure Python and runs in-process.
"""

from __future__ import annotations

import jax
import pytest

from _multidevice import run_json
from attnjax.distributed import sharding as sh

_CODE = ("import json, sys\nsys.path.insert(0, 'tests/distributed')\n"
         "import _sharding_checks as c\nprint(json.dumps(c.run()))\n")


@pytest.fixture(scope="module")
def results():
  return run_json(_CODE, num_devices=8)


def _check_equal(r):
  assert r["loss"] < 1e-5, r
  assert r["logits"] < 2e-5, r
  assert r["grads"] < 2e-6, r   # the unsharded grads have global norm ~2.7


@pytest.mark.multidevice
@pytest.mark.parametrize("mesh", ["tp2", "tp4"])
def test_tensor_parallel_equals_single_device(results, mesh):
  r = results[mesh]
  _check_equal(r)
  assert results["grad_norm"] > 0.1
  specs = r["specs"]
  # Megatron layout: QKV and MLP up/gate column-parallel, output/down row-parallel.
  assert specs["blocks/0/mixer/q_proj/kernel"] == "P(None, 'tensor')", specs
  assert specs["blocks/0/mixer/o_proj/kernel"] == "P('tensor', None)", specs
  assert specs["blocks/0/mlp/up/kernel"] == "P(None, 'tensor')", specs
  assert specs["blocks/0/mlp/down/kernel"] == "P('tensor', None)", specs
  # Parameters really are split: the big matrices shrink by the TP degree.
  tp = int(mesh[2:])
  assert r["param_bytes_per_device"] < results["total_bytes"] / tp * 1.1, r
  assert r["grad_specs_match"], r   # gradients come back in the parameters' sharding


@pytest.mark.multidevice
def test_fsdp_equals_data_parallel(results):
  dp, fsdp = results["dp8"], results["fsdp8"]
  _check_equal(dp)
  _check_equal(fsdp)
  # DP replicates every parameter; FSDP shards them (here every dim named "embed" splits 8 ways).
  assert dp["param_bytes_per_device"] == results["total_bytes"], dp
  assert fsdp["param_bytes_per_device"] <= results["total_bytes"] / 8 * 1.05, fsdp
  assert fsdp["grad_bytes_per_device"] == fsdp["param_bytes_per_device"], fsdp
  assert all("fsdp" in s for s in fsdp["specs"].values()), fsdp["specs"]


@pytest.mark.multidevice
def test_sharding_report(results):
  r = results["fsdp8"]
  report = r["report"]
  lines = report.splitlines()
  assert "fsdp" in lines[0] and "8 devices" in lines[0], lines[0]
  assert "per-device" in lines[1] and "spec" in lines[1], lines[1]
  for name in r["specs"]:
    row = next(line for line in lines if line.startswith(name + " "))
    assert "fsdp" in row, row
  assert f"total parameter bytes {results['total_bytes']:,}" in report, report
  assert f"per device {r['param_bytes_per_device']:,}" in report, report


@pytest.mark.parametrize("config, devices, match", [
    ({"data": 3}, 8, r"has 3 devices but 8 are available"),
    ({"data": 2, "tensor": 2}, 8, r"product of the axis sizes must equal"),
    ({"model": 2}, 8, r"unknown axes \['model'\]"),
    ({"data": -1, "tensor": -1}, 8, r"at most one axis as -1"),
    ({"data": -1, "tensor": 3}, 8, r"do not divide the device count 8"),
    ({"data": 0}, 8, r">= 1"),
])
def test_mesh_shape_errors(config, devices, match):
  with pytest.raises(ValueError, match=match):
    sh.mesh_shape_from_config(config, devices)


def test_mesh_shape_from_config():
  assert sh.mesh_shape_from_config({"data": -1, "tensor": 2}, 8) == (4, 1, 2, 1)
  assert sh.mesh_shape_from_config({"fsdp": 4, "tensor": 2}, 8) == (1, 4, 2, 1)
  assert sh.mesh_shape_from_config(None, 8) == (8, 1, 1, 1)


def test_make_mesh_rejects_wrong_device_count():
  n = jax.device_count()
  with pytest.raises(ValueError, match=f"{n} are available"):
    sh.make_mesh({"data": n + 1})


def test_activation_spec_and_axis_size():
  mesh = sh.make_mesh({})
  assert sh.axis_size(mesh, sh.BATCH_AXES) == jax.device_count()
  assert sh.axis_size(mesh, "missing") == 1
  assert sh.activation_spec(mesh, sequence=True) == jax.P(("data", "fsdp"), "sequence", "tensor", None)
  assert sh.activation_spec(mesh, heads=False) == jax.P(("data", "fsdp"), None, None, None)
