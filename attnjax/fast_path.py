"""Which implementation every layer of a built model runs on a given backend.

`fast_path_report(model, backend="gpu")` traces each token-mixing layer abstractly
(`jax.eval_shape`, nothing is computed) with its real input shape, while the ops record the
implementation their `implementation=` selection picks for `backend` (`attnjax.ops.dispatch`),
and returns one row per op call: `(layer path, mixer, implementation, reason)`. The selection is a
pure function of (backend, call), so a GPU's choices can be read on a CPU. A layer whose mixer
calls none of the dispatching ops (it computes with plain `jnp`) gets one row with implementation
"jnp".
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.ops import dispatch


class FastPathRow(NamedTuple):
  path: str
  mixer: str
  implementation: str
  reason: str


def _d_model(block) -> int:
  leaves = jax.tree.leaves(nnx.state(block.norm1, nnx.Param))
  return int(leaves[0].shape[-1])


def _mixer_name(block) -> str:
  return getattr(block, "mixer_name", None) or type(block.mixer).__name__


def _layers(model, seq_len):
  """`(path, mixer name, fn(x), x_struct_shape)` for every token-mixing layer of `model`."""
  from attnjax.models.decoder import DecoderBlock, DecoderLM
  from attnjax.models.vit import ViT
  if isinstance(model, ViT):
    t = model.grid[0] * model.grid[1] + (model.pool == "cls")
  elif isinstance(model, DecoderLM):
    t = seq_len or model.max_len
  else:
    t = seq_len
  found = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, DecoderBlock):
      if t is None:
        raise ValueError("fast_path_report: pass seq_len (the token count the layers see)")
      name = "/".join(str(p) for p in path) or "."
      found.append((name, _mixer_name(node), node.mix, (t, _d_model(node))))
  return found


def fast_path_report(model, *, backend: str | None = None, seq_len: int | None = None,
                     batch_size: int = 1, dtype=jnp.float32, d_model: int | None = None,
                     print_table: bool = True) -> list[FastPathRow]:
  """Rows `(layer path, mixer, implementation, reason)`: what each layer runs on `backend`.

  `model`: a `DecoderLM` / `ViT` (every `DecoderBlock` is a layer; a ViT's token count comes from
  its grid, a DecoderLM's is `seq_len`, default its `max_len`) or a single mixer module (called
  on `[batch_size, seq_len, d_model]`, both required). `backend`: "gpu" (CUDA), "cpu", ...;
  default the current one. `dtype` is the activations' dtype (cuDNN serves bf16/fp16 only).
  Prints the table unless `print_table=False`.
  """
  backend = dispatch.resolve_backend(backend)
  layers = _layers(model, seq_len)
  if not layers:
    if seq_len is None or d_model is None:
      raise ValueError("fast_path_report: a single mixer needs seq_len and d_model (its input is "
                       "[batch_size, seq_len, d_model])")
    layers = [(".", type(model).__name__, model, (seq_len, d_model))]
  rows = []
  for path, mixer, fn, (t, width) in layers:
    x = jax.ShapeDtypeStruct((batch_size, t, width), dtype)
    with dispatch.record_choices(backend) as rec:
      jax.eval_shape(lambda x, fn=fn: fn(x), x)
    if not rec.rows:
      rows.append(FastPathRow(path, mixer, "jnp", "no dispatching op: plain jnp (XLA)"))
    for op, impl, reason in rec.rows:
      rows.append(FastPathRow(path, mixer, impl, f"{op}: {reason}"))
  if print_table:
    print(format_report(rows, backend))
  return rows


def format_report(rows: list[FastPathRow], backend: str = "") -> str:
  """A markdown table of `fast_path_report` rows."""
  head = ["layer", "mixer", "implementation", "reason"]
  lines = [f"fast paths on backend {backend!r}" if backend else "fast paths", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    lines.append("| " + " | ".join(str(c) for c in r) + " |")
  return "\n".join(lines)


__all__: list[Any] = ["fast_path_report", "format_report", "FastPathRow"]
