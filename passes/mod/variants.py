"""MoD's one variant (main) and its per-block count inputs.

Declared once: the rewrite, the build half (export/methods/mod.py) and the run-time policy
(runtime/policies/mod.py) import these names.
"""

from __future__ import annotations

K_COUNT = "mod_k_"  # count key prefix: the capacity of block i comes from ditmerge_count_mod_k_<i>


def k_count(block: int) -> str:
    return f"{K_COUNT}{block}"
