"""ToMe at run time: a fresh seeded partition per step (tomesd draws one per call)."""

from __future__ import annotations

import numpy as np

from passes.partition import draw_partition, layout
from passes.tome import PARTITION_INPUT, PARTITION_INV_INPUT
from runtime.policies import MAIN, GenState, StepPolicy


class PartitionDraws:
    """``draw_partition`` for one grid, stride and band count, its fixed parts computed once.

    The same random draws in the same order give the same arrays as ``draw_partition`` (integer arithmetic);
    the grid's cell origins and the fixed (deterministic) partition are made once, not on every step.
    """

    def __init__(self, grid: tuple[int, int], stride: tuple[int, int], bands: int) -> None:
        self.grid, self.stride, self.bands = grid, stride, bands
        (h, w), (sy, sx) = grid, stride
        self.cells = (h // sy, w // sx)
        cy, cx = np.meshgrid(np.arange(self.cells[0]), np.arange(self.cells[1]), indexing="ij")
        self.origin = cy * sy * w + cx * sx  # flat position of each cell's top-left token
        self.fixed = draw_partition(grid, stride, None, bands)

    def draw(self, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
        if rng is None:
            return self.fixed[0].copy(), self.fixed[1].copy()
        dy = rng.integers(0, self.stride[0], size=self.cells)
        dx = rng.integers(0, self.stride[1], size=self.cells)
        dst_pos = (self.origin + dy * self.grid[1] + dx).reshape(-1).astype(np.int64)
        return layout(self.grid, dst_pos, self.bands)


class ToMePolicy(StepPolicy):
    def __init__(self, plan, deterministic: bool = False) -> None:
        super().__init__(plan, deterministic)
        self.stride = tuple(self.params.get("stride", (2, 2)))
        self._draws: dict[int, PartitionDraws] = {}

    def select(self, state: GenState, bucket, batch: int) -> tuple[str, dict[str, np.ndarray]]:
        if not bucket.meta.get("r"):
            return MAIN, {}
        bands = int(bucket.meta.get("bands", self.params.get("bands", 1)))
        draws = self._draws.get(bands)
        if draws is None:
            draws = self._draws[bands] = PartitionDraws(self.grid, self.stride, bands)
        part, inv = draws.draw(None if self.deterministic else state.rng)
        return MAIN, {PARTITION_INPUT: part, PARTITION_INV_INPUT: inv}


POLICY = ToMePolicy
