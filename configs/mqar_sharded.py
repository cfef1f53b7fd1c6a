r"""MQAR on a device mesh with sharded checkpoints (the tiny MQAR setting plus scale-out fields).

Command (8 CPU host devices, FSDP 4 x Megatron TP 2, checkpoints every 10 steps, resumable):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python -m experiments.train \
      --config=configs/mqar_sharded.py --workdir=workdirs/mqar_sharded

`mesh`: sizes of the `data`, `fsdp`, `tensor`, `sequence` axes (one may be -1 = the rest of the
devices; the product must equal the device count). `checkpoint.every > 0` turns on orbax
checkpoints in `workdir/checkpoints` (resume from the latest complete one, SIGTERM saves).
Preset `:tiny` is for tests (few steps, tiny model, log every step).
"""

import ml_collections

from configs import mqar


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = mqar.get_config("tiny")
  c.train.steps = 60
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 2, "sequence": 1})
  c.checkpoint = ml_collections.ConfigDict({
      "every": 10, "max_to_keep": 2, "best_metric": "eval_accuracy", "best_mode": "max",
      "async_save": True, "resume": True, "save_on_sigterm": True, "kill_during_save_step": 0})
  if arg == "tiny":
    c.data.num_train, c.data.num_test = 256, 64
    c.model.d_model, c.model.num_heads = 32, 4
    c.train.steps, c.train.eval_every, c.train.log_every = 12, 6, 1
    c.train.batch_size = 16
    c.checkpoint.every = 3
  return c
