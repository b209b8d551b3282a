"""The MoD pass: route every transformer block of a DiT graph through its trained router at capacity k.

Blocks are located by module scope (``transformer_blocks.i``): the block's residual-stream input is
the one ``[B, N, C]`` tensor its nodes read from outside, its output the one ``[B, N, C]`` tensor read
outside. The block's nodes that lead to the output read the routed tokens instead of the input; every
reader of the output reads the combined stream. The math is :mod:`passes.mod.graph`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re

import numpy as np
import onnx

from passes.cleanup import FreeTokenAxisPass
from passes.errors import DitmergeError
from passes.graphbuild import Emitter, count_input
from passes.infra import PassResult, StampedPass
from passes.locate import Topology, _node_scopes, tensor_shapes
from passes.mod.graph import build_combine, build_route
from passes.onnxutil import export_graph, graph_grid, import_graph, infer_shapes, set_model_meta
from passes.trt_limits import TOPK_MAX_K

from passes.mod.variants import k_count

logger = logging.getLogger(__name__)

_BLOCK_RE = re.compile(r"(?:^|\.)transformer_blocks\.(\d+)$")


@dataclasses.dataclass
class Block:
    """One transformer block's residual-stream boundary, or why it has none."""

    index: int
    nodes: list[str]
    input: str | None = None
    output: str | None = None
    reason: str | None = None


