"""The catome method's graph half (docs/design.md).

- ``rewrite``: the pass
- ``variants``: its variant names and graph inputs, declared once
- ``twin``: the eager twin, as hooks on the diffusers model
"""

from passes.catome.rewrite import CaToMePass
from passes.catome.variants import CACHED_NAMES, INDEX_PREFIX, OUTPUT_PREFIX, PARTITION_NAMES, as_cache_feed, index_name

__all__ = [
    'CACHED_NAMES',
    'CaToMePass',
    'INDEX_PREFIX',
    'OUTPUT_PREFIX',
    'PARTITION_NAMES',
    'as_cache_feed',
    'index_name',
]
