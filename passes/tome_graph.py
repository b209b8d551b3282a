"""ToMe merge/unmerge as ONNX subgraphs (DESIGN.md §3), with no knowledge of DiTs or node names.

Everything here is what TensorRT parses and builds: TopK with K = number of src tokens (callers keep
it <= 3840), Gather / GatherElements, MatMul, Equal, no scatter with a reduction, no data-dependent
shapes. The eager twin of this math is :mod:`passes.tome_math`; keep the two in step.

Inputs of the matching: ``x [B, N, C]``, the partition ``P [N]`` (int64: the ``Na`` src positions,
then the ``Nb`` dst positions) and its inverse ``Pinv [N]`` (position -> index in ``P``), both graph
inputs drawn by the runtime each step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.graphbuild import Emitter

NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static sizes of one merge: N tokens, Na src, Nb dst, r merged away, C channels of the metric."""

    tokens: int
    num_src: int
    r: int

    @property
    def num_dst(self) -> int:
        return self.tokens - self.num_src

    @property
    def kept(self) -> int:
        return self.tokens - self.r


@dataclasses.dataclass
class MatchState:
    """Index tensors of one matching, shared by every merge/unmerge that uses it."""

    geometry: Geometry
    unm_flat: gs.Variable  # [B, Na-r] rows of the batch-flattened input that stay unmerged
    mrg_flat: gs.Variable  # [B, r] rows that merge into a dst
    dst_flat: gs.Variable  # [B, Nb] rows of the dst tokens
    assign: gs.Variable  # [B, Nb, r] float one-hot: merged src j goes to dst i
    count: gs.Variable  # [B, Nb, 1] float: 1 + number of src merged into each dst
    map_flat: gs.Variable  # [B, N] row of the batch-flattened merged tensor that each position reads


