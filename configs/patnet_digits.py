r"""PATNet (Huang et al. 2025, arXiv 2503.03148: partial convolution with PAT_ch / PAT_sp / PAT_sf)
on the 8x8 digits, CPU-sized.

Command:
  .venv/bin/python -m experiments.train --config=configs/patnet_digits.py --workdir=workdirs/patnet_digits
FasterNet's plain PConv for comparison: `--config.model.backbone_options.channel_attn=False
--config.model.backbone_options.spatial_attn=False`; partial ratio: `...backbone_options.n_div=2`.

Setting: images upsampled to 16x16, patch 2 (an 8x8 map), three stages of widths 32 / 64 / 128 and
depths 1 / 2 / 2 (maps 8x8, 4x4, 2x2), r = n_div = 4, MLP ratio 2, PAT_ch in stages 1-2, PAT_sf (4
heads) in the last, PAT_sp in every MLP, GELU, a 128-wide head; 400 steps of AdamW (lr 2e-3),
batch 64, as `configs/vit_digits.py`. BatchNorm runs on batch statistics (the trainer evaluates
the training-mode forward). Measured (2026-12-03, a shared 2-core CPU at load ~15-30, so wall
times are not speed measurements): default command: eval_accuracy 0.958 / 0.958 / 0.989 / 0.989
after 100 / 200 / 300 / 400 steps (eval_loss 0.034 at 400), 349,442 parameters, 1,360 s wall on a
loaded CPU (vit_digits softmax: 0.925 after 400 steps).
"""

import ml_collections

from configs import vit_digits


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = vit_digits.get_config(arg)
  c.model.backbone = "patnet"
  c.model.backbone_options = ml_collections.ConfigDict(dict(
      embed_dim=32, depths=(1, 2, 2), patch_size=2, mlp_ratio=2.0, n_div=4, channel_attn=True,
      spatial_attn=True, self_attn_last=True, num_heads=4, feature_dim=128, act="gelu"))
  if arg == "tiny":
    c.model.backbone_options.embed_dim = 16
    c.model.backbone_options.depths = (1, 1)
  return c
