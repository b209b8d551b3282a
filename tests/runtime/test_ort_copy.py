"""The onnxruntime-only copy of a plan graph (runtime/ort_optimize.py): exact, one weights file, CPU only."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from export.onnx_export import WEIGHTS_FILE
from passes.counts import count_feed
from passes.partition import PARTITION_INPUT, PARTITION_INV_INPUT, draw_partition
from passes.trt_check import check_tensorrt
from runtime.ort_optimize import copy_path, fuse_skip_layernorm, optimized_copy, session_graph
from runtime.runners import OrtRunner, SharedWeights
from runtime.transformer import graph_inputs
from tests.helpers import METHOD_ATOL, assert_close

CPU = ["CPUExecutionProvider"]
GRID = (4, 4)


@pytest.fixture(scope="module")
def plan(exported, tmp_path_factory):
    """A tiny DiT's base.onnx and ToMe's one graph (If on r == 0, r from shapes) over one weights file."""
    import shutil

    from passes.branch import branch_on_zero
    from passes.onnxutil import save_checked
    from passes.tome import R_COUNT, ToMeConfig, ToMePass

    _, base, src = exported("dit", GRID)
    out = tmp_path_factory.mktemp("ortcopy")
    for f in src.iterdir():
        if f.suffix == ".bin":
            shutil.copy(f, out / f.name)
    save_checked(base, out / "base.onnx")
    merged = ToMePass(ToMeConfig(0.5, locations=("attn", "mlp"), dynamic=True))(base).model
    save_checked(branch_on_zero(base, merged, R_COUNT), out / "tome.onnx")
    r = 8  # half the src tokens of a 4 x 4 grid at stride 2 x 2 (12 src)
    return out, [("base.onnx", None), ("tome.onnx", r), ("tome.onnx", 0)]


def _ops(graph: onnx.GraphProto) -> list[str]:
    out = []
    for n in graph.node:
        out.append(n.op_type)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out += _ops(a.g)
    return out


def test_copy_matches_plain_graph(plan):
    """Every bucket of the one graph (If on r == 0) and base.onnx: the copy fuses, and its outputs are the
    plain graph's within 1e-4 fp32; its initializers are the plain graph's, external in the one weights file."""
    out, cases = plan
    weights = SharedWeights(out / WEIGHTS_FILE)
    part, inv = draw_partition(GRID, (2, 2), np.random.default_rng(0))
    for graph, r in cases:
        rng = np.random.default_rng(0)
        inputs = graph_inputs(out / graph)
        feed = {k: rng.integers(0, 10, [2 if isinstance(d, str) else d for d in dims]).astype(dt)
                if dt.kind in "iu" else rng.standard_normal([2 if isinstance(d, str) else d for d in dims]).astype(dt)
                for k, (dt, dims) in inputs.items() if k not in (PARTITION_INPUT, PARTITION_INV_INPUT)
                and not k.startswith("ditmerge_count_")}
        extra = {} if r is None else {PARTITION_INPUT: part, PARTITION_INV_INPUT: inv, **count_feed({"tome_r": r})}
        plain, fused = (OrtRunner(out / graph, CPU, weights, optimize=o) for o in (False, True))
        fused.activate()
        assert fused.session_path == copy_path(out / graph)
        src, cp = (onnx.load(p, load_external_data=False) for p in (out / graph, fused.session_path))
        assert "SkipLayerNormalization" in _ops(cp.graph) and "SkipLayerNormalization" not in _ops(src.graph)
        assert [i.SerializeToString() for i in cp.graph.initializer] == [i.SerializeToString() for i in src.graph.initializer]
        f = {**feed, **extra}
        assert_close(fused.infer(f)["sample"], plain.infer(f)["sample"], METHOD_ATOL, f"{graph} r={r}")
        assert fused.session_path == copy_path(out / graph)  # it ran the copy, not the fallback
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".bin") == [WEIGHTS_FILE]


def test_copy_is_cached_and_renewed(plan):
    """A second load reuses the copy; a changed source graph gets a new one."""
    out, _ = plan
    graph = out / "base.onnx"
    first = optimized_copy(graph)
    stamp = first.stat().st_mtime_ns
    assert optimized_copy(graph).stat().st_mtime_ns == stamp
    model = onnx.load(graph, load_external_data=False)
    model.doc_string = "changed"
    onnx.save(model, graph)
    assert optimized_copy(graph).stat().st_mtime_ns != stamp


def test_other_providers_get_the_plain_graph(plan):
    """TensorRT (through onnxruntime or its own runner) and CUDA never get the contrib-op copy; the copy
    itself would fail the TensorRT check."""
    out, _ = plan
    graph = out / "tome.onnx"
    for providers in (["TensorrtExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]):
        assert session_graph(graph, providers, optimize=True) == graph
    assert session_graph(graph, CPU, optimize=False) == graph
    copy = onnx.load(optimized_copy(graph), load_external_data=False)
    assert any("SkipLayerNormalization" in str(v) for v in check_tensorrt(copy))  # not a TensorRT op
    assert not check_tensorrt(onnx.load(graph, load_external_data=False))


def _add_ln(shape_a, shape_b, c: int = 8) -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g"], ["y"], axis=-1, epsilon=1e-6),
             helper.make_node("Add", ["s", "y"], ["z"])]  # the sum read again, as a residual is
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, shape_a),
                                           helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, shape_b)],
                              [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(np.linspace(0.5, 1.5, c).astype(np.float32), "g")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_broadcasting_add_is_left_alone():
    """Equal shapes (a named batch too) fuse, with the sum kept for its other reader; an Add that broadcasts
    (batch 1 against batch B: the fused op would return the smaller shape) does not."""
    import onnxruntime as ort

    same = _add_ln(["batch", 5, 8], ["batch", 5, 8])
    assert fuse_skip_layernorm(same) == 1
    a, b = np.random.default_rng(0).standard_normal((2, 2, 5, 8)).astype(np.float32)
    got = ort.InferenceSession(same.SerializeToString(), providers=CPU).run(None, {"a": a, "b": b})[0]
    ref = ort.InferenceSession(_add_ln(["batch", 5, 8], ["batch", 5, 8]).SerializeToString(), providers=CPU,
                               disabled_optimizers=["SkipLayerNormFusion"]).run(None, {"a": a, "b": b})[0]
    assert_close(got, ref, METHOD_ATOL, "fused")
    for shapes in ((["batch", 5, 8], [1, 5, 8]), ([1, 5, 8], ["batch", 5, 8]), (["batch", 5, 8], ["batch", 1, 8]),
                   (["batch", "n", 8], ["batch", "m", 8]), ([2, 3, 5, 8], [2, 3, 5, 8])):
        assert fuse_skip_layernorm(_add_ln(*shapes)) == 0, shapes


def test_runner_falls_back_when_the_copy_refuses(tmp_path, caplog):
    """A copy whose fused node refuses the fed shapes (forced here: rank 4, which SkipLayerNormalization does
    not take) makes the runner log it and answer from the plain graph."""
    import hashlib

    from runtime.ort_optimize import META_KEY, VERSION

    plain = _add_ln(None, None)  # shapes unknown: the rewrite itself would not fuse it
    path = tmp_path / "g.onnx"
    onnx.save(plain, path)
    forced = _add_ln(None, None)
    ln = next(n for n in forced.graph.node if n.op_type == "LayerNormalization")
    fused = helper.make_node("SkipLayerNormalization", ["a", "b", "g"], ["y", "", "", "s"], domain="com.microsoft",
                             epsilon=1e-6)
    nodes = [fused] + [n for n in forced.graph.node if n.op_type == "Add" and n.output[0] == "z"]
    del forced.graph.node[:]
    forced.graph.node.extend(nodes)
    forced.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    forced.metadata_props.append(onnx.StringStringEntryProto(
        key=META_KEY, value=json.dumps({"source_sha256": sha, "version": VERSION, "fused": 1})))
    onnx.save(forced, copy_path(path))
    assert ln.op_type == "LayerNormalization"
    a, b = np.random.default_rng(0).standard_normal((2, 2, 3, 5, 8)).astype(np.float32)
    runner = OrtRunner(path, CPU, optimize=True)
    runner.activate()
    assert runner.session_path == copy_path(path)
    got = runner.infer({"a": a, "b": b})["z"]
    assert runner.session_path == path and "plain graph" in caplog.text
    assert_close(got, OrtRunner(path, CPU).infer({"a": a, "b": b})["z"], METHOD_ATOL, "fallback")
