"""AT-EDM as ONNX subgraphs: G-WPR importance, top-k pruning, similarity refill; no DiT knowledge here.

Everything is what TensorRT parses and builds: constant-index Gather, MatMul, Softmax, TopK with K
<= 3840 (a constant, or the length of a count input: a shape tensor, static per profile), ArgMax, Equal, Where; no scatter, no data-dependent shapes. The eager twin of this
math is :mod:`passes.atedm.eager`; keep the two in step.

1. Importance (G-WPR on a strided subset of query rows). The pruning layer's own ``q, k [B, H, N, D]``
   (what feeds its fused ``Attention`` op, which stays untouched) give the probabilities of every
   ``stride``-th query row, averaged over heads: ``A = mean_h softmax(q[:, :, idx] k^T * scale)``,
   ``[B, S, N]``. The weighted PageRank of the precursor WPR (ZeroTPrune ``get_importance``) is
   ``s <- s M`` from ``s = 1/N``; with only S rows of ``M`` the iteration is ``s <- norm(s[idx] A)``:
   only the sampled queries vote, each with its current score. This is power iteration on the square
   matrix whose rows ``idx`` are ``A`` and whose other rows are zero, so the score of every token is a
   column sum of ``A`` weighted by the scores of the sampled tokens.
2. Pruning. ``TopK(s, k)`` tokens of the residual stream ``x [B, N, C]`` are kept, gathered from the
   batch-flattened ``[B*N, C]`` tensor (kept tokens come in descending score order).
3. Refill. Each pruned position reads the kept token most similar to it (cosine on ``x``, the pruning
   point), each kept position its own row: one ``[B, N]`` map and one Gather back to ``[B, N, C]``.
   ``copy`` refills the kept token's final features (the paper's refill); ``delta`` refills what the
   later blocks added to it, on top of the pruned token's own stream at the pruning point
   ``x[p] + (y[j] - x[keep[j]])`` (exact for kept positions up to rounding). In the SD-XL UNet the
   paper prunes in, the attention block's outer residual keeps every position's own input under the
   copied features; a DiT has no such residual around its block stack, and a plain copy replaces a
   pruned position's noise prediction by another position's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.graphbuild import PIN_FP32, Emitter, count_value, unit_rows

NORM_EPS = 1e-6


# 4x4 ordered-dither (Bayer) ranks: the first k positions of this order spread evenly over the grid
BAYER4 = np.array([[0, 8, 2, 10], [12, 4, 14, 6], [3, 11, 1, 9], [15, 7, 13, 5]])


@dataclasses.dataclass(frozen=True)
class PruneGeometry:
    """Static sizes of one pruning: the token grid, k kept, every ``stride``-th query row, WPR iterations."""

    grid: tuple[int, int]
    kept: int
    stride: int
    iterations: int

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def sample_rows(self) -> np.ndarray:
        return np.arange(0, self.tokens, self.stride, dtype=np.int64)


@dataclasses.dataclass
class PruneState:
    """Index tensors of one pruning, shared by the prune gather and the refill."""

    geometry: PruneGeometry
    keep_flat: gs.Variable  # [B, k] rows of the batch-flattened [B*N, C] stream that are kept
    x: gs.Variable  # [B, N, C] the stream at the pruning point
    pruned: gs.Variable  # [B, k, C] its kept tokens
    map_flat: gs.Variable  # [B, N] row of the batch-flattened [B*k, C] kept stream each position reads


def static_scores(grid: tuple[int, int]) -> np.ndarray:
    """``[1, 1, N]`` fixed scores: an ordered-dither pattern, the ablation that reads no attention.

    Exact small integers, so ties (same dither rank) keep the lower position first in graph and twin.
    """
    h, w = grid
    ranks = BAYER4[np.arange(h)[:, None] % 4, np.arange(w)[None, :] % 4]
    return -ranks.astype(np.float32).reshape(1, 1, h * w)


def build_importance(em: Emitter, q: gs.Variable, k: gs.Variable, scale: float, geo: PruneGeometry) -> gs.Variable:
    """G-WPR scores ``[B, 1, N]`` from the attention probabilities of the sampled query rows.

    Every node is pinned to fp32 in reduced-precision TensorRT builds (the ``PIN_FP32`` hint): the logits
    of un-normalised q, k overflow fp16, and scores near 1/N underflow it into ties.
    """
    n = geo.tokens
    rows = em.ints("rows", geo.sample_rows)
    qs = em.op("Gather", [q, rows], {"axis": 2}, hint=PIN_FP32 + "queries")  # [B, H, S, D]
    kt = em.op("Transpose", [k], {"perm": [0, 1, 3, 2]}, hint=PIN_FP32 + "keys")
    logits = em.op("MatMul", [qs, kt], hint=PIN_FP32 + "logits")  # [B, H, S, N]
    logits = em.op("Mul", [logits, em.const("scale", np.float32(scale))], hint=PIN_FP32 + "scaled")
    probs = em.op("Softmax", [logits], {"axis": -1}, hint=PIN_FP32 + "probs")
    # A = mean over heads: [B, S, N]
    attn = em.op("ReduceMean", [probs, em.ints("heads", [1])], {"keepdims": 0}, hint=PIN_FP32 + "attn_map")
    # s = 1/N; s <- (s[idx] A) / sum(s[idx] A)
    s = em.const("uniform", np.full((1, 1, n), 1.0 / n, dtype=np.float32))
    for _ in range(geo.iterations):
        votes = em.op("Gather", [s, rows], {"axis": 2}, hint=PIN_FP32 + "votes")  # [B|1, 1, S]
        v = em.op("MatMul", [votes, attn], hint=PIN_FP32 + "vote_sum")  # [B, 1, N]
        total = em.op("ReduceSum", [v, em.ints("axis", [-1])], {"keepdims": 1}, hint=PIN_FP32 + "total")
        s = em.op("Div", [v, total], hint=PIN_FP32 + "wpr")
    return s


def build_prune(em: Emitter, x: gs.Variable, scores: gs.Variable, geo: PruneGeometry,
                channels: int, kept_count: gs.Variable | None = None) -> tuple[gs.Variable, PruneState]:
    """``x [B, N, C]`` -> its ``k`` highest-scoring tokens ``[B, k, C]``, and the refill map.

    ``kept_count``: the count input whose length is k (:mod:`passes.counts`): TopK's K is then a shape
    tensor, one graph serves every k; None bakes ``geo.kept`` into the graph.
    """
    n = geo.tokens
    kk = em.ints("k", [geo.kept]) if kept_count is None else count_value(em, kept_count)  # int64 [1]
    s2 = em.op("Squeeze", [scores, em.ints("axis", [1])], hint=PIN_FP32 + "scores")  # [B, N]
    _, keep = em.op("TopK", [s2, kk], {"axis": -1, "largest": 1, "sorted": 1}, num_outputs=2,
                    hint=PIN_FP32 + "keep")

    batch = em.op("Squeeze", [em.op("Shape", [x], {"start": 0, "end": 1}), em.ints("axis", [0])])
    boff = em.op("Unsqueeze", [em.op("Range", [em.ints("zero", 0), batch, em.ints("one", 1)]), em.ints("axis", [1])])
    keep_flat = em.op("Add", [keep, em.op("Mul", [boff, em.ints("n", n)])], hint="keep_flat")  # [B, k]
    xf = em.op("Reshape", [x, em.ints("shape", [-1, channels])])
    pruned = em.op("Gather", [xf, keep_flat], {"axis": 0}, hint="pruned")  # [B, k, C]

    # slot[b, p] = j where keep[b, j] == p (one-hot over the kept axis; no scatter)
    onehot = em.op("Cast", [em.op("Equal", [em.op("Unsqueeze", [keep, em.ints("axis", [2])]),
                                            em.ints("positions", np.arange(n).reshape(1, 1, n))])],
                   {"to": onnx.TensorProto.FLOAT})  # [B, k, N]
    is_kept = em.op("Greater", [em.op("ReduceMax", [onehot, em.ints("axis", [1])], {"keepdims": 0}),
                                em.const("half", np.float32(0.5))])  # [B, N]
    slot = em.op("ArgMax", [onehot], {"axis": 1, "keepdims": 0})  # [B, N]

    # best[b, p] = argmax_j cos(x[b, p], x[b, keep[b, j]]) (first maximum on ties)
    m = unit_rows(em, x, NORM_EPS)  # x / ||x||, scaled first (fp16-safe)
    mk = em.op("Gather", [em.op("Reshape", [m, em.ints("shape", [-1, channels])]), keep_flat], {"axis": 0})
    sim = em.op("MatMul", [m, em.op("Transpose", [mk], {"perm": [0, 2, 1]})], hint="similarity")  # [B, N, k]
    best = em.op("ArgMax", [sim], {"axis": -1, "keepdims": 0})  # [B, N]

    src = em.op("Where", [is_kept, slot, best])
    map_flat = em.op("Add", [src, em.op("Mul", [boff, kk])], hint="map_flat")  # [B, N]
    return pruned, PruneState(geo, keep_flat, x, pruned, map_flat)


REFILLS = ("delta", "copy")


def build_refill(em: Emitter, y: gs.Variable, state: PruneState, channels: int, mode: str = "delta") -> gs.Variable:
    """``[B, k, C]`` -> ``[B, N, C]``: one Gather of the batch-flattened kept stream (or of its update)."""
    if mode == "delta":
        y = em.op("Sub", [y, state.pruned], hint="update")
    yf = em.op("Reshape", [y, em.ints("shape", [-1, channels])])
    out = em.op("Gather", [yf, state.map_flat], {"axis": 0}, hint="refilled")
    return em.op("Add", [state.x, out], hint="refilled") if mode == "delta" else out
