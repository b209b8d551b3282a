"""Cleanup passes: fix what the exporter writes that breaks merging or onnxruntime."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from passes.infra import GraphPass, PassResult
from passes.locate import tensor_shapes
from passes.onnxutil import infer_shapes

logger = logging.getLogger(__name__)


def constant_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of a small inline initializer or Constant node output; None otherwise."""
    for init in model.graph.initializer:
        if init.name == name:
            return None if init.data_location == onnx.TensorProto.EXTERNAL else numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


class FreeTokenAxisPass(GraphPass):
    """Rewrite reshapes ``[-1, N, *rest]`` of a ``[batch, N, ...]`` tensor to ``Shape(x)[0:2] + rest``.

    With a dynamic batch the exporter puts -1 on the batch axis and bakes the token count N into the
    shape; once tokens are merged such a reshape silently folds tokens into the batch. These reshapes
    keep the batch and token axes, so the new shape reads both from the input (a literal 0 next to -1
    defeats ONNX shape inference). Exact on the unmerged graph; TensorRT takes it as a shape tensor.
    """

    name = "free-token-axis"

    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens

    def call(self, model: onnx.ModelProto) -> PassResult:
        shapes = tensor_shapes(infer_shapes(model))
        model = onnx.ModelProto.FromString(model.SerializeToString())
        nodes: list[onnx.NodeProto] = []
        count = 0
        for node in model.graph.node:
            shape = constant_value(model, node.input[1]) if node.op_type == "Reshape" else None
            dims = shapes.get(node.input[0], (0, []))[1] if shape is not None else []
            if (shape is not None and shape.ndim == 1 and len(shape) >= 2 and len(dims) >= 2 and shape[0] == -1
                    and shape[1] == self.num_tokens and isinstance(dims[0], str) and dims[1] == self.num_tokens):
                # shape = Concat(Shape(x)[0:2], rest): batch and token axes come from the input
                base = f"{node.name}_free"
                rest = numpy_helper.from_array(shape[2:].astype(np.int64), base + "_rest")
                model.graph.initializer.append(rest)
                nodes.append(onnx.helper.make_node("Shape", [node.input[0]], [base + "_batch"], name=base + "_shape",
                                                   start=0, end=2))
                nodes.append(onnx.helper.make_node("Concat", [base + "_batch", rest.name], [base + "_dims"],
                                                   name=base + "_concat", axis=0))
                for p in node.metadata_props:
                    for extra in nodes[-2:]:
                        extra.metadata_props.add(key=p.key, value=p.value)
                node.input[1] = base + "_dims"
                count += 1
            nodes.append(node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        if count:
            logger.info("free-token-axis: %d reshapes no longer bake %d tokens", count, self.num_tokens)
        return PassResult(model, count > 0)


class RemoveNoopSqueezePass(GraphPass):
    """Drop Squeeze nodes whose axes are not of size 1 (torch's ``squeeze(1)`` no-op; PixArt).

    onnxruntime rejects such a Squeeze, torch treats it as identity.
    """

    name = "remove-noop-squeeze"

    def call(self, model: onnx.ModelProto) -> PassResult:
        shapes = tensor_shapes(infer_shapes_lenient(model))
        model = onnx.ModelProto.FromString(model.SerializeToString())
        drop = []
        for node in model.graph.node:
            if node.op_type != "Squeeze" or len(node.input) < 2:
                continue
            axes = constant_value(model, node.input[1])
            dims = shapes.get(node.input[0], (0, []))[1]
            if axes is None or not dims:
                continue
            sizes = [dims[int(a)] for a in np.atleast_1d(axes)]
            if all(isinstance(s, int) and s != 1 for s in sizes):
                drop.append(node)
        for node in drop:
            _bypass(model, node)
        if drop:
            logger.info("remove-noop-squeeze: removed %d squeezes of non-unit axes", len(drop))
        return PassResult(model, bool(drop))


def infer_shapes_lenient(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto.FromString(model.SerializeToString())
    del m.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)


def _bypass(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    """Remove a single-input-passthrough node, wiring its consumers to its input."""
    src, dst = node.input[0], node.output[0]
    model.graph.node.remove(node)
    for n in model.graph.node:
        for i, t in enumerate(n.input):
            if t == dst:
                n.input[i] = src
    for o in model.graph.output:
        if o.name == dst:
            # keep the graph output name: route through Identity
            model.graph.node.append(onnx.helper.make_node("Identity", [src], [dst], name=node.name + "_identity"))
