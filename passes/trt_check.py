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

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto as T

from passes.counts import count_key, is_count_input
from passes.errors import DitmergeError

TENSORRT_MIN_VERSION = "10.15"
MAX_OPSET = 23
TOPK_MAX_K = 3840

SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat ConcatFromSequence Constant ConstantOfShape Conv ConvTranspose
Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout DynamicQuantizeLinear Einsum Elu Equal Erf
Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid
HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LpNormalization LpPool LRN LSTM MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round ScaledTanh Scan ScatterElements ScatterND
Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze
STFT Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# ops whose output shape depends on data: TensorRT needs every bucket's shapes fixed at build time
DATA_DEPENDENT = frozenset({"NonZero", "Unique", "Compress", "NonMaxSuppression"})
# inputs that onnx-tensorrt requires to be initializers / constants
CONSTANT_INPUTS = {"Slice": (3,), "Squeeze": (1,), "Unsqueeze": (1,), "ReduceMax": (1,), "ReduceMean": (1,),
                   "ReduceSum": (1,), "ReduceMin": (1,), "ReduceProd": (1,), "ReduceL2": (1,), "Pad": (3,),
                   "CumSum": (1,)}
ALLOWED_TYPES = {T.FLOAT, T.FLOAT16, T.BFLOAT16, T.INT32, T.INT64, T.INT8, T.UINT8, T.BOOL, T.DOUBLE,
                 T.FLOAT8E4M3FN, T.INT4}
CONSTANT_TYPES = ALLOWED_TYPES

# DOUBLE counts as a float: the parser casts it down to FLOAT (clamping to +-FLT_MAX); Flux's rotary
# embedding is computed in float64 by diffusers
FLOATS = frozenset({T.FLOAT, T.FLOAT16, T.BFLOAT16, T.DOUBLE})
INTS = frozenset({T.INT32, T.INT64})
BOOL = frozenset({T.BOOL})
NUMERIC = FLOATS | INTS
ANY = FLOATS | INTS | BOOL
ALL = None  # every input

# op -> [(allowed element types, the input positions they apply to)]; onnx-tensorrt docs/operators.md, 10.x
OP_TYPE_RULES: dict[str, list[tuple[frozenset, tuple[int, ...] | None]]] = {}
for _ops, _types, _where in [
    ("Abs Add Sub Mul Div Max Min Neg Sum Mean Mod Sign ArgMax ArgMin TopK Range", NUMERIC, ALL),
    ("Equal Less LessOrEqual Greater GreaterOrEqual", NUMERIC, ALL),
    ("ReduceMax ReduceMean ReduceSum ReduceMin ReduceProd", NUMERIC, (0,)),
    ("Softmax LogSoftmax Sqrt Exp Log Erf Sin Cos Tan Tanh Sigmoid Reciprocal Floor Ceil Round Softplus Relu "
     "LeakyRelu Elu HardSwish HardSigmoid Gelu CumSum Clip ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp "
     "ReduceSumSquare IsInf Conv ConvTranspose LayerNormalization GroupNormalization InstanceNormalization "
     "RMSNormalization BatchNormalization Resize Dropout", FLOATS, (0,)),
    ("MatMul Gemm Pow Einsum", FLOATS, ALL),
    ("RotaryEmbedding", FLOATS, (0, 1, 2)),
    ("And Or Xor Not", BOOL, ALL),
    ("Concat Identity Tile Transpose Trilu Flatten Shape Size Split Squeeze Unsqueeze Reshape Expand Slice", ANY,
     (0,)),
    ("Concat", ANY, ALL),
    ("Gather GatherElements GatherND", ANY, (0,)),
    ("Gather GatherElements GatherND", INTS, (1,)),
    ("ScatterElements ScatterND", NUMERIC, (0, 2)),
    ("ScatterElements ScatterND", INTS, (1,)),
    ("Where", BOOL, (0,)),
    ("Where", ANY, (1, 2)),
    ("Pad", NUMERIC, (0,)),
    ("Cast CastLike", ANY | {T.UINT8}, (0,)),
]:
    for _op in _ops.split():
        OP_TYPE_RULES.setdefault(_op, []).append((_types, _where))

