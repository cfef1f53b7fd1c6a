r"""Selective copying (Gu & Dao 2023, Mamba, arXiv:2312.00752): copy the data tokens, skipping the
noise between them, at the markers that end the sequence. CPU-sized.

Command (one mixer):
  .venv/bin/python -m experiments.train --config=configs/selective_copy.py \
      --config.model.mixer=softmax --workdir=workdirs/selective_copy_softmax
Several mixers: `experiments.compare --config=configs/selective_copy.py --mixers=...`, or the CAB
suite (`experiments.cab`, quality part).

Setting: vocab 16 (0 noise, 1..14 data, 15 marker, as Mamba's), seq 64 of which the last 8 are
markers and 8 data tokens are spread over the first 56 (Mamba: seq 4096, 16 tokens), 20k training /
1k test examples, the MQAR model (2 layers, d_model 64, 2 heads, no MLP, short conv 3), 600 steps of
AdamW (peak lr 3e-3), batch 64; accuracy at the marker positions. Measured: see
`configs/cab.py` (quality part).
"""

import ml_collections

from configs import mqar


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = mqar.get_config()
  c.task = "selective_copy"
  c.data = ml_collections.ConfigDict()  # the MQAR data fields do not apply
  c.data.vocab_size = 16
  c.data.seq_len = 64
  c.data.num_tokens = 8
  c.data.num_train = 20_000
  c.data.num_test = 1_000
  if arg == "tiny":  # for tests: a few seconds
    c.data.seq_len, c.data.num_tokens, c.data.num_train, c.data.num_test = 24, 4, 256, 64
    c.model.d_model = 32
    c.train.steps, c.train.eval_every, c.train.batch_size = 10, 5, 32
    c.train.progress = False
  elif arg:
    raise ValueError(f"unknown preset {arg!r} for configs/selective_copy.py; known: 'tiny'")
  return c
