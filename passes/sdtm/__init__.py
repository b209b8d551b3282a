"""The sdtm method's graph half (docs/design.md).

- ``rewrite``: the pass
- ``variants``: its variant names and graph inputs, declared once
- ``graph``: the ONNX subgraph builders
- ``eager``: the same math in PyTorch, op for op
- ``twin``: the eager twin, as hooks on the diffusers model
"""

from passes.sdtm.rewrite import (LOCATIONS, MERGES, PromptWeightPass, SdtmConfig, SdtmPass, bucket_values,
    meta_counts, partition_from_counter, partition_from_counter_torch, tie_noise)
from passes.sdtm.variants import CACHE_OUTPUT, COUNTER_INPUT, COUNTER_OUTPUT, K_COUNT, R_COUNT, cache_input

__all__ = [
    'CACHE_OUTPUT',
    'COUNTER_INPUT',
    'COUNTER_OUTPUT',
    'K_COUNT',
    'LOCATIONS',
    'MERGES',
    'PromptWeightPass',
    'R_COUNT',
    'SdtmConfig',
    'SdtmPass',
    'bucket_values',
    'cache_input',
    'meta_counts',
    'partition_from_counter',
    'partition_from_counter_torch',
    'tie_noise',
]
