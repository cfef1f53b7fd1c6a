"""Run guards for `experiments.train` / `experiments.compare`: config rules, the one-line exit, the
workdir lock and the writable check.

`validate(config)` checks every field of every shipped config (`configs/*.py`) against one rule in
`RULES` plus the cross-field rules of `_cross_checks`, before anything is built, and raises a
`ConfigError` naming the field, the value and the rule. Fields outside `RULES` are reported with
the closest known name (difflib). The entry points turn a `RunError` into one line on stderr and a
non-zero exit (`exit_on_run_error`, `parse_flags`), absl's usage-error convention without the
traceback: 2 for bad input, 1 for a run that had to stop.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import errno
import importlib.util
import json
import math
import os
import socket
import sys
import warnings
from typing import Any, Callable

from absl import flags, logging


class RunError(Exception):
  """A run that cannot start or has to stop; the entry points print it as one line."""
  exit_code = 1


class ConfigError(RunError, ValueError):
  """A config field breaks its rule (a ValueError, so callers of the trainer may catch either)."""
  exit_code = 2

  def __init__(self, field: str, value: Any, rule: str):
    self.field, self.value, self.rule = field, value, rule
    super().__init__(f"config field {field}={value!r}: {rule}")


class UnknownFieldError(ConfigError):
  def __init__(self, field: str, known: list[str]):
    close = difflib.get_close_matches(field, known, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    self.field, self.value, self.rule = field, None, "unknown field" + hint
    RunError.__init__(self, f"unknown config field {field!r}{hint}")


class ResumeMismatch(RunError, ValueError):
  """The workdir's checkpoint is of another model config (shapes or parameter names differ)."""
  exit_code = 2


class LockError(RunError):
  pass


class DiskError(RunError):
  pass


# ----------------------------------------------------------------------------------------------
# Per-field rules
# ----------------------------------------------------------------------------------------------

def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(lo: int):
  return (lambda v: _is_int(v) and v >= lo), f"must be an integer >= {lo}"


def _num(pred, text):
  return (lambda v: _is_num(v) and pred(v)), f"must be a finite number {text}"


def _one_of(*names):
  return (lambda v: v in names), f"must be one of {list(names)}"


def _optional(rule):
  pred, text = rule
  return (lambda v: v is None or pred(v)), f"{text} (or None)"


_BOOL = ((lambda v: isinstance(v, bool)), "must be True or False")


def _mixer_names() -> list[str]:
  from attnjax.registry import list_mixers
  return sorted(list_mixers())


def _known_mixer(v) -> bool:
  return isinstance(v, str) and v in _mixer_names()


def _layer_mixers_ok(v) -> bool:
  if v is None or v == "":
    return True
  names = [s.strip() for s in str(v).split(",") if s.strip()]
  return bool(names) and all(n in _mixer_names() for n in names)


def _mapping(v) -> bool:
  return hasattr(v, "keys") and hasattr(v, "items")


def _existing_file(v) -> bool:
  return v is None or (isinstance(v, str) and os.path.isfile(v) and os.path.getsize(v) > 0)


def _probe_names_ok(v) -> bool:
  from experiments.probe import ALL_PROBES
  names = [s.strip() for s in str(v).split(",") if s.strip()] if isinstance(v, str) else []
  return bool(names) and all(n in ALL_PROBES for n in names)


def _rules_ok(v) -> bool:
  from attnjax.distributed.sharding import MESH_AXES
  try:
    return v is None or all(len(r) == 2 and isinstance(r[0], str) and
                            (r[1] is None or r[1] in MESH_AXES) for r in v)
  except TypeError:
    return False


_MESH_SIZE = ((lambda v: _is_int(v) and (v >= 1 or v == -1)), "must be an integer >= 1, or -1 (the rest)")
EVAL_METRICS = ("eval_accuracy", "eval_aux_loss", "eval_loss")
TASKS = ("digit_arith", "digits", "digits_text", "graph", "lm", "mlm", "mqar", "reverse", "selective_copy")
# model.arch per task (the first is the default when the field is absent).
ARCHS = {"lm": ("decoder", "parallel", "bam"), "digits_text": ("mot", "llamafusion")}


