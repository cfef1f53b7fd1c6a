"""Smoke tests of the benchmark scripts in experiments/: each runs end to end at tiny sizes.

Each script runs as its own subprocess (as it is run by hand: absl flags, `python -m`), writes
`<out>.json` and `<out>.md` into a temporary folder, and the test checks their structure: the
JSON's top-level keys, one row per configured case with a time, and the markdown table's header.
The numbers themselves are not checked (tiny shapes on a shared CPU). One test per script so that
xdist can spread them over its workers.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _ok_with(time_key):
  """Row check: the case ran and recorded a positive time under `time_key`."""
  return lambda r: r.get("status") == "ok" and r.get(time_key, 0) > 0


# script: (flags, JSON top-level keys, key of the row list, number of rows, row check, md header).
CASES = {
    "bench_softmax": (
        ["--seq_lens=64,128", "--impls=reference,xla", "--block_size=32", "--repeats=1"],
        {"environment", "results"}, "results", 2 * 2 * 2,  # T x impl x (fwd, fwd+bwd)
        _ok_with("time_ms"),
        "| T | impl | fwd MiB | fwd ms | fwd+bwd MiB | fwd+bwd ms | note |"),
    "bench_linear": (
        ["--seq_lens=64,128", "--forms=parallel,chunked", "--chunk_size=16", "--repeats=1"],
        {"meta", "rows"}, "rows", 2 * 2,  # T x form, each with fwd and fwd_bwd
        lambda r: not r["notes"] and r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0,
        "| T | form | fwd MiB | fwd ms | fwd+bwd MiB | fwd+bwd ms | note |"),
    "bench_linear_vs_scan": (  # two kinds, three methods, one T: the table and its fastest-form rows
        ["--kinds=scalar,delta", "--methods=default,recurrent,scan", "--seq_lens=24", "--heads=2",
         "--head_dim=8", "--chunk_size=8", "--repeats=1"],
        {"environment", "results"}, "results", 2 * 3 * 2,  # kind x method x (fwd, fwd+bwd)
        lambda r: r["ms"] > 0,
        "| T | default | recurrent | scan | default / scan |"),
    "bench_block_sparse": (
        ["--seq_lens=256", "--densities=0.5", "--block=64", "--repeats=1"],
        {"environment", "results"}, "results", 2,  # block_sparse and dense
        _ok_with("time_ms"),
        "| T | target density | block density | impl | MiB | ms | note |"),
    "bench_linear_kernel": (  # Pallas interpret mode on the CPU; no torch/fla/cuDNN peers
        ["--impls=pallas_gla,pallas_linear", "--seq_lens=32", "--batch=1", "--heads=1",
         "--head_dim=16", "--repeats=1", "--warmup=0"],
        {"environment", "results"}, "results", 2 * 2,  # impl x (fwd, fwd+bwd)
        _ok_with("median_ms"),
        "| T | impl | fwd ms | fwd+bwd ms | fwd vs fla | fwd+bwd vs fla | note |"),
    "bench_flash": (  # --smoke: T=40 dense (causal and not), sparse at density 0.5, no peers
        ["--smoke", "--suites=dense,sparse"],
        {"meta", "rows"}, "rows", 2 * 2 + 2 * 2,  # dense: causal x mode; sparse: (1, 0.5) x mode
        lambda r: "error" not in r and r["ms"] > 0,
        "| suite | impl | mode | B | T | H | D |"),
    "bench_scaling": (  # n=1 runs once ("single"), n=2 once per strategy; MQAR needs T >= 32
        ["--devices=1,2", "--strategies=dp", "--steps=1", "--warmup=1", "--d_model=32",
         "--num_layers=1", "--num_heads=2", "--batch_size=4", "--seq_len=32"],
        {"environment", "results"}, "results", 2,
        lambda r: r["step_ms_median"] > 0,
        "| devices | strategy | mesh (data, fsdp, tensor) |"),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_bench_script_writes_results(script, tmp_path):
  args, top_keys, rows_key, num_rows, row_ok, md_header = CASES[script]
  out = tmp_path / script
  # tests/conftest.py has already put its CPU and XLA_FLAGS settings into os.environ.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", f"experiments.{script}", *args, f"--out={out}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  data = json.loads(pathlib.Path(f"{out}.json").read_text())
  assert set(data) == top_keys
  rows = data[rows_key]
  assert len(rows) == num_rows, rows
  bad = [r for r in rows if not row_ok(r)]
  assert not bad, bad
  md = pathlib.Path(f"{out}.md").read_text()
  assert md.startswith("# ") and md_header in md, md
