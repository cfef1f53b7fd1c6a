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

Measured, digits (ViT of `configs/vit_digits.py`, 400 steps; same day, 2-core CPU shared by
many jobs: 9.5 min training, under a minute probing 2 eval batches): held-out accuracy 0.925.
`cls_attention.png` (copied to benchmarks/probe_vit_digits.png): layer 0 heads 0-2 each put
their class-token attention on one or two patches (map entropy 0.26-0.56 of log 64) at nearly
the same place for every digit; head 3 and every layer-1 head spread over the strokes
(0.54-0.70). Attention on the class token itself 0.007-0.024 per head (no sink);
patch-to-patch attention distance 7.8-8.6 pixels, the uniform value on this 8x8 grid of 2-pixel
patches being about 8.3 (no local heads at this size); head importance 0.25-0.39 for layer 0,
-0.01-0.14 for layer 1 (the layer-0 heads carry the classification).

Measured, digit_arith (same day and machine; 1,500 training steps as `configs/digit_arith.py`,
probes on 2 eval batches of 64, 4 min 15 s): held-out answer accuracy 0.850 (0.883 on the
probed batches). Modality share at the answer query (attention on image keys, layers x heads)
[[0.64, 0.94, 0.91, 0.45], [0.77, 0.32, 0.05, 0.57]]: layer 0 reads the image, layer 1 head 2
reads the prompt (5% on the image); image AEI 0.87 / 0.51 and text-over-image dominance (MDI)
2.1 / 16.2 for layers 0 / 1 (the image is 16 of 19 tokens). `answer_attention.png`: for one
digit (a 6) with four prompts, layer 0 attends the same few stroke patches whatever the prompt,
layer 1 moves to the bottom of the digit and puts 0.26-0.46 on the text. VHD (with image vs a
blank image, answer position) 2.4-5.1 per head; scaling the top-2 VHD heads by 2 (VHR) costs
0.19 accuracy (this model was not trained to hallucinate, so amplifying heads only perturbs
it). The sink criterion (ACT's, threshold 0.1, any layer or head) marks many image tokens, so
few answer rows are image-centric (0-8%) and VAR (p=0.6) changes accuracy by -0.016. SGL
self-guided pruning to half the image tokens: -0.625 accuracy vs -0.664 for random pruning
(the 8x8 digits need most of their 16 patches). Head importance 0.19-2.03 (loss increase when
masked), every layer-0 head above 0.78.

Measured, reverse (same day and machine; 800 training steps as `configs/reverse.py`, probes on
2 eval batches, 2 min 13 s): held-out token accuracy 0.999. The aggregated cross-attention
(mean over layers and heads) puts its argmax on reversal's source token (target t -> source
11 - t) for 0.989 of target tokens; per head 0.95-0.97 in decoder layer 0 and 0.75-0.86 in
layer 1; cross-attention entropy 0.18-0.25 (layer 0) and 0.31-0.48 (layer 1) of log S.
Against the gradient x input saliency of each target token's log-probability w.r.t. the source
tokens: Pearson 0.65, Spearman 0.53, explained fraction (Pearson^2, per target token, then
averaged) 0.53, i.e. the aggregated cross-attention explains about half of the saliency map,
as the paper's title says for speech-to-text models. `cross_attention.png` shows the clean
anti-diagonal of every layer-0 head and the more spread saliency map. Head importance (rows:
`attention_layers` in probes.json): encoder layer 0 head 2 (2.39) and decoder layer 0's
self-attention head 3 (0.92) matter most; each layer-0 cross head alone costs <= 0.06 (the four
are redundant copies of the alignment), and decoder layer 1's self- and cross-attention heads
barely matter (|I| <= 0.006).
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
  c.probe.sink_eps = 0.3           # (Gu et al. 2024, arXiv:2410.10781) sink-rate threshold
  c.probe.dormant_threshold = 0.9  # (Guo et al. 2024, arXiv:2410.13835) sink mass above which a head counts as dormant
  c.probe.act_threshold = 0.1      # (Yu et al. 2024, arXiv:2406.15765) ACT's THRES (also the sink criterion of the VAR probe)
  c.probe.var_p = 0.6              # VAR (See What You Are Told): fraction of the sink attention moved to the image
  c.probe.vhr_top_k = 2            # VHR (vision-aware head divergence): heads amplified (top VHD over all layers) ...
  c.probe.vhr_alpha = 2.0          # ... by this factor
  c.probe.sgl_keep_ratio = 0.5     # SGL (small-model guidance): fraction of image tokens kept
  c.probe.figures = True
  if size == "tiny":
    c.probe.num_batches, c.probe.num_examples = 1, 2
  return c
