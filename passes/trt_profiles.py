"""Per optimization profile: the values TensorRT computes from shapes, with the count dims fixed.

A plan's graph takes its token counts as the lengths of count inputs (:mod:`passes.counts`); an engine has one
optimization profile per count vector. Here, on CPU: a count input is read only through ``Shape`` (rule 10 of
:mod:`passes.trt_check`), and per profile every TopK's K evaluates from shapes alone to at most
``TOPK_MAX_K`` (:class:`ShapeValues`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T

from passes.counts import count_key, is_count_input
from passes.trt_limits import FLOATS, SHAPE_OPS, TOPK_MAX_K, Violation, attrs_of, graphs, nodes

def count_inputs(graph: onnx.GraphProto) -> dict[str, str]:
    """Input name -> count key of the graph's count inputs (:mod:`passes.counts`)."""
    inits = {i.name for i in graph.initializer}
    return {vi.name: count_key(vi.name) for vi in graph.input if is_count_input(vi.name) and vi.name not in inits}


def check_count_inputs(graph: onnx.GraphProto) -> list[Violation]:
    """Rule 10: a count input is a 1-D int64 whose only consumers are ``Shape`` nodes (a shape tensor).

    Any other use reads the input's values: a data dependence TensorRT cannot fold per profile, and
    values the runtime never sets (it feeds zeros of the right length).
    """
    found = []
    names = count_inputs(graph)
    for vi in graph.input:
        if vi.name not in names:
            continue
        tt = vi.type.tensor_type
        if tt.elem_type != T.INT64 or len(tt.shape.dim) != 1:
            found.append(Violation(vi.name, "input", "a count input is a 1-D int64 (passes.graphbuild.count_input)"))
    for n in nodes(graph):
        for i, name in enumerate(n.input):
            if name in names and n.op_type != "Shape":
                found.append(Violation(n.name or n.output[0], n.op_type,
                                       f"input {i} reads count input {name} as data; a count is only the input's "
                                       f"length: take Shape({name}) (passes.graphbuild.count_value)"))
    for o in graph.output:
        if o.name in names:
            found.append(Violation(o.name, "output", "a count input is returned as an output (data)"))
    return found


class _NotFromShapes(Exception):
    """A value that shapes and constants alone do not determine."""


def _pairwise(fn):
    """``fn`` over broadcast object arrays; None (a dimension the profile leaves open) stays None."""
    return np.frompyfunc(lambda a, b: None if a is None or b is None else fn(a, b), 2, 1)


def _int_div(a, b):
    if isinstance(a, float) or isinstance(b, float):
        return a / b
    if b == 0:
        raise _NotFromShapes("a division by zero")
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q  # ONNX integer Div truncates toward zero


_BINARY = {"Add": _pairwise(lambda a, b: a + b), "Sub": _pairwise(lambda a, b: a - b),
           "Mul": _pairwise(lambda a, b: a * b), "Div": _pairwise(_int_div), "Min": _pairwise(min),
           "Max": _pairwise(max)}