def _base_workdir_ok(v) -> bool:
  return v is None or (isinstance(v, str) and os.path.isdir(os.path.join(v, "checkpoints")))
NONFINITE_MODES = ("stop", "skip")

# field -> (predicate, rule text). Every leaf of every shipped config is here (tested).
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": _int_at_least(0),
    "task": _one_of(*TASKS),
    "data.vocab_size": _int_at_least(2),
    "data.seq_len": _int_at_least(2),
    "data.num_kv_pairs": _int_at_least(1),
    "data.num_tokens": _int_at_least(1),
    "data.num_train": _int_at_least(1),
    "data.num_test": _int_at_least(1),
    "data.power_a": _num(lambda v: 0 < v <= 1, "in (0, 1]"),
    "data.random_non_queries": _BOOL,
    "data.path": (_existing_file, "must name an existing, non-empty file (or None: packaged text)"),
    "data.max_bytes": _optional(_int_at_least(2)),
    "data.num_eval_batches": _int_at_least(1),
    "data.bos": (lambda v: v is None or (_is_int(v) and 0 <= v < 256),
                 "must be None or a byte id in [0, 256) put at position 0 of every window"),
    "data.image_size": (lambda v: _is_int(v) and v >= 8 and v % 8 == 0, "must be a multiple of 8"),
    "data.prompts_per_image": _int_at_least(1),
    "data.min_len": _int_at_least(1),
    "data.packed_tokens": _optional(_int_at_least(1)),
    "data.mask_prob": _num(lambda v: 0 < v < 1, "in (0, 1)"),
    "data.eval_mask_prob": _num(lambda v: 0 < v < 1, "in (0, 1)"),
    "data.min_nodes": _int_at_least(2),
    "data.max_nodes": _int_at_least(2),
    "data.num_classes": _int_at_least(2),
    "data.p_in": _num(lambda v: 0 <= v <= 1, "in [0, 1]"),
    "data.p_out": _num(lambda v: 0 <= v <= 1, "in [0, 1]"),
    "data.pe_dim": _int_at_least(0),
    "model.encoder": _one_of("mosaic_bert"),
    "model.alibi": _one_of(None, True, False),
    "model.ln_dtype": _one_of("float32", "bfloat16"),
    "model.unpad": _BOOL,
    "model.norm": _one_of("batch", "layer"),
    "model.edge_features": _BOOL,
    "model.score_clamp": _optional(_num(lambda v: v > 0, "> 0")),
    "model.mixer": (_known_mixer, "must be a registered mixer (attnjax.registry.list_mixers())"),
    "model.mixer_options": (_mapping, "must be a mapping of keyword arguments for the mixer"),
    "model.layer_mixers": (_layer_mixers_ok, "must be None or a comma-separated list of registered mixers"),
    "model.d_model": _int_at_least(1),
    "model.num_layers": _int_at_least(1),
    "model.num_heads": _int_at_least(1),
    "model.mlp_ratio": _num(lambda v: v >= 0, ">= 0 (0: no MLP)"),
    "model.short_conv": _int_at_least(0),
    "model.pos_emb": _one_of("none", "learned"),
    "model.attn_res": _one_of(None, "full", "block", "delta"),
    "model.attn_res_block_size": _int_at_least(1),
    "model.patch_size": _int_at_least(1),
    "model.pool": _one_of("cls", "mean", "ep", "lama"),
    "model.arch": _one_of("decoder", "parallel", "bam", "mot", "llamafusion"),
    "model.base_workdir": (_base_workdir_ok, "must be None or a workdir holding checkpoints/ "
                           "(a finished run with checkpoint.every > 0)"),
    "model.init_image": _one_of("copy", "random"),
    "model.num_experts": _int_at_least(1),
    "model.top_k": _int_at_least(1),
    "model.shared_kv": _BOOL,
    "model.aux_weight": _num(lambda v: v >= 0, ">= 0"),
    "model.upcycle_noise": _num(lambda v: v >= 0, ">= 0"),
    "model.backbone": _one_of("vit", "patnet"),
    "model.backbone_options": (_mapping, "must be a mapping of keyword arguments for the backbone"),
    "optim.lr": _num(lambda v: v > 0, "> 0"),
    "optim.warmup_steps": _int_at_least(0),
    "optim.weight_decay": _num(lambda v: v >= 0, ">= 0"),
    "optim.clip_norm": _num(lambda v: v > 0, "> 0"),
    "optim.b1": _num(lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.b2": _num(lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.steps": _int_at_least(1),
    "train.batch_size": _int_at_least(1),
    "train.eval_every": _int_at_least(1),
    "train.log_every": _int_at_least(1),
    "train.progress": _BOOL,
    "train.nonfinite": _one_of(*NONFINITE_MODES),
    "mesh.data": _MESH_SIZE,
    "mesh.fsdp": _MESH_SIZE,
    "mesh.tensor": _MESH_SIZE,
    "mesh.sequence": _MESH_SIZE,
    "mesh_num_devices": _optional(_int_at_least(1)),
    "sharding_rules": (_rules_ok, "must be None or (logical name, mesh axis or None) pairs"),
    "checkpoint.every": _int_at_least(0),
    "checkpoint.max_to_keep": _int_at_least(1),
    "checkpoint.best_metric": _one_of(None, *EVAL_METRICS),
    "checkpoint.best_mode": _one_of("max", "min"),
    "checkpoint.keep_best": _int_at_least(1),
    "checkpoint.async_save": _BOOL,
    "checkpoint.resume": _BOOL,
    "checkpoint.save_on_sigterm": _BOOL,
    # experiments.probe (configs/probe.py)
    "probe.checkpoint": (lambda v: v is None or (isinstance(v, str) and os.path.isdir(v)),
                         "must name an existing checkpoint directory (or None: train now)"),
    "probe.hf_path": (lambda v: v is None or (isinstance(v, str) and os.path.isdir(v)),
                      "must name an existing Hugging Face checkpoint directory (or None)"),
    "probe.probes": (_probe_names_ok, "must be a comma-separated list of experiments.probe.ALL_PROBES"),
    "probe.num_batches": _int_at_least(1),
    "probe.sink_eps": _num(lambda v: 0 < v <= 1, "in (0, 1]"),
    "probe.dormant_threshold": _num(lambda v: 0 < v <= 1, "in (0, 1]"),
    "probe.act_threshold": _num(lambda v: 0 < v <= 1, "in (0, 1]"),
    "probe.var_p": _num(lambda v: 0 <= v <= 1, "in [0, 1]"),
    "probe.vhr_top_k": _int_at_least(0),
    "probe.vhr_alpha": _num(lambda v: v >= 0, ">= 0"),
    "probe.sgl_keep_ratio": _num(lambda v: 0 <= v <= 1, "in [0, 1]"),
    "probe.num_examples": _int_at_least(1),
    "probe.figures": _BOOL,
}
# Values checked whole, not walked into.
_OPAQUE = ("model.mixer_options", "model.backbone_options", "sharding_rules")
_GROUPS = {f.split(".")[0] for f in RULES if "." in f}


