"""One graph for a plan's steps of different topology: ``If`` nodes on the length of a count input.

A bucket is a shape (docs/design.md), and so is the choice of what a step runs:
- :func:`branch_on_zero` joins the plain graph and ToMe's merged graph: ``If(r == 0)`` runs the plain
  nodes (the merged graph at r = 0 would still pay the matching and the merge copies, about 5 % of a
  DiT-XL/2 forward on onnxruntime CPU);
- :func:`branch_variants` joins a method's variants (the cache method's full and cached steps, CA-ToMe's
  match and apply): the length of ``ditmerge_count_variant`` is the index of the variant that runs.

The condition is the length of a count input, so it is static within a TensorRT profile. Every branch
reads the same outer-scope weights, so one session (one engine) holds them once: on onnxruntime CPU a
session over a ToMe plan's branched graph held 1.02x the memory of one unmerged model, two sessions 1.44x.
Every branch produces every output of the joined graph: an output a variant does not compute is zeros of
its shape. The graph's ``ditmerge.branch`` metadata says, per variant, which inputs it reads and which
outputs are its own; the runtime feeds zeros for the others and passes on only the variant's outputs.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
from onnx import helper

from passes.counts import count_input_name
from passes.errors import DitmergeError
from passes.onnxutil import get_model_meta, set_model_meta

logger = logging.getLogger(__name__)

VARIANT_COUNT = "variant"  # count key whose length selects the variant of a branched graph


def branch_on_zero(plain: onnx.ModelProto, merged: onnx.ModelProto, key: str) -> onnx.ModelProto:
    """``merged`` with an ``If``: when count ``key`` is 0 the nodes of ``plain`` run instead of the merge.

    ``merged`` must be derived from ``plain`` (same outputs, the same weights); the metadata is ``merged``'s.
    """
    count = count_input_name(key)
    if count not in {i.name for i in merged.graph.input}:
        raise DitmergeError(f"the merged graph has no count input {count!r}")
    return _join([("plain", plain), ("merged", merged)], count, merged, record=False)


def branch_variants(variants: dict[str, onnx.ModelProto]) -> onnx.ModelProto:
    """One graph running ``variants[v]`` when the length of ``ditmerge_count_variant`` is v's index.

    The variants must come from one exported graph (equal initializers by name); the metadata is the first
    variant's, plus ``ditmerge.branch``.
    """
    if len(variants) < 2:
        raise DitmergeError("branch_variants needs two variants or more")
    items = list(variants.items())
    return _join(items, count_input_name(VARIANT_COUNT), items[0][1], record=True)


def branch_info(model: onnx.ModelProto) -> dict | None:
    """The ``ditmerge.branch`` metadata of a branched graph, or None."""
    text = get_model_meta(model).get("branch")
    return json.loads(text) if text else None


def _join(items: list[tuple[str, onnx.ModelProto]], count: str, meta_from: onnx.ModelProto,
          record: bool) -> onnx.ModelProto:
    inputs: dict[str, onnx.ValueInfoProto] = {}
    outputs: dict[str, onnx.ValueInfoProto] = {}
    inits: dict[str, onnx.TensorProto] = {}
    renamed: dict[str, dict[str, str]] = {}  # per branch: its small constants whose name another branch uses
    for tag, m in items:
        names = {i.name for i in m.graph.initializer}
        for vi in m.graph.input:
            if vi.name not in names:
                inputs.setdefault(vi.name, vi)
        for vi in m.graph.output:
            outputs.setdefault(vi.name, vi)
        for init in m.graph.initializer:
            other = inits.setdefault(init.name, init)
            if other is init or other.SerializeToString() == init.SerializeToString():
                continue
            if init.data_location == onnx.TensorProto.EXTERNAL or other.data_location == onnx.TensorProto.EXTERNAL:
                raise DitmergeError(f"weight {init.name!r} differs between the graphs; branch only graphs derived "
                                    "from one exported graph")
            # a constant a pass inserted (its name comes from a counter): this branch's own copy
            new = f"{tag}/{init.name}"
            renamed.setdefault(tag, {})[init.name] = new
            copy = onnx.TensorProto()
            copy.CopyFrom(init)
            copy.name = new
            inits[new] = copy
    if count not in inputs:
        inputs[count] = helper.make_tensor_value_info(count, onnx.TensorProto.INT64, [count[len("ditmerge_count_"):]])
    outer = set(inits) | set(inputs)
    dims = _dim_sources(inputs)

    length = "ditmerge_branch/len"
    nodes = [helper.make_node("Shape", [count], [length], name="ditmerge_branch/len")]
    branches = [_branch(m.graph, tag, outer, outputs, dims, renamed.get(tag, {})) for tag, m in items]
    # nested: If(len == 0, b0, If(len == 1, b1, ... b_last))
    body = branches[-1]
    for i in range(len(items) - 2, -1, -1):
        cond = _condition(nodes, length, i)
        out_names = [f"ditmerge_branch/if{i}/{o}" for o in outputs] if i else list(outputs)
        node = helper.make_node("If", [cond], out_names, name=f"ditmerge_branch/if{i}", then_branch=branches[i],
                                else_branch=body)
        if i == 0:
            nodes.append(node)
        else:
            body = helper.make_graph([node], f"ditmerge_branch_{i}", [],
                                     [_untyped(n, outputs[o]) for n, o in zip(out_names, outputs)])
    graph = helper.make_graph(nodes, meta_from.graph.name, list(inputs.values()), list(outputs.values()),
                              list(inits.values()))
    out = helper.make_model(graph, opset_imports=list(meta_from.opset_import), ir_version=meta_from.ir_version)
    out.producer_name = meta_from.producer_name
    out.metadata_props.extend(meta_from.metadata_props)
    if record:
        info = {"key": VARIANT_COUNT, "variants": {
            tag: {"index": i, "inputs": [vi.name for vi in m.graph.input if vi.name not in {x.name for x in m.graph.initializer}],
                  "outputs": [vi.name for vi in m.graph.output]} for i, (tag, m) in enumerate(items)}}
        set_model_meta(out, branch=info)
    logger.debug("branch: one graph for %s behind If on %s", ", ".join(f"{t} ({len(m.graph.node)} nodes)" for t, m in items),
                count)
    return out


def _condition(nodes: list, length: str, index: int) -> str:
    value = f"ditmerge_branch/is{index}_value"
    eq, cond = f"ditmerge_branch/is{index}_eq", f"ditmerge_branch/is{index}"
    nodes.append(helper.make_node("Constant", [], [value], name=value,
                                  value=helper.make_tensor(value, onnx.TensorProto.INT64, [1], [index])))
    nodes.append(helper.make_node("Equal", [length, value], [eq], name=eq))
    nodes.append(helper.make_node("Squeeze", [eq], [cond], name=cond))
    return cond


def _untyped(name: str, like: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, like.type.tensor_type.elem_type, None)


def _dim_sources(inputs: dict[str, onnx.ValueInfoProto]) -> dict[str, tuple[str, int]]:
    """Symbolic dim -> (an input that has it, its axis): where a filler's dynamic sizes come from."""
    out: dict[str, tuple[str, int]] = {}
    for name, vi in inputs.items():
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.dim_param:
                out.setdefault(d.dim_param, (name, axis))
    return out


