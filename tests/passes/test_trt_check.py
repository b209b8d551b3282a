"""The TensorRT static check: each rule refuses a graph that breaks it and passes its fixed twin."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from passes.errors import DitmergeError
from passes.graphbuild import Emitter
from passes.trt_check import assert_tensorrt_ready, check_tensorrt


def _model(nodes, inputs, outputs, inits=(), opset: int = 23) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def _reasons(model: onnx.ModelProto) -> list[str]:
    return [str(v) for v in check_tensorrt(model)]


def _binary(op: str, dtype: int, out_dtype: int | None = None) -> onnx.ModelProto:
    return _model([helper.make_node(op, ["a", "b"], ["y"], name="n")], [("a", dtype, [1, 4]), ("b", dtype, [1, 4])],
                  [("y", out_dtype or dtype, None)])


# rule 3: per-op element types, (graph that breaks it, the same op on a type TensorRT takes)
TYPE_CASES = {
    "MatMul is float only": (_binary("MatMul", T.INT64), _binary("MatMul", T.FLOAT)),
    "Equal takes no BOOL": (_binary("Equal", T.BOOL, T.BOOL), _binary("Equal", T.INT64, T.BOOL)),
    "Less takes no BOOL": (_binary("Less", T.BOOL, T.BOOL), _binary("Less", T.FLOAT16, T.BOOL)),
    "And is BOOL only": (_binary("And", T.INT32, T.INT32), _binary("And", T.BOOL)),
    "Softmax is float only": (
        _model([helper.make_node("Softmax", ["a"], ["y"], name="n")], [("a", T.INT32, [2, 3])], [("y", T.INT32, None)]),
        _model([helper.make_node("Softmax", ["a"], ["y"], name="n")], [("a", T.BFLOAT16, [2, 3])],
               [("y", T.BFLOAT16, None)])),
    "Sqrt is float only": (
        _model([helper.make_node("Sqrt", ["a"], ["y"], name="n")], [("a", T.INT64, [3])], [("y", T.INT64, None)]),
        _model([helper.make_node("Sqrt", ["a"], ["y"], name="n")], [("a", T.FLOAT, [3])], [("y", T.FLOAT, None)])),
    "Where condition is BOOL": (
        _model([helper.make_node("Where", ["c", "a", "a"], ["y"], name="n")], [("c", T.INT64, [3]), ("a", T.FLOAT, [3])],
               [("y", T.FLOAT, None)]),
        _model([helper.make_node("Where", ["c", "a", "a"], ["y"], name="n")], [("c", T.BOOL, [3]), ("a", T.FLOAT, [3])],
               [("y", T.FLOAT, None)])),
    "ScatterElements takes no BOOL data": (
        _model([helper.make_node("ScatterElements", ["d", "i", "d"], ["y"], name="n")],
               [("d", T.BOOL, [3]), ("i", T.INT64, [3])], [("y", T.BOOL, None)]),
        _model([helper.make_node("ScatterElements", ["d", "i", "d"], ["y"], name="n")],
               [("d", T.INT64, [3]), ("i", T.INT64, [3])], [("y", T.INT64, None)])),
    "Cast to a type TensorRT lacks": (
        _model([helper.make_node("Cast", ["a"], ["y"], name="n", to=T.INT16)], [("a", T.FLOAT, [3])],
               [("y", T.INT16, None)]),
        _model([helper.make_node("Cast", ["a"], ["y"], name="n", to=T.INT32)], [("a", T.FLOAT, [3])],
               [("y", T.INT32, None)])),
    "ReduceSum takes no BOOL": (
        _model([helper.make_node("ReduceSum", ["a", "ax"], ["y"], name="n")], [("a", T.BOOL, [2, 3])],
               [("y", T.BOOL, None)], [_ints("ax", [1])]),
        _model([helper.make_node("ReduceSum", ["a", "ax"], ["y"], name="n")], [("a", T.INT64, [2, 3])],
               [("y", T.INT64, None)], [_ints("ax", [1])])),
}


@pytest.mark.parametrize("case", sorted(TYPE_CASES))
def test_per_op_type_rules(case):
    broken, fixed = TYPE_CASES[case]
    assert any("n" in r.split(":")[0] for r in _reasons(broken)), case
    assert _reasons(fixed) == []


def test_types_of_intermediate_tensors_are_inferred():
    """A BOOL that only shape inference knows about (Equal's output) still trips Equal's rule downstream."""
    m = _model([helper.make_node("Equal", ["a", "a"], ["e"], name="eq"),
                helper.make_node("Equal", ["e", "e"], ["y"], name="eq2")], [("a", T.FLOAT, [3])], [("y", T.BOOL, None)])
    reasons = _reasons(m)
    assert len(reasons) == 2 and all(r.startswith("Equal eq2") and "is BOOL" in r for r in reasons)  # both inputs


def test_initializer_and_constant_types():
    init = numpy_helper.from_array(np.zeros(3, np.uint16), "w")
    m = _model([helper.make_node("Cast", ["w"], ["y"], name="n", to=T.FLOAT)], [], [("y", T.FLOAT, None)], [init])
    assert any(r.startswith("initializer w") and "UINT16" in r for r in _reasons(m))
    const = helper.make_node("Constant", [], ["c"], name="c", value=numpy_helper.from_array(np.zeros(3, np.int16)))
    m = _model([const, helper.make_node("Cast", ["c"], ["y"], name="n", to=T.FLOAT)], [], [("y", T.FLOAT, None)])
    assert any(r.startswith("Constant c") and "INT16" in r for r in _reasons(m))
    strings = helper.make_node("Constant", [], ["s"], name="s", value_strings=["a"])
    m = _model([strings], [], [("s", T.STRING, None)])
    assert any("value_strings is not supported" in r for r in _reasons(m))
    ok = helper.make_node("Constant", [], ["c"], name="c", value=numpy_helper.from_array(np.zeros(3, np.float16)))
    assert _reasons(_model([ok], [], [("c", T.FLOAT16, None)])) == []


def _attention(q_shape=(1, 2, 4, 8), kv_shape=(1, 2, 4, 8), v_shape=None, dtype=T.FLOAT, k_dtype=None,
               mask: tuple[int, list[int]] | None = None, outputs=1, **attrs) -> onnx.ModelProto:
    inputs = [("q", dtype, list(q_shape)), ("k", k_dtype or dtype, list(kv_shape)), ("v", dtype, list(v_shape or kv_shape))]
    names = ["q", "k", "v"]
    if mask is not None:
        inputs.append(("m", mask[0], mask[1]))
        names.append("m")
    outs = ["y", "pk", "pv", "qk"][:outputs]
    return _model([helper.make_node("Attention", names, outs, name="att", **attrs)], inputs,
                  [(o, dtype, None) for o in outs])


ATTENTION_CASES = {
    "3-D inputs": (_attention(q_shape=(1, 4, 16), kv_shape=(1, 4, 16), q_num_heads=2, kv_num_heads=2), "3-D"),
    "int mask": (_attention(mask=(T.INT64, [1, 1, 4, 4])), "mask is INT64"),
    "fp16 mask on fp32 q": (_attention(mask=(T.FLOAT16, [1, 1, 4, 4])), "mask is FLOAT16"),
    "2-D mask": (_attention(mask=(T.BOOL, [4, 4])), "mask is 2-D"),
    "softcap": (_attention(softcap=30.0), "softcap"),
    "qk output mode": (_attention(qk_matmul_output_mode=1), "qk_matmul_output_mode"),
    "extra outputs": (_attention(outputs=4), "only the first output"),
    "K and V differ": (_attention(v_shape=(1, 2, 4, 16)), "differ in shape"),
    "K of another type": (_attention(k_dtype=T.FLOAT16), "K is FLOAT16"),
}


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention_constraints(case):
    model, reason = ATTENTION_CASES[case]
    assert any(reason in r for r in _reasons(model)), (case, _reasons(model))


def test_attention_that_tensorrt_takes_passes():
    assert _reasons(_attention()) == []
    assert _reasons(_attention(dtype=T.FLOAT16, mask=(T.BOOL, [1, 1, 4, 4]))) == []
    assert _reasons(_attention(mask=(T.FLOAT, [1, 2, 4, 4]), is_causal=0, scale=0.5)) == []


def _if_model(then_rank: int, else_rank: int, inner_op: str = "Identity", inner_type: int = T.FLOAT) -> onnx.ModelProto:
    def branch(name: str, rank: int, op: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, ["x", "x"] if op != "Identity" else ["x"], [f"{name}_y"],
                                                   name=f"{name}_n")], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", inner_type, [3] * rank)])
    node = helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("then", then_rank, inner_op),
                            else_branch=branch("else", else_rank, "Identity"))
    return _model([node], [("c", T.BOOL, []), ("x", inner_type, [3])], [("y", inner_type, None)])


def test_if_branches_and_subgraph_bodies_are_checked():
    assert _reasons(_if_model(1, 1)) == []
    assert any("differ in rank" in r for r in _reasons(_if_model(1, 2)))
    # a rule broken inside a branch (MatMul on int64) is found there
    inside = _reasons(_if_model(1, 1, inner_op="MatMul", inner_type=T.INT64))
    assert any(r.startswith("MatMul then_n") for r in inside), inside


def test_loop_body_is_checked():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond"),
         helper.make_node("Softmax", ["acc_in"], ["acc_out"], name="body_softmax")], "body",
        [helper.make_tensor_value_info("i", T.INT64, []), helper.make_tensor_value_info("cond_in", T.BOOL, []),
         helper.make_tensor_value_info("acc_in", T.INT32, [3])],
        [helper.make_tensor_value_info("cond_out", T.BOOL, []), helper.make_tensor_value_info("acc_out", T.INT32, [3])])
    node = helper.make_node("Loop", ["n", "c", "a"], ["y"], name="loop", body=body)
    m = _model([node], [("n", T.INT64, []), ("c", T.BOOL, []), ("a", T.INT32, [3])], [("y", T.INT32, None)])
    assert any(r.startswith("Softmax body_softmax") for r in _reasons(m))


def test_attribute_rules():
    topk = lambda k, sorted_=1: _model(  # noqa: E731
        [helper.make_node("TopK", ["a", "k"], ["v", "i"], name="n", sorted=sorted_)], [("a", T.FLOAT, [1, 5000])],
        [("v", T.FLOAT, None), ("i", T.INT64, None)], [_ints("k", [k])])
    assert _reasons(topk(3840)) == []
    assert any("exceeds" in r for r in _reasons(topk(3841)))
    assert any("sorted must be 1" in r for r in _reasons(topk(8, 0)))
    nonconst = _model([helper.make_node("TopK", ["a", "k"], ["v", "i"], name="n")],
                      [("a", T.FLOAT, [1, 8]), ("k", T.INT64, [1])], [("v", T.FLOAT, None), ("i", T.INT64, None)])
    assert any("must be a constant" in r for r in _reasons(nonconst))
    scatter = lambda red: _model(  # noqa: E731
        [helper.make_node("ScatterElements", ["d", "i", "d"], ["y"], name="n", reduction=red)],
        [("d", T.FLOAT, [3]), ("i", T.INT64, [3])], [("y", T.FLOAT, None)])
    assert _reasons(scatter("none")) == [] and any("reduction='add'" in r for r in _reasons(scatter("add")))
    resize = lambda **kw: _model(  # noqa: E731
        [helper.make_node("Resize", ["x", "", "s"], ["y"], name="n", **kw)], [("x", T.FLOAT, [1, 1, 4, 4])],
        [("y", T.FLOAT, None)], [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "s")])
    assert _reasons(resize(mode="nearest")) == []
    assert any("mode='cubic'" in r for r in _reasons(resize(mode="cubic")))
    assert any("antialias" in r for r in _reasons(resize(mode="linear", antialias=1)))
    ln = lambda outs: _model(  # noqa: E731
        [helper.make_node("LayerNormalization", ["x", "g"], outs, name="n")], [("x", T.FLOAT, [2, 4])],
        [(o, T.FLOAT, None) for o in outs], [numpy_helper.from_array(np.ones(4, np.float32), "g")])
    assert _reasons(ln(["y"])) == [] and any("first output" in r for r in _reasons(ln(["y", "mean"])))
    drop = _model([helper.make_node("Dropout", ["x", "", "t"], ["y"], name="n")], [("x", T.FLOAT, [3])],
                  [("y", T.FLOAT, None)], [numpy_helper.from_array(np.array(True), "t")])
    assert any("training_mode" in r for r in _reasons(drop))


def test_structural_rules():
    opset24 = _model([helper.make_node("Add", ["a", "a"], ["y"], name="n")], [("a", T.FLOAT, [3])],
                     [("y", T.FLOAT, None)], opset=24)
    assert any("opset 24" in r for r in _reasons(opset24))
    nz = _model([helper.make_node("NonZero", ["a"], ["y"], name="n")], [("a", T.FLOAT, [3])], [("y", T.INT64, None)])
    assert any("depends on the data" in r for r in _reasons(nz))
    custom = _model([helper.make_node("Foo", ["a"], ["y"], name="n", domain="com.x")], [("a", T.FLOAT, [3])],
                    [("y", T.FLOAT, None)])
    assert any("plugin" in r for r in _reasons(custom))
    dyn = _model([helper.make_node("Relu", ["a"], ["y"], name="n")], [("a", T.FLOAT, ["B", "N"])],
                 [("y", T.FLOAT, None)])
    assert any("axis 1 is dynamic" in r for r in _reasons(dyn))
    with pytest.raises(DitmergeError, match="would not build with TensorRT"):
        assert_tensorrt_ready(nz)


def _float_rank_graph() -> onnx.ModelProto:
    """The inverse permutation as ToMe and SDTM built it before: ascending TopK of ``Cast(order -> FLOAT)``."""
    graph = gs.Graph(opset=23)
    score = gs.Variable("score", np.float32, [1, 3072])
    graph.inputs = [score]
    em = Emitter(graph, "old")
    _, order = em.op("TopK", [score, em.ints("k", [3072])], {"axis": -1, "largest": 1, "sorted": 1}, num_outputs=2)
    order_f = em.op("Cast", [order], {"to": T.FLOAT})
    _, rank = em.op("TopK", [order_f, em.ints("k", [3072])], {"axis": -1, "largest": 0, "sorted": 1}, num_outputs=2)
    rank.dtype, rank.shape = np.int64, [1, 3072]
    graph.outputs = [rank]
    return gs.export_onnx(graph)


def test_float_index_path_is_refused():
    reasons = _reasons(_float_rank_graph())
    assert any(r.startswith("Cast old/Cast") and "reaches TopK" in r for r in reasons), reasons
    # through index arithmetic into a comparison, and back into an integer cast
    m = _model([helper.make_node("Cast", ["i"], ["f"], name="to_float", to=T.FLOAT),
                helper.make_node("Add", ["f", "f"], ["g"], name="add"),
                helper.make_node("Less", ["g", "g"], ["y"], name="less")], [("i", T.INT64, [4])], [("y", T.BOOL, None)])
    assert any(r.startswith("Cast to_float") and "reaches Less" in r for r in _reasons(m))
    m = _model([helper.make_node("Cast", ["i"], ["f"], name="to_float", to=T.FLOAT16),
                helper.make_node("Cast", ["f"], ["y"], name="back", to=T.INT64)], [("i", T.INT64, [4])],
               [("y", T.INT64, None)])
    assert any("reaches Cast back" in r for r in _reasons(m))


def test_int_to_float_feeding_math_only_passes():
    """A timestep embedding (int -> float -> Sin) and a BOOL mask cast are not index paths."""
    m = _model([helper.make_node("Cast", ["t"], ["f"], name="to_float", to=T.FLOAT),
                helper.make_node("Sin", ["f"], ["s"], name="sin"),
                helper.make_node("Cast", ["b"], ["bf"], name="mask", to=T.FLOAT),
                helper.make_node("ArgMax", ["bf"], ["y"], name="argmax", axis=0)],
               [("t", T.INT64, [4]), ("b", T.BOOL, [4])], [("s", T.FLOAT, None), ("y", T.INT64, None)])
    assert _reasons(m) == []


def test_every_method_graph_keeps_indices_integer():
    """The builders of every method emit no int -> float cast on an index path (whole graphs: tests of each pass)."""
    from passes.sdtm.graph import WindowGeometry, build_window_match
    from passes.tome.graph import Geometry, build_match

    graph = gs.Graph(opset=23)
    x = gs.Variable("x", np.float32, ["B", 64, 8])
    part, inv = gs.Variable("p", np.int64, [64]), gs.Variable("pi", np.int64, [64])
    counter = gs.Variable("c", np.float32, ["B", 64])
    graph.inputs = [x, part, inv, counter]
    em = Emitter(graph, "m")
    st = build_match(em, x, part, inv, Geometry(64, 48, 16))
    ws = build_window_match(em, x, counter, WindowGeometry((8, 8), 4), 1.0)
    outs = [st.map_flat, ws.map_flat]
    for o in outs:
        o.dtype = np.int64
    graph.outputs = outs
    model = gs.export_onnx(graph)
    assert not [r for r in _reasons(model) if "reaches" in r]
    assert "ScatterElements" in {n.op_type for n in model.graph.node}


# rule 10 and the per-profile check: counts carried by input lengths (passes/counts.py)
COUNT = "ditmerge_count_r"


def _count_model(nodes, inits=(), n: int = 4000, extra_inputs=()) -> onnx.ModelProto:
    """x [batch, n] and the count input r; outputs TopK's values and indices."""
    inputs = [("x", T.FLOAT, ["batch", n]), (COUNT, T.INT64, ["r"]), *extra_inputs]
    return _model(nodes, inputs, [("v", T.FLOAT, None), ("i", T.INT64, None)], inits)


def _k_from_count(offset: int) -> onnx.ModelProto:
    """TopK with K = count + offset, the count read only through its Shape."""
    return _count_model([helper.make_node("Shape", [COUNT], ["r"], name="count_of"),
                         helper.make_node("Add", ["r", "off"], ["k"], name="k"),
                         helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")], [_ints("off", [offset])])


def test_topk_k_is_evaluated_per_profile():
    from passes.trt_profiles import check_count_profiles

    m = _k_from_count(3800)
    assert _reasons(m) == []  # K is a shape tensor: fine without profiles
    assert check_count_profiles(m, [{"r": 0}, {"r": 40}]) == []  # K = 3800 and 3840
    found = [str(v) for v in check_count_profiles(m, [{"r": 40}, {"r": 100}])]
    assert found == ["TopK topk: K=3900 in profile 1 (r=100) exceeds TensorRT's limit of 3840"]
    with pytest.raises(DitmergeError, match=r"K=3900 in profile 0 \(r=100\)"):
        assert_tensorrt_ready(m, "g", [{"r": 100}])
    assert_tensorrt_ready(m, "g", [{"r": 10}])
    with pytest.raises(DitmergeError, match="no optimization profile gives their values"):
        assert_tensorrt_ready(m, "g")  # a graph with counts needs its profiles
    assert any("gives no value for count r" in str(v) for v in check_count_profiles(m, [{"s": 1}]))


def test_topk_k_from_intermediate_shapes_is_evaluated():
    """K = Shape(x)[1] - r: the evaluator reads x's static dim and the profile's count (Gather, Sub, Unsqueeze)."""
    from passes.trt_profiles import check_count_profiles

    m = _count_model([helper.make_node("Shape", [COUNT], ["r"], name="count_of"),
                      helper.make_node("Shape", ["x"], ["sx"], name="sx"),
                      helper.make_node("Gather", ["sx", "one"], ["n"], name="n", axis=0),
                      helper.make_node("Unsqueeze", ["n", "zero"], ["n1"], name="n1"),
                      helper.make_node("Sub", ["n1", "r"], ["k"], name="k"),
                      helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")],
                     [_ints("one", 1), _ints("zero", [0])])
    assert check_count_profiles(m, [{"r": 160}, {"r": 2000}]) == []  # K = 3840, 2000
    assert [v.reason for v in check_count_profiles(m, [{"r": 159}])] == [
        "K=3841 in profile 0 (r=159) exceeds TensorRT's limit of 3840"]


def test_topk_k_from_data_or_open_dims_is_refused():
    from passes.trt_profiles import check_count_profiles

    data = _count_model([helper.make_node("ReduceMax", ["kin", "ax"], ["k"], name="kmax", keepdims=1),
                         helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")], [_ints("ax", [0])],
                        extra_inputs=[("kin", T.INT64, [3])])
    assert any("must be a constant or computed from input shapes" in r and "ReduceMax kmax" in r
               for r in _reasons(data))
    found = [str(v) for v in check_count_profiles(data, [{"r": 1}, {"r": 2}])]
    assert len(found) == 1 and "data-dependent K" in found[0]  # reported once, not per profile
    batch = _count_model([helper.make_node("Shape", ["x"], ["sx"], name="sx"),
                          helper.make_node("Slice", ["sx", "zero", "one"], ["k"], name="k"),
                          helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")],
                         [_ints("zero", [0]), _ints("one", [1])])
    assert any("does not fix (batch or prompt length)" in str(v) for v in check_count_profiles(batch, [{"r": 1}]))


def test_a_count_read_as_data_is_refused():
    """Rule 10: any consumer of a count input other than Shape reads its (unset) values."""
    from passes.trt_profiles import check_count_profiles

    as_data = _count_model([helper.make_node("ReduceSum", [COUNT, "ax"], ["k"], name="sum", keepdims=1),
                            helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")], [_ints("ax", [0])])
    reasons = _reasons(as_data)
    assert any(r.startswith("ReduceSum sum") and f"reads count input {COUNT} as data" in r for r in reasons)
    assert any(r.startswith("TopK topk") and "must be a constant" in r for r in reasons)
    assert any("as data" in str(v) for v in check_count_profiles(as_data, [{"r": 3}]))
    # the count in a subgraph, read as data
    body = helper.make_graph([helper.make_node("Identity", [COUNT], ["o"], name="inner")], "then", [],
                             [helper.make_tensor_value_info("o", T.INT64, None)])
    other = helper.make_graph([helper.make_node("Identity", ["c0"], ["o2"], name="inner2")], "else", [],
                              [helper.make_tensor_value_info("o2", T.INT64, None)])
    sub = _model([helper.make_node("If", ["c"], ["y"], name="if", then_branch=body, else_branch=other)],
                 [("c", T.BOOL, []), (COUNT, T.INT64, ["r"])], [("y", T.INT64, None)], [_ints("c0", [1])])
    assert any(r.startswith("Identity inner") and "as data" in r for r in _reasons(sub))
    # the fixed twin: only Shape reads it
    assert not [r for r in _reasons(_k_from_count(0)) if "count" in r]


def test_topk_k_inside_an_if_branch_is_evaluated_per_profile():
    """passes/branch.py puts the merged nodes in an If branch: a K there reads outer-scope shapes."""
    from passes.trt_profiles import check_count_profiles

    def branch(name, offset):
        nodes = [helper.make_node("Shape", [COUNT], [f"{name}/r"], name=f"{name}/count_of"),
                 helper.make_node("Add", [f"{name}/r", "off"], [f"{name}/k"], name=f"{name}/k"),
                 helper.make_node("TopK", ["x", f"{name}/k"], [f"{name}/v", f"{name}/i"], name=f"{name}/topk")]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}/v", T.FLOAT, None)])

    m = _count_model([helper.make_node("If", ["c"], ["v"], name="if", then_branch=branch("a", 0),
                                       else_branch=branch("b", 0)),
                      helper.make_node("Identity", ["x"], ["i"], name="id")], [_ints("off", [3800])],
                     extra_inputs=[("c", T.BOOL, [])])
    assert check_count_profiles(m, [{"r": 40}]) == []
    found = sorted(str(v) for v in check_count_profiles(m, [{"r": 41}]))
    assert found == [f"TopK {b}/topk: K=3841 in profile 0 (r=41) exceeds TensorRT's limit of 3840" for b in "ab"]
