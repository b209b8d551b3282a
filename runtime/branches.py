"""Running one variant of a branched graph (:mod:`passes.branch`): its count, stand-ins, its own outputs."""

from __future__ import annotations

import numpy as np

from passes.branch import VARIANT_COUNT
from passes.counts import count_feed, is_count_input
from passes.errors import DitmergeError

_STAND_INS: dict[tuple, np.ndarray] = {}


FEED_CACHE_SIZE = 64  # shape signatures per graph: a pipeline has a few (batch sizes, prompt lengths)


def variant_feed(info: dict, variant: str, inputs: dict[str, tuple[np.dtype, list]], given: dict[str, object],
                 cache: dict | None = None) -> dict:
    """The extra inputs that run ``variant`` of a branched graph: the variant count, and zeros for every input
    only other variants read (their values never reach this variant's branch).

    ``inputs``: the graph's inputs (name -> dtype, dims); ``given``: what the call and the policy feed, whose
    shapes size the dynamic dims of the stand-ins. ``cache`` (one dict per graph, the caller's): the feed
    per shape signature (the variant, and the name and shape of every given input of the graph), so a call
    whose signature was seen does not walk the graph's inputs again.
    """
    if cache is not None:
        key = (variant, tuple((k, tuple(getattr(v, "shape", ()))) for k, v in given.items() if k in inputs))
        out = cache.get(key)
        if out is None:
            if len(cache) >= FEED_CACHE_SIZE:
                cache.clear()
            out = cache[key] = _variant_feed(info, variant, inputs, given)
        return out
    return _variant_feed(info, variant, inputs, given)


def _variant_feed(info: dict, variant: str, inputs: dict[str, tuple[np.dtype, list]], given: dict[str, object]) -> dict:
    spec = info["variants"].get(variant)
    if spec is None:
        raise DitmergeError(f"the graph has no {variant!r} variant (it has {', '.join(info['variants'])}); rebuild the plan")
    own = set(spec["inputs"])
    sizes = _dim_sizes(inputs, given)
    out = dict(count_feed({VARIANT_COUNT: spec["index"]}))
    for name, (dtype, dims) in inputs.items():
        if name in own or is_count_input(name) or name in given:
            continue
        shape = tuple(d if isinstance(d, int) else sizes.get(d, 1) for d in dims)
        key = (np.dtype(dtype).str, shape)
        if key not in _STAND_INS:
            arr = np.zeros(shape, dtype)
            arr.setflags(write=False)
            _STAND_INS[key] = arr
        out[name] = _STAND_INS[key]
    return out


def branch_of(meta: dict, variant: str) -> str:
    """The branch of a branched graph that a bucket's ``variant`` runs: the variant's own, unless the bucket's
    ``method_meta.branch`` maps it elsewhere (an unmerged CA-ToMe bucket's main step runs the ``plain`` branch)."""
    return (meta.get("branch") or {}).get(variant, variant)


def variant_outputs(info: dict, variant: str, outputs: dict) -> dict:
    """Only the outputs ``variant`` computes (the others are its branch's zeros)."""
    own = info["variants"][variant]["outputs"]
    return {k: v for k, v in outputs.items() if k in own}


def _dim_sizes(inputs: dict[str, tuple[np.dtype, list]], given: dict[str, object]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name, (_, dims) in inputs.items():
        value = given.get(name)
        shape = getattr(value, "shape", None)
        if shape is None or len(shape) != len(dims):
            continue
        for d, got in zip(dims, shape):
            if isinstance(d, str):
                sizes.setdefault(d, int(got))
    return sizes
