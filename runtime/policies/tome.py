"""ToMe at run time: a fresh seeded partition per step (tomesd draws one per call)."""

from __future__ import annotations

import numpy as np

from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT, draw_partition, layout
from runtime.policies import MAIN, GenState, StepPolicy


class PartitionDraws:
    """``draw_partition`` for one grid, stride and band count, many steps at a time.

    ``draw_many(rng, k)`` gives the partitions that ``k`` calls of ``draw_partition`` with ``rng`` give, in
    order (the generator's stream is consumed element by element, so one call for ``k`` steps draws what
    ``k`` calls draw; tests/runtime/test_loop.py checks it). Every numpy call costs far more right after a
    forward (cold caches) than in a warm loop; drawn ahead, a step makes none.
    """

    def __init__(self, grid: tuple[int, int], stride: tuple[int, int], bands: int) -> None:
        self.grid, self.stride, self.bands = grid, stride, bands
        (h, w), (sy, sx) = grid, stride
        self.cells = (h // sy, w // sx)
        cy, cx = np.meshgrid(np.arange(self.cells[0]), np.arange(self.cells[1]), indexing="ij")
        self.origin = (cy * sy * w + cx * sx).reshape(-1)  # flat position of each cell's top-left token
        self.offset = np.arange(sy)[:, None] * w + np.arange(sx)[None, :]  # [dy, dx] -> flat offset
        self.positions = np.arange(h * w, dtype=np.int64)
        self.fixed = draw_partition(grid, stride, None, bands)

    def draw_many(self, rng: np.random.Generator | None, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Partitions and inverses of ``k`` consecutive steps, [k, N] int64 each."""
        if rng is None:
            return np.tile(self.fixed[0], (k, 1)), np.tile(self.fixed[1], (k, 1))
        sy, sx = self.stride
        if sy == sx:
            dy, dx = np.moveaxis(rng.integers(0, sy, size=(k, 2, *self.cells)), 1, 0)
        else:  # per step all dy, then all dx, as draw_partition draws them
            steps = [(rng.integers(0, sy, size=self.cells), rng.integers(0, sx, size=self.cells)) for _ in range(k)]
            dy, dx = np.stack([s[0] for s in steps]), np.stack([s[1] for s in steps])
        dst_pos = self.origin + self.offset[dy, dx].reshape(k, -1)  # [k, cells]
        if self.bands != 1:
            parts = [layout(self.grid, row, self.bands) for row in dst_pos]
            return np.stack([p for p, _ in parts]), np.stack([i for _, i in parts])
        steps = np.arange(k)[:, None]
        is_dst = np.zeros((k, self.positions.size), dtype=bool)
        is_dst[steps, dst_pos] = True
        src = np.broadcast_to(self.positions, is_dst.shape)[~is_dst].reshape(k, -1)  # ascending, per step
        partition = np.concatenate((src, dst_pos), axis=1)
        inverse = np.empty_like(partition)
        inverse[steps, partition] = self.positions
        return partition, inverse


class ToMePolicy(StepPolicy):
    rows_independent = True
    AHEAD = 16  # steps whose partitions are drawn at once

    def __init__(self, plan, deterministic: bool = False) -> None:
        super().__init__(plan, deterministic)
        self.stride = tuple(self.params.get("stride", (2, 2)))
        self._draws: dict[int, PartitionDraws] = {}

    def select(self, state: GenState, bucket, batch: int) -> tuple[str, dict[str, np.ndarray]]:
        if not bucket.meta.get("sites"):  # the unmerged base graph (a merged graph at r = 0 still takes a partition)
            return MAIN, {}
        bands = int(bucket.meta.get("bands", self.params.get("bands", 1)))
        ahead = state.data.get(("tome_partitions", bands))  # [partitions, inverses, next row]
        if ahead is None or ahead[2] == len(ahead[0]):
            draws = self._draws.get(bands)
            if draws is None:
                draws = self._draws[bands] = PartitionDraws(self.grid, self.stride, bands)
            ahead = state.data[("tome_partitions", bands)] = [
                *draws.draw_many(None if self.deterministic else state.rng, self.AHEAD), 0]
        row = ahead[2]
        ahead[2] += 1
        return MAIN, {PARTITION_INPUT: ahead[0][row], PARTITION_INV_INPUT: ahead[1][row]}


POLICY = ToMePolicy
