"""Config rules, the one-line exit of the entry points, the workdir lock and the writable check.

Every field of every shipped config (and preset) has a rule in `guards.RULES`; the table below
breaks each rule once (and each cross-field rule) and checks that the error names the field.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from configs import (activator_digits, bam_lm, deconstructed_lm, digit_arith, graph_sbm, llamafusion_digits,
                     lm_tiny, mlm_mosaic_bert, mot_digits, mqar, mqar_sharded, ninformer_digits, patnet_digits,
                     probe, reverse, selective_copy, vit_digits)
from experiments import guards, trainer

_SHIPPED = {"mqar": mqar.get_config(), "mqar:tiny": mqar.get_config("tiny"),
            "lm_tiny": lm_tiny.get_config(), "lm_tiny:tiny": lm_tiny.get_config("tiny"),
            "mqar_sharded": mqar_sharded.get_config(), "mqar_sharded:tiny": mqar_sharded.get_config("tiny"),
            "vit_digits": vit_digits.get_config(), "vit_digits:tiny": vit_digits.get_config("tiny"),
            "digit_arith": digit_arith.get_config(), "digit_arith:tiny": digit_arith.get_config("tiny"),
            "reverse": reverse.get_config(), "reverse:tiny": reverse.get_config("tiny"),
            **{f"probe:{b}": probe.get_config(b) for b in ("lm", "mqar", "digits", "digit_arith", "reverse")},
            "probe:reverse,tiny": probe.get_config("reverse,tiny"),
            "mqar:zoology": mqar.get_config("zoology"),
            "selective_copy": selective_copy.get_config(), "selective_copy:tiny": selective_copy.get_config("tiny"),
            "mot_digits": mot_digits.get_config(), "mot_digits:tiny": mot_digits.get_config("tiny"),
            "bam_lm:dense": bam_lm.get_config("dense"), "bam_lm:dense_tiny": bam_lm.get_config("dense_tiny"),
            "llamafusion_digits:base": llamafusion_digits.get_config("base"),
            "llamafusion_digits:base_tiny": llamafusion_digits.get_config("base_tiny"),
            "ninformer_digits": ninformer_digits.get_config(),
            "activator_digits": activator_digits.get_config(),
            "patnet_digits": patnet_digits.get_config(), "patnet_digits:tiny": patnet_digits.get_config("tiny"),
            "deconstructed_lm:static": deconstructed_lm.get_config("static"),
            "deconstructed_lm:random_hybrid": deconstructed_lm.get_config("random_hybrid"),
            "mlm_mosaic_bert": mlm_mosaic_bert.get_config(), "mlm_mosaic_bert:tiny": mlm_mosaic_bert.get_config("tiny"),
            "graph_sbm": graph_sbm.get_config(), "graph_sbm:tiny": graph_sbm.get_config("tiny")}
# Configs that start from a trained run: shipped with model.base_workdir unset (checked below).
_FROM_BASE = {"bam_lm": lambda: bam_lm.get_config(), "bam_lm:tiny": lambda: bam_lm.get_config("tiny"),
              "llamafusion_digits": lambda: llamafusion_digits.get_config(),
              "llamafusion_digits:tiny": lambda: llamafusion_digits.get_config("tiny")}
_BASE = {"mqar": lambda: mqar.get_config("tiny").to_dict(),
         "lm": lambda: lm_tiny.get_config("tiny").to_dict(),
         "sharded": lambda: mqar_sharded.get_config("tiny").to_dict(),
         "digits": lambda: vit_digits.get_config("tiny").to_dict(),
         "arith": lambda: digit_arith.get_config("tiny").to_dict(),
         "reverse": lambda: reverse.get_config("tiny").to_dict(),
         "probe": lambda: probe.get_config("digits,tiny").to_dict(),
         "copy": lambda: selective_copy.get_config("tiny").to_dict(),
         "mot": lambda: mot_digits.get_config("tiny").to_dict(),
         "lf": lambda: llamafusion_digits.get_config("tiny").to_dict(),
         "bam": lambda: bam_lm.get_config("tiny").to_dict(),
         "mlm": lambda: mlm_mosaic_bert.get_config("tiny").to_dict(),
         "graph": lambda: graph_sbm.get_config("tiny").to_dict()}

# (base, field, bad value, words the rule must say). One row per rule in guards.RULES ...
_FIELD_CASES = [
    ("mqar", "seed", -1, ">= 0"), ("mqar", "task", "cls", "one of"),
    ("mqar", "data.vocab_size", 1, ">= 2"), ("mqar", "data.seq_len", 1, ">= 2"),
    ("mqar", "data.num_kv_pairs", 0, ">= 1"), ("copy", "data.num_tokens", 0, ">= 1"), ("mqar", "data.num_train", 0, ">= 1"),
    ("mqar", "data.num_test", 0, ">= 1"), ("mqar", "data.power_a", 0.0, "(0, 1]"),
    ("mqar", "data.random_non_queries", "yes", "True or False"),
    ("lm", "data.path", "/no/such/file.txt", "existing, non-empty file"),
    ("lm", "data.max_bytes", 1, ">= 2"), ("lm", "data.num_eval_batches", 0, ">= 1"),
    ("lm", "data.bos", 256, "[0, 256)"),
    ("mqar", "model.mixer", "sofmax", "registered mixer"),
    ("mqar", "model.mixer_options", 3, "mapping"),
    ("mqar", "model.layer_mixers", "softmax,nope", "comma-separated"),
    ("mqar", "model.d_model", 0, ">= 1"), ("mqar", "model.num_layers", 0, ">= 1"),
    ("mqar", "model.num_heads", 0, ">= 1"), ("mqar", "model.mlp_ratio", -1.0, ">= 0"),
    ("mqar", "model.short_conv", -1, ">= 0"), ("mqar", "model.pos_emb", "rope", "one of"),
    ("mqar", "model.attn_res", "half", "one of"), ("mqar", "model.attn_res_block_size", 0, ">= 1"),
    ("digits", "data.image_size", 12, "multiple of 8"), ("digits", "model.patch_size", 0, ">= 1"),
    ("digits", "model.pool", "max", "one of"), ("arith", "data.prompts_per_image", 0, ">= 1"),
    ("probe", "probe.checkpoint", "/no/such/dir", "existing checkpoint directory"),
    ("probe", "probe.hf_path", "/no/such/dir", "Hugging Face checkpoint directory"),
    ("probe", "probe.probes", "sink_mass,nope", "ALL_PROBES"), ("probe", "probe.num_batches", 0, ">= 1"),
    ("probe", "probe.sink_eps", 0.0, "(0, 1]"), ("probe", "probe.dormant_threshold", 1.5, "(0, 1]"),
    ("probe", "probe.act_threshold", -0.1, "(0, 1]"), ("probe", "probe.var_p", 1.1, "[0, 1]"),
    ("probe", "probe.vhr_top_k", -1, ">= 0"), ("probe", "probe.vhr_alpha", -1.0, ">= 0"),
    ("probe", "probe.sgl_keep_ratio", 2.0, "[0, 1]"), ("probe", "probe.num_examples", 0, ">= 1"),
    ("probe", "probe.figures", "yes", "True or False"),
    ("digits", "model.backbone", "cnn", "one of"),
    ("digits", "model.backbone_options", 3, "mapping"),
    ("mlm", "data.min_len", 0, ">= 1"), ("mlm", "data.packed_tokens", 0, ">= 1"),
    ("mlm", "data.mask_prob", 1.0, "(0, 1)"), ("mlm", "data.eval_mask_prob", 0.0, "(0, 1)"),
    ("mlm", "model.encoder", "bert", "one of"), ("mlm", "model.alibi", "yes", "one of"),
    ("mlm", "model.ln_dtype", "fp8", "one of"), ("mlm", "model.unpad", 1, "True or False"),
    ("graph", "data.min_nodes", 1, ">= 2"), ("graph", "data.max_nodes", 1, ">= 2"),
    ("graph", "data.num_classes", 1, ">= 2"), ("graph", "data.p_in", 1.5, "[0, 1]"),
    ("graph", "data.p_out", -0.1, "[0, 1]"), ("graph", "data.pe_dim", -1, ">= 0"),
    ("graph", "model.norm", "group", "one of"), ("graph", "model.edge_features", "no", "True or False"),
    ("graph", "model.score_clamp", 0.0, "> 0"),
    ("mqar", "optim.lr", -1e-3, "> 0"), ("mqar", "optim.warmup_steps", -1, ">= 0"),
    ("mqar", "optim.weight_decay", -0.1, ">= 0"), ("mqar", "optim.clip_norm", 0.0, "> 0"),
    ("mqar", "optim.b1", 1.0, "[0, 1)"), ("mqar", "optim.b2", -0.1, "[0, 1)"),
    ("mqar", "train.steps", 0, ">= 1"), ("mqar", "train.batch_size", 0, ">= 1"),
    ("mqar", "train.eval_every", 0, ">= 1"), ("mqar", "train.log_every", 0, ">= 1"),
    ("mqar", "train.progress", "no", "True or False"), ("mqar", "train.nonfinite", "ignore", "one of"),
    ("sharded", "mesh.data", 0, "-1"), ("sharded", "mesh.fsdp", -2, "-1"),
    ("sharded", "mesh.tensor", 1.5, "-1"), ("sharded", "mesh.sequence", 0, "-1"),
    ("sharded", "mesh_num_devices", 0, ">= 1"),
    ("sharded", "sharding_rules", [("embed", "model")], "mesh axis"),
    ("sharded", "checkpoint.every", -1, ">= 0"), ("sharded", "checkpoint.max_to_keep", 0, ">= 1"),
    ("sharded", "checkpoint.best_metric", "accuracy", "one of"),
    ("sharded", "checkpoint.best_mode", "largest", "one of"), ("sharded", "checkpoint.keep_best", 0, ">= 1"),
    ("sharded", "checkpoint.async_save", 1, "True or False"),
    ("sharded", "checkpoint.resume", "y", "True or False"),
    ("sharded", "checkpoint.save_on_sigterm", None, "True or False"),
    ("mot", "model.arch", "moe", "one of"), ("lf", "model.base_workdir", "/no/such/dir", "checkpoints/"),
    ("lf", "model.init_image", "zeros", "one of"), ("bam", "model.num_experts", 0, ">= 1"),
    ("bam", "model.top_k", 0, ">= 1"), ("bam", "model.shared_kv", "no", "True or False"),
    ("bam", "model.aux_weight", -1.0, ">= 0"), ("bam", "model.upcycle_noise", -0.1, ">= 0"),
]
# ... and one per cross-field rule: (base, {field: value}, field named, words).
_CROSS_CASES = [
    ("mqar", {"model.num_heads": 3}, "model.num_heads", "must divide model.d_model=32"),
    ("mqar", {"model.layer_mixers": "softmax"}, "model.layer_mixers", "must list model.num_layers=2"),
    ("mqar", {"data.seq_len": 33}, "data.seq_len", "even"),
    ("mqar", {"data.vocab_size": 32}, "data.vocab_size", "exceed data.seq_len=32"),
    ("mqar", {"data.num_kv_pairs": 9}, "data.num_kv_pairs", "<= data.seq_len / 4 = 8"),
    ("mqar", {"train.batch_size": 513}, "train.batch_size", "<= data.num_train=512"),
    ("lm", {"data.vocab_size": 255}, "data.vocab_size", ">= 256"),
    ("lm", {"data.max_bytes": 300}, "data.max_bytes", "held-out 5%"),
    ("sharded", {"mesh.data": -1}, "mesh", "at most one axis as -1"),
    ("digits", {"model.patch_size": 3}, "model.patch_size", "must divide data.image_size=8"),
    ("arith", {"model.patch_size": 3}, "model.patch_size", "must divide data.image_size=8"),
    ("reverse", {"data.vocab_size": 2}, "data.vocab_size", ">= 3 for reverse"),
    ("reverse", {"train.batch_size": 257}, "train.batch_size", "<= data.num_train=256"),
    ("copy", {"data.vocab_size": 2}, "data.vocab_size", ">= 3 for selective_copy"),
    ("copy", {"data.num_tokens": 13}, "data.num_tokens", "<= data.seq_len / 2 = 12"),
    ("copy", {"train.batch_size": 257}, "train.batch_size", "<= data.num_train=256"),
    ("mot", {"model.arch": "bam"}, "model.arch", "must be one of ['mot', 'llamafusion']"),
    ("lf", {}, "model.base_workdir", "is required for model.arch='llamafusion'"),
    ("bam", {"model.top_k": 5}, "model.top_k", "must be <= model.num_experts=2"),
    ("mot", {"data.vocab_size": 100}, "data.vocab_size", ">= 256 for digits_text"),
    ("mlm", {"data.min_len": 25}, "data.min_len", "<= data.seq_len=24"),
    ("mlm", {"data.packed_tokens": 63}, "data.packed_tokens", ">= train.batch_size * data.min_len = 64"),
    ("mlm", {"model.mixer": "linear", "model.alibi": True}, "model.alibi", "needs model.mixer='softmax'"),
    ("mlm", {"data.max_bytes": 300}, "data.max_bytes", "held-out 5%"),
    ("graph", {"model.mixer": "linear"}, "model.mixer", "must be 'softmax' for the graph task"),
    ("graph", {"data.min_nodes": 12}, "data.min_nodes", "must lie in [data.num_classes=4"),
    ("graph", {"train.batch_size": 65}, "train.batch_size", "<= data.num_train=64"),
    ("graph", {"model.d_model": 18, "model.num_heads": 2}, "model.d_model", "multiple of 4"),
]


def _set(d: dict, field: str, value):
  *path, last = field.split(".")
  for p in path:
    d = d.setdefault(p, {})
  d[last] = value


def test_every_field_of_every_shipped_config_has_a_rule_and_the_shipped_configs_pass():
  for name, cfg in _SHIPPED.items():
    missing = sorted(set(guards.flat_fields(cfg)) - set(guards.RULES))
    assert not missing, (name, missing)
    guards.validate(cfg)
  # The table breaks every rule.
  assert {f for _, f, _, _ in _FIELD_CASES} == set(guards.RULES)


def test_configs_that_start_from_a_trained_run_pass_once_it_is_named(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  for name, make in _FROM_BASE.items():
    cfg = make()
    assert not sorted(set(guards.flat_fields(cfg)) - set(guards.RULES)), name
    with cfg.unlocked():
      cfg.model.base_workdir = str(tmp_path)
    guards.validate(cfg)


@pytest.mark.parametrize("base,field,value,words", _FIELD_CASES, ids=[c[1] for c in _FIELD_CASES])
def test_each_field_rule_names_field_value_and_rule(base, field, value, words):
  cfg = _BASE[base]()
  _set(cfg, field, value)
  with pytest.raises(guards.ConfigError) as e:
    guards.validate(cfg)
  assert e.value.field == field and e.value.exit_code == 2
  assert str(e.value).startswith(f"config field {field}={value!r}: ") and words in str(e.value)


@pytest.mark.parametrize("base,values,field,words", _CROSS_CASES, ids=[c[2] + ":" + c[3][:12] for c in _CROSS_CASES])
def test_each_cross_field_rule(base, values, field, words):
  cfg = _BASE[base]()
  for k, v in values.items():
    _set(cfg, k, v)
  with pytest.raises(guards.ConfigError, match="config field " + field) as e:
    guards.validate(cfg)
  assert words in e.value.rule


def test_non_finite_and_boolean_numbers_break_numeric_rules():
  for field, value in [("optim.lr", float("nan")), ("optim.lr", float("inf")), ("train.steps", True),
                       ("train.steps", 2.0)]:
    cfg = _BASE["mqar"]()
    _set(cfg, field, value)
    with pytest.raises(guards.ConfigError, match=field):
      guards.validate(cfg)


def test_unknown_fields_and_presets_name_the_closest_known_one():
  cfg = _BASE["mqar"]()
  cfg["train"]["eval_evry"] = 5
  with pytest.raises(guards.UnknownFieldError, match=r"'train.eval_evry'; did you mean 'train.eval_every'"):
    guards.validate(cfg)
  cfg = _BASE["mqar"]()
  cfg["optimizer"] = {"lr": 1.0}
  with pytest.raises(guards.UnknownFieldError, match=r"unknown config field .optimizer.; did you mean .optim.\?"):
    guards.validate(cfg)
  # Override flags are checked against the loaded config file, with difflib's nearest name.
  assert guards._override_problem(["--config=configs/mqar.py:tiny", "--config.model.d_modle=3"]) == (
      "unknown config field 'model.d_modle'; did you mean 'model.d_model'?")
  assert guards._override_problem(["--config=configs/mqar.py", "--config.model.d_model=3"]) is None
  for module in (mqar, lm_tiny, mqar_sharded, vit_digits, digit_arith, reverse, selective_copy, mot_digits,
                 bam_lm, llamafusion_digits, mlm_mosaic_bert, graph_sbm):
    with pytest.raises(ValueError, match="unknown preset 'tinyy'"):
      module.get_config("tinyy")


def test_trainer_validates_before_building_anything(tmp_path, monkeypatch):
  monkeypatch.setattr(trainer.tasks_lib, "make_task", lambda c: pytest.fail("built before validating"))
  cfg = mqar.get_config("tiny")
  with cfg.unlocked():
    cfg.train.eval_every = 0
  with pytest.raises(guards.ConfigError, match=r"train.eval_every=0: must be an integer >= 1"):
    trainer.train_and_evaluate(cfg, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_mixer_options_are_checked_by_the_mixer_builder(tmp_path):
  cfg = mqar.get_config("tiny")
  with cfg.unlocked():
    cfg.model.mixer = "sliding_window"
    cfg.model.mixer_options.windw = 3
  with pytest.raises(guards.ConfigError, match=r"model.mixer_options=\{'windw': 3\}: rejected by the "
                                               r"mixer: .*windw"):
    trainer.train_and_evaluate(cfg, str(tmp_path))


def test_entry_point_prints_one_line_and_exits_2_without_traceback(tmp_path):
  """An unknown field fails inside absl's flag parsing (it used to end in an AttributeError
  traceback); `experiments.train` prints one line and exits 2. A new mixer option before it is
  accepted (README's `--config.model.mixer_options.window=32`; the locked config refused it).
  Rule errors take the `exit_on_run_error` path, checked in-process below."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  p = subprocess.run([sys.executable, "-m", "experiments.train", "--config=configs/mqar.py:tiny",
                      "--config.model.mixer_options.window=32", "--config.model.d_modle=3", f"--workdir={tmp_path / 'w'}"], cwd=root,
                     capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                     timeout=300)
  assert p.returncode == 2, p.stderr[-2000:]
  assert p.stderr.strip().splitlines() == [
      "error: unknown config field 'model.d_modle'; did you mean 'model.d_model'?"]
  assert "Traceback" not in p.stdout and not (tmp_path / "w").exists()


