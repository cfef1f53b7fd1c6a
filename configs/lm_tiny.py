r"""A tiny byte-level language model on standard-library source text (no download), CPU-sized.

Command:
  .venv/bin/python -m experiments.train --config=configs/lm_tiny.py --config.model.mixer=softmax \
      --workdir=workdirs/lm_tiny_softmax
Any registered mixer, or one per layer: `--config.model.layer_mixers=sliding_window,softmax`.
Your own text: `--config.data.path=/path/to/file.txt`.

Setting: 256-byte vocabulary, seq 128, batch 16, 2 layers, d_model 128, 4 heads, SwiGLU MLP
(ratio 4), 300 steps of AdamW (lr 2e-3). Reports next-byte loss and accuracy on the held-out last
5% of the corpus.
"""

import ml_collections

from configs import mqar


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = mqar.get_config()
  c.task = "lm"
  c.data = ml_collections.ConfigDict()
  c.data.vocab_size = 256
  c.data.seq_len = 128
  c.data.path = ml_collections.config_dict.placeholder(str)
  c.data.max_bytes = ml_collections.config_dict.placeholder(int)
  c.data.num_eval_batches = 8
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.mlp_ratio = 4.0
  c.model.short_conv = 0
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.eval_every = 100
  if arg == "tiny":  # for tests: a few seconds
    c.data.seq_len, c.data.num_eval_batches, c.data.max_bytes = 32, 2, 200_000
    c.model.d_model, c.model.num_heads, c.model.mlp_ratio = 32, 2, 2.0
    c.train.steps, c.train.eval_every, c.train.batch_size = 30, 15, 8
    c.train.progress = False
  elif arg:
    raise ValueError(f"unknown preset {arg!r} for configs/lm_tiny.py; known: 'tiny'")
  return c
