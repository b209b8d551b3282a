"""Static proof on CPU that a graph is within what TensorRT's ONNX parser parses and builds.

Supported range: TensorRT >= 10.15 (``Attention`` parses from 10.14, ``RMSNormalization`` and
``RotaryEmbedding`` from 10.15, per NVIDIA's TensorRT and onnx-tensorrt changelogs), opsets up to 23.
The op list, the per-op type sets and the restrictions follow onnx-tensorrt's ``docs/operators.md``
(TensorRT 10 matrix); the ``Attention`` rules follow TensorRT's IAttention operator page. A violation
names the node and the reason; an empty list means the graph passes. The rules, in order:

1. opset at most 23; no custom domains; no data-dependent output shapes; only parsed ops;
2. inputs onnx-tensorrt needs as initializers are constants (Slice/Squeeze/Unsqueeze/Reduce* axes, ...); TopK's K
   is a constant or computed from input shapes only (a shape tensor, TensorRT >= 8.6);
3. per-op element types (``OP_TYPE_RULES``): MatMul, Softmax and the unary math are float only, comparisons
   take no BOOL, And/Or/Not only BOOL, Gather indices are integers, a Where condition is BOOL, ...;
4. attributes: TopK sorted and K <= 3840; no scatter reduction; Resize modes; Dropout not training;
   LayerNormalization only its first output; Constant has no sparse or string value;
5. initializers and Constant values of TensorRT types (no INT16, UINT16/32/64, strings, complex);
6. ``Attention``: 4-D float Q/K/V of one type, K and V of one shape, a BOOL mask or one of Q's type,
   no softcap, no extra outputs or qk_matmul_output_mode, no past key/value or nonpad_kv_seqlen;
7. If/Loop/Scan bodies checked like the main graph; If branches return outputs of equal rank;
8. index paths: no integer -> float Cast whose value reaches TopK, ArgMax/ArgMin, a comparison or a
   cast back to integers through index arithmetic (fp16 loses integers above 2048);
9. graph inputs, outputs and intermediate tensors of TensorRT types; only the batch axis of an input dynamic;
10. count inputs (``ditmerge_count_<key>``, :mod:`passes.counts`) are read only through ``Shape``: a count is
    carried by the input's length, a shape tensor that is static within an optimization profile.

Per optimization profile (:func:`check_count_profiles`, run by :func:`assert_tensorrt_ready` when the engine's
count vectors are given): with the count dims fixed, every TopK's K evaluates from shapes alone
(:class:`ShapeValues`) and is at most 3840.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto as T

from passes.errors import DitmergeError
from passes.trt_limits import (ALLOWED_TYPES, ANY, CONSTANT_INPUTS, CONSTANT_TYPES, DATA_DEPENDENT, FLOATS,
                                INDEX_CARRIERS, INDEX_SINKS, INTS, MAX_OPSET, OP_TYPE_RULES, RESIZE_MODES, SHAPE_OPS,
                                SUPPORTED_OPS, TENSORRT_MIN_VERSION, TOPK_MAX_K, Violation, attrs_of, type_name)
from passes.trt_profiles import ShapeValues, check_count_inputs, check_count_profiles, count_inputs

__all__ = ["TENSORRT_MIN_VERSION", "TOPK_MAX_K", "ShapeValues", "Violation", "assert_tensorrt_ready",
           "check_count_profiles", "check_tensorrt", "count_inputs"]


class _Scope:
    """Element types and constant values visible in one graph (an outer scope's included)."""

    def __init__(self, graph: onnx.GraphProto, outer: _Scope | None = None) -> None:
        self.types: dict[str, int] = dict(outer.types) if outer else {}
        self.shapes: dict[str, list[int | None]] = dict(outer.shapes) if outer else {}
        self.consts: dict[str, onnx.TensorProto | None] = dict(outer.consts) if outer else {}
        self.producers: dict[str, onnx.NodeProto] = dict(outer.producers) if outer else {}
        self.inputs: set[str] = set(outer.inputs) if outer else set()
        self.inputs |= {vi.name for vi in graph.input} - {i.name for i in graph.initializer}
        for n in graph.node:
            for out in n.output:
                self.producers[out] = n
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            tt = vi.type.tensor_type
            if tt.elem_type:
                self.types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        for init in graph.initializer:
            self.types[init.name], self.consts[init.name] = init.data_type, init
            self.shapes[init.name] = list(init.dims)
        for n in graph.node:
            if n.op_type == "Constant":
                value = next((a.t for a in n.attribute if a.name == "value"), None)
                self.consts[n.output[0]] = value
                if value is not None:
                    self.types[n.output[0]] = value.data_type
                    self.shapes[n.output[0]] = list(value.dims)
            elif n.op_type == "Cast":
                self.types.setdefault(n.output[0], attrs_of(n).get("to", onnx.AttributeProto()).i)

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return None if s is None else len(s)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred types of every intermediate tensor (weights stay where they are)."""
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
    except Exception:  # noqa: BLE001 - a graph shape inference cannot read is still checked on what is declared
        return model


def check_tensorrt(model: onnx.ModelProto) -> list[Violation]:
    """Every reason TensorRT >= 10.15 would refuse to parse or build ``model`` (or build it wrong) that a CPU can see."""
    found: list[Violation] = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > MAX_OPSET:
            found.append(Violation("(model)", "opset", f"opset {imp.version} is above the supported {MAX_OPSET}"))
    model = _infer(model)
    _check_graph(model.graph, _Scope(model.graph), found)
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        t = vi.type.tensor_type.elem_type
        if t and t not in ALLOWED_TYPES:
            found.append(Violation(vi.name, "tensor", f"element type {type_name(t)} is not a TensorRT type"))
    found.extend(check_count_inputs(model.graph))
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if axis > 0 and not d.HasField("dim_value") and d.dim_param != "text":  # prompt length: a profile range
                found.append(Violation(vi.name, "input", f"axis {axis} is dynamic ({d.dim_param or '?'}); only the "
                                                         "batch axis may be, so every bucket's token count is static"))
    return found


def _check_graph(graph: onnx.GraphProto, scope: _Scope, found: list[Violation]) -> None:
    for init in graph.initializer:
        if init.data_type not in CONSTANT_TYPES:
            found.append(Violation(init.name, "initializer", f"element type {type_name(init.data_type)} is not a "
                                                              "TensorRT type"))
    for n in graph.node:
        _check_node(n, scope, found)
    _check_index_paths(graph, scope, found)


def _check_node(n: onnx.NodeProto, scope: _Scope, found: list[Violation]) -> None:
    from onnx import numpy_helper

    where = n.name or n.output[0]

    def bad(reason: str) -> None:
        found.append(Violation(where, n.op_type, reason))

    if n.domain not in ("", "ai.onnx"):
        bad(f"custom domain {n.domain!r} needs a TensorRT plugin")
        return
    if n.op_type in DATA_DEPENDENT:
        bad("output shape depends on the data")
    elif n.op_type not in SUPPORTED_OPS:
        bad("not supported by TensorRT's ONNX parser")
    for i in CONSTANT_INPUTS.get(n.op_type, ()):
        if i < len(n.input) and n.input[i] and n.input[i] not in scope.consts:
            bad(f"input {i} ({n.input[i]}) must be a constant")
    # per-op element types
    for types, positions in OP_TYPE_RULES.get(n.op_type, ()):
        for i, name in enumerate(n.input):
            if not name or (positions is not None and i not in positions):
                continue
            t = scope.types.get(name)
            if t and t not in types:
                bad(f"input {i} ({name}) is {type_name(t)}; TensorRT takes {', '.join(sorted(map(type_name, types)))} here")
    attrs = attrs_of(n)
    if n.op_type in ("Cast", "CastLike") and "to" in attrs and attrs["to"].i not in ANY | {T.UINT8}:
        bad(f"casts to {type_name(attrs['to'].i)}, which TensorRT has no layer for")
    if n.op_type == "TopK":
        k = scope.consts.get(n.input[1]) if len(n.input) > 1 else None
        if k is None and len(n.input) > 1:
            why = _data_use(n.input[1], scope)
            if why:
                bad(f"input 1 ({n.input[1]}) must be a constant or computed from input shapes only (TensorRT takes "
                    f"K as a shape tensor), but {why}")
        if k is not None and k.data_location != T.EXTERNAL:
            kv = int(numpy_helper.to_array(k).reshape(-1)[0])
            if kv > TOPK_MAX_K:
                bad(f"K={kv} exceeds TensorRT's limit of {TOPK_MAX_K}")
        if "sorted" in attrs and attrs["sorted"].i != 1:
            bad("sorted must be 1")
    if n.op_type in ("ScatterElements", "ScatterND") and "reduction" in attrs:
        red = attrs["reduction"].s.decode()
        if red != "none":
            bad(f"reduction={red!r} (no TensorRT layer; a plugin without BF16)")
    if n.op_type == "Constant":
        for key in ("sparse_value", "value_string", "value_strings"):
            if key in attrs:
                bad(f"attribute {key} is not supported")
        value = attrs.get("value")
        if value is not None and value.t.data_type not in CONSTANT_TYPES:
            bad(f"value of type {type_name(value.t.data_type)} is not stored by TensorRT")
    if n.op_type == "ConstantOfShape" and "value" in attrs and attrs["value"].t.data_type not in ANY:
        bad(f"value of type {type_name(attrs['value'].t.data_type)} is not supported")
    if n.op_type == "Resize":
        for key, allowed in RESIZE_MODES.items():
            if key in attrs and attrs[key].s.decode() not in allowed:
                bad(f"{key}={attrs[key].s.decode()!r} is not supported (TensorRT: {', '.join(sorted(allowed))})")
        if "antialias" in attrs and attrs["antialias"].i:
            bad("antialiasing is not supported")
    if n.op_type == "Dropout" and len(n.input) > 2 and n.input[2]:
        flag = scope.consts.get(n.input[2])
        if flag is None or bool(numpy_helper.to_array(flag).reshape(-1)[0]):
            bad("training_mode must be a constant False")
    if n.op_type == "LayerNormalization" and any(n.output[1:]):
        bad("only the first output (Y) is supported")
    if n.op_type == "Attention":
        _check_attention(n, scope, bad)
    for a in n.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            _check_graph(a.g, _Scope(a.g, scope), found)
        for g in a.graphs:
            _check_graph(g, _Scope(g, scope), found)
    if n.op_type == "If" and "then_branch" in attrs and "else_branch" in attrs:
        then_g, else_g = attrs["then_branch"].g, attrs["else_branch"].g
        for a, b in zip(then_g.output, else_g.output):
            ra, rb = len(a.type.tensor_type.shape.dim), len(b.type.tensor_type.shape.dim)
            if a.type.tensor_type.HasField("shape") and b.type.tensor_type.HasField("shape") and ra != rb:
                bad(f"branch outputs {a.name} (rank {ra}) and {b.name} (rank {rb}) differ in rank")
            if a.name == b.name:
                bad(f"both branches output a tensor named {a.name}; TensorRT needs different names")


def _check_attention(n: onnx.NodeProto, scope: _Scope, bad) -> None:
    """TensorRT's IAttention: [B, H, S, D] float Q/K/V of one type, a BOOL or same-type mask, softmax only."""
    attrs = attrs_of(n)
    q_type = scope.types.get(n.input[0])
    for i, what in enumerate(("Q", "K", "V")):
        name = n.input[i] if i < len(n.input) else ""
        t, r = scope.types.get(name), scope.rank(name)
        if r is not None and r != 4:
            bad(f"{what} is {r}-D; TensorRT's attention takes 4-D [B, H, S, D] inputs")
        if t and q_type and t != q_type:
            bad(f"{what} is {type_name(t)} but Q is {type_name(q_type)}")
    k_shape, v_shape = scope.shapes.get(n.input[1]), scope.shapes.get(n.input[2])
    if k_shape and v_shape and len(k_shape) == len(v_shape) and any(
            a is not None and b is not None and a != b for a, b in zip(k_shape, v_shape)):
        bad(f"K {k_shape} and V {v_shape} differ in shape; TensorRT needs them equal")
    if len(n.input) > 3 and n.input[3]:
        m_type, m_rank = scope.types.get(n.input[3]), scope.rank(n.input[3])
        if m_type and m_type != T.BOOL and m_type != q_type:
            bad(f"mask is {type_name(m_type)}; TensorRT takes a BOOL mask or one of Q's type "
                f"({type_name(q_type) if q_type else '?'})")
        if m_rank is not None and m_rank != 4:
            bad(f"mask is {m_rank}-D; TensorRT takes a 4-D mask [B|1, H|1, Sq, Skv]")
    for i, what in ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen")):
        if len(n.input) > i and n.input[i]:
            bad(f"input {what} is not supported")
    if any(n.output[1:]):
        bad("only the first output is supported (no present key/value or qk_matmul_output)")
    if "softcap" in attrs and attrs["softcap"].f != 0.0:
        bad(f"softcap={attrs['softcap'].f} is not supported")
    if "qk_matmul_output_mode" in attrs and attrs["qk_matmul_output_mode"].i != 0:
        bad("qk_matmul_output_mode must be 0")


def _check_index_paths(graph: onnx.GraphProto, scope: _Scope, found: list[Violation]) -> None:
    """Integer -> float casts whose value reaches a TopK, ArgMax/ArgMin, a comparison or an integer cast.

    fp16 holds integers exactly only up to 2048, so such a path silently reorders or aliases tokens in
    a reduced-precision engine. The value is followed through index-preserving ops (``INDEX_CARRIERS``).
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    for n in graph.node:
        if n.op_type != "Cast" or scope.types.get(n.input[0]) not in INTS | {T.INT8, T.UINT8, T.INT16, T.UINT16,
                                                                            T.UINT32, T.UINT64}:
            continue
        if attrs_of(n).get("to", onnx.AttributeProto()).i not in FLOATS:
            continue
        frontier, seen = list(n.output), set(n.output)
        while frontier:
            tensor = frontier.pop()
            for c in consumers.get(tensor, ()):
                to_int = c.op_type == "Cast" and attrs_of(c).get("to", onnx.AttributeProto()).i not in FLOATS
                if c.op_type in INDEX_SINKS or to_int:
                    found.append(Violation(n.name or n.output[0], "Cast",
                                           f"an integer index cast to float reaches {c.op_type} {c.name or c.output[0]}"
                                           "; fp16 holds integers exactly only up to 2048, keep index paths integer"))
                    frontier = []
                    break
                if c.op_type in INDEX_CARRIERS:
                    for out in c.output:
                        if out and out not in seen and scope.types.get(out, T.FLOAT) in FLOATS:
                            seen.add(out)
                            frontier.append(out)


def _data_use(name: str, scope: _Scope) -> str:
    """Why ``name`` is not computed from shapes and constants alone ('' when it is): the first data it reads."""
    stack, seen = [name], set()
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t in scope.consts:
            continue
        if t in scope.inputs:
            return f"it reads graph input {t} as data"
        n = scope.producers.get(t)
        if n is None:
            return f"{t} comes from outside the graph"
        if n.op_type == "Shape":
            continue  # reads only its input's shape
        if n.op_type not in SHAPE_OPS:
            return f"it depends on the data output of {n.op_type} {n.name or n.output[0]}"
        stack.extend(n.input)
    return ""


def assert_tensorrt_ready(model: onnx.ModelProto, what: str = "graph",
                          profiles: list[dict[str, int]] | None = None) -> None:
    """Raise with every violation of :func:`check_tensorrt` and, for a graph with count inputs or given
    ``profiles`` (the engine's count vectors, one per optimization profile), of :func:`check_count_profiles`."""
    found = check_tensorrt(model)
    if profiles is not None or count_inputs(model.graph):
        found = list(dict.fromkeys(found + check_count_profiles(model, profiles or [])))
    if found:
        lines = "\n  ".join(str(v) for v in found[:20])
        more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
        raise DitmergeError(f"{what} would not build with TensorRT >= {TENSORRT_MIN_VERSION}:\n  {lines}{more}")
