"""SDTM's variants (merged, full) and the graph inputs and outputs they carry.

Declared once: the rewrite, the build half (export/methods/sdtm.py) and the run-time policy
(runtime/policies/sdtm.py) import these names.
"""

from __future__ import annotations

FULL = "full"
COUNTER_INPUT = "sdtm_counter"
COUNTER_OUTPUT = "sdtm_counter_out"
CACHE_INPUT = "sdtm_cache."
CACHE_OUTPUT = "sdtm_cache_out."
K_COUNT = "sdtm_k"  # count key of the windows a window merge collapses
R_COUNT = "sdtm_r"  # count key of the tokens a bipartite merge removes (all bands)
VARIANTS = ("merged", FULL)


def cache_input(path: str) -> str:
    return CACHE_INPUT + path


def cache_output(path: str) -> str:
    return CACHE_OUTPUT + path
