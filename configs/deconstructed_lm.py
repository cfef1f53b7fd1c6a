r"""Deconstructing Attention's weight-source variants (Xue, Moosavi & Aletras 2025, arXiv
2510.11602) on the packaged byte-level LM task, uniform or interleaved with softmax layers.

Commands (preset = variant, optionally "_hybrid": softmax in even layers, the variant in odd ones):
  .venv/bin/python -m experiments.train --config=configs/deconstructed_lm.py:static \
      --workdir=workdirs/dec_static
  .venv/bin/python -m experiments.train --config=configs/deconstructed_lm.py:random_hybrid \
      --workdir=workdirs/dec_random_hybrid
Presets: softmax (the control), static (StaticEmbQK: Q, K from the layer-0 embeddings), random
(RndEmbQK: from fixed random embeddings), fixed (FixedSeqQK: sequence-independent weights), each
with or without `_hybrid`. Any other interleaving: `--config.model.layer_mixers=...`.

Setting: `configs/lm_tiny.py` (256-byte vocabulary, seq 128, batch 16, d_model 128, 4 heads,
SwiGLU ratio 4, 300 steps of AdamW lr 2e-3) with 2 layers; FixedSeqQK keeps its default 512
learned positions (>= seq 128).

Measured (2026-12-03, a shared 2-core CPU at load ~15-30, so wall times are not speed
measurements), held-out next-byte accuracy / loss after 100, 200, 300 steps: softmax 0.478, 0.582,
0.609 / 1.504 (557,696 parameters, 1,007 s wall); static (StaticEmbQK in both layers) 0.462,
0.564, 0.594 / 1.548 (557,952 parameters, 1,332 s wall). The random, fixed and hybrid presets were
not run (CPU time).
"""

import ml_collections

from configs import lm_tiny

VARIANTS = {"softmax": "softmax", "static": "static_emb_qk", "random": "rnd_emb_qk",
            "fixed": "fixed_seq_qk"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "static"
  name, hybrid = (arg[:-len("_hybrid")], True) if arg.endswith("_hybrid") else (arg, False)
  if name not in VARIANTS:
    raise ValueError(f"unknown preset {arg!r} for configs/deconstructed_lm.py; known: "
                     f"{', '.join(VARIANTS)} (each optionally with '_hybrid')")
  c = lm_tiny.get_config()
  c.model.num_layers = 2
  c.model.mixer = VARIANTS[name]
  if hybrid:
    c.model.layer_mixers = ",".join("softmax" if i % 2 == 0 else VARIANTS[name]
                                    for i in range(c.model.num_layers))
  return c
