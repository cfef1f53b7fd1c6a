r"""LlamaFusion on digits-then-text: a trained byte-level LM, frozen, plus trainable image modules.

Commands (first the text-only base LM, then the fusion; the sizes must agree):
  .venv/bin/python -m experiments.train --config=configs/llamafusion_digits.py:base \
      --workdir=workdirs/lf_base
  .venv/bin/python -m experiments.train --config=configs/llamafusion_digits.py \
      --config.model.base_workdir=workdirs/lf_base --workdir=workdirs/llamafusion_digits

Base ("base" preset, task "lm"): a `DecoderLM` (2 layers, d_model 64, 4 heads, SwiGLU ratio 4) on
the packaged standard-library text, seq 128, batch 16, 200 steps, checkpointed. Fusion (task
"digits_text", see configs/mot_digits.py): the base's weights become the text modality of a
two-modality MoT (Shi et al., 2024, arXiv 2412.15188), the image modules start as a copy of them,
and only the image modules and the patch input train (text modules, embedding and head frozen:
optax.multi_transform with set_to_zero); 200 steps, batch 64, lr 2e-3.

Measured (2-core CPU shared by several jobs, 2026-12-03): base LM held-out next-byte loss 2.035,
accuracy 0.469 after 200 steps (147,776 parameters, 8 min 44 s wall, 43 s CPU); fusion held-out
digit accuracy 0.805 / 0.925 at steps 100 / 200 (eval loss 1.056; 279,488 parameters of which the
text half is frozen), 11 min 39 s wall, 46 s CPU. The base's text behaviour is unchanged by
construction (tested: text-only logits equal the base's, text weights bit-identical after training).
For comparison, configs/mot_digits.py (all weights trained from scratch) reaches 0.942 at step 200.
"""

import ml_collections

from configs import lm_tiny, mot_digits


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  tiny = arg in ("tiny", "base_tiny")
  if arg in ("base", "base_tiny"):
    c = lm_tiny.get_config("tiny" if tiny else None)
    c.model.d_model, c.model.num_heads, c.model.mlp_ratio = 64, 4, 4.0
    c.train.steps = 200
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 200
    c.checkpoint.max_to_keep = 1
    c.checkpoint.async_save = False
    if tiny:
      c.model.d_model, c.model.num_heads, c.model.num_layers, c.model.mlp_ratio = 16, 2, 1, 4.0
      c.train.steps = c.checkpoint.every = 3
    return c
  if arg not in (None, "tiny"):
    raise ValueError(f"unknown preset {arg!r} for configs/llamafusion_digits.py; known: 'base', "
                     "'base_tiny', 'tiny'")
  c = mot_digits.get_config("tiny" if tiny else None)
  c.model.arch = "llamafusion"
  c.model.base_workdir = ml_collections.config_dict.placeholder(str)  # the "base" run's workdir
  c.model.init_image = "copy"
  c.train.steps = 200
  if tiny:
    c.model.mlp_ratio = 4.0
  return c
