r"""A small ViT on scikit-learn's bundled 8x8 digits (no download), CPU-sized.

Command:
  .venv/bin/python -m experiments.train --config=configs/vit_digits.py --workdir=workdirs/vit_digits
Any non-causal registered mixer: `--config.model.mixer=linear_elu`, or one per layer with
`--config.model.layer_mixers=...`.

Setting: images upsampled to 16x16, patch 2 (an 8x8 grid of 64 tokens plus a class token),
2 layers, d_model 64, 4 heads, 400 steps of AdamW (lr 2e-3), batch 64; 1,438 train and 359 test
images. Reports held-out accuracy. Measured (2-core CPU, 2026-12-03, softmax): eval_accuracy
0.925 after 400 steps, 44 s.
"""

import ml_collections

from configs import mqar


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = mqar.get_config()
  c.task = "digits"
  c.data = ml_collections.ConfigDict()  # the MQAR data fields do not apply
  c.data.image_size = 16
  c.model.patch_size = 2
  c.model.d_model = 64
  c.model.num_heads = 4
  c.model.mlp_ratio = 2.0
  c.model.short_conv = 0
  c.model.pool = "cls"
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 40
  c.train.steps = 400
  c.train.batch_size = 64
  c.train.eval_every = 100
  if arg == "tiny":  # for tests: a few seconds
    c.data.image_size = 8
    c.model.d_model, c.model.num_heads = 32, 2
    c.optim.lr, c.optim.warmup_steps = 5e-3, 5
    c.train.steps, c.train.eval_every, c.train.batch_size = 40, 20, 32
    c.train.progress = False
  elif arg:
    raise ValueError(f"unknown preset {arg!r} for configs/vit_digits.py; known: 'tiny'")
  return c
