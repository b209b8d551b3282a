"""SDTM's structure-stage window merge, staleness counters and cache blending as ONNX subgraphs.

No knowledge of DiTs or node names here (the pass wires these in); the eager twin of the same math,
op for op, is :mod:`passes.sdtm.eager`. Everything is TensorRT-safe: TopK with a constant K (the
number of windows, <= 3840 for grids up to 123x123 windows; the merged count k is only a Slice bound
and index arithmetic, a shape tensor when it comes from a count input), Gather, ReduceMean, Where, ScatterElements
without a reduction (the inverse permutation, in int64), no data-dependent shapes.

Structure stage ("SSM" in the released code): the grid is tiled into 2x2 windows. Window score =
similarity + a_s * staleness, where

- similarity is the released code's mean over all 16 (i, j) cosine similarities of the window's 4
  tokens, self-pairs included; that equals ``||mean_w(x / ||x||)||^2`` (= 0.25 + 0.75 * the mean
  pairwise similarity), which is what we compute;
- staleness is the window mean of ``c / (mean_N(c) + 1e-6)``, with ``c [B, N]`` the per-token count
  of merge calls since the token was last left unmerged.

The top ``k`` windows collapse to their mean; the merged tensor is ``[tokens outside any window
(odd grids), tokens of the windows not chosen (4 each, score order), means of the chosen windows]``
and unmerge copies a window's value back to its 4 positions with one Gather.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.graphbuild import Emitter, count_value, inverse_permutation, unit_rows
from passes.tome.graph import NORM_EPS

COUNTER_EPS = 1e-6  # the released code's eps in c / (mean(c) + eps)


@dataclasses.dataclass(frozen=True)
class WindowGeometry:
    """Static sizes of one window merge: an ``H x W`` grid, 2x2 windows, ``k`` of them merged."""

    grid: tuple[int, int]
    k: int

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_windows(self) -> int:
        return (self.grid[0] // 2) * (self.grid[1] // 2)

    @property
    def kept(self) -> int:
        return self.tokens - 3 * self.k

    @property
    def unmerged(self) -> int:
        """Rows of the merged tensor that hold single tokens (the rest are window means)."""
        return self.tokens - 4 * self.k

    def windows(self) -> np.ndarray:
        """``[Nw, 4]`` token positions of each window, row-major windows, slots (0,0) (0,1) (1,0) (1,1)."""
        h, w = self.grid
        wy, wx = np.meshgrid(np.arange(h // 2), np.arange(w // 2), indexing="ij")
        base = (2 * wy * w + 2 * wx).reshape(-1, 1)
        return (base + np.array([0, 1, w, w + 1])).astype(np.int64)

    def leftover(self) -> np.ndarray:
        """Positions in no window (the last row / column of odd grids), ascending."""
        inside = np.zeros(self.tokens, dtype=bool)
        inside[self.windows().reshape(-1)] = True
        return np.flatnonzero(~inside).astype(np.int64)

    def layout_inverse(self) -> np.ndarray:
        """Position -> index in ``[leftover, windows().flatten()]``."""
        order = np.concatenate([self.leftover(), self.windows().reshape(-1)])
        inv = np.empty_like(order)
        inv[order] = np.arange(self.tokens, dtype=np.int64)
        return inv


@dataclasses.dataclass
class WindowState:
    """Index tensors of one window matching, shared by every merge/unmerge of a block."""

    geometry: WindowGeometry
    unm_flat: gs.Variable  # [B, N-4k] rows of the batch-flattened input kept as single tokens
    win_flat: gs.Variable  # [B, k, 4] rows of the tokens of each chosen window
    map_flat: gs.Variable  # [B, N] row of the batch-flattened merged tensor each position reads
    independent: gs.Variable  # [B, N] bool: the position was left unmerged


def batch_offsets(em: Emitter, x: gs.Variable) -> gs.Variable:
    """``[B]`` int64 0..B-1 for a ``[B, ...]`` tensor."""
    batch = em.op("Squeeze", [em.op("Shape", [x], {"start": 0, "end": 1}), em.ints("axis", [0])])
    return em.op("Range", [em.ints("zero", 0), batch, em.ints("one", 1)])


def _unit(em: Emitter, x: gs.Variable) -> gs.Variable:
    return unit_rows(em, x, NORM_EPS)  # x / ||x||, scaled first (fp16-safe)


def build_window_match(em: Emitter, x: gs.Variable, counter: gs.Variable, geo: WindowGeometry,
                       a_s: float, k_count: gs.Variable | None = None) -> WindowState:
    """Score the 2x2 windows of ``x [B, N, C]`` and pick the top ``k`` (see the module docstring).

    ``k_count``: the count input whose length is k (:mod:`passes.counts`), so one graph serves every k;
    None bakes ``geo.k`` into the graph.
    """
    n, nw = geo.tokens, geo.num_windows
    leftover = geo.leftover()
    nl = len(leftover)
    k = em.ints("k", [geo.k]) if k_count is None else count_value(em, k_count)  # int64 [1]
    four_k = em.op("Mul", [k, em.ints("four", [4])], hint="four_k")
    u = em.op("Sub", [em.ints("n", [n]), four_k], hint="unmerged")  # rows holding single tokens: N - 4k
    windows = em.ints("windows", geo.windows().tolist())

    m = _unit(em, x)
    mean = em.op("ReduceMean", [em.op("Gather", [m, windows], {"axis": 1}), em.ints("axis", [2])],
                 {"keepdims": 0})  # [B, Nw, C]
    sim = em.op("ReduceSum", [em.op("Mul", [mean, mean]), em.ints("axis", [-1])], {"keepdims": 0}, hint="sim")
    c_mean = em.op("ReduceMean", [counter, em.ints("axis", [1])], {"keepdims": 1})
    prio = em.op("Div", [counter, em.op("Add", [c_mean, em.const("eps", np.float32(COUNTER_EPS))])])
    prio_w = em.op("ReduceMean", [em.op("Gather", [prio, windows], {"axis": 1}), em.ints("axis", [-1])],
                   {"keepdims": 0})  # [B, Nw]
    score = em.op("Add", [sim, em.op("Mul", [prio_w, em.const("a_s", np.float32(a_s))])], hint="score")

    # windows by score, descending (ties: lower index first); rank = its inverse permutation, in int64
    _, order = em.op("TopK", [score, em.ints("k", [nw])], {"axis": -1, "largest": 1, "sorted": 1}, num_outputs=2)
    rank = inverse_permutation(em, order, nw, axis=1)
    chosen = em.op("Slice", [order, em.ints("zero", [0]), k, em.ints("axis", [1])])
    rest = em.op("Slice", [order, k, em.ints("nw", [nw]), em.ints("axis", [1])])

    boff = batch_offsets(em, x)
    off_n = em.op("Mul", [em.op("Unsqueeze", [boff, em.ints("axes", [1, 2])]), em.ints("n", n)])  # [B, 1, 1]
    win_flat = em.op("Add", [em.op("Gather", [windows, chosen], {"axis": 0}), off_n], hint="win_flat")  # [B, k, 4]
    batch_shape = em.op("Shape", [x], {"start": 0, "end": 1})
    rest_len = em.op("Sub", [em.ints("n", [4 * nw]), four_k])  # 4 (Nw - k)
    rest_tok = em.op("Reshape", [em.op("Gather", [windows, rest], {"axis": 0}),
                                 em.op("Concat", [batch_shape, rest_len], {"axis": 0})],
                     {"allowzero": 1})  # [B, 4 (Nw-k)]
    zeros_b = em.op("Mul", [em.op("Unsqueeze", [boff, em.ints("axis", [1])]), em.ints("zero", 0)])  # [B, 1]
    if nl:
        rest_tok = em.op("Concat", [em.op("Add", [zeros_b, em.ints("leftover", leftover.reshape(1, -1).tolist())]),
                                    rest_tok], {"axis": 1})
    unm_flat = em.op("Add", [rest_tok, em.op("Squeeze", [off_n, em.ints("axis", [2])])], hint="unm_flat")  # [B, U]

    # unmerge map in layout order [leftover, window slots]: a chosen window (rank q < k) reads the mean
    # in row U + q; an unchosen one reads its own tokens, rows nl + 4 (q - k) + slot
    rank3 = em.op("Unsqueeze", [rank, em.ints("axis", [2])])  # [B, Nw, 1]
    slot = em.op("Sub", [em.ints("slot", (nl + np.arange(4)).reshape(1, 1, 4).tolist()), four_k])  # nl - 4k + slot
    row_win = em.op("Where", [em.op("Less", [rank3, k]),
                              em.op("Add", [rank3, u]),
                              em.op("Add", [em.op("Mul", [rank3, em.ints("four", 4)]), slot])])
    row_layout = em.op("Reshape", [row_win, em.ints("shape", [0, 4 * nw])])
    if nl:
        row_layout = em.op("Concat", [em.op("Add", [zeros_b, em.ints("rows", np.arange(nl).reshape(1, -1).tolist())]),
                                      row_layout], {"axis": 1})
    row = em.op("Gather", [row_layout, em.ints("layout_inv", geo.layout_inverse().tolist())], {"axis": 1})  # [B, N]
    independent = em.op("Less", [row, u], hint="independent")
    kept = em.op("Sub", [em.ints("n", [n]), em.op("Mul", [k, em.ints("three", [3])])], hint="kept")  # N - 3k
    map_flat = em.op("Add", [row, em.op("Mul", [em.op("Unsqueeze", [boff, em.ints("axis", [1])]), kept])],
                     hint="map_flat")
    return WindowState(geo, unm_flat, win_flat, map_flat, independent)


def build_window_merge(em: Emitter, x: gs.Variable, state: WindowState, channels: int) -> gs.Variable:
    """[B, N, C] -> [B, N-3k, C]: single tokens, then each chosen window's mean."""
    xf = em.op("Reshape", [x, em.ints("shape", [-1, channels])])
    unm = em.op("Gather", [xf, state.unm_flat], {"axis": 0})  # [B, U, C]
    win = em.op("Gather", [xf, state.win_flat], {"axis": 0})  # [B, k, 4, C]
    mean = em.op("ReduceMean", [win, em.ints("axis", [2])], {"keepdims": 0})  # [B, k, C]
    return em.op("Concat", [unm, mean], {"axis": 1}, hint="merged")


