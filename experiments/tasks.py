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

from attnjax.data import images, mqar, selective_copy, synthetic, text
from attnjax.models import DecoderLM, ViT
from attnjax.models.image_text import ImageTextLM
from attnjax.models.seq2seq import EncoderDecoder


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
  """Byte-level LM: standard-library source text by default, or `data.path`; `data.bos` (a byte
  id, e.g. 0) puts that token at position 0 of every window."""
  d = config.data
  bos = d.get("bos", None)
  corpus = text.load_corpus(d.get("path"), d.get("max_bytes"))
  split = int(len(corpus) * 0.95)
  train, test = corpus[:split], corpus[split:]
  loader = text.WindowLoader(train, config.train.batch_size, d.seq_len, seed=config.seed, bos=bos)
  eval_loader = text.WindowLoader(test, config.train.batch_size, d.seq_len, seed=config.seed + 1,
                                  bos=bos)
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


def build_image_text(config, rngs: nnx.Rngs) -> ImageTextLM:
  m = config.model
  return ImageTextLM(image_size=config.data.image_size, patch_size=m.patch_size, in_channels=1,
                     vocab_size=synthetic.ARITH_VOCAB, d_model=m.d_model, num_layers=m.num_layers,
                     num_heads=m.num_heads, mixer=m.mixer, mixer_options=m.mixer_options.to_dict(),
                     mlp_ratio=m.mlp_ratio, max_text_len=3, rngs=rngs)


def answer_loss(model: ImageTextLM, batch):
  """Cross-entropy and accuracy of the answer token, read at the last prompt position.

  `batch = (images [B, S, S, 1], tokens [B, 4])`: prompt `tokens[:, :3]`, answer `tokens[:, 3]`.
  """
  x, tok = batch
  logits = model(x, tok[:, :-1])[:, -1].astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, -1]).mean()
  return loss, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == tok[:, -1])}


def make_digit_arith(config) -> Task:
  """Digit image + prompt `[op, k, =]` -> `(label op k) mod 10` (`attnjax.data.synthetic`)."""
  d = config.data
  bs = config.train.batch_size
  split = {}
  for i, name in enumerate(("train", "test")):
    x, y = images.load_digits(name, seed=config.seed, image_size=d.image_size)
    split[name] = synthetic.digit_arithmetic(x, y, prompts_per_image=d.prompts_per_image,
                                             seed=config.seed + i)
  loader = images.ArrayLoader(*split["train"], bs, seed=config.seed)
  evals = [jax.tree.map(jnp.asarray, b) for b in images.eval_batches(*split["test"], bs)]
  return Task("digit_arith", loader, evals, answer_loss, build_image_text)


def build_seq2seq(config, rngs: nnx.Rngs) -> EncoderDecoder:
  m = config.model
  return EncoderDecoder(vocab_size=config.data.vocab_size, d_model=m.d_model,
                        num_layers=m.num_layers, num_heads=m.num_heads, mixer=m.mixer,
                        mixer_options=m.mixer_options.to_dict(), mlp_ratio=m.mlp_ratio, rngs=rngs)


def teacher_forced(tgt: jax.Array) -> jax.Array:
  """Decoder inputs `[BOS, tgt[:, :-1]]` for targets `tgt [B, T]`."""
  return jnp.concatenate([jnp.full_like(tgt[:, :1], synthetic.BOS), tgt[:, :-1]], axis=1)


def seq2seq_loss(model: EncoderDecoder, batch):
  """Teacher-forced cross-entropy and token accuracy of `batch = (src [B, S], tgt [B, T])`."""
  src, tgt = batch
  logits = model(src, teacher_forced(tgt)).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, tgt).mean()
  return loss, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == tgt)}


def make_reverse(config) -> Task:
  """Sequence reversal with an encoder-decoder (`attnjax.data.synthetic.reversal`)."""
  d = config.data
  bs = config.train.batch_size
  train = synthetic.reversal(d.num_train, d.seq_len, d.vocab_size, seed=config.seed)
  test = synthetic.reversal(d.num_test, d.seq_len, d.vocab_size, seed=config.seed + 1_000_003)
  loader = images.ArrayLoader(*train, bs, seed=config.seed)
  evals = [jax.tree.map(jnp.asarray, b) for b in images.eval_batches(*test, bs)]
  return Task("reverse", loader, evals, seq2seq_loss, build_seq2seq)


def make_selective_copy(config) -> Task:
  """Selective copying (`attnjax.data.selective_copy`): the MQAR loss at the marker positions."""
  d = config.data
  common = dict(vocab_size=d.vocab_size, seq_len=d.seq_len, num_tokens=d.num_tokens)
  train = selective_copy.selective_copy(num_examples=d.num_train, seed=config.seed, **common)
  test = selective_copy.selective_copy(num_examples=d.num_test, seed=config.seed + 1_000_003, **common)
  bs = config.train.batch_size
  eval_batches = [_to_jax(test.slice(slice(i, min(i + bs, len(test))))) for i in range(0, len(test), bs)]
  loader = mqar.MQARLoader(train, bs, seed=config.seed)
  return Task("selective_copy", loader, eval_batches, mqar_loss, build_decoder)


_TASKS = {"mqar": make_mqar, "lm": make_lm, "digits": make_digits, "selective_copy": make_selective_copy,
          "digit_arith": make_digit_arith, "reverse": make_reverse}


def registered_tasks() -> tuple[str, ...]:
  """The task names `make_task` knows (other modules may add to them)."""
  return tuple(sorted(_TASKS))


def make_task(config) -> Task:
  if config.task not in _TASKS:
    raise ValueError(f"unknown task {config.task!r}; known: {sorted(_TASKS)}")
  return _TASKS[config.task](config)


def to_device(batch):
  return _to_jax(batch) if isinstance(batch, mqar.MQARBatch) else jax.tree.map(jnp.asarray, batch)


def count_params(model: nnx.Module) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
