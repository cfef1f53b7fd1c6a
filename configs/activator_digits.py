r"""Activator (Abdullah & Aydin 2024, arXiv 2405.15953) on the 8x8 digits: the ViT of
`configs/vit_digits.py` with every attention layer replaced by the Activator GLU unit.

Command:
  .venv/bin/python -m experiments.train --config=configs/activator_digits.py --workdir=workdirs/activator_digits
The authors' "only GEGLU" model (no second MLP): add `--config.model.mlp_ratio=0`.

Setting: as `configs/vit_digits.py` (16x16 images, patch 2: 64 tokens, 2 layers, d_model 64, 400
steps of AdamW, batch 64), but `pool="mean"`: the Activator reads no other token, so a class token
would see nothing (the authors pool globally too); GLU width 128. Measured (2026-12-03, a shared
2-core CPU at load ~15-30, so wall times are not speed measurements): default command:
eval_accuracy 0.574 / 0.827 / 0.836 / 0.864 after 100 / 200 / 300 / 400 steps (eval_loss 0.777 at
400), 104,842 parameters, 680 s wall on a loaded CPU: without token mixing it trails the ViT
(0.925) and NiNformer (0.967).
"""

import ml_collections

from configs import vit_digits


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = vit_digits.get_config(arg)
  c.model.mixer = "activator"
  c.model.pool = "mean"
  c.model.mixer_options = ml_collections.ConfigDict({"hidden": 2 * c.model.d_model})
  return c
