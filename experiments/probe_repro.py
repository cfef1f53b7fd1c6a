r"""Four attention-probe findings reproduced at CPU scale with the project's train step.

  .venv/bin/python -m experiments.probe_repro --config=configs/probe_sinks.py --workdir=workdirs/probe_sinks
  .venv/bin/python -m experiments.probe_repro --config=configs/probe_retrieval.py --workdir=workdirs/probe_retrieval
  .venv/bin/python -m experiments.probe_repro --config=configs/probe_entropy.py --workdir=workdirs/probe_entropy
  .venv/bin/python -m experiments.probe_repro --config=configs/probe_rsq.py --workdir=workdirs/probe_rsq

`config.repro.mode` picks the experiment:

* `sinks` (Gu et al., 2024, arXiv 2410.10781; Qiu et al., 2025, arXiv 2505.06708): byte LMs on text
  whose position 0 is a fixed BOS byte, one per mixer in `repro.mixers`; the sink rate (and the
  share of each row's mass on token 0) is measured every `repro.probe_every` steps.
* `retrieval` (Wu et al., 2024, arXiv 2404.15574): a decoder trained on a generated
  needle-in-a-haystack copy task; retrieval scores per head on the held-out set, then the eval
  accuracy with the top-k retrieval heads masked against k random other heads.
* `entropy` (Zhai et al., 2023, arXiv 2303.06296): a plain model and one whose Q/K projections are
  `SigmaReparamLinear`, same high learning rate; mean attention entropy vs step and final loss.
* `rsq` (Sung et al., 2025, arXiv 2503.01820): an LM is trained, then every attention layer's
  q/k/v projections are quantized (RTN, GPTQ, RSQ's token-weighted GPTQ) from calibration batches;
  errors and the LM loss with the quantized weights are measured on held-out batches.

Each run writes `<mode>.json` (and figures) into the workdir; `repro.record=True` also merges the
result into `benchmarks/probe_reproductions.{json,md}` (and, for `sinks`, writes
`benchmarks/probe_sinks_vs_step.png`).
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

from attnjax.analysis import capture as cap
from attnjax.analysis import heads, quantization, sinks
from attnjax.data import mqar as mqar_data
from attnjax.nn.stability import SigmaReparamLinear
from attnjax.ops.operators.scorefns import sigmoid_attention, sigmoid_attention_weights
from experiments import guards
from experiments import tasks as tasks_lib
from experiments import trainer

MODES = ("sinks", "retrieval", "entropy", "rsq")
BENCH = "benchmarks/probe_reproductions"


def _define_flags():
  """Flags only when run as a program (other entry modules define `--config` too)."""
  config_flags.DEFINE_config_file("config", None, "Path to configs/probe_<mode>.py.", lock_config=False)
  flags.DEFINE_string("workdir", None, "Output directory (created if missing).")


# --- training with an eval hook ----------------------------------------------------------------


def train_with_hook(config, task, *, hook: Callable | None = None, every: int = 0,
                    surgery: Callable | None = None, desc: str = ""):
  """Trains `task`'s model with the trainer's optimizer and jitted step, calling a probe hook.

  `hook(params, rest) -> dict` runs before the first step and every `every` steps (and at the
  last); `surgery(model)` may swap submodules before the state is split (sigmaReparam layers).
  Returns `(model, records, final_eval)`; `records` hold `step`, `train_loss` and the hook's keys.
  Non-finite loss or gradient norm raises `trainer.NonFiniteError` at the next probe.
  """
  fields = config.to_dict()
  fields.pop("repro", None)   # this module's own group, checked by the runners
  guards.validate(fields)
  model = task.build_model(config, nnx.Rngs(config.seed))
  if surgery is not None:
    surgery(model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = trainer.make_optimizer(config)
  opt_state = tx.init(params)
  train_step, eval_step = trainer.make_steps(graphdef, task, tx)
  guard = jnp.asarray(trainer.init_guard(0))
  steps = config.train.steps
  records = []
  if hook is not None:
    records.append({"step": 0, "train_loss": None, **hook(graphdef, params, rest)})
  bar = tqdm(range(1, steps + 1), desc=desc, dynamic_ncols=True,
             disable=not config.train.get("progress", True))
  for step in bar:
    batch = tasks_lib.to_device(next(task.train_loader))
    params, rest, opt_state, metrics, guard = train_step(params, rest, opt_state, batch, guard)
    if hook is not None and (step % every == 0 or step == steps):
      trainer.check_guard(guard)
      loss = float(metrics["loss"])
      records.append({"step": step, "train_loss": loss, **hook(graphdef, params, rest)})
      bar.set_postfix(loss=f"{loss:.3f}")
  trainer.check_guard(guard)
  final = trainer.evaluate(eval_step, params, rest, task.eval_batches)
  return nnx.merge(graphdef, params, rest), records, final


def _is_sigmoid(layer) -> bool:
  fn = layer.attn_fn
  return isinstance(fn, functools.partial) and fn.func is sigmoid_attention


def attention_weights(model, tokens) -> jax.Array:
  """`[L, B, H, T, T]` attention weights of every attention layer on `tokens [B, T]` (traceable).

  Softmax-engine layers (softmax, gated attention) hand back their weights; sigmoid layers hand
  back q and k, and the weights are recomputed with the layer's own bias (not normalised).
  """
  layers = cap.attention_layers(model)
  for _, layer in layers:
    layer.capture = ("queries", "keys") if _is_sigmoid(layer) else ("weights",)
  _, inter = cap.run(model, tokens)
  out = []
  qs = iter(cap.stack(inter, "queries")) if any(_is_sigmoid(l) for _, l in layers) else None
  ks = iter(cap.stack(inter, "keys")) if qs is not None else None
  ws = iter(cap.stack(inter, "weights")) if not all(_is_sigmoid(l) for _, l in layers) else None
  for _, layer in layers:
    if _is_sigmoid(layer):
      q, k = next(qs), next(ks)
      k = jnp.repeat(k, layer.num_heads // layer.num_kv_heads, axis=2)
      out.append(sigmoid_attention_weights(q, k, bias=layer.attn_fn.keywords.get("bias"),
                                           causal=layer.causal))
    else:
      out.append(next(ws))
  for _, layer in layers:
    layer.capture = ()
  return jnp.stack(out)


def _weights_fn(graphdef):
  return jax.jit(lambda p, r, x: attention_weights(nnx.merge(graphdef, p, r), x))


def first_token_share(attn) -> jax.Array:
  """Mean over layers, heads, batch and queries of `A_i0 / sum_j A_ij`: `[L, B, H, T, T] -> []`.

  For normalised weights this is the sink mass; for sigmoid weights (rows not summing to 1) it is
  the share of each row's total mass that lands on token 0.
  """
  a = jnp.asarray(attn, jnp.float32)
  row = jnp.sum(a, -1)
  return jnp.mean(a[..., 0] / jnp.maximum(row, 1e-12))


# --- 1. attention sinks vs step --------------------------------------------------------------


def _mixer_config(config, mixer: str):
  c = copy.deepcopy(config)
  c.model.mixer = mixer
  if mixer == "sigmoid" and "seq_len" not in c.model.mixer_options:
    c.model.mixer_options.seq_len = c.data.seq_len   # b = -log n with n the training context
  return c


def run_sinks(config) -> dict[str, Any]:
  r = config.repro
  eps = float(r.sink_eps)
  out = {"mixers": {}}
  for mixer in [s.strip() for s in r.mixers.split(",") if s.strip()]:
    c = _mixer_config(config, mixer)
    task = tasks_lib.make_task(c)
    probe_batches = task.eval_batches[: r.num_probe_batches]
    wfn = None

    def hook(graphdef, p, rest):
      nonlocal wfn
      wfn = wfn or _weights_fn(graphdef)
      rates, shares, mass = [], [], []
      for b in probe_batches:
        a = wfn(p, rest, b[:, :-1])
        rates.append(float(sinks.sink_rate(a, eps=eps)))
        shares.append(float(first_token_share(a)))
        mass.append(float(jnp.mean(jnp.sum(a, -1))))
      return {"sink_rate": float(np.mean(rates)), "first_token_share": float(np.mean(shares)),
              "row_mass": float(np.mean(mass))}

    t0 = time.perf_counter()
    _, records, final = train_with_hook(c, task, hook=hook, every=r.probe_every, desc=f"sinks:{mixer}")
    out["mixers"][mixer] = {"records": records, "final_eval": final,
                            "seconds": time.perf_counter() - t0}
    logging.info("%s: final sink rate %.3f", mixer, records[-1]["sink_rate"])
  return out


def sinks_figure(result, path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for mixer, m in result["mixers"].items():
    steps = [rec["step"] for rec in m["records"]]
    axes[0].plot(steps, [rec["sink_rate"] for rec in m["records"]], marker="o", ms=3, label=mixer)
    axes[1].plot(steps, [rec["first_token_share"] for rec in m["records"]], marker="o", ms=3,
                 label=mixer)
  axes[0].set_ylabel(f"sink rate (eps={result.get('sink_eps', 0.3)})")
  axes[1].set_ylabel("attention share on BOS (token 0)")
  for ax in axes:
    ax.set_xlabel("training step"); ax.grid(alpha=0.3); ax.set_ylim(-0.03, 1.03)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# --- 2. retrieval heads ----------------------------------------------------------------------


NEEDLE, QUERY, FIRST_HAY = 1, 2, 4


def needle_batch(rng: np.random.Generator, batch: int, seq_len: int, needle_len: int,
                 vocab_size: int, hay_vocab: int) -> mqar_data.MQARBatch:
  """Needle-in-a-haystack copy rows: `inputs [B, T]`, answer positions and targets `[B, k]`.

  A row is haystack tokens (ids `[4, hay_vocab)`) with a needle block `NEEDLE n_1..n_k` at a random
  place, ending `QUERY n_1 .. n_{k-1}`; the model must produce `n_1..n_k` at the `k` positions from
  `QUERY` on. Needle tokens are distinct ids from `[hay_vocab, vocab_size)`, so each occurs once in
  the context and a head that copies it is a retrieval head in Wu et al.'s sense.
  """
  k = needle_len
  if not (FIRST_HAY < hay_vocab and vocab_size - hay_vocab >= k and seq_len >= 3 * k + 3):
    raise ValueError(f"needle_batch: need 4 < hay_vocab, vocab_size - hay_vocab >= needle_len and "
                     f"seq_len >= 3*needle_len + 3, got vocab_size={vocab_size}, hay_vocab={hay_vocab},"
                     f" needle_len={k}, seq_len={seq_len}")
  full = rng.integers(FIRST_HAY, hay_vocab, size=(batch, seq_len + 1))
  needles = np.stack([rng.choice(np.arange(hay_vocab, vocab_size), k, replace=False)
                      for _ in range(batch)])
  hay_len = seq_len - k                       # positions before QUERY
  starts = rng.integers(0, hay_len - k, size=batch)
  rows = np.arange(batch)[:, None]
  full[rows, starts[:, None]] = NEEDLE
  full[rows, starts[:, None] + 1 + np.arange(k)] = needles
  full[:, hay_len] = QUERY
  full[:, hay_len + 1:] = needles
  qpos = np.broadcast_to(hay_len + np.arange(k), (batch, k))
  return mqar_data.MQARBatch(inputs=full[:, :-1].astype(np.int32),
                             query_positions=np.ascontiguousarray(qpos).astype(np.int32),
                             targets=needles.astype(np.int32)), starts + 1


class NeedleLoader:
  """Endless `needle_batch`es; batch i depends only on (seed, i); `state()`/`restore()` as the trainer expects."""

  def __init__(self, batch_size, seq_len, needle_len, vocab_size, hay_vocab, seed):
    self.args = (batch_size, seq_len, needle_len, vocab_size, hay_vocab)
    self.seed, self.index = seed, 0

  def state(self):
    return {"index": self.index}

  def restore(self, state):
    self.index = int(state["index"])

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng((self.seed, self.index))
    self.index += 1
    return needle_batch(rng, *self.args)[0]


def make_needle_task(config):
  """`(task, eval rows)`: a `tasks_lib.Task` on `NeedleLoader` and held-out rows with needle starts."""
  d, r = config.data, config.repro
  args = (config.train.batch_size, d.seq_len, r.needle_len, d.vocab_size, r.hay_vocab)
  rng = np.random.default_rng((config.seed + 1_000_003, 0))
  evals = [needle_batch(rng, *args) for _ in range(r.num_eval_batches)]
  task = tasks_lib.Task("needle", NeedleLoader(*args, seed=config.seed),
                        [tasks_lib.to_device(b) for b, _ in evals], tasks_lib.mqar_loss,
                        tasks_lib.build_decoder)
  return task, evals


def retrieval_score_table(model, evals, needle_len: int):
  """Retrieval score per head `[L, H]`, averaged over rows retrieved exactly, and their count.

  Teacher-forced: the answer positions' attention rows stand for the decoding steps (equal to
  greedy decoding on the rows the model gets fully right, the only rows scored, as in Wu et al.).
  """
  @nnx.jit
  def fwd(m, x, qpos):
    a = attention_weights(m, x)                       # [L, B, H, T, T]
    logits = m.logits(jnp.take_along_axis(m.hidden(x), qpos[..., None], axis=1))
    return a, jnp.argmax(logits, -1)

  layers = cap.attention_layers(model)
  total, n_ok = np.zeros((len(layers), layers[0][1].num_heads)), 0
  for batch, starts in evals:
    a, pred = fwd(model, jnp.asarray(batch.inputs), jnp.asarray(batch.query_positions))
    a, pred = np.asarray(a), np.asarray(pred)
    for i in range(batch.inputs.shape[0]):
      if not np.array_equal(pred[i], batch.targets[i]):
        continue
      step_attn = np.moveaxis(a[:, i][:, :, batch.query_positions[i], :], 2, 0)   # [S, L, H, T]
      total = total + np.asarray(heads.retrieval_scores(
          step_attn, pred[i], batch.inputs[i], (int(starts[i]), int(starts[i]) + needle_len)))
      n_ok += 1
  return (total / max(n_ok, 1)), n_ok


def run_retrieval(config) -> dict[str, Any]:
  r = config.repro
  task, evals = make_needle_task(config)
  t0 = time.perf_counter()
  model, _, final = train_with_hook(config, task, desc="needle")
  train_s = time.perf_counter() - t0
  scores, n_ok = retrieval_score_table(model, evals, r.needle_len)
  layers = cap.attention_layers(model)
  n_l, n_h = len(layers), layers[0][1].num_heads
  flat = np.asarray(scores).ravel()
  order = np.argsort(-flat)
  k = int(r.top_k)
  top = order[:k]
  others = order[k:]
  rng = np.random.default_rng(config.seed)

  batches = task.eval_batches
  with cap.head_scaling(model, lambda m: jnp.mean(jnp.stack(
      [tasks_lib.mqar_loss(m, b)[1]["accuracy"] for b in batches]))) as acc_fn:
    def acc_masked(idx):
      s = np.ones(n_l * n_h, np.float32)
      s[list(idx)] = 0.0
      return float(acc_fn(s.reshape(n_l, n_h)))
    base = acc_masked([])
    top_acc = acc_masked(top)
    rand = [acc_masked(rng.choice(others, k, replace=False)) for _ in range(int(r.num_random))]
    per_head = [acc_masked([i]) for i in range(n_l * n_h)]
  return {"final_eval": final, "train_seconds": train_s, "retrieved_rows": n_ok,
          "retrieval_scores": np.asarray(scores).tolist(),
          "retrieval_heads": np.asarray(heads.retrieval_heads(scores)).tolist(),
          "top_k": k, "top_heads": [divmod(int(i), n_h) for i in top],
          "accuracy": {"none_masked": base, "top_k_masked": top_acc,
                       "random_k_masked_mean": float(np.mean(rand)), "random_k_masked": rand},
          "accuracy_single_head_masked": np.reshape(per_head, (n_l, n_h)).tolist()}


# --- 3. entropy collapse and sigmaReparam ----------------------------------------------------


def sigma_reparam_qk(model, which=("q_proj", "k_proj"), *, seed: int = 0) -> None:
  """Replaces the named projections of every attention layer with `SigmaReparamLinear` (fresh init)."""
  rngs = nnx.Rngs(seed + 7)
  for _, layer in cap.attention_layers(model):
    for name in which:
      old = getattr(layer, name)
      d_in, d_out = old.kernel.shape
      setattr(layer, name, SigmaReparamLinear(d_in, d_out, use_bias=old.bias is not None,
                                              axes=old.kernel.get_metadata().get("logical_axes", (None, None)),
                                              rngs=rngs))


def mean_entropy(attn) -> tuple[float, list]:
  """Mean row entropy (nats) over layers, heads, batch and queries, and per layer `[L][H]`."""
  per = np.stack([np.asarray(heads.head_entropy(a)) for a in attn])
  return float(per.mean()), per.tolist()


def run_entropy(config) -> dict[str, Any]:
  r = config.repro
  out = {"variants": {}}
  for variant in [s.strip() for s in r.variants.split(",") if s.strip()]:
    if variant not in ("plain", "sigma_reparam"):
      raise guards.ConfigError("repro.variants", r.variants, "must list 'plain' and/or 'sigma_reparam'")
    task = tasks_lib.make_task(config)
    probe_batches = task.eval_batches[: r.num_probe_batches]
    wfn = None

    def hook(graphdef, p, rest):
      nonlocal wfn
      wfn = wfn or _weights_fn(graphdef)
      ents = [mean_entropy(wfn(p, rest, b[:, :-1])) for b in probe_batches]
      return {"entropy": float(np.mean([e for e, _ in ents])),
              "entropy_per_head": np.mean([e for _, e in ents], 0).tolist()}

    surgery = (functools.partial(sigma_reparam_qk, which=tuple(r.reparam.split(",")), seed=config.seed)
               if variant == "sigma_reparam" else None)
    t0 = time.perf_counter()
    try:
      _, records, final = train_with_hook(config, task, hook=hook, every=r.probe_every,
                                          surgery=surgery, desc=f"entropy:{variant}")
      status = "ok"
    except trainer.NonFiniteError as e:
      records, final, status = [], {}, f"diverged: {e}"
    out["variants"][variant] = {"records": records, "final_eval": final, "status": status,
                                "seconds": time.perf_counter() - t0}
  return out


def entropy_figure(result, path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for name, v in result["variants"].items():
    steps = [rec["step"] for rec in v["records"]]
    axes[0].plot(steps, [rec["entropy"] for rec in v["records"]], marker="o", ms=3, label=name)
    axes[1].plot(steps[1:], [rec["train_loss"] for rec in v["records"]][1:], marker="o", ms=3, label=name)
  axes[0].set_ylabel("mean attention entropy (nats)"); axes[1].set_ylabel("train loss")
  for ax in axes:
    ax.set_xlabel("training step"); ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)
  return path


# --- 4. RSQ vs GPTQ vs RTN ---------------------------------------------------------------------


def _layer_inputs(model, tokens):
  """Per attention layer: its input `x [B, T, d]` and weights `[B, H, T, T]` (traceable)."""
  with cap.capturing(model, ("inputs", "weights")):
    _, inter = cap.run(model, tokens)
  return cap.stack(inter, "inputs"), cap.stack(inter, "weights")


def run_rsq(config) -> dict[str, Any]:
  r = config.repro
  task = tasks_lib.make_task(config)
  t0 = time.perf_counter()
  model, _, final = train_with_hook(config, task, desc="rsq:lm")
  train_s = time.perf_counter() - t0
  calib = [jnp.asarray(next(task.train_loader)) for _ in range(r.num_calib_batches)]
  held = task.eval_batches
  fwd = nnx.jit(lambda m, x: _layer_inputs(m, x))
  cx, ca = zip(*[fwd(model, b[:, :-1]) for b in calib])
  cx, ca = jnp.concatenate(cx, 1), jnp.concatenate(ca, 1)      # [L, N, T, d], [L, N, H, T, T]
  hx, ha = zip(*[fwd(model, b[:, :-1]) for b in held])
  hx, ha = jnp.concatenate(hx, 1), jnp.concatenate(ha, 1)
  layers = cap.attention_layers(model)
  names = [s.strip() for s in r.projections.split(",")]
  loss_of = nnx.jit(lambda m: jnp.mean(jnp.stack([tasks_lib.lm_loss(m, b)[0] for b in held])))
  base_loss = float(loss_of(model))
  out = {"final_eval": final, "train_seconds": train_s, "bits": {}}
  gptq = jax.jit(quantization.gptq, static_argnames=("bits",))
  for bits in [int(b) for b in str(r.bits).split(",")]:
    methods = {"rtn": [], "gptq": [], "rsq": []}
    errs = {m: {"plain": 0.0, "weighted": 0.0} for m in methods}
    for li, (_, layer) in enumerate(layers):
      x_c = cx[li].reshape(-1, cx.shape[-1])
      w_c = quantization.token_importance(ca[li], r_min=r.r_min, r_max=r.r_max).reshape(-1)
      x_h = hx[li].reshape(-1, hx.shape[-1])
      w_h = quantization.token_importance(ha[li], r_min=r.r_min, r_max=r.r_max).reshape(-1)
      h_plain = quantization.weighted_hessian(x_c)
      h_rsq = quantization.weighted_hessian(x_c, w_c)
      for name in names:
        w = getattr(layer, name).kernel[...].T              # [out, in]
        q = {"rtn": quantization.quantize_rtn(w, bits=bits), "gptq": gptq(w, h_plain, bits=bits),
             "rsq": gptq(w, h_rsq, bits=bits)}
        for m, wq in q.items():
          methods[m].append((li, name, wq))
          errs[m]["plain"] += float(quantization.quantization_error(w, wq, x_h))
          errs[m]["weighted"] += float(quantization.quantization_error(w, wq, x_h, w_h))
    losses = {}
    originals = {(li, n): getattr(layers[li][1], n).kernel[...] for li in range(len(layers)) for n in names}
    for m, qs in methods.items():
      for li, name, wq in qs:
        getattr(layers[li][1], name).kernel[...] = wq.T
      losses[m] = float(loss_of(model))
      for (li, name), k in originals.items():
        getattr(layers[li][1], name).kernel[...] = k
    out["bits"][str(bits)] = {"heldout_error": errs, "lm_loss": losses | {"full_precision": base_loss}}
  return out


# --- records ------------------------------------------------------------------------------------


RUNNERS = {"sinks": run_sinks, "retrieval": run_retrieval, "entropy": run_entropy, "rsq": run_rsq}


def summarize(mode: str, res: dict[str, Any]) -> str:
  """One line of the headline numbers."""
  if mode == "sinks":
    return "; ".join(f"{m}: sink rate {v['records'][0]['sink_rate']:.2f} -> {v['records'][-1]['sink_rate']:.2f}"
                     f" (BOS share {v['records'][-1]['first_token_share']:.2f}, eval loss "
                     f"{v['final_eval'].get('loss', float('nan')):.2f})" for m, v in res["mixers"].items())
  if mode == "retrieval":
    a = res["accuracy"]
    return (f"eval acc {a['none_masked']:.3f}; top-{res['top_k']} retrieval heads {res['top_heads']} masked "
            f"{a['top_k_masked']:.3f}; {res['top_k']} random other heads masked "
            f"{a['random_k_masked_mean']:.3f} (mean of {len(a['random_k_masked'])})")
  if mode == "entropy":
    parts = []
    for name, v in res["variants"].items():
      if not v["records"]:
        parts.append(f"{name}: {v['status']}")
        continue
      ent = [rec["entropy"] for rec in v["records"]]
      parts.append(f"{name}: entropy {ent[0]:.2f} -> min {min(ent):.2f} -> {ent[-1]:.2f} nats, eval loss "
                   f"{v['final_eval'].get('loss', float('nan')):.3f}")
    return "; ".join(parts)
  parts = []
  for bits, v in res["bits"].items():
    e, l = v["heldout_error"], v["lm_loss"]
    parts.append(f"{bits}-bit weighted err RTN {e['rtn']['weighted']:.1f} / GPTQ {e['gptq']['weighted']:.1f} / "
                 f"RSQ {e['rsq']['weighted']:.1f}; LM loss fp {l['full_precision']:.4f} RTN {l['rtn']:.4f} "
                 f"GPTQ {l['gptq']:.4f} RSQ {l['rsq']:.4f}")
  return "; ".join(parts)


def _environment() -> dict[str, Any]:
  import flax
  return {"device": f"{jax.devices()[0].platform} ({os.cpu_count()} cores visible, shared)",
          "jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version(),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def record(mode: str, res: dict[str, Any], command: str, root: str = ".", tag: str = "") -> dict[str, Any]:
  """Merges one result into `benchmarks/probe_reproductions.{json,md}` under `root`; returns the
  recorded result (for `sinks` / `entropy`, the runs of earlier processes merged in). A `tag`
  records a variant setting as its own row (`<mode>@<tag>`)."""
  key = f"{mode}@{tag}" if tag else mode
  path = os.path.join(root, BENCH + ".json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = json.load(open(path)) if os.path.exists(path) else {}
  runs = {"sinks": "mixers", "entropy": "variants"}.get(mode)
  if runs and key in data:  # one process per mixer / variant: merge them
    res = dict(res, **{runs: {**data[key]["result"][runs], **res[runs]}})
    command = data[key]["command"] if command in data[key]["command"] else f"{data[key]['command']}; {command}"
  data[key] = {"command": command, "summary": summarize(mode, res), **_environment(), "result": res}
  with open(path, "w") as f:
    json.dump(data, f, indent=1)
  lines = ["# Attention-probe reproductions at CPU scale", "",
           "Written by `experiments/probe_repro.py` (`repro.record=True`); numbers in "
           "`probe_reproductions.json`.", "",
           "| reproduction | command | result | device, date |", "|---|---|---|---|"]
  for m in [m for m in MODES if m in data] + sorted(m for m in data if m not in MODES):
      d = data[m]
      lines.append(f"| {m} | `{d['command']}` | {d['summary']} | {d['device']}, jax {d['jax']}, {d['date']} |")
  with open(os.path.join(root, BENCH + ".md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return res


def run(config, workdir: str) -> dict[str, Any]:
  mode = config.repro.mode
  if mode not in MODES:
    raise guards.ConfigError("repro.mode", mode, f"must be one of {MODES}")
  os.makedirs(workdir, exist_ok=True)
  res = RUNNERS[mode](config)
  if mode == "sinks":
    res["sink_eps"] = float(config.repro.sink_eps)
  with open(os.path.join(workdir, f"{mode}.json"), "w") as f:
    json.dump(res, f, indent=1)
  if mode == "sinks":
    sinks_figure(res, os.path.join(workdir, "sinks_vs_step.png"))
  if mode == "entropy":
    entropy_figure(res, os.path.join(workdir, "entropy_vs_step.png"))
  return res


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join("workdirs", f"probe_{config.repro.mode}")
  try:
    res = run(config, workdir)
  except guards.RunError as e:
    raise SystemExit(f"error: {e}") from None
  mode = config.repro.mode
  print(summarize(mode, res))
  if config.repro.record:
    import sys
    res = record(mode, res, "python -m experiments.probe_repro " + " ".join(sys.argv[1:]),
                 tag=config.repro.get("tag", ""))
    if mode == "sinks":
      tag = config.repro.get("tag", "")
      sinks_figure(res, f"benchmarks/probe_sinks_vs_step{'_' + tag if tag else ''}.png")
    if mode == "entropy":
      entropy_figure(res, "benchmarks/probe_entropy_vs_step.png")
  print(f"wrote {os.path.join(workdir, mode + '.json')}")


if __name__ == "__main__":
  # Single-threaded Eigen: on a loaded shared CPU, spinning intra-op threads cost ~6x in steps/s.
  os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
  _define_flags()
  app.run(main)
