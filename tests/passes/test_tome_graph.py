"""The ONNX ToMe subgraph against its eager twin (passes.tome.eager) and tomesd's definition."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch

from passes.tome import eager as tome_math
from passes.graphbuild import Emitter
from passes.partition import draw_partition
from passes.tome.graph import Geometry, build_match, build_merge, build_unmerge
from tests.helpers import METHOD_ATOL, assert_close


def _session(grid, channels, r):
    n = grid[0] * grid[1]
    _, inv = draw_partition(grid)
    na = n - (grid[0] // 2) * (grid[1] // 2)
    g = gs.Graph(opset=23)
    x = gs.Variable("x", np.float32, ["B", n, channels])
    p, pi = gs.Variable("P", np.int64, [n]), gs.Variable("Pinv", np.int64, [n])
    g.inputs = [x, p, pi]
    em = Emitter(g, "t")
    st = build_match(em, x, p, pi, Geometry(n, na, r))
    merged = build_merge(em, x, st, channels)
    unmerged = build_unmerge(em, merged, st, channels)
    merged.dtype = unmerged.dtype = np.float32
    merged.shape, unmerged.shape = ["B", n - r, channels], ["B", n, channels]
    g.outputs = [merged, unmerged]
    model = gs.export_onnx(g)
    model.ir_version = 10  # onnxruntime 1.31 reads IR <= 11
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]), na


@pytest.mark.parametrize("grid,r,batch", [((4, 4), 5, 1), ((4, 4), 12, 2), ((6, 8), 20, 3), ((5, 7), 9, 2), ((8, 8), 1, 2)])
def test_graph_equals_twin(grid, r, batch):
    sess, na = _session(grid, 8, r)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, grid[0] * grid[1], 8)).astype(np.float32)
    part, inv = draw_partition(grid, rng=rng)
    merged, unmerged = sess.run(None, {"x": x, "P": part, "Pinv": inv})
    mt = tome_math.match(torch.from_numpy(x), torch.from_numpy(part), torch.from_numpy(inv), na, r)
    twin_merged = tome_math.merge(torch.from_numpy(x), mt)
    assert merged.shape == (batch, grid[0] * grid[1] - r, 8)
    assert_close(merged, twin_merged.numpy(), METHOD_ATOL, "merge")
    assert_close(unmerged, tome_math.unmerge(twin_merged, mt).numpy(), METHOD_ATOL, "unmerge")


def _tomesd_reference(x, part, na, r):
    """tomesd's bipartite_soft_matching_random2d merge (mean mode), written out independently."""
    src, dst = x[:, part[:na]], x[:, part[na:]]
    m = x / np.linalg.norm(x, axis=-1, keepdims=True)
    scores = m[:, part[:na]] @ m[:, part[na:]].transpose(0, 2, 1)
    out = []
    for b in range(x.shape[0]):
        best, best_idx = scores[b].max(-1), scores[b].argmax(-1)
        order = np.argsort(-best, kind="stable")
        merged_src, kept_src = order[:r], order[r:]
        d = dst[b].copy()
        total, count = d.copy(), np.ones(len(d))
        for s in merged_src:
            total[best_idx[s]] += src[b, s]
            count[best_idx[s]] += 1
        out.append(np.concatenate([src[b, kept_src], total / count[:, None]]))
    return np.stack(out)


def test_merge_is_tomesd_mean_merge():
    grid, r = (6, 6), 14
    sess, na = _session(grid, 4, r)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 36, 4)).astype(np.float32)
    part, inv = draw_partition(grid, rng=rng)
    merged, _ = sess.run(None, {"x": x, "P": part, "Pinv": inv})
    assert_close(merged, _tomesd_reference(x, part, na, r), 1e-5, "tomesd")