def test_run_errors_become_one_line_and_their_exit_code(capsys):
  cfg = mqar.get_config("tiny")
  with cfg.unlocked():
    cfg.model.d_model = 0
  with pytest.raises(SystemExit) as e:
    guards.exit_on_run_error(lambda: guards.validate(cfg))
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: config field model.d_model=0: must be an integer >= 1\n"

  def boom():
    raise trainer.NonFiniteError("non-finite loss at step 3: training stopped")
  with pytest.raises(SystemExit) as e:
    guards.exit_on_run_error(boom)
  assert e.value.code == 1
  assert capsys.readouterr().err == "error: non-finite loss at step 3: training stopped\n"


# ----------------------------------------------------------------------------------------------
# Workdir lock and writable check
# ----------------------------------------------------------------------------------------------

def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
  wd = str(tmp_path)
  lock = os.path.join(wd, guards.LOCK_NAME)
  with guards.workdir_lock(wd):
    held = json.load(open(lock))
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    # A second run on the workdir (here: the same live process) is refused, naming the holder.
    with pytest.raises(guards.LockError, match=rf"in use by pid {os.getpid()} on host "):
      with guards.workdir_lock(wd):
        pass
    with pytest.raises(guards.LockError, match="in use by pid"):
      trainer.train_and_evaluate(mqar.get_config("tiny"), wd)
  assert not os.path.exists(lock)  # released on exit
  # A lock left by a killed run (dead pid) is taken over with a warning.
  json.dump({"pid": _dead_pid(), "host": socket.gethostname()}, open(lock, "w"))
  with pytest.warns(RuntimeWarning, match="taking over the stale lock"):
    with guards.workdir_lock(wd):
      assert json.load(open(lock))["pid"] == os.getpid()
  # A live pid whose start time differs is a reused pid, hence stale too.
  json.dump({"pid": os.getpid(), "host": socket.gethostname(), "start_time": "1"}, open(lock, "w"))
  with pytest.warns(RuntimeWarning, match="stale lock"):
    with guards.workdir_lock(wd):
      pass


