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
  Mixers that define cross attention also take `context: [B, S, d_model]` (keys and values from
  it; causal cross is bottom-right aligned, see `attnjax.cab`).
* CAB patterns: each mixer declares which of the four patterns (`"self"`, `"causal_self"`,
  `"cross"`, `"causal_cross"`) it defines (`_DECLARED_PATTERNS` below, or `patterns=` at
  registration). `build_mixer` raises `PatternUndefinedError` for a `causal` flag with no defined
  pattern, and installs one check at the entry of the mixer's `__call__` that raises it for a call
  in an undefined pattern (`context=` given to a self-only mixer, ...), before any computation.
  `pattern_table()` lists the declarations (`experiments/cab_patterns.py` writes them to
  `benchmarks/cab_patterns.md`).
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

import functools
import importlib
import importlib.util
import inspect
from typing import Any, Callable

from flax import nnx

from attnjax.cab import PATTERNS, PatternUndefinedError, check_patterns, describe, pattern_name

MixerBuilder = Callable[..., nnx.Module]

_MIXERS: dict[str, MixerBuilder] = {}
_DOCS: dict[str, str] = {}
_DEPTH_ARGS: dict[str, frozenset[str]] = {}   # which of layer_index / num_layers a builder takes
DEPTH_ARGS = ("layer_index", "num_layers")

_PATTERNS: dict[str, tuple[tuple[str, ...], str]] = {}   # name -> (defined patterns, note)

ALL = PATTERNS
SELF = ("self", "causal_self")
_NO_CONTEXT = "keys and values are read from x (no context= path)"
_GRID = "a 2D pattern on the image grid: no causal order; cross needs a context on the query grid"
_CAUSAL_REC = "a causal recurrence over x (no bidirectional or context form)"
_BIDIR = "a bidirectional (vision) mechanism over x"

# What each built-in mixer defines, and why the rest is undefined. Declared here (not at the
# registrations) so that one table covers every family; `test_all_mixers.py` checks every entry
# against the mixer's behaviour (defined: right shape, finite, causal where it says so; undefined:
# `PatternUndefinedError`).
_DECLARED_PATTERNS: dict[str, tuple[tuple[str, ...], str]] = {
    # attention.py
    "softmax": (ALL, ""),
    "sliding_window": (ALL, ""),
    # operators.py
    "moda": (SELF, "modality ids live on one prompt"),
    "sigmoid": (ALL, ""),
    "lssa": (ALL, ""),
    "lssar": (ALL, ""),
    "gated_attention": (ALL, ""),
    "flashbias_alibi": (("causal_self", "causal_cross"),
                        "symmetric ALiBi -m|i-j| is not low rank (non-causal)"),
    "cca": (SELF, "concentric positions and the ring mask live on one prompt"),
    "affine_scaled": (ALL, ""),
    "differential": (ALL, ""),
    "grouped_differential": (ALL, ""),
    "moh": (ALL, ""),
    "aaren": (SELF, "no query sequence: a learned query scans the tokens it reads"),
    "reversed": (("self", "cross"), "each key is normalised over all queries (no causal form)"),
    "gpsa": (SELF, "the positional part needs queries and keys on one grid"),
    "dha": (ALL, ""),
    "rcmha": (ALL, ""),
    "hierarchical": (("self",), "block scores average over whole groups of one token tree"),
    "gaam": (SELF, "no queries or keys (a Gaussian over the tokens it reads)"),
    # linear.py
    "linear": (SELF, _NO_CONTEXT),
    "based": (SELF, _NO_CONTEXT),
    "hedgehog": (SELF, _NO_CONTEXT),
    "transnormer": (SELF, _NO_CONTEXT),
    "mala": (SELF, _NO_CONTEXT),
    "slab": (SELF, _NO_CONTEXT),
    "flowformer": (SELF, _NO_CONTEXT),
    "transnormer_diag": (SELF, "diagonal blocks of one sequence"),
    "gla": (("causal_self",), _CAUSAL_REC),
    "retnet": (("causal_self",), _CAUSAL_REC),
    "lightning": (("causal_self",), _CAUSAL_REC),
    "deltanet": (("causal_self",), _CAUSAL_REC),
    "gated_deltanet": (("causal_self",), _CAUSAL_REC),
    "lightnet": (("causal_self",), _CAUSAL_REC),
    "lolcats_window": (("causal_self",), "a window of past keys plus a causal linear state"),
    "nats": (("causal_self",), "a KV cache and a recurrent state over x"),
    "still": (("causal_self",), "a window of past keys plus a causal linear state"),
    "seqboat": (("causal_self",), "an EMA scanned forward over x"),
    "inline": (("self",), _BIDIR),
    "linfusion": (("self",), _BIDIR),
    "rala": (("self",), _BIDIR),
    "lina": (("self",), _BIDIR),
    "skip": (SELF, "no attention at all (zeros); no context= path"),
    # local.py
    "na1d": (SELF, "neighbourhoods are windows of one sequence"),
    "neighborhood": (SELF, "neighbourhoods are windows of one sequence"),
    "swin": (("self", "cross"), _GRID),
    "halo": (("self", "cross"), _GRID),
    "bra": (("self", "cross"), _GRID),
    "na2d": (("self", "cross"), _GRID),
    "freeswim": (("self", "cross"), _GRID),
    "swin_rmt": (("self", "cross"), _GRID),
    # sparse.py
    "sliding_window_sparse": (SELF, "a static block layout of one sequence"),
    "moba": (ALL, ""),
    "vmoba": (ALL, ""),
    "power_attention": (("causal_self",), "a static causal block layout of one sequence"),
    "s2_attention": (("causal_self",), "a static causal block layout of one sequence"),
    "sink_local_sparse": (("causal_self",), "a static causal block layout of one sequence"),
    "strided_sparse": (("causal_self",), "a static causal block layout of one sequence"),
    "routing": (ALL, ""),
    "dynamic_mask": (ALL, ""),
    "landmark": (("causal_self",), "landmark tokens are placed in the causal sequence itself"),
    "hyper_attention": (("self", "causal_self", "cross"),
                        "the causal recursion halves one square score matrix"),
    "sea": (ALL, ""),
    "radial": (("self",), "a static symmetric layout over the frames of one video"),
    "flux_attention": (SELF, "the router pools the query sequence's own context"),
    # titans.py
    "titans_memory": (("causal_self",), _CAUSAL_REC),
    "titans_mag": (("causal_self",), _CAUSAL_REC),
    "titans_mal": (("causal_self",), _CAUSAL_REC),
    "titans_mac": (("causal_self",), _CAUSAL_REC),
    # deconstructed.py (controlled variants of the attention weights' source)
    "static_emb_qk": (SELF, "queries and keys come from the sequence's own token embeddings"),
    "rnd_emb_qk": (SELF, "queries and keys come from the sequence's own token embeddings"),
    "fixed_seq_qk": (SELF, "queries and keys are learned positions of one sequence"),
    # gated_mixers.py (vision token mixers without attention)
    "ninformer": (("self",), "a token-mixing MLP over a fixed number of positions (no causal order, "
                             "no context)"),
    "activator": (("self",), "a per-token GLU unit standing in for ViT attention (no context)"),
}

