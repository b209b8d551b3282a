from __future__ import annotations

import numpy as np
import pytest

from passes.partition import draw_partition, num_dst


@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (16, 16)])
def test_partition_is_a_permutation_with_one_dst_per_cell(grid):
    part, inv = draw_partition(grid, rng=np.random.default_rng(1))
    n = grid[0] * grid[1]
    assert sorted(part.tolist()) == list(range(n))
    assert (part[inv] == np.arange(n)).all()
    dst = part[n - num_dst(grid):]
    cells = {(int(p) // grid[1] // 2, int(p) % grid[1] // 2) for p in dst}
    assert len(cells) == num_dst(grid)
    assert all(int(p) // grid[1] < (grid[0] // 2) * 2 and int(p) % grid[1] < (grid[1] // 2) * 2 for p in dst)


def test_partition_is_seeded_and_deterministic_mode_is_top_left():
    a, _ = draw_partition((8, 8), rng=np.random.default_rng(7))
    b, _ = draw_partition((8, 8), rng=np.random.default_rng(7))
    c, _ = draw_partition((8, 8), rng=np.random.default_rng(8))
    assert (a == b).all() and (a != c).any()
    fixed, _ = draw_partition((4, 4))
    assert fixed[-4:].tolist() == [0, 2, 8, 10]
