"""Getting attention out of a model, and steering it from outside, for the probes.

Works on any module tree holding `attnjax.nn.attention.MultiHeadAttention` layers (the
`softmax` / `sliding_window` mixers and every mixer built on that class), in graph order:

```python
from attnjax.analysis import capture as cap
with cap.capturing(lm, ("weights", "head_outputs")):
  logits, inter = cap.run(lm, tokens)               # one forward, nnx.capture under the hood
attn = cap.stack(inter, "weights")                 # [L, B, H, T, T]
cap.set_head_scale(lm, jnp.ones((L, H)).at[1, 2].set(0.0))   # mask head 2 of layer 1
```
Encoder-decoders hold several kinds of attention layer (encoder self, decoder self, decoder
cross-attention, whose weights have different shapes); `select="cross"` (a path component, or a
predicate on the path) restricts `attention_layers`, `capturing` and `stack` to some of them:
`with cap.capturing(m, ("weights",), select="cross"): ...; cap.stack(inter, "weights",
select="cross")  # [L, B, H, T, S]`.
Residual-stream states come from `nnx.capture(..., method_outputs=nnx.Intermediate)` (every
block's `__call__` output is the residual stream after that block): `run(..., residual=True)`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn.attention import CAPTURE_KINDS, HeadScale, MultiHeadAttention


Select = str | Callable[[tuple], bool] | None


def _selector(select: Select) -> Callable[[tuple], bool]:
  if select is None:
    return lambda path: True
  if isinstance(select, str):
    return lambda path: select in tuple(str(p) for p in path)
  if callable(select):
    return select
  raise TypeError(f"select must be None, a path component (str) or a predicate, got {select!r}")


def attention_layers(model, select: Select = None) -> list[tuple[tuple, MultiHeadAttention]]:
  """`(path, layer)` for every `MultiHeadAttention` in `model`, in graph (layer) order.

  `select`: keep only layers whose path has that component (`"cross"`), or `select(path)` true.
  """
  keep = _selector(select)
  out = [(path, node) for path, node in nnx.iter_graph(model)
         if isinstance(node, MultiHeadAttention) and keep(tuple(path))]
  if not out:
    what = "" if select is None else f" selected by {select!r}"
    raise ValueError(f"model holds no MultiHeadAttention layer{what} to probe")
  return out


def set_capture(model, kinds: Iterable[str], select: Select = None) -> None:
  """Sets `capture` on every (selected) attention layer (`()` turns capturing off)."""
  kinds = tuple(kinds)
  bad = sorted(set(kinds) - set(CAPTURE_KINDS))
  if bad:
    raise ValueError(f"kinds must be among {CAPTURE_KINDS}, got {bad}")
  for _, layer in attention_layers(model, select):
    layer.capture = kinds


@contextlib.contextmanager
def capturing(model, kinds: Iterable[str], select: Select = None):
  """Context manager: capture `kinds` inside (on the `select`ed layers), restore after."""
  layers = attention_layers(model, select)
  old = [layer.capture for _, layer in layers]
  set_capture(model, kinds, select)
  try:
    yield model
  finally:
    for (_, layer), prev in zip(layers, old):
      layer.capture = prev


def run(model, *args, residual: bool = False, method: Callable | None = None, **kwargs):
  """One forward under `nnx.capture`: `(output, intermediates)` (an `nnx.State`).

  `method(model, *args, **kwargs)` defaults to `model(*args, **kwargs)`. With `residual=True`
  every method's output is sown too (`method_outputs=nnx.Intermediate`), which includes each
  decoder block's residual-stream output (`blocks/<i>/__call__`).
  """
  fn = method or (lambda m, *a, **k: m(*a, **k))
  extra = {"method_outputs": nnx.Intermediate} if residual else {}
  return nnx.capture(fn, nnx.Intermediate, **extra)(model, *args, **kwargs)


def stack(intermediates, kind: str, model=None, *, select: Select = None) -> jax.Array:
  """The captured `kind` of every attention layer stacked on a new leading layer axis `[L, ...]`.

  Layers are ordered by their path in the state (the graph order for `nnx.List` blocks).
  Each layer's first call is used (a layer called twice sows a tuple of two). `select` keeps
  the layers whose path (without the kind) matches, as in `attention_layers`.
  """
  flat = nnx.to_flat_state(intermediates) if not isinstance(intermediates, list) else intermediates
  keep = _selector(select)
  hits = []
  for path, var in flat:
    if path and path[-1] == kind and keep(tuple(path[:-1])):
      val = var.get_value() if hasattr(var, "get_value") else var
      val = val[0] if isinstance(val, tuple) else val
      hits.append((tuple(path[:-1]), val))
  if not hits:
    what = "" if select is None else f" on layers selected by {select!r}"
    raise ValueError(f"no {kind!r} captured{what}; set it with capturing(model, ({kind!r},)) first")
  hits.sort(key=lambda pv: tuple((0, p) if isinstance(p, int) else (1, str(p)) for p in pv[0]))
  return jnp.stack([v for _, v in hits])


def residual_states(intermediates, block_prefix: str = "blocks") -> jax.Array:
  """`[L, B, T, d_model]`: each block's output (needs `run(..., residual=True)`)."""
  flat = nnx.to_flat_state(intermediates)
  hits = []
  for path, var in flat:
    if len(path) == 3 and path[0] == block_prefix and path[2] == "__call__":
      val = var.get_value()
      hits.append((path[1], val[0] if isinstance(val, tuple) else val))
  if not hits:
    raise ValueError(f"no {block_prefix}/<i>/__call__ outputs captured; call run(..., residual=True)")
  hits.sort(key=lambda pv: pv[0])
  return jnp.stack([v for _, v in hits])


