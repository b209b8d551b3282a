"""ToMe at run time: a fresh seeded partition per step (tomesd draws one per call)."""

from __future__ import annotations

import numpy as np

from passes.partition import draw_partition
from passes.tome import PARTITION_INPUT, PARTITION_INV_INPUT
from runtime.policies import MAIN, GenState, StepPolicy


class ToMePolicy(StepPolicy):
    def __init__(self, plan, deterministic: bool = False) -> None:
        super().__init__(plan, deterministic)
        self.stride = tuple(self.params.get("stride", (2, 2)))

    def select(self, state: GenState, bucket, batch: int) -> tuple[str, dict[str, np.ndarray]]:
        if not bucket.meta.get("sites"):  # the unmerged base graph (a merged graph at r = 0 still takes a partition)
            return MAIN, {}
        bands = int(bucket.meta.get("bands", self.params.get("bands", 1)))
        part, inv = draw_partition(self.grid, self.stride, None if self.deterministic else state.rng, bands)
        return MAIN, {PARTITION_INPUT: part, PARTITION_INV_INPUT: inv}


POLICY = ToMePolicy
