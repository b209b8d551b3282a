"""Static proof on CPU that a graph is within what TensorRT's ONNX parser parses and builds.

Supported range: TensorRT >= 10.15 (``Attention`` parses from 10.14, ``RMSNormalization`` and
``RotaryEmbedding`` from 10.15, per NVIDIA's TensorRT and onnx-tensorrt changelogs), opsets up to 23.
The op list, the per-op type sets and the restrictions follow onnx-tensorrt's ``docs/operators.md``
(TensorRT 10 matrix); the ``Attention`` rules follow TensorRT's IAttention operator page. A violation
names the node and the reason; an empty list means the graph passes. The rules, in order:

1. opset at most 23; no custom domains; no data-dependent output shapes; only parsed ops;
2. inputs onnx-tensorrt needs as initializers are constants (Slice/Squeeze/Unsqueeze/Reduce* axes, TopK K, ...);
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
9. graph inputs, outputs and intermediate tensors of TensorRT types; only the batch axis of an input dynamic.
"""

from __future__ import annotations

import dataclasses

import onnx
from onnx import TensorProto as T

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
                   "TopK": (1,), "CumSum": (1,)}
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


def assert_tensorrt_ready(model: onnx.ModelProto, what: str = "graph") -> None:
    found = check_tensorrt(model)
    if found:
        lines = "\n  ".join(str(v) for v in found[:20])
        more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
        raise DitmergeError(f"{what} would not build with TensorRT >= {TENSORRT_MIN_VERSION}:\n  {lines}{more}")
