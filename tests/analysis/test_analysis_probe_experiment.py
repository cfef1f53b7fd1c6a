"""Smoke test of experiments/probe.py on an untrained tiny MQAR model (no training run)."""

import json
import os

import numpy as np
from flax import nnx

from configs import probe as probe_config
from experiments import probe
from experiments import tasks as tasks_lib


def test_run_probes_and_figures(tmp_path):
  c = probe_config.get_config("mqar,tiny")
  c.probe.num_batches = 1
  task = tasks_lib.make_task(c)
  model = task.build_model(c, nnx.Rngs(0))
  m = probe.run_probes(model, task, c)
  assert set(m) == set(probe.PROBES)
  shape = (c.model.num_layers, c.model.num_heads)
  for name in ("sink_mass", "entropy", "head_importance", "key_mass_first", "value_drain"):
    assert np.shape(m[name]) == shape, name
  # The streamed key mass of token 0 (per query) is the explicit sink mass.
  np.testing.assert_allclose(m["key_mass_first"], m["sink_mass"], rtol=1e-4, atol=1e-6)
  assert 0.0 <= m["sink_rate"] <= 1.0
  assert np.all(np.asarray(m["entropy"]) <= 1.0 + 1e-6)    # fraction of log T
  paths = probe.write_figures({k: m[k] for k in ("sink_mass", "sink_rate")}, str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ["sink_mass.png"] and os.path.getsize(paths[0]) > 0
  json.dumps(m)
