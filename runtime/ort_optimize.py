"""An onnxruntime-only copy of a plan graph, with the fusion onnxruntime's own optimizer misses.

onnxruntime fuses a residual ``Add`` followed by ``LayerNormalization`` into one
``SkipLayerNormalization`` only when the ``Add`` feeds nothing else and its shapes are known. In a DiT
block the residual sum also feeds the next residual ``Add``, so none of the blocks' Add + LayerNorm pairs
fuse, and in the graphs behind ``If`` (a ToMe plan's one graph) the shapes are unknown to it as well.
:func:`fuse_skip_layernorm` writes the contrib op itself, with the sum as its fourth output, where ONNX's
own shape inference shows both ``Add`` operands to have one rank-3 shape (a broadcasting ``Add`` stays
as it is). Shapes are inferred twice, every dynamic input dim (token counts, the batch) fixed at other
values each time, and inside ``If`` branches on the branch lifted into a standalone graph.

The copy lives beside the graph (``<stem>.ort.onnx``), keyed by the source graph's sha256: its
initializers are the source's, unchanged, external in the plan's one weights file (no second copy on
disk; the runner's :class:`~runtime.runners.SharedWeights` serves both). Contrib ops make it unfit for
TensorRT: only CPU onnxruntime sessions ever load it (:func:`runtime.runners.OrtRunner`). It is opt-in
(``OrtRunner(optimize=True)``): on onnxruntime 1.31 CPU the fused kernel is slower than the pair it
replaces, and forwards through the copy ran at 0.91-0.97x (benchmarks/ort_profile.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import helper

logger = logging.getLogger(__name__)

COPY_SUFFIX = ".ort.onnx"
META_KEY = "ditmerge.ort_copy"  # {"source_sha256", "version", "fused"}
VERSION = 1
PROBES = (2, 5)  # every dynamic input dim (counts, batch) is fixed at probe + its index: a fused Add agrees at both


def session_graph(graph_path: Path, providers: list[str], optimize: bool) -> Path:
    """The file an onnxruntime session over ``graph_path`` runs: its copy only for CPU-only sessions."""
    if optimize and list(providers) == ["CPUExecutionProvider"]:
        return optimized_copy(graph_path) or graph_path
    return graph_path


def disabled_optimizers(providers: list[str]) -> list[str]:
    """onnxruntime fusions a session leaves out: on CPU its SkipLayerNormalization kernel is slower than the
    Add and LayerNormalization it replaces (3.5x the CPU time at DiT-XL/2 width, onnxruntime 1.31;
    benchmarks/ort_profile.py)."""
    return ["SkipLayerNormFusion"] if list(providers) == ["CPUExecutionProvider"] else []


def copy_path(graph_path: Path) -> Path:
    return graph_path.with_name(graph_path.name.removesuffix(".onnx") + COPY_SUFFIX)


def optimized_copy(graph_path: Path) -> Path | None:
    """The onnxruntime-only copy of ``graph_path``, made when missing or stale; None when nothing fuses or the
    graph's folder is not writable (the caller runs the plain graph)."""
    data = graph_path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    out = copy_path(graph_path)
    if out.exists():
        try:
            meta = _copy_meta(onnx.load(out, load_external_data=False))
            if meta.get("source_sha256") == sha and meta.get("version") == VERSION:
                return out
        except (OSError, ValueError, DecodeError, onnx.checker.ValidationError) as e:
            logger.debug("remaking the onnxruntime copy of %s: %s", graph_path.name, e)  # truncated or foreign
    model = onnx.load_from_string(data)
    fused = fuse_skip_layernorm(model)
    if not fused:
        return None
    model.metadata_props.append(onnx.StringStringEntryProto(
        key=META_KEY, value=json.dumps({"source_sha256": sha, "version": VERSION, "fused": fused})))
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_bytes(model.SerializeToString())
        tmp.replace(out)  # atomic: a concurrent loader sees the old copy or the new one
    except OSError as e:
        logger.info("no onnxruntime copy of %s (%s): running the plain graph", graph_path.name, e)
        tmp.unlink(missing_ok=True)
        return None
    logger.info("onnxruntime copy of %s: %d Add + LayerNorm fused", graph_path.name, fused)
    return out


def _copy_meta(model: onnx.ModelProto) -> dict:
    for p in model.metadata_props:
        if p.key == META_KEY:
            return json.loads(p.value)
    return {}


