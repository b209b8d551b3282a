"""A small emitter over onnx-graphsurgeon: named nodes, constants, and a record of what was inserted."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


class Emitter:
    """Appends nodes to a gs.Graph under a name prefix and remembers their names (for provenance)."""

    def __init__(self, graph: gs.Graph, prefix: str) -> None:
        self.graph = graph
        self.prefix = prefix
        self.inserted: list[str] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def const(self, hint: str, value: np.ndarray | int | float | list) -> gs.Constant:
        return gs.Constant(self._name(hint), np.asarray(value))

    def ints(self, hint: str, values: list[int] | int) -> gs.Constant:
        return gs.Constant(self._name(hint), np.asarray(values, dtype=np.int64))

    def op(self, op: str, inputs: list, attrs: dict | None = None, num_outputs: int = 1, hint: str | None = None):
        """Emit one node; returns its output Variable (or a list when ``num_outputs > 1``)."""
        name = self._name(hint or op)
        outputs = [gs.Variable(f"{name}:{i}") for i in range(num_outputs)]
        node = gs.Node(op=op, name=name, attrs=attrs or {}, inputs=list(inputs), outputs=outputs)
        self.graph.nodes.append(node)
        self.inserted.append(name)
        return outputs[0] if num_outputs == 1 else outputs


def inverse_permutation(em: Emitter, order: gs.Variable, size: int, axis: int) -> gs.Variable:
    """``rank`` with ``rank[..., order[..., i]] = i`` along ``axis`` (of length ``size``), all in int64.

    A ScatterElements (no reduction; a native TensorRT layer) of ``0..size-1`` into the positions
    ``order`` names. The data operand is ``order`` itself: it is a permutation, so every element is
    overwritten. Indices never pass through floating point, where fp16 loses integers above 2048.
    """
    shape = [1] * axis + [size]
    iota = em.op("Expand", [em.ints("iota", np.arange(size, dtype=np.int64).reshape(shape)), em.op("Shape", [order])])
    return em.op("ScatterElements", [order, order, iota], {"axis": axis}, hint="rank")


# Emitter hint prefix of nodes a reduced-precision TensorRT build must keep in fp32 (export/trt_build.py)
PIN_FP32 = "fp32."


def unit_rows(em: Emitter, x: gs.Variable, eps: float) -> gs.Variable:
    """``x / max(||x||, eps)`` along the last axis, safe in fp16 and bf16.

    The row is first divided by its largest magnitude (floored at ``eps``), so every square is at most
    1 and the sum at most the channel count: ``x * x`` of hidden states near 1e3 would overflow fp16
    (max 65504). Cosine similarity is scale-invariant, so the result equals the plain normalisation
    except for rows whose largest magnitude is below ``eps``.
    """
    amax = em.op("ReduceMax", [em.op("Abs", [x]), em.ints("axis", [-1])], {"keepdims": 1})
    xs = em.op("Div", [x, em.op("Max", [amax, em.const("eps", np.float32(eps))])], hint="scaled")
    norm = em.op("Sqrt", [em.op("ReduceSum", [em.op("Mul", [xs, xs]), em.ints("axis", [-1])], {"keepdims": 1})])
    return em.op("Div", [xs, em.op("Max", [norm, em.const("eps", np.float32(eps))])], hint="metric")


def count_input(graph: gs.Graph, key: str) -> gs.Variable:
    """The graph input that carries count ``key`` by its length (:mod:`passes.counts`); added once."""
    from passes.counts import count_input_name

    name = count_input_name(key)
    for t in graph.inputs:
        if t.name == name:
            return t
    var = gs.Variable(name, dtype=np.int64, shape=[key])
    graph.inputs.append(var)
    return var


def count_value(em: Emitter, count: gs.Variable) -> gs.Variable:
    """The count as an int64 tensor of shape [1]: the length of its input, a shape tensor on TensorRT."""
    return em.op("Shape", [count], hint="count_of")
