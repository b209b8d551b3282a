"""The step-cache pass: a span of blocks whose residual a later step reuses (docs/design.md, 'Step caching').

A *span* is the blocks ``start..end-1`` of the model's block list (``transformer_blocks`` then
``single_transformer_blocks``). Its *streams* are the token tensors that flow through it: the image
tokens ``[B, N, C]`` and, in MMDiT blocks (SD3, Flux), the text tokens ``[B, L, C]``. Variants:

- ``full``: the graph runs every block and also outputs ``cache_residual_out.<stream>`` = the stream after
  the span minus before it (Delta-DiT's Delta-Cache; DBCache's middle-block residual);
- ``cached``: the span's blocks are gone; each stream after the span is ``before + cache_residual.<stream>``
  (an input), and the back blocks run on it.

With ``adaptive`` set (first-block caching), ``full`` also outputs the image stream entering the span
(the front blocks' output) as ``cache_front_out``, and ``cached`` takes it back as ``cache_front`` and
outputs ``cache_change [B]`` = mean |front - front_ref| / mean |front_ref| per row, which the runtime
compares with a threshold to choose the next step's variant.

The span is located on the unmerged graph by module scope (as :mod:`passes.locate` finds sublayers) and
its boundary checked by shape; the tensor names it finds survive the ToMe pass, so the same span can be
cut out of, or read from, a merged graph (full steps that merge and cache).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from passes.errors import DitmergeError
from passes.graphbuild import Emitter
from passes.infra import PassResult, StampedPass
from passes.locate import FLOAT_TYPES, Topology, _node_scopes
from passes.onnxutil import export_graph, graph_grid, import_graph, infer_shapes, set_model_meta

from passes.cache.variants import (FRONT_INPUT, FRONT_OUTPUT, CHANGE_OUTPUT, VARIANTS,
    STREAMS, cache_input, cache_output)

logger = logging.getLogger(__name__)

_BLOCK_RE = re.compile(r"(?:^|\.)((single_transformer_blocks|transformer_blocks)\.(\d+))$")
EPS = 1e-8  # keeps the relative change finite on an all-zero reference


@dataclasses.dataclass
class Stream:
    name: str  # "image" or "text"
    before: str  # tensor entering the span
    after: str  # tensor leaving it
    tokens: int | str  # a dim name where the length is dynamic (the prompt axis)
    width: int


@dataclasses.dataclass
class Span:
    """A located span: its blocks, their nodes and its streams; ``reason`` says why it cannot be cached."""

    start: int
    end: int
    blocks: list[str]
    nodes: list[str]
    streams: list[Stream]
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def block_paths(model: onnx.ModelProto) -> list[str]:
    """The model's blocks in execution order, as module paths (``transformer_blocks.0``, ...)."""
    found: dict[str, tuple[bool, int]] = {}
    for node in model.graph.node:
        for scope in _node_scopes(node)[0]:
            m = _BLOCK_RE.search(scope)
            if m:
                found[m.group(1)] = (m.group(2).startswith("single"), int(m.group(3)))
    return sorted(found, key=found.__getitem__)


def locate_span(model: onnx.ModelProto, num_tokens: int, start: int, end: int) -> Span:
    """The span of blocks ``start..end-1`` of a shaped, unmerged graph, checked by shape.

    A dynamic prompt axis is fixed to a stand-in length for the search (shape inference loses its name
    past the joint split and concat); the text stream's length is then reported as the axis name.
    """
    axis, model = _static_prompt(model, num_tokens)
    span = _locate_span(model, num_tokens, start, end)
    if not span.ok and axis is not None:
        # Flux computes its joint split sizes from the prompt length through shape arithmetic ONNX's data
        # propagation does not follow; with the lengths fixed, folding that arithmetic gives every stream a shape
        folded = _locate_span(_folded_shapes(model), num_tokens, start, end)
        span = folded if folded.ok else span
    if axis is not None:
        for s in span.streams:
            if s.name == "text":
                s.tokens = axis
    return span


