"""Tasks the trainer can run: a data source plus a loss on a model's outputs.

A task has `train_loader` (an iterator with `state()`/`restore()`), `eval_batches` (a list),
`loss(model, batch) -> (loss, metrics)` and `build_model(config, rngs)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attnjax.data import images, mqar, text
from attnjax.models import DecoderLM, ViT
from attnjax.models.patnet import PATNet


@dataclasses.dataclass
class Task:
  name: str
  train_loader: Any
  eval_batches: list
  loss: Callable[[nnx.Module, Any], tuple[jax.Array, dict[str, jax.Array]]]
  build_model: Callable[..., nnx.Module]


def layer_mixers(model_config) -> str | list[str]:
  """`model.layer_mixers="gla,softmax"` (one per layer) overrides `model.mixer`."""
  names = model_config.get("layer_mixers")
  if names:
    names = [s.strip() for s in str(names).split(",") if s.strip()]
    if len(names) != model_config.num_layers:
      raise ValueError(f"model.layer_mixers lists {len(names)} mixers for num_layers={model_config.num_layers}")
    return names
  return model_config.mixer


def build_decoder(config, rngs: nnx.Rngs) -> DecoderLM:
  m = config.model
  return DecoderLM(vocab_size=config.data.vocab_size, d_model=m.d_model, num_layers=m.num_layers,
                   num_heads=m.num_heads, mixer=layer_mixers(m), mixer_options=m.mixer_options.to_dict(),
                   mlp_ratio=m.mlp_ratio, short_conv=m.short_conv, pos_emb=m.pos_emb,
                   max_len=config.data.seq_len, attn_res=m.get("attn_res", None),
                   attn_res_block_size=m.get("attn_res_block_size", 1), rngs=rngs)


def mqar_loss(model: DecoderLM, batch: mqar.MQARBatch):
  """Cross-entropy and accuracy at the queried positions only (logits for `kv` tokens per row)."""
  h = model.hidden(batch.inputs)
  hq = jnp.take_along_axis(h, batch.query_positions[..., None], axis=1)
  logits = model.logits(hq).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets).mean()
  acc = jnp.mean(jnp.argmax(logits, -1) == batch.targets)
  return loss, {"loss": loss, "accuracy": acc}


def _to_jax(batch: mqar.MQARBatch) -> mqar.MQARBatch:
  return jax.tree.map(jnp.asarray, batch)


jax.tree_util.register_dataclass(mqar.MQARBatch, data_fields=["inputs", "query_positions", "targets"],
                                 meta_fields=[])


def make_mqar(config) -> Task:
  d = config.data
  common = dict(vocab_size=d.vocab_size, seq_len=d.seq_len, num_kv_pairs=d.num_kv_pairs,
                power_a=d.power_a, random_non_queries=d.random_non_queries)
  train = mqar.multiquery_ar(num_examples=d.num_train, seed=config.seed, **common)
  test = mqar.multiquery_ar(num_examples=d.num_test, seed=config.seed + 1_000_003, **common)
  bs = config.train.batch_size
  eval_batches = [_to_jax(test.slice(slice(i, min(i + bs, len(test))))) for i in range(0, len(test), bs)]
  loader = mqar.MQARLoader(train, bs, seed=config.seed)
  return Task("mqar", loader, eval_batches, mqar_loss, build_decoder)


def lm_loss(model: DecoderLM, tokens: jax.Array):
  """Next-token cross-entropy over every position of `tokens [B, T + 1]`."""
  logits = model(tokens[:, :-1]).astype(jnp.float32)
  labels = tokens[:, 1:]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  acc = jnp.mean(jnp.argmax(logits, -1) == labels)
  return loss, {"loss": loss, "accuracy": acc}


def make_lm(config) -> Task:
  """Byte-level LM: standard-library source text by default, or `data.path`."""
  d = config.data
  corpus = text.load_corpus(d.get("path"), d.get("max_bytes"))
  split = int(len(corpus) * 0.95)
  train, test = corpus[:split], corpus[split:]
  loader = text.WindowLoader(train, config.train.batch_size, d.seq_len, seed=config.seed)
  eval_loader = text.WindowLoader(test, config.train.batch_size, d.seq_len, seed=config.seed + 1)
  eval_batches = [jnp.asarray(next(eval_loader)) for _ in range(d.num_eval_batches)]
  return Task("lm", loader, eval_batches, lm_loss, build_decoder)


def build_vit(config, rngs: nnx.Rngs) -> ViT:
  m = config.model
  return ViT(image_size=config.data.image_size, patch_size=m.patch_size, num_classes=10,
             d_model=m.d_model, num_layers=m.num_layers, num_heads=m.num_heads, in_channels=1,
             mixer=layer_mixers(m), mixer_options=m.mixer_options.to_dict(), mlp_ratio=m.mlp_ratio,
             pool=m.get("pool", "cls"), rngs=rngs)


def build_image_model(config, rngs: nnx.Rngs) -> nnx.Module:
  """`model.backbone`: "vit" (default; any registered mixer) or "patnet" (`attnjax.models.patnet`,
  its keyword arguments from `model.backbone_options`)."""
  if config.model.get("backbone", "vit") == "patnet":
    opts = dict(config.model.get("backbone_options", None) or {})
    return PATNet(image_size=config.data.image_size, in_channels=1, num_classes=10, rngs=rngs, **opts)
  return build_vit(config, rngs)


def classification_loss(model: nnx.Module, batch):
  """Cross-entropy and accuracy of `model(x) -> logits [B, classes]` on `batch = (x, labels [B])`."""
  x, y = batch
  logits = model(x).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}


def make_digits(config) -> Task:
  """scikit-learn's bundled 8x8 digits (`data.image_size` upsamples), 10-way classification."""
  d = config.data
  x_train, y_train = images.load_digits("train", seed=config.seed, image_size=d.image_size)
  x_test, y_test = images.load_digits("test", seed=config.seed, image_size=d.image_size)
  bs = config.train.batch_size
  loader = images.ArrayLoader(x_train, y_train, bs, seed=config.seed)
  evals = [jax.tree.map(jnp.asarray, b) for b in images.eval_batches(x_test, y_test, bs)]
  return Task("digits", loader, evals, classification_loss, build_image_model)


_TASKS = {"mqar": make_mqar, "lm": make_lm, "digits": make_digits}


def make_task(config) -> Task:
  if config.task not in _TASKS:
    raise ValueError(f"unknown task {config.task!r}; known: {sorted(_TASKS)}")
  return _TASKS[config.task](config)


def to_device(batch):
  return _to_jax(batch) if isinstance(batch, mqar.MQARBatch) else jax.tree.map(jnp.asarray, batch)


def count_params(model: nnx.Module) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
