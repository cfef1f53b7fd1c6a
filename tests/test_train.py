"""The trainer and the main job run end to end on a tiny config."""

import json
import os

from configs import mqar as mqar_config
from experiments import compare, trainer as train


def test_train_and_evaluate_writes_metrics(tmp_path):
  cfg = mqar_config.get_config("tiny")
  s = train.train_and_evaluate(cfg, str(tmp_path))
  assert s["params"] > 0 and s["steps_per_s"] > 0
  assert 0.0 <= s["final_eval"]["accuracy"] <= 1.0
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert any("eval_accuracy" in l for l in lines) and any("train_loss" in l for l in lines)
  assert os.path.exists(tmp_path / "summary.json")


def test_compare_writes_table_and_plot(tmp_path):
  cfg = mqar_config.get_config("tiny")
  with cfg.unlocked():
    cfg.train.steps = 4
    cfg.train.eval_every = 2
  results = compare.run(cfg, ["softmax", "sliding_window"], [], str(tmp_path))
  assert [r["mixer"] for r in results] == ["softmax", "sliding_window"]
  table = compare.markdown_table(results)
  assert "| softmax | 32 |" in table
  assert results[1]["state_floats"] < results[0]["state_floats"]  # a window remembers less
  compare.plot_state(results, str(tmp_path / "s.png"), "t")
  compare.plot(results, str(tmp_path / "p.png"), "t")
  assert (tmp_path / "p.png").stat().st_size > 1000
  # --collect rebuilds the same rows from the finished runs and skips the missing ones, without
  # generating the task's data.
  import pytest
  from experiments import tasks as tasks_lib
  mp = pytest.MonkeyPatch()
  mp.setattr(tasks_lib, "make_task", lambda c: (_ for _ in ()).throw(AssertionError("data built")))
  try:
    again = compare.collect(cfg, ["softmax", "gla", "sliding_window"], [], str(tmp_path))
  finally:
    mp.undo()
  assert [r["mixer"] for r in again] == ["softmax", "sliding_window"]
  for r, s in zip(again, results):
    assert (r["params"], r["state_floats"], r["accuracy"]) == (s["params"], s["state_floats"],
                                                               s["accuracy"])


def test_counting_decoding_state_leaves_the_model_untouched():
  import jax
  from flax import nnx
  from attnjax.models import DecoderLM
  lm = DecoderLM(vocab_size=16, d_model=16, num_layers=2, num_heads=2, mixer=["softmax", "gla"],
                 rngs=nnx.Rngs(0))
  before = jax.tree.map(lambda x: x, nnx.state(lm))
  assert compare.recurrent_state_floats(lm, 8) > 0
  after = nnx.state(lm)
  assert jax.tree.structure(after) == jax.tree.structure(before)
  assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))


def test_lr_sweep_configs_best_lr_table_and_the_zoology_guard():
  """`--lrs` / `--zoology`: one validated config per lr, the best lr per (mixer, width), and the
  zoology mode refuses a config that is not Zoology's setting."""
  import pytest
  from experiments import guards
  cfg = mqar_config.get_config("tiny")
  runs = compare.sweep_configs(cfg, ["softmax", "gla"], [], ["1e-3", "1e-2"])
  assert [(m, lr, c.optim.lr) for m, _, lr, c in runs] == [
      ("softmax", 1e-3, 1e-3), ("softmax", 1e-2, 1e-2), ("gla", 1e-3, 1e-3), ("gla", 1e-2, 1e-2)]
  assert [lr for _, _, lr, _ in compare.sweep_configs(cfg, ["softmax"], [], [])] == [None]
  with pytest.raises(guards.ConfigError, match="--lrs"):
    compare.sweep_configs(cfg, ["softmax"], [], ["-1e-3"])
  rows = [{"mixer": "gla", "d_model": 64, "lr": lr, "accuracy": a} for lr, a in ((1e-3, 0.2), (1e-2, 0.7), (3e-2, 0.5))]
  assert "| gla | 64 | 0.01 | 0.7000 |" in compare.best_lr_table(rows)
  assert len(compare.ZOOLOGY_LRS) == 4 and abs(compare.ZOOLOGY_LRS[1] - 10 ** (-4 + 2 / 3)) < 1e-7
  with pytest.raises(guards.ConfigError, match="--zoology"):
    compare.check_zoology(cfg)
  compare.check_zoology(mqar_config.get_config("zoology"))


def test_lm_task_on_packaged_text_learns(tmp_path):
  from configs import lm_tiny
  cfg = lm_tiny.get_config("tiny")
  s = train.train_and_evaluate(cfg, str(tmp_path))
  hist = s["history"]
  assert hist[-1]["loss"] < 0.85 * hist[0]["loss"]  # uniform over bytes is 5.55 nats


def test_vit_on_packaged_digits_learns(tmp_path):
  from configs import vit_digits
  s = train.train_and_evaluate(vit_digits.get_config("tiny"), str(tmp_path))
  assert s["history"][-1]["loss"] < 0.8 * s["history"][0]["loss"]  # uniform over 10 classes: 2.30


def test_digits_split_is_disjoint_and_reproducible():
  import numpy as np
  from attnjax.data import images
  xa, ya = images.load_digits("train", seed=3)
  xb, yb = images.load_digits("test", seed=3)
  assert xa.shape[1:] == (8, 8, 1) and len(xa) + len(xb) == 1797 and 0 <= xa.min() and xa.max() <= 1
  rows = {r.tobytes() for r in xa.reshape(len(xa), -1)}
  assert sum(r.tobytes() in rows for r in xb.reshape(len(xb), -1)) < 5  # a few digits repeat exactly
  np.testing.assert_array_equal(images.load_digits("train", seed=3)[1], ya)
  x16, _ = images.load_digits("test", seed=3, image_size=16)
  np.testing.assert_array_equal(x16[:, ::2, ::2], xb)


def test_lm_corpus_is_deterministic_and_local_path_errors(tmp_path):
  import pytest
  from attnjax.data import text
  a = text.load_corpus(max_bytes=10_000)
  assert len(a) == 10_000 and a.dtype.name == "uint8"
  with pytest.raises(ValueError, match="does not exist"):
    text.load_corpus(str(tmp_path / "missing.txt"))
  p = tmp_path / "c.txt"
  p.write_bytes(b"hello world " * 50)
  loader = text.WindowLoader(text.load_corpus(str(p)), 2, 8, seed=0)
  b1 = next(loader)
  loader.restore({"index": 0})
  assert (next(loader) == b1).all() and b1.shape == (2, 9)


def test_train_step_adds_sown_aux_losses():
  """MoH sows a load-balance loss; the train step captures it and reports it (softmax sows none)."""
  import jax
  import optax
  from flax import nnx
  from experiments import tasks as tasks_lib

  aux = {}
  for mixer in ("moh", "softmax"):
    cfg = mqar_config.get_config("tiny")
    with cfg.unlocked():
      cfg.model.mixer = mixer
    task = tasks_lib.make_task(cfg)
    graphdef, params, rest = nnx.split(task.build_model(cfg, nnx.Rngs(0)), nnx.Param, ...)
    tx = optax.sgd(0.0)
    train_step, _ = train.make_steps(graphdef, task, tx)
    *_, metrics, _ = train_step(params, rest, tx.init(params), next(task.train_loader),
                                train.init_guard(0))
    aux[mixer] = float(jax.device_get(metrics["aux_loss"]))
  # MoH's balance loss is aux_weight (0.01) x Hr sum_i f_i P_i per layer: positive, O(0.01).
  assert 0.0 < aux["moh"] < 1.0
  assert aux["softmax"] == 0.0
