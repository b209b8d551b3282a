"""The dst/src partition of the token grid (tomesd's random 2D destination selection).

The grid is tiled into ``sy x sx`` cells; each full cell holds one dst token, chosen at random per
step (or its top-left token when ``rng`` is None); all other tokens are src. The graph receives the
partition ``[src..., dst...]`` and its inverse as int64 inputs, so TensorRT never sees a random op.
"""

from __future__ import annotations

import numpy as np


def num_dst(grid: tuple[int, int], stride: tuple[int, int] = (2, 2)) -> int:
    return (grid[0] // stride[0]) * (grid[1] // stride[1])


def draw_partition(grid: tuple[int, int], stride: tuple[int, int] = (2, 2),
                   rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(partition, inverse)``: int64 ``[N]`` each, src positions first, then dst."""
    h, w = grid
    sy, sx = stride
    hc, wc = h // sy, w // sx
    if rng is None:
        dy = np.zeros((hc, wc), dtype=np.int64)
        dx = np.zeros((hc, wc), dtype=np.int64)
    else:
        dy = rng.integers(0, sy, size=(hc, wc))
        dx = rng.integers(0, sx, size=(hc, wc))
    cy, cx = np.meshgrid(np.arange(hc), np.arange(wc), indexing="ij")
    dst = ((cy * sy + dy) * w + (cx * sx + dx)).reshape(-1).astype(np.int64)
    is_dst = np.zeros(h * w, dtype=bool)
    is_dst[dst] = True
    src = np.flatnonzero(~is_dst).astype(np.int64)
    partition = np.concatenate([src, dst])
    inverse = np.empty_like(partition)
    inverse[partition] = np.arange(h * w, dtype=np.int64)
    return partition, inverse