def flat_fields(config) -> dict[str, Any]:
  """`{"model.d_model": 64, ...}`: the leaves of a (nested) ConfigDict or dict."""
  out: dict[str, Any] = {}

  def walk(prefix, node):
    for k in node.keys():
      name = f"{prefix}{k}"
      v = node[k]
      if name not in _OPAQUE and _mapping(v) and (name in _GROUPS or name == "mesh"):
        if name == "mesh" and not v.keys():
          out[name] = v
        walk(name + ".", v)
      else:
        out[name] = v
  walk("", config)
  return out


def _get(fields, name, default=None):
  return fields.get(name, default)


def _cross_checks(f: dict[str, Any]) -> None:
  """Rules between fields (each field is known to pass its own rule)."""
  def fail(field, rule):
    raise ConfigError(field, f[field], rule)

  if f["model.d_model"] % f["model.num_heads"]:
    fail("model.num_heads", f"must divide model.d_model={f['model.d_model']}")
  lm = f.get("model.layer_mixers")
  if lm:
    n = len([s for s in str(lm).split(",") if s.strip()])
    if n != f["model.num_layers"]:
      fail("model.layer_mixers", f"lists {n} mixers; must list model.num_layers={f['model.num_layers']}")
  seq, vocab, bs = f.get("data.seq_len"), f.get("data.vocab_size"), f["train.batch_size"]
  if f["task"] in ("digits", "digit_arith", "digits_text"):
    if f["data.image_size"] % f["model.patch_size"]:
      fail("model.patch_size", f"must divide data.image_size={f['data.image_size']}")
  archs = ARCHS.get(f["task"], ("decoder",))  # a task not listed builds its one model
  arch = f.get("model.arch", archs[0])
  if arch not in archs:
    fail("model.arch", f"must be one of {list(archs)} for task {f['task']!r}")
  if arch == "bam" and f.get("model.top_k", 2) > f.get("model.num_experts", 1):
    fail("model.top_k", f"must be <= model.num_experts={f.get('model.num_experts', 1)}")
  if arch in ("bam", "llamafusion") and f.get("model.base_workdir") is None:
    fail("model.base_workdir", f"is required for model.arch={arch!r} (the trained run to start from)")
  if f["task"] == "digits_text" and vocab < 256:
    fail("data.vocab_size", "must be >= 256 for digits_text (the label is a byte)")
  if f["task"] == "mqar":
    kv = f["data.num_kv_pairs"]
    if seq % 2:
      fail("data.seq_len", "must be even for mqar (key-value pairs, then queries)")
    if vocab <= seq:
      fail("data.vocab_size", f"must exceed data.seq_len={seq} for mqar")
    if 4 * kv > seq:
      fail("data.num_kv_pairs", f"must be <= data.seq_len / 4 = {seq // 4}")
    if bs > f["data.num_train"]:
      fail("train.batch_size", f"must be <= data.num_train={f['data.num_train']}")
  elif f["task"] == "reverse":
    if vocab < 3:
      fail("data.vocab_size", "must be >= 3 for reverse (BOS and at least two symbols)")
    if bs > f["data.num_train"]:
      fail("train.batch_size", f"must be <= data.num_train={f['data.num_train']}")
  elif f["task"] == "selective_copy":
    if vocab < 3:
      fail("data.vocab_size", "must be >= 3 for selective_copy (noise, data tokens, marker)")
    if seq < 2 * f["data.num_tokens"]:
      fail("data.num_tokens", f"must be <= data.seq_len / 2 = {seq // 2} (data tokens plus their markers)")
    if bs > f["data.num_train"]:
      fail("train.batch_size", f"must be <= data.num_train={f['data.num_train']}")
  elif f["task"] == "lm":
    if vocab < 256:
      fail("data.vocab_size", "must be >= 256 for the byte-level lm task")
    mb = f.get("data.max_bytes")
    if mb is not None and mb - int(mb * 0.95) < seq + 1:
      fail("data.max_bytes", f"must leave a held-out 5% of at least data.seq_len + 1 = {seq + 1} bytes")
  elif f["task"] == "mlm":
    if f["data.min_len"] > seq:
      fail("data.min_len", f"must be <= data.seq_len={seq}")
    pt = f.get("data.packed_tokens")
    if pt is not None and pt < bs * f["data.min_len"]:
      fail("data.packed_tokens", f"must be >= train.batch_size * data.min_len = {bs * f['data.min_len']}")
    if f.get("model.alibi") and f["model.mixer"] != "softmax":
      fail("model.alibi", f"True needs model.mixer='softmax' (ALiBi biases softmax scores), got {f['model.mixer']!r}")
    mb = f.get("data.max_bytes")
    if mb is not None and mb - int(mb * 0.95) < seq + 1:
      fail("data.max_bytes", f"must leave a held-out 5% of at least data.seq_len + 1 = {seq + 1} bytes")
  elif f["task"] == "graph":
    if f["model.mixer"] != "softmax":
      fail("model.mixer", "must be 'softmax' for the graph task (the Graph Transformer's neighbour softmax)")
    if not f["data.num_classes"] <= f["data.min_nodes"] <= f["data.max_nodes"]:
      fail("data.min_nodes", f"must lie in [data.num_classes={f['data.num_classes']}, "
                             f"data.max_nodes={f['data.max_nodes']}]")
    if bs > f["data.num_train"]:
      fail("train.batch_size", f"must be <= data.num_train={f['data.num_train']}")
    if f["model.d_model"] % 4:
      fail("model.d_model", "must be a multiple of 4 for the graph task (the readout halves it twice)")
  mesh = {k.split(".", 1)[1]: v for k, v in f.items() if k.startswith("mesh.")}
  if sum(v == -1 for v in mesh.values()) > 1:
    raise ConfigError("mesh", mesh, "may leave at most one axis as -1")


