r"""The CAB-style suite (`experiments/cab.py`): patterns, efficiency, quality.

Command (all three parts; `--record` also writes benchmarks/cab_*):
  .venv/bin/python -m experiments.cab --config=configs/cab.py --workdir=workdirs/cab
The timing record (a quiet machine; on a GPU `seq_lens="auto"` goes to 128K):
  .venv/bin/python -m experiments.cab --config=configs/cab.py --parts=efficiency --record
Larger quality preset (a dozen causal mixers on MQAR d64/d128 and selective copying, eight
non-causal ones on digits): `--config=configs/cab.py:full --parts=quality`. Every mixer timed:
`--all_mixers`.

Parts: patterns = every registered mixer x the four CAB patterns on a [2, 12, 32] input;
efficiency = one mixer layer, B=1, d_model 128, 2 heads, float32, T = 1K ... 32K on the CPU,
median of 3 calls, cells skipped above 8 GiB compiled peak or a predicted 20 s per call (and
the Ts after a compile over 60 s);
quality = the entries of `quality.tasks` (each: a registered task, its config file[:preset], the
mixers, overrides); an entry whose task is not registered is skipped with a
message.

Measured (2-core CPU shared by eight people, load average 12-35, 2026-12-03, jax 0.11.2):
patterns, `--parts=patterns --record`: 69 mixers x 4 patterns = 276 cells, 148 defined (finite,
causal where causal) and 128 refused with PatternUndefinedError, every cell as declared (the run
rewrote `benchmarks/cab_patterns.md` unchanged), 13 minutes. Efficiency: smoke-tested at T = 1024
(`--config.efficiency.seq_lens=1024 --config.efficiency.repeats=1 --config.efficiency.warmup=0`);
times on that machine are noise, so the record is the lead's, with the command above on a quiet
machine. Quality: the tiny preset end to end (`tests/test_cab.py`); the default preset is 12
training runs (about 15 minutes on a quiet 2-core CPU), not recorded here.
"""

import ml_collections

CAUSAL = "softmax,sliding_window,mala"
NON_CAUSAL = "softmax,na2d,linear"
# Representative dozen for the timing: softmax family, sliding/local, sparse, linear/recurrent.
EFFICIENCY = ("softmax,differential,sliding_window,na1d,sliding_window_sparse,moba,strided_sparse,"
              "linear,based,gla,retnet,gated_deltanet")
CAUSAL_FULL = ("softmax,sliding_window,differential,moba,based,hedgehog,mala,gla,retnet,lightning,"
               "gated_deltanet,deltanet")
NON_CAUSAL_FULL = "softmax,swin,na2d,bra,linear,rala,inline,hyper_attention"


def _entry(task, config, mixers, **overrides):
  return ml_collections.ConfigDict({"task": task, "config": config, "mixers": mixers,
                                    "overrides": overrides})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.patterns = ml_collections.ConfigDict(
      {"mixers": "", "seq_len": 12, "d_model": 32, "num_heads": 2, "batch": 2, "perturb_at": 9})
  c.efficiency = ml_collections.ConfigDict(
      {"mixers": EFFICIENCY, "seq_lens": "auto", "batch": 1, "d_model": 128, "num_heads": 2,
       "dtype": "float32", "repeats": 3, "warmup": 1, "max_gib": 8.0, "time_limit_s": 20.0,
       "compile_limit_s": 60.0})
  c.quality = ml_collections.ConfigDict()
  t = c.quality.tasks = ml_collections.ConfigDict()
  t.mqar_d64 = _entry("mqar", "configs/mqar.py", CAUSAL, model={"d_model": 64})
  t.mqar_d128 = _entry("mqar", "configs/mqar.py", CAUSAL, model={"d_model": 128})
  t.selective_copy = _entry("selective_copy", "configs/selective_copy.py", CAUSAL)
  t.digits = _entry("digits", "configs/vit_digits.py", NON_CAUSAL)
  # Masked-language modelling on the packaged text, for encoders (MosaicBERT with the mixer swapped in).
  t.mlm = _entry("mlm", "configs/mlm_mosaic_bert.py", NON_CAUSAL)
  if arg == "full":
    for name in ("mqar_d64", "mqar_d128", "selective_copy"):
      t[name].mixers = CAUSAL_FULL
    t.digits.mixers = t.mlm.mixers = NON_CAUSAL_FULL
  elif arg == "tiny":  # for tests: seconds
    c.patterns.mixers = "softmax,gla"
    c.efficiency.update({"mixers": "linear", "seq_lens": "32,64", "d_model": 32, "repeats": 1})
    c.quality.tasks = ml_collections.ConfigDict()
    c.quality.tasks.selective_copy = _entry("selective_copy", "configs/selective_copy.py:tiny", "softmax")
    c.quality.tasks.digits = _entry("digits", "configs/vit_digits.py:tiny", "softmax,gla")  # gla: no 'self'
    c.quality.tasks.mlm = _entry("mlm", "configs/mlm_mosaic_bert.py:tiny", "softmax")
  elif arg:
    raise ValueError(f"unknown preset {arg!r} for configs/cab.py; known: 'tiny', 'full'")
  return c
