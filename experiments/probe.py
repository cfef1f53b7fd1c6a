r"""Runs attention probes (`attnjax.analysis`) on a model trained by the project's trainer.

  .venv/bin/python -m experiments.probe --config=configs/probe.py --workdir=workdirs/probe_lm
  .venv/bin/python -m experiments.probe --config=configs/probe.py:digits --workdir=workdirs/probe_vit
  .venv/bin/python -m experiments.probe --config=configs/probe.py:digit_arith --workdir=workdirs/probe_vlm
  .venv/bin/python -m experiments.probe --config=configs/probe.py:reverse --workdir=workdirs/probe_s2s

Trains with `experiments.trainer.train_and_evaluate` (or loads `config.probe.checkpoint`, or a
local Hugging Face checkpoint `config.probe.hf_path` through `attnjax.models.hf_import`), then
captures attention on `config.probe.num_batches` eval batches and writes `probes.json` and PNG
figures into the workdir. The probes that apply depend on the model kind (`TASK_KIND`):

* `lm` (DecoderLM on `lm` / `mqar`): `LM_PROBES`, per-head heat maps (`<metric>.png`).
* `vit` (ViT on `digits`): `VIT_PROBES`; `cls_attention.png`: the class token's attention over
  the patch grid, per layer and head, next to each input digit.
* `vlm` (ImageTextLM on `digit_arith`): `VLM_PROBES` (attention at the answer position);
  `answer_attention.png`: the answer query's attention over the image grid per layer, with the
  share that stays on text.
* `seq2seq` (EncoderDecoder on `reverse`): `SEQ2SEQ_PROBES`; `cross_attention.png`: the
  aggregated cross-attention map, the gradient x input saliency map and each cross head.

Bad config values: one line and exit 2 (`experiments.guards`).
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
from attnjax.analysis import heads, multimodal, saliency, sinks
from attnjax.data import mqar as mqar_data
from experiments import guards
from experiments import tasks as tasks_lib


def _define_flags():
  """The entry point's flags, defined only when run as a program: `experiments.compare` defines
  `--config` too, and both modules are imported by the test suite in one process."""
  config_flags.DEFINE_config_file("config", None, "Path to configs/probe.py (or similar).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (created if missing).")

LM_PROBES = ("sink_mass", "sink_rate", "dormant", "entropy", "attention_distance", "value_drain",
             "act_sinks", "head_importance", "key_mass_first")
PROBES = LM_PROBES  # the decoder-LM probes (kept under their first name)
VIT_PROBES = ("sink_mass", "entropy", "attention_distance", "cls_map_entropy", "fiqa_score",
              "head_importance")
VLM_PROBES = ("modality_share", "aei_image", "modality_dominance", "visual_map_entropy", "vhd",
              "vhr_accuracy", "image_centric", "var_accuracy", "sgl_accuracy", "head_importance")
SEQ2SEQ_PROBES = ("cross_alignment", "cross_head_alignment", "cross_entropy", "cross_pearson",
                  "cross_spearman", "cross_explained", "head_importance")
KIND_PROBES = {"lm": LM_PROBES, "vit": VIT_PROBES, "vlm": VLM_PROBES, "seq2seq": SEQ2SEQ_PROBES}
ALL_PROBES = tuple(sorted(set().union(*KIND_PROBES.values())))
TASK_KIND = {"lm": "lm", "mqar": "lm", "digits": "vit", "digit_arith": "vlm", "reverse": "seq2seq"}


def model_kind(config) -> str:
  return "lm" if config.probe.get("hf_path") else TASK_KIND[config.task]


def probe_names(config) -> list[str]:
  """`config.probe.probes` as a list; a probe that does not apply to the model kind is a
  `guards.ConfigError` (one line, exit 2)."""
  names = [s.strip() for s in str(config.probe.probes).split(",") if s.strip()]
  kind = model_kind(config)
  bad = [n for n in names if n not in KIND_PROBES[kind]]
  if bad or not names:
    raise guards.ConfigError("probe.probes", config.probe.probes,
                             f"{bad or 'none'} do not apply to a {kind} model; choose from "
                             f"{list(KIND_PROBES[kind])}")
  return names


def _inputs(batch):
  """Model input tokens `[B, T]` of an eval batch (MQAR batch or LM tokens `[B, T + 1]`)."""
  return batch.inputs if isinstance(batch, mqar_data.MQARBatch) else batch[:, :-1]


def get_model(config, workdir: str | None):
  """`(model, task, summary)`: trained now, restored from `config.probe.checkpoint`, or loaded
  from the Hugging Face checkpoint directory `config.probe.hf_path` (a decoder LM, probed on the
  config's eval batches: their token ids must be below the checkpoint's vocabulary size)."""
  task = tasks_lib.make_task(config)
  hf_path = config.probe.get("hf_path")
  if hf_path:
    from attnjax.models import hf_import  # pylint: disable=import-outside-toplevel
    loaded = hf_import.load_pretrained(hf_path)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    return model, task, {"hf_path": hf_path}
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


def _head_importance(model, task, batch):
  layers = cap.attention_layers(model)
  with cap.head_scaling(model, lambda m: task.loss(m, batch)[0]) as loss_fn:
    return heads.head_importance(loss_fn, len(layers), layers[0][1].num_heads)


def _mean(per_batch: dict[str, list]) -> dict[str, Any]:
  return {n: np.mean(np.stack([np.asarray(v, np.float64) for v in vals]), 0).tolist()
          for n, vals in per_batch.items() if vals}


def _bar(config, total: int, desc: str):
  return tqdm(total=total, desc=desc, dynamic_ncols=True,
              disable=not config.train.get("progress", True))


# ----------------------------------------------------------------------------------------------
# Decoder LM (lm, mqar, Hugging Face)
# ----------------------------------------------------------------------------------------------

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


def _probe_lm(model, task, config, names, batches):
  array_names = tuple(n for n in names if n != "head_importance")
  kinds = ("weights", "values") if set(array_names) - {"key_mass_first"} else ()
  if "key_mass_first" in names:
    kinds = kinds + ("key_mass",)
  run = nnx.jit(lambda m, x: cap.run(m, x))
  per_batch: dict[str, list] = {n: [] for n in names}
  bar = _bar(config, len(batches) * (1 + ("head_importance" in names)), "probes (lm)")
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
        per_batch[n].append(v)
      bar.update(1)
    if "head_importance" in names:
      per_batch["head_importance"].append(_head_importance(model, task, batch))
      bar.update(1)
  bar.close()
  return _mean(per_batch), {}


# ----------------------------------------------------------------------------------------------
# ViT (digits)
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("names", "grid", "patch"))
def _vit_metrics(a, s, *, names, grid, patch):
  """`a`: `[L, B, H, 1 + N, 1 + N]` weights (class token first), `s`: last layer's scores."""
  n = grid[0] * grid[1]
  out = {}
  for name in names:
    if name == "sink_mass":  # attention on the class token
      out[name] = sinks.sink_mass(a).mean(1)
    elif name == "entropy":
      out[name] = jnp.stack([heads.head_entropy(al) for al in a]) / jnp.log(n + 1)
    elif name == "attention_distance":  # in input pixels, patch-to-patch weights renormalised
      pp = a[..., 1:, 1:]
      pp = pp / jnp.maximum(jnp.sum(pp, -1, keepdims=True), 1e-30)
      pos = heads.grid_positions(*grid, patch_size=patch)
      out[name] = jnp.stack([heads.mean_attention_distance(al, pos) for al in pp])
    elif name == "cls_map_entropy":  # the class token's map over patches, fraction of log N
      out[name] = jnp.mean(multimodal.attention_map_entropy(a[..., 0, 1:]), 1) / jnp.log(n)
    elif name == "fiqa_score":
      out[name] = jnp.mean(saliency.fiqa_score(s, drop_cls=True))
  return out


