r"""The main job: several mixers on the same task, one table and one plot.

  .venv/bin/python -m experiments.compare --config=configs/mqar.py --mixers=softmax,sliding_window

Trains each mixer with the same config (only `model.mixer` changes), prints a table (mixer,
parameters, test accuracy, steps/s), and writes `results.json`, `results.md` and
`accuracy_vs_step.png` into `--workdir` (default `workdirs/compare_<task>`).
Extra config overrides apply to every run, e.g. `--config.model.d_model=128`.
`--widths=64,128` repeats the sweep at several model widths (the recall-vs-state-size view).
`--lrs=1e-3,3e-3` repeats it at several peak learning rates; the table then lists every run and
`results.md` adds the best lr per mixer and width (Zoology reports each model at its best lr).
`--zoology` is Zoology's protocol: its lr sweep (logspace(-4, -2, 4), unless `--lrs` is given) on
the `zoology` preset of `configs/mqar.py`, e.g.

  .venv/bin/python -m experiments.compare --config=configs/mqar.py:zoology --zoology \
      --mixers=softmax,gla,retnet
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import sys

import jax
from flax import nnx
from absl import app, flags
from ml_collections import config_flags

from experiments import guards
from experiments import tasks as tasks_lib
from experiments import trainer as train_lib

def _define_flags():
  """The entry point's flags, defined only when run as a program, so that another entry point
  (`experiments.cab`) can import this module's functions and define its own `--config`."""
  config_flags.DEFINE_config_file("config", "configs/mqar.py", "Path to an ml_collections config file.",
                                  lock_config=True)
  flags.DEFINE_list("mixers", ["softmax", "sliding_window"], "Registered mixer names to compare.")
  flags.DEFINE_list("widths", [], "Optional d_model values to sweep (default: the config's).")
  flags.DEFINE_list("lrs", [], "Optional peak learning rates to sweep (default: the config's optim.lr).")
  flags.DEFINE_boolean(
      "zoology", False, "Zoology's protocol: --lrs defaults to its sweep logspace(-4, -2, 4); the "
      "config must be the zoology preset (--config=configs/mqar.py:zoology).")
  flags.DEFINE_string("workdir", None, "Output directory.")
  flags.DEFINE_boolean(
      "collect", False, "Train nothing: rebuild the table and plots from the runs already in "
      "--workdir (each <mixer>_d<width>/summary.json), e.g. after an interrupted sweep.")


def recurrent_state_floats(model, seq_len: int) -> float:
  """Floats of decoding state per sequence after `seq_len` tokens, summed over the mixers.

  A mixer may say it with `state_size(seq_len)`; otherwise we count its decode cache
  (`init_cache(1, seq_len)`). The short convolutions are left out (the same for every mixer).
  Returns NaN when a mixer can do neither. The model is left as it was.
  """
  total = 0
  for blk in getattr(model, "blocks", []):
    mixer = nnx.clone(blk.mixer)  # init_cache below must not touch the caller's (trained) model
    if hasattr(mixer, "state_size"):
      total += int(mixer.state_size(seq_len))
      continue
    try:
      mixer.init_cache(1, seq_len)
    except (NotImplementedError, AttributeError, TypeError, ValueError):
      return float("nan")
    total += sum(int(v.size) for v in jax.tree.leaves(nnx.state(mixer, nnx.Cache)) if v.ndim > 0)
  return float(total)