def find_blocks(model: onnx.ModelProto, num_tokens: int) -> list[Block]:
    """Every ``transformer_blocks.i`` of a shaped graph with its ``[B, N, C]`` input and output."""
    members: dict[int, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in model.graph.node:
        scopes, _ = _node_scopes(node)
        for scope in scopes:
            m = _BLOCK_RE.search(scope)
            if m and "single_transformer_blocks" not in scope:
                members[int(m.group(1))].append(node)
                break
    topo = Topology.of(model, num_tokens)
    blocks = []
    for index in sorted(members):
        nodes = members[index]
        ins, outs = topo.boundary(nodes)
        ins, outs = [t for t in ins if topo.image_like(t)], [t for t in outs if topo.image_like(t)]
        block = Block(index, [n.name for n in nodes])
        if len(ins) != 1:
            block.reason = f"expected one [B, {num_tokens}, C] input, found {len(ins)}"
        elif len(outs) != 1:
            block.reason = f"expected one [B, {num_tokens}, C] output, found {len(outs)}"
        else:
            block.input, block.output = ins[0], outs[0]
        blocks.append(block)
    return blocks


@dataclasses.dataclass
class ModConfig:
    """Per block: capacity ``k`` (tokens that run it) and the router's weight [C] and bias.

    ``dynamic``: the blocks whose capacity is a count input (``ditmerge_count_mod_k_<i>``), so one graph
    serves every bucket; their ``capacities`` are the bucket's (:func:`bucket_values`), not in the graph.
    The other blocks' capacities are constants of the graph.
    """

    capacities: tuple[int, ...]
    weights: tuple[np.ndarray, ...]
    biases: tuple[float, ...]
    dynamic: tuple[int, ...] = ()

    def validate(self, tokens: int) -> None:
        if not (len(self.capacities) == len(self.weights) == len(self.biases)):
            raise DitmergeError(f"{len(self.capacities)} capacities for {len(self.weights)} routers")
        for i, k in enumerate(self.capacities):
            if not 1 <= k <= tokens:
                raise DitmergeError(f"block {i}: capacity {k} is outside [1, {tokens}]")
            # a count capacity is always a TopK K, even at k = N
            if (tokens > k or i in self.dynamic) and k > TOPK_MAX_K:
                raise DitmergeError(f"block {i}: capacity {k} exceeds TensorRT's TopK limit {TOPK_MAX_K}; "
                                    f"use a grid of at most {TOPK_MAX_K} tokens or a higher compression")


class ModPass(StampedPass):
    """Insert MoD routing around every transformer block; a second run with the same config is a no-op."""

    name = "mod"

    config: ModConfig

    def stamp(self) -> dict:
        """The graph's constants only: count capacities and the bucket index are not in it."""
        cfg = self.config
        return {"pass": self.name, "method": "mod",
                "capacities": ["count" if i in cfg.dynamic else k for i, k in enumerate(cfg.capacities)]}

    carries, apply_to = "MoD routing", "the unrouted graph"

    def requires(self, model: onnx.ModelProto) -> None:
        grid = graph_grid(model)
        self.config.validate(grid[0] * grid[1])

    def call(self, model: onnx.ModelProto) -> PassResult:
        cfg = self.config
        grid = graph_grid(model)
        n = grid[0] * grid[1]
        model = FreeTokenAxisPass(n)(model).model
        shaped = infer_shapes(model)
        blocks = find_blocks(shaped, n)
        if len(blocks) != len(cfg.capacities):
            raise DitmergeError(f"the graph has {len(blocks)} transformer blocks, the routers are for "
                                f"{len(cfg.capacities)} (fine-tuned for another model?)")
        bad = [b for b in blocks if b.reason]
        if bad:
            raise DitmergeError("cannot route " + "; ".join(f"transformer_blocks.{b.index}: {b.reason}" for b in bad))
        shapes = tensor_shapes(shaped)

        graph, meta = import_graph(model)
        tensors = graph.tensors()
        em = Emitter(graph, "ditmerge_mod")
        combined: dict[str, object] = {}  # a routed block's output name -> the combined stream replacing it
        for i, (block, k, w, b) in enumerate(zip(blocks, cfg.capacities, cfg.weights, cfg.biases)):
            x, y = combined.get(block.input, tensors[block.input]), tensors[block.output]
            if any(o is y for o in graph.outputs):
                raise DitmergeError(f"transformer_blocks.{block.index} writes a graph output; cannot route it")
            channels = int(shapes[block.input][1][2])
            if w.size != channels:
                raise DitmergeError(f"transformer_blocks.{block.index}: router has {w.size} weights, the block "
                                    f"{channels} channels")
            em.prefix = f"ditmerge_mod/transformer_blocks.{block.index}"
            dyn = count_input(graph, k_count(i)) if i in cfg.dynamic else None
            st = build_route(em, x, w, b, k, n, channels, dyn)
            if st.idx is not None:  # the block's nodes on the way to y read the routed tokens
                inside = _ancestors(y, x)
                for nd in inside:
                    nd.inputs = [st.x_r if t is x else t for t in nd.inputs]
            before = len(em.inserted)
            out = build_combine(em, x, y, st, channels)
            mine = set(em.inserted[before:])
            combined[block.output] = out
            for nd in list(y.outputs):
                if nd.name not in mine:
                    nd.inputs = [out if t is y else t for t in nd.inputs]
        out_model = export_graph(graph, model, meta, stamp=self.stamp(), stamped=em.inserted)
        # no per-bucket capacity here: a count block's capacity is the bucket's (bucket_values)
        set_model_meta(out_model, mod={"capacities": self.stamp()["capacities"], "tokens": n,
                                       "counts": {f"transformer_blocks.{blocks[i].index}": k_count(i)
                                                  for i in cfg.dynamic},
                                       "blocks": [f"transformer_blocks.{b.index}" for b in blocks]})
        out_model = infer_shapes(out_model)
        logger.info("mod: routed %d blocks, capacities %s of %d tokens", len(blocks), list(cfg.capacities), n)
        return PassResult(out_model, True)


def bucket_values(capacities: list[int], dynamic: tuple[int, ...]) -> dict:
    """A bucket's own values (its ``method_meta``): capacities per block, and ``counts`` for the count blocks."""
    return {"capacities": list(capacities), "counts": {k_count(i): int(capacities[i]) for i in dynamic}}


def _ancestors(y, x) -> list:
    """Nodes on a path from ``x`` to ``y`` that read ``x`` (walk back from ``y``, stop at ``x``)."""
    seen, stack, readers = set(), [y], []
    while stack:
        t = stack.pop()
        if t is x:
            continue
        for nd in t.inputs:  # the producer(s) of t
            if id(nd) in seen:
                continue
            seen.add(id(nd))
            if any(i is x for i in nd.inputs):
                readers.append(nd)
            stack.extend(i for i in nd.inputs if i is not x)
    return readers
