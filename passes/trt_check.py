"""Static proof on CPU that a graph is within what TensorRT's ONNX parser parses and builds.

Supported range: TensorRT >= 10.15 (``Attention`` parses from 10.14, ``RMSNormalization`` and
``RotaryEmbedding`` from 10.15, per NVIDIA's TensorRT and onnx-tensorrt changelogs), opsets up to 23.
The op list and restrictions follow onnx-tensorrt's ``docs/operators.md`` (TensorRT 10 matrix).
A violation names the node and the reason; an empty list means the graph passes.
"""

from __future__ import annotations

import dataclasses

import onnx

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
ALLOWED_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT32,
                 onnx.TensorProto.INT64, onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.BOOL,
                 onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.INT4}


@dataclasses.dataclass(frozen=True)
class Violation:
    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op} {self.node}: {self.reason}"


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto | None]:
    out: dict[str, onnx.TensorProto | None] = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            out[n.output[0]] = value
    return out


def check_tensorrt(model: onnx.ModelProto) -> list[Violation]:
    """Every reason TensorRT >= 10.15 would refuse to parse or build ``model`` that a CPU can see."""
    from onnx import numpy_helper

    found: list[Violation] = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > MAX_OPSET:
            found.append(Violation("(model)", "opset", f"opset {imp.version} is above the supported {MAX_OPSET}"))
    consts = _constants(model)
    for n in model.graph.node:
        where = n.name or n.output[0]
        if n.domain not in ("", "ai.onnx"):
            found.append(Violation(where, n.op_type, f"custom domain {n.domain!r} needs a TensorRT plugin"))
            continue
        if n.op_type in DATA_DEPENDENT:
            found.append(Violation(where, n.op_type, "output shape depends on the data"))
        elif n.op_type not in SUPPORTED_OPS:
            found.append(Violation(where, n.op_type, "not supported by TensorRT's ONNX parser"))
        for i in CONSTANT_INPUTS.get(n.op_type, ()):
            if i < len(n.input) and n.input[i] and n.input[i] not in consts:
                found.append(Violation(where, n.op_type, f"input {i} ({n.input[i]}) must be a constant"))
        attrs = {a.name: a for a in n.attribute}
        if n.op_type == "TopK":
            k = consts.get(n.input[1]) if len(n.input) > 1 else None
            if k is not None and k.data_location != onnx.TensorProto.EXTERNAL:
                kv = int(numpy_helper.to_array(k).reshape(-1)[0])
                if kv > TOPK_MAX_K:
                    found.append(Violation(where, n.op_type, f"K={kv} exceeds TensorRT's limit of {TOPK_MAX_K}"))
            if "sorted" in attrs and attrs["sorted"].i != 1:
                found.append(Violation(where, n.op_type, "sorted must be 1"))
        if n.op_type in ("ScatterElements", "ScatterND") and "reduction" in attrs:
            red = attrs["reduction"].s.decode()
            if red != "none":
                found.append(Violation(where, n.op_type, f"reduction={red!r} (no TensorRT layer; a plugin without BF16)"))
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        t = vi.type.tensor_type.elem_type
        if t and t not in ALLOWED_TYPES:
            found.append(Violation(vi.name, "tensor", f"element type {onnx.TensorProto.DataType.Name(t)} is not a TensorRT type"))
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        for axis, d in enumerate(dims):
            if axis > 0 and not d.HasField("dim_value") and d.dim_param != "text":  # prompt length: a profile range
                found.append(Violation(vi.name, "input", f"axis {axis} is dynamic ({d.dim_param or '?'}); only the "
                                                         "batch axis may be, so every bucket's token count is static"))
    return found


def assert_tensorrt_ready(model: onnx.ModelProto, what: str = "graph") -> None:
    found = check_tensorrt(model)
    if found:
        lines = "\n  ".join(str(v) for v in found[:20])
        more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
        raise DitmergeError(f"{what} would not build with TensorRT >= {TENSORRT_MIN_VERSION}:\n  {lines}{more}")
