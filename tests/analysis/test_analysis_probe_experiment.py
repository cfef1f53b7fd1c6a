"""experiments/probe.py: the decoder-LM probes on an untrained tiny MQAR model, and end to end
(train the tiny preset, probe, write probes.json and the PNGs) for the ViT, the image + text
decoder and the encoder-decoder."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from configs import probe as probe_config
from experiments import guards, probe
from experiments import tasks as tasks_lib

_PNG = b"\x89PNG\r\n\x1a\n"


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


# base -> (kind figure, per-head metrics, scalar metrics in [0, 1] or [-1, 1])
_KINDS = {
    "digits": ("cls_attention.png", ("sink_mass", "entropy", "attention_distance", "cls_map_entropy",
                                     "head_importance"), ()),
    "digit_arith": ("answer_attention.png", ("modality_share", "visual_map_entropy", "vhd",
                                             "image_centric", "head_importance"),
                    ("accuracy", "vhr_accuracy", "var_accuracy", "sgl_accuracy", "sgl_random_accuracy")),
    "reverse": ("cross_attention.png", ("cross_head_alignment", "cross_entropy", "head_importance"),
                ("cross_alignment", "cross_pearson", "cross_spearman", "cross_explained")),
}


@pytest.mark.parametrize("base", sorted(_KINDS))
def test_probe_end_to_end_trains_and_writes_json_and_pngs(base, tmp_path):
  """The tiny preset trains (eval loss below the untrained model's), and the probe writes
  probes.json with every probe of its kind (finite numbers, per-head metrics [L, H]) and valid
  PNGs: one heat map per per-head metric plus the kind's map figure."""
  c = probe_config.get_config(f"{base},tiny")
  task = tasks_lib.make_task(c)
  init = float(nnx.jit(lambda m, b: task.loss(m, b)[0])(task.build_model(c, nnx.Rngs(c.seed)),
                                                          task.eval_batches[0]))
  out = probe.probe(c, str(tmp_path))
  with open(tmp_path / "probes.json") as f:
    js = json.load(f)
  assert js["kind"] == probe.TASK_KIND[base]
  assert js["train"]["final_eval"]["loss"] < 0.95 * init
  m = js["metrics"]
  assert set(probe.KIND_PROBES[js["kind"]]) - {"sgl_accuracy"} <= set(m)
  kind_fig, per_head, scalars = _KINDS[base]
  n_layers = len(m["attention_layers"]) if "attention_layers" in m else c.model.num_layers
  for name in per_head:
    rows = n_layers if name == "head_importance" else c.model.num_layers
    assert np.shape(m[name]) == (rows, c.model.num_heads), name
  for name, v in m.items():
    if name != "attention_layers":
      assert np.all(np.isfinite(np.asarray(v, float))), name
  for name in scalars:
    assert -1.0 <= m[name] <= 1.0, name
  names = sorted(os.path.basename(p) for p in out["figures"])
  assert names == sorted([f"{n}.png" for n in per_head] + [kind_fig])
  for p in out["figures"]:
    with open(p, "rb") as f:
      assert f.read(8) == _PNG and os.path.getsize(p) > 2000, p


def test_cross_probes_on_forced_reversal_alignment():
  """Cross-attention forced (weights transform) to reversal's alignment, target t -> source
  S - 1 - t, one-hot: alignment 1 for the mean map and every head, entropy 0; forced to the
  diagonal instead: alignment 0 (S even, so the diagonal never meets the anti-diagonal)."""
  import jax.numpy as jnp
  from attnjax.analysis import capture as cap
  c = probe_config.get_config("reverse,tiny")
  with c.unlocked():
    c.probe.probes = "cross_alignment,cross_head_alignment,cross_entropy"
  task = tasks_lib.make_task(c)
  model = task.build_model(c, nnx.Rngs(0))
  s_len = c.data.seq_len
  for eye, want in ((jnp.eye(s_len)[::-1], 1.0), (jnp.eye(s_len), 0.0)):
    fn = lambda a, eye=eye: jnp.broadcast_to(eye, a.shape)
    cap.set_weights_transform(model, [fn if "cross" in p else None for p, _ in cap.attention_layers(model)])
    m = probe.run_probes(model, task, c)
    assert m["cross_alignment"] == want
    np.testing.assert_array_equal(m["cross_head_alignment"], np.full((2, 2), want))
    np.testing.assert_allclose(m["cross_entropy"], 0.0, atol=1e-6)
  cap.set_weights_transform(model, None)


def test_inapplicable_probe_is_a_config_error_and_one_line_on_the_command_line(tmp_path):
  c = probe_config.get_config("digits,tiny")
  with c.unlocked():
    c.probe.probes = "sink_mass,vhd"
  with pytest.raises(guards.ConfigError, match=r"probe.probes=.*\['vhd'\] do not apply to a vit model"):
    probe.probe(c, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  p = subprocess.run([sys.executable, "-m", "experiments.probe", "--config=configs/probe.py:digits,tiny",
                      "--config.probe.num_batches=0", f"--workdir={tmp_path / 'w'}"], cwd=root,
                     capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]
  assert p.stderr.strip().splitlines() == [
      "error: config field probe.num_batches=0: must be an integer >= 1"]


def test_probe_runs_on_an_imported_hugging_face_checkpoint():
  """`probe.hf_path`: a local HF-layout checkpoint (the qwen2 test fixture: 2 layers, 4 heads,
  vocab 100) is loaded through `attnjax.models.hf_import` and probed on the config's batches."""
  import json as _json
  fixture = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hf", "qwen2")
  hf = _json.load(open(os.path.join(fixture, "config.json")))
  c = probe_config.get_config("mqar,tiny")
  c.probe.hf_path = fixture
  c.data.vocab_size = hf["vocab_size"]
  c.probe.num_batches = 1
  model, task, summary = probe.get_model(c, None)
  assert summary == {"hf_path": fixture}
  m = probe.run_probes(model, task, c)
  shape = (hf["num_hidden_layers"], hf["num_attention_heads"])
  assert np.shape(m["sink_mass"]) == shape and np.all(np.isfinite(m["sink_mass"]))
  assert 0.0 <= m["sink_rate"] <= 1.0