def build_gather_unmerge(em: Emitter, y: gs.Variable, map_flat: gs.Variable, channels: int) -> gs.Variable:
    """[B, N', C] -> [B, N, C]: one Gather of the batch-flattened tensor."""
    yf = em.op("Reshape", [y, em.ints("shape", [-1, channels])])
    return em.op("Gather", [yf, map_flat], {"axis": 0}, hint="unmerged")


def build_independent_from_map(em: Emitter, x: gs.Variable, map_flat: gs.Variable, kept: int | gs.Variable,
                               unmerged: int | gs.Variable) -> gs.Variable:
    """``[B, N]`` bool from a ToMe unmerge map: the position reads an unmerged src row (rows < ``unmerged``).

    ``kept`` and ``unmerged`` are ints, or int64 [1] tensors when they follow a count input.
    """
    kept = em.ints("kept", [kept]) if isinstance(kept, int) else kept
    unmerged = em.ints("u", [unmerged]) if isinstance(unmerged, int) else unmerged
    boff = batch_offsets(em, x)
    row = em.op("Sub", [map_flat, em.op("Mul", [em.op("Unsqueeze", [boff, em.ints("axis", [1])]), kept])])
    return em.op("Less", [row, unmerged], hint="independent")


def build_counter_update(em: Emitter, counter: gs.Variable, independent: gs.Variable) -> gs.Variable:
    """c' = 0 where the token was left unmerged, c + 1 elsewhere (one merge call)."""
    return em.op("Where", [independent, em.const("zero", np.float32(0.0)),
                           em.op("Add", [counter, em.const("one", np.float32(1.0))])], hint="counter")


def build_blend(em: Emitter, y: gs.Variable, cache: gs.Variable, independent: gs.Variable,
                weight: float) -> gs.Variable:
    """At merged positions ``weight * y + (1 - weight) * cache``; unmerged positions keep ``y``.

    As ``y + merged * (1 - weight) * (cache - y)`` with a float mask: a broadcast Where over
    ``[B, N, C]`` was several times slower on onnxruntime's CPU provider.
    """
    merged = em.op("Unsqueeze", [em.op("Cast", [em.op("Not", [independent])], {"to": onnx.TensorProto.FLOAT}),
                                 em.ints("axis", [2])])
    delta = em.op("Mul", [em.op("Sub", [cache, y]), em.const("w_cache", np.float32(1.0 - weight))])
    return em.op("Add", [y, em.op("Mul", [delta, merged])], hint="blended")