def validate(config) -> None:
  """Raises `ConfigError` for the first field that breaks its rule (or an unknown field)."""
  fields = flat_fields(config)
  known = sorted(RULES) + sorted(_GROUPS)
  for name, value in fields.items():
    if name == "mesh":
      continue  # an empty mesh mapping: data parallel over every device
    if name not in RULES:
      raise UnknownFieldError(name, known)
    pred, rule = RULES[name]
    try:
      ok = bool(pred(value))
    except Exception:  # a value of a type the predicate does not handle
      ok = False
    if not ok:
      raise ConfigError(name, value, rule)
  for required in ("seed", "task", "model.mixer", "model.d_model",
                   "model.num_layers", "model.num_heads", "optim.lr", "train.steps", "train.batch_size",
                   "train.eval_every", "train.log_every"):
    if required not in fields:
      raise ConfigError(required, None, "is required")
  task_fields = {"mqar": ("data.vocab_size", "data.seq_len", "data.num_kv_pairs", "data.num_train",
                          "data.num_test"),
                 "lm": ("data.vocab_size", "data.seq_len", "data.num_eval_batches"),
                 "selective_copy": ("data.vocab_size", "data.seq_len", "data.num_tokens", "data.num_train",
                                    "data.num_test"),
                 "digits": ("data.image_size", "model.patch_size"),
                 "digit_arith": ("data.image_size", "data.prompts_per_image", "model.patch_size"),
                 "reverse": ("data.vocab_size", "data.seq_len", "data.num_train", "data.num_test"),
                 "digits_text": ("data.image_size", "data.vocab_size", "model.patch_size",
                                 "model.arch"),
                 "mlm": ("data.seq_len", "data.min_len", "data.mask_prob", "data.eval_mask_prob",
                         "data.num_eval_batches"),
                 "graph": ("data.num_train", "data.num_test", "data.min_nodes", "data.max_nodes",
                           "data.num_classes", "data.p_in", "data.p_out", "data.pe_dim", "model.norm",
                           "model.edge_features")}[fields["task"]]
  for required in task_fields:
    if required not in fields:
      raise ConfigError(required, None, f"is required for task {fields['task']!r}")
  _cross_checks(fields)


