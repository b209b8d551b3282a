"""The atedm method's graph half (docs/design.md).

- ``rewrite``: the pass
- ``variants``: its variant names and graph inputs, declared once
- ``graph``: the ONNX subgraph builders
- ``eager``: the same math in PyTorch, op for op
- ``twin``: the eager twin, as hooks on the diffusers model
"""

from passes.atedm.rewrite import ATEDMConfig, ATEDMPass, bucket_values, count_blocks, find_blocks

__all__ = [
    'ATEDMConfig',
    'ATEDMPass',
    'bucket_values',
    'count_blocks',
    'find_blocks',
]
