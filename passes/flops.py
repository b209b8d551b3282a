"""FLOPs of a graph, counted from its shapes (batch 1): the matrix work that dominates a DiT."""

from __future__ import annotations

import math

import onnx

from passes.locate import tensor_shapes
from passes.onnxutil import infer_shapes


def _dims(shapes, name) -> list[int] | None:
    dims = shapes.get(name, (0, None))[1]
    if dims is None or not dims and name not in shapes:
        return None
    return [d if isinstance(d, int) else 1 for d in dims]  # symbolic dims (the batch) count as 1


def count_flops(model: onnx.ModelProto, counts: dict[str, int] | None = None) -> int:
    """2 * multiply-adds of MatMul, Gemm, Conv and Attention nodes.

    ``counts``: the values of the graph's count inputs (passes/counts.py); their lengths are fixed before
    shapes are inferred, so token counts that follow from them are static.
    """
    if counts:
        from passes.counts import count_input_name

        model = onnx.ModelProto.FromString(model.SerializeToString())
        fixed = {count_input_name(k): int(v) for k, v in counts.items()}
        for vi in model.graph.input:
            if vi.name in fixed:
                vi.type.tensor_type.shape.dim[0].dim_value = fixed[vi.name]
    if any(n.op_type in ("If", "Loop") for n in model.graph.node):
        raise ValueError("count_flops counts graphs without If/Loop: count each branch's graph before joining")
    shapes = tensor_shapes(infer_shapes(model))
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
