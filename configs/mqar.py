r"""MQAR (multi-query associative recall), Zoology-style, sized for a 2-core CPU.

Command (one mixer):
  .venv/bin/python -m experiments.train --config=configs/mqar.py --config.model.mixer=softmax \
      --workdir=workdirs/mqar_softmax
Command (the README's main job, several mixers on the same data, table + plot):
  .venv/bin/python -m experiments.compare --config=configs/mqar.py --mixers=softmax,sliding_window

Setting: vocab 512, seq 64, 8 kv pairs, 20k training / 1k test examples, batch 64, 2 layers,
d_model 64, 2 heads, no MLP, a causal depth-wise convolution of width 3 before each mixer, logits
only at the 8 queried positions, AdamW (peak lr 3e-3, 100 warm-up steps, cosine to 0, weight decay
0.1, clip 1.0). Measured result: see README "Results" (softmax reaches >= 0.99 test accuracy in
600 steps; the default sliding window of 16 keys cannot see keys further back and stays lower).

Zoology's grid is a flag away, e.g. `--config.data.vocab_size=8192 --config.data.seq_len=256
--config.data.num_kv_pairs=16 --config.data.num_train=100000 --config.model.d_model=128
--config.train.steps=20000 --config.train.batch_size=256`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "mqar"

  c.data = ml_collections.ConfigDict()
  c.data.vocab_size = 512
  c.data.seq_len = 64
  c.data.num_kv_pairs = 8
  c.data.num_train = 20_000
  c.data.num_test = 1_000
  c.data.power_a = 0.01
  c.data.random_non_queries = False

  c.model = ml_collections.ConfigDict()
  c.model.mixer = "softmax"
  c.model.mixer_options = ml_collections.ConfigDict()  # passed to the mixer builder
  c.model.layer_mixers = ml_collections.config_dict.placeholder(str)  # "gla,gla,softmax": per layer
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.mlp_ratio = 0.0
  c.model.short_conv = 3
  c.model.pos_emb = "none"

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.1
  c.optim.clip_norm = 1.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98

  c.train = ml_collections.ConfigDict()
  c.train.steps = 600
  c.train.batch_size = 64
  c.train.eval_every = 50
  c.train.log_every = 20
  c.train.progress = True
  # A non-finite loss or gradient norm: "stop" (exit non-zero naming the step; nothing non-finite
  # is checkpointed) or "skip" (optax.apply_if_finite drops the update; metrics count skipped_steps).
  c.train.nonfinite = "stop"

  if arg == "tiny":  # for tests: a few seconds
    c.data.num_train, c.data.num_test = 512, 128
    c.data.seq_len, c.data.num_kv_pairs = 32, 4
    c.model.d_model = 32
    c.train.steps, c.train.eval_every, c.train.batch_size = 20, 10, 32
    c.train.progress = False
  elif arg:
    raise ValueError(f"unknown preset {arg!r} for configs/mqar.py; known: 'tiny'")
  return c
