"""Multi-device checks behind `test_sharding.py`, run in a subprocess with 8 CPU devices.

A tiny `DecoderLM` (d_model 32, 4 heads, 2 layers, vocab 64) computes its loss, logits and
parameter gradients under `jax.jit` with explicit in/out shardings from
`attnjax.distributed.sharding` on several meshes; `run()` returns max abs differences against
the unsharded run plus per-device bytes, the specs in use and the sharding report.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from attnjax.distributed import sharding as sh
from attnjax.models import DecoderLM

MESHES = {
    "tp2": ({"tensor": 2}, 2),
    "tp4": ({"tensor": 4}, 4),
    "dp8": ({"data": 8}, 8),
    "fsdp8": ({"fsdp": 8}, 8),
}


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run() -> dict:
  assert jax.device_count() == 8, jax.devices()
  model = DecoderLM(vocab_size=64, d_model=32, num_layers=2, num_heads=4, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = np.random.default_rng(0).integers(0, 64, (8, 12)).astype(np.int32)

  def step(params, rest, tokens):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params, rest)(tokens)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
      return loss, logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, logits, grads

  base = jax.jit(step)(params, rest, tokens)
  total_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
  res = {"total_bytes": int(total_bytes), "grad_norm": float(optax.tree.norm(base[2]))}
  for name, (cfg, n) in MESHES.items():
    mesh = sh.make_mesh(cfg, jax.devices()[:n])
    specs = sh.param_specs(params, mesh)
    p_sh = sh.to_shardings(specs, mesh)
    r_sh = sh.replicated_like(rest, mesh)
    b_sh = sh.batch_sharding(mesh, 2)
    repl = NamedSharding(mesh, P())
    logits_sh = NamedSharding(mesh, P(sh.BATCH_AXES, None, None))
    placed = jax.device_put(params, p_sh)
    fn = jax.jit(step, in_shardings=(p_sh, r_sh, b_sh), out_shardings=(repl, logits_sh, p_sh))
    loss, logits, grads = fn(placed, jax.device_put(rest, r_sh), jax.device_put(tokens, b_sh))
    flat_specs = {"/".join(map(str, path)): str(v.get_value())
                  for path, v in nnx.to_flat_state(specs)}
    res[name] = {
        "loss": abs(float(loss) - float(base[0])), "logits": _max_diff(logits, base[1]),
        "grads": _max_diff(grads, base[2]),
        "param_bytes_per_device": sh.bytes_per_device(placed),
        "grad_bytes_per_device": sh.bytes_per_device(grads),
        "specs": flat_specs,
        "grad_specs_match": all(g.sharding.spec == s.spec for g, s in
                                zip(jax.tree.leaves(grads), jax.tree.leaves(p_sh))),
        "report": sh.sharding_report(placed, p_sh, mesh),
    }
  return res