# Modules that register mixers when imported. Listed here so that `build_mixer` sees every
# family without the caller importing it first. A module that does not exist (yet) is skipped;
# an error inside an existing module is raised.
_FAMILY_MODULES = (
    "attnjax.nn.attention",   # softmax, sliding_window (issue: foundation)
    "attnjax.nn.operators",   # attention operators
    "attnjax.nn.linear",      # linear / recurrent family
    "attnjax.nn.local",       # neighborhood / local
    "attnjax.nn.sparse",      # sparse / routed
    "attnjax.nn.titans",      # Titans memory, MAC / MAG / MAL, Miras variants
    "attnjax.nn.deconstructed",  # StaticEmbQK, RndEmbQK, FixedSeqQK
    "attnjax.nn.gated_mixers",  # NiNformer, Activator (gating units instead of attention)
)
_loaded = False


def _named_params(fn) -> frozenset[str]:
  """The depth arguments (`DEPTH_ARGS`) that `fn` names explicitly (a `**options` catch-all does
  not count: it would forward them to a class that may not take them)."""
  params = inspect.signature(fn).parameters
  return frozenset(a for a in DEPTH_ARGS if a in params
                   and params[a].kind in (inspect.Parameter.KEYWORD_ONLY,
                                          inspect.Parameter.POSITIONAL_OR_KEYWORD))


def register_mixer(name: str, doc: str | None = None, *, depth_args: Any = None, patterns=None,
                   note: str = "") -> Callable[[MixerBuilder], MixerBuilder]:
  """Decorator: registers `builder` under `name` (lower case, unique).

  `depth_args` (a subset of `DEPTH_ARGS`) overrides which depth arguments the builder receives; by
  default, those its signature names. `patterns`: the CAB patterns the mixer defines (a subset of
  `attnjax.cab.PATTERNS`); built-in mixers are declared in `_DECLARED_PATTERNS` instead. `note`:
  why the others are undefined. A mixer with no declaration gets no pattern check (and shows as
  undeclared in `pattern_table`)."""
  if patterns is None and name in _DECLARED_PATTERNS:
    patterns, note = _DECLARED_PATTERNS[name]
  decl = None if patterns is None else (check_patterns(patterns), note)
  if decl is not None and not decl[0]:
    raise ValueError(f"mixer {name!r}: patterns must name at least one of {PATTERNS}")

  def deco(builder: MixerBuilder) -> MixerBuilder:
    if name in _MIXERS and _MIXERS[name] is not builder:
      raise ValueError(f"mixer {name!r} is registered twice ({_MIXERS[name]} and {builder})")
    wanted = _named_params(builder) if depth_args is None else frozenset(depth_args)
    if not wanted <= set(DEPTH_ARGS):
      raise ValueError(f"mixer {name!r}: depth_args must be a subset of {DEPTH_ARGS}, got {sorted(wanted)}")
    _MIXERS[name] = builder
    _DEPTH_ARGS[name] = wanted
    _DOCS[name] = doc or (builder.__doc__ or "").strip().split("\n")[0]
    if decl is not None:
      _PATTERNS[name] = decl
    return builder

  return deco


