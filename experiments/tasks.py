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

from attnjax.data import graphs, images, mlm, mqar, text
from attnjax.models import DecoderLM, GraphTransformer, MosaicBERT, ViT


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
  return Task("digits", loader, evals, classification_loss, build_vit)


def build_mosaic_bert(config, rngs: nnx.Rngs) -> MosaicBERT:
  m, d = config.model, config.data
  return MosaicBERT(vocab_size=mlm.VOCAB_SIZE, d_model=m.d_model, num_layers=m.num_layers,
                    num_heads=m.num_heads, mixer=m.mixer, mixer_options=m.mixer_options.to_dict(),
                    mlp_ratio=m.mlp_ratio, alibi=m.get("alibi"), ln_dtype=m.get("ln_dtype", "float32"),
                    packed_len=d.get("packed_tokens") if m.get("unpad", True) else None, rngs=rngs)


# Encoders the "mlm" task can build (`model.encoder`): each takes the model config's mixer (any
# registered mixer with a non-causal pattern) and is called as `model(inputs, attention_mask)`.
ENCODERS = {"mosaic_bert": build_mosaic_bert}


def build_encoder(config, rngs: nnx.Rngs) -> nnx.Module:
  return ENCODERS[config.model.get("encoder", "mosaic_bert")](config, rngs)


def mlm_loss(model: nnx.Module, batch: dict):
  """Cross-entropy and accuracy at the chosen (masked) positions of an MLM batch
  (`attnjax.data.mlm`): `model(inputs [B, T], attention_mask [B, T]) -> logits [B, T, vocab]`."""
  logits = model(batch["inputs"], batch["attention_mask"]).astype(jnp.float32)
  w = batch["weights"]
  n = jnp.maximum(jnp.sum(w), 1.0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  loss = jnp.sum(ce * w) / n
  acc = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * w) / n
  return loss, {"loss": loss, "accuracy": acc}


def make_mlm(config) -> Task:
  """Byte-level masked LM on the packaged text (or `data.path`): rows of random length in
  `[data.min_len, data.seq_len]`, `data.mask_prob` masking for training and `data.eval_mask_prob`
  for the held-out last 5% (MosaicBERT: 0.3 and 0.15), at most `data.packed_tokens` real tokens a
  batch (the unpadded encoder's packed row)."""
  d = config.data
  corpus = text.load_corpus(d.get("path"), d.get("max_bytes"))
  split = int(len(corpus) * 0.95)
  common = dict(batch_size=config.train.batch_size, seq_len=d.seq_len, min_len=d.min_len,
                packed_tokens=d.get("packed_tokens"))
  loader = mlm.MLMLoader(corpus[:split], mask_prob=d.mask_prob, seed=config.seed, **common)
  eval_loader = mlm.MLMLoader(corpus[split:], mask_prob=d.eval_mask_prob, seed=config.seed + 1, **common)
  eval_batches = [jax.tree.map(jnp.asarray, next(eval_loader)) for _ in range(d.num_eval_batches)]
  return Task("mlm", loader, eval_batches, mlm_loss, build_encoder)


def build_graph_transformer(config, rngs: nnx.Rngs) -> GraphTransformer:
  m, d = config.model, config.data
  return GraphTransformer(num_node_types=d.num_classes + 1, num_classes=d.num_classes, d_model=m.d_model,
                          num_layers=m.num_layers, num_heads=m.num_heads, pe_dim=d.pe_dim, norm=m.norm,
                          edge_features=m.edge_features, score_clamp=m.get("score_clamp"), rngs=rngs)


def graph_loss(model: GraphTransformer, batch: dict):
  """Node-classification cross-entropy and accuracy over the real nodes of a padded graph batch;
  `batch["train"]` picks BatchNorm's batch (training) or running (eval) statistics."""
  logits = model(batch["node_types"], batch["adj"], batch["node_mask"], lap_pe=batch["lap_pe"],
                 training=batch["train"][0]).astype(jnp.float32)
  w = batch["node_mask"].astype(jnp.float32)
  n = jnp.maximum(jnp.sum(w), 1.0)
  loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]) * w) / n
  acc = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * w) / n
  return loss, {"loss": loss, "accuracy": acc}


def make_graph(config) -> Task:
  """Node classification on generated stochastic-block-model graphs (`attnjax.data.graphs`)."""
  d = config.data
  common = dict(min_nodes=d.min_nodes, max_nodes=d.max_nodes, num_classes=d.num_classes, p_in=d.p_in,
                p_out=d.p_out, pe_dim=d.pe_dim)
  train = graphs.sbm_graphs(d.num_train, seed=config.seed, **common)
  test = graphs.sbm_graphs(d.num_test, seed=config.seed + 1_000_003, **common)
  loader = graphs.GraphLoader(train, config.train.batch_size, seed=config.seed)
  evals = [jax.tree.map(jnp.asarray, b) for b in graphs.eval_batches(test, config.train.batch_size)]
  return Task("graph", loader, evals, graph_loss, build_graph_transformer)


_TASKS = {"mqar": make_mqar, "lm": make_lm, "digits": make_digits, "mlm": make_mlm, "graph": make_graph}


def make_task(config) -> Task:
  if config.task not in _TASKS:
    raise ValueError(f"unknown task {config.task!r}; known: {sorted(_TASKS)}")
  return _TASKS[config.task](config)


def to_device(batch):
  return _to_jax(batch) if isinstance(batch, mqar.MQARBatch) else jax.tree.map(jnp.asarray, batch)


def count_params(model: nnx.Module) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