def plot(results: list[dict], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for r in results:
    steps = [h["step"] for h in r["history"]]
    acc = [h["accuracy"] for h in r["history"]]
    ax.plot(steps, acc, marker="o", ms=3, label=f"{r['label']} ({r['params']:,} params)")
  ax.set_xlabel("training step")
  ax.set_ylabel("test accuracy (queried positions)")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_state(results: list[dict], path: str, title: str) -> None:
  """Zoology's view: accuracy against the decoding state each model keeps (log scale)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for mixer in dict.fromkeys(r["mixer"] for r in results):
    rs = sorted((r for r in results if r["mixer"] == mixer and r["state_floats"] == r["state_floats"]),
                key=lambda r: r["state_floats"])
    if rs:
      ax.plot([r["state_floats"] for r in rs], [r["accuracy"] for r in rs], marker="o", label=mixer)
  ax.set_xscale("log")
  ax.set_xlabel("decoding state per sequence (floats, all layers)")
  ax.set_ylabel("test accuracy")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# Zoology's sweep (`np.logspace(-4, -2, 4)` in its figure-2 configs).
ZOOLOGY_LRS = (1e-4, 4.6416e-4, 2.1544e-3, 1e-2)


def check_zoology(config) -> None:
  """`--zoology` runs Zoology's setting; a config without its vocab and no-conv model is refused."""
  if config.task != "mqar" or config.data.vocab_size != 8192 or config.model.short_conv:
    raise guards.ConfigError("--zoology", True, "needs Zoology's setting: --config=configs/mqar.py:zoology")


def markdown_table(results: list[dict]) -> str:
  with_lr = len({r.get("lr") for r in results}) > 1
  lines = ["| mixer | d_model |" + (" lr |" if with_lr else "") + " params | state (floats) | test accuracy | steps/s |",
           "|---|---:|" + ("---:|" if with_lr else "") + "---:|---:|---:|---:|"]
  for r in results:
    state = "n/a" if r["state_floats"] != r["state_floats"] else f"{int(r['state_floats']):,}"
    lr = f" {r['lr']:.2g} |" if with_lr else ""
    lines.append(f"| {r['mixer']} | {r['d_model']} |{lr} {r['params']:,} | {state} | {r['accuracy']:.4f} "
                 f"| {r['steps_per_s']:.1f} |")
  return "\n".join(lines)


def best_lr_table(results: list[dict]) -> str:
  """Per (mixer, d_model): the best test accuracy over the swept lrs and the lr that gave it."""
  best: dict[tuple, dict] = {}
  for r in results:
    key = (r["mixer"], r["d_model"])
    if key not in best or r["accuracy"] > best[key]["accuracy"]:
      best[key] = r
  lines = ["| mixer | d_model | best lr | test accuracy | accuracy at each lr |", "|---|---:|---:|---:|---|"]
  for (mixer, width), b in best.items():
    each = ", ".join(f"{r['lr']:.2g}: {r['accuracy']:.3f}" for r in results
                     if (r["mixer"], r["d_model"]) == (mixer, width))
    lines.append(f"| {mixer} | {width} | {b['lr']:.2g} | {b['accuracy']:.4f} | {each} |")
  return "\n".join(lines)


def _result_row(mixer: str, width, summary: dict, model, seq_len: int, lr=None) -> dict:
  """One table row from a run's summary (as `train_and_evaluate` returns it or summary.json)."""
  return {"mixer": mixer, "d_model": int(width), "lr": lr,
          "label": f"{mixer} d={width}" + ("" if lr is None else f" lr={lr:.2g}"),
          "params": summary["params"],
          # Decoding state only means something for sequence models (not e.g. image classifiers).
          "state_floats": recurrent_state_floats(model, seq_len) if seq_len else float("nan"),
          "accuracy": summary["final_eval"]["accuracy"], "steps_per_s": summary["steps_per_s"],
          "history": summary["history"]}


def _parse_lrs(lrs) -> list[float | None]:
  out = []
  for lr in lrs or []:
    try:
      v = float(lr)
    except (TypeError, ValueError):
      v = float("nan")
    if not v > 0 or v == float("inf"):
      raise guards.ConfigError("--lrs", lr, "must be positive finite numbers (peak learning rates)")
    out.append(v)
  return out or [None]


def _run_name(mixer: str, width: int, lr: float | None) -> str:
  return f"{mixer}_d{width}" + ("" if lr is None else f"_lr{lr:.2g}")


def sweep_configs(config, mixers, widths, lrs=()) -> list[tuple[str, int, float | None, object]]:
  """`(mixer, width, lr, config)` per run (lr None: the config's), each validated before any run
  starts (`guards.ConfigError`)."""
  out = []
  for width in widths or [config.model.d_model]:
    if not str(width).strip().isdigit():
      raise guards.ConfigError("--widths", width, "must be positive integers (d_model values)")
    for mixer in mixers:
      for lr in _parse_lrs(lrs):
        cfg = copy.deepcopy(config)
        with cfg.unlocked():
          cfg.model.mixer = mixer
          cfg.model.d_model = int(width)
          if lr is not None:
            cfg.optim.lr = lr
        guards.validate(cfg)
        out.append((mixer, int(width), lr, cfg))
  return out


def collect(config, mixers, widths, workdir, lrs=()) -> list[dict]:
  """The results of finished runs in `workdir` (missing ones are reported and left out)."""
  runs = sweep_configs(config, mixers, widths, lrs)
  build = tasks_lib.model_builder(config)  # no data: collecting only reads the summaries
  results = []
  for mixer, width, lr, cfg in runs:
    path = os.path.join(workdir, _run_name(mixer, width, lr), "summary.json")
    if not os.path.exists(path):
      print(f"  {mixer:>20s} d={width}: no finished run ({path})", flush=True)
      continue
    with open(path) as f:
      s = json.load(f)
    model = build(cfg, nnx.Rngs(cfg.seed))
    results.append(_result_row(mixer, width, s, model, cfg.data.get("seq_len"), lr))
  return results


def run(config, mixers, widths, workdir, lrs=()) -> list[dict]:
  runs = sweep_configs(config, mixers, widths, lrs)
  guards.check_writable(workdir)
  results = []
  for mixer, width, lr, cfg in runs:
    s = train_lib.train_and_evaluate(cfg, os.path.join(workdir, _run_name(mixer, width, lr)))
    results.append(_result_row(mixer, width, s, s["model"], cfg.data.get("seq_len"), lr))
    print(f"  {mixer:>20s} d={width} lr={cfg.optim.lr:.2g}: accuracy {results[-1]['accuracy']:.4f}  "
          f"({s['steps_per_s']:.1f} steps/s)", flush=True)
  return results


def main(argv):
  del argv
  F = flags.FLAGS
  config = F.config
  workdir = F.workdir or os.path.join("workdirs", f"compare_{config.task}")
  lrs = F.lrs
  if F.zoology:
    guards.exit_on_run_error(lambda: check_zoology(config))
    lrs = lrs or [str(x) for x in ZOOLOGY_LRS]
  results = guards.exit_on_run_error(
      lambda: (collect if F.collect else run)(config, F.mixers, F.widths, workdir, lrs))
  table = markdown_table(results)
  if len(_parse_lrs(lrs)) > 1:
    table += "\n\nBest lr per mixer and width:\n\n" + best_lr_table(results)
  print("\n" + table)
  d = config.data
  title = f"{config.task}: vocab {d.vocab_size}, seq {d.seq_len}, {d.num_kv_pairs} kv pairs"
  plot(results, os.path.join(workdir, "accuracy_vs_step.png"), title)
  if len(set(r["d_model"] for r in results)) > 1:
    plot_state(results, os.path.join(workdir, "accuracy_vs_state.png"), title)
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "machine": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "devices": [str(x) for x in jax.devices()],
          "command": "python -m experiments.compare " + " ".join(sys.argv[1:]),
          "config": config.to_dict()}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(f"# {title}\n\n{table}\n\n{meta['date']}, jax {meta['jax']}, {meta['machine']}\n")
  print(f"\nwrote {workdir}/results.md, results.json, accuracy_vs_step.png")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=guards.parse_flags)
