r"""RSQ (token-importance-weighted GPTQ) vs plain GPTQ vs RTN on the attention projections of an LM.

Command:
  .venv/bin/python -m experiments.probe_repro --config=configs/probe_rsq.py \
      --workdir=workdirs/probe_rsq --config.repro.record=True
Tiny preset (tests): `--config=configs/probe_rsq.py:tiny`.

Setting: the byte LM of `configs/probe_sinks.py` (softmax, BOS at position 0) is trained for 300
steps, then the
q/k/v projections of every attention layer are quantized per output row (4 and 3 bits) from
`repro.num_calib_batches` training batches: RTN, GPTQ (Hessian `X^T X`), and RSQ (Sung et al.,
2025, arXiv 2503.01820: Hessian weighted by AttnCon token importance in [1, 3]; no rotation).
Reported on held-out windows: the layer errors `sum_t ||(W - W_q) x_t||^2`, plain and weighted by
the held-out token importance, and the LM loss with every listed projection quantized.
Measured: see `benchmarks/probe_reproductions.md`.
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
