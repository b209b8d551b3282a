"""Eager twin of CA-ToMe's graph variants: ToMe hooks that record each block's matching or reuse a cached one."""

from __future__ import annotations

import numpy as np
import torch

from passes.tome import eager as tome_math
from passes.catome.rewrite import CACHED_NAMES, PARTITION_NAMES, index_name
from passes.tome.twin import ToMeTwin

PARTITION = ""  # the key of the shared partition in a cache (block -> tensors)


class CaToMeTwin(ToMeTwin):
    """ToMe on ``sites``; with ``cached`` set (block -> {order, node_idx}, and ``PARTITION`` -> {partition,
    partition_inv}) it merges with that matching at this twin's r instead of matching (the apply
    variant); otherwise it matches (the match variant) and records the same tensors."""

    def __init__(self, model: torch.nn.Module, sites: list[str], num_src: int, r: int | dict[str, int], bands: int = 1,
                 cached: dict[str, dict[str, torch.Tensor]] | None = None, metric: str = "sublayer",
                 metric_blocks: list[str] | None = None) -> None:
        super().__init__(model, sites, num_src, r, bands, metric, metric_blocks)
        self.cached = cached
        self.recorded: dict[str, dict[str, torch.Tensor]] = {}
        if cached is not None:
            self.set_partition(cached[PARTITION]["partition"], cached[PARTITION]["partition_inv"])

    def set_partition(self, partition: torch.Tensor, partition_inv: torch.Tensor) -> None:
        super().set_partition(partition, partition_inv)
        self.recorded[PARTITION] = {"partition": self.partition, "partition_inv": self.partition_inv}

    def _match(self, block: str, x: torch.Tensor) -> tome_math.TorchMatch:
        r = self.r[block] if isinstance(self.r, dict) else self.r
        if self.cached is not None:
            order, node_idx = self.cached[block]["order"], self.cached[block]["node_idx"]
        else:
            order, node_idx = tome_math.order_of(x, self.partition, self.num_src, self.bands)
            self.recorded[block] = {"order": order, "node_idx": node_idx}
        return tome_math.match_from_order(order, node_idx, self.partition, self.partition_inv, self.num_src, r,
                                          self.bands, x.dtype)


def to_feed(cache: dict[str, dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """A twin's cache (block -> tensors, ``PARTITION`` -> the partition) as the graph's ``catome_idx/`` feed."""
    return {index_name(block, k): np.ascontiguousarray(np.asarray(v).astype(np.int64))
            for block, tensors in cache.items() for k, v in tensors.items()}


def from_feed(feed: dict[str, np.ndarray], blocks: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The inverse of :func:`to_feed` (apply inputs, or match outputs through ``as_cache_feed``) -> a twin's cache."""
    out = {b: {k: torch.from_numpy(np.asarray(feed[index_name(b, k)])) for k in CACHED_NAMES} for b in blocks}
    out[PARTITION] = {k: torch.from_numpy(np.asarray(feed[index_name("", k)])) for k in PARTITION_NAMES}
    return out
