"""AT-EDM's one variant (main) and its count input.

Declared once: the rewrite, the build half (export/methods/atedm.py) and the run-time policy
(runtime/policies/atedm.py) import these names.
"""

from __future__ import annotations

KEPT_COUNT = "atedm_kept"  # count key of the tokens kept after the pruning block
