"""Cleanup passes: fix what the exporter writes that breaks merging or onnxruntime."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from passes.infra import GraphPass, PassResult
from passes.onnxutil import constant_value, infer_shapes, tensor_shapes

logger = logging.getLogger(__name__)


class FreeTokenAxisPass(GraphPass):
    """Make every shape on the token axis follow the data, so merged graphs stay correct.

    With a dynamic batch the exporter writes reshapes as ``[-1, S, *rest]``: -1 on the batch axis and
    the sequence length S baked in. Once tokens are merged such a reshape silently folds tokens into
    the batch. Reshapes that keep the batch and sequence axes become ``Concat(Shape(x)[0:2], rest)``
    (a literal 0 next to -1 defeats ONNX shape inference). MMDiT joint attention also splits the
    ``[image; text]`` sequence with slices at the image count N: ``[0:N]`` becomes ``[0:-L]`` and
    ``[N:]`` becomes ``[-L:]``, with L the (fixed) text length. Exact on the unmerged graph; TensorRT
    takes the shapes as shape tensors.
    """

    name = "free-token-axis"

    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens

    def call(self, model: onnx.ModelProto) -> PassResult:
        shapes = tensor_shapes(infer_shapes(model))
        model = onnx.ModelProto.FromString(model.SerializeToString())
        nodes: list[onnx.NodeProto] = []
        reshapes = slices = 0
        self._modules: dict[str, list[onnx.NodeProto]] | None = None
        self._topo = None
        self._after: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            dims = shapes.get(node.input[0], (0, []))[1] if node.input else []
            if node.op_type == "Reshape" and self._frees_reshape(model, node, dims):
                nodes.extend(self._shape_from_input(model, node))
                reshapes += 1
            elif node.op_type == "Reshape" and self._frees_computed_reshape(model, node, dims, shapes):
                nodes.extend(self._shape_from_input(model, node, shapes[node.output[0]][1][2:]))
                reshapes += 1
            elif node.op_type == "Slice" and self._frees_split(model, node, dims, nodes, shapes):
                slices += 1
            nodes.append(node)
            nodes.extend(self._after.pop(node.name, []))
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        if reshapes or slices:
            logger.debug("free-token-axis: %d reshapes and %d joint-sequence slices follow the token count",
                        reshapes, slices)
        return PassResult(model, bool(reshapes or slices))

    @staticmethod
    def _frees_reshape(model: onnx.ModelProto, node: onnx.NodeProto, dims: list) -> bool:
        shape = constant_value(model, node.input[1])
        return (shape is not None and shape.ndim == 1 and len(shape) >= 2 and len(dims) >= 2 and shape[0] == -1
                and isinstance(dims[0], str) and isinstance(dims[1], int) and shape[1] == dims[1])

    @staticmethod
    def _frees_computed_reshape(model: onnx.ModelProto, node: onnx.NodeProto, dims: list, shapes: dict) -> bool:
        """A reshape ``[B, S, *a] -> [B, S, *b]`` whose shape is computed (a dynamic prompt length in S).

        With ``a`` and ``b`` static and of equal size, S is kept, so ``Shape(x)[0:2]`` is exact.
        """
        if constant_value(model, node.input[1]) is not None or node.input[1].endswith("_free_dims"):
            return False  # constant (see _frees_reshape), or freed by an earlier run of this pass
        out = shapes.get(node.output[0], (0, []))[1]
        if len(dims) < 3 or len(out) < 3 or not isinstance(dims[0], str) or dims[0] != out[0]:
            return False
        rest_in, rest_out = dims[2:], out[2:]
        if not all(isinstance(d, int) for d in rest_in + rest_out):
            return False
        return int(np.prod(rest_in)) == int(np.prod(rest_out))

    @staticmethod
    def _shape_from_input(model: onnx.ModelProto, node: onnx.NodeProto, rest_dims: list | None = None
                          ) -> list[onnx.NodeProto]:
        shape = constant_value(model, node.input[1]) if rest_dims is None else np.array([0, 0, *rest_dims])
        base = f"{node.name}_free"
        rest = numpy_helper.from_array(shape[2:].astype(np.int64), base + "_rest")
        model.graph.initializer.append(rest)
        extra = [onnx.helper.make_node("Shape", [node.input[0]], [base + "_batch"], name=base + "_shape", start=0, end=2),
                 onnx.helper.make_node("Concat", [base + "_batch", rest.name], [base + "_dims"], name=base + "_concat",
                                       axis=0)]
        for p in node.metadata_props:
            for e in extra:
                e.metadata_props.add(key=p.key, value=p.value)
        node.input[1] = base + "_dims"
        return extra

    def _frees_split(self, model: onnx.ModelProto, node: onnx.NodeProto, dims: list, nodes: list[onnx.NodeProto],
                     shapes: dict) -> bool:
        """Rewrite an image/text split of a joint ``[B, N + L, C]`` sequence to follow the token count.

        A static L: count from the end. A dynamic prompt length: the split point is read at run time from
        the attention module's image input (``Shape(x)[1]``), which a merge pass then rewires to the merged
        tokens like every other reader of that input inside the module.
        """
        n = self.num_tokens
        if len(node.input) < 4 or len(dims) != 3:
            return False
        dynamic = isinstance(dims[1], str)
        if not dynamic and not (isinstance(dims[1], int) and dims[1] > n):
            return False
        start, end, axes = (constant_value(model, node.input[i]) for i in (1, 2, 3))
        steps = constant_value(model, node.input[4]) if len(node.input) > 4 and node.input[4] else None
        if any(v is None or v.size != 1 for v in (start, end, axes)) or (steps is not None and int(steps[0]) != 1):
            return False
        if int(axes[0]) not in (1, -2):
            return False
        s, e = int(start[0]), int(end[0])
        if dynamic:
            if not ((s, e) == (0, n) or (s == n and e >= np.iinfo(np.int64).max // 2)):
                return False
            image = self._module_image_input(model, node, shapes)
            if image is None:
                return False
            base = f"{node.name}_free"
            count = base + "_count"
            before = [onnx.helper.make_node("Shape", [image], [count], name=base + "_shape", start=1, end=2)]
            node.input[2 if s == 0 else 1] = count
            after = []
            if s == 0:
                # the image part: a reshape to [B, Shape(image)[1], C] lets shape inference see the token
                # count (it propagates shape data through Reshape, not through Slice's ends)
                out = node.output[0]
                node.output[0] = base + "_sliced"
                after = [
                    onnx.helper.make_node("Shape", [node.input[0]], [base + "_b"], name=base + "_shape_b", start=0, end=1),
                    onnx.helper.make_node("Shape", [node.input[0]], [base + "_c"], name=base + "_shape_c", start=2, end=3),
                    onnx.helper.make_node("Concat", [base + "_b", count, base + "_c"], [base + "_dims"],
                                          name=base + "_concat", axis=0),
                    onnx.helper.make_node("Reshape", [base + "_sliced", base + "_dims"], [out], name=base + "_reshape")]
            for e in before + after:
                for p in node.metadata_props:
                    e.metadata_props.add(key=p.key, value=p.value)
            nodes.extend(before)
            self._after[node.name] = after
            return True
        text = dims[1] - n
        if (s, e) == (0, n):
            new = (0, -text)
        elif s == n and e >= dims[1]:
            new = (-text, np.iinfo(np.int64).max)
        else:
            return False
        for i, v in zip((1, 2), new):
            init = numpy_helper.from_array(np.array([v], dtype=np.int64), f"{node.name}_free_{i}")
            model.graph.initializer.append(init)
            node.input[i] = init.name
        return True


    def _module_image_input(self, model: onnx.ModelProto, node: onnx.NodeProto, shapes: dict) -> str | None:
        """The one ``[B, N, C]`` tensor the attention module around ``node`` reads from outside it."""
        from passes.locate import _MODULE_RE, Topology, _node_scopes

        if self._modules is None:
            self._modules = {}
            for nd in model.graph.node:
                for scope in _node_scopes(nd)[0]:
                    if _MODULE_RE.search(scope):
                        self._modules.setdefault(scope, []).append(nd)
            self._topo = Topology.of(model, self.num_tokens)
            self._topo.shapes = shapes
        scopes = [sc for sc in _node_scopes(node)[0] if _MODULE_RE.search(sc)]
        if not scopes:
            return None
        ins, _ = self._topo.boundary(self._modules[scopes[-1]])
        image = [t for t in ins if self._topo.image_like(t)]
        return image[0] if len(image) == 1 else None


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
            logger.debug("remove-noop-squeeze: removed %d squeezes of non-unit axes", len(drop))
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
