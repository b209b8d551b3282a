"""The cache method's graph half (docs/design.md).

- ``rewrite``: the pass
- ``variants``: its variant names and graph inputs, declared once
- ``twin``: the eager twin, as hooks on the diffusers model
"""

from passes.cache.rewrite import CacheConfig, CachePass, block_paths, locate_span, span_counts
from passes.cache.variants import CACHE_OUTPUT, CHANGE_OUTPUT, FRONT_INPUT, FRONT_OUTPUT, cache_input, cache_output

__all__ = [
    'CACHE_OUTPUT',
    'CHANGE_OUTPUT',
    'CacheConfig',
    'CachePass',
    'FRONT_INPUT',
    'FRONT_OUTPUT',
    'block_paths',
    'cache_input',
    'cache_output',
    'locate_span',
    'span_counts',
]