def _probe_vit(model, task, config, names, batches):
  grid, patch = tuple(model.grid), model.patch_size
  array_names = tuple(n for n in names if n != "head_importance")
  run = nnx.jit(lambda m, x: cap.run(m, x))
  per_batch: dict[str, list] = {n: [] for n in names}
  figs = {}
  bar = _bar(config, len(batches) * (1 + ("head_importance" in names)), "probes (vit)")
  for i, batch in enumerate(batches):
    x, y = batch
    with cap.capturing(model, ("weights", "scores")):
      logits, inter = run(model, x)
    a = cap.stack(inter, "weights")
    if array_names:
      vals = _vit_metrics(a, cap.stack(inter, "scores")[-1], names=array_names, grid=grid, patch=patch)
      for n, v in vals.items():
        per_batch[n].append(v)
    if i == 0:
      k = min(int(config.probe.num_examples), x.shape[0])
      figs["cls_attention"] = {
          "images": np.asarray(x[:k, ..., 0]), "labels": np.asarray(y[:k]),
          "pred": np.asarray(jnp.argmax(logits[:k], -1)),
          "maps": np.asarray(a[:, :k, :, 0, 1:]).reshape(a.shape[0], k, a.shape[2], *grid)}
    bar.update(1)
    if "head_importance" in names:
      per_batch["head_importance"].append(_head_importance(model, task, batch))
      bar.update(1)
  bar.close()
  return _mean(per_batch), figs


