"""ToMe merge/unmerge as ONNX subgraphs (docs/design.md, 'The merge subgraph'), with no knowledge of DiTs or node names.

Everything here is what TensorRT parses and builds: TopK with K = src tokens per band (<= 3840),
Gather / GatherElements, MatMul, Equal, ScatterElements without a reduction (the int64 inverse
permutation), no data-dependent shapes. Index paths stay integer and norms are scaled before they
square, so fp16 / bf16 engines keep every index exact. The eager twin of this math is
:mod:`passes.tome.eager`; keep the two in step.

Inputs of the matching: ``x [B, N, C]``, the partition ``P [N]`` (int64; per band its ``Na`` src
positions, then its ``Nb`` dst positions) and its inverse ``Pinv [N]`` (position -> index in ``P``),
both graph inputs drawn by the runtime each step. Every tensor carries a band axis ``K`` (1 for grids
whose src count fits TensorRT's TopK), and each band merges ``r / K`` of its src tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.graphbuild import Emitter, count_value, inverse_permutation, unit_rows

NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static sizes of one merge: N tokens, Na src (all bands), r merged away (all bands), K bands."""

    tokens: int
    num_src: int
    r: int
    bands: int = 1

    def __post_init__(self) -> None:
        k = self.bands
        if self.tokens % k or self.num_src % k or self.r % k:
            raise ValueError(f"{self} does not split into {k} equal bands")

    @property
    def num_dst(self) -> int:
        return self.tokens - self.num_src


@dataclasses.dataclass
class MatchState:
    """Index tensors of one matching, shared by every merge/unmerge that uses it."""

    geometry: Geometry
    unm_flat: gs.Variable  # [B, Na-r] rows of the batch-flattened input that stay unmerged
    mrg_flat: gs.Variable  # [B, K, r/K] rows that merge into a dst
    dst_flat: gs.Variable  # [B, K, Nb/K] rows of the dst tokens
    assign: gs.Variable  # [B, K, Nb/K, r/K] float one-hot: merged src j goes to dst i of its band
    count: gs.Variable  # [B, K, Nb/K, 1] float: 1 + number of src merged into each dst
    map_flat: gs.Variable  # [B, N] row of the batch-flattened merged tensor that each position reads


@dataclasses.dataclass
class MatchIndices:
    """The outcome of one matching as batch-local int64 index tensors: all a merge needs, nothing of ``x``.

    Their shapes follow r; CA-ToMe caches what they are derived from instead (``build_order``'s outputs).
    """

    unm: gs.Variable  # [B, Na-r] token positions of the src tokens that stay unmerged
    mrg: gs.Variable  # [B, K, r/K] token positions of the src tokens that merge
    mrg_dst: gs.Variable  # [B, K, r/K] which dst of its band each merged src goes to
    dst: gs.Variable  # [K, Nb/K] token positions of the dst tokens
    row: gs.Variable  # [B, N] row of the (per-sample) merged tensor that each position reads on unmerge


