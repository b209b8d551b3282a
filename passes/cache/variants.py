"""The step cache's variants (full, cached) and the residual inputs and outputs they carry.

Declared once: the rewrite, the build half (export/methods/cache.py) and the run-time policy
(runtime/policies/cache.py) import these names.
"""

from __future__ import annotations

CACHED = "cached"
CACHE_INPUT = "cache_residual."
CACHE_OUTPUT = "cache_residual_out."
FRONT_INPUT = "cache_front"
FRONT_OUTPUT = "cache_front_out"
CHANGE_OUTPUT = "cache_change"
VARIANTS = ("full", CACHED)
STREAMS = ("image", "text")


def cache_input(stream: str) -> str:
    return CACHE_INPUT + stream


def cache_output(stream: str) -> str:
    return CACHE_OUTPUT + stream
