"""MoD routing as ONNX subgraphs, with no knowledge of DiTs or node names.

Around one block: router ``s = Sigmoid(x W + b)``, ``TopK(s, k)``, one Gather of the routed tokens
(batch-flattened), the block on them, and the combine ``x + s_r * (y_r - x_r)`` written back by a
Gather (no scatter): each position reads its row of ``[delta_r; 0]``, the zero row for tokens that
bypass the block. Everything is what TensorRT parses and builds: constant K (<= 3840), no scatter, no
data-dependent shapes. The index map avoids float sums of indices (inexact in fp16 past 2048): a
one-hot ``Equal`` gives ArgMax (the routed rank) and ReduceMax (routed or not). The eager twin is
:func:`passes.mod.eager.route`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.graphbuild import Emitter, count_value


@dataclasses.dataclass
class RouteState:
    """What the combine needs from the routing of one block."""

    tokens: int
    k: int | gs.Variable  # an int64 [1] tensor when the capacity is a count input
    x_r: gs.Variable  # [B, k, C] routed tokens (x itself when k == N)
    s_r: gs.Variable  # [B, k, 1] their router scores
    idx: gs.Variable | None  # [B, k] their positions (None when k == N)


def build_route(em: Emitter, x: gs.Variable, weight: np.ndarray, bias: float, k: int, tokens: int,
                channels: int, k_count: gs.Variable | None = None) -> RouteState:
    """Score ``x [B, N, C]`` and gather the ``k`` best tokens.

    ``k_count``: the count input whose length is the capacity (``k`` is then ignored); k = N is then a
    TopK over every token (the block runs on them in score order, which attention does not see).
    """
    w = em.const("router_w", np.asarray(weight, np.float32).reshape(channels, 1))
    b = em.const("router_b", np.asarray([bias], np.float32))
    s = em.op("Sigmoid", [em.op("Add", [em.op("MatMul", [x, w]), b])], hint="router_score")  # [B, N, 1]
    if k_count is None and k >= tokens:
        return RouteState(tokens, tokens, x, s, None)
    kk = em.ints("k", [k]) if k_count is None else count_value(em, k_count)  # int64 [1]
    if k_count is not None:
        k = kk
    s2 = em.op("Reshape", [s, em.ints("shape", [0, tokens])])  # [B, N]
    s_r, idx = em.op("TopK", [s2, kk], {"axis": -1, "largest": 1, "sorted": 1}, num_outputs=2)
    # rows of the batch-flattened [B*N, C] input
    batch = em.op("Shape", [x], {"start": 0, "end": 1})
    boff = em.op("Range", [em.ints("zero", 0), em.op("Squeeze", [batch, em.ints("axis", [0])]), em.ints("one", 1)])
    rows = em.op("Add", [idx, em.op("Mul", [em.op("Unsqueeze", [boff, em.ints("axis", [1])]), em.ints("n", tokens)])])
    xf = em.op("Reshape", [x, em.ints("shape", [-1, channels])])
    x_r = em.op("Gather", [xf, rows], {"axis": 0}, hint="routed")  # [B, k, C]
    s_r = em.op("Unsqueeze", [s_r, em.ints("axis", [2])])
    return RouteState(tokens, k, x_r, s_r, idx)


def build_combine(em: Emitter, x: gs.Variable, y_r: gs.Variable, st: RouteState, channels: int) -> gs.Variable:
    """``x + s_r * (y_r - x_r)`` at routed positions, ``x`` elsewhere: [B, N, C]."""
    delta = em.op("Mul", [st.s_r, em.op("Sub", [y_r, st.x_r])], hint="delta")  # [B, k, C]
    if st.idx is None:
        return em.op("Add", [x, delta], hint="routed_out")
    n, k = st.tokens, st.k
    # per batch [delta_r; 0]: k + 1 rows, the last one read by every token that bypassed the block
    batch = em.op("Shape", [x], {"start": 0, "end": 1})
    zeros = em.op("Expand", [em.const("zero_row", np.zeros((1, 1, channels), np.float32)),
                             em.op("Concat", [batch, em.ints("one_c", [1, channels])], {"axis": 0})])
    padded = em.op("Reshape", [em.op("Concat", [delta, zeros], {"axis": 1}), em.ints("shape", [-1, channels])])
    # position p of batch b reads row b*(k+1) + (rank of p among the routed, or k when p bypassed)
    onehot = em.op("Cast", [em.op("Equal", [em.op("Unsqueeze", [st.idx, em.ints("axis", [2])]),
                                            em.ints("positions", np.arange(n).reshape(1, 1, n).tolist())])],
                   {"to": onnx.TensorProto.FLOAT})  # [B, k, N]
    rank = em.op("ArgMax", [onehot], {"axis": 1, "keepdims": 0})  # [B, N]
    hit = em.op("Greater", [em.op("ReduceMax", [onehot, em.ints("axis", [1])], {"keepdims": 0}),
                            em.const("half", np.float32(0.5))])
    bypass = em.ints("bypass", k) if isinstance(k, int) else k  # row k: the zero row
    k1 = em.ints("k1", k + 1) if isinstance(k, int) else em.op("Add", [k, em.ints("one", [1])], hint="k1")
    local = em.op("Where", [hit, rank, bypass])
    boff = em.op("Range", [em.ints("zero", 0), em.op("Squeeze", [batch, em.ints("axis", [0])]), em.ints("one", 1)])
    rows = em.op("Add", [local, em.op("Mul", [em.op("Unsqueeze", [boff, em.ints("axis", [1])]), k1])])
    full = em.op("Gather", [padded, rows], {"axis": 0}, hint="delta_full")  # [B, N, C]
    return em.op("Add", [x, full], hint="routed_out")
