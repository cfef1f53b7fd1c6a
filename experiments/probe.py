r"""Runs attention probes (`attnjax.analysis`) on a model trained by the project's trainer.

  .venv/bin/python -m experiments.probe --config=configs/probe.py --workdir=workdirs/probe_lm

Trains with `experiments.trainer.train_and_evaluate` (or loads `config.probe.checkpoint`), then
captures attention on `config.probe.num_batches` eval batches in one forward each and writes
`probes.json` and per-head heat maps (`<metric>.png`) into the workdir. See `configs/probe.py`.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

from attnjax.analysis import capture as cap
from attnjax.analysis import heads, sinks
from attnjax.data import mqar as mqar_data
from experiments import tasks as tasks_lib


def _define_flags():
  """The entry point's flags, defined only when run as a program: `experiments.compare` defines
  `--config` too, and both modules are imported by the test suite in one process."""
  config_flags.DEFINE_config_file("config", None, "Path to configs/probe.py (or similar).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (created if missing).")

PROBES = ("sink_mass", "sink_rate", "dormant", "entropy", "attention_distance", "value_drain",
          "act_sinks", "head_importance", "key_mass_first")


def _inputs(batch):
  """Model input tokens `[B, T]` of an eval batch (MQAR batch or LM tokens `[B, T + 1]`)."""
  return batch.inputs if isinstance(batch, mqar_data.MQARBatch) else batch[:, :-1]


def get_model(config, workdir: str | None):
  """`(model, task, summary)`: trained now, or restored from `config.probe.checkpoint`."""
  task = tasks_lib.make_task(config)
  ckpt_dir = config.probe.get("checkpoint")
  if ckpt_dir:
    from attnjax.distributed import checkpoint as ckpt
    from experiments.trainer import make_mesh
    model = task.build_model(config, nnx.Rngs(config.seed))
    model = ckpt.restore_model_for_inference(ckpt_dir, model, make_mesh(config))
    return model, task, {"checkpoint": ckpt_dir}
  from experiments.trainer import train_and_evaluate
  summary = train_and_evaluate(config, os.path.join(workdir, "train") if workdir else None)
  return summary.pop("model"), task, summary


@functools.partial(jax.jit, static_argnames=("names", "eps", "dormant", "act"))
def _array_metrics(a, values, key_mass, *, names, eps, dormant, act):
  """The attention-weight probes of one batch, in one compiled program.

  `a`: `[L, B, H, T, T]` weights, `values`: `[L, B, T, Hk, D]`, `key_mass`: `[L, B, H, T]`.
  """
  t = a.shape[-1]
  per_layer = lambda f: jnp.stack([f(al) for al in a])
  out = {}
  for name in names:
    if name == "sink_mass":
      out[name] = sinks.sink_mass(a).mean(1)
    elif name == "sink_rate":
      out[name] = sinks.sink_rate(a, eps=eps)
    elif name == "dormant":
      out[name] = jnp.mean(sinks.dormant_heads(a, threshold=dormant), 1)
    elif name == "entropy":  # as a fraction of log T
      out[name] = per_layer(heads.head_entropy) / jnp.log(t)
    elif name == "attention_distance":
      pos = heads.grid_positions(1, t)
      out[name] = per_layer(lambda al: heads.mean_attention_distance(al, pos))
    elif name == "value_drain":
      out[name] = jnp.stack([sinks.value_drain(v).mean(0) for v in values])
    elif name == "act_sinks":  # hidden (non-initial) sinks per head, mean count per input
      out[name] = per_layer(lambda al: jnp.sum(sinks.act_sink_mask(al, threshold=act), -1).mean(0))
    elif name == "key_mass_first":  # streamed: attention mass on token 0 per query
      out[name] = key_mass[..., 0].mean(1) / t
  return out


def run_probes(model, task, config) -> dict[str, Any]:
  """Every probe in `config.probe.probes` on the first `num_batches` eval batches."""
  names = [s.strip() for s in str(config.probe.probes).split(",") if s.strip()]
  bad = sorted(set(names) - set(PROBES))
  if bad:
    raise ValueError(f"probe.probes: unknown {bad}; known: {PROBES}")
  batches = task.eval_batches[: config.probe.num_batches]
  array_names = tuple(n for n in names if n != "head_importance")
  kinds = ("weights", "values") if set(array_names) - {"key_mass_first"} else ()
  if "key_mass_first" in names:
    kinds = kinds + ("key_mass",)
  run = nnx.jit(lambda m, x: cap.run(m, x))
  layers = cap.attention_layers(model)
  per_batch: dict[str, list] = {n: [] for n in names}
  bar = tqdm(total=len(batches) * (1 + ("head_importance" in names)), desc="probes",
             dynamic_ncols=True, disable=not config.train.get("progress", True))
  for batch in batches:
    if array_names:
      with cap.capturing(model, kinds):
        _, inter = run(model, _inputs(batch))
      get = lambda k: cap.stack(inter, k) if k in kinds else None
      vals = _array_metrics(get("weights"), get("values"), get("key_mass"), names=array_names,
                            eps=float(config.probe.sink_eps),
                            dormant=float(config.probe.dormant_threshold),
                            act=float(config.probe.act_threshold))
      for n, v in vals.items():
        per_batch[n].append(np.asarray(v, np.float64))
      bar.update(1)
    if "head_importance" in names:
      with cap.head_scaling(model, lambda m: task.loss(m, batch)[0]) as loss_fn:
        imp = heads.head_importance(loss_fn, len(layers), layers[0][1].num_heads)
      per_batch["head_importance"].append(np.asarray(imp, np.float64))
      bar.update(1)
  bar.close()
  return {n: np.mean(np.stack(v), 0).tolist() for n, v in per_batch.items()}


def write_figures(metrics: dict[str, Any], workdir: str) -> list[str]:
  """One heat map (layers x heads) per per-head metric; returns the paths written."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  paths = []
  for name, val in metrics.items():
    arr = np.asarray(val)
    if arr.ndim != 2:
      continue
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * arr.shape[1], 1.0 + 0.5 * arr.shape[0]))
    im = ax.imshow(arr, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(arr):
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=7)
    ax.set_xlabel("head"); ax.set_ylabel("layer"); ax.set_title(name)
    ax.set_xticks(range(arr.shape[1])); ax.set_yticks(range(arr.shape[0]))
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = os.path.join(workdir, f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def probe(config, workdir: str) -> dict[str, Any]:
  os.makedirs(workdir, exist_ok=True)
  model, task, summary = get_model(config, workdir)
  metrics = run_probes(model, task, config)
  out = {"task": config.task, "mixer": tasks_lib.layer_mixers(config.model),
         "train": {k: v for k, v in summary.items() if k in ("final_eval", "steps", "checkpoint")},
         "metrics": metrics}
  with open(os.path.join(workdir, "probes.json"), "w") as f:
    json.dump(out, f, indent=1)
  out["figures"] = write_figures(metrics, workdir) if config.probe.figures else []
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join("workdirs", f"probe_{config.task}")
  logging.info("config:\n%s", config)
  out = probe(config, workdir)
  m = out["metrics"]
  print(json.dumps({k: m[k] for k in m if np.ndim(m[k]) == 0} | {"final_eval": out["train"].get("final_eval")}))
  print(f"wrote {os.path.join(workdir, 'probes.json')} and {len(out['figures'])} figures")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
