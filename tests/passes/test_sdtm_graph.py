"""The ONNX SDTM window merge, counters and blending against the eager twin (passes.sdtm.eager)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch

from passes.sdtm import eager as sdtm_math
from passes.graphbuild import Emitter
from passes.sdtm.graph import (WindowGeometry, build_blend, build_counter_update, build_gather_unmerge,
    build_window_match, build_window_merge)
from passes.trt_check import check_tensorrt
from tests.helpers import METHOD_ATOL, assert_close


def _model(geo: WindowGeometry, channels: int, a_s: float, weight: float) -> onnx.ModelProto:
    n = geo.tokens
    g = gs.Graph(opset=23)
    x = gs.Variable("x", np.float32, ["B", n, channels])
    c = gs.Variable("c", np.float32, ["B", n])
    cache = gs.Variable("cache", np.float32, ["B", n, channels])
    g.inputs = [x, c, cache]
    em = Emitter(g, "t")
    st = build_window_match(em, x, c, geo, a_s)
    merged = build_window_merge(em, x, st, channels)
    # a stand-in for the sublayer: any per-token function of the merged tokens
    y = em.op("Tanh", [merged])
    unmerged = build_gather_unmerge(em, y, st.map_flat, channels)
    blended = build_blend(em, unmerged, cache, st.independent, weight)
    counter = build_counter_update(em, c, st.independent)
    for v, shape in ((merged, ["B", geo.kept, channels]), (blended, ["B", n, channels]), (counter, ["B", n])):
        v.dtype, v.shape = np.float32, shape
    g.outputs = [merged, blended, counter]
    model = gs.export_onnx(g)
    model.ir_version = 10  # onnxruntime 1.31 reads IR <= 11
    onnx.checker.check_model(model)
    return model


def _twin(x, c, cache, geo, a_s, weight):
    mt = sdtm_math.window_match(x, c, geo, a_s)
    merged = sdtm_math.window_merge(x, mt)
    blended = sdtm_math.blend(sdtm_math.gather_unmerge(torch.tanh(merged), mt.row), cache, mt.independent, weight)
    return merged, blended, sdtm_math.counter_update(c, mt.independent), mt


@pytest.mark.parametrize("grid,k,batch", [((4, 4), 2, 1), ((6, 6), 5, 2), ((5, 7), 3, 2), ((8, 8), 15, 3),
                                          ((4, 4), 4, 2)])
def test_window_merge_equals_twin(grid, k, batch):
    geo = WindowGeometry(grid, k)
    channels, a_s, weight = 8, 0.05, 0.1
    model = _model(geo, channels, a_s, weight)
    assert check_tensorrt(model) == []
    rng = np.random.default_rng(k)
    x = rng.standard_normal((batch, geo.tokens, channels)).astype(np.float32)
    x[:, 1] = x[:, 0]  # a duplicate token makes one window more uniform
    c = rng.integers(0, 5, (batch, geo.tokens)).astype(np.float32)
    cache = rng.standard_normal((batch, geo.tokens, channels)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    merged, blended, counter = sess.run(None, {"x": x, "c": c, "cache": cache})
    t_merged, t_blended, t_counter, mt = _twin(torch.from_numpy(x), torch.from_numpy(c), torch.from_numpy(cache),
                                               geo, a_s, weight)
    assert_close(merged, t_merged.numpy(), METHOD_ATOL, "merged")
    assert_close(blended, t_blended.numpy(), METHOD_ATOL, "blended")
    assert_close(counter, t_counter.numpy(), 0, "counter")
    # structure: 3k tokens gone, 4k positions merged, each chosen window holds its mean at all 4 positions
    assert merged.shape == (batch, geo.tokens - 3 * k, channels)
    assert (~mt.independent).sum().item() == batch * 4 * k
    for b in range(batch):
        for w in mt.win[b]:
            vals = x[b, w.numpy()]
            expect = np.tanh(vals.mean(0))
            got = blended[b, w.numpy()]
            np.testing.assert_allclose(got, weight * expect + (1 - weight) * cache[b, w.numpy()], atol=1e-5)


def test_scores_follow_the_released_definition():
    """Mean over all 16 cosine pairs of a window (self-pairs included), plus a_s x staleness."""
    geo = WindowGeometry((4, 4), 1)
    torch.manual_seed(0)
    x = torch.randn(2, 16, 6)
    c = torch.randint(0, 4, (2, 16)).float()
    got = sdtm_math.window_scores(x, c, geo, 0.05)
    win = torch.from_numpy(geo.windows())
    t = x[:, win]  # [B, Nw, 4, C]
    cos = torch.nn.functional.cosine_similarity(t[:, :, :, None], t[:, :, None, :], dim=-1)
    prio = c / (c.mean(1, keepdim=True) + 1e-6)
    want = cos.sum((-1, -2)) / 16 + 0.05 * prio[:, win].mean(-1)
    assert_close(got.numpy(), want.numpy(), 1e-6, "scores")
