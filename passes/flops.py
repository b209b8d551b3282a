"""FLOPs of a graph, counted from its shapes (batch 1): the matrix work that dominates a DiT."""

from __future__ import annotations

import logging
import math

import onnx
import onnx_graphsurgeon as gs

from passes.locate import tensor_shapes
from passes.onnxutil import infer_shapes

logger = logging.getLogger(__name__)
_FOLD_MAX_ELEMENTS = 1 << 16  # int64 constants up to this size are shape arithmetic, folded


def _dims(shapes, name) -> list[int] | None:
    dims = shapes.get(name, (0, None))[1]
    if dims is None or not dims and name not in shapes:
        return None
    return [d if isinstance(d, int) else 1 for d in dims]  # symbolic dims (the batch) count as 1


def _with_counts(model: onnx.ModelProto, counts: dict[str, int] | None) -> onnx.ModelProto:
    """A copy of ``model`` whose count inputs have their lengths as static shapes."""
    from passes.counts import count_input_name

    m = onnx.ModelProto.FromString(model.SerializeToString())
    fixed = {count_input_name(k): int(v) for k, v in (counts or {}).items()}
    for vi in m.graph.input:
        if vi.name in fixed:
            vi.type.tensor_type.shape.dim[0].Clear()
            vi.type.tensor_type.shape.dim[0].dim_value = fixed[vi.name]
    return m


def static_shapes(model: onnx.ModelProto, counts: dict[str, int] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with each count input (passes/counts.py) at its length and the shape arithmetic
    folded, so lengths that follow from the counts are static (the batch and a prompt axis stay symbolic).

    ONNX's shape inference leaves a length symbolic where it comes from a computed value: the r of a graph
    that takes r from its count input reaches the merge's one-hot MatMul as Slice ends, the tokens SDTM and
    AT-EDM keep a MatMul's rows, and those dims counted as 1 (the FLOP-ideal speed-up of ToMe at 1024
    tokens, ratio 0.7, came out 8 % too high, SDTM's 90x). Folding with static inputs turns such lengths
    into constants. The weights become inputs of their shape first, so nothing reads them.
    """
    m = _with_counts(model, counts)
    small = []
    for init in m.graph.initializer:
        if (init.data_type == onnx.TensorProto.INT64 and not init.external_data
                and math.prod(init.dims) <= _FOLD_MAX_ELEMENTS):
            small.append(init)  # shape arithmetic: kept, folded
        else:
            m.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    del m.graph.initializer[:]
    m.graph.initializer.extend(small)
    graph = gs.import_onnx(m)
    severity = gs.logger.G_LOGGER.severity
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    try:
        graph.fold_constants(fold_shapes=True, error_ok=True, size_threshold=_FOLD_MAX_ELEMENTS * 8)
    finally:
        gs.logger.G_LOGGER.severity = severity
    return gs.export_onnx(graph.cleanup())


def count_flops(model: onnx.ModelProto, counts: dict[str, int] | None = None) -> int:
    """2 * multiply-adds of MatMul, Gemm, Conv and Attention nodes, at batch 1.

    ``counts``: the values of the graph's count inputs (passes/counts.py); their lengths are fixed and the
    shape arithmetic folded (:func:`static_shapes`) before shapes are inferred, so token counts that
    follow from them are static.
    """
    if any(n.op_type in ("If", "Loop") for n in model.graph.node):
        raise ValueError("count_flops counts graphs without If/Loop: count each branch's graph before joining")
    try:
        model = infer_shapes(static_shapes(model, counts))
    except onnx.shape_inference.InferenceError as e:  # counted unfolded: lengths computed from counts count 1
        logger.warning("FLOPs counted without folding the shape arithmetic (%s)", str(e).splitlines()[0])
        model = infer_shapes(_with_counts(model, counts))
    shapes = tensor_shapes(model)
    total = 0
    for n in model.graph.node:
        out = _dims(shapes, n.output[0]) if n.output else None
        if n.op_type == "MatMul":
            a = _dims(shapes, n.input[0])
            if out and a:
                total += 2 * math.prod(out) * a[-1]
        elif n.op_type == "Gemm":
            a = _dims(shapes, n.input[0])
            trans_a = next((x.i for x in n.attribute if x.name == "transA"), 0)
            if out and a:
                total += 2 * math.prod(out) * (a[0] if trans_a else a[-1])
        elif n.op_type == "Conv":
            w = _dims(shapes, n.input[1])
            if out and w:
                total += 2 * math.prod(out) * math.prod(w[1:])
        elif n.op_type == "Attention":
            q, k, v = (_dims(shapes, n.input[i]) for i in range(3))
            if q and k and v and len(q) == 4:
                b, h, sq, d = q
                sk, dv = k[2], v[3]
                total += 2 * b * h * sq * sk * (d + dv)
            elif q and k and v and len(q) == 3:  # [B, S, heads * D]: the heads fold into the hidden size
                total += 2 * q[0] * q[1] * k[1] * (q[2] + v[2])
    return total
