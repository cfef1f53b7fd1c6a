"""The mixer registry: every attention mechanism, by name, as an NNX layer.

A *mixer* is the sequence-mixing sublayer of a block: it maps `x: [B, T, d_model]` to
`[B, T, d_model]`. Backbones (`DecoderLM`, `ViT`, the MQAR models) build their mixers by name,
so a variant is one config string (`--config.model.mixer=gla`) and a hybrid is a list of them.

Builder contract (what `register_mixer` decorates)::

    @register_mixer("softmax")
    def build(*, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs, **options) -> nnx.Module

The returned module's contract:

* `__call__(x, *, segment_ids=None, decode=False) -> y`, `x, y: [B, T, d_model]`,
  `segment_ids: [B, T]` int (packed sequences; tokens attend only within their segment).
* With `decode=True` the module reads and updates its cache (`init_cache(batch_size, max_len,
  dtype)` must have been called); a prefill of T tokens followed by single-token steps equals
  the full causal forward. Mixers that cannot decode raise `NotImplementedError` naming themselves.
* Auxiliary losses (MoH load balance, Hedgehog distillation, ...) are reported with
  `self.sow(nnx.Intermediate, "aux_loss", value)`; trainers run the forward under
  `nnx.capture(..., nnx.Intermediate)` and add their sum to the loss
  (`experiments.trainer.sum_aux_losses`).

`options` are mixer-specific keyword arguments (window size, feature map, chunk size, ...). They
come from `config.model.mixer_options` in the experiment configs; unknown options raise.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Callable

from flax import nnx

MixerBuilder = Callable[..., nnx.Module]

_MIXERS: dict[str, MixerBuilder] = {}
_DOCS: dict[str, str] = {}

# Modules that register mixers when imported. Listed here so that `build_mixer` sees every
# family without the caller importing it first. A module that does not exist (yet) is skipped;
# an error inside an existing module is raised.
_FAMILY_MODULES = (
    "attnjax.nn.attention",   # softmax, sliding_window (issue: foundation)
    "attnjax.nn.operators",   # catalog A operators
    "attnjax.nn.linear",      # catalog L, linear / recurrent family
    "attnjax.nn.local",       # catalog N, neighborhood / local
    "attnjax.nn.sparse",      # catalog S, sparse / routed
    "attnjax.nn.titans",      # Titans memory, MAC / MAG / MAL, Miras variants
)
_loaded = False


def register_mixer(name: str, doc: str | None = None) -> Callable[[MixerBuilder], MixerBuilder]:
  """Decorator: registers `builder` under `name` (lower case, unique)."""

  def deco(builder: MixerBuilder) -> MixerBuilder:
    if name in _MIXERS and _MIXERS[name] is not builder:
      raise ValueError(f"mixer {name!r} is registered twice ({_MIXERS[name]} and {builder})")
    _MIXERS[name] = builder
    _DOCS[name] = doc or (builder.__doc__ or "").strip().split("\n")[0]
    return builder

  return deco


def register_mixer_class(name: str, doc: str, cls: type) -> None:
  """Registers a mixer whose builder is `cls(d_model, num_heads, causal=..., rngs=..., **options)`."""

  def builder(*, d_model, num_heads, causal, rngs, **options):
    return cls(d_model, num_heads, causal=causal, rngs=rngs, **options)

  builder.__name__ = builder.__qualname__ = f"build_{name}"
  register_mixer(name, doc)(builder)


def _load_families() -> None:
  global _loaded
  if _loaded:
    return
  for mod in _FAMILY_MODULES:
    if importlib.util.find_spec(mod) is not None:
      importlib.import_module(mod)
  _loaded = True


def list_mixers() -> dict[str, str]:
  """Returns {name: one-line description} of every registered mixer."""
  _load_families()
  return dict(sorted(_DOCS.items()))


def build_mixer(name: str, *, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                **options: Any) -> nnx.Module:
  """Builds the mixer registered as `name`. Raises a ValueError listing the known names."""
  _load_families()
  if name not in _MIXERS:
    raise ValueError(f"unknown mixer {name!r}; registered mixers: {', '.join(sorted(_MIXERS))}")
  if d_model % num_heads:
    raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
  return _MIXERS[name](d_model=d_model, num_heads=num_heads, causal=causal, rngs=rngs, **options)
