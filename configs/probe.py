r"""Probe a tiny trained LM: train with the project's trainer, then run attention probes.

Command (trains the byte-level LM of `configs/lm_tiny.py` for 300 steps, then probes it):
  .venv/bin/python -m experiments.probe --config=configs/probe.py --workdir=workdirs/probe_lm
MQAR instead of text: `--config=configs/probe.py:mqar`. Probe a saved checkpoint (written by
`experiments.train` with `--config.checkpoint.every=N`) instead of training:
`--config.probe.checkpoint=workdirs/<run>/checkpoints`.

Writes `probes.json` (every metric, per layer x head where it has one) and one PNG heat map per
per-head metric (`<metric>.png`, layers down, heads across) into the workdir.
Measured (2026-12-03, 2-core CPU under load, ~9 min of which 8 training): eval next-byte accuracy
0.609 (loss 1.50) after 300 steps; sink rate 0.0 at eps=0.3 (the windows are random crops of the
corpus, so token 0 is no BOS and no head parks on it: sink mass 0.017-0.033 per head); no dormant
head; head importance (loss increase when masked) 0.05-0.72, largest for layer 1 head 3; mean
attention distance 2.8-14.3 tokens (layer 1 holds the local heads); the streamed key mass of
token 0 equals the explicit sink mass.

Probes (`probe.probes`, comma separated): sink_mass, sink_rate, dormant, entropy,
attention_distance, value_drain, act_sinks, head_importance, key_mass_first.
"""

import ml_collections

from configs import lm_tiny, mqar


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  base, _, size = (arg or "lm").partition(",")
  if base not in ("lm", "mqar"):
    raise ValueError(f"configs/probe.py: base must be 'lm' or 'mqar', got {base!r}")
  c = lm_tiny.get_config(size or None) if base == "lm" else mqar.get_config(size or None)
  c.probe = ml_collections.ConfigDict()
  c.probe.checkpoint = ml_collections.config_dict.placeholder(str)
  c.probe.probes = ("sink_mass,sink_rate,dormant,entropy,attention_distance,value_drain,act_sinks,"
                    "head_importance,key_mass_first")
  c.probe.num_batches = 2          # eval batches the probes average over
  c.probe.sink_eps = 0.3           # [32] sink-rate threshold
  c.probe.dormant_threshold = 0.9  # [99] sink mass above which a head counts as dormant
  c.probe.act_threshold = 0.1      # [15] ACT's THRES
  c.probe.figures = True
  return c
