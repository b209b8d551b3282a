"""The dst/src partition of the token grid (tomesd's random 2D destination selection).

The grid is tiled into ``sy x sx`` cells; each full cell holds one dst token, chosen at random per
step (or its top-left token when ``rng`` is None); all other tokens are src. The graph receives the
partition and its inverse as int64 inputs, so TensorRT never sees a random op.

With ``bands > 1`` the grid is cut into horizontal bands of equal height, each its own bipartite
problem (TensorRT's TopK takes at most 3840 elements): the partition is then
``[band 0 src..., band 0 dst..., band 1 src..., ...]``.
"""

from __future__ import annotations

import numpy as np

from passes.trt_limits import TOPK_MAX_K

# the graph inputs that carry a partition and its inverse (every method that merges bipartitely reads them)
PARTITION_INPUT = "tome_partition"
PARTITION_INV_INPUT = "tome_partition_inv"


def num_dst(grid: tuple[int, int], stride: tuple[int, int] = (2, 2)) -> int:
    return (grid[0] // stride[0]) * (grid[1] // stride[1])


def draw_partition(grid: tuple[int, int], stride: tuple[int, int] = (2, 2), rng: np.random.Generator | None = None,
                   bands: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(partition, inverse)``: int64 ``[N]`` each; per band, src positions first, then dst."""
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
    dst_pos = ((cy * sy + dy) * w + (cx * sx + dx)).reshape(-1).astype(np.int64)
    return layout((h, w), dst_pos, bands)


def layout(grid: tuple[int, int], dst_pos: np.ndarray, bands: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The partition of chosen dst positions as the graphs take it: per band its src, then its dst; and its inverse."""
    h, w = grid
    is_dst = np.zeros(h * w, dtype=bool)
    is_dst[dst_pos] = True
    band_h = h // bands
    parts = []
    for k in range(bands):
        rows = np.arange(k * band_h * w, (k + 1) * band_h * w)
        parts.append(rows[~is_dst[rows]])
        parts.append(dst_pos[(dst_pos // w >= k * band_h) & (dst_pos // w < (k + 1) * band_h)])
    partition = np.concatenate(parts).astype(np.int64)
    inverse = np.empty_like(partition)
    inverse[partition] = np.arange(h * w, dtype=np.int64)
    return partition, inverse


def plan_bands(grid: tuple[int, int], stride: tuple[int, int] = (2, 2), max_src: int = TOPK_MAX_K) -> int:
    """The fewest equal bands (whole cell rows each) whose src count fits ``max_src``; 0 if none does.

    One band (no banding) works for any grid, odd sizes included: leftover rows and columns are src.
    """
    h, w = grid
    sy = stride[0]
    if h * w - num_dst(grid, stride) <= max_src:
        return 1
    for bands in range(2, h // sy + 1):
        if h % bands or (h // bands) % sy:
            continue
        band_tokens = (h // bands) * w
        if band_tokens - num_dst((h // bands, w), stride) <= max_src:
            return bands
    return 0


def merged_count(ratio: float, tokens: int, num_src: int) -> int:
    """tomesd's ratio semantics: r = int(N * ratio) tokens are removed, at most all src tokens.

    With banded matching r is rounded down to a multiple of the band count (each band merges r / K).
    """
    return min(int(tokens * ratio), num_src)


def max_ratio(grid: tuple[int, int], stride: tuple[int, int] = (2, 2)) -> float:
    n = grid[0] * grid[1]
    return (n - num_dst(grid, stride)) / n
