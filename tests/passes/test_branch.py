"""Branched graphs (passes/branch.py): one graph whose count input picks what a step runs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from passes.branch import VARIANT_COUNT, branch_info, branch_on_zero, branch_variants
from passes.counts import count_feed, count_input_name
from passes.errors import DitmergeError
from passes.trt_check import check_tensorrt
from runtime.branches import variant_feed, variant_outputs

W = np.arange(12, dtype=np.float32).reshape(3, 4) / 10


def _model(nodes, inputs, outputs, inits=(W,)) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "g", inputs, outputs, [nh.from_array(a, f"w{i}") for i, a in enumerate(inits)])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=9)


X = h.make_tensor_value_info("x", T.FLOAT, ["batch", 3])
Y = h.make_tensor_value_info("y", T.FLOAT, ["batch", 4])


def _full() -> onnx.ModelProto:  # y = x @ w, and a residual output [batch, 4]
    return _model([h.make_node("MatMul", ["x", "w0"], ["y"]), h.make_node("Relu", ["y"], ["res"])],
                  [X], [Y, h.make_tensor_value_info("res", T.FLOAT, ["batch", 4])])


def _cached() -> onnx.ModelProto:  # y = x @ w - cache (an input the full variant does not read)
    return _model([h.make_node("MatMul", ["x", "w0"], ["m"]), h.make_node("Sub", ["m", "cache"], ["y"])],
                  [X, h.make_tensor_value_info("cache", T.FLOAT, ["batch", 4])], [Y])


def _run(model, feed):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def _inputs(model):
    from onnx.helper import tensor_dtype_to_np_dtype

    return {vi.name: (np.dtype(tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)),
                      [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim])
            for vi in model.graph.input}


def test_each_variant_runs_its_own_nodes_and_the_others_outputs_are_zeros():
    joined = branch_variants({"main": _full(), "cached": _cached()})
    info = branch_info(joined)
    assert info["variants"]["main"] == {"index": 0, "inputs": ["x"], "outputs": ["y", "res"]}
    assert info["variants"]["cached"] == {"index": 1, "inputs": ["x", "cache"], "outputs": ["y"]}
    assert len(joined.graph.initializer) == 1  # one weight for both branches
    rng = np.random.default_rng(0)
    x, cache = rng.standard_normal((5, 3), np.float32), rng.standard_normal((5, 4), np.float32)
    inputs = _inputs(joined)
    for variant, model, own in (("main", _full(), {"x": x}), ("cached", _cached(), {"x": x, "cache": cache})):
        feed = {**own, **variant_feed(info, variant, inputs, own)}
        got = _run(joined, feed)
        want = _run(model, own)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, atol=1e-6, err_msg=f"{variant}: {name}")
        assert set(variant_outputs(info, variant, got)) == set(want)
    # the cached step's stand-in residual: zeros of the real shape (batch from x)
    got = _run(joined, {"x": x, **variant_feed(info, "cached", inputs, {"x": x}), "cache": cache})
    assert got["res"].shape == (5, 4) and not got["res"].any()
    # the variant count really selects: main and cached differ on the same feed
    both = {"x": x, "cache": cache}
    assert np.abs(_run(joined, {**both, **count_feed({VARIANT_COUNT: 0})})["y"]
                  - _run(joined, {**both, **count_feed({VARIANT_COUNT: 1})})["y"]).max() > 1e-3
    assert check_tensorrt(joined) == []


def test_stand_ins_take_their_dynamic_sizes_from_the_call_and_never_replace_what_is_given():
    joined = branch_variants({"main": _full(), "cached": _cached()})
    info, inputs = branch_info(joined), _inputs(joined)
    x = np.ones((7, 3), np.float32)
    extra = variant_feed(info, "main", inputs, {"x": x})
    assert extra["cache"].shape == (7, 4) and not extra["cache"].any()
    assert extra[count_input_name(VARIANT_COUNT)].shape == (0,)
    given = {"x": x, "cache": np.ones((7, 4), np.float32)}
    assert "cache" not in variant_feed(info, "main", inputs, given)
    assert variant_feed(info, "cached", inputs, {"x": x})[count_input_name(VARIANT_COUNT)].shape == (1,)
    with pytest.raises(DitmergeError, match="no 'match' variant"):
        variant_feed(info, "match", inputs, {"x": x})


def test_constants_of_one_name_stay_apart_and_different_weights_are_refused(tmp_path):
    # two variants whose inserted constants share a name (names come from a counter) but not a value
    a = _model([h.make_node("MatMul", ["x", "w0"], ["m"]), h.make_node("Add", ["m", "c"], ["y"])], [X], [Y])
    b = _model([h.make_node("MatMul", ["x", "w0"], ["m"]), h.make_node("Add", ["m", "c"], ["y"])], [X], [Y])
    a.graph.initializer.append(nh.from_array(np.full(4, 1, np.float32), "c"))
    b.graph.initializer.append(nh.from_array(np.full(4, 5, np.float32), "c"))
    joined = branch_variants({"a": a, "b": b})
    x = np.ones((2, 3), np.float32)
    inputs = _inputs(joined)
    for tag, model in (("a", a), ("b", b)):
        got = _run(joined, {"x": x, **variant_feed(branch_info(joined), tag, inputs, {"x": x})})["y"]
        np.testing.assert_allclose(got, _run(model, {"x": x})["y"], atol=1e-6)
    # weights stored outside the graph must be the same tensor in every variant
    w = nh.from_array(W, "w0")
    onnx.external_data_helper.set_external_data(w, "weights.bin", offset=0, length=W.nbytes)
    w.data_location = onnx.TensorProto.EXTERNAL
    w2 = onnx.TensorProto()
    w2.CopyFrom(w)
    onnx.external_data_helper.set_external_data(w2, "weights.bin", offset=64, length=W.nbytes)
    a.graph.initializer[0].CopyFrom(w)
    b.graph.initializer[0].CopyFrom(w2)
    with pytest.raises(DitmergeError, match="weight 'w0' differs"):
        branch_variants({"a": a, "b": b})


def test_branch_on_zero_runs_the_plain_graph_at_a_zero_count():
    count = h.make_tensor_value_info(count_input_name("k"), T.INT64, ["k"])
    # "merged": y = x @ w * (1 + k), with k read from the count's shape
    merged = _model([h.make_node("MatMul", ["x", "w0"], ["m"]), h.make_node("Shape", [count.name], ["k"]),
                     h.make_node("Cast", ["k"], ["kf"], to=T.FLOAT), h.make_node("Add", ["kf", "one"], ["f"]),
                     h.make_node("Mul", ["m", "f"], ["y"])],
                    [X, count], [Y], inits=(W,))
    merged.graph.initializer.append(nh.from_array(np.ones(1, np.float32), "one"))
    plain = _model([h.make_node("MatMul", ["x", "w0"], ["y"]), h.make_node("Neg", ["y"], ["unused"])], [X], [Y])
    joined = branch_on_zero(plain, merged, "k")
    x = np.ones((2, 3), np.float32)
    np.testing.assert_allclose(_run(joined, {"x": x, **count_feed({"k": 0})})["y"], x @ W, atol=1e-6)
    np.testing.assert_allclose(_run(joined, {"x": x, **count_feed({"k": 2})})["y"], 3 * (x @ W), atol=1e-6)
    with pytest.raises(DitmergeError, match="no count input"):
        branch_on_zero(plain, plain, "k")
