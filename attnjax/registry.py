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

Depth: a builder (or, for `register_mixer_class`, the class's `__init__`) that names a keyword
parameter `layer_index` (0 = first layer) and/or `num_layers` receives them from the backbone
(`DecoderLM`, `ViT` pass each block its position), because some mechanisms are defined per depth
(Lightning's decay schedule, DIFF Transformer's lambda_init). Builders that do not name them never
see them, so depth-agnostic mixers are unaffected; an explicit `mixer_options` entry wins.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from typing import Any, Callable

from flax import nnx

MixerBuilder = Callable[..., nnx.Module]

_MIXERS: dict[str, MixerBuilder] = {}
_DOCS: dict[str, str] = {}
_DEPTH_ARGS: dict[str, frozenset[str]] = {}   # which of layer_index / num_layers a builder takes
DEPTH_ARGS = ("layer_index", "num_layers")

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


def _named_params(fn) -> frozenset[str]:
  """The depth arguments (`DEPTH_ARGS`) that `fn` names explicitly (a `**options` catch-all does
  not count: it would forward them to a class that may not take them)."""
  params = inspect.signature(fn).parameters
  return frozenset(a for a in DEPTH_ARGS if a in params
                   and params[a].kind in (inspect.Parameter.KEYWORD_ONLY,
                                          inspect.Parameter.POSITIONAL_OR_KEYWORD))


def register_mixer(name: str, doc: str | None = None, *,
                   depth_args: Any = None) -> Callable[[MixerBuilder], MixerBuilder]:
  """Decorator: registers `builder` under `name` (lower case, unique). `depth_args` (a subset of
  `DEPTH_ARGS`) overrides which depth arguments the builder receives; by default, those its
  signature names."""

  def deco(builder: MixerBuilder) -> MixerBuilder:
    if name in _MIXERS and _MIXERS[name] is not builder:
      raise ValueError(f"mixer {name!r} is registered twice ({_MIXERS[name]} and {builder})")
    wanted = _named_params(builder) if depth_args is None else frozenset(depth_args)
    if not wanted <= set(DEPTH_ARGS):
      raise ValueError(f"mixer {name!r}: depth_args must be a subset of {DEPTH_ARGS}, got {sorted(wanted)}")
    _MIXERS[name] = builder
    _DEPTH_ARGS[name] = wanted
    _DOCS[name] = doc or (builder.__doc__ or "").strip().split("\n")[0]
    return builder

  return deco


def register_mixer_class(name: str, doc: str, cls: type) -> None:
  """Registers a mixer whose builder is `cls(d_model, num_heads, causal=..., rngs=..., **options)`
  (it receives the depth arguments that `cls.__init__` names)."""

  def builder(*, d_model, num_heads, causal, rngs, **options):
    return cls(d_model, num_heads, causal=causal, rngs=rngs, **options)

  builder.__name__ = builder.__qualname__ = f"build_{name}"
  register_mixer(name, doc, depth_args=_named_params(cls.__init__))(builder)


def mixer_depth_args(name: str) -> frozenset[str]:
  """The depth arguments (`layer_index`, `num_layers`) that mixer `name` receives from a backbone."""
  _load_families()
  if name not in _MIXERS:
    raise ValueError(f"unknown mixer {name!r}")
  return _DEPTH_ARGS[name]


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
                layer_index: int | None = None, num_layers: int | None = None,
                **options: Any) -> nnx.Module:
  """Builds the mixer registered as `name`. Raises a ValueError listing the known names.

  `layer_index` (0-based) / `num_layers`: the block's depth, from the backbone; passed on only to
  mixers whose builder names them (see the module docstring), unless `options` sets them."""
  _load_families()
  if name not in _MIXERS:
    raise ValueError(f"unknown mixer {name!r}; registered mixers: {', '.join(sorted(_MIXERS))}")
  if d_model % num_heads:
    raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
  if num_layers is not None and num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {num_layers}")
  if layer_index is not None and not 0 <= layer_index < (num_layers or layer_index + 1):
    raise ValueError(f"layer_index must be in [0, num_layers={num_layers}), got {layer_index}")
  depth = {"layer_index": layer_index, "num_layers": num_layers}
  for arg in _DEPTH_ARGS[name]:
    if depth[arg] is not None:
      options.setdefault(arg, depth[arg])
  return _MIXERS[name](d_model=d_model, num_heads=num_heads, causal=causal, rngs=rngs, **options)
