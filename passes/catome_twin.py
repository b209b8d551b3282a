"""Eager twin of CA-ToMe's graph variants: ToMe hooks that record each block's matching or reuse a cached one."""

from __future__ import annotations

import numpy as np
import torch

from passes import tome_math
from passes.catome import index_name
from passes.tome_graph import INDEX_NAMES
from passes.twin import ToMeTwin


class CaToMeTwin(ToMeTwin):
    """ToMe on ``sites``; with ``cached`` set (block -> index tensors) it merges with those indices instead
    of matching (the apply variant); otherwise it matches (the match variant) and records the indices."""

    def __init__(self, model: torch.nn.Module, sites: list[str], num_src: int, r: int | dict[str, int], bands: int = 1,
                 cached: dict[str, dict[str, torch.Tensor]] | None = None, metric: str = "sublayer",
                 metric_blocks: list[str] | None = None) -> None:
        super().__init__(model, sites, num_src, r, bands, metric, metric_blocks)
        self.cached = cached
        self.recorded: dict[str, dict[str, torch.Tensor]] = {}

    def _match(self, block: str, x: torch.Tensor) -> tome_math.TorchMatch:
        if self.cached is not None:
            idx = self.cached[block]
            return tome_math.from_indices(idx["unm"], idx["mrg"], idx["mrg_dst"], idx["dst"], idx["row"],
                                          self.num_src, x.dtype)
        mt = super()._match(block, x)
        self.recorded[block] = mt.indices()
        return mt


def to_feed(indices: dict[str, dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Block -> index tensors, as the graph's ``catome_idx/<block>/<name>`` feed (int64)."""
    return {index_name(block, k): np.ascontiguousarray(v.numpy().astype(np.int64))
            for block, idx in indices.items() for k, v in idx.items()}


def from_feed(feed: dict[str, np.ndarray], blocks: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The inverse of :func:`to_feed`: graph outputs of the match variant -> the twin's cache."""
    return {b: {k: torch.from_numpy(np.asarray(feed[index_name(b, k)])) for k in INDEX_NAMES} for b in blocks}
