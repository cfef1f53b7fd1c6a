r"""NiNformer (Abdullah & Aydin 2024, arXiv 2403.02411) on the 8x8 digits: the ViT of
`configs/vit_digits.py` with every attention layer replaced by NiNformer's Mixer Gating Unit.

Command:
  .venv/bin/python -m experiments.train --config=configs/ninformer_digits.py --workdir=workdirs/ninformer_digits

Setting: as `configs/vit_digits.py` (16x16 images, patch 2: 64 tokens, 2 layers, d_model 64, 400
steps of AdamW, batch 64), but `pool="mean"` (the authors' global average pooling, and a fixed
token count for the token MLP: `mixer_options.seq_len = 64`), gate MLP width 128. Measured
(2026-12-03, a shared 2-core CPU at load ~15-30, so wall times are not speed measurements):
default command: eval_accuracy 0.922 / 0.950 / 0.950 / 0.967 after 100 / 200 / 300 / 400 steps
(eval_loss 0.120 at 400), 129,674 parameters, 735 s wall on a loaded CPU (vit_digits softmax:
0.925 after 400 steps).
"""

import ml_collections

from configs import vit_digits


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = vit_digits.get_config(arg)
  c.model.mixer = "ninformer"
  c.model.pool = "mean"
  grid = c.data.image_size // c.model.patch_size
  c.model.mixer_options = ml_collections.ConfigDict({"seq_len": grid * grid, "hidden": 2 * c.model.d_model})
  return c