# ----------------------------------------------------------------------------------------------
# Entry points: one line, non-zero exit, no traceback
# ----------------------------------------------------------------------------------------------

def _fail(message: str, code: int) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _override_problem(argv: list[str]) -> str | None:
  """For `--config=path[:preset]` plus `--config.a.b=v` flags: the first override naming no field
  of the loaded config, with the closest known name; None when all exist (or no config loads)."""
  cfg_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if not cfg_arg:
    return None
  path, _, preset = cfg_arg.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_config_for_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(preset) if preset else mod.get_config()
  except Exception:
    return None
  known = sorted(flat_fields(cfg))
  for a in argv:
    if a.startswith("--config.") and "=" in a:
      name = a[len("--config."):].split("=", 1)[0]
      node, ok = cfg, True
      for part in name.split("."):
        if _mapping(node) and part in node.keys():
          node = node[part]
        else:
          ok = False
          break
      if not ok:
        return str(UnknownFieldError(name, known))
  return None


def _last_line(text: str) -> str:
  lines = [l.strip() for l in str(text).splitlines() if l.strip() and not l.strip().startswith("Pass --help")]
  return lines[-1] if lines else str(text)


_FREE_FORM = "--config.model.mixer_options."  # each mixer has its own options: new keys allowed


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string such as a mode name


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run(main, flags_parser=parse_flags)`: flag and config-file errors (an unknown field, an
  unknown preset, a missing config file, a value of the wrong type) become one line and exit 2
  instead of a traceback. `--config.model.mixer_options.<name>=<value>` may add options the
  config does not list (the locked config would refuse them); the mixer's builder checks them."""
  free = [a for a in argv[1:] if a.startswith(_FREE_FORM) and "=" in a]
  rest = [a for a in argv if a not in free]
  saved_argv, sys.argv = sys.argv, rest  # config_flags reads its override flags from sys.argv
  try:
    out = flags.FLAGS(rest)
  except Exception as e:  # noqa: BLE001 - every parse failure is the user's input
    problem = _override_problem(rest[1:])
    _fail(problem or _last_line(str(e)).removeprefix("ValueError: "), 2)
  finally:
    sys.argv = saved_argv
  if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
    cfg = flags.FLAGS["config"].value
    try:
      cfg.keys()  # config_flags defers a failed load to the first access
    except Exception as e:  # noqa: BLE001
      lines = [l.strip() for l in str(e).splitlines() if l.strip()]
      _fail(f"{lines[0]}: {lines[-1]}" if len(lines) > 1 else str(e), 2)
    for a in free:
      key, value = a[len(_FREE_FORM):].split("=", 1)
      with cfg.unlocked():
        cfg.model.mixer_options[key] = _literal(value)
  return out


def exit_on_run_error(fn: Callable[[], Any]) -> Any:
  """Calls `fn()`; a `RunError` becomes one line on stderr and exit code `e.exit_code`."""
  try:
    return fn()
  except RunError as e:
    _fail(str(e), e.exit_code)


# ----------------------------------------------------------------------------------------------
# Workdir: writable, one run at a time
# ----------------------------------------------------------------------------------------------

LOCK_NAME = "run.lock"


def _proc_start_time(pid: int) -> str | None:
  """The kernel's start time of `pid` (tells a live holder from a reused pid); None off Linux."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _holder_alive(info: dict) -> bool:
  if info.get("host") != socket.gethostname():
    return True  # cannot tell from here: assume it runs
  pid = int(info.get("pid", -1))
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, another user's
  start = info.get("start_time")
  return start is None or _proc_start_time(pid) in (None, start)


def check_writable(workdir: str) -> None:
  """Raises `DiskError` when `workdir` cannot be created or written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise DiskError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from None


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds `<workdir>/run.lock` (pid, host, start time) for the run; refuses while a live run holds
  it and takes over, with a warning, a lock whose holder is gone (a killed run)."""
  path = os.path.join(workdir, LOCK_NAME)
  me = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _proc_start_time(os.getpid())}
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        with open(path) as f:
          info = json.load(f)
      except (OSError, ValueError):
        info = {}
      if info and _holder_alive(info):
        raise LockError(f"workdir {workdir!r} is in use by pid {info.get('pid')} on host "
                        f"{info.get('host')} (lock {path}; delete it if that run is gone)") from None
      msg = (f"taking over the stale lock {path} of pid {info.get('pid')} on host {info.get('host')} "
             "(that run is gone)")
      logging.warning("%s", msg)
      warnings.warn(msg, RuntimeWarning, stacklevel=3)
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
      continue
    except OSError as e:
      raise DiskError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from None
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    break
  else:
    raise LockError(f"could not take the lock {path}: another run took it first")
  try:
    yield
  finally:
    with contextlib.suppress(OSError, ValueError):
      with open(path) as f:
        if json.load(f).get("pid") == me["pid"]:
          os.remove(path)


def is_disk_full(e: BaseException) -> bool:
  """Whether `e` or an exception it came from is ENOSPC / EDQUOT."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    e = e.__cause__ or e.__context__
  return False
