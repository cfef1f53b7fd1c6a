"""Tasks the trainer can run: a data source plus a loss on a model's outputs.

A task has `train_loader` (an iterator with `state()`/`restore()`), `eval_batches` (a list),
`loss(model, batch) -> (loss, metrics)` and `build_model(config, rngs)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attnjax.data import graphs, images, mlm, mqar, selective_copy, synthetic, text
from attnjax.models import DecoderLM, GraphTransformer, MosaicBERT, ViT, bam, llamafusion, mot
from attnjax.models.image_text import ImageTextLM
from attnjax.models.patnet import PATNet
from attnjax.models.seq2seq import EncoderDecoder


@dataclasses.dataclass
class Task:
  name: str
  train_loader: Any
  eval_batches: list
  loss: Callable[[nnx.Module, Any], tuple[jax.Array, dict[str, jax.Array]]]
  build_model: Callable[..., nnx.Module]
  # fn(params) -> "trainable" | "frozen" per leaf; None trains everything (see trainer.make_optimizer).
  param_labels: Callable[[Any], Any] | None = None


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
  build = {"decoder": build_decoder, "parallel": build_parallel, "bam": build_bam}[
      config.model.get("arch", "decoder")]
  return Task("lm", loader, eval_batches, lm_loss, build)


def base_checkpoints(config) -> str:
  """`<model.base_workdir>/checkpoints`: the trained run a model is built from."""
  return os.path.join(config.model.base_workdir, "checkpoints")


@contextlib.contextmanager
def _base_fits(config):
  """A base checkpoint of other sizes is a config error naming `model.base_workdir`."""
  from attnjax.distributed import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  from experiments import guards  # pylint: disable=import-outside-toplevel
  try:
    yield
  except (ckpt.CheckpointMismatch, FileNotFoundError) as e:
    raise guards.ConfigError("model.base_workdir", config.model.base_workdir,
                             f"its checkpoint does not fit this model: {' '.join(str(e).split())}") from None


def build_parallel(config, rngs: nnx.Rngs) -> bam.ParallelDecoderLM:
  """The dense parallel-attention LM (BAM's seed model)."""
  m = config.model
  return bam.ParallelDecoderLM(vocab_size=config.data.vocab_size, d_model=m.d_model,
                               num_layers=m.num_layers, num_heads=m.num_heads,
                               mlp_ratio=m.mlp_ratio, rngs=rngs)


def build_bam(config, rngs: nnx.Rngs) -> bam.BAMLM:
  """BAM upcycled from the dense parallel LM of `model.base_workdir`, `model.num_experts` copies
  with `model.upcycle_noise` relative noise on the expert weights."""
  m = config.model
  with _base_fits(config):
    return bam.upcycle_from_checkpoints(
        [base_checkpoints(config)], copies=m.num_experts, vocab_size=config.data.vocab_size,
        d_model=m.d_model, num_layers=m.num_layers, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
        top_k=m.top_k, shared_kv=m.shared_kv, aux_weight=m.aux_weight, noise=m.upcycle_noise,
        rngs=rngs)


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


def digits_batches(config):
  """`(train loader, eval batches)` of the digits at `data.image_size` (images `[B, S, S, 1]`,
  labels `[B]`), shared by the image tasks."""
  x_train, y_train = images.load_digits("train", seed=config.seed, image_size=config.data.image_size)
  x_test, y_test = images.load_digits("test", seed=config.seed, image_size=config.data.image_size)
  bs = config.train.batch_size
  loader = images.ArrayLoader(x_train, y_train, bs, seed=config.seed)
  return loader, [jax.tree.map(jnp.asarray, b) for b in images.eval_batches(x_test, y_test, bs)]


def make_digits(config) -> Task:
  """scikit-learn's bundled 8x8 digits (`data.image_size` upsamples), 10-way classification."""
  loader, evals = digits_batches(config)
  return Task("digits", loader, evals, classification_loss, build_image_model)


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




# Image + text: an 8x8 digit as patch tokens (image modality), then text (modality 0) naming it.
DIGITS_PROMPT = b" digit="


def digits_text_inputs(images: jax.Array, patch_size: int):
  """`images [B, S, S, 1]` -> `(tokens, modality, patches)` `[B, P + len(prompt)]` (`[.., p*p]`):
  the `P = (S / p)^2` patches (row-major) as image positions, then the prompt's bytes as text."""
  b, s = images.shape[0], images.shape[1]
  g = s // patch_size
  patches = images[..., 0].reshape(b, g, patch_size, g, patch_size).transpose(0, 1, 3, 2, 4)
  patches = patches.reshape(b, g * g, patch_size * patch_size)
  n_text = len(DIGITS_PROMPT)
  tokens = jnp.concatenate([jnp.zeros((b, g * g), jnp.int32),
                            jnp.broadcast_to(jnp.array(list(DIGITS_PROMPT), jnp.int32), (b, n_text))], 1)
  modality = jnp.concatenate([jnp.ones((b, g * g), jnp.int32), jnp.zeros((b, n_text), jnp.int32)], 1)
  patches = jnp.concatenate([patches, jnp.zeros((b, n_text, patches.shape[-1]), patches.dtype)], 1)
  return tokens, modality, patches


def digits_text_loss(model: nnx.Module, batch, *, patch_size: int):
  """Next-token cross-entropy of the label's byte (`"0"`..`"9"`, out of all 256) at the prompt's
  last position; accuracy of its argmax."""
  x, y = batch
  tokens, modality, patches = digits_text_inputs(x, patch_size)
  h = model.hidden(tokens, modality, patches=patches)[:, -1]
  logits = model.logits(h).astype(jnp.float32)
  target = y + ord("0")
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
  return loss, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == target)}


