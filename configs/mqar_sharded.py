r"""MQAR on a device mesh with sharded checkpoints (the tiny MQAR setting plus scale-out fields).

Command (8 CPU host devices, FSDP 4 x Megatron TP 2, checkpoints every 10 steps, resumable):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python -m experiments.train \
      --config=configs/mqar_sharded.py --workdir=workdirs/mqar_sharded

`mesh`: sizes of the `data`, `fsdp`, `tensor`, `sequence` axes (one may be -1 = the rest of the
devices; the product must equal the device count, else a ValueError says so); `mesh_num_devices`
uses only the first n devices. `checkpoint.every > 0` turns on orbax
checkpoints in `workdir/checkpoints` (resume from the latest intact one, damaged steps moved
aside to `<step>.corrupt`; SIGTERM saves).
Preset `:tiny` is for tests (tests/distributed/test_checkpoint.py, test_multiprocess.py): 20
steps of a d_model-32 model, logged every step, evaluated at 8, 16 and 20, checkpoints every 4
steps (last 2 kept plus the best by eval accuracy). On 8 devices its mesh is fsdp 4 x tensor 2.
"""

import ml_collections

from configs import mqar


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = mqar.get_config("tiny")
  c.train.steps = 60
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 2, "sequence": 1})
  c.mesh_num_devices = ml_collections.config_dict.placeholder(int)  # None: every device
  c.checkpoint = ml_collections.ConfigDict({
      "every": 10, "max_to_keep": 2, "best_metric": "eval_accuracy", "best_mode": "max", "keep_best": 1,
      "async_save": True, "resume": True, "save_on_sigterm": True})
  if arg == "tiny":
    c.data.num_train, c.data.num_test = 256, 64
    c.model.d_model, c.model.num_heads = 32, 4
    c.train.steps, c.train.eval_every, c.train.log_every = 20, 8, 1
    c.train.batch_size = 16
    c.optim.warmup_steps = 4  # so that 20 steps move the weights (and the losses) visibly
    c.checkpoint.every = 4
  elif arg:
    raise ValueError(f"unknown preset {arg!r} for configs/mqar_sharded.py; known: 'tiny'")
  return c