def fuse_skip_layernorm(model: onnx.ModelProto) -> int:
    """Rewrite ``Add -> LayerNormalization(axis=-1)`` into ``com.microsoft.SkipLayerNormalization`` in place,
    in the main graph and every subgraph; returns how many pairs fused."""
    shapes = [_infer(model, n) for n in PROBES]
    fused = _fuse_graph(model.graph, (), shapes)
    if fused and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return fused


def _fuse_graph(graph: onnx.GraphProto, path: tuple, probes: list[dict[tuple, dict[str, tuple]]]) -> int:
    fused = 0
    for k, node in enumerate(graph.node):  # subgraphs first, while the node indices are the inferred ones
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                fused += _fuse_graph(attr.g, path + ((k, attr.name),), probes)
    shapes = [p.get(path, {}) for p in probes]
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    replace: dict[int, onnx.NodeProto] = {}  # the LN's index -> the fused node; the Add is dropped
    drop: set[int] = set()
    for i, ln in enumerate(graph.node):
        if ln.op_type != "LayerNormalization" or ln.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in ln.attribute}
        if attrs.get("axis", -1) != -1 or attrs.get("stash_type", 1) != 1 or any(ln.output[1:]):
            continue
        j = producer.get(ln.input[0])
        if j is None or j in drop:
            continue
        add = graph.node[j]
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            continue
        # the fused node stands where the LN stood: nothing between the two may read the sum
        if any(add.output[0] in n.input or _has_subgraph(n) for n in graph.node[j + 1:i]):
            continue
        if not all(_same_rank3(s.get(add.input[0]), s.get(add.input[1])) for s in shapes):
            continue
        keep_sum = readers.get(add.output[0], 0) > 1 or add.output[0] in {o.name for o in graph.output}
        ins = [add.input[0], add.input[1], ln.input[1]] + ([ln.input[2]] if len(ln.input) > 2 and ln.input[2] else [])
        outs = [ln.output[0], "", "", add.output[0]] if keep_sum else [ln.output[0]]
        replace[i] = helper.make_node("SkipLayerNormalization", ins, outs, name=f"{ln.name}/skip_fused",
                                      domain="com.microsoft", epsilon=float(attrs.get("epsilon", 1e-5)))
        drop.add(j)
    if not replace:
        return fused
    nodes = [replace.get(k, n) for k, n in enumerate(graph.node) if k not in drop]
    del graph.node[:]
    graph.node.extend(nodes)
    return fused + len(replace)


def _same_rank3(a: tuple | None, b: tuple | None) -> bool:
    """Both shapes known to the last dim, rank 3, equal."""
    return a is not None and len(a) == 3 and a == b and all(isinstance(d, int) and d > 0 for d in a)


def _infer(model: onnx.ModelProto, probe: int) -> dict[tuple, dict[str, tuple]]:
    """Per graph (its path of (node index, attribute) from the main graph): tensor name -> shape, with the
    i-th dynamic dim of the inputs (a count, the batch) fixed at ``probe + i``. Each subgraph is inferred
    lifted into a standalone graph after its enclosing graphs' nodes: ONNX's inference does not carry
    values (the shapes a Reshape reads) into subgraphs."""
    inputs, symbols = [], {}
    for vi in model.graph.input:
        vi = onnx.ValueInfoProto.FromString(vi.SerializeToString())
        for d in vi.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                key = d.dim_param or f"{vi.name}/{len(symbols)}"  # an unnamed dim is its own symbol
                value = symbols.setdefault(key, probe + len(symbols))
                d.Clear()
                d.dim_value = value
        inputs.append(vi)
    out: dict[tuple, dict[str, tuple]] = {}
    stack = [((), model.graph, [], list(model.graph.initializer))]
    while stack:
        path, graph, before, inits = stack.pop()
        nodes = before + [n for n in graph.node if not _has_subgraph(n)]
        flat = helper.make_graph(nodes, "flat", inputs, list(graph.output), inits)
        lifted = helper.make_model(flat, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        try:
            done = onnx.shape_inference.infer_shapes(lifted, data_prop=True)
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:  # nothing here fuses
            logger.debug("shape inference failed on a lifted subgraph: %s", e)
            done = lifted
        known = out[path] = {}
        for vi in list(done.graph.value_info) + list(done.graph.input) + list(done.graph.output):
            if vi.type.tensor_type.HasField("shape"):
                known.setdefault(vi.name, tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                                              for d in vi.type.tensor_type.shape.dim))
        for k, n in enumerate(graph.node):
            for attr in n.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append((path + ((k, attr.name),), attr.g, nodes, inits + list(attr.g.initializer)))
    return out


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
