"""The mod method's graph half (docs/design.md).

- ``rewrite``: the pass
- ``variants``: its variant names and graph inputs, declared once
- ``graph``: the ONNX subgraph builders
- ``eager``: the same math in PyTorch, op for op
"""

from passes.mod.rewrite import ModConfig, ModPass, bucket_values, find_blocks

__all__ = [
    'ModConfig',
    'ModPass',
    'bucket_values',
    'find_blocks',
]