def _branch(graph: onnx.GraphProto, tag: str, outer: set[str], outputs: dict[str, onnx.ValueInfoProto],
            dims: dict[str, tuple[str, int]], constants: dict[str, str]) -> onnx.GraphProto:
    """``graph``'s nodes as an If branch: local names under ``tag``; outputs it lacks are zeros of their shape.

    ``constants``: initializers of this branch stored under another name (their name clashed).
    """
    local = {o for n in graph.node for o in n.output if o} - outer
    rename = {**{name: f"{tag}/{name}" for name in local}, **constants}
    nodes = []
    for n in graph.node:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.name = f"{tag}/{n.name}" if n.name else ""
        c.input[:] = [rename.get(i, i) for i in n.input]
        c.output[:] = [rename.get(o, o) for o in n.output]
        nodes.append(c)
    own = {o.name for o in graph.output}
    outs = []
    for name, vi in outputs.items():
        if name in own:
            src = rename.get(name, name)
            if src in outer:  # an output that is an input or a weight: If outputs must be produced inside
                nodes.append(helper.make_node("Identity", [src], [f"{tag}/{name}:out"], name=f"{tag}/{name}:out"))
                src = f"{tag}/{name}:out"
        else:
            src = _zeros(nodes, f"{tag}/{name}:zeros", vi, dims)
        outs.append(_untyped(src, vi))
    return helper.make_graph(nodes, tag, [], outs)


def _zeros(nodes: list, name: str, vi: onnx.ValueInfoProto, dims: dict[str, tuple[str, int]]) -> str:
    parts = []
    for axis, d in enumerate(vi.type.tensor_type.shape.dim):
        if d.HasField("dim_value"):
            const = f"{name}/d{axis}"
            nodes.append(helper.make_node("Constant", [], [const], name=const,
                                          value=helper.make_tensor(const, onnx.TensorProto.INT64, [1], [d.dim_value])))
            parts.append(const)
        elif d.dim_param in dims:
            src, src_axis = dims[d.dim_param]
            dim = f"{name}/d{axis}"
            nodes.append(helper.make_node("Shape", [src], [dim], name=dim, start=src_axis, end=src_axis + 1))
            parts.append(dim)
        else:
            raise DitmergeError(f"output {vi.name!r} of one variant has a dim {d.dim_param or '?'} that no input "
                                "gives; the other variants cannot produce a stand-in for it")
    shape = f"{name}/shape"
    nodes.append(helper.make_node("Concat", parts, [shape], name=shape, axis=0) if parts else
                 helper.make_node("Constant", [], [shape], name=shape,
                                  value=helper.make_tensor(shape, onnx.TensorProto.INT64, [0], [])))
    elem = vi.type.tensor_type.elem_type
    zero = helper.make_tensor(f"{name}/value", elem, [1], np.zeros(1, onnx.helper.tensor_dtype_to_np_dtype(elem)))
    nodes.append(helper.make_node("ConstantOfShape", [shape], [name], name=name, value=zero))
    return name
