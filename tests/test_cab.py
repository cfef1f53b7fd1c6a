"""The CAB suite (`experiments/cab.py`): the tiny preset end to end (tables, plots, finite JSON,
the observed pattern table equal to the declarations), that a pattern cell catches a mixer that
reads later tokens, and the efficiency part's memory and time limits."""

import json
import os

import jax.numpy as jnp
import pytest

from attnjax import registry
from configs import cab as cab_config
from experiments import cab


def _finite_json(path):
  def bad(c):
    raise AssertionError(f"{path}: non-finite number {c}")
  with open(path) as f:
    return json.load(f, parse_constant=bad)


@pytest.mark.slow
def test_tiny_preset_end_to_end(tmp_path):
  bench = tmp_path / "bench"
  cfg = cab_config.get_config("tiny")
  cfg.quality.tasks.unknown = cab_config._entry("no_such_task", "configs/mqar.py:tiny", "softmax")
  out = cab.run_suite(cfg, str(tmp_path / "w"), record=True, bench_dir=str(bench))
  for d, suffix in ((tmp_path / "w", ""), (bench, "_cpu")):
    for part in ("efficiency", "quality"):
      for ext in (".md", ".json", ".png"):
        assert os.path.getsize(d / f"cab_{part}{suffix}{ext}") > 0, (d, part, ext)
  assert os.path.getsize(tmp_path / "w" / "cab_patterns.md") > 0
  assert not (bench / "cab_patterns.md").exists(), "a subset of mixers must not overwrite the full table"
  for name in ("cab_patterns", "cab_efficiency", "cab_quality"):
    _finite_json(tmp_path / "w" / f"{name}.json")

  # Patterns: what each cell did equals the registry's declarations, and the markdown says so.
  names = [r["mixer"] for r in out["patterns"]]
  declared = [r for r in registry.pattern_table() if r["mixer"] in names]
  assert cab.observed_table(out["patterns"]) == sorted(declared, key=lambda r: names.index(r["mixer"]))
  assert not out["pattern_failures"] and "FAIL" not in (tmp_path / "w" / "cab_patterns.md").read_text()
  # Efficiency: every cell of the tiny grid ran, with a time and a compiled peak.
  assert {(r["mixer"], r["T"], r["mode"]) for r in out["efficiency"] if r["status"] == "ok"} == {
      ("linear", t, mode) for t in (32, 64) for mode in ("fwd", "fwd_bwd")}
  assert all(r["ms"] > 0 and r["peak_bytes"] > 0 for r in out["efficiency"])
  # Quality: the registered task trained; the unregistered one and the pattern-less mixer are skipped.
  q = {(r["entry"], r["mixer"]): r for r in out["quality"]}
  assert q["selective_copy", "softmax"]["status"] == "ok" and 0 <= q["selective_copy", "softmax"]["accuracy"] <= 1
  assert q["mlm", "softmax"]["status"] == "ok" and 0 <= q["mlm", "softmax"]["accuracy"] <= 1
  assert q["unknown", "softmax"]["status"] == "skipped" and "not registered" in q["unknown", "softmax"]["note"]
  assert q["digits", "softmax"]["status"] == "ok" and 0 <= q["digits", "softmax"]["accuracy"] <= 1
  assert q["digits", "gla"]["status"] == "skipped" and "'self'" in q["digits", "gla"]["note"]


def test_pattern_cells_catch_a_leak_inside_the_sequence_and_a_wrong_declaration(monkeypatch):
  ok = cab.check_cell("softmax", "causal_self")
  assert ok["outcome"] == "defined", ok
  real = registry.build_mixer
  # softmax built non-causal whatever it is asked: token 9 of 12 reaches outputs 0..8.
  monkeypatch.setattr(registry, "build_mixer", lambda name, **kw: real(name, **{**kw, "causal": False}))
  leak = cab.check_cell("softmax", "causal_self")
  assert leak["outcome"] == "error" and "not causal" in leak["detail"], leak
  monkeypatch.setattr(registry, "build_mixer", real)
  # A declaration that says softmax has no cross form disagrees with what the cell does.
  table = registry.pattern_table()
  monkeypatch.setattr(registry, "pattern_table",
                      lambda: [dict(r, cross=False) if r["mixer"] == "softmax" else r for r in table])
  row, = cab.run_patterns(["softmax"])
  assert not row["agrees"] and "| FAIL |" in cab.patterns_markdown([row])


def test_efficiency_skips_cells_over_the_memory_and_time_limits():
  kw = dict(d_model=16, num_heads=2, repeats=1, warmup=0)
  timed = cab.measure_mixer("softmax", [16, 32], time_limit_s=1e-9, **kw)
  assert [r["status"] for r in timed] == ["ok", "skipped"] * 2, timed
  assert "predicted" in timed[1]["note"] and "time_limit_s" in timed[1]["note"]
  slow_compile = cab.measure_mixer("softmax", [16, 32], compile_limit_s=1e-9, **kw)
  assert [r["status"] for r in slow_compile] == ["ok", "skipped"] * 2, slow_compile
  assert "compile_limit_s" in slow_compile[1]["note"]
  big = cab.measure_mixer("softmax", [16, 32], max_gib=1e-12, **kw)
  assert [r["status"] for r in big] == ["skipped"] * 4 and all("compiled peak" in r["note"] for r in big), big