RESIZE_MODES = {"mode": {"nearest", "linear"},
                "coordinate_transformation_mode": {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                                                   "asymmetric", "align_corners"},
                "nearest_mode": {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}}
COMPARISONS = frozenset({"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"})
# ops through which an index value stays an index value (reshaping, selecting, integer-like arithmetic)
INDEX_CARRIERS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Transpose", "Slice", "Concat", "Expand", "Tile",
                            "Flatten", "Identity", "Gather", "GatherElements", "Add", "Sub", "Mul", "Div", "Neg",
                            "Floor", "Ceil", "Round", "Mod", "Max", "Min", "Abs", "Where", "Split"})
INDEX_SINKS = frozenset({"TopK", "ArgMax", "ArgMin"}) | COMPARISONS
# ops of shape-only subgraphs (the values TensorRT computes as shape tensors at build time, per profile)
SHAPE_OPS = frozenset({"Shape", "Constant", "Gather", "Slice", "Concat", "Squeeze", "Unsqueeze", "Add", "Sub", "Mul",
                       "Div", "Min", "Max", "Cast", "Reshape", "Identity"})


def _name(t: int) -> str:
    return T.DataType.Name(t)


@dataclasses.dataclass(frozen=True)
class Violation:
    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op} {self.node}: {self.reason}"


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
                self.types.setdefault(n.output[0], _attrs(n).get("to", onnx.AttributeProto()).i)

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return None if s is None else len(s)