# ----------------------------------------------------------------------------------------------
# Image + text decoder (digit_arith)
# ----------------------------------------------------------------------------------------------

def _answer_accuracy(model, x, tok, **kwargs):
  logits = model(x, tok[:, :-1], **kwargs)[:, -1]
  return jnp.mean(jnp.argmax(logits, -1) == tok[:, -1])


@functools.partial(jax.jit, static_argnames=("n_img", "names"))
def _vlm_arrays(a, sink, *, n_img, names):
  """Attention-only multimodal probes of one batch at the answer query (the last position).

  `a`: `[L, B, H, T, T]` weights (image keys `< n_img`), `sink`: `[B, T]` sink tokens.
  """
  t = a.shape[-1]
  img = jnp.arange(t) < n_img
  last = jnp.arange(t) == t - 1
  ans = a[:, :, :, -1, :]
  out = {}
  for name in names:
    if name == "modality_share":  # attention share on image keys, [L, H]
      out[name] = jnp.sum(jnp.where(img, ans, 0.0), -1).mean(1)
    elif name == "aei_image":
      out[name] = jnp.stack([multimodal.modality_aei(al, img, query_mask=last).mean() for al in a])
    elif name == "modality_dominance":
      out[name] = jnp.stack([multimodal.modality_dominance(al, ~img, query_mask=last).mean() for al in a])
    elif name == "visual_map_entropy":  # fraction of log N
      out[name] = jnp.mean(multimodal.attention_map_entropy(ans[..., :n_img]), 1) / jnp.log(n_img)
    elif name == "image_centric":  # fraction of examples whose answer row is image-centric
      out[name] = jnp.stack([multimodal.image_centric_heads(al, sink, img)[..., -1].mean(0) for al in a])
  return out


def _pruned_accuracy(model, x, tok, idx):
  """Answer accuracy when only the joint-sequence positions `idx [B, K]` are kept (SGL)."""
  e = model.embed_inputs(x, tok[:, :-1])
  logits = model.from_embeddings(multimodal.sgl_prune(e, idx))[:, -1]
  return jnp.mean(jnp.argmax(logits, -1) == tok[:, -1])


