"""Context parallelism and per-shard wrappers equal their single-device ops (8 host CPU devices).

The checks live in `_context_parallel_checks.py` and run in a subprocess with 8 forced host
devices (pytest's own process already has one); it prints a JSON of max abs errors and the tests
below assert on it. A core set runs by default; the remaining configurations (one more
subprocess, mostly compile time) are marked slow.
"""

from __future__ import annotations

import json

import pytest

from _multidevice import run_json

CORE_RING = ("s2_full_mha", "s4_causal_gqa_sinks")
CORE_LINEAR = ("scalar_s2_init", "vector_s4", "noncausal_s4_norm")
SLOW_RING = ("s2_causal_gqa", "s4_full_gqa", "s4_causal_mha")
SLOW_LINEAR = ("none_s4", "scalar_s4", "head_s4", "vector_s2_norm_init")


def _run(ring, linear, extras):
  code = ("import json, sys\nsys.path.insert(0, 'tests/distributed')\n"
          "import _context_parallel_checks as c\n"
          f"print(json.dumps(c.run({json.dumps(list(ring))}, {json.dumps(list(linear))}, {extras})))\n")
  return run_json(code, num_devices=8)


@pytest.fixture(scope="module")
def core():
  return _run(CORE_RING, CORE_LINEAR, True)


@pytest.fixture(scope="module")
def extended():
  return _run(SLOW_RING, SLOW_LINEAR, False)


def _check_ring(r, case):
  assert r["o_norm"] > 0.1 and r["dk_norm"] > 0.1, r   # not a comparison between zeros
  for key in ("o", "dq", "dk", "dv"):
    assert r[key] < 2e-5, (case, key, r)
  if r["local_only"] is not None:
    # Attending only within each shard is far off: the ring really brings in the other blocks.
    assert r["local_only"] > 1e-2, r
  assert "sequence" in r["out_spec"], r


def _check_linear(r, case):
  assert r["o_norm"] > 0.1 and r["dk_norm"] > 0.1, r
  tol = 5e-5 * max(1.0, r["o_norm"])
  for key in ("o", "state", "dq", "dk", "dv", "dg", "ds0"):
    assert r[key] < tol, (case, key, r)
  if r["local_only"] is not None:
    assert r["local_only"] > 1e-2, r   # without state passing the later shards are wrong


@pytest.mark.multidevice
@pytest.mark.parametrize("case", CORE_RING)
def test_ring_attention_equals_single_device(core, case):
  _check_ring(core["ring"][case], case)
  assert core["ring"][case]["local_only"] is not None


@pytest.mark.multidevice
@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_RING)
def test_ring_attention_more_configs(extended, case):
  _check_ring(extended["ring"][case], case)


@pytest.mark.multidevice
def test_ring_attention_bf16(core):
  r = core["bf16"]
  assert r["dtype"] == "bfloat16"
  # Partials are rounded to bf16 before the float32 merge: a bf16-sized tolerance, and no worse
  # than a few times the single-device bf16 error.
  assert r["o"] < 3e-2 and r["o"] <= 4 * r["single_device"] + 1e-3, r


@pytest.mark.multidevice
@pytest.mark.parametrize("case", CORE_LINEAR)
def test_linear_state_passing_equals_single_device(core, case):
  _check_linear(core["linear"][case], case)
  assert core["linear"][case]["local_only"] is not None or case.endswith("_init")


@pytest.mark.multidevice
@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_LINEAR)
def test_linear_state_passing_more_configs(extended, case):
  _check_linear(extended["linear"][case], case)


@pytest.mark.multidevice
def test_shard_heads_equals_unsharded(core):
  r = core["shard_heads"]
  assert r["o_norm"] > 0.1
  for key in ("o", "o_plain", "lse", "lin_o", "lin_state"):
    assert r[key] < 1e-5, (key, r)
  assert "tensor" in r["out_spec"] and "data" in r["out_spec"], r


@pytest.mark.multidevice
def test_shard_heads_and_ring_errors(core):
  e = core["shard_heads"]["errors"]
  assert "Hq" in e["hq"] and "tensor" in e["hq"], e
  assert "Hk" in e["hk"] and "tensor" in e["hk"], e
  assert "B=3" in e["batch"], e
  assert "T=50" in e["ring_t"] and "sequence" in e["ring_t"], e