def _static_prompt(model: onnx.ModelProto, num_tokens: int) -> tuple[str | None, onnx.ModelProto]:
    """``model`` with its dynamic prompt axis (if any) set to a length unlike the image's, shapes re-inferred."""
    dynamic = [d for vi in model.graph.input if vi.name == "encoder_hidden_states"
               for d in vi.type.tensor_type.shape.dim[1:2] if d.dim_param]
    if not dynamic:
        return None, model
    axis = dynamic[0].dim_param
    length = num_tokens + 1  # any length the image stream does not have
    fixed = onnx.ModelProto.FromString(model.SerializeToString())
    for vi in fixed.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param == axis:
                d.dim_value = length  # clears dim_param (a oneof)
            elif d.dim_param == "batch":
                d.dim_value = 2  # static too, so computed reshapes (Flux's joint split) infer
    return axis, infer_shapes(fixed)


def _folded_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (static dims) with its shape arithmetic constant-folded (onnxscript's folder), shapes
    re-inferred. For locating only: weights stay unread (external initializers become inputs of their shape),
    and the tensors the span is cut at keep their names."""
    import onnx_ir
    import onnxscript.optimizer

    light = onnx.ModelProto()
    light.CopyFrom(model)
    inline = [i for i in light.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
    for init in light.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            light.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    del light.graph.initializer[:]
    light.graph.initializer.extend(inline)
    ir_model = onnx_ir.from_proto(light)
    onnxscript.optimizer.fold_constants(ir_model)
    return infer_shapes(onnx_ir.to_proto(ir_model))


def _locate_span(model: onnx.ModelProto, num_tokens: int, start: int, end: int) -> Span:
    paths = block_paths(model)
    span = Span(start, end, paths[start:end], [], [])
    if not 0 <= start < end <= len(paths):
        span.reason = f"span {start}-{end} is not inside the model's {len(paths)} blocks (0-{len(paths)})"
        return span
    wanted = set(span.blocks)
    nodes = []
    for node in model.graph.node:
        for scope in _node_scopes(node)[0]:
            m = _BLOCK_RE.search(scope)
            if m and m.group(1) in wanted:
                nodes.append(node)
                break
    topo = Topology.of(model, num_tokens)
    nodes = _absorb_unscoped(model, nodes, topo)
    span.nodes = [n.name for n in nodes]
    ins, outs = topo.boundary(nodes)

    text_tokens = _text_tokens(model)
    if text_tokens == num_tokens:
        span.reason = f"text and image streams both have {num_tokens} tokens; their residuals cannot be told apart"
        return span

    def tokens(name: str) -> tuple[str, int, int] | None:
        # token streams only: image [B, N, C] or text [B, L, C] (not e.g. PixArt's [B, 6, C] modulation)
        elem, dims = topo.shapes.get(name, (0, []))
        if elem not in FLOAT_TYPES or len(dims) != 3 or not isinstance(dims[2], int):
            return None
        if dims[1] == num_tokens:
            return "image", num_tokens, dims[2]
        if text_tokens is not None and dims[1] == text_tokens:
            return "text", text_tokens, dims[2]
        return None

    for name in outs:
        kind = tokens(name)
        if kind is None:
            continue  # not a token stream (e.g. DiT's final-layer conditioning, computed in block 0): kept alive
        matches = [i for i in ins if tokens(i) == kind]
        if any(s.name == kind[0] for s in span.streams):
            span.reason = f"the span outputs two {kind[0]} streams ({name} and another)"
        elif len(matches) != 1:
            span.reason = f"the {kind[0]} stream {name} {list(kind[1:])} has {len(matches)} inputs of its shape, expected 1"
        else:
            span.streams.append(Stream(kind[0], matches[0], name, kind[1], kind[2]))
    if span.ok and not any(s.name == "image" for s in span.streams):
        span.reason = f"no [B, {num_tokens}, C] image stream leaves the span"
    span.streams.sort(key=lambda s: STREAMS.index(s.name))
    return span


def _absorb_unscoped(model: onnx.ModelProto, nodes: list[onnx.NodeProto], topo: Topology) -> list[onnx.NodeProto]:
    """Add the scope-less nodes that sit between the span's own (Flux's joint-attention Split has no scope)."""
    inside = {n.name for n in nodes}
    loose = [n for n in model.graph.node if not _node_scopes(n)[0] and n.name not in inside]
    changed = True
    while changed:
        changed = False
        for n in loose:
            if n.name in inside:
                continue
            feeds = [t for t in n.input if t and t not in topo.inits and t in topo.producers]
            used = {c for t in n.output for c in topo.consumers.get(t, ())}
            if feeds and all(topo.producers[t] in inside for t in feeds) and used & inside:
                inside.add(n.name)
                changed = True
    return [n for n in model.graph.node if n.name in inside]


def _text_tokens(model: onnx.ModelProto) -> int | str | None:
    """The prompt length L of text-conditioned graphs (their ``encoder_hidden_states`` input [B, L, D]).

    An int where the export fixed it, the axis name (``"text"``) where the prompt length is dynamic.
    """
    for vi in model.graph.input:
        if vi.name == "encoder_hidden_states":
            dims = vi.type.tensor_type.shape.dim
            if len(dims) == 3 and dims[1].HasField("dim_value"):
                return int(dims[1].dim_value)
            if len(dims) == 3 and dims[1].dim_param:
                return dims[1].dim_param
    return None


@dataclasses.dataclass
class CacheConfig:
    variant: str = "full"
    start: int = 1
    end: int = 2
    adaptive: bool = False

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise DitmergeError(f"unknown cache variant {self.variant!r}; choose from {', '.join(VARIANTS)}")
        if self.adaptive and self.start < 1:
            raise DitmergeError("the adaptive rule compares the front blocks' output: the span must start at block 1 "
                                "or later")


class CachePass(StampedPass):
    """Insert one cache variant (see the module docstring); a second run with the same stamp is a no-op.

    ``locate_on``: the unmerged graph to find the span in, when the input graph is already merged;
    ``span``: the span already located there (:func:`locate_span`), so that a build that inserts several
    variants of one span locates it once (on Flux that includes a constant fold of the whole graph).
    """

    name = "cache"

    def __init__(self, config: CacheConfig, bucket: int | str = "", locate_on: onnx.ModelProto | None = None,
                 span: Span | None = None) -> None:
        super().__init__(config, bucket)
        self.locate_on = locate_on
        self.span = span

    def stamp(self) -> dict:
        return json.loads(json.dumps({"pass": self.name, "method": "cache", "bucket": self.bucket,
                                      **dataclasses.asdict(self.config)}))

    carries, apply_to = "a step cache", "an uncached graph"

    def requires(self, model: onnx.ModelProto) -> None:
        self.config.validate()

    def call(self, model: onnx.ModelProto) -> PassResult:
        cfg = self.config
        grid = graph_grid(model)
        n = grid[0] * grid[1]
        span = self.span or locate_span(infer_shapes(self.locate_on if self.locate_on is not None else model), n,
                                        cfg.start, cfg.end)
        if not span.ok:
            raise DitmergeError(f"cannot cache blocks {cfg.start}-{cfg.end - 1}: {span.reason}")
        graph, meta = import_graph(model)
        tensors = graph.tensors()
        missing = [t for s in span.streams for t in (s.before, s.after) if t not in tensors]
        if missing:
            raise DitmergeError(f"the span's stream tensors {missing} are not in the graph (was it merged across "
                                "block boundaries?)")
        batch = graph.inputs[0].shape[0]
        em = Emitter(graph, f"ditmerge_cache/{cfg.variant}")
        image = next(s for s in span.streams if s.name == "image")
        if cfg.variant == "full":
            for s in span.streams:
                res = em.op("Sub", [tensors[s.after], tensors[s.before]], hint=f"residual_{s.name}")
                graph.outputs.append(_named_identity(em, res, cache_output(s.name), [batch, s.tokens, s.width]))
            if cfg.adaptive:
                graph.outputs.append(_named_identity(em, tensors[image.before], FRONT_OUTPUT,
                                                     [batch, image.tokens, image.width]))
        else:
            span_nodes = set(span.nodes)
            for s in span.streams:
                cache = gs.Variable(cache_input(s.name), dtype=np.float32, shape=[batch, s.tokens, s.width])
                graph.inputs.append(cache)
                after = em.op("Add", [tensors[s.before], cache], hint=f"cached_{s.name}")
                old = tensors[s.after]
                for nd in list(old.outputs):
                    if nd.name not in span_nodes and nd.name not in em.inserted:
                        nd.inputs = [after if t is old else t for t in nd.inputs]
                graph.outputs = [after if t is old else t for t in graph.outputs]
            if cfg.adaptive:
                ref = gs.Variable(FRONT_INPUT, dtype=np.float32, shape=[batch, image.tokens, image.width])
                graph.inputs.append(ref)
                graph.outputs.append(_named_identity(em, _relative_l1(em, tensors[image.before], ref), CHANGE_OUTPUT,
                                                     [batch]))
        out = export_graph(graph, model, meta, stamp=self.stamp(), stamped=em.inserted)
        kept = _kept_span_nodes(out, span)
        info = {"variant": cfg.variant, "start": cfg.start, "end": cfg.end, "blocks": span.blocks,
                "adaptive": cfg.adaptive, "streams": {s.name: [s.tokens, s.width] for s in span.streams},
                # per sample; a dynamic-length (prompt) stream counts per token of its length
                "cache_bytes_per_sample": int(sum(4 * s.tokens * s.width for s in span.streams
                                                  if isinstance(s.tokens, int))),
                "span_nodes": len(span.nodes), "span_nodes_kept": kept}
        set_model_meta(out, cache=info)
        logger.debug("cache: %s variant, blocks %d-%d (%s), streams %s%s", cfg.variant, cfg.start, cfg.end - 1,
                    ", ".join(span.blocks), ", ".join(s.name for s in span.streams),
                    f"; {kept} of the span's {len(span.nodes)} nodes stay (read after the span)" if cfg.variant ==
                    "cached" and kept else "")
        return PassResult(infer_shapes(out), True)


def _relative_l1(em: Emitter, x: gs.Variable, ref: gs.Variable) -> gs.Variable:
    """mean |x - ref| / (mean |ref| + eps) over tokens and channels: [B, N, C] -> [B]."""
    axes = em.ints("axes", [1, 2])
    diff = em.op("ReduceMean", [em.op("Abs", [em.op("Sub", [x, ref])]), axes], {"keepdims": 0})
    norm = em.op("ReduceMean", [em.op("Abs", [ref]), axes], {"keepdims": 0})
    return em.op("Div", [diff, em.op("Add", [norm, em.const("eps", np.float32(EPS))])], hint="relative_change")


def _kept_span_nodes(model: onnx.ModelProto, span: Span) -> int:
    """Nodes of the span's blocks (by module scope) still in ``model``: conditioning or shape arithmetic that
    later blocks read, never token work."""
    counts = span_counts(model)
    return sum(counts[b] for b in span.blocks)


def _named_identity(em: Emitter, x: gs.Variable, name: str, shape: list) -> gs.Variable:
    out = gs.Variable(name, dtype=np.float32, shape=shape)
    node = gs.Node(op="Identity", name=em._name("output"), inputs=[x], outputs=[out])
    em.graph.nodes.append(node)
    em.inserted.append(node.name)
    return out


def span_counts(model: onnx.ModelProto) -> collections.Counter:
    """Nodes per block of a graph (for tests: which blocks a cached variant still runs)."""
    counts: collections.Counter = collections.Counter()
    for node in model.graph.node:
        for scope in _node_scopes(node)[0]:
            m = _BLOCK_RE.search(scope)
            if m:
                counts[m.group(1)] += 1
                break
    return counts