def _probe_vlm(model, task, config, names, batches):
  """Multimodal probes at the answer query (the last prompt position, `=`)."""
  n_img = model.num_patches
  pc = config.probe
  run = nnx.jit(lambda m, x, t: cap.run(m, x, t))
  acc = nnx.jit(_answer_accuracy)
  pruned = nnx.jit(_pruned_accuracy)
  per_batch: dict[str, list] = {n: [] for n in names + ["accuracy"]}
  figs = {}
  bar = _bar(config, len(batches) * len(names), "probes (vlm)")
  for i, batch in enumerate(batches):
    x, tok = batch
    prompt = tok[:, :-1]
    t = n_img + prompt.shape[1]
    img = jnp.arange(t) < n_img
    last = jnp.arange(t) == t - 1
    with cap.capturing(model, ("weights", "head_outputs")):
      _, inter = run(model, x, prompt)
      _, inter0 = run(model, jnp.zeros_like(x), prompt)   # the same prompt, a blank image
    a = cap.stack(inter, "weights")                         # [L, B, H, T, T]
    base = acc(model, x, tok)
    per_batch["accuracy"].append(base)
    ans = a[:, :, :, -1, :]                                 # [L, B, H, T] the answer query's row
    vhd = multimodal.vhd(cap.stack(inter, "head_outputs")[:, :, -1],
                         cap.stack(inter0, "head_outputs")[:, :, -1]).mean(1)  # [L, H]
    # Sinks (a reading: the paper finds them by massive-activation dimensions): keys whose
    # received attention, averaged over the queries that see them, exceeds act_threshold in
    # some layer and head (ACT's criterion, the first such key included).
    recv = jnp.sum(a, -2) / (t - jnp.arange(t))                                   # [L, B, H, T]
    sink = jnp.any(recv > pc.act_threshold, axis=(0, 2))                         # [B, T]
    if {"image_centric", "var_accuracy"} & set(names):  # how many sinks that criterion finds
      per_batch.setdefault("sink_tokens", []).append(jnp.sum(sink, -1).mean())
      per_batch.setdefault("image_sink_tokens", []).append(jnp.sum(sink & img, -1).mean())
    arrays = _vlm_arrays(a, sink, n_img=n_img, names=tuple(names))
    for name in names:
      if name in arrays:
        per_batch[name].append(arrays[name])
      elif name == "vhd":
        per_batch[name].append(vhd)
      elif name == "vhr_accuracy":  # the top-k vision-aware heads scaled by alpha
        cap.set_head_scale(model, multimodal.vhr_head_scale(vhd, top_k=min(pc.vhr_top_k, vhd.size),
                                                            alpha=pc.vhr_alpha))
        try:
          per_batch[name].append(acc(model, x, tok) - base)
        finally:
          cap.set_head_scale(model, None)
      elif name == "var_accuracy":
        def var(al, sink=sink):
          sel = multimodal.image_centric_heads(al, sink, img)
          return multimodal.var_redistribute(al, sink, img, sel, p=pc.var_p)
        cap.set_weights_transform(model, var)
        try:
          per_batch[name].append(acc(model, x, tok) - base)
        finally:
          cap.set_weights_transform(model, None)
      elif name == "sgl_accuracy":  # the model guides its own pruning, and random pruning
        imp = multimodal.visual_token_importance(a, img, last)
        rand = jnp.asarray(np.random.default_rng(i).random(imp.shape), jnp.float32)
        keep = lambda scores: multimodal.sgl_keep_indices(scores, img, keep_ratio=pc.sgl_keep_ratio)
        per_batch[name].append(jnp.stack([pruned(model, x, tok, keep(imp)) - base,
                                          pruned(model, x, tok, keep(rand)) - base]))
      elif name == "head_importance":
        per_batch[name].append(_head_importance(model, task, batch))
      bar.update(1)
    if i == 0:
      k = min(int(pc.num_examples), x.shape[0])
      figs["answer_attention"] = {
          "images": np.asarray(x[:k, ..., 0]), "tokens": np.asarray(tok[:k]),
          "maps": np.asarray(ans[:, :k].mean(2)[..., :n_img]).reshape(a.shape[0], k, *model.grid),
          "text_share": np.asarray(jnp.sum(jnp.where(img, 0.0, ans[:, :k].mean(2)), -1))}
  bar.close()
  out = _mean(per_batch)
  if "sgl_accuracy" in out:  # [guided - base, random - base]
    out["sgl_accuracy"], out["sgl_random_accuracy"] = out["sgl_accuracy"]
  return out, figs


# ----------------------------------------------------------------------------------------------
# Encoder-decoder (reverse)
# ----------------------------------------------------------------------------------------------

