r"""Attention entropy collapse at a high learning rate, and sigmaReparam on Q/K preventing it.

Command:
  .venv/bin/python -m experiments.probe_repro --config=configs/probe_entropy.py \
      --workdir=workdirs/probe_entropy --config.repro.record=True
Tiny preset (tests): `--config=configs/probe_entropy.py:tiny`.

Setting: byte LM (seq 64, 2 layers, d_model 64, 4 heads), AdamW at a high learning rate with a
short warm-up; the same model with `SigmaReparamLinear` (Zhai et al., 2023, arXiv 2303.06296) in
place of the projections named by `repro.reparam`. Mean attention entropy on held-out windows every
`repro.probe_every` steps, and the final held-out loss, for both.
Measured (2026-12-03, 2-core CPU shared by many jobs, ~12 min per variant, one process each via
`--config.repro.variants=plain` / `=sigma_reparam`): at lr 1e-2 the plain model's mean attention
entropy falls 2.84 -> 0.60 nats by step 200 and stays there (0.62 at 300); with sigmaReparam on Q/K
it falls 3.16 -> 1.84 and levels off. Held-out loss 1.802 (plain) vs 1.847 (sigmaReparam): the
collapse is prevented, but at this scale the collapsed plain model neither diverges nor trains
worse (the paper ties collapse to instability at larger scale). Control, plain at lr 2e-3 with 50
warm-up steps (`--config.optim.lr=2e-3 --config.optim.warmup_steps=50`, row `entropy@lr2e-3`):
entropy 2.84 -> 1.82, loss 1.967, so the collapse comes with the high learning rate. Figure:
`benchmarks/probe_entropy_vs_step.png`.
"""

import ml_collections

from configs import lm_tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = lm_tiny.get_config()
  c.data.seq_len = 64
  c.data.num_eval_batches = 4
  c.model.d_model, c.model.num_layers, c.model.num_heads = 64, 2, 4
  c.train.steps, c.train.batch_size = 300, 16
  c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 1e-2, 5, 0.0
  c.repro = ml_collections.ConfigDict()
  c.repro.mode = "entropy"
  c.repro.variants = "plain,sigma_reparam"   # one process each: --config.repro.variants=plain
  c.repro.reparam = "q_proj,k_proj"
  c.repro.probe_every = 25
  c.repro.num_probe_batches = 2
  c.repro.record = False
  c.repro.tag = ""   # records a variant setting as its own row, `<mode>@<tag>`
  if arg == "tiny":
    c.data.seq_len, c.data.num_eval_batches, c.data.max_bytes = 16, 1, 100_000
    c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.mlp_ratio = 16, 1, 2, 2.0
    c.train.steps, c.train.batch_size, c.train.progress = 2, 4, False
    c.repro.probe_every, c.repro.num_probe_batches = 1, 1
  elif arg:
    raise ValueError(f"unknown preset {arg!r} for configs/probe_entropy.py; known: 'tiny'")
  return c