def build_digits_text(config, rngs: nnx.Rngs) -> nnx.Module:
  """`model.arch="mot"`: a Mixture-of-Transformers from scratch; `"llamafusion"`: the text-only
  `DecoderLM` of `model.base_workdir` (an lm run of the same sizes) fused with new image modules."""
  m, p = config.model, config.model.patch_size
  if m.arch == "mot":
    return mot.MixtureOfTransformers(vocab_size=config.data.vocab_size, d_model=m.d_model,
                                     num_layers=m.num_layers, num_heads=m.num_heads,
                                     mlp_ratio=m.mlp_ratio, patch_dim=p * p, rngs=rngs)
  with _base_fits(config):
    base = llamafusion.decoder_from_checkpoint(
        base_checkpoints(config), vocab_size=config.data.vocab_size, d_model=m.d_model,
        num_layers=m.num_layers, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio)
  return llamafusion.llamafusion_from_decoder(base, patch_dim=p * p, init_image=m.init_image,
                                              rngs=rngs)


def make_digits_text(config) -> Task:
  """Digits as image patches followed by text whose next byte is the label (MoT / LlamaFusion)."""
  loader, evals = digits_batches(config)
  loss = functools.partial(digits_text_loss, patch_size=config.model.patch_size)
  labels = llamafusion.param_labels if config.model.arch == "llamafusion" else None
  return Task("digits_text", loader, evals, loss, build_digits_text, labels)




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
          "digit_arith": make_digit_arith, "reverse": make_reverse,
          "digits_text": make_digits_text, "mlm": make_mlm, "graph": make_graph}


def registered_tasks() -> tuple[str, ...]:
  """The task names `make_task` knows (other modules may add to them)."""
  return tuple(sorted(_TASKS))


def model_builder(config) -> Callable[..., nnx.Module]:
  """`build_model(config, rngs)` of `config.task` without generating its data, for the tasks whose
  model does not depend on the data (the sequence tasks); others fall back to `make_task`."""
  if config.task in ("mqar", "selective_copy"):
    return build_decoder
  if config.task == "lm":
    return {"decoder": build_decoder, "parallel": build_parallel, "bam": build_bam}[
        config.model.get("arch", "decoder")]
  return make_task(config).build_model


def make_task(config) -> Task:
  if config.task not in _TASKS:
    raise ValueError(f"unknown task {config.task!r}; known: {sorted(_TASKS)}")
  return _TASKS[config.task](config)


def to_device(batch):
  return _to_jax(batch) if isinstance(batch, mqar.MQARBatch) else jax.tree.map(jnp.asarray, batch)


def count_params(model: nnx.Module) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