def register_mixer_class(name: str, doc: str, cls: type, *, patterns=None, note: str = "") -> None:
  """Registers a mixer whose builder is `cls(d_model, num_heads, causal=..., rngs=..., **options)`
  (it receives the depth arguments that `cls.__init__` names)."""

  def builder(*, d_model, num_heads, causal, rngs, **options):
    return cls(d_model, num_heads, causal=causal, rngs=rngs, **options)

  builder.__name__ = builder.__qualname__ = f"build_{name}"
  register_mixer(name, doc, depth_args=_named_params(cls.__init__), patterns=patterns,
                 note=note)(builder)


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


def mixer_patterns(name: str) -> tuple[str, ...] | None:
  """The CAB patterns mixer `name` defines, in `attnjax.cab.PATTERNS` order (None: undeclared)."""
  _load_families()
  if name not in _MIXERS:
    raise ValueError(f"unknown mixer {name!r}; registered mixers: {', '.join(sorted(_MIXERS))}")
  return _PATTERNS[name][0] if name in _PATTERNS else None


def pattern_table() -> list[dict[str, Any]]:
  """One row per registered mixer: `{"mixer", "self", "causal_self", "cross", "causal_cross",
  "note"}`, the four pattern entries True where defined (None for all four: undeclared)."""
  _load_families()
  rows = []
  for name in sorted(_MIXERS):
    defined, note = _PATTERNS.get(name, (None, "undeclared"))
    row = {"mixer": name}
    row.update({p: None if defined is None else p in defined for p in PATTERNS})
    row["note"] = "" if defined == PATTERNS else note
    rows.append(row)
  return rows


def pattern_table_markdown() -> str:
  """`pattern_table()` as a markdown table (`experiments/cab_patterns.py` writes it to
  `benchmarks/cab_patterns.md`)."""
  mark = {True: "yes", False: "-", None: "?"}
  lines = ["| mixer | self | causal self | cross | causal cross | why the others are undefined |",
           "| --- | --- | --- | --- | --- | --- |"]
  for r in pattern_table():
    cells = [f"`{r['mixer']}`"] + [mark[r[p]] for p in PATTERNS] + [r["note"]]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _undefined(name: str, defined: tuple[str, ...], note: str, head: str,
               detail: str) -> PatternUndefinedError:
  why = f": {note}" if note else ""
  return PatternUndefinedError(f"{name}: {head} is undefined ({detail} for this mixer{why}); "
                               f"it defines {', '.join(defined)}")


def check_call_pattern(module: nnx.Module, *, cross: bool) -> None:
  """Raises `PatternUndefinedError` if `module` (built by `build_mixer`) does not define the
  pattern of a call with (`cross`) or without a context. Modules built otherwise pass."""
  decl = getattr(module, "_cab_declaration", None)
  if decl is None:
    return
  name, causal, defined, note = decl
  pattern = pattern_name(causal=causal, cross=cross)
  if pattern not in defined:
    raise _undefined(name, defined, note, f"the {pattern!r} pattern",
                     f"{describe(pattern)} is undefined")


def _guard_call(cls: type) -> None:
  """Makes `cls.__call__` start with `check_call_pattern` (once per class; a subclass that
  inherits a guarded `__call__` is not wrapped again). The check reads the declaration that
  `build_mixer` stores on each instance, so one class can serve mixers with different patterns."""
  call = cls.__call__
  if getattr(call, "_cab_guarded", False):
    return

  @functools.wraps(call)
  def guarded(self, *args, **kwargs):
    check_call_pattern(self, cross=kwargs.get("context") is not None)
    return call(self, *args, **kwargs)

  guarded._cab_guarded = True
  cls.__call__ = guarded


def build_mixer(name: str, *, d_model: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
                layer_index: int | None = None, num_layers: int | None = None,
                **options: Any) -> nnx.Module:
  """Builds the mixer registered as `name`. Raises a ValueError listing the known names, and
  `PatternUndefinedError` if the mixer defines neither pattern of this `causal` flag.

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
  decl = _PATTERNS.get(name)
  if decl is not None:
    defined, note = decl
    pair = tuple(pattern_name(causal=causal, cross=c) for c in (False, True))
    if not set(pair) & set(defined):
      kind = "causal" if causal else "non-causal"
      raise _undefined(name, defined, note, f"the {kind} pattern",
                       f"neither {pair[0]!r} nor {pair[1]!r} is defined")
  module = _MIXERS[name](d_model=d_model, num_heads=num_heads, causal=causal, rngs=rngs, **options)
  if decl is not None:
    module._cab_declaration = (name, bool(causal), defined, note)
    _guard_call(type(module))
  return module