@pytest.mark.parametrize("grid,r", [((4, 4), 12), ((6, 6), 14), ((5, 7), 9)])
def test_unmerge_copies_dst_value_to_merged_positions(grid, r):
    """Distinct tokens: each merged src position reads the merged row of the dst it matched (tomesd's
    choice, recomputed here), each dst its merged mean, each kept src its own token."""
    n = grid[0] * grid[1]
    sess, na = _session(grid, 4, r)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, n, 4)).astype(np.float32)
    part, inv = draw_partition(grid, rng=rng)
    merged, unmerged = sess.run(None, {"x": x, "P": part, "Pinv": inv})
    ref_merged = _tomesd_reference(x, part, na, r)
    assert_close(merged, ref_merged, 1e-5, "merge")
    m = x / np.linalg.norm(x, axis=-1, keepdims=True)
    src_pos, dst_pos = part[:na], part[na:]
    for b in range(x.shape[0]):
        scores = m[b, src_pos] @ m[b, dst_pos].T
        best, best_dst = scores.max(-1), scores.argmax(-1)
        order = np.argsort(-best, kind="stable")
        want = np.empty_like(x[b])
        want[src_pos[order[r:]]] = x[b, src_pos[order[r:]]]  # kept src: unchanged
        dst_rows = ref_merged[b, na - r:]  # merged layout: [kept src..., dst...]
        want[dst_pos] = dst_rows
        want[src_pos[order[:r]]] = dst_rows[best_dst[order[:r]]]  # merged src: its dst's mean
        assert_close(unmerged[b], want, 1e-5, f"unmerge, sample {b}")
        # the case has teeth: merged positions no longer hold their own token
        assert np.abs(want[src_pos[order[:r]]] - x[b, src_pos[order[:r]]]).max() > 1e-2


@pytest.mark.parametrize("grid,bands,r,batch", [((8, 8), 2, 20, 2), ((8, 6), 4, 12, 1), ((12, 4), 3, 27, 2)])
def test_banded_graph_equals_twin(grid, bands, r, batch):
    """Grids over TensorRT's TopK limit match within bands; forced here on small grids."""
    n = grid[0] * grid[1]
    na = n - (grid[0] // 2) * (grid[1] // 2)
    g = gs.Graph(opset=23)
    x = gs.Variable("x", np.float32, ["B", n, 8])
    p, pi = gs.Variable("P", np.int64, [n]), gs.Variable("Pinv", np.int64, [n])
    g.inputs = [x, p, pi]
    em = Emitter(g, "t")
    st = build_match(em, x, p, pi, Geometry(n, na, r, bands))
    merged = build_merge(em, x, st, 8)
    unmerged = build_unmerge(em, merged, st, 8)
    merged.dtype = unmerged.dtype = np.float32
    merged.shape, unmerged.shape = ["B", n - r, 8], ["B", n, 8]
    g.outputs = [merged, unmerged]
    model = gs.export_onnx(g)
    model.ir_version = 10
    from passes.trt_check import check_tensorrt

    assert check_tensorrt(model) == []
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(4)
    xs = rng.standard_normal((batch, n, 8)).astype(np.float32)
    part, inv = draw_partition(grid, rng=rng, bands=bands)
    out_m, out_u = sess.run(None, {"x": xs, "P": part, "Pinv": inv})
    mt = tome_math.match(torch.from_numpy(xs), torch.from_numpy(part), torch.from_numpy(inv), na, r, bands)
    twin = tome_math.merge(torch.from_numpy(xs), mt)
    assert_close(out_m, twin.numpy(), METHOD_ATOL, "banded merge")
    assert_close(out_u, tome_math.unmerge(twin, mt).numpy(), METHOD_ATOL, "banded unmerge")
    # each band merges only within itself: a merged token's dst lies in the same band
    band_rows = grid[0] // bands
    for b in range(batch):
        for k in range(bands):
            dst_rows = mt.dst[k] // grid[1]
            assert ((dst_rows >= k * band_rows) & (dst_rows < (k + 1) * band_rows)).all()