class ShapeValues:
    """The values of shape-only subgraphs of one graph, with the shapes of one optimization profile.

    ``shapes`` maps tensor names to their dims (int, or None where the profile leaves a dimension open:
    batch, prompt length). Values are numpy object arrays of ints (None for an open dimension). A value
    that reads data (a graph input other than through ``Shape``, a weight, an op outside ``SHAPE_OPS``)
    raises :class:`_NotFromShapes` naming it.
    """

    def __init__(self, graph: onnx.GraphProto, shapes: dict[str, list[int | None]]) -> None:
        self.shapes = shapes
        # subgraph (If/Loop body) nodes too: a K inside a branch reads outer-scope shapes by name
        self.producers = {out: n for n in nodes(graph) for out in n.output}
        self.inits = {i.name: i for g in graphs(graph) for i in g.initializer}
        self.inputs = {vi.name for g in graphs(graph) for vi in g.input} - set(self.inits)
        self.memo: dict[str, np.ndarray] = {}

    def value(self, name: str) -> np.ndarray:
        if name not in self.memo:
            self.memo[name] = self._value(name)
        return self.memo[name]

    @staticmethod
    def _obj(arr) -> np.ndarray:
        arr = np.asarray(arr)
        out = np.empty(arr.shape, dtype=object)
        for idx, v in np.ndenumerate(arr):
            out[idx] = v.item() if hasattr(v, "item") else v
        return out

    def _const(self, t: onnx.TensorProto) -> np.ndarray:
        from onnx import numpy_helper

        if t.data_location == T.EXTERNAL:
            raise _NotFromShapes(f"it reads the external initializer {t.name} (a weight)")
        return self._obj(numpy_helper.to_array(t))

    def _value(self, name: str) -> np.ndarray:
        if name in self.inits:
            return self._const(self.inits[name])
        if name in self.inputs:
            raise _NotFromShapes(f"it reads graph input {name} as data")
        n = self.producers.get(name)
        if n is None:
            raise _NotFromShapes(f"{name} has no producer in the graph")
        a = attrs_of(n)
        where = f"{n.op_type} {n.name or n.output[0]}"
        if n.op_type not in SHAPE_OPS:
            raise _NotFromShapes(f"it depends on the data output of {where}")
        if n.op_type == "Shape":
            dims = self.shapes.get(n.input[0])
            if dims is None:
                raise _NotFromShapes(f"the shape of {n.input[0]} (read by {where}) is not known statically")
            start = a["start"].i if "start" in a else 0
            end = a["end"].i if "end" in a else len(dims)
            return self._obj(np.array(list(dims), dtype=object)[slice(start, end)])
        if n.op_type == "Constant":
            if "value" in a:
                return self._const(a["value"].t)
            if "value_int" in a:
                return self._obj(np.array(a["value_int"].i))
            if "value_ints" in a:
                return self._obj(np.array(list(a["value_ints"].ints)))
            raise _NotFromShapes(f"{where} holds no integer value")
        ins = [self.value(i) if i else None for i in n.input]
        x = ins[0]
        if n.op_type == "Identity":
            return x
        if n.op_type in _BINARY:
            out = ins[0]
            for y in ins[1:]:
                out = _BINARY[n.op_type](out, y)
            return self._obj(out)
        if n.op_type == "Cast":
            to = a["to"].i
            conv = float if to in FLOATS else (bool if to == T.BOOL else int)
            return self._obj(np.frompyfunc(lambda v: None if v is None else conv(v), 1, 1)(x))
        if n.op_type == "Gather":
            axis = a["axis"].i if "axis" in a else 0
            idx = np.asarray(ins[1], dtype=object)
            if x.ndim != 1 or axis not in (0, -1) or any(v is None for v in idx.reshape(-1)):
                raise _NotFromShapes(f"{where} gathers other than along a 1-D shape value")
            flat = [x[int(i)] for i in idx.reshape(-1)]
            return self._obj(np.array(flat, dtype=object).reshape(idx.shape))
        if n.op_type == "Slice":
            if len(n.input) >= 3:
                starts, ends = ins[1], ins[2]
                axes = ins[3] if len(ins) > 3 and ins[3] is not None else None
                steps = ins[4] if len(ins) > 4 and ins[4] is not None else None
            else:
                starts, ends = list(a["starts"].ints), list(a["ends"].ints)
                axes = list(a["axes"].ints) if "axes" in a else None
                steps = None
            bounds = [np.asarray(v, dtype=object).reshape(-1) for v in (starts, ends)]
            step = int(np.asarray(steps, dtype=object).reshape(-1)[0]) if steps is not None else 1
            if x.ndim != 1 or (axes is not None and int(np.asarray(axes, dtype=object).reshape(-1)[0]) not in (0, -1)) \
                    or any(v is None for b in bounds for v in b):
                raise _NotFromShapes(f"{where} slices other than a 1-D shape value by known bounds")
            lo, hi = (int(max(min(b[0], 2**62), -2**62)) for b in bounds)
            return self._obj(x[slice(lo, hi, step)])
        if n.op_type == "Concat":
            return self._obj(np.concatenate([v for v in ins if v is not None], axis=a["axis"].i if "axis" in a else 0))
        if n.op_type in ("Squeeze", "Unsqueeze"):
            axes = list(a["axes"].ints) if "axes" in a else (
                [int(v) for v in ins[1].reshape(-1)] if len(ins) > 1 and ins[1] is not None else None)
            if n.op_type == "Unsqueeze":
                out = x
                for ax in sorted(axes or []):
                    out = np.expand_dims(out, ax if ax >= 0 else ax + out.ndim + 1)
                return self._obj(out)
            return self._obj(np.squeeze(x, axis=tuple(axes) if axes else None))
        if n.op_type == "Reshape":
            shape = [None if v is None else int(v) for v in ins[1].reshape(-1)]
            if any(v is None for v in shape):
                raise _NotFromShapes(f"{where} reshapes to a shape the profile leaves open")
            allowzero = a["allowzero"].i if "allowzero" in a else 0
            shape = [x.shape[i] if d == 0 and not allowzero else d for i, d in enumerate(shape)]
            return self._obj(x.reshape(shape))
        raise _NotFromShapes(f"{where} is not evaluated")  # pragma: no cover - SHAPE_OPS are all handled