def test_unwritable_workdir_is_one_error_before_anything_is_built(tmp_path, monkeypatch):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(guards.DiskError, match="is not writable"):
    guards.check_writable(str(blocker / "wd"))  # a path under a regular file
  # Read-only (root ignores permission bits, so the write itself is made to fail).
  import builtins
  real_open = builtins.open

  def read_only(path, mode="r", *a, **k):
    if "w" in mode and str(path).startswith(str(tmp_path / "ro")):
      raise PermissionError(13, "Permission denied")
    return real_open(path, mode, *a, **k)

  monkeypatch.setattr(builtins, "open", read_only)
  monkeypatch.setattr(trainer.tasks_lib, "make_task", lambda c: pytest.fail("built before the check"))
  with pytest.raises(guards.DiskError, match=r"workdir '.*ro' is not writable: Permission denied"):
    trainer.train_and_evaluate(mqar.get_config("tiny"), str(tmp_path / "ro"))


def test_every_shipped_config_rejects_an_unknown_preset():
  import importlib
  import pkgutil
  import configs
  names = [m.name for m in pkgutil.iter_modules(configs.__path__)]
  assert len(names) > 20
  for name in names:
    mod = importlib.import_module(f"configs.{name}")
    with pytest.raises(ValueError, match="zz_no_such_preset"):
      mod.get_config("zz_no_such_preset")
