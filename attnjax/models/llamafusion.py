"""LlamaFusion (Shi et al., 2024, arXiv 2412.15188): a frozen text-only LM plus trainable image
modules in a Mixture-of-Transformers.

Each block keeps the pretrained LM's weights for text tokens (modality 0) and gets a parallel set
of image weights (modality 1: QKV/O projections, FFN, norms); the self-attention over the
interleaved sequence is shared, so text tokens read image tokens there. The text modules (and the
token embedding / tied head, the text final norm) are frozen; only the image modules and the image
input projection are trained. Text-only input therefore reproduces the base LM's logits, and stays
so through training.

`llamafusion_from_decoder` builds the model from a trained `DecoderLM`; the image modules start as
copies of the text modules (`init_image="copy"`, LlamaFusion's initialisation from the LM's
weights) or at random (`"random"`). `param_labels(params)` labels every parameter `"frozen"` /
`"trainable"`; `optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
param_labels)` (what `experiments.trainer.make_optimizer` builds from a task's labels) gives the
frozen parameters an update of exactly zero: their values stay bit-identical, and the optimizer
keeps no moments for them.

The paper trains image tokens with a diffusion loss on VAE latents; here the image modality takes
continuous patches through a linear `patch_in` and the toy task (`experiments.tasks`, "digits_text")
trains on next-token prediction of the text that follows the image.
"""

from __future__ import annotations

import jax
from flax import nnx

from attnjax.models.decoder import DecoderLM
from attnjax.models.mot import MixtureOfTransformers, load_decoder_into_modality

TEXT, IMAGE = 0, 1
INIT_IMAGE = ("copy", "random")


def llamafusion_from_decoder(decoder, *, patch_dim: int, init_image: str = "copy",
                             rngs: nnx.Rngs) -> MixtureOfTransformers:
  """A two-modality MoT whose text weights are `decoder`'s (a plain softmax `DecoderLM`, see
  `load_decoder_into_modality`) and whose image weights are a copy of them or random."""
  if init_image not in INIT_IMAGE:
    raise ValueError(f"init_image must be one of {INIT_IMAGE}, got {init_image!r}")
  blk = decoder.blocks[0]
  mix = blk.mixer
  model = MixtureOfTransformers(
      vocab_size=decoder.vocab_size, d_model=decoder.d_model, num_layers=len(decoder.blocks),
      num_heads=mix.num_heads, num_kv_heads=mix.num_kv_heads, qk_norm=mix.q_norm is not None,
      mlp_ratio=blk.mlp.gate.out_features / decoder.d_model, causal=mix.causal,
      num_modalities=2, patch_dim=patch_dim, image_modality=IMAGE, rngs=rngs)
  load_decoder_into_modality(model, decoder, TEXT)
  if init_image == "copy":
    load_decoder_into_modality(model, decoder, IMAGE, embedding=False)
  return model


def decoder_from_checkpoint(checkpoint_dir: str, *, step: int | None = None, **sizes):
  """The plain softmax `DecoderLM(**sizes)` with the parameters of an orbax checkpoint directory
  (the trainer's `<workdir>/checkpoints`, latest step by default)."""
  from attnjax.distributed import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  from attnjax.distributed import sharding as sh  # pylint: disable=import-outside-toplevel
  base = nnx.eval_shape(lambda: DecoderLM(**sizes, rngs=nnx.Rngs(0)))
  return ckpt.restore_model_for_inference(checkpoint_dir, base, sh.make_mesh({}, jax.devices()[:1]),
                                          step=step)


def _is_frozen(path) -> bool:
  keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
  if keys and keys[0] == "embed":
    return True
  for group in ("towers", "final_norms"):
    if group in keys:
      i = keys.index(group)
      return i + 1 < len(keys) and keys[i + 1] == TEXT
  return False


def param_labels(params):
  """`"frozen"` for the text modules, token embedding and text final norm; `"trainable"` else."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if _is_frozen(path) else "trainable", params)