def _saliency(model, src, tgt_in, tgt):
  """Gradient x input of each target token's log-probability w.r.t. the source tokens:
  `|d log p(y_t) / d src_scale_s|`, `[B, T, S]` (the embeddings are scaled by ones)."""
  def logp(scale):
    lp = jax.nn.log_softmax(model(src, tgt_in, src_scale=scale).astype(jnp.float32), -1)
    return jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0].sum(0)      # [T]
  jac = jax.jacrev(logp)(jnp.ones(src.shape, jnp.float32))               # [T, B, S]
  return jnp.abs(jnp.moveaxis(jac, 0, 1))


def _probe_seq2seq(model, task, config, names, batches):
  run = nnx.jit(lambda m, s, t: cap.run(m, s, t))
  sal_fn = nnx.jit(_saliency)
  per_batch: dict[str, list] = {n: [] for n in names}
  figs = {}
  bar = _bar(config, len(batches) * (1 + ("head_importance" in names)), "probes (seq2seq)")
  for i, batch in enumerate(batches):
    src, tgt = batch
    tgt_in = tasks_lib.teacher_forced(tgt)
    with cap.capturing(model, ("weights",), select="cross"):
      _, inter = run(model, src, tgt_in)
    a = cap.stack(inter, "weights", select="cross")                  # [L, B, H, T, S]
    agg = saliency.aggregate_cross_attention(a)                      # [B, T, S]
    s_len = a.shape[-1]
    ref = s_len - 1 - jnp.arange(a.shape[-2])                        # reversal's alignment
    sal = sal_fn(model, src, tgt_in, tgt) if {"cross_pearson", "cross_spearman",
                                              "cross_explained"} & set(names) else None
    for name in names:
      if name == "cross_alignment":
        per_batch[name].append(jnp.mean(jnp.argmax(agg, -1) == ref))
      elif name == "cross_head_alignment":
        per_batch[name].append(jnp.mean(jnp.argmax(a, -1) == ref, axis=(1, 3)))   # [L, H]
      elif name == "cross_entropy":
        per_batch[name].append(jnp.stack([heads.head_entropy(al) for al in a]) / jnp.log(s_len))
      elif name == "cross_pearson":
        per_batch[name].append(jnp.mean(saliency.pearson(agg, sal)))
      elif name == "cross_spearman":
        per_batch[name].append(jnp.mean(saliency.spearman(agg, sal)))
      elif name == "cross_explained":
        per_batch[name].append(jnp.mean(saliency.explained_fraction(agg, sal)))
    bar.update(1)
    if "head_importance" in names:
      per_batch["head_importance"].append(_head_importance(model, task, batch))
      bar.update(1)
    if i == 0:
      k = min(int(config.probe.num_examples), src.shape[0])
      figs["cross_attention"] = {"src": np.asarray(src[:k]), "tgt": np.asarray(tgt[:k]),
                                 "agg": np.asarray(agg[:k]), "heads": np.asarray(a[:, :k]),
                                 "saliency": None if sal is None else np.asarray(sal[:k])}
  bar.close()
  out = _mean(per_batch)
  out["attention_layers"] = ["/".join(str(p) for p in path) for path, _ in cap.attention_layers(model)]
  return out, figs


_KIND_RUN = {"lm": _probe_lm, "vit": _probe_vit, "vlm": _probe_vlm, "seq2seq": _probe_seq2seq}


