"""The tome method's graph half (docs/design.md).

- ``rewrite``: the pass
- ``variants``: its variant names and graph inputs, declared once
- ``graph``: the ONNX subgraph builders
- ``eager``: the same math in PyTorch, op for op
- ``twin``: the eager twin, as hooks on the diffusers model
"""

from passes.tome.rewrite import (DEFAULT_LOCATIONS, DEFAULT_METRIC, LOCATIONS, ToMeConfig, ToMePass, count_values,
    merge_sites, strip_bucket_meta)
from passes.tome.variants import R_COUNT

__all__ = [
    'DEFAULT_LOCATIONS',
    'DEFAULT_METRIC',
    'LOCATIONS',
    'R_COUNT',
    'ToMeConfig',
    'ToMePass',
    'count_values',
    'merge_sites',
    'strip_bucket_meta',
]
