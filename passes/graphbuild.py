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