def run_probes(model, task, config, *, return_figures: bool = False):
  """Every probe in `config.probe.probes` on the first `num_batches` eval batches.

  Returns the metrics (`{name: value}`; per layer x head where a probe has one), and with
  `return_figures=True` also the arrays the kind's figures are drawn from.
  """
  names = probe_names(config)
  batches = task.eval_batches[: config.probe.num_batches]
  metrics, figs = _KIND_RUN[model_kind(config)](model, task, config, names, batches)
  return (metrics, figs) if return_figures else metrics


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save(fig, path, plt):
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_figures(metrics: dict[str, Any], workdir: str, figs: dict[str, Any] | None = None,
                  *, layer_names: list[str] | None = None) -> list[str]:
  """One heat map (layers x heads) per per-head metric, plus the kind's map figures (`figs`
  from `run_probes(..., return_figures=True)`); returns the paths written."""
  plt = _plt()
  paths = []
  for name, val in metrics.items():
    if name == "attention_layers":
      continue
    arr = np.asarray(val)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
      continue
    rows = layer_names if layer_names and len(layer_names) == arr.shape[0] else None
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * arr.shape[1] + (1.5 if rows else 0),
                                    1.0 + 0.5 * arr.shape[0]))
    im = ax.imshow(arr, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(arr):
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=7)
    ax.set_xlabel("head"); ax.set_ylabel("layer"); ax.set_title(name)
    ax.set_xticks(range(arr.shape[1])); ax.set_yticks(range(arr.shape[0]))
    if rows:
      ax.set_yticklabels(rows, fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    paths.append(_save(fig, os.path.join(workdir, f"{name}.png"), plt))
  figs = figs or {}
  if "cls_attention" in figs:
    paths.append(_cls_figure(figs["cls_attention"], workdir, plt))
  if "answer_attention" in figs:
    paths.append(_answer_figure(figs["answer_attention"], workdir, plt))
  if "cross_attention" in figs:
    paths.append(_cross_figure(figs["cross_attention"], workdir, plt))
  return paths


def _overlay(ax, attn_map, image):
  """The map over the patch grid (scaled to its max), with the digit's outline on top."""
  size = image.shape[-1]
  ax.imshow(attn_map / max(float(attn_map.max()), 1e-12), cmap="inferno", vmin=0, vmax=1,
            extent=(0, size, size, 0), interpolation="nearest")
  c = np.arange(size) + 0.5
  ax.contour(c, c, image, levels=[0.35], colors="cyan", linewidths=0.8)


def _cls_figure(f, workdir, plt):
  """Rows: examples; columns: the digit, then the class token's attention over the patch grid
  for each layer and head, each scaled to its max, with the digit's outline in cyan."""
  maps, imgs = f["maps"], f["images"]                      # [L, K, H, gh, gw], [K, S, S]
  n_l, k, n_h = maps.shape[:3]
  fig, axes = plt.subplots(k, 1 + n_l * n_h, figsize=(1.3 * (1 + n_l * n_h), 1.4 * k), squeeze=False)
  for r in range(k):
    axes[r, 0].imshow(imgs[r], cmap="gray_r")
    axes[r, 0].set_title(f"label {f['labels'][r]}, pred {f['pred'][r]}", fontsize=7)
    for l in range(n_l):
      for h in range(n_h):
        ax = axes[r, 1 + l * n_h + h]
        _overlay(ax, maps[l, r, h], imgs[r])
        if r == 0:
          ax.set_title(f"L{l} H{h}", fontsize=8)
  for ax in axes.ravel():
    ax.set_xticks([]); ax.set_yticks([])
  fig.suptitle("class-token attention over the patch grid (each map scaled to its max; "
               "digit outline in cyan)", fontsize=9)
  fig.tight_layout()
  return _save(fig, os.path.join(workdir, "cls_attention.png"), plt)


def _answer_figure(f, workdir, plt):
  """Rows: examples; columns: the digit with its prompt, then the answer query's attention over
  the image grid (head mean) per layer; the title gives the share left on text tokens."""
  from attnjax.data import synthetic  # pylint: disable=import-outside-toplevel
  maps, imgs, tok = f["maps"], f["images"], f["tokens"]  # [L, K, gh, gw], [K, S, S], [K, 4]
  n_l, k = maps.shape[:2]
  sym = {synthetic.PLUS: "+", synthetic.MINUS: "-", synthetic.EQUALS: "="}
  fig, axes = plt.subplots(k, 1 + n_l, figsize=(1.6 * (1 + n_l), 1.5 * k), squeeze=False)
  for r in range(k):
    prompt = " ".join(sym.get(int(v), str(int(v))) for v in tok[r, :3])
    axes[r, 0].imshow(imgs[r], cmap="gray_r")
    axes[r, 0].set_title(f"img {prompt} {int(tok[r, 3])}", fontsize=7)
    for l in range(n_l):
      ax = axes[r, 1 + l]
      _overlay(ax, maps[l, r], imgs[r])
      ax.set_title(f"L{l}: text {f['text_share'][l, r]:.2f}", fontsize=7)
  for ax in axes.ravel():
    ax.set_xticks([]); ax.set_yticks([])
  fig.suptitle("answer-token attention over the image (head mean, scaled to its max)", fontsize=9)
  fig.tight_layout()
  return _save(fig, os.path.join(workdir, "answer_attention.png"), plt)


def _cross_figure(f, workdir, plt):
  """Example 0. Top row: the aggregated cross-attention (target x source) and the gradient x
  input saliency map; then one row per decoder layer with its cross-attention heads. The
  reference alignment of reversal is the anti-diagonal."""
  hs = f["heads"][:, 0]                                   # [L, H, T, S]
  n_l, n_h = hs.shape[:2]
  top = [("mean cross-attention", f["agg"][0])]
  if f["saliency"] is not None:
    top.append(("grad x input saliency", f["saliency"][0]))
  cols = max(n_h, len(top))
  fig, axes = plt.subplots(1 + n_l, cols, figsize=(2.1 * cols, 2.2 * (1 + n_l)), squeeze=False)
  panels = [(axes[0, j], t, m) for j, (t, m) in enumerate(top)]
  panels += [(axes[1 + l, h], f"cross L{l} H{h}", hs[l, h]) for l in range(n_l) for h in range(n_h)]
  used = {id(ax) for ax, _, _ in panels}
  for ax in axes.ravel():
    if id(ax) not in used:
      ax.axis("off")
  src, tgt = [str(int(v)) for v in f["src"][0]], [str(int(v)) for v in f["tgt"][0]]
  for ax, title, m in panels:
    ax.imshow(m, cmap="viridis")
    ax.set_title(title, fontsize=8)
    ax.set_xticks(range(len(src)), src, fontsize=5)
    ax.set_yticks(range(len(tgt)), tgt, fontsize=5)
  axes[0, 0].set_xlabel("source token", fontsize=7)
  axes[0, 0].set_ylabel("target token", fontsize=7)
  fig.tight_layout()
  return _save(fig, os.path.join(workdir, "cross_attention.png"), plt)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def _finite_json(v):
  """NaN / inf become None so that probes.json is strict JSON."""
  if isinstance(v, float):
    return v if np.isfinite(v) else None
  if isinstance(v, list):
    return [_finite_json(x) for x in v]
  return v


def probe(config, workdir: str) -> dict[str, Any]:
  guards.validate(config)
  probe_names(config)  # before training: a probe that does not apply fails now
  os.makedirs(workdir, exist_ok=True)
  model, task, summary = get_model(config, workdir)
  metrics, figs = run_probes(model, task, config, return_figures=True)
  out = {"task": config.task, "kind": model_kind(config),
         "mixer": tasks_lib.layer_mixers(config.model),
         "train": {k: v for k, v in summary.items()
                   if k in ("final_eval", "steps", "checkpoint", "hf_path")},
         "metrics": {k: _finite_json(v) for k, v in metrics.items()}}
  with open(os.path.join(workdir, "probes.json"), "w") as f:
    json.dump(out, f, indent=1)
  out["figures"] = (write_figures(metrics, workdir, figs, layer_names=metrics.get("attention_layers"))
                    if config.probe.figures else [])
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join("workdirs", f"probe_{config.task}")
  guards.exit_on_run_error(lambda: (guards.validate(config), probe_names(config)))
  logging.info("config:\n%s", config)
  out = guards.exit_on_run_error(lambda: probe(config, workdir))
  m = out["metrics"]
  print(json.dumps({k: m[k] for k in m if np.ndim(m[k]) == 0} | {"final_eval": out["train"].get("final_eval")}))
  print(f"wrote {os.path.join(workdir, 'probes.json')} and {len(out['figures'])} figures")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=guards.parse_flags)
