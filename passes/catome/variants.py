"""CA-ToMe's variants (match, apply) and the cached index tensors between them.

Declared once: the rewrite, the build half (export/methods/catome.py) and the run-time policy
(runtime/policies/catome.py) import these names.
"""

from __future__ import annotations

MATCH = "match"
# The paper's best checkpoint schedule (CONFIG_3 of the released code): recompute the matching at these
# steps of a 50-step run, reuse it in between. The released code passes step i + 1, so its matches
# actually land one step later (and step 0 matches only because the cache is empty); we use the listed
# steps. Runs with another step count map the schedule by progress through the trajectory (below).
PAPER_SCHEDULE = (0, 8, 11, 13, 20, 25, 30, 35, 45, 46, 47, 48, 49)
PAPER_SCHEDULE_STEPS = 50
INDEX_PREFIX = "catome_idx/"  # inputs of the apply variant
OUTPUT_PREFIX = "catome_idx_out/"  # the same tensors as outputs of the match variant
VARIANTS = (MATCH, "apply")
CACHED_NAMES = ("order", "node_idx")  # per block; what the apply variant needs besides the partition
PARTITION_NAMES = ("partition", "partition_inv")


def index_name(block: str, name: str, output: bool = False) -> str:
    """Graph input (apply) or, with ``output``, output (match) name of one cached tensor of one block's
    matching; ``block=""``: the partition, shared by every block."""
    prefix = OUTPUT_PREFIX if output else INDEX_PREFIX
    return f"{prefix}{block}/{name}" if block else f"{prefix}{name}"


def as_cache_feed(outputs: dict) -> dict:
    """The match variant's cache outputs, renamed as the apply variant's inputs (other outputs dropped)."""
    return {INDEX_PREFIX + k[len(OUTPUT_PREFIX):]: v for k, v in outputs.items() if k.startswith(OUTPUT_PREFIX)}
