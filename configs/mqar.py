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

Deviations from Zoology (Arora et al. 2023, arXiv:2312.04927; HazyResearch/zoology, the paper's
figure-2 sweep `zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py` and the current
`zoology/experiments/mqar_example_configs/original_mqar_configs.py`), all to fit a 2-core CPU:

| | Zoology | this default |
|---|---|---|
| vocab | 8192 | 512 |
| seq / kv pairs | 64/4, 128/8, 256/16 (up to 512/64) | 64 / 8 |
| train examples | 100k (seq 64), 20k (longer) | 20k |
| d_model | 64, 128, 256, 512 | 64 (128 with `--widths`) |
| heads | 1 (paper's attention), 2 (current repo) | 2 |
| short conv | none before attention in the paper; a BaseConv (kernel 3 + long conv) in front of every mixer in the current repo | a depth-wise causal conv of width 3 before every mixer |
| positions | learned absolute for attention, none otherwise | none |
| dropout | 0.1 (attention, embeddings) | none |
| lr | swept: logspace(-4, -2, 4) (paper), logspace(-3, -1.5, 4) (current repo); best per model | 3e-3, no sweep |
| schedule | AdamW (0.9, 0.999), wd 0.1, cosine per epoch, no warm-up, no clipping | AdamW (0.9, 0.98), wd 0.1, 100 warm-up steps, cosine per step, clip 1.0 |
| length | 64 epochs (32 in the current repo) at batch 512 (~12.5k steps), early stop at 0.99 | 600 steps at batch 64 (~2 epochs) |

Zoology's own setting: the `zoology` preset (seq 64, 4 kv pairs, vocab 8192, 100k examples,
d_model 64, no short conv, learned positions, no warm-up or clipping, torch's Adam betas, 12.5k
steps at batch 512) with `experiments.compare --zoology` (its lr sweep, best lr per mixer):
  .venv/bin/python -m experiments.compare --config=configs/mqar.py:zoology --zoology \
      --mixers=softmax,gla,retnet --workdir=workdirs/zoology
That is about a day per run on this CPU; the CPU-sized cut of it (fewer steps at a smaller batch,
everything else Zoology's) and its result are in `benchmarks/mqar_zoology_cpu.md`.
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
  elif arg == "zoology":  # Zoology's figure-2 cell seq 64 / 4 kv pairs at d_model 64 (see above)
    c.data.vocab_size, c.data.seq_len, c.data.num_kv_pairs = 8192, 64, 4
    c.data.num_train, c.data.num_test = 100_000, 3_000
    c.model.num_heads, c.model.short_conv, c.model.pos_emb = 2, 0, "learned"
    c.optim.lr, c.optim.warmup_steps, c.optim.b2 = 1e-3, 0, 0.999   # lr: swept by compare --zoology
    c.optim.clip_norm = 1e9                                         # Zoology does not clip
    c.train.batch_size, c.train.steps, c.train.eval_every = 512, 12_500, 500
  elif arg:
    raise ValueError(f"unknown preset {arg!r} for configs/mqar.py; known: 'tiny', 'zoology'")
  return c