def _attrs(n: onnx.NodeProto) -> dict[str, onnx.AttributeProto]:
    return {a.name: a for a in n.attribute}


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
            found.append(Violation(vi.name, "tensor", f"element type {_name(t)} is not a TensorRT type"))
    found.extend(_check_count_inputs(model.graph))
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
            found.append(Violation(init.name, "initializer", f"element type {_name(init.data_type)} is not a "
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
                bad(f"input {i} ({name}) is {_name(t)}; TensorRT takes {', '.join(sorted(map(_name, types)))} here")
    attrs = _attrs(n)
    if n.op_type in ("Cast", "CastLike") and "to" in attrs and attrs["to"].i not in ANY | {T.UINT8}:
        bad(f"casts to {_name(attrs['to'].i)}, which TensorRT has no layer for")
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
            bad(f"value of type {_name(value.t.data_type)} is not stored by TensorRT")
    if n.op_type == "ConstantOfShape" and "value" in attrs and attrs["value"].t.data_type not in ANY:
        bad(f"value of type {_name(attrs['value'].t.data_type)} is not supported")
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
    attrs = _attrs(n)
    q_type = scope.types.get(n.input[0])
    for i, what in enumerate(("Q", "K", "V")):
        name = n.input[i] if i < len(n.input) else ""
        t, r = scope.types.get(name), scope.rank(name)
        if r is not None and r != 4:
            bad(f"{what} is {r}-D; TensorRT's attention takes 4-D [B, H, S, D] inputs")
        if t and q_type and t != q_type:
            bad(f"{what} is {_name(t)} but Q is {_name(q_type)}")
    k_shape, v_shape = scope.shapes.get(n.input[1]), scope.shapes.get(n.input[2])
    if k_shape and v_shape and len(k_shape) == len(v_shape) and any(
            a is not None and b is not None and a != b for a, b in zip(k_shape, v_shape)):
        bad(f"K {k_shape} and V {v_shape} differ in shape; TensorRT needs them equal")
    if len(n.input) > 3 and n.input[3]:
        m_type, m_rank = scope.types.get(n.input[3]), scope.rank(n.input[3])
        if m_type and m_type != T.BOOL and m_type != q_type:
            bad(f"mask is {_name(m_type)}; TensorRT takes a BOOL mask or one of Q's type "
                f"({_name(q_type) if q_type else '?'})")
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
        if _attrs(n).get("to", onnx.AttributeProto()).i not in FLOATS:
            continue
        frontier, seen = list(n.output), set(n.output)
        while frontier:
            tensor = frontier.pop()
            for c in consumers.get(tensor, ()):
                to_int = c.op_type == "Cast" and _attrs(c).get("to", onnx.AttributeProto()).i not in FLOATS
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


def _graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph in it (If/Loop/Scan bodies, nested)."""
    yield graph
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            for g in a.graphs:
                yield from _graphs(g)


def _nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs."""
    for g in _graphs(graph):
        yield from g.node


def count_inputs(graph: onnx.GraphProto) -> dict[str, str]:
    """Input name -> count key of the graph's count inputs (:mod:`passes.counts`)."""
    inits = {i.name for i in graph.initializer}
    return {vi.name: count_key(vi.name) for vi in graph.input if is_count_input(vi.name) and vi.name not in inits}


def _check_count_inputs(graph: onnx.GraphProto) -> list[Violation]:
    """Rule 10: a count input is a 1-D int64 whose only consumers are ``Shape`` nodes (a shape tensor).

    Any other use reads the input's values: a data dependence TensorRT cannot fold per profile, and
    values the runtime never sets (it feeds zeros of the right length).
    """
    found = []
    names = count_inputs(graph)
    for vi in graph.input:
        if vi.name not in names:
            continue
        tt = vi.type.tensor_type
        if tt.elem_type != T.INT64 or len(tt.shape.dim) != 1:
            found.append(Violation(vi.name, "input", "a count input is a 1-D int64 (passes.graphbuild.count_input)"))
    for n in _nodes(graph):
        for i, name in enumerate(n.input):
            if name in names and n.op_type != "Shape":
                found.append(Violation(n.name or n.output[0], n.op_type,
                                       f"input {i} reads count input {name} as data; a count is only the input's "
                                       f"length: take Shape({name}) (passes.graphbuild.count_value)"))
    for o in graph.output:
        if o.name in names:
            found.append(Violation(o.name, "output", "a count input is returned as an output (data)"))
    return found


class _NotFromShapes(Exception):
    """A value that shapes and constants alone do not determine."""


def _pairwise(fn):
    """``fn`` over broadcast object arrays; None (a dimension the profile leaves open) stays None."""
    return np.frompyfunc(lambda a, b: None if a is None or b is None else fn(a, b), 2, 1)


def _int_div(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return a / b
    if b == 0:
        raise _NotFromShapes("a division by zero")
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q  # ONNX integer Div truncates toward zero


_BINARY = {"Add": _pairwise(lambda a, b: a + b), "Sub": _pairwise(lambda a, b: a - b),
           "Mul": _pairwise(lambda a, b: a * b), "Div": _pairwise(_int_div), "Min": _pairwise(min),
           "Max": _pairwise(max)}


class ShapeValues:
    """The values of shape-only subgraphs of one graph, with the shapes of one optimization profile.

    ``shapes`` maps tensor names to their dims (int, or None where the profile leaves a dimension open:
    batch, prompt length). Values are numpy object arrays of ints (None for an open dimension). A value
    that reads data (a graph input other than through ``Shape``, a weight, an op outside ``SHAPE_OPS``)
    raises :class:`_NotFromShapes` naming it.
    """

    def __init__(self, graph: onnx.GraphProto, shapes: dict[str, list[int | None]]) -> None:
        self.shapes = shapes
        # subgraph (If/Loop body) nodes too: a K inside a branch reads outer-scope shapes by name
        self.producers = {out: n for n in _nodes(graph) for out in n.output}
        self.inits = {i.name: i for g in _graphs(graph) for i in g.initializer}
        self.inputs = {vi.name for g in _graphs(graph) for vi in g.input} - set(self.inits)
        self.memo: dict[str, np.ndarray] = {}

    def value(self, name: str) -> np.ndarray:
        if name not in self.memo:
            self.memo[name] = self._value(name)
        return self.memo[name]

    @staticmethod
    def _obj(arr) -> np.ndarray:
        arr = np.asarray(arr)
        out = np.empty(arr.shape, dtype=object)
        for idx, v in np.ndenumerate(arr):
            out[idx] = v.item() if hasattr(v, "item") else v
        return out

    def _const(self, t: onnx.TensorProto) -> np.ndarray:
        from onnx import numpy_helper

        if t.data_location == T.EXTERNAL:
            raise _NotFromShapes(f"it reads the external initializer {t.name} (a weight)")
        return self._obj(numpy_helper.to_array(t))

    def _value(self, name: str) -> np.ndarray:
        if name in self.inits:
            return self._const(self.inits[name])
        if name in self.inputs:
            raise _NotFromShapes(f"it reads graph input {name} as data")
        n = self.producers.get(name)
        if n is None:
            raise _NotFromShapes(f"{name} has no producer in the graph")
        a = _attrs(n)
        where = f"{n.op_type} {n.name or n.output[0]}"
        if n.op_type not in SHAPE_OPS:
            raise _NotFromShapes(f"it depends on the data output of {where}")
        if n.op_type == "Shape":
            dims = self.shapes.get(n.input[0])
            if dims is None:
                raise _NotFromShapes(f"the shape of {n.input[0]} (read by {where}) is not known statically")
            start = a["start"].i if "start" in a else 0
            end = a["end"].i if "end" in a else len(dims)
            return self._obj(np.array(list(dims), dtype=object)[slice(start, end)])
        if n.op_type == "Constant":
            if "value" in a:
                return self._const(a["value"].t)
            if "value_int" in a:
                return self._obj(np.array(a["value_int"].i))
            if "value_ints" in a:
                return self._obj(np.array(list(a["value_ints"].ints)))
            raise _NotFromShapes(f"{where} holds no integer value")
        ins = [self.value(i) if i else None for i in n.input]
        x = ins[0]
        if n.op_type == "Identity":
            return x
        if n.op_type in _BINARY:
            out = ins[0]
            for y in ins[1:]:
                out = _BINARY[n.op_type](out, y)
            return self._obj(out)
        if n.op_type == "Cast":
            to = a["to"].i
            conv = float if to in FLOATS else (bool if to == T.BOOL else int)
            return self._obj(np.frompyfunc(lambda v: None if v is None else conv(v), 1, 1)(x))
        if n.op_type == "Gather":
            axis = a["axis"].i if "axis" in a else 0
            idx = np.asarray(ins[1], dtype=object)
            if x.ndim != 1 or axis not in (0, -1) or any(v is None for v in idx.reshape(-1)):
                raise _NotFromShapes(f"{where} gathers other than along a 1-D shape value")
            flat = [x[int(i)] for i in idx.reshape(-1)]
            return self._obj(np.array(flat, dtype=object).reshape(idx.shape))
        if n.op_type == "Slice":
            if len(n.input) >= 3:
                starts, ends = ins[1], ins[2]
                axes = ins[3] if len(ins) > 3 and ins[3] is not None else None
                steps = ins[4] if len(ins) > 4 and ins[4] is not None else None
            else:
                starts, ends = list(a["starts"].ints), list(a["ends"].ints)
                axes = list(a["axes"].ints) if "axes" in a else None
                steps = None
            bounds = [np.asarray(v, dtype=object).reshape(-1) for v in (starts, ends)]
            step = int(np.asarray(steps, dtype=object).reshape(-1)[0]) if steps is not None else 1
            if x.ndim != 1 or (axes is not None and int(np.asarray(axes, dtype=object).reshape(-1)[0]) not in (0, -1)) \
                    or any(v is None for b in bounds for v in b):
                raise _NotFromShapes(f"{where} slices other than a 1-D shape value by known bounds")
            lo, hi = (int(max(min(b[0], 2**62), -2**62)) for b in bounds)
            return self._obj(x[slice(lo, hi, step)])
        if n.op_type == "Concat":
            return self._obj(np.concatenate([v for v in ins if v is not None], axis=a["axis"].i if "axis" in a else 0))
        if n.op_type in ("Squeeze", "Unsqueeze"):
            axes = list(a["axes"].ints) if "axes" in a else (
                [int(v) for v in ins[1].reshape(-1)] if len(ins) > 1 and ins[1] is not None else None)
            if n.op_type == "Unsqueeze":
                out = x
                for ax in sorted(axes or []):
                    out = np.expand_dims(out, ax if ax >= 0 else ax + out.ndim + 1)
                return self._obj(out)
            return self._obj(np.squeeze(x, axis=tuple(axes) if axes else None))
        if n.op_type == "Reshape":
            shape = [None if v is None else int(v) for v in ins[1].reshape(-1)]
            if any(v is None for v in shape):
                raise _NotFromShapes(f"{where} reshapes to a shape the profile leaves open")
            allowzero = a["allowzero"].i if "allowzero" in a else 0
            shape = [x.shape[i] if d == 0 and not allowzero else d for i, d in enumerate(shape)]
            return self._obj(x.reshape(shape))
        raise _NotFromShapes(f"{where} is not evaluated")  # pragma: no cover - SHAPE_OPS are all handled


def _profile_shapes(model: onnx.ModelProto, counts: dict[str, int]) -> dict[str, list[int | None]]:
    """Every tensor's dims with the count inputs' lengths fixed to ``counts`` (ONNX shape inference with
    data propagation; dims it cannot fix stay None)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = count_inputs(m.graph)
    for vi in m.graph.input:
        if vi.name in names and names[vi.name] in counts and len(vi.type.tensor_type.shape.dim) == 1:
            vi.type.tensor_type.shape.dim[0].dim_value = int(counts[names[vi.name]])
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - what inference cannot read stays unknown, and K on it is reported
        pass
    shapes: dict[str, list[int | None]] = {}
    for g in _graphs(m.graph):
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape") and vi.name not in shapes:
                shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        for init in g.initializer:
            shapes[init.name] = list(init.dims)
    return shapes


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no counts"


def check_count_profiles(model: onnx.ModelProto, profiles: list[dict[str, int]]) -> list[Violation]:
    """What TensorRT would refuse in an engine with one optimization profile per count vector of ``profiles``.

    (a) every consumer of a count input is a ``Shape`` node (the count is a shape tensor; any data use is a
    violation); (b) per profile, with the count dims fixed, every TopK whose K is not a constant (in If/Loop
    bodies too) evaluates from shapes alone (:class:`ShapeValues`) to at most ``TOPK_MAX_K``: a K read from
    data, or from a dimension the profile leaves open, is refused. Constant K is rule 4 of
    :func:`check_tensorrt`.
    """
    graph = model.graph
    found = _check_count_inputs(graph)
    keys = set(count_inputs(graph).values())
    if keys and not profiles:
        found.append(Violation("(model)", "profile", f"the graph takes counts {', '.join(sorted(keys))} but no "
                                                     "optimization profile gives their values"))
    consts = {i.name for g in _graphs(graph) for i in g.initializer} | {
        n.output[0] for n in _nodes(graph) if n.op_type == "Constant"}
    topks = [n for n in _nodes(graph) if n.op_type == "TopK" and len(n.input) > 1 and n.input[1] not in consts]
    seen: set[Violation] = set(found)
    for index, counts in enumerate(profiles):
        what = f"profile {index} ({_describe(counts)})"
        missing = sorted(keys - set(counts))
        bad_values = sorted(k for k in keys & set(counts) if int(counts[k]) < 0)
        if missing or bad_values:
            reason = (f"gives no value for count {', '.join(missing)}" if missing else
                      f"gives a negative count {', '.join(bad_values)}")
            found.append(Violation("(model)", "profile", f"{what} {reason}"))
            continue
        if not topks:
            continue
        values = ShapeValues(graph, _profile_shapes(model, counts))
        for n in topks:
            where = n.name or n.output[0]
            try:
                k = values.value(n.input[1]).reshape(-1)
            except _NotFromShapes as e:
                v = Violation(where, "TopK", f"K is not computed from shapes: {e} (a data-dependent K); TensorRT "
                                             "takes K as a constant or a shape tensor")
            else:
                if len(k) != 1 or k[0] is None:
                    v = Violation(where, "TopK", f"K cannot be evaluated from shapes in {what}: it depends on a "
                                                 "dimension the profile does not fix (batch or prompt length)")
                elif int(k[0]) > TOPK_MAX_K:
                    v = Violation(where, "TopK", f"K={int(k[0])} in {what} exceeds TensorRT's limit of {TOPK_MAX_K}")
                else:
                    continue
            if v not in seen:
                seen.add(v)
                found.append(v)
    return found


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
