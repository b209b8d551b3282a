"""tests/count_profiles.py: a count graph checked per profile finds what one bucket's constants would."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from passes.counts import count_feed
from passes.graphbuild import Emitter, count_input, count_value
from tests.count_profiles import assert_tensorrt_ok, specialize


def _topk_model(read_values: bool = False):
    g = gs.Graph(opset=23)
    x = gs.Variable("x", np.float32, ["B", 6000])
    g.inputs = [x]
    em = Emitter(g, "t")
    c = count_input(g, "k")
    k = em.op("Add", [count_value(em, c), em.ints("one", [1])]) if not read_values else em.op("ReduceMax", [c])
    vals, _ = em.op("TopK", [x, k], {"axis": -1, "largest": 1, "sorted": 1}, num_outputs=2)
    vals.dtype, vals.shape = np.float32, ["B", "K"]
    g.outputs = [vals]
    model = gs.export_onnx(g)
    model.ir_version = 10
    return model


def test_profile_check_sees_topk_k_of_each_bucket():
    model = _topk_model()
    assert_tensorrt_ok(model, {"k": 99})  # K = 100
    with pytest.raises(AssertionError, match="exceeds TensorRT's limit"):
        assert_tensorrt_ok(model, {"k": 3840})  # K = 3841
    # the folded graph computes what the count graph does for that count
    x = np.random.default_rng(0).standard_normal((2, 6000)).astype(np.float32)
    full = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fixed = ort.InferenceSession(specialize(model, {"k": 7}).SerializeToString(), providers=["CPUExecutionProvider"])
    want = full.run(None, {"x": x, **count_feed({"k": 7})})[0]
    assert want.shape == (2, 8) and np.array_equal(fixed.run(None, {"x": x})[0], want)


def test_a_count_read_by_value_is_refused():
    with pytest.raises(AssertionError, match="may only be read by its shape"):
        assert_tensorrt_ok(_topk_model(read_values=True), {"k": 5})
