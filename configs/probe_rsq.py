r"""RSQ (token-importance-weighted GPTQ) vs plain GPTQ vs RTN on the attention projections of an LM.

Command:
  .venv/bin/python -m experiments.probe_repro --config=configs/probe_rsq.py \
      --workdir=workdirs/probe_rsq --config.repro.record=True
Tiny preset (tests): `--config=configs/probe_rsq.py:tiny`.

Setting: the byte LM of `configs/probe_sinks.py` (softmax, BOS at position 0) is trained for 300
steps, then the q/k/v projections of every attention layer are quantized per output row (4 and 3 bits) from
`repro.num_calib_batches` training batches: RTN, GPTQ (Hessian `X^T X`), and RSQ (Sung et al.,
2025, arXiv 2503.01820: Hessian weighted by AttnCon token importance in [1, 3]; no rotation).
Reported on held-out windows: the layer errors `sum_t ||(W - W_q) x_t||^2`, plain and weighted by
the held-out token importance, and the LM loss with every listed projection quantized.
Measured (2026-12-03, 2-core CPU shared by many jobs, 22 min of which 21 training): held-out LM
loss 2.0020 in full precision. Summed over the 9 projections, importance-weighted held-out error
at 4 bits: RTN 14555, GPTQ 4000, RSQ 4020 (RSQ 0.5% worse); LM loss RTN 2.0066, GPTQ 2.00502,
RSQ 2.00498. At 3 bits: RTN 66024, GPTQ 18833, RSQ 18648 (RSQ 1.0% better); LM loss RTN 2.0374,
GPTQ 2.0112, RSQ 2.0113. GPTQ beats RTN by 3.5x in error at both widths; RSQ's advantage over GPTQ
does NOT reproduce at this scale (differences of about 1% in error and 1e-4 in loss, of both signs).
"""

import ml_collections

from configs import probe_sinks


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = probe_sinks.get_config(arg)
  c.model.mixer = "softmax"
  r = c.repro
  del r["mixers"], r["probe_every"], r["sink_eps"], r["num_probe_batches"]
  r.mode = "rsq"
  r.projections = "q_proj,k_proj,v_proj"
  r.bits = "4,3"
  r.num_calib_batches = 8
  r.r_min, r.r_max = 1.0, 3.0
  if arg != "tiny":
    c.train.steps = 300
  if arg == "tiny":
    r.num_calib_batches, r.bits = 2, "4"
  return c