def set_head_scale(model, scales) -> None:
  """Per-head output multipliers `[L, H]` (one row per attention layer), or None to remove them."""
  layers = attention_layers(model)
  if scales is None:
    for _, layer in layers:
      layer.head_scale = nnx.data(None)
    return
  s = jnp.asarray(scales, jnp.float32)
  if s.ndim != 2 or s.shape[0] != len(layers):
    raise ValueError(f"scales must be [L, H] with L={len(layers)} attention layers, got {s.shape}")
  for (_, layer), row in zip(layers, s):
    if row.shape != (layer.num_heads,):
      raise ValueError(f"scales row must have num_heads={layer.num_heads} entries, got {row.shape}")
    if isinstance(layer.head_scale, HeadScale):
      layer.head_scale[...] = row
    else:
      layer.head_scale = HeadScale(row)


def set_weights_transform(model, transforms) -> None:
  """`fn(A) -> A'` for every attention layer, a list with one per layer (None entries skip), or None."""
  layers = attention_layers(model)
  if transforms is None or callable(transforms):
    transforms = [transforms] * len(layers)
  if len(transforms) != len(layers):
    raise ValueError(f"transforms must have one entry per attention layer ({len(layers)}), got {len(transforms)}")
  for (_, layer), fn in zip(layers, transforms):
    layer.weights_transform = fn


def with_head_scale(model, loss: Callable) -> Callable[[jax.Array], jax.Array]:
  """`loss_fn(head_scale [L, H])` for `heads.head_importance` / `attention_influence`.

  Sets the scales, evaluates `loss(model)`, and removes them again.
  """
  def loss_fn(scales):
    set_head_scale(model, scales)
    try:
      return loss(model)
    finally:
      set_head_scale(model, None)
  return loss_fn


def weights_and_grads(model, loss: Callable[[jax.Array], jax.Array], *args, **kwargs):
  """`(A [L, ...], dL/dA [L, ...])` for `loss(model(*args, **kwargs))`.

  The layers' weights pass through `perturb("attn_weights")` (capture kind `perturb_weights`),
  so the gradient with respect to that zero perturbation is `dL/dA` (for `saliency`). A first
  forward captures the weights and the perturbations' shapes, then one forward + backward.
  """
  call = lambda m, *a: m(*a, **kwargs)
  with capturing(model, ("weights", "perturb_weights")):
    _, *states = nnx.jit(nnx.capture(call, nnx.Intermediate, nnx.Perturbation))(model, *args)
    state = nnx.merge_state(*states)
    perts = nnx.filter_state(state, nnx.Perturbation)

    def f(perts, model):
      out, _ = nnx.capture(call, nnx.Perturbation, init=perts)(model, *args)
      return loss(out)

    grads = nnx.jit(nnx.grad(f, argnums=0))(perts, model)
  return stack(state, "weights"), stack(grads, "attn_weights")


@contextlib.contextmanager
def head_scaling(model, loss: Callable):
  """Context manager yielding a compiled `loss_fn(head_scale [L, H])` (one trace for all calls).

  Installs `HeadScale` ones on every attention layer for the duration (so changing the scales
  changes state values, not the program), removes them on exit. `loss(model)` must be traceable.
  """
  layers = attention_layers(model)
  set_head_scale(model, jnp.ones((len(layers), layers[0][1].num_heads)))

  def body(m, scales):
    for (_, layer), row in zip(attention_layers(m), scales):
      layer.head_scale[...] = row
    return loss(m)

  step = nnx.jit(body)
  try:
    yield lambda scales: step(model, jnp.asarray(scales, jnp.float32))
  finally:
    set_head_scale(model, None)
