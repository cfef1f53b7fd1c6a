"""attnjax: attention mechanisms in JAX / Flax NNX.

* `attnjax.ops`: pure functions on `[B, T, H, D]` arrays (reference + fast paths).
* `attnjax.nn`: Flax NNX layers that own projections and parameters.
* `attnjax.models`: backbones (`DecoderLM`, `ViT`, ...) that take any registered mixer.
* `attnjax.fast_path_report(model, backend="gpu")`: which implementation each layer runs.
* `attnjax.registry`: mixers by name (`list_mixers()`, `build_mixer(...)`), and the CAB patterns
  each defines (`mixer_patterns(name)`, `pattern_table()`; `attnjax.cab`).
"""

from attnjax import ops
from attnjax.cab import PatternUndefinedError
from attnjax.fast_path import fast_path_report
from attnjax.registry import build_mixer, list_mixers, mixer_patterns, register_mixer

__version__ = "0.1.0"

__all__ = ["ops", "PatternUndefinedError", "fast_path_report", "build_mixer", "list_mixers",
           "mixer_patterns",
           "register_mixer", "__version__"]