def band_r(em: Emitter, geo: Geometry, r_count: gs.Variable | None) -> gs.Variable:
    """r per band as an int64 [1] tensor: ``geo.r / K`` baked in, or the length of the count input
    ``r_count`` (all bands' r) divided by K, so one graph serves every r ("a bucket is a shape")."""
    if r_count is None:
        return em.ints("r", [geo.r // geo.bands])
    r = count_value(em, r_count)
    return r if geo.bands == 1 else em.op("Div", [r, em.ints("bands", [geo.bands])], hint="r_band")


def build_match(em: Emitter, x: gs.Variable, partition: gs.Variable, partition_inv: gs.Variable,
                geo: Geometry, r_count: gs.Variable | None = None) -> MatchState:
    """Bipartite soft matching of src onto dst tokens by cosine similarity of ``x``, per band.

    ``r_count``: the count input whose length is r (all bands); None bakes ``geo.r`` into the graph.
    """
    r = band_r(em, geo, r_count)
    return build_state(em, x, build_match_indices(em, x, partition, partition_inv, geo, r), geo, r)


def build_order(em: Emitter, x: gs.Variable, partition: gs.Variable, geo: Geometry) -> tuple[gs.Variable, gs.Variable]:
    """The similarity half of the matching: ``order`` (src by best similarity, descending) and ``node_idx``
    (each src's best dst in its band), both int64 ``[B, K, Na]`` whatever r is (CA-ToMe caches them)."""
    na = geo.num_src // geo.bands
    src_idx, dst_idx = _band_positions(em, partition, geo)
    m = unit_rows(em, x, NORM_EPS)  # x / ||x||, scaled first (fp16-safe)

    # scores[b, k, i, j] = <m_src_ki, m_dst_kj>; each src picks its best dst in its band
    a = em.op("Gather", [m, src_idx], {"axis": 1})  # [B, K, Na, C]
    b = em.op("Gather", [m, dst_idx], {"axis": 1})  # [B, K, Nb, C]
    scores = em.op("MatMul", [a, em.op("Transpose", [b], {"perm": [0, 1, 3, 2]})], hint="scores")
    node_max = em.op("ReduceMax", [scores, em.ints("axis", [-1])], {"keepdims": 0})  # [B, K, Na]
    node_idx = em.op("ArgMax", [scores], {"axis": -1, "keepdims": 0}, hint="node_idx")

    # order: src sorted by best similarity, descending (ties: lower index first, as torch's stable sort)
    _, order = em.op("TopK", [node_max, em.ints("k", [na])], {"axis": -1, "largest": 1, "sorted": 1}, num_outputs=2)
    return order, node_idx


def _band_positions(em: Emitter, partition: gs.Variable, geo: Geometry) -> tuple[gs.Variable, gs.Variable]:
    """Token positions of the src ``[K, Na/K]`` and dst ``[K, Nb/K]`` of each band, from the partition."""
    k = geo.bands
    na, nb = geo.num_src // k, geo.num_dst // k
    bands = em.op("Reshape", [partition, em.ints("shape", [k, na + nb])])
    src_idx = em.op("Slice", [bands, em.ints("zero", [0]), em.ints("na", [na]), em.ints("axis", [1])], hint="src_idx")
    dst_idx = em.op("Slice", [bands, em.ints("na", [na]), em.ints("end", [na + nb]), em.ints("axis", [1])],
                    hint="dst_idx")
    return src_idx, dst_idx


def build_match_indices(em: Emitter, x: gs.Variable, partition: gs.Variable, partition_inv: gs.Variable,
                        geo: Geometry, r: gs.Variable | None = None) -> MatchIndices:
    """The similarity and sorting half of the matching: ``x`` and the partition -> index tensors.

    ``r`` is r per band, an int64 [1] tensor (:func:`band_r`); None: ``geo.r`` baked in.
    """
    order, node_idx = build_order(em, x, partition, geo)
    return indices_from_order(em, x, order, node_idx, partition, partition_inv, geo, r)


def indices_from_order(em: Emitter, x: gs.Variable, order: gs.Variable, node_idx: gs.Variable,
                       partition: gs.Variable, partition_inv: gs.Variable, geo: Geometry,
                       r: gs.Variable | None = None) -> MatchIndices:
    """The cheap half: the first r of ``order`` merge into their ``node_idx``, the rest stay; index tensors.

    Integer ops only (Slice, GatherElements, ScatterElements, Where); ``x`` gives the batch size.
    """
    k = geo.bands
    n, na, nb = geo.tokens, geo.num_src // k, geo.num_dst // k  # per band, except n
    r = band_r(em, geo, None) if r is None else r
    # K * (Na - r): the unmerged src of all bands
    unm_total = em.op("Mul", [em.op("Sub", [em.ints("na", [na]), r]), em.ints("bands", [k])], hint="unm_total")
    src_idx, dst_idx = _band_positions(em, partition, geo)
    rank = inverse_permutation(em, order, na, axis=2)  # [B, K, Na] position of each src in ``order``

    unm_order = em.op("Slice", [order, r, em.ints("na", [na]), em.ints("axis", [2])])
    mrg_order = em.op("Slice", [order, em.ints("zero", [0]), r, em.ints("axis", [2])])
    mrg_dst = em.op("GatherElements", [node_idx, mrg_order], {"axis": 2}, hint="mrg_dst")  # [B, K, r]

    # token positions of the selected src
    src_b = em.op("Expand", [em.op("Unsqueeze", [src_idx, em.ints("axis", [0])]),
                             em.op("Concat", [em.op("Shape", [x], {"start": 0, "end": 1}), em.ints("kn", [k, na])],
                                   {"axis": 0})])  # [B, K, Na]
    # [B, K, Na-r] -> [B, K*(Na-r)]; allowzero keeps a literal 0 when every src merges
    unm_shape = em.op("Concat", [em.op("Shape", [x], {"start": 0, "end": 1}), unm_total], {"axis": 0})
    unm = em.op("Reshape", [em.op("GatherElements", [src_b, unm_order], {"axis": 2}), unm_shape], {"allowzero": 1},
                hint="unm")
    mrg = em.op("GatherElements", [src_b, mrg_order], {"axis": 2}, hint="mrg")

    # Unmerge map, in partition order. Merged layout: [unmerged src of every band, dst of every band].
    # src of band k with rank q < r read their dst's row U + k*Nb + dst index; the others k*(Na-r) + q-r;
    # dst j of band k reads U + k*Nb + j. Pinv puts it back in token order.
    band = np.arange(k, dtype=np.int64).reshape(1, k, 1)
    merged = em.op("Less", [rank, r])
    dst_base = em.op("Add", [unm_total, em.ints("band_nb", (band * nb).tolist())])  # [1, K, 1]
    # band * (Na - r) - r = band * Na - (band + 1) * r
    unm_base = em.op("Sub", [em.ints("band_na", (band * na).tolist()), em.op("Mul", [em.ints("band1", (band + 1).tolist()), r])])
    row_src = em.op("Where", [merged, em.op("Add", [node_idx, dst_base]), em.op("Add", [rank, unm_base])])
    dst_rows = em.op("Add", [unm_total, em.ints("dst_rows", (band * nb + np.arange(nb).reshape(1, 1, nb)).tolist())])
    row_dst = em.op("Expand", [dst_rows,
                               em.op("Concat", [em.op("Shape", [x], {"start": 0, "end": 1}), em.ints("knb", [k, nb])],
                                     {"axis": 0})])  # [B, K, Nb]
    row_part = em.op("Reshape", [em.op("Concat", [row_src, row_dst], {"axis": 2}), em.ints("shape", [0, n])])
    row = em.op("Gather", [row_part, partition_inv], {"axis": 1}, hint="row")
    return MatchIndices(unm, mrg, mrg_dst, dst_idx, row)


def build_state(em: Emitter, x: gs.Variable, idx: MatchIndices, geo: Geometry,
                r: gs.Variable | None = None) -> MatchState:
    """Index tensors -> what merge/unmerge read: rows of the batch-flattened ``x``, one-hot assignment, counts.

    Cheap (no similarity): the apply variant of CA-ToMe runs only this on cached indices. ``r``: r per
    band as in :func:`build_match_indices`.
    """
    k = geo.bands
    n, nb = geo.tokens, geo.num_dst // k
    batch = em.op("Squeeze", [em.op("Shape", [x], {"start": 0, "end": 1}), em.ints("axis", [0])])
    boff = em.op("Range", [em.ints("zero", 0), batch, em.ints("one", 1)])  # [B]
    off_n = em.op("Mul", [em.op("Unsqueeze", [boff, em.ints("axes", [1, 2])]), em.ints("n", n)])  # [B, 1, 1]
    unm_flat = em.op("Add", [idx.unm, em.op("Squeeze", [off_n, em.ints("axis", [2])])], hint="unm_flat")
    mrg_flat = em.op("Add", [idx.mrg, off_n], hint="mrg_flat")
    dst_flat = em.op("Add", [em.op("Unsqueeze", [idx.dst, em.ints("axis", [0])]), off_n], hint="dst_flat")

    # assign[b, k, i, j] = (mrg_dst[b, k, j] == i); count = 1 + sum_j assign  (the dst itself counts once)
    eq = em.op("Equal", [em.op("Unsqueeze", [idx.mrg_dst, em.ints("axis", [2])]),
                         em.ints("dst_range", np.arange(nb).reshape(nb, 1).tolist())])
    assign = em.op("Cast", [eq], {"to": onnx.TensorProto.FLOAT}, hint="assign")
    # the sum over merged src as a MatMul with ones [r/K, 1]: a ReduceSum over an axis of length 0 (r = 0)
    # keeps length 0 in onnxruntime instead of giving zeros
    r = band_r(em, geo, None) if r is None else r
    ones = em.op("Expand", [em.const("one", np.ones((1, 1), np.float32)),
                            em.op("Concat", [r, em.ints("one", [1])], {"axis": 0})])
    count = em.op("Add", [em.op("MatMul", [assign, ones]), em.const("one", np.float32(1.0))], hint="count")
    kept = em.op("Sub", [em.ints("n", [n]), em.op("Mul", [r, em.ints("bands", [k])])], hint="kept")  # N - r
    off_kept = em.op("Mul", [em.op("Unsqueeze", [boff, em.ints("axis", [1])]), kept])
    map_flat = em.op("Add", [idx.row, off_kept], hint="map_flat")
    return MatchState(geo, unm_flat, mrg_flat, dst_flat, assign, count, map_flat)


def build_merge(em: Emitter, x: gs.Variable, state: MatchState, channels: int) -> gs.Variable:
    """[B, N, C] -> [B, N-r, C]: unmerged src tokens, then each dst averaged with its merged src."""
    geo = state.geometry
    xf = em.op("Reshape", [x, em.ints("shape", [-1, channels])])
    unm = em.op("Gather", [xf, state.unm_flat], {"axis": 0})  # [B, Na-r, C]
    mrg = em.op("Gather", [xf, state.mrg_flat], {"axis": 0})  # [B, K, r/K, C]
    dst = em.op("Gather", [xf, state.dst_flat], {"axis": 0})  # [B, K, Nb/K, C]
    # mean without scatter-reduce: dst / count + (assign / count) @ mrg; dividing first keeps every partial
    # sum a convex combination (summing 100 tokens near 1e3 first would overflow fp16)
    weights = em.op("Div", [state.assign, state.count], hint="merge_weights")
    dst = em.op("Add", [em.op("Div", [dst, state.count]), em.op("MatMul", [weights, mrg])])
    dst = em.op("Reshape", [dst, em.ints("shape", [0, geo.num_dst, channels])])
    return em.op("Concat", [unm, dst], {"axis": 1}, hint="merged")


def build_unmerge(em: Emitter, y: gs.Variable, state: MatchState, channels: int) -> gs.Variable:
    """[B, N-r, C] -> [B, N, C]: one Gather of the batch-flattened tensor."""
    yf = em.op("Reshape", [y, em.ints("shape", [-1, channels])])
    return em.op("Gather", [yf, state.map_flat], {"axis": 0}, hint="unmerged")
