"""The four CAB attention patterns and the one error every mixer and operator raises for an undefined one.

A pattern is (causal or not) x (self or cross attention):

* `"self"`: non-causal self-attention, every token sees every token (`x` gives queries and keys).
* `"causal_self"`: token i sees tokens <= i.
* `"cross"`: queries from `x [B, T, d]`, keys and values from `context [B, S, d]`, all visible.
* `"causal_cross"`: bottom-right aligned causality, query i sees context keys j <= i + S - T (the
  KV-cache reading: the T queries are the last T of the S positions, as in `attnjax.ops.masks`).

Mechanisms that do not define a pattern (a recurrence has no cross form, a 2D window has no causal
one, ...) raise `PatternUndefinedError` naming the mechanism and the pattern. Which patterns each
registered mixer defines is declared in `attnjax.registry` (`mixer_patterns`, `pattern_table`).
"""

from __future__ import annotations

PATTERNS = ("self", "causal_self", "cross", "causal_cross")

_DESCRIPTIONS = {
    "self": "non-causal self-attention",
    "causal_self": "causal self-attention",
    "cross": "non-causal cross attention",
    "causal_cross": "causal (bottom-right aligned) cross attention",
}


class PatternUndefinedError(NotImplementedError, ValueError):
  """A CAB pattern (causal / cross) that the mechanism does not define.

  Both a `NotImplementedError` (the mechanism has no such form) and a `ValueError` (a bad argument
  for this mechanism), so callers that caught either before keep working."""


def pattern_name(*, causal: bool, cross: bool) -> str:
  """`"self"`, `"causal_self"`, `"cross"` or `"causal_cross"`."""
  return ("causal_" if causal else "") + ("cross" if cross else "self")


def describe(pattern: str) -> str:
  """Plain-words name of `pattern` (e.g. "causal self-attention")."""
  check_patterns((pattern,))
  return _DESCRIPTIONS[pattern]


def check_patterns(patterns) -> tuple[str, ...]:
  """Returns `patterns` as a tuple in canonical order; ValueError on an unknown name."""
  patterns = tuple(patterns)
  bad = [p for p in patterns if p not in PATTERNS]
  if bad:
    raise ValueError(f"unknown CAB pattern(s) {bad}; the patterns are {', '.join(PATTERNS)}")
  return tuple(p for p in PATTERNS if p in patterns)
