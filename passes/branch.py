"""One graph for merged and unmerged steps: an ``If`` on a count of zero (docs/design.md, a bucket is a shape).

The merged graph at r = 0 still runs the matching and the merge copies (about 5 % of a DiT-XL/2 forward
on onnxruntime CPU). :func:`branch_on_zero` joins the plain graph and the merged graph into one:
``If(count == 0)`` runs the plain graph's nodes, otherwise the merged graph's. The condition is the
length of a count input, so it is static within a TensorRT profile; both branches read the same
outer-scope weights, so a session (or an engine) holds them once.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper

from passes.counts import count_input_name
from passes.errors import DitmergeError

logger = logging.getLogger(__name__)


def branch_on_zero(plain: onnx.ModelProto, merged: onnx.ModelProto, key: str) -> onnx.ModelProto:
    """``merged`` with an ``If``: when count ``key`` is 0 the nodes of ``plain`` run instead of the merge.

    ``merged`` must be derived from ``plain`` (same inputs, outputs and weights); initializers of the two
    with one name must be equal. Metadata and opsets are ``merged``'s.
    """
    count = count_input_name(key)
    g_plain, g_merged = plain.graph, merged.graph
    if count not in {i.name for i in g_merged.input}:
        raise DitmergeError(f"the merged graph has no count input {count!r}")
    outs = [o.name for o in g_merged.output]
    if outs != [o.name for o in g_plain.output]:
        raise DitmergeError(f"the graphs' outputs differ: {outs} vs {[o.name for o in g_plain.output]}")
    inits = {i.name: i for i in g_merged.initializer}
    for init in g_plain.initializer:
        other = inits.setdefault(init.name, init)
        if other is not init and other.SerializeToString() != init.SerializeToString():
            raise DitmergeError(f"initializer {init.name!r} differs between the graphs; branch a graph with the "
                                "graph it was derived from")
    outer = set(inits) | {i.name for i in g_merged.input}

    def branch(graph: onnx.GraphProto, tag: str) -> onnx.GraphProto:
        # local names get the branch's tag (sibling branches must not define one name twice); outer names stay
        local = {o for n in graph.node for o in n.output if o} - outer
        rename = {name: f"{tag}/{name}" for name in local}
        nodes = []
        for n in graph.node:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            c.name = f"{tag}/{n.name}" if n.name else ""
            c.input[:] = [rename.get(i, i) for i in n.input]
            c.output[:] = [rename.get(o, o) for o in n.output]
            nodes.append(c)
        outputs = [helper.make_tensor_value_info(rename.get(o.name, o.name), o.type.tensor_type.elem_type, None)
                   for o in graph.output]
        return helper.make_graph(nodes, tag, [], outputs)

    length = helper.make_node("Shape", [count], ["ditmerge_branch/count_len"], name="ditmerge_branch/count_len")
    zero = helper.make_tensor("ditmerge_branch/zero", onnx.TensorProto.INT64, [1], [0])
    eq = helper.make_node("Equal", ["ditmerge_branch/count_len", "ditmerge_branch/zero"], ["ditmerge_branch/eq"],
                          name="ditmerge_branch/eq")
    cond = helper.make_node("Squeeze", ["ditmerge_branch/eq"], ["ditmerge_branch/cond"], name="ditmerge_branch/cond")
    node = helper.make_node("If", ["ditmerge_branch/cond"], outs, name="ditmerge_branch/if",
                            then_branch=branch(g_plain, "plain"), else_branch=branch(g_merged, "merged"))
    graph = helper.make_graph([length, eq, cond, node], g_merged.name, list(g_merged.input), list(g_merged.output),
                              list(inits.values()) + [zero])
    out = helper.make_model(graph, opset_imports=list(merged.opset_import), ir_version=merged.ir_version)
    out.metadata_props.extend(merged.metadata_props)
    out.producer_name = merged.producer_name
    logger.info("branch: one graph, %d plain and %d merged nodes behind If(%s == 0)", len(g_plain.node),
                len(g_merged.node), key)
    return out
