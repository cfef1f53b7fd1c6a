"""`experiments.train` with a test-only fault: `--kill_during_save_step=N` SIGKILLs the process
right after the (async) save of step N has started, i.e. while its temporary directory exists.

Only the tests start it (`_train_runs.start(..., kill_during_save_step=N)`); the trainer and the
shipped configs know nothing of it.
"""

import os
import signal
import sys

sys.path.insert(0, os.getcwd())  # the repository root (the tests start this with cwd=REPO_ROOT)

from absl import app, flags  # noqa: E402

from attnjax.distributed import checkpoint as ckpt  # noqa: E402
from experiments import guards, train  # noqa: E402

_KILL_STEP = flags.DEFINE_integer("kill_during_save_step", 0, "SIGKILL after starting this step's save.")


def _install_kill_hook() -> None:
  original = ckpt.save

  def save_then_maybe_die(mngr, step, *args, **kwargs):
    out = original(mngr, step, *args, **kwargs)
    if step == _KILL_STEP.value:
      os.kill(os.getpid(), signal.SIGKILL)
    return out

  ckpt.save = save_then_maybe_die  # the trainer calls `ckpt.save` through the module


def main(argv):
  _install_kill_hook()
  train.main(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=guards.parse_flags)
