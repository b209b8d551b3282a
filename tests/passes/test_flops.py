"""FLOP counts of graphs whose token counts come from shapes: the count a bucket records, as the graph runs it."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from passes.counts import count_input_name
from passes.flops import count_flops
from passes.tome import ToMeConfig, ToMePass

C, N = 8, 16


def _sliced_matmul() -> onnx.ModelProto:
    """``x[:, :k] @ W`` with k the length of a count input: the rows reach the MatMul through Slice ends
    computed from ``Shape(count)``, which ONNX's shape inference alone leaves symbolic."""
    count = count_input_name("k")
    nodes = [helper.make_node("Shape", [count], ["k"]),
             helper.make_node("Slice", ["x", "zero", "k", "one"], ["xs"]),
             helper.make_node("MatMul", ["xs", "w"], ["y"])]
    inits = [numpy_helper.from_array(np.zeros(1, np.int64), "zero"), numpy_helper.from_array(np.ones(1, np.int64), "one"),
             numpy_helper.from_array(np.zeros((C, C), np.float32), "w")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N, C]),
                                           helper.make_tensor_value_info(count, TensorProto.INT64, ["k"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_rows_from_a_count_input_are_counted_at_its_length():
    model = _sliced_matmul()
    for k in (1, 5, 12):
        assert count_flops(model, {"k": k}) == 2 * k * C * C  # batch 1; a symbolic k would count 1 row


def test_weights_are_never_read():
    """The weights of an exported plan live in an external file that FLOP counting does not load."""
    model = _sliced_matmul()
    w = next(i for i in model.graph.initializer if i.name == "w")
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="absent.bin")
    assert count_flops(model, {"k": 3}) == 2 * 3 * C * C


def test_a_tome_graph_with_r_from_shapes_counts_as_the_baked_one(exported):
    """Before: the one-hot MatMul that sums merged src into their dst counted r as 1 (the FLOP-ideal
    speed-up 2-8 % too high)."""
    _, base, _ = exported("dit", (4, 4))
    dynamic = ToMePass(ToMeConfig(0.5, locations=("attn", "mlp"), dynamic=True))(base).model
    for r in (2, 6, 12):
        baked = ToMePass(ToMeConfig(0.5, locations=("attn", "mlp"), r=r))(base).model
        assert count_flops(dynamic, {"tome_r": r}) == count_flops(baked), r