def _profile_shapes(model: onnx.ModelProto, counts: dict[str, int]) -> dict[str, list[int | None]]:
    """Every tensor's dims with the count inputs' lengths fixed to ``counts`` (ONNX shape inference with
    data propagation; dims it cannot fix stay None)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names = count_inputs(m.graph)
    for vi in m.graph.input:
        if vi.name in names and names[vi.name] in counts and len(vi.type.tensor_type.shape.dim) == 1:
            vi.type.tensor_type.shape.dim[0].dim_value = int(counts[names[vi.name]])
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - what inference cannot read stays unknown, and K on it is reported
        pass
    shapes: dict[str, list[int | None]] = {}
    for g in graphs(m.graph):
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            tt = vi.type.tensor_type
            if tt.HasField("shape") and vi.name not in shapes:
                shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        for init in g.initializer:
            shapes[init.name] = list(init.dims)
    return shapes


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no counts"


def check_count_profiles(model: onnx.ModelProto, profiles: list[dict[str, int]]) -> list[Violation]:
    """What TensorRT would refuse in an engine with one optimization profile per count vector of ``profiles``.

    (a) every consumer of a count input is a ``Shape`` node (the count is a shape tensor; any data use is a
    violation); (b) per profile, with the count dims fixed, every TopK whose K is not a constant (in If/Loop
    bodies too) evaluates from shapes alone (:class:`ShapeValues`) to at most ``TOPK_MAX_K``: a K read from
    data, or from a dimension the profile leaves open, is refused. Constant K is rule 4 of
    :func:`check_tensorrt`.
    """
    graph = model.graph
    found = check_count_inputs(graph)
    keys = set(count_inputs(graph).values())
    if keys and not profiles:
        found.append(Violation("(model)", "profile", f"the graph takes counts {', '.join(sorted(keys))} but no "
                                                     "optimization profile gives their values"))
    consts = {i.name for g in graphs(graph) for i in g.initializer} | {
        n.output[0] for n in nodes(graph) if n.op_type == "Constant"}
    topks = [n for n in nodes(graph) if n.op_type == "TopK" and len(n.input) > 1 and n.input[1] not in consts]
    seen: set[Violation] = set(found)
    for index, counts in enumerate(profiles):
        what = f"profile {index} ({_describe(counts)})"
        missing = sorted(keys - set(counts))
        bad_values = sorted(k for k in keys & set(counts) if int(counts[k]) < 0)
        if missing or bad_values:
            reason = (f"gives no value for count {', '.join(missing)}" if missing else
                      f"gives a negative count {', '.join(bad_values)}")
            found.append(Violation("(model)", "profile", f"{what} {reason}"))
            continue
        if not topks:
            continue
        values = ShapeValues(graph, _profile_shapes(model, counts))
        for n in topks:
            where = n.name or n.output[0]
            try:
                k = values.value(n.input[1]).reshape(-1)
            except _NotFromShapes as e:
                v = Violation(where, "TopK", f"K is not computed from shapes: {e} (a data-dependent K); TensorRT "
                                             "takes K as a constant or a shape tensor")
            else:
                if len(k) != 1 or k[0] is None:
                    v = Violation(where, "TopK", f"K cannot be evaluated from shapes in {what}: it depends on a "
                                                 "dimension the profile does not fix (batch or prompt length)")
                elif int(k[0]) > TOPK_MAX_K:
                    v = Violation(where, "TopK", f"K={int(k[0])} in {what} exceeds TensorRT's limit of {TOPK_MAX_K}")
                else:
                    continue
            if v not in seen:
                seen.add(v)
                found.append(v)
    return found
