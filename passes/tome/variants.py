"""ToMe's one variant (main) and its count input; the partition inputs are passes.partition's.

Declared once: the rewrite, the build half (export/methods/tome.py) and the run-time policy
(runtime/policies/tome.py) import these names.
"""

from __future__ import annotations

R_COUNT = "tome_r"  # count key of r in graphs with r from shapes (passes/counts.py); per block: tome_r_<i>
