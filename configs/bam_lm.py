r"""BAM (Branch-Attend-Mix) upcycling on byte-level text: a dense parallel-attention LM, then its
mixture of attention and FFN experts, CPU-sized.

Commands (the dense seed, then BAM from its checkpoint; and the dense model trained on for the
same steps as the baseline):
  .venv/bin/python -m experiments.train --config=configs/bam_lm.py:dense --workdir=workdirs/bam_dense
  .venv/bin/python -m experiments.train --config=configs/bam_lm.py \
      --config.model.base_workdir=workdirs/bam_dense --workdir=workdirs/bam
  .venv/bin/python -m experiments.train --config=configs/bam_lm.py:dense --config.train.steps=600 \
      --workdir=workdirs/bam_dense_600

Dense seed ("dense"): `ParallelDecoderLM`, `y = x + Attn(LN x) + FFN(LN x)`, 2 layers, d_model 64,
4 heads, SwiGLU ratio 4, seq 128, batch 16, 300 steps of AdamW (lr 2e-3). BAM (Zhang et al., 2024,
arXiv 2408.08274): E = 4 noisy copies (relative noise 0.01) of the seed become the attention
experts (soft routing) and FFN experts (top-2, Switch balance loss 0.01); routers random, the rest
averaged; 300 more steps. Measured: (pending).
"""

import ml_collections

from configs import lm_tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  tiny = arg in ("tiny", "dense_tiny")
  if arg not in (None, "tiny", "dense", "dense_tiny"):
    raise ValueError(f"unknown preset {arg!r} for configs/bam_lm.py; known: 'dense', "
                     "'dense_tiny', 'tiny'")
  c = lm_tiny.get_config("tiny" if tiny else None)
  c.model.d_model, c.model.num_heads, c.model.mlp_ratio = 64, 4, 4.0
  c.train.steps = 200
  if tiny:
    c.model.d_model, c.model.num_heads, c.model.num_layers = 16, 2, 1
    c.train.steps = 3
  if arg in ("dense", "dense_tiny"):
    c.model.arch = "parallel"
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = c.train.steps
    c.checkpoint.max_to_keep = 1
    c.checkpoint.async_save = False
    return c
  c.model.arch = "bam"
  c.model.base_workdir = ml_collections.config_dict.placeholder(str)  # the "dense" run's workdir
  c.model.num_experts = 2
  c.model.top_k = 1
  c.train.steps = 150 if not tiny else 3
  c.model.shared_kv = False
  c.model.aux_weight = 0.01
  c.model.upcycle_noise = 0.01
  return c
