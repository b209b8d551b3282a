"""A graph with count inputs (passes/counts.py) as TensorRT sees one optimization profile of it.

Within a profile every count input has a fixed length, so every value computed from its shape is a
build-time constant. ``specialize`` makes that explicit on CPU: each count input becomes an int64
initializer of its bucket's length, and the nodes computed from it are folded into initializers, so
``passes.trt_check.check_tensorrt`` checks the profile as the builder would (TopK K a constant <= 3840,
no dynamic token axis). ``assert_tensorrt_ok`` also asserts the count contract: a count input is read
only by ``Shape``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from passes.counts import count_input_name, is_count_input
from passes.trt_check import check_tensorrt
from passes.trt_profiles import check_count_profiles

_MAX_FOLD = 1 << 20  # elements: index bookkeeping is small, activations are never count-only


def specialize(model: onnx.ModelProto, counts: dict[str, int]) -> onnx.ModelProto:
    """``model`` with its count inputs fixed to ``counts`` and everything computed only from them folded."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    names = {vi.name for vi in g.input if is_count_input(vi.name)}
    missing = names - {count_input_name(k) for k in counts}
    assert not missing, f"no count given for {sorted(missing)}"
    known: dict[str, np.ndarray] = {}
    for init in g.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL and np.prod(init.dims, dtype=np.int64) <= _MAX_FOLD:
            known[init.name] = numpy_helper.to_array(init)
    for key, value in counts.items():
        if count_input_name(key) in names:
            known[count_input_name(key)] = np.zeros(int(value), np.int64)
    tainted = set(names)
    opset = [helper.make_opsetid(i.domain, i.version) for i in out.opset_import]
    keep, folded = [], {}
    for node in g.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                known[node.output[0]] = numpy_helper.to_array(value)
            keep.append(node)
            continue
        ins = [i for i in node.input if i]
        if (not any(i in tainted for i in ins) or not all(i in known for i in ins) or node.domain not in ("", "ai.onnx")
                or node.op_type in ("If", "Loop", "Scan")):  # bodies read the outer scope: not folded here
            keep.append(node)
            continue
        sub = helper.make_model(helper.make_graph([node], "fold", [helper.make_tensor_value_info(
            i, helper.np_dtype_to_tensor_dtype(known[i].dtype), known[i].shape) for i in dict.fromkeys(ins)],
            [helper.make_tensor_value_info(o, 0, None) for o in node.output if o]), opset_imports=opset)
        results = ReferenceEvaluator(sub).run(None, {i: known[i] for i in ins})
        for name, value in zip([o for o in node.output if o], results):
            known[name] = folded[name] = np.asarray(value)
            tainted.add(name)
    g.ClearField("node")
    g.node.extend(keep)
    used = {i for n in keep for i in n.input} | {o.name for o in g.output}
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in folded.items() if k in used)
    specialized_inputs = [vi for vi in g.input if vi.name not in names]
    g.ClearField("input")
    g.input.extend(specialized_inputs)
    g.initializer.extend(numpy_helper.from_array(known[n], n) for n in names if n in used)
    return out


def count_readers(model: onnx.ModelProto) -> dict[str, set[str]]:
    """Op types that read each count input."""
    names = {vi.name for vi in model.graph.input if is_count_input(vi.name)}
    readers: dict[str, set[str]] = {n: set() for n in names}
    for node in model.graph.node:
        for i in node.input:
            if i in names:
                readers[i].add(node.op_type)
    return readers


def assert_tensorrt_ok(model: onnx.ModelProto, counts: dict[str, int]) -> None:
    """Counts are read by shape only, and the profile of ``counts`` passes the static TensorRT check."""
    for name, ops in count_readers(model).items():
        assert ops <= {"Shape"}, f"{name} is read by {sorted(ops)}: a count input may only be read by its shape"
        # the input declares its one symbolic axis, named after its key
        vi = next(v for v in model.graph.input if v.name == name)
        dims = vi.type.tensor_type.shape.dim
        assert len(dims) == 1 and dims[0].dim_param, f"{name}: expected one symbolic axis, got {dims}"
    violations = check_tensorrt(specialize(model, counts))
    assert violations == [], f"profile {counts}: {[str(v) for v in violations[:5]]}"
    # and the project's own per-profile check (passes/trt_check.py), as the engine build runs it
    violations = check_tensorrt(model) + check_count_profiles(model, [counts])
    assert violations == [], f"trt_check, profile {counts}: {[str(v) for v in violations[:5]]}"
