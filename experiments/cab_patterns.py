"""Writes `benchmarks/cab_patterns.md`: which CAB pattern each registered mixer defines.

    python -m experiments.cab_patterns        # from the repository root: the declarations
    python -m experiments.cab --parts=patterns --record   # the same table, each cell run

The first writes `attnjax.registry.pattern_table_markdown()`, generated from the registry's pattern
declarations, in a second; the CAB suite (`experiments/cab.py`, part 1) runs every mixer in every
pattern once and writes the table of what the cells did, which is the same text when every cell
holds (a disagreeing cell reads FAIL). `tests/test_all_mixers.py` checks that the file is current
and that every declaration holds (defined patterns compute, undefined ones raise
`PatternUndefinedError`).
"""

import pathlib

from attnjax import registry

OUT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "cab_patterns.md"
HEADER = """# CAB patterns of every registered mixer

Generated from the declarations in `attnjax/registry.py` by `python -m experiments.cab_patterns`,
or with every cell run by `python -m experiments.cab --parts=patterns --record`; do not edit by
hand. "yes": the pattern is defined and tested (`tests/test_all_mixers.py`); "-": `build_mixer`
(for a causal flag with no defined pattern) or the call (for `context=`) raises
`attnjax.PatternUndefinedError` naming the mixer and the pattern. Causal cross attention is
bottom-right aligned: query i of T sees context keys j <= i + S - T.

"""

if __name__ == "__main__":
  OUT.write_text(HEADER + registry.pattern_table_markdown())
  print(f"wrote {OUT}")