def build_match(em: Emitter, x: gs.Variable, partition: gs.Variable, partition_inv: gs.Variable,
                geo: Geometry) -> MatchState:
    """Bipartite soft matching of src onto dst tokens by cosine similarity of ``x``."""
    n, na, nb, r = geo.tokens, geo.num_src, geo.num_dst, geo.r
    src_idx = em.op("Slice", [partition, em.ints("zero", [0]), em.ints("na", [na])], hint="src_idx")
    dst_idx = em.op("Slice", [partition, em.ints("na", [na]), em.ints("n", [n])], hint="dst_idx")

    # m = x / max(||x||, eps)
    sq = em.op("Mul", [x, x])
    norm = em.op("Sqrt", [em.op("ReduceSum", [sq, em.ints("axis", [-1])], {"keepdims": 1})])
    norm = em.op("Max", [norm, em.const("eps", np.float32(NORM_EPS))])
    m = em.op("Div", [x, norm], hint="metric")

    # scores[b, i, j] = <m_src_i, m_dst_j>; each src picks its best dst
    a = em.op("Gather", [m, src_idx], {"axis": 1})
    b = em.op("Gather", [m, dst_idx], {"axis": 1})
    scores = em.op("MatMul", [a, em.op("Transpose", [b], {"perm": [0, 2, 1]})], hint="scores")
    node_max = em.op("ReduceMax", [scores, em.ints("axis", [-1])], {"keepdims": 0})
    node_idx = em.op("ArgMax", [scores], {"axis": -1, "keepdims": 0})

    # order: src sorted by best similarity, descending (ties: lower index first, as torch's stable sort)
    _, order = em.op("TopK", [node_max, em.ints("k", [na])], {"axis": -1, "largest": 1, "sorted": 1}, num_outputs=2)
    # rank = inverse permutation of order, without a scatter: ascending TopK of the (exact) float indices
    order_f = em.op("Cast", [order], {"to": onnx.TensorProto.FLOAT})
    _, rank = em.op("TopK", [order_f, em.ints("k", [na])], {"axis": -1, "largest": 0, "sorted": 1}, num_outputs=2)

    unm_order = em.op("Slice", [order, em.ints("r", [r]), em.ints("na", [na]), em.ints("axis", [1])])
    mrg_order = em.op("Slice", [order, em.ints("zero", [0]), em.ints("r", [r]), em.ints("axis", [1])])
    mrg_dst = em.op("GatherElements", [node_idx, mrg_order], {"axis": 1})

    # assign[b, i, j] = (mrg_dst[b, j] == i); count = 1 + sum_j assign  (the dst itself counts once)
    eq = em.op("Equal", [em.op("Unsqueeze", [mrg_dst, em.ints("axis", [1])]),
                         em.ints("dst_range", np.arange(nb).reshape(nb, 1).tolist())])
    assign = em.op("Cast", [eq], {"to": onnx.TensorProto.FLOAT}, hint="assign")
    count = em.op("Add", [em.op("ReduceSum", [assign, em.ints("axis", [-1])], {"keepdims": 1}),
                          em.const("one", np.float32(1.0))], hint="count")

    # per-batch row offsets of the batch-flattened tensors: boff = [[0], [1], ... [B-1]]
    batch = em.op("Squeeze", [em.op("Shape", [x], {"start": 0, "end": 1}), em.ints("axis", [0])])
    boff = em.op("Unsqueeze", [em.op("Range", [em.ints("zero", 0), batch, em.ints("one", 1)]), em.ints("axis", [1])])
    off_n = em.op("Mul", [boff, em.ints("n", n)])
    unm_flat = em.op("Add", [em.op("Gather", [src_idx, unm_order], {"axis": 0}), off_n], hint="unm_flat")
    mrg_flat = em.op("Add", [em.op("Gather", [src_idx, mrg_order], {"axis": 0}), off_n], hint="mrg_flat")
    dst_flat = em.op("Add", [em.op("Unsqueeze", [dst_idx, em.ints("axis", [0])]), off_n], hint="dst_flat")

    # Unmerge map, in partition order: src of rank k < r read their dst's row (Na-r + dst index),
    # the others read row k-r; dst j reads row Na-r+j. Pinv puts it back in token order.
    merged = em.op("Less", [rank, em.ints("r", r)])
    row_src = em.op("Where", [merged, em.op("Add", [node_idx, em.ints("na_r", na - r)]),
                              em.op("Sub", [rank, em.ints("r", r)])])
    row_dst = em.op("Add", [em.op("Mul", [boff, em.ints("zero", 0)]),
                            em.ints("dst_rows", [list(range(na - r, na - r + nb))])])
    row_part = em.op("Concat", [row_src, row_dst], {"axis": 1})
    row = em.op("Gather", [row_part, partition_inv], {"axis": 1})
    map_flat = em.op("Add", [row, em.op("Mul", [boff, em.ints("kept", n - r)])], hint="map_flat")
    return MatchState(geo, unm_flat, mrg_flat, dst_flat, assign, count, map_flat)


def build_merge(em: Emitter, x: gs.Variable, state: MatchState, channels: int) -> gs.Variable:
    """[B, N, C] -> [B, N-r, C]: unmerged src tokens, then each dst averaged with its merged src."""
    xf = em.op("Reshape", [x, em.ints("shape", [-1, channels])])
    unm = em.op("Gather", [xf, state.unm_flat], {"axis": 0})
    mrg = em.op("Gather", [xf, state.mrg_flat], {"axis": 0})
    dst = em.op("Gather", [xf, state.dst_flat], {"axis": 0})
    # mean without scatter-reduce: sum into dst with the one-hot assignment, divide by the count
    dst = em.op("Div", [em.op("Add", [dst, em.op("MatMul", [state.assign, mrg])]), state.count])
    return em.op("Concat", [unm, dst], {"axis": 1}, hint="merged")


def build_unmerge(em: Emitter, y: gs.Variable, state: MatchState, channels: int) -> gs.Variable:
    """[B, N-r, C] -> [B, N, C]: one Gather of the batch-flattened tensor."""
    yf = em.op("Reshape", [y, em.ints("shape", [-1, channels])])
    return em.op("Gather", [yf, state.map_flat], {"axis": 0}, hint="unmerged")
