r"""A small MosaicBERT on byte-level masked LM over standard-library source text (no download).

Command:
  .venv/bin/python -m experiments.train --config=configs/mlm_mosaic_bert.py --workdir=workdirs/mlm_mosaic_bert
Any registered non-causal mixer replaces the ALiBi softmax attention: `--config.model.mixer=linear`
(ALiBi is then off; the mixer's own options go in `--config.model.mixer_options.<name>=...`).
Padded + masked instead of unpadded: `--config.model.unpad=False`. Low-precision LayerNorm:
`--config.model.ln_dtype=bfloat16`.

Setting: rows of 32..128 bytes (at most 1,536 real tokens a batch of 16, the packed row's size),
30% masking with 80/10/10 for training and 15% for the held-out last 5% (MosaicBERT's choices),
vocabulary 320 (258 symbols rounded to a multiple of 64), 2 post-LN layers, d_model 128, 4 heads,
GeGLU ratio 2, 300 steps of AdamW (lr 1e-3, b2 0.98). Reports masked-byte loss / accuracy at 15%
masking. Measured (2-core CPU shared by eight people, load ~20, 2026-12-03, softmax + ALiBi,
unpadded): eval_accuracy 0.373 / 0.404 / 0.433 at steps 100 / 200 / 300 (eval_loss 2.223 nats;
uniform over bytes is 5.55), 387,264 parameters, 30 min 44 s wall (the load, not the model: a quiet
machine should take a few minutes).
"""

import ml_collections

from configs import mqar


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = mqar.get_config()
  c.task = "mlm"
  c.data = ml_collections.ConfigDict()
  c.data.seq_len = 128
  c.data.min_len = 32
  c.data.packed_tokens = 1536
  c.data.mask_prob = 0.3
  c.data.eval_mask_prob = 0.15
  c.data.path = ml_collections.config_dict.placeholder(str)
  c.data.max_bytes = ml_collections.config_dict.placeholder(int)
  c.data.num_eval_batches = 8
  c.model = ml_collections.ConfigDict()
  c.model.encoder = "mosaic_bert"
  c.model.mixer = "softmax"
  c.model.mixer_options = ml_collections.ConfigDict()
  c.model.d_model = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.mlp_ratio = 2.0
  c.model.alibi = ml_collections.config_dict.placeholder(bool)  # None: on for softmax only
  c.model.ln_dtype = "float32"
  c.model.unpad = True
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 1e-5
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.eval_every = 100
  if arg == "tiny":  # for tests: a few seconds
    c.data.seq_len, c.data.min_len, c.data.packed_tokens = 24, 8, 120
    c.data.max_bytes, c.data.num_eval_batches = 200_000, 2
    c.model.d_model, c.model.num_heads, c.model.num_layers = 32, 2, 1
    c.train.steps, c.train.eval_every, c.train.batch_size = 20, 10, 8
    c.train.progress = False
  elif arg:
    raise ValueError(f"unknown preset {arg!r} for configs/mlm_mosaic_bert.py; known: 'tiny'")
  return c
