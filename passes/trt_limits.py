"""What TensorRT's ONNX parser accepts, as data: limits, the op list, per-op type rules, and graph walkers.

The one source of TensorRT facts in the project (TopK's K limit among them): the static check
(:mod:`passes.trt_check`, :mod:`passes.trt_profiles`) and the passes that must stay within the limits import
them from here. The tables follow onnx-tensorrt's ``docs/operators.md`` (TensorRT 10 matrix).
"""

from __future__ import annotations

import dataclasses

import onnx
from onnx import TensorProto as T


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


def type_name(t: int) -> str:
    return T.DataType.Name(t)


@dataclasses.dataclass(frozen=True)
class Violation:
    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op} {self.node}: {self.reason}"


def attrs_of(n: onnx.NodeProto) -> dict[str, onnx.AttributeProto]:
    return {a.name: a for a in n.attribute}


def graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph in it (If/Loop/Scan bodies, nested)."""
    yield graph
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from graphs(a.g)
            for g in a.graphs:
                yield from graphs(g)


def nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs."""
    for g in graphs(graph):
        yield from g.node
