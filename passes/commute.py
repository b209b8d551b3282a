"""Move a merge up, and an unmerge down, past the token-wise ops they commute with (docs/design.md).

A merge replaces tokens by convex combinations of tokens (weights summing to 1 per output row), so it
commutes with adding, subtracting, multiplying or dividing by a tensor that is the same for every token:
``merge(x * (1 + scale) + shift) == merge(x) * (1 + scale) + shift``. An unmerge is a Gather of token
rows, so it commutes with any such op. A DiT's adaLN modulation before a sublayer and its gate after it
are exactly these ops; moved inside the merged span, they run on N - r tokens instead of N. The result
equals the unmoved graph up to float rounding, and the graph keeps its op types (TensorRT sees nothing new).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from passes import locate

COMMUTING = ("Mul", "Add", "Sub", "Div")


def _dims(shapes: dict, t: gs.Tensor) -> list | None:
    if isinstance(t, gs.Constant):
        return list(t.values.shape)
    entry = shapes.get(t.name)
    return None if entry is None or entry[1] is None else list(entry[1])


def same_for_every_token(shapes: dict, t: gs.Tensor) -> bool:
    """``t`` broadcasts along the token axis of a ``[B, N, C]`` tensor: rank <= 1, or size 1 on axis -2."""
    dims = _dims(shapes, t)
    return dims is not None and (len(dims) <= 1 or (len(dims) <= 3 and dims[-2] == 1))


def image_like(shapes: dict, t: gs.Tensor, n: int) -> bool:
    return not isinstance(t, gs.Constant) and locate.image_like(shapes, t.name, n)


def _split(node: gs.Node, shapes: dict, n: int) -> tuple[gs.Tensor, gs.Tensor] | None:
    """(token tensor, per-token-constant operand) of a binary commuting op, or None."""
    if node.op not in COMMUTING or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    a, b = node.inputs
    if image_like(shapes, a, n) and same_for_every_token(shapes, b):
        return a, b
    if image_like(shapes, b, n) and same_for_every_token(shapes, a) and node.op != "Div":  # c / x is no average
        return b, a
    return None


def hoist_merge(graph: gs.Graph, x: gs.Variable, inside: set[str], shapes: dict, n: int) -> gs.Variable:
    """The earliest tensor a merge of ``x`` can read instead of ``x``.

    Walks up through commuting ops whose output only ``inside`` nodes read; each op passed joins
    ``inside`` (it will read the merged tensor) and its output loses its stale ``[B, N, C]`` shape.
    """
    while len(x.inputs) == 1 and x not in graph.outputs and all(c.name in inside for c in x.outputs):
        producer = x.inputs[0]
        split = _split(producer, shapes, n)
        if split is None:
            break
        inside.add(producer.name)
        x.shape = None
        x = split[0]
    return x


def sink_unmerge(graph: gs.Graph, y: gs.Variable, inside: set[str], shapes: dict, n: int) -> gs.Variable:
    """The latest tensor an unmerge of ``y`` can restore instead of ``y``: walks down through a chain of
    commuting ops that are ``y``'s only reader outside ``inside``; each joins ``inside``."""
    while y not in graph.outputs:
        readers = [c for c in y.outputs if c.name not in inside]
        if len(readers) != 1:
            break
        split = _split(readers[0], shapes, n)
        out = readers[0].outputs[0] if readers[0].outputs else None
        if split is None or split[0] is not y or out is None or not image_like(shapes, out, n):
            break
        inside.add(readers[0].name)
        y = out
        y.shape = None
    return y
