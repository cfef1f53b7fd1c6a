r"""Probe a small trained model: train with the project's trainer, then run attention probes.

Commands (each trains its model, then probes it; `experiments/probe.py` lists the probes):
  .venv/bin/python -m experiments.probe --config=configs/probe.py --workdir=workdirs/probe_lm
  .venv/bin/python -m experiments.probe --config=configs/probe.py:digits --workdir=workdirs/probe_vit
  .venv/bin/python -m experiments.probe --config=configs/probe.py:digit_arith --workdir=workdirs/probe_vlm
  .venv/bin/python -m experiments.probe --config=configs/probe.py:reverse --workdir=workdirs/probe_s2s
MQAR instead of text: `:mqar`; a test-sized run: `:<base>,tiny`. Probe a saved checkpoint
(written by `experiments.train` with `--config.checkpoint.every=N`) instead of training:
`--config.probe.checkpoint=workdirs/<run>/checkpoints`; a local Hugging Face checkpoint directory
(a decoder LM, loaded by `attnjax.models.hf_import.load_pretrained`, probed with the LM probes
on the config's eval batches): `--config.probe.hf_path=<dir>`.

Writes `probes.json` (every metric, per layer x head where it has one) and PNG figures: one heat
map per per-head metric (`<metric>.png`, layers down, heads across) and the kind's maps
(`cls_attention.png`, `answer_attention.png`, `cross_attention.png`).

Measured, lm (2026-12-03, 2-core CPU under load, ~9 min of which 8 training): eval next-byte
accuracy 0.609 (loss 1.50) after 300 steps; sink rate 0.0 at eps=0.3 (the windows are random
crops of the corpus, so token 0 is no BOS and no head parks on it: sink mass 0.017-0.033 per
head); no dormant head; head importance (loss increase when masked) 0.05-0.72, largest for
layer 1 head 3; mean attention distance 2.8-14.3 tokens (layer 1 holds the local heads); the
streamed key mass of token 0 equals the explicit sink mass.
MEASURED_VIT
MEASURED_VLM
MEASURED_S2S
"""

import ml_collections

from configs import digit_arith, lm_tiny, mqar, reverse, vit_digits

_BASES = {"lm": lm_tiny, "mqar": mqar, "digits": vit_digits, "digit_arith": digit_arith,
          "reverse": reverse}
_PROBES = {
    "lm": "sink_mass,sink_rate,dormant,entropy,attention_distance,value_drain,act_sinks,"
          "head_importance,key_mass_first",
    "digits": "sink_mass,entropy,attention_distance,cls_map_entropy,fiqa_score,head_importance",
    "digit_arith": "modality_share,aei_image,modality_dominance,visual_map_entropy,vhd,vhr_accuracy,"
                   "image_centric,var_accuracy,sgl_accuracy,head_importance",
    "reverse": "cross_alignment,cross_head_alignment,cross_entropy,cross_pearson,cross_spearman,"
               "cross_explained,head_importance",
}
_PROBES["mqar"] = _PROBES["lm"]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  base, _, size = (arg or "lm").partition(",")
  if base not in _BASES:
    raise ValueError(f"configs/probe.py: base must be one of {sorted(_BASES)}, got {base!r}")
  c = _BASES[base].get_config(size or None)
  c.probe = ml_collections.ConfigDict()
  c.probe.checkpoint = ml_collections.config_dict.placeholder(str)
  c.probe.hf_path = ml_collections.config_dict.placeholder(str)
  c.probe.probes = _PROBES[base]
  c.probe.num_batches = 2          # eval batches the probes average over
  c.probe.num_examples = 4         # examples drawn in the map figures
  c.probe.sink_eps = 0.3           # [32] sink-rate threshold
  c.probe.dormant_threshold = 0.9  # [99] sink mass above which a head counts as dormant
  c.probe.act_threshold = 0.1      # [15] ACT's THRES (also the sink criterion of the VAR probe)
  c.probe.var_p = 0.6              # VAR (See What You Are Told): fraction of the sink attention moved to the image
  c.probe.vhr_top_k = 2            # VHR (vision-aware head divergence): heads amplified (top VHD over all layers) ...
  c.probe.vhr_alpha = 2.0          # ... by this factor
  c.probe.sgl_keep_ratio = 0.5     # SGL (small-model guidance): fraction of image tokens kept
  c.probe.figures = True
  if size == "tiny":
    c.probe.num_batches, c.probe.num_examples = 1, 2
  return c
